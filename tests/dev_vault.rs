//! The README's path for a new user, run as a user would: `credvault serve --dev`
//! as a real process, the client subcommands against it, SIGTERM to stop. Canary
//! secrets are then searched for in every log line, the database and its WAL.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{contains_bytes, windows};

const BIN: &str = env!("CARGO_BIN_EXE_credvault");
const API_KEY_CANARY: &str = "Zq7kXw9Vb2Lm8Np4Rt6JfH3yQd5Tz1Kc";
const SECRET_CANARY: &str = "Hy3mQp5Tz1Kd7Fg2Wc9BvN4xJr8Ls6Gu";

struct Server {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

/// Starts `credvault serve --dev` on an ephemeral port, logging at the most
/// verbose level to a file, and waits until it serves.
fn start(data_dir: &Path, log: &Path) -> Server {
    start_with(data_dir, log, &[])
}

fn start_with(data_dir: &Path, log: &Path, args: &[&str]) -> Server {
    let log_file = std::fs::File::create(log).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut tee = log_file;
    let mut line = String::new();
    let port = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "server exited before serving"
        );
        tee.write_all(line.as_bytes()).unwrap();
        if line.contains("credvault serving") {
            // `listen=127.0.0.1:PORT` in text, `"listen":"127.0.0.1:PORT"` in JSON.
            let rest = line.split("127.0.0.1:").nth(1).unwrap();
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            break digits.parse().unwrap();
        }
    };
    // Keep draining stderr into the log file so the server never blocks on it.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut stderr, &mut tee);
    });
    Server {
        child,
        port,
        log: log.to_owned(),
    }
}

impl Server {
    /// Runs a client subcommand with `stdin`, returning (success, stdout, stderr).
    fn client(&self, data_dir: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
        let mut child = Command::new(BIN)
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--addr", &format!("https://localhost:{}", self.port)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Waits until the log holds `text` `count` times.
    fn wait_for_log(&self, text: &str, count: usize) {
        for _ in 0..200 {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.matches(text).count() >= count {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the log never said {text:?} {count} times");
    }

    /// SIGTERM, and the exit status must be 0.
    fn terminate(mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "exit status after SIGTERM: {status}");
    }
}

#[test]
fn new_user_stores_redacts_lists_and_zeroes_with_the_cli_and_no_secret_leaks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    let server = start(&data, &tmp.path().join("first.log"));
    for file in [
        "certs/ca.pem",
        "certs/server.pem",
        "certs/server-key.pem",
        "certs/app.pem",
        "certs/app-key.pem",
        "certs/admin.pem",
        "certs/auditor-key.pem",
        "root.key",
        "credvault.toml",
        "credvault.db",
    ] {
        assert!(data.join(file).exists(), "{file} was not created");
    }
    let first_log = std::fs::read_to_string(&server.log).unwrap();
    assert!(first_log.contains("CREATED A NEW DEVELOPMENT VAULT"));
    // The suggested command works as printed: the binary as it was started.
    let suggested = format!("Try: {} providers", env!("CARGO_BIN_EXE_credvault"));
    assert!(first_log.contains(&suggested), "{first_log}");

    let secrets = format!("api_key={API_KEY_CANARY}\nsecret_key={SECRET_CANARY}\n");
    let store = [
        "store",
        "--workspace",
        "acme",
        "--provider",
        "amplitude",
        "--param",
        "region=eu",
    ];
    let (ok, out, err) = server.client(&data, &store, &secrets);
    assert!(ok, "store failed: {err}");
    assert!(
        out.contains("amplitude in workspace acme: connected"),
        "{out}"
    );
    assert!(out.contains("Zq7k…") && out.contains("Hy3m…"), "{out}");

    // A rejected Store must not echo the value either.
    let bad = format!("api_key={API_KEY_CANARY} \nsecret_key={SECRET_CANARY}\n");
    let (ok, _, err) = server.client(&data, &store, &bad);
    assert!(!ok);
    assert!(
        err.contains("field `api_key` has leading or trailing whitespace"),
        "{err}"
    );

    let (ok, out, _) = server.client(
        &data,
        &["redact", "--workspace", "acme", "--provider", "amplitude"],
        "",
    );
    assert!(ok && out.contains("region             = eu"), "{out}");
    let (ok, out, _) = server.client(&data, &["list", "--workspace", "acme"], "");
    assert!(
        ok && out.contains("amplitude in workspace acme: connected"),
        "{out}"
    );
    let (ok, out, _) = server.client(
        &data,
        &["zero", "--workspace", "acme", "--provider", "amplitude"],
        "",
    );
    assert!(
        ok && out.contains("disconnected") && !out.contains("Zq7k"),
        "{out}"
    );
    server.terminate();

    // A second run reuses everything and still knows the disconnected connection.
    let verify = Command::new(BIN)
        .args(["audit", "verify", "--config"])
        .arg(data.join("credvault.toml"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let server = start(&data, &tmp.path().join("second.log"));
    let second_log = std::fs::read_to_string(&server.log).unwrap();
    assert!(!second_log.contains("CREATED A NEW DEVELOPMENT VAULT"));
    let (ok, out, _) = server.client(
        &data,
        &["redact", "--workspace", "acme", "--provider", "amplitude"],
        "",
    );
    assert!(
        ok && out.contains("disconnected") && out.contains("region             = eu"),
        "{out}"
    );
    server.terminate();

    let log = [
        std::fs::read(tmp.path().join("first.log")).unwrap(),
        std::fs::read(tmp.path().join("second.log")).unwrap(),
    ]
    .concat();
    assert!(String::from_utf8_lossy(&log).contains("identity=spiffe://credvault.local/app"));
    let mut files = vec![log];
    files.extend(common::sqlite_files(&data.join("credvault.db")));
    for canary in [API_KEY_CANARY, SECRET_CANARY] {
        // The hint shows 4 characters: no 5-character piece may appear anywhere.
        for piece in std::iter::once(canary.to_owned()).chain(windows(canary, 5)) {
            for (i, bytes) in files.iter().enumerate() {
                assert!(
                    !contains_bytes(bytes, piece.as_bytes()),
                    "{piece:?} found in file {i}"
                );
            }
        }
    }
}

#[test]
fn serve_with_config_refuses_to_start_naming_the_missing_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    credvault::dev::prepare(&data).unwrap();
    std::fs::remove_file(data.join("certs/server.pem")).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(data.join("credvault.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.pem"), "{err}");
}

#[test]
fn certs_init_writes_the_development_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["certs", "init", "--out"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    for name in [
        "ca.pem",
        "server.pem",
        "server-key.pem",
        "app.pem",
        "admin-key.pem",
        "auditor.pem",
    ] {
        assert!(tmp.path().join(name).exists(), "{name}");
    }
    let again = Command::new(BIN)
        .args(["certs", "init", "--out"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!again.status.success(), "refuses to overwrite");
}

#[test]
fn sighup_reloads_the_policy_and_a_broken_file_keeps_the_old_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    let server = start(&data, &tmp.path().join("serve.log"));
    let config = data.join("credvault.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let list = ["list", "--workspace", "acme"];
    assert!(server.client(&data, &list, "").0, "app may list");

    // Hand the app identity's rule to another identity.
    let without_app = original.replace(
        "identity = \"spiffe://credvault.local/app\"",
        "identity = \"spiffe://credvault.local/someone-else\"",
    );
    assert_ne!(without_app, original);
    std::fs::write(&config, &without_app).unwrap();
    server.signal(rustix::process::Signal::HUP);
    server.wait_for_log("SIGHUP: policy reloaded", 1);
    let (ok, _, err) = server.client(&data, &list, "");
    assert!(!ok && err.contains("PermissionDenied"), "{err}");
    assert!(
        err.contains("identity `spiffe://credvault.local/app` may not call `List`"),
        "{err}"
    );

    std::fs::write(&config, "[[policy]\nthis is not toml").unwrap();
    server.signal(rustix::process::Signal::HUP);
    server.wait_for_log("policy not reloaded", 1);
    assert!(
        !server.client(&data, &list, "").0,
        "the policy in force stays"
    );

    std::fs::write(&config, &original).unwrap();
    server.signal(rustix::process::Signal::HUP);
    server.wait_for_log("SIGHUP: policy reloaded", 2);
    assert!(server.client(&data, &list, "").0, "app may list again");
    server.terminate();
}

/// Rotation on a running dev vault with the CLI, a kill -9 in the middle of
/// the rewrap, and a restart that finishes it with nothing lost.
#[test]
fn rewrap_survives_kill_9_and_the_cli_retires_the_old_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    credvault::dev::prepare(&data).unwrap();
    // Small batches, so the rewrap takes long enough to be interrupted.
    let config_path = data.join("credvault.toml");
    let mut config = credvault::config::Config::load(&config_path).unwrap();
    config.keys.rewrap_batch = 5;
    std::fs::write(&config_path, config.to_toml()).unwrap();

    let server = start(&data, &tmp.path().join("first.log"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let paths = credvault::dev::certs::DevCertPaths::new(&data.join("certs"));
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    let addr = format!("https://localhost:{}", server.port);
    let count = 400;
    runtime.block_on(async {
        let mut c = credvault::cli::client::connect(
            &addr,
            &read(paths.ca.clone()),
            &read(paths.client_cert("app")),
            &read(paths.client_key("app")),
        )
        .await
        .unwrap();
        for i in 0..count {
            c.store(common::amplitude(
                &format!("ws{i}"),
                API_KEY_CANARY,
                SECRET_CANARY,
            ))
            .await
            .unwrap();
        }
    });
    let (ok, out, err) = server.client(&data, &["keys", "rotate"], "");
    assert!(ok, "{err}");
    assert!(out.contains("key version 2 is now primary"), "{out}");
    // Kill the moment the rewrap is seen under way.
    let mut seen_midway = false;
    for _ in 0..200 {
        let (_, out, _) = server.client(&data, &["keys", "status"], "");
        let progress = out.lines().next().unwrap_or_default().to_owned();
        if !progress.contains(&format!("rewrap {count}/{count}")) {
            seen_midway = !progress.contains(&format!("rewrap 0/{count}"));
            if seen_midway {
                break;
            }
        } else {
            break;
        }
    }
    let mut killed = server;
    killed.signal(rustix::process::Signal::KILL);
    killed.child.wait().unwrap();
    eprintln!("killed with the rewrap under way: {seen_midway}");

    let server = start(&data, &tmp.path().join("second.log"));
    let mut finished = String::new();
    for _ in 0..400 {
        let (_, out, _) = server.client(&data, &["keys", "status"], "");
        if out.contains(&format!("rewrap {count}/{count}")) {
            finished = out;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(
        finished.contains("VERSION"),
        "the rewrap finished after the restart"
    );
    let (ok, out, err) = server.client(&data, &["keys", "retire", "--version", "1"], "");
    assert!(ok, "{err}");
    assert!(out.contains("key version 1 retired"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("1 ") && l.contains("retired")),
        "{out}"
    );
    // Every credential is still there and decrypts: the vault reads each one's
    // secrets to redact nothing, so check through the library on the stopped database.
    server.terminate();
    runtime.block_on(async {
        let config = credvault::config::Config::load(&config_path).unwrap();
        let store =
            std::sync::Arc::new(credvault::store::SqliteStore::open(&config.storage.path).unwrap());
        let root =
            credvault::crypto::RootKey::from_file(config.keys.root_key_file.as_ref().unwrap())
                .unwrap();
        let outbound = credvault::outbound::Outbound::new(&config.outbound).unwrap();
        let vault =
            credvault::domain::Vault::open(store, root, outbound, &config.providers, &config.keys)
                .await
                .unwrap();
        for i in 0..count {
            let target =
                credvault::domain::CredentialRef::parse(&format!("ws{i}"), "amplitude").unwrap();
            let plain = vault.decrypt(&target).await.unwrap();
            assert_eq!(
                secrecy::ExposeSecret::expose_secret(&plain.secrets["secret_key"]),
                SECRET_CANARY
            );
        }
    });
    let db = rusqlite::Connection::open(data.join("credvault.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[test]
fn json_logs_are_one_object_per_line_with_the_call_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    let server = start_with(
        &data,
        &tmp.path().join("json.log"),
        &["--log-format", "json"],
    );
    let (ok, _, err) = server.client(&data, &["list", "--workspace", "acme"], "");
    assert!(ok, "{err}");
    server.wait_for_log("\"message\":\"call\"", 1);
    let log = server.log.clone();
    server.terminate();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let call = lines
        .iter()
        .find(|v| v["fields"]["message"] == "call")
        .unwrap();
    assert_eq!(call["fields"]["code"], "OK");
    assert_eq!(call["span"]["method"], "List");
    assert_eq!(call["span"]["identity"], "spiffe://credvault.local/app");
    assert_eq!(call["span"]["workspace"], "acme");
}

/// The first hour (#23): a mistyped --data-dir, a missing required param
/// before any secret is read, and required params marked.
#[tokio::test]
async fn the_cli_names_a_wrong_data_dir_and_missing_params_before_the_secrets() {
    async fn cli(args: &[&str], stdin: &str) -> (bool, String, String) {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        let out = common::credvault_cli(&args, stdin.as_bytes()).await;
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    let (ok, _, err) = cli(&["providers", "--data-dir", "/nonexistent/vault"], "").await;
    assert!(
        !ok && err.contains("no development vault in /nonexistent/vault"),
        "{err}"
    );

    let dir = common::VaultDir::new();
    let vault = dir.start().await;
    let p = dir.path();
    let app = dir.issue(common::APP);
    std::fs::write(p.join("app.pem"), &app.cert_pem).unwrap();
    common::write_private(&p.join("app-key.pem"), app.key_pem.as_bytes());
    let url = vault.url();
    let ca = p.join("ca.pem");
    let cert = p.join("app.pem");
    let key = p.join("app-key.pem");
    let connect = [
        "--addr",
        url.as_str(),
        "--ca",
        ca.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    let (ok, out, _) = cli(&[&["providers"][..], &connect].concat(), "").await;
    assert!(
        ok && out.contains("project_id") && out.contains("(required)"),
        "{out}"
    );
    let store = [
        &["store", "--workspace", "w", "--provider", "posthog"][..],
        &connect,
    ]
    .concat();
    let (ok, _, err) = cli(
        &store,
        "personal_api_key=phx_Rk3Vw9Qm2Lx8Tz5Nc1Bd7Yf4Gh6Js0\n",
    )
    .await;
    assert!(
        !ok && err.contains("PostHog needs --param project_id"),
        "{err}"
    );
    assert_eq!(
        dir.number("SELECT count(*) FROM audit_events WHERE event LIKE '%Credentials.Store%'"),
        0,
        "refused before the vault was asked"
    );
}

/// A port in use is said in one line that names the fix, before any of the
/// configuration is logged.
#[test]
fn a_port_in_use_is_one_clear_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
        .args(["serve", "--dev", "--data-dir"])
        .arg(tmp.path().join("vault"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && stderr.contains("--listen"),
        "{stderr}"
    );
    assert!(!stderr.contains("configuration:"), "{stderr}");
}
