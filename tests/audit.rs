//! The audit stream: one event per call, written before the answer (or with the change),
//! secret-free, resumable, tamper-evident.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::process::Command;

use common::{amplitude, reference, windows, TestVault, VaultDir};
use credvault::dev::certs::Subject;
use credvault::proto::audit_client::AuditClient;
use credvault::proto::{
    AuditEvent, HeadRequest, ListProvidersRequest, ListRequest, SubscribeRequest,
};
use tonic::transport::Channel;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_credvault");
const CANARY: &str = "Jx4Wq9Lm2Vb7Nc5Rt8Yd3Kf6Gh1Ps0Zu";

async fn auditor(dir: &VaultDir, vault: &TestVault) -> AuditClient<Channel> {
    AuditClient::new(
        dir.channel_as(vault, "spiffe://credvault.local/auditor")
            .await,
    )
}

/// Reads events after `after` until `count` have arrived.
async fn read(client: &mut AuditClient<Channel>, after: u64, count: usize) -> Vec<AuditEvent> {
    let mut stream = client
        .subscribe(SubscribeRequest {
            after_sequence: after,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while events.len() < count {
        events.push(stream.message().await.unwrap().unwrap());
    }
    events
}

#[tokio::test]
async fn every_call_produces_exactly_one_event_in_order() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let stored = c
        .store(amplitude("ws", CANARY, CANARY))
        .await
        .unwrap()
        .into_inner();
    c.redact(reference("ws", "amplitude")).await.unwrap();
    c.list(ListRequest {
        workspace_id: "ws".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.list_providers(ListProvidersRequest {}).await.unwrap();
    c.zero(reference("ws", "amplitude")).await.unwrap();
    c.validate_connection(reference("ws", "amplitude"))
        .await
        .unwrap();
    c.redact(reference("ws", "posthog")).await.unwrap_err();

    let mut audit = auditor(&dir, &vault).await;
    let events = read(&mut audit, 0, 8).await;
    let seen: Vec<_> = events
        .iter()
        .map(|e| (e.sequence, e.method.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (1, "Credentials.Store", "OK"),
            (2, "Credentials.Redact", "OK"),
            (3, "Credentials.List", "OK"),
            (4, "Credentials.ListProviders", "OK"),
            (5, "Credentials.Zero", "OK"),
            (6, "Credentials.ValidateConnection", "OK"),
            (7, "Credentials.Redact", "NOT_FOUND"),
            (8, "Audit.Subscribe", "OK"),
        ]
    );
    let store = &events[0];
    assert_eq!(store.identity, common::APP);
    assert_eq!(
        (store.workspace_id.as_str(), store.provider.as_str()),
        ("ws", "amplitude")
    );
    assert_eq!(store.key_version, 1);
    assert_eq!(
        store.secrets, stored.secrets,
        "hints and fingerprints, nothing more"
    );
    assert_eq!(events[5].verdict, "DISCONNECTED");
    assert_eq!(store.request_id.len(), 16);
    for pair in events.windows(2) {
        assert_eq!(pair[1].previous_hash, pair[0].hash, "the chain links");
    }
}

#[tokio::test]
async fn failed_and_denied_calls_are_audited() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let mut bad = amplitude("ws", CANARY, "short");
    bad.secrets
        .insert("secret_key".into(), format!("{CANARY} "));
    assert_eq!(
        c.store(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let stranger = dir
        .ca
        .issue(
            "x",
            Subject::ClientUris(&["spiffe://credvault.local/stranger"]),
        )
        .unwrap();
    let mut s = vault
        .client_as(&stranger.cert_pem, &stranger.key_pem)
        .await
        .unwrap();
    s.zero(reference("ws-2", "posthog")).await.unwrap_err();
    c.redact(reference(&"x".repeat(500), "not-a-provider"))
        .await
        .unwrap_err();

    let events = read(&mut auditor(&dir, &vault).await, 0, 3).await;
    assert_eq!(events[0].method, "Credentials.Store");
    assert_eq!(events[0].outcome, "INVALID_ARGUMENT");
    assert_eq!(events[0].workspace_id, "ws");
    assert!(events[0].secrets.is_empty());
    assert_eq!(events[1].identity, "spiffe://credvault.local/stranger");
    assert_eq!(events[1].method, "Credentials.Zero");
    assert_eq!(events[1].outcome, "PERMISSION_DENIED");
    assert_eq!(
        (events[1].workspace_id.as_str(), events[1].provider.as_str()),
        ("", ""),
        "refused before its body was read: no rule lets it call Zero at all"
    );
    assert_eq!(events[2].outcome, "INVALID_ARGUMENT");
    assert_eq!(
        events[2].workspace_id, "(invalid)",
        "raw input never reaches the log"
    );
    assert_eq!(events[2].provider, "(invalid)");
}

#[tokio::test]
async fn a_canary_secret_is_in_no_event() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    c.store(amplitude("ws", CANARY, CANARY)).await.unwrap();
    let mut bad = amplitude("ws", CANARY, CANARY);
    bad.secrets.insert(CANARY.into(), CANARY.into());
    c.store(bad).await.unwrap_err();
    c.redact(reference("ws", "amplitude")).await.unwrap();
    let events = read(&mut auditor(&dir, &vault).await, 0, 3).await;
    let mut rows = dir.texts("SELECT event FROM audit_events");
    rows.push(format!("{events:?}"));
    for piece in windows(CANARY, 5) {
        for row in &rows {
            assert!(!row.contains(&piece), "{piece} in {row}");
        }
    }
}

#[tokio::test]
async fn a_failing_audit_write_fails_the_call_and_changes_nothing() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let before = c
        .store(amplitude("ws", CANARY, CANARY))
        .await
        .unwrap()
        .into_inner();
    dir.fail_audit_writes();
    let store = c
        .store(amplitude("ws", CANARY, "Another0secret1value2xyzXYZ34567"))
        .await
        .unwrap_err();
    assert_eq!(store.code(), Code::Unavailable, "{store:?}");
    assert!(!store.message().contains("disk gone"));
    assert_eq!(
        c.zero(reference("ws", "amplitude"))
            .await
            .unwrap_err()
            .code(),
        Code::Unavailable
    );
    assert_eq!(
        c.redact(reference("ws", "amplitude"))
            .await
            .unwrap_err()
            .code(),
        Code::Unavailable
    );
    dir.restore_audit_writes();
    let after = c
        .redact(reference("ws", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.secrets, before.secrets, "the Store did not happen");
    assert_eq!(after.status, before.status, "the Zero did not happen");
}

#[tokio::test]
async fn a_subscriber_that_reconnects_gets_every_event_exactly_once() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    for i in 0..5 {
        c.store(amplitude(&format!("ws{i}"), CANARY, CANARY))
            .await
            .unwrap();
    }
    let mut audit = auditor(&dir, &vault).await;
    let first = read(&mut audit, 0, 3).await;
    let last_seen = first.last().unwrap().sequence;
    for i in 5..10 {
        c.store(amplitude(&format!("ws{i}"), CANARY, CANARY))
            .await
            .unwrap();
    }
    // Events so far: 10 stores and 1 subscribe; a second subscribe comes next.
    let rest = read(&mut audit, last_seen, 12 - 3).await;
    let all: Vec<u64> = first.iter().chain(&rest).map(|e| e.sequence).collect();
    assert_eq!(all, (1..=12).collect::<Vec<_>>());
    // And live events arrive on an open stream.
    let mut live = audit
        .subscribe(SubscribeRequest { after_sequence: 12 })
        .await
        .unwrap()
        .into_inner();
    c.list_providers(ListProvidersRequest {}).await.unwrap();
    let next = live.message().await.unwrap().unwrap();
    assert_eq!(next.sequence, 13);
    assert_eq!(next.method, "Audit.Subscribe");
    assert_eq!(
        live.message().await.unwrap().unwrap().method,
        "Credentials.ListProviders"
    );
}

#[tokio::test]
async fn a_stalled_consumer_does_not_hold_up_writers() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut audit = auditor(&dir, &vault).await;
    // Subscribe and read nothing while far more events than any buffer are written.
    let mut stalled = audit
        .subscribe(SubscribeRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut c = vault.client().await;
    for i in 0..600 {
        c.store(amplitude(&format!("ws{i}"), CANARY, CANARY))
            .await
            .unwrap();
    }
    let mut expected = 1;
    while expected <= 601 {
        let e = stalled.message().await.unwrap().unwrap();
        assert_eq!(e.sequence, expected);
        expected += 1;
    }
}

#[tokio::test]
async fn head_is_signed_by_the_published_key() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    vault
        .client()
        .await
        .list_providers(ListProvidersRequest {})
        .await
        .unwrap();
    let head = auditor(&dir, &vault)
        .await
        .head(HeadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        head.sequence, 1,
        "the Head call's own event comes after it is read"
    );
    let published = std::fs::read_to_string(dir.path().join("audit.pub")).unwrap();
    assert_eq!(
        published.trim(),
        data_encoding::HEXLOWER.encode(&head.public_key)
    );
    let checkpoint = credvault::audit::Checkpoint {
        sequence: head.sequence,
        hash: head.hash.clone(),
        signature: head.signature.clone(),
        key_id: head.public_key_id.clone(),
        database_id: head.database_id.clone(),
        signed_at_ms: Some(head.signed_at_ms),
    };
    assert_eq!(head.database_id.len(), credvault::audit::DATABASE_ID_LEN);
    assert!(credvault::audit::signature_ok(
        &head.public_key,
        &checkpoint
    ));
    let elsewhere = credvault::audit::Checkpoint {
        database_id: vec![0; credvault::audit::DATABASE_ID_LEN],
        ..checkpoint
    };
    assert!(
        !credvault::audit::signature_ok(&head.public_key, &elsewhere),
        "the signature covers the database identity"
    );
}

/// Writes the test vault's configuration to a file, as `audit verify --config` reads it.
fn config_file(dir: &VaultDir) -> std::path::PathBuf {
    let path = dir.path().join("credvault.toml");
    std::fs::write(&path, dir.config().to_toml()).unwrap();
    path
}

fn verify(args: &[&str], path: &std::path::Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn log_of_six(dir: &VaultDir) {
    let vault = dir.start().await;
    let mut c = vault.client().await;
    for i in 0..6 {
        c.store(amplitude(&format!("ws{i}"), CANARY, CANARY))
            .await
            .unwrap();
    }
    drop(c);
    vault.stop().await;
}

#[tokio::test]
async fn audit_verify_catches_edited_deleted_and_reordered_events() {
    let dir = VaultDir::new();
    log_of_six(&dir).await;
    let config = config_file(&dir);
    let (ok, text) = verify(&["--config"], &config);
    assert!(ok, "{text}");
    assert!(text.contains("audit log intact: 6 events"), "{text}");

    let original = dir.texts("SELECT event FROM audit_events ORDER BY sequence");
    dir.execute(
        "UPDATE audit_events SET event = replace(event, '\"ws2\"', '\"ws9\"') WHERE sequence = 3",
        &[],
    );
    let (ok, text) = verify(&["--config"], &config);
    assert!(!ok && text.contains("event 3 was edited"), "{text}");
    dir.execute(
        "UPDATE audit_events SET event = $1 WHERE sequence = 3",
        &[&original[2]],
    );
    assert!(verify(&["--config"], &config).0, "restored");

    dir.execute(
        "UPDATE audit_events SET event = CASE sequence WHEN 4 THEN $1 WHEN 5 THEN $2 END WHERE sequence IN (4, 5)",
        &[&original[4], &original[3]],
    );
    let (ok, text) = verify(&["--config"], &config);
    assert!(!ok && text.contains("event 4"), "{text}");
    dir.execute(
        "UPDATE audit_events SET event = CASE sequence WHEN 4 THEN $1 WHEN 5 THEN $2 END WHERE sequence IN (4, 5)",
        &[&original[3], &original[4]],
    );
    assert!(verify(&["--config"], &config).0, "restored");

    dir.execute("DELETE FROM audit_events WHERE sequence = 2", &[]);
    let (ok, text) = verify(&["--config"], &config);
    assert!(!ok && text.contains("event 2 is missing"), "{text}");
}

#[tokio::test]
async fn audit_verify_catches_deleted_trailing_events_through_a_checkpoint() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.audit.checkpoint_every = 3;
    let vault = dir.start_with(config).await;
    let mut c = vault.client().await;
    for i in 0..6 {
        c.store(amplitude(&format!("ws{i}"), CANARY, CANARY))
            .await
            .unwrap();
    }
    drop(c);
    // Wait for the checkpoint task to sign a head at or past event 3.
    for _ in 0..100 {
        if dir.number("SELECT count(*) FROM audit_checkpoints") > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    vault.stop().await;
    let top = dir.number("SELECT max(sequence) FROM audit_checkpoints");
    assert!(top >= 3);
    let config = config_file(&dir);
    assert!(verify(&["--config"], &config).0);
    dir.execute(
        &format!("DELETE FROM audit_events WHERE sequence >= {top}"),
        &[],
    );
    let (ok, text) = verify(&["--config"], &config);
    assert!(!ok && text.contains("past the end of the log"), "{text}");
}

#[tokio::test]
async fn audit_export_then_verify_file() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    for i in 0..4 {
        c.store(amplitude(&format!("ws{i}"), CANARY, CANARY))
            .await
            .unwrap();
    }
    let export = common::export_audit(&dir, &vault).await;
    let pinned = dir.path().join("audit.pub");
    let (ok, text) = verify(
        &["--public-key", pinned.to_str().unwrap(), "--file"],
        &export,
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("4 events") && text.contains("1 signed checkpoints"),
        "{text}"
    );

    let text = std::fs::read_to_string(&export).unwrap();
    std::fs::write(&export, text.replacen("\"ws1\"", "\"ws7\"", 1)).unwrap();
    let (ok, text) = verify(&["--file"], &export);
    assert!(!ok && text.contains("event 2 was edited"), "{text}");
}

#[tokio::test]
async fn tampered_ciphertext_gives_data_loss_through_the_api_and_is_audited() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    c.store(amplitude("ws", CANARY, CANARY)).await.unwrap();
    // The nonce in place of the ciphertext: bytes of the wrong length and content.
    dir.execute(
        "UPDATE credential_secrets SET ciphertext = nonce WHERE field = 'secret_key'",
        &[],
    );
    let status = c
        .validate_connection(reference("ws", "amplitude"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss);
    assert_eq!(status.message(), "stored credential could not be decrypted");
    let events = read(&mut auditor(&dir, &vault).await, 0, 2).await;
    assert_eq!(events[1].method, "Credentials.ValidateConnection");
    assert_eq!(events[1].outcome, "DATA_LOSS");
}

/// Deletes every event after `keep` and the checkpoints past it, as an
/// insider would, or as restoring an older copy of the database does.
fn cut_log_after(dir: &VaultDir, keep: u64) {
    dir.execute(
        &format!("DELETE FROM audit_events WHERE sequence > {keep}"),
        &[],
    );
    dir.execute(
        &format!("DELETE FROM audit_checkpoints WHERE sequence > {keep}"),
        &[],
    );
    if !common::on_sqlite() {
        dir.execute(
            &format!(
                "UPDATE audit_head SET sequence = {keep}, \
                 hash = (SELECT hash FROM audit_events WHERE sequence = {keep})"
            ),
            &[],
        );
    }
}

/// Stores `n` credentials through `vault`, one event each.
async fn stores(vault: &TestVault, from: usize, n: usize) {
    let mut c = vault.client().await;
    for i in from..from + n {
        c.store(amplitude(&format!("ws{i}"), CANARY, CANARY))
            .await
            .unwrap();
    }
}

/// Waits until the database holds a checkpoint at or after `sequence`.
async fn checkpoint_reached(dir: &VaultDir, sequence: i64) {
    for _ in 0..200 {
        if dir.number("SELECT coalesce(max(sequence), 0) FROM audit_checkpoints") >= sequence {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("no checkpoint reached event {sequence}");
}

/// Attack (a): the first 20 events deleted, one of them named by a signed checkpoint.
#[tokio::test]
async fn deleting_the_first_events_breaks_the_log() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.audit.checkpoint_every = 5;
    config.audit.checkpoint_interval_ms = 50;
    let vault = dir.start_with(config).await;
    stores(&vault, 0, 25).await;
    checkpoint_reached(&dir, 25).await;
    vault.stop().await;
    let config = config_file(&dir);
    assert!(verify(&["--config"], &config).0);

    dir.execute("DELETE FROM audit_events WHERE sequence <= 20", &[]);
    let (ok, text) = verify(&["--config"], &config);
    assert!(
        !ok && text.contains("the log starts at event 21, not at 1"),
        "{text}"
    );
    // Without the checkpoints at the deleted events, too.
    dir.execute("DELETE FROM audit_checkpoints WHERE sequence <= 20", &[]);
    let (ok, text) = verify(&["--config"], &config);
    assert!(!ok && text.contains("starts at event 21"), "{text}");
}

/// Attack (b): the newest events deleted with the checkpoints after them.
/// The database alone cannot show it; a head the consumer saved, and the
/// anchor file, do; and the vault will not serve such a database.
#[tokio::test]
async fn a_saved_head_and_the_anchor_file_catch_a_deleted_tail() {
    let dir = VaultDir::new();
    let anchor = dir.path().join("audit-anchor.jsonl");
    let mut with_anchor = dir.config();
    with_anchor.audit.checkpoint_every = 2;
    with_anchor.audit.checkpoint_interval_ms = 50;
    with_anchor.audit.anchor_file = Some(anchor.clone());
    let vault = dir.start_with(with_anchor.clone()).await;
    stores(&vault, 0, 4).await;
    let saved = dir.path().join("head.json");
    let out = common::audit_cli(
        &dir,
        &vault,
        &[
            "head",
            "--public-key",
            dir.path().join("audit.pub").to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    std::fs::write(&saved, &out.stdout).unwrap();
    let head: credvault::audit::SignedHead = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(head.head.sequence, 4, "four Stores before it");
    stores(&vault, 4, 4).await;
    checkpoint_reached(&dir, 8).await;
    vault.stop().await;

    let plain = config_file(&dir);
    let anchored = dir.path().join("anchored.toml");
    std::fs::write(&anchored, with_anchor.to_toml()).unwrap();
    let saved_arg = ["--head", saved.to_str().unwrap(), "--config"];
    for (args, config) in [
        (&["--config"][..], &plain),
        (&saved_arg[..], &plain),
        (&["--config"][..], &anchored),
    ] {
        let (ok, text) = verify(args, config);
        assert!(ok, "untouched: {args:?} {text}");
    }
    let (_, text) = verify(&["--config"], &plain);
    assert!(text.contains("no head kept outside the database"), "{text}");

    cut_log_after(&dir, 3);
    let (ok, text) = verify(&["--config"], &plain);
    assert!(ok, "the database alone cannot tell: {text}");
    let (ok, text) = verify(&saved_arg, &plain);
    assert!(
        !ok && text.contains("a head kept outside the database is at event 4")
            && text.contains("the log ends at event 3"),
        "{text}"
    );
    let (ok, text) = verify(&["--config"], &anchored);
    assert!(!ok && text.contains("kept outside the database"), "{text}");

    let check = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&anchored)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        !check.status.success() && text.contains("✗ audit.anchor_file"),
        "{text}"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = credvault::run(with_anchor, listener, async {}).await;
    let err = refused.expect_err("the vault served a database behind its anchor");
    assert!(
        err.to_string()
            .contains("does not reach the last head in audit.anchor_file"),
        "{err}"
    );
}

/// A head saved from one database vouches for no other.
#[tokio::test]
async fn a_head_of_another_database_does_not_verify() {
    let first = VaultDir::new();
    let vault = first.start().await;
    stores(&vault, 0, 2).await;
    let out = common::audit_cli(&first, &vault, &["head"]).await;
    assert!(out.status.success(), "{out:?}");
    vault.stop().await;
    let saved = first.path().join("head.json");
    std::fs::write(&saved, &out.stdout).unwrap();

    let second = VaultDir::new();
    let vault = second.start().await;
    stores(&vault, 0, 2).await;
    vault.stop().await;
    let config = config_file(&second);
    let (ok, text) = verify(
        &[
            "--public-key",
            first.path().join("audit.pub").to_str().unwrap(),
            "--head",
            saved.to_str().unwrap(),
            "--config",
        ],
        &config,
    );
    assert!(!ok && text.contains("BROKEN"), "{text}");
    // With the second vault's own key, the first vault's head does not verify either.
    let (ok, text) = verify(&["--head", saved.to_str().unwrap(), "--config"], &config);
    assert!(!ok && text.contains("BROKEN"), "{text}");
}

/// Attacks (c) and (d) on an export: a history rewritten, re-chained and
/// signed with a new key; the signed head removed; the first events removed.
#[tokio::test]
async fn an_export_verifies_only_against_a_pinned_key_and_with_its_head() {
    use credvault::audit::{chain_hash, SignedHead, Signer, GENESIS};
    let dir = VaultDir::new();
    let vault = dir.start().await;
    stores(&vault, 0, 4).await;
    let export = common::export_audit(&dir, &vault).await;
    vault.stop().await;
    let pinned = dir.path().join("audit.pub");
    let pin = ["--public-key", pinned.to_str().unwrap(), "--file"];
    let (ok, text) = verify(&pin, &export);
    assert!(ok, "{text}");

    let (ok, text) = verify(&["--file"], &export);
    assert!(
        !ok && text.contains("NOT VERIFIED") && text.contains("--public-key"),
        "an untouched export without a pinned key: {text}"
    );

    // (c) Rewrite event 2, re-chain, and sign the head with a key of our own.
    let original = std::fs::read_to_string(&export).unwrap();
    let mut lines: Vec<serde_json::Value> = original
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let head: SignedHead = serde_json::from_value(lines.pop().unwrap()).unwrap();
    lines[1]["event"]["workspace_id"] = "ws-forged".into();
    let mut previous = GENESIS;
    for line in &mut lines {
        let event: credvault::audit::Event = serde_json::from_value(line["event"].clone()).unwrap();
        let hash = chain_hash(&previous, &event.canonical());
        line["previous_hash"] = data_encoding::HEXLOWER.encode(&previous).into();
        line["hash"] = data_encoding::HEXLOWER.encode(&hash).into();
        previous = hash;
    }
    let rng = ring::rand::SystemRandom::new();
    let forger = Signer::from_pkcs8(&Signer::generate(&rng).unwrap()).unwrap();
    let forged_head = SignedHead {
        head: forger.sign_head(&head.head.database_id, 4, &previous),
        public_key: forger.public_key().to_vec(),
    };
    let mut text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    text.push_str(&forged_head.to_json());
    text.push('\n');
    let forged = dir.path().join("forged.jsonl");
    std::fs::write(&forged, text).unwrap();
    let (ok, out) = verify(&["--file"], &forged);
    assert!(!ok && out.contains("NOT VERIFIED"), "{out}");
    let (ok, out) = verify(&pin, &forged);
    assert!(!ok && out.contains("bad signature"), "{out}");

    // (d) The signed head removed.
    let mut without_head: Vec<&str> = original.lines().collect();
    without_head.pop();
    let cut = dir.path().join("cut.jsonl");
    std::fs::write(&cut, without_head.join("\n")).unwrap();
    let (ok, out) = verify(&pin, &cut);
    assert!(
        !ok && out.contains("does not end with its signed head"),
        "{out}"
    );
    // The head and the last event removed: the head no longer matches.
    let mut short: Vec<&str> = original.lines().collect();
    short.remove(3);
    std::fs::write(&cut, short.join("\n")).unwrap();
    let (ok, out) = verify(&pin, &cut);
    assert!(!ok && out.contains("BROKEN"), "{out}");
    // The first events removed.
    std::fs::write(
        &cut,
        original.lines().skip(2).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let (ok, out) = verify(&pin, &cut);
    assert!(!ok && out.contains("starts at event 3"), "{out}");
}

#[tokio::test]
async fn verify_without_a_key_says_it_checked_no_signature() {
    let dir = VaultDir::new();
    log_of_six(&dir).await;
    let mut config = dir.config();
    config.audit.public_key_file = None;
    let path = dir.path().join("no-key.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    let (ok, text) = verify(&["--config"], &path);
    assert!(!ok && text.contains("NOT VERIFIED"), "{text}");
}

fn anchored_heads(path: &std::path::Path) -> Vec<credvault::audit::SignedHead> {
    credvault::audit::anchor::read(path).unwrap()
}

async fn refused(config: credvault::config::Config) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    credvault::run(config, listener, async {})
        .await
        .expect_err("the vault served")
        .to_string()
}

/// The anchor at start-up, from the second adversarial review: a row forged
/// to carry the anchored hash, an older head appended after the newest, the
/// file removed; and the head the vault leaves at shutdown is anchored.
#[tokio::test]
async fn the_anchor_holds_against_a_forged_row_an_old_last_line_and_removal() {
    let dir = VaultDir::new();
    let anchor = dir.path().join("audit-anchor.jsonl");
    let mut config = dir.config();
    config.audit.anchor_file = Some(anchor.clone());
    let vault = dir.start_with(config.clone()).await;
    stores(&vault, 0, 5).await;
    vault.stop().await;
    let heads = anchored_heads(&anchor);
    let top = heads.iter().map(|h| h.head.sequence).max().unwrap();
    let newest = u64::try_from(dir.number("SELECT max(sequence) FROM audit_events")).unwrap();
    assert_eq!(top, newest, "the head at shutdown is anchored");

    // An older copy of the database, with one row forged at the anchored
    // sequence to carry the anchored hash.
    cut_log_after(&dir, 2);
    let hash = data_encoding::HEXLOWER.encode(&heads.last().unwrap().head.hash);
    let (zero, anchored) = if common::on_sqlite() {
        ("zeroblob(32)".to_owned(), format!("X'{hash}'"))
    } else {
        (
            format!("decode('{}', 'hex')", "00".repeat(32)),
            format!("decode('{hash}', 'hex')"),
        )
    };
    dir.execute(
        &format!(
            "INSERT INTO audit_events (sequence, event, previous_hash, hash) \
             VALUES ({top}, '{{\"sequence\":{top}}}', {zero}, {anchored})"
        ),
        &[],
    );
    let err = refused(config.clone()).await;
    assert!(err.contains("does not reach the last head"), "{err}");
    dir.execute(
        &format!("DELETE FROM audit_events WHERE sequence = {top}"),
        &[],
    );

    // An older head appended after the newest one.
    let first = std::fs::read_to_string(&anchor)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&anchor)
        .unwrap();
    std::io::Write::write_all(&mut file, format!("{first}\n").as_bytes()).unwrap();
    let err = refused(config.clone()).await;
    assert!(err.contains(&format!("(event {top})")), "{err}");

    // The file removed while the database has events.
    std::fs::remove_file(&anchor).unwrap();
    let err = refused(config.clone()).await;
    assert!(err.contains("touch"), "{err}");
    std::fs::write(&anchor, "").unwrap();
    dir.start_with(config).await.stop().await;
}

/// Events every 100 ms, a checkpoint interval of 400 ms and 1,000 events
/// per checkpoint: the interval still fires. (Before: every event restarted
/// the interval, and a steady trickle was never checkpointed.)
#[tokio::test]
async fn a_steady_trickle_of_events_does_not_hold_off_the_checkpoint() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.audit.checkpoint_every = 1_000;
    config.audit.checkpoint_interval_ms = 400;
    let vault = dir.start_with(config).await;
    let mut c = vault.client().await;
    for i in 0..15 {
        c.store(amplitude(&format!("ws{i}"), CANARY, CANARY))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        dir.number("SELECT count(*) FROM audit_checkpoints") > 0,
        "no checkpoint in 1.5 s of events with a 400 ms interval"
    );
    drop(c);
    vault.stop().await;
}

/// Sequential calls one caller can get answered early before the first
/// failed commit is known (at most the 10 ms age limit's worth; 351 before
/// one failure ended early answers).
const EARLY_BEFORE_A_FAILURE: usize = 32;

fn changes_durability(dir: &VaultDir) -> credvault::config::Config {
    let mut config = dir.config();
    config.audit.durability = credvault::audit::Durability::Changes;
    config
}

/// Under `changes`, a Redact is answered before its event is durable; the
/// event still arrives, in order, with nothing else written after the
/// answer, and stopping the vault commits every answered event first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_changes_durability_every_answered_read_is_logged_in_order() {
    let dir = VaultDir::new();
    let vault = dir.start_with(changes_durability(&dir)).await;
    let mut c = vault.client().await;
    c.store(amplitude("ws", CANARY, CANARY)).await.unwrap();
    const READS: usize = 300;
    let mut answered = Vec::new();
    for i in 0..READS {
        let mut req = tonic::Request::new(reference("ws", "amplitude"));
        let id = format!("read-{i}");
        req.metadata_mut()
            .insert("x-request-id", id.parse().unwrap());
        c.redact(req).await.unwrap();
        answered.push(id);
    }
    // Made durable by the next group commit, with no other call to push it.
    let mut audit = auditor(&dir, &vault).await;
    let events = read(&mut audit, 0, 1 + READS).await;
    let ids: Vec<_> = events[1..]
        .iter()
        .map(|e| (e.method.as_str(), e.request_id.as_str()))
        .collect();
    let expected: Vec<_> = answered
        .iter()
        .map(|id| ("Credentials.Redact", id.as_str()))
        .collect();
    assert_eq!(ids, expected, "every answered Redact, in answer order");

    // A burst answered just before a graceful stop is committed by the stop.
    let mut burst = Vec::new();
    for i in 0..64 {
        let mut c = c.clone();
        burst.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(reference("ws", "amplitude"));
            req.metadata_mut()
                .insert("x-request-id", format!("burst-{i}").parse().unwrap());
            c.redact(req).await.unwrap();
        }));
    }
    for b in burst {
        b.await.unwrap();
    }
    drop(audit);
    vault.stop().await;
    let logged = dir.texts("SELECT event FROM audit_events");
    for i in 0..64 {
        let id = format!("\"request_id\":\"burst-{i}\"");
        assert!(
            logged.iter().any(|e| e.contains(&id)),
            "burst-{i} was answered and is not in the log after a graceful stop"
        );
    }
    assert_eq!(
        dir.number("SELECT max(sequence) FROM audit_checkpoints"),
        dir.number("SELECT max(sequence) FROM audit_events"),
        "the last checkpoint covers every answered event"
    );
    let (ok, out) = verify(&["--config"], &config_file(&dir));
    assert!(ok, "{out}");
}

/// Under `changes`, a log that cannot be written still fails calls closed:
/// a change at once, a read after at most the events already answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_changes_durability_a_failing_log_fails_reads_closed() {
    let dir = VaultDir::new();
    let vault = dir.start_with(changes_durability(&dir)).await;
    let mut c = vault.client().await;
    c.store(amplitude("ws", CANARY, CANARY)).await.unwrap();
    dir.fail_audit_writes();
    let store = c
        .store(amplitude("ws", CANARY, "Another0secret1value2xyzXYZ34567"))
        .await
        .unwrap_err();
    assert_eq!(store.code(), Code::Unavailable, "{store:?}");
    // A read may be answered on its queued event until one such event fails
    // to commit; from then on every read waits for its own, and fails.
    let mut outcomes = Vec::new();
    for _ in 0..100 {
        outcomes.push(c.redact(reference("ws", "amplitude")).await.map(drop));
    }
    let first_refused = outcomes
        .iter()
        .position(|o| matches!(o, Err(s) if s.code() == Code::Unavailable))
        .expect("reads are refused once the log fails");
    // At most what one caller gets answered while the failed event waited
    // for its commit: the writer's 2 ms gathering window, never past the
    // 10 ms age limit.
    assert!(first_refused <= EARLY_BEFORE_A_FAILURE, "{outcomes:?}");
    assert!(
        outcomes[first_refused..]
            .iter()
            .all(|o| matches!(o, Err(s) if s.code() == Code::Unavailable)),
        "{outcomes:?}"
    );
    dir.restore_audit_writes();
    c.redact(reference("ws", "amplitude")).await.unwrap();
    // The reads answered and never logged are counted in the log itself.
    let lost: Vec<_> = dir
        .texts("SELECT event FROM audit_events")
        .into_iter()
        .filter(|e| e.contains("\"Audit.EventsLost\""))
        .collect();
    if first_refused == 0 {
        assert!(lost.is_empty(), "{lost:?}");
    } else {
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(
            lost[0].contains(&format!("\"count\":{first_refused}")),
            "{lost:?} should count {first_refused}"
        );
    }
}

/// An insider makes only List's events fail while calls that commit keep
/// coming: under `changes`, Lists are refused after the first lost event,
/// not answered for as long as other events commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_changes_durability_one_lost_event_ends_early_answers_for_good() {
    let dir = VaultDir::new();
    let vault = dir.start_with(changes_durability(&dir)).await;
    let mut c = vault.client().await;
    c.store(amplitude("ws", CANARY, CANARY)).await.unwrap();
    dir.execute_batch(if common::on_sqlite() {
        "CREATE TRIGGER lists_down BEFORE INSERT ON audit_events \
         WHEN NEW.event LIKE '%\"Credentials.List\"%' BEGIN SELECT RAISE(ABORT, 'x'); END;"
    } else {
        "CREATE FUNCTION lists_down() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN IF NEW.event LIKE '%\"Credentials.List\"%' THEN RAISE EXCEPTION 'x'; \
         END IF; RETURN NEW; END $$; \
         CREATE TRIGGER lists_down BEFORE INSERT ON audit_events \
         FOR EACH ROW EXECUTE FUNCTION lists_down();"
    });
    // Other calls keep committing their events meanwhile (on PostgreSQL a
    // Head that shares a batch with a List fails with it).
    let mut heads = auditor(&dir, &vault).await;
    let committing = tokio::spawn(async move {
        let mut committed = 0;
        for _ in 0..400 {
            committed += usize::from(heads.head(HeadRequest {}).await.is_ok());
        }
        committed
    });
    let mut answered = 0;
    for _ in 0..400 {
        if c.list(ListRequest {
            workspace_id: "ws".into(),
            ..Default::default()
        })
        .await
        .is_ok()
        {
            answered += 1;
        }
    }
    assert!(committing.await.unwrap() > 0, "other events committed");
    assert!(
        answered <= EARLY_BEFORE_A_FAILURE,
        "{answered} Lists answered whose events were never written"
    );
}

/// A writer stalled by a reader's snapshot (a Zero's shred waits up to 1 s
/// for it) stops early answers once the oldest waiting event is 10 ms old:
/// a crash then would not lose the events of calls answered during the stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_changes_durability_a_stalled_writer_stops_early_answers() {
    if !common::on_sqlite() {
        return; // The stall is SQLite's shred; PostgreSQL answers after the commit anyway.
    }
    let dir = VaultDir::new();
    let vault = dir.start_with(changes_durability(&dir)).await;
    let mut c = vault.client().await;
    c.store(amplitude("ws", CANARY, CANARY)).await.unwrap();
    c.store(amplitude("other", CANARY, CANARY)).await.unwrap();
    // A reader holding a snapshot, as a backup would.
    let db = rusqlite::Connection::open(dir.db()).unwrap();
    db.execute_batch("BEGIN").unwrap();
    let _: i64 = db
        .query_row("SELECT count(*) FROM audit_events", [], |r| r.get(0))
        .unwrap();
    let mut z = c.clone();
    let zero = tokio::spawn(async move { z.zero(reference("other", "amplitude")).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // The writer now waits for the reader; count what is answered meanwhile.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (mut c, answered) = (c.clone(), std::sync::Arc::clone(&answered));
        readers.push(tokio::spawn(async move {
            let until = std::time::Instant::now() + std::time::Duration::from_millis(400);
            while std::time::Instant::now() < until {
                let call = c.list(ListRequest {
                    workspace_id: "ws".into(),
                    ..Default::default()
                });
                if tokio::time::timeout(std::time::Duration::from_millis(500), call)
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    for r in readers {
        r.await.unwrap();
    }
    let during_stall = answered.load(std::sync::atomic::Ordering::Relaxed);
    db.execute_batch("COMMIT").unwrap();
    zero.await.unwrap().unwrap();
    assert!(
        during_stall <= 64,
        "{during_stall} Lists answered early while the writer was stalled"
    );
}

/// An insider adds a trigger that drops Store and Zero events (before the
/// insert, or by deleting the row after it). The chain would show no gap:
/// so the vault refuses the change rather than commit it without its event.
#[tokio::test]
async fn a_trigger_that_drops_events_makes_changes_fail_not_go_unlogged() {
    if !common::on_sqlite() {
        return; // SQLite triggers on the file; on PostgreSQL the head moves, and verify sees the gap.
    }
    for trigger in [
        "CREATE TRIGGER drop_changes BEFORE INSERT ON audit_events \
         WHEN NEW.event LIKE '%\"Credentials.Store\"%' OR NEW.event LIKE '%\"Credentials.Zero\"%' \
         BEGIN SELECT RAISE(IGNORE); END;",
        "CREATE TRIGGER drop_changes AFTER INSERT ON audit_events \
         WHEN NEW.event LIKE '%\"Credentials.Store\"%' OR NEW.event LIKE '%\"Credentials.Zero\"%' \
         BEGIN DELETE FROM audit_events WHERE sequence = NEW.sequence; END;",
    ] {
        let dir = VaultDir::new();
        let vault = dir.start().await;
        let mut c = vault.client().await;
        let before = c
            .store(amplitude("ws", CANARY, CANARY))
            .await
            .unwrap()
            .into_inner();
        dir.execute_batch(trigger);
        let store = c
            .store(amplitude("ws", CANARY, "Another0secret1value2xyzXYZ34567"))
            .await
            .unwrap_err();
        assert_eq!(store.code(), Code::Unavailable, "{trigger}: {store:?}");
        let zero = c.zero(reference("ws", "amplitude")).await.unwrap_err();
        assert_eq!(zero.code(), Code::Unavailable, "{trigger}: {zero:?}");
        let after = c
            .redact(reference("ws", "amplitude"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            after.secrets, before.secrets,
            "{trigger}: the Store happened"
        );
        assert_eq!(after.status, before.status, "{trigger}: the Zero happened");
        vault.stop().await;
    }
}

/// The count of events answered and lost is written before any other call
/// is answered (a log that takes everything but that event fails every
/// call), and by a graceful stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_changes_durability_a_loss_is_counted_in_the_chain_before_anything_else() {
    if !common::on_sqlite() {
        return; // Nothing is answered early on PostgreSQL, so nothing is lost.
    }
    let lost_events = |dir: &VaultDir| {
        dir.texts("SELECT event FROM audit_events")
            .into_iter()
            .filter(|e| e.contains("\"Audit.EventsLost\""))
            .collect::<Vec<_>>()
    };
    for stop_right_away in [true, false] {
        let dir = VaultDir::new();
        let vault = dir.start_with(changes_durability(&dir)).await;
        let mut c = vault.client().await;
        c.store(amplitude("ws", CANARY, CANARY)).await.unwrap();
        dir.fail_audit_writes();
        let mut answered = 0;
        for _ in 0..100 {
            if c.redact(reference("ws", "amplitude")).await.is_err() {
                break;
            }
            answered += 1;
        }
        assert!(
            answered > 0,
            "a read was answered early before the failure was known"
        );
        dir.restore_audit_writes();
        if stop_right_away {
            vault.stop().await;
        } else {
            // Only the count's own event is refused now: nothing is answered.
            dir.execute_batch(
                "CREATE TRIGGER no_count BEFORE INSERT ON audit_events \
                 WHEN NEW.event LIKE '%\"Audit.EventsLost\"%' BEGIN SELECT RAISE(ABORT, 'x'); END;",
            );
            for _ in 0..20 {
                let refused = c.list(ListRequest {
                    workspace_id: "ws".into(),
                    ..Default::default()
                });
                assert_eq!(refused.await.unwrap_err().code(), Code::Unavailable);
            }
            dir.execute_batch("DROP TRIGGER no_count");
            c.list(ListRequest {
                workspace_id: "ws".into(),
                ..Default::default()
            })
            .await
            .unwrap();
            vault.stop().await;
        }
        let lost = lost_events(&dir);
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(
            lost[0].contains(&format!("\"count\":{answered}")),
            "{lost:?} should count {answered}"
        );
    }
}
