//! Before a request's body is read: who calls, whether any rule lets it call this method at
//! all, whether it is within its rate and the vault's capacity, and how many bytes it may send.
//!
//! A call refused here never has its body buffered, so a certificate without
//! rights cannot make the vault hold its messages. An admitted call holds its
//! place among `max_concurrent_calls` until its answer (a whole stream, for
//! Audit.Subscribe) has been sent, and its body is cut off past its method's
//! limit. The gate then decides on the workspace, provider and route, which
//! only the body names.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use http_body::Frame;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderMap};
use tonic::codegen::{Bytes, Service};
use tonic::Status;

use super::gate::code_name;
use super::quota::{Held, PerKey};
use super::refusals::Refusals;
use super::tls::PeerInfo;
use crate::audit;
use crate::config::Limits;
use crate::policy::{SharedPolicy, METHODS};
use crate::telemetry::Metrics;

/// The package every vault service's path starts with.
const PACKAGE: &str = "/credvault.v1.";
/// The gRPC message prefix: a compression flag and a 4-byte length.
const MESSAGE_PREFIX: usize = 5;

type RateLimiter = governor::DefaultKeyedRateLimiter<String>;

/// What admits calls, shared by every connection.
pub struct Admission {
    policy: SharedPolicy,
    refusals: Arc<Refusals>,
    rate: Option<RateLimiter>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    /// For health and reflection: a quarter of `max_in_flight`, apart.
    standard_in_flight: Arc<Semaphore>,
    max_standard_in_flight: usize,
    per_identity: Arc<PerKey>,
    max_message_bytes: usize,
    /// Proxy carries a request body of its own size.
    max_proxy_message_bytes: usize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("max_in_flight", &self.max_in_flight)
            .field("rate_limited", &self.rate.is_some())
            .finish_non_exhaustive()
    }
}

/// A call let through: its place among the calls in flight (the vault's and
/// its identity's), and how many body bytes it may send.
struct Admitted {
    place: (OwnedSemaphorePermit, Held),
    max_body: usize,
    context: audit::Context,
}

impl Admission {
    pub fn new(
        policy: SharedPolicy,
        refusals: Arc<Refusals>,
        limits: &Limits,
        max_proxy_message_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let max_standard_in_flight = (limits.max_concurrent_calls / 4).max(1);
        let rate = NonZeroU32::new(limits.rate_per_identity).map(|per_second| {
            let burst = NonZeroU32::new(limits.rate_burst).unwrap_or(per_second);
            governor::RateLimiter::keyed(governor::Quota::per_second(per_second).allow_burst(burst))
        });
        Self {
            policy,
            refusals,
            rate,
            in_flight: Arc::new(Semaphore::new(limits.max_concurrent_calls.max(1))),
            max_in_flight: limits.max_concurrent_calls.max(1),
            standard_in_flight: Arc::new(Semaphore::new(max_standard_in_flight)),
            max_standard_in_flight,
            per_identity: PerKey::new(limits.max_calls_per_identity),
            max_message_bytes: limits.max_message_bytes,
            max_proxy_message_bytes,
            metrics,
        }
    }

    /// Decides on a request from its path and its connection alone. `None`:
    /// not a path the vault serves, which tonic answers UNIMPLEMENTED without
    /// reading its body. A refusal comes with the context to account for it
    /// under.
    fn admit<B>(
        &self,
        req: &http::Request<B>,
    ) -> Result<Option<Admitted>, Box<(Status, Option<audit::Context>)>> {
        let Some((kind, service, method)) = target(req.uri().path()) else {
            return Ok(None);
        };
        let Some(peer) = req.extensions().get::<PeerInfo>() else {
            // Every connection passes through `tls::incoming`, which attaches it.
            return Err(Box::new((
                Status::unauthenticated("no client identity"),
                None,
            )));
        };
        let identity = peer.identity.as_str();
        let context = audit::Context {
            identity: identity.to_owned(),
            method: format!("{service}.{method}"),
            workspace_id: String::new(),
            provider: String::new(),
            request_id: request_id(req.headers()),
        };
        let policy = self.policy.current();
        let allowed = match kind {
            Kind::Vault => policy.may_call(identity, service, method),
            // Any identity the policy names may discover the API.
            Kind::Reflection => policy.names(identity),
            // Load balancers and supervisors check health with any certificate.
            Kind::Health => true,
        };
        let refused = if peer.not_after < SystemTime::now() {
            Some(Status::unauthenticated(
                "the client certificate has expired since this connection was opened; \
                 reconnect with a renewed certificate",
            ))
        } else if !allowed {
            // The same answer the gate gives when the scope is not allowed.
            Some(Status::permission_denied(format!(
                "identity `{identity}` may not call `{method}`"
            )))
        } else if self
            .rate
            .as_ref()
            .is_some_and(|rate| rate.check_key(&context.identity).is_err())
        {
            Some(Status::resource_exhausted(format!(
                "identity `{identity}` is over its rate limit; retry shortly"
            )))
        } else {
            None
        };
        if let Some(status) = refused {
            return Err(Box::new((status, Some(context))));
        }
        let Some(own) = self.per_identity.try_take(identity) else {
            return Err(Box::new((
                Status::resource_exhausted(format!(
                    "identity `{identity}` has {} calls in flight, its limit \
                     (limits.max_calls_per_identity); retry when one ends",
                    self.per_identity.limit()
                )),
                Some(context),
            )));
        };
        // Health and reflection streams have a pool of their own, so that
        // watchers (any certificate may check health) cannot take the
        // places the vault's own calls need.
        let (pool, limit) = match kind {
            Kind::Vault => (&self.in_flight, self.max_in_flight),
            Kind::Health | Kind::Reflection => {
                (&self.standard_in_flight, self.max_standard_in_flight)
            }
        };
        let Ok(place) = Arc::clone(pool).try_acquire_owned() else {
            return Err(Box::new((
                Status::resource_exhausted(format!(
                    "the vault is at its limit of {limit} calls in flight; retry shortly"
                )),
                Some(context),
            )));
        };
        let max_body = match (kind, method) {
            (Kind::Vault, "Proxy") => MESSAGE_PREFIX + self.max_proxy_message_bytes,
            (Kind::Vault, _) => MESSAGE_PREFIX + self.max_message_bytes,
            // Streams of small messages, each held to max_message_bytes by
            // the service's own decoder.
            (Kind::Health | Kind::Reflection, _) => usize::MAX,
        };
        Ok(Some(Admitted {
            place: (place, own),
            max_body,
            context,
        }))
    }

    async fn refused(&self, context: &audit::Context, status: &Status) {
        let code = code_name(status.code());
        tracing::info!(
            method = %context.method,
            identity = %context.identity,
            request_id = %context.request_id,
            code,
            "call refused before its body was read"
        );
        self.metrics.call(&context.method, code, 0.0);
        self.refusals.refuse(context, code).await;
    }
}

/// What a request calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One of the vault's own methods, under the policy.
    Vault,
    Health,
    Reflection,
}

/// The standard services served beside the vault's own, by path.
const STANDARD: &[(&str, Kind, &str, &str)] = &[
    (
        "/grpc.health.v1.Health/Check",
        Kind::Health,
        "grpc.health.v1.Health",
        "Check",
    ),
    (
        "/grpc.health.v1.Health/Watch",
        Kind::Health,
        "grpc.health.v1.Health",
        "Watch",
    ),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Kind::Reflection,
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Kind::Reflection,
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
    ),
];

/// What `path` calls, as (kind, service, method), when the vault serves it.
fn target(path: &str) -> Option<(Kind, &'static str, &'static str)> {
    if let Some((service, method)) = path
        .strip_prefix(PACKAGE)
        .and_then(|rest| rest.split_once('/'))
    {
        return METHODS
            .iter()
            .find(|(s, _)| *s == service)
            .and_then(|(s, methods)| {
                let m = methods.iter().find(|m| **m == method)?;
                Some((Kind::Vault, *s, *m))
            });
    }
    STANDARD
        .iter()
        .find(|(p, ..)| *p == path)
        .map(|(_, kind, service, method)| (*kind, *service, *method))
}

/// The caller's `x-request-id` if it is short and plain, else a fresh one.
pub fn request_id(headers: &HeaderMap) -> String {
    let given = headers.get("x-request-id").and_then(|v| v.to_str().ok());
    if let Some(id) = given.filter(|id| {
        !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    }) {
        return id.to_owned();
    }
    let mut bytes = [0u8; 8];
    // Only an identifier: if the generator fails, zeros still correlate the log line.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    data_encoding::HEXLOWER.encode(&bytes)
}

/// Puts [`Admission`] in front of every request.
#[derive(Debug, Clone)]
pub struct AdmissionLayer(pub Arc<Admission>);

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Admit<S> {
        Admit {
            inner,
            admission: Arc::clone(&self.0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Admit<S> {
    inner: S,
    admission: Arc<Admission>,
}

impl<S> Service<http::Request<Body>> for Admit<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone is ready only after its own poll_ready; call the one that was.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let admission = Arc::clone(&self.admission);
        Box::pin(async move {
            let admitted = match admission.admit(&req) {
                Err(refusal) => {
                    let (status, context) = *refusal;
                    drop(req);
                    if let Some(context) = context {
                        admission.refused(&context, &status).await;
                    }
                    return Ok(status.into_http());
                }
                Ok(None) => return inner.call(req).await,
                Ok(Some(admitted)) => admitted,
            };
            let Admitted {
                place,
                max_body,
                context,
            } = admitted;
            let gate_ran = GateRan::default();
            let mut req = req.map(|body| {
                Body::new(Capped {
                    inner: body,
                    left: max_body,
                })
            });
            req.extensions_mut().insert(gate_ran.clone());
            // The gate logs and audits the call under the same id.
            req.extensions_mut()
                .insert(RequestId(context.request_id.clone()));
            let response = inner.call(req).await?;
            // tonic answers a body it cannot decode (malformed, compressed,
            // too long, cut off) before the gate runs: account for it here,
            // as a refusal, so that no call goes without its event.
            if !gate_ran.0.load(Ordering::Acquire) {
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(tonic::Code::from);
                if let Some(code) = code.filter(|c| *c != tonic::Code::Ok) {
                    admission.refused(&context, &Status::new(code, "")).await;
                }
            }
            Ok(response.map(|body| {
                Body::new(Holding {
                    inner: body,
                    _place: place,
                })
            }))
        })
    }
}

/// The request id admission chose for a call (the caller's, or a fresh one),
/// so that the gate uses the same one instead of making another.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Set by the gate when it takes a call: a call whose answer comes back
/// without it was refused by tonic before any handler ran.
#[derive(Debug, Clone, Default)]
pub struct GateRan(Arc<AtomicBool>);

impl GateRan {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A request body cut off past its method's limit, with RESOURCE_EXHAUSTED
/// instead of more bytes.
struct Capped {
    inner: Body,
    left: usize,
}

impl http_body::Body for Capped {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let size = frame.data_ref().map_or(0, Bytes::len);
        if size <= self.left {
            self.left -= size;
            return Poll::Ready(Some(Ok(frame)));
        }
        let status = Status::resource_exhausted(
            "the request is larger than this method accepts \
             (limits.max_message_bytes; Proxy: a body of up to 1 MiB)",
        );
        Poll::Ready(Some(Err(status)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An answer's body, holding its call's place until it has been sent or dropped.
struct Holding {
    inner: Body,
    _place: (OwnedSemaphorePermit, Held),
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
