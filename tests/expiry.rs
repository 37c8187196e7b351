//! Connections over time: credentials nearing their expiry are counted in
//! the metrics, listed with `expiring_within_seconds`, and announced once per
//! connection and threshold in the audit chain. The vault runs in this
//! process on a manual clock, so that weeks pass without waiting for them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{amplitude, jwt, map, reference, VaultDir};
use credvault::domain::clock::Clock;
use credvault::proto::validation::Verdict;
use credvault::proto::{AuditEvent, ListRequest, StoreRequest};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const SECRET: &str = "Zt5Kw8Qn2Vb7Xr4Jm9Lc3Hd6Fg1Sp0Ay";

/// An Amperity connection in `workspace` whose token expires at `exp`.
fn amperity(workspace: &str, exp: SystemTime) -> StoreRequest {
    let exp = exp.duration_since(UNIX_EPOCH).unwrap().as_secs();
    StoreRequest {
        workspace_id: workspace.into(),
        provider: "amperity".into(),
        secrets: map(&[(
            "access_token",
            &jwt(&format!(r#"{{"sub":"svc","exp":{exp}}}"#)),
        )]),
        params: map(&[("tenant_id", "acme")]),
        ..StoreRequest::default()
    }
}

/// The next expiry notice on `stream` (skipping every other event), as
/// (workspace, threshold); fails after 20 s.
async fn next_notice(stream: &mut tonic::Streaming<AuditEvent>) -> (String, String) {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("an expiry notice within 20 s")
            .unwrap()
            .unwrap();
        if event.method != "Monitor.Expiry" {
            continue;
        }
        assert_eq!(event.identity, "credvault");
        assert_eq!(event.outcome, "OK");
        assert!(event.secrets.is_empty() && event.verdict.is_empty());
        let expiry = event.expiry.expect("a notice states the expiry");
        return (event.workspace_id, expiry.within);
    }
}

/// Waits until the metrics on `port` hold every line of `expected`.
async fn wait_for_metrics(port: u16, expected: &[String]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = common::scrape_metrics(port).await;
        let missing: Vec<_> = expected
            .iter()
            .filter(|l| !text.lines().any(|line| line == l.as_str()))
            .collect();
        if missing.is_empty() {
            assert!(!text.contains(SECRET), "a secret in the metrics");
            assert!(!text.contains("workspace"), "a workspace label: {text}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "missing {missing:?} in\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn gauges(provider: &str, within: [u64; 3], expired: u64) -> Vec<String> {
    let mut lines: Vec<String> = ["1d", "7d", "30d"]
        .iter()
        .zip([within[2], within[1], within[0]])
        .map(|(w, n)| {
            format!(r#"credvault_credentials_expiring{{provider="{provider}",within="{w}"}} {n}"#)
        })
        .collect();
    lines.push(format!(
        r#"credvault_credentials_expired{{provider="{provider}"}} {expired}"#
    ));
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_counted_listed_and_announced_once_per_threshold() {
    let dir = VaultDir::new();
    let port = common::free_port();
    let mut config = dir.config();
    config.metrics.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let t0 = SystemTime::now();
    let clock = Clock::manual(t0);
    let vault = dir.start_with_clock(config.clone(), clock.clone()).await;
    let mut c = vault.client().await;
    let mut notices = dir.audit_stream(&vault, 0).await;

    // ws-a expires in 20 days, ws-b in 3, ws-c in 40; Amplitude keys never.
    c.store(amperity("ws-a", t0 + 20 * DAY)).await.unwrap();
    c.store(amperity("ws-b", t0 + 3 * DAY)).await.unwrap();
    c.store(amperity("ws-c", t0 + 40 * DAY)).await.unwrap();
    c.store(amplitude("ws-a", SECRET, SECRET)).await.unwrap();

    clock.advance(Duration::from_secs(1));
    assert_eq!(
        next_notice(&mut notices).await,
        ("ws-a".into(), "30d".into())
    );
    assert_eq!(
        next_notice(&mut notices).await,
        ("ws-b".into(), "7d".into())
    );
    wait_for_metrics(port, &gauges("amperity", [2, 1, 0], 0)).await;
    wait_for_metrics(port, &gauges("amplitude", [0, 0, 0], 0)).await;
    wait_for_metrics(port, &gauges("posthog", [0, 0, 0], 0)).await;

    // List: only what expires within the time asked; all without it.
    let lister = c.clone();
    let list = |workspace: &str, within: Option<Duration>| {
        let mut c = lister.clone();
        let request = ListRequest {
            workspace_id: workspace.into(),
            expiring_within_seconds: within.map(|d| d.as_secs()),
        };
        async move {
            let mut providers: Vec<String> = c
                .list(request)
                .await
                .unwrap()
                .into_inner()
                .credentials
                .into_iter()
                .map(|c| c.provider)
                .collect();
            providers.sort();
            providers
        }
    };
    assert_eq!(list("ws-a", None).await, ["amperity", "amplitude"]);
    assert_eq!(list("ws-a", Some(30 * DAY)).await, ["amperity"]);
    assert!(list("ws-a", Some(7 * DAY)).await.is_empty());
    assert_eq!(list("ws-b", Some(7 * DAY)).await, ["amperity"]);
    assert_eq!(list("ws-b", Some(Duration::MAX)).await, ["amperity"]);

    // Two days on, ws-b is within one day; a day more, it has expired, and
    // validating it calls no provider.
    clock.advance(2 * DAY + Duration::from_secs(1));
    assert_eq!(
        next_notice(&mut notices).await,
        ("ws-b".into(), "1d".into())
    );
    clock.advance(DAY);
    assert_eq!(
        next_notice(&mut notices).await,
        ("ws-b".into(), "expired".into())
    );
    let verdict = c
        .validate_connection(reference("ws-b", "amperity"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(verdict.verdict, Verdict::Expired as i32);
    // Expired is within any time asked, even none.
    assert_eq!(list("ws-b", Some(Duration::ZERO)).await, ["amperity"]);

    // Eight days more: ws-c crosses 30 days. It is the next notice, so no
    // notice was written twice meanwhile (ws-a stays within 30 days, ws-b
    // expired).
    clock.advance(8 * DAY);
    assert_eq!(
        next_notice(&mut notices).await,
        ("ws-c".into(), "30d".into())
    );
    wait_for_metrics(port, &gauges("amperity", [2, 0, 0], 1)).await;

    // A database writer moves ws-d's expiry (bound to its key) closer: the
    // vault neither counts nor announces it (review round 3: a signed,
    // forged notice).
    c.store(amperity("ws-d", t0 + 300 * DAY)).await.unwrap();
    let edited = millis(clock.now() + DAY / 2);
    let sql = format!(
        "UPDATE credentials SET expires_at = {edited} \
         WHERE workspace_id = 'ws-d' AND provider = 'amperity'"
    );
    assert_eq!(dir.execute(&sql, &[]), 1);

    // A restart writes nothing again either: the next notice is ws-a's 7d.
    vault.stop().await;
    let vault = dir.start_with_clock(config, clock.clone()).await;
    let head = dir.audit_head(&vault).await;
    let mut notices = dir.audit_stream(&vault, head).await;
    clock.advance(2 * DAY + Duration::from_secs(1));
    assert_eq!(
        next_notice(&mut notices).await,
        ("ws-a".into(), "7d".into())
    );
    wait_for_metrics(port, &gauges("amperity", [2, 1, 0], 1)).await;
    // Six days on, ws-a is within one day. ws-d, past its forged expiry
    // since the restart, was never announced (its notice would have come
    // right after ws-a's 7d) nor counted.
    clock.advance(6 * DAY);
    assert_eq!(
        next_notice(&mut notices).await,
        ("ws-a".into(), "1d".into())
    );
    wait_for_metrics(port, &gauges("amperity", [2, 1, 1], 1)).await;
}

/// Milliseconds since the epoch, as the stores keep times.
fn millis(at: SystemTime) -> u64 {
    u64::try_from(at.duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}
