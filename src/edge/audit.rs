//! The `credvault.v1.Audit` service: the consumer's stream of events and the signed head.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::gate::{Audited, Gate};
use super::tls::PeerInfo;
use crate::audit::{self, StoredEvent};
use crate::domain::Vault;
use crate::proto;

/// Events read from the database per query while catching up.
const BATCH: usize = 256;
/// Events buffered per subscriber; a full buffer only stalls that subscriber.
const BUFFER: usize = 256;

pub struct AuditService {
    vault: Arc<Vault>,
    gate: Gate,
    stopping: watch::Receiver<bool>,
}

impl AuditService {
    pub fn new(vault: Arc<Vault>, gate: Gate, stopping: watch::Receiver<bool>) -> Self {
        Self {
            vault,
            gate,
            stopping,
        }
    }
}

#[tonic::async_trait]
impl proto::audit_server::Audit for AuditService {
    type SubscribeStream = ReceiverStream<Result<proto::AuditEvent, Status>>;

    async fn subscribe(
        &self,
        req: Request<proto::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        // The stream ends when the caller's certificate does.
        let expires = req
            .extensions()
            .get::<PeerInfo>()
            .map_or(SystemTime::now(), |peer| peer.not_after);
        self.gate
            .call("Audit", "Subscribe", req, |r, context| async move {
                let (tx, rx) = mpsc::channel(BUFFER);
                let vault = Arc::clone(&self.vault);
                let mut stopping = self.stopping.clone();
                let mut policy = self.gate.policy().changes();
                let withdrawn = tx.clone();
                tokio::spawn(async move {
                    let until_expiry = expires
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let ended = tokio::select! {
                        () = follow(vault, r.after_sequence, tx) => None,
                        // Shutting down: end the stream so the connection can close.
                        _ = stopping.wait_for(|stop| *stop) => None,
                        // A new policy (SIGHUP) took the right to read the log away.
                        changed = policy.wait_for(|p| {
                            !p.may_call(&context.identity, "Audit", "Subscribe")
                        }) => changed.ok().map(|_| Status::permission_denied(format!(
                            "identity `{}` may no longer call `Subscribe`: the policy changed",
                            context.identity
                        ))),
                        () = tokio::time::sleep(until_expiry) => Some(Status::unauthenticated(
                            "the client certificate has expired; subscribe again with a \
                             renewed certificate",
                        )),
                    };
                    if let Some(status) = ended {
                        tracing::info!(
                            identity = %context.identity,
                            reason = status.message(),
                            "audit stream ended"
                        );
                        let _ = withdrawn.send(Err(status)).await;
                    }
                });
                Ok((
                    ReceiverStream::new(rx),
                    Audited::Details(audit::Details::default()),
                ))
            })
            .await
    }

    async fn head(
        &self,
        req: Request<proto::HeadRequest>,
    ) -> Result<Response<proto::AuditHead>, Status> {
        self.gate
            .call("Audit", "Head", req, |_, _| async move {
                let signed = self.vault.audit().signed_head().await?;
                let head = signed.head;
                let response = proto::AuditHead {
                    sequence: head.sequence,
                    hash: head.hash,
                    signature: head.signature,
                    public_key_id: head.key_id,
                    public_key: signed.public_key,
                    database_id: head.database_id,
                    signed_at_ms: head.signed_at_ms.unwrap_or(0),
                };
                Ok((response, Audited::Details(audit::Details::default())))
            })
            .await
    }
}

/// Sends every event after `after` from the database, then waits for the
/// head to move and reads again. Writers only bump a watched number, so a
/// slow subscriber never slows them; it just reads further behind.
async fn follow(
    vault: Arc<Vault>,
    mut after: u64,
    tx: mpsc::Sender<Result<proto::AuditEvent, Status>>,
) {
    let log = vault.audit();
    let mut head = log.watch();
    loop {
        // Marks the current head seen before reading, so an append that
        // lands after the read still wakes the wait below.
        head.borrow_and_update();
        let batch = match log.after(after, BATCH).await {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "audit subscriber could not read the log");
                let _ = tx
                    .send(Err(Status::unavailable("the audit log could not be read")))
                    .await;
                return;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                () = tx.closed() => return,
                changed = head.changed() => if changed.is_err() { return },
            }
            continue;
        }
        for stored in batch {
            after = stored.sequence;
            let Some(event) = encode(&stored) else {
                let _ = tx
                    .send(Err(Status::data_loss("an audit event is malformed")))
                    .await;
                return;
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    }
}

pub fn encode(stored: &StoredEvent) -> Option<proto::AuditEvent> {
    let e = stored.event()?;
    let time = crate::store::time(e.time_ms);
    Some(proto::AuditEvent {
        sequence: stored.sequence,
        time: Some(time.into()),
        identity: e.identity,
        method: e.method,
        workspace_id: e.workspace_id,
        provider: e.provider,
        outcome: e.outcome,
        verdict: e.verdict,
        key_version: e.key_version,
        secrets: e
            .secrets
            .into_iter()
            .map(|(field, s)| (field, s.into()))
            .collect(),
        request_id: e.request_id,
        proxy: e.proxy.map(|p| proto::ProxiedCall {
            method: p.method,
            route: p.route,
            status: p.status.into(),
            request_bytes: p.request_bytes,
            response_bytes: p.response_bytes,
            redactions: p.redactions,
            answered_by_vault: p.answered_by_vault,
        }),
        hash: stored.hash.to_vec(),
        previous_hash: stored.previous_hash.to_vec(),
        count: e.count.unwrap_or(0),
        expiry: e.expiry.map(|x| proto::ExpiryNotice {
            within: x.within,
            expires_at: Some(crate::store::time(x.expires_at_ms).into()),
        }),
        verdict_change: e.verdict_change.map(|c| proto::VerdictChange {
            previous: c.previous,
            recovered: c.recovered,
        }),
    })
}
