//! Several vault replicas, each its own process, over one PostgreSQL database:
//! one audit chain, every write visible everywhere, rotation seen by all.
//! Runs when `CREDVAULT_TEST_POSTGRES` names a server (`.ci/run` sets it).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{reference, ServerProcess, VaultDir};
use credvault::dev::certs::Subject;
use credvault::proto::audit_client::AuditClient;
use credvault::proto::credentials_client::CredentialsClient;
use credvault::proto::key_admin_client::KeyAdminClient;
use credvault::proto::validation::Verdict;
use credvault::proto::{
    ListRequest, RetireRequest, RotateRequest, StatusRequest, StoreRequest, SubscribeRequest,
};
use credvault_testkit::fake::{FakeProvider, Reply};
use tonic::transport::Channel;

const PHX: &str = "phx_Rk3Vw9Qm2Lx8Tz5Nc1Bd7Yf4Gh6Js0";

/// Why every test here is ignored by a plain `cargo test`: scripts/test runs
/// them with `--include-ignored` in its PostgreSQL pass.
const NEEDS_POSTGRES: &str = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)";

/// A vault folder on PostgreSQL with its configuration written to a file.
fn shared_vault(fake: Option<&FakeProvider>) -> (VaultDir, PathBuf) {
    assert!(!common::on_sqlite(), "{NEEDS_POSTGRES}");
    let dir = VaultDir::new();
    // The harness gives the password in a 0600 file, as production would.
    let mut config = dir.config();
    if let Some(fake) = fake {
        config.providers.posthog.base_urls = [("us".to_owned(), fake.url())].into();
    }
    let path = dir.path().join("credvault.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    (dir, path)
}

/// A shared vault whose PostHog host is an HTTPS fake that accepts every key.
async fn shared_vault_with_fake(
    tweak: impl FnOnce(&mut credvault::config::Config),
) -> (VaultDir, PathBuf, FakeProvider) {
    let dir_ca = credvault::dev::certs::DevCa::generate("provider CA").unwrap();
    let fake = FakeProvider::start(&dir_ca, |_| {
        Reply::json(200, r#"{"id":42,"name":"shared"}"#)
    })
    .await;
    let (dir, config) = shared_vault(Some(&fake));
    // The fake's certificate comes from its own CA: trust it too.
    let mut loaded = credvault::config::Config::load(&config).unwrap();
    let ca = dir.path().join("provider-ca.pem");
    std::fs::write(&ca, dir_ca.cert_pem()).unwrap();
    loaded.outbound.extra_ca_file = Some(ca);
    tweak(&mut loaded);
    std::fs::write(&config, loaded.to_toml()).unwrap();
    (dir, config, fake)
}

async fn admin(dir: &VaultDir, replica: &ServerProcess) -> KeyAdminClient<Channel> {
    KeyAdminClient::new(channel(dir, replica, "spiffe://credvault.local/admin").await)
}

async fn channel(dir: &VaultDir, replica: &ServerProcess, identity: &str) -> Channel {
    let cert = dir
        .ca
        .issue("client", Subject::ClientUris(&[identity]))
        .unwrap();
    credvault::cli::client::connect_channel(
        &replica.url,
        dir.ca.cert_pem().as_bytes(),
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
    )
    .await
    .unwrap()
}

async fn app(dir: &VaultDir, replica: &ServerProcess) -> CredentialsClient<Channel> {
    CredentialsClient::new(channel(dir, replica, common::APP).await)
}

fn posthog(workspace: &str) -> StoreRequest {
    StoreRequest {
        workspace_id: workspace.to_owned(),
        provider: "posthog".into(),
        secrets: common::map(&[("personal_api_key", PHX)]),
        params: common::map(&[("project_id", "42")]),
        ..StoreRequest::default()
    }
}

fn audit_verify(config: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
        .args(["audit", "verify", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn two_replicas_share_every_connection() {
    let (dir, config) = shared_vault(None);
    let (a, b) = (
        common::spawn_server(&config).await,
        common::spawn_server(&config).await,
    );
    let stored = app(&dir, &a)
        .await
        .store(posthog("ws"))
        .await
        .unwrap()
        .into_inner();
    let seen = app(&dir, &b)
        .await
        .redact(reference("ws", "posthog"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.secrets, stored.secrets);
    app(&dir, &b)
        .await
        .zero(reference("ws", "posthog"))
        .await
        .unwrap();
    let after = app(&dir, &a)
        .await
        .redact(reference("ws", "posthog"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        after.secrets.is_empty(),
        "Zero on one replica is seen on the other"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn three_replicas_under_load_one_killed_lose_nothing_and_keep_one_chain() {
    let (dir, config) = shared_vault(None);
    // Started at once on an empty database: they race to migrate, to create
    // the keyring and the audit signing key, and must agree on all three.
    let (a, b, c) = tokio::join!(
        common::spawn_server(&config),
        common::spawn_server(&config),
        common::spawn_server(&config)
    );
    let mut replicas = vec![a, b, c];
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for (r, replica) in replicas.iter().enumerate() {
        for w in 0..4 {
            let mut c = app(&dir, replica).await;
            let acknowledged = Arc::clone(&acknowledged);
            writers.push(tokio::spawn(async move {
                // The killed replica's writers stop at their first failure.
                for i in 0..60 {
                    let ws = format!("r{r}-w{w}-{i}");
                    if c.store(posthog(&ws)).await.is_err() {
                        break;
                    }
                    acknowledged.lock().unwrap().push(ws);
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut victim = replicas.pop().unwrap();
    victim.process.start_kill().unwrap(); // SIGKILL
    victim.process.wait().await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.iter().any(|ws| ws.starts_with("r2-")),
        "the killed replica acknowledged writes before it died"
    );
    assert!(
        acknowledged.len() >= 2 * 4 * 60,
        "the survivors finished their load"
    );

    // Every acknowledged write is there, read through either survivor.
    for (i, ws) in acknowledged.iter().enumerate() {
        let mut c = app(&dir, &replicas[i % 2]).await;
        let listed = c
            .list(ListRequest {
                workspace_id: ws.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.credentials.len(), 1, "{ws} is missing");
    }

    // One chain: verify accepts it, and a subscriber on one replica reads
    // every replica's events in order with no gaps.
    let report = audit_verify(&config);
    assert!(report.contains("audit log intact"), "{report}");
    let mut auditor =
        AuditClient::new(channel(&dir, &replicas[0], "spiffe://credvault.local/auditor").await);
    let head = auditor
        .head(credvault::proto::HeadRequest {})
        .await
        .unwrap()
        .into_inner()
        .sequence;
    assert!(head >= acknowledged.len() as u64);
    let mut stream = auditor
        .subscribe(SubscribeRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    for expected in 1..=head {
        let event = stream.message().await.unwrap().unwrap();
        assert_eq!(event.sequence, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn a_rotation_on_one_replica_is_rewrapped_once_and_decrypts_everywhere() {
    let (dir, config, _fake) = shared_vault_with_fake(|_| {}).await;
    let (a, b) = (
        common::spawn_server(&config).await,
        common::spawn_server(&config).await,
    );
    let mut c = app(&dir, &a).await;
    for i in 0..120 {
        c.store(posthog(&format!("ws{i}"))).await.unwrap();
    }
    let mut admin = KeyAdminClient::new(channel(&dir, &b, "spiffe://credvault.local/admin").await);
    admin.rotate(RotateRequest {}).await.unwrap();
    let mut status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    for _ in 0..200 {
        if status.rewrap_done == status.rewrap_total && status.primary_version == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    }
    assert_eq!(status.primary_version, 2, "{status:?}");
    assert_eq!(status.rewrap_done, 120, "{status:?}");

    // Replica a never saw the Rotate call: within its keyring poll (1 s) it
    // has version 2 (its Status reports its own keyring), wraps new
    // credentials under it, and opens every credential.
    let mut admin_a =
        KeyAdminClient::new(channel(&dir, &a, "spiffe://credvault.local/admin").await);
    for _ in 0..100 {
        let seen = admin_a.status(StatusRequest {}).await.unwrap().into_inner();
        if seen.primary_version == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = c.store(posthog("after")).await.unwrap().into_inner();
    assert_eq!(fresh.key_version, 2, "replica a picked up the new primary");
    for replica in [&a, &b] {
        let mut c = app(&dir, replica).await;
        for i in (0..120).step_by(7) {
            let v = c
                .validate_connection(reference(&format!("ws{i}"), "posthog"))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(v.verdict, Verdict::Valid as i32, "{v:?}");
        }
    }
    let rewraps = dir.number(
        "SELECT count(*) FROM audit_events WHERE event LIKE '%\"method\":\"KeyAdmin.Rewrap\"%'",
    );
    assert_eq!(rewraps, 1, "exactly one replica ran the rewrap, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn a_replica_with_the_wrong_root_key_refuses_to_serve() {
    let (dir, config) = shared_vault(None);
    let first = common::spawn_server(&config).await;
    app(&dir, &first).await.store(posthog("ws")).await.unwrap();
    let wrong = dir.path().join("wrong-root.key");
    common::write_private(&wrong, "cd".repeat(32).as_bytes());
    let mut other = dir.config();
    other.keys.root_key_file = Some(wrong);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = credvault::run(other, listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("root key does not open"), "{err}");
}

/// PostgreSQL's Zero during a backup: a session holds a snapshot taken before
/// the Zero, so VACUUM must leave the old row versions (and their
/// ciphertext) for it. Zero answers UNAVAILABLE, not OK, until it lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn zero_is_not_ok_while_a_postgres_snapshot_can_read_the_rows() {
    assert!(!common::on_sqlite(), "{NEEDS_POSTGRES}");
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    c.store(common::amplitude("ws", PHX, PHX)).await.unwrap();

    let url = dir.postgres.as_ref().unwrap().url.clone();
    let (reader, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    reader
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM credential_secrets",
        )
        .await
        .unwrap();
    let err = c
        .zero(common::reference("ws", "amplitude"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("disconnected"), "{}", err.message());

    reader.batch_execute("ROLLBACK").await.unwrap();
    c.zero(common::reference("ws", "amplitude")).await.unwrap();
}

/// Rotate and retire through replica b while replica a, which learns of a
/// new primary only at its next keyring poll, acknowledges Stores: every
/// acknowledged Store decrypts. (Before: Stores a wrapped under a version b
/// had just retired were acknowledged and never decryptable again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn rotate_and_retire_on_one_replica_lose_no_store_acknowledged_by_another() {
    let (dir, config, _fake) = shared_vault_with_fake(|_| {}).await;
    let (a, b) = (
        common::spawn_server(&config).await,
        common::spawn_server(&config).await,
    );
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acknowledged, stop) = (Arc::clone(&acknowledged), Arc::clone(&stop));
        let mut c = app(&dir, &a).await;
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ws = format!("w{i}");
                i += 1;
                if c.store(posthog(&ws)).await.is_ok() {
                    acknowledged.lock().unwrap().push(ws);
                }
            }
        })
    };
    let mut admin_b = admin(&dir, &b).await;
    let mut retired = 0;
    for round in 0..5u32 {
        let rotated = admin_b.rotate(RotateRequest {}).await.unwrap().into_inner();
        let old = rotated.primary_version - 1;
        // Retire the old version as soon as b lets us: a still wraps under it.
        for _ in 0..400 {
            match admin_b.retire(RetireRequest { version: old }).await {
                Ok(_) => {
                    retired += 1;
                    break;
                }
                Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => panic!("round {round}: {e:?}"),
            }
        }
        // Replica a keeps storing, under a version it may not know retired.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    assert_eq!(retired, 5, "every old version was retired");
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() > 30, "{} Stores", acknowledged.len());
    let mut c = app(&dir, &a).await;
    let mut lost = Vec::new();
    for ws in &acknowledged {
        match c.validate_connection(reference(ws, "posthog")).await {
            Ok(v) if v.get_ref().verdict == Verdict::Valid as i32 => {}
            other => lost.push(format!("{ws}: {other:?}")),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged Stores do not decrypt: {:?}",
        lost.len(),
        acknowledged.len(),
        &lost[..lost.len().min(3)]
    );
}

/// The encryption cap counts every replica's Stores: 6 through each of two
/// replicas reach a cap of 10, and the vault rotates. (Before: each replica
/// counted its own 6, and no rotation came until 2 x 10.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn the_encryption_cap_counts_every_replica() {
    let (dir, config, _fake) = shared_vault_with_fake(|c| {
        c.keys.max_encryptions_per_version = 10;
    })
    .await;
    let (a, b) = (
        common::spawn_server(&config).await,
        common::spawn_server(&config).await,
    );
    for (r, replica) in [&a, &b].into_iter().enumerate() {
        let mut c = app(&dir, replica).await;
        for i in 0..6 {
            c.store(posthog(&format!("r{r}-{i}"))).await.unwrap();
        }
    }
    let mut admin_a = admin(&dir, &a).await;
    let mut primary = 0;
    for _ in 0..100 {
        primary = admin_a
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .primary_version;
        if primary >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(primary >= 2, "no rotation at 12 encryptions of a cap of 10");
}

/// Rotate through a replica right after another one rotated, before its
/// keyring poll: it rotates to the next version. (Before: it tried the
/// version the other replica had just made, and answered INTERNAL.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn a_replica_rotates_after_a_rotation_it_has_not_seen_yet() {
    let (dir, config) = shared_vault(None);
    let (a, b) = (
        common::spawn_server(&config).await,
        common::spawn_server(&config).await,
    );
    let mut admin_b = admin(&dir, &b).await;
    admin_b.status(StatusRequest {}).await.unwrap();
    let first = admin(&dir, &a)
        .await
        .rotate(RotateRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.primary_version, 2);
    let second = admin_b.rotate(RotateRequest {}).await.unwrap().into_inner();
    assert_eq!(second.primary_version, 3);
}
