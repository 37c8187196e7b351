//! Calls to providers: HTTPS to configured hosts only, no redirects, bounded time and body, public addresses only.

mod address;
pub mod scrub;

use std::collections::BTreeMap;
use std::error::Error as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::redirect::Policy;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use url::Url;

use crate::providers::validation::{Answer, Probe, ProbeHeader};
use crate::providers::Provider;
pub use address::is_public;
pub use scrub::Scrubber;

/// How the vault calls providers (ValidateConnection, Proxy, token mints): the
/// configuration file's `[outbound]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// The whole call, body included.
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// CA certificates (PEM) trusted in addition to the system roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_ca_file: Option<PathBuf>,
    /// Let provider hosts resolve to loopback or private addresses (tests only).
    pub allow_private_addresses: bool,
    /// Response bodies are read up to this size, then abandoned.
    pub max_response_bytes: usize,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            extra_ca_file: None,
            allow_private_addresses: false,
            max_response_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboundError {
    #[error("{0}")]
    Ca(String),
    #[error("outbound TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("outbound HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Why no answer came back, in words for a person. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable(pub String);

/// Parses a configured base URL, filling in `{tenant_id}`: an https origin
/// with no credentials, query or fragment.
///
/// The tenant id must be one DNS label, so that the filled-in URL keeps the
/// template's registrable domain, port and path whatever the stored value
/// (which a database writer may have edited).
pub fn parse_base_url(template: &str, tenant_id: &str) -> Result<Url, String> {
    if template.contains("{tenant_id}") && !crate::providers::is_host_label(tenant_id) {
        return Err("the stored tenant_id is not a host name label".into());
    }
    let url = Url::parse(&template.replace("{tenant_id}", tenant_id))
        .map_err(|e| format!("not a URL ({e})"))?;
    if url.scheme() != "https" {
        return Err("must be an https URL".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".into());
    }
    if url.query().is_some() || url.fragment().is_some() || url.host().is_none() {
        return Err("must be scheme://host[:port][/path] with no query or fragment".into());
    }
    Ok(url)
}

/// One request to a provider, on a configured base URL.
#[derive(Debug)]
pub struct Outgoing {
    pub method: reqwest::Method,
    /// Origin-form path and query, already checked.
    pub path_and_query: String,
    pub headers: Vec<ProbeHeader>,
    pub body: Vec<u8>,
    /// The response body is cut at this many bytes.
    pub max_response: usize,
}

/// A provider's answer: its body read up to the cap and scrubbed.
#[derive(Debug)]
pub struct Incoming {
    pub status: u16,
    /// Every header whose value is text, names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body was longer than the cap and was cut.
    pub truncated: bool,
    /// Occurrences of secrets the scrubber replaced.
    pub scrubbed: usize,
}

impl Incoming {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Retry-After in seconds, when sent as a number.
    pub fn retry_after(&self) -> Option<u64> {
        self.header("retry-after")
            .and_then(|v| v.trim().parse::<u64>().ok())
    }
}

/// The HTTP client validation and proxy calls go through.
pub struct Outbound {
    client: reqwest::Client,
    allow_private: bool,
    max_body: usize,
    timeout: Duration,
    permits: BTreeMap<Provider, Arc<Semaphore>>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("allow_private", &self.allow_private)
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

impl Outbound {
    pub fn new(config: &OutboundConfig) -> Result<Self, OutboundError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = &config.extra_ca_file {
            let certs = crate::hardening::read_trusted_certs("outbound.extra_ca_file", path)
                .map_err(OutboundError::Ca)?;
            for cert in certs {
                roots.add(cert)?;
            }
        }
        if roots.is_empty() {
            tracing::warn!("no trusted CA certificates: every provider call will fail TLS");
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .redirect(Policy::none())
            // An environment proxy would see every provider call.
            .no_proxy()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .timeout(Duration::from_millis(config.timeout_ms))
            .dns_resolver(Arc::new(address::PinnedResolver {
                allow_private: config.allow_private_addresses,
            }))
            .user_agent(concat!("credvault/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let permits = Provider::ALL
            .iter()
            .map(|p| {
                let n = p.spec().validation.max_concurrent;
                (*p, Arc::new(Semaphore::new(n)))
            })
            .collect();
        Ok(Self {
            client,
            allow_private: config.allow_private_addresses,
            max_body: config.max_response_bytes,
            timeout: Duration::from_millis(config.timeout_ms),
            permits,
        })
    }

    /// Sends `probe` as a GET to `base`. The probe, and the plaintext in it,
    /// is dropped as soon as the request is built. The whole answer is
    /// scrubbed of what `scrubber` holds (build it with every stored secret
    /// and the probe's headers) before anything reads or cuts it: provider
    /// text cut short first could keep part of a secret no longer whole.
    pub async fn call(
        &self,
        provider: Provider,
        base: &Url,
        probe: Probe,
        scrubber: &Scrubber,
    ) -> Result<Answer, Unreachable> {
        let outgoing = Outgoing {
            method: reqwest::Method::GET,
            path_and_query: probe.path_and_query,
            headers: probe.headers,
            body: Vec::new(),
            max_response: self.max_body,
        };
        self.ask(provider, base, outgoing, scrubber).await
    }

    /// [`Outbound::send`], read as an [`Answer`] for a verdict (a
    /// validation, a token request).
    pub async fn ask(
        &self,
        provider: Provider,
        base: &Url,
        outgoing: Outgoing,
        scrubber: &Scrubber,
    ) -> Result<Answer, Unreachable> {
        let incoming = self.send(provider, base, outgoing, scrubber).await?;
        Ok(Answer {
            status: incoming.status,
            retry_after: incoming.retry_after(),
            body: incoming.body,
            truncated: incoming.truncated,
        })
    }

    /// Sends `outgoing` to `base`, waiting for one of the provider's
    /// concurrency permits first (validation and proxy calls share them).
    /// The request, and the plaintext in its headers, is dropped as soon as
    /// it is built. The answer's body is scrubbed, then cut at the cap.
    pub async fn send(
        &self,
        provider: Provider,
        base: &Url,
        outgoing: Outgoing,
        scrubber: &Scrubber,
    ) -> Result<Incoming, Unreachable> {
        let url = format!(
            "{}{}",
            base.as_str().trim_end_matches('/'),
            outgoing.path_and_query
        );
        let url =
            Url::parse(&url).map_err(|_| Unreachable("the provider URL is malformed".into()))?;
        if url.host() != base.host() || url.port_or_known_default() != base.port_or_known_default()
        {
            return Err(Unreachable(
                "the request would leave the configured host".into(),
            ));
        }
        self.check_literal_address(&url)?;
        let mut headers = HeaderMap::new();
        for h in &outgoing.headers {
            let mut value = HeaderValue::from_bytes(h.value.as_bytes()).map_err(|_| {
                Unreachable(format!(
                    "a stored value cannot be sent in the `{}` header",
                    h.name
                ))
            })?;
            value.set_sensitive(h.sensitive);
            headers.insert(HeaderName::from_static(h.name), value);
        }
        let max_response = outgoing.max_response;
        let mut request = self.client.request(outgoing.method, url).headers(headers);
        if !outgoing.body.is_empty() {
            request = request.body(outgoing.body);
        }
        drop(outgoing.headers);

        let permits = self.permits.get(&provider).cloned();
        let _permit = match &permits {
            Some(semaphore) => Some(
                semaphore
                    .acquire()
                    .await
                    .map_err(|_| Unreachable("the vault is shutting down".into()))?,
            ),
            None => None,
        };
        let mut response = request.send().await.map_err(|e| self.describe(&e))?;
        let status = response.status().as_u16();
        if let Some(encoding) = unreadable_encoding(response.headers()) {
            return Err(Unreachable(format!(
                "the answer has content-encoding `{encoding}`, which the vault does not pass on: \
                 it must read every answer to remove secrets"
            )));
        }
        let headers = response
            .headers()
            .iter()
            .filter_map(|(name, value)| {
                let value = value.to_str().ok()?;
                Some((name.as_str().to_owned(), value.to_owned()))
            })
            .collect();
        // Read a little past the cap, so that a secret straddling it is
        // still seen whole and replaced before the cut.
        let read_limit = max_response.saturating_add(scrubber.longest());
        let mut body = Vec::new();
        let mut more = false;
        while let Some(chunk) = response.chunk().await.map_err(|e| self.describe(&e))? {
            let room = read_limit - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                // Stop reading; dropping the response closes the stream.
                more = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        let (scrubbed, truncated) = scrubber.scrub_and_cut(&mut body, max_response, more);
        Ok(Incoming {
            status,
            headers,
            body,
            truncated,
            scrubbed,
        })
    }

    /// A host given as an address is checked here; names are checked by the resolver.
    fn check_literal_address(&self, url: &Url) -> Result<(), Unreachable> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            _ => return Ok(()),
        };
        if self.allow_private || is_public(ip) {
            Ok(())
        } else {
            Err(Unreachable(
                address::NonPublicAddress {
                    host: ip.to_string(),
                    addr: SocketAddr::new(ip, 0),
                }
                .to_string(),
            ))
        }
    }

    /// Why a call failed, in fixed words. The text of an error from the
    /// HTTP, HTTP/2 or TLS libraries is never passed on: it can quote bytes
    /// the provider sent (an HTTP/2 GOAWAY's debug data, a certificate's
    /// names), and a provider may echo a credential there.
    fn describe(&self, e: &reqwest::Error) -> Unreachable {
        if e.is_timeout() {
            return Unreachable(format!(
                "no answer within {} ms (network timeout)",
                self.timeout.as_millis()
            ));
        }
        let mut cause = None;
        let mut source = e.source();
        while let Some(s) = source {
            if let Some(refused) = s.downcast_ref::<address::NonPublicAddress>() {
                return Unreachable(refused.to_string());
            }
            if let Some(tls) = s.downcast_ref::<rustls::Error>() {
                cause = Some(tls_failure(tls));
            } else if let Some(io) = s.downcast_ref::<std::io::Error>() {
                cause = cause.or(Some(io_failure(io.kind())));
            }
            source = s.source();
        }
        let what = if e.is_connect() {
            "could not connect"
        } else if e.is_body() || e.is_decode() {
            "the answer could not be read"
        } else {
            "the request failed"
        };
        match cause {
            Some(cause) => Unreachable(format!("{what}: {cause}")),
            None => Unreachable(what.to_owned()),
        }
    }
}

/// A TLS failure in fixed words (never the certificate's own text).
fn tls_failure(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "TLS: the provider's certificate has expired"
        }
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "TLS: the provider's certificate is not valid yet"
        }
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "TLS: the provider's certificate is from an unknown issuer (outbound.extra_ca_file)"
        }
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => "TLS: the provider's certificate is not valid for its host name",
        rustls::Error::InvalidCertificate(_) => "TLS: the provider's certificate is not valid",
        _ => "TLS handshake failed",
    }
}

/// A socket failure by its kind, in the standard library's fixed words.
fn io_failure(kind: std::io::ErrorKind) -> &'static str {
    use std::io::ErrorKind as K;
    match kind {
        K::ConnectionRefused => "connection refused",
        K::ConnectionReset => "connection reset",
        K::ConnectionAborted => "connection aborted",
        K::NotConnected | K::BrokenPipe => "connection closed",
        K::TimedOut => "timed out",
        K::UnexpectedEof => "connection closed early",
        _ => "network error",
    }
}

/// The first content coding other than `identity` among all of an answer's
/// `content-encoding` headers and their comma-separated lists, if any. It is
/// named only if it is a registered coding (`gzip`, `br`, …): the provider
/// wrote the header, and it may echo anything, a piece of a credential included.
fn unreadable_encoding(headers: &HeaderMap) -> Option<String> {
    const KNOWN: &[&str] = &[
        "gzip",
        "x-gzip",
        "deflate",
        "br",
        "zstd",
        "compress",
        "x-compress",
    ];
    let named = |coding: &str| {
        KNOWN
            .iter()
            .find(|known| coding.eq_ignore_ascii_case(known))
            .map_or_else(|| "(not shown)".to_owned(), |known| (*known).to_owned())
    };
    headers
        .get_all(reqwest::header::CONTENT_ENCODING)
        .iter()
        .find_map(|value| match value.to_str() {
            Ok(list) => list
                .split(',')
                .map(str::trim)
                .find(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("identity"))
                .map(named),
            Err(_) => Some("(not shown)".to_owned()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_must_be_plain_https_origins() {
        assert!(parse_base_url("https://amplitude.com", "t").is_ok());
        assert_eq!(
            parse_base_url("https://{tenant_id}.amperity.com", "acme")
                .unwrap()
                .host_str(),
            Some("acme.amperity.com")
        );
        for bad in [
            "http://x.com",
            "https://u:p@x.com",
            "https://x.com/?a=1",
            "https://x.com/#f",
            "x",
        ] {
            assert!(parse_base_url(bad, "t").is_err(), "{bad}");
        }
        for tenant in [
            "evil.example/",
            "evil.example#",
            "evil.example?",
            "a@evil.example",
            "acme.evil",
            "acme:444",
            "",
            "-acme",
            "ACME",
        ] {
            assert!(
                parse_base_url("https://{tenant_id}.amperity.com", tenant).is_err(),
                "{tenant}"
            );
        }
    }

    #[test]
    fn every_content_encoding_must_be_identity() {
        let encodings = |values: &[&str]| {
            let mut map = HeaderMap::new();
            for v in values {
                map.append(
                    reqwest::header::CONTENT_ENCODING,
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            unreadable_encoding(&map)
        };
        assert_eq!(encodings(&[]), None);
        assert_eq!(encodings(&["identity", "Identity"]), None);
        assert_eq!(encodings(&["identity", "gzip"]).as_deref(), Some("gzip"));
        assert_eq!(encodings(&["identity, br"]).as_deref(), Some("br"));
        for echo in [
            "Bearer phx_Rk3Vw9Qm2Lx8Tz5Nc1Bd7Yf4Gh6Js0",
            "Vq8rKw2Lx7Mz4Nc9",
        ] {
            assert_eq!(encodings(&[echo]).as_deref(), Some("(not shown)"));
        }
    }
}
