//! Every call passes the gate: caller identity, authorization, one log line with the outcome.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use super::admission::{request_id, GateRan, RequestId};
use super::refusals::Refusals;
use super::status::to_status;
use super::tls::PeerInfo;

use crate::audit::{self, Event};
use crate::domain::{Effect, Vault, VaultError, WorkspaceId};
use crate::policy::{Call, Grant, SharedPolicy};
use crate::proto;
use crate::providers::Provider;
use crate::telemetry::Metrics;

/// What a request is about, for the policy: (workspace, provider).
pub trait Scope: prost::Message {
    fn scope(&self) -> (Option<&str>, Option<&str>);

    /// For Proxy: the allowlisted route the request fits, for the policy.
    fn route(&self) -> Option<String> {
        None
    }
}

impl Scope for proto::ProxyRequest {
    fn scope(&self) -> (Option<&str>, Option<&str>) {
        (Some(&self.workspace_id), Some(&self.provider))
    }

    fn route(&self) -> Option<String> {
        crate::domain::proxy::route_name(&self.provider, &self.method, &self.path)
    }
}

impl Scope for proto::StoreRequest {
    fn scope(&self) -> (Option<&str>, Option<&str>) {
        (Some(&self.workspace_id), Some(&self.provider))
    }
}

impl Scope for proto::CredentialRef {
    fn scope(&self) -> (Option<&str>, Option<&str>) {
        (Some(&self.workspace_id), Some(&self.provider))
    }
}

impl Scope for proto::ListRequest {
    fn scope(&self) -> (Option<&str>, Option<&str>) {
        (Some(&self.workspace_id), None)
    }
}

impl Scope for proto::ListProvidersRequest {
    fn scope(&self) -> (Option<&str>, Option<&str>) {
        (None, None)
    }
}

impl Scope for proto::SubscribeRequest {
    fn scope(&self) -> (Option<&str>, Option<&str>) {
        (None, None)
    }
}

impl Scope for proto::HeadRequest {
    fn scope(&self) -> (Option<&str>, Option<&str>) {
        (None, None)
    }
}

/// An answer, narrowed to what the rules that allowed its call cover: an
/// answer about several providers shows only the granted ones. Answers about
/// one provider were checked with the call itself.
pub trait Narrow {
    fn narrow(&mut self, _grant: &Grant) {}
}

impl Narrow for proto::ListResponse {
    fn narrow(&mut self, grant: &Grant) {
        self.credentials
            .retain(|c| grant.covers_provider(&c.provider));
    }
}

impl Narrow for proto::ListProvidersResponse {
    fn narrow(&mut self, grant: &Grant) {
        self.providers.retain(|p| grant.covers_provider(&p.name));
    }
}

impl Narrow for proto::Credential {}
impl Narrow for proto::Validation {}
impl Narrow for proto::ProxyResponse {}
impl Narrow for proto::KeyStatus {}
impl Narrow for proto::AuditHead {}
/// Only rules that cover every workspace and provider may grant Audit.
impl<T> Narrow for tokio_stream::wrappers::ReceiverStream<T> {}

/// How a call's audit event gets written.
#[derive(Debug)]
pub enum Audited {
    /// The domain wrote it in the same transaction as the change.
    InTransaction,
    /// The gate writes it, with these details, before answering.
    Details(audit::Details),
}

/// Decides on what only a request's body names (its workspace, provider and
/// route), after [`super::admission`] has admitted the method itself.
#[derive(Clone)]
pub struct Gate {
    policy: SharedPolicy,
    vault: Arc<Vault>,
    refusals: Arc<Refusals>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

impl Gate {
    pub fn new(
        policy: SharedPolicy,
        vault: Arc<Vault>,
        refusals: Arc<Refusals>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            policy,
            vault,
            refusals,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn policy(&self) -> &SharedPolicy {
        &self.policy
    }

    /// Runs one call inside a span naming the method and the caller: denies
    /// it unless the policy allows it, makes sure its audit event is written
    /// before answering (failing the call if it cannot be), and logs one line
    /// with its outcome.
    pub async fn call<T, R, F, Fut>(
        &self,
        service: &'static str,
        method: &'static str,
        req: Request<T>,
        f: F,
    ) -> Result<Response<R>, Status>
    where
        T: Scope,
        R: Narrow,
        F: FnOnce(T, audit::Context) -> Fut,
        Fut: Future<Output = Result<(R, Audited), VaultError>>,
    {
        if let Some(ran) = req.extensions().get::<GateRan>() {
            ran.mark();
        }
        let Some(peer) = req.extensions().get::<PeerInfo>().cloned() else {
            // Every connection passes through `tls::incoming`, which attaches it.
            return Err(Status::unauthenticated("no client identity"));
        };
        let (workspace, provider) = req.get_ref().scope();
        let context = audit::Context {
            identity: peer.identity.to_string(),
            method: format!("{service}.{method}"),
            workspace_id: workspace.map(audited_workspace).unwrap_or_default(),
            provider: provider.map(audited_provider).unwrap_or_default(),
            request_id: req
                .extensions()
                .get::<RequestId>()
                .map_or_else(|| request_id(req.metadata().as_ref()), |id| id.0.clone()),
        };
        let span = tracing::info_span!(
            "rpc",
            method,
            identity = %peer.identity,
            workspace = %context.workspace_id,
            provider = %context.provider,
            request_id = %context.request_id,
        );
        async move {
            // Armed until the call's event is written: a caller that cancels
            // (RST_STREAM, a closed connection) drops this future, maybe after
            // the provider got its request, and the call is still accounted for.
            let mut unfinished = Unfinished {
                refusals: Arc::clone(&self.refusals),
                context: Some(context.clone()),
            };
            let started = Instant::now();
            let (workspace, provider) = req.get_ref().scope();
            let route = req.get_ref().route();
            let call = Call {
                service,
                method,
                workspace,
                provider,
                route: route.as_deref(),
            };
            let mut audited_in_transaction = false;
            let mut refused = false;
            let grant = self.policy.current().grant(peer.identity.as_str(), &call);
            let result = if let Some(grant) = grant {
                // A bug that panics in a handler is still one call with one
                // audit event: INTERNAL, like any unexpected failure.
                match unwound(f(req.into_inner(), context.clone())).await {
                    Ok(result) => result
                        .map(|(mut response, audited)| {
                            response.narrow(&grant);
                            (response, audited)
                        })
                        .map_err(|e| {
                            audited_in_transaction = e.audited_in_transaction();
                            to_status(e)
                        }),
                    Err(status) => Err(status),
                }
            } else {
                // The same answer whether or not the target exists.
                refused = true;
                Err(Status::permission_denied(format!(
                    "identity `{}` may not call `{method}`",
                    peer.identity
                )))
            };
            let pending = match &result {
                Err(status) if refused => {
                    self.refusals
                        .refuse(&context, code_name(status.code()))
                        .await;
                    None
                }
                Ok((_, Audited::InTransaction)) => None,
                Ok((_, Audited::Details(details))) => {
                    Some(Event::new(&context, audit::OUTCOME_OK, details.clone()))
                }
                Err(_) if audited_in_transaction => None,
                Err(status) => Some(Event::new(
                    &context,
                    code_name(status.code()),
                    audit::Details::default(),
                )),
            };
            let result = match pending {
                // Fail closed: no answer leaves without its audit event.
                Some(event) => match self
                    .vault
                    .audit()
                    .record(event, effect(service, method))
                    .await
                {
                    Ok(()) => result,
                    Err(e) => Err(to_status(e)),
                },
                None => result,
            };
            let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
            let elapsed = started.elapsed();
            self.metrics
                .call(&context.method, code_name(code), elapsed.as_secs_f64());
            tracing::info!(
                code = code_name(code),
                micros = elapsed.as_micros() as u64,
                "call"
            );
            unfinished.context = None;
            result.map(|(response, _)| Response::new(response))
        }
        .instrument(span)
        .await
    }
}

/// Whether a call of `service.method` may change state or use plaintext,
/// for its event's durability (`audit.durability`). A method not named here
/// is consequential, so a new one is never answered before its event is
/// durable by mistake.
fn effect(service: &str, method: &str) -> Effect {
    match (service, method) {
        ("Credentials", "Redact" | "List" | "ListProviders") | ("Audit", "Head" | "Subscribe") => {
            Effect::Inert
        }
        _ => Effect::Consequential,
    }
}

/// A call whose future was dropped before its event was written. It is
/// accounted for as CANCELLED, summed like refusals, so that cancelling calls
/// cannot write one event each. (A Store or Zero cancelled after it committed
/// also has its own event, written with the change.)
struct Unfinished {
    refusals: Arc<Refusals>,
    context: Option<audit::Context>,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(context) = self.context.take() else {
            return;
        };
        tracing::info!(method = %context.method, identity = %context.identity, "call cancelled by the caller");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let refusals = Arc::clone(&self.refusals);
            runtime.spawn(async move { refusals.refuse(&context, "CANCELLED").await });
        }
    }
}

/// Runs a handler's future; a panic inside it becomes INTERNAL (and a log
/// line without the panic's message), not a reset stream with no audit event.
async fn unwound<T>(handler: impl Future<Output = T>) -> Result<T, Status> {
    AssertUnwindSafe(handler).catch_unwind().await.map_err(|_| {
        tracing::error!("a handler panicked; answered INTERNAL");
        Status::internal("unexpected error")
    })
}

/// A workspace id for the audit record: as given if well formed, never raw input.
fn audited_workspace(raw: &str) -> String {
    match WorkspaceId::parse(raw) {
        Ok(id) => id.to_string(),
        Err(_) if raw.is_empty() => String::new(),
        Err(_) => "(invalid)".to_owned(),
    }
}

fn audited_provider(raw: &str) -> String {
    match Provider::parse(raw) {
        Some(p) => p.name().to_owned(),
        None if raw.is_empty() => String::new(),
        None => "(invalid)".to_owned(),
    }
}

/// The canonical name of a gRPC status code, as audit events carry it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_is_internal_not_a_reset_stream() {
        let ok = unwound(async { 7 }).await;
        assert_eq!(ok.ok(), Some(7));
        let panicked = unwound(async {
            let secrets: Vec<u8> = Vec::new();
            // An out-of-range index, as a bug would make.
            secrets[usize::from(secrets.is_empty())]
        })
        .await;
        let status = panicked.unwrap_err();
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "unexpected error");
    }
}
