//! Group commit on PostgreSQL: each replica gathers the Stores and audit
//! appends that arrive while its last transactions commit into the next one.
//!
//! A batch is sent as one pipeline, in this order: every Store's statements
//! (in key order), one encryption count per key version, one append of every
//! event. The server runs a pipeline's statements in the order sent, so the
//! batch means what its writes would mean one after another. The shared rows
//! (the key versions' counters, the chain head) are taken last and held only
//! until the commit: one lock of the chain head and one WAL flush per batch,
//! not per event. Nothing is answered before the commit, so a replica that
//! dies mid-batch has acknowledged none of it.
//!
//! Lock order, for every transaction of the store that takes more than one:
//! connections' rows in key order (a row before its secrets), then key
//! versions, then the chain head. Two transactions never wait for each other
//! in a circle, so replicas do not deadlock.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use super::{appended, classify, in_lock_order, pooled, tail};
use crate::audit::{Event, StoredEvent};
use crate::store::sql::{self, values, Value};
use crate::store::{audit_failure, CredentialRecord, Queued, StoreError};

/// Most writes one transaction takes.
const MAX_BATCH: usize = 256;
/// Batches of each kind (appends, Stores) a replica commits at once, each on
/// its own connection: a batch waiting on a row another session holds does
/// not stop the others.
const BATCHES_IN_FLIGHT: usize = 2;

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
    /// The connection as stored, its secrets those the job wrote.
    row: Option<CredentialRecord>,
    /// Its key version's encryptions so far, this one included.
    encryptions: u64,
    event: StoredEvent,
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
        let written = self.send(Some(record), event).await?;
        let row = written
            .row
            .ok_or(StoreError::Corrupt("a Store returned no row"))?;
        Ok((row, written.event, written.encryptions))
    }

    /// Queues an event for a call that changed nothing for the next batch.
    pub(super) fn queue_append(&self, event: Event) -> Result<Queued, StoreError> {
        let answer = self.submit(None, event)?;
        // Two batches in flight take the chain's head in either order: an
        // event answered before its batch commits could follow, in the
        // chain, the event of a call made after that answer.
        let in_order = false;
        Ok(Queued::new(
            async move { Ok(answer.await.map_err(|_| StoreError::WriterGone)??.event) },
            in_order,
        ))
    }

    async fn send(
        &self,
        record: Option<CredentialRecord>,
        event: Event,
    ) -> Result<Written, StoreError> {
        self.submit(record, event)?
            .await
            .map_err(|_| StoreError::WriterGone)?
    }

    fn submit(
        &self,
        record: Option<CredentialRecord>,
        event: Event,
    ) -> Result<oneshot::Receiver<Result<Written, StoreError>>, StoreError> {
        let (done, answer) = oneshot::channel();
        let job = Job {
            record,
            tail: tail(event)?,
            done,
        };
        self.jobs.send(job).map_err(|_| StoreError::WriterGone)?;
        Ok(answer)
    }
}

/// A connection, as batches hold it.
type Key = (String, String);

fn key(job: &Job) -> Option<Key> {
    job.record
        .as_ref()
        .map(|r| (r.workspace_id.clone(), r.provider.clone()))
}

/// Forms batches and starts them. Audit appends and Stores go in separate
/// batches with slots of their own, so a Store waiting on a row another
/// session holds delays no read's event. A Store of a connection that a batch
/// in flight holds waits for that batch (at most one slot ever waits on one
/// row), and so does one that repeats a connection of its own batch.
async fn run(pool: Pool, mut queue: mpsc::UnboundedReceiver<Job>) {
    let appending = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let storing = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let held: Arc<Mutex<HashSet<Key>>> = Arc::default();
    let finished = Arc::new(Notify::new());
    let mut waiting: Vec<Job> = Vec::new();
    let mut open = true;
    loop {
        let mut incoming = Vec::new();
        if waiting.is_empty() {
            if !open || queue.recv_many(&mut incoming, MAX_BATCH).await == 0 {
                return;
            }
        } else if open {
            tokio::select! {
                n = queue.recv_many(&mut incoming, MAX_BATCH) => open = n > 0,
                () = finished.notified() => {}
            }
        } else {
            finished.notified().await;
        }
        while incoming.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => incoming.push(job),
                Err(_) => break,
            }
        }
        waiting.append(&mut incoming);

        let (appends, stores): (Vec<Job>, Vec<Job>) = std::mem::take(&mut waiting)
            .into_iter()
            .partition(|j| j.record.is_none());
        let mut appends = appends.into_iter();
        while appends.len() > 0 {
            let Ok(permit) = Arc::clone(&appending).try_acquire_owned() else {
                break;
            };
            let batch: Vec<Job> = appends.by_ref().take(MAX_BATCH).collect();
            start(&pool, batch, permit, Vec::new(), &held, &finished);
        }
        waiting.extend(appends);

        let mut batch = Vec::new();
        let mut keys = Vec::new();
        {
            // A poisoned lock: a batch task panicked; the set itself is whole.
            let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
            for job in stores {
                match key(&job) {
                    Some(k) if batch.len() < MAX_BATCH && !held.contains(&k) => {
                        held.insert(k.clone());
                        keys.push(k);
                        batch.push(job);
                    }
                    _ => waiting.push(job),
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        match Arc::clone(&storing).try_acquire_owned() {
            Ok(permit) => start(&pool, batch, permit, keys, &held, &finished),
            Err(_) => {
                // No slot: the batch waits (and grows) until one frees.
                release(&held, &keys);
                waiting.splice(0..0, batch);
            }
        }
    }
}

/// Commits `batch` on a task of its own, then lets go of its slot and its
/// connections and wakes the loop.
fn start(
    pool: &Pool,
    batch: Vec<Job>,
    permit: OwnedSemaphorePermit,
    keys: Vec<Key>,
    held: &Arc<Mutex<HashSet<Key>>>,
    finished: &Arc<Notify>,
) {
    let (pool, held, finished) = (pool.clone(), Arc::clone(held), Arc::clone(finished));
    tokio::spawn(async move {
        commit(&pool, batch).await;
        release(&held, &keys);
        drop(permit);
        finished.notify_one();
    });
}

/// Lets go of connections a batch held.
fn release(held: &Mutex<HashSet<Key>>, keys: &[Key]) {
    // A poisoned lock: a batch task panicked; the set itself is whole.
    let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
    for k in keys {
        held.remove(k);
    }
}

/// Answers a write; a Store's row gets the secrets the job wrote (moved,
/// not copied).
fn finish(job: Job, result: Result<Written, StoreError>) {
    let result = result.map(|mut written| {
        if let (Some(row), Some(record)) = (&mut written.row, job.record) {
            row.secrets = record.secrets;
        }
        written
    });
    let _ = job.done.send(result);
}

/// Commits a batch and answers each write. If the batch was certainly
/// rolled back (a write failed before the commit, a deadlock, a lock
/// timeout, a commit the server refused), each write is tried again alone,
/// all at once, so only a write that fails alone fails, and a write waiting
/// on a locked row delays no other.
async fn commit(pool: &Pool, jobs: Vec<Job>) {
    match attempt(pool, &jobs).await {
        Ok(written) => {
            for (job, written) in jobs.into_iter().zip(written) {
                finish(job, Ok(written));
            }
        }
        Err(Failed {
            error,
            undone: true,
        }) if jobs.len() > 1 && alone_may_differ(&error) => {
            let alone = jobs.into_iter().map(|job| async move {
                let result = attempt(pool, std::slice::from_ref(&job))
                    .await
                    .map(|mut w| w.remove(0))
                    .map_err(|f| f.error);
                finish(job, result);
            });
            futures_util::future::join_all(alone).await;
        }
        Err(Failed { error, .. }) if jobs.len() == 1 => {
            if let Some(job) = jobs.into_iter().next() {
                finish(job, Err(error));
            }
        }
        Err(Failed { error, .. }) => {
            for job in jobs {
                finish(job, Err(error.for_another_write()));
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

/// One statement of a batch's pipeline.
struct Planned<'a> {
    statement: tokio_postgres::Statement,
    values: Vec<Value<'a>>,
    answers: Kind,
}

/// What a planned statement's answer is read as.
enum Kind {
    Row,
    Changed,
}

/// What one statement of the pipeline answered.
enum Answer {
    Row(Option<Box<CredentialRecord>>),
    Changed,
    Count(Option<i64>),
    Events(Vec<StoredEvent>),
}

type Step<'a> = Pin<Box<dyn Future<Output = Result<Answer, StoreError>> + Send + 'a>>;

/// Runs the batch in one transaction; one statement (its own transaction)
/// when it holds events alone.
async fn attempt(pool: &Pool, jobs: &[Job]) -> Result<Vec<Written>, Failed> {
    let mut client = pooled(pool).await?;
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
    let put = client.prepare_cached(sql::PUT_CREDENTIAL).await?;
    let delete = client.prepare_cached(sql::DELETE_SECRETS).await?;
    let count = client.prepare_cached(sql::COUNT_ENCRYPTIONS).await?;
    let mut inserts = Vec::with_capacity(sql::SECRETS_PER_STATEMENT);
    for n in 1..=sql::SECRETS_PER_STATEMENT {
        inserts.push(client.prepare_cached(sql::insert_secrets(n)).await?);
    }
    let tx = client.transaction().await?;

    // Every statement of the batch, in the order the server runs them, with
    // the parameters it binds (owned here while the pipeline runs).
    let params: Vec<Option<String>> = jobs
        .iter()
        .map(|j| j.record.as_ref().map(sql::params_json).transpose())
        .collect::<Result<_, _>>()?;
    let mut versions: Vec<(u32, u64)> = Vec::new();
    let mut plan: Vec<Planned<'_>> = Vec::new();
    let mut stores: Vec<(&CredentialRecord, &String)> = jobs
        .iter()
        .zip(&params)
        .filter_map(|(job, params_json)| Some((job.record.as_ref()?, params_json.as_ref()?)))
        .collect();
    in_lock_order(&mut stores, |(r, _)| (&r.workspace_id, &r.provider));
    for (r, params_json) in stores {
        plan.push(Planned {
            statement: put.clone(),
            values: sql::put_values(r, params_json).to_vec(),
            answers: Kind::Row,
        });
        plan.push(Planned {
            statement: delete.clone(),
            values: values![&r.workspace_id, &r.provider].to_vec(),
            answers: Kind::Changed,
        });
        for chunk in r.secrets.chunks(sql::SECRETS_PER_STATEMENT) {
            plan.push(Planned {
                statement: inserts[chunk.len() - 1].clone(),
                values: sql::secrets_values(r, chunk),
                answers: Kind::Changed,
            });
        }
        if let Some(key) = &r.data_key {
            match versions.iter_mut().find(|(v, _)| *v == key.key_version) {
                Some((_, n)) => *n += 1,
                None => versions.push((key.key_version, 1)),
            }
        }
    }
    // Key versions in version order, as every transaction that locks several.
    versions.sort_unstable();
    let counts: Vec<[Value<'_>; 2]> = versions.iter().map(|&(v, n)| values![n, v]).collect();
    let tx_ref = &tx;
    let mut steps: Vec<Step<'_>> = plan
        .iter()
        .map(|p| -> Step<'_> {
            Box::pin(async move {
                let values = super::pg_values(&p.values);
                Ok(match p.answers {
                    Kind::Changed => {
                        tx_ref.execute(&p.statement, &values).await?;
                        Answer::Changed
                    }
                    Kind::Row => {
                        let row = tx_ref.query_opt(&p.statement, &values).await?;
                        Answer::Row(
                            row.as_ref()
                                .map(|r| sql::credential(r).map(Box::new))
                                .transpose()?,
                        )
                    }
                })
            })
        })
        .collect();
    // The shared rows last, key versions before the chain head (the order of
    // every transaction that takes both; a Store's foreign key already holds
    // its version's row): they stay locked until the commit.
    let count = &count;
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
            Answer::Row(row) => stored.extend(row.map(|row| *row)),
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
        // Each Store's row as stored, by its key (they ran in key order).
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
