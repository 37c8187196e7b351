//! Key rotation: new key versions, the rewrap job that moves every data key onto the primary, and retirement.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use super::{CredentialRef, Vault, VaultError};
use crate::audit::{self, Event};
use crate::crypto::RootKey;
use crate::store::{
    Hold, KeyVersionRow, Reseal, RetireOutcome, Rewrapped, RootSealed, StoreError, WrappedDataKey,
};

/// A stored connection, by workspace id and provider name.
type ConnectionId = (String, String);

fn id_of(r: &Rewrapped) -> ConnectionId {
    (r.workspace_id.clone(), r.provider.clone())
}

/// What a Retire call did.
#[derive(Debug, Clone)]
pub struct Retirement {
    pub status: KeyStatus,
    /// Whether this call destroyed the version, its audit event written with
    /// the change (`false`: it was retired already, nothing changed).
    pub destroyed: bool,
}

/// Key events carry versions only, never key material.
pub fn versioned(key_version: u32) -> audit::Details {
    audit::Details {
        key_version,
        ..audit::Details::default()
    }
}

/// Key versions and rewrap progress.
#[derive(Debug, Clone)]
pub struct KeyStatus {
    pub primary: u32,
    pub versions: Vec<KeyVersionRow>,
    /// Connected credentials on the primary version.
    pub rewrap_done: u64,
    /// All connected credentials.
    pub rewrap_total: u64,
}

impl Vault {
    /// Creates the next key version and makes it primary, with the call's
    /// audit event in the same transaction, then wakes the rewrap job.
    /// Rotations run one at a time.
    pub async fn rotate(&self, context: &audit::Context) -> Result<u32, VaultError> {
        let _one_at_a_time = self.rotation.lock().await;
        // Another replica may have rotated since this one last looked; if one
        // rotates at the same moment, its version is taken: look again, once.
        self.sync_keyring().await?;
        let mut taken = false;
        let (version, key, stored) = loop {
            let (version, key) = self.keyring_read().next_key()?;
            let (key, wrapped) = self
                .with_root(move |root| {
                    let rng = ring::rand::SystemRandom::new();
                    let wrapped = root.seal_key_version(&rng, version, &key)?;
                    Ok((key, wrapped))
                })
                .await?;
            let version = wrapped.version;
            let event = Event::new(context, audit::OUTCOME_OK, versioned(version));
            // Persisted first: a data key must never name a version the database lacks.
            let witness = self.audit.root_witness().clone();
            match self.store.add_key_version(wrapped, event, witness).await {
                Ok(stored) => break (version, key, stored),
                Err(StoreError::VersionTaken(_)) if !taken => {
                    taken = true;
                    self.sync_keyring().await?;
                }
                Err(StoreError::VersionTaken(v)) => {
                    return Err(VaultError::FailedPrecondition(format!(
                        "key version {v} was just created by another replica: see `credvault \
                         keys status` before rotating again"
                    )))
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.audit.appended(&stored);
        self.keyring_write().install(version, key);
        self.primary_encryptions.store(0, Ordering::Relaxed);
        self.rewrap_wake.notify_one();
        tracing::info!(version, "key rotated: new primary version");
        Ok(version)
    }

    /// Picks up key versions that another replica added or retired, so
    /// that every replica wraps new data keys under the newest primary and
    /// can open whatever the database holds. Returns whether anything changed.
    pub async fn sync_keyring(&self) -> Result<bool, VaultError> {
        let Some(keys) = self.store.load_keys().await? else {
            return Ok(false);
        };
        let stored: BTreeSet<u32> = keys.versions.iter().map(|v| v.version).collect();
        let held: BTreeSet<u32> = self.keyring_read().versions().collect();
        if stored == held {
            return Ok(false);
        }
        for wrapped in keys.versions.iter().filter(|v| !held.contains(&v.version)) {
            let (version, sealed) = (wrapped.version, wrapped.clone());
            let key = self
                .with_root(move |root| root.open_key_version(&sealed))
                .await?;
            self.keyring_write().install(version, key);
        }
        for retired in held.difference(&stored) {
            self.keyring_write().remove(*retired);
        }
        let primary = self.primary_key_version();
        let encryptions = self
            .store
            .key_versions()
            .await?
            .iter()
            .find(|v| v.version == primary)
            .map_or(0, |v| v.encryptions);
        self.primary_encryptions
            .store(encryptions, Ordering::Relaxed);
        tracing::info!(
            primary,
            "key versions changed in the database: keyring reloaded"
        );
        self.rewrap_wake.notify_one();
        Ok(true)
    }

    pub async fn key_status(&self) -> Result<KeyStatus, VaultError> {
        let primary = self.keyring_read().primary_version();
        let versions = self.store.key_versions().await?;
        let rewrap_total = versions.iter().map(|v| v.credentials).sum();
        let rewrap_done = versions
            .iter()
            .find(|v| v.version == primary)
            .map_or(0, |v| v.credentials);
        Ok(KeyStatus {
            primary,
            versions,
            rewrap_done,
            rewrap_total,
        })
    }

    /// Destroys a key version no credential uses, with the call's audit
    /// event in the same transaction. Moves any stragglers onto the primary
    /// first, so a finished rotation can always be retired. Never retires the
    /// primary, a version newer than it, or the newest version in the
    /// database (another replica's primary a moment ago).
    pub async fn retire(
        &self,
        version: u32,
        context: &audit::Context,
    ) -> Result<Retirement, VaultError> {
        // Another replica may have rotated since this one last looked.
        self.sync_keyring().await?;
        let primary = self.keyring_read().primary_version();
        if version > primary {
            // The primary is the newest version in the database, as of the sync.
            return Err(VaultError::InvalidArgument(format!(
                "there is no key version {version}"
            )));
        }
        if version == primary {
            return Err(VaultError::FailedPrecondition(format!(
                "key version {version} is the primary and cannot be retired; rotate first"
            )));
        }
        self.rewrap_pass().await?;
        let event = Event::new(context, audit::OUTCOME_OK, versioned(version));
        let (outcome, shred) = self.store.retire_key_version(version, event).await?;
        let destroyed = match outcome {
            RetireOutcome::Retired(stored) => {
                self.audit.appended(&stored);
                self.keyring_write().remove(version);
                tracing::info!(version, "key version retired and destroyed");
                super::shredded(shred, &format!("key version {version} is retired"))?;
                true
            }
            RetireOutcome::AlreadyRetired => false,
            RetireOutcome::Newest => {
                return Err(VaultError::FailedPrecondition(format!(
                    "key version {version} is the newest in the database (another replica's \
                     primary) and cannot be retired; rotate first"
                )))
            }
            RetireOutcome::InUse(n) => {
                return Err(VaultError::FailedPrecondition(format!(
                    "key version {version} still wraps {n} credential(s); wait for the rewrap \
                     to finish (see `credvault keys status`)"
                )))
            }
            RetireOutcome::Unknown => {
                return Err(VaultError::InvalidArgument(format!(
                    "there is no key version {version}"
                )))
            }
        };
        Ok(Retirement {
            status: self.key_status().await?,
            destroyed,
        })
    }

    /// Rewraps every data key not under the primary version, batch by batch,
    /// each batch its own transaction. Safe to stop at any point: what is
    /// left is found again next time. Returns how many it moved.
    /// Only one replica rewraps at a time; the others return 0 at once.
    ///
    /// Pipelined: the next batch is read and rewrapped while the previous one
    /// commits, and at most one batch is ever waiting on the writer, so calls'
    /// own writes are never queued behind more than one batch.
    pub async fn rewrap_pass(&self) -> Result<u64, VaultError> {
        let Some(_only_runner) = self.store.rewrap_lock().await? else {
            return Ok(0);
        };
        let mut moved = 0;
        let mut unreadable = HashSet::new();
        let mut pending: Vec<Rewrapped> = Vec::new();
        loop {
            let writing: HashSet<ConnectionId> = pending.iter().map(id_of).collect();
            let batch = std::mem::take(&mut pending);
            let write = async {
                let Some(version) = batch.first().map(|r| r.new.key_version) else {
                    return Ok(0);
                };
                // Every batch changes key state, so it carries its event.
                let event = Event::new(
                    &system_context("KeyAdmin.Rewrap"),
                    audit::OUTCOME_OK,
                    versioned(version),
                );
                let stored = self.store.rewrap(batch, event).await?;
                Ok::<_, VaultError>(stored)
            };
            let prepare = self.rewrap_batch_after(&writing, &mut unreadable);
            let (written, next) = tokio::join!(write, prepare);
            let written = written?;
            moved += written as u64;
            self.primary_encryptions
                .fetch_add(written as u64, Ordering::Relaxed);
            pending = next?;
            if pending.is_empty() && writing.is_empty() {
                return Ok(moved);
            }
        }
    }

    /// The next batch of stale data keys, rewrapped under the primary version
    /// in memory, skipping those in `writing` (the batch being committed) and
    /// those that failed authentication (remembered in `unreadable`).
    async fn rewrap_batch_after(
        &self,
        writing: &HashSet<ConnectionId>,
        unreadable: &mut HashSet<ConnectionId>,
    ) -> Result<Vec<Rewrapped>, VaultError> {
        let primary = self.keyring_read().primary_version();
        let stale = self
            .store
            .stale_data_keys(
                primary,
                self.rewrap_batch + writing.len() + unreadable.len(),
            )
            .await?;
        let keyring = self.keyring_read();
        let mut batch = Vec::new();
        for s in stale {
            if batch.len() == self.rewrap_batch {
                break;
            }
            let id = (s.workspace_id.clone(), s.provider.clone());
            if writing.contains(&id) || unreadable.contains(&id) {
                continue;
            }
            // The owner the data key is bound to, from the one definition a
            // Store used (a row that does not parse is left alone, as unreadable).
            let target = CredentialRef::parse(&s.workspace_id, &s.provider);
            let moved = target.as_ref().ok().map(|target| {
                keyring
                    .open_data_key(&target.owner(), s.key.key_version, &s.key.sealed)
                    .and_then(|data_key| keyring.rewrap_data_key(&target.owner(), &data_key))
            });
            match moved {
                Some(Ok((key_version, sealed))) => batch.push(Rewrapped {
                    new: WrappedDataKey {
                        key_version,
                        sealed,
                    },
                    workspace_id: s.workspace_id,
                    provider: s.provider,
                    old: s.key,
                }),
                Some(Err(_)) | None => {
                    tracing::warn!(
                        workspace = %s.workspace_id,
                        provider = %s.provider,
                        "rewrap: a stored data key failed authentication; left as it is"
                    );
                    unreadable.insert(id);
                }
            }
        }
        Ok(batch)
    }
}

/// Who did what, for a key operation the vault does on its own.
fn system_context(method: &str) -> audit::Context {
    audit::Context {
        identity: "credvault".into(),
        method: method.into(),
        workspace_id: String::new(),
        provider: String::new(),
        request_id: format!(
            "system-{}",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        ),
    }
}

/// The background job: rewraps after every rotation (and once at start-up,
/// to finish one a crash interrupted), and rotates by itself when the
/// primary version reaches its encryption cap.
pub async fn run(vault: Arc<Vault>) {
    vault.rewrap_wake.notify_one();
    loop {
        vault.rewrap_wake.notified().await;
        if vault.primary_encryptions.load(Ordering::Relaxed) >= vault.max_encryptions {
            match vault.rotate(&system_context("KeyAdmin.Rotate")).await {
                Ok(version) => {
                    tracing::info!(
                        version,
                        "the primary key version reached its encryption cap: rotated"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "automatic key rotation failed"),
            }
        }
        match vault.rewrap_pass().await {
            Ok(0) => {}
            Ok(moved) => {
                let primary = vault.keyring_read().primary_version();
                tracing::info!(moved, primary, "rewrap finished");
            }
            Err(e) => {
                tracing::warn!(error = %e, "rewrap interrupted; retrying shortly");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                // Its target version may have been retired by another replica.
                if let Err(e) = vault.sync_keyring().await {
                    tracing::warn!(error = %e, "cannot reload the key versions from the database");
                }
                vault.rewrap_wake.notify_one();
            }
        }
    }
}

/// Reseals every key held under the root key (the key-encryption key
/// versions, the fingerprint key, the audit signing key) under `new`: read,
/// resealed, checked to open under `new`, and written with its audit event,
/// in one transaction. Refused while any vault serves the database, which
/// could otherwise seal a key under `old` a moment later. Afterwards `old`
/// opens nothing.
pub async fn rotate_root(
    store: Arc<dyn crate::store::Store>,
    old: RootKey,
    new: RootKey,
) -> Result<usize, VaultError> {
    let rng = ring::rand::SystemRandom::new();
    let probe = old.seal(&rng, "rotate-root probe", b"")?;
    if new.open("rotate-root probe", &probe).is_ok() {
        return Err(VaultError::FailedPrecondition(if new.on_token() {
            "the new root key is the current root key: make a new key on the token under \
             another label (README, \"The root key in an HSM\") and name it in the new \
             configuration's keys.pkcs11.key_label"
                .into()
        } else {
            "the new root key is the current root key: generate a new one \
             (for example `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'`)"
                .into()
        }));
    }
    // A vault stopped a moment ago may still hold the database until
    // PostgreSQL sees its session close.
    let mut attempts = 0;
    let _alone = loop {
        match store.hold(Hold::Alone).await {
            Err(StoreError::Held(_)) if attempts < HOLD_ATTEMPTS => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            held => break held?,
        }
    };
    let reseal: Reseal = Box::new(move |current| {
        if current.versions.is_empty() {
            return Err(
                "the database holds no keys: check storage.path (or storage.url) in the \
                 configuration; nothing was changed"
                    .into(),
            );
        }
        reseal_under(&old, &new, &current)
    });
    let event = super::local_command_event("rotate-root", "KeyAdmin.RotateRoot");
    let count = store.reseal_root(reseal, event).await?;
    // The keys sealed under the old root key were overwritten; their old
    // bytes leave the files once no reader holds an old snapshot.
    let deadline = std::time::Instant::now() + ROTATE_ROOT_SHRED_WAIT;
    while store.shreds_pending() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if store.shreds_pending() > 0 {
        return Err(VaultError::ShredPending(format!(
            "resealed {count} keys under the new root key, but the old sealed keys are still \
             in the database's write-ahead log: a reader (a backup, a long `audit verify`) \
             holds an old snapshot. Stop it; the vault removes them when it next starts"
        )));
    }
    Ok(count)
}

/// Every key in `current`, opened with `old` and sealed under `new`, and
/// checked to open under `new` to the same bytes.
fn reseal_under(old: &RootKey, new: &RootKey, current: &RootSealed) -> Result<RootSealed, String> {
    let rng = ring::rand::SystemRandom::new();
    let not_opened = "the current root key does not open this database's keys";
    let failed = "resealing under the new root key failed; nothing was changed";
    let mut versions = Vec::with_capacity(current.versions.len());
    for w in &current.versions {
        let key = old.open_key_version(w).map_err(|_| not_opened)?;
        let sealed = new
            .seal_key_version(&rng, w.version, &key)
            .map_err(|_| failed)?;
        let reopened = new.open_key_version(&sealed).map_err(|_| failed)?;
        if reopened.expose_secret() != key.expose_secret() {
            return Err(failed.into());
        }
        versions.push(sealed);
    }
    let mut material = Vec::with_capacity(current.material.len());
    for (purpose, sealed) in &current.material {
        let plain = old.open(purpose, sealed).map_err(|_| not_opened)?;
        let resealed = new
            .seal(&rng, purpose, plain.expose_secret())
            .map_err(|_| failed)?;
        let reopened = new.open(purpose, &resealed).map_err(|_| failed)?;
        if reopened.expose_secret() != plain.expose_secret() {
            return Err(failed.into());
        }
        material.push((purpose.clone(), resealed));
    }
    Ok(RootSealed { versions, material })
}

/// How many times, 100 ms apart, `rotate-root` tries to hold the database alone.
const HOLD_ATTEMPTS: u32 = 20;

/// How long `rotate-root` waits for readers to let go of the old sealed keys.
const ROTATE_ROOT_SHRED_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
