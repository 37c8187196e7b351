//! The one place domain failures become gRPC statuses.

use tonic::{Code, Status};

use crate::domain::VaultError;

/// Bad input is told specifically; anything internal becomes a generic
/// message for the client and a `warn!` for the operator.
pub fn to_status(e: VaultError) -> Status {
    match e {
        VaultError::InvalidArgument(m) => Status::invalid_argument(m),
        VaultError::FailedPrecondition(m) => Status::failed_precondition(m),
        e @ VaultError::NotFound { .. } => Status::not_found(e.to_string()),
        VaultError::DataLoss => Status::data_loss("stored credential could not be decrypted"),
        VaultError::StorageFull => {
            tracing::warn!("storage is full: writes fail until space is freed");
            Status::resource_exhausted("the vault's storage is full")
        }
        VaultError::AuditUnavailable => Status::unavailable(
            "the audit log could not be written, so the call was not carried out",
        ),
        VaultError::Internal(detail) => {
            tracing::warn!(%detail, "internal error");
            Status::new(Code::Internal, "unexpected error")
        }
    }
}
