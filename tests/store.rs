//! The store contract: one set of tests, written against the `Store` trait,
//! run on SQLite and on PostgreSQL. Each test is a module with two cases;
//! the PostgreSQL case is ignored by a plain `cargo test` and runs in the
//! PostgreSQL pass of scripts/test (`--include-ignored`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use credvault::audit::{verify_links, Event, StoredEvent, GENESIS};
use credvault::crypto::{NewKeyMaterial, Sealed, WrappedKeyVersion, FINGERPRINT_KEY_PURPOSE};
use credvault::store::{
    CredentialRecord, Noted, PostgresSettings, PostgresStore, RetireOutcome, Rewrapped,
    RootWitness, SecretRecord, SqliteStore, Store, StoreError, StoredStatus, VerdictRecord,
    WrappedDataKey,
};

/// One engine's store on a fresh database, with key version 1.
struct Fresh {
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
    _database: Option<common::TestDatabase>,
}

async fn sqlite() -> Fresh {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("contract.db");
    sqlite_at(path, dir).await
}

/// A SQLite store at `path`, which `dir` holds (and removes when dropped).
async fn sqlite_at(path: std::path::PathBuf, dir: tempfile::TempDir) -> Fresh {
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
        .await
        .unwrap()
        .unwrap();
    init(Fresh {
        store: Arc::new(store),
        _dir: dir,
        _database: None,
    })
    .await
}

async fn postgres() -> Fresh {
    let server = common::postgres_server().expect(
        "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does in its second pass)",
    );
    let database = common::TestDatabase::create(&server);
    let store = PostgresStore::connect(&PostgresSettings {
        url: database.url.clone(),
        password: None,
        pool_size: 8,
        ca_file: None,
    })
    .await
    .unwrap();
    init(Fresh {
        store: Arc::new(store),
        _dir: tempfile::tempdir().unwrap(),
        _database: Some(database),
    })
    .await
}

fn sealed(byte: u8) -> Sealed {
    Sealed {
        nonce: [byte; 12],
        ciphertext: vec![byte; 48],
    }
}

async fn init(fresh: Fresh) -> Fresh {
    fresh
        .store
        .init_keys(NewKeyMaterial {
            first_version: WrappedKeyVersion {
                version: 1,
                sealed: sealed(1),
            },
            fingerprint_key: sealed(0xf0),
        })
        .await
        .unwrap();
    fresh
}

/// Runs a contract test on both engines.
macro_rules! contract {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let fresh = super::sqlite().await;
                ($body)(Arc::clone(&fresh.store)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
            async fn postgres() {
                let fresh = super::postgres().await;
                ($body)(Arc::clone(&fresh.store)).await;
            }
        }
    };
}

fn event(method: &str, workspace: &str) -> Event {
    Event {
        sequence: 0,
        time_ms: 1,
        identity: "spiffe://credvault.local/contract".into(),
        method: method.into(),
        workspace_id: workspace.into(),
        provider: "posthog".into(),
        outcome: "OK".into(),
        verdict: String::new(),
        key_version: 1,
        secrets: BTreeMap::new(),
        request_id: format!("{method}-{workspace}"),
        proxy: None,
        count: None,
        expiry: None,
        verdict_change: None,
    }
}

fn record(workspace: &str, version: u32, fields: &[&str]) -> CredentialRecord {
    let now = SystemTime::now();
    CredentialRecord {
        workspace_id: workspace.into(),
        provider: "posthog".into(),
        params: [("region".to_owned(), "us".to_owned())].into(),
        status: StoredStatus::Connected,
        created_at: now,
        updated_at: now,
        disconnected_at: None,
        expires_at: None,
        data_key: Some(WrappedDataKey {
            key_version: version,
            sealed: sealed(version as u8 + 0x10),
        }),
        secrets: fields
            .iter()
            .map(|f| SecretRecord {
                field: (*f).into(),
                sealed: sealed(0x20),
                hint: "phx_…Js0".into(),
                fingerprint: format!("fp-{f}"),
            })
            .collect(),
        last_validation: None,
        binding: Some(vec![7; 32]),
    }
}

/// Adds key version `version` under the root key the store was created with.
async fn rotate_to(store: &dyn Store, version: u32) {
    store
        .add_key_version(
            WrappedKeyVersion {
                version,
                sealed: sealed(version as u8),
            },
            event("Rotate", ""),
            witness(),
        )
        .await
        .unwrap();
}

/// The fingerprint key as [`init`] stored it: what a rotation checks.
fn witness() -> RootWitness {
    RootWitness {
        purpose: FINGERPRINT_KEY_PURPOSE,
        sealed: sealed(0xf0),
    }
}

async fn whole_log(store: &dyn Store) -> Vec<StoredEvent> {
    store.audit_after(0, 100_000).await.unwrap()
}

fn assert_one_chain(events: &[StoredEvent]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.sequence, i as u64 + 1, "the chain has a gap or a fork");
    }
    verify_links(events, 0, &GENESIS).unwrap();
}

fn millis(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis()
}

contract!(
    a_put_is_stored_with_its_event,
    |store: Arc<dyn Store>| async move {
        let (row, stored, encryptions) = store
            .put(record("ws-1", 1, &["api_key"]), event("Store", "ws-1"))
            .await
            .unwrap();
        assert_eq!(row.secrets.len(), 1);
        assert_eq!(encryptions, 1);
        assert_eq!(stored.sequence, 1);
        assert_eq!(store.audit_head().await.unwrap().unwrap(), stored);
        let got = store.get("ws-1", "posthog").await.unwrap().unwrap();
        assert_eq!(got.secrets.len(), 1);
        assert_eq!(got.secrets[0].fingerprint, "fp-api_key");
        assert_eq!(got.params, row.params);
        assert_eq!(got.binding, Some(vec![7; 32]));
        assert!(store.get("ws-2", "posthog").await.unwrap().is_none());
    }
);

contract!(
    a_replace_keeps_created_at_and_drops_old_secrets,
    |store: Arc<dyn Store>| async move {
        let (first, _, _) = store
            .put(record("ws-1", 1, &["a", "b"]), event("Store", "ws-1"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (second, _, encryptions) = store
            .put(record("ws-1", 1, &["c"]), event("Store", "ws-1"))
            .await
            .unwrap();
        assert_eq!(encryptions, 2);
        assert_eq!(millis(second.created_at), millis(first.created_at));
        let got = store.get("ws-1", "posthog").await.unwrap().unwrap();
        let fields: Vec<_> = got.secrets.iter().map(|s| s.field.as_str()).collect();
        assert_eq!(fields, ["c"]);
        let listed = store.list("ws-1").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].secrets.len(), 1);
    }
);

contract!(a_zero_destroys_the_secrets_with_its_event, |store: Arc<
    dyn Store,
>| async move {
    store
        .put(record("ws-1", 1, &["api_key"]), event("Store", "ws-1"))
        .await
        .unwrap();
    let (row, stored, _) = store
        .zero("ws-1", "posthog", SystemTime::now(), event("Zero", "ws-1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, StoredStatus::Disconnected);
    assert!(row.data_key.is_none() && row.binding.is_none());
    assert_eq!(stored.sequence, 2);
    let got = store.get("ws-1", "posthog").await.unwrap().unwrap();
    assert!(got.secrets.is_empty());
    assert!(got.data_key.is_none());
    // No such connection: nothing written, no event.
    assert!(store
        .zero("ws-9", "posthog", SystemTime::now(), event("Zero", "ws-9"))
        .await
        .unwrap()
        .is_none());
    assert_eq!(whole_log(&*store).await.len(), 2);
});

contract!(
    concurrent_writers_extend_one_chain_and_count_every_encryption,
    |store: Arc<dyn Store>| async move {
        let mut tasks = Vec::new();
        for i in 0..64 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let ws = format!("ws-{i}");
                if i % 2 == 0 {
                    let (_, stored, encryptions) = store
                        .put(record(&ws, 1, &["api_key"]), event("Store", &ws))
                        .await
                        .unwrap();
                    (stored, Some(encryptions))
                } else {
                    (
                        store.append_audit(event("Redact", &ws)).await.unwrap(),
                        None,
                    )
                }
            }));
        }
        let mut answered = Vec::new();
        let mut counts = Vec::new();
        for t in tasks {
            let (stored, encryptions) = t.await.unwrap();
            answered.push(stored);
            counts.extend(encryptions);
        }
        let log = whole_log(&*store).await;
        assert_eq!(log.len(), 64);
        assert_one_chain(&log);
        // Every answer is the event as stored.
        for stored in &answered {
            assert_eq!(&log[stored.sequence as usize - 1], stored);
        }
        // Each Store got its own count: 1..=32, each once.
        counts.sort_unstable();
        assert_eq!(counts, (1..=32).collect::<Vec<u64>>());
        let versions = store.key_versions().await.unwrap();
        assert_eq!(versions[0].encryptions, 32);
        assert_eq!(versions[0].credentials, 32);
    }
);

contract!(a_write_under_a_retired_version_fails_alone, |store: Arc<
    dyn Store,
>| async move {
    rotate_to(&*store, 2).await;
    let (outcome, _) = store
        .retire_key_version(1, event("Retire", ""))
        .await
        .unwrap();
    assert!(matches!(outcome, RetireOutcome::Retired(_)));
    let before = whole_log(&*store).await.len();
    // Concurrent Stores, one under the retired version: on PostgreSQL
    // they share a batch, which must not fail the others.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let ws = format!("ws-{i}");
            let version = if i == 7 { 1 } else { 2 };
            store
                .put(record(&ws, version, &["api_key"]), event("Store", &ws))
                .await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Err(StoreError::VersionRetired(1)) if i == 7 => {}
            Ok(_) if i != 7 => {}
            other => panic!("write {i}: {other:?}"),
        }
    }
    assert!(store.get("ws-7", "posthog").await.unwrap().is_none());
    let log = whole_log(&*store).await;
    assert_eq!(log.len(), before + 15, "the refused write left an event");
    assert_one_chain(&log);
});

contract!(
    retire_refuses_the_newest_and_a_version_in_use,
    |store: Arc<dyn Store>| async move {
        store
            .put(record("ws-1", 1, &["api_key"]), event("Store", "ws-1"))
            .await
            .unwrap();
        let retire = |v| {
            let store = Arc::clone(&store);
            async move {
                store
                    .retire_key_version(v, event("Retire", ""))
                    .await
                    .unwrap()
                    .0
            }
        };
        assert_eq!(retire(1).await, RetireOutcome::Newest);
        assert_eq!(retire(9).await, RetireOutcome::Unknown);
        rotate_to(&*store, 2).await;
        assert_eq!(retire(1).await, RetireOutcome::InUse(1));
        // The same version again: another replica rotated first.
        let again = store
            .add_key_version(
                WrappedKeyVersion {
                    version: 2,
                    sealed: sealed(3),
                },
                event("Rotate", ""),
                witness(),
            )
            .await;
        assert!(
            matches!(again, Err(StoreError::VersionTaken(2))),
            "{again:?}"
        );
        // A witness that no longer holds: the root key changed.
        let stale = RootWitness {
            purpose: FINGERPRINT_KEY_PURPOSE,
            sealed: sealed(0xee),
        };
        let refused = store
            .add_key_version(
                WrappedKeyVersion {
                    version: 3,
                    sealed: sealed(3),
                },
                event("Rotate", ""),
                stale,
            )
            .await;
        assert!(
            matches!(refused, Err(StoreError::RootChanged)),
            "{refused:?}"
        );
    }
);

contract!(
    rewrap_applies_only_where_the_old_key_is_still_stored,
    |store: Arc<dyn Store>| async move {
        let (row, _, _) = store
            .put(record("ws-1", 1, &["api_key"]), event("Store", "ws-1"))
            .await
            .unwrap();
        rotate_to(&*store, 2).await;
        let stale = store.stale_data_keys(2, 10).await.unwrap();
        assert_eq!(stale.len(), 1);
        let old = row.data_key.unwrap();
        let new = WrappedDataKey {
            key_version: 2,
            sealed: sealed(0x42),
        };
        let outdated = Rewrapped {
            workspace_id: "ws-1".into(),
            provider: "posthog".into(),
            old: WrappedDataKey {
                key_version: 1,
                sealed: sealed(0x99),
            },
            new: new.clone(),
        };
        assert_eq!(
            store
                .rewrap(vec![outdated], event("Rewrap", ""))
                .await
                .unwrap(),
            0
        );
        let current = Rewrapped {
            workspace_id: "ws-1".into(),
            provider: "posthog".into(),
            old,
            new,
        };
        assert_eq!(
            store
                .rewrap(vec![current], event("Rewrap", ""))
                .await
                .unwrap(),
            1
        );
        assert!(store.stale_data_keys(2, 10).await.unwrap().is_empty());
        let got = store.get("ws-1", "posthog").await.unwrap().unwrap();
        assert_eq!(got.data_key.unwrap().key_version, 2);
        assert_one_chain(&whole_log(&*store).await);
    }
);

contract!(
    a_validation_verdict_never_labels_newer_secrets,
    |store: Arc<dyn Store>| async move {
        let (row, _, _) = store
            .put(record("ws-1", 1, &["api_key"]), event("Store", "ws-1"))
            .await
            .unwrap();
        let key = row.data_key.unwrap();
        let recorded = store
            .note_verdict("ws-1", "posthog", &key, None, verdict("valid"), None)
            .await
            .unwrap();
        assert!(matches!(recorded, Noted::Recorded(None)), "{recorded:?}");
        let mut replaced = record("ws-1", 1, &["api_key"]);
        replaced.data_key = Some(WrappedDataKey {
            key_version: 1,
            sealed: sealed(0x77),
        });
        store.put(replaced, event("Store", "ws-1")).await.unwrap();
        // The stored verdict is none again (a Store starts over): only the
        // data key tells the slow check's verdict from the new secrets.
        let stale = store
            .note_verdict("ws-1", "posthog", &key, None, verdict("valid"), None)
            .await
            .unwrap();
        assert!(matches!(stale, Noted::Stale), "{stale:?}");
    }
);

fn verdict(json: &str) -> VerdictRecord {
    VerdictRecord {
        json: json.into(),
        at: SystemTime::now(),
        settled: true,
    }
}

contract!(
    a_monitor_verdict_is_recorded_once_with_its_event,
    |store: Arc<dyn Store>| async move {
        let (row, _, _) = store
            .put(record("ws-1", 1, &["api_key"]), event("Store", "ws-1"))
            .await
            .unwrap();
        let key = row.data_key.unwrap();
        let head = whole_log(&*store).await.len();
        // Two replicas checked at once, both from "no verdict yet": the
        // first records and appends its event, the second neither.
        for first in [true, false] {
            let noted = store
                .note_verdict(
                    "ws-1",
                    "posthog",
                    &key,
                    None,
                    verdict("rejected"),
                    Some(event("Monitor.Verdict", "ws-1")),
                )
                .await
                .unwrap();
            if first {
                assert!(matches!(noted, Noted::Recorded(Some(_))), "{noted:?}");
            } else {
                assert!(matches!(noted, Noted::Stale), "{noted:?}");
            }
        }
        let log = whole_log(&*store).await;
        assert_eq!(log.len(), head + 1);
        assert_one_chain(&log);
        // From the verdict now stored, it records (no event given).
        let third = store
            .note_verdict(
                "ws-1",
                "posthog",
                &key,
                Some("rejected".into()),
                verdict("valid"),
                None,
            )
            .await
            .unwrap();
        assert!(matches!(third, Noted::Recorded(None)), "{third:?}");
        let stored = store.get("ws-1", "posthog").await.unwrap().unwrap();
        assert_eq!(stored.last_validation.as_deref(), Some("valid"));
    }
);

contract!(
    the_monitor_finds_connections_by_when_they_were_validated,
    |store: Arc<dyn Store>| async move {
        let hour = std::time::Duration::from_secs(3600);
        let now = SystemTime::now();
        for ws in [
            "ws-new",
            "ws-settled",
            "ws-unsettled",
            "ws-fresh",
            "ws-gone",
        ] {
            store
                .put(record(ws, 1, &["api_key"]), event("Store", ws))
                .await
                .unwrap();
        }
        let key = |ws: &'static str| {
            let store = Arc::clone(&store);
            async move {
                store
                    .get(ws, "posthog")
                    .await
                    .unwrap()
                    .unwrap()
                    .data_key
                    .unwrap()
            }
        };
        let at = |at: SystemTime, settled: bool| VerdictRecord {
            json: "v".into(),
            at,
            settled,
        };
        for (ws, when, settled) in [
            ("ws-settled", now - 30 * hour, true),
            ("ws-unsettled", now - 2 * hour, false),
            ("ws-fresh", now, true),
        ] {
            let k = key(ws).await;
            let recorded = store
                .note_verdict(ws, "posthog", &k, None, at(when, settled), None)
                .await
                .unwrap();
            assert!(matches!(recorded, Noted::Recorded(None)), "{recorded:?}");
        }
        store
            .zero("ws-gone", "posthog", now, event("Zero", "ws-gone"))
            .await
            .unwrap();
        let due = store
            .monitor_due(now - 20 * hour, now - hour, now + hour)
            .await
            .unwrap();
        let names: Vec<_> = due.iter().map(|w| w.workspace_id.as_str()).collect();
        assert_eq!(names, ["ws-new", "ws-settled", "ws-unsettled"]);
        assert_eq!(due[0].validated_at, None);
        assert_eq!(due[1].settled, Some(true));
        assert_eq!(due[2].settled, Some(false));
        assert_eq!(due[2].last_validation.as_deref(), Some("v"));
        // Stored again: the schedule starts over from the new secrets.
        store
            .put(
                record("ws-settled", 1, &["api_key"]),
                event("Store", "ws-settled"),
            )
            .await
            .unwrap();
        let due = store
            .monitor_due(now - 20 * hour, now - hour, now - hour)
            .await
            .unwrap();
        let names: Vec<_> = due.iter().map(|w| w.workspace_id.as_str()).collect();
        assert_eq!(names, ["ws-unsettled"]);
    }
);

contract!(
    checkpoints_and_the_database_identity_read_back,
    |store: Arc<dyn Store>| async move {
        let stored = store.append_audit(event("Redact", "ws-1")).await.unwrap();
        let id = store.database_id().await.unwrap().unwrap();
        assert_eq!(id.len(), 16);
        let checkpoint = credvault::audit::Checkpoint {
            sequence: stored.sequence,
            hash: stored.hash.to_vec(),
            signature: vec![5; 64],
            key_id: "k".into(),
            database_id: id.clone(),
            signed_at_ms: Some(42),
        };
        store.add_checkpoint(checkpoint.clone()).await.unwrap();
        // Written again (a restart signing the same head): replaced, not doubled.
        store.add_checkpoint(checkpoint.clone()).await.unwrap();
        assert_eq!(store.checkpoints().await.unwrap(), vec![checkpoint]);
    }
);

/// Another session on a fresh PostgreSQL store's database, as `psql` would be.
async fn session(fresh: &Fresh) -> tokio_postgres::Client {
    connect_to(&fresh._database.as_ref().expect("a PostgreSQL store").url).await
}

async fn connect_to(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// A write while another session holds the database fails as busy, within
/// the engine's wait (5 s), instead of hanging.
async fn assert_busy(store: &dyn Store) {
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        store.append_audit(event("Redact", "ws-1")),
    )
    .await
    .expect("a blocked write waited without end");
    assert!(matches!(result, Err(StoreError::Busy(_))), "{result:?}");
}

/// A write blocked by another session's lock fails as busy after the
/// engine's wait (5 s on both), instead of hanging: on SQLite another
/// connection's exclusive transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_blocked_by_another_session_is_busy_on_sqlite() {
    let fresh = sqlite().await;
    let path = fresh._dir.path().join("contract.db");
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    assert_busy(&*fresh.store).await;
    holder.execute_batch("ROLLBACK").unwrap();
    fresh
        .store
        .append_audit(event("Redact", "ws-1"))
        .await
        .unwrap();
}

/// On PostgreSQL, a session holding the chain head's table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn a_write_blocked_by_another_session_is_busy_on_postgres() {
    let fresh = postgres().await;
    let holder = session(&fresh).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE audit_head IN EXCLUSIVE MODE")
        .await
        .unwrap();
    assert_busy(&*fresh.store).await;
    holder.batch_execute("ROLLBACK").await.unwrap();
    fresh
        .store
        .append_audit(event("Redact", "ws-1"))
        .await
        .unwrap();
}

/// On a full disk every write path reports `Full` (RESOURCE_EXHAUSTED to a
/// caller), never an engine error: Retire, Rewrap, key material,
/// checkpoints and root resealing included. SQLite on a 1 MiB tmpfs, so
/// root only; scripts/test runs it as root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "mounts a tmpfs: needs root (scripts/test runs it as root)"]
async fn disk_full_is_reported_as_full_on_every_write_path_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    let _tmpfs = common::SmallTmpfs::mount(small.clone());
    let fresh = sqlite_at(small.join("contract.db"), tempfile::tempdir().unwrap()).await;
    let store = Arc::clone(&fresh.store);
    rotate_to(&*store, 2).await;
    let (first, _, _) = store
        .put(
            record("ws-first", 2, &["api_key"]),
            event("Store", "ws-first"),
        )
        .await
        .unwrap();
    let mut full = false;
    for i in 0..100_000 {
        let ws = format!("ws-{i}-{}", "x".repeat(200));
        match store
            .put(record(&ws, 2, &["a", "b"]), event("Store", &ws))
            .await
        {
            Ok(_) => {}
            Err(StoreError::Full) => {
                eprintln!("full after {i} Stores");
                full = true;
                break;
            }
            Err(other) => panic!("a Store on a full disk: {other:?}"),
        }
    }
    assert!(full, "a 1 MiB filesystem fills up");
    let old = first.data_key.unwrap();
    let rewrapped = Rewrapped {
        workspace_id: "ws-first".into(),
        provider: "posthog".into(),
        new: WrappedDataKey {
            key_version: 2,
            sealed: sealed(0x55),
        },
        old,
    };
    let reseal: credvault::store::Reseal = Box::new(Ok);
    let checkpoint = credvault::audit::Checkpoint {
        sequence: 1,
        hash: vec![0; 32],
        signature: vec![0; 64],
        key_id: "k".into(),
        database_id: Vec::new(),
        signed_at_ms: Some(1),
    };
    let results: Vec<(&str, Result<(), StoreError>)> = vec![
        (
            "append",
            store.append_audit(event("Redact", "ws")).await.map(drop),
        ),
        (
            "retire",
            store
                .retire_key_version(1, event("Retire", ""))
                .await
                .map(drop),
        ),
        (
            "rewrap",
            store
                .rewrap(vec![rewrapped], event("Rewrap", ""))
                .await
                .map(drop),
        ),
        (
            "key material",
            store.put_key_material("another", sealed(9)).await,
        ),
        ("checkpoint", store.add_checkpoint(checkpoint).await),
        (
            "reseal",
            store
                .reseal_root(reseal, event("RotateRoot", ""))
                .await
                .map(drop),
        ),
    ];
    let mut failed = 0;
    for (name, result) in results {
        eprintln!("{name}: {result:?}");
        match result {
            Ok(()) => {}
            Err(StoreError::Full) => failed += 1,
            Err(other) => panic!("{name} on a full disk: {other:?}"),
        }
    }
    assert!(failed > 0, "no write failed on a full disk");
}

/// A database that cannot be reached is named (never with a password),
/// with what to check.
#[tokio::test]
async fn an_unreachable_postgres_is_named_with_what_to_check() {
    let refused = PostgresStore::connect(&PostgresSettings {
        url: "postgres://vault@127.0.0.1:1/credvault?sslmode=disable".into(),
        password: Some(zeroize::Zeroizing::new("do-not-print-me".into())),
        pool_size: 2,
        ca_file: None,
    })
    .await
    .unwrap_err()
    .to_string();
    eprintln!("{refused}");
    assert!(refused.contains("vault@127.0.0.1:1/credvault"), "{refused}");
    assert!(refused.contains("is PostgreSQL running"), "{refused}");
    assert!(!refused.contains("do-not-print-me"), "{refused}");
}

/// A wrong password and a missing database say which, and what to fix.
#[tokio::test]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn a_wrong_password_and_a_missing_database_say_which() {
    let server = common::postgres_server().expect("needs PostgreSQL");
    let mut url = url::Url::parse(&server).unwrap();
    url.set_password(Some("not-the-password")).unwrap();
    let wrong = PostgresStore::connect(&PostgresSettings {
        url: url.to_string(),
        password: None,
        pool_size: 2,
        ca_file: None,
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(wrong.contains("storage.password_file"), "{wrong}");
    assert!(!wrong.contains("not-the-password"), "{wrong}");
    let mut missing = url::Url::parse(&server).unwrap();
    missing.set_path("credvault_no_such_database");
    let missing = PostgresStore::connect(&PostgresSettings {
        url: missing.to_string(),
        password: None,
        pool_size: 2,
        ca_file: None,
    })
    .await
    .unwrap_err()
    .to_string();
    eprintln!("{wrong}\n{missing}");
    assert!(missing.contains("create the database"), "{missing}");
}

/// `sslmode` means what it means to libpq users, against the local cluster's
/// TLS (Debian's self-signed "snakeoil" certificate for `localhost`, which
/// scripts/test's cluster serves): `require` encrypts without checking,
/// `verify-ca` checks the CA, `verify-full` (also the default) the CA and the
/// host name.
#[tokio::test]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn postgres_sslmode_means_what_it_means_in_libpq() {
    const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    assert!(
        std::path::Path::new(SNAKEOIL).exists(),
        "needs the Debian cluster's TLS certificate {SNAKEOIL} (scripts/test's local cluster)"
    );
    let server = common::postgres_server().expect("needs PostgreSQL");
    let database = common::TestDatabase::create(&server);
    let with = |mode: Option<&str>, host: &str| {
        let mut url = url::Url::parse(&database.url).unwrap();
        url.set_host(Some(host)).unwrap();
        let rest: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| k != "sslmode")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        url.set_query(None);
        url.query_pairs_mut().extend_pairs(rest);
        if let Some(mode) = mode {
            url.query_pairs_mut().append_pair("sslmode", mode);
        }
        url.to_string()
    };
    let connect = |url: String, ca: bool| async move {
        PostgresStore::connect(&PostgresSettings {
            url,
            password: None,
            pool_size: 2,
            ca_file: ca.then(|| SNAKEOIL.into()),
        })
        .await
    };
    // require: encrypted, the self-signed certificate accepted, as in libpq.
    let store = connect(with(Some("require"), "127.0.0.1"), false)
        .await
        .unwrap();
    let admin = connect_to(&server).await;
    let name = url::Url::parse(&database.url).unwrap().path()[1..].to_owned();
    let encrypted: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = $1 AND s.ssl",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted > 0, "sslmode=require did not use TLS");
    drop(store);
    // No sslmode: verify-full. The snakeoil certificate is refused, as not
    // trusted or (where the system roots hold it) not naming 127.0.0.1.
    let err = connect(with(None, "127.0.0.1"), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("storage.ca_file") || err.contains("verify-ca"),
        "{err}"
    );
    // verify-full with its CA, but by an address the certificate does not name.
    let err = connect(with(Some("verify-full"), "127.0.0.1"), true)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("verify-ca"), "{err}");
    // verify-ca checks the CA only; verify-full by the name it holds.
    connect(with(Some("verify-ca"), "127.0.0.1"), true)
        .await
        .unwrap();
    connect(with(Some("verify-full"), "localhost"), true)
        .await
        .unwrap();
}

/// Two replicas storing the same connections in opposite orders, beside a
/// tenant storing its own: no write fails (no deadlock between the
/// replicas' batches, and a write that was rolled back with a batch is
/// retried alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn replicas_storing_the_same_connections_never_fail_each_other() {
    let first = postgres().await;
    let url = first._database.as_ref().unwrap().url.clone();
    let second: Arc<dyn Store> = Arc::new(
        PostgresStore::connect(&PostgresSettings {
            url,
            password: None,
            pool_size: 8,
            ca_file: None,
        })
        .await
        .unwrap(),
    );
    let replicas = [Arc::clone(&first.store), second];
    let mut tasks = Vec::new();
    for task in 0..16usize {
        let store = Arc::clone(&replicas[task % 2]);
        tasks.push(tokio::spawn(async move {
            for i in 0..60usize {
                // Attackers cycle through four shared connections, the two
                // replicas' tasks in opposite directions; victims store their own.
                let ws = if task % 4 == 3 {
                    format!("victim-{task}-{i}")
                } else if task % 2 == 0 {
                    format!("shared-{}", (i + task) % 4)
                } else {
                    format!("shared-{}", 3 - (i + task) % 4)
                };
                store
                    .put(record(&ws, 1, &["api_key"]), event("Store", &ws))
                    .await
                    .unwrap_or_else(|e| panic!("store {ws}: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_one_chain(&whole_log(&*first.store).await);
}

/// A connection's row held by another session (a forgotten `psql`
/// transaction) delays only the Stores of that connection, however many
/// callers keep storing it: the replica's other writes and reads' events
/// commit meanwhile, and the blocked one fails as busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn a_locked_connection_does_not_hold_up_the_others() {
    let fresh = postgres().await;
    let store = Arc::clone(&fresh.store);
    store
        .put(record("locked", 1, &["api_key"]), event("Store", "locked"))
        .await
        .unwrap();
    let holder = session(&fresh).await;
    holder
        .batch_execute("BEGIN; SELECT * FROM credentials WHERE workspace_id = 'locked' FOR UPDATE")
        .await
        .unwrap();
    let blocked = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            store
                .put(record("locked", 1, &["api_key"]), event("Store", "locked"))
                .await
        })
    };
    // Two more callers keep storing the locked connection meanwhile.
    for _ in 0..2 {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            for _ in 0..3 {
                let _ = store
                    .put(record("locked", 1, &["api_key"]), event("Store", "locked"))
                    .await;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let mut others = Vec::new();
    for i in 0..20 {
        let store = Arc::clone(&store);
        others.push(tokio::spawn(async move {
            let ws = format!("free-{i}");
            store
                .put(record(&ws, 1, &["api_key"]), event("Store", &ws))
                .await
                .unwrap_or_else(|e| panic!("{ws}: {e}"));
            // A read's audit event, too.
            store
                .append_audit(event("Redact", &ws))
                .await
                .unwrap_or_else(|e| panic!("{ws}: {e}"));
        }));
    }
    for t in others {
        t.await.unwrap();
    }
    // Well inside the 5 s the blocked Store waits for its lock.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the other Stores waited {:?} behind the locked one",
        started.elapsed()
    );
    let result = blocked.await.unwrap();
    assert!(matches!(result, Err(StoreError::Busy(_))), "{result:?}");
    holder.batch_execute("ROLLBACK").await.unwrap();
}

/// A write the database refuses only at COMMIT (a deferred constraint) fails
/// alone: the server's refusal means the batch was rolled back, so its
/// other writes are retried and commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set CREDVAULT_TEST_POSTGRES (scripts/test does)"]
async fn a_write_refused_at_commit_fails_alone() {
    let fresh = postgres().await;
    let admin = session(&fresh).await;
    admin
        .batch_execute(
            "CREATE FUNCTION refuse_late() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.workspace_id LIKE 'late%' THEN RAISE EXCEPTION 'late row refused'; \
             END IF; RETURN NEW; END $$; \
             CREATE CONSTRAINT TRIGGER late AFTER INSERT ON credentials \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_late();",
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..24 {
        let store = Arc::clone(&fresh.store);
        tasks.push(tokio::spawn(async move {
            let ws = if i % 8 == 0 {
                format!("late-{i}")
            } else {
                format!("on-time-{i}")
            };
            let result = store
                .put(record(&ws, 1, &["api_key"]), event("Store", &ws))
                .await;
            (ws, result)
        }));
    }
    for t in tasks {
        let (ws, result) = t.await.unwrap();
        match result {
            Ok(_) if ws.starts_with("on-time") => {}
            Err(StoreError::Commit(text)) if ws.starts_with("late") => {
                assert!(text.contains("late row refused"), "{text}");
            }
            other => panic!("{ws}: {other:?}"),
        }
    }
    let log = whole_log(&*fresh.store).await;
    assert_eq!(log.len(), 21);
    assert_one_chain(&log);
}
