//! The configuration file: paths to key material, never the material itself, so it can be logged whole.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The outbound client's settings are its own; the file format includes them.
pub use crate::outbound::OutboundConfig;
use crate::policy::{Policy, Rule};
use crate::providers::{Provider, Route};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const ROOT_KEY_ENV: &str = "CREDVAULT_ROOT_KEY";

/// Everything `credvault serve` runs with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    pub tls: TlsConfig,
    pub storage: StorageConfig,
    pub keys: KeysConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub providers: ProvidersConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub monitor: MonitorConfig,
    /// Who may call what; no rule, no call.
    #[serde(default, rename = "policy")]
    pub policy: Vec<Rule>,
    /// The file this was loaded from, re-read on SIGHUP.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Prometheus metrics; off unless `listen` is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served over plain HTTP, e.g. "127.0.0.1:9464".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

/// The health monitor, which revalidates every connected connection on a
/// period; off unless `revalidate_every` is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// How often each connection is revalidated, e.g. "24h"; at least
    /// [`MonitorConfig::SHORTEST`].
    #[serde(with = "humantime_option", skip_serializing_if = "Option::is_none")]
    pub revalidate_every: Option<Duration>,
}

impl MonitorConfig {
    /// The shortest period: the checks of a shorter one would be a load on
    /// the providers rather than a watch.
    pub const SHORTEST: Duration = Duration::from_secs(10 * 60);

    fn check(&self) -> Result<(), String> {
        match self.revalidate_every {
            Some(every) if every < Self::SHORTEST => Err(format!(
                "monitor.revalidate_every: {} is shorter than the shortest period, {}; \
                 set a longer one (\"24h\" is typical) or remove it to turn the monitor off",
                humantime::format_duration(every),
                humantime::format_duration(Self::SHORTEST)
            )),
            _ => Ok(()),
        }
    }
}

/// An optional duration written as "24h", "90m", "1d 12h".
mod humantime_option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "{e}; write a duration such as \"24h\", \"90m\" or \"1d 12h\""
            ))
        })
    }
}

/// The audit log's signed checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Sign the head at least every this many events...
    pub checkpoint_every: u64,
    /// ...and at least this often while events arrive.
    pub checkpoint_interval_ms: u64,
    /// Where the vault writes its audit public key (hex) at start-up, for
    /// `credvault audit verify`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
    /// A file outside the database (another disk, a mount only the vault
    /// appends to) that gets every signed checkpoint appended, one JSON line
    /// each. `audit verify --config` checks the log reaches every line, and
    /// the vault refuses to start on a database whose log does not reach the
    /// last one (truncated, or an older copy restored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchor_file: Option<PathBuf>,
    /// `"every-call"` (the default): every call's event is durable before
    /// its answer. `"changes"`: the event of a call that changed nothing and
    /// used no plaintext (Redact, List, ListProviders, Audit.Head, refusals)
    /// is answered once queued and made durable by the next group commit; a
    /// crash can lose those events of the last few milliseconds, never a
    /// change's.
    pub durability: crate::audit::Durability,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_every: 100,
            checkpoint_interval_ms: 10_000,
            public_key_file: None,
            anchor_file: None,
            durability: crate::audit::Durability::default(),
        }
    }
}

/// Per-provider settings; only base URLs so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvidersConfig {
    pub amplitude: ProviderConfig,
    pub amperity: ProviderConfig,
    pub posthog: ProviderConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// Overrides the provider's default base URL for a region or host key.
    pub base_urls: BTreeMap<String, String>,
    /// Narrows the provider's proxy allowlist to these `METHOD /template`
    /// routes (each must be on the provider's own list). Unset: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<Vec<String>>,
}

impl ProviderConfig {
    /// Whether the configuration lets Proxy use `route`.
    pub fn proxies(&self, route: &Route) -> bool {
        self.proxy
            .as_ref()
            .is_none_or(|list| list.iter().any(|r| *r == route.to_string()))
    }
}

impl ProvidersConfig {
    pub fn get(&self, provider: Provider) -> &ProviderConfig {
        match provider {
            Provider::Amplitude => &self.amplitude,
            Provider::Amperity => &self.amperity,
            Provider::Posthog => &self.posthog,
        }
    }

    /// Every provider with all its base URLs written out: the defaults,
    /// overridden by whatever is configured.
    pub fn with_defaults(&self) -> Self {
        let fill = |p: Provider| ProviderConfig {
            proxy: self.get(p).proxy.clone(),
            base_urls: p
                .spec()
                .validation
                .base_urls
                .iter()
                .map(|(k, url)| {
                    let url = self
                        .get(p)
                        .base_urls
                        .get(*k)
                        .cloned()
                        .unwrap_or((*url).to_owned());
                    ((*k).to_owned(), url)
                })
                .collect(),
        };
        Self {
            amplitude: fill(Provider::Amplitude),
            amperity: fill(Provider::Amperity),
            posthog: fill(Provider::Posthog),
        }
    }

    /// Base URL keys must be the provider's, and each URL an https origin.
    fn check(&self) -> Result<(), String> {
        for p in Provider::ALL {
            let spec = &p.spec().validation;
            for (key, url) in &self.get(p).base_urls {
                if spec.default_base_url(key).is_none() {
                    let keys: Vec<_> = spec.base_urls.iter().map(|(k, _)| *k).collect();
                    return Err(format!(
                        "providers.{p}.base_urls has unknown key `{key}`; expected {}",
                        keys.join(", ")
                    ));
                }
                crate::outbound::parse_base_url(url, "tenant")
                    .map_err(|why| format!("providers.{p}.base_urls.{key}: {why}"))?;
            }
            for route in self.get(p).proxy.iter().flatten() {
                if p.spec().route(route).is_none() {
                    let known: Vec<_> = p.spec().routes.iter().map(Route::to_string).collect();
                    return Err(format!(
                        "providers.{p}.proxy: `{route}` is not on {}'s proxy allowlist, and the \
                         configuration can only narrow it; choose from: {}",
                        p.spec().display_name,
                        known.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// The server's private key (PEM); must not be readable by group or others.
    pub key_file: PathBuf,
    /// The CA bundle (PEM) client certificates must chain to.
    pub client_ca_file: PathBuf,
    /// Certificate revocation lists (PEM) for client certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl_file: Option<PathBuf>,
    /// How often the files above are checked for changes (they are also
    /// re-read on SIGHUP). New handshakes use new material.
    #[serde(default = "default_reload_poll_ms")]
    pub reload_poll_ms: u64,
    /// Which CA may issue identities in which SPIFFE trust domain:
    /// `"spiffe://credvault.local" = "ca.pem"` (a PEM file of CA certificates,
    /// each also in `client_ca_file`). A client whose certificate names a
    /// trust domain not listed here, or chains to a CA not bound to it, is
    /// refused. May be left out only when `client_ca_file` holds one CA,
    /// which then issues for every trust domain.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trust_domains: BTreeMap<String, PathBuf>,
}

fn default_reload_poll_ms() -> u64 {
    2_000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Sqlite,
    /// One PostgreSQL database shared by any number of vault replicas.
    Postgres,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default)]
    pub backend: Backend,
    /// SQLite: the database file; created with mode 0600 if absent.
    #[serde(default = "default_db_path")]
    pub path: PathBuf,
    /// SQLite: writes that arrive while a commit is in flight share the next
    /// transaction and its fsync. Off only to measure what it buys.
    #[serde(default = "default_true")]
    pub group_commit: bool,
    /// PostgreSQL: `postgres://user@host:port/database[?sslmode=verify-full]`; `sslmode`
    /// as in libpq, `verify-full` when absent.
    /// Leave the password out; give it in `password_file` or `password_env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// PostgreSQL: a file holding the password (mode 0600 or stricter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PostgreSQL: the environment variable holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// PostgreSQL: connections in this replica's pool.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// PostgreSQL: CA certificates (PEM) trusted for TLS to the database,
    /// beside the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

const PASSWORD_IN_URL: &str = "storage.url holds a password; remove it from the URL and give \
     it in storage.password_file (a file of mode 0600) or storage.password_env (an environment \
     variable)";

impl StorageConfig {
    /// Refuses a password inside `url`: the whole configuration is logged at
    /// start-up and shown by `check-config`, so it may hold no secret.
    pub fn check(&self) -> Result<(), String> {
        let Some(url) = &self.url else {
            return Ok(());
        };
        // A URL's query keys are read decoded (`p%61ssword` is `password`).
        if let Ok(parsed) = url::Url::parse(url) {
            let in_query = parsed
                .query_pairs()
                .any(|(key, _)| key.eq_ignore_ascii_case("password"));
            if parsed.password().is_some() || in_query {
                return Err(PASSWORD_IN_URL.to_owned());
            }
        }
        let parsed: Result<tokio_postgres::Config, _> = url.parse();
        let has_password = match parsed {
            Ok(config) => config.get_password().is_some(),
            // Unparsable (so the start-up would fail after logging it): look
            // for `user:password@` or the word, in any case, by hand.
            Err(_) => {
                url.split_once("://")
                    .and_then(|(_, rest)| rest.split_once('@'))
                    .is_some_and(|(userinfo, _)| userinfo.contains(':'))
                    || url.to_ascii_lowercase().contains("password")
            }
        };
        if has_password {
            return Err(PASSWORD_IN_URL.to_owned());
        }
        Ok(())
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Sqlite,
            path: default_db_path(),
            group_commit: true,
            url: None,
            password_file: None,
            password_env: None,
            pool_size: default_pool_size(),
            ca_file: None,
        }
    }
}

fn default_db_path() -> PathBuf {
    PathBuf::from("credvault.db")
}

fn default_pool_size() -> usize {
    16
}

fn default_true() -> bool {
    true
}

/// Where the root key comes from: a file, or else an environment variable.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// A file holding 64 hex characters, mode 0600 or stricter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_key_file: Option<PathBuf>,
    /// The environment variable holding 64 hex characters, used when no file is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_key_env: Option<String>,
    /// The root key on a PKCS#11 token (an HSM) instead: it never leaves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11: Option<crate::crypto::TokenSettings>,
    /// The vault rotates by itself when the primary key version has wrapped
    /// this many data keys (well under AES-GCM's limit for random nonces).
    #[serde(default = "default_max_encryptions")]
    pub max_encryptions_per_version: u64,
    /// Data keys the rewrap job moves per transaction. Larger batches finish
    /// the rewrap sooner; smaller ones make calls wait less behind each batch
    /// on the one writer (BENCHMARKS.md measures both).
    #[serde(default = "default_rewrap_batch")]
    pub rewrap_batch: usize,
}

pub const DEFAULT_REWRAP_BATCH: usize = 150;

fn default_rewrap_batch() -> usize {
    DEFAULT_REWRAP_BATCH
}

fn default_max_encryptions() -> u64 {
    1 << 30
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Requests larger than this are refused, except Proxy requests, which
    /// may carry a body of up to 1 MiB.
    pub max_message_bytes: usize,
    /// A TLS handshake that takes longer is dropped.
    pub handshake_timeout_ms: u64,
    /// TLS handshakes in progress at once; when full, the oldest is dropped
    /// for a new one.
    pub max_pending_handshakes: usize,
    /// TLS handshakes in progress at once from one IP address; when full,
    /// that address's oldest is dropped for its new one.
    pub max_pending_handshakes_per_address: usize,
    /// In-flight calls get this long to finish after SIGTERM.
    pub shutdown_grace_ms: u64,
    /// After SIGTERM, how long health reports NOT_SERVING before the
    /// listener closes, so load balancers stop sending new calls.
    pub shutdown_drain_ms: u64,
    /// A client connection is told to go away (HTTP/2 GOAWAY) after this
    /// long, and closed `shutdown_grace_ms` later; clients reconnect, and
    /// their certificate is checked again.
    pub max_connection_age_ms: u64,
    /// HTTP/2 streams (calls) open at once on one connection; the client
    /// waits for one to end before opening more.
    pub max_streams_per_connection: u32,
    /// Calls in flight at once, over all clients; more get RESOURCE_EXHAUSTED.
    pub max_concurrent_calls: usize,
    /// Client connections open at once, counted once their handshake has
    /// completed; more are closed.
    pub max_connections: usize,
    /// Connections one identity may have open at once; more of its own are
    /// closed, so that one certificate cannot take every connection place.
    pub max_connections_per_identity: usize,
    /// Calls (and streams) one identity may have in flight at once; more get
    /// RESOURCE_EXHAUSTED, so that one certificate cannot take every place.
    pub max_calls_per_identity: usize,
    /// Calls per second each identity may make (token bucket); 0 for no limit.
    pub rate_per_identity: u32,
    /// How many calls an identity may make at once above its rate.
    pub rate_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            handshake_timeout_ms: 3_000,
            max_pending_handshakes: 128,
            max_pending_handshakes_per_address: 32,
            shutdown_grace_ms: 10_000,
            shutdown_drain_ms: 0,
            max_concurrent_calls: 1024,
            max_streams_per_connection: 100,
            max_connection_age_ms: 30 * 60 * 1000,
            max_connections: 1024,
            max_connections_per_identity: 64,
            max_calls_per_identity: 256,
            rate_per_identity: 0,
            rate_burst: 100,
        }
    }
}

fn default_listen() -> SocketAddr {
    // A constant that parses.
    #[allow(clippy::expect_used)]
    DEFAULT_LISTEN
        .parse()
        .expect("DEFAULT_LISTEN is an address")
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Read(#[from] crate::hardening::FileError),
    #[error("configuration {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
}

impl KeysConfig {
    /// Where the root key is: `root_key_file`, else `root_key_env` (by
    /// default `CREDVAULT_ROOT_KEY`), or `[keys.pkcs11]` alone.
    pub fn root_source(&self) -> Result<crate::crypto::RootSource<'_>, String> {
        use crate::crypto::RootSource;
        match (&self.root_key_file, &self.root_key_env, &self.pkcs11) {
            // A file wins over an environment variable, as it always has.
            (Some(path), _, None) => Ok(RootSource::File(path)),
            (None, env, None) => Ok(RootSource::Env(env.as_deref().unwrap_or(ROOT_KEY_ENV))),
            (None, None, Some(token)) => {
                if token.pin_file.is_some() == token.pin_env.is_some() {
                    return Err(
                        "[keys.pkcs11] needs exactly one of pin_file and pin_env (never the PIN \
                         itself)"
                            .into(),
                    );
                }
                Ok(RootSource::Token(token))
            }
            _ => Err(
                "[keys] names more than one root key: keep exactly one of root_key_file, \
                 root_key_env and [keys.pkcs11]"
                    .into(),
            ),
        }
    }
}

impl Config {
    /// Reads a TOML file; relative paths in it are taken relative to its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let bytes = crate::hardening::read_trusted("configuration", path)?;
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::Parse {
            path: path.to_owned(),
            message: "not UTF-8 text".to_owned(),
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: match e.span() {
                Some(span) => {
                    let place = locate(&text, span.start);
                    // A value written under a key that names where a secret
                    // is may be the secret itself (the PIN in `pin_env`).
                    let message = if !place.key.as_deref().is_some_and(may_show_value) {
                        without_values(e.message())
                    } else {
                        e.message().to_owned()
                    };
                    format!("{place}: {message}")
                }
                None => e.message().to_owned(),
            },
        })?;
        config
            .providers
            .check()
            .and_then(|()| config.storage.check())
            .and_then(|()| config.monitor.check())
            .and_then(|()| config.keys.root_source().map(drop))
            .and_then(|()| Policy::compile(&config.policy).map(drop))
            .map_err(|message| ConfigError::Parse {
                path: path.to_owned(),
                message,
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_relative_to(base);
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Makes every path absolute against `base`.
    pub fn resolve_relative_to(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.tls.cert_file);
        fix(&mut self.tls.key_file);
        fix(&mut self.tls.client_ca_file);
        if let Some(p) = &mut self.tls.crl_file {
            fix(p);
        }
        for p in self.tls.trust_domains.values_mut() {
            fix(p);
        }
        fix(&mut self.storage.path);
        if let Some(p) = &mut self.storage.password_file {
            fix(p);
        }
        if let Some(p) = &mut self.storage.ca_file {
            fix(p);
        }
        if let Some(p) = &mut self.keys.root_key_file {
            fix(p);
        }
        if let Some(token) = &mut self.keys.pkcs11 {
            if let Some(p) = &mut token.pin_file {
                fix(p);
            }
        }
        if let Some(p) = &mut self.outbound.extra_ca_file {
            fix(p);
        }
        if let Some(p) = &mut self.audit.public_key_file {
            fix(p);
        }
        if let Some(p) = &mut self.audit.anchor_file {
            fix(p);
        }
    }

    /// The TOML text of this configuration.
    pub fn to_toml(&self) -> String {
        // Every field is a plain string, number or table: serialization cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// The configuration as the server logs it: as [`Config::to_toml`], with
    /// the names of environment variables not shown, since a name the vault
    /// did not need to read (a `root_key_env` beside a `root_key_file`) may
    /// be the secret itself, written in the wrong place.
    pub fn to_toml_for_log(&self) -> String {
        let mut shown = self.clone();
        let hide = |name: &mut Option<String>| {
            if name.is_some() {
                *name = Some("(not shown)".into());
            }
        };
        hide(&mut shown.keys.root_key_env);
        hide(&mut shown.storage.password_env);
        // Not read on SQLite, so not known to be a path.
        if shown.storage.backend != Backend::Postgres && shown.storage.password_file.is_some() {
            shown.storage.password_file = Some("(not shown)".into());
        }
        if let Some(token) = &mut shown.keys.pkcs11 {
            hide(&mut token.pin_env);
        }
        shown.to_toml()
    }
}

/// Whether a parse error under `key` (`table.key`, as [`locate`] finds it)
/// may quote the value written there: only in the tables that hold no word
/// about secrets (limits, metrics, ...), for keys that do not say where a
/// secret is. Elsewhere (`keys`, `storage`, `providers`, an inline table) a
/// value written by mistake may be the secret itself.
fn may_show_value(key: &str) -> bool {
    let table = key.split('.').next().unwrap_or(key);
    matches!(
        table,
        "listen" | "limits" | "metrics" | "audit" | "tls" | "outbound" | "monitor"
    ) && !names_a_secret(key)
}

/// Whether a configuration key says where a secret is (and so a value
/// written there by mistake may be the secret).
fn names_a_secret(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    last.ends_with("_env")
        || last.ends_with("_file")
        || ["pin", "password", "key", "url", "secret"]
            .iter()
            .any(|word| last.contains(word))
}

/// A parser's message with every quoted value in it replaced, if it quotes
/// a value ("invalid type: integer `738215`, expected a string"); messages
/// that quote only names (an unknown field) are kept.
fn without_values(message: &str) -> String {
    if !message.starts_with("invalid") {
        return message.to_owned();
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(['`', '"']) {
        let quote = &rest[start..=start];
        out.push_str(&rest[..start]);
        match rest[start + 1..].find(quote) {
            Some(len) => {
                out.push_str("(a value, not shown)");
                rest = &rest[start + 1 + len + 1..];
            }
            None => {
                out.push_str("(a value, not shown)");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Where in the configuration's text an error is: "line L, column C", and
/// the key written there (`table.key`).
struct Place {
    line: usize,
    column: usize,
    key: Option<String>,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)?;
        match &self.key {
            Some(key) => write!(f, " (`{key}`)"),
            None => Ok(()),
        }
    }
}

/// The [`Place`] of byte `at` of the configuration's text.
fn locate(text: &str, at: usize) -> Place {
    let at = at.min(text.len());
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let this_line = text[line_start..].lines().next().unwrap_or("");
    let key = this_line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    let key = match (table, key) {
        (Some(table), Some(key)) => Some(format!("{table}.{key}")),
        (None, Some(key)) => Some(key.to_owned()),
        _ => None,
    };
    Place { line, column, key }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parse_or_type_error_names_its_line_column_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        for (text, expected) in [
            (
                "[limits]\nmax_message_bytes = \"64KiB\"\n",
                "line 2, column 21 (`limits.max_message_bytes`): invalid type",
            ),
            ("[limits\nmax_message_bytes = 3\n", "line 1, column 8: "),
            (
                "# the address\nlisten = \"nope\"\n",
                "line 2, column 10 (`listen`): invalid socket address",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    /// A secret written, unquoted, under a key that says where a secret is
    /// (adversarial review): the type error names the key, not the value.
    #[test]
    fn a_type_error_under_a_secrets_key_does_not_repeat_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let base = "[tls]\ncert_file = \"a\"\nkey_file = \"b\"\nclient_ca_file = \"c\"\n";
        for (text, key) in [
            (
                "[storage]\npath = \"d\"\npassword_env = 738215\n[keys]\nroot_key_file = \"r\"\n",
                "storage.password_env",
            ),
            (
                "[storage]\npath = \"d\"\n[keys.pkcs11]\nmodule = \"/m\"\ntoken_label = \"t\"\n\
                 key_label = \"k\"\npin_env = 738215\n",
                "keys.pkcs11.pin_env",
            ),
            (
                "[storage]\npath = \"d\"\n[keys]\nroot_key_env = 738215\n",
                "keys.root_key_env",
            ),
            // An inline table is located at its own key (review round 3).
            (
                "[storage]\npath = \"d\"\n[keys]\npkcs11 = { module = \"/m\", token_label = \
                 \"t\", key_label = \"k\", pin_env = 738215 }\n",
                "keys.pkcs11",
            ),
        ] {
            std::fs::write(&path, format!("{base}{text}")).unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("invalid type"), "{err}");
            assert!(!err.contains("738215"), "the value is in the error: {err}");
        }
        // Elsewhere the value helps, and is kept.
        std::fs::write(
            &path,
            format!("{base}[storage]\npath = \"d\"\n[limits]\nmax_message_bytes = \"64KiB\"\n"),
        )
        .unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("64KiB"), "{err}");
    }

    /// The configuration as logged never shows an environment variable's
    /// name: one the vault did not read may be the secret itself.
    #[test]
    fn the_logged_configuration_hides_variable_names() {
        let mut config: Config = toml::from_str(
            "[tls]\ncert_file = \"a\"\nkey_file = \"b\"\nclient_ca_file = \"c\"\n\
             [storage]\npath = \"d\"\npassword_env = \"S3cretDBPassw0rd\"\n\
             [keys]\nroot_key_file = \"r\"\n",
        )
        .unwrap();
        config.keys.root_key_env = Some("ab".repeat(32));
        let logged = config.to_toml_for_log();
        assert!(!logged.contains("S3cretDBPassw0rd"), "{logged}");
        assert!(!logged.contains(&"ab".repeat(32)), "{logged}");
        assert!(logged.contains("root_key_file"), "{logged}");
    }

    #[test]
    fn resolves_relative_paths_and_fills_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
            [tls]
            cert_file = "certs/server.pem"
            key_file = "/abs/server-key.pem"
            client_ca_file = "certs/ca.pem"
            [storage]
            path = "v.db"
            [keys]
            root_key_file = "root.key"
            "#,
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.tls.cert_file, dir.path().join("certs/server.pem"));
        assert_eq!(c.tls.key_file, PathBuf::from("/abs/server-key.pem"));
        assert_eq!(c.storage.backend, Backend::Sqlite);
        assert_eq!(c.limits.max_message_bytes, 64 * 1024);
    }

    #[test]
    fn base_urls_are_checked_and_filled_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let base = "[tls]\ncert_file = \"a\"\nkey_file = \"b\"\nclient_ca_file = \"c\"\n\
                    [storage]\npath = \"d\"\n[keys]\n";
        std::fs::write(
            &path,
            format!("{base}[providers.amplitude.base_urls]\neu = \"https://127.0.0.1:9\"\n"),
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        let all = c.providers.with_defaults();
        assert_eq!(all.amplitude.base_urls["eu"], "https://127.0.0.1:9");
        assert_eq!(all.amplitude.base_urls["us"], "https://amplitude.com");
        assert_eq!(
            all.amperity.base_urls["tenant"],
            "https://{tenant_id}.amperity.com"
        );

        for (bad, expected) in [
            (
                "[providers.amplitude.base_urls]\nap = \"https://x\"",
                "unknown key `ap`",
            ),
            ("[providers.posthog.base_urls]\nus = \"http://x\"", "https"),
            (
                "[providers.posthog.base_urls]\nus = \"https://u:p@x\"",
                "credentials",
            ),
        ] {
            std::fs::write(&path, format!("{base}{bad}\n")).unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn a_password_in_the_database_url_is_refused_without_echoing_it() {
        const TLS: &str = "[tls]\ncert_file = \"s.pem\"\nkey_file = \"k.pem\"\nclient_ca_file = \"ca.pem\"\n[keys]\nroot_key_file = \"root.key\"\n";
        let dir = tempfile::tempdir().unwrap();
        for url in [
            "postgres://credvault:hunter2-canary@db.internal:5432/credvault",
            "host=db.internal user=credvault password=hunter2-canary",
            "postgres://credvault:hunter2-canary@[malformed",
            "host=127.0.0.1 user=credvault dbname=cv PASSWORD=hunter2-canary",
            "host=127.0.0.1 password = hunter2-canary bogus=1",
            "postgres://credvault@db.internal/cv?Password=hunter2-canary",
            // Encoded keys, beside an sslmode tokio-postgres cannot parse.
            "postgres://credvault@db.internal/cv?sslmode=verify-full&p%61ssword=hunter2-canary",
            "postgres://credvault@db.internal/cv?sslmode=allow&%50ASSWORD=hunter2-canary",
        ] {
            let path = dir.path().join("c.toml");
            std::fs::write(
                &path,
                format!("{TLS}[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\n"),
            )
            .unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(err.contains("password_file"), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let path = dir.path().join("ok.toml");
        std::fs::write(
            &path,
            format!("{TLS}[storage]\nbackend = \"postgres\"\nurl = \"postgres://credvault@db:5432/cv\"\n"),
        )
        .unwrap();
        assert!(Config::load(&path).is_ok());
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listn = \"x\"").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("listn"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn any_config_text_loads_or_errors_without_panic(text in "\\PC{0,400}") {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.toml");
            std::fs::write(&path, &text).unwrap();
            let _ = Config::load(&path);
        }
    }
}
