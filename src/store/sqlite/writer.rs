//! Group commit: one thread owns SQLite's write connection; writes that arrive while
//! a commit is in flight join the next transaction, so they share one fsync.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::store::{Awaited, Shred, StoreError};

/// Most writes one transaction takes.
const MAX_BATCH: usize = 256;
/// How long the writer gathers writes that no caller waits for (the
/// events of reads under `audit.durability = "changes"`) before it commits
/// them: part of the bound on what a crash can lose in that mode.
pub const UNAWAITED_WINDOW: Duration = Duration::from_millis(2);
/// How often a shred that readers held up is tried again.
const SHRED_RETRY: Duration = Duration::from_millis(250);
/// How long a destroying write waits for readers to let go of old pages
/// before it answers that shredding is pending (every other write waits too).
const SHRED_WAIT: Duration = Duration::from_secs(1);
/// A shred pending this long gets a warning in the log.
const SHRED_WARN_AFTER: Duration = Duration::from_secs(5);
/// SQLite's busy timeout for everything else (as set when connecting).
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a write destroyed key or secret material, and when the WAL that
/// still holds its old pages must be emptied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destroys {
    Nothing,
    /// Right after the commit, before the answer, which says how it went (Zero).
    Now,
    /// In the background, soon after: the answer does not depend on it (a
    /// Store that replaced secrets), and one checkpoint serves many writes.
    Soon,
}

/// What a write reports once its transaction is settled: the commit's
/// outcome, and whether the WAL was emptied after it (for [`Destroys::Now`]).
type Finish = Box<dyn FnOnce(Result<Shred, &StoreError>) + Send>;

/// Runs a write on the transaction's connection, or (given `None`, when the
/// transaction could not begin) only reports, without running it. Returns
/// how to report it, whether it succeeded, and whether it destroyed key or
/// secret material (so the WAL must be checkpointed and truncated after the
/// commit).
type Run = Box<dyn FnOnce(Option<&Connection>) -> Ran + Send>;

struct Ran {
    finish: Finish,
    ok: bool,
    destroys: Destroys,
    /// Why it failed, as the other writes of its transaction would hear it.
    failure: Option<StoreError>,
}

/// What a submitted write reports once its transaction is settled.
pub type Settled<T> = oneshot::Receiver<Result<(T, Shred), StoreError>>;

/// One write: runs inside the batch's transaction, in its own savepoint.
struct Job {
    run: Run,
    awaited: Awaited,
}

/// The sending side: hand a write to the writer thread and await its durable result.
#[derive(Debug, Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    /// Destroying writes committed whose material the WAL still holds.
    pending_shreds: Arc<AtomicU64>,
}

impl Writer {
    /// Starts the writer thread on `conn`. With `group_commit` off, every write
    /// is its own transaction (for comparison in the benchmark).
    pub fn start(conn: Connection, group_commit: bool) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let max_batch = if group_commit { MAX_BATCH } else { 1 };
        // A WAL left by a process that stopped while a shred was pending may
        // still hold destroyed material: empty it first, or keep trying.
        let leftover = u64::from(shred_wal(&conn, Duration::ZERO) == Shred::Pending);
        let pending_shreds = Arc::new(AtomicU64::new(leftover));
        let pending = Arc::clone(&pending_shreds);
        std::thread::Builder::new()
            .name("credvault-sqlite-writer".into())
            .spawn(move || run(&conn, &queue, max_batch, &pending))?;
        Ok(Self {
            jobs,
            pending_shreds,
        })
    }

    /// Destroying writes whose material is still in the WAL, waiting for readers.
    pub fn pending_shreds(&self) -> u64 {
        self.pending_shreds.load(Ordering::Relaxed)
    }

    /// Runs `f` in the next transaction and returns its result once that
    /// transaction is committed (so the result is durable), or its error. A
    /// write reported as failed changed nothing. `destroys` says of the
    /// result whether the write destroyed material, and so when the WAL is
    /// emptied; with [`Destroys::Now`] the answer says whether that finished.
    pub async fn write<T, F, D>(&self, f: F, destroys: D) -> Result<(T, Shred), StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        D: FnOnce(&T) -> Destroys + Send + 'static,
    {
        self.submit(f, destroys, Awaited::Yes)?
            .await
            .map_err(|_| StoreError::WriterGone)?
    }

    /// As [`Self::write`], but returns as soon as the writer holds the write:
    /// it runs after every write handed over before it, and the receiver
    /// gets the result once its transaction is settled.
    pub fn submit<T, F, D>(
        &self,
        f: F,
        destroys: D,
        awaited: Awaited,
    ) -> Result<Settled<T>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        D: FnOnce(&T) -> Destroys + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let run = Box::new(move |conn: Option<&Connection>| {
            let outcome = conn.map(f);
            let ok = matches!(outcome, Some(Ok(_)));
            let failure = match &outcome {
                Some(Err(e)) => Some(e.for_another_write()),
                _ => None,
            };
            let destroys = match &outcome {
                Some(Ok(value)) => destroys(value),
                _ => Destroys::Nothing,
            };
            let finish: Finish = Box::new(move |commit| {
                let settled = match (outcome, commit) {
                    (Some(Err(e)), _) => Err(e),
                    (Some(Ok(value)), Ok(shred)) => Ok((value, shred)),
                    (_, Err(e)) => Err(e.for_another_write()),
                    // Never run means the transaction never began: `commit` is that error.
                    (None, Ok(_)) => Err(StoreError::Commit("the write did not run".into())),
                };
                let _ = done.send(settled);
            });
            Ran {
                finish,
                ok,
                destroys,
                failure,
            }
        });
        self.jobs
            .send(Job { run, awaited })
            .map_err(|_| StoreError::WriterGone)?;
        Ok(result)
    }
}

/// Runs one of the writer's own fixed statements, prepared once.
fn statement(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

fn run(conn: &Connection, queue: &mpsc::Receiver<Job>, max_batch: usize, pending: &AtomicU64) {
    let mut last_try = Instant::now();
    let mut pending_since = None;
    loop {
        let first = if pending.load(Ordering::Relaxed) > 0 {
            // Shred between batches when idle, and at least every SHRED_RETRY
            // under load.
            if last_try.elapsed() >= SHRED_RETRY {
                retry_shred(conn, pending, &mut pending_since);
                last_try = Instant::now();
                continue;
            }
            match queue.recv_timeout(SHRED_RETRY.saturating_sub(last_try.elapsed())) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let gathering = Instant::now();
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // No one waits for this batch's commit: gather more for a moment,
        // so that one commit serves more of them.
        while batch.len() < max_batch && batch.iter().all(|j| j.awaited == Awaited::No) {
            let Some(left) = UNAWAITED_WINDOW.checked_sub(gathering.elapsed()) else {
                break;
            };
            match queue.recv_timeout(left) {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            // Without a transaction a write would commit on its own, in
            // autocommit mode, and then be reported as failed: run none.
            let e = super::error::classify(e);
            for job in batch {
                ((job.run)(None).finish)(Err(&e));
            }
            continue;
        }
        let (mut now, mut soon) = (false, false);
        let mut finishers = Vec::with_capacity(batch.len());
        // Set when SQLite rolled the whole transaction back on its own (it
        // does after SQLITE_FULL, IOERR, NOMEM): every write of the batch is
        // undone, and a write run now would commit alone, in autocommit mode.
        let mut aborted: Option<StoreError> = None;
        for job in batch {
            if aborted.is_some() {
                finishers.push(((job.run)(None).finish, false));
                continue;
            }
            // A savepoint per write: one write's failure undoes only itself.
            let savepoint = statement(conn, "SAVEPOINT job");
            let (finish, ok) = if savepoint.is_ok() {
                let ran = (job.run)(Some(conn));
                if ran.ok {
                    now |= ran.destroys == Destroys::Now;
                    soon |= ran.destroys == Destroys::Soon;
                }
                if conn.is_autocommit() {
                    aborted = Some(ran.failure.unwrap_or_else(|| {
                        StoreError::Commit("SQLite rolled the transaction back".into())
                    }));
                    finishers.push((ran.finish, false));
                    continue;
                }
                (ran.finish, ran.ok)
            } else {
                ((job.run)(None).finish, false)
            };
            let closed = if ok {
                statement(conn, "RELEASE job")
            } else if savepoint.is_ok() {
                conn.execute_batch("ROLLBACK TO job; RELEASE job")
            } else {
                Ok(())
            };
            if let Err(e) = closed {
                tracing::warn!(error = %e, "closing a write's savepoint failed");
            }
            finishers.push((finish, ok));
        }
        let committed = match aborted {
            Some(e) => Err(e),
            None => conn.execute_batch("COMMIT").map_err(super::error::classify),
        };
        let mut shred = Shred::Done;
        if committed.is_err() {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
        } else if now {
            shred = shred_wal(conn, SHRED_WAIT);
            last_try = Instant::now();
            if shred == Shred::Done {
                // An empty WAL holds nothing an earlier shred left behind either.
                pending.store(0, Ordering::Relaxed);
                pending_since = None;
            } else {
                let count = pending.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    pending_shreds = count,
                    "destroyed material is still in the WAL: a reader holds an old snapshot; \
                     retrying every {} ms",
                    SHRED_RETRY.as_millis()
                );
            }
        } else if soon && pending.fetch_add(1, Ordering::Relaxed) == 0 {
            // Counted before the answer; shredded at the next quiet moment.
            last_try = Instant::now();
        }
        for (finish, ran) in finishers {
            match (&committed, ran) {
                (Ok(()), true) => finish(Ok(shred)),
                (Ok(()), false) => finish(Err(&StoreError::Commit(
                    "the write's savepoint could not be opened".into(),
                ))),
                (Err(e), _) => finish(Err(e)),
            }
        }
    }
}

/// Moves every page into the main file and empties the WAL, so old page
/// images holding destroyed material (zeroed in the new pages by
/// `secure_delete`) do not linger there. `Pending` when a reader's snapshot
/// kept SQLite from finishing within `wait`.
fn shred_wal(conn: &Connection, wait: Duration) -> Shred {
    let _ = conn.busy_timeout(wait);
    let busy = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
        row.get::<_, i64>(0)
    });
    let _ = conn.busy_timeout(BUSY_TIMEOUT);
    match busy {
        Ok(0) => Shred::Done,
        Ok(_) => Shred::Pending,
        Err(e) => {
            tracing::warn!(error = %e, "WAL checkpoint after a destroying write failed");
            Shred::Pending
        }
    }
}

/// Retries a pending shred; warns once when one has waited long, since the
/// destroyed material is still readable in the files until then.
fn retry_shred(conn: &Connection, pending: &AtomicU64, since: &mut Option<Instant>) {
    let waited = since.get_or_insert_with(Instant::now);
    if shred_wal(conn, Duration::ZERO) == Shred::Done {
        let done = pending.swap(0, Ordering::Relaxed);
        tracing::info!(
            shreds = done,
            waited_ms = waited.elapsed().as_millis() as u64,
            "pending shreds finished: destroyed material has left the WAL"
        );
        *since = None;
    } else if waited.elapsed() >= SHRED_WARN_AFTER
        && waited.elapsed() < SHRED_WARN_AFTER + SHRED_RETRY
    {
        tracing::warn!(
            pending_shreds = pending.load(Ordering::Relaxed),
            "destroyed material has stayed in the WAL for {} s: a reader (a backup, a long \
             `audit verify`) holds an old snapshot; it is removed once the reader lets go",
            SHRED_WARN_AFTER.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    /// SQLite rolls a whole transaction back on its own after some errors
    /// (FULL, IOERR, NOMEM); a write run after that would commit alone, in
    /// autocommit mode, and then be reported as failed with the batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_sqlite_rolls_a_batch_back_no_later_write_commits_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = super::super::connect(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        let writer = Writer::start(conn, true).unwrap();
        // Holds the writer in a first batch so the next writes share one.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (running, started) = std::sync::mpsc::channel::<()>();
        let first = writer
            .submit(
                move |_| {
                    let _ = running.send(());
                    let _ = held.recv();
                    Ok(())
                },
                |_| Destroys::Nothing,
                Awaited::Yes,
            )
            .unwrap();
        started.recv().unwrap();
        // As SQLite does after SQLITE_FULL: the transaction is gone.
        let rolled_back = writer
            .submit(
                |c| {
                    c.execute_batch("ROLLBACK")?;
                    Err::<(), _>(StoreError::Full)
                },
                |_| Destroys::Nothing,
                Awaited::Yes,
            )
            .unwrap();
        let later = writer
            .submit(
                |c| {
                    c.execute("INSERT INTO t VALUES (1)", [])?;
                    Ok(())
                },
                |_| Destroys::Nothing,
                Awaited::Yes,
            )
            .unwrap();
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert!(matches!(rolled_back.await.unwrap(), Err(StoreError::Full)));
        let later = later.await.unwrap();
        let check = super::super::connect(&path).unwrap();
        assert_eq!(count(&check), 0, "a write reported as failed was committed");
        assert!(matches!(later, Err(StoreError::Full)), "{later:?}");
        // The writer goes on.
        writer
            .write(
                |c| {
                    c.execute("INSERT INTO t VALUES (2)", [])?;
                    Ok(())
                },
                |_| Destroys::Nothing,
            )
            .await
            .unwrap();
        assert_eq!(count(&check), 1);
    }
}
