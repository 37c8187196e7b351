//! HTTPS fakes of the providers on 127.0.0.1 for tests and benchmarks: record every request, answer as told.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use credvault::dev::certs::{DevCa, Subject};

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path_and_query: String,
    /// Lower-case names.
    pub headers: HashMap<String, String>,
    /// The host the request named (HTTP/2 `:authority` or `Host`).
    pub authority: String,
    pub body: Bytes,
}

/// What the fake answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub delay: Duration,
}

impl Reply {
    pub fn json(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::copy_from_slice(body.as_bytes()),
            delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Handler = dyn Fn(&Recorded) -> Reply + Send + Sync;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Test equipment: a panicking handler must not wedge the fake.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A provider fake serving HTTPS with a certificate from the test CA.
pub struct FakeProvider {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    handler: Arc<Mutex<Arc<Handler>>>,
    max_in_flight: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeProvider {
    /// Serves HTTPS on 127.0.0.1 with a certificate from `ca`, answering
    /// every request with what `reply` says.
    ///
    /// # Panics
    /// If the loopback listener or the certificate cannot be made: this is test equipment.
    pub async fn start(
        ca: &DevCa,
        reply: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Self {
        #[allow(clippy::expect_used)] // test equipment: no fake, no test
        Self::try_start(ca, reply)
            .await
            .expect("a fake provider on 127.0.0.1")
    }

    async fn try_start(
        ca: &DevCa,
        reply: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let cert = ca.issue(
            "fake provider",
            Subject::Server(&["127.0.0.1", "localhost"]),
        )?;
        let chain = vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes())?];
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Mutex<Arc<Handler>>> = Arc::new(Mutex::new(Arc::new(reply)));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let (r, h, n, m) = (
            requests.clone(),
            handler.clone(),
            in_flight.clone(),
            max_in_flight.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, r, h, n, m) =
                    (acceptor.clone(), r.clone(), h.clone(), n.clone(), m.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (r, h, n, m) = (r.clone(), h.clone(), n.clone(), m.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let headers: HashMap<String, String> = parts
                                .headers
                                .iter()
                                .map(|(k, v)| {
                                    (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                                })
                                .collect();
                            let authority = parts.uri.authority().map_or_else(
                                || headers.get("host").cloned().unwrap_or_default(),
                                ToString::to_string,
                            );
                            let body = body
                                .collect()
                                .await
                                .map(http_body_util::Collected::to_bytes)
                                .unwrap_or_default();
                            let recorded = Recorded {
                                method: parts.method.to_string(),
                                path_and_query: parts
                                    .uri
                                    .path_and_query()
                                    .map(ToString::to_string)
                                    .unwrap_or_default(),
                                headers,
                                authority,
                                body,
                            };
                            lock(&r).push(recorded.clone());
                            let now = n.fetch_add(1, Ordering::SeqCst) + 1;
                            m.fetch_max(now, Ordering::SeqCst);
                            let handler = lock(&h).clone();
                            let reply = handler(&recorded);
                            tokio::time::sleep(reply.delay).await;
                            n.fetch_sub(1, Ordering::SeqCst);
                            let mut response = hyper::Response::builder().status(reply.status);
                            for (k, v) in &reply.headers {
                                response = response.header(k, v);
                            }
                            let response = response
                                .body(Full::new(reply.body.clone()))
                                .unwrap_or_else(|_| hyper::Response::new(Full::new(reply.body)));
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        Ok(Self {
            addr,
            requests,
            handler,
            max_in_flight,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.requests).clone()
    }

    /// How many requests arrived, without copying them.
    pub fn request_count(&self) -> usize {
        lock(&self.requests).len()
    }

    /// Forgets the requests recorded so far (long benchmarks).
    pub fn clear_requests(&self) {
        lock(&self.requests).clear();
    }

    pub fn set_reply(&self, reply: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) {
        *lock(&self.handler) = Arc::new(reply);
    }

    /// The most requests this fake was answering at one time.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An OAuth client-credentials token endpoint, as Amperity's
/// (`POST /api/v0/oauth2/token`, a form body): mints a new token for the
/// right client id and secret, refuses others, and knows what it minted.
pub struct TokenEndpoint {
    client_id: String,
    client_secret: String,
    lifetime_seconds: u64,
    minted: Mutex<Vec<String>>,
    /// Every answer is this status instead (429, 503, ...), when set.
    fail_with: Mutex<Option<u16>>,
}

impl TokenEndpoint {
    pub const PATH: &'static str = "/api/v0/oauth2/token";

    pub fn new(client_id: &str, client_secret: &str, lifetime_seconds: u64) -> Arc<Self> {
        Arc::new(Self {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            lifetime_seconds,
            minted: Mutex::new(Vec::new()),
            fail_with: Mutex::new(None),
        })
    }

    /// From now on, every token request is answered with `status`.
    pub fn fail_with(&self, status: Option<u16>) {
        *lock(&self.fail_with) = status;
    }

    /// The answer to `r` if it is a request for this endpoint.
    pub fn answer(&self, r: &Recorded) -> Option<Reply> {
        if r.path_and_query != Self::PATH {
            return None;
        }
        if let Some(status) = *lock(&self.fail_with) {
            return Some(
                Reply::json(status, r#"{"error":"temporarily_unavailable"}"#)
                    .header("retry-after", "30"),
            );
        }
        let form: HashMap<String, String> =
            url::form_urlencoded::parse(&r.body).into_owned().collect();
        let field = |name: &str| form.get(name).map_or("", String::as_str);
        if r.method != "POST" || field("grant_type") != "client_credentials" {
            return Some(Reply::json(400, r#"{"error":"unsupported_grant_type"}"#));
        }
        if field("client_id") != self.client_id || field("client_secret") != self.client_secret {
            return Some(Reply::json(401, r#"{"error":"invalid_client"}"#));
        }
        let mut minted = lock(&self.minted);
        let token = format!("minted-token-{}-Qz7Wm3Xk9", minted.len() + 1);
        minted.push(token.clone());
        Some(Reply::json(
            200,
            &format!(
                r#"{{"access_token":"{token}","expires_in":{},"token_type":"Bearer"}}"#,
                self.lifetime_seconds
            ),
        ))
    }

    /// Every token minted so far, oldest first.
    pub fn minted(&self) -> Vec<String> {
        lock(&self.minted).clone()
    }

    /// Whether `r` carries `Authorization: Bearer` with the newest token.
    pub fn authorizes(&self, r: &Recorded) -> bool {
        let newest = lock(&self.minted).last().cloned();
        newest.is_some_and(|token| {
            r.headers.get("authorization").map(String::as_str) == Some(&format!("Bearer {token}"))
        })
    }
}
