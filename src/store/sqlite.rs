//! The embedded SQLite store: WAL, full fsync, secure delete, one writer and a few readers.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row};

use super::writer::{Destroys, Writer};
use super::{
    millis, sealed_from, time, AuditRecord, CredentialRecord, Hold, KeyVersionRow, ParamsBinding,
    Reseal, RetireOutcome, Rewrapped, RootSealed, RootWitness, SecretRecord, Shred, StaleDataKey,
    Store, StoreError, StoredKeys, StoredStatus, WrappedDataKey,
};
use crate::audit::{chain_hash, Checkpoint, Event, StoredEvent, GENESIS, HASH_LEN};
use crate::crypto::{NewKeyMaterial, Sealed, WrappedKeyVersion};

const FINGERPRINT_KEY: &str = crate::crypto::FINGERPRINT_KEY_PURPOSE;
const LEGACY_FINGERPRINT_KEY: &str = crate::crypto::LEGACY_FINGERPRINT_KEY_PURPOSE;
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
    conn.busy_timeout(super::writer::BUSY_TIMEOUT)?;
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

/// Maps "disk full" to its own variant so callers can tell it apart.
pub(super) fn classify(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => StoreError::Full,
        _ => StoreError::Database(e),
    }
}

/// [`classify`] for errors already typed: a failed audit append stays one.
fn classify_store(e: StoreError) -> StoreError {
    match e {
        StoreError::Database(db) => classify(db),
        other => other,
    }
}

const CREDENTIAL_COLUMNS: &str = "workspace_id, provider, status, params, created_at, updated_at, \
     disconnected_at, expires_at, key_version, dek_nonce, wrapped_dek, last_validation, binding";

/// Reads a `credentials` row selected with [`CREDENTIAL_COLUMNS`]; secrets come separately.
fn credential_row(row: &Row<'_>) -> rusqlite::Result<RawCredential> {
    Ok(RawCredential {
        workspace_id: row.get(0)?,
        provider: row.get(1)?,
        status: row.get(2)?,
        params: row.get(3)?,
        created_at: row.get(4)?,
        updated_at: row.get(5)?,
        disconnected_at: row.get(6)?,
        expires_at: row.get(7)?,
        key_version: row.get(8)?,
        dek_nonce: row.get(9)?,
        wrapped_dek: row.get(10)?,
        last_validation: row.get(11)?,
        binding: row.get(12)?,
    })
}

struct RawCredential {
    workspace_id: String,
    provider: String,
    status: String,
    params: String,
    created_at: i64,
    updated_at: i64,
    disconnected_at: Option<i64>,
    expires_at: Option<i64>,
    key_version: Option<u32>,
    dek_nonce: Option<Vec<u8>>,
    wrapped_dek: Option<Vec<u8>>,
    last_validation: Option<String>,
    binding: Option<Vec<u8>>,
}

impl RawCredential {
    fn into_record(self, secrets: Vec<SecretRecord>) -> Result<CredentialRecord, StoreError> {
        let status = match self.status.as_str() {
            "connected" => StoredStatus::Connected,
            "disconnected" => StoredStatus::Disconnected,
            _ => return Err(StoreError::Corrupt("unknown status")),
        };
        let data_key = match (self.key_version, self.dek_nonce, self.wrapped_dek) {
            (Some(key_version), Some(n), Some(ciphertext)) => Some(WrappedDataKey {
                key_version,
                sealed: sealed_from(n, ciphertext)?,
            }),
            (None, None, None) => None,
            _ => return Err(StoreError::Corrupt("partial data key")),
        };
        Ok(CredentialRecord {
            workspace_id: self.workspace_id,
            provider: self.provider,
            params: serde_json::from_str(&self.params)
                .map_err(|_| StoreError::Corrupt("params are not a JSON object of strings"))?,
            status,
            created_at: time(self.created_at),
            updated_at: time(self.updated_at),
            disconnected_at: self.disconnected_at.map(time),
            expires_at: self.expires_at.map(time),
            data_key,
            secrets,
            last_validation: self.last_validation,
            binding: self.binding,
        })
    }
}

fn load_secrets(
    conn: &Connection,
    workspace_id: &str,
    provider: &str,
) -> Result<Vec<SecretRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT field, nonce, ciphertext, hint, fingerprint FROM credential_secrets \
         WHERE workspace_id = ?1 AND provider = ?2 ORDER BY field",
    )?;
    let rows = stmt.query_map(params![workspace_id, provider], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, Vec<u8>>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    rows.map(|row| {
        let (field, n, ciphertext, hint, fingerprint) = row?;
        Ok(SecretRecord {
            field,
            sealed: sealed_from(n, ciphertext)?,
            hint,
            fingerprint,
        })
    })
    .collect()
}

fn load_credential(
    conn: &Connection,
    workspace_id: &str,
    provider: &str,
) -> Result<Option<CredentialRecord>, StoreError> {
    let raw = conn
        .prepare_cached(&format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE workspace_id = ?1 AND provider = ?2"
        ))?
        .query_row(params![workspace_id, provider], credential_row)
        .optional()?;
    raw.map(|raw| {
        let secrets = load_secrets(conn, workspace_id, provider)?;
        raw.into_record(secrets)
    })
    .transpose()
}

/// Deletes a connection's secret rows. `secure_delete` makes SQLite overwrite
/// the freed bytes with zeros in the same write.
/// Returns how many there were.
fn delete_secrets(tx: &Connection, workspace_id: &str, provider: &str) -> rusqlite::Result<usize> {
    tx.prepare_cached("DELETE FROM credential_secrets WHERE workspace_id = ?1 AND provider = ?2")?
        .execute(params![workspace_id, provider])
}

/// Writes the row, its secrets and its event; returns the event, whether
/// secrets were replaced, and the data key's version's encryptions so far.
fn put_tx(
    tx: &Connection,
    record: &CredentialRecord,
    event: Event,
) -> Result<(StoredEvent, bool, u64), StoreError> {
    let key = record.data_key.as_ref();
    let params_json = serde_json::to_string(&record.params)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    tx.prepare_cached(
        "INSERT INTO credentials (workspace_id, provider, status, params, created_at, updated_at, \
             disconnected_at, expires_at, key_version, dek_nonce, wrapped_dek, last_validation, \
             binding) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, NULL, ?6, ?7, ?8, ?9, ?10, ?11) \
         ON CONFLICT (workspace_id, provider) DO UPDATE SET \
             status = excluded.status, params = excluded.params, updated_at = excluded.updated_at, \
             disconnected_at = NULL, expires_at = excluded.expires_at, \
             key_version = excluded.key_version, dek_nonce = excluded.dek_nonce, \
             wrapped_dek = excluded.wrapped_dek, last_validation = excluded.last_validation, \
             binding = excluded.binding",
    )?
    .execute(params![
        record.workspace_id,
        record.provider,
        match record.status {
            StoredStatus::Connected => "connected",
            StoredStatus::Disconnected => "disconnected",
        },
        params_json,
        millis(record.updated_at),
        record.expires_at.map(millis),
        key.map(|k| k.key_version),
        key.map(|k| k.sealed.nonce.as_slice()),
        key.map(|k| k.sealed.ciphertext.as_slice()),
        record.last_validation,
        record.binding,
    ])?;
    let encryptions = match key {
        Some(k) => count_encryptions(tx, k.key_version, 1)?,
        None => 0,
    };
    let replaced = delete_secrets(tx, &record.workspace_id, &record.provider)? > 0;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO credential_secrets \
             (workspace_id, provider, field, nonce, ciphertext, hint, fingerprint) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for s in &record.secrets {
            insert.execute(params![
                record.workspace_id,
                record.provider,
                s.field,
                s.sealed.nonce.as_slice(),
                s.sealed.ciphertext,
                s.hint,
                s.fingerprint,
            ])?;
        }
    }
    append_in(tx, event).map(|stored| (stored, replaced, encryptions))
}

/// Counts `n` data keys wrapped under `version`, which must still be active
/// in this transaction: a key another replica retired a moment ago wraps
/// nothing. Returns the version's encryptions so far, across replicas.
fn count_encryptions(tx: &Connection, version: u32, n: u64) -> Result<u64, StoreError> {
    tx.prepare_cached(
        "UPDATE key_versions SET encryptions = encryptions + ?2 \
         WHERE version = ?1 AND state = 'active' RETURNING encryptions",
    )?
    .query_row(params![version, n], |r| r.get(0))
    .optional()?
    .ok_or(StoreError::VersionRetired(version))
}

/// The active key-encryption key versions, oldest first.
fn active_key_versions(conn: &Connection) -> Result<Vec<WrappedKeyVersion>, StoreError> {
    let rows = conn
        .prepare_cached(
            "SELECT version, nonce, wrapped_key FROM key_versions \
             WHERE state = 'active' ORDER BY version",
        )?
        .query_map([], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(version, n, ciphertext)| {
            Ok(WrappedKeyVersion {
                version,
                sealed: sealed_from(n, ciphertext)?,
            })
        })
        .collect()
}

/// One key sealed under the root key, by purpose.
fn sealed_material(conn: &Connection, purpose: &str) -> Result<Option<Sealed>, StoreError> {
    conn.prepare_cached("SELECT nonce, wrapped_key FROM key_material WHERE purpose = ?1")?
        .query_row([purpose], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .optional()?
        .map(|(n, ciphertext)| sealed_from(n, ciphertext))
        .transpose()
}

/// Appends `event` to the chain inside `tx`: next sequence, hash over the
/// previous event's hash and this event's canonical text.
fn append_in(tx: &Connection, mut event: Event) -> Result<StoredEvent, StoreError> {
    let mut append = || -> rusqlite::Result<StoredEvent> {
        let last = tx
            .prepare_cached(
                "SELECT sequence, hash FROM audit_events ORDER BY sequence DESC LIMIT 1",
            )?
            .query_row([], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, Vec<u8>>(1)?)))
            .optional()?;
        let (sequence, previous_hash) = match last {
            Some((seq, hash)) => (seq + 1, hash_array(hash)?),
            None => (1, GENESIS),
        };
        event.sequence = sequence;
        let canonical = event.canonical();
        let hash = chain_hash(&previous_hash, &canonical);
        tx.prepare_cached(
            "INSERT INTO audit_events (sequence, event, previous_hash, hash) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![sequence, canonical, previous_hash.as_slice(), hash.as_slice()])?;
        Ok(StoredEvent {
            sequence,
            canonical,
            previous_hash,
            hash,
        })
    };
    append().map_err(|e| StoreError::Audit(e.to_string()))
}

fn hash_array(bytes: Vec<u8>) -> rusqlite::Result<[u8; HASH_LEN]> {
    bytes.try_into().map_err(|b: Vec<u8>| {
        rusqlite::Error::FromSqlConversionFailure(
            b.len(),
            rusqlite::types::Type::Blob,
            "an audit hash is not 32 bytes".into(),
        )
    })
}

fn stored_event(r: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        sequence: r.get(0)?,
        canonical: r.get(1)?,
        previous_hash: hash_array(r.get(2)?)?,
        hash: hash_array(r.get(3)?)?,
    })
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
    let events = snapshot
        .prepare("SELECT sequence, event, previous_hash, hash FROM audit_events ORDER BY sequence")?
        .query_map([], stored_event)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(AuditRecord {
        events,
        checkpoints: read_checkpoints(&snapshot)?,
        database_id: read_database_id(&snapshot)?,
    })
}

fn read_checkpoints(conn: &Connection) -> rusqlite::Result<Vec<Checkpoint>> {
    conn.prepare_cached(
        "SELECT c.sequence, c.hash, c.signature, c.key_id, c.signed_at, \
                CASE WHEN c.signed_at IS NULL THEN NULL ELSE (SELECT database_id FROM vault_identity) END \
         FROM audit_checkpoints c ORDER BY c.sequence",
    )?
    .query_map([], |r| {
        Ok(Checkpoint {
            sequence: r.get(0)?,
            hash: r.get(1)?,
            signature: r.get(2)?,
            key_id: r.get(3)?,
            signed_at_ms: r.get(4)?,
            database_id: r.get::<_, Option<Vec<u8>>>(5)?.unwrap_or_default(),
        })
    })?
    .collect()
}

fn read_database_id(conn: &Connection) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.prepare_cached("SELECT database_id FROM vault_identity")?
        .query_row([], |r| r.get(0))
        .optional()
}

fn zero_tx(
    tx: &Connection,
    workspace_id: &str,
    provider: &str,
    at: SystemTime,
    event: Event,
) -> Result<Option<StoredEvent>, StoreError> {
    delete_secrets(tx, workspace_id, provider)?;
    let changed = tx
        .prepare_cached(
            "UPDATE credentials SET \
                 updated_at = CASE WHEN status = 'connected' THEN ?3 ELSE updated_at END, \
                 disconnected_at = COALESCE(disconnected_at, ?3), status = 'disconnected', \
                 expires_at = NULL, key_version = NULL, dek_nonce = NULL, wrapped_dek = NULL, \
                 binding = NULL \
             WHERE workspace_id = ?1 AND provider = ?2",
        )?
        .execute(params![workspace_id, provider, millis(at)])?;
    if changed == 0 {
        return Ok(None);
    }
    append_in(tx, event).map(Some)
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
                versions: active_key_versions(conn)?,
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
            conn.execute(
                "INSERT INTO key_versions (version, nonce, wrapped_key, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![v.version, v.sealed.nonce.as_slice(), v.sealed.ciphertext, now],
            )?;
            conn.execute(
                "INSERT INTO key_material (purpose, nonce, wrapped_key, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![
                    FINGERPRINT_KEY,
                    material.fingerprint_key.nonce.as_slice(),
                    material.fingerprint_key.ciphertext,
                    now
                ],
            )?;
            Ok(())
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
                move |conn| {
                    let (stored, replaced, encryptions) =
                        put_tx(conn, &record, event).map_err(classify_store)?;
                    let row = load_credential(conn, &record.workspace_id, &record.provider)?
                        .ok_or(StoreError::Corrupt("row vanished after write"))?;
                    Ok((row, stored, replaced, encryptions))
                },
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
        self.read_point(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE workspace_id = ?1 ORDER BY provider"
            ))?;
            let raws = stmt
                .query_map([&w], credential_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            raws.into_iter()
                .map(|raw| {
                    let secrets = load_secrets(conn, &raw.workspace_id, &raw.provider)?;
                    raw.into_record(secrets)
                })
                .collect()
        })
        .await
    }

    async fn set_last_validation(
        &self,
        workspace_id: &str,
        provider: &str,
        data_key: &WrappedDataKey,
        validation: String,
    ) -> Result<bool, StoreError> {
        let (w, p) = (workspace_id.to_owned(), provider.to_owned());
        let wrapped = data_key.sealed.ciphertext.clone();
        self.write(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE credentials SET last_validation = ?1 \
                     WHERE workspace_id = ?2 AND provider = ?3 AND wrapped_dek = ?4",
                )?
                .execute(params![validation, w, p, wrapped])
                .map_err(classify)?;
            Ok(changed > 0)
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
            .write_destroying(move |conn| {
                let Some(stored) = zero_tx(conn, &w, &p, at, event).map_err(classify_store)? else {
                    return Ok(None);
                };
                let row = load_credential(conn, &w, &p)?
                    .ok_or(StoreError::Corrupt("row vanished after write"))?;
                Ok(Some((row, stored)))
            })
            .await?;
        Ok(zeroed.map(|(row, stored)| (row, stored, shred)))
    }

    async fn connected_credentials(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE status = 'connected'"
            ))?;
            let raws = stmt
                .query_map([], credential_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            // Secrets are not needed to bind params: the data key is.
            raws.into_iter()
                .map(|raw| raw.into_record(Vec::new()))
                .collect()
        })
        .await
    }

    async fn bind_params(
        &self,
        bindings: Vec<ParamsBinding>,
        fingerprint_key: Sealed,
        event: Event,
    ) -> Result<StoredEvent, StoreError> {
        self.write_destroying(move |conn| {
            let mut update = conn.prepare_cached(
                "UPDATE credentials SET binding = ?1 \
                 WHERE workspace_id = ?2 AND provider = ?3 AND wrapped_dek = ?4",
            )?;
            for b in &bindings {
                update.execute(params![b.tag, b.workspace_id, b.provider, b.wrapped_dek])?;
            }
            conn.execute(
                "INSERT OR REPLACE INTO key_material (purpose, nonce, wrapped_key, created_at) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    FINGERPRINT_KEY,
                    fingerprint_key.nonce.as_slice(),
                    fingerprint_key.ciphertext,
                    millis(SystemTime::now())
                ],
            )?;
            conn.execute(
                "DELETE FROM key_material WHERE purpose = ?1",
                [LEGACY_FINGERPRINT_KEY],
            )?;
            append_in(conn, event)
        })
        .await
        .map(|(stored, _)| stored)
    }

    async fn append_audit(&self, event: Event) -> Result<StoredEvent, StoreError> {
        self.write(move |conn| {
            let stored = append_in(conn, event)?;
            Ok(stored)
        })
        .await
    }

    async fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT sequence, event, previous_hash, hash FROM audit_events \
                     WHERE sequence > ?1 ORDER BY sequence LIMIT ?2",
                )?
                .query_map(params![after, limit as i64], stored_event)?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn audit_head(&self) -> Result<Option<StoredEvent>, StoreError> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT sequence, event, previous_hash, hash FROM audit_events \
                     ORDER BY sequence DESC LIMIT 1",
                )?
                .query_row([], stored_event)
                .optional()?)
        })
        .await
    }

    async fn add_checkpoint(&self, cp: Checkpoint) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO audit_checkpoints \
                 (sequence, hash, signature, key_id, signed_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                cp.sequence,
                cp.hash,
                cp.signature,
                cp.key_id,
                cp.signed_at_ms
            ])
            .map_err(classify)?;
            Ok(())
        })
        .await
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        self.read(|conn| Ok(read_checkpoints(conn)?)).await
    }

    async fn database_id(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|conn| Ok(read_database_id(conn)?)).await
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
            conn.execute(
                "INSERT INTO key_versions (version, nonce, wrapped_key, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![v.version, v.sealed.nonce.as_slice(), v.sealed.ciphertext, millis(SystemTime::now())],
            )
            .map_err(|e| match e.sqlite_error_code() {
                Some(ErrorCode::ConstraintViolation) => StoreError::VersionTaken(v.version),
                _ => classify(e),
            })?;
            append_in(conn, event)
        })
        .await
    }

    async fn key_versions(&self) -> Result<Vec<KeyVersionRow>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT v.version, v.state, v.created_at, v.encryptions, \
                        (SELECT count(*) FROM credentials c WHERE c.key_version = v.version) \
                 FROM key_versions v ORDER BY v.version",
            )?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(KeyVersionRow {
                        version: r.get(0)?,
                        retired: r.get::<_, String>(1)? == "retired",
                        created_at: time(r.get(2)?),
                        encryptions: r.get(3)?,
                        credentials: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn stale_data_keys(
        &self,
        primary: u32,
        limit: usize,
    ) -> Result<Vec<StaleDataKey>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT workspace_id, provider, key_version, dek_nonce, wrapped_dek FROM credentials \
                 WHERE key_version < ?1 LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(params![primary, limit as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, u32>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter()
                .map(|(workspace_id, provider, key_version, n, ciphertext)| {
                    Ok(StaleDataKey {
                        workspace_id,
                        provider,
                        key: WrappedDataKey {
                            key_version,
                            sealed: sealed_from(n, ciphertext)?,
                        },
                    })
                })
                .collect()
        })
        .await
    }

    async fn rewrap(&self, batch: Vec<Rewrapped>, event: Event) -> Result<usize, StoreError> {
        self.write(move |conn| {
            let mut applied = 0;
            {
                let mut update = conn.prepare_cached(
                    "UPDATE credentials SET key_version = ?1, dek_nonce = ?2, wrapped_dek = ?3 \
                     WHERE workspace_id = ?4 AND provider = ?5 AND key_version = ?6 AND wrapped_dek = ?7",
                )?;
                for r in &batch {
                    applied += update.execute(params![
                        r.new.key_version,
                        r.new.sealed.nonce.as_slice(),
                        r.new.sealed.ciphertext,
                        r.workspace_id,
                        r.provider,
                        r.old.key_version,
                        r.old.sealed.ciphertext,
                    ])?;
                }
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
            let state: Option<String> = conn
                .query_row("SELECT state FROM key_versions WHERE version = ?1", [version], |r| r.get(0))
                .optional()?;
            match state.as_deref() {
                None => return Ok(RetireOutcome::Unknown),
                Some("retired") => return Ok(RetireOutcome::AlreadyRetired),
                Some(_) => {}
            }
            let newest: u32 =
                conn.query_row("SELECT max(version) FROM key_versions", [], |r| r.get(0))?;
            if version == newest {
                return Ok(RetireOutcome::Newest);
            }
            let users: u64 = conn.query_row(
                "SELECT count(*) FROM credentials WHERE key_version = ?1",
                [version],
                |r| r.get(0),
            )?;
            if users > 0 {
                return Ok(RetireOutcome::InUse(users));
            }
            // secure_delete zeroes the freed bytes; the checkpoint after the
            // commit moves the zeroed page into the main file and empties the WAL.
            conn.execute(
                "UPDATE key_versions SET state = 'retired', nonce = zeroblob(0), wrapped_key = zeroblob(0) \
                 WHERE version = ?1",
                [version],
            )?;
            let stored = append_in(conn, event)?;
            Ok(RetireOutcome::Retired(stored))
        })
        .await
    }

    async fn reseal_root(&self, reseal: Reseal, event: Event) -> Result<usize, StoreError> {
        self.write_destroying(move |conn| {
            let versions = active_key_versions(conn)?;
            let material = conn
                .prepare("SELECT purpose, nonce, wrapped_key FROM key_material")?
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?
                .into_iter()
                .map(|(purpose, n, c)| Ok((purpose, sealed_from(n, c)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            let new = reseal(RootSealed { versions, material }).map_err(StoreError::Refused)?;
            for v in &new.versions {
                conn.execute(
                    "UPDATE key_versions SET nonce = ?2, wrapped_key = ?3 WHERE version = ?1",
                    params![v.version, v.sealed.nonce.as_slice(), v.sealed.ciphertext],
                )?;
            }
            for (purpose, sealed) in &new.material {
                conn.execute(
                    "UPDATE key_material SET nonce = ?2, wrapped_key = ?3 WHERE purpose = ?1",
                    params![purpose, sealed.nonce.as_slice(), sealed.ciphertext],
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

    async fn key_material(&self, purpose: &str) -> Result<Option<Sealed>, StoreError> {
        let purpose = purpose.to_owned();
        self.read(move |conn| sealed_material(conn, &purpose)).await
    }

    async fn put_key_material(&self, purpose: &str, sealed: Sealed) -> Result<(), StoreError> {
        let purpose = purpose.to_owned();
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO key_material (purpose, nonce, wrapped_key, created_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (purpose) DO NOTHING",
                params![purpose, sealed.nonce.as_slice(), sealed.ciphertext, millis(SystemTime::now())],
            )
            .map_err(classify)?;
            Ok(())
        })
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
