//! Faults and hostile input: nothing acknowledged is lost, nothing leaks, nothing panics.
//! CI runs the short mode; `CREDVAULT_FAULT_CYCLES=1000 cargo test --release --test faults`
//! is the long mode (see RELIABILITY.md).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{amplitude, map, reference, VaultDir};
use credvault::audit::Durability;
use credvault::config::Config;
use credvault::dev::certs::{DevCa, Subject};
use credvault::domain::{CredentialRef, Vault, VaultError};
use credvault::proto::credentials_client::CredentialsClient;
use credvault::proto::validation::Verdict;
use credvault::proto::{ListProvidersRequest, StoreRequest};
use credvault_testkit::fake::{FakeProvider, Reply};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_credvault");
const SECRET: &str = "Xp4Lm9Qw2Zr7Vb5Nc8Td3Kf6Gh1Js0Yu";

/// A small, seedable generator for kill timings (the seed is printed, to replay a run).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A dev vault folder whose Amplitude host is `fake`.
fn prepare(dir: &Path, fake: &FakeProvider, fake_ca: &DevCa) -> PathBuf {
    let data = dir.join("vault");
    let prepared = credvault::dev::prepare(&data).unwrap();
    let mut config = Config::load(&prepared.config_path).unwrap();
    common::use_fake_amplitude(&mut config, dir, fake, fake_ca);
    std::fs::write(&prepared.config_path, config.to_toml()).unwrap();
    prepared.config_path
}

async fn app_client(config: &Path, url: &str) -> CredentialsClient<tonic::transport::Channel> {
    CredentialsClient::new(common::dev_channel(config, url, "app").await)
}

async fn open_vault(config: &Path) -> Result<Vault, VaultError> {
    let config = Config::load(config).unwrap();
    let store = Arc::new(
        credvault::store::SqliteStore::open(&config.storage.path).map_err(VaultError::from)?,
    );
    let root =
        credvault::crypto::RootKey::from_file(config.keys.root_key_file.as_ref().unwrap()).unwrap();
    let outbound = credvault::outbound::Outbound::new(&config.outbound).unwrap();
    Vault::open(store, root, outbound, &config.providers, &config.keys).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_store_load_loses_no_acknowledged_credential() {
    let lost_reads = kill_9_under_load(Durability::EveryCall, fault_cycles(50)).await;
    assert_eq!(
        lost_reads, 0,
        "every-call: an answered Redact's event was lost"
    );
}

/// Under `audit.durability = "changes"` a crash may lose the events of
/// Redacts answered in its last milliseconds, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_changes_durability_loses_no_change_and_the_chain_verifies() {
    kill_9_under_load(Durability::Changes, fault_cycles(25)).await;
}

fn fault_cycles(default: usize) -> usize {
    std::env::var("CREDVAULT_FAULT_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}

/// Kills a vault with `kill -9` during Stores, Redacts and validations,
/// `cycles` times. Checks that every acknowledged Store is there and
/// decrypts, that every answered validation's event is in the log, that the
/// database is whole and the chain verifies. Returns how many answered
/// Redacts have no event.
async fn kill_9_under_load(durability: Durability, cycles: usize) -> usize {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill -9 cycles: {cycles}, durability {durability:?}, seed {seed}");
    let mut rng = XorShift(seed);
    let tmp = tempfile::tempdir().unwrap();
    let fake_ca = DevCa::generate("provider CA").unwrap();
    let fake = FakeProvider::start(&fake_ca, |_| Reply::json(200, r#"{"data":[]}"#)).await;
    let config = prepare(tmp.path(), &fake, &fake_ca);
    let mut loaded = Config::load(&config).unwrap();
    loaded.audit.durability = durability;
    std::fs::write(&config, loaded.to_toml()).unwrap();
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    // Request ids of answered Redacts and validations.
    let redacted = Arc::new(Mutex::new(Vec::<String>::new()));
    let validated = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut attempted = 0usize;
    for cycle in 0..cycles {
        let mut child = common::spawn_server(&config).await;
        let mut writers = Vec::new();
        for w in 0..8 {
            let mut c = app_client(&config, &child.url).await;
            let acknowledged = Arc::clone(&acknowledged);
            writers.push(tokio::spawn(async move {
                let mut n = 0;
                for i in 0.. {
                    let ws = format!("c{cycle}-w{w}-{i}");
                    n += 1;
                    if c.store(amplitude(&ws, SECRET, SECRET)).await.is_err() {
                        break;
                    }
                    acknowledged.lock().unwrap().push(ws);
                }
                n
            }));
        }
        let mut readers = Vec::new();
        for r in 0..4 {
            let mut c = app_client(&config, &child.url).await;
            let (redacted, validated) = (Arc::clone(&redacted), Arc::clone(&validated));
            let ws = format!("c{cycle}-reader");
            readers.push(tokio::spawn(async move {
                if c.store(amplitude(&ws, SECRET, SECRET)).await.is_err() {
                    return;
                }
                for i in 0.. {
                    let id = format!("c{cycle}-r{r}-{i}");
                    let mut req = tonic::Request::new(reference(&ws, "amplitude"));
                    req.metadata_mut()
                        .insert("x-request-id", id.parse().unwrap());
                    // One call in eight needs its event durable first.
                    let (answered, into) = if i % 8 == 0 {
                        (c.validate_connection(req).await.map(drop), &validated)
                    } else {
                        (c.redact(req).await.map(drop), &redacted)
                    };
                    if answered.is_err() {
                        break;
                    }
                    into.lock().unwrap().push(id);
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(20 + rng.next() % 130)).await;
        child.process.start_kill().unwrap();
        child.process.wait().await.unwrap();
        for w in writers {
            attempted += w.await.unwrap();
        }
        for r in readers {
            r.await.unwrap();
        }
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    eprintln!(
        "{} Stores attempted, {} acknowledged before a kill -9",
        attempted,
        acknowledged.len()
    );
    assert!(
        acknowledged.len() > cycles,
        "the load did store something each cycle"
    );

    // Every acknowledged credential is there and decrypts to what was stored.
    let vault = open_vault(&config).await.unwrap();
    for ws in &acknowledged {
        let plain = vault
            .decrypt(&CredentialRef::parse(ws, "amplitude").unwrap())
            .await
            .unwrap();
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&plain.secrets["secret_key"]),
            SECRET
        );
    }
    drop(vault);
    let db_path = Config::load(&config).unwrap().storage.path;

    // Every answered validation has its event; count the Redacts that lost theirs.
    let log = credvault::store::read_audit_log(&db_path).unwrap();
    let logged: std::collections::HashSet<(String, String)> = log
        .events
        .iter()
        .map(|e| {
            let e = e.event().unwrap();
            (e.method, e.request_id)
        })
        .collect();
    let validated = validated.lock().unwrap().clone();
    assert!(!validated.is_empty(), "the load validated something");
    for id in &validated {
        assert!(
            logged.contains(&("Credentials.ValidateConnection".to_owned(), id.clone())),
            "validation {id} was answered, and its event is lost"
        );
    }
    let redacted = redacted.lock().unwrap().clone();
    let lost_reads = redacted
        .iter()
        .filter(|id| !logged.contains(&("Credentials.Redact".to_owned(), (*id).clone())))
        .count();
    eprintln!(
        "{} Redacts and {} validations answered; {lost_reads} Redacts' events lost",
        redacted.len(),
        validated.len()
    );

    let db = rusqlite::Connection::open(&db_path).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let torn: i64 = db
        .query_row(
            "SELECT count(*) FROM credentials c WHERE c.status = 'connected' AND \
             (SELECT count(*) FROM credential_secrets s \
              WHERE s.workspace_id = c.workspace_id AND s.provider = c.provider) != 2",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(torn, 0, "no torn rows");
    // And through the server, against the fake provider.
    let child = common::spawn_server(&config).await;
    let mut c = app_client(&config, &child.url).await;
    for ws in acknowledged
        .iter()
        .step_by((acknowledged.len() / 20).max(1))
    {
        let v = c
            .validate_connection(reference(ws, "amplitude"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.verdict, Verdict::Valid as i32);
    }
    let verify = std::process::Command::new(BIN)
        .args(["audit", "verify", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    lost_reads
}

/// Stores three credentials and copies the database and its WAL while the vault holds them open.
async fn snapshot_with_wal(dir: &VaultDir) -> (PathBuf, HashMap<String, String>) {
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let mut stored = HashMap::new();
    for i in 0..3 {
        let secret = format!("{SECRET}{i}");
        c.store(amplitude(&format!("ws{i}"), SECRET, &secret))
            .await
            .unwrap();
        stored.insert(format!("ws{i}"), secret);
    }
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for suffix in ["", "-wal"] {
        let from = format!("{}{suffix}", dir.db().display());
        std::fs::copy(&from, copy.join(format!("vault.db{suffix}"))).unwrap();
    }
    drop(c);
    vault.stop().await;
    (copy.join("vault.db"), stored)
}

/// Opens a (damaged) copy; every credential must decrypt to what was stored, or fail.
async fn assert_never_wrong_plaintext(
    dir: &VaultDir,
    db: &Path,
    stored: &HashMap<String, String>,
) -> (usize, usize) {
    let store = match credvault::store::SqliteStore::open(db) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("refused to open: {e}");
            return (0, stored.len());
        }
    };
    let root = credvault::crypto::RootKey::from_file(&dir.path().join("root.key")).unwrap();
    let outbound = credvault::outbound::Outbound::new(&dir.config().outbound).unwrap();
    let vault = match Vault::open(
        store,
        root,
        outbound,
        &dir.config().providers,
        &dir.config().keys,
    )
    .await
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("refused to start: {e}");
            return (0, stored.len());
        }
    };
    let (mut ok, mut refused) = (0, 0);
    for (ws, secret) in stored {
        match vault
            .decrypt(&CredentialRef::parse(ws, "amplitude").unwrap())
            .await
        {
            Ok(plain) => {
                assert_eq!(
                    secrecy::ExposeSecret::expose_secret(&plain.secrets["secret_key"]),
                    secret.as_str()
                );
                ok += 1;
            }
            Err(_) => refused += 1,
        }
    }
    (ok, refused)
}

#[tokio::test]
async fn truncated_or_garbled_wal_opens_consistently() {
    for damage in ["truncate-half", "truncate-header", "flip-bytes"] {
        let dir = VaultDir::new();
        let (db, stored) = snapshot_with_wal(&dir).await;
        let wal = PathBuf::from(format!("{}-wal", db.display()));
        let mut bytes = std::fs::read(&wal).unwrap();
        assert!(bytes.len() > 4096, "the WAL holds the writes");
        match damage {
            "truncate-half" => bytes.truncate(bytes.len() / 2),
            "truncate-header" => bytes.truncate(20),
            _ => {
                for i in (100..bytes.len()).step_by(997) {
                    bytes[i] ^= 0x5a;
                }
            }
        }
        std::fs::write(&wal, bytes).unwrap();
        let (ok, refused) = assert_never_wrong_plaintext(&dir, &db, &stored).await;
        eprintln!("{damage}: {ok} decrypted correctly, {refused} refused, 0 wrong");
    }
}

#[tokio::test]
async fn corrupted_database_page_never_gives_wrong_plaintext() {
    let dir = VaultDir::new();
    let (db, stored) = snapshot_with_wal(&dir).await;
    // Fold the WAL in so the credentials live in the main file, then damage pages.
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    let pristine = std::fs::read(&db).unwrap();
    let pages = pristine.len() / 4096;
    let mut outcomes = Vec::new();
    for page in 1..pages {
        let mut bytes = pristine.clone();
        for b in &mut bytes[page * 4096 + 8..(page + 1) * 4096 - 8] {
            *b ^= 0xff;
        }
        std::fs::write(&db, &bytes).unwrap();
        let _ = std::fs::remove_file(format!("{}-wal", db.display()));
        let _ = std::fs::remove_file(format!("{}-shm", db.display()));
        outcomes.push(assert_never_wrong_plaintext(&dir, &db, &stored).await);
    }
    eprintln!(
        "damaged each of {} pages in turn: (decrypted, refused) = {outcomes:?}",
        pages - 1
    );
    assert!(
        outcomes.iter().any(|(_, refused)| *refused > 0),
        "some damage was detected"
    );
}

/// `check-config` finds a damaged page the vault would only meet when it
/// reads it: through the store's own integrity check.
#[tokio::test]
async fn check_config_finds_a_damaged_page() {
    let dir = VaultDir::new();
    let (db, _) = snapshot_with_wal(&dir).await;
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    let mut config = dir.config();
    config.storage.path = db.clone();
    let file = dir.path().join("check.toml");
    std::fs::write(&file, config.to_toml()).unwrap();
    let check = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
            .args(["check-config", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let db_line = text
            .lines()
            .find(|l| l.contains("the database opens"))
            .unwrap_or_default()
            .to_owned();
        (db_line, text)
    };
    let (line, text) = check();
    assert!(line.starts_with('✓'), "the undamaged copy: {text}");
    // Every page but the first (the schema, which opening reads anyway).
    let mut bytes = std::fs::read(&db).unwrap();
    for page in 1..bytes.len() / 4096 {
        for b in &mut bytes[page * 4096 + 8..(page + 1) * 4096 - 8] {
            *b ^= 0xff;
        }
    }
    std::fs::write(&db, &bytes).unwrap();
    let (line, text) = check();
    assert!(
        line.starts_with('✗') && text.contains("integrity check"),
        "{text}"
    );
}

#[tokio::test]
async fn bad_client_certificates_are_refused_before_any_handler_runs() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let app = common::APP;
    let twin = DevCa::generate("test CA").unwrap(); // same subject as the real CA, another key
    let other = DevCa::generate("other CA").unwrap();
    let past = |p: &mut rcgen::CertificateParams| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    };
    let future = |p: &mut rcgen::CertificateParams| {
        p.not_before = rcgen::date_time_ymd(2090, 1, 1);
        p.not_after = rcgen::date_time_ymd(2091, 1, 1);
    };
    let variants = [
        (
            "expired",
            dir.ca
                .issue_with("x", Subject::ClientUris(&[app]), past)
                .unwrap(),
        ),
        (
            "not yet valid",
            dir.ca
                .issue_with("x", Subject::ClientUris(&[app]), future)
                .unwrap(),
        ),
        (
            "another CA",
            other.issue("x", Subject::ClientUris(&[app])).unwrap(),
        ),
        (
            "same subject, another CA key",
            twin.issue("x", Subject::ClientUris(&[app])).unwrap(),
        ),
        (
            "server-only EKU",
            dir.ca.issue("x", Subject::Server(&["localhost"])).unwrap(),
        ),
        (
            "CA:TRUE leaf",
            dir.ca
                .issue_with("x", Subject::ClientUris(&[app]), |p| {
                    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                })
                .unwrap(),
        ),
        (
            "two URI SANs",
            dir.ca
                .issue(
                    "x",
                    Subject::ClientUris(&[app, "spiffe://credvault.local/admin"]),
                )
                .unwrap(),
        ),
        (
            "no SAN at all",
            dir.ca
                .issue_with("x", Subject::ClientUris(&[]), |p| {
                    p.subject_alt_names.clear()
                })
                .unwrap(),
        ),
    ];
    for (what, cert) in &variants {
        let refused = match vault.client_as(&cert.cert_pem, &cert.key_pem).await {
            Err(_) => true,
            Ok(mut c) => c.list_providers(ListProvidersRequest {}).await.is_err(),
        };
        assert!(refused, "{what} was let in");
    }
    // No certificate at all.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&vault.ca_pem));
    let anonymous = tonic::transport::Endpoint::from_shared(vault.url())
        .unwrap()
        .tls_config(tls)
        .unwrap();
    if let Ok(channel) = anonymous.connect().await {
        assert!(CredentialsClient::new(channel)
            .list_providers(ListProvidersRequest {})
            .await
            .is_err());
    }
    // Not one reached a handler: the audit log, which records every call, is empty.
    let db = rusqlite::Connection::open(dir.db()).unwrap();
    let events: i64 = db
        .query_row("SELECT count(*) FROM audit_events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        events,
        0,
        "{} variants refused before any handler",
        variants.len() + 1
    );
}

#[tokio::test]
async fn odd_secrets_are_refused_or_stored_byte_exact() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let exact_256 = "é".repeat(128); // 256 bytes, 128 characters
    let over_256 = format!("{exact_256}x");
    let cases: Vec<(&str, String, bool)> = vec![
        ("empty", String::new(), false),
        ("NUL", "abc\u{0}defghijklmnopq".into(), false),
        ("RTL override", "abc\u{202e}defghijklmnopqr".into(), true),
        (
            "combining marks",
            "e\u{301}e\u{301}e\u{301}e\u{301}e\u{301}e\u{301}e\u{301}e\u{301}".into(),
            true,
        ),
        ("256 bytes", exact_256.clone(), true),
        ("257 bytes", over_256, false),
        ("emoji", "🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑".into(), true),
    ];
    let mut expected = HashMap::new();
    for (i, (what, secret, accepted)) in cases.iter().enumerate() {
        let ws = format!("odd{i}");
        let request = StoreRequest {
            workspace_id: ws.clone(),
            provider: "amplitude".into(),
            secrets: map(&[("api_key", SECRET), ("secret_key", secret)]),
            ..StoreRequest::default()
        };
        match c.store(request).await {
            Ok(stored) => {
                assert!(accepted, "{what} was accepted");
                let hint = &stored.into_inner().secrets["secret_key"].hint;
                assert!(
                    secret.starts_with(hint.trim_end_matches('…')),
                    "{what}: hint {hint:?} is a prefix"
                );
                expected.insert(ws, secret.clone());
            }
            Err(status) => {
                assert!(!accepted, "{what} was refused: {status:?}");
                assert_eq!(status.code(), Code::InvalidArgument, "{what}");
            }
        }
    }
    drop(c);
    vault.stop().await;
    let config = dir.path().join("credvault.toml");
    std::fs::write(&config, dir.config().to_toml()).unwrap();
    let vault = open_vault(&config).await.unwrap();
    for (ws, secret) in expected {
        let plain = vault
            .decrypt(&CredentialRef::parse(&ws, "amplitude").unwrap())
            .await
            .unwrap();
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&plain.secrets["secret_key"]),
            secret,
            "byte-exact"
        );
    }
}

#[tokio::test]
#[ignore = "mounts a tmpfs, so needs root: scripts/test runs it with --ignored as root"]
async fn disk_full_fails_cleanly_and_recovers_without_restart() {
    let dir = VaultDir::new();
    let small = dir.path().join("small");
    let _tmpfs = common::SmallTmpfs::mount(small.clone());
    let mut config = dir.config();
    config.storage.path = small.join("vault.db");
    let vault = dir.start_with(config).await;
    let mut c = vault.client().await;
    let mut acknowledged = Vec::new();
    let mut failure = None;
    for i in 0..20_000 {
        let ws = format!("ws{i}");
        match c.store(amplitude(&ws, SECRET, SECRET)).await {
            Ok(_) => acknowledged.push(ws),
            Err(status) => {
                failure = Some(status);
                break;
            }
        }
    }
    let failure = failure.expect("a 1 MiB filesystem fills up");
    assert!(
        matches!(failure.code(), Code::ResourceExhausted | Code::Unavailable),
        "{failure:?}"
    );
    eprintln!(
        "disk full after {} Stores: {:?}",
        acknowledged.len(),
        failure.code()
    );
    // Space comes back; the same vault, not restarted, stores again.
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m", small.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(grown.success());
    c.store(amplitude("after", SECRET, SECRET)).await.unwrap();
    for ws in acknowledged.iter().step_by(50) {
        c.redact(reference(ws, "amplitude")).await.unwrap();
    }
    let last = acknowledged.last().unwrap();
    c.redact(reference(last, "amplitude")).await.unwrap();
    drop(c);
    vault.stop().await;
}

/// Sends raw bytes as a gRPC message body, whatever they are.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = bytes::Buf::chunk(src).to_vec();
        bytes::Buf::advance(src, bytes.len());
        Ok(Some(bytes))
    }
}

#[tokio::test]
async fn malformed_and_oversized_protobuf_is_refused_without_panic() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let channel = dir.channel_as(&vault, common::APP).await;
    let huge_map = StoreRequest {
        workspace_id: "ws".into(),
        provider: "amplitude".into(),
        secrets: (0..100_000)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect(),
        ..StoreRequest::default()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("overlong varint", [vec![0x0a], vec![0xff; 11]].concat()),
        ("wrong wire type", vec![0x08, 0x01]),
        ("invalid UTF-8 in a string", vec![0x0a, 0x02, 0xff, 0xfe]),
        ("length past the end", vec![0x0a, 0x7f, b'a']),
        ("4 MiB + 1", vec![0x0a; 4 * 1024 * 1024 + 1]),
        (
            "a map with 100k entries",
            prost::Message::encode_to_vec(&huge_map),
        ),
    ];
    for (what, body) in cases {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/credvault.v1.Credentials/Store");
        let status = grpc
            .unary::<Vec<u8>, Vec<u8>, RawCodec>(tonic::Request::new(body), path, RawCodec)
            .await
            .unwrap_err();
        eprintln!("{what}: {:?} {}", status.code(), status.message());
        assert!(
            matches!(
                status.code(),
                Code::InvalidArgument | Code::ResourceExhausted
            ),
            "{what}: {status:?}"
        );
    }
    // Still serving, nothing stored.
    let mut c = vault.client().await;
    c.list_providers(ListProvidersRequest {}).await.unwrap();
    let list = c
        .list(credvault::proto::ListRequest {
            workspace_id: "ws".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(list.into_inner().credentials.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs gcore (gdb) and ptrace; scripts/test installs gdb and runs it"]
async fn an_idle_vault_core_image_holds_no_canary() {
    use base64::Engine;
    let tmp = tempfile::tempdir().unwrap();
    let fake_ca = DevCa::generate("provider CA").unwrap();
    let fake = FakeProvider::start(&fake_ca, |_| Reply::json(200, r#"{"data":[]}"#)).await;
    let config = prepare(tmp.path(), &fake, &fake_ca);
    let mut child = common::spawn_server(&config).await;
    let mut c = app_client(&config, &child.url).await;
    let mut canaries = Vec::new();
    for i in 0..5 {
        let mut marker = [0u8; 24];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut marker).unwrap();
        let canary = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(marker);
        let ws = format!("core{i}");
        c.store(amplitude(&ws, SECRET, &canary)).await.unwrap();
        c.validate_connection(reference(&ws, "amplitude"))
            .await
            .unwrap();
        canaries.push(canary);
    }
    // The positive control: a workspace name is no secret, and the vault
    // keeps it (SQLite's page cache): a scan that cannot see it sees nothing.
    let mut marker = [0u8; 18];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut marker).unwrap();
    let control = format!("ctl{}", data_encoding::HEXLOWER.encode(&marker));
    c.store(amplitude(&control, SECRET, SECRET)).await.unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = child.process.id().unwrap();
    let prefix = tmp.path().join("core");
    let started = std::time::Instant::now();
    let dumped = std::process::Command::new("gcore")
        .arg("-o")
        .arg(&prefix)
        .arg(pid.to_string())
        .output()
        .unwrap();
    child.process.start_kill().unwrap();
    eprintln!("gcore took {:?}", started.elapsed());
    let core = std::fs::read(format!("{}.{pid}", prefix.display())).unwrap_or_else(|e| {
        panic!(
            "gcore could not dump the process ({e}): {}",
            String::from_utf8_lossy(&dumped.stderr)
        )
    });
    assert!(
        memchr::memmem::find(&core, control.as_bytes()).is_some(),
        "the positive control: the scan must find a workspace name the vault holds"
    );
    let mut hits = 0;
    for canary in &canaries {
        let forms = [
            canary.clone(),
            data_encoding::HEXLOWER.encode(canary.as_bytes()),
            base64::engine::general_purpose::STANDARD.encode(canary),
            url::form_urlencoded::byte_serialize(canary.as_bytes()).collect::<String>(),
        ];
        for form in forms {
            hits += memchr::memmem::find_iter(&core, form.as_bytes()).count();
        }
    }
    eprintln!(
        "core image of {} MiB: {hits} canary hits",
        core.len() / (1024 * 1024)
    );
    assert_eq!(hits, 0, "plaintext left in the idle process's memory");
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
    let before = dir.number("SELECT count(*) FROM audit_events");
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
    let err = c
        .store(amplitude("ws", "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6", SECRET))
        .await
        .unwrap_err();
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
    assert!(
        dir.number("SELECT count(*) FROM audit_events") > before,
        "the refusal is audited"
    );
}
