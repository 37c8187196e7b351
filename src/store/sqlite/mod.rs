//! The embedded SQLite store: WAL, full fsync, secure delete, one writer and a few readers.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension};

use super::sql::{self, values, SqlRow, Value};
use super::{
    audit_failure, millis, taken, AuditRecord, Awaited, CredentialRecord, Expiring, ExpiryNotice,
    Hold, KeyVersionRow, Noted, ParamsBinding, Queued, Reseal, RetireOutcome, Rewrapped,
    RootSealed, RootWitness, Shred, StaleDataKey, Store, StoreError, StoredKeys, VerdictRecord,
    Watched, WrappedDataKey, FINGERPRINT_KEY, LEGACY_FINGERPRINT_KEY,
};
use crate::audit::{chain_hash, Checkpoint, Event, StoredEvent, GENESIS};
use crate::crypto::{NewKeyMaterial, Sealed, WrappedKeyVersion};
use writer::{Destroys, Writer};

mod error;
mod writer;

const READERS: usize = 4;

/// Schema versions, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE key_versions (
    version     INTEGER PRIMARY KEY,
    nonce       BLOB NOT NULL,
    wrapped_key BLOB NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;
CREATE TABLE key_material (
    purpose     TEXT PRIMARY KEY,
    nonce       BLOB NOT NULL,
    wrapped_key BLOB NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;
CREATE TABLE credentials (
    workspace_id    TEXT NOT NULL,
    provider        TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('connected', 'disconnected')),
    params          TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    disconnected_at INTEGER,
    expires_at      INTEGER,
    key_version     INTEGER REFERENCES key_versions (version),
    dek_nonce       BLOB,
    wrapped_dek     BLOB,
    PRIMARY KEY (workspace_id, provider),
    CHECK ((status = 'connected') = (wrapped_dek IS NOT NULL))
) STRICT;
CREATE INDEX credentials_by_key_version ON credentials (key_version);
CREATE TABLE credential_secrets (
    workspace_id TEXT NOT NULL,
    provider     TEXT NOT NULL,
    field        TEXT NOT NULL,
    nonce        BLOB NOT NULL,
    ciphertext   BLOB NOT NULL,
    hint         TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    PRIMARY KEY (workspace_id, provider, field),
    FOREIGN KEY (workspace_id, provider) REFERENCES credentials ON DELETE CASCADE
) STRICT;
"#,
    r#"
ALTER TABLE credentials ADD COLUMN last_validation TEXT;
"#,
    r#"
CREATE TABLE audit_events (
    sequence      INTEGER PRIMARY KEY,
    event         TEXT NOT NULL,
    previous_hash BLOB NOT NULL,
    hash          BLOB NOT NULL
) STRICT;
CREATE TABLE audit_checkpoints (
    sequence   INTEGER PRIMARY KEY,
    hash       BLOB NOT NULL,
    signature  BLOB NOT NULL,
    key_id     TEXT NOT NULL
) STRICT;
"#,
    r#"
ALTER TABLE key_versions ADD COLUMN state TEXT NOT NULL DEFAULT 'active'
    CHECK (state IN ('active', 'retired'));
ALTER TABLE key_versions ADD COLUMN encryptions INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
ALTER TABLE credentials ADD COLUMN binding BLOB;
"#,
    r#"
CREATE TABLE vault_identity (
    one         INTEGER PRIMARY KEY CHECK (one = 1),
    database_id BLOB NOT NULL
) STRICT;
INSERT INTO vault_identity (one, database_id) VALUES (1, randomblob(16));
ALTER TABLE audit_checkpoints ADD COLUMN signed_at INTEGER;
"#,
    r#"
ALTER TABLE credentials ADD COLUMN expiry_notice_for INTEGER;
ALTER TABLE credentials ADD COLUMN expiry_notice_within INTEGER;
CREATE INDEX credentials_by_expiry ON credentials (expires_at) WHERE expires_at IS NOT NULL;
"#,
    r#"
ALTER TABLE credentials ADD COLUMN validated_at INTEGER;
ALTER TABLE credentials ADD COLUMN validation_settled INTEGER;
"#,
];

/// SQLite behind [`Store`]. Blocking calls run on tokio's blocking pool.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Writer,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

impl SqliteStore {
    /// Opens (creating with mode 0600 if absent) and migrates the database,
    /// with group commit.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, true)
    }

    /// As [`SqliteStore::open`]; `group_commit` off makes every write its own
    /// transaction and fsync.
    pub fn open_with(path: &Path, group_commit: bool) -> Result<Self, StoreError> {
        create_private(path)?;
        let mut writer = connect(path)?;
        migrate(&mut writer)?;
        let writer = Writer::start(writer, group_commit).map_err(|source| StoreError::File {
            path: path.to_owned(),
            source,
        })?;
        let readers = (0..READERS)
            .map(|_| connect(path).map(Mutex::new))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writer,
                readers,
                next_reader: AtomicUsize::new(0),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` inside the writer's next transaction; returns once it is durable.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (value, _) = self.inner.writer.write(f, |_| Destroys::Nothing).await?;
        Ok(value)
    }

    /// As [`Self::write`], then checkpoints and truncates the WAL: for writes
    /// that destroy key or secret material. If a reader holds that up, the
    /// write has still happened, the answer says `Pending`, and
    /// [`Store::shreds_pending`] counts it until the writer, retrying, finishes.
    async fn write_destroying<T, F>(&self, f: F) -> Result<(T, Shred), StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.inner.writer.write(f, |_| Destroys::Now).await
    }

    /// Runs a short point read (an indexed lookup of a few rows) right here on
    /// the calling task when a reader connection is free: a WAL reader never
    /// waits for the writer, and a hop to the blocking pool costs more than the
    /// read. Falls back to [`Self::read`] when every reader is busy.
    async fn read_point<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let readers = &self.inner.readers;
        let start = self.inner.next_reader.fetch_add(1, Ordering::Relaxed);
        for i in 0..readers.len() {
            if let Ok(conn) = readers[(start + i) % readers.len()].try_lock() {
                return f(&conn);
            }
        }
        self.read(f).await
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let i = inner.next_reader.fetch_add(1, Ordering::Relaxed) % inner.readers.len();
            f(&lock(&inner.readers[i]))
        })
        .await?
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

/// A poisoned lock only means another call panicked mid-statement; SQLite
/// rolled that transaction back, so the connection is still consistent.
fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file_err = |source| StoreError::File {
        path: path.to_owned(),
        source,
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(file_err)
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(writer::BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Savepoint sub-journals (one per write in a group commit) in memory, not
    // in a temporary file: no write syscalls and no temporary copies on disk.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let applied: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Runs a shared statement; returns the rows it changed.
fn execute(conn: &Connection, sql: &str, values: &[Value<'_>]) -> Result<usize, StoreError> {
    Ok(conn
        .prepare_cached(sql)?
        .execute(rusqlite::params_from_iter(values))?)
}

/// Runs a shared query and decodes every row.
fn query<T>(
    conn: &Connection,
    sql: &str,
    values: &[Value<'_>],
    decode: impl Fn(&dyn SqlRow) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(values))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// The first row of a shared query, decoded.
fn query_opt<T>(
    conn: &Connection,
    sql: &str,
    values: &[Value<'_>],
    decode: impl Fn(&dyn SqlRow) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(values))?;
    rows.next()?.map(|row| decode(row)).transpose()
}

/// Connections with their secrets, from [`sql::CREDENTIAL`] or
/// [`sql::WORKSPACE_CREDENTIALS`].
fn credentials(
    conn: &Connection,
    sql: &str,
    values: &[Value<'_>],
) -> Result<Vec<CredentialRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(values))?;
    let mut records = Vec::new();
    while let Some(row) = rows.next()? {
        sql::push_credential_row(&mut records, row)?;
    }
    Ok(records)
}

fn load_credential(
    conn: &Connection,
    workspace_id: &str,
    provider: &str,
) -> Result<Option<CredentialRecord>, StoreError> {
    Ok(credentials(conn, sql::CREDENTIAL, &values![workspace_id, provider])?.pop())
}

/// Writes the row, its secrets and its event; returns the row as stored,
/// the event, whether secrets were replaced, and the data key's version's
/// encryptions so far.
fn put_tx(
    tx: &Connection,
    record: CredentialRecord,
    event: Event,
) -> Result<(CredentialRecord, StoredEvent, bool, u64), StoreError> {
    let params_json = sql::params_json(&record)?;
    let mut row = query_opt(
        tx,
        sql::PUT_CREDENTIAL,
        &sql::put_values(&record, &params_json),
        sql::credential,
    )?
    .ok_or(StoreError::Corrupt("an upsert returned no row"))?;
    let encryptions = match &record.data_key {
        Some(k) => count_encryptions(tx, k.key_version, 1)?,
        None => 0,
    };
    let replaced = execute(
        tx,
        sql::DELETE_SECRETS,
        &values![&record.workspace_id, &record.provider],
    )? > 0;
    for chunk in record.secrets.chunks(sql::SECRETS_PER_STATEMENT) {
        execute(
            tx,
            sql::insert_secrets(chunk.len()),
            &sql::secrets_values(&record, chunk),
        )?;
    }
    let stored = append_in(tx, event)?;
    row.secrets = record.secrets;
    Ok((row, stored, replaced, encryptions))
}

/// Counts `n` data keys wrapped under `version`, which must still be active
/// in this transaction: a key another replica retired a moment ago wraps
/// nothing. Returns the version's encryptions so far, across replicas.
fn count_encryptions(tx: &Connection, version: u32, n: u64) -> Result<u64, StoreError> {
    let total = query_opt(
        tx,
        sql::COUNT_ENCRYPTIONS,
        &values![n, version],
        sql::single_int,
    )?
    .flatten()
    .ok_or(StoreError::VersionRetired(version))?;
    sql::count(total)
}

/// Stores root-sealed material under `purpose`, unless some is there already.
fn insert_key_material(
    conn: &Connection,
    purpose: &str,
    sealed: &Sealed,
) -> Result<(), StoreError> {
    let now = millis(SystemTime::now());
    execute(
        conn,
        sql::INSERT_KEY_MATERIAL,
        &sql::key_material_values(purpose, sealed, now),
    )
    .map(drop)
}

fn sealed_material(conn: &Connection, purpose: &str) -> Result<Option<Sealed>, StoreError> {
    query_opt(
        conn,
        sql::KEY_MATERIAL,
        &values![purpose],
        sql::key_material,
    )
}

/// Appends `event` to the chain inside `tx`: next sequence, hash over the
/// previous event's hash and this event's canonical text.
fn append_in(tx: &Connection, mut event: Event) -> Result<StoredEvent, StoreError> {
    let mut append = || {
        // Only the head's place: not its text.
        let last = tx
            .prepare_cached(
                "SELECT sequence, hash FROM audit_events ORDER BY sequence DESC LIMIT 1",
            )?
            .query_row([], |row| {
                Ok((row.get::<_, u64>(0)?, row.get::<_, Vec<u8>>(1)?))
            })
            .optional()?;
        let (sequence, previous_hash) = match last {
            Some((last, hash)) => (
                last + 1,
                hash.try_into()
                    .map_err(|_| StoreError::Corrupt("an audit event's hash has a wrong length"))?,
            ),
            None => (1, GENESIS),
        };
        event.sequence = sequence;
        let canonical = event.canonical();
        let hash = chain_hash(&previous_hash, &canonical);
        tx.prepare_cached(
            "INSERT INTO audit_events (sequence, event, previous_hash, hash) \
             VALUES ($1, $2, $3, $4)",
        )?
        .execute(rusqlite::params![
            sequence,
            canonical,
            previous_hash.as_slice(),
            hash.as_slice()
        ])?;
        // Read back inside the transaction: a trigger someone added to the
        // file may have dropped the row (RAISE(IGNORE), a DELETE after the
        // insert), and the next event would then link to the one before it,
        // leaving no gap for `audit verify` to find. Then nothing commits.
        let kept: Option<Vec<u8>> = tx
            .prepare_cached("SELECT hash FROM audit_events WHERE sequence = $1")?
            .query_row([sequence], |row| row.get(0))
            .optional()?;
        if kept.as_deref() != Some(hash.as_slice()) {
            return Err(StoreError::Corrupt(
                "the audit log did not keep an event it was given: look for triggers on \
                 audit_events (`SELECT sql FROM sqlite_master WHERE type = 'trigger'`)",
            ));
        }
        Ok(StoredEvent {
            sequence,
            canonical,
            previous_hash,
            hash,
        })
    };
    append().map_err(audit_failure)
}

/// Every event in sequence order, and every checkpoint: for `audit verify`,
/// straight from a database file that is opened read-only.
pub fn read_audit_log(path: &Path) -> Result<AuditRecord, StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let applied: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if applied < MIGRATIONS.len() {
        return Err(StoreError::Connect(format!(
            "{} was written by an older credvault: start the vault once to upgrade it, \
             then verify",
            path.display()
        )));
    }
    // One snapshot for events and checkpoints: a vault appending meanwhile
    // must not make a new checkpoint look past the end of the log.
    let snapshot = conn.unchecked_transaction()?;
    Ok(AuditRecord {
        events: query(&snapshot, sql::ALL_EVENTS, &[], sql::stored_event)?,
        checkpoints: query(&snapshot, sql::CHECKPOINTS, &[], sql::checkpoint)?,
        database_id: database_id(&snapshot)?,
    })
}

fn database_id(conn: &Connection) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(query_opt(conn, sql::DATABASE_ID, &[], sql::single_bytes)?.flatten())
}

fn zero_tx(
    tx: &Connection,
    workspace_id: &str,
    provider: &str,
    at: SystemTime,
    event: Event,
) -> Result<Option<(CredentialRecord, StoredEvent)>, StoreError> {
    let row = query_opt(
        tx,
        sql::ZERO_CREDENTIAL,
        &values![millis(at), workspace_id, provider],
        sql::credential,
    )?;
    let Some(row) = row else {
        return Ok(None);
    };
    execute(tx, sql::DELETE_SECRETS, &values![workspace_id, provider])?;
    Ok(Some((row, append_in(tx, event)?)))
}

#[async_trait]
impl Store for SqliteStore {
    async fn load_keys(&self) -> Result<Option<StoredKeys>, StoreError> {
        self.read(|conn| {
            let mut found = None;
            for purpose in [FINGERPRINT_KEY, LEGACY_FINGERPRINT_KEY] {
                if let Some(sealed) = sealed_material(conn, purpose)? {
                    found = Some((sealed, purpose));
                    break;
                }
            }
            let Some((fingerprint_key, fingerprint_purpose)) = found else {
                return Ok(None);
            };
            Ok(Some(StoredKeys {
                versions: query(
                    conn,
                    sql::ACTIVE_KEY_VERSIONS,
                    &[],
                    sql::wrapped_key_version,
                )?,
                fingerprint_key,
                fingerprint_purpose,
            }))
        })
        .await
    }

    async fn init_keys(&self, material: NewKeyMaterial) -> Result<(), StoreError> {
        self.write(move |conn| {
            let now = millis(SystemTime::now());
            let v = &material.first_version;
            execute(
                conn,
                sql::INSERT_KEY_VERSION,
                &sql::key_version_values(v, now),
            )?;
            insert_key_material(conn, FINGERPRINT_KEY, &material.fingerprint_key)
        })
        .await
    }

    async fn put(
        &self,
        record: CredentialRecord,
        event: Event,
    ) -> Result<(CredentialRecord, StoredEvent, u64), StoreError> {
        // Replaced secrets and their data key are destroyed material: the
        // writer empties the WAL in the background soon after (one checkpoint
        // for many Stores), counting it as pending until then. The Store has
        // happened either way, so its answer does not wait.
        let ((row, stored, _, encryptions), _) = self
            .inner
            .writer
            .write(
                move |conn| put_tx(conn, record, event),
                |(_, _, replaced, _)| {
                    if *replaced {
                        Destroys::Soon
                    } else {
                        Destroys::Nothing
                    }
                },
            )
            .await?;
        Ok((row, stored, encryptions))
    }

    async fn get(
        &self,
        workspace_id: &str,
        provider: &str,
    ) -> Result<Option<CredentialRecord>, StoreError> {
        let (w, p) = (workspace_id.to_owned(), provider.to_owned());
        self.read_point(move |conn| load_credential(conn, &w, &p))
            .await
    }

    async fn list(&self, workspace_id: &str) -> Result<Vec<CredentialRecord>, StoreError> {
        let w = workspace_id.to_owned();
        self.read_point(move |conn| credentials(conn, sql::WORKSPACE_CREDENTIALS, &values![&w]))
            .await
    }

    async fn note_verdict(
        &self,
        workspace_id: &str,
        provider: &str,
        data_key: &WrappedDataKey,
        previous: Option<String>,
        verdict: VerdictRecord,
        event: Option<Event>,
    ) -> Result<Noted, StoreError> {
        let (w, p, key) = (
            workspace_id.to_owned(),
            provider.to_owned(),
            data_key.clone(),
        );
        self.write(move |conn| {
            let values = sql::verdict_values(&verdict, &w, &p, &key, previous.as_ref());
            let changed = execute(conn, sql::NOTE_VERDICT, &values)?;
            if changed == 0 {
                return Ok(Noted::Stale);
            }
            match event {
                Some(event) => append_in(conn, event).map(|e| Noted::Recorded(Some(e))),
                None => Ok(Noted::Recorded(None)),
            }
        })
        .await
    }

    async fn monitor_due(
        &self,
        settled_before: SystemTime,
        unsettled_before: SystemTime,
        stored_before: SystemTime,
    ) -> Result<Vec<Watched>, StoreError> {
        let (settled, unsettled, stored) = (
            millis(settled_before),
            millis(unsettled_before),
            millis(stored_before),
        );
        self.read(move |conn| {
            query(
                conn,
                sql::MONITOR_DUE,
                &values![settled, unsettled, stored],
                sql::watched,
            )
        })
        .await
    }

    async fn zero(
        &self,
        workspace_id: &str,
        provider: &str,
        at: SystemTime,
        event: Event,
    ) -> Result<Option<(CredentialRecord, StoredEvent, Shred)>, StoreError> {
        let (w, p) = (workspace_id.to_owned(), provider.to_owned());
        let (zeroed, shred) = self
            .write_destroying(move |conn| zero_tx(conn, &w, &p, at, event))
            .await?;
        Ok(zeroed.map(|(row, stored)| (row, stored, shred)))
    }

    async fn connected_credentials(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        // Secrets are not needed to bind params: the data key is.
        self.read(|conn| query(conn, sql::CONNECTED_CREDENTIALS, &[], sql::credential))
            .await
    }

    async fn bind_params(
        &self,
        bindings: Vec<ParamsBinding>,
        fingerprint_key: Sealed,
        event: Event,
    ) -> Result<StoredEvent, StoreError> {
        self.write_destroying(move |conn| {
            for b in &bindings {
                execute(
                    conn,
                    sql::SET_BINDING,
                    &values![&b.tag, &b.workspace_id, &b.provider, &b.wrapped_dek],
                )?;
            }
            insert_key_material(conn, FINGERPRINT_KEY, &fingerprint_key)?;
            execute(
                conn,
                sql::DELETE_KEY_MATERIAL,
                &values![LEGACY_FINGERPRINT_KEY],
            )?;
            append_in(conn, event)
        })
        .await
        .map(|(stored, _)| stored)
    }

    async fn expiring(&self, before: SystemTime) -> Result<Vec<Expiring>, StoreError> {
        let before = millis(before);
        self.read(move |conn| query(conn, sql::EXPIRING, &values![before], sql::expiring))
            .await
    }

    async fn note_expiry(
        &self,
        workspace_id: &str,
        provider: &str,
        notice: ExpiryNotice,
        event: Event,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let (w, p) = (workspace_id.to_owned(), provider.to_owned());
        let expires_at = millis(notice.expires_at);
        self.write(move |conn| {
            let noted = execute(
                conn,
                sql::NOTE_EXPIRY,
                &values![expires_at, notice.within_seconds, &w, &p],
            )?;
            if noted == 0 {
                return Ok(None);
            }
            append_in(conn, event).map(Some)
        })
        .await
    }

    fn queue_audit(&self, event: Event, awaited: Awaited) -> Result<Queued, StoreError> {
        let settled = self.inner.writer.submit(
            move |conn| append_in(conn, event),
            |_| Destroys::Nothing,
            awaited,
        )?;
        // One writer thread takes writes first in, first out.
        let in_order = true;
        Ok(Queued::new(
            async move {
                let (stored, _) = settled.await.map_err(|_| StoreError::WriterGone)??;
                Ok(stored)
            },
            in_order,
        ))
    }

    async fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.read(move |conn| {
            query(
                conn,
                sql::EVENTS_AFTER,
                &values![after, limit],
                sql::stored_event,
            )
        })
        .await
    }

    async fn audit_head(&self) -> Result<Option<StoredEvent>, StoreError> {
        self.read(|conn| query_opt(conn, sql::LAST_EVENT, &[], sql::stored_event))
            .await
    }

    async fn add_checkpoint(&self, cp: Checkpoint) -> Result<(), StoreError> {
        self.write(move |conn| {
            execute(
                conn,
                sql::PUT_CHECKPOINT,
                &values![
                    cp.sequence,
                    &cp.hash,
                    &cp.signature,
                    &cp.key_id,
                    cp.signed_at_ms
                ],
            )
            .map(drop)
        })
        .await
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        self.read(|conn| query(conn, sql::CHECKPOINTS, &[], sql::checkpoint))
            .await
    }

    async fn database_id(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(database_id).await
    }

    async fn add_key_version(
        &self,
        v: WrappedKeyVersion,
        event: Event,
        witness: RootWitness,
    ) -> Result<StoredEvent, StoreError> {
        self.write(move |conn| {
            if !witness.holds(sealed_material(conn, witness.purpose)?.as_ref()) {
                return Err(StoreError::RootChanged);
            }
            let now = millis(SystemTime::now());
            execute(
                conn,
                sql::INSERT_KEY_VERSION,
                &sql::key_version_values(&v, now),
            )
            .map_err(taken(v.version))?;
            append_in(conn, event)
        })
        .await
    }

    async fn key_versions(&self) -> Result<Vec<KeyVersionRow>, StoreError> {
        self.read(|conn| query(conn, sql::KEY_VERSIONS, &[], sql::key_version_row))
            .await
    }

    async fn stale_data_keys(
        &self,
        primary: u32,
        limit: usize,
    ) -> Result<Vec<StaleDataKey>, StoreError> {
        self.read(move |conn| {
            query(
                conn,
                sql::STALE_DATA_KEYS,
                &values![primary, limit],
                sql::stale_data_key,
            )
        })
        .await
    }

    async fn rewrap(&self, batch: Vec<Rewrapped>, event: Event) -> Result<usize, StoreError> {
        self.write(move |conn| {
            let mut applied = 0;
            for r in &batch {
                applied += execute(conn, sql::REWRAP, &sql::rewrap_values(r))?;
            }
            if let Some(first) = batch.first() {
                count_encryptions(conn, first.new.key_version, applied as u64)?;
            }
            append_in(conn, event)?;
            Ok(applied)
        })
        .await
    }

    async fn retire_key_version(
        &self,
        version: u32,
        event: Event,
    ) -> Result<(RetireOutcome, Shred), StoreError> {
        self.write_destroying(move |conn| {
            let state = query_opt(
                conn,
                sql::KEY_VERSION_STATE,
                &values![version],
                sql::single_text,
            )?
            .flatten();
            match state.as_deref() {
                None => return Ok(RetireOutcome::Unknown),
                Some("retired") => return Ok(RetireOutcome::AlreadyRetired),
                Some(_) => {}
            }
            let newest = query_opt(conn, sql::NEWEST_KEY_VERSION, &[], sql::single_int)?.flatten();
            if newest == Some(i64::from(version)) {
                return Ok(RetireOutcome::Newest);
            }
            let users = query_opt(
                conn,
                sql::CREDENTIALS_OF_VERSION,
                &values![version],
                sql::single_int,
            )?
            .flatten()
            .unwrap_or(0);
            if users > 0 {
                return Ok(RetireOutcome::InUse(sql::count(users)?));
            }
            // secure_delete zeroes the freed bytes; the checkpoint after the
            // commit moves the zeroed page into the main file and empties the WAL.
            execute(conn, sql::RETIRE_KEY_VERSION, &values![&[][..], version])?;
            let stored = append_in(conn, event)?;
            Ok(RetireOutcome::Retired(stored))
        })
        .await
    }

    async fn reseal_root(&self, reseal: Reseal, event: Event) -> Result<usize, StoreError> {
        self.write_destroying(move |conn| {
            let versions = query(
                conn,
                sql::ACTIVE_KEY_VERSIONS,
                &[],
                sql::wrapped_key_version,
            )?;
            let material = query(conn, sql::ALL_KEY_MATERIAL, &[], sql::purpose_and_material)?;
            let new = reseal(RootSealed { versions, material }).map_err(StoreError::Refused)?;
            for v in &new.versions {
                execute(
                    conn,
                    sql::RESEAL_KEY_VERSION,
                    &values![v.sealed.nonce.as_slice(), &v.sealed.ciphertext, v.version],
                )?;
            }
            for (purpose, sealed) in &new.material {
                execute(
                    conn,
                    sql::RESEAL_KEY_MATERIAL,
                    &values![sealed.nonce.as_slice(), &sealed.ciphertext, purpose],
                )?;
            }
            append_in(conn, event)?;
            Ok(new.versions.len() + new.material.len())
        })
        .await
        .map(|(count, _)| count)
    }

    /// A `flock` on `DB.lock` beside the database: shared while serving,
    /// exclusive for a command that needs every vault stopped.
    async fn hold(&self, hold: Hold) -> Result<Box<dyn std::any::Any + Send>, StoreError> {
        use rustix::fs::FlockOperation;
        use std::os::unix::fs::OpenOptionsExt;
        // Whatever the configuration calls the database (a symlink, `./`): one lock.
        let db =
            std::fs::canonicalize(&self.inner.path).unwrap_or_else(|_| self.inner.path.clone());
        let mut name = db.into_os_string();
        name.push(".lock");
        let path = PathBuf::from(name);
        let file_error = |source| StoreError::File {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(file_error)?;
        let operation = match hold {
            Hold::Serving => FlockOperation::NonBlockingLockShared,
            Hold::Alone => FlockOperation::NonBlockingLockExclusive,
        };
        match rustix::fs::flock(&file, operation) {
            Ok(()) => Ok(Box::new(file)),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(StoreError::Held(hold)),
            Err(e) => Err(file_error(e.into())),
        }
    }

    fn shreds_pending(&self) -> u64 {
        self.inner.writer.pending_shreds()
    }

    async fn integrity_check(&self) -> Result<(), StoreError> {
        let verdict: String = self
            .read(|conn| Ok(conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?))
            .await?;
        if verdict == "ok" {
            Ok(())
        } else {
            Err(StoreError::Corrupt(
                "the file fails SQLite's integrity check; restore it from a backup",
            ))
        }
    }

    async fn key_material(&self, purpose: &str) -> Result<Option<Sealed>, StoreError> {
        let purpose = purpose.to_owned();
        self.read(move |conn| sealed_material(conn, &purpose)).await
    }

    async fn put_key_material(&self, purpose: &str, sealed: Sealed) -> Result<(), StoreError> {
        let purpose = purpose.to_owned();
        self.write(move |conn| insert_key_material(conn, &purpose, &sealed))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_database_readable_by_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let store = SqliteStore::open(&path).unwrap();
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// Every `?` on a rusqlite error goes through [`classify`]: a full disk
    /// is `Full` on every path, not only where a write remembered to map it.
    #[test]
    fn every_driver_error_is_sorted_into_the_typed_set() {
        use rusqlite::ffi;
        let error =
            |code| StoreError::from(rusqlite::Error::SqliteFailure(ffi::Error::new(code), None));
        assert!(matches!(error(ffi::SQLITE_FULL), StoreError::Full));
        assert!(matches!(error(ffi::SQLITE_BUSY), StoreError::Busy(_)));
        assert!(matches!(error(ffi::SQLITE_LOCKED), StoreError::Busy(_)));
        assert!(matches!(error(ffi::SQLITE_CORRUPT), StoreError::Corrupt(_)));
        assert!(matches!(error(ffi::SQLITE_NOTADB), StoreError::Corrupt(_)));
        assert!(matches!(
            error(ffi::SQLITE_CANTOPEN),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            error(ffi::SQLITE_IOERR),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            error(ffi::SQLITE_CONSTRAINT),
            StoreError::Conflict(_)
        ));
        assert!(matches!(error(ffi::SQLITE_MISMATCH), StoreError::Engine(_)));
    }

    #[test]
    fn a_file_that_is_not_a_database_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn migrations_run_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        drop(SqliteStore::open(&path).unwrap());
        drop(SqliteStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        let v: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len());
    }
}
