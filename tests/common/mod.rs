//! Shared test harness: a real vault over real mutual TLS on 127.0.0.1:0, with certificates made for the test.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use credvault::cli::client::connect;
use credvault::config::{
    Backend, Config, KeysConfig, Limits, OutboundConfig, ProvidersConfig, StorageConfig, TlsConfig,
};
use credvault::dev::certs::{DevCa, IssuedCert, Subject};
use credvault::proto::credentials_client::CredentialsClient;
use credvault::proto::{CredentialRef, StoreRequest};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub const APP: &str = "spiffe://credvault.local/app";

/// A vault's folder: its PKI, root key and database. Outlives restarts.
pub struct VaultDir {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub app: IssuedCert,
    /// With `CREDVAULT_TEST_POSTGRES` set: this vault's own database there.
    pub postgres: Option<TestDatabase>,
}

/// `CREDVAULT_TEST_POSTGRES`: the URL of a PostgreSQL server and a user that
/// may create databases. When set, each [`VaultDir`] gets a fresh database
/// there instead of a SQLite file, so the same tests run on both backends.
pub fn postgres_server() -> Option<String> {
    std::env::var("CREDVAULT_TEST_POSTGRES")
        .ok()
        .filter(|url| !url.is_empty())
}

/// Whether this run is on SQLite. Tests that read or damage the SQLite file
/// itself return early on PostgreSQL.
pub fn on_sqlite() -> bool {
    postgres_server().is_none()
}

/// A 1 MiB tmpfs mounted on `folder` (created) until dropped: a disk that
/// fills up. Mounting needs root.
pub struct SmallTmpfs(pub std::path::PathBuf);

impl SmallTmpfs {
    pub fn mount(folder: std::path::PathBuf) -> Self {
        assert!(
            rustix::process::geteuid().is_root(),
            "mounting a small tmpfs needs root: run this test as root (CI does)"
        );
        std::fs::create_dir_all(&folder).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "credvault-test"])
            .arg(&folder)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount a 1 MiB tmpfs");
        Self(folder)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        // Lazy: a writer thread may still hold a file for a moment.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A throwaway database, dropped with the value.
pub struct TestDatabase {
    pub url: String,
    server: String,
    name: String,
}

impl TestDatabase {
    pub fn create(server: &str) -> Self {
        let name = format!("credvault_test_{}", random_hex(8));
        let mut url = url::Url::parse(server).unwrap();
        url.set_path(&name);
        let db = Self {
            url: url.to_string(),
            server: server.to_owned(),
            name,
        };
        db.admin(&format!("CREATE DATABASE {}", db.name));
        db
    }

    /// Runs one statement on the server's own database, from a thread with
    /// its own runtime (callers are often inside a test's runtime).
    fn admin(&self, sql: &str) {
        let sql = sql.to_owned();
        on_postgres(self.server.clone(), move |client| async move {
            client.batch_execute(&sql).await.unwrap();
        });
    }
}

impl Drop for TestDatabase {
    /// On a thread of its own (the test's runtime still owns the vault's
    /// connections, which `WITH (FORCE)` ends), waited for up to 5 s: a
    /// detached thread would die with the test process, leaving the database
    /// behind. scripts/test drops any that an interrupted run left.
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let server = self.server.clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = std::panic::catch_unwind(|| {
                on_postgres(server, move |client| async move {
                    let _ = client.batch_execute(&sql).await;
                });
            });
            let _ = done.send(());
        });
        let _ = finished.recv_timeout(std::time::Duration::from_secs(5));
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl VaultDir {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("test CA").unwrap();
        let server = ca
            .issue("server", Subject::Server(&["localhost", "127.0.0.1"]))
            .unwrap();
        let app = ca.issue("app", Subject::ClientUris(&[APP])).unwrap();
        let p = dir.path();
        std::fs::write(p.join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(p.join("server.pem"), &server.cert_pem).unwrap();
        write_private(&p.join("server-key.pem"), server.key_pem.as_bytes());
        write_private(&p.join("root.key"), "ab".repeat(32).as_bytes());
        let postgres = postgres_server().map(|server| TestDatabase::create(&server));
        Self {
            dir,
            ca,
            app,
            postgres,
        }
    }

    /// The storage section every vault of this folder uses.
    pub fn storage(&self) -> StorageConfig {
        match &self.postgres {
            Some(db) => {
                // The password from a 0600 file, as production gives it: the
                // vault refuses one in the URL.
                let mut url = url::Url::parse(&db.url).unwrap();
                let password = self.path().join("db-password");
                write_private(&password, url.password().unwrap_or_default().as_bytes());
                url.set_password(None).unwrap();
                StorageConfig {
                    backend: Backend::Postgres,
                    url: Some(url.to_string()),
                    password_file: Some(password),
                    pool_size: 8,
                    ..StorageConfig::default()
                }
            }
            None => StorageConfig {
                backend: Backend::Sqlite,
                path: self.db(),
                ..StorageConfig::default()
            },
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn db(&self) -> PathBuf {
        self.path().join("vault.db")
    }

    pub fn config(&self) -> Config {
        let p = self.path();
        Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: TlsConfig {
                cert_file: p.join("server.pem"),
                key_file: p.join("server-key.pem"),
                client_ca_file: p.join("ca.pem"),
                crl_file: None,
                reload_poll_ms: 2_000,
                trust_domains: Default::default(),
            },
            storage: self.storage(),
            keys: KeysConfig {
                root_key_file: Some(p.join("root.key")),
                root_key_env: None,
                pkcs11: None,
                max_encryptions_per_version: 1 << 30,
                rewrap_batch: 500,
            },
            limits: Limits::default(),
            // Providers are HTTPS fakes on 127.0.0.1 with certificates from the test CA.
            outbound: OutboundConfig {
                extra_ca_file: Some(p.join("ca.pem")),
                allow_private_addresses: true,
                ..OutboundConfig::default()
            },
            providers: ProvidersConfig::default(),
            metrics: Default::default(),
            monitor: Default::default(),
            audit: credvault::config::AuditConfig {
                public_key_file: Some(p.join("audit.pub")),
                ..Default::default()
            },
            policy: credvault::policy::dev_rules(),
            source: None,
        }
    }

    /// A mutual-TLS channel to `vault` presenting a fresh certificate for `uri`.
    /// A client certificate from this folder's CA for `uri`.
    pub fn issue(&self, uri: &str) -> IssuedCert {
        self.ca
            .issue("client", Subject::ClientUris(&[uri]))
            .unwrap()
    }

    /// A configuration with `tls.crl_file` set to a CRL that revokes nothing
    /// yet, reloaded every 100 ms; returns it and the CRL's path.
    pub fn config_with_crl(&self) -> (Config, PathBuf) {
        let crl = self.path().join("clients.crl.pem");
        std::fs::write(&crl, self.ca.crl(&[]).unwrap()).unwrap();
        let mut config = self.config();
        config.tls.crl_file = Some(crl.clone());
        config.tls.reload_poll_ms = 100;
        (config, crl)
    }

    /// The audit events after `after`, read as the dev auditor.
    pub async fn audit_stream(
        &self,
        vault: &TestVault,
        after: u64,
    ) -> tonic::Streaming<credvault::proto::AuditEvent> {
        credvault::proto::audit_client::AuditClient::new(
            self.channel_as(vault, "spiffe://credvault.local/auditor")
                .await,
        )
        .subscribe(credvault::proto::SubscribeRequest {
            after_sequence: after,
        })
        .await
        .unwrap()
        .into_inner()
    }

    /// The sequence of the newest audit event, as `Audit.Head` says it.
    pub async fn audit_head(&self, vault: &TestVault) -> u64 {
        credvault::proto::audit_client::AuditClient::new(
            self.channel_as(vault, "spiffe://credvault.local/auditor")
                .await,
        )
        .head(credvault::proto::HeadRequest {})
        .await
        .unwrap()
        .into_inner()
        .sequence
    }

    pub async fn channel_as(&self, vault: &TestVault, uri: &str) -> tonic::transport::Channel {
        self.channel_for_url(&vault.url(), uri).await
    }

    /// As [`VaultDir::channel_as`], to a vault at `url` (one in its own process).
    pub async fn channel_for_url(&self, url: &str, uri: &str) -> tonic::transport::Channel {
        let cert = self
            .ca
            .issue("client", Subject::ClientUris(&[uri]))
            .unwrap();
        credvault::cli::client::connect_channel(
            url,
            self.ca.cert_pem().as_bytes(),
            cert.cert_pem.as_bytes(),
            cert.key_pem.as_bytes(),
        )
        .await
        .unwrap()
    }

    pub async fn start(&self) -> TestVault {
        self.start_with(self.config()).await
    }

    pub async fn start_with(&self, config: Config) -> TestVault {
        TestVault::start(config, self.ca.cert_pem().to_owned(), &self.app).await
    }

    /// As [`VaultDir::start_with`], judging expiry by `clock`.
    pub async fn start_with_clock(
        &self,
        config: Config,
        clock: credvault::domain::clock::Clock,
    ) -> TestVault {
        TestVault::start_with_clock(config, self.ca.cert_pem().to_owned(), &self.app, clock).await
    }
}

pub fn write_private(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A running vault served by `credvault::run` on an ephemeral port.
pub struct TestVault {
    pub addr: SocketAddr,
    pub ca_pem: String,
    app_cert: String,
    app_key: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), credvault::ServeError>>>,
}

impl TestVault {
    pub async fn start(config: Config, ca_pem: String, app: &IssuedCert) -> Self {
        Self::start_with_clock(
            config,
            ca_pem,
            app,
            credvault::domain::clock::Clock::system(),
        )
        .await
    }

    pub async fn start_with_clock(
        config: Config,
        ca_pem: String,
        app: &IssuedCert,
        clock: credvault::domain::clock::Clock,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let task = tokio::spawn(credvault::run_with_clock(config, listener, shutdown, clock));
        Self {
            addr,
            ca_pem,
            app_cert: app.cert_pem.clone(),
            app_key: app.key_pem.clone(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// A client presenting the `app` certificate.
    pub async fn client(&self) -> CredentialsClient<Channel> {
        self.client_as(&self.app_cert.clone(), &self.app_key.clone())
            .await
            .unwrap()
    }

    pub async fn client_as(
        &self,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<CredentialsClient<Channel>, String> {
        connect(
            &self.url(),
            self.ca_pem.as_bytes(),
            cert_pem.as_bytes(),
            key_pem.as_bytes(),
        )
        .await
    }

    /// Stops the server as SIGTERM would and waits for it to finish.
    pub async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

impl Drop for TestVault {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub fn amplitude(workspace: &str, api_key: &str, secret_key: &str) -> StoreRequest {
    StoreRequest {
        workspace_id: workspace.to_owned(),
        provider: "amplitude".to_owned(),
        secrets: map(&[("api_key", api_key), ("secret_key", secret_key)]),
        ..StoreRequest::default()
    }
}

pub fn reference(workspace: &str, provider: &str) -> CredentialRef {
    CredentialRef {
        workspace_id: workspace.to_owned(),
        provider: provider.to_owned(),
    }
}

/// An unsigned JWT with the given claims, shaped like Amperity's tokens.
pub fn jwt(claims: &str) -> String {
    use base64::Engine;
    let e = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        e.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
        e.encode(claims),
        e.encode("a-signature-of-some-length")
    )
}

/// Every window of `len` characters of `s`.
pub fn windows(s: &str, len: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    chars.windows(len).map(|w| w.iter().collect()).collect()
}

/// Whether `needle` occurs anywhere in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Runs `credvault ARGS` with `stdin` piped in. Async, so that a vault
/// running on the calling test's runtime keeps serving meanwhile.
pub async fn credvault_cli(args: &[&std::ffi::OsStr], stdin: &[u8]) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    child.wait_with_output().await.unwrap()
}

/// `credvault audit ARGS` against `vault`, presenting the auditor's certificate.
pub async fn audit_cli(dir: &VaultDir, vault: &TestVault, args: &[&str]) -> std::process::Output {
    let auditor = dir
        .ca
        .issue(
            "auditor",
            Subject::ClientUris(&["spiffe://credvault.local/auditor"]),
        )
        .unwrap();
    write_private(&dir.path().join("auditor.pem"), auditor.cert_pem.as_bytes());
    write_private(
        &dir.path().join("auditor-key.pem"),
        auditor.key_pem.as_bytes(),
    );
    tokio::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
        .arg("audit")
        .args(args)
        .args(["--addr", &vault.url()])
        .arg("--ca")
        .arg(dir.path().join("ca.pem"))
        .arg("--cert")
        .arg(dir.path().join("auditor.pem"))
        .arg("--key")
        .arg(dir.path().join("auditor-key.pem"))
        .output()
        .await
        .unwrap()
}

/// Exports the audit log through `credvault audit export`; returns the file.
pub async fn export_audit(dir: &VaultDir, vault: &TestVault) -> PathBuf {
    let export = dir.path().join("audit.jsonl");
    let out = audit_cli(dir, vault, &["export", "--to", export.to_str().unwrap()]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    export
}

/// The SQLite database file at `db` and its WAL, to search for what must
/// not be there. The main file must exist and hold something (a search of a
/// missing file finds nothing, and would pass); the WAL may be gone after a
/// checkpoint.
pub fn sqlite_files(db: &Path) -> Vec<Vec<u8>> {
    let main = std::fs::read(db).unwrap_or_else(|e| panic!("{}: {e}", db.display()));
    assert!(!main.is_empty(), "{} is empty", db.display());
    let wal = std::fs::read(format!("{}-wal", db.display())).unwrap_or_default();
    vec![main, wal]
}

/// Verifies `vault`'s audit chain with `credvault audit verify`, from its
/// database (through `config`) and from an export read over the Audit API.
pub async fn verify_audit(dir: &VaultDir, vault: &TestVault, config: &Config) -> PathBuf {
    let config_file = dir.path().join("credvault.toml");
    std::fs::write(&config_file, config.to_toml()).unwrap();
    let export = export_audit(dir, vault).await;
    for (flag, path) in [("--config", &config_file), ("--file", &export)] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
            .args(["audit", "verify", "--public-key"])
            .arg(dir.path().join("audit.pub"))
            .arg(flag)
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{flag}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    export
}

/// Raw SQL on a vault's database, whichever the backend, for tests that
/// look behind the vault's back or tamper with what it stored. Statements
/// use `$1`-style placeholders, which both backends accept; values are text.
impl VaultDir {
    pub fn execute(&self, sql: &str, params: &[&str]) -> usize {
        match &self.postgres {
            None => {
                let db = rusqlite::Connection::open(self.db()).unwrap();
                db.execute(sql, rusqlite::params_from_iter(params.iter()))
                    .unwrap()
            }
            Some(pg) => {
                let (url, sql) = (pg.url.clone(), sql.to_owned());
                let params: Vec<String> = params.iter().map(|p| (*p).to_owned()).collect();
                on_postgres(url, move |client| async move {
                    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                        .iter()
                        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                        .collect();
                    usize::try_from(client.execute(sql.as_str(), &refs).await.unwrap()).unwrap()
                })
            }
        }
    }

    /// Several statements, no parameters.
    /// Makes every audit insert fail, as a full or broken disk would, until
    /// [`Self::restore_audit_writes`].
    pub fn fail_audit_writes(&self) {
        self.execute_batch(if self.postgres.is_none() {
            "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events \
             BEGIN SELECT RAISE(ABORT, 'disk gone'); END;"
        } else {
            "CREATE FUNCTION audit_down() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'disk gone'; END $$; \
             CREATE TRIGGER audit_down BEFORE INSERT ON audit_events \
             FOR EACH ROW EXECUTE FUNCTION audit_down();"
        });
    }

    pub fn restore_audit_writes(&self) {
        self.execute_batch(if self.postgres.is_none() {
            "DROP TRIGGER audit_down"
        } else {
            "DROP TRIGGER audit_down ON audit_events; DROP FUNCTION audit_down();"
        });
    }

    pub fn execute_batch(&self, sql: &str) {
        match &self.postgres {
            None => rusqlite::Connection::open(self.db())
                .unwrap()
                .execute_batch(sql)
                .unwrap(),
            Some(pg) => {
                let sql = sql.to_owned();
                on_postgres(pg.url.clone(), move |client| async move {
                    client.batch_execute(&sql).await.unwrap();
                });
            }
        }
    }

    /// The first column of every row, as text (cast it in the query if need be).
    pub fn texts(&self, sql: &str) -> Vec<String> {
        match &self.postgres {
            None => {
                let db = rusqlite::Connection::open(self.db()).unwrap();
                let mut stmt = db.prepare(sql).unwrap();
                stmt.query_map([], |r| r.get::<_, String>(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap()
            }
            Some(pg) => {
                let sql = sql.to_owned();
                on_postgres(pg.url.clone(), move |client| async move {
                    client
                        .query(sql.as_str(), &[])
                        .await
                        .unwrap()
                        .iter()
                        .map(|r| r.get::<_, String>(0))
                        .collect()
                })
            }
        }
    }

    /// A single number (`count(*)`, `max(...)`), cast to bigint in the query.
    pub fn number(&self, sql: &str) -> i64 {
        match &self.postgres {
            None => rusqlite::Connection::open(self.db())
                .unwrap()
                .query_row(sql, [], |r| r.get(0))
                .unwrap(),
            Some(pg) => {
                let sql = sql.to_owned();
                on_postgres(pg.url.clone(), move |client| async move {
                    client.query_one(sql.as_str(), &[]).await.unwrap().get(0)
                })
            }
        }
    }
}

/// Runs `f` with a client on `url`, from a thread with its own runtime.
fn on_postgres<T, F, Fut>(url: String, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(tokio_postgres::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                f(client).await
            })
    })
    .join()
    .unwrap()
}

/// `credvault serve --config` as its own process, on a port of its choosing.
pub struct ServerProcess {
    pub process: tokio::process::Child,
    pub url: String,
}

/// Starts `credvault serve --listen 127.0.0.1:0 --config FILE` and waits
/// until it logs that it serves, reading the port from that line.
pub async fn spawn_server(config: &Path) -> ServerProcess {
    spawn_server_as(config, &[]).await
}

/// As [`spawn_server`], started through `wrapper` (e.g. `setpriv` and its
/// arguments, to run the vault as another user).
pub async fn spawn_server_as(config: &Path, wrapper: &[&str]) -> ServerProcess {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let credvault = env!("CARGO_BIN_EXE_credvault");
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = tokio::process::Command::new(program);
            c.args(args).arg(credvault);
            c
        }
        None => tokio::process::Command::new(credvault),
    };
    let mut process = command
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn,credvault::server=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(process.stderr.take().unwrap()).lines();
    let port: u16 = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the vault exited before serving");
        if line.contains("credvault serving") {
            let rest = line.split("127.0.0.1:").nth(1).unwrap();
            break rest
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    ServerProcess {
        process,
        url: format!("https://localhost:{port}"),
    }
}

/// A mutual-TLS connection to `port` presenting `cert`, speaking nothing yet.
pub async fn raw_tls(
    port: u16,
    ca_pem: &str,
    cert: &IssuedCert,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// An HTTP/2 connection to `port` over mutual TLS with `cert`, for clients
/// that misbehave in ways a gRPC client will not; the task ends when the
/// connection does.
pub async fn raw_h2(
    port: u16,
    ca_pem: &str,
    cert: &IssuedCert,
) -> (h2::client::SendRequest<bytes::Bytes>, JoinHandle<()>) {
    let tls = raw_tls(port, ca_pem, cert).await;
    let (sender, connection) = h2::client::handshake(tls).await.unwrap();
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, connection)
}

/// A channel to a dev vault (a `credvault dev` folder, its configuration at
/// `config`) served at `url`, presenting the dev certificate of `identity`
/// (`app`, `admin` or `auditor`).
pub async fn dev_channel(config: &Path, url: &str, identity: &str) -> Channel {
    let certs = credvault::dev::certs::DevCertPaths::new(&config.parent().unwrap().join("certs"));
    credvault::cli::client::connect_channel(
        url,
        &std::fs::read(&certs.ca).unwrap(),
        &std::fs::read(certs.client_cert(identity)).unwrap(),
        &std::fs::read(certs.client_key(identity)).unwrap(),
    )
    .await
    .unwrap()
}

/// Points a dev vault's Amplitude (US) at `fake`, trusting `fake_ca` (its
/// certificate written into `dir`).
pub fn use_fake_amplitude(
    config: &mut Config,
    dir: &Path,
    fake: &credvault_testkit::fake::FakeProvider,
    fake_ca: &credvault::dev::certs::DevCa,
) {
    let ca = dir.join("provider-ca.pem");
    std::fs::write(&ca, fake_ca.cert_pem()).unwrap();
    config.outbound.extra_ca_file = Some(ca);
    config.outbound.allow_private_addresses = true;
    config
        .providers
        .amplitude
        .base_urls
        .insert("us".into(), fake.url());
}

/// Every log line of this test binary, at trace level, to search for canaries.
static LOGS: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> =
    std::sync::OnceLock::new();

#[derive(Clone)]
pub struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every log line of this test binary, at trace level, into a buffer
/// (once per binary), and returns it.
pub fn capture_logs() -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    LOGS.get_or_init(|| {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Sink(buffer.clone());
        tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .init();
        buffer
    })
    .clone()
}

/// A port free on 127.0.0.1 a moment ago (for a listener the vault binds).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The text of the vault's `/metrics` on 127.0.0.1:`port`.
pub async fn scrape_metrics(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
