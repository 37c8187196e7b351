//! credvault: a credential vault that stores provider keys write-only behind mutual-TLS gRPC.
//!
//! # Layout
//! - [`proto`]: the wire contract, generated from `proto/credvault/v1/credvault.proto`.
//! - [`edge`]: mutual TLS, caller identity, admission before the body (method, rate,
//!   limits), the gate (scope, audit, log), the services, and errors to status codes in
//!   one place.
//! - [`domain`]: what Store, Redact, Zero, List, Validate, Proxy and key rotation mean,
//!   and which credentials near their expiry.
//! - [`crypto`]: envelope encryption (root key → key-encryption keys → data keys), secret types.
//! - [`store`]: the storage trait, its SQL written once, and SQLite and PostgreSQL
//!   behind it, each with group commit.
//! - [`providers`]: one module per provider: fields, checks, auth headers, validation call,
//!   answer mapping, Proxy routes.
//! - [`outbound`]: the HTTP client for provider calls, its address policy, the echo scrubber.
//! - [`audit`]: typed events, the hash chain, signatures, verification.
//! - [`identity`]: SPIFFE IDs, the only form a caller's identity takes.
//! - [`policy`]: who may call what.
//! - [`telemetry`]: Prometheus metrics.
//! - [`config`], [`server`]: the configuration file and the `run` entry point.
//! - [`dev`]: the development vault (certificates, root key) and [`cli`]. The
//!   provider fakes for tests and the benchmark live in `crates/testkit`.

#![forbid(unsafe_code)]

pub mod audit;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod domain;
pub mod edge;
mod hardening;
pub mod identity;
pub mod outbound;
pub mod policy;
pub mod providers;
pub mod server;
pub mod store;
pub mod telemetry;

/// The generated `credvault.v1` messages, server and client.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("credvault.v1");

    /// The encoded descriptors of the wire contract, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/credvault_descriptor.bin"));

    /// Prints field names and parameters; secret values never.
    impl std::fmt::Debug for StoreRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let mut secret_fields: Vec<_> = self.secrets.keys().collect();
            secret_fields.sort();
            f.debug_struct("StoreRequest")
                .field("workspace_id", &self.workspace_id)
                .field("provider", &self.provider)
                .field("secrets", &format_args!("{secret_fields:?} [REDACTED]"))
                .field("params", &self.params)
                .field("validate", &self.validate)
                .finish()
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn store_request_debug_redacts_secret_values() {
            let request = super::StoreRequest {
                workspace_id: "ws".into(),
                provider: "amplitude".into(),
                secrets: [("secret_key".to_owned(), "CANARYvalue".to_owned())].into(),
                params: [("region".to_owned(), "eu".to_owned())].into(),
                validate: false,
            };
            let printed = format!("{request:?}");
            assert!(
                printed.contains("secret_key") && printed.contains("region"),
                "{printed}"
            );
            assert!(!printed.contains("CANARY"), "{printed}");
        }
    }
}

pub use config::Config;
pub use server::{run, run_with_clock, ServeError};
