//! Encryption at rest: tampered or moved ciphertexts give DATA_LOSS, never wrong
//! plaintext, and Zero leaves no ciphertext behind in the database or its WAL.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{contains_bytes, map, VaultDir};
use credvault::audit;
use credvault::config::{KeysConfig, OutboundConfig, ProvidersConfig};
use credvault::crypto::RootKey;
use credvault::domain::{CredentialRef, NewCredential, Vault, VaultError};
use credvault::outbound::Outbound;
use credvault::store::SqliteStore;
use rusqlite::Connection;

const SECRET: &str = "s3cr3tKEYvalue0123456789abcdefXY";

async fn open_vault(dir: &VaultDir) -> Vault {
    let store = Arc::new(SqliteStore::open(&dir.db()).unwrap());
    let root = RootKey::from_file(&dir.path().join("root.key")).unwrap();
    Vault::open(
        store,
        root,
        outbound(),
        &ProvidersConfig::default(),
        &keys(),
    )
    .await
    .unwrap()
}

fn keys() -> KeysConfig {
    VaultDir::new().config().keys
}

/// No test here calls a provider; the client is only needed to build the vault.
fn outbound() -> Outbound {
    Outbound::new(&OutboundConfig::default()).unwrap()
}

async fn store(vault: &Vault, workspace: &str) {
    let new = NewCredential::parse(
        workspace,
        "amplitude",
        map(&[
            ("api_key", "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"),
            ("secret_key", SECRET),
        ]),
        HashMap::new(),
    )
    .unwrap();
    vault.store(new, false, &context()).await.unwrap();
}

fn context() -> audit::Context {
    audit::Context {
        identity: "test".into(),
        method: "Credentials.Store".into(),
        workspace_id: "ws".into(),
        provider: "amplitude".into(),
        request_id: "r".into(),
    }
}

fn target(workspace: &str) -> CredentialRef {
    CredentialRef::parse(workspace, "amplitude").unwrap()
}

/// Stores ws1 and ws2, applies `tamper` to the database directly, and expects
/// ws1 to fail with DATA_LOSS.
async fn assert_tampering_detected(tamper: &str) {
    assert_tampering_detected_by(|db| db.execute_batch(tamper).unwrap()).await;
}

async fn assert_tampering_detected_by(tamper: impl FnOnce(&Connection)) {
    let dir = VaultDir::new();
    let vault = open_vault(&dir).await;
    store(&vault, "ws1").await;
    store(&vault, "ws2").await;
    let plain = vault.decrypt(&target("ws1")).await.unwrap();
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(&plain.secrets["secret_key"]),
        SECRET
    );

    let db = Connection::open(dir.db()).unwrap();
    // Tampering bypasses the schema's own checks, as an attacker's would.
    db.pragma_update(None, "foreign_keys", "OFF").unwrap();
    tamper(&db);
    match vault.decrypt(&target("ws1")).await {
        Err(VaultError::DataLoss) => {}
        other => panic!("expected DataLoss, got {other:?}"),
    }
}

#[tokio::test]
async fn flipped_ciphertext_bit_is_data_loss() {
    assert_tampering_detected_by(|db| {
        let select = "SELECT ciphertext FROM credential_secrets WHERE workspace_id = 'ws1' AND field = 'secret_key'";
        let mut blob: Vec<u8> = db.query_row(select, [], |r| r.get(0)).unwrap();
        blob[5] ^= 0x10;
        db.execute(
            "UPDATE credential_secrets SET ciphertext = ?1 WHERE workspace_id = 'ws1' AND field = 'secret_key'",
            [blob],
        )
        .unwrap();
    })
    .await;
}

#[tokio::test]
async fn tampered_nonce_is_data_loss() {
    assert_tampering_detected(
        "UPDATE credential_secrets SET nonce = zeroblob(12) WHERE workspace_id = 'ws1' AND field = 'api_key'",
    )
    .await;
}

#[tokio::test]
async fn tampered_wrapped_data_key_is_data_loss() {
    assert_tampering_detected(
        "UPDATE credentials SET wrapped_dek = randomblob(length(wrapped_dek)) WHERE workspace_id = 'ws1'",
    )
    .await;
}

#[tokio::test]
async fn ciphertext_moved_from_another_workspace_is_data_loss() {
    assert_tampering_detected(
        "UPDATE credential_secrets SET \
           nonce = (SELECT nonce FROM credential_secrets WHERE workspace_id = 'ws2' AND field = 'secret_key'), \
           ciphertext = (SELECT ciphertext FROM credential_secrets WHERE workspace_id = 'ws2' AND field = 'secret_key') \
         WHERE workspace_id = 'ws1' AND field = 'secret_key'",
    )
    .await;
}

#[tokio::test]
async fn whole_row_copied_from_another_workspace_is_data_loss() {
    assert_tampering_detected(
        "UPDATE credentials SET \
           dek_nonce = (SELECT dek_nonce FROM credentials WHERE workspace_id = 'ws2'), \
           wrapped_dek = (SELECT wrapped_dek FROM credentials WHERE workspace_id = 'ws2') \
         WHERE workspace_id = 'ws1'; \
         DELETE FROM credential_secrets WHERE workspace_id = 'ws1'; \
         INSERT INTO credential_secrets SELECT 'ws1', provider, field, nonce, ciphertext, hint, fingerprint \
           FROM credential_secrets WHERE workspace_id = 'ws2';",
    )
    .await;
}

#[tokio::test]
async fn fields_swapped_within_a_row_are_data_loss() {
    assert_tampering_detected(
        "UPDATE credential_secrets SET field = 'swap' WHERE workspace_id = 'ws1' AND field = 'api_key'; \
         UPDATE credential_secrets SET field = 'api_key' WHERE workspace_id = 'ws1' AND field = 'secret_key'; \
         UPDATE credential_secrets SET field = 'secret_key' WHERE workspace_id = 'ws1' AND field = 'swap';",
    )
    .await;
}

#[tokio::test]
async fn edited_key_version_is_data_loss() {
    assert_tampering_detected("UPDATE credentials SET key_version = 7 WHERE workspace_id = 'ws1'")
        .await;
}

#[tokio::test]
async fn deleted_secret_field_is_data_loss() {
    assert_tampering_detected(
        "DELETE FROM credential_secrets WHERE workspace_id = 'ws1' AND field = 'api_key'",
    )
    .await;
}

#[tokio::test]
async fn zero_leaves_no_ciphertext_in_the_database_or_wal() {
    let dir = VaultDir::new();
    let vault = open_vault(&dir).await;
    store(&vault, "ws1").await;
    let db = Connection::open(dir.db()).unwrap();
    let mut material: Vec<Vec<u8>> = db
        .prepare("SELECT ciphertext FROM credential_secrets WHERE workspace_id = 'ws1'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    material.push(
        db.query_row(
            "SELECT wrapped_dek FROM credentials WHERE workspace_id = 'ws1'",
            [],
            |r| r.get(0),
        )
        .unwrap(),
    );
    drop(db);
    assert_eq!(material.len(), 3);

    vault.zero(&target("ws1"), &context()).await.unwrap();
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", dir.db().display());
        let bytes = std::fs::read(&path).unwrap_or_default();
        for m in &material {
            assert!(!contains_bytes(&bytes, m), "ciphertext still in {path}");
        }
    }
    assert!(matches!(
        vault.decrypt(&target("ws1")).await,
        Err(VaultError::FailedPrecondition(_))
    ));
}

#[tokio::test]
async fn another_root_key_cannot_open_the_database() {
    let dir = VaultDir::new();
    store(&open_vault(&dir).await, "ws1").await;
    common::write_private(&dir.path().join("other.key"), "cd".repeat(32).as_bytes());
    let store = Arc::new(SqliteStore::open(&dir.db()).unwrap());
    let wrong = RootKey::from_file(&dir.path().join("other.key")).unwrap();
    let err = Vault::open(
        store,
        wrong,
        outbound(),
        &ProvidersConfig::default(),
        &keys(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("root key does not open"), "{err}");
}
