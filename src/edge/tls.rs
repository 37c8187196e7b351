//! Mutual TLS: the rustls server configuration, the accept loop, and the caller's identity from its certificate.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::task::AtomicWaker;
use futures_util::Stream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use x509_parser::extensions::GeneralName;

use super::quota::{Held, PerKey};
use crate::config::TlsConfig;
use crate::identity::{is_hostname, SpiffeId, SpiffeIdError};
use crate::telemetry::Metrics;

/// Why the TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{what} {path}: {message}")]
    File {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error(transparent)]
    Unsafe(#[from] crate::hardening::FileError),
    #[error("{0}")]
    Trusted(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("tls.trust_domains: {0}")]
    TrustDomains(String),
}

/// Who is calling: the SPIFFE ID in its client certificate's single URI SAN.
/// Never a DNS SAN, the subject CN or the serial number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(Arc<str>);

impl PeerIdentity {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Attached to every request on a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub identity: PeerIdentity,
    pub remote: SocketAddr,
    /// When the client certificate expires: calls after it are refused, on
    /// a connection opened before it too.
    pub not_after: SystemTime,
}

/// Why a verified client certificate still names no usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("client certificate could not be parsed")]
    Unparsable,
    #[error("client certificate has {0} URI SANs; exactly one is allowed")]
    SeveralUris(usize),
    #[error(
        "client certificate has no URI SAN: an identity is a SPIFFE ID in a URI SAN, \
         never a DNS name"
    )]
    NoUri,
    #[error("client certificate's URI SAN is not a SPIFFE ID: it {0}")]
    NotSpiffe(SpiffeIdError),
    #[error("client certificate has a DNS SAN that is not a hostname")]
    BadDnsName,
    #[error("client certificate names trust domain {0}, which tls.trust_domains does not list")]
    UnboundTrustDomain(String),
    #[error(
        "client certificate names trust domain {0} but does not chain to the CA \
         tls.trust_domains binds to it"
    )]
    WrongIssuer(String),
}

/// The identity a client certificate names: its one URI SAN, a SPIFFE ID.
/// A DNS SAN is never an identity, and one that is not a hostname (say,
/// `spiffe://…` spelled as a DNS name) refuses the whole certificate.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<PeerIdentity, IdentityError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|_| IdentityError::Unparsable)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparsable)?
        .ok_or(IdentityError::NoUri)?;
    let mut uris = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(u) => uris.push(*u),
            GeneralName::DNSName(d) if !is_hostname(d) => return Err(IdentityError::BadDnsName),
            _ => {}
        }
    }
    match uris.as_slice() {
        [uri] => {
            let id = SpiffeId::parse(uri).map_err(IdentityError::NotSpiffe)?;
            Ok(PeerIdentity(id.as_str().into()))
        }
        [] => Err(IdentityError::NoUri),
        several => Err(IdentityError::SeveralUris(several.len())),
    }
}

/// What the server authenticates clients with: the rustls configuration for
/// the handshake, and which CA may issue for which trust domain.
pub struct TlsMaterial {
    server: Arc<ServerConfig>,
    /// What the handshake checks a client chain with: the whole bundle, the CRLs.
    clients: Arc<dyn ClientCertVerifier>,
    issuers: Issuers,
}

/// Which CAs may issue identities in which trust domain.
enum Issuers {
    /// `client_ca_file` holds one CA and no binding is configured: it issues
    /// for every trust domain.
    TheOnlyCa,
    /// Per trust domain (`spiffe://…`), a verifier trusting only its CAs.
    Bound(BTreeMap<String, Arc<dyn ClientCertVerifier>>),
}

impl TlsMaterial {
    /// Loads every file `tls` names. Refuses a bundle of several CAs without
    /// `tls.trust_domains`, a binding to a CA outside the bundle, and a
    /// trust domain that is not `spiffe://name`.
    pub fn load(tls: &TlsConfig) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certs("server certificate", &tls.cert_file)?;
        let key = read_key(&tls.key_file)?;
        let bundle = read_certs("client CA", &tls.client_ca_file)?;
        let crls = match &tls.crl_file {
            Some(path) => read_crls(path)?,
            None => Vec::new(),
        };
        let client_verifier = |cas: &[CertificateDer<'static>]| {
            let mut roots = RootCertStore::empty();
            for ca in cas {
                roots.add(ca.clone())?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            if !crls.is_empty() {
                verifier = verifier
                    .with_crls(crls.clone())
                    .only_check_end_entity_revocation();
            }
            Ok::<_, TlsError>(verifier.build()?)
        };
        let issuers = if tls.trust_domains.is_empty() {
            if bundle.len() > 1 {
                return Err(TlsError::TrustDomains(format!(
                    "{} holds {} CAs, so each SPIFFE trust domain must be bound to the CA that \
                     may issue for it: add a [tls.trust_domains] table, e.g. \
                     \"spiffe://credvault.local\" = \"ca.pem\"",
                    tls.client_ca_file.display(),
                    bundle.len()
                )));
            }
            Issuers::TheOnlyCa
        } else {
            let mut bound = BTreeMap::new();
            for (domain, path) in &tls.trust_domains {
                SpiffeId::parse_trust_domain(domain).map_err(|why| {
                    TlsError::TrustDomains(format!(
                        "`{domain}` is not a trust domain (`spiffe://name`, no path): it {why}"
                    ))
                })?;
                let cas = read_certs("trust domain CA", path)?;
                if let Some(outside) = cas.iter().position(|ca| !bundle.contains(ca)) {
                    return Err(TlsError::TrustDomains(format!(
                        "certificate {} of {} (bound to {domain}) is not in client_ca_file {}: \
                         no client it issued could connect; add it to the bundle",
                        outside + 1,
                        path.display(),
                        tls.client_ca_file.display()
                    )));
                }
                bound.insert(domain.clone(), client_verifier(&cas)?);
            }
            Issuers::Bound(bound)
        };
        let clients = client_verifier(&bundle)?;
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_client_cert_verifier(Arc::clone(&clients))
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            server: Arc::new(config),
            clients,
            issuers,
        })
    }

    /// Whether a chain accepted earlier would still be accepted now: by this
    /// material's CAs and CRLs, at this time, under its trust domain's CA.
    fn still_trusts(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return false;
        };
        self.clients
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .is_ok()
            && self.identify(chain).is_ok()
    }

    /// The identity a client's verified chain names, if a CA bound to its
    /// trust domain issued it.
    pub fn identify(&self, chain: &[CertificateDer<'_>]) -> Result<PeerIdentity, IdentityError> {
        let (leaf, intermediates) = chain.split_first().ok_or(IdentityError::NoUri)?;
        let identity = identity_of(leaf)?;
        let Issuers::Bound(bound) = &self.issuers else {
            return Ok(identity);
        };
        let domain = SpiffeId::parse(identity.as_str())
            .map_err(IdentityError::NotSpiffe)?
            .trust_domain();
        let verifier = bound
            .get(domain)
            .ok_or_else(|| IdentityError::UnboundTrustDomain(domain.to_owned()))?;
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|_| IdentityError::WrongIssuer(domain.to_owned()))?;
        Ok(identity)
    }
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let pem = crate::hardening::read_trusted("CRL", path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error("CRL", path, e))?;
    if crls.is_empty() {
        return Err(file_error("CRL", path, "holds no PEM CRL"));
    }
    Ok(crls)
}

fn file_error(what: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    crate::hardening::read_trusted_certs(what, path).map_err(TlsError::Trusted)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = crate::hardening::read_private("server key", path)?;
    // The parse error says only what was wrong with the PEM, not its bytes.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| file_error("server key", path, e))
}

/// The server's TLS material, replaceable while serving: new handshakes use
/// the newest, established connections keep theirs.
#[derive(Clone)]
pub struct SharedTls {
    paths: TlsConfig,
    current: Arc<std::sync::RwLock<Arc<TlsMaterial>>>,
    /// Every open client connection, to end those a reload no longer trusts.
    live: Arc<std::sync::Mutex<Vec<Weak<Live>>>>,
}

/// An open connection's client chain, and the switch that ends it.
struct Live {
    chain: Vec<CertificateDer<'static>>,
    ended: AtomicBool,
    waker: AtomicWaker,
}

impl Live {
    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.waker.wake();
    }
}

impl std::fmt::Debug for SharedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTls")
            .field("paths", &self.paths)
            .finish()
    }
}

impl SharedTls {
    pub fn load(paths: &TlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            current: Arc::new(std::sync::RwLock::new(Arc::new(TlsMaterial::load(paths)?))),
            paths: paths.clone(),
            live: Arc::default(),
        })
    }

    pub fn current(&self) -> Arc<TlsMaterial> {
        // Replaced whole under the lock; a poisoned lock still holds a whole config.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads every file. On any error the material in force stays.
    /// Otherwise new handshakes use the new material, and every open
    /// connection whose client chain it no longer trusts (revoked by a new
    /// CRL, its CA gone from the bundle, expired) is ended. Returns how many.
    pub fn reload(&self) -> Result<usize, TlsError> {
        let fresh = Arc::new(TlsMaterial::load(&self.paths)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&fresh);
        let mut ended = 0;
        self.live_connections().retain(|weak| {
            let Some(live) = weak.upgrade() else {
                return false;
            };
            if fresh.still_trusts(&live.chain) {
                return true;
            }
            live.end();
            ended += 1;
            false
        });
        Ok(ended)
    }

    fn live_connections(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Live>>> {
        // Only list operations run under the lock; a poisoned one is still whole.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an open connection's chain, forgetting closed ones.
    fn track(&self, chain: &[CertificateDer<'_>]) -> Arc<Live> {
        let live = Arc::new(Live {
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            ended: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        let mut all = self.live_connections();
        all.retain(|weak| weak.strong_count() > 0);
        all.push(Arc::downgrade(&live));
        live
    }

    /// The newest modification time among the files, to notice changes.
    pub fn files_changed_at(&self) -> Option<std::time::SystemTime> {
        let p = &self.paths;
        [
            Some(&p.cert_file),
            Some(&p.key_file),
            Some(&p.client_ca_file),
            p.crl_file.as_ref(),
        ]
        .into_iter()
        .flatten()
        .chain(p.trust_domains.values())
        .filter_map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .max()
    }
}

/// How long after its certificate expires a connection is ended.
const EXPIRED_GRACE: Duration = Duration::from_secs(10);

/// A client connection that completed the handshake and named an identity.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
    live: Arc<Live>,
    _slot: ConnectionSlot,
}

impl TlsConn {
    /// Ended by a reload that no longer trusts the client, or by the
    /// certificate's expiry: reads and writes fail, and the connection with
    /// every stream on it ends. Expiry ends it [`EXPIRED_GRACE`] late, so that
    /// a call made just after is told why (UNAUTHENTICATED, from admission);
    /// an audit stream ends at expiry itself. An idle connection notices at
    /// its next keepalive ping, within 30 s more.
    fn check_live(&self, cx: &mut Context<'_>) -> io::Result<()> {
        self.live.waker.register(cx.waker());
        if self.live.ended.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client certificate is no longer trusted",
            ));
        }
        if self.info.not_after + EXPIRED_GRACE < SystemTime::now() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client certificate has expired",
            ));
        }
        Ok(())
    }
}

/// Holds one of the `max_connections` places while a connection is open.
struct ConnectionSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// One of its identity's `max_connections_per_identity`.
    _own: Held,
    metrics: Arc<Metrics>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.metrics.connection_closed();
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_live(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_live(cx)?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_live(cx)?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// How many connections may be open or opening at once.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A handshake that takes longer is dropped.
    pub handshake_timeout: Duration,
    /// Connections that completed the handshake; more are closed.
    pub max_connections: usize,
    /// Handshakes in progress, over all addresses.
    pub max_pending: usize,
    /// Handshakes in progress from one IP address.
    pub max_pending_per_address: usize,
    /// Open connections of one identity; more of its connections are closed.
    pub max_connections_per_identity: usize,
}

/// Accepts TCP connections and completes each handshake in its own task, so a
/// slow or hostile client cannot hold up the others. Yields only connections
/// whose certificate verified and named an identity. Stops accepting when the
/// stream is dropped.
///
/// Sockets that never finish a handshake cost only a pending place: when the
/// pending budget (or an address's share of it) is full, the oldest pending
/// handshake is dropped for the new one, so idle sockets cannot lock out a
/// client that completes its handshake promptly, even from the same address.
/// A connection takes one of the `max_connections` places only once its
/// handshake has completed.
pub fn incoming(
    listener: TcpListener,
    tls: SharedTls,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let per_identity = PerKey::new(limits.max_connections_per_identity);
    let pending = Pending::new(limits);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let material = tls.current();
            let acceptor = TlsAcceptor::from(Arc::clone(&material.server));
            let tx = tx.clone();
            let tls = tls.clone();
            let slots = Arc::clone(&slots);
            let per_identity = Arc::clone(&per_identity);
            let metrics = Arc::clone(&metrics);
            let place = pending.enter(remote.ip());
            let id = place.id;
            let handshake = tokio::spawn(async move {
                let _place = place;
                let stream = match tokio::time::timeout(
                    limits.handshake_timeout,
                    acceptor.accept(tcp),
                )
                .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        return tracing::info!(%remote, reason = %e, "TLS handshake failed")
                    }
                    Err(_) => return tracing::info!(%remote, "TLS handshake timed out"),
                };
                let (identity, not_after) = match peer_identity(&material, &stream) {
                    Ok(named) => named,
                    Err(e) => return tracing::info!(%remote, reason = %e, "refused client"),
                };
                let Some(own) = per_identity.try_take(identity.as_str()) else {
                    return tracing::warn!(
                        %remote,
                        %identity,
                        max_connections_per_identity = per_identity.limit(),
                        "this identity's connection limit reached: closing its new connection"
                    );
                };
                let Ok(permit) = slots.try_acquire_owned() else {
                    return tracing::warn!(
                        %remote,
                        %identity,
                        max_connections = limits.max_connections,
                        "connection limit reached: closing a new connection"
                    );
                };
                metrics.connection_opened();
                let live = tls.track(stream.get_ref().1.peer_certificates().unwrap_or_default());
                let conn = TlsConn {
                    live,
                    stream,
                    info: PeerInfo {
                        identity,
                        remote,
                        not_after,
                    },
                    _slot: ConnectionSlot {
                        _permit: permit,
                        _own: own,
                        metrics,
                    },
                };
                let _ = tx.send(Ok(conn)).await;
            });
            pending.started(id, handshake.abort_handle());
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The handshakes in progress, oldest first, so that the oldest can be
/// dropped for a new one when the budget is full.
struct Pending {
    limits: ConnectionLimits,
    state: Arc<std::sync::Mutex<PendingState>>,
}

#[derive(Default)]
struct PendingState {
    next: u64,
    /// By arrival: the address, and the task once it is spawned.
    open: BTreeMap<u64, (IpAddr, Option<tokio::task::AbortHandle>)>,
}

/// One handshake's pending place, given back when its task ends or is dropped.
struct PendingPlace {
    id: u64,
    state: Arc<std::sync::Mutex<PendingState>>,
}

impl Pending {
    fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits,
            state: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingState> {
        // Only map operations run under the lock; a poisoned one is still whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for a handshake from `address`, first dropping the
    /// oldest handshake from that address, or the oldest of all, to make room.
    fn enter(&self, address: IpAddr) -> PendingPlace {
        let mut state = self.lock();
        let from_address = state.open.values().filter(|(a, _)| *a == address).count();
        let evict = if from_address >= self.limits.max_pending_per_address.max(1) {
            state
                .open
                .iter()
                .find(|(_, (a, _))| *a == address)
                .map(|(id, _)| *id)
        } else if state.open.len() >= self.limits.max_pending.max(1) {
            state.open.keys().next().copied()
        } else {
            None
        };
        if let Some((dropped, task)) = evict.and_then(|id| state.open.remove(&id)) {
            if let Some(task) = task {
                task.abort();
            }
            tracing::info!(remote = %dropped, "pending handshakes at their limit: dropped the oldest");
        }
        let id = state.next;
        state.next += 1;
        state.open.insert(id, (address, None));
        PendingPlace {
            id,
            state: Arc::clone(&self.state),
        }
    }

    /// Records the task holding place `id`, so that it can be dropped. A
    /// task already done has left no entry to record it in.
    fn started(&self, id: u64, task: tokio::task::AbortHandle) {
        if let Some(entry) = self.lock().open.get_mut(&id) {
            entry.1 = Some(task);
        }
    }
}

impl Drop for PendingPlace {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.open.remove(&self.id);
    }
}

fn peer_identity(
    material: &TlsMaterial,
    stream: &TlsStream<TcpStream>,
) -> Result<(PeerIdentity, SystemTime), IdentityError> {
    let (_, conn) = stream.get_ref();
    let chain = conn.peer_certificates().unwrap_or_default();
    let identity = material.identify(chain)?;
    Ok((identity, chain_not_after(chain)?))
}

/// When a chain stops being valid: the earliest `notAfter` of its
/// certificates, the intermediates' as well as the leaf's.
fn chain_not_after(chain: &[CertificateDer<'_>]) -> Result<SystemTime, IdentityError> {
    let mut earliest = None::<i64>;
    for cert in chain {
        let (_, parsed) =
            x509_parser::parse_x509_certificate(cert).map_err(|_| IdentityError::Unparsable)?;
        let seconds = parsed.validity().not_after.timestamp();
        earliest = Some(earliest.map_or(seconds, |e| e.min(seconds)));
    }
    let seconds = earliest.ok_or(IdentityError::NoUri)?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::certs::{DevCa, Subject};

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn identity_is_the_single_uri_san() {
        let ca = DevCa::generate("t").unwrap();
        let c = ca
            .issue("cn-is-ignored", Subject::ClientUris(&["spiffe://x/app"]))
            .unwrap();
        assert_eq!(
            identity_of(&der(&c.cert_pem)).unwrap().as_str(),
            "spiffe://x/app"
        );
    }

    #[test]
    fn a_dns_san_is_never_an_identity() {
        let ca = DevCa::generate("t").unwrap();
        let c = ca
            .issue("cn-is-ignored", Subject::ClientDns("svc.internal"))
            .unwrap();
        assert_eq!(identity_of(&der(&c.cert_pem)), Err(IdentityError::NoUri));
    }

    #[test]
    fn a_dns_san_that_is_no_hostname_refuses_the_certificate() {
        let ca = DevCa::generate("t").unwrap();
        let c = ca
            .issue_with("x", Subject::ClientUris(&["spiffe://x/app"]), |p| {
                p.subject_alt_names.push(rcgen::SanType::DnsName(
                    "spiffe://x/admin".try_into().unwrap(),
                ));
            })
            .unwrap();
        assert_eq!(
            identity_of(&der(&c.cert_pem)),
            Err(IdentityError::BadDnsName)
        );
    }

    #[test]
    fn refuses_several_uri_sans() {
        let ca = DevCa::generate("t").unwrap();
        let c = ca
            .issue("x", Subject::ClientUris(&["spiffe://x/a", "spiffe://x/b"]))
            .unwrap();
        assert_eq!(
            identity_of(&der(&c.cert_pem)),
            Err(IdentityError::SeveralUris(2))
        );
    }

    #[test]
    fn a_full_pending_budget_drops_the_oldest_handshake() {
        let pending = Pending::new(ConnectionLimits {
            handshake_timeout: Duration::from_secs(1),
            max_connections: 10,
            max_pending: 3,
            max_pending_per_address: 2,
            max_connections_per_identity: 10,
        });
        let ip = |last: u8| IpAddr::from([127, 0, 0, last]);
        let open = |p: &Pending| p.lock().open.keys().copied().collect::<Vec<_>>();
        let places: Vec<_> = [1, 1, 1]
            .into_iter()
            .map(|a| pending.enter(ip(a)))
            .collect();
        assert_eq!(
            open(&pending),
            [1, 2],
            "one address keeps at most its share"
        );
        let more: Vec<_> = [2, 3].into_iter().map(|a| pending.enter(ip(a))).collect();
        assert_eq!(open(&pending), [2, 3, 4], "the oldest of all makes room");
        drop(more);
        assert_eq!(open(&pending), [2]);
        drop(places);
        assert!(open(&pending).is_empty());
    }

    #[test]
    fn a_chain_expires_with_its_first_certificate_to_expire() {
        let ca = DevCa::generate("t").unwrap();
        let until = |year| {
            ca.issue_with("x", Subject::ClientUris(&["spiffe://x/app"]), |p| {
                p.not_after = rcgen::date_time_ymd(year, 1, 1);
            })
            .unwrap()
        };
        // The leaf outlives the intermediate that issued it: the intermediate's date counts.
        let leaf = der(&until(2090).cert_pem);
        let intermediate = der(&until(2080).cert_pem);
        let expires = chain_not_after(&[leaf, intermediate]).unwrap();
        let year_2080 = SystemTime::UNIX_EPOCH + Duration::from_secs(3_471_292_800);
        assert_eq!(expires, year_2080);
    }
}
