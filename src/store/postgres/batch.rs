//! Group commit on PostgreSQL: each replica gathers the Stores and audit
//! appends that arrive while its last transaction commits into the next one.
//!
//! A batch is sent as one pipeline, in this order: every Store's statements,
//! one encryption count per key version, one append of every event. The
//! server runs a pipeline's statements in the order sent, so the batch means
//! what its writes would mean one after another. The shared rows (the key
//! version's counter, the chain head) are taken last and held only until the
//! commit: one lock of the chain head and one WAL flush per batch, not per
//! event. Nothing is answered before the commit, so a replica that dies
//! mid-batch has acknowledged none of it.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use deadpool_postgres::Pool;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{appended, classify, tail};
use crate::audit::{Event, StoredEvent};
use crate::store::sql::{self, values, Value};
use crate::store::{audit_failure, millis, CredentialRecord, StoreError};
use tokio_postgres::types::ToSql;

/// Every Store of a batch in one statement, its columns bound as arrays; a
/// key twice in one batch fails it, and each write is then tried alone.
const PUT_ALL: &str = concat!(
    "INSERT INTO credentials (",
    sql::put_columns!(),
    ") SELECT t.w, t.p, t.s, t.pa, t.u, t.u, NULL, t.e, t.k, t.n, t.d, t.l, t.b \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], \
                 $7::int4[], $8::bytea[], $9::bytea[], $10::text[], $11::bytea[]) \
          AS t(w, p, s, pa, u, e, k, n, d, l, b)",
    sql::put_conflict!()
);
/// The old secrets of every connection the batch stores.
const DELETE_ALL_SECRETS: &str = "DELETE FROM credential_secrets s \
     USING unnest($1::text[], $2::text[]) AS t(w, p) \
     WHERE s.workspace_id = t.w AND s.provider = t.p";
/// Every secret the batch stores.
const INSERT_ALL_SECRETS: &str = "INSERT INTO credential_secrets \
     (workspace_id, provider, field, nonce, ciphertext, hint, fingerprint) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bytea[], \
                          $6::text[], $7::text[])";

/// Most writes one transaction takes.
const MAX_BATCH: usize = 256;
/// Batches a replica commits at once, each on its own connection: a batch
/// waiting on a row another session holds does not stop the others.
const BATCHES_IN_FLIGHT: usize = 4;

/// The sending side: hand a write to this replica's writer task and await
/// its committed result.
#[derive(Debug, Clone)]
pub(super) struct Writer {
    jobs: mpsc::UnboundedSender<Job>,
}

struct Job {
    /// The connection to store, or `None` for an event alone.
    record: Option<CredentialRecord>,
    /// The event's canonical text after its sequence (see [`tail`]).
    tail: String,
    done: oneshot::Sender<Result<Written, StoreError>>,
}

/// A write as committed.
struct Written {
    /// The connection as stored (without its secrets, which the job holds).
    row: Option<CredentialRecord>,
    /// Its key version's encryptions so far, this one included.
    encryptions: u64,
    event: StoredEvent,
}

/// A batch's Stores as columns, for [`PUT_ALL`] and [`DELETE_ALL_SECRETS`].
struct Rows<'a> {
    workspace_id: Vec<&'a str>,
    provider: Vec<&'a str>,
    status: Vec<&'static str>,
    params: Vec<String>,
    updated_at: Vec<i64>,
    expires_at: Vec<Option<i64>>,
    key_version: Vec<Option<i32>>,
    dek_nonce: Vec<Option<&'a [u8]>>,
    wrapped_dek: Vec<Option<&'a [u8]>>,
    last_validation: Vec<Option<&'a str>>,
    binding: Vec<Option<&'a [u8]>>,
}

impl<'a> Rows<'a> {
    fn of(records: &[&'a CredentialRecord]) -> Result<Self, StoreError> {
        let key = |r: &'a CredentialRecord| r.data_key.as_ref();
        Ok(Self {
            workspace_id: records.iter().map(|r| r.workspace_id.as_str()).collect(),
            provider: records.iter().map(|r| r.provider.as_str()).collect(),
            status: records.iter().map(|r| sql::status_text(r.status)).collect(),
            params: records
                .iter()
                .map(|r| sql::params_json(r))
                .collect::<Result<_, _>>()?,
            updated_at: records.iter().map(|r| millis(r.updated_at)).collect(),
            expires_at: records.iter().map(|r| r.expires_at.map(millis)).collect(),
            key_version: records
                .iter()
                .map(|r| key(r).map(|k| i32::try_from(k.key_version)).transpose())
                .collect::<Result<_, _>>()
                .map_err(|_| StoreError::Corrupt("a key version is out of range"))?,
            dek_nonce: records
                .iter()
                .map(|r| key(r).map(|k| k.sealed.nonce.as_slice()))
                .collect(),
            wrapped_dek: records
                .iter()
                .map(|r| key(r).map(|k| k.sealed.ciphertext.as_slice()))
                .collect(),
            last_validation: records
                .iter()
                .map(|r| r.last_validation.as_deref())
                .collect(),
            binding: records.iter().map(|r| r.binding.as_deref()).collect(),
        })
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 11] {
        [
            &self.workspace_id,
            &self.provider,
            &self.status,
            &self.params,
            &self.updated_at,
            &self.expires_at,
            &self.key_version,
            &self.dek_nonce,
            &self.wrapped_dek,
            &self.last_validation,
            &self.binding,
        ]
    }
}

/// Every secret of a batch's Stores as columns, for [`INSERT_ALL_SECRETS`].
struct Secrets<'a> {
    workspace_id: Vec<&'a str>,
    provider: Vec<&'a str>,
    field: Vec<&'a str>,
    nonce: Vec<&'a [u8]>,
    ciphertext: Vec<&'a [u8]>,
    hint: Vec<&'a str>,
    fingerprint: Vec<&'a str>,
}

impl<'a> Secrets<'a> {
    fn of(records: &[&'a CredentialRecord]) -> Self {
        let all = || {
            records
                .iter()
                .flat_map(|r| r.secrets.iter().map(move |s| (*r, s)))
        };
        Self {
            workspace_id: all().map(|(r, _)| r.workspace_id.as_str()).collect(),
            provider: all().map(|(r, _)| r.provider.as_str()).collect(),
            field: all().map(|(_, s)| s.field.as_str()).collect(),
            nonce: all().map(|(_, s)| s.sealed.nonce.as_slice()).collect(),
            ciphertext: all().map(|(_, s)| s.sealed.ciphertext.as_slice()).collect(),
            hint: all().map(|(_, s)| s.hint.as_str()).collect(),
            fingerprint: all().map(|(_, s)| s.fingerprint.as_str()).collect(),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 7] {
        [
            &self.workspace_id,
            &self.provider,
            &self.field,
            &self.nonce,
            &self.ciphertext,
            &self.hint,
            &self.fingerprint,
        ]
    }
}

/// Why a batch failed, and whether its writes were certainly undone.
struct Failed {
    error: StoreError,
    /// Rolled back before the commit: each write may be tried again alone.
    undone: bool,
}

impl From<StoreError> for Failed {
    fn from(error: StoreError) -> Self {
        Failed {
            error,
            undone: true,
        }
    }
}

impl From<tokio_postgres::Error> for Failed {
    fn from(e: tokio_postgres::Error) -> Self {
        classify(e).into()
    }
}

impl Writer {
    /// Starts the writer task; it ends when every [`Writer`] is dropped.
    pub(super) fn start(pool: Pool) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, queue));
        Self { jobs }
    }

    /// Inserts or replaces a connection with its event, in the next batch.
    pub(super) async fn put(
        &self,
        record: CredentialRecord,
        event: Event,
    ) -> Result<(CredentialRecord, StoredEvent, u64), StoreError> {
        let secrets = record.secrets.clone();
        let written = self.send(Some(record), event).await?;
        let mut row = written
            .row
            .ok_or(StoreError::Corrupt("a Store returned no row"))?;
        row.secrets = secrets;
        Ok((row, written.event, written.encryptions))
    }

    /// Appends an event for a call that changed nothing, in the next batch.
    pub(super) async fn append(&self, event: Event) -> Result<StoredEvent, StoreError> {
        Ok(self.send(None, event).await?.event)
    }

    async fn send(
        &self,
        record: Option<CredentialRecord>,
        event: Event,
    ) -> Result<Written, StoreError> {
        let (done, answer) = oneshot::channel();
        let job = Job {
            record,
            tail: tail(event)?,
            done,
        };
        self.jobs.send(job).map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }
}

async fn run(pool: Pool, mut queue: mpsc::UnboundedReceiver<Job>) {
    let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut later: Vec<Job> = Vec::new();
    loop {
        if later.is_empty() && queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        batch.splice(0..0, later.drain(..));
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // A connection twice in one batch would make its one statement
        // touch a row twice: the second Store waits for the next batch.
        let mut seen = std::collections::HashSet::new();
        let (now, again): (Vec<Job>, Vec<Job>) =
            std::mem::take(&mut batch)
                .into_iter()
                .partition(|job| match &job.record {
                    Some(r) => seen.insert((r.workspace_id.clone(), r.provider.clone())),
                    None => true,
                });
        later = again;
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        let pool = pool.clone();
        tokio::spawn(async move {
            commit(&pool, now).await;
            drop(permit);
        });
    }
}

/// Commits a batch and answers each write. If the batch was certainly
/// rolled back (a write failed before the commit, a deadlock, a lock
/// timeout, a commit the server refused), each write is tried again alone,
/// so only a write that fails alone fails.
async fn commit(pool: &Pool, jobs: Vec<Job>) {
    match attempt(pool, &jobs).await {
        Ok(written) => {
            for (job, written) in jobs.into_iter().zip(written) {
                let _ = job.done.send(Ok(written));
            }
        }
        Err(Failed {
            error,
            undone: true,
        }) if jobs.len() > 1 && alone_may_differ(&error) => {
            for job in jobs {
                let result = attempt(pool, std::slice::from_ref(&job))
                    .await
                    .map(|mut w| w.remove(0))
                    .map_err(|f| f.error);
                let _ = job.done.send(result);
            }
        }
        Err(Failed { error, .. }) if jobs.len() == 1 => {
            if let Some(job) = jobs.into_iter().next() {
                let _ = job.done.send(Err(error));
            }
        }
        Err(Failed { error, .. }) => {
            for job in jobs {
                let _ = job.done.send(Err(error.for_another_write()));
            }
        }
    }
}

/// Whether a failure may belong to one write of the batch rather than to
/// the database: a full or unreachable database fails every write alike.
/// A busy one (a deadlock, another session's lock) may hold only one
/// write's row.
fn alone_may_differ(e: &StoreError) -> bool {
    !matches!(
        e,
        StoreError::Full | StoreError::Unavailable(_) | StoreError::Connect(_)
    )
}

/// What one statement of the pipeline answered.
enum Answer {
    Rows(Vec<CredentialRecord>),
    Changed,
    Count(Option<i64>),
    Events(Vec<StoredEvent>),
}

type Step<'a> = Pin<Box<dyn Future<Output = Result<Answer, StoreError>> + Send + 'a>>;

/// Runs the batch in one transaction; one statement (its own transaction)
/// when it holds events alone.
async fn attempt(pool: &Pool, jobs: &[Job]) -> Result<Vec<Written>, Failed> {
    let mut client = pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(db) => classify(db),
        other => StoreError::Unavailable(other.to_string()),
    })?;
    let tails: Vec<&str> = jobs.iter().map(|j| j.tail.as_str()).collect();
    let append = client
        .prepare_cached("SELECT * FROM credvault_append_audit_batch($1)")
        .await?;
    if jobs.iter().all(|j| j.record.is_none()) {
        // Appends are not repeatable: a failure here is not retried alone.
        let rows = client.query(&append, &[&tails]).await.map_err(|e| Failed {
            error: audit_failure(classify(e)),
            undone: false,
        })?;
        let events = events(&rows, &tails).map_err(|error| Failed {
            error,
            undone: false,
        })?;
        return Ok(events
            .into_iter()
            .map(|event| Written {
                row: None,
                encryptions: 0,
                event,
            })
            .collect());
    }
    let put = client.prepare_cached(PUT_ALL).await?;
    let delete = client.prepare_cached(DELETE_ALL_SECRETS).await?;
    let insert = client.prepare_cached(INSERT_ALL_SECRETS).await?;
    let count = client.prepare_cached(sql::COUNT_ENCRYPTIONS).await?;
    let tx = client.transaction().await?;

    // The batch's Stores as columns, bound as arrays: three statements for
    // the whole batch, whatever its size.
    // In key order: every transaction that locks several connections'
    // rows takes them in this order, so replicas never deadlock on them.
    let mut records: Vec<&CredentialRecord> =
        jobs.iter().filter_map(|j| j.record.as_ref()).collect();
    records.sort_by(|a, b| by_key(a, b));
    let rows = Rows::of(&records)?;
    let secrets = Secrets::of(&records);
    let mut versions: Vec<(u32, u64)> = Vec::new();
    for key in records.iter().filter_map(|r| r.data_key.as_ref()) {
        match versions.iter_mut().find(|(v, _)| *v == key.key_version) {
            Some((_, n)) => *n += 1,
            None => versions.push((key.key_version, 1)),
        }
    }
    let counts: Vec<[Value<'_>; 2]> = versions.iter().map(|&(v, n)| values![n, v]).collect();

    let tx_ref = &tx;
    let mut steps: Vec<Step<'_>> = Vec::new();
    let (put, delete, insert, count) = (&put, &delete, &insert, &count);
    let (rows, secrets) = (&rows, &secrets);
    steps.push(Box::pin(async move {
        let stored = tx_ref.query(put, &rows.params()).await?;
        Ok(Answer::Rows(
            stored
                .iter()
                .map(|r| sql::credential(r))
                .collect::<Result<_, _>>()?,
        ))
    }));
    steps.push(Box::pin(async move {
        tx_ref
            .execute(delete, &[&rows.workspace_id, &rows.provider])
            .await?;
        Ok(Answer::Changed)
    }));
    if !secrets.field.is_empty() {
        steps.push(Box::pin(async move {
            tx_ref.execute(insert, &secrets.params()).await?;
            Ok(Answer::Changed)
        }));
    }
    // The shared rows last: they stay locked until the commit.
    for count_values in &counts {
        steps.push(Box::pin(async move {
            let row = tx_ref
                .query_opt(count, &super::pg_values(count_values))
                .await?;
            Ok(Answer::Count(
                row.as_ref()
                    .map(|r| sql::single_int(r))
                    .transpose()?
                    .flatten(),
            ))
        }));
    }
    let (append_tx, append, all_tails) = (&tx, &append, &tails);
    steps.push(Box::pin(async move {
        let rows = append_tx
            .query(append, &[all_tails])
            .await
            .map_err(|e| audit_failure(classify(e)))?;
        Ok(Answer::Events(events(&rows, all_tails)?))
    }));

    let answers = pipeline(steps).await?;
    let mut stored = Vec::new();
    let mut totals = Vec::new();
    let mut events = Vec::new();
    for answer in answers {
        match answer {
            Answer::Rows(rows) => stored = rows,
            Answer::Changed => {}
            Answer::Count(total) => totals.push(total),
            Answer::Events(e) => events = e,
        }
    }
    // Each write's own count: the version's total before the batch, plus
    // the writes of the batch up to it.
    let mut next = Vec::with_capacity(versions.len());
    for (&(version, n), total) in versions.iter().zip(totals) {
        let total = total.ok_or(StoreError::VersionRetired(version))?;
        next.push((version, sql::count(total)?.saturating_sub(n)));
    }
    tx.commit().await.map_err(|e| Failed {
        // The server's error answer to COMMIT means it rolled back; no
        // answer (a lost connection) leaves the outcome unknown.
        undone: e.code().is_some(),
        error: StoreError::Commit(classify(e).to_string()),
    })?;

    let mut written = Vec::with_capacity(jobs.len());
    for (job, event) in jobs.iter().zip(events) {
        let Some(record) = &job.record else {
            written.push(Written {
                row: None,
                encryptions: 0,
                event,
            });
            continue;
        };
        let encryptions = match &record.data_key {
            Some(key) => {
                next.iter_mut()
                    .find(|(v, _)| *v == key.key_version)
                    .map_or(0, |(_, before)| {
                        *before += 1;
                        *before
                    })
            }
            None => 0,
        };
        // Each Store's row as stored, by its key (RETURNING keeps no order).
        let row = stored
            .iter()
            .position(|r| r.workspace_id == record.workspace_id && r.provider == record.provider)
            .map(|i| stored.swap_remove(i));
        written.push(Written {
            row,
            encryptions,
            event,
        });
    }
    Ok(written)
}

/// The order in which transactions lock connections' rows.
pub(super) fn by_key(a: &CredentialRecord, b: &CredentialRecord) -> std::cmp::Ordering {
    (&a.workspace_id, &a.provider).cmp(&(&b.workspace_id, &b.provider))
}

/// The events the batch append stored, one row per tail, in order.
fn events(rows: &[tokio_postgres::Row], tails: &[&str]) -> Result<Vec<StoredEvent>, StoreError> {
    if rows.len() != tails.len() {
        return Err(StoreError::Audit(
            "the batch append stored another number of events".into(),
        ));
    }
    rows.iter()
        .zip(tails)
        .map(|(row, tail)| appended(row, tail))
        .collect()
}

/// Runs every step, first polling each in order: tokio-postgres sends a
/// statement's request when its future is first polled, so the server gets
/// them in this order without waiting for one answer before the next. The
/// first error is returned once every step has finished (a failed statement
/// fails the rest of the transaction, which is rolled back).
async fn pipeline(mut steps: Vec<Step<'_>>) -> Result<Vec<Answer>, StoreError> {
    let mut answers: Vec<Option<Result<Answer, StoreError>>> = steps.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (step, answer) in steps.iter_mut().zip(answers.iter_mut()) {
            if answer.is_none() {
                if let Poll::Ready(result) = step.as_mut().poll(cx) {
                    *answer = Some(result);
                }
            }
        }
        if answers.iter().all(Option::is_some) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    answers.into_iter().flatten().collect()
}
