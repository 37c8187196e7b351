//! Storage: the trait the domain writes through, and SQLite behind it.

mod sqlite;

use std::collections::BTreeMap;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::audit::{Checkpoint, Event, StoredEvent};
use crate::crypto::{NewKeyMaterial, Sealed, WrappedKeyVersion};

pub use sqlite::{read_audit_log, SqliteStore};

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

/// The key material a keyring is unwrapped from.
#[derive(Debug)]
pub struct StoredKeys {
    pub versions: Vec<WrappedKeyVersion>,
    pub fingerprint_key: Sealed,
}

/// A storage failure. Messages carry no row contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("the database is full")]
    Full,
    #[error("a stored row is malformed: {0}")]
    Corrupt(&'static str),
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("database file {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Writing the audit event failed; the change it recorded was not made.
    #[error("the audit log could not be written: {0}")]
    Audit(rusqlite::Error),
    #[error("storage task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
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
    /// `event` in the same transaction. Returns the row as stored.
    async fn put(
        &self,
        record: CredentialRecord,
        event: Event,
    ) -> Result<(CredentialRecord, StoredEvent), StoreError>;
    async fn get(
        &self,
        workspace_id: &str,
        provider: &str,
    ) -> Result<Option<CredentialRecord>, StoreError>;
    async fn list(&self, workspace_id: &str) -> Result<Vec<CredentialRecord>, StoreError>;
    /// Records a connection's latest validation verdict, unless its secrets
    /// changed since `data_key` was read (so a slow check never labels newer
    /// secrets). Returns whether it was recorded.
    async fn set_last_validation(
        &self,
        workspace_id: &str,
        provider: &str,
        data_key: &WrappedDataKey,
        validation: String,
    ) -> Result<bool, StoreError>;
    /// Destroys a connection's secret material and marks it disconnected at
    /// `at` (unless it already was), appending `event` in the same
    /// transaction. `None`, with nothing written, if there is no such connection.
    async fn zero(
        &self,
        workspace_id: &str,
        provider: &str,
        at: SystemTime,
        event: Event,
    ) -> Result<Option<(CredentialRecord, StoredEvent)>, StoreError>;
    /// Appends an event for a call that changed nothing.
    async fn append_audit(&self, event: Event) -> Result<StoredEvent, StoreError>;
    /// Up to `limit` events after `after`, in order.
    async fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;
    /// The newest event, if any.
    async fn audit_head(&self) -> Result<Option<StoredEvent>, StoreError>;
    async fn add_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), StoreError>;
    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError>;
    /// A key sealed under the root key, by purpose.
    async fn key_material(&self, purpose: &str) -> Result<Option<Sealed>, StoreError>;
    async fn put_key_material(&self, purpose: &str, sealed: Sealed) -> Result<(), StoreError>;
}
