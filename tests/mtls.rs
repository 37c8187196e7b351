//! Mutual TLS: who gets in, and who is refused at the handshake.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::VaultDir;
use credvault::dev::certs::{DevCa, Subject};
use credvault::proto::credentials_client::CredentialsClient;
use credvault::proto::ListProvidersRequest;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Whether one RPC gets through with this client certificate (None: no certificate).
async fn gets_through(vault: &common::TestVault, identity: Option<(&str, &str)>) -> bool {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&vault.ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from_shared(vault.url())
        .unwrap()
        .tls_config(tls)
        .unwrap();
    // With TLS 1.3 the client may finish its side of the handshake before the
    // server refuses it, so the refusal can surface on the first call.
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    CredentialsClient::new(channel)
        .list_providers(ListProvidersRequest {})
        .await
        .is_ok()
}

#[tokio::test]
async fn accepts_client_certificate_from_the_configured_ca() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    assert!(gets_through(&vault, Some((&dir.app.cert_pem, &dir.app.key_pem))).await);
}

#[tokio::test]
async fn rejects_client_without_certificate() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    assert!(!gets_through(&vault, None).await);
}

#[tokio::test]
async fn rejects_certificate_from_another_ca() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let other = DevCa::generate("another CA").unwrap();
    let intruder = other
        .issue("app", Subject::ClientUris(&[common::APP]))
        .unwrap();
    assert!(!gets_through(&vault, Some((&intruder.cert_pem, &intruder.key_pem))).await);
}

#[tokio::test]
async fn rejects_client_certificate_with_several_uri_sans() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let ambiguous = dir
        .ca
        .issue(
            "app",
            Subject::ClientUris(&[
                "spiffe://credvault.local/app",
                "spiffe://credvault.local/admin",
            ]),
        )
        .unwrap();
    assert!(!gets_through(&vault, Some((&ambiguous.cert_pem, &ambiguous.key_pem))).await);
}

#[tokio::test]
async fn refuses_to_start_with_a_world_readable_server_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = VaultDir::new();
    let key = dir.path().join("server-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = credvault::run(dir.config(), listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server-key.pem") && err.contains("chmod 600"),
        "{err}"
    );
}

#[tokio::test]
async fn refuses_to_start_with_a_missing_root_key_naming_it() {
    let dir = VaultDir::new();
    std::fs::remove_file(dir.path().join("root.key")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = credvault::run(dir.config(), listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("root.key"), "{err}");
}

/// Whether a KeyAdmin call gets through with this certificate.
async fn gets_key_admin(
    vault: &common::TestVault,
    cert: &credvault::dev::certs::IssuedCert,
) -> bool {
    let Ok(channel) = credvault::cli::client::connect_channel(
        &vault.url(),
        vault.ca_pem.as_bytes(),
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
    )
    .await
    else {
        return false;
    };
    credvault::proto::key_admin_client::KeyAdminClient::new(channel)
        .status(credvault::proto::StatusRequest {})
        .await
        .is_ok()
}

#[tokio::test]
async fn a_dns_san_spelling_an_identity_is_no_identity() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    // A CA in the bundle that signs any DNS string, as a web PKI would.
    let forged = dir
        .ca
        .issue_with("x", Subject::ClientDns("placeholder"), |p| {
            p.subject_alt_names = vec![rcgen::SanType::DnsName(
                "spiffe://credvault.local/admin".try_into().unwrap(),
            )];
        })
        .unwrap();
    assert!(
        !gets_key_admin(&vault, &forged).await,
        "a DNS SAN got KeyAdmin"
    );
    // A plain DNS name is no identity either: identities are URI SANs only.
    let plain = dir
        .ca
        .issue("x", Subject::ClientDns("svc.internal"))
        .unwrap();
    assert!(!gets_through(&vault, Some((&plain.cert_pem, &plain.key_pem))).await);
    // The real admin still gets in.
    assert!(gets_key_admin(&vault, &dir.issue("spiffe://credvault.local/admin")).await);
}

#[tokio::test]
async fn a_uri_san_that_is_not_a_spiffe_id_is_refused() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.policy.push(credvault::policy::Rule {
        identity: "spiffe://credvault.local/jobs/*".into(),
        allow: vec!["ListProviders".into()],
        providers: vec!["*".into()],
        workspaces: vec!["*".into()],
        proxy: None,
    });
    let vault = dir.start_with(config).await;
    let fine = dir
        .ca
        .issue(
            "x",
            Subject::ClientUris(&["spiffe://credvault.local/jobs/nightly"]),
        )
        .unwrap();
    assert!(gets_through(&vault, Some((&fine.cert_pem, &fine.key_pem))).await);
    for uri in [
        "spiffe://credvault.local/jobs/../admin",
        "spiffe://credvault.local/jobs/./x",
        "spiffe://credvault.local/jobs/x?y=1",
        "spiffe://credvault.local/jobs/x#y",
        "spiffe://credvault.local/jobs//x",
        "spiffe://credvault.local/jobs/x/",
        "spiffe://credvault.local/jobs/%2e%2e",
    ] {
        let cert = dir.ca.issue("x", Subject::ClientUris(&[uri])).unwrap();
        assert!(
            !gets_through(&vault, Some((&cert.cert_pem, &cert.key_pem))).await,
            "{uri} got in"
        );
    }
}

#[tokio::test]
async fn a_ca_in_the_bundle_issues_only_for_its_own_trust_domain() {
    let dir = VaultDir::new();
    // The bundle trusts the vault's CA and an internal web PKI.
    let web = DevCa::generate("internal web PKI").unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, format!("{}{}", dir.ca.cert_pem(), web.cert_pem())).unwrap();
    let web_ca = dir.path().join("web-ca.pem");
    std::fs::write(&web_ca, web.cert_pem()).unwrap();
    let mut config = dir.config();
    config.tls.client_ca_file = bundle;
    config.tls.trust_domains = [
        (
            "spiffe://credvault.local".to_owned(),
            dir.path().join("ca.pem"),
        ),
        ("spiffe://web.example".to_owned(), web_ca),
    ]
    .into();
    config.policy.push(credvault::policy::Rule {
        identity: "spiffe://web.example/portal".into(),
        allow: vec!["ListProviders".into()],
        providers: vec!["*".into()],
        workspaces: vec!["*".into()],
        proxy: None,
    });
    let vault = dir.start_with(config).await;
    let forged = web
        .issue(
            "x",
            Subject::ClientUris(&["spiffe://credvault.local/admin"]),
        )
        .unwrap();
    assert!(
        !gets_key_admin(&vault, &forged).await,
        "the web PKI issued an admin"
    );
    let portal = web
        .issue("x", Subject::ClientUris(&["spiffe://web.example/portal"]))
        .unwrap();
    assert!(gets_through(&vault, Some((&portal.cert_pem, &portal.key_pem))).await);
    let unbound = web
        .issue(
            "x",
            Subject::ClientUris(&["spiffe://elsewhere.example/portal"]),
        )
        .unwrap();
    assert!(!gets_through(&vault, Some((&unbound.cert_pem, &unbound.key_pem))).await);
    assert!(gets_key_admin(&vault, &dir.issue("spiffe://credvault.local/admin")).await);
}

#[tokio::test]
async fn several_cas_without_trust_domains_refuse_to_start() {
    let dir = VaultDir::new();
    let web = DevCa::generate("internal web PKI").unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, format!("{}{}", dir.ca.cert_pem(), web.cert_pem())).unwrap();
    let mut config = dir.config();
    config.tls.client_ca_file = bundle;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = credvault::run(config, listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("tls.trust_domains"), "{err}");
}

#[tokio::test]
async fn a_connection_is_told_to_go_away_at_its_maximum_age() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.limits.max_connection_age_ms = 1_000;
    config.limits.shutdown_grace_ms = 500;
    let vault = dir.start_with(config).await;
    let (_sender, connection) =
        common::raw_h2(vault.addr.port(), dir.ca.cert_pem(), &dir.app).await;
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "the connection outlived its maximum age");
}

#[tokio::test]
async fn a_certificate_that_expires_on_an_open_connection_is_refused_from_then_on() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let cert = dir
        .ca
        .issue_with("app", Subject::ClientUris(&[common::APP]), |p| {
            p.not_after = expires;
        })
        .unwrap();
    let mut c = vault
        .client_as(&cert.cert_pem, &cert.key_pem)
        .await
        .unwrap();
    c.list_providers(ListProvidersRequest {}).await.unwrap();
    let wait = expires - time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1_500);
    tokio::time::sleep(wait.try_into().unwrap()).await;
    let refused = c.list_providers(ListProvidersRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("expired"), "{refused:?}");
}

#[tokio::test]
async fn revoking_a_certificate_closes_its_open_connection() {
    let dir = VaultDir::new();
    let (config, crl) = dir.config_with_crl();
    let vault = dir.start_with(config).await;
    let doomed = dir
        .ca
        .issue("app", Subject::ClientUris(&[common::APP]))
        .unwrap();
    let port = vault.addr.port();
    let (_a, revoked) = common::raw_h2(port, dir.ca.cert_pem(), &doomed).await;
    let (_b, kept) = common::raw_h2(port, dir.ca.cert_pem(), &dir.app).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    std::fs::write(&crl, dir.ca.crl(&[&doomed.serial]).unwrap()).unwrap();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), revoked).await;
    assert!(ended.is_ok(), "a revoked certificate kept its connection");
    assert!(
        !kept.is_finished(),
        "a certificate still trusted lost its connection"
    );
    assert!(gets_through(&vault, Some((&dir.app.cert_pem, &dir.app.key_pem))).await);
    assert!(!gets_through(&vault, Some((&doomed.cert_pem, &doomed.key_pem))).await);
}

#[tokio::test]
async fn an_audit_stream_ends_when_a_new_policy_takes_its_right_away() {
    let dir = VaultDir::new();
    let path = dir.path().join("credvault.toml");
    let mut config = dir.config();
    std::fs::write(&path, config.to_toml()).unwrap();
    let server = common::spawn_server(&path).await;
    let mut audit = credvault::proto::audit_client::AuditClient::new(
        dir.channel_for_url(&server.url, "spiffe://credvault.local/auditor")
            .await,
    );
    let mut stream = audit
        .subscribe(credvault::proto::SubscribeRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    config
        .policy
        .retain(|rule| !rule.identity.ends_with("/auditor"));
    std::fs::write(&path, config.to_toml()).unwrap();
    let pid = server.process.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream outlived its right");
    let status = ended.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
}

/// The error `run` stops with, or a panic if it serves.
async fn refused_start(config: credvault::Config) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    match tokio::time::timeout(
        std::time::Duration::from_secs(10),
        credvault::run(config, listener, std::future::pending()),
    )
    .await
    {
        Ok(result) => result.unwrap_err().to_string(),
        Err(_) => panic!("the vault started"),
    }
}

#[tokio::test]
async fn key_files_reached_through_a_symlink_are_refused() {
    for key in ["root.key", "server-key.pem"] {
        let dir = VaultDir::new();
        let real = dir.path().join(format!("{key}.real"));
        std::fs::rename(dir.path().join(key), &real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join(key)).unwrap();
        let err = refused_start(dir.config()).await;
        assert!(err.contains(key) && err.contains("symbolic link"), "{err}");
    }
}

#[tokio::test]
async fn trust_files_others_may_write_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = VaultDir::new();
    let ca = dir.path().join("ca.pem");
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = refused_start(dir.config()).await;
    assert!(
        err.contains("ca.pem") && err.contains("chmod go-w"),
        "{err}"
    );
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();

    let path = dir.path().join("credvault.toml");
    std::fs::write(&path, dir.config().to_toml()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o620)).unwrap();
    let err = credvault::Config::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("credvault.toml") && err.contains("chmod go-w"),
        "{err}"
    );
}

#[tokio::test]
async fn the_audit_public_key_is_never_written_through_a_symlink() {
    let dir = VaultDir::new();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "keep\n").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("audit.pub")).unwrap();
    let err = refused_start(dir.config()).await;
    assert!(
        err.contains("audit.pub") && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep\n");
}

#[tokio::test]
async fn an_audit_stream_ends_when_its_certificate_expires() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let auditor = dir
        .ca
        .issue_with(
            "auditor",
            Subject::ClientUris(&["spiffe://credvault.local/auditor"]),
            |p| p.not_after = expires,
        )
        .unwrap();
    let channel = credvault::cli::client::connect_channel(
        &vault.url(),
        vault.ca_pem.as_bytes(),
        auditor.cert_pem.as_bytes(),
        auditor.key_pem.as_bytes(),
    )
    .await
    .unwrap();
    let mut stream = credvault::proto::audit_client::AuditClient::new(channel)
        .subscribe(credvault::proto::SubscribeRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut app = vault.client().await;
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            // Keep events coming, so that a live stream has something to send.
            app.list_providers(ListProvidersRequest {}).await.unwrap();
            match tokio::time::timeout(std::time::Duration::from_millis(300), stream.message())
                .await
            {
                Ok(Ok(Some(_))) | Err(_) => continue,
                Ok(other) => return other,
            }
        }
    })
    .await
    .expect("the audit stream outlived its certificate");
    let status = ended.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    // X.509 keeps whole seconds: the certificate expired at the second before `expires`.
    assert!(time::OffsetDateTime::now_utc() >= expires - time::Duration::seconds(1));
}

/// The CLI says in words why it could not talk to the vault, from what the
/// TLS layer said, and what to check. (Before: "Unknown: transport error"
/// for each refused client certificate, "Internal: h2 protocol error" for an
/// http:// address.)
#[tokio::test]
async fn the_cli_says_why_a_connection_was_refused() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let p = dir.path();
    let write = |name: &str, cert: &credvault::dev::certs::IssuedCert| {
        std::fs::write(p.join(format!("{name}.pem")), &cert.cert_pem).unwrap();
        common::write_private(&p.join(format!("{name}-key.pem")), cert.key_pem.as_bytes());
    };
    let past = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    write(
        "expired",
        &dir.ca
            .issue_with("app", Subject::ClientUris(&[common::APP]), |c| {
                c.not_before = past;
                c.not_after = past + time::Duration::days(1);
            })
            .unwrap(),
    );
    let stranger = DevCa::generate("another CA").unwrap();
    write(
        "stranger",
        &stranger
            .issue("app", Subject::ClientUris(&[common::APP]))
            .unwrap(),
    );
    write(
        "server-as-client",
        &dir.ca
            .issue("vault", Subject::Server(&["localhost"]))
            .unwrap(),
    );
    write(
        "app",
        &dir.ca
            .issue("app", Subject::ClientUris(&[common::APP]))
            .unwrap(),
    );
    std::fs::write(p.join("stranger-ca.pem"), stranger.cert_pem()).unwrap();
    let url = vault.url();
    let closed = format!("https://localhost:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    let plain = url.replacen("https://", "http://", 1);
    for (addr, ca, cert, expected) in [
        (&url, "ca", "expired", "it has expired"),
        (
            &url,
            "ca",
            "stranger",
            "does not chain to a CA the vault trusts",
        ),
        (&url, "ca", "server-as-client", "not a client certificate"),
        (
            &url,
            "stranger-ca",
            "app",
            "pass the CA that signed the vault's server certificate",
        ),
        (&plain, "ca", "app", "the vault speaks only TLS"),
        (&closed, "ca", "app", "nothing listens there"),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
            .args(["providers", "--addr", addr])
            .arg("--ca")
            .arg(p.join(format!("{ca}.pem")))
            .arg("--cert")
            .arg(p.join(format!("{cert}.pem")))
            .arg("--key")
            .arg(p.join(format!("{cert}-key.pem")))
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cert}: {stderr}");
        assert!(stderr.contains(expected), "{cert} at {addr}: {stderr}");
    }
}
