//! The gRPC edge: mutual TLS in, requests decoded and handed to the domain, answers encoded.

pub mod audit;
mod credentials;
mod gate;
mod keys;
mod status;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::Limits;
use crate::domain::Vault;
use crate::policy::SharedPolicy;
use crate::proto::audit_server::AuditServer;
use crate::proto::credentials_server::CredentialsServer;
use crate::proto::key_admin_server::KeyAdminServer;
use audit::AuditService;
use credentials::CredentialsService;
use gate::Gate;
use keys::KeyAdminService;

/// Serves the vault's gRPC services on `listener` until `shutdown` resolves,
/// then lets in-flight calls finish.
pub async fn serve(
    vault: Arc<Vault>,
    policy: SharedPolicy,
    listener: TcpListener,
    tls: rustls::ServerConfig,
    limits: &Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let gate = Gate::new(policy, Arc::clone(&vault));
    let audit = AuditServer::new(AuditService::new(Arc::clone(&vault), gate.clone()));
    let keys = KeyAdminServer::new(KeyAdminService::new(Arc::clone(&vault), gate.clone()));
    let credentials = CredentialsServer::new(CredentialsService::new(vault, gate))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
    let incoming = tls::incoming(
        listener,
        Arc::new(tls),
        Duration::from_millis(limits.handshake_timeout_ms),
    );
    tonic::transport::Server::builder()
        .add_service(credentials)
        .add_service(audit)
        .add_service(keys)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
