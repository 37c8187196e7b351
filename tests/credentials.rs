//! Store, Redact, Zero, List and ListProviders end to end over mutual TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::{amplitude, jwt, map, reference, VaultDir};
use credvault::proto::{ListProvidersRequest, ListRequest, Status as ConnStatus, StoreRequest};
use tonic::Code;

const API_KEY: &str = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6";
const SECRET: &str = "s3cr3tKEYvalue0123456789abcdefXY";

#[tokio::test]
async fn store_then_redact_shows_params_and_hints_only() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let mut req = amplitude("ws1", API_KEY, SECRET);
    req.params = map(&[("region", "eu")]);
    let stored = c.store(req).await.unwrap().into_inner();
    assert_eq!(stored.status, ConnStatus::Connected as i32);
    assert_eq!(stored.params["region"], "eu");
    assert_eq!(stored.key_version, 1);
    assert_eq!(stored.secrets["api_key"].hint, "a1b2…");
    assert_eq!(stored.secrets["secret_key"].hint, "s3cr…");
    assert_eq!(stored.secrets["secret_key"].fingerprint.len(), 8);
    assert!(stored.created_at.is_some() && stored.disconnected_at.is_none());

    let redacted = c
        .redact(reference("ws1", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(redacted, stored);
}

#[tokio::test]
async fn list_returns_every_connection_of_the_workspace_only() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    c.store(amplitude("ws1", API_KEY, SECRET)).await.unwrap();
    c.store(StoreRequest {
        workspace_id: "ws1".into(),
        provider: "posthog".into(),
        secrets: map(&[("personal_api_key", "phx_0123456789abcdefghij")]),
        params: map(&[("project_id", "42")]),
        ..StoreRequest::default()
    })
    .await
    .unwrap();
    c.store(amplitude("ws2", API_KEY, SECRET)).await.unwrap();
    let list = c
        .list(ListRequest {
            workspace_id: "ws1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list
        .credentials
        .iter()
        .map(|c| c.provider.as_str())
        .collect();
    assert_eq!(names, ["amplitude", "posthog"]);
    assert_eq!(
        list.credentials[1].secrets["personal_api_key"].hint,
        "phx_0123…"
    );
    let empty = c
        .list(ListRequest {
            workspace_id: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.credentials.is_empty());
}

#[tokio::test]
async fn list_providers_describes_fields_and_allowed_values() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let providers = vault
        .client()
        .await
        .list_providers(ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner()
        .providers;
    let amplitude = providers.iter().find(|p| p.name == "amplitude").unwrap();
    let secrets: Vec<_> = amplitude.secrets.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(secrets, ["api_key", "secret_key"]);
    assert_eq!(amplitude.params[0].allowed_values, ["us", "eu"]);
    assert_eq!(amplitude.params[0].default_value, "us");
    let amperity = providers.iter().find(|p| p.name == "amperity").unwrap();
    assert_eq!(
        amperity.params[1].allowed_values,
        ["app", "tenant", "apse2"]
    );
    assert!(providers.iter().any(|p| p.name == "posthog"));
}

#[tokio::test]
async fn zero_destroys_secrets_keeps_metadata_and_is_idempotent() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let mut req = amplitude("ws1", API_KEY, SECRET);
    req.params = map(&[("region", "eu")]);
    let stored = c.store(req).await.unwrap().into_inner();

    let zeroed = c
        .zero(reference("ws1", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(zeroed.status, ConnStatus::Disconnected as i32);
    assert!(zeroed.secrets.is_empty());
    assert_eq!(zeroed.params["region"], "eu");
    assert_eq!(zeroed.created_at, stored.created_at);
    assert_eq!(zeroed.key_version, 0);
    assert!(zeroed.disconnected_at.is_some());

    let again = c
        .zero(reference("ws1", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, zeroed, "a second Zero changes nothing");
    let redacted = c
        .redact(reference("ws1", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        redacted.secrets.is_empty(),
        "Redact after Zero shows no secrets"
    );
}

#[tokio::test]
async fn zero_then_restart_keeps_the_metadata() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    c.store(amplitude("ws1", API_KEY, SECRET)).await.unwrap();
    let zeroed = c
        .zero(reference("ws1", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    drop(c);
    vault.stop().await;

    let vault = dir.start().await;
    let after = vault
        .client()
        .await
        .redact(reference("ws1", "amplitude"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, zeroed);
}

#[tokio::test]
async fn store_on_a_disconnected_connection_reconnects_it() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let first = c
        .store(amplitude("ws1", API_KEY, SECRET))
        .await
        .unwrap()
        .into_inner();
    c.zero(reference("ws1", "amplitude")).await.unwrap();
    let again = c
        .store(amplitude("ws1", API_KEY, SECRET))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.status, ConnStatus::Connected as i32);
    assert!(again.disconnected_at.is_none());
    assert_eq!(again.created_at, first.created_at);
    assert_eq!(
        again.secrets, first.secrets,
        "same secret, same hint and fingerprint"
    );
}

#[tokio::test]
async fn store_on_a_connected_connection_replaces_the_secrets() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let first = c
        .store(amplitude("ws1", API_KEY, SECRET))
        .await
        .unwrap()
        .into_inner();
    let second = c
        .store(amplitude("ws1", API_KEY, "anotherSecretValue0123456789zz"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.secrets["api_key"], first.secrets["api_key"]);
    assert_ne!(
        second.secrets["secret_key"].fingerprint,
        first.secrets["secret_key"].fingerprint
    );
    assert_eq!(second.created_at, first.created_at);
}

#[tokio::test]
async fn equal_secrets_in_two_workspaces_share_a_fingerprint() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let a = c
        .store(amplitude("ws1", API_KEY, SECRET))
        .await
        .unwrap()
        .into_inner();
    let b = c
        .store(amplitude("ws2", API_KEY, SECRET))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.secrets, b.secrets);
}

#[tokio::test]
async fn unknown_connection_is_not_found() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    for status in [
        c.redact(reference("ws1", "amplitude")).await.unwrap_err(),
        c.zero(reference("ws1", "posthog")).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
}

#[tokio::test]
async fn amperity_token_expiry_is_reported_and_an_expired_token_refused() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let request = |token: String| StoreRequest {
        workspace_id: "ws1".into(),
        provider: "amperity".into(),
        secrets: map(&[("access_token", &token)]),
        params: map(&[("tenant_id", "acme")]),
        ..StoreRequest::default()
    };
    let stored = c
        .store(request(jwt(r#"{"exp":4102444800}"#)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.expires_at.unwrap().seconds, 4_102_444_800);
    assert_eq!(stored.params["host"], "app");
    assert!(stored.secrets["access_token"].hint.starts_with("eyJ…"));

    let no_exp = c
        .store(request(jwt(r#"{"sub":"x"}"#)))
        .await
        .unwrap()
        .into_inner();
    assert!(no_exp.expires_at.is_none());

    let expired = c.store(request(jwt(r#"{"exp":1000}"#))).await.unwrap_err();
    assert_eq!(expired.code(), Code::FailedPrecondition);
    assert!(expired.message().contains("expired"));
    let kept = c
        .redact(reference("ws1", "amperity"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        kept.secrets, no_exp.secrets,
        "a refused Store changes nothing"
    );
}

/// Every bad input: INVALID_ARGUMENT naming the field, the value never echoed, nothing stored.
#[tokio::test]
async fn rejects_bad_input_naming_the_field_without_echoing_values() {
    const CANARY: &str = "CANARYcanary0123456789";
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let req = |ws: &str, provider: &str, secrets: &[(&str, &str)], params: &[(&str, &str)]| {
        StoreRequest {
            workspace_id: ws.into(),
            provider: provider.into(),
            secrets: map(secrets),
            params: map(params),
            ..StoreRequest::default()
        }
    };
    let good = [("api_key", CANARY), ("secret_key", CANARY)];
    let long = CANARY.repeat(20);
    let cases = [
        (
            req("ws", "salesforce", &good, &[]),
            "provider `salesforce` is unknown",
        ),
        (req("ws", "", &good, &[]), "provider is missing"),
        (
            req("", "amplitude", &good, &[]),
            "`workspace_id` must not be empty",
        ),
        (
            req("w s", "amplitude", &good, &[]),
            "`workspace_id` may hold only",
        ),
        (
            req("ws", "amplitude", &[("api_key", CANARY)], &[]),
            "field `secret_key` is missing",
        ),
        (
            req(
                "ws",
                "amplitude",
                &[("api_key", CANARY), ("secret_key", "")],
                &[],
            ),
            "field `secret_key` is empty",
        ),
        (
            req(
                "ws",
                "amplitude",
                &[
                    ("api_key", "CANARYcanary0123456789 "),
                    ("secret_key", CANARY),
                ],
                &[],
            ),
            "field `api_key` has leading or trailing whitespace",
        ),
        (
            req(
                "ws",
                "amplitude",
                &[("api_key", CANARY), ("secret_key", "\tCANARYcanary")],
                &[],
            ),
            "field `secret_key` has leading or trailing whitespace",
        ),
        (
            req(
                "ws",
                "amplitude",
                &[("api_key", "CANARY\u{0}canary"), ("secret_key", CANARY)],
                &[],
            ),
            "field `api_key` contains control characters",
        ),
        (
            req(
                "ws",
                "amplitude",
                &[("api_key", &long), ("secret_key", CANARY)],
                &[],
            ),
            "field `api_key` is longer than 256 bytes",
        ),
        (
            req(
                "ws",
                "amplitude",
                &[
                    ("api_key", CANARY),
                    ("secret_key", CANARY),
                    ("token", CANARY),
                ],
                &[],
            ),
            "unknown field `token` for provider `amplitude`",
        ),
        (
            req("ws", "amplitude", &good, &[("region", "ap")]),
            "parameter `region` must be one of us, eu",
        ),
        (
            req("ws", "amplitude", &good, &[("colour", "red")]),
            "unknown parameter `colour`",
        ),
        (
            req(
                "ws",
                "amperity",
                &[("access_token", CANARY)],
                &[("tenant_id", "acme")],
            ),
            "field `access_token` is not a JWT",
        ),
        (
            req("ws", "amperity", &[("access_token", &jwt("{}"))], &[]),
            "parameter `tenant_id` is missing",
        ),
        (
            req(
                "ws",
                "posthog",
                &[("personal_api_key", "phc_CANARYcanary0123456789")],
                &[("project_id", "1")],
            ),
            "project token",
        ),
        (
            req(
                "ws",
                "posthog",
                &[("personal_api_key", "phx_CANARYcanary0123456789")],
                &[("project_id", "one")],
            ),
            "parameter `project_id` must be a positive integer",
        ),
    ];
    for (request, expected) in cases {
        let status = c.store(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(expected),
            "{:?} lacks {expected:?}",
            status.message()
        );
        assert!(
            !status.message().contains("CANARY"),
            "{:?} echoes a value",
            status.message()
        );
    }
    let list = c
        .list(ListRequest {
            workspace_id: "ws".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.credentials.is_empty(), "nothing was stored");
    for bad in [reference("", "amplitude"), reference("ws", "nope")] {
        assert_eq!(
            c.redact(bad).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}

#[tokio::test]
async fn rejects_oversized_messages() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut c = vault.client().await;
    let huge = "x".repeat(128 * 1024);
    let status = c.store(amplitude("ws", &huge, SECRET)).await.unwrap_err();
    assert!(status.code() == Code::ResourceExhausted, "{status:?}");
    assert!(!status.message().contains("xxxxxxxx"));
}
