//! Key rotation with no downtime: rotate under load, rewrap, retire, automatic
//! rotation at the cap, and root-key rotation.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{amplitude, contains_bytes, reference, TestVault, VaultDir};
use credvault::config::Config;
use credvault::proto::key_admin_client::KeyAdminClient;
use credvault::proto::key_version_info::State;
use credvault::proto::validation::Verdict;
use credvault::proto::{KeyStatus, RetireRequest, RotateRequest, StatusRequest};
use credvault_testkit::fake::{FakeProvider, Reply};
use tonic::transport::Channel;
use tonic::Code;

const SECRET: &str = "Vq8rKw2Lx7Mz4Nc9Pb3Td6Yf1Gh5Js0U";
const ADMIN: &str = "spiffe://credvault.local/admin";
const OK_EVENTS: &str = r#"{"data":[{"name":"Signed Up"}]}"#;

async fn admin(dir: &VaultDir, vault: &TestVault) -> KeyAdminClient<Channel> {
    KeyAdminClient::new(dir.channel_as(vault, ADMIN).await)
}

async fn status(admin: &mut KeyAdminClient<Channel>) -> KeyStatus {
    admin.status(StatusRequest {}).await.unwrap().into_inner()
}

/// Polls until every connected credential is on the primary version.
async fn rewrap_finished(admin: &mut KeyAdminClient<Channel>) -> KeyStatus {
    for _ in 0..400 {
        let s = status(admin).await;
        if s.rewrap_done == s.rewrap_total {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the rewrap never finished: {:?}", status(admin).await);
}

/// Runs `credvault keys rotate-root` on `dir`'s database, to a new root key
/// of 32 bytes `byte` (two hex digits) written to `file` in `dir`.
async fn rotate_root_to(dir: &VaultDir, file: &str, byte: &str) -> (std::process::Output, PathBuf) {
    let config_path = dir.path().join("credvault.toml");
    std::fs::write(&config_path, dir.config().to_toml()).unwrap();
    let new_root = dir.path().join(file);
    common::write_private(&new_root, byte.repeat(32).as_bytes());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
        .args(["keys", "rotate-root", "--config"])
        .arg(&config_path)
        .arg("--new-root-key")
        .arg(&new_root)
        .output()
        .await
        .unwrap();
    (out, new_root)
}

/// A vault whose Amplitude US host is an HTTPS fake that accepts every key.
async fn with_fake(dir: &VaultDir, tweak: impl FnOnce(&mut Config)) -> (TestVault, FakeProvider) {
    let fake = FakeProvider::start(&dir.ca, |_| Reply::json(200, OK_EVENTS)).await;
    let mut config = dir.config();
    config
        .providers
        .amplitude
        .base_urls
        .insert("us".into(), fake.url());
    tweak(&mut config);
    (dir.start_with(config).await, fake)
}

#[tokio::test]
async fn rotate_under_load_fails_no_call_and_every_credential_moves_and_decrypts() {
    let dir = VaultDir::new();
    let (vault, _fake) = with_fake(&dir, |c| c.keys.rewrap_batch = 20).await;
    let mut c = vault.client().await;
    for i in 0..300 {
        c.store(amplitude(&format!("ws{i}"), SECRET, SECRET))
            .await
            .unwrap();
    }
    let mut admin = admin(&dir, &vault).await;
    let mut load = Vec::new();
    for worker in 0..4 {
        let mut c = vault.client().await;
        load.push(tokio::spawn(async move {
            for round in 0..40 {
                let ws = format!("ws{}", (worker * 40 + round) % 300);
                c.store(amplitude(&ws, SECRET, SECRET)).await.unwrap();
                c.redact(reference(&ws, "amplitude")).await.unwrap();
                let v = c
                    .validate_connection(reference(&ws, "amplitude"))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(v.verdict, Verdict::Valid as i32, "{v:?}");
            }
        }));
    }
    let rotated = admin.rotate(RotateRequest {}).await.unwrap().into_inner();
    assert_eq!(rotated.primary_version, 2);
    for task in load {
        task.await.unwrap();
    }
    let done = rewrap_finished(&mut admin).await;
    assert_eq!(done.rewrap_total, 300);
    let v1 = done.versions.iter().find(|v| v.version == 1).unwrap();
    assert_eq!((v1.state, v1.credentials), (State::Active as i32, 0));
    let v2 = done.versions.iter().find(|v| v.version == 2).unwrap();
    assert_eq!((v2.state, v2.credentials), (State::Primary as i32, 300));
    for i in (0..300).step_by(7) {
        let ws = format!("ws{i}");
        let redacted = c
            .redact(reference(&ws, "amplitude"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(redacted.key_version, 2);
        let v = c
            .validate_connection(reference(&ws, "amplitude"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            v.verdict,
            Verdict::Valid as i32,
            "decrypts after the rewrap"
        );
    }
}

#[tokio::test]
async fn retire_is_refused_while_in_use_and_destroys_the_material_after() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    c.store(amplitude("ws", SECRET, SECRET)).await.unwrap();
    let mut admin = admin(&dir, &vault).await;
    let primary = admin
        .retire(RetireRequest { version: 1 })
        .await
        .unwrap_err();
    assert_eq!(primary.code(), Code::FailedPrecondition);
    assert!(
        primary.message().contains("primary"),
        "{}",
        primary.message()
    );

    let material = dir.texts(if common::on_sqlite() {
        "SELECT hex(wrapped_key) FROM key_versions WHERE version = 1"
    } else {
        "SELECT upper(encode(wrapped_key, 'hex')) FROM key_versions WHERE version = 1"
    });
    let material = data_encoding::HEXUPPER
        .decode(material[0].as_bytes())
        .unwrap();
    admin.rotate(RotateRequest {}).await.unwrap();
    rewrap_finished(&mut admin).await;
    let retired = admin
        .retire(RetireRequest { version: 1 })
        .await
        .unwrap()
        .into_inner();
    let v1 = retired.versions.iter().find(|v| v.version == 1).unwrap();
    assert_eq!(v1.state, State::Retired as i32);
    assert_eq!(
        dir.number(
            "SELECT count(*) FROM key_versions WHERE version = 1 AND length(wrapped_key) = 0"
        ),
        1,
        "the retired version's row holds no key material"
    );
    // The files themselves: SQLite's; PostgreSQL's are its own business (README).
    let files = if common::on_sqlite() {
        common::sqlite_files(&dir.db())
    } else {
        Vec::new()
    };
    for bytes in files {
        assert!(
            !contains_bytes(&bytes, &material),
            "retired key material still in the file"
        );
    }
    let redacted = c
        .redact(reference("ws", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(redacted.key_version, 2);
    let unknown = admin
        .retire(RetireRequest { version: 9 })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn retire_names_how_many_credentials_still_use_the_version() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    for i in 0..3 {
        c.store(amplitude(&format!("ws{i}"), SECRET, SECRET))
            .await
            .unwrap();
    }
    let mut admin = admin(&dir, &vault).await;
    admin.rotate(RotateRequest {}).await.unwrap();
    rewrap_finished(&mut admin).await;
    admin.rotate(RotateRequest {}).await.unwrap();
    rewrap_finished(&mut admin).await;
    // Version 2 is unused now; make it look used by pointing rows at it
    // behind the vault's back (they no longer decrypt, so the rewrap skips them).
    dir.execute(
        "UPDATE credentials SET key_version = 2 WHERE workspace_id IN ('ws0', 'ws1')",
        &[],
    );
    let refused = admin
        .retire(RetireRequest { version: 2 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("still wraps 2 credential"),
        "{}",
        refused.message()
    );
}

#[tokio::test]
async fn the_vault_rotates_by_itself_at_the_encryption_cap() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.keys.max_encryptions_per_version = 100;
    let vault = dir.start_with(config).await;
    let mut c = vault.client().await;
    for i in 0..150 {
        c.store(amplitude(&format!("ws{i}"), SECRET, SECRET))
            .await
            .unwrap();
    }
    let mut admin = admin(&dir, &vault).await;
    let mut s = status(&mut admin).await;
    for _ in 0..200 {
        if s.primary_version >= 2 && s.rewrap_done == s.rewrap_total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        s = status(&mut admin).await;
    }
    assert!(s.primary_version >= 2, "{s:?}");
    let v1 = s.versions.iter().find(|v| v.version == 1).unwrap();
    assert!(v1.encryptions >= 100, "{s:?}");
    let automatic = dir.number(
        "SELECT count(*) FROM audit_events WHERE event LIKE '%\"identity\":\"credvault\"%' \
         AND event LIKE '%KeyAdmin.Rotate%'",
    );
    assert!(automatic >= 1, "the automatic rotation is audited");
}

#[tokio::test]
async fn root_key_rotation_locks_out_the_old_root_key() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let stored = c
        .store(amplitude("ws", SECRET, SECRET))
        .await
        .unwrap()
        .into_inner();
    drop(c);
    vault.stop().await;

    // The current key again, in another file: refused, or "the old key opens
    // nothing" would be false.
    let (out, _) = rotate_root_to(&dir, "same-root.key", "AB").await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is the current root key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (out, new_root) = rotate_root_to(&dir, "new-root.key", "9f").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = credvault::run(dir.config(), listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("root key does not open"), "{err}");

    let mut config = dir.config();
    config.keys.root_key_file = Some(new_root);
    let vault = dir.start_with(config).await;
    let after = vault
        .client()
        .await
        .redact(reference("ws", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after.secrets, stored.secrets,
        "fingerprints survive the root rotation"
    );
}

#[tokio::test]
async fn the_rewrap_skips_an_unreadable_data_key_moves_the_rest_and_finishes() {
    let dir = VaultDir::new();
    // Batches of 3 over 12 credentials: the pass pipelines several batches.
    let (vault, _fake) = with_fake(&dir, |c| c.keys.rewrap_batch = 3).await;
    let mut c = vault.client().await;
    for i in 0..12 {
        c.store(amplitude(&format!("ws{i}"), SECRET, SECRET))
            .await
            .unwrap();
    }
    // Another connection's wrapped data key: bound to its owner, it fails
    // authentication for these two.
    dir.execute(
        "UPDATE credentials SET wrapped_dek = \
           (SELECT wrapped_dek FROM credentials WHERE workspace_id = 'ws11') \
         WHERE workspace_id IN ('ws3', 'ws7')",
        &[],
    );
    let mut admin = admin(&dir, &vault).await;
    admin.rotate(RotateRequest {}).await.unwrap();
    let mut moved = status(&mut admin).await;
    for _ in 0..400 {
        if moved.rewrap_done == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        moved = status(&mut admin).await;
    }
    assert_eq!((moved.rewrap_done, moved.rewrap_total), (10, 12));
    for i in 0..12 {
        let redacted = c
            .redact(reference(&format!("ws{i}"), "amplitude"))
            .await
            .unwrap()
            .into_inner();
        let expected = if i == 3 || i == 7 { 1 } else { 2 };
        assert_eq!(redacted.key_version, expected, "ws{i}");
    }
    // The pass ended rather than retrying the two forever: Retire runs its own
    // pass, which skips them too, and then counts them.
    let refused = admin
        .retire(RetireRequest { version: 1 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("still wraps 2 credential"),
        "{}",
        refused.message()
    );
}

/// A key change commits with its event, or not at all: with audit inserts
/// failing, Rotate adds no version and Retire destroys nothing, so a client
/// that retries after UNAVAILABLE does not rotate twice.
#[tokio::test]
async fn with_audit_writes_failing_rotate_and_retire_change_nothing() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut admin = admin(&dir, &vault).await;
    admin.rotate(RotateRequest {}).await.unwrap();
    let live_v1 = "SELECT count(*) FROM key_versions WHERE version = 1 \
                   AND state = 'active' AND length(wrapped_key) > 0";
    assert_eq!(dir.number(live_v1), 1);

    dir.fail_audit_writes();
    let err = admin.rotate(RotateRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = admin
        .retire(RetireRequest { version: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        dir.number("SELECT count(*) FROM key_versions"),
        2,
        "Rotate reported failure and added a version"
    );
    assert_eq!(
        dir.number(live_v1),
        1,
        "Retire reported failure and destroyed v1"
    );

    dir.restore_audit_writes();
    assert_eq!(status(&mut admin).await.primary_version, 2);
    let rotated = admin.rotate(RotateRequest {}).await.unwrap().into_inner();
    assert_eq!(rotated.primary_version, 3);
    admin.retire(RetireRequest { version: 1 }).await.unwrap();
    assert_eq!(dir.number(live_v1), 0);
    let events = dir
        .texts("SELECT event FROM audit_events WHERE event LIKE '%KeyAdmin.R%' ORDER BY sequence");
    let outcomes: Vec<(bool, &str)> = events
        .iter()
        .map(|e| {
            let outcome = if e.contains(r#""outcome":"OK""#) {
                "OK"
            } else {
                "other"
            };
            (e.contains("KeyAdmin.Rotate"), outcome)
        })
        .collect();
    assert_eq!(
        outcomes,
        [(true, "OK"), (true, "OK"), (false, "OK")],
        "one event per change, none for the failed calls (the log was down): {events:?}"
    );
}

/// `keys rotate-root` against a vault that is serving: refused, nothing
/// changed, and the vault goes on rotating and serving under the root key
/// it holds. (Before: the rotation went through, the vault then sealed a new
/// key version under the old root key, and neither key opened the database.)
#[tokio::test]
async fn rotate_root_refuses_while_a_vault_serves() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    c.store(amplitude("ws", SECRET, SECRET)).await.unwrap();
    let sealed = || {
        dir.texts(if common::on_sqlite() {
            "SELECT hex(wrapped_key) FROM key_versions UNION ALL \
             SELECT hex(wrapped_key) FROM key_material"
        } else {
            "SELECT encode(wrapped_key, 'hex') FROM key_versions UNION ALL \
             SELECT encode(wrapped_key, 'hex') FROM key_material"
        })
    };
    let before = sealed();

    let (out, _) = rotate_root_to(&dir, "new-root.key", "9f").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rotate-root ran under a live vault");
    assert!(
        stderr.contains("a vault is serving this database"),
        "{stderr}"
    );
    assert_eq!(sealed(), before, "rotate-root changed the keys");

    let mut admin = admin(&dir, &vault).await;
    admin.rotate(RotateRequest {}).await.unwrap();
    rewrap_finished(&mut admin).await;
    drop((c, admin));
    vault.stop().await;
    // The database still opens under the root key the vault held.
    let vault = dir.start().await;
    let redacted = vault
        .client()
        .await
        .redact(reference("ws", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(redacted.key_version, 2);
    // And a vault does not start while a rotate-root holds the database.
    let store = credvault::store::open(&dir.storage()).await.unwrap();
    vault.stop().await;
    // PostgreSQL lets go of a stopped vault's lock when it sees its session close.
    let mut alone = None;
    for _ in 0..50 {
        if let Ok(held) = store.hold(credvault::store::Hold::Alone).await {
            alone = Some(held);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        alone.is_some(),
        "the stopped vault still holds the database"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = credvault::run(dir.config(), listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs every vault stopped"), "{err}");
}

/// A vault that lost its hold on the database (its lock file removed, its
/// PostgreSQL lock session killed) does not stop `rotate-root`; it must
/// then seal nothing under the root key it still holds. (Before: its next
/// Rotate sealed a key version under the old root key, and neither root
/// key opened the database.)
#[tokio::test]
async fn a_vault_that_lost_its_hold_seals_nothing_under_a_stale_root_key() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    c.store(amplitude("ws", SECRET, SECRET)).await.unwrap();
    if common::on_sqlite() {
        std::fs::remove_file(format!("{}.lock", dir.db().display())).unwrap();
    } else {
        dir.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
             AND mode = 'ShareLock' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        );
    }
    let (out, new_root) = rotate_root_to(&dir, "new-root.key", "9f").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut admin = admin(&dir, &vault).await;
    let err = admin.rotate(RotateRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("resealed under another root key"),
        "{}",
        err.message()
    );
    drop((c, admin));
    vault.stop().await;
    let mut config = dir.config();
    config.keys.root_key_file = Some(new_root);
    let vault = dir.start_with(config).await;
    let redacted = vault
        .client()
        .await
        .redact(reference("ws", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(redacted.key_version, 1);
}

/// The rewrap job changes key state batch by batch, and each batch commits
/// with its own event: with audit inserts failing it moves nothing, and it
/// finishes once the log takes events again. (Before: it moved every data
/// key, and its one event after the pass was lost with a warning.)
#[tokio::test]
async fn with_audit_writes_failing_the_rewrap_moves_nothing() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    for i in 0..5 {
        c.store(amplitude(&format!("ws{i}"), SECRET, SECRET))
            .await
            .unwrap();
    }
    drop(c);
    vault.stop().await;
    // Rotated with no vault serving, so no rewrap job has run yet.
    {
        let config = dir.config();
        let store = credvault::store::open(&config.storage).await.unwrap();
        let root =
            credvault::crypto::RootKey::from_file(config.keys.root_key_file.as_ref().unwrap())
                .unwrap();
        let outbound = credvault::outbound::Outbound::new(&config.outbound).unwrap();
        let offline =
            credvault::domain::Vault::open(store, root, outbound, &config.providers, &config.keys)
                .await
                .unwrap();
        let admin = credvault::audit::Context {
            identity: "test".into(),
            method: "KeyAdmin.Rotate".into(),
            workspace_id: String::new(),
            provider: String::new(),
            request_id: "r".into(),
        };
        assert_eq!(offline.rotate(&admin).await.unwrap(), 2);
    }
    let on_v1 = "SELECT count(*) FROM credentials WHERE key_version = 1";
    dir.fail_audit_writes();
    let vault = dir.start().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        dir.number(on_v1),
        5,
        "the rewrap moved data keys without an event"
    );
    dir.restore_audit_writes();
    for _ in 0..100 {
        if dir.number(on_v1) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dir.number(on_v1), 0, "the rewrap never finished");
    assert!(
        dir.number("SELECT count(*) FROM audit_events WHERE event LIKE '%KeyAdmin.Rewrap%'") >= 1
    );
    vault.stop().await;
}

/// `rotate-root` pointed at a database that is not there (a typo in
/// storage.path) says so and creates nothing. (Before: it created an empty
/// database, "resealed 0 keys", and said the old root key opens nothing.)
#[tokio::test]
async fn rotate_root_on_a_missing_database_says_so() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    // SQLite on either test pass: a PostgreSQL URL names a database that
    // exists, or the connection fails.
    config.storage = credvault::config::StorageConfig {
        backend: credvault::config::Backend::Sqlite,
        path: dir.path().join("typo.db"),
        ..credvault::config::StorageConfig::default()
    };
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    let new_root = dir.path().join("new-root.key");
    common::write_private(&new_root, "9f".repeat(32).as_bytes());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
        .args(["keys", "rotate-root", "--config"])
        .arg(&path)
        .arg("--new-root-key")
        .arg(&new_root)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert!(!dir.path().join("typo.db").exists());
}
