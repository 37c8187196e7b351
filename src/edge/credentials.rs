//! The `credvault.v1.Credentials` service: decode, call the domain, encode. No logic of its own.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::gate::{Audited, Gate, Narrow, Scope};
use crate::audit;
use crate::domain::proxy::ProxyCall;
use crate::domain::{self, CredentialRef, NewCredential, Vault, VaultError, WorkspaceId};
use crate::proto;
use crate::providers::validation::{Validation, Verdict};
use crate::providers::{FieldSpec, Provider};

pub struct CredentialsService {
    vault: Arc<Vault>,
    gate: Gate,
}

impl CredentialsService {
    pub fn new(vault: Arc<Vault>, gate: Gate) -> Self {
        Self { vault, gate }
    }

    async fn call<T, R, F, Fut>(
        &self,
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
        self.gate.call("Credentials", method, req, f).await
    }
}

#[tonic::async_trait]
impl proto::credentials_server::Credentials for CredentialsService {
    async fn store(
        &self,
        req: Request<proto::StoreRequest>,
    ) -> Result<Response<proto::Credential>, Status> {
        self.call("Store", req, |r, context| async move {
            let new = NewCredential::parse(&r.workspace_id, &r.provider, r.secrets, r.params)?;
            let stored = self.vault.store(new, r.validate, &context).await?;
            Ok((encode(stored), Audited::InTransaction))
        })
        .await
    }

    async fn redact(
        &self,
        req: Request<proto::CredentialRef>,
    ) -> Result<Response<proto::Credential>, Status> {
        self.call("Redact", req, |r, _| async move {
            let target = CredentialRef::parse(&r.workspace_id, &r.provider)?;
            let connection = self.vault.redact(&target).await?;
            let details = Audited::Details(connection.audit_details());
            Ok((encode(connection), details))
        })
        .await
    }

    async fn zero(
        &self,
        req: Request<proto::CredentialRef>,
    ) -> Result<Response<proto::Credential>, Status> {
        self.call("Zero", req, |r, context| async move {
            let target = CredentialRef::parse(&r.workspace_id, &r.provider)?;
            let zeroed = self.vault.zero(&target, &context).await?;
            Ok((encode(zeroed), Audited::InTransaction))
        })
        .await
    }

    async fn list(
        &self,
        req: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListResponse>, Status> {
        self.call("List", req, |r, _| async move {
            let workspace = WorkspaceId::parse(&r.workspace_id)?;
            let within = r
                .expiring_within_seconds
                .map(std::time::Duration::from_secs);
            let credentials = self.vault.list(&workspace, within).await?;
            let response = proto::ListResponse {
                credentials: credentials.into_iter().map(encode).collect(),
            };
            Ok((response, Audited::Details(audit::Details::default())))
        })
        .await
    }

    async fn validate_connection(
        &self,
        req: Request<proto::CredentialRef>,
    ) -> Result<Response<proto::Validation>, Status> {
        self.call("ValidateConnection", req, |r, context| async move {
            let target = CredentialRef::parse(&r.workspace_id, &r.provider)?;
            let (v, details) = self.vault.validate(&target, &context).await?;
            tracing::info!(
                verdict = v.verdict.name(),
                provider_status = v.provider_status,
                "verdict"
            );
            self.gate.metrics().validation(
                target.provider.name(),
                v.verdict.name(),
                f64::from(v.duration_ms) / 1000.0,
            );
            Ok((encode_validation(v), Audited::Details(details)))
        })
        .await
    }

    async fn proxy(
        &self,
        req: Request<proto::ProxyRequest>,
    ) -> Result<Response<proto::ProxyResponse>, Status> {
        self.call("Proxy", req, |r, context| async move {
            let call = ProxyCall::parse(
                &r.workspace_id,
                &r.provider,
                &r.method,
                &r.path,
                r.headers,
                r.body,
            )?;
            let (answer, details) = self.vault.proxy(call, &context).await?;
            tracing::info!(
                provider_status = answer.status,
                redactions = answer.redactions,
                answered_by_vault = answer.answered_by_vault,
                "proxied"
            );
            let response = proto::ProxyResponse {
                status: answer.status.into(),
                headers: answer.headers.into_iter().collect(),
                body: answer.body,
                truncated: answer.truncated,
                redactions: answer.redactions,
                answered_by_vault: answer.answered_by_vault,
            };
            Ok((response, Audited::Details(details)))
        })
        .await
    }

    async fn list_providers(
        &self,
        req: Request<proto::ListProvidersRequest>,
    ) -> Result<Response<proto::ListProvidersResponse>, Status> {
        self.call("ListProviders", req, |_, _| async {
            let response = proto::ListProvidersResponse {
                providers: Provider::ALL.iter().map(|p| describe(*p)).collect(),
            };
            Ok((response, Audited::Details(audit::Details::default())))
        })
        .await
    }
}

fn encode(c: domain::Connection) -> proto::Credential {
    proto::Credential {
        workspace_id: c.workspace_id,
        provider: c.provider,
        params: c.params.into_iter().collect::<HashMap<_, _>>(),
        secrets: c
            .secrets
            .into_iter()
            .map(|(field, r)| (field, r.into()))
            .collect(),
        status: match c.status {
            domain::ConnectionState::Connected => proto::Status::Connected,
            domain::ConnectionState::Disconnected => proto::Status::Disconnected,
        } as i32,
        created_at: Some(c.created_at.into()),
        updated_at: Some(c.updated_at.into()),
        disconnected_at: c.disconnected_at.map(Into::into),
        key_version: c.key_version,
        expires_at: c.expires_at.map(Into::into),
        last_validation: c.last_validation.map(encode_validation),
    }
}

fn encode_validation(v: Validation) -> proto::Validation {
    use proto::validation::Verdict as V;
    let verdict = match v.verdict {
        Verdict::Valid => V::Valid,
        Verdict::Rejected => V::Rejected,
        Verdict::WrongRegion => V::WrongRegion,
        Verdict::InsufficientPermission => V::InsufficientPermission,
        Verdict::RateLimited => V::RateLimited,
        Verdict::Unreachable => V::Unreachable,
        Verdict::UnexpectedResponse => V::UnexpectedResponse,
        Verdict::Expired => V::Expired,
        Verdict::Disconnected => V::Disconnected,
    };
    proto::Validation {
        verdict: verdict as i32,
        provider_status: v.provider_status.into(),
        display_name: v.display_name,
        message: v.message,
        retry_after_seconds: v.retry_after_seconds,
        suggested_region: v.suggested_region,
        checked_at: Some(v.checked_at.into()),
        duration_ms: v.duration_ms,
        missing_scopes: v.missing_scopes,
    }
}

fn describe(p: Provider) -> proto::ProviderInfo {
    let spec = p.spec();
    let field = |f: &FieldSpec| proto::FieldInfo {
        name: f.name.to_owned(),
        description: f.description.to_owned(),
        required: f.required,
        allowed_values: f.allowed.iter().map(|v| (*v).to_owned()).collect(),
        default_value: f.default.unwrap_or_default().to_owned(),
        max_bytes: u32::try_from(f.max_bytes).unwrap_or(u32::MAX),
    };
    proto::ProviderInfo {
        name: spec.name.to_owned(),
        display_name: spec.display_name.to_owned(),
        secrets: spec.secrets.iter().map(field).collect(),
        params: spec.params.iter().map(field).collect(),
    }
}
