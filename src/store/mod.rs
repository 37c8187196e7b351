//! Storage: the trait the domain writes through, with SQLite (embedded) and PostgreSQL
//! (replicas) behind it; `sql` holds the SQL both run.

mod postgres;
mod sql;
mod sqlite;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::audit::{Checkpoint, Event, StoredEvent};
use crate::crypto::{NewKeyMaterial, Sealed, WrappedKeyVersion};

pub use postgres::{redact_url, PostgresSettings, PostgresStore};

use std::sync::Arc;

use zeroize::Zeroizing;

use crate::config::{Backend, StorageConfig};
pub use sqlite::{read_audit_log, SqliteStore};

/// Milliseconds since the epoch, as both backends store times.
pub(crate) fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the epoch (the epoch for negative `ms`).
pub(crate) fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0).unsigned_abs())
}

/// Opens the configured backend: the SQLite file, or a pool on the
/// PostgreSQL database (migrating either schema if needed).
pub async fn open(storage: &StorageConfig) -> Result<Arc<dyn Store>, StoreError> {
    match storage.backend {
        Backend::Sqlite => {
            let path = storage.path.clone();
            let group_commit = storage.group_commit;
            let store =
                tokio::task::spawn_blocking(move || SqliteStore::open_with(&path, group_commit))
                    .await??;
            Ok(Arc::new(store))
        }
        Backend::Postgres => {
            let store = PostgresStore::connect(&postgres_settings(storage)?).await?;
            Ok(Arc::new(store))
        }
    }
}

/// The audit log as `audit verify` reads it, straight from the database, in
/// one snapshot (a SQLite file is opened read-only).
#[derive(Debug)]
pub struct AuditRecord {
    pub events: Vec<StoredEvent>,
    pub checkpoints: Vec<Checkpoint>,
    /// Fixed when the database was created; `None` if it has none.
    pub database_id: Option<Vec<u8>>,
}

/// The configured database's audit log, for `audit verify`.
pub async fn read_audit_log_of(storage: &StorageConfig) -> Result<AuditRecord, StoreError> {
    match storage.backend {
        Backend::Sqlite => {
            let path = storage.path.clone();
            tokio::task::spawn_blocking(move || read_audit_log(&path)).await?
        }
        Backend::Postgres => {
            let store = PostgresStore::connect(&postgres_settings(storage)?).await?;
            store.read_audit_log().await
        }
    }
}

/// The database, in words for a message: the file, or the URL without its password.
pub fn describe(storage: &StorageConfig) -> String {
    match storage.backend {
        Backend::Sqlite => storage.path.display().to_string(),
        Backend::Postgres => storage.url.as_deref().map_or_else(String::new, redact_url),
    }
}

/// `[storage]`'s PostgreSQL settings, with the password read from its file or variable.
pub fn postgres_settings(storage: &StorageConfig) -> Result<PostgresSettings, StoreError> {
    let url = storage.url.clone().ok_or_else(|| {
        StoreError::Connect("backend = \"postgres\" needs storage.url".to_owned())
    })?;
    storage.check().map_err(StoreError::Connect)?;
    let password = match (&storage.password_file, &storage.password_env) {
        (Some(path), _) => {
            let bytes = crate::hardening::read_private("storage.password_file", path)
                .map_err(|e| StoreError::Connect(e.to_string()))?;
            let text = std::str::from_utf8(&bytes).map_err(|_| {
                StoreError::Connect(format!(
                    "storage.password_file {} is not UTF-8 text",
                    path.display()
                ))
            })?;
            Some(Zeroizing::new(
                text.trim_end_matches(['\n', '\r']).to_owned(),
            ))
        }
        (None, Some(var)) => Some(Zeroizing::new(std::env::var(var).map_err(|_| {
            // The name is not repeated: it may be the password itself,
            // written in the wrong place.
            StoreError::Connect(
                "the environment variable that storage.password_env names is not set in the \
                 vault's environment (its name is not repeated here, in case the password itself \
                 was written there)"
                    .into(),
            )
        })?)),
        (None, None) => None,
    };
    Ok(PostgresSettings {
        url,
        password,
        pool_size: storage.pool_size,
        ca_file: storage.ca_file.clone(),
    })
}

/// Whether a connection holds secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredStatus {
    Connected,
    Disconnected,
}

/// A connection's row as stored. Secrets are ciphertext only.
#[derive(Debug, Clone)]
pub struct CredentialRecord {
    pub workspace_id: String,
    pub provider: String,
    pub params: BTreeMap<String, String>,
    pub status: StoredStatus,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub disconnected_at: Option<SystemTime>,
    pub expires_at: Option<SystemTime>,
    /// The sealed data key; `None` once disconnected.
    pub data_key: Option<WrappedDataKey>,
    pub secrets: Vec<SecretRecord>,
    /// The latest validation verdict, as the domain serialized it (non-secret).
    pub last_validation: Option<String>,
    /// A tag binding `params` to the data key (see `domain::params_binding`);
    /// `None` once disconnected.
    pub binding: Option<Vec<u8>>,
}

/// A connection's params binding, written once for a database from before
/// bindings, keyed by the wrapped data key it was computed under.
#[derive(Debug, Clone)]
pub struct ParamsBinding {
    pub workspace_id: String,
    pub provider: String,
    pub wrapped_dek: Vec<u8>,
    pub tag: Vec<u8>,
}

/// A verdict as recorded for a connection.
#[derive(Debug, Clone)]
pub struct VerdictRecord {
    /// The verdict, as the domain serialized it (non-secret).
    pub json: String,
    /// When it was reached.
    pub at: SystemTime,
    /// Whether it says something lasting about the credential (VALID,
    /// REJECTED, ...), rather than that the provider could not tell now;
    /// the health monitor asks again sooner after an unsettled one.
    pub settled: bool,
}

/// What [`Store::note_verdict`] did.
#[derive(Debug)]
pub enum Noted {
    /// Recorded, with the event if one was given.
    Recorded(Option<StoredEvent>),
    /// Not recorded: the stored verdict or secrets changed meanwhile.
    Stale,
}

/// A connection the health monitor may find due.
#[derive(Debug, Clone)]
pub struct Watched {
    pub workspace_id: String,
    pub provider: String,
    /// When it was last stored.
    pub updated_at: SystemTime,
    /// When it was last validated since then, if it was.
    pub validated_at: Option<SystemTime>,
    /// Whether that verdict was settled (see [`VerdictRecord::settled`]).
    pub settled: Option<bool>,
    /// That verdict, as stored.
    pub last_validation: Option<String>,
}

/// A connection whose credential expires soon, or has expired.
#[derive(Debug, Clone)]
pub struct Expiring {
    pub workspace_id: String,
    pub provider: String,
    pub expires_at: SystemTime,
    /// The last notice written for this connection.
    pub notice: Option<ExpiryNotice>,
}

/// That a connection's expiry was announced as within some threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryNotice {
    /// The expiry announced.
    pub expires_at: SystemTime,
    /// The threshold it was announced within, in seconds (0: expired).
    pub within_seconds: i64,
}

/// A data key sealed under a key-encryption key version.
#[derive(Debug, Clone)]
pub struct WrappedDataKey {
    pub key_version: u32,
    pub sealed: Sealed,
}

/// One encrypted secret field with its non-secret redaction.
#[derive(Debug, Clone)]
pub struct SecretRecord {
    pub field: String,
    pub sealed: Sealed,
    pub hint: String,
    pub fingerprint: String,
}

/// A key-encryption key version, as `KeyAdmin.Status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersionRow {
    pub version: u32,
    pub retired: bool,
    pub created_at: SystemTime,
    /// Data keys it has wrapped, ever.
    pub encryptions: u64,
    /// Data keys it wraps now.
    pub credentials: u64,
}

/// A data key the rewrap job has to move to the primary version.
#[derive(Debug, Clone)]
pub struct StaleDataKey {
    pub workspace_id: String,
    pub provider: String,
    pub key: WrappedDataKey,
}

/// A data key moved from one version to another. Applied only if the row
/// still holds `old`, so a concurrent Store always wins.
#[derive(Debug, Clone)]
pub struct Rewrapped {
    pub workspace_id: String,
    pub provider: String,
    pub old: WrappedDataKey,
    pub new: WrappedDataKey,
}

/// Whether material a write destroyed has left the database's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shred {
    /// Nothing of it remains (or the store cannot tell more: see the README
    /// on what PostgreSQL keeps).
    Done,
    /// A reader's snapshot still needs old pages: SQLite's WAL keeps them
    /// until the writer, retrying in the background, can empty it.
    Pending,
}

/// What `retire_key_version` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetireOutcome {
    /// Destroyed, with its audit event in the same transaction.
    Retired(StoredEvent),
    /// The newest version: it may be primary on a replica that rotated a
    /// moment ago, and never is retired.
    Newest,
    /// Still wraps this many data keys; nothing changed.
    InUse(u64),
    Unknown,
    AlreadyRetired,
}

/// How a process holds the database while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// A serving vault: any number of them share the database.
    Serving,
    /// A `credvault keys` command that needs every vault stopped (rotate-root,
    /// bind-params): it holds the database alone.
    Alone,
}

/// Every key sealed under the root key: the active key versions and the
/// other material, by purpose.
#[derive(Debug)]
pub struct RootSealed {
    pub versions: Vec<WrappedKeyVersion>,
    pub material: Vec<(String, Sealed)>,
}

/// One key as a vault found it sealed under its root key at start-up. If the
/// stored bytes differ later, the database was resealed under another root
/// key (`keys rotate-root`) while the vault ran, and anything it sealed now
/// would open under neither key.
#[derive(Debug, Clone)]
pub struct RootWitness {
    pub purpose: &'static str,
    pub sealed: Sealed,
}

impl RootWitness {
    fn holds(&self, stored: Option<&Sealed>) -> bool {
        stored
            .is_some_and(|s| s.nonce == self.sealed.nonce && s.ciphertext == self.sealed.ciphertext)
    }
}

/// Turns the root-sealed keys read inside a transaction into the ones to
/// write in it, or says why not (nothing is written then).
pub type Reseal = Box<dyn FnOnce(RootSealed) -> Result<RootSealed, String> + Send>;

/// The key material a keyring is unwrapped from.
#[derive(Debug)]
pub struct StoredKeys {
    pub versions: Vec<WrappedKeyVersion>,
    pub fingerprint_key: Sealed,
    /// What the fingerprint key is stored (and sealed) as: whether every
    /// connection's parameters are bound to its data key.
    pub fingerprint_purpose: &'static str,
}

/// A storage failure, the same set whichever engine reported it: each engine
/// sorts its driver's errors into these, so nothing above the store names a
/// driver. Messages carry no row contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("the database is full")]
    Full,
    /// Another writer held what this one needed for longer than it waits.
    #[error("the database is busy: {0}")]
    Busy(String),
    /// A stored row, or the database itself, is malformed.
    #[error("a stored row is malformed: {0}")]
    Corrupt(&'static str),
    /// The database cannot be reached, or stopped answering.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// A write broke one of the schema's constraints.
    #[error("a write conflicts with the stored data: {0}")]
    Conflict(String),
    /// Anything else the engine reported, without row contents.
    #[error("database error: {0}")]
    Engine(String),
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    #[error("database file {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Writing the audit event failed; the change it recorded was not made.
    #[error("the audit log could not be written: {0}")]
    Audit(String),
    /// A commit failed, after the write itself succeeded.
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the database writer has stopped")]
    WriterGone,
    /// Another process holds the database in a way that excludes `wanted`.
    #[error("{}", held_message(*.0))]
    Held(Hold),
    /// A write wrapped under a key version another replica retired; nothing
    /// was written: wrap under the current primary and write again.
    #[error("key version {0} was retired meanwhile")]
    VersionRetired(u32),
    /// Another replica added this key version first; nothing was written.
    #[error("key version {0} exists already: another replica rotated at the same moment")]
    VersionTaken(u32),
    /// The database's keys were resealed under another root key since this
    /// vault started; nothing was written.
    #[error(
        "the database's keys were resealed under another root key (`keys rotate-root`) while \
         this vault was serving; nothing was changed. Restart every vault with the new root key"
    )]
    RootChanged,
    /// A transaction's own check refused to write.
    #[error("{0}")]
    Refused(String),
    #[error("storage task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn held_message(wanted: Hold) -> &'static str {
    match wanted {
        Hold::Alone => {
            "a vault is serving this database: stop every vault (every replica) first, then run \
             this command again"
        }
        Hold::Serving => {
            "a `credvault keys` command that needs every vault stopped (rotate-root, bind-params) \
             is running on this database: start the vault when it has finished"
        }
    }
}

const FINGERPRINT_KEY: &str = crate::crypto::FINGERPRINT_KEY_PURPOSE;
const LEGACY_FINGERPRINT_KEY: &str = crate::crypto::LEGACY_FINGERPRINT_KEY_PURPOSE;

/// A key version's insert that broke its primary key: another replica added
/// that version first.
fn taken(version: u32) -> impl FnOnce(StoreError) -> StoreError {
    move |e| match e {
        StoreError::Conflict(_) => StoreError::VersionTaken(version),
        other => other,
    }
}

/// An audit append's failure: the change it recorded was not made. Full,
/// busy and unavailable keep their own kind (the caller may act on them).
pub(crate) fn audit_failure(e: StoreError) -> StoreError {
    match e {
        e @ (StoreError::Full | StoreError::Busy(_) | StoreError::Unavailable(_)) => e,
        e @ StoreError::Audit(_) => e,
        other => StoreError::Audit(other.to_string()),
    }
}

impl StoreError {
    /// The same failure, reported to another write of the same transaction.
    pub(crate) fn for_another_write(&self) -> StoreError {
        match self {
            StoreError::Full => StoreError::Full,
            StoreError::Busy(m) => StoreError::Busy(m.clone()),
            StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
            StoreError::Commit(m) => StoreError::Commit(m.clone()),
            other => StoreError::Commit(other.to_string()),
        }
    }
}

/// Whether a caller waits for a write's commit before it answers. A writer
/// may hold writes no one waits for a little, to commit more at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaited {
    Yes,
    No,
}

/// An audit event in its writer's hands, not yet known to be durable.
#[must_use = "an event is durable only once `durable` answers"]
pub struct Queued {
    durable: Pin<Box<dyn Future<Output = Result<StoredEvent, StoreError>> + Send>>,
    in_order: bool,
}

impl Queued {
    /// `in_order`: the writer commits events in the order they were
    /// queued, so an event queued before a call's answer precedes, in the
    /// chain, the event of any call made after that answer.
    pub(crate) fn new(
        durable: impl Future<Output = Result<StoredEvent, StoreError>> + Send + 'static,
        in_order: bool,
    ) -> Self {
        Self {
            durable: Box::pin(durable),
            in_order,
        }
    }

    /// Whether a call may be answered before its event is durable without
    /// the chain putting that event after a later call's.
    pub fn in_order(&self) -> bool {
        self.in_order
    }

    /// The event as committed, or why it was not.
    pub async fn durable(self) -> Result<StoredEvent, StoreError> {
        self.durable.await
    }
}

/// Where credentials and key material live. Every write is atomic and durable
/// when it returns.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The stored key material, or `None` for a new store.
    async fn load_keys(&self) -> Result<Option<StoredKeys>, StoreError>;
    /// Persists a new store's first key material.
    async fn init_keys(&self, material: NewKeyMaterial) -> Result<(), StoreError>;
    /// Inserts or replaces a connection (keeping its `created_at`) and appends
    /// `event` in the same transaction. Its data key's version must be active
    /// at the commit ([`StoreError::VersionRetired`] otherwise, nothing
    /// written). Returns the row as stored and that version's encryptions so
    /// far, counted in the database across replicas.
    async fn put(
        &self,
        record: CredentialRecord,
        event: Event,
    ) -> Result<(CredentialRecord, StoredEvent, u64), StoreError>;
    async fn get(
        &self,
        workspace_id: &str,
        provider: &str,
    ) -> Result<Option<CredentialRecord>, StoreError>;
    async fn list(&self, workspace_id: &str) -> Result<Vec<CredentialRecord>, StoreError>;
    /// Records a connection's latest validation verdict, unless its secrets
    /// changed since `data_key` was read (so a slow check never labels newer
    /// secrets), and only while the stored verdict is still `previous`, with
    /// `event` (that the verdict changed) appended in the same transaction.
    /// [`Noted::Stale`], with nothing written, when another check or a Store
    /// got there first.
    async fn note_verdict(
        &self,
        workspace_id: &str,
        provider: &str,
        data_key: &WrappedDataKey,
        previous: Option<String>,
        verdict: VerdictRecord,
        event: Option<Event>,
    ) -> Result<Noted, StoreError>;
    /// Connected connections the health monitor may find due (the exact
    /// schedule is the monitor's): last validated at or before
    /// `settled_before` (settled verdicts) or `unsettled_before` (the
    /// others), or never validated since stored at or before `stored_before`.
    async fn monitor_due(
        &self,
        settled_before: SystemTime,
        unsettled_before: SystemTime,
        stored_before: SystemTime,
    ) -> Result<Vec<Watched>, StoreError>;
    /// Destroys a connection's secret material and marks it disconnected at
    /// `at` (unless it already was), appending `event` in the same
    /// transaction. `None`, with nothing written, if there is no such connection.
    async fn zero(
        &self,
        workspace_id: &str,
        provider: &str,
        at: SystemTime,
        event: Event,
    ) -> Result<Option<(CredentialRecord, StoredEvent, Shred)>, StoreError>;
    /// Checks the database's own structure, for `check-config`: `Corrupt`
    /// when it is damaged. The default finds nothing to check (PostgreSQL
    /// checks its own pages).
    async fn integrity_check(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Writes that destroyed key or secret material (Zero, Retire, a Store
    /// that replaced secrets) whose old bytes the database's files still
    /// hold, because a reader's snapshot needs them; 0 once none do.
    fn shreds_pending(&self) -> u64 {
        0
    }
    /// Every connected credential, without its secrets: for binding the
    /// params of a database from before bindings.
    async fn connected_credentials(&self) -> Result<Vec<CredentialRecord>, StoreError>;
    /// Writes `bindings` (each only if the row still has that data key) and
    /// stores the fingerprint key under its bound purpose in place of the
    /// legacy one, with `event`, in one transaction.
    async fn bind_params(
        &self,
        bindings: Vec<ParamsBinding>,
        fingerprint_key: Sealed,
        event: Event,
    ) -> Result<StoredEvent, StoreError>;
    /// Connected connections whose credential expires at or before
    /// `before`, with the expiry notice last written for each.
    async fn expiring(&self, before: SystemTime) -> Result<Vec<Expiring>, StoreError>;
    /// Records `notice` for the connection and appends `event` in the same
    /// transaction, unless the connection's expiry is no longer
    /// `notice.expires_at` or a notice as near was written already (by any
    /// replica): then `None`, and nothing is written.
    async fn note_expiry(
        &self,
        workspace_id: &str,
        provider: &str,
        notice: ExpiryNotice,
        event: Event,
    ) -> Result<Option<StoredEvent>, StoreError>;
    /// Appends an event for a call that changed nothing; returns once it is durable.
    async fn append_audit(&self, event: Event) -> Result<StoredEvent, StoreError> {
        self.queue_audit(event, Awaited::Yes)?.durable().await
    }
    /// Hands an event for a call that changed nothing to this process's
    /// writer, behind every write handed over before it, and returns at
    /// once: [`Queued::durable`] answers once it is committed. Fails when the
    /// writer is gone.
    fn queue_audit(&self, event: Event, awaited: Awaited) -> Result<Queued, StoreError>;
    /// Up to `limit` events after `after`, in order.
    async fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;
    /// The newest event, if any.
    async fn audit_head(&self) -> Result<Option<StoredEvent>, StoreError>;
    async fn add_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), StoreError>;
    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError>;
    /// The database's identity, fixed when it was created, which every
    /// signed head names.
    async fn database_id(&self) -> Result<Option<Vec<u8>>, StoreError>;
    /// Adds a key-encryption key version, with `event` in the same
    /// transaction; the highest active version is primary. Refused
    /// ([`StoreError::RootChanged`]) unless `witness` still holds in that
    /// transaction.
    async fn add_key_version(
        &self,
        version: WrappedKeyVersion,
        event: Event,
        witness: RootWitness,
    ) -> Result<StoredEvent, StoreError>;
    /// Every version, retired ones included, with its counts.
    async fn key_versions(&self) -> Result<Vec<KeyVersionRow>, StoreError>;
    /// Up to `limit` connected credentials whose data key is wrapped by a
    /// version older than `primary` (versions only grow: nothing newer is
    /// stale, and a range lets the key-version index skip the rows already done).
    async fn stale_data_keys(
        &self,
        primary: u32,
        limit: usize,
    ) -> Result<Vec<StaleDataKey>, StoreError>;
    /// Applies a batch of rewrapped data keys and appends `event`, in one
    /// transaction; returns how many applied.
    async fn rewrap(&self, batch: Vec<Rewrapped>, event: Event) -> Result<usize, StoreError>;
    /// Destroys an unused key version's material and marks it retired, with
    /// `event` in the same transaction. Refuses the newest version.
    async fn retire_key_version(
        &self,
        version: u32,
        event: Event,
    ) -> Result<(RetireOutcome, Shred), StoreError>;
    /// Root-key rotation, in one transaction: reads every root-sealed key,
    /// lets `reseal` replace them all, writes them with `event`. Nothing is
    /// written if `reseal` refuses ([`StoreError::Refused`]). Returns how
    /// many keys it resealed.
    async fn reseal_root(&self, reseal: Reseal, event: Event) -> Result<usize, StoreError>;
    /// Holds the database as `hold` says until the returned guard is
    /// dropped; [`StoreError::Held`] while another process holds it in a way
    /// that excludes this (a serving vault excludes `Alone`, and back).
    async fn hold(&self, hold: Hold) -> Result<Box<dyn std::any::Any + Send>, StoreError>;
    /// A key sealed under the root key, by purpose.
    async fn key_material(&self, purpose: &str) -> Result<Option<Sealed>, StoreError>;
    /// Stores a key sealed under the root key, unless one for `purpose`
    /// exists already (another replica made it first): read it back after.
    async fn put_key_material(&self, purpose: &str, sealed: Sealed) -> Result<(), StoreError>;
    /// The right to run the rewrap job, held until the returned guard is
    /// dropped; `None` while another replica holds it.
    async fn rewrap_lock(&self) -> Result<Option<Box<dyn std::any::Any + Send>>, StoreError> {
        Ok(Some(Box::new(())))
    }
}
