//! The vault itself, independent of the wire: what Store, Redact, Zero, List, Validate and
//! Proxy mean (this file and its modules), key rotation, expiry and the health monitor.

mod audit_log;
pub mod clock;
mod error;
pub mod expiry;
mod gateway;
mod hint;
mod ids;
mod input;
mod mint;
pub mod monitor;
pub mod proxy;
pub mod rotation;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};

use crate::audit::{self, Event};
use crate::config::{KeysConfig, ProvidersConfig};
use crate::crypto::{self, Keyring, RootKey};
use crate::outbound::Outbound;
use crate::providers::validation::{Validation, Verdict};
use crate::providers::{Params, Provider, Secrets};
use crate::store::{
    CredentialRecord, Noted, SecretRecord, Shred, Store, StoreError, StoredKeys, StoredStatus,
    VerdictRecord, WrappedDataKey,
};
use gateway::Gateway;

pub use audit_log::{continues_from, AuditLog, Effect, UNDURABLE_MAX};
pub use error::VaultError;
pub use hint::hint;
pub use ids::{parse_provider, CredentialRef, WorkspaceId};
pub use input::NewCredential;

const SECRET_PURPOSE: &str = "credvault/v1/secret";
/// How long a use of the root key may take (a token may hang).
const ROOT_KEY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const PARAMS_PURPOSE: &str = "credvault/v1/params-binding";
/// The purpose of a stored verdict's tag (see [`tagged_verdict`]).
const VERDICT_PURPOSE: &str = "credvault/v1/verdict-binding";
const BIND_PARAMS_METHOD: &str = "KeyAdmin.BindParams";
const UNBOUND_PARAMS: &str = "this database was written before each connection's params were \
     bound to its key: stop every replica, run `credvault keys bind-params --config FILE` once, \
     then start the vault. If that was done before, someone has put the key table back from an \
     older backup: restore the whole database from a backup instead";
const WRONG_ROOT_KEY: &str =
    "the root key does not open this database's key material (wrong root key, or tampered key tables)";

/// Whether a connection currently holds secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    Connected,
    Disconnected,
}

/// What a caller, and the audit log, may see of a secret: its hint and fingerprint.
pub use audit::SecretSummary as Redacted;

/// A connection as callers see it: metadata and redactions, never secrets.
#[derive(Debug, Clone)]
pub struct Connection {
    pub workspace_id: String,
    pub provider: String,
    pub params: BTreeMap<String, String>,
    pub secrets: BTreeMap<String, Redacted>,
    pub status: ConnectionState,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub disconnected_at: Option<SystemTime>,
    /// 0 once disconnected.
    pub key_version: u32,
    pub expires_at: Option<SystemTime>,
    pub last_validation: Option<Validation>,
}

impl Connection {
    /// What an audit event says about this connection: key version, and the
    /// hint and fingerprint of each secret.
    pub fn audit_details(&self) -> audit::Details {
        audit::Details {
            key_version: self.key_version,
            secrets: self.secrets.clone(),
            ..audit::Details::default()
        }
    }
}

impl From<CredentialRecord> for Connection {
    fn from(r: CredentialRecord) -> Self {
        let last_validation = r.last_validation.as_deref().and_then(|json| {
            serde_json::from_str(json)
                .inspect_err(|_| tracing::warn!("a stored last_validation is unreadable; ignored"))
                .ok()
        });
        Self {
            last_validation,
            secrets: summaries(&r.secrets),
            status: match r.status {
                StoredStatus::Connected => ConnectionState::Connected,
                StoredStatus::Disconnected => ConnectionState::Disconnected,
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
    pub secrets: Secrets,
}

/// The vault: the only holder of the unwrapped keyring.
pub struct Vault {
    store: Arc<dyn Store>,
    /// Kept to seal new key versions; shared with the blocking threads that
    /// use it (a token may block).
    root: Arc<RootKey>,
    keyring: RwLock<Keyring>,
    gateway: Gateway,
    audit: AuditLog,
    rotation: tokio::sync::Mutex<()>,
    rewrap_wake: tokio::sync::Notify,
    /// Data keys wrapped by the primary version, for the automatic rotation.
    primary_encryptions: AtomicU64,
    max_encryptions: u64,
    rewrap_batch: usize,
    /// The time expiry is judged by (see [`clock::Clock`]).
    clock: clock::Clock,
    /// What the last expiry check counted (see [`expiry`]).
    expiry: std::sync::Mutex<expiry::ExpiryCounts>,
    /// What the health monitor has done (see [`monitor`]).
    monitor: std::sync::Mutex<monitor::Progress>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("keyring", &*self.keyring_read())
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Unwraps the stored keyring with `root`, creating one for a new store.
    /// Validation calls go through `outbound` to the configured base URLs.
    pub async fn open(
        store: Arc<dyn Store>,
        root: RootKey,
        outbound: Outbound,
        providers: &ProvidersConfig,
        keys: &KeysConfig,
    ) -> Result<Self, VaultError> {
        let root_ref = &root;
        let keyring = match store.load_keys().await? {
            Some(keys) => {
                let keyring = unwrap_keyring(root_ref, &keys)?;
                refuse_unbound(&keys)?;
                keyring
            }
            None => {
                let (keyring, material) = Keyring::create(root_ref)?;
                match store.init_keys(material).await {
                    Ok(()) => keyring,
                    // Another replica starting at the same moment created them first.
                    Err(first) => {
                        let keys = store.load_keys().await?.ok_or(first)?;
                        unwrap_keyring(root_ref, &keys)?
                    }
                }
            }
        };
        let audit = AuditLog::open(Arc::clone(&store), root_ref).await?;
        let primary = keyring.primary_version();
        let primary_encryptions = store
            .key_versions()
            .await?
            .iter()
            .find(|v| v.version == primary)
            .map_or(0, |v| v.encryptions);
        Ok(Self {
            store,
            root: Arc::new(root),
            keyring: RwLock::new(keyring),
            gateway: Gateway::new(outbound, providers)?,
            audit,
            rotation: tokio::sync::Mutex::new(()),
            rewrap_wake: tokio::sync::Notify::new(),
            primary_encryptions: AtomicU64::new(primary_encryptions),
            max_encryptions: keys.max_encryptions_per_version,
            rewrap_batch: keys.rewrap_batch.max(1),
            clock: clock::Clock::system(),
            expiry: std::sync::Mutex::default(),
            monitor: std::sync::Mutex::default(),
        })
    }

    /// The keyring, for a moment: never held across an `.await`.
    fn keyring_read(&self) -> RwLockReadGuard<'_, Keyring> {
        // Writers only insert or remove whole entries; a poisoned lock holds a whole keyring.
        self.keyring.read().unwrap_or_else(|p| p.into_inner())
    }

    fn keyring_write(&self) -> RwLockWriteGuard<'_, Keyring> {
        self.keyring.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn primary_key_version(&self) -> u32 {
        self.keyring_read().primary_version()
    }

    /// Destroying writes whose old bytes the database files still hold.
    pub fn shreds_pending(&self) -> u64 {
        self.store.shreds_pending()
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Whether the root key could seal at the last check (see
    /// [`RootKey::available`]); a token that does not answer stops
    /// rotations, not calls. Never waits on a token.
    pub fn root_key_available(&self) -> bool {
        self.root.available()
    }

    /// Asks the root key's token again (see [`RootKey::check`]), off the
    /// async runtime; false if it does not answer within [`ROOT_KEY_WAIT`].
    pub async fn check_root_key(&self) -> bool {
        self.with_root(|root| Ok(root.check()))
            .await
            .unwrap_or(false)
    }

    /// Runs `f` with the root key on a blocking thread, for at most
    /// [`ROOT_KEY_WAIT`]: a token that hangs fails the one call that needs
    /// it with UNAVAILABLE, and holds no thread of the async runtime.
    async fn with_root<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RootKey) -> Result<T, crypto::CryptoError> + Send + 'static,
    ) -> Result<T, VaultError> {
        let root = Arc::clone(&self.root);
        match tokio::time::timeout(ROOT_KEY_WAIT, tokio::task::spawn_blocking(move || f(&root)))
            .await
        {
            Ok(Ok(done)) => Ok(done?),
            Ok(Err(_)) | Err(_) => Err(crypto::CryptoError::Token.into()),
        }
    }

    /// The time by which credentials' expiry is judged; the system's unless
    /// set (tests move a manual one).
    pub fn set_clock(&mut self, clock: clock::Clock) {
        self.clock = clock;
    }

    pub fn clock(&self) -> &clock::Clock {
        &self.clock
    }

    /// When the events of calls that changed nothing may be answered
    /// (`audit.durability`); [`audit::Durability::EveryCall`] unless set.
    pub fn set_audit_durability(&mut self, durability: audit::Durability) {
        self.audit.set_durability(durability);
    }

    /// Encrypts and stores a credential, replacing any secrets the connection
    /// held and reconnecting it if it was disconnected. With `validate`, the
    /// provider must accept the credentials first, or nothing changes. The
    /// audit event (for `context`) is written in the same transaction.
    pub async fn store(
        &self,
        new: NewCredential,
        validate: bool,
        context: &audit::Context,
    ) -> Result<Connection, VaultError> {
        let target = &new.target;
        let last_validation = if validate {
            self.before_sending(context, audit::Details::default())
                .await?;
            let v = self
                .gateway
                .check(target, &new.secrets, &new.params, self.clock.now())
                .await;
            if v.verdict != Verdict::Valid {
                return Err(VaultError::FailedPrecondition(format!(
                    "validation failed: {}: {}",
                    v.verdict.name(),
                    v.message
                )));
            }
            Some(v)
        } else {
            None
        };
        // A replica can retire the version this one still takes for primary;
        // the store refuses a write under a version not active at its commit.
        // Reload the key versions and wrap again under the primary then.
        let mut attempts = 0;
        let (stored, appended, key_version, encryptions) = loop {
            let (record, event, key_version) =
                self.seal_record(&new, last_validation.as_ref(), context)?;
            match self.store.put(record, event).await {
                Ok((stored, appended, encryptions)) => {
                    break (stored, appended, key_version, encryptions)
                }
                Err(StoreError::VersionRetired(version)) if attempts < STORE_ATTEMPTS => {
                    attempts += 1;
                    tracing::info!(
                        version,
                        "Store: key version retired meanwhile; wrapping again"
                    );
                    self.sync_keyring().await?;
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.audit.appended(&appended);
        self.gateway.forget_token(target);
        let primary = self.primary_key_version();
        if key_version == primary {
            self.primary_encryptions
                .fetch_max(encryptions, Ordering::Relaxed);
        }
        // A Store that began before a rotation wrapped under the old version:
        // the rewrap job moves it; the cap check (at the cluster's count) may rotate.
        if key_version != primary || encryptions >= self.max_encryptions {
            self.rewrap_wake.notify_one();
        }
        Ok(stored.into())
    }

    /// The row and event of a Store, its secrets sealed under a new data key
    /// wrapped by the primary version; returns that version too.
    fn seal_record(
        &self,
        new: &NewCredential,
        last_validation: Option<&Validation>,
        context: &audit::Context,
    ) -> Result<(CredentialRecord, Event, u32), VaultError> {
        let target = &new.target;
        let owner = target.owner();
        let keyring = self.keyring_read();
        let (data_key, key_version, sealed_key) = keyring.new_data_key(&owner)?;
        let binding = params_binding(&data_key, target, &new.params, new.checked.expires_at);
        let last_validation = last_validation
            .map(|v| tagged_verdict(&data_key, target, v))
            .transpose()?;
        let secrets = new
            .secrets
            .iter()
            .map(|(field, value)| {
                let value = value.expose_secret();
                Ok(SecretRecord {
                    sealed: crypto::seal(
                        keyring.rng(),
                        &data_key,
                        value.as_bytes(),
                        &secret_aad(target, field),
                    )?,
                    hint: hint(value),
                    fingerprint: keyring.fingerprint(value.as_bytes()),
                    field: field.clone(),
                })
            })
            .collect::<Result<Vec<_>, VaultError>>()?;
        drop(keyring);
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
            last_validation,
            binding: Some(binding),
        };
        let event = Event::new(
            context,
            audit::OUTCOME_OK,
            audit::Details {
                key_version,
                secrets: summaries(&record.secrets),
                ..audit::Details::default()
            },
        );
        Ok((record, event, key_version))
    }

    /// The connection's metadata and redacted secrets.
    pub async fn redact(&self, target: &CredentialRef) -> Result<Connection, VaultError> {
        self.record(target).await.map(Connection::from)
    }

    /// Destroys the connection's secret material; keeps its metadata.
    /// Idempotent. The audit event is written in the same transaction.
    pub async fn zero(
        &self,
        target: &CredentialRef,
        context: &audit::Context,
    ) -> Result<Connection, VaultError> {
        let event = Event::new(context, audit::OUTCOME_OK, audit::Details::default());
        let (record, appended, shred) = self
            .store
            .zero(
                target.workspace_id.as_str(),
                target.provider.name(),
                SystemTime::now(),
                event,
            )
            .await?
            .ok_or_else(|| target.not_found())?;
        self.audit.appended(&appended);
        // A token minted from the destroyed secret goes with it.
        self.gateway.forget_token(target);
        shredded(
            shred,
            &format!(
                "the {} connection of workspace `{}` is disconnected and its secrets deleted",
                target.provider, target.workspace_id
            ),
        )?;
        Ok(record.into())
    }

    /// A workspace's connections, by provider name; with `expiring_within`, only those whose
    /// credential expires within that time from now, expired ones included.
    pub async fn list(
        &self,
        workspace_id: &WorkspaceId,
        expiring_within: Option<std::time::Duration>,
    ) -> Result<Vec<Connection>, VaultError> {
        let mut records = self.store.list(workspace_id.as_str()).await?;
        if let Some(within) = expiring_within {
            // Past the end of time: every connection that expires at all.
            let until = self.clock.now().checked_add(within);
            records.retain(|r| {
                r.expires_at
                    .is_some_and(|at| until.is_none_or(|until| at <= until))
            });
        }
        Ok(records.into_iter().map(Connection::from).collect())
    }

    /// Calls the provider with the stored credentials and records the verdict.
    /// A disconnected connection, an expired credential, or a connection still
    /// inside a 429's Retry-After window gets its verdict without a call.
    pub async fn validate(
        &self,
        target: &CredentialRef,
        context: &audit::Context,
    ) -> Result<(Validation, audit::Details), VaultError> {
        let record = self.record(target).await?;
        let mut details = record_details(&record);
        let v = self.check_record(target, record, context, &details).await?;
        details.verdict = v.verdict.name().to_owned();
        Ok((v, details))
    }

    async fn check_record(
        &self,
        target: &CredentialRef,
        record: CredentialRecord,
        context: &audit::Context,
        details: &audit::Details,
    ) -> Result<Validation, VaultError> {
        let Some(data_key) = record.data_key.clone() else {
            return Ok(Validation::new(
                Verdict::Disconnected,
                "the connection is disconnected; store credentials to reconnect it",
            ));
        };
        let previous = record.last_validation.clone();
        self.know_key_version(&record).await?;
        if record.expires_at.is_some_and(|at| at <= self.clock.now()) {
            // The expiry is bound with the params: one a database writer
            // moved is DATA_LOSS, never a verdict (review: it made the vault
            // announce EXPIRED, then "recovered").
            let key = self.bound_data_key(target, &record, &data_key)?;
            let expired = Validation::new(
                Verdict::Expired,
                "the stored credential has expired (its `exp` has passed); store a new one",
            );
            return self
                .record_validation(target, (&key, &data_key), expired, previous)
                .await;
        }
        if let Some(limited) = self.gateway.rate_limited(target) {
            return Ok(limited);
        }
        let slot = self.gateway.join(target);
        let result = slot
            .get_or_try_init(|| async {
                let (decrypted, key) = self.open_record(target, record)?;
                self.before_sending(context, details.clone()).await?;
                let v = self
                    .gateway
                    .check(
                        target,
                        &decrypted.secrets,
                        &decrypted.params,
                        self.clock.now(),
                    )
                    .await;
                self.record_validation(target, (&key, &data_key), v, previous)
                    .await
            })
            .await
            .cloned();
        self.gateway.leave(target, &slot);
        result
    }

    /// Records `v` as the connection's `last_validation`, `previous` being
    /// the one stored when the check began; returns `v` as recorded.
    async fn record_validation(
        &self,
        target: &CredentialRef,
        (key, data_key): (&crypto::Key, &WrappedDataKey),
        mut v: Validation,
        previous: Option<String>,
    ) -> Result<Validation, VaultError> {
        let before = previous.as_deref().and_then(|json| {
            let bound = bound_verdict(key, target, json);
            if bound.is_none() {
                tracing::warn!(
                    workspace = %target.workspace_id,
                    provider = %target.provider,
                    "the stored verdict is not one this vault recorded (edited, or from before \
                     verdicts were bound); the next settled verdict counts as the first"
                );
            }
            bound.as_ref().and_then(settled_verdict)
        });
        if !v.verdict.is_settled() {
            v.last_settled = before;
        }
        v.checked_at = self.clock.now();
        let record = VerdictRecord {
            json: tagged_verdict(key, target, &v)?,
            at: v.checked_at,
            settled: v.verdict.is_settled(),
        };
        let (workspace, provider) = (target.workspace_id.as_str(), target.provider.name());
        // A settled verdict that changed is announced, whoever checked: the
        // health monitor or a caller's Validate. Either records only over the
        // verdict its check began from, so the verdicts stored and announced
        // form one chain: a check that another overtook (a slow one, another
        // replica's) is answered, not recorded (review: an unconditional
        // write announced one change twice and another never).
        let event = monitor::verdict_change(before, v.verdict)
            .map(|change| monitor::verdict_event(target, v.verdict, change));
        let noted = self
            .store
            .note_verdict(workspace, provider, data_key, previous, record, event)
            .await?;
        if let Noted::Recorded(Some(stored)) = noted {
            self.audit.appended(&stored);
            tracing::info!(
                workspace = %workspace,
                provider = %provider,
                verdict = v.verdict.name(),
                "a connection's validation verdict changed"
            );
        }
        Ok(v)
    }

    /// Commits the event of a call about to reach a provider, before it
    /// sends anything: if the log cannot take it, nothing is sent.
    async fn before_sending(
        &self,
        context: &audit::Context,
        details: audit::Details,
    ) -> Result<(), VaultError> {
        self.audit
            .record(
                Event::new(context, audit::OUTCOME_STARTED, details),
                Effect::Consequential,
            )
            .await
    }

    /// Decrypts a connected credential. Any failed check is [`VaultError::DataLoss`]:
    /// never wrong plaintext.
    pub async fn decrypt(&self, target: &CredentialRef) -> Result<Decrypted, VaultError> {
        let record = self.record(target).await?;
        self.know_key_version(&record).await?;
        self.open_record(target, record)
            .map(|(decrypted, _)| decrypted)
    }

    /// With replicas, a data key may name a version another replica created
    /// a moment ago: reload the keyring before calling that data loss.
    async fn know_key_version(&self, record: &CredentialRecord) -> Result<(), VaultError> {
        if let Some(k) = &record.data_key {
            if !self.keyring_read().versions().any(|v| v == k.key_version) {
                self.sync_keyring().await?;
            }
        }
        Ok(())
    }

    /// The connection's data key, once its params and expiry are checked to
    /// be the ones stored with it: where, how and to whom the secrets are
    /// sent, and when they expire, are steered by them. `DATA_LOSS`, with a
    /// warning, for anything a Store would not have written.
    fn bound_data_key(
        &self,
        target: &CredentialRef,
        record: &CredentialRecord,
        wrapped: &WrappedDataKey,
    ) -> Result<crypto::Key, VaultError> {
        let data_key = self
            .keyring_read()
            .open_data_key(&target.owner(), wrapped.key_version, &wrapped.sealed)
            .inspect_err(|_| tamper_warning(target, "data key"))?;
        if !binding_holds(&data_key, record, target) || record.status != StoredStatus::Connected {
            tamper_warning(target, "parameter binding");
            return Err(VaultError::DataLoss);
        }
        Ok(data_key)
    }

    /// The connection's secrets, decrypted after every check, with the data
    /// key that opened them (a verdict about them is tagged under it).
    fn open_record(
        &self,
        target: &CredentialRef,
        record: CredentialRecord,
    ) -> Result<(Decrypted, crypto::Key), VaultError> {
        let Some(wrapped) = &record.data_key else {
            return Err(VaultError::FailedPrecondition(format!(
                "the {} connection of workspace `{}` is disconnected",
                target.provider, target.workspace_id
            )));
        };
        let data_key = self.bound_data_key(target, &record, wrapped)?;
        let secrets = record
            .secrets
            .iter()
            .map(|s| {
                let plain = crypto::open(&data_key, &s.sealed, &secret_aad(target, &s.field))
                    .inspect_err(|_| tamper_warning(target, "secret"))?;
                // Stored from a `str`, so valid UTF-8 unless tampered with.
                let text = String::from_utf8(plain.expose_secret().to_vec())
                    .map_err(|_| VaultError::DataLoss)?;
                Ok((s.field.clone(), SecretString::from(text)))
            })
            .collect::<Result<Secrets, VaultError>>()?;
        // Every required field there, none undeclared; which optional ones a
        // shape needs (the bound params choose it), the provider's check
        // below says.
        let declared = target.provider.spec().secrets;
        let complete = declared
            .iter()
            .all(|f| !f.required || secrets.contains_key(f.name))
            && secrets.keys().all(|k| declared.iter().any(|f| f.name == k));
        if !complete {
            tamper_warning(target, "secret field set");
            return Err(VaultError::DataLoss);
        }
        // Params steer where and how the secrets are sent: a value no Store
        // would have accepted was written around the vault.
        if !input::still_valid(target.provider, &secrets, &record.params) {
            tamper_warning(target, "parameter");
            return Err(VaultError::DataLoss);
        }
        let decrypted = Decrypted {
            provider: target.provider,
            params: record.params,
            secrets,
        };
        Ok((decrypted, data_key))
    }

    async fn record(&self, target: &CredentialRef) -> Result<CredentialRecord, VaultError> {
        self.store
            .get(target.workspace_id.as_str(), target.provider.name())
            .await?
            .ok_or_else(|| target.not_found())
    }
}

/// The stored keyring, opened with `root`.
fn unwrap_keyring(root: &RootKey, keys: &StoredKeys) -> Result<Keyring, VaultError> {
    Keyring::unwrap(
        root,
        &keys.versions,
        &keys.fingerprint_key,
        keys.fingerprint_purpose,
    )
    .map_err(|_| VaultError::Internal(WRONG_ROOT_KEY.into()))
}

/// FAILED_PRECONDITION, naming `keys bind-params`, for a database whose
/// params were never bound: the vault does not serve it.
pub fn refuse_unbound(keys: &StoredKeys) -> Result<(), VaultError> {
    if keys.fingerprint_purpose == crypto::LEGACY_FINGERPRINT_KEY_PURPOSE {
        return Err(VaultError::FailedPrecondition(UNBOUND_PARAMS.into()));
    }
    Ok(())
}

/// Whether the audit log holds a `KeyAdmin.BindParams` event. Removing one
/// breaks the chain (and a signed checkpoint), which `audit verify` reports.
async fn already_bound_in(store: &Arc<dyn Store>) -> Result<bool, VaultError> {
    let mut after = 0;
    loop {
        let events = store.audit_after(after, 10_000).await?;
        let Some(last) = events.last() else {
            return Ok(false);
        };
        after = last.sequence;
        if events
            .iter()
            .filter_map(crate::audit::StoredEvent::event)
            .any(|e| e.method == BIND_PARAMS_METHOD)
        {
            return Ok(true);
        }
    }
}

/// Fails with [`VaultError::ShredPending`] while destroyed material is still
/// in the database's files: an OK must mean it is gone.
fn shredded(shred: Shred, done: &str) -> Result<(), VaultError> {
    match shred {
        Shred::Done => Ok(()),
        Shred::Pending => Err(VaultError::ShredPending(format!(
            "{done}, but the old bytes are still in the database's files (SQLite's \
             write-ahead log, or PostgreSQL row versions): a reader (a backup, a long \
             `audit verify`) holds an old snapshot. They are removed once it lets go (SQLite: \
             by the vault, see the shreds_pending metric; PostgreSQL: by the next VACUUM, \
             which calling again runs); call again to confirm"
        ))),
    }
}

/// What the event of a call that uses `record`'s secrets says of them: the
/// key version and each secret's hint and fingerprint.
fn record_details(record: &CredentialRecord) -> audit::Details {
    audit::Details {
        key_version: record.data_key.as_ref().map_or(0, |k| k.key_version),
        secrets: summaries(&record.secrets),
        ..audit::Details::default()
    }
}

fn summaries(secrets: &[SecretRecord]) -> BTreeMap<String, audit::SecretSummary> {
    secrets
        .iter()
        .map(|s| {
            let summary = audit::SecretSummary {
                hint: s.hint.clone(),
                fingerprint: s.fingerprint.clone(),
            };
            (s.field.clone(), summary)
        })
        .collect()
}

/// The settled verdict `v` stands for: its own, or for an unsettled one the
/// settled one before it.
fn settled_verdict(v: &Validation) -> Option<Verdict> {
    if v.verdict.is_settled() {
        Some(v.verdict)
    } else {
        v.last_settled
    }
}

/// `v` as stored: with a tag binding it to the connection and its data key.
fn tagged_verdict(
    data_key: &crypto::Key,
    target: &CredentialRef,
    v: &Validation,
) -> Result<String, VaultError> {
    let mut v = v.clone();
    v.tag = String::new();
    let untagged = encode_validation(&v)?;
    let tag = with_verdict_fields(target, &untagged, |fields| {
        crypto::bind(data_key, VERDICT_PURPOSE, fields)
    });
    v.tag = data_encoding::HEXLOWER.encode(&tag);
    encode_validation(&v)
}

/// The verdict stored as `json`, if its tag shows this vault recorded it for
/// this connection and data key.
fn bound_verdict(data_key: &crypto::Key, target: &CredentialRef, json: &str) -> Option<Validation> {
    let mut v: Validation = serde_json::from_str(json).ok()?;
    let tag = data_encoding::HEXLOWER
        .decode(std::mem::take(&mut v.tag).as_bytes())
        .ok()?;
    let untagged = encode_validation(&v).ok()?;
    with_verdict_fields(target, &untagged, |fields| {
        crypto::verify_binding(data_key, VERDICT_PURPOSE, fields, &tag)
    })
    .then_some(v)
}

/// The owner, then the verdict's JSON without its tag.
fn with_verdict_fields<R>(target: &CredentialRef, json: &str, f: impl FnOnce(&[&[u8]]) -> R) -> R {
    let mut fields = target.owner().to_vec();
    fields.push(json.as_bytes());
    f(&fields)
}

fn encode_validation(v: &Validation) -> Result<String, VaultError> {
    serde_json::to_string(v).map_err(|e| VaultError::Internal(format!("encoding a verdict: {e}")))
}

/// The tag that binds a connection's params (and when it expires) to its
/// data key: only the vault can compute it, so an edit is caught before
/// anything is sent.
fn params_binding(
    data_key: &crypto::Key,
    target: &CredentialRef,
    params: &Params,
    expires_at: Option<SystemTime>,
) -> Vec<u8> {
    with_binding_fields(target, params, expires_at, |fields| {
        crypto::bind(data_key, PARAMS_PURPOSE, fields)
    })
}

fn binding_holds(
    data_key: &crypto::Key,
    record: &CredentialRecord,
    target: &CredentialRef,
) -> bool {
    record.binding.as_deref().is_some_and(|tag| {
        with_binding_fields(target, &record.params, record.expires_at, |fields| {
            crypto::verify_binding(data_key, PARAMS_PURPOSE, fields, tag)
        })
    })
}

/// The owner, the expiry in milliseconds (empty for none), then each param's
/// name and value in order (a `BTreeMap`), each length-prefixed by
/// `associated_data`.
fn with_binding_fields<R>(
    target: &CredentialRef,
    params: &Params,
    expires_at: Option<SystemTime>,
    f: impl FnOnce(&[&[u8]]) -> R,
) -> R {
    // Milliseconds, as the stores keep it, so a value read back binds alike.
    let millis = expires_at.map(|t| crate::store::millis(t).to_be_bytes());
    let mut fields = target.owner().to_vec();
    fields.push(millis.as_ref().map_or(&[][..], |m| &m[..]));
    for (name, value) in params {
        fields.push(name.as_bytes());
        fields.push(value.as_bytes());
    }
    f(&fields)
}

/// How many times a Store wraps again after its key version was retired meanwhile.
const STORE_ATTEMPTS: u32 = 3;

/// Once, for a database written before params were bound, with every
/// replica stopped (`credvault keys bind-params`): binds every connected
/// credential's params as they are now, re-seals the fingerprint key under
/// its bound purpose, which marks the work as done, and records it in the
/// audit log. Refuses a database that says it was never bound but has bound
/// rows: its key table was put back from an old backup, so that this would
/// bind whatever params someone wrote since. Returns how many it bound.
pub async fn bind_legacy_params(
    store: Arc<dyn Store>,
    root: &RootKey,
) -> Result<usize, VaultError> {
    let keys = store
        .load_keys()
        .await?
        .ok_or_else(|| VaultError::FailedPrecondition("the database holds no keys yet".into()))?;
    if keys.fingerprint_purpose != crypto::LEGACY_FINGERPRINT_KEY_PURPOSE {
        return Err(VaultError::FailedPrecondition(
            "every connection's params are already bound to its key; nothing to do".into(),
        ));
    }
    let keyring = unwrap_keyring(root, &keys)?;
    let _alone = store.hold(crate::store::Hold::Alone).await?;
    if already_bound_in(&store).await? {
        return Err(VaultError::FailedPrecondition(
            "the audit log records that bind-params already ran on this database, yet its key \
             table says it never did: it was put back from a backup taken before the upgrade. \
             Binding now would accept params edited since; restore the whole database from a \
             backup instead"
                .into(),
        ));
    }
    let records = store.connected_credentials().await?;
    if records.iter().any(|r| r.binding.is_some()) {
        return Err(VaultError::FailedPrecondition(
            "the database says its params were never bound, but some connections carry a \
             binding: its key table was put back from a backup taken before the upgrade. \
             Binding now would accept params edited since; restore the whole database from a \
             backup instead"
                .into(),
        ));
    }
    let mut bindings = Vec::with_capacity(records.len());
    for r in records {
        let (Ok(target), Some(wrapped)) = (
            CredentialRef::parse(&r.workspace_id, &r.provider),
            r.data_key.as_ref(),
        ) else {
            continue;
        };
        // Unreadable data keys stay unbound, and so DATA_LOSS, as before.
        let Ok(data_key) =
            keyring.open_data_key(&target.owner(), wrapped.key_version, &wrapped.sealed)
        else {
            tamper_warning(&target, "data key");
            continue;
        };
        bindings.push(crate::store::ParamsBinding {
            tag: params_binding(&data_key, &target, &r.params, r.expires_at),
            workspace_id: r.workspace_id,
            provider: r.provider,
            wrapped_dek: wrapped.sealed.ciphertext.clone(),
        });
    }
    let count = bindings.len();
    let sealed = keyring.seal_fingerprint_key(root, crypto::FINGERPRINT_KEY_PURPOSE)?;
    let event = local_command_event("bind-params", BIND_PARAMS_METHOD);
    store.bind_params(bindings, sealed, event).await?;
    Ok(count)
}

/// The audit event of a `credvault keys <command>` run on this machine
/// (with the vault stopped), written with the change it records.
fn local_command_event(command: &str, method: &str) -> Event {
    let context = audit::Context {
        identity: format!("credvault keys {command} (local)"),
        method: method.to_owned(),
        workspace_id: String::new(),
        provider: String::new(),
        request_id: command.to_owned(),
    };
    Event::new(&context, audit::OUTCOME_OK, audit::Details::default())
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
