//! Encryption at rest: tampered or moved ciphertexts give DATA_LOSS, never wrong
//! plaintext, and Zero leaves no ciphertext behind in the database or its WAL,
//! nor answers OK while a reader keeps it there.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{amplitude, contains_bytes, map, reference, VaultDir};
use credvault::audit;
use credvault::config::{KeysConfig, OutboundConfig, ProvidersConfig};
use credvault::crypto::RootKey;
use credvault::domain::{CredentialRef, NewCredential, Vault, VaultError};
use credvault::outbound::Outbound;
use credvault::store::SqliteStore;
use rusqlite::Connection;
use tonic::Code;

const SECRET: &str = "s3cr3tKEYvalue0123456789abcdefXY";
const API_KEY: &str = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6";

async fn open_vault(dir: &VaultDir) -> Vault {
    try_open_vault(dir).await.unwrap()
}

async fn try_open_vault(dir: &VaultDir) -> Result<Vault, VaultError> {
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
async fn an_edited_param_is_data_loss() {
    assert_tampering_detected(
        "UPDATE credentials SET params = '{\"region\":\"eu\",\"validation\":\"events\"}' \
         WHERE workspace_id = 'ws1'",
    )
    .await;
}

#[tokio::test]
async fn params_copied_with_their_binding_from_another_connection_are_data_loss() {
    assert_tampering_detected(
        "UPDATE credentials SET params = (SELECT params FROM credentials WHERE workspace_id = 'ws2'), \
         binding = (SELECT binding FROM credentials WHERE workspace_id = 'ws2') \
         WHERE workspace_id = 'ws1'",
    )
    .await;
}

#[tokio::test]
async fn a_removed_binding_is_data_loss() {
    assert_tampering_detected("UPDATE credentials SET binding = NULL WHERE workspace_id = 'ws1'")
        .await;
}

/// A database written before params were bound: its fingerprint key sealed
/// under the old purpose, no bindings. The vault refuses to start on it and
/// names the command; `credvault keys bind-params` binds every connection's
/// params once; from then on an unbound row is DATA_LOSS.
#[tokio::test]
async fn a_database_from_before_bindings_is_bound_once_by_the_operator() {
    let dir = VaultDir::new();
    store(&open_vault(&dir).await, "ws1").await;
    make_legacy(&dir);
    let unbound =
        |dir: &VaultDir| dir.number("SELECT count(*) FROM credentials WHERE binding IS NULL");
    assert_eq!(unbound(&dir), 1);

    let refused = try_open_vault(&dir).await.unwrap_err().to_string();
    assert!(refused.contains("keys bind-params"), "{refused}");
    let config = dir.path().join("credvault.toml");
    std::fs::write(&config, dir.config().to_toml()).unwrap();
    let bind = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
            .args(["keys", "bind-params", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = bind();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("bound the params of 1 connection"));
    assert_eq!(unbound(&dir), 0);
    let again = bind();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already bound"));

    let vault = open_vault(&dir).await;
    vault.decrypt(&target("ws1")).await.unwrap();
    assert_eq!(
        dir.number("SELECT count(*) FROM audit_events WHERE event LIKE '%KeyAdmin.BindParams%'"),
        1
    );
    dir.execute_batch("UPDATE credentials SET binding = NULL WHERE workspace_id = 'ws1'");
    assert!(matches!(
        vault.decrypt(&target("ws1")).await,
        Err(VaultError::DataLoss)
    ));
    drop(vault);

    // The attack on the operator: the pre-upgrade key table put back, every
    // binding removed, a param edited, so that the vault asks for bind-params
    // again. The audit log says it already ran: refused.
    make_legacy(&dir);
    dir.execute_batch(
        "UPDATE credentials SET params = '{\"region\":\"eu\",\"validation\":\"events\"}'",
    );
    let out = bind();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already ran"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(unbound(&dir), 1, "nothing was bound");
}

/// The attack on that migration: put the old-purpose fingerprint key back
/// (from a backup taken before the upgrade), edit a param, and have the
/// vault bind the edit. The vault does not start, and bind-params refuses a
/// database whose rows are already bound.
#[tokio::test]
async fn an_old_key_table_put_back_does_not_bind_edited_params() {
    let dir = VaultDir::new();
    store(&open_vault(&dir).await, "ws1").await;
    let bound = dir.texts("SELECT hex(binding) FROM credentials");
    make_legacy(&dir);
    dir.execute_batch(&format!(
        "UPDATE credentials SET binding = x'{}', \
         params = '{{\"region\":\"eu\",\"validation\":\"events\"}}'",
        bound[0]
    ));
    assert!(try_open_vault(&dir).await.is_err());
    let store = Arc::new(SqliteStore::open(&dir.db()).unwrap());
    let root = RootKey::from_file(&dir.path().join("root.key")).unwrap();
    let err = credvault::domain::bind_legacy_params(store, &root)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("restore the whole database"), "{err}");
    assert_eq!(dir.texts("SELECT hex(binding) FROM credentials"), bound);
}

/// Rewrites a database into the shape the previous release left: no params
/// bindings, and the fingerprint key sealed under its old purpose.
fn make_legacy(dir: &VaultDir) {
    use credvault::crypto::{FINGERPRINT_KEY_PURPOSE, LEGACY_FINGERPRINT_KEY_PURPOSE, NONCE_LEN};
    let root = RootKey::from_file(&dir.path().join("root.key")).unwrap();
    let db = Connection::open(dir.db()).unwrap();
    let (nonce, ciphertext): (Vec<u8>, Vec<u8>) = db
        .query_row(
            "SELECT nonce, wrapped_key FROM key_material WHERE purpose = ?1",
            [FINGERPRINT_KEY_PURPOSE],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let sealed = credvault::crypto::Sealed {
        nonce: <[u8; NONCE_LEN]>::try_from(nonce.as_slice()).unwrap(),
        ciphertext,
    };
    let key = root.open(FINGERPRINT_KEY_PURPOSE, &sealed).unwrap();
    let legacy = root
        .seal(
            &ring::rand::SystemRandom::new(),
            LEGACY_FINGERPRINT_KEY_PURPOSE,
            key.expose_secret(),
        )
        .unwrap();
    db.execute(
        "UPDATE key_material SET purpose = ?1, nonce = ?2, wrapped_key = ?3 WHERE purpose = ?4",
        rusqlite::params![
            LEGACY_FINGERPRINT_KEY_PURPOSE,
            legacy.nonce.as_slice(),
            legacy.ciphertext,
            FINGERPRINT_KEY_PURPOSE
        ],
    )
    .unwrap();
    db.execute_batch("UPDATE credentials SET binding = NULL")
        .unwrap();
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
    for (bytes, file) in common::sqlite_files(&dir.db()).iter().zip(["file", "WAL"]) {
        for m in &material {
            assert!(!contains_bytes(bytes, m), "ciphertext still in the {file}");
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

/// A reader (a backup tool, a long `audit verify`) holds a snapshot, so the
/// WAL cannot be emptied after a Zero. Zero must not answer OK while the
/// destroyed ciphertext is still in the files; once the reader lets go, the
/// vault finishes the shred by itself.
#[tokio::test]
async fn zero_is_not_ok_while_a_reader_keeps_the_secret_on_disk() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    c.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let material = stored_material(&dir);

    let reader = hold_snapshot(&dir);
    let err = c.zero(reference("ws", "amplitude")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("disconnected"), "{}", err.message());
    assert!(
        err.message().contains("write-ahead log"),
        "{}",
        err.message()
    );
    let redacted = c
        .redact(reference("ws", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        redacted.secrets.is_empty(),
        "the connection is already disconnected"
    );
    assert_eq!(
        dir.number("SELECT count(*) FROM audit_events"),
        3,
        "Store, Zero (written with the change, not again), Redact"
    );
    assert!(
        left_behind(&dir, &material) > 0,
        "the reader kept the old pages"
    );

    drop(reader);
    wait_until(|| left_behind(&dir, &material) == 0).await;
    c.zero(reference("ws", "amplitude")).await.unwrap();
}

/// The same for a Store that replaces a connection's secrets: the old
/// ciphertext and data key leave the files once the reader lets go, without
/// another call.
#[tokio::test]
async fn replaced_secrets_leave_the_files_once_the_reader_lets_go() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    c.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let material = stored_material(&dir);

    let reader = hold_snapshot(&dir);
    c.store(amplitude(
        "ws",
        "f0e1d2c3b4a5968778695a4b3c2d1e0f",
        "Zz9yXx8wWw7vVv6uUu5tTt4sSs3rRr2q",
    ))
    .await
    .unwrap();
    assert!(
        left_behind(&dir, &material) > 0,
        "the reader kept the old pages"
    );
    drop(reader);
    wait_until(|| left_behind(&dir, &material) == 0).await;
}

/// The stored ciphertexts and wrapped data key of every connection.
fn stored_material(dir: &VaultDir) -> Vec<Vec<u8>> {
    let db = rusqlite::Connection::open(dir.db()).unwrap();
    let mut material: Vec<Vec<u8>> = db
        .prepare("SELECT ciphertext FROM credential_secrets")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    material.extend(
        db.prepare("SELECT wrapped_dek FROM credentials")
            .unwrap()
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(Result::unwrap),
    );
    assert!(!material.is_empty());
    material
}

/// How many of `material` are still in the database file or its WAL.
fn left_behind(dir: &VaultDir, material: &[Vec<u8>]) -> usize {
    let files = common::sqlite_files(&dir.db());
    material
        .iter()
        .filter(|m| files.iter().any(|f| contains_bytes(f, m)))
        .count()
}

/// A connection holding a read transaction open, as a backup tool would.
fn hold_snapshot(dir: &VaultDir) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(dir.db()).unwrap();
    db.execute_batch("BEGIN").unwrap();
    let _: i64 = db
        .query_row("SELECT count(*) FROM credential_secrets", [], |r| r.get(0))
        .unwrap();
    db
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "not done within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
