//! The audit log as the vault keeps it: appends that notify subscribers, and signed heads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::VaultError;
use crate::audit::{
    verify_links, Checkpoint, Durability, Event, SignedHead, Signer, StoredEvent, GENESIS,
};
use crate::crypto::RootKey;
use crate::store::{Awaited, Queued, RootWitness, Store, StoreError};

const SIGNING_KEY: &str = "audit-signing";
/// Under [`Durability::Changes`], the most events answered and not yet
/// durable: past this, calls wait for their event's commit again. It bounds
/// what a crash can lose, with the time a group commit takes.
pub const UNDURABLE_MAX: u32 = 1024;
/// Under [`Durability::Changes`], once the oldest event answered and not
/// yet durable has waited this long (the writer is stalled: a busy lock, a
/// shred waiting for a reader), calls wait for their own events again. With
/// [`UNDURABLE_MAX`], it bounds what a crash can lose.
pub const UNDURABLE_AGE: Duration = Duration::from_millis(10);
/// The method of the event that counts events answered early and lost.
pub const EVENTS_LOST: &str = "Audit.EventsLost";
/// How long stopping waits for answered events to become durable.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// What a call did, as its event's durability depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// It changed no state and used no plaintext (Redact, List,
    /// ListProviders, Audit.Head, a refusal): under
    /// [`Durability::Changes`] it is answered once its event is queued.
    Inert,
    /// Everything else: answered only once its event is durable.
    Consequential,
}

pub struct AuditLog {
    store: Arc<dyn Store>,
    signer: Signer,
    witness: RootWitness,
    /// Fixed when the database was created; every signed head names it.
    database_id: Vec<u8>,
    head: Arc<watch::Sender<u64>>,
    durability: Durability,
    /// Permits for events answered before they are durable.
    undurable: Arc<Semaphore>,
    early: Arc<Early>,
}

/// Events answered before they were durable, as this process tracks them.
#[derive(Debug, Default)]
struct Early {
    /// When each event waiting for its commit was queued, oldest first
    /// (the writer commits them in this order).
    waiting: Mutex<VecDeque<Instant>>,
    /// Set for good when one failed to commit: from then on every call
    /// waits for its own event.
    stopped: AtomicBool,
    /// Events answered early and never written, not yet counted in the chain.
    lost: AtomicU64,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("signer", &self.signer)
            .field("head", &*self.head.borrow())
            .finish()
    }
}

impl AuditLog {
    /// Unseals the audit signing key with `root`, creating one for a new store.
    pub(super) async fn open(store: Arc<dyn Store>, root: &RootKey) -> Result<Self, VaultError> {
        let rng = SystemRandom::new();
        let (signer, sealed) = match store.key_material(SIGNING_KEY).await? {
            Some(sealed) => {
                let pkcs8 = root.open(SIGNING_KEY, &sealed)?;
                let signer =
                    Signer::from_pkcs8(pkcs8.expose_secret()).ok_or(VaultError::DataLoss)?;
                (signer, sealed)
            }
            None => {
                let pkcs8 = Signer::generate(&rng).ok_or_else(|| {
                    VaultError::Internal("could not generate the audit key".into())
                })?;
                store
                    .put_key_material(SIGNING_KEY, root.seal(&rng, SIGNING_KEY, &pkcs8)?)
                    .await?;
                // Another replica starting at the same moment may have stored its key first.
                let sealed = store
                    .key_material(SIGNING_KEY)
                    .await?
                    .ok_or(VaultError::DataLoss)?;
                let pkcs8 = root.open(SIGNING_KEY, &sealed)?;
                let signer =
                    Signer::from_pkcs8(pkcs8.expose_secret()).ok_or(VaultError::DataLoss)?;
                (signer, sealed)
            }
        };
        let database_id = store
            .database_id()
            .await?
            .ok_or(VaultError::Internal("the database has no identity".into()))?;
        let head = store.audit_head().await?.map_or(0, |e| e.sequence);
        Ok(Self {
            store,
            signer,
            witness: RootWitness {
                purpose: SIGNING_KEY,
                sealed,
            },
            database_id,
            head: Arc::new(watch::Sender::new(head)),
            durability: Durability::default(),
            undurable: Arc::new(Semaphore::new(UNDURABLE_MAX as usize)),
            early: Arc::default(),
        })
    }

    /// When an event of an [`Effect::Inert`] call may be answered.
    pub(super) fn set_durability(&mut self, durability: Durability) {
        self.durability = durability;
    }

    /// The signing key as this vault found it sealed under its root key.
    pub(super) fn root_witness(&self) -> &RootWitness {
        &self.witness
    }

    /// Appends the event of a call whose change, if any, is already
    /// committed. Fails closed: the caller must not answer if this fails.
    ///
    /// Returns once the event is durable, except under
    /// [`Durability::Changes`] for an [`Effect::Inert`] call: then once the
    /// writer holds it, if the writer commits in the order it was handed
    /// events (SQLite's does; PostgreSQL's batches in flight take the chain's
    /// head in either order), fewer than [`UNDURABLE_MAX`] events wait for
    /// their commit, the oldest of them has waited less than
    /// [`UNDURABLE_AGE`], and no event answered early has ever failed to
    /// commit in this process.
    pub async fn record(&self, event: Event, effect: Effect) -> Result<(), VaultError> {
        // A known loss goes into the chain before anything else is answered.
        self.report_lost().await?;
        if self.durability == Durability::Changes
            && effect == Effect::Inert
            && !self.early.stopped.load(Ordering::Relaxed)
        {
            if let Ok(permit) = Arc::clone(&self.undurable).try_acquire_owned() {
                return self.record_early(event, permit).await;
            }
        }
        self.record_durable(event).await
    }

    async fn record_durable(&self, event: Event) -> Result<(), VaultError> {
        let queued = self
            .store
            .queue_audit(event, Awaited::Yes)
            .map_err(audit_unavailable)?;
        self.until_durable(queued).await
    }

    async fn until_durable(&self, queued: Queued) -> Result<(), VaultError> {
        let stored = queued.durable().await.map_err(audit_unavailable)?;
        self.appended(&stored);
        Ok(())
    }

    /// Queues `event` and returns at once, unless the writer's order is not
    /// the chain's or it has fallen behind: then as [`Self::record_durable`].
    async fn record_early(
        &self,
        event: Event,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), VaultError> {
        let queued = {
            // Held while queueing, so `waiting` is in the writer's order.
            let mut waiting = self.early.waiting.lock().unwrap_or_else(|p| p.into_inner());
            let behind = waiting
                .front()
                .is_some_and(|oldest| oldest.elapsed() >= UNDURABLE_AGE);
            if behind {
                Err(event)
            } else {
                let queued = self
                    .store
                    .queue_audit(event, Awaited::No)
                    .map_err(audit_unavailable)?;
                if queued.in_order() {
                    waiting.push_back(Instant::now());
                }
                Ok(queued)
            }
        };
        let queued = match queued {
            Ok(queued) => queued,
            Err(event) => {
                drop(permit);
                return self.record_durable(event).await;
            }
        };
        if !queued.in_order() {
            drop(permit);
            return self.until_durable(queued).await;
        }
        let (head, early) = (Arc::clone(&self.head), Arc::clone(&self.early));
        tokio::spawn(async move {
            let durable = queued.durable().await;
            early
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            match durable {
                Ok(stored) => advance(&head, &stored),
                Err(e) => {
                    early.stopped.store(true, Ordering::Relaxed);
                    let lost = early.lost.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::error!(
                        error = %e,
                        lost,
                        "the audit event of a call already answered could not be written: \
                         from now on every call waits for its own event (audit.durability \
                         \"changes\" is off until the vault restarts), and the loss is \
                         recorded in the log once it can be written"
                    );
                }
            }
            drop(permit);
        });
        Ok(())
    }

    /// Writes one event counting the events answered early that could not
    /// be written, once the log can be written again: the loss is in the
    /// chain, not only in a log line. Until it is written, every call fails
    /// closed.
    async fn report_lost(&self) -> Result<(), VaultError> {
        let lost = self.early.lost.swap(0, Ordering::Relaxed);
        if lost == 0 {
            return Ok(());
        }
        let mut event = Event::new(
            &crate::audit::Context {
                identity: crate::audit::VAULT_IDENTITY.into(),
                method: EVENTS_LOST.into(),
                workspace_id: String::new(),
                provider: String::new(),
                request_id: String::new(),
            },
            "DATA_LOSS",
            crate::audit::Details::default(),
        );
        event.count = Some(lost);
        match self.store.append_audit(event).await {
            Ok(stored) => {
                self.appended(&stored);
                Ok(())
            }
            Err(e) => {
                self.early.lost.fetch_add(lost, Ordering::Relaxed);
                tracing::debug!(error = %e, lost, "could not record lost audit events yet");
                Err(VaultError::AuditUnavailable)
            }
        }
    }

    /// Waits (a bounded time) until every event answered early is durable
    /// or failed: before the last checkpoint, when the vault stops.
    pub async fn settle(&self) {
        let all = tokio::time::timeout(SETTLE_WAIT, self.undurable.acquire_many(UNDURABLE_MAX));
        if all.await.is_err() {
            tracing::warn!(
                "audit events answered before they were durable were still not written after {} s",
                SETTLE_WAIT.as_secs()
            );
        }
        if self.report_lost().await.is_err() {
            tracing::error!(
                lost = self.early.lost.load(Ordering::Relaxed),
                "stopping with audit events answered and lost, and no event in the log that \
                 counts them: this line is the only record"
            );
        }
    }

    /// Catches up with events other replicas appended to the shared database.
    pub async fn refresh_head(&self) -> Result<(), VaultError> {
        if let Some(head) = self.store.audit_head().await? {
            self.appended(&head);
        }
        Ok(())
    }

    /// Tells subscribers about an event appended (possibly inside another transaction).
    pub(super) fn appended(&self, stored: &StoredEvent) {
        advance(&self.head, stored);
    }

    /// The newest sequence, watched: it changes whenever an event is appended.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    pub async fn after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, VaultError> {
        Ok(self.store.audit_after(after, limit).await?)
    }

    /// The newest event's sequence and hash (0 and the genesis hash for an
    /// empty log), with this database's identity, signed now.
    pub async fn signed_head(&self) -> Result<SignedHead, VaultError> {
        let (sequence, hash) = self
            .store
            .audit_head()
            .await?
            .map_or((0, GENESIS), |e| (e.sequence, e.hash));
        Ok(SignedHead {
            head: self.signer.sign_head(&self.database_id, sequence, &hash),
            public_key: self.signer.public_key().to_vec(),
        })
    }

    /// Signs and stores the head unless the newest checkpoint (at `last`)
    /// already covers it; returns the new checkpoint.
    pub async fn checkpoint(&self, last: u64) -> Result<Option<SignedHead>, VaultError> {
        let signed = self.signed_head().await?;
        if signed.head.sequence <= last {
            return Ok(None);
        }
        self.store.add_checkpoint(signed.head.clone()).await?;
        Ok(Some(signed))
    }

    /// Why this log does not continue from `head`, or `None` when it does
    /// (see [`continues_from`]).
    pub async fn continues_from(&self, head: &Checkpoint) -> Result<Option<String>, VaultError> {
        continues_from(&*self.store, head).await
    }

    pub fn public_key(&self) -> &[u8] {
        self.signer.public_key()
    }
}

fn advance(head: &watch::Sender<u64>, stored: &StoredEvent) {
    head.send_if_modified(|head| {
        let newer = stored.sequence > *head;
        if newer {
            *head = stored.sequence;
        }
        newer
    });
}

fn audit_unavailable(e: StoreError) -> VaultError {
    tracing::warn!(error = %e, "audit append failed");
    VaultError::AuditUnavailable
}

/// Why the log in `store` does not continue from `head`, or `None` when it
/// does: same database (or a head from before heads named one); the event at
/// the head's sequence really is the one it signed (its hash recomputes from
/// its text, not just a stored column), and every later event links to it.
/// Reads only the events from the head on: `audit verify` checks the rest.
pub async fn continues_from(
    store: &dyn Store,
    head: &Checkpoint,
) -> Result<Option<String>, VaultError> {
    const PAGE: usize = 10_000;
    let database_id = store.database_id().await?;
    if !head.database_id.is_empty() && database_id.as_deref() != Some(&head.database_id) {
        return Ok(Some("the head belongs to another database".into()));
    }
    let (mut last, mut previous) = match head.sequence {
        0 if head.hash.as_slice() != GENESIS.as_slice() => {
            return Ok(Some("the head of an empty log has a wrong hash".into()))
        }
        0 => (0, GENESIS),
        n => {
            let at = store.audit_after(n - 1, 1).await?.into_iter().next();
            let Some(at) = at.filter(|e| e.sequence == n) else {
                return Ok(Some(format!(
                    "the log has no event {n}: events were deleted, or this is an older copy \
                     of the database"
                )));
            };
            // Its hash must recompute from its own text, not only match a column.
            if let Err(broken) = verify_links(std::slice::from_ref(&at), n - 1, &at.previous_hash) {
                return Ok(Some(broken.to_string()));
            }
            if at.hash.as_slice() != head.hash.as_slice() {
                return Ok(Some(format!(
                    "event {n} is not the one the head signed: the history was rewritten"
                )));
            }
            (n, at.hash)
        }
    };
    loop {
        let page = store.audit_after(last, PAGE).await?;
        match verify_links(&page, last, &previous) {
            Ok(linked) => (last, previous) = linked,
            Err(broken) => return Ok(Some(broken.to_string())),
        }
        if page.len() < PAGE {
            return Ok(None);
        }
    }
}
