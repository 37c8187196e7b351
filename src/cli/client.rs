//! Client subcommands: talk to a running vault over mutual TLS; secrets come from stdin or a no-echo prompt, never argv.

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::sync::Arc;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use crate::dev::certs::DevCertPaths;
use crate::dev::CERTS_DIR;
use crate::proto::credentials_client::CredentialsClient;
use crate::proto::validation::Verdict;
use crate::proto::{
    self, Credential, CredentialRef, ListProvidersRequest, ListRequest, StoreRequest,
};

/// Where the vault is and which client certificate to present.
#[derive(Debug, clap::Args)]
pub struct Connect {
    /// The vault's address.
    #[arg(
        long,
        env = "CREDVAULT_ADDR",
        hide_env_values = true,
        default_value = "https://localhost:50051"
    )]
    addr: String,
    /// A development vault's folder: use its CA and `app` client certificate
    /// unless --ca, --cert or --key say otherwise.
    #[arg(long, env = "CREDVAULT_DATA_DIR", hide_env_values = true)]
    data_dir: Option<PathBuf>,
    /// The CA bundle (PEM) that signed the server's certificate.
    #[arg(long, env = "CREDVAULT_CA", hide_env_values = true)]
    ca: Option<PathBuf>,
    /// This client's certificate (PEM).
    #[arg(long, env = "CREDVAULT_CERT", hide_env_values = true)]
    cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, env = "CREDVAULT_KEY", hide_env_values = true)]
    key: Option<PathBuf>,
    /// With --data-dir: which development identity to present (app, admin,
    /// auditor); the audit subcommands default to auditor, the others to app.
    #[arg(long = "as", value_name = "IDENTITY")]
    identity: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    #[command(flatten)]
    connect: Connect,
    /// The workspace (tenant) the connection belongs to, as your product names it.
    #[arg(long)]
    workspace: String,
    /// The provider: amplitude, amperity or posthog (`credvault providers` lists them).
    #[arg(long)]
    provider: String,
    /// A non-secret parameter, as NAME=VALUE; repeat for more.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// Have the vault check the credentials with the provider first; store only if they work.
    #[arg(long)]
    validate: bool,
}

#[derive(Debug, clap::Args)]
pub struct RefArgs {
    #[command(flatten)]
    connect: Connect,
    /// The workspace (tenant) the connection belongs to, as your product names it.
    #[arg(long)]
    workspace: String,
    /// The provider: amplitude, amperity or posthog (`credvault providers` lists them).
    #[arg(long)]
    provider: String,
}

#[derive(Debug, clap::Args)]
pub struct CallArgs {
    #[command(flatten)]
    connect: Connect,
    /// The workspace (tenant) the connection belongs to, as your product names it.
    #[arg(long)]
    workspace: String,
    /// The provider: amplitude, amperity or posthog (`credvault providers` lists them).
    #[arg(long)]
    provider: String,
    /// A request header, as `NAME: VALUE` (accept, content-type,
    /// accept-encoding: identity); repeat for more.
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// GET or POST.
    method: String,
    /// The path and query, such as /api/3/cohorts.
    path: String,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    connect: Connect,
    /// The workspace (tenant) the connection belongs to, as your product names it.
    #[arg(long)]
    workspace: String,
    /// Only the connections whose credential expires within this time
    /// (e.g. `7d`, `36h`), those already expired included.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    expiring_within: Option<std::time::Duration>,
}

#[derive(Debug, clap::Args)]
pub struct ProvidersArgs {
    #[command(flatten)]
    connect: Connect,
}

/// A gRPC client for the Credentials service over mutual TLS.
pub async fn connect(
    addr: &str,
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CredentialsClient<Channel>, String> {
    connect_channel(addr, ca_pem, cert_pem, key_pem)
        .await
        .map(credentials_client)
}

/// A Credentials client that accepts the largest Proxy answer (4 MiB of body).
pub fn credentials_client(channel: Channel) -> CredentialsClient<Channel> {
    CredentialsClient::new(channel).max_decoding_message_size(crate::edge::PROXY_RESPONSE_MESSAGE)
}

/// A mutual-TLS channel to the vault, for any of its services.
pub async fn connect_channel(
    addr: &str,
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Channel, String> {
    if let Some(rest) = addr.strip_prefix("http://") {
        return Err(format!(
            "{addr}: the vault speaks only TLS (with a client certificate): use https://{rest}"
        ));
    }
    if let Ok(mut last) = LAST_CONNECTION.lock() {
        *last = Some(Probe {
            addr: addr.to_owned(),
            ca_pem: ca_pem.to_vec(),
            cert_pem: cert_pem.to_vec(),
            key_pem: Zeroizing::new(key_pem.to_vec()),
        });
    }
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem));
    Endpoint::from_shared(addr.to_owned())
        .map_err(|e| format!("bad address {addr}: {e}"))?
        .tls_config(tls)
        .map_err(|e| format!("TLS configuration: {e}"))?
        .connect()
        .await
        .map_err(|e| match explain_failure(&e) {
            Some(why) => format!("cannot connect to {addr}: {why}"),
            None => format!("cannot connect to {addr}: {}", error_chain(&e)),
        })
}

/// What a failed connection or call means, in words, from the first error
/// in its source chain that says: the TLS alert the vault sent, why the
/// vault's own certificate was refused, or that nothing listens.
fn explain_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            return Some(explain_tls(tls));
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return Some(
                    "connection refused: nothing listens there. Is the vault running, and on \
                     this host and port (--addr)?"
                        .into(),
                );
            }
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(explain_tls(tls));
            }
        }
        source = s.source();
    }
    None
}

fn explain_tls(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, CertificateError, Error};
    let refused = "the vault refused this client certificate";
    match e {
        Error::AlertReceived(Alert::CertificateExpired) => format!(
            "{refused}: it has expired, or is not valid yet. Issue a new one (--cert, --key)"
        ),
        Error::AlertReceived(Alert::CertificateRevoked) => {
            format!("{refused}: it is revoked (the vault's tls.crl_file). Issue a new one")
        }
        Error::AlertReceived(Alert::UnsupportedCertificate) => format!(
            "{refused}: it is not a client certificate (its key usages do not allow client \
             authentication). A server certificate cannot be used as a client's"
        ),
        Error::AlertReceived(
            Alert::UnknownCA | Alert::BadCertificate | Alert::CertificateUnknown,
        ) => format!(
            "{refused}: it does not chain to a CA the vault trusts for its identity \
             (tls.client_ca_file, tls.trust_domains), or its identity is not one SPIFFE ID in a \
             URI SAN. The vault's log names the reason"
        ),
        Error::AlertReceived(Alert::CertificateRequired) => {
            "the vault requires a client certificate: pass --cert and --key (or --data-dir)".into()
        }
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the vault's certificate does not chain to the CA given (--ca): pass the CA that \
             signed the vault's server certificate"
                .into()
        }
        Error::InvalidCertificate(CertificateError::Expired) => {
            "the vault's certificate has expired: renew the server certificate".into()
        }
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the vault's certificate is not valid for the host in --addr: use the name the \
              certificate was issued for (localhost for a dev vault)"
            .into(),
        other => format!("TLS: {other}"),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl Connect {
    async fn client(&self) -> Result<CredentialsClient<Channel>, String> {
        self.channel("app").await.map(credentials_client)
    }

    /// A channel presenting the chosen certificate; `default_identity` picks
    /// the development certificate when --data-dir is given without --as.
    pub async fn channel(&self, default_identity: &str) -> Result<Channel, String> {
        let identity = self.identity.as_deref().unwrap_or(default_identity);
        if let Some(dir) = &self.data_dir {
            if !dir.join(CERTS_DIR).is_dir() {
                return Err(format!(
                    "no development vault in {}: it has no {CERTS_DIR}/ folder. Pass the folder \
                     `credvault serve --dev --data-dir DIR` uses, or start one there",
                    dir.display()
                ));
            }
        }
        let dev = self
            .data_dir
            .as_ref()
            .map(|d| DevCertPaths::new(&d.join(CERTS_DIR)));
        let pick = |given: &Option<PathBuf>, from_dev: fn(&DevCertPaths) -> PathBuf, flag: &str| {
            given
                .clone()
                .or_else(|| dev.as_ref().map(from_dev))
                .ok_or_else(|| {
                    format!("--{flag} is required (or --data-dir of a development vault)")
                })
        };
        let dev_cert = dev.as_ref().map(|d| d.client_cert(identity));
        let dev_key = dev.as_ref().map(|d| d.client_key(identity));
        let ca = pick(&self.ca, |d| d.ca.clone(), "ca")?;
        let cert = self
            .cert
            .clone()
            .or(dev_cert)
            .ok_or("--cert is required (or --data-dir of a development vault)")?;
        let key = self
            .key
            .clone()
            .or(dev_key)
            .ok_or("--key is required (or --data-dir of a development vault)")?;
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        // A key written where its path belongs (CREDVAULT_KEY=...) is not
        // repeated back.
        let key_pem = Zeroizing::new(std::fs::read(&key).map_err(|e| {
            format!(
                "the client key file (--key or CREDVAULT_KEY) cannot be read: {e} (its path is \
                 not repeated here, in case a key was written in its place)"
            )
        })?);
        connect_channel(&self.addr, &read(&ca)?, &read(&cert)?, &key_pem).await
    }
}

pub(super) fn status_error(s: tonic::Status) -> String {
    if let Some(why) = explain_failure(&s) {
        return why;
    }
    // A client certificate the vault refuses is refused after the TLS 1.3
    // handshake, and gRPC sees only a closed connection: ask the vault again,
    // over plain TLS, and read its alert.
    let transport = std::error::Error::source(&s)
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
    if transport {
        let probe = LAST_CONNECTION.lock().ok().and_then(|last| last.clone());
        if let Some(why) = probe.and_then(|p| p.alert()) {
            return why;
        }
    }
    format!("{:?}: {}", s.code(), s.message())
}

/// What the last channel connected with, to ask the vault why it closed it.
static LAST_CONNECTION: std::sync::Mutex<Option<Probe>> = std::sync::Mutex::new(None);

#[derive(Clone)]
struct Probe {
    addr: String,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Zeroizing<Vec<u8>>,
}

impl Probe {
    /// Connects as the failed call did, sends the HTTP/2 preface, and
    /// explains the TLS alert the vault answers with, if it does.
    fn alert(&self) -> Option<String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        use std::io::{Read, Write};
        let uri: tonic::codegen::http::Uri = self.addr.parse().ok()?;
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(443);
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&self.ca_pem) {
            roots.add(ca.ok()?).ok()?;
        }
        let chain = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).ok()?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .ok()?;
        let name = ServerName::try_from(host.to_owned()).ok()?;
        let mut tls = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
        let mut tcp = std::net::TcpStream::connect((host, port)).ok()?;
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .ok()?;
        let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
        let sent = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let read = sent.and_then(|()| stream.read(&mut [0; 64]));
        let err = read.err()?;
        let tls_error = err.get_ref()?.downcast_ref::<rustls::Error>()?;
        Some(explain_tls(tls_error))
    }
}

pub async fn store(args: StoreArgs) -> Result<(), String> {
    let mut params = HashMap::new();
    for p in &args.params {
        let (name, value) = p
            .split_once('=')
            .ok_or_else(|| format!("--param {p:?} is not NAME=VALUE"))?;
        params.insert(name.to_owned(), value.to_owned());
    }
    let mut client = args.connect.client().await?;
    let providers = client
        .list_providers(ListProvidersRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .providers;
    let provider = providers
        .iter()
        .find(|p| p.name == args.provider)
        .ok_or_else(|| {
            let names: Vec<_> = providers.iter().map(|p| p.name.as_str()).collect();
            format!(
                "unknown provider {:?}; the vault knows {}",
                args.provider,
                names.join(", ")
            )
        })?;
    // Before the secrets are asked for, so that nobody pastes them twice.
    let missing: Vec<_> = provider
        .params
        .iter()
        .filter(|f| f.required && !params.contains_key(&f.name))
        .map(|f| format!("--param {}=… ({})", f.name, f.description))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} needs {}",
            provider.display_name,
            missing.join(" and ")
        ));
    }
    let secrets = read_secrets(provider)?;
    let request = StoreRequest {
        workspace_id: args.workspace,
        provider: args.provider,
        secrets: secrets
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
        params,
        validate: args.validate,
    };
    drop(secrets);
    let stored = client
        .store(request)
        .await
        .map_err(status_error)?
        .into_inner();
    print_credential(&stored);
    Ok(())
}

/// Reads each secret field: with a terminal, from a no-echo prompt; otherwise
/// from stdin as `NAME=VALUE` lines.
fn read_secrets(
    provider: &proto::ProviderInfo,
) -> Result<Vec<(String, Zeroizing<String>)>, String> {
    if std::io::stdin().is_terminal() {
        let mut secrets = Vec::new();
        for f in &provider.secrets {
            // A field only some shapes use (Amperity's access_token or
            // client_secret) may be left empty.
            let optional = if f.required {
                ""
            } else {
                "; leave empty if not used"
            };
            let prompt = format!("{} ({}{optional}): ", f.name, f.description);
            let value = Zeroizing::new(
                rpassword::prompt_password(prompt)
                    .map_err(|e| format!("cannot read {}: {e}", f.name))?,
            );
            if value.is_empty() && !f.required {
                continue;
            }
            secrets.push((f.name.clone(), value));
        }
        return Ok(secrets);
    }
    let mut input = Zeroizing::new(String::new());
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("cannot read secrets from stdin: {e}"))?;
    parse_secret_lines(&input)
}

/// `NAME=VALUE` per line; only the line ending is stripped, so the vault can
/// refuse stray whitespace in a value rather than hide it.
fn parse_secret_lines(input: &str) -> Result<Vec<(String, Zeroizing<String>)>, String> {
    input
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| {
            let (name, value) = line
                .split_once('=')
                .ok_or_else(|| format!("stdin line {} is not NAME=VALUE", i + 1))?;
            Ok((name.to_owned(), Zeroizing::new(value.to_owned())))
        })
        .collect()
}

fn reference(workspace: String, provider: String) -> CredentialRef {
    CredentialRef {
        workspace_id: workspace,
        provider,
    }
}

pub async fn redact(args: RefArgs) -> Result<(), String> {
    let mut client = args.connect.client().await?;
    let c = client
        .redact(reference(args.workspace, args.provider))
        .await
        .map_err(status_error)?;
    print_credential(c.get_ref());
    Ok(())
}

pub async fn zero(args: RefArgs) -> Result<(), String> {
    let mut client = args.connect.client().await?;
    let c = client
        .zero(reference(args.workspace, args.provider))
        .await
        .map_err(status_error)?;
    print_credential(c.get_ref());
    Ok(())
}

/// Prints the verdict for a person; an error (exit status 1) unless VALID.
pub async fn validate(args: RefArgs) -> Result<(), String> {
    let mut client = args.connect.client().await?;
    let provider = args.provider.clone();
    let v = client
        .validate_connection(reference(args.workspace, args.provider))
        .await
        .map_err(status_error)?
        .into_inner();
    println!("{}", explain(&provider, &v));
    if v.verdict == Verdict::Valid as i32 {
        Ok(())
    } else {
        Err(format!("the {provider} connection did not validate"))
    }
}

/// A verdict in words, after the seed document's troubleshooting texts.
fn explain(provider: &str, v: &proto::Validation) -> String {
    let verdict = Verdict::try_from(v.verdict).unwrap_or(Verdict::Unspecified);
    let status = match v.provider_status {
        0 => String::new(),
        s => format!(" (HTTP {s})"),
    };
    let advice = match verdict {
        Verdict::Valid if v.display_name.is_empty() => {
            format!("{provider} accepted the credentials.")
        }
        Verdict::Valid => format!(
            "{provider} accepted the credentials for \"{}\".",
            v.display_name
        ),
        Verdict::Rejected => format!(
            "{provider} rejected the credentials. Check that each key was copied whole, with no \
             leading or trailing space; that paired keys come from the same project; that the \
             project still exists; and that the keys were not regenerated since."
        ),
        Verdict::WrongRegion => format!(
            "Wrong region: the credentials work in region {0}. Store them again with \
             --param region={0}.",
            v.suggested_region
        ),
        Verdict::InsufficientPermission => format!(
            "{provider} accepted the key but it lacks a permission the vault needs. {}",
            v.message
        ),
        Verdict::RateLimited => format!(
            "{provider} is rate-limiting these credentials. Wait {} s and retry; if it persists, \
             check whether a batch job is hammering the same endpoint.",
            v.retry_after_seconds
        ),
        Verdict::Unreachable => format!("Couldn't reach {provider}: {}", v.message),
        Verdict::UnexpectedResponse => {
            format!(
                "{provider} gave an answer the vault did not expect: {}",
                v.message
            )
        }
        Verdict::Expired => {
            "The stored token has expired. Create a new one and store it.".to_owned()
        }
        Verdict::Disconnected => {
            "The connection is disconnected. Store credentials to reconnect it.".to_owned()
        }
        Verdict::Unspecified => format!("Unknown verdict: {}", v.message),
    };
    format!("{}{status}: {advice}", verdict.as_str_name())
}

pub async fn list(args: ListArgs) -> Result<(), String> {
    let mut client = args.connect.client().await?;
    let workspace_id = args.workspace;
    let list = client
        .list(ListRequest {
            workspace_id: workspace_id.clone(),
            expiring_within_seconds: args.expiring_within.map(|d| d.as_secs()),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if list.credentials.is_empty() {
        match args.expiring_within {
            Some(within) => println!(
                "no connection in workspace {workspace_id} expires within {}",
                humantime::format_duration(within)
            ),
            None => println!("no connections in workspace {workspace_id}"),
        }
    }
    for c in &list.credentials {
        print_credential(c);
    }
    Ok(())
}

pub async fn providers(args: ProvidersArgs) -> Result<(), String> {
    let mut client = args.connect.client().await?;
    let list = client
        .list_providers(ListProvidersRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    for p in &list.providers {
        println!("{} ({})", p.name, p.display_name);
        for f in &p.secrets {
            println!("  secret {:<18} {}", f.name, f.description);
        }
        for f in &p.params {
            let required = if f.required { " (required)" } else { "" };
            let mut line = format!("  param  {:<18} {}{required}", f.name, f.description);
            if !f.allowed_values.is_empty() {
                line.push_str(&format!(" [{}]", f.allowed_values.join("|")));
            }
            if !f.default_value.is_empty() {
                line.push_str(&format!(" (default {})", f.default_value));
            }
            println!("{line}");
        }
    }
    Ok(())
}

fn print_credential(c: &Credential) {
    let status = proto::Status::try_from(c.status).map_or("unknown", |s| match s {
        proto::Status::Connected => "connected",
        proto::Status::Disconnected => "disconnected",
        proto::Status::Unspecified => "unknown",
    });
    println!("{} in workspace {}: {status}", c.provider, c.workspace_id);
    let mut params: Vec<_> = c.params.iter().collect();
    params.sort();
    for (name, value) in params {
        println!("  {name:<18} = {value}");
    }
    let mut secrets: Vec<_> = c.secrets.iter().collect();
    secrets.sort_by(|a, b| a.0.cmp(b.0));
    for (name, r) in secrets {
        println!("  {name:<18} {} (fingerprint {})", r.hint, r.fingerprint);
    }
    let time = |t: &Option<prost_types::Timestamp>| t.as_ref().map(ToString::to_string);
    if let Some(t) = time(&c.created_at) {
        println!("  created            {t}");
    }
    if let Some(t) = time(&c.updated_at) {
        println!("  updated            {t}");
    }
    if let Some(t) = time(&c.disconnected_at) {
        println!("  disconnected       {t}");
    }
    if let Some(t) = time(&c.expires_at) {
        println!("  expires            {t}");
    }
    if c.key_version > 0 {
        println!("  key version        {}", c.key_version);
    }
    if let Some(v) = &c.last_validation {
        let verdict = Verdict::try_from(v.verdict).unwrap_or(Verdict::Unspecified);
        let at = time(&v.checked_at).unwrap_or_default();
        println!(
            "  last validation    {} at {at}: {}",
            verdict.as_str_name(),
            v.message
        );
    }
}

pub async fn call(args: CallArgs) -> Result<(), String> {
    use std::io::Write;

    let mut headers = HashMap::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("--header {h:?} is not `NAME: VALUE`"))?;
        headers.insert(name.trim().to_owned(), value.trim().to_owned());
    }
    let mut body = Vec::new();
    if !args.method.eq_ignore_ascii_case("GET") && !std::io::stdin().is_terminal() {
        std::io::stdin()
            .read_to_end(&mut body)
            .map_err(|e| format!("cannot read the request body from stdin: {e}"))?;
    }
    if !body.is_empty()
        && !headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case("content-type"))
    {
        headers.insert("content-type".to_owned(), "application/json".to_owned());
    }
    let mut client = args.connect.client().await?;
    let answer = client
        .proxy(proto::ProxyRequest {
            workspace_id: args.workspace,
            provider: args.provider,
            method: args.method,
            path: args.path,
            headers,
            body,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut notes = format!("HTTP {}\n", answer.status);
    let mut names: Vec<_> = answer.headers.iter().collect();
    names.sort();
    for (name, value) in names {
        notes.push_str(&format!("{name}: {value}\n"));
    }
    if answer.answered_by_vault {
        notes.push_str("(answered by the vault: this connection is cooling down after a 429)\n");
    }
    if answer.redactions > 0 {
        notes.push_str(&format!(
            "({} echoed secret value(s) replaced with their hints)\n",
            answer.redactions
        ));
    }
    if answer.truncated {
        notes.push_str("(the body was cut at 4 MiB)\n");
    }
    eprint!("{notes}");
    let mut out = std::io::stdout().lock();
    out.write_all(&answer.body)
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write the body: {e}"))?;
    if answer.status >= 400 {
        return Err(format!("the provider answered {}", answer.status));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_lines_keep_inner_equals_and_spaces() {
        let parsed = parse_secret_lines("api_key=a=b \nsecret_key=xyz\r\n\n").unwrap();
        assert_eq!(parsed[0].0, "api_key");
        assert_eq!(parsed[0].1.as_str(), "a=b ");
        assert_eq!(parsed[1].1.as_str(), "xyz");
    }

    #[test]
    fn secret_line_without_equals_is_an_error_without_the_value() {
        let err = parse_secret_lines("topsecretvalue").unwrap_err();
        assert!(!err.contains("topsecret"));
    }
}
