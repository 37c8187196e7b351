//! Attacks on the promise that only the vault can decrypt a provider key, each
//! tried the way an attacker would: through the gRPC API, or by writing to the
//! database behind the vault's back. RELIABILITY.md ("Attacks tried") lists
//! them with their figures. SQLite only: they hold SQLite's locks and read its
//! files (the params edits hold on PostgreSQL by the same code path).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::{Duration, Instant};

use common::{amplitude, contains_bytes, map, reference, TestVault, VaultDir};
use credvault::dev::fake::{FakeProvider, Reply};
use credvault::proto::{ProxyRequest, StoreRequest};
use tonic::Code;

const API_KEY: &str = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6";
const SECRET: &str = "Vq8rKw2Lx7Mz4Nc9Pb3Td6Yf1Gh5Js0U";
const PHX: &str = "phx_Rk3Vw9Qm2Lx8Tz5Nc1Bd7Yf4Gh6Js0";

/// A vault whose three providers all point at one fake, with one connection each.
struct World {
    dir: VaultDir,
    vault: TestVault,
    fake: FakeProvider,
}

async fn world() -> World {
    let dir = VaultDir::new();
    let fake = FakeProvider::start(&dir.ca, |_| Reply::json(200, r#"{"data":[]}"#)).await;
    let mut config = dir.config();
    for (provider, key) in [
        (&mut config.providers.amplitude, "us"),
        (&mut config.providers.posthog, "us"),
        (&mut config.providers.amperity, "app"),
    ] {
        provider.base_urls = [(key.to_owned(), fake.url())].into();
    }
    let vault = dir.start_with(config).await;
    let world = World { dir, vault, fake };
    let mut c = world.vault.client().await;
    c.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    c.store(StoreRequest {
        workspace_id: "ws".into(),
        provider: "posthog".into(),
        secrets: map(&[("personal_api_key", PHX)]),
        params: map(&[("project_id", "42")]),
        ..StoreRequest::default()
    })
    .await
    .unwrap();
    c.store(amperity("acme", &common::jwt(r#"{"sub":"svc"}"#)))
        .await
        .unwrap();
    world
}

fn amperity(tenant: &str, token: &str) -> StoreRequest {
    StoreRequest {
        workspace_id: "ws".into(),
        provider: "amperity".into(),
        secrets: map(&[("access_token", token)]),
        params: map(&[("tenant_id", tenant)]),
        ..StoreRequest::default()
    }
}

fn proxy_request(provider: &str, path: &str) -> ProxyRequest {
    ProxyRequest {
        workspace_id: "ws".into(),
        provider: provider.into(),
        method: "GET".into(),
        path: path.into(),
        ..ProxyRequest::default()
    }
}

fn audit_events(dir: &VaultDir) -> i64 {
    dir.number("SELECT count(*) FROM audit_events")
}

/// A database writer edits the params that steer an outbound call: the host
/// a tenant id becomes, the tenant a token is sent for, the project and
/// region, the validation call. Every edit is DATA_LOSS on Validate and
/// Proxy, and no request reaches any host.
#[tokio::test]
async fn edited_params_send_nothing_anywhere() {
    let w = world().await;
    let edits = [
        (
            "amperity",
            r#"{"host":"tenant","tenant_id":"evil.example/"}"#,
            "/api/segments",
        ),
        (
            "amperity",
            r#"{"host":"app","tenant_id":"other-tenant"}"#,
            "/api/segments",
        ),
        (
            "amperity",
            r#"{"host":"apse2","tenant_id":"acme"}"#,
            "/api/segments",
        ),
        (
            "posthog",
            r#"{"project_id":"43","region":"us"}"#,
            "/api/projects/43/cohorts/",
        ),
        (
            "posthog",
            r#"{"project_id":"1/../../x","region":"us"}"#,
            "/api/projects/42/cohorts/",
        ),
        (
            "amplitude",
            r#"{"region":"eu","validation":"cohorts"}"#,
            "/api/3/cohorts",
        ),
        (
            "amplitude",
            r#"{"region":"us","validation":"taxonomy"}"#,
            "/api/3/cohorts",
        ),
        ("amplitude", r#"{"region":"us"}"#, "/api/3/cohorts"),
    ];
    for (provider, params, path) in edits {
        let original = w.dir.texts(&format!(
            "SELECT params FROM credentials WHERE provider = '{provider}'"
        ));
        w.dir.execute(
            "UPDATE credentials SET params = $1 WHERE provider = $2",
            &[params, provider],
        );
        let mut c = w.vault.client().await;
        let err = c
            .validate_connection(reference("ws", provider))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::DataLoss, "{provider} {params}: {err:?}");
        let err = c.proxy(proxy_request(provider, path)).await.unwrap_err();
        assert!(
            matches!(err.code(), Code::DataLoss | Code::PermissionDenied),
            "{provider} {params}: {err:?}"
        );
        assert_eq!(
            w.fake.request_count(),
            0,
            "{provider} {params} reached a host"
        );
        w.dir.execute(
            "UPDATE credentials SET params = $1 WHERE provider = $2",
            &[&original[0], provider],
        );
    }
    // Put back, every connection works again: nothing but the edit was refused.
    let mut c = w.vault.client().await;
    for provider in ["amplitude", "posthog", "amperity"] {
        c.validate_connection(reference("ws", provider))
            .await
            .unwrap();
    }
    assert_eq!(w.fake.request_count(), 3);
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
        audit_events(&dir),
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

/// Another process holds SQLite's write lock past the busy timeout (5 s),
/// then lets go. The Store fails, and a Store reported as failed changed
/// nothing: its statements must not run on their own, outside a transaction,
/// once the lock is free.
#[tokio::test]
async fn a_write_reported_as_failed_changed_nothing() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let before = audit_events(&dir);
    let (locked, is_locked) = std::sync::mpsc::channel();
    let db = dir.db();
    let holder = std::thread::spawn(move || {
        let db = rusqlite::Connection::open(db).unwrap();
        db.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(6_500));
        db.execute_batch("ROLLBACK").unwrap();
    });
    is_locked.recv().unwrap();
    let err = c.store(amplitude("ws", API_KEY, SECRET)).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    holder.join().unwrap();
    assert_eq!(
        dir.number("SELECT count(*) FROM credentials"),
        0,
        "the failed Store was committed anyway"
    );
    assert_eq!(dir.number("SELECT count(*) FROM credential_secrets"), 0);
    let err = c.redact(reference("ws", "amplitude")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(audit_events(&dir) > before, "the refusal is audited");
}

/// An Amperity token whose `exp` does not fit in time arithmetic panicked the
/// Store handler, and the call got no audit event.
#[tokio::test]
async fn an_exp_out_of_range_is_invalid_with_one_audit_event() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    for exp in ["9223372036854775808", "18446744073709551615", "1e300"] {
        let before = audit_events(&dir);
        let token = common::jwt(&format!(r#"{{"sub":"svc","exp":{exp}}}"#));
        let err = c.store(amperity("acme", &token)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{exp}: {err:?}");
        assert!(err.message().contains("exp"), "{}", err.message());
        assert_eq!(audit_events(&dir), before + 1, "{exp}");
    }
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
    let files: Vec<Vec<u8>> = ["", "-wal"]
        .iter()
        .map(|suffix| std::fs::read(format!("{}{suffix}", dir.db().display())).unwrap_or_default())
        .collect();
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
