//! Mutual TLS: who gets in, and who is refused at the handshake.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::VaultDir;
use credvault::dev::certs::{DevCa, Subject};
use credvault::proto::credentials_client::CredentialsClient;
use credvault::proto::ListProvidersRequest;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Whether one RPC gets through with this client certificate (None: no certificate).
async fn gets_through(vault: &common::TestVault, identity: Option<(&str, &str)>) -> bool {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&vault.ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from_shared(vault.url())
        .unwrap()
        .tls_config(tls)
        .unwrap();
    // With TLS 1.3 the client may finish its side of the handshake before the
    // server refuses it, so the refusal can surface on the first call.
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    CredentialsClient::new(channel)
        .list_providers(ListProvidersRequest {})
        .await
        .is_ok()
}

#[tokio::test]
async fn accepts_client_certificate_from_the_configured_ca() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    assert!(gets_through(&vault, Some((&dir.app.cert_pem, &dir.app.key_pem))).await);
}

#[tokio::test]
async fn rejects_client_without_certificate() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    assert!(!gets_through(&vault, None).await);
}

#[tokio::test]
async fn rejects_certificate_from_another_ca() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let other = DevCa::generate("another CA").unwrap();
    let intruder = other
        .issue("app", Subject::ClientUris(&[common::APP]))
        .unwrap();
    assert!(!gets_through(&vault, Some((&intruder.cert_pem, &intruder.key_pem))).await);
}

#[tokio::test]
async fn rejects_client_certificate_with_several_uri_sans() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let ambiguous = dir
        .ca
        .issue(
            "app",
            Subject::ClientUris(&[
                "spiffe://credvault.local/app",
                "spiffe://credvault.local/admin",
            ]),
        )
        .unwrap();
    assert!(!gets_through(&vault, Some((&ambiguous.cert_pem, &ambiguous.key_pem))).await);
}

#[tokio::test]
async fn refuses_to_start_with_a_world_readable_server_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = VaultDir::new();
    let key = dir.path().join("server-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = credvault::run(dir.config(), listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server-key.pem") && err.contains("chmod 600"),
        "{err}"
    );
}

#[tokio::test]
async fn refuses_to_start_with_a_missing_root_key_naming_it() {
    let dir = VaultDir::new();
    std::fs::remove_file(dir.path().join("root.key")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = credvault::run(dir.config(), listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("root.key"), "{err}");
}
