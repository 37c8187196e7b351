//! The `credvault.v1.KeyAdmin` service: rotate, status, retire.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::gate::{Audited, Gate, Scope};
use crate::domain::rotation::{self, KeyStatus};
use crate::domain::Vault;
use crate::proto;
use crate::proto::key_version_info::State;

impl Scope for proto::RotateRequest {
    fn scope(&self) -> (Option<&str>, Option<&str>) {
        (None, None)
    }
}

impl Scope for proto::StatusRequest {
    fn scope(&self) -> (Option<&str>, Option<&str>) {
        (None, None)
    }
}

impl Scope for proto::RetireRequest {
    fn scope(&self) -> (Option<&str>, Option<&str>) {
        (None, None)
    }
}

pub struct KeyAdminService {
    vault: Arc<Vault>,
    gate: Gate,
}

impl KeyAdminService {
    pub fn new(vault: Arc<Vault>, gate: Gate) -> Self {
        Self { vault, gate }
    }
}

fn versioned(key_version: u32) -> Audited {
    Audited::Details(rotation::versioned(key_version))
}

#[tonic::async_trait]
impl proto::key_admin_server::KeyAdmin for KeyAdminService {
    async fn rotate(
        &self,
        req: Request<proto::RotateRequest>,
    ) -> Result<Response<proto::KeyStatus>, Status> {
        self.gate
            .call("KeyAdmin", "Rotate", req, |_, context| async move {
                self.vault.rotate(&context).await?;
                let status = self.vault.key_status().await?;
                Ok((encode(status), Audited::InTransaction))
            })
            .await
    }

    async fn status(
        &self,
        req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::KeyStatus>, Status> {
        self.gate
            .call("KeyAdmin", "Status", req, |_, _| async move {
                let status = self.vault.key_status().await?;
                let primary = status.primary;
                Ok((encode(status), versioned(primary)))
            })
            .await
    }

    async fn retire(
        &self,
        req: Request<proto::RetireRequest>,
    ) -> Result<Response<proto::KeyStatus>, Status> {
        self.gate
            .call("KeyAdmin", "Retire", req, |r, context| async move {
                let retired = self.vault.retire(r.version, &context).await?;
                let audited = if retired.destroyed {
                    Audited::InTransaction
                } else {
                    versioned(r.version)
                };
                Ok((encode(retired.status), audited))
            })
            .await
    }
}

fn encode(s: KeyStatus) -> proto::KeyStatus {
    proto::KeyStatus {
        primary_version: s.primary,
        versions: s
            .versions
            .into_iter()
            .map(|v| proto::KeyVersionInfo {
                version: v.version,
                state: if v.retired {
                    State::Retired
                } else if v.version == s.primary {
                    State::Primary
                } else {
                    State::Active
                } as i32,
                created_at: Some(v.created_at.into()),
                credentials: v.credentials,
                encryptions: v.encryptions,
            })
            .collect(),
        rewrap_done: s.rewrap_done,
        rewrap_total: s.rewrap_total,
    }
}
