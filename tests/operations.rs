//! Operating the vault: health, reflection, metrics, certificate and CRL reload,
//! graceful shutdown with calls in flight, limits, check-config, JSON logs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::{amplitude, reference, VaultDir};
use credvault::dev::certs::{DevCa, Subject};
use credvault::proto::ListProvidersRequest;
use credvault_testkit::fake::{FakeProvider, Reply};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const SECRET: &str = "Wd6Fq1Zk8Xm3Bv7Nc2Lp9Rt4Hy5Js0Gu";

#[tokio::test]
async fn health_is_serving_after_start_and_not_serving_once_shutdown_begins() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.limits.shutdown_drain_ms = 500;
    // The Watch stream below stays open: shutdown cuts it after the grace period.
    config.limits.shutdown_grace_ms = 500;
    let vault = dir.start_with(config).await;
    let mut health = HealthClient::new(dir.channel_as(&vault, common::APP).await);
    for service in [
        "",
        "credvault.v1.Credentials",
        "credvault.v1.Audit",
        "credvault.v1.KeyAdmin",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    let stopping = tokio::spawn(vault.stop());
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    stopping.await.unwrap();
}

#[tokio::test]
async fn reflection_lists_every_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut client = ServerReflectionClient::new(dir.channel_as(&vault, common::APP).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a service list: {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "credvault.v1.Credentials",
        "credvault.v1.Audit",
        "credvault.v1.KeyAdmin",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&expected), "{names:?}");
    }
}

/// Python's official `grpcio-reflection` speaks only reflection v1alpha:
/// it lists the services and reads their descriptors (tests/clients/reflection.py).
#[tokio::test]
#[ignore = "needs Python with grpcio-reflection: scripts/test sets CREDVAULT_TEST_PYTHON"]
async fn reflection_v1alpha_answers_python_grpcio_reflection() {
    let python = std::env::var("CREDVAULT_TEST_PYTHON").expect(
        "CREDVAULT_TEST_PYTHON names a Python with grpcio-reflection (scripts/test sets it)",
    );
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let (cert, key) = (dir.path().join("app.pem"), dir.path().join("app-key.pem"));
    std::fs::write(&cert, &dir.app.cert_pem).unwrap();
    std::fs::write(&key, &dir.app.key_pem).unwrap();
    let out = tokio::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/reflection.py"
        ))
        .arg(vault.addr.to_string())
        .arg(dir.path().join("ca.pem"))
        .args([&cert, &key])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("credvault.v1.Credentials") && stdout.contains("credvault.v1.KeyAdmin"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Store") && stdout.contains("ValidateConnection"),
        "{stdout}"
    );
}

#[tokio::test]
async fn metrics_count_calls_and_never_carry_a_secret() {
    let dir = VaultDir::new();
    let port = common::free_port();
    let mut config = dir.config();
    config.metrics.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let vault = dir.start_with(config).await;
    let mut c = vault.client().await;
    c.store(amplitude("ws-metrics", SECRET, SECRET))
        .await
        .unwrap();
    c.redact(reference("ws-metrics", "amplitude"))
        .await
        .unwrap();
    c.redact(reference("ws-metrics", "posthog"))
        .await
        .unwrap_err();
    let text = common::scrape_metrics(port).await;
    for line in [
        r#"credvault_calls_total{method="Credentials.Store",code="OK"} 1"#,
        r#"credvault_calls_total{method="Credentials.Redact",code="OK"} 1"#,
        r#"credvault_calls_total{method="Credentials.Redact",code="NOT_FOUND"} 1"#,
        "credvault_audit_sequence 3",
        "credvault_primary_key_version 1",
        "credvault_open_connections 1",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert!(text.contains("credvault_call_duration_seconds_bucket"));
    for leak in [&SECRET[..8], "ws-metrics", "Wd6F"] {
        assert!(!text.contains(leak), "{leak} in the metrics");
    }
    let missing = reqwest::get(format!("http://127.0.0.1:{port}/other"))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

/// A client that trusts only `ca` and presents the app certificate issued by `issuer`.
async fn connect(url: &str, ca: &str, cert: &str, key: &str) -> Result<(), String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key));
    let channel = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    credvault::proto::credentials_client::CredentialsClient::new(channel)
        .list_providers(ListProvidersRequest {})
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn server_certificate_rotates_under_a_running_client_with_no_failed_call() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.tls.reload_poll_ms = 100;
    let vault = dir.start_with(config).await;
    let mut running = vault.client().await;
    let url = vault.url();

    // A new server certificate from a second CA, which only new clients trust.
    let next_ca = DevCa::generate("next server CA").unwrap();
    let next = next_ca
        .issue("server", Subject::Server(&["localhost", "127.0.0.1"]))
        .unwrap();
    let app = (&dir.app.cert_pem, &dir.app.key_pem);
    assert!(
        connect(&url, next_ca.cert_pem(), app.0, app.1)
            .await
            .is_err(),
        "not yet"
    );

    let calls = tokio::spawn(async move {
        for _ in 0..100 {
            running
                .list_providers(ListProvidersRequest {})
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    std::fs::write(dir.path().join("server.pem"), &next.cert_pem).unwrap();
    common::write_private(&dir.path().join("server-key.pem"), next.key_pem.as_bytes());
    let mut switched = false;
    for _ in 0..100 {
        if connect(&url, next_ca.cert_pem(), app.0, app.1)
            .await
            .is_ok()
        {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(switched, "new handshakes use the new certificate");
    calls.await.unwrap();
}

#[tokio::test]
async fn a_crl_revoking_a_client_certificate_takes_effect_without_restart() {
    let dir = VaultDir::new();
    let (config, crl) = dir.config_with_crl();
    let vault = dir.start_with(config).await;
    let url = vault.url();
    let other = dir
        .ca
        .issue("other", Subject::ClientUris(&[common::APP]))
        .unwrap();
    let ca = dir.ca.cert_pem().to_owned();
    assert!(connect(&url, &ca, &dir.app.cert_pem, &dir.app.key_pem)
        .await
        .is_ok());

    std::fs::write(&crl, dir.ca.crl(&[&dir.app.serial]).unwrap()).unwrap();
    let mut refused = false;
    for _ in 0..100 {
        if connect(&url, &ca, &dir.app.cert_pem, &dir.app.key_pem)
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused,
        "the revoked certificate is refused at the handshake"
    );
    assert!(connect(&url, &ca, &other.cert_pem, &other.key_pem)
        .await
        .is_ok());

    std::fs::write(&crl, "not a CRL").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        connect(&url, &ca, &dir.app.cert_pem, &dir.app.key_pem)
            .await
            .is_err(),
        "a broken CRL file keeps the CRL in force"
    );
}

#[tokio::test]
async fn shutdown_lets_calls_in_flight_finish() {
    let dir = VaultDir::new();
    let fake = FakeProvider::start(&dir.ca, |_| {
        Reply::json(200, r#"{"data":[]}"#).after(Duration::from_millis(800))
    })
    .await;
    let mut config = dir.config();
    config
        .providers
        .amplitude
        .base_urls
        .insert("us".into(), fake.url());
    let vault = dir.start_with(config).await;
    let mut c = vault.client().await;
    c.store(amplitude("ws", SECRET, SECRET)).await.unwrap();
    let in_flight = tokio::spawn(async move {
        c.validate_connection(reference("ws", "amplitude"))
            .await
            .map(|r| r.into_inner())
    });
    while fake.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    vault.stop().await;
    let v = in_flight.await.unwrap().unwrap();
    assert_eq!(
        v.verdict,
        credvault::proto::validation::Verdict::Valid as i32
    );
}

#[tokio::test]
async fn an_identity_over_its_rate_gets_resource_exhausted() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.limits.rate_per_identity = 1;
    config.limits.rate_burst = 3;
    let vault = dir.start_with(config).await;
    let mut c = vault.client().await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(
            c.list_providers(ListProvidersRequest {})
                .await
                .err()
                .map_or(Code::Ok, |s| s.code()),
        );
    }
    assert_eq!(
        codes.iter().filter(|c| **c == Code::Ok).count(),
        3,
        "{codes:?}"
    );
    assert!(
        codes[3..].iter().all(|c| *c == Code::ResourceExhausted),
        "{codes:?}"
    );
    // Another identity has its own bucket.
    let mut admin = credvault::proto::key_admin_client::KeyAdminClient::new(
        dir.channel_as(&vault, "spiffe://credvault.local/admin")
            .await,
    );
    admin
        .status(credvault::proto::StatusRequest {})
        .await
        .unwrap();
}

#[test]
fn check_config_passes_a_good_configuration_and_names_what_is_wrong() {
    use std::os::unix::fs::PermissionsExt;
    let dir = VaultDir::new();
    let path = dir.path().join("credvault.toml");
    std::fs::write(&path, dir.config().to_toml()).unwrap();
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = run();
    assert!(ok && out.contains("configuration OK"), "{out}");
    // It names only what is configured: the test vault has no CRL.
    assert!(
        out.contains("✓ TLS: server certificate") && !out.contains("CRL"),
        "{out}"
    );
    // The audit public key written into a folder that is not there.
    let mut elsewhere = dir.config();
    elsewhere.audit.public_key_file = Some(dir.path().join("missing/audit.pub"));
    std::fs::write(&path, elsewhere.to_toml()).unwrap();
    let (ok, out) = run();
    assert!(
        !ok && out.contains("audit.public_key_file: the folder") && out.contains("missing"),
        "{out}"
    );
    std::fs::write(&path, dir.config().to_toml()).unwrap();
    let key = dir.path().join("root.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out) = run();
    assert!(!ok, "{out}");
    assert!(
        out.contains("✗ root key") && out.contains("root.key") && out.contains("chmod 600"),
        "{out}"
    );
}

/// A secret written where the name of its environment variable belongs (the
/// root key in `root_key_env`, the database password in `password_env`) is
/// refused without being repeated in the output.
#[test]
fn a_secret_written_in_place_of_a_variables_name_is_not_echoed() {
    let dir = VaultDir::new();
    let path = dir.path().join("credvault.toml");
    let root_key = "ab".repeat(32);
    let mut in_root_key_env = dir.config();
    in_root_key_env.keys.root_key_file = None;
    in_root_key_env.keys.root_key_env = Some(root_key.clone());
    let password = "Hunter2WrittenInTheWrongPlace";
    let mut in_password_env = dir.config();
    in_password_env.storage.backend = credvault::config::Backend::Postgres;
    in_password_env.storage.url =
        Some("postgres://vault@127.0.0.1:1/credvault?sslmode=disable".into());
    in_password_env.storage.password_file = None;
    in_password_env.storage.password_env = Some(password.into());
    for (config, secret, expected) in [
        (
            in_root_key_env,
            root_key.as_str(),
            "root_key_env names is not set",
        ),
        (in_password_env, password, "password_env names is not set"),
    ] {
        std::fs::write(&path, config.to_toml()).unwrap();
        for args in [&["check-config"][..], &["serve", "--listen", "127.0.0.1:0"]] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
                .args(args)
                .arg("--config")
                .arg(&path)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.status.success(), "{args:?}: {text}");
            assert!(text.contains(expected), "{args:?}: {text}");
            assert!(
                !text.contains(secret),
                "{args:?}: the secret is in the output: {text}"
            );
        }
    }
}

/// A FIFO put where the audit anchor file or the audit public key file
/// belongs is refused at start-up, never waited on (review round 3: `serve`
/// held its port, silent).
#[test]
fn audit_files_that_are_fifos_are_refused_not_waited_on() {
    for which in ["anchor", "public key"] {
        let dir = VaultDir::new();
        let path = dir.path().join("credvault.toml");
        let fifo = dir.path().join("audit.fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let mut config = dir.config();
        if which == "anchor" {
            config.audit.anchor_file = Some(fifo);
        } else {
            config.audit.public_key_file = Some(fifo);
        }
        std::fs::write(&path, config.to_toml()).unwrap();
        let out = std::process::Command::new("timeout")
            .args([
                "20",
                env!("CARGO_BIN_EXE_credvault"),
                "serve",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(124), "{which}: serve hung");
        assert!(!out.status.success(), "{which}: {err}");
        assert!(err.contains("not a regular file"), "{which}: {err}");
    }
}

/// The client subcommands read --key and friends from the environment too:
/// `--help` does not show those values, and an unreadable key file is not
/// named (a key pasted into CREDVAULT_KEY would come back otherwise).
#[test]
fn client_settings_from_the_environment_are_not_echoed() {
    let key = "ab".repeat(32);
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
        .args(["list", "--help"])
        .env("CREDVAULT_KEY", &key)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("CREDVAULT_KEY"), "{text}");
    assert!(!text.contains(&key), "{text}");
    let dir = VaultDir::new();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
        .args(["list", "--workspace", "ws", "--addr", "https://127.0.0.1:1"])
        .env("CREDVAULT_KEY", &key)
        .env("CREDVAULT_CERT", dir.path().join("x.pem"))
        .env("CREDVAULT_CA", dir.path().join("x.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("client key file"), "{text}");
    assert!(!text.contains(&key), "{text}");
}

/// check-config tells an unreachable database from a root key that does not
/// open it, and says where it tried.
#[test]
fn check_config_names_an_unreachable_postgres_database() {
    let dir = VaultDir::new();
    let path = dir.path().join("credvault.toml");
    let mut config = dir.config();
    config.storage.backend = credvault::config::Backend::Postgres;
    config.storage.url = Some("postgres://vault@127.0.0.1:1/credvault?sslmode=disable".into());
    config.storage.password_file = None;
    config.storage.password_env = None;
    std::fs::write(&path, config.to_toml()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("✗ the database opens")
            && text.contains("vault@127.0.0.1:1/credvault")
            && text.contains("is PostgreSQL running"),
        "{text}"
    );
    assert!(!text.contains("the root key opens"), "{text}");
}

#[tokio::test]
async fn shutdown_ends_open_audit_streams() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut stream = dir.audit_stream(&vault, 0).await;
    assert_eq!(
        stream.message().await.unwrap().unwrap().method,
        "Audit.Subscribe"
    );
    let started = std::time::Instant::now();
    vault.stop().await;
    assert!(
        !matches!(stream.message().await, Ok(Some(_))),
        "the stream ended"
    );
    // The default grace is 10 s; an audit stream must not hold shutdown that long.
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The container image's start-up, outside a container: the vault as the
/// image's non-root user (uid 65532), its configuration, certificates and
/// keys on a read-only mount, and an empty data folder owned by that user
/// (as the image creates it for a new volume). It creates its database and
/// serves; check-config passes as that user.
#[tokio::test]
#[ignore = "runs the vault as another user on a read-only mount: needs root (scripts/test runs it as root)"]
async fn the_image_start_up_works_as_non_root_on_an_empty_volume() {
    use std::os::unix::fs::{chown, PermissionsExt};
    assert!(
        rustix::process::geteuid().is_root(),
        "needs root to switch users and mount: run as root (CI does)"
    );
    const NONROOT: u32 = 65532;
    let dir = VaultDir::new();
    let etc = dir.path();
    std::fs::set_permissions(etc, std::fs::Permissions::from_mode(0o755)).unwrap();
    for private in ["server-key.pem", "root.key"] {
        chown(etc.join(private), Some(NONROOT), Some(NONROOT)).unwrap();
    }
    let volume = tempfile::tempdir().unwrap();
    std::fs::set_permissions(volume.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = volume.path().join("data");
    std::fs::create_dir(&data).unwrap();
    chown(&data, Some(NONROOT), Some(NONROOT)).unwrap();
    let mut config = dir.config();
    config.storage.path = data.join("credvault.db");
    config.audit.public_key_file = Some(data.join("audit-signing.pub"));
    config.audit.anchor_file = Some(data.join("audit-anchor.jsonl"));
    let config_file = etc.join("credvault.toml");
    std::fs::write(&config_file, config.to_toml()).unwrap();
    // /etc/credvault mounted read-only, as `-v …:/etc/credvault:ro`.
    let mount = |args: &[&str]| {
        let status = std::process::Command::new("mount")
            .args(args)
            .arg(etc)
            .arg(etc)
            .status()
            .unwrap();
        assert!(status.success(), "mount {args:?}");
    };
    mount(&["--bind"]);
    mount(&["-o", "remount,ro,bind"]);
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(etc.to_owned());
    assert!(
        std::fs::write(etc.join("probe"), "x").is_err(),
        "the mount is read-only"
    );

    let as_nonroot = [
        "setpriv",
        "--reuid=65532",
        "--regid=65532",
        "--clear-groups",
        "--",
    ];
    let check = std::process::Command::new(as_nonroot[0])
        .args(&as_nonroot[1..])
        .arg(env!("CARGO_BIN_EXE_credvault"))
        .args(["check-config", "--config"])
        .arg(&config_file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut vault = common::spawn_server_as(&config_file, &as_nonroot).await;
    use std::os::unix::fs::MetadataExt;
    let db = std::fs::metadata(data.join("credvault.db")).unwrap();
    assert_eq!(
        db.uid(),
        NONROOT,
        "the database belongs to the vault's user"
    );
    assert!(data.join("audit-signing.pub").exists());
    vault.process.kill().await.unwrap();
}
