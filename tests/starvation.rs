//! Nobody can starve the vault: not with idle sockets before the handshake, not with
//! streams a certificate without rights opens, not by being refused over and over.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::{Duration, Instant};

use common::VaultDir;
use credvault::proto::ListProvidersRequest;

#[tokio::test]
async fn idle_sockets_without_a_certificate_do_not_lock_out_clients() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.limits.max_connections = 100;
    let vault = dir.start_with(config).await;
    // Three times the connection limit, none of which ever says a word, all
    // from the client's own address.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(vault.addr).await.unwrap());
    }
    // Let the vault accept them all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let called = tokio::time::timeout(Duration::from_secs(2), async {
        vault
            .client()
            .await
            .list_providers(ListProvidersRequest {})
            .await
    })
    .await;
    assert!(
        matches!(called, Ok(Ok(_))),
        "a proper client was locked out by {} idle sockets: {called:?}",
        idle.len()
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(idle);
}
