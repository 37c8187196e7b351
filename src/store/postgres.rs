//! PostgreSQL behind [`Store`], for several vault replicas over one database.
//!
//! Every write is one transaction. Audit appends serialize on a row lock on
//! the chain head (`audit_head`), so all replicas extend one chain with no
//! gaps and no forks. Migrations run under a transaction-scoped advisory
//! lock, so replicas starting together migrate once.

use std::time::SystemTime;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;
use zeroize::Zeroizing;

use super::{
    millis, sealed_from, time, AuditRecord, CredentialRecord, Hold, KeyVersionRow, ParamsBinding,
    Reseal, RetireOutcome, Rewrapped, RootSealed, RootWitness, SecretRecord, Shred, StaleDataKey,
    Store, StoreError, StoredKeys, StoredStatus, WrappedDataKey,
};
use crate::audit::{chain_hash, Checkpoint, Event, StoredEvent, HASH_LEN};
use crate::crypto::{NewKeyMaterial, Sealed, WrappedKeyVersion};

const FINGERPRINT_KEY: &str = crate::crypto::FINGERPRINT_KEY_PURPOSE;
const LEGACY_FINGERPRINT_KEY: &str = crate::crypto::LEGACY_FINGERPRINT_KEY_PURPOSE;
/// Advisory lock keys: "credvaul" and the next value.
const MIGRATION_LOCK: i64 = 0x6372_6564_7661_756c;
const REWRAP_LOCK: i64 = MIGRATION_LOCK + 1;
/// Shared by serving vaults, exclusive for `keys rotate-root` and `bind-params`.
const HOLD_LOCK: i64 = MIGRATION_LOCK + 2;
/// How long a Zero waits for snapshots older than itself to end before it
/// answers that destroyed rows are still readable.
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Schema versions, applied in order; `credvault_schema` holds one row per version applied.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE key_versions (
    version     INTEGER PRIMARY KEY,
    nonce       BYTEA NOT NULL,
    wrapped_key BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'retired')),
    encryptions BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE key_material (
    purpose     TEXT PRIMARY KEY,
    nonce       BYTEA NOT NULL,
    wrapped_key BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE TABLE credentials (
    workspace_id    TEXT NOT NULL,
    provider        TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('connected', 'disconnected')),
    params          TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    disconnected_at BIGINT,
    expires_at      BIGINT,
    key_version     INTEGER REFERENCES key_versions (version),
    dek_nonce       BYTEA,
    wrapped_dek     BYTEA,
    last_validation TEXT,
    PRIMARY KEY (workspace_id, provider),
    CHECK ((status = 'connected') = (wrapped_dek IS NOT NULL))
);
CREATE INDEX credentials_by_key_version ON credentials (key_version);
CREATE TABLE credential_secrets (
    workspace_id TEXT NOT NULL,
    provider     TEXT NOT NULL,
    field        TEXT NOT NULL,
    nonce        BYTEA NOT NULL,
    ciphertext   BYTEA NOT NULL,
    hint         TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    PRIMARY KEY (workspace_id, provider, field),
    FOREIGN KEY (workspace_id, provider) REFERENCES credentials ON DELETE CASCADE
);
CREATE TABLE audit_events (
    sequence      BIGINT PRIMARY KEY,
    event         TEXT NOT NULL,
    previous_hash BYTEA NOT NULL,
    hash          BYTEA NOT NULL
);
-- One row: the chain's head. Appends lock it, so replicas take turns.
CREATE TABLE audit_head (
    one      BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    sequence BIGINT NOT NULL,
    hash     BYTEA NOT NULL
);
INSERT INTO audit_head (sequence, hash) VALUES (0, decode(repeat('00', 32), 'hex'));
CREATE TABLE audit_checkpoints (
    sequence  BIGINT PRIMARY KEY,
    hash      BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    key_id    TEXT NOT NULL
);
",
    r#"
-- One round trip per append, so the head's row lock is held for as short a
-- time as possible: lock the head, hash, insert, move the head. `tail` is the
-- event's canonical JSON after its sequence number.
CREATE FUNCTION credvault_append_audit(tail TEXT)
RETURNS TABLE (out_sequence BIGINT, out_previous_hash BYTEA, out_hash BYTEA)
LANGUAGE plpgsql AS $$
DECLARE
    head_sequence BIGINT;
    head_hash     BYTEA;
    next_sequence BIGINT;
    next_event    TEXT;
    next_hash     BYTEA;
BEGIN
    SELECT h.sequence, h.hash INTO head_sequence, head_hash
        FROM audit_head h WHERE h.one FOR UPDATE;
    next_sequence := head_sequence + 1;
    next_event := '{"sequence":' || next_sequence || tail;
    next_hash := sha256(head_hash || convert_to(next_event, 'UTF8'));
    INSERT INTO audit_events (sequence, event, previous_hash, hash)
        VALUES (next_sequence, next_event, head_hash, next_hash);
    UPDATE audit_head SET sequence = next_sequence, hash = next_hash WHERE one;
    RETURN QUERY SELECT next_sequence, head_hash, next_hash;
END
$$;
"#,
    r"
ALTER TABLE credentials ADD COLUMN binding BYTEA;
",
    r"
CREATE TABLE vault_identity (
    one         BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    database_id BYTEA NOT NULL
);
INSERT INTO vault_identity (database_id) VALUES (uuid_send(gen_random_uuid()));
ALTER TABLE audit_checkpoints ADD COLUMN signed_at BIGINT;
",
];

/// Where the database is and how to log in.
pub struct PostgresSettings {
    /// `postgres://user@host:port/db?sslmode=...`; the password may be left out.
    pub url: String,
    /// Overrides any password in the URL.
    pub password: Option<Zeroizing<String>>,
    pub pool_size: usize,
    /// Trusted for TLS to the database, beside the system roots.
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// The URL with any password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(not a URL)".to_owned(),
    }
}

/// PostgreSQL behind [`Store`], with a connection pool.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

/// Holds the rewrap job's advisory lock: a connection taken out of the pool,
/// so that dropping it closes the session and releases the lock.
pub struct RewrapLock(#[allow(dead_code)] deadpool_postgres::ClientWrapper);

impl PostgresStore {
    /// Connects, and migrates the schema (once, whichever replica gets there first).
    pub async fn connect(settings: &PostgresSettings) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = settings.url.parse().map_err(|e| {
            StoreError::Connect(format!("storage.url is not a PostgreSQL URL: {e}"))
        })?;
        if let Some(password) = &settings.password {
            config.password(password.as_bytes());
        }
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = if config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
            Manager::from_config(config, tokio_postgres::NoTls, manager_config)
        } else {
            Manager::from_config(config, tls(settings.ca_file.as_deref())?, manager_config)
        };
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(2))
            .build()
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        let store = Self { pool };
        let mut client = store.client().await?;
        migrate(&mut client).await?;
        Ok(store)
    }

    /// Every event, every checkpoint and the database identity, in one
    /// REPEATABLE READ snapshot: a vault appending meanwhile must not make a
    /// new checkpoint look past the end of the log.
    pub async fn read_audit_log(&self) -> Result<AuditRecord, StoreError> {
        let mut c = self.client().await?;
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let events = tx
            .query(
                "SELECT sequence, event, previous_hash, hash FROM audit_events ORDER BY sequence",
                &[],
            )
            .await?
            .iter()
            .map(stored_event)
            .collect::<Result<Vec<_>, _>>()?;
        let checkpoints = read_checkpoints(&tx).await?;
        let database_id = read_database_id(&tx).await?;
        tx.commit().await?;
        Ok(AuditRecord {
            events,
            checkpoints,
            database_id,
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(db) => classify(db),
            other => StoreError::Connect(other.to_string()),
        })
    }

    /// Runs `VACUUM` on `tables` after a write that destroyed material, so
    /// that the dead row versions holding it become free space.
    /// `Pending` while another session of this database holds a snapshot
    /// taken before transaction `xid` committed (a backup, a long report):
    /// VACUUM leaves the row versions it may read. Unknown counts as pending.
    async fn older_snapshots(&self, xid: i64) -> Shred {
        let older = async {
            let client = self.client().await?;
            let row = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid() \
                       AND backend_xmin IS NOT NULL \
                       AND age(backend_xmin) >= age((($1::bigint) % 4294967296)::text::xid)",
                    &[&xid],
                )
                .await?;
            Ok::<i64, StoreError>(row.try_get(0)?)
        }
        .await;
        match older {
            Ok(0) => Shred::Done,
            Ok(_) => Shred::Pending,
            Err(e) => {
                tracing::warn!(error = %e, "could not tell whether a snapshot holds destroyed rows");
                Shred::Pending
            }
        }
    }

    async fn vacuum(&self, tables: &str) {
        let result = async {
            let client = self.client().await?;
            client
                .batch_execute(&format!("VACUUM {tables}"))
                .await
                .map_err(classify)
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, tables, "VACUUM after destroying material failed");
        }
    }
}

fn tls(
    ca_file: Option<&std::path::Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = ca_file {
        let certs = crate::hardening::read_trusted_certs("storage.ca_file", path)
            .map_err(StoreError::Connect)?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| StoreError::Connect(format!("storage.ca_file: {e}")))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Connect(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

async fn migrate(client: &mut deadpool_postgres::Object) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS credvault_schema (version INTEGER PRIMARY KEY)")
        .await?;
    let applied: i64 = tx
        .query_one("SELECT count(*) FROM credvault_schema", &[])
        .await?
        .get(0);
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(applied).unwrap_or(usize::MAX))
    {
        tx.batch_execute(sql).await?;
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute("INSERT INTO credvault_schema VALUES ($1)", &[&version])
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Disk full and the like get their own variants; everything else is a database error.
fn classify(e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(c) if *c == SqlState::DISK_FULL || *c == SqlState::OUT_OF_MEMORY => StoreError::Full,
        Some(c) if *c == SqlState::DATA_CORRUPTED || *c == SqlState::INDEX_CORRUPTED => {
            StoreError::Corrupt("PostgreSQL reports corrupt data")
        }
        _ => StoreError::Postgres(e),
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        classify(e)
    }
}

fn version_u32(v: i32) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt("negative key version"))
}

fn version_i32(v: u32) -> i32 {
    // Versions count up from 1 one rotation at a time.
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn seq_u64(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt("negative sequence"))
}

fn seq_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn hash_array(bytes: Vec<u8>) -> Result<[u8; HASH_LEN], StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("an audit hash is not 32 bytes"))
}

const CREDENTIAL_COLUMNS: &str = "workspace_id, provider, status, params, created_at, updated_at, \
     disconnected_at, expires_at, key_version, dek_nonce, wrapped_dek, last_validation, binding";

fn credential_from(row: &Row, secrets: Vec<SecretRecord>) -> Result<CredentialRecord, StoreError> {
    let status = match row.try_get::<_, &str>(2)? {
        "connected" => StoredStatus::Connected,
        "disconnected" => StoredStatus::Disconnected,
        _ => return Err(StoreError::Corrupt("unknown status")),
    };
    let key: (Option<i32>, Option<Vec<u8>>, Option<Vec<u8>>) =
        (row.try_get(8)?, row.try_get(9)?, row.try_get(10)?);
    let data_key = match key {
        (Some(v), Some(n), Some(c)) => Some(WrappedDataKey {
            key_version: version_u32(v)?,
            sealed: sealed_from(n, c)?,
        }),
        (None, None, None) => None,
        _ => return Err(StoreError::Corrupt("partial data key")),
    };
    let params: &str = row.try_get(3)?;
    Ok(CredentialRecord {
        workspace_id: row.try_get(0)?,
        provider: row.try_get(1)?,
        params: serde_json::from_str(params)
            .map_err(|_| StoreError::Corrupt("params are not a JSON object of strings"))?,
        status,
        created_at: time(row.try_get(4)?),
        updated_at: time(row.try_get(5)?),
        disconnected_at: row.try_get::<_, Option<i64>>(6)?.map(time),
        expires_at: row.try_get::<_, Option<i64>>(7)?.map(time),
        data_key,
        secrets,
        last_validation: row.try_get(11)?,
        binding: row.try_get(12)?,
    })
}

/// A read-only transaction on one snapshot: a row and its secrets read
/// together, never half before and half after a concurrent write.
async fn snapshot(
    c: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    Ok(c.build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?)
}

async fn load_secrets(
    c: &impl GenericClient,
    workspace_id: &str,
    provider: &str,
) -> Result<Vec<SecretRecord>, StoreError> {
    c.query(
        "SELECT field, nonce, ciphertext, hint, fingerprint FROM credential_secrets \
         WHERE workspace_id = $1 AND provider = $2 ORDER BY field",
        &[&workspace_id, &provider],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(SecretRecord {
            field: r.try_get(0)?,
            sealed: sealed_from(r.try_get(1)?, r.try_get(2)?)?,
            hint: r.try_get(3)?,
            fingerprint: r.try_get(4)?,
        })
    })
    .collect()
}

async fn load_credential(
    c: &impl GenericClient,
    workspace_id: &str,
    provider: &str,
) -> Result<Option<CredentialRecord>, StoreError> {
    let Some(row) = c
        .query_opt(
            &format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials \
                 WHERE workspace_id = $1 AND provider = $2"
            ),
            &[&workspace_id, &provider],
        )
        .await?
    else {
        return Ok(None);
    };
    let secrets = load_secrets(c, workspace_id, provider).await?;
    credential_from(&row, secrets).map(Some)
}

/// Appends `event` to the chain in one statement (see the migration's
/// `credvault_append_audit`): inside `c`'s transaction, the head's row lock is
/// then held until that transaction ends; on a plain connection, the
/// statement is its own transaction. The database hashes exactly the text
/// that is stored; the hash is checked here against [`chain_hash`].
async fn append_in(c: &impl GenericClient, mut event: Event) -> Result<StoredEvent, StoreError> {
    const PREFIX: &str = "{\"sequence\":0";
    event.sequence = 0;
    let with_zero = event.canonical();
    let tail = with_zero.strip_prefix(PREFIX).ok_or_else(|| {
        StoreError::Audit("an event's encoding does not start with its sequence".into())
    })?;
    let append = async {
        let row = c
            .query_one("SELECT * FROM credvault_append_audit($1)", &[&tail])
            .await?;
        let sequence = seq_u64(row.try_get(0)?)?;
        let previous_hash = hash_array(row.try_get(1)?)?;
        let hash = hash_array(row.try_get(2)?)?;
        let canonical = format!("{{\"sequence\":{sequence}{tail}");
        if chain_hash(&previous_hash, &canonical) != hash {
            return Err(StoreError::Corrupt(
                "the database computed another audit hash",
            ));
        }
        Ok::<_, StoreError>(StoredEvent {
            sequence,
            canonical,
            previous_hash,
            hash,
        })
    };
    append.await.map_err(|e| match e {
        StoreError::Full => StoreError::Full,
        other => StoreError::Audit(other.to_string()),
    })
}

fn stored_event(r: &Row) -> Result<StoredEvent, StoreError> {
    Ok(StoredEvent {
        sequence: seq_u64(r.try_get(0)?)?,
        canonical: r.try_get(1)?,
        previous_hash: hash_array(r.try_get(2)?)?,
        hash: hash_array(r.try_get(3)?)?,
    })
}

async fn active_key_versions(c: &impl GenericClient) -> Result<Vec<WrappedKeyVersion>, StoreError> {
    c.query(
        "SELECT version, nonce, wrapped_key FROM key_versions \
         WHERE state = 'active' ORDER BY version",
        &[],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(WrappedKeyVersion {
            version: version_u32(r.try_get(0)?)?,
            sealed: sealed_from(r.try_get(1)?, r.try_get(2)?)?,
        })
    })
    .collect()
}

async fn sealed_material(
    c: &impl GenericClient,
    purpose: &str,
) -> Result<Option<Sealed>, StoreError> {
    c.query_opt(
        "SELECT nonce, wrapped_key FROM key_material WHERE purpose = $1",
        &[&purpose],
    )
    .await?
    .map(|r| sealed_from(r.try_get(0)?, r.try_get(1)?))
    .transpose()
}

/// Counts `n` data keys wrapped under `version`, which must still be active
/// when this transaction takes the version's row lock (a Retire holds it
/// until it commits): a key another replica retired a moment ago wraps
/// nothing. Returns the version's encryptions so far, across replicas.
async fn count_encryptions(
    c: &impl GenericClient,
    version: u32,
    n: u64,
) -> Result<u64, StoreError> {
    let row = c
        .query_opt(
            "UPDATE key_versions SET encryptions = encryptions + $2 \
             WHERE version = $1 AND state = 'active' RETURNING encryptions",
            &[&version_i32(version), &seq_i64(n)],
        )
        .await?
        .ok_or(StoreError::VersionRetired(version))?;
    seq_u64(row.try_get(0)?)
}

async fn read_checkpoints(c: &impl GenericClient) -> Result<Vec<Checkpoint>, StoreError> {
    c.query(
        "SELECT c.sequence, c.hash, c.signature, c.key_id, c.signed_at, \
                CASE WHEN c.signed_at IS NULL THEN NULL \
                     ELSE (SELECT database_id FROM vault_identity) END \
         FROM audit_checkpoints c ORDER BY c.sequence",
        &[],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(Checkpoint {
            sequence: seq_u64(r.try_get(0)?)?,
            hash: r.try_get(1)?,
            signature: r.try_get(2)?,
            key_id: r.try_get(3)?,
            signed_at_ms: r.try_get(4)?,
            database_id: r.try_get::<_, Option<Vec<u8>>>(5)?.unwrap_or_default(),
        })
    })
    .collect()
}

async fn read_database_id(c: &impl GenericClient) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(c.query_opt("SELECT database_id FROM vault_identity", &[])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?)
}

fn status_text(status: StoredStatus) -> &'static str {
    match status {
        StoredStatus::Connected => "connected",
        StoredStatus::Disconnected => "disconnected",
    }
}

/// Stores root-sealed key material under `purpose`, unless some is there already.
async fn insert_key_material(
    c: &impl GenericClient,
    purpose: &str,
    sealed: &Sealed,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO key_material (purpose, nonce, wrapped_key, created_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (purpose) DO NOTHING",
        &[
            &purpose,
            &sealed.nonce.as_slice(),
            &sealed.ciphertext,
            &millis(SystemTime::now()),
        ],
    )
    .await?;
    Ok(())
}

#[async_trait]
impl Store for PostgresStore {
    async fn load_keys(&self) -> Result<Option<StoredKeys>, StoreError> {
        let c = self.client().await?;
        let mut found = None;
        for purpose in [FINGERPRINT_KEY, LEGACY_FINGERPRINT_KEY] {
            if let Some(sealed) = sealed_material(&c, purpose).await? {
                found = Some((sealed, purpose));
                break;
            }
        }
        let Some((fingerprint_key, fingerprint_purpose)) = found else {
            return Ok(None);
        };
        Ok(Some(StoredKeys {
            versions: active_key_versions(&c).await?,
            fingerprint_key,
            fingerprint_purpose,
        }))
    }

    async fn init_keys(&self, material: NewKeyMaterial) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let now = millis(SystemTime::now());
        let v = &material.first_version;
        tx.execute(
            "INSERT INTO key_versions (version, nonce, wrapped_key, created_at) VALUES ($1, $2, $3, $4)",
            &[&version_i32(v.version), &v.sealed.nonce.as_slice(), &v.sealed.ciphertext, &now],
        )
        .await
        .map_err(|e| match e.code() {
            Some(c) if *c == SqlState::UNIQUE_VIOLATION => StoreError::VersionTaken(v.version),
            _ => classify(e),
        })?;
        tx.execute(
            "INSERT INTO key_material (purpose, nonce, wrapped_key, created_at) VALUES ($1, $2, $3, $4)",
            &[
                &FINGERPRINT_KEY,
                &material.fingerprint_key.nonce.as_slice(),
                &material.fingerprint_key.ciphertext,
                &now,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn put(
        &self,
        record: CredentialRecord,
        event: Event,
    ) -> Result<(CredentialRecord, StoredEvent, u64), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let key = record.data_key.as_ref();
        let params_json = serde_json::to_string(&record.params)
            .map_err(|_| StoreError::Corrupt("params do not serialize"))?;
        tx.execute(
            "INSERT INTO credentials (workspace_id, provider, status, params, created_at, \
                 updated_at, disconnected_at, expires_at, key_version, dek_nonce, wrapped_dek, \
                 last_validation, binding) \
             VALUES ($1, $2, $3, $4, $5, $5, NULL, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (workspace_id, provider) DO UPDATE SET \
                 status = EXCLUDED.status, params = EXCLUDED.params, \
                 updated_at = EXCLUDED.updated_at, disconnected_at = NULL, \
                 expires_at = EXCLUDED.expires_at, key_version = EXCLUDED.key_version, \
                 dek_nonce = EXCLUDED.dek_nonce, wrapped_dek = EXCLUDED.wrapped_dek, \
                 last_validation = EXCLUDED.last_validation, binding = EXCLUDED.binding",
            &[
                &record.workspace_id,
                &record.provider,
                &status_text(record.status),
                &params_json,
                &millis(record.updated_at),
                &record.expires_at.map(millis),
                &key.map(|k| version_i32(k.key_version)),
                &key.map(|k| k.sealed.nonce.as_slice()),
                &key.map(|k| k.sealed.ciphertext.as_slice()),
                &record.last_validation,
                &record.binding,
            ],
        )
        .await?;
        tx.execute(
            "DELETE FROM credential_secrets WHERE workspace_id = $1 AND provider = $2",
            &[&record.workspace_id, &record.provider],
        )
        .await?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO credential_secrets \
                 (workspace_id, provider, field, nonce, ciphertext, hint, fingerprint) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await?;
        for s in &record.secrets {
            tx.execute(
                &insert,
                &[
                    &record.workspace_id,
                    &record.provider,
                    &s.field,
                    &s.sealed.nonce.as_slice(),
                    &s.sealed.ciphertext,
                    &s.hint,
                    &s.fingerprint,
                ],
            )
            .await?;
        }
        let row = load_credential(&tx, &record.workspace_id, &record.provider)
            .await?
            .ok_or(StoreError::Corrupt("row vanished after write"))?;
        // Last, the two rows every Store shares (the key version's counter and
        // the audit head), so their locks are held only until the commit.
        let encryptions = match key {
            Some(k) => count_encryptions(&tx, k.key_version, 1).await?,
            None => 0,
        };
        let stored = append_in(&tx, event).await?;
        tx.commit()
            .await
            .map_err(|e| StoreError::Commit(e.to_string()))?;
        Ok((row, stored, encryptions))
    }

    async fn get(
        &self,
        workspace_id: &str,
        provider: &str,
    ) -> Result<Option<CredentialRecord>, StoreError> {
        let mut c = self.client().await?;
        let tx = snapshot(&mut c).await?;
        let record = load_credential(&tx, workspace_id, provider).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn list(&self, workspace_id: &str) -> Result<Vec<CredentialRecord>, StoreError> {
        let mut c = self.client().await?;
        let tx = snapshot(&mut c).await?;
        let rows = tx
            .query(
                &format!(
                    "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE workspace_id = $1 \
                     ORDER BY provider"
                ),
                &[&workspace_id],
            )
            .await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let provider: &str = row.try_get(1)?;
            let secrets = load_secrets(&tx, workspace_id, provider).await?;
            records.push(credential_from(row, secrets)?);
        }
        tx.commit().await?;
        Ok(records)
    }

    async fn set_last_validation(
        &self,
        workspace_id: &str,
        provider: &str,
        data_key: &WrappedDataKey,
        validation: String,
    ) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let changed = c
            .execute(
                "UPDATE credentials SET last_validation = $1 \
                 WHERE workspace_id = $2 AND provider = $3 AND wrapped_dek = $4",
                &[
                    &validation,
                    &workspace_id,
                    &provider,
                    &data_key.sealed.ciphertext,
                ],
            )
            .await?;
        Ok(changed > 0)
    }

    async fn zero(
        &self,
        workspace_id: &str,
        provider: &str,
        at: SystemTime,
        event: Event,
    ) -> Result<Option<(CredentialRecord, StoredEvent, Shred)>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "DELETE FROM credential_secrets WHERE workspace_id = $1 AND provider = $2",
            &[&workspace_id, &provider],
        )
        .await?;
        let changed = tx
            .execute(
                "UPDATE credentials SET \
                     updated_at = CASE WHEN status = 'connected' THEN $3 ELSE updated_at END, \
                     disconnected_at = COALESCE(disconnected_at, $3), status = 'disconnected', \
                     expires_at = NULL, key_version = NULL, dek_nonce = NULL, wrapped_dek = NULL, \
                     binding = NULL \
                 WHERE workspace_id = $1 AND provider = $2",
                &[&workspace_id, &provider, &millis(at)],
            )
            .await?;
        if changed == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        let row = load_credential(&tx, workspace_id, provider)
            .await?
            .ok_or(StoreError::Corrupt("row vanished after write"))?;
        let stored = append_in(&tx, event).await?;
        let xid: i64 = tx
            .query_one("SELECT txid_current()", &[])
            .await?
            .try_get(0)?;
        tx.commit()
            .await
            .map_err(|e| StoreError::Commit(e.to_string()))?;
        drop(c);
        // The old row versions are dead tuples until VACUUM frees them, and
        // VACUUM cannot free those a snapshot older than the Zero may read:
        // wait a moment for such snapshots (most are calls in flight) to end.
        let deadline = std::time::Instant::now() + SNAPSHOT_WAIT;
        let mut shred = self.older_snapshots(xid).await;
        while shred == Shred::Pending && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            shred = self.older_snapshots(xid).await;
        }
        self.vacuum("credential_secrets, credentials").await;
        Ok(Some((row, stored, shred)))
    }

    async fn connected_credentials(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE status = 'connected'"),
                &[],
            )
            .await?;
        // Secrets are not needed to bind params: the data key is.
        rows.iter()
            .map(|row| credential_from(row, Vec::new()))
            .collect()
    }

    async fn bind_params(
        &self,
        bindings: Vec<ParamsBinding>,
        fingerprint_key: Sealed,
        event: Event,
    ) -> Result<StoredEvent, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        for b in &bindings {
            tx.execute(
                "UPDATE credentials SET binding = $1 \
                 WHERE workspace_id = $2 AND provider = $3 AND wrapped_dek = $4",
                &[&b.tag, &b.workspace_id, &b.provider, &b.wrapped_dek],
            )
            .await?;
        }
        // Another replica starting at the same moment may have done it first:
        // its tags are the same, and either sealing of the key opens.
        insert_key_material(&tx, FINGERPRINT_KEY, &fingerprint_key).await?;
        tx.execute(
            "DELETE FROM key_material WHERE purpose = $1",
            &[&LEGACY_FINGERPRINT_KEY],
        )
        .await?;
        let stored = append_in(&tx, event).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn append_audit(&self, event: Event) -> Result<StoredEvent, StoreError> {
        let c = self.client().await?;
        append_in(&c, event).await
    }

    async fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let c = self.client().await?;
        c.query(
            "SELECT sequence, event, previous_hash, hash FROM audit_events \
             WHERE sequence > $1 ORDER BY sequence LIMIT $2",
            &[&seq_i64(after), &i64::try_from(limit).unwrap_or(i64::MAX)],
        )
        .await?
        .iter()
        .map(stored_event)
        .collect()
    }

    async fn audit_head(&self) -> Result<Option<StoredEvent>, StoreError> {
        let c = self.client().await?;
        c.query_opt(
            "SELECT sequence, event, previous_hash, hash FROM audit_events \
             ORDER BY sequence DESC LIMIT 1",
            &[],
        )
        .await?
        .as_ref()
        .map(stored_event)
        .transpose()
    }

    async fn add_checkpoint(&self, cp: Checkpoint) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO audit_checkpoints (sequence, hash, signature, key_id, signed_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sequence) DO UPDATE SET \
             hash = EXCLUDED.hash, signature = EXCLUDED.signature, key_id = EXCLUDED.key_id, \
             signed_at = EXCLUDED.signed_at",
            &[
                &seq_i64(cp.sequence),
                &cp.hash,
                &cp.signature,
                &cp.key_id,
                &cp.signed_at_ms,
            ],
        )
        .await?;
        Ok(())
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        read_checkpoints(&self.client().await?).await
    }

    async fn database_id(&self) -> Result<Option<Vec<u8>>, StoreError> {
        read_database_id(&self.client().await?).await
    }

    async fn add_key_version(
        &self,
        v: WrappedKeyVersion,
        event: Event,
        witness: RootWitness,
    ) -> Result<StoredEvent, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // FOR SHARE waits for a reseal that holds the row, then reads what it wrote.
        let stored = tx
            .query_opt(
                "SELECT nonce, wrapped_key FROM key_material WHERE purpose = $1 FOR SHARE",
                &[&witness.purpose],
            )
            .await?
            .map(|r| sealed_from(r.try_get(0)?, r.try_get(1)?))
            .transpose()?;
        if !witness.holds(stored.as_ref()) {
            return Err(StoreError::RootChanged);
        }
        tx.execute(
            "INSERT INTO key_versions (version, nonce, wrapped_key, created_at) VALUES ($1, $2, $3, $4)",
            &[
                &version_i32(v.version),
                &v.sealed.nonce.as_slice(),
                &v.sealed.ciphertext,
                &millis(SystemTime::now()),
            ],
        )
        .await?;
        let stored = append_in(&tx, event).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn key_versions(&self) -> Result<Vec<KeyVersionRow>, StoreError> {
        let c = self.client().await?;
        c.query(
            "SELECT v.version, v.state, v.created_at, v.encryptions, \
                    (SELECT count(*) FROM credentials c WHERE c.key_version = v.version) \
             FROM key_versions v ORDER BY v.version",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(KeyVersionRow {
                version: version_u32(r.try_get(0)?)?,
                retired: r.try_get::<_, &str>(1)? == "retired",
                created_at: time(r.try_get(2)?),
                encryptions: seq_u64(r.try_get(3)?)?,
                credentials: seq_u64(r.try_get(4)?)?,
            })
        })
        .collect()
    }

    async fn stale_data_keys(
        &self,
        primary: u32,
        limit: usize,
    ) -> Result<Vec<StaleDataKey>, StoreError> {
        let c = self.client().await?;
        c.query(
            "SELECT workspace_id, provider, key_version, dek_nonce, wrapped_dek FROM credentials \
             WHERE key_version < $1 LIMIT $2",
            &[
                &version_i32(primary),
                &i64::try_from(limit).unwrap_or(i64::MAX),
            ],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(StaleDataKey {
                workspace_id: r.try_get(0)?,
                provider: r.try_get(1)?,
                key: WrappedDataKey {
                    key_version: version_u32(r.try_get(2)?)?,
                    sealed: sealed_from(r.try_get(3)?, r.try_get(4)?)?,
                },
            })
        })
        .collect()
    }

    async fn rewrap(&self, batch: Vec<Rewrapped>, event: Event) -> Result<usize, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let update = tx
            .prepare_cached(
                "UPDATE credentials SET key_version = $1, dek_nonce = $2, wrapped_dek = $3 \
                 WHERE workspace_id = $4 AND provider = $5 AND key_version = $6 AND wrapped_dek = $7",
            )
            .await?;
        let mut applied = 0u64;
        for r in &batch {
            applied += tx
                .execute(
                    &update,
                    &[
                        &version_i32(r.new.key_version),
                        &r.new.sealed.nonce.as_slice(),
                        &r.new.sealed.ciphertext,
                        &r.workspace_id,
                        &r.provider,
                        &version_i32(r.old.key_version),
                        &r.old.sealed.ciphertext,
                    ],
                )
                .await?;
        }
        if let Some(first) = batch.first() {
            count_encryptions(&tx, first.new.key_version, applied).await?;
        }
        append_in(&tx, event).await?;
        tx.commit().await?;
        Ok(usize::try_from(applied).unwrap_or(usize::MAX))
    }

    async fn retire_key_version(
        &self,
        version: u32,
        event: Event,
    ) -> Result<(RetireOutcome, Shred), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let v = version_i32(version);
        let state: Option<String> = tx
            .query_opt(
                "SELECT state FROM key_versions WHERE version = $1 FOR UPDATE",
                &[&v],
            )
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
        match state.as_deref() {
            None => return Ok((RetireOutcome::Unknown, Shred::Done)),
            Some("retired") => return Ok((RetireOutcome::AlreadyRetired, Shred::Done)),
            Some(_) => {}
        }
        let newest: i32 = tx
            .query_one("SELECT max(version) FROM key_versions", &[])
            .await?
            .try_get(0)?;
        if v == newest {
            return Ok((RetireOutcome::Newest, Shred::Done));
        }
        let users: i64 = tx
            .query_one(
                "SELECT count(*) FROM credentials WHERE key_version = $1",
                &[&v],
            )
            .await?
            .try_get(0)?;
        if users > 0 {
            return Ok((RetireOutcome::InUse(seq_u64(users)?), Shred::Done));
        }
        tx.execute(
            "UPDATE key_versions SET state = 'retired', nonce = '', wrapped_key = '' \
             WHERE version = $1",
            &[&v],
        )
        .await?;
        let stored = append_in(&tx, event).await?;
        tx.commit()
            .await
            .map_err(|e| StoreError::Commit(e.to_string()))?;
        drop(c);
        self.vacuum("key_versions").await;
        // What VACUUM leaves behind is described in the README; there is no
        // reader to wait for as with SQLite's WAL.
        Ok((RetireOutcome::Retired(stored), Shred::Done))
    }

    async fn reseal_root(&self, reseal: Reseal, event: Event) -> Result<usize, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // No key version is added until this commits: a replica's insert
        // waits, then finds its root witness changed.
        tx.batch_execute("LOCK TABLE key_versions IN EXCLUSIVE MODE")
            .await?;
        let versions = active_key_versions(&tx).await?;
        let material = tx
            .query(
                "SELECT purpose, nonce, wrapped_key FROM key_material FOR UPDATE",
                &[],
            )
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, sealed_from(r.try_get(1)?, r.try_get(2)?)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let new = reseal(RootSealed { versions, material }).map_err(StoreError::Refused)?;
        for v in &new.versions {
            tx.execute(
                "UPDATE key_versions SET nonce = $2, wrapped_key = $3 WHERE version = $1",
                &[
                    &version_i32(v.version),
                    &v.sealed.nonce.as_slice(),
                    &v.sealed.ciphertext,
                ],
            )
            .await?;
        }
        for (purpose, sealed) in &new.material {
            tx.execute(
                "UPDATE key_material SET nonce = $2, wrapped_key = $3 WHERE purpose = $1",
                &[purpose, &sealed.nonce.as_slice(), &sealed.ciphertext],
            )
            .await?;
        }
        append_in(&tx, event).await?;
        tx.commit()
            .await
            .map_err(|e| StoreError::Commit(e.to_string()))?;
        drop(c);
        self.vacuum("key_versions, key_material").await;
        Ok(new.versions.len() + new.material.len())
    }

    /// A session-level advisory lock on a connection of its own, taken out
    /// of the pool (closing it lets go): shared while serving, exclusive for
    /// a command that needs every vault stopped.
    async fn hold(&self, hold: Hold) -> Result<Box<dyn std::any::Any + Send>, StoreError> {
        let c = self.client().await?;
        let sql = match hold {
            Hold::Serving => "SELECT pg_try_advisory_lock_shared($1)",
            Hold::Alone => "SELECT pg_try_advisory_lock($1)",
        };
        let held: bool = c.query_one(sql, &[&HOLD_LOCK]).await?.try_get(0)?;
        if !held {
            return Err(StoreError::Held(hold));
        }
        Ok(Box::new(deadpool_postgres::Object::take(c)))
    }

    async fn key_material(&self, purpose: &str) -> Result<Option<Sealed>, StoreError> {
        let c = self.client().await?;
        sealed_material(&c, purpose).await
    }

    async fn put_key_material(&self, purpose: &str, sealed: Sealed) -> Result<(), StoreError> {
        let c = self.client().await?;
        // Replicas starting together may each create the same material: the first one wins.
        insert_key_material(&c, purpose, &sealed).await
    }

    async fn rewrap_lock(&self) -> Result<Option<Box<dyn std::any::Any + Send>>, StoreError> {
        let c = self.client().await?;
        let got: bool = c
            .query_one("SELECT pg_try_advisory_lock($1)", &[&REWRAP_LOCK])
            .await?
            .try_get(0)?;
        // The session lock lives as long as this connection is held, and
        // ends with it if the replica dies.
        Ok(got.then(|| {
            Box::new(RewrapLock(deadpool_postgres::Object::take(c)))
                as Box<dyn std::any::Any + Send>
        }))
    }
}
