//! The gRPC edge: mutual TLS in, requests decoded and handed to the domain, answers encoded.

mod admission;
pub mod audit;
mod credentials;
mod gate;
mod keys;
mod quota;
mod refusals;
mod status;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::config::Limits;
use crate::domain::proxy::{MAX_PATH_BYTES, MAX_REQUEST_BODY, MAX_RESPONSE_BODY};
use crate::domain::Vault;
use crate::policy::SharedPolicy;
use crate::proto::audit_server::AuditServer;
use crate::proto::credentials_server::CredentialsServer;
use crate::proto::key_admin_server::KeyAdminServer;
use crate::telemetry::Metrics;
use audit::AuditService;
use credentials::CredentialsService;
use gate::Gate;
use keys::KeyAdminService;

/// A secret as the wire shows it, in a Credential and in an AuditEvent alike.
impl From<crate::audit::SecretSummary> for crate::proto::RedactedSecret {
    fn from(s: crate::audit::SecretSummary) -> Self {
        Self {
            hint: s.hint,
            fingerprint: s.fingerprint,
        }
    }
}

/// Room for a Proxy request's fields around its largest body, so that a body
/// just over the cap reaches the handler and is refused by name.
const PROXY_REQUEST_MESSAGE: usize = MAX_REQUEST_BODY + MAX_PATH_BYTES + 64 * 1024;
/// The largest Proxy answer; clients must accept messages this large.
pub const PROXY_RESPONSE_MESSAGE: usize = MAX_RESPONSE_BODY + 64 * 1024;

/// The health service name whose status says whether the root key can seal
/// (NOT_SERVING while its HSM token does not answer). Not a gRPC service.
pub const ROOT_KEY_HEALTH: &str = "credvault.RootKey";

/// The services whose health is reported, by their full gRPC names.
pub const SERVICES: [&str; 3] = [
    "credvault.v1.Credentials",
    "credvault.v1.Audit",
    "credvault.v1.KeyAdmin",
];

/// Everything the edge serves with.
#[derive(Debug)]
pub struct Edge {
    pub vault: Arc<Vault>,
    pub policy: SharedPolicy,
    pub tls: tls::SharedTls,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub health: HealthReporter,
    /// Turns true when shutdown begins: open audit streams end.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// Serves the vault's gRPC services, health and reflection on `listener`
/// until `shutdown` resolves, then lets in-flight calls finish.
pub async fn serve(
    edge: Edge,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let Edge {
        vault,
        policy,
        tls,
        limits,
        metrics,
        health,
        stopping,
    } = edge;
    // v1, and v1alpha for the clients that speak only it (Python's
    // grpcio-reflection, Evans, older grpcurl).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let unavailable = |e: tonic_reflection::server::Error| {
        tracing::warn!(error = %e, "server reflection is unavailable");
    };
    let reflection_v1alpha = reflection().build_v1alpha().map_err(unavailable).ok();
    let reflection = reflection().build_v1().map_err(unavailable).ok();
    let health = HealthServer::new(HealthService::from_health_reporter(health))
        .max_decoding_message_size(limits.max_message_bytes);
    let refusals = Arc::new(refusals::Refusals::new(Arc::clone(&vault)));
    let admission = admission::AdmissionLayer(Arc::new(admission::Admission::new(
        policy.clone(),
        Arc::clone(&refusals),
        &limits,
        PROXY_REQUEST_MESSAGE,
        Arc::clone(&metrics),
    )));
    let gate = Gate::new(
        policy,
        Arc::clone(&vault),
        Arc::clone(&refusals),
        Arc::clone(&metrics),
    );
    let audit = AuditServer::new(AuditService::new(
        Arc::clone(&vault),
        gate.clone(),
        stopping,
    ))
    .max_decoding_message_size(limits.max_message_bytes);
    let keys = KeyAdminServer::new(KeyAdminService::new(Arc::clone(&vault), gate.clone()))
        .max_decoding_message_size(limits.max_message_bytes);
    // Proxy carries bodies of up to 1 MiB out and 4 MiB back, plus framing;
    // admission cuts every other method's request off at max_message_bytes.
    let credentials = CredentialsServer::new(CredentialsService::new(vault, gate))
        .max_decoding_message_size(limits.max_message_bytes.max(PROXY_REQUEST_MESSAGE))
        .max_encoding_message_size(limits.max_message_bytes.max(PROXY_RESPONSE_MESSAGE));
    let incoming = tls::incoming(
        listener,
        tls,
        tls::ConnectionLimits {
            handshake_timeout: Duration::from_millis(limits.handshake_timeout_ms),
            max_connections: limits.max_connections,
            max_pending: limits.max_pending_handshakes,
            max_pending_per_address: limits.max_pending_handshakes_per_address,
            max_connections_per_identity: limits.max_connections_per_identity,
        },
        metrics,
    );
    let flushing = tokio::spawn(Arc::clone(&refusals).run());
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .max_connection_age(Duration::from_millis(limits.max_connection_age_ms.max(1)))
        .max_connection_age_grace(Duration::from_millis(limits.shutdown_grace_ms))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Admission outermost: it sees the codes refusal_codes has set.
        .layer(admission)
        .layer(tower::util::MapResponseLayer::new(status::refusal_codes))
        .add_service(health)
        .add_optional_service(
            reflection.map(|r| r.max_decoding_message_size(limits.max_message_bytes)),
        )
        .add_optional_service(
            reflection_v1alpha.map(|r| r.max_decoding_message_size(limits.max_message_bytes)),
        )
        .add_service(credentials)
        .add_service(audit)
        .add_service(keys)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    flushing.abort();
    // Refusals counted in the last window are accounted for too.
    refusals.flush().await;
    served
}
