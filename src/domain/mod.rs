//! What Store, Redact, Zero and List mean, independent of the wire.

mod error;
mod ids;
mod input;
mod redact;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use secrecy::ExposeSecret;

use crate::crypto::{self, Keyring, Plaintext, RootKey};
use crate::providers::{Params, Provider};
use crate::store::{CredentialRecord, SecretRecord, Store, StoredStatus, WrappedDataKey};

pub use error::VaultError;
pub use ids::{parse_provider, CredentialRef, WorkspaceId};
pub use input::NewCredential;
pub use redact::hint;

const SECRET_PURPOSE: &str = "credvault/v1/secret";

/// Whether a connection currently holds secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Connected,
    Disconnected,
}

/// What a caller may see of a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redacted {
    pub hint: String,
    pub fingerprint: String,
}

/// A connection as callers see it: metadata and redactions, never secrets.
#[derive(Debug, Clone)]
pub struct Connection {
    pub workspace_id: String,
    pub provider: String,
    pub params: BTreeMap<String, String>,
    pub secrets: BTreeMap<String, Redacted>,
    pub status: Status,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub disconnected_at: Option<SystemTime>,
    /// 0 once disconnected.
    pub key_version: u32,
    pub expires_at: Option<SystemTime>,
}

impl From<CredentialRecord> for Connection {
    fn from(r: CredentialRecord) -> Self {
        Self {
            secrets: r
                .secrets
                .into_iter()
                .map(|s| {
                    let redacted = Redacted {
                        hint: s.hint,
                        fingerprint: s.fingerprint,
                    };
                    (s.field, redacted)
                })
                .collect(),
            status: match r.status {
                StoredStatus::Connected => Status::Connected,
                StoredStatus::Disconnected => Status::Disconnected,
            },
            key_version: r.data_key.map_or(0, |k| k.key_version),
            workspace_id: r.workspace_id,
            provider: r.provider,
            params: r.params,
            created_at: r.created_at,
            updated_at: r.updated_at,
            disconnected_at: r.disconnected_at,
            expires_at: r.expires_at,
        }
    }
}

/// A connection's decrypted secrets, for the code that calls the provider.
#[derive(Debug)]
pub struct Decrypted {
    pub provider: Provider,
    pub params: Params,
    pub secrets: BTreeMap<String, Plaintext>,
}

/// The vault: the only holder of the unwrapped keyring.
pub struct Vault {
    store: Arc<dyn Store>,
    keyring: Keyring,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("keyring", &self.keyring)
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Unwraps the stored keyring with `root`, creating one for a new store.
    pub async fn open(store: Arc<dyn Store>, root: &RootKey) -> Result<Self, VaultError> {
        let keyring = match store.load_keys().await? {
            Some(keys) => {
                Keyring::unwrap(root, &keys.versions, &keys.fingerprint_key).map_err(|_| {
                    VaultError::Internal(
                        "the root key does not open this database's key material \
                         (wrong root key, or tampered key tables)"
                            .into(),
                    )
                })?
            }
            None => {
                let (keyring, material) = Keyring::create(root)?;
                store.init_keys(material).await?;
                keyring
            }
        };
        Ok(Self { store, keyring })
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Encrypts and stores a credential, replacing any secrets the connection
    /// held and reconnecting it if it was disconnected.
    pub async fn store(&self, new: NewCredential) -> Result<Connection, VaultError> {
        let target = &new.target;
        let owner = target.owner();
        let (data_key, key_version, sealed_key) = self.keyring.new_data_key(&owner)?;
        let secrets = new
            .secrets
            .iter()
            .map(|(field, value)| {
                let value = value.expose_secret();
                Ok(SecretRecord {
                    sealed: crypto::seal(
                        self.keyring.rng(),
                        &data_key,
                        value.as_bytes(),
                        &secret_aad(target, field),
                    )?,
                    hint: hint(value),
                    fingerprint: self.keyring.fingerprint(value.as_bytes()),
                    field: field.clone(),
                })
            })
            .collect::<Result<Vec<_>, VaultError>>()?;
        let now = SystemTime::now();
        let record = CredentialRecord {
            workspace_id: target.workspace_id.to_string(),
            provider: target.provider.name().to_owned(),
            params: new.params.clone(),
            status: StoredStatus::Connected,
            created_at: now,
            updated_at: now,
            disconnected_at: None,
            expires_at: new.checked.expires_at,
            data_key: Some(WrappedDataKey {
                key_version,
                sealed: sealed_key,
            }),
            secrets,
        };
        Ok(self.store.put(record).await?.into())
    }

    /// The connection's metadata and redacted secrets.
    pub async fn redact(&self, target: &CredentialRef) -> Result<Connection, VaultError> {
        self.record(target).await.map(Connection::from)
    }

    /// Destroys the connection's secret material; keeps its metadata. Idempotent.
    pub async fn zero(&self, target: &CredentialRef) -> Result<Connection, VaultError> {
        self.store
            .zero(
                target.workspace_id.as_str(),
                target.provider.name(),
                SystemTime::now(),
            )
            .await?
            .map(Connection::from)
            .ok_or_else(|| target.not_found())
    }

    /// Every connection of a workspace, by provider name.
    pub async fn list(&self, workspace_id: &WorkspaceId) -> Result<Vec<Connection>, VaultError> {
        let records = self.store.list(workspace_id.as_str()).await?;
        Ok(records.into_iter().map(Connection::from).collect())
    }

    /// Decrypts a connected credential. Any failed check is [`VaultError::DataLoss`]:
    /// never wrong plaintext.
    pub async fn decrypt(&self, target: &CredentialRef) -> Result<Decrypted, VaultError> {
        let record = self.record(target).await?;
        let Some(wrapped) = &record.data_key else {
            return Err(VaultError::FailedPrecondition(format!(
                "the {} connection of workspace `{}` is disconnected",
                target.provider, target.workspace_id
            )));
        };
        let data_key = self
            .keyring
            .open_data_key(&target.owner(), wrapped.key_version, &wrapped.sealed)
            .inspect_err(|_| tamper_warning(target, "data key"))?;
        let secrets = record
            .secrets
            .iter()
            .map(|s| {
                let plain = crypto::open(&data_key, &s.sealed, &secret_aad(target, &s.field))
                    .inspect_err(|_| tamper_warning(target, "secret"))?;
                Ok((s.field.clone(), plain))
            })
            .collect::<Result<BTreeMap<_, _>, VaultError>>()?;
        let declared = target.provider.spec().secrets;
        let complete = declared.len() == secrets.len()
            && declared.iter().all(|f| secrets.contains_key(f.name));
        if !complete {
            tamper_warning(target, "secret field set");
            return Err(VaultError::DataLoss);
        }
        Ok(Decrypted {
            provider: target.provider,
            params: record.params,
            secrets,
        })
    }

    async fn record(&self, target: &CredentialRef) -> Result<CredentialRecord, VaultError> {
        self.store
            .get(target.workspace_id.as_str(), target.provider.name())
            .await?
            .ok_or_else(|| target.not_found())
    }
}

fn secret_aad(target: &CredentialRef, field: &str) -> Vec<u8> {
    let [workspace, provider] = target.owner();
    crypto::associated_data(SECRET_PURPOSE, &[workspace, provider, field.as_bytes()])
}

fn tamper_warning(target: &CredentialRef, what: &str) {
    tracing::warn!(
        workspace = %target.workspace_id,
        provider = %target.provider,
        "stored {what} failed authentication: the database was altered or is corrupt"
    );
}
