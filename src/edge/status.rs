//! The one place domain failures become gRPC statuses.

use tonic::codegen::http::{HeaderValue, Response};
use tonic::{Code, Status};

use crate::domain::VaultError;

/// Bad input is told specifically; anything internal becomes a generic
/// message for the client and a `warn!` for the operator.
pub fn to_status(e: VaultError) -> Status {
    match e {
        VaultError::InvalidArgument(m) => Status::invalid_argument(m),
        VaultError::FailedPrecondition(m) => Status::failed_precondition(m),
        VaultError::PermissionDenied(m) => Status::permission_denied(m),
        VaultError::ProviderUnavailable(m) => Status::unavailable(m),
        e @ VaultError::NotFound { .. } => Status::not_found(e.to_string()),
        VaultError::DataLoss => Status::data_loss("stored credential could not be decrypted"),
        VaultError::StorageFull => {
            tracing::warn!("storage is full: writes fail until space is freed");
            Status::resource_exhausted("the vault's storage is full")
        }
        VaultError::StorageUnavailable(detail) => {
            tracing::warn!(%detail, "storage unavailable");
            Status::unavailable("the vault's storage is busy or unreachable; retry shortly")
        }
        VaultError::RootKeyUnavailable => Status::unavailable(
            "the hardware security module holding the root key is unavailable, so no key can \
             be sealed under it; calls keep being served with the keys unsealed at start-up. \
             Retry once the token is back",
        ),
        VaultError::AuditUnavailable => Status::unavailable(
            "the audit log could not be written, so the call was not carried out",
        ),
        VaultError::ShredPending(m) => Status::unavailable(m),
        VaultError::Internal(detail) => {
            tracing::warn!(%detail, "internal error");
            Status::new(Code::Internal, "unexpected error")
        }
    }
}

/// tonic refuses a request it cannot decode before any handler runs, as
/// INTERNAL, and one over the size limit as OUT_OF_RANGE. Both are the
/// caller's fault: answer INVALID_ARGUMENT and RESOURCE_EXHAUSTED instead.
pub fn refusal_codes<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let fixed = match code.map(Code::from) {
        Some(Code::Internal)
            if message.starts_with("failed%20to%20decode")
                || message.starts_with("failed to decode") =>
        {
            Some(Code::InvalidArgument)
        }
        Some(Code::OutOfRange)
            if message.contains("message%20length%20too%20large")
                || message.contains("message length too large") =>
        {
            Some(Code::ResourceExhausted)
        }
        _ => None,
    };
    if let Some(code) = fixed {
        headers.insert("grpc-status", HeaderValue::from(code as i32));
    }
    response
}
