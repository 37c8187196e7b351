//! Every call passes the gate: caller identity, authorization, one log line with the outcome.

use std::future::Future;
use std::time::Instant;

use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use super::status::to_status;
use super::tls::PeerInfo;
use crate::domain::VaultError;
use crate::policy::{Call, SharedPolicy};
use crate::proto;

/// What a request is about, for the policy: (workspace, provider).
pub trait Scope {
    fn scope(&self) -> (Option<&str>, Option<&str>);
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

#[derive(Debug, Clone)]
pub struct Gate {
    policy: SharedPolicy,
}

impl Gate {
    pub fn new(policy: SharedPolicy) -> Self {
        Self { policy }
    }

    /// Runs one call inside a span naming the method and the caller: denies
    /// it unless the policy allows it, then logs one line with its outcome.
    pub async fn call<T, R, F, Fut>(
        &self,
        service: &'static str,
        method: &'static str,
        req: Request<T>,
        f: F,
    ) -> Result<Response<R>, Status>
    where
        T: Scope,
        F: FnOnce(T) -> Fut,
        Fut: Future<Output = Result<R, VaultError>>,
    {
        let Some(peer) = req.extensions().get::<PeerInfo>().cloned() else {
            // Every connection passes through `tls::incoming`, which attaches it.
            return Err(Status::unauthenticated("no client identity"));
        };
        let span = tracing::info_span!("rpc", method, identity = %peer.identity);
        async move {
            let started = Instant::now();
            let (workspace, provider) = req.get_ref().scope();
            let call = Call {
                service,
                method,
                workspace,
                provider,
            };
            let result = if self.policy.current().allows(peer.identity.as_str(), &call) {
                f(req.into_inner()).await.map_err(to_status)
            } else {
                // The same answer whether or not the target exists.
                Err(Status::permission_denied(format!(
                    "identity `{}` may not call `{method}`",
                    peer.identity
                )))
            };
            let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
            tracing::info!(code = ?code, micros = started.elapsed().as_micros() as u64, "call");
            result.map(Response::new)
        }
        .instrument(span)
        .await
    }
}
