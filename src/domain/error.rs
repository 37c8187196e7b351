//! What can go wrong in the domain, sorted by what the caller should be told.

use crate::crypto::CryptoError;
use crate::store::StoreError;

/// A domain failure. Bad-input messages name fields, never values; internal
/// failures carry detail for the operator's log only (see `edge::status`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Well-formed, but outside what the vault lets through.
    #[error("{0}")]
    PermissionDenied(String),
    /// The provider could not be reached or answered unusably; no secret in the text.
    #[error("{0}")]
    ProviderUnavailable(String),
    #[error("no {provider} connection in workspace `{workspace_id}`")]
    NotFound {
        workspace_id: String,
        provider: &'static str,
    },
    /// Stored material failed authentication or is malformed.
    #[error("stored credential could not be decrypted")]
    DataLoss,
    #[error("storage is full")]
    StorageFull,
    /// The database is busy or cannot be reached: worth retrying.
    #[error("storage is unavailable: {0}")]
    StorageUnavailable(String),
    /// The token holding the root key is unavailable: sealing under it
    /// (a rotation) cannot happen; keys already unsealed keep serving.
    #[error("the hardware security module holding the root key is unavailable")]
    RootKeyUnavailable,
    /// The audit event could not be written, so the call was not carried out.
    #[error("the audit log could not be written")]
    AuditUnavailable,
    /// Material was destroyed and the change committed (with its audit event,
    /// in the same transaction), but its old bytes are still in the
    /// database's files until a reader lets go.
    #[error("{0}")]
    ShredPending(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl VaultError {
    /// Whether the call's audit event was already written with the change,
    /// so the gate must not write another.
    pub fn audited_in_transaction(&self) -> bool {
        matches!(self, VaultError::ShredPending(_))
    }
}

impl From<StoreError> for VaultError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Full => VaultError::StorageFull,
            StoreError::Audit(ref db) => {
                tracing::warn!(error = %db, "audit append failed");
                VaultError::AuditUnavailable
            }
            StoreError::Corrupt(_) => VaultError::DataLoss,
            StoreError::Held(_) | StoreError::Refused(_) | StoreError::RootChanged => {
                VaultError::FailedPrecondition(e.to_string())
            }
            StoreError::Busy(detail) | StoreError::Unavailable(detail) => {
                VaultError::StorageUnavailable(detail)
            }
            other => VaultError::Internal(other.to_string()),
        }
    }
}

impl From<CryptoError> for VaultError {
    fn from(e: CryptoError) -> Self {
        match e {
            CryptoError::Decrypt | CryptoError::UnknownKeyVersion(_) => VaultError::DataLoss,
            CryptoError::Token => VaultError::RootKeyUnavailable,
            other => VaultError::Internal(other.to_string()),
        }
    }
}
