//! The health monitor end to end: the vault in this process on a manual
//! clock (days pass without waiting for them), providers as HTTPS fakes on
//! 127.0.0.1, progress read from the metrics and the audit stream.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{amplitude, jwt, map, reference, TestVault, VaultDir};
use credvault::config::Config;
use credvault::domain::clock::Clock;
use credvault::proto::validation::Verdict;
use credvault::proto::{AuditEvent, StoreRequest};
use credvault_testkit::fake::{FakeProvider, Recorded, Reply};

const HOUR: Duration = Duration::from_secs(60 * 60);
const OK_EVENTS: &str = r#"{"data":[{"name":"Signed Up","totals":12}]}"#;
const SECRET: &str = "Zt5Kw8Qn2Vb7Xr4Jm9Lc3Hd6Fg1Sp0Ay";

/// What the fake answers now; tests change it as they go.
type Answer = Arc<Mutex<Reply>>;

fn answering(reply: Reply) -> Answer {
    Arc::new(Mutex::new(reply))
}

fn set(answer: &Answer, reply: Reply) {
    *answer.lock().unwrap() = reply;
}

/// A vault with the monitor on (every 24 h) and every provider's base URLs
/// on one fake that answers `answer`, on a manual clock.
struct World {
    dir: VaultDir,
    config: Config,
    clock: Clock,
    /// `None` only while restarting.
    vault: Option<TestVault>,
    fake: FakeProvider,
    /// What PostHog's key introspection answers (403 by default: the key
    /// cannot read itself, and the first verdict stands).
    scopes: Answer,
    metrics_port: u16,
    passes: u64,
}

async fn world(answer: &Answer, monitor: bool) -> World {
    common::capture_logs();
    let dir = VaultDir::new();
    let replies = Arc::clone(answer);
    let scopes = answering(Reply::json(403, "{}"));
    let scope_replies = Arc::clone(&scopes);
    let fake = FakeProvider::start(&dir.ca, move |r: &Recorded| {
        if r.path_and_query.starts_with("/api/personal_api_keys/") {
            return scope_replies.lock().unwrap().clone();
        }
        if r.path_and_query.ends_with("/oauth2/token") {
            return Reply::json(
                200,
                r#"{"access_token":"minted-by-the-fake","expires_in":3600,"token_type":"Bearer"}"#,
            );
        }
        replies.lock().unwrap().clone()
    })
    .await;
    let mut config = dir.config();
    for (provider, keys) in [
        (&mut config.providers.amplitude, ["us", "eu"]),
        (&mut config.providers.posthog, ["us", "eu"]),
        (&mut config.providers.amperity, ["app", "tenant"]),
    ] {
        provider.base_urls = keys.iter().map(|k| ((*k).into(), fake.url())).collect();
    }
    if monitor {
        config.monitor.revalidate_every = Some(24 * HOUR);
    }
    let metrics_port = common::free_port();
    config.metrics.listen = Some(format!("127.0.0.1:{metrics_port}").parse().unwrap());
    let clock = Clock::manual(SystemTime::now());
    let vault = dir.start_with_clock(config.clone(), clock.clone()).await;
    let mut w = World {
        dir,
        config,
        clock,
        vault: Some(vault),
        fake,
        scopes,
        metrics_port,
        passes: 0,
    };
    if monitor {
        w.settle().await;
    }
    w
}

/// A metric's value, summed over its label sets.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

impl World {
    fn v(&self) -> &TestVault {
        self.vault.as_ref().unwrap()
    }

    async fn metrics(&self) -> String {
        common::scrape_metrics(self.metrics_port).await
    }

    /// Waits for the monitor's next pass and for every check it started.
    async fn settle(&mut self) {
        // Serving, so the metrics listener is up.
        self.v().client().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.metrics().await;
            let passes = metric(&text, "credvault_monitor_passes_total");
            if passes > self.passes && metric(&text, "credvault_monitor_in_flight") == 0 {
                assert!(!text.contains(SECRET), "a secret in the metrics");
                self.passes = passes;
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no monitor pass within 30 s (passes {passes}):\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Moves the clock by `by` and waits for the pass that follows.
    async fn advance(&mut self, by: Duration) {
        self.clock.advance(by);
        self.settle().await;
    }

    /// Stops the vault and starts it again on the same database and clock.
    async fn restart(&mut self) {
        self.vault.take().unwrap().stop().await;
        self.vault = Some(
            self.dir
                .start_with_clock(self.config.clone(), self.clock.clone())
                .await,
        );
        self.passes = 0;
        self.settle().await;
    }

    /// Requests the fake received, by `Authorization` value.
    fn by_credential(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for r in self.fake.requests() {
            let auth = r.headers.get("authorization").cloned().unwrap_or_default();
            *counts.entry(auth).or_default() += 1;
        }
        counts
    }
}

fn amplitude_key(i: usize) -> String {
    format!("{i:032x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_is_revalidated_once_a_period_spread_out_even_across_a_restart() {
    let answer = answering(Reply::json(200, OK_EVENTS));
    let mut w = world(&answer, true).await;
    let mut c = w.v().client().await;
    // 48 connections stored at one moment, none validated.
    for i in 0..48 {
        c.store(amplitude(&format!("ws-{i}"), &amplitude_key(i), SECRET))
            .await
            .unwrap();
    }
    let mut per_six_hours = Vec::new();
    let mut seen = 0;
    for hour in 1..=24 {
        w.advance(HOUR).await;
        if hour % 6 == 0 {
            let total = w.fake.request_count();
            per_six_hours.push(total - seen);
            seen = total;
        }
    }
    // Every connection at least once in the first day, spread over it: a
    // burst would put all 48 in one quarter of it. (One checked in the
    // day's first hours is due again before its end: at most a period
    // apart, up to a tenth less.)
    let counts = w.by_credential();
    assert_eq!(counts.len(), 48, "{counts:?}");
    assert!(counts.values().all(|&n| n <= 2), "{counts:?}");
    assert!(
        per_six_hours.iter().all(|&n| (1..=30).contains(&n)),
        "{per_six_hours:?}"
    );
    // And once more in the second.
    for _ in 0..24 {
        w.advance(HOUR).await;
    }
    let counts = w.by_credential();
    assert!(counts.values().all(|&n| (2..=3).contains(&n)), "{counts:?}");
    let checks = w.fake.request_count();
    let text = w.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"credvault_monitor_checks_total{provider="amplitude",verdict="VALID"}"#
        ),
        checks as u64,
        "{text}"
    );
    // Each check reached the provider only after its event was in the log.
    let head = w.dir.audit_head(w.v()).await;
    let mut events = w.dir.audit_stream(w.v(), 0).await;
    let mut started = 0;
    while let Some(e) = events.message().await.unwrap() {
        if e.method == "Monitor.Revalidate" {
            assert_eq!(e.identity, "credvault");
            assert_eq!(e.outcome, "STARTED");
            started += 1;
        }
        if e.sequence == head {
            break;
        }
    }
    assert_eq!(started, checks);

    // A crash and a start-up: the schedule is the database's, so the new
    // vault probes only what is due, not everything at once.
    w.restart().await;
    let after_restart = w.fake.request_count() - checks;
    assert!(after_restart <= 8, "{after_restart} checks at start-up");
    for _ in 0..6 {
        w.advance(HOUR).await;
    }
    let six_hours = w.fake.request_count() - checks;
    assert!(
        six_hours <= 30,
        "{six_hours} checks in the 6 hours after a restart"
    );
}

/// The `Monitor.Verdict` events of `events` from now until the log's head.
async fn verdict_events(w: &World, after: u64) -> (Vec<AuditEvent>, u64) {
    let head = w.dir.audit_head(w.v()).await;
    let mut stream = w.dir.audit_stream(w.v(), after).await;
    let mut found = Vec::new();
    if head > after {
        while let Some(e) = stream.message().await.unwrap() {
            if e.method == "Monitor.Verdict" {
                found.push(e.clone());
            }
            if e.sequence >= head {
                break;
            }
        }
    }
    (found, head)
}

/// Stores Amplitude key 1 in `ws-1` and validates it: VALID.
async fn stored_and_valid(
    c: &mut credvault::proto::credentials_client::CredentialsClient<tonic::transport::Channel>,
) {
    c.store(amplitude("ws-1", &amplitude_key(1), SECRET))
        .await
        .unwrap();
    let v = c
        .validate_connection(reference("ws-1", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdict(), Verdict::Valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_verdict_is_announced_once_and_so_is_the_recovery() {
    let answer = answering(Reply::json(200, OK_EVENTS));
    let mut w = world(&answer, true).await;
    let mut c = w.v().client().await;
    stored_and_valid(&mut c).await;
    let (_, mut head) = verdict_events(&w, 0).await;

    // The key is revoked: both regions answer 401.
    set(&answer, Reply::json(401, r#"{"error":"invalid api key"}"#));
    w.advance(25 * HOUR).await;
    let (events, h) = verdict_events(&w, head).await;
    head = h;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (
            e.identity.as_str(),
            e.workspace_id.as_str(),
            e.provider.as_str()
        ),
        ("credvault", "ws-1", "amplitude")
    );
    assert_eq!((e.outcome.as_str(), e.verdict.as_str()), ("OK", "REJECTED"));
    let change = e.verdict_change.clone().unwrap();
    assert_eq!(
        (change.previous.as_str(), change.recovered),
        ("VALID", false)
    );
    assert!(e.secrets.is_empty(), "a notice carries no secret summary");
    let listed = c
        .list(credvault::proto::ListRequest {
            workspace_id: "ws-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let last = listed.credentials[0].last_validation.clone().unwrap();
    assert_eq!(last.verdict(), Verdict::Rejected);

    // Still rejected a day later: nothing new to say.
    w.advance(25 * HOUR).await;
    let (events, h) = verdict_events(&w, head).await;
    head = h;
    assert!(events.is_empty(), "{events:?}");

    // The provider fails for a while: not a change, and it does not make
    // the vault forget that the key was rejected.
    set(&answer, Reply::json(503, "{}"));
    w.advance(25 * HOUR).await;
    set(&answer, Reply::json(401, r#"{"error":"invalid api key"}"#));
    w.advance(2 * HOUR).await;
    let (events, h) = verdict_events(&w, head).await;
    head = h;
    assert!(events.is_empty(), "{events:?}");

    // A new key behind the same credential works again: "recovered".
    set(&answer, Reply::json(200, OK_EVENTS));
    w.advance(25 * HOUR).await;
    let (events, _) = verdict_events(&w, head).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].verdict, "VALID");
    let change = events[0].verdict_change.clone().unwrap();
    assert_eq!(
        (change.previous.as_str(), change.recovered),
        ("REJECTED", true)
    );
    assert_eq!(w.fake.request_count(), 1 + 2 + 2 + 1 + 2 + 1);
    // The vault's own audit chain still verifies.
    let export = common::verify_audit(&w.dir, w.v(), &w.config).await;
    let exported = std::fs::read_to_string(export).unwrap();
    assert!(exported.contains(r#""verdict_change":{"previous":"REJECTED","recovered":true}"#));
}

/// An Amperity connection on tenant `acme` holding a token with no expiry.
fn amperity(workspace: &str) -> StoreRequest {
    StoreRequest {
        workspace_id: workspace.into(),
        provider: "amperity".into(),
        secrets: map(&[("access_token", &jwt(r#"{"sub":"svc"}"#))]),
        params: map(&[("tenant_id", "acme")]),
        ..StoreRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_backs_the_monitor_off_and_the_tenants_budget_paces_it() {
    let answer = answering(Reply::json(200, r#"{"data":[]}"#));
    let mut w = world(&answer, true).await;
    let mut c = w.v().client().await;
    for i in 0..4 {
        let ws = format!("ws-{i}");
        c.store(amperity(&ws)).await.unwrap();
        let v = c
            .validate_connection(reference(&ws, "amperity"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.verdict(), Verdict::Valid, "{v:?}");
    }
    w.fake.clear_requests();
    set(
        &answer,
        Reply::json(429, r#"{"error":"slow down"}"#).header("retry-after", "600"),
    );
    // All four are due a day later. One request a second per tenant: the
    // first pass makes one, and its 429 stops the rest.
    w.advance(25 * HOUR).await;
    assert_eq!(w.fake.request_count(), 1);
    for _ in 0..5 {
        w.advance(Duration::from_secs(1)).await;
    }
    assert_eq!(w.fake.request_count(), 1, "calls during the back-off");
    let text = w.metrics().await;
    assert_eq!(
        metric(&text, r#"credvault_monitor_due{provider="amperity"}"#),
        3,
        "{text}"
    );
    let left = metric(
        &text,
        r#"credvault_monitor_backoff_seconds{provider="amperity"}"#,
    );
    assert!((500..=600).contains(&left), "{text}");

    // After the Retry-After, one a second again.
    set(&answer, Reply::json(200, r#"{"data":[]}"#));
    w.advance(Duration::from_secs(600)).await;
    assert_eq!(w.fake.request_count(), 2);
    w.advance(Duration::from_secs(1)).await;
    assert_eq!(w.fake.request_count(), 3);
    w.advance(Duration::from_secs(1)).await;
    assert_eq!(w.fake.request_count(), 4);
    // A 429 is not a change of verdict.
    let (events, _) = verdict_events(&w, 0).await;
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_is_off_unless_configured() {
    let answer = answering(Reply::json(200, OK_EVENTS));
    let w = world(&answer, false).await;
    let mut c = w.v().client().await;
    c.store(amplitude("ws-1", &amplitude_key(1), SECRET))
        .await
        .unwrap();
    for _ in 0..3 {
        w.clock.advance(25 * HOUR);
        // Time for a pass, had the monitor been on (the tests with it on
        // see theirs within milliseconds).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(w.fake.request_count(), 0);
    assert_eq!(
        metric(&w.metrics().await, "credvault_monitor_passes_total"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_mints_its_tokens_is_monitored_too() {
    let answer = answering(Reply::json(200, r#"{"data":[]}"#));
    let mut w = world(&answer, true).await;
    let mut c = w.v().client().await;
    c.store(StoreRequest {
        workspace_id: "ws-cc".into(),
        provider: "amperity".into(),
        secrets: map(&[("client_secret", SECRET)]),
        params: map(&[
            ("tenant_id", "acme"),
            ("auth", "client_credentials"),
            ("client_id", "credvault-monitor"),
        ]),
        ..StoreRequest::default()
    })
    .await
    .unwrap();
    // A mint and its call cost two requests against a budget of one a
    // second (review: such a check never fitted, and never ran).
    w.advance(25 * HOUR).await;
    let paths: Vec<_> = w
        .fake
        .requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(paths[0].ends_with("/oauth2/token"), "{paths:?}");
    let text = w.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"credvault_monitor_checks_total{provider="amperity",verdict="VALID"}"#
        ),
        1,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_verdict_forges_no_announcement_and_a_callers_check_is_announced() {
    let answer = answering(Reply::json(200, OK_EVENTS));
    let mut w = world(&answer, true).await;
    let mut c = w.v().client().await;
    stored_and_valid(&mut c).await;
    // A database writer turns the stored VALID into REJECTED; the key still
    // works. Had the monitor believed it, it would announce a "recovery"
    // that never happened, signed by the vault (review).
    let edited = w.dir.execute(
        r#"UPDATE credentials SET last_validation = replace(last_validation, '"VALID"', '"REJECTED"')"#,
        &[],
    );
    assert_eq!(edited, 1);
    let (_, head) = verdict_events(&w, 0).await;
    w.advance(25 * HOUR).await;
    let (events, head) = verdict_events(&w, head).await;
    assert!(events.is_empty(), "{events:?}");

    // The key is revoked, and a caller's Validate is the first to see it: the
    // change is announced all the same (review: the monitor then saw
    // REJECTED → REJECTED, and nothing was).
    set(&answer, Reply::json(401, r#"{"error":"invalid api key"}"#));
    let v = c
        .validate_connection(reference("ws-1", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdict(), Verdict::Rejected);
    let (events, head) = verdict_events(&w, head).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let change = events[0].verdict_change.clone().unwrap();
    assert_eq!(
        (change.previous.as_str(), change.recovered),
        ("VALID", false)
    );
    w.advance(25 * HOUR).await;
    let (events, head) = verdict_events(&w, head).await;
    assert!(events.is_empty(), "announced twice: {events:?}");

    // An expiry written into the row (Amplitude keys have none): not a
    // verdict but a broken binding (review: EXPIRED, then "recovered", both
    // announced).
    let past = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        - 3_600_000;
    let edited = w
        .dir
        .execute(&format!("UPDATE credentials SET expires_at = {past}"), &[]);
    assert_eq!(edited, 1);
    let err = c
        .validate_connection(reference("ws-1", "amplitude"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err:?}");
    w.advance(25 * HOUR).await;
    let (events, _) = verdict_events(&w, head).await;
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_overtaken_by_another_is_answered_not_recorded() {
    let answer = answering(Reply::json(200, r#"{"data":[]}"#));
    let w = world(&answer, false).await;
    let mut c = w.v().client().await;
    let exp = SystemTime::now() + HOUR;
    let exp_secs = exp
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    c.store(StoreRequest {
        secrets: map(&[(
            "access_token",
            &jwt(&format!(r#"{{"sub":"svc","exp":{exp_secs}}}"#)),
        )]),
        ..amperity("ws-x")
    })
    .await
    .unwrap();
    let validate = |mut c: credvault::proto::credentials_client::CredentialsClient<
        tonic::transport::Channel,
    >| async move {
        c.validate_connection(reference("ws-x", "amperity"))
            .await
            .unwrap()
            .into_inner()
            .verdict()
    };
    assert_eq!(validate(c.clone()).await, Verdict::Valid);
    // A slow check starts before the expiry...
    set(
        &answer,
        Reply::json(200, r#"{"data":[]}"#).after(Duration::from_secs(2)),
    );
    let slow = tokio::spawn(validate(c.clone()));
    while w.fake.request_count() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...another sees the credential expired, and answers first...
    w.clock.advance(2 * HOUR);
    assert_eq!(validate(c.clone()).await, Verdict::Expired);
    // ...then the slow one answers VALID: answered, not recorded over it.
    assert_eq!(slow.await.unwrap(), Verdict::Valid);
    assert_eq!(validate(c.clone()).await, Verdict::Expired);
    let (events, _) = verdict_events(&w, 0).await;
    let told: Vec<_> = events.iter().map(|e| e.verdict.as_str()).collect();
    assert_eq!(told, ["EXPIRED"], "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_the_scopes_call_backs_the_monitor_off() {
    let answer = answering(Reply::json(200, r#"{"id":7,"name":"Acme"}"#));
    let mut w = world(&answer, true).await;
    set(
        &w.scopes,
        Reply::json(429, r#"{"detail":"throttled"}"#).header("retry-after", "600"),
    );
    let mut c = w.v().client().await;
    c.store(StoreRequest {
        workspace_id: "ws-ph".into(),
        provider: "posthog".into(),
        secrets: map(&[("personal_api_key", "phx_Rk3Vw9Qm2Lx8Tz5Nc1Bd7Yf4Gh6Js0")]),
        params: map(&[("project_id", "7")]),
        ..StoreRequest::default()
    })
    .await
    .unwrap();
    w.advance(25 * HOUR).await;
    assert_eq!(w.fake.request_count(), 2);
    let text = w.metrics().await;
    let left = metric(
        &text,
        r#"credvault_monitor_backoff_seconds{provider="posthog"}"#,
    );
    assert!((500..=600).contains(&left), "{text}");
    assert_eq!(
        metric(
            &text,
            r#"credvault_monitor_checks_total{provider="posthog",verdict="RATE_LIMITED"}"#
        ),
        1,
        "{text}"
    );
}
