//! Group commit: one thread owns SQLite's write connection; writes that arrive while
//! a commit is in flight join the next transaction, so they share one fsync.

use std::sync::mpsc;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::StoreError;

/// Most writes one transaction takes.
const MAX_BATCH: usize = 256;

/// What a write reports once its transaction is settled.
type Finish = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;

/// Runs a write; returns how to report it and whether it succeeded.
type Run = Box<dyn FnOnce(&Connection) -> (Finish, bool) + Send>;

/// One write: runs inside the batch's transaction, in its own savepoint.
struct Job {
    run: Run,
    /// Checkpoint and truncate the WAL after the commit (writes that destroy material).
    checkpoint: bool,
}

/// The sending side: hand a write to the writer thread and await its durable result.
#[derive(Debug, Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread on `conn`. With `group_commit` off, every write
    /// is its own transaction (for comparison in the benchmark).
    pub fn start(conn: Connection, group_commit: bool) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let max_batch = if group_commit { MAX_BATCH } else { 1 };
        std::thread::Builder::new()
            .name("credvault-sqlite-writer".into())
            .spawn(move || run(&conn, &queue, max_batch))?;
        Ok(Self { jobs })
    }

    /// Runs `f` in the next transaction and returns its result once that
    /// transaction is committed (so the result is durable), or its error.
    pub async fn write<T, F>(&self, checkpoint: bool, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let run = Box::new(move |conn: &Connection| {
            let outcome = f(conn);
            let ok = outcome.is_ok();
            let finish: Finish = Box::new(move |commit| {
                let settled = match (outcome, commit) {
                    (Err(e), _) => Err(e),
                    (Ok(value), Ok(())) => Ok(value),
                    (Ok(_), Err(e)) => Err(e.for_another_write()),
                };
                let _ = done.send(settled);
            });
            (finish, ok)
        });
        self.jobs
            .send(Job { run, checkpoint })
            .map_err(|_| StoreError::WriterGone)?;
        result.await.map_err(|_| StoreError::WriterGone)?
    }
}

/// Runs one of the writer's own fixed statements, prepared once.
fn statement(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

fn run(conn: &Connection, queue: &mpsc::Receiver<Job>, max_batch: usize) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let checkpoint = batch.iter().any(|j| j.checkpoint);
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let e = super::sqlite::classify(e);
            for job in batch {
                let (finish, _) = (job.run)(conn);
                finish(Err(&e));
            }
            continue;
        }
        let mut finishers = Vec::with_capacity(batch.len());
        for job in batch {
            // A savepoint per write: one write's failure undoes only itself.
            let savepoint = statement(conn, "SAVEPOINT job");
            let (finish, ok) = (job.run)(conn);
            let closed = if ok && savepoint.is_ok() {
                statement(conn, "RELEASE job")
            } else {
                conn.execute_batch("ROLLBACK TO job; RELEASE job")
            };
            if let Err(e) = closed {
                tracing::warn!(error = %e, "closing a write's savepoint failed");
            }
            finishers.push(finish);
        }
        let committed = conn
            .execute_batch("COMMIT")
            .map_err(super::sqlite::classify);
        if committed.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        } else if checkpoint {
            // Move zeroed pages into the main file and empty the WAL, so old
            // page images holding destroyed material do not linger there.
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "WAL checkpoint after a destroying write failed");
            }
        }
        for finish in finishers {
            finish(committed.as_ref().map(|_| ()));
        }
    }
}
