//! Amperity connections on OAuth client credentials: the vault mints its own
//! access tokens from the stored client secret, at the HTTPS fake's token
//! endpoint, keeps them in memory only, shares one mint among concurrent
//! calls, renews them before they expire (on a manual clock), and reports a
//! failed mint with the usual verdicts. No secret or token reaches an
//! answer, an event or a log line.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{map, reference, TestVault, VaultDir};
use credvault::domain::clock::Clock;
use credvault::proto::validation::Verdict;
use credvault::proto::{ProxyRequest, StoreRequest};
use credvault_testkit::fake::{FakeProvider, Recorded, Reply, TokenEndpoint};

const CLIENT_ID: &str = "credvault-test-client";
const CLIENT_SECRET: &str = "Cs9Xq2Lw7Rt4Vb8Nm1Kd6Jf3Hg5Zp0Ya";
const SEGMENTS: &str = r#"{"data":[{"id":"s1","name":"Loyal"}],"next_token":null}"#;

struct World {
    dir: VaultDir,
    vault: TestVault,
    fake: FakeProvider,
    tokens: Arc<TokenEndpoint>,
    clock: Clock,
}

/// A vault whose Amperity hosts (the API and the token endpoint) are one
/// fake; the API echoes the caller's Authorization header in its answer.
async fn world(token_host: Option<&str>) -> World {
    common::capture_logs();
    let dir = VaultDir::new();
    let tokens = TokenEndpoint::new(CLIENT_ID, CLIENT_SECRET, 3600);
    let endpoint = Arc::clone(&tokens);
    let fake = FakeProvider::start(&dir.ca, move |r: &Recorded| {
        if let Some(reply) = endpoint.answer(r) {
            return reply;
        }
        if !endpoint.authorizes(r) {
            return Reply::json(401, r#"{"message":"Unauthorized"}"#);
        }
        // A provider that echoes the token it got, raw and base64-encoded
        // (review round 3: the base64 echo passed).
        use base64::Engine;
        let echoed = r.headers.get("authorization").cloned().unwrap_or_default();
        let token = echoed.trim_start_matches("Bearer ");
        let encoded = base64::engine::general_purpose::STANDARD.encode(token);
        Reply::json(
            200,
            &SEGMENTS.replace("Loyal", &format!("{echoed} {encoded}")),
        )
    })
    .await;
    let mut config = dir.config();
    config.providers.amperity.base_urls = [
        ("app".to_owned(), fake.url()),
        (
            "tenant".to_owned(),
            token_host.map_or_else(|| fake.url(), str::to_owned),
        ),
    ]
    .into();
    let clock = Clock::manual(SystemTime::now());
    let vault = dir.start_with_clock(config, clock.clone()).await;
    World {
        dir,
        vault,
        fake,
        tokens,
        clock,
    }
}

fn client_credentials(workspace: &str, secret: &str) -> StoreRequest {
    StoreRequest {
        workspace_id: workspace.into(),
        provider: "amperity".into(),
        secrets: map(&[("client_secret", secret)]),
        params: map(&[
            ("tenant_id", "acme"),
            ("auth", "client_credentials"),
            ("client_id", CLIENT_ID),
        ]),
        ..StoreRequest::default()
    }
}

fn segments(workspace: &str) -> ProxyRequest {
    ProxyRequest {
        workspace_id: workspace.into(),
        provider: "amperity".into(),
        method: "GET".into(),
        path: "/api/segments?limit=1".into(),
        ..ProxyRequest::default()
    }
}

impl World {
    fn token_requests(&self) -> Vec<Recorded> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.path_and_query == TokenEndpoint::PATH)
            .collect()
    }

    /// Everything a caller, the audit consumer and the log saw, as text.
    async fn seen(&self, answers: &[String]) -> String {
        let head = self.dir.audit_head(&self.vault).await;
        let mut stream = self.dir.audit_stream(&self.vault, 0).await;
        let mut events = Vec::new();
        while let Some(event) = stream.message().await.unwrap() {
            let last = event.sequence >= head;
            events.push(format!("{event:?}"));
            if last {
                break;
            }
        }
        let logs = String::from_utf8_lossy(&common::capture_logs().lock().unwrap()).into_owned();
        format!("{}\n{}\n{logs}", answers.join("\n"), events.join("\n"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_calls_share_one_mint_and_the_token_is_renewed_before_it_expires() {
    let w = world(None).await;
    let mut c = w.vault.client().await;
    let stored = c
        .store(client_credentials("ws", CLIENT_SECRET))
        .await
        .unwrap()
        .into_inner();
    assert!(
        stored.expires_at.is_none(),
        "client secrets carry no expiry"
    );
    assert!(stored.secrets.contains_key("client_secret"));

    let calls = (0..50).map(|_| {
        let mut c = c.clone();
        async move { c.proxy(segments("ws")).await.unwrap().into_inner() }
    });
    let answers = futures_util::future::join_all(calls).await;
    let statuses: Vec<u32> = answers.iter().map(|a| a.status).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(w.tokens.minted().len(), 1, "one mint for 50 calls");

    // The mint: a form POST with the client credentials and the tenant.
    let mint = &w.token_requests()[0];
    assert_eq!(mint.method, "POST");
    assert_eq!(
        mint.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(mint.headers["amperity-tenant"], "acme");
    let form: std::collections::HashMap<String, String> = url::form_urlencoded::parse(&mint.body)
        .into_owned()
        .collect();
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_id"], CLIENT_ID);

    let v = c
        .validate_connection(reference("ws", "amperity"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdict, Verdict::Valid as i32, "{v:?}");
    assert_eq!(w.tokens.minted().len(), 1, "the token is reused");

    // 55 minutes on, the token (1 hour) is renewed at the next need.
    w.clock.advance(Duration::from_secs(55 * 60));
    let answer = c.proxy(segments("ws")).await.unwrap().into_inner();
    assert_eq!(answer.status, 200);
    assert_eq!(w.tokens.minted().len(), 2, "renewed before it expired");

    let mut answers: Vec<String> = answers
        .iter()
        .map(|a| String::from_utf8_lossy(&a.body).into_owned())
        .collect();
    answers.push(String::from_utf8_lossy(&answer.body).into_owned());
    answers.push(format!("{v:?}"));
    let seen = w.seen(&answers).await;
    for secret in std::iter::once(CLIENT_SECRET.to_owned()).chain(w.tokens.minted()) {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(&secret);
        assert!(!seen.contains(&secret), "{secret} was seen");
        assert!(!seen.contains(&encoded), "{secret} was seen base64-encoded");
    }
    assert!(answers[0].contains("[redacted]"), "{}", answers[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_mint_is_the_verdict_and_the_proxy_error() {
    let w = world(None).await;
    let mut c = w.vault.client().await;
    let wrong = "Wr0ngSecretXq2Lw7Rt4Vb8Nm1Kd6Jf3H";
    c.store(client_credentials("ws", wrong)).await.unwrap();

    let v = c
        .validate_connection(reference("ws", "amperity"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdict, Verdict::Rejected as i32, "{v:?}");
    assert_eq!(v.provider_status, 401);
    assert!(v.message.contains("token endpoint"), "{v:?}");
    let err = c.proxy(segments("ws")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    // The refusal is held for a moment: one token request, not one per need,
    // and the API was never called.
    assert_eq!(w.token_requests().len(), 1);
    assert_eq!(w.fake.request_count(), 1);

    // The right secret stored: a new mint at once.
    c.store(client_credentials("ws", CLIENT_SECRET))
        .await
        .unwrap();
    let answer = c.proxy(segments("ws")).await.unwrap().into_inner();
    assert_eq!(answer.status, 200);

    // The token endpoint rate-limits: RATE_LIMITED, and the cool-down holds
    // every call to these credentials.
    w.tokens.fail_with(Some(429));
    w.clock.advance(Duration::from_secs(2 * 3600));
    let v = c
        .validate_connection(reference("ws", "amperity"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdict, Verdict::RateLimited as i32, "{v:?}");
    assert_eq!(v.retry_after_seconds, 30);
    let held = c.proxy(segments("ws")).await.unwrap().into_inner();
    assert!(held.status == 429 && held.answered_by_vault, "{held:?}");
    // A 503 (another connection, out of that cool-down): UNREACHABLE, and
    // Proxy is UNAVAILABLE.
    w.tokens.fail_with(Some(503));
    c.store(client_credentials("ws2", CLIENT_SECRET))
        .await
        .unwrap();
    let v = c
        .validate_connection(reference("ws2", "amperity"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdict, Verdict::Unreachable as i32, "{v:?}");
    w.clock.advance(Duration::from_secs(60));
    let err = c.proxy(segments("ws2")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    let seen = w.seen(&[format!("{v:?}"), format!("{err:?}")]).await;
    for secret in [wrong, CLIENT_SECRET] {
        assert!(!seen.contains(secret), "a client secret was seen");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_token_endpoint_is_unreachable() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        )
    };
    let w = world(Some(&closed)).await;
    let mut c = w.vault.client().await;
    c.store(client_credentials("ws", CLIENT_SECRET))
        .await
        .unwrap();
    let v = c
        .validate_connection(reference("ws", "amperity"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdict, Verdict::Unreachable as i32, "{v:?}");
    assert!(v.message.contains("token endpoint"), "{v:?}");
    let err = c.proxy(segments("ws")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(w.fake.request_count(), 0);
}

#[tokio::test]
async fn the_two_amperity_shapes_do_not_mix() {
    let w = world(None).await;
    let mut c = w.vault.client().await;
    let mut with_token = client_credentials("ws", CLIENT_SECRET);
    with_token
        .secrets
        .insert("access_token".into(), common::jwt(r#"{"sub":"x"}"#));
    let mut no_client_id = client_credentials("ws", CLIENT_SECRET);
    no_client_id.params.remove("client_id");
    let mut token_shape_with_secret = client_credentials("ws", CLIENT_SECRET);
    token_shape_with_secret.params.remove("auth");
    for (name, request) in [
        ("a token beside client credentials", with_token),
        ("no client_id", no_client_id),
        (
            "a client secret under auth = token",
            token_shape_with_secret,
        ),
    ] {
        let err = c.store(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err:?}");
        assert!(!err.message().contains(CLIENT_SECRET), "{name}");
    }
}
