//! ValidateConnection end to end: the vault over mutual TLS, the providers as
//! HTTPS fakes on 127.0.0.1 that record exactly what they receive.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{amplitude, jwt, map, reference, windows, TestVault, VaultDir};
use credvault::config::Config;
use credvault::proto::validation::Verdict;
use credvault::proto::{StoreRequest, Validation};
use credvault_testkit::fake::{FakeProvider, Recorded, Reply};
use tonic::Code;

const API_KEY: &str = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6";
const SECRET: &str = "Vq8rKw2Lx7Mz4Nc9Pb3Td6Yf1Gh5Js0U";
const PHX: &str = "phx_Rk3Vw9Qm2Lx8Tz5Nc1Bd7Yf4Gh6Js0";

/// A vault whose providers all point at fakes: `us` and `eu` for the regional
/// providers, `app` for Amperity.
struct World {
    dir: VaultDir,
    vault: TestVault,
    us: FakeProvider,
    eu: FakeProvider,
}

const OK_EVENTS: &str = r#"{"data":[{"name":"Signed Up","totals":12}]}"#;

async fn world(us: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> World {
    world_with(us, |_| {}).await
}

async fn world_with(
    us: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    tweak: impl FnOnce(&mut Config),
) -> World {
    common::capture_logs();
    let dir = VaultDir::new();
    let us = FakeProvider::start(&dir.ca, us).await;
    let eu = FakeProvider::start(&dir.ca, |_| Reply::json(401, r#"{"error":"invalid"}"#)).await;
    let mut config = dir.config();
    for (provider, urls) in [
        (
            &mut config.providers.amplitude,
            [("us", us.url()), ("eu", eu.url())],
        ),
        (
            &mut config.providers.posthog,
            [("us", us.url()), ("eu", eu.url())],
        ),
        (
            &mut config.providers.amperity,
            [("app", us.url()), ("apse2", eu.url())],
        ),
    ] {
        provider.base_urls = urls.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    }
    tweak(&mut config);
    let vault = dir.start_with(config).await;
    World { dir, vault, us, eu }
}

impl World {
    async fn store(
        &self,
        request: StoreRequest,
    ) -> Result<credvault::proto::Credential, tonic::Status> {
        self.vault
            .client()
            .await
            .store(request)
            .await
            .map(|r| r.into_inner())
    }

    async fn validate(&self, workspace: &str, provider: &str) -> Validation {
        self.vault
            .client()
            .await
            .validate_connection(reference(workspace, provider))
            .await
            .unwrap()
            .into_inner()
    }
}

fn verdict(v: &Validation) -> Verdict {
    Verdict::try_from(v.verdict).unwrap()
}

fn posthog(project: &str) -> StoreRequest {
    StoreRequest {
        workspace_id: "ws".into(),
        provider: "posthog".into(),
        secrets: map(&[("personal_api_key", PHX)]),
        params: map(&[("project_id", project)]),
        ..StoreRequest::default()
    }
}

fn amperity(token: &str) -> StoreRequest {
    StoreRequest {
        workspace_id: "ws".into(),
        provider: "amperity".into(),
        secrets: map(&[("access_token", token)]),
        params: map(&[("tenant_id", "acme")]),
        ..StoreRequest::default()
    }
}

#[tokio::test]
async fn amplitude_valid_sends_basic_auth_to_events_list_and_keeps_the_verdict() {
    let w = world(|_| Reply::json(200, OK_EVENTS)).await;
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let v = w.validate("ws", "amplitude").await;
    assert_eq!(verdict(&v), Verdict::Valid, "{v:?}");
    assert_eq!(v.provider_status, 200);
    assert!(v.checked_at.is_some());

    let requests = w.us.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.path_and_query, "/api/2/events/list");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{API_KEY}:{SECRET}"));
    assert_eq!(r.headers["authorization"], format!("Basic {basic}"));
    assert!(w.eu.requests().is_empty());

    let redacted = w
        .vault
        .client()
        .await
        .redact(reference("ws", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        redacted.last_validation.unwrap().verdict,
        Verdict::Valid as i32
    );
}

#[tokio::test]
async fn amplitude_taxonomy_validation_calls_taxonomy_category() {
    let w = world(|_| {
        Reply::json(
            200,
            r#"{"success":true,"data":[{"id":1,"name":"Onboarding"}]}"#,
        )
    })
    .await;
    let mut req = amplitude("ws", API_KEY, SECRET);
    req.params = map(&[("validation", "taxonomy")]);
    w.store(req).await.unwrap();
    assert_eq!(
        verdict(&w.validate("ws", "amplitude").await),
        Verdict::Valid
    );
    assert_eq!(
        w.us.requests()[0].path_and_query,
        "/api/2/taxonomy/category"
    );
}

#[tokio::test]
async fn amplitude_key_from_the_other_region_is_wrong_region() {
    let w = world(|_| Reply::json(401, r#"{"error":"invalid api key"}"#)).await;
    w.eu.set_reply(|_| Reply::json(200, OK_EVENTS));
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let v = w.validate("ws", "amplitude").await;
    assert_eq!(verdict(&v), Verdict::WrongRegion, "{v:?}");
    assert_eq!(v.suggested_region, "eu");
    assert_eq!(v.provider_status, 401);
    assert_eq!(w.us.requests().len(), 1);
    assert_eq!(w.eu.requests().len(), 1, "the other region is tried once");
}

#[tokio::test]
async fn amplitude_refused_everywhere_is_rejected() {
    let w = world(|_| Reply::json(403, "{}")).await;
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let v = w.validate("ws", "amplitude").await;
    assert_eq!(verdict(&v), Verdict::Rejected, "{v:?}");
    assert!(v.message.contains("rejected the credentials"));
    assert_eq!(w.eu.requests().len(), 1);
}

#[tokio::test]
async fn amperity_sends_bearer_tenant_and_api_version_headers() {
    let w = world(|_| {
        Reply::json(
            200,
            r#"{"data":[{"id":"s1","name":"VIPs"}],"next_token":null}"#,
        )
    })
    .await;
    let token = jwt(r#"{"exp":4102444800}"#);
    w.store(amperity(&token)).await.unwrap();
    let v = w.validate("ws", "amperity").await;
    assert_eq!(verdict(&v), Verdict::Valid, "{v:?}");
    assert_eq!(v.display_name, "acme");
    let r = &w.us.requests()[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.path_and_query, "/api/segments?limit=1");
    assert_eq!(r.headers["authorization"], format!("Bearer {token}"));
    assert_eq!(r.headers["amperity-tenant"], "acme");
    assert_eq!(r.headers["api-version"], "2024-04-01");
}

#[tokio::test]
async fn amperity_forbidden_is_insufficient_permission_without_echoing_the_token() {
    let token = jwt(r#"{"sub":"canary"}"#);
    let echoed = token.clone();
    let w = world(move |_| {
        Reply::json(
            403,
            &format!(r#"{{"status":403,"message":"token {echoed} lacks DataGrid Operator"}}"#),
        )
    })
    .await;
    w.store(amperity(&token)).await.unwrap();
    let v = w.validate("ws", "amperity").await;
    assert_eq!(verdict(&v), Verdict::InsufficientPermission, "{v:?}");
    assert!(
        v.message.contains("lacks DataGrid Operator"),
        "{}",
        v.message
    );
    assert!(!v.message.contains(&token), "{}", v.message);
}

#[tokio::test]
async fn amperity_token_past_its_exp_is_expired_without_a_call() {
    let w = world(|_| Reply::json(200, r#"{"data":[]}"#)).await;
    // Whole seconds: at least 2 s left for the Store, even on a loaded machine.
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3;
    w.store(amperity(&jwt(&format!(r#"{{"exp":{exp}}}"#))))
        .await
        .unwrap();
    while SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        <= exp
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = w.validate("ws", "amperity").await;
    assert_eq!(verdict(&v), Verdict::Expired, "{v:?}");
    assert!(w.us.requests().is_empty());
}

#[tokio::test]
async fn posthog_valid_names_the_project() {
    let w = world(|_| Reply::json(200, r#"{"id":42,"name":"Findry prod"}"#)).await;
    w.store(posthog("42")).await.unwrap();
    let v = w.validate("ws", "posthog").await;
    assert_eq!(verdict(&v), Verdict::Valid, "{v:?}");
    assert_eq!(v.display_name, "Findry prod");
    let r = &w.us.requests()[0];
    assert_eq!(r.path_and_query, "/api/projects/42/");
    assert_eq!(r.headers["authorization"], format!("Bearer {PHX}"));
}

#[tokio::test]
async fn posthog_missing_scope_and_unknown_project_are_insufficient_permission() {
    for status in [403, 404] {
        let w = world(move |_| {
            Reply::json(
                status,
                r#"{"type":"authentication_error","detail":"API key missing required scope"}"#,
            )
        })
        .await;
        w.store(posthog("42")).await.unwrap();
        let v = w.validate("ws", "posthog").await;
        assert_eq!(
            verdict(&v),
            Verdict::InsufficientPermission,
            "{status}: {v:?}"
        );
        assert_eq!(v.provider_status, u32::from(status));
        assert!(w.eu.requests().is_empty(), "no region retry on {status}");
    }
}

/// PostHog's project answer, and `current` for `GET /api/personal_api_keys/@current/`.
fn posthog_key_answers(current: Reply) -> impl Fn(&Recorded) -> Reply + Send + Sync + 'static {
    move |r: &Recorded| {
        if r.path_and_query == "/api/personal_api_keys/@current/" {
            current.clone()
        } else {
            Reply::json(200, r#"{"id":42,"name":"Findry prod"}"#)
        }
    }
}

/// What the key may do, for the calls this vault makes with it: its scopes
/// against the allowlisted Proxy routes (a `:write` scope includes its
/// `:read`), and its projects against the stored one. A 403 on the key's own
/// introspection means "cannot tell".
#[tokio::test]
async fn posthog_reports_missing_scopes_and_other_projects() {
    let cases: [(&str, &str, &[&str]); 5] = [
        (
            "two scopes",
            r#"{"scopes":["project:read","annotation:read"],"scoped_teams":[]}"#,
            &["annotation:write", "cohort:read", "query:read"],
        ),
        (
            "nothing",
            r#"{"scopes":[],"scoped_teams":[]}"#,
            &[
                "annotation:write",
                "cohort:read",
                "project:read",
                "query:read",
            ],
        ),
        ("all", r#"{"scopes":["*"],"scoped_teams":[42]}"#, &[]),
        (
            "write includes read",
            r#"{"scopes":["project:read","annotation:write","cohort:read","query:read"]}"#,
            &[],
        ),
        (
            "another project",
            r#"{"scopes":["*"],"scoped_teams":[7,8]}"#,
            &[],
        ),
    ];
    for (name, current, missing) in cases {
        let w = world(posthog_key_answers(Reply::json(200, current))).await;
        w.store(posthog("42")).await.unwrap();
        let v = w.validate("ws", "posthog").await;
        assert_eq!(v.display_name, "Findry prod", "{name}: {v:?}");
        assert_eq!(v.missing_scopes, missing, "{name}: {v:?}");
        let expected = if missing.is_empty() && name != "another project" {
            Verdict::Valid
        } else {
            Verdict::InsufficientPermission
        };
        assert_eq!(verdict(&v), expected, "{name}: {v:?}");
        if name == "another project" {
            assert!(v.message.contains("other projects than 42"), "{v:?}");
        }
        for scope in missing {
            assert!(v.message.contains(scope), "{name}: {v:?}");
        }
        let introspection = &w.us.requests()[1];
        assert_eq!(
            introspection.path_and_query,
            "/api/personal_api_keys/@current/"
        );
        assert_eq!(
            introspection.headers["authorization"],
            format!("Bearer {PHX}")
        );
    }
    // The key may not read itself: cannot tell, so VALID stands.
    let w = world(posthog_key_answers(Reply::json(
        403,
        r#"{"detail":"API key missing required scope 'personal_api_key:read'"}"#,
    )))
    .await;
    w.store(posthog("42")).await.unwrap();
    let v = w.validate("ws", "posthog").await;
    assert_eq!(verdict(&v), Verdict::Valid, "{v:?}");
    // A narrower allowlist needs fewer scopes.
    let w = world_with(
        posthog_key_answers(Reply::json(
            200,
            r#"{"scopes":["project:read","annotation:read"]}"#,
        )),
        |config| {
            config.providers.posthog.proxy =
                Some(vec!["GET /api/projects/{project_id}/annotations/".into()]);
        },
    )
    .await;
    w.store(posthog("42")).await.unwrap();
    let v = w.validate("ws", "posthog").await;
    assert_eq!(verdict(&v), Verdict::Valid, "{v:?}");
}

/// A provider echoes the key base64-encoded after 170 characters of filler,
/// in the message and in the project name. Cut to 200 characters before it
/// was scrubbed, the echo lost its tail and with it the whole match, so 21
/// characters of the key reached the verdict, the stored last validation and
/// every caller of Redact.
#[tokio::test]
async fn an_echo_cut_short_in_a_verdict_is_scrubbed_before_the_cut() {
    use base64::Engine;
    let encodings = [
        base64::engine::general_purpose::STANDARD.encode(PHX),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("x{PHX}")),
    ];
    // A split the verdict's text cleaning would drop, joining the halves.
    let split = |sep: &str| format!("{}{sep}{}", &PHX[..20], &PHX[20..]);
    // Each echo, with the text no 12-character piece of which may be seen.
    let echoes = [
        (
            format!("{} {}", "A".repeat(170), encodings[0]),
            encodings[0].clone(),
        ),
        (
            format!("{} {}", "A".repeat(170), encodings[1]),
            encodings[1].clone(),
        ),
        (
            format!("{}{}", "A".repeat(200 - PHX.len() + 1), split("\n")),
            PHX.to_owned(),
        ),
        (
            format!("{}{}", "A".repeat(200 - PHX.len() + 1), split("\u{7f}")),
            PHX.to_owned(),
        ),
        (
            format!("{}{}", "A".repeat(150), split("\t")),
            PHX.to_owned(),
        ),
    ];
    for (echo, encoded) in echoes {
        let body = serde_json::json!({ "detail": echo, "name": echo }).to_string();
        let w = world(move |_| Reply::json(404, &body)).await;
        w.store(posthog("42")).await.unwrap();
        let v = w.validate("ws", "posthog").await;
        let stored = w
            .vault
            .client()
            .await
            .redact(reference("ws", "posthog"))
            .await
            .unwrap()
            .into_inner()
            .last_validation
            .unwrap();
        let seen = format!(
            "{} {} {} {}",
            v.message, v.display_name, stored.message, stored.display_name
        );
        for window in common::windows(&encoded, 12)
            .iter()
            .chain(&common::windows(PHX, 8))
        {
            assert!(!seen.contains(window.as_str()), "{window} leaked in {seen}");
        }
    }
}

#[tokio::test]
async fn rate_limited_uses_retry_after_and_the_next_call_skips_the_provider() {
    let w =
        world(|_| Reply::json(429, r#"{"type":"throttled_error"}"#).header("retry-after", "30"))
            .await;
    w.store(posthog("42")).await.unwrap();
    let first = w.validate("ws", "posthog").await;
    assert_eq!(verdict(&first), Verdict::RateLimited);
    assert_eq!(first.retry_after_seconds, 30);
    assert_eq!(first.provider_status, 429);
    let second = w.validate("ws", "posthog").await;
    assert_eq!(verdict(&second), Verdict::RateLimited);
    assert!(second.retry_after_seconds > 0 && second.retry_after_seconds <= 30);
    assert_eq!(
        w.us.requests().len(),
        1,
        "no provider request inside the window"
    );
}

#[tokio::test]
async fn rate_limited_without_retry_after_waits_sixty_seconds() {
    let w = world(|_| Reply::json(429, "{}")).await;
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    assert_eq!(w.validate("ws", "amplitude").await.retry_after_seconds, 60);
}

#[tokio::test]
async fn server_error_is_unreachable() {
    let w = world(|_| Reply::json(503, "{}")).await;
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let v = w.validate("ws", "amplitude").await;
    assert_eq!(verdict(&v), Verdict::Unreachable);
    assert_eq!(v.provider_status, 503);
}

#[tokio::test]
async fn body_of_the_wrong_shape_is_unexpected_response() {
    let w = world(|_| Reply::json(200, r#"{"hello":"world"}"#)).await;
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    assert_eq!(
        verdict(&w.validate("ws", "amplitude").await),
        Verdict::UnexpectedResponse
    );
}

#[tokio::test]
async fn redirect_is_not_followed() {
    let w = world(|_| Reply::json(200, OK_EVENTS)).await;
    let target = format!("{}/api/2/events/list", w.eu.url());
    w.us.set_reply(move |_| Reply::json(302, "").header("location", &target));
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let v = w.validate("ws", "amplitude").await;
    assert_eq!(verdict(&v), Verdict::UnexpectedResponse, "{v:?}");
    assert_eq!(v.provider_status, 302);
    assert!(
        w.eu.requests().is_empty(),
        "the redirect target got nothing"
    );
}

#[tokio::test]
async fn slow_provider_is_unreachable_at_the_deadline() {
    let w = world_with(
        |_| Reply::json(200, OK_EVENTS).after(Duration::from_secs(5)),
        |c| c.outbound.timeout_ms = 300,
    )
    .await;
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let started = Instant::now();
    let v = w.validate("ws", "amplitude").await;
    assert_eq!(verdict(&v), Verdict::Unreachable, "{v:?}");
    assert!(
        v.message.contains("no answer within 300 ms"),
        "{}",
        v.message
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "did not wait for the provider"
    );
}

#[tokio::test]
async fn ten_megabyte_body_is_abandoned_at_the_cap() {
    let w = world(|_| Reply {
        body: bytes::Bytes::from(vec![b'x'; 10 * 1024 * 1024]),
        ..Reply::json(200, "")
    })
    .await;
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let v = w.validate("ws", "amplitude").await;
    assert_eq!(verdict(&v), Verdict::UnexpectedResponse, "{v:?}");
    assert!(v.message.contains("over the size limit"), "{}", v.message);
}

#[tokio::test]
async fn closed_port_is_unreachable() {
    let w = world(|_| Reply::json(200, OK_EVENTS)).await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    drop(w);
    let w = world_with(
        |_| Reply::json(200, OK_EVENTS),
        move |c| {
            c.providers
                .amplitude
                .base_urls
                .insert("us".into(), format!("https://127.0.0.1:{port}"));
        },
    )
    .await;
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let v = w.validate("ws", "amplitude").await;
    assert_eq!(verdict(&v), Verdict::Unreachable, "{v:?}");
    assert!(v.message.contains("could not connect"), "{}", v.message);
    assert_eq!(v.provider_status, 0);
}

#[tokio::test]
async fn private_address_is_refused_unless_allowed() {
    let w = world_with(
        |_| Reply::json(200, OK_EVENTS),
        |c| c.outbound.allow_private_addresses = false,
    )
    .await;
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let v = w.validate("ws", "amplitude").await;
    assert_eq!(verdict(&v), Verdict::Unreachable, "{v:?}");
    assert!(v.message.contains("not a public address"), "{}", v.message);
    assert!(w.us.requests().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn private_address_is_refused_when_a_name_resolves_to_it() {
    let w = world_with(
        |_| Reply::json(200, OK_EVENTS),
        |c| c.outbound.allow_private_addresses = false,
    )
    .await;
    let port = w.us.addr.port();
    drop(w);
    let w = world_with(
        |_| Reply::json(200, OK_EVENTS),
        move |c| {
            c.outbound.allow_private_addresses = false;
            c.providers
                .amplitude
                .base_urls
                .insert("us".into(), format!("https://localhost:{port}"));
        },
    )
    .await;
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let v = w.validate("ws", "amplitude").await;
    assert_eq!(verdict(&v), Verdict::Unreachable, "{v:?}");
    assert!(
        v.message.contains("resolves to") && v.message.contains("not a public address"),
        "{}",
        v.message
    );
}

#[tokio::test]
async fn disconnected_is_a_verdict_without_a_call_and_zero_keeps_the_last_one() {
    let w = world(|_| Reply::json(200, OK_EVENTS)).await;
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    assert_eq!(
        verdict(&w.validate("ws", "amplitude").await),
        Verdict::Valid
    );
    let zeroed = w
        .vault
        .client()
        .await
        .zero(reference("ws", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        zeroed.last_validation.unwrap().verdict,
        Verdict::Valid as i32
    );
    let v = w.validate("ws", "amplitude").await;
    assert_eq!(verdict(&v), Verdict::Disconnected);
    assert_eq!(w.us.requests().len(), 1);
}

#[tokio::test]
async fn store_with_validate_refuses_rejected_credentials_and_keeps_the_old_ones() {
    let w = world(|_| Reply::json(200, OK_EVENTS)).await;
    let mut good = amplitude("ws", API_KEY, SECRET);
    good.validate = true;
    let stored = w.store(good).await.unwrap();
    assert_eq!(
        stored.last_validation.as_ref().unwrap().verdict,
        Verdict::Valid as i32
    );

    w.us.set_reply(|_| Reply::json(401, "{}"));
    let mut bad = amplitude("ws", API_KEY, "Wrong0secret1value2abcdefghijkl");
    bad.validate = true;
    let status = w.store(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("REJECTED"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains("Wrong0secret"));
    let kept = w
        .vault
        .client()
        .await
        .redact(reference("ws", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.secrets, stored.secrets, "the old secrets stay");
}

#[tokio::test]
async fn concurrent_validations_of_one_connection_share_one_call() {
    let w = world(|_| Reply::json(200, OK_EVENTS).after(Duration::from_millis(300))).await;
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let mut calls = Vec::new();
    for _ in 0..6 {
        let mut client = w.vault.client().await;
        calls.push(tokio::spawn(async move {
            client
                .validate_connection(reference("ws", "amplitude"))
                .await
                .unwrap()
                .into_inner()
        }));
    }
    for call in calls {
        assert_eq!(verdict(&call.await.unwrap()), Verdict::Valid);
    }
    assert_eq!(w.us.requests().len(), 1);
}

#[tokio::test]
async fn amplitude_calls_are_limited_to_four_at_once() {
    let w = world(|_| Reply::json(200, OK_EVENTS).after(Duration::from_millis(200))).await;
    for i in 0..10 {
        w.store(amplitude(&format!("ws{i}"), API_KEY, SECRET))
            .await
            .unwrap();
    }
    let mut calls = Vec::new();
    for i in 0..10 {
        let mut client = w.vault.client().await;
        calls.push(tokio::spawn(async move {
            client
                .validate_connection(reference(&format!("ws{i}"), "amplitude"))
                .await
                .unwrap()
                .into_inner()
        }));
    }
    for call in calls {
        assert_eq!(verdict(&call.await.unwrap()), Verdict::Valid);
    }
    assert_eq!(w.us.requests().len(), 10);
    assert!(
        w.us.max_in_flight() <= 4,
        "{} at once",
        w.us.max_in_flight()
    );
    assert!(w.us.max_in_flight() >= 2, "calls did run concurrently");
}

#[tokio::test]
async fn verdict_survives_restart() {
    let dir = VaultDir::new();
    let fake = FakeProvider::start(&dir.ca, |_| Reply::json(200, r#"{"id":1,"name":"P"}"#)).await;
    let mut config = dir.config();
    config
        .providers
        .posthog
        .base_urls
        .insert("us".into(), fake.url());
    let vault = dir.start_with(config.clone()).await;
    let mut c = vault.client().await;
    c.store(posthog("1")).await.unwrap();
    c.validate_connection(reference("ws", "posthog"))
        .await
        .unwrap();
    drop(c);
    vault.stop().await;
    let vault = dir.start_with(config).await;
    let after = vault
        .client()
        .await
        .redact(reference("ws", "posthog"))
        .await
        .unwrap()
        .into_inner();
    let v = after.last_validation.unwrap();
    assert_eq!(v.verdict, Verdict::Valid as i32);
    assert_eq!(v.display_name, "P");
}

/// Also searches the logs of every test in this binary that ran before it.
#[tokio::test]
async fn canary_secrets_appear_in_no_log_line_response_or_error() {
    let logs = common::capture_logs();
    let w = world(|r| {
        // Echo the Authorization header back in every answer, as a hostile provider might.
        let auth = r.headers.get("authorization").cloned().unwrap_or_default();
        Reply::json(
            403,
            &format!(r#"{{"message":"denied for {auth}","detail":"{auth}"}}"#),
        )
    })
    .await;
    w.store(posthog("7")).await.unwrap();
    let v = w.validate("ws", "posthog").await;
    assert_eq!(verdict(&v), Verdict::InsufficientPermission);
    let mut bad = posthog("7");
    bad.validate = true;
    let err = w.store(bad).await.unwrap_err();
    let seen = format!(
        "{v:?} {} {:?}",
        err.message(),
        w.vault
            .client()
            .await
            .redact(reference("ws", "posthog"))
            .await
    );
    let log = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(log.contains("ValidateConnection"), "the log capture works");
    for canary in [PHX, SECRET] {
        let secret_part = &canary[4..];
        for piece in windows(secret_part, 8) {
            assert!(!seen.contains(&piece), "{piece} in a response: {seen}");
            assert!(!log.contains(&piece), "{piece} in the logs");
        }
    }
}

#[tokio::test]
async fn cli_validate_explains_the_verdict_in_words() {
    let w = world(|_| Reply::json(401, "{}")).await;
    w.eu.set_reply(|_| Reply::json(200, OK_EVENTS));
    w.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = files.path().join(name);
        common::write_private(&path, text.as_bytes());
        path
    };
    let ca = write("ca.pem", &w.vault.ca_pem);
    let cert = write("app.pem", &w.dir.app.cert_pem);
    let key = write("app-key.pem", &w.dir.app.key_pem);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
        .args([
            "validate",
            "--workspace",
            "ws",
            "--provider",
            "amplitude",
            "--addr",
            &w.vault.url(),
        ])
        .arg("--ca")
        .arg(&ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "only VALID exits 0");
    assert!(stdout.contains("WRONG_REGION (HTTP 401)"), "{stdout}");
    assert!(stdout.contains("--param region=eu"), "{stdout}");
}
