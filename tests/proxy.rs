//! Proxy end to end: the vault over mutual TLS, each provider an HTTPS fake on
//! 127.0.0.1 that records exactly what reached it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use base64::Engine;
use common::{amplitude, map, reference, TestVault, VaultDir};
use credvault::config::Config;
use credvault::policy::Rule;
use credvault::proto::audit_client::AuditClient;
use credvault::proto::{ProxyRequest, ProxyResponse, StoreRequest, SubscribeRequest};
use credvault_testkit::fake::{FakeProvider, Recorded, Reply};
use tonic::Code;

const API_KEY: &str = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6";
const SECRET: &str = "Vq8rKw2Lx7Mz4Nc9Pb3Td6Yf1Gh5Js0U";
const PHX: &str = "phx_Rk3Vw9Qm2Lx8Tz5Nc1Bd7Yf4Gh6Js0";
const COHORTS: &str = r#"{"cohorts":[{"id":"c1","name":"Power users"}]}"#;

/// A vault whose three providers all point at one fake.
struct World {
    dir: VaultDir,
    vault: TestVault,
    fake: FakeProvider,
}

async fn world(reply: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> World {
    world_with(reply, |_| {}).await
}

async fn world_with(
    reply: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    tweak: impl FnOnce(&mut Config),
) -> World {
    let dir = VaultDir::new();
    let fake = FakeProvider::start(&dir.ca, reply).await;
    let mut config = dir.config();
    let url = fake.url();
    for (provider, key) in [
        (&mut config.providers.amplitude, "us"),
        (&mut config.providers.posthog, "us"),
        (&mut config.providers.amperity, "app"),
    ] {
        provider.base_urls = [(key.to_owned(), url.clone())].into();
    }
    tweak(&mut config);
    let vault = dir.start_with(config).await;
    let world = World { dir, vault, fake };
    let mut c = world.vault.client().await;
    c.store(amplitude("ws", API_KEY, SECRET)).await.unwrap();
    c.store(posthog("42")).await.unwrap();
    c.store(StoreRequest {
        workspace_id: "ws".into(),
        provider: "amperity".into(),
        secrets: map(&[("access_token", &amperity_token())]),
        params: map(&[("tenant_id", "acme")]),
        ..StoreRequest::default()
    })
    .await
    .unwrap();
    world
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

fn amperity_token() -> String {
    common::jwt(r#"{"sub":"svc","tenant":"acme"}"#)
}

fn request(provider: &str, method: &str, path: &str) -> ProxyRequest {
    ProxyRequest {
        workspace_id: "ws".into(),
        provider: provider.into(),
        method: method.into(),
        path: path.into(),
        ..ProxyRequest::default()
    }
}

impl World {
    async fn proxy(&self, r: ProxyRequest) -> Result<ProxyResponse, tonic::Status> {
        self.vault
            .client()
            .await
            .proxy(r)
            .await
            .map(tonic::Response::into_inner)
    }

    async fn validate(&self, provider: &str) -> credvault::proto::Validation {
        self.vault
            .client()
            .await
            .validate_connection(reference("ws", provider))
            .await
            .unwrap()
            .into_inner()
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.fake.addr.port())
    }
}

fn basic() -> String {
    let pair = format!("{API_KEY}:{SECRET}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

#[tokio::test]
async fn each_provider_gets_its_own_credentials_on_the_configured_host() {
    let w = world(|r| {
        Reply::json(200, COHORTS)
            .header("x-ratelimit-remaining", "41")
            .header("set-cookie", "session=abc")
            .header(
                "x-request-id",
                format!("echo {}", r.path_and_query).as_str(),
            )
    })
    .await;

    let got = w
        .proxy(request("amplitude", "GET", "/api/3/cohorts"))
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body, COHORTS.as_bytes());
    assert!(!got.truncated);
    assert_eq!(got.redactions, 0);
    let passed: Vec<&str> = {
        let mut names: Vec<&str> = got.headers.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    };
    assert_eq!(passed, ["content-type", "x-ratelimit-remaining"]);

    let mut annotation = request("amplitude", "POST", "/api/3/annotations");
    annotation.headers = map(&[("content-type", "application/json")]);
    annotation.body = br#"{"label":"Bet shipped","start":"2026-11-24T12:00:00Z"}"#.to_vec();
    assert_eq!(w.proxy(annotation.clone()).await.unwrap().status, 200);

    w.proxy(request("posthog", "GET", "/api/projects/42/cohorts/"))
        .await
        .unwrap();
    w.proxy(request("amperity", "GET", "/api/segments?limit=5"))
        .await
        .unwrap();

    let seen = w.fake.requests();
    assert_eq!(seen.len(), 4);
    for r in &seen {
        assert_eq!(r.authority, w.host(), "always the configured host");
        assert_eq!(r.headers["accept-encoding"], "identity");
    }
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path_and_query.as_str()),
        ("GET", "/api/3/cohorts")
    );
    assert_eq!(seen[0].headers["authorization"], basic());
    assert_eq!(seen[1].method, "POST");
    assert_eq!(seen[1].body, annotation.body);
    assert_eq!(seen[1].headers["content-type"], "application/json");
    assert_eq!(seen[1].headers["authorization"], basic());
    assert_eq!(seen[2].path_and_query, "/api/projects/42/cohorts/");
    assert_eq!(seen[2].headers["authorization"], format!("Bearer {PHX}"));
    assert_eq!(seen[3].path_and_query, "/api/segments?limit=5");
    assert_eq!(
        seen[3].headers["authorization"],
        format!("Bearer {}", amperity_token())
    );
    assert_eq!(seen[3].headers["amperity-tenant"], "acme");
    assert_eq!(seen[3].headers["api-version"], "2024-04-01");
}

#[tokio::test]
async fn smuggling_attempts_are_refused_before_any_outbound_request() {
    let w = world(|_| Reply::json(200, "{}")).await;
    let long = format!("/api/2/taxonomy/{}", "a".repeat(4096));
    let attempts: Vec<(&str, &str)> = vec![
        ("GET", "/api/2/../../x"),
        ("GET", "/api/3/../2/events/list"),
        ("GET", "/api/2/taxonomy/../../../x"),
        ("GET", "/api/2/taxonomy/%2e%2e/%2e%2e/x"),
        ("GET", "/api/2/taxonomy/%2E%2E/x"),
        ("GET", "/api/2/taxonomy/.%2e/x"),
        ("GET", "/api/2/taxonomy/./category"),
        ("GET", "/api/2/taxonomy/..;/x"),
        ("GET", "/api/2/taxonomy/a%2Fb"),
        ("GET", "/api/2/taxonomy/a%2fb"),
        ("GET", "/api/2/taxonomy/a%5Cb"),
        ("GET", "/api/2/taxonomy/a\\b"),
        ("GET", "/api/2/taxonomy/%252e%252e"),
        ("GET", "//evil.example/x"),
        ("GET", "https://evil.example/"),
        ("GET", "http://127.0.0.1:1/api/3/cohorts"),
        ("GET", "evil.example/api/3/cohorts"),
        ("GET", "/@evil"),
        ("GET", "/api/3/cohorts@evil.example"),
        ("GET", "/api/3/cohorts#fragment"),
        ("GET", "/api/3/cohorts\0"),
        ("GET", "/api/3/cohorts\r\nHost: evil.example"),
        ("GET", "/api/3/cohorts\t"),
        ("GET", "/api//3/cohorts"),
        ("GET", "/api/3/coh orts"),
        ("GET", "/api/3/%zzcohorts"),
        ("GET", "/api/3/cohorts?q=%2"),
        ("GET", "/api/3/cöhorts"),
        ("GET", ""),
        ("GET", long.as_str()),
        ("GET /api/3/cohorts HTTP/1.1\r\nX:", "/api/3/cohorts"),
        ("", "/api/3/cohorts"),
    ];
    assert!(attempts.len() >= 20);
    for (method, path) in attempts {
        let err = w
            .proxy(request("amplitude", method, path))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{method:?} {path:?}: {}",
            err.message()
        );
    }
    assert_eq!(w.fake.request_count(), 0, "nothing was sent");
}

#[tokio::test]
async fn a_path_off_the_allowlist_or_into_another_project_is_denied() {
    let w = world(|_| Reply::json(200, "{}")).await;
    for (provider, method, path) in [
        ("amplitude", "DELETE", "/api/3/cohorts"),
        ("amplitude", "PUT", "/api/3/annotations"),
        ("amplitude", "GET", "/api/2/export"),
        ("amplitude", "GET", "/api/3/cohorts/"),
        ("amplitude", "POST", "/api/3/cohorts"),
        ("posthog", "GET", "/api/projects/43/cohorts/"),
        ("posthog", "GET", "/api/projects/42/persons/"),
        ("amperity", "POST", "/api/segments"),
    ] {
        let err = w.proxy(request(provider, method, path)).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{provider} {method} {path}: {}",
            err.message()
        );
    }
    let foreign = w
        .proxy(request("posthog", "GET", "/api/projects/43/cohorts/"))
        .await
        .unwrap_err();
    assert!(foreign.message().contains("project_id"), "{foreign:?}");
    assert_eq!(w.fake.request_count(), 0);
}

#[tokio::test]
async fn a_caller_may_not_set_credentials_or_provider_headers() {
    let w = world(|_| Reply::json(200, "{}")).await;
    for (name, value) in [
        ("authorization", "Basic Zm9vOmJhcg=="),
        ("Authorization", "Bearer phx_mine"),
        ("host", "evil.example"),
        ("proxy-authorization", "Basic x"),
        ("cookie", "a=b"),
        ("amperity-tenant", "other"),
        ("api-version", "2020-01-01"),
        ("x-forwarded-host", "evil.example"),
        ("accept-encoding", "gzip"),
        ("accept", "application/json\r\nX-Injected: 1"),
    ] {
        let mut r = request("amperity", "GET", "/api/segments");
        r.headers = map(&[(name, value)]);
        let err = w.proxy(r).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {value}");
        assert!(
            !err.message().contains(value),
            "the refusal does not echo the value"
        );
    }
    assert_eq!(w.fake.request_count(), 0);
    let mut ok = request("amperity", "GET", "/api/segments");
    ok.headers = map(&[
        ("Accept", "application/json"),
        ("accept-encoding", "identity"),
    ]);
    w.proxy(ok).await.unwrap();
    assert_eq!(w.fake.requests()[0].headers["accept"], "application/json");
}

#[tokio::test]
async fn echoed_secrets_are_replaced_with_their_hints() {
    let echo = format!(
        r#"{{"error":"Invalid API key: {API_KEY}","secret":"{SECRET}","b64":"{}","auth":"{}","as_url":"{}"}}"#,
        base64::engine::general_purpose::STANDARD.encode(SECRET),
        basic(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("x{SECRET}"))
    );
    let w = world(move |_| {
        Reply::json(401, &echo).header("x-ratelimit-limit", &format!("key {API_KEY}"))
    })
    .await;
    let credential = w
        .vault
        .client()
        .await
        .redact(reference("ws", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    let got = w
        .proxy(request("amplitude", "GET", "/api/2/events/list"))
        .await
        .unwrap();
    assert_eq!(got.status, 401, "the provider's status passes through");
    let body = String::from_utf8(got.body.clone()).unwrap();
    let everything = format!("{body} {:?}", got.headers);
    for canary in [API_KEY, SECRET, &basic()[6..]] {
        for window in common::windows(canary, 12) {
            assert!(
                !everything.contains(&window),
                "{window} leaked in {everything}"
            );
        }
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(SECRET);
    assert!(!body.contains(&encoded[..20]));
    assert!(body.contains(&format!(
        "Invalid API key: {}",
        credential.secrets["api_key"].hint
    )));
    assert!(body.contains(&credential.secrets["secret_key"].hint));
    assert!(got.redactions >= 5, "{} redactions", got.redactions);
}

#[tokio::test]
async fn bodies_are_capped_both_ways() {
    let big = vec![b'x'; 5 << 20];
    let w = world(move |r| {
        if r.path_and_query.starts_with("/api/3/cohorts") {
            Reply {
                body: big.clone().into(),
                ..Reply::json(200, "")
            }
        } else {
            Reply::json(200, "{}")
        }
    })
    .await;
    let mut over = request("amplitude", "POST", "/api/3/annotations");
    over.body = vec![b'a'; (1 << 20) + 1];
    let err = w.proxy(over).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("1 MiB"));
    assert_eq!(w.fake.request_count(), 0);

    let mut huge = request("amplitude", "POST", "/api/3/annotations");
    huge.body = vec![b'a'; 2 << 20];
    let err = w.proxy(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(w.fake.request_count(), 0);

    let mut limit = request("amplitude", "POST", "/api/3/annotations");
    limit.body = vec![b'a'; 1 << 20];
    w.proxy(limit).await.unwrap();
    assert_eq!(w.fake.requests()[0].body.len(), 1 << 20);

    let mut get_with_body = request("amplitude", "GET", "/api/3/annotations");
    get_with_body.body = b"{}".to_vec();
    assert_eq!(
        w.proxy(get_with_body).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let got = w
        .proxy(request("amplitude", "GET", "/api/3/cohorts"))
        .await
        .unwrap();
    assert!(got.truncated);
    assert_eq!(got.body.len(), 4 << 20);
}

/// The length attack: PostHog's query route echoes what the caller sends. The
/// caller makes the echo end just before the 4 MiB cap and reads the
/// answer's length, `truncated` and `redactions`, hoping they differ when
/// its guess is a true prefix of a stored secret, of an encoding of it, or of
/// the auth header.
#[tokio::test]
async fn an_answer_cut_at_the_cap_says_nothing_about_a_guess() {
    const CAP: usize = 4 << 20;
    let w = world(|r| {
        let mut body = vec![b'.'; CAP - r.body.len()];
        body.extend_from_slice(&r.body);
        body.extend_from_slice(&[b'.'; 300]);
        Reply {
            body: body.into(),
            ..Reply::json(200, "")
        }
    })
    .await;
    let bearer = format!("Bearer {PHX}");
    // The characters of the key's base64 that depend on the key alone: any
    // longer prefix of its encoding holds the whole key.
    let encoded = base64::engine::general_purpose::STANDARD.encode(PHX);
    let encoded = &encoded[..PHX.len() * 8 / 6];
    let escaped: String = PHX
        .chars()
        .map(|c| format!("\\u{:04x}", u32::from(c)))
        .collect();
    let mut answers = Vec::new();
    for needle in [bearer.as_str(), PHX, encoded, escaped.as_str()] {
        for len in [6, 11, 20, needle.len() - 1] {
            let truth = &needle[..len];
            // The same length, the last byte wrong.
            let mut wrong = truth.as_bytes().to_vec();
            let last = wrong.len() - 1;
            wrong[last] = if wrong[last] == b'Z' { b'Y' } else { b'Z' };
            for guess in [truth.as_bytes().to_vec(), wrong] {
                let mut query = request("posthog", "POST", "/api/projects/42/query/");
                query.body = guess;
                let got = w.proxy(query).await.unwrap();
                answers.push((got.body.len(), got.truncated, got.redactions, got.status));
            }
        }
    }
    assert_eq!(answers.len(), 32);
    assert!(
        answers.iter().all(|a| *a == (CAP, true, 0, 200)),
        "answers differ: {answers:?}"
    );
}

#[tokio::test]
async fn a_429_passes_through_and_starts_the_shared_cool_down() {
    let w =
        world(|_| Reply::json(429, r#"{"error":"too many"}"#).header("retry-after", "30")).await;
    let first = w
        .proxy(request("amplitude", "GET", "/api/3/cohorts"))
        .await
        .unwrap();
    assert_eq!(first.status, 429);
    assert_eq!(first.headers["retry-after"], "30");
    assert!(!first.answered_by_vault);
    assert_eq!(w.fake.request_count(), 1);

    let second = w
        .proxy(request("amplitude", "GET", "/api/3/annotations"))
        .await
        .unwrap();
    assert_eq!(second.status, 429);
    assert!(second.answered_by_vault);
    let left: u32 = second.headers["retry-after"].parse().unwrap();
    assert!((1..=30).contains(&left), "{left}");
    let v = w.validate("amplitude").await;
    assert_eq!(
        credvault::proto::validation::Verdict::try_from(v.verdict).unwrap(),
        credvault::proto::validation::Verdict::RateLimited
    );
    assert_eq!(
        w.fake.request_count(),
        1,
        "neither call reached the provider"
    );

    // Another connection is not held back.
    w.proxy(request("posthog", "GET", "/api/projects/42/cohorts/"))
        .await
        .unwrap();
    assert_eq!(w.fake.request_count(), 2);
}

#[tokio::test]
async fn redirects_are_passed_back_not_followed() {
    let w = world(|_| Reply::json(302, "").header("location", "https://evil.example/steal")).await;
    let got = w
        .proxy(request("amplitude", "GET", "/api/3/cohorts"))
        .await
        .unwrap();
    assert_eq!(got.status, 302);
    assert!(!got.headers.contains_key("location"));
    assert_eq!(w.fake.request_count(), 1);
}

#[tokio::test]
async fn a_compressed_answer_is_refused_not_passed_on() {
    let w =
        world(|_| Reply::json(200, "\u{1f}\u{8b}binary").header("content-encoding", "gzip")).await;
    let err = w
        .proxy(request("amplitude", "GET", "/api/3/cohorts"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("content-encoding"));
}

/// Only the first `content-encoding` header used to be read: `identity`
/// followed by `gzip` let an unscrubbable body through. Validation reads
/// answers the same way.
#[tokio::test]
async fn an_answer_with_any_encoding_but_identity_is_refused() {
    let w = world(|_| {
        Reply::json(200, "\u{1f}\u{8b}binary")
            .header("content-encoding", "identity")
            .header("content-encoding", "gzip")
    })
    .await;
    let err = w
        .proxy(request("amplitude", "GET", "/api/3/cohorts"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("`gzip`"), "{}", err.message());
    let v = w.validate("posthog").await;
    assert_eq!(
        credvault::proto::validation::Verdict::try_from(v.verdict).unwrap(),
        credvault::proto::validation::Verdict::Unreachable
    );
    assert!(v.message.contains("content-encoding"), "{}", v.message);
}

/// An echoing provider may escape any character of a key in a JSON string
/// (`\u0070` for `p`) or percent-encode it: each form is found.
#[tokio::test]
async fn escaped_and_percent_encoded_echoes_are_scrubbed() {
    let w = world(|_| {
        let escaped: String = PHX
            .chars()
            .map(|c| format!("\\u{:04x}", u32::from(c)))
            .collect();
        let mixed = format!("\\u0070hx_{}", &PHX[4..]);
        let percent: String = PHX.bytes().map(|b| format!("%{b:02X}")).collect();
        let query = format!("q={}", PHX.replace('_', "%5f"));
        Reply::json(
            200,
            &format!(r#"{{"a":"{escaped}","b":"{mixed}","c":"{percent}","d":"{query}"}}"#),
        )
    })
    .await;
    let got = w
        .proxy(request("posthog", "GET", "/api/projects/42/cohorts/"))
        .await
        .unwrap();
    let body = String::from_utf8(got.body.clone()).unwrap();
    assert_eq!(got.redactions, 4, "{body}");
    for canary in ["Rk3Vw9Qm", "u0052\\u006b", "%52%6B"] {
        assert!(!body.contains(canary), "{canary} left in {body}");
    }
}

/// A provider may echo anything into a header's name, not only its value.
#[tokio::test]
async fn a_header_name_that_echoes_a_key_is_not_passed_back() {
    let w = world(|_| {
        Reply::json(200, COHORTS)
            .header(&format!("x-ratelimit-{API_KEY}"), "1")
            .header("ratelimit-remaining", "7")
    })
    .await;
    let got = w
        .proxy(request("amplitude", "GET", "/api/3/cohorts"))
        .await
        .unwrap();
    let mut names: Vec<&String> = got.headers.keys().collect();
    names.sort();
    assert_eq!(names, ["content-type", "ratelimit-remaining"], "{names:?}");
}

/// An HTTP/2 provider that answers a request with GOAWAY, its debug data
/// holding the credential it was sent. The HTTP/2 library quotes debug
/// data in its error text, which the vault used to pass on to the caller
/// and into the stored verdict.
#[tokio::test]
async fn library_error_text_never_reaches_a_caller() {
    let dir_ca = credvault::dev::certs::DevCa::generate("goaway CA").unwrap();
    let goaway = goaway_server(&dir_ca).await;
    let w = world_with(
        |_| Reply::json(200, "{}"),
        |config| {
            let ca = tempfile::NamedTempFile::new()
                .unwrap()
                .into_temp_path()
                .keep()
                .unwrap();
            std::fs::write(
                &ca,
                format!(
                    "{}{}",
                    std::fs::read_to_string(config.outbound.extra_ca_file.as_ref().unwrap())
                        .unwrap(),
                    dir_ca.cert_pem()
                ),
            )
            .unwrap();
            config.outbound.extra_ca_file = Some(ca);
            config.providers.posthog.base_urls = [(
                "us".to_owned(),
                format!("https://127.0.0.1:{}", goaway.port()),
            )]
            .into();
        },
    )
    .await;
    let err = w
        .proxy(request("posthog", "GET", "/api/projects/42/cohorts/"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let v = w.validate("posthog").await;
    let seen = format!("{} {} {}", err.message(), v.message, v.display_name);
    assert!(seen.contains("PostHog"), "{seen}");
    for window in common::windows(PHX, 8) {
        assert!(!seen.contains(&window), "{window} leaked in {seen}");
    }
}

/// Accepts TLS with ALPN h2, reads the client's preface and request, and
/// answers GOAWAY(PROTOCOL_ERROR) whose debug data is whatever
/// `authorization` value it saw: the raw frames, since no HTTP/2 server
/// library sends debug data on request.
async fn goaway_server(ca: &credvault::dev::certs::DevCa) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = ca
        .issue(
            "goaway provider",
            credvault::dev::certs::Subject::Server(&["127.0.0.1"]),
        )
        .unwrap();
    let chain =
        vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..16 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            // Empty SETTINGS, then wait for the request's HEADERS.
            let _ = tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
            let mut seen = vec![0u8; 4096];
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(500), tls.read(&mut seen))
                    .await;
            let debug = format!("Bearer {PHX}");
            let mut frame = Vec::new();
            let length = 8 + debug.len();
            frame.extend_from_slice(&u32::try_from(length).unwrap().to_be_bytes()[1..]);
            frame.extend_from_slice(&[7, 0, 0, 0, 0, 0]);
            frame.extend_from_slice(&0u32.to_be_bytes());
            frame.extend_from_slice(&1u32.to_be_bytes());
            frame.extend_from_slice(debug.as_bytes());
            let _ = tls.write_all(&frame).await;
            let _ = tls.flush().await;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    addr
}

#[tokio::test]
async fn a_disconnected_connection_sends_nothing() {
    let w = world(|_| Reply::json(200, "{}")).await;
    w.vault
        .client()
        .await
        .zero(reference("ws", "amplitude"))
        .await
        .unwrap();
    let err = w
        .proxy(request("amplitude", "GET", "/api/3/cohorts"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let mut missing = request("amplitude", "GET", "/api/3/cohorts");
    missing.workspace_id = "nobody".into();
    assert_eq!(w.proxy(missing).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(w.fake.request_count(), 0);
}

#[tokio::test]
async fn audit_events_record_the_route_and_sizes_never_the_query_or_body() {
    let w = world(|_| Reply::json(201, r#"{"id":7}"#)).await;
    let mut r = request(
        "amplitude",
        "POST",
        "/api/2/annotations?label=QUERYCANARY77",
    );
    r.body = br#"{"details":"BODYCANARY88"}"#.to_vec();
    w.proxy(r.clone()).await.unwrap();
    let refused = w
        .proxy(request("amplitude", "GET", "/api/2/../QUERYCANARY77"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);

    let mut auditor = AuditClient::new(
        w.dir
            .channel_as(&w.vault, "spiffe://credvault.local/auditor")
            .await,
    );
    let mut stream = auditor
        .subscribe(SubscribeRequest { after_sequence: 3 })
        .await
        .unwrap()
        .into_inner();
    let started = stream.message().await.unwrap().unwrap();
    let sent = stream.message().await.unwrap().unwrap();
    let denied = stream.message().await.unwrap().unwrap();
    assert_eq!(started.outcome, "STARTED");
    assert_eq!(started.proxy.as_ref().unwrap().status, 0, "not sent yet");
    assert_eq!(sent.method, "Credentials.Proxy");
    assert_eq!(sent.outcome, "OK");
    let proxied = sent.proxy.clone().unwrap();
    assert_eq!(proxied.method, "POST");
    assert_eq!(proxied.route, "/api/2/annotations");
    assert_eq!(proxied.status, 201);
    assert_eq!(proxied.request_bytes, r.body.len() as u64);
    assert_eq!(proxied.response_bytes, 8);
    assert!(!sent.secrets["secret_key"].hint.is_empty());
    assert_eq!(denied.outcome, "INVALID_ARGUMENT");
    assert!(denied.proxy.is_none());
    let text = format!("{started:?} {sent:?} {denied:?}");
    assert!(!text.contains("QUERYCANARY77"));
    assert!(!text.contains("BODYCANARY88"));
    assert!(!text.contains(SECRET));

    let stored = w.dir.texts("SELECT event FROM audit_events").join("\n");
    assert!(!stored.contains("QUERYCANARY77") && !stored.contains("BODYCANARY88"));
    if common::on_sqlite() {
        let db = std::fs::read(w.dir.db()).unwrap();
        assert!(!common::contains_bytes(&db, b"QUERYCANARY77"));
        assert!(!common::contains_bytes(&db, b"BODYCANARY88"));
    }

    // The chain, Proxy events and all, verifies from the database and from
    // an export read over the Audit API.
    let export = common::verify_audit(&w.dir, &w.vault, &w.dir.config()).await;
    let exported = std::fs::read_to_string(&export).unwrap();
    assert!(exported.contains("/api/2/annotations"));
    assert!(!exported.contains("QUERYCANARY77") && !exported.contains("BODYCANARY88"));
}

#[tokio::test]
async fn policy_and_configuration_narrow_the_allowlist() {
    const NARROW: &str = "spiffe://credvault.local/annotator";
    let w = world_with(
        |_| Reply::json(200, "{}"),
        |config| {
            config.policy.push(Rule {
                identity: NARROW.into(),
                allow: vec!["Proxy".into()],
                providers: vec!["amplitude".into()],
                workspaces: vec!["*".into()],
                proxy: Some(vec!["POST /api/3/annotations".into()]),
            });
            config.providers.posthog.proxy =
                Some(vec!["GET /api/projects/{project_id}/cohorts/".into()]);
        },
    )
    .await;
    let mut narrow = credvault::proto::credentials_client::CredentialsClient::new(
        w.dir.channel_as(&w.vault, NARROW).await,
    );
    let mut post = request("amplitude", "POST", "/api/3/annotations");
    post.body = b"{}".to_vec();
    narrow.proxy(post).await.unwrap();
    let err = narrow
        .proxy(request("amplitude", "GET", "/api/3/cohorts"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let err = w
        .proxy(request("posthog", "GET", "/api/projects/42/annotations/"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("configuration"), "{err:?}");
    w.proxy(request("posthog", "GET", "/api/projects/42/cohorts/"))
        .await
        .unwrap();
    assert_eq!(w.fake.request_count(), 2);
}

#[tokio::test]
async fn a_configuration_cannot_widen_the_allowlist() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.providers.amplitude.proxy = Some(vec!["DELETE /api/3/cohorts".into()]);
    let path = dir.path().join("credvault.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("only narrow"), "{err}");
}

/// `credvault call` as a person would run it, against the test vault.
async fn cli_call(w: &World, args: &[&str], stdin: &[u8]) -> (bool, Vec<u8>, String) {
    let p = w.dir.path();
    common::write_private(&p.join("app.pem"), w.dir.app.cert_pem.as_bytes());
    common::write_private(&p.join("app-key.pem"), w.dir.app.key_pem.as_bytes());
    let url = w.vault.url();
    let (ca, cert, key) = (p.join("ca.pem"), p.join("app.pem"), p.join("app-key.pem"));
    let mut all: Vec<&std::ffi::OsStr> = vec![
        "call".as_ref(),
        "--addr".as_ref(),
        url.as_ref(),
        "--ca".as_ref(),
        ca.as_os_str(),
        "--cert".as_ref(),
        cert.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
    ];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    let out = common::credvault_cli(&all, stdin).await;
    (
        out.status.success(),
        out.stdout,
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_calls_through_the_vault_and_posts_stdin() {
    let w = world(|r| {
        if r.method == "POST" {
            Reply::json(200, r#"{"success":true,"annotation":{"id":1}}"#)
        } else if r.path_and_query.contains("cohorts") {
            Reply::json(200, COHORTS)
        } else {
            Reply::json(403, r#"{"error":"forbidden"}"#)
        }
    })
    .await;
    let ws = ["--workspace", "ws", "--provider", "amplitude"];
    let (ok, body, err) = cli_call(&w, &[&ws[..], &["GET", "/api/3/cohorts"]].concat(), b"").await;
    assert!(ok, "{err}");
    assert_eq!(body, COHORTS.as_bytes());
    assert!(err.contains("HTTP 200"), "{err}");

    let annotation = br#"{"label":"Bet shipped","start":"2026-11-24T12:00:00Z"}"#;
    let (ok, body, err) = cli_call(
        &w,
        &[&ws[..], &["POST", "/api/3/annotations"]].concat(),
        annotation,
    )
    .await;
    assert!(ok, "{err}");
    assert!(String::from_utf8(body).unwrap().contains("success"));
    let posted = w.fake.requests().pop().unwrap();
    assert_eq!(posted.body, annotation.as_slice());
    assert_eq!(posted.headers["content-type"], "application/json");

    let (ok, _, err) = cli_call(&w, &[&ws[..], &["GET", "/api/2/events/list"]].concat(), b"").await;
    assert!(!ok && err.contains("HTTP 403"), "{err}");
    let (ok, _, err) = cli_call(&w, &[&ws[..], &["GET", "/api/2/../x"]].concat(), b"").await;
    assert!(!ok && err.contains("InvalidArgument"), "{err}");
}

#[tokio::test]
async fn a_call_cancelled_after_it_reached_the_provider_is_still_audited() {
    let w = world(|_| Reply::json(200, "{}").after(std::time::Duration::from_millis(1_500))).await;
    let mut c = w.vault.client().await;
    for _ in 0..3 {
        // The caller gives up (RST_STREAM) while the provider is answering.
        let cancelled = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            c.proxy(request("posthog", "GET", "/api/projects/42/cohorts/")),
        )
        .await;
        assert!(
            cancelled.is_err(),
            "the call finished before it was cancelled"
        );
    }
    let cancelled = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        c.validate_connection(reference("ws", "posthog")),
    )
    .await;
    assert!(cancelled.is_err());
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(w.fake.request_count(), 4, "the provider got every request");
    let mut stream = w.dir.audit_stream(&w.vault, 0).await;
    let mut accounted = std::collections::BTreeMap::<(String, bool), u64>::new();
    while let Ok(Ok(Some(e))) =
        tokio::time::timeout(std::time::Duration::from_millis(500), stream.message()).await
    {
        if e.method == "Credentials.Proxy" || e.method == "Credentials.ValidateConnection" {
            let started = e.outcome == "STARTED";
            *accounted.entry((e.method.clone(), started)).or_default() += e.count.max(1);
        }
    }
    for (method, calls) in [
        ("Credentials.Proxy", 3),
        ("Credentials.ValidateConnection", 1),
    ] {
        assert_eq!(
            accounted.get(&(method.to_owned(), true)),
            Some(&calls),
            "each call committed its event before it was sent: {accounted:?}"
        );
        assert_eq!(
            accounted.get(&(method.to_owned(), false)),
            Some(&calls),
            "every cancelled call that reached the provider is accounted for: {accounted:?}"
        );
    }
}

/// With audit inserts failing, no call reaches a provider: a Proxy (GET or
/// POST), a ValidateConnection and a Store with `validate` all answer
/// UNAVAILABLE, and the provider gets nothing. Once the log takes events
/// again, a call's event is committed before it is sent and its outcome after.
#[tokio::test]
async fn with_audit_writes_failing_nothing_is_sent() {
    let w = world(|_| Reply::json(200, COHORTS)).await;
    let mut c = w.vault.client().await;
    w.fake.clear_requests();
    w.dir.fail_audit_writes();
    let post = ProxyRequest {
        body: br#"{"label":"x","start":"2026-11-24T12:00:00Z"}"#.to_vec(),
        ..request("amplitude", "POST", "/api/3/annotations")
    };
    for r in [request("amplitude", "GET", "/api/3/cohorts"), post] {
        let err = w.proxy(r).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
    let err = c
        .validate_connection(reference("ws", "posthog"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = c
        .store(StoreRequest {
            validate: true,
            ..posthog("43")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(w.fake.request_count(), 0, "the provider got a request");

    w.dir.restore_audit_writes();
    let head = w.dir.number("SELECT max(sequence) FROM audit_events");
    w.proxy(request("amplitude", "GET", "/api/3/cohorts"))
        .await
        .unwrap();
    assert_eq!(w.fake.request_count(), 1);
    let mut stream = w
        .dir
        .audit_stream(&w.vault, u64::try_from(head).unwrap())
        .await;
    let started = stream.message().await.unwrap().unwrap();
    let done = stream.message().await.unwrap().unwrap();
    assert_eq!(
        (started.method.as_str(), started.outcome.as_str()),
        ("Credentials.Proxy", "STARTED")
    );
    assert_eq!(done.outcome, "OK");
    assert_eq!(started.request_id, done.request_id);
    let route = started.proxy.as_ref().map(|p| p.route.as_str());
    assert_eq!(route, Some("/api/3/cohorts"));
    assert_eq!(done.proxy.unwrap().status, 200);
}
