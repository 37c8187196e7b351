//! Attacks on the promise that only the vault can decrypt a provider key, each
//! tried the way an attacker would: through the gRPC API, or by writing to the
//! database behind the vault's back, on either backend. RELIABILITY.md
//! ("Attacks tried") lists them with their figures; the ones that need
//! SQLite's files or locks are in at_rest.rs and faults.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::{amplitude, map, reference, TestVault, VaultDir};
use credvault::proto::{ProxyRequest, StoreRequest};
use credvault_testkit::fake::{FakeProvider, Reply};
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
