//! Authorization: each identity may call exactly what the policy allows; anything else is
//! PERMISSION_DENIED naming the identity and the method, whether or not the target exists.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::{amplitude, reference, VaultDir};
use credvault::dev::certs::Subject;
use credvault::policy::Rule;
use credvault::proto::credentials_client::CredentialsClient;
use credvault::proto::{ListProvidersRequest, ListRequest};
use tonic::transport::Channel;
use tonic::{Code, Status};

const SECRET: &str = "Vq8rKw2Lx7Mz4Nc9Pb3Td6Yf1Gh5Js0U";

/// Calls every Credentials method once; returns the codes in a fixed order.
async fn codes(c: &mut CredentialsClient<Channel>, workspace: &str) -> Vec<Code> {
    let code = |r: Result<(), Status>| r.err().map_or(Code::Ok, |s| s.code());
    vec![
        code(
            c.store(amplitude(workspace, SECRET, SECRET))
                .await
                .map(drop),
        ),
        code(c.redact(reference(workspace, "amplitude")).await.map(drop)),
        code(
            c.list(ListRequest {
                workspace_id: workspace.into(),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        code(c.list_providers(ListProvidersRequest {}).await.map(drop)),
        code(c.zero(reference(workspace, "amplitude")).await.map(drop)),
    ]
}

#[tokio::test]
async fn each_dev_role_gets_exactly_its_methods() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut app = vault.client().await;
    assert!(codes(&mut app, "ws").await.iter().all(|c| *c == Code::Ok));
    for role in ["admin", "auditor"] {
        let cert = dir
            .ca
            .issue(
                role,
                Subject::ClientUris(&[&format!("spiffe://credvault.local/{role}")]),
            )
            .unwrap();
        let mut c = vault
            .client_as(&cert.cert_pem, &cert.key_pem)
            .await
            .unwrap();
        let got = codes(&mut c, "ws").await;
        assert!(
            got.iter().all(|c| *c == Code::PermissionDenied),
            "{role}: {got:?}"
        );
    }
}

#[tokio::test]
async fn identity_without_policy_is_denied_without_learning_whether_the_target_exists() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    vault
        .client()
        .await
        .store(amplitude("ws", SECRET, SECRET))
        .await
        .unwrap();
    let who = "spiffe://credvault.local/stranger";
    let cert = dir
        .ca
        .issue("stranger", Subject::ClientUris(&[who]))
        .unwrap();
    let mut c = vault
        .client_as(&cert.cert_pem, &cert.key_pem)
        .await
        .unwrap();
    let existing = c.redact(reference("ws", "amplitude")).await.unwrap_err();
    let missing = c.redact(reference("nope", "posthog")).await.unwrap_err();
    assert_eq!(existing.code(), Code::PermissionDenied);
    assert_eq!(
        existing.message(),
        format!("identity `{who}` may not call `Redact`")
    );
    assert_eq!(missing.code(), existing.code());
    assert_eq!(
        missing.message(),
        format!("identity `{who}` may not call `Redact`")
    );
    let garbage = c.redact(reference("", "")).await.unwrap_err();
    assert_eq!(
        garbage.code(),
        Code::PermissionDenied,
        "denied before the input is even parsed"
    );
}

#[tokio::test]
async fn rules_scope_identities_to_workspaces_and_providers() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.policy.push(Rule {
        identity: "spiffe://corp/team-a/*".into(),
        allow: vec!["Store".into(), "Redact".into()],
        providers: vec!["amplitude".into()],
        workspaces: vec!["team-a-*".into()],
        proxy: None,
    });
    let vault = dir.start_with(config).await;
    let cert = dir
        .ca
        .issue(
            "billing",
            Subject::ClientUris(&["spiffe://corp/team-a/billing"]),
        )
        .unwrap();
    let mut c = vault
        .client_as(&cert.cert_pem, &cert.key_pem)
        .await
        .unwrap();
    c.store(amplitude("team-a-1", SECRET, SECRET))
        .await
        .unwrap();
    c.redact(reference("team-a-1", "amplitude")).await.unwrap();
    let denied = [
        c.store(amplitude("team-b-1", SECRET, SECRET))
            .await
            .unwrap_err(),
        c.redact(reference("team-a-1", "posthog"))
            .await
            .unwrap_err(),
        c.zero(reference("team-a-1", "amplitude"))
            .await
            .unwrap_err(),
    ];
    for status in denied {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
}

#[test]
fn a_rule_naming_a_dns_name_is_refused_before_serving() {
    let err = credvault::policy::Policy::compile(&[Rule {
        identity: "svc.internal".into(),
        allow: vec!["ListProviders".into()],
        providers: vec!["*".into()],
        workspaces: vec!["*".into()],
        proxy: None,
    }])
    .unwrap_err();
    assert!(err.contains("not a SPIFFE ID"), "{err}");
}

#[tokio::test]
async fn a_rule_narrowed_to_providers_lists_only_their_connections() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.policy.push(Rule {
        identity: "spiffe://credvault.local/posthog-sync".into(),
        allow: vec!["List".into(), "ListProviders".into()],
        providers: vec!["posthog".into()],
        workspaces: vec!["*".into()],
        proxy: None,
    });
    let vault = dir.start_with(config).await;
    let mut app = vault.client().await;
    app.store(amplitude("ws", SECRET, SECRET)).await.unwrap();
    app.store(credvault::proto::StoreRequest {
        workspace_id: "ws".into(),
        provider: "posthog".into(),
        secrets: common::map(&[("personal_api_key", "phx_Vq8rKw2Lx7Mz4Nc9Pb3Td6Yf1Gh5Js0U")]),
        params: common::map(&[("project_id", "1")]),
        validate: false,
    })
    .await
    .unwrap();
    let mut narrow = CredentialsClient::new(
        dir.channel_as(&vault, "spiffe://credvault.local/posthog-sync")
            .await,
    );
    let listed = narrow
        .list(ListRequest {
            workspace_id: "ws".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let providers: Vec<_> = listed
        .credentials
        .iter()
        .map(|c| c.provider.as_str())
        .collect();
    assert_eq!(providers, ["posthog"], "amplitude leaked through List");
    let described = narrow
        .list_providers(ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = described
        .providers
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["posthog"]);
    // The app's rule covers every provider: it still sees both.
    let all = app
        .list(ListRequest {
            workspace_id: "ws".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.credentials.len(), 2);
}

#[tokio::test]
async fn a_rule_narrowed_to_workspaces_cannot_read_the_whole_audit_log() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.policy.push(Rule {
        identity: "spiffe://credvault.local/team-a-auditor".into(),
        allow: vec!["Audit.*".into()],
        providers: vec!["*".into()],
        workspaces: vec!["team-a-*".into()],
        proxy: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let started = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        credvault::run(config, listener, std::future::pending()),
    )
    .await;
    let err = match started {
        Ok(result) => result.unwrap_err().to_string(),
        Err(_) => panic!("the vault served a workspace-narrowed rule the whole audit log"),
    };
    assert!(
        err.contains("Audit") && err.contains("policy rule 4"),
        "{err}"
    );
}
