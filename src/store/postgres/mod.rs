//! PostgreSQL behind [`Store`], for several vault replicas over one database.
//!
//! Every write is one transaction. Audit appends serialize on a row lock on
//! the chain head (`audit_head`), so all replicas extend one chain with no
//! gaps and no forks; each replica gathers its concurrent Stores and appends
//! into one transaction ([`batch`]), so it takes that lock once per batch.
//! Migrations run under a transaction-scoped advisory lock, so replicas
//! starting together migrate once.

use std::time::SystemTime;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use zeroize::Zeroizing;

use super::sql::{self, values, SqlRow, Value};
use super::{
    audit_failure, millis, taken, AuditRecord, Awaited, CredentialRecord, Expiring, ExpiryNotice,
    Hold, KeyVersionRow, Noted, ParamsBinding, Queued, Reseal, RetireOutcome, Rewrapped,
    RootSealed, RootWitness, Shred, StaleDataKey, Store, StoreError, StoredKeys, VerdictRecord,
    Watched, WrappedDataKey, FINGERPRINT_KEY, LEGACY_FINGERPRINT_KEY,
};
use crate::audit::{chain_hash, Checkpoint, Event, StoredEvent};
use crate::crypto::{NewKeyMaterial, Sealed, WrappedKeyVersion};

mod batch;
mod tls;

/// Advisory lock keys: "credvaul" and the next value.
const MIGRATION_LOCK: i64 = 0x6372_6564_7661_756c;
const REWRAP_LOCK: i64 = MIGRATION_LOCK + 1;
/// Shared by serving vaults, exclusive for `keys rotate-root` and `bind-params`.
const HOLD_LOCK: i64 = MIGRATION_LOCK + 2;
/// How long a statement waits for a lock another session holds before it
/// fails as busy: the same bound as SQLite's busy timeout, so that a stuck
/// session (an open `psql` transaction, a long `LOCK TABLE`) makes calls
/// fail with UNAVAILABLE instead of hanging.
const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
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
    r#"
-- A batch of events in one call (group commit): the head is locked once, and
-- each event links to the one before it, in the order given.
CREATE FUNCTION credvault_append_audit_batch(tails TEXT[])
RETURNS TABLE (out_sequence BIGINT, out_previous_hash BYTEA, out_hash BYTEA)
LANGUAGE plpgsql AS $$
DECLARE
    head_sequence BIGINT;
    head_hash     BYTEA;
    tail          TEXT;
    next_event    TEXT;
    next_hash     BYTEA;
BEGIN
    SELECT h.sequence, h.hash INTO head_sequence, head_hash
        FROM audit_head h WHERE h.one FOR UPDATE;
    FOREACH tail IN ARRAY tails LOOP
        head_sequence := head_sequence + 1;
        next_event := '{"sequence":' || head_sequence || tail;
        next_hash := sha256(head_hash || convert_to(next_event, 'UTF8'));
        INSERT INTO audit_events (sequence, event, previous_hash, hash)
            VALUES (head_sequence, next_event, head_hash, next_hash);
        out_sequence := head_sequence;
        out_previous_hash := head_hash;
        out_hash := next_hash;
        RETURN NEXT;
        head_hash := next_hash;
    END LOOP;
    UPDATE audit_head SET sequence = head_sequence, hash = head_hash WHERE one;
END
$$;
"#,
    r"
ALTER TABLE credentials ADD COLUMN expiry_notice_for BIGINT;
ALTER TABLE credentials ADD COLUMN expiry_notice_within BIGINT;
CREATE INDEX credentials_by_expiry ON credentials (expires_at) WHERE expires_at IS NOT NULL;
",
    r"
ALTER TABLE credentials ADD COLUMN validated_at BIGINT;
ALTER TABLE credentials ADD COLUMN validation_settled BIGINT;
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

/// PostgreSQL behind [`Store`], with a connection pool and a group-commit writer.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    writer: batch::Writer,
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
        let (url, sslmode) = tls::split_sslmode(&settings.url).map_err(StoreError::Connect)?;
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Connect(format!("storage.url is not a PostgreSQL URL: {e}"))
        })?;
        // As in libpq, a Unix socket is never TLS (it does not leave the machine).
        let sslmode = if on_unix_sockets(&config) {
            tls::SslMode::Disable
        } else {
            sslmode
        };
        config.ssl_mode(sslmode.negotiation());
        if let Some(warning) =
            tls::weakness(sslmode, settings.ca_file.is_some(), on_loopback(&config))
        {
            tracing::warn!("{warning}");
        }
        if let Some(password) = &settings.password {
            config.password(password.as_bytes());
        }
        let options = format!(
            "{} -c lock_timeout={}",
            config.get_options().unwrap_or_default(),
            LOCK_TIMEOUT.as_millis()
        );
        config.options(options.trim_start());
        let target = target(&config);
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = if sslmode == tls::SslMode::Disable {
            Manager::from_config(config, tokio_postgres::NoTls, manager_config)
        } else {
            let connector = tls::connector(sslmode, settings.ca_file.as_deref())?;
            Manager::from_config(config, connector, manager_config)
        };
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(2))
            .build()
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        let store = Self {
            writer: batch::Writer::start(pool.clone()),
            pool,
        };
        let mut client = store
            .client()
            .await
            .map_err(|e| unreachable_database(&target, &e))?;
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
        let events = query(&tx, sql::ALL_EVENTS, &[], sql::stored_event).await?;
        let checkpoints = query(&tx, sql::CHECKPOINTS, &[], sql::checkpoint).await?;
        let database_id = database_id(&tx).await?;
        tx.commit().await?;
        Ok(AuditRecord {
            events,
            checkpoints,
            database_id,
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        pooled(&self.pool).await
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

/// Where a URL points, for messages: `user@host:port/database`, never a password.
fn target(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = config
                .get_ports()
                .get(i)
                .or(config.get_ports().first())
                .copied()
                .unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    format!(
        "{}@{}/{}",
        config.get_user().unwrap_or("(no user)"),
        hosts.join(","),
        config.get_dbname().unwrap_or("(default database)")
    )
}

/// The first connection's failure, with where it went and what to check.
fn unreachable_database(target: &str, e: &StoreError) -> StoreError {
    let text = match e {
        StoreError::Unavailable(text) | StoreError::Engine(text) => text.as_str(),
        other => return StoreError::Connect(format!("PostgreSQL at {target}: {other}")),
    };
    let hint = if text.contains("28P01") || text.contains("28000") {
        ": check the password in storage.password_file or storage.password_env, and the user \
         in storage.url"
    } else if text.contains("3D000") {
        ": create the database, or fix the name at the end of storage.url"
    } else if text.contains("password missing") {
        ": the server asks for a password; give it in storage.password_file (a file of mode \
         0600) or storage.password_env"
    } else if text.starts_with("error connecting") {
        ": is PostgreSQL running, and listening on that address? (storage.url)"
    } else if text.contains("does not support TLS") {
        ": the server offers no TLS; storage.url without sslmode means verify-full. Turn on \
         TLS in PostgreSQL, or, for a database on this machine only, add sslmode=disable"
    } else if text.contains("not valid for name") {
        ": the server's certificate does not name this host; connect by a name it holds, or \
         use sslmode=verify-ca (the CA is still checked)"
    } else if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        ": the server's certificate is not from a CA this vault trusts; put its CA in \
         storage.ca_file (sslmode=require encrypts without checking, as in libpq)"
    } else if text.contains("TLS") || text.contains("tls") {
        ": check sslmode in storage.url, and storage.ca_file for the server's CA"
    } else {
        ""
    };
    StoreError::Connect(format!("PostgreSQL at {target}: {text}{hint}"))
}

/// A connection from the pool. Its failures are the database's (sorted by
/// [`classify`]) or the pool's (no connection free in time, the pool
/// closed): unavailable, worth a retry.
async fn pooled(pool: &Pool) -> Result<deadpool_postgres::Object, StoreError> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(db) => classify(db),
        other => StoreError::Unavailable(other.to_string()),
    })
}

/// Sorts writes to several connections into the order every transaction of
/// this store locks connections' rows in: by workspace, then provider (see
/// batch.rs for the whole lock order). Two replicas then never hold one row
/// each while waiting for the other's.
fn in_lock_order<T>(writes: &mut [T], connection: impl Fn(&T) -> (&String, &String)) {
    writes.sort_by(|a, b| connection(a).cmp(&connection(b)));
}

/// Whether every host the URL names is a Unix socket.
fn on_unix_sockets(config: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    !config.get_hosts().is_empty()
        && config
            .get_hosts()
            .iter()
            .all(|host| matches!(host, Host::Unix(_)))
}

/// Whether every host the URL names is this machine (a Unix socket, or a loopback address).
fn on_loopback(config: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    config.get_hosts().iter().all(|host| match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    })
}

async fn migrate(client: &mut deadpool_postgres::Object) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    // Another replica's migration may take longer than a lock usually may.
    tx.batch_execute("SET LOCAL lock_timeout = 0").await?;
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

/// Sorts PostgreSQL's errors into the store's typed set, by SQLSTATE. The
/// words kept are the server's message and code, never its DETAIL (which
/// can quote a row).
fn classify(e: tokio_postgres::Error) -> StoreError {
    let Some(db) = e.as_db_error() else {
        // No SQLSTATE: the connection failed or closed, or a value did not
        // convert. The cause (connection refused, a TLS alert) is in the source.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text = format!("{text}: {cause_text}");
            }
            source = cause.source();
        }
        return if e.is_closed()
            || text.starts_with("error connecting")
            || text.contains("timed out")
        {
            StoreError::Unavailable(text)
        } else {
            StoreError::Engine(text)
        };
    };
    let code = db.code();
    let text = format!("{} (SQLSTATE {})", db.message(), code.code());
    let class = &code.code()[..2];
    if *code == SqlState::DATA_CORRUPTED || *code == SqlState::INDEX_CORRUPTED {
        StoreError::Corrupt("PostgreSQL reports corrupt data")
    } else if *code == SqlState::TOO_MANY_CONNECTIONS {
        StoreError::Unavailable(text)
    } else if class == "53" {
        // disk_full, out_of_memory, insufficient_resources
        StoreError::Full
    } else if [
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::LOCK_NOT_AVAILABLE,
        SqlState::QUERY_CANCELED,
    ]
    .contains(code)
    {
        StoreError::Busy(text)
    } else if class == "08" || class == "28" || class == "3D" || class == "57" {
        // connection, authorization, unknown database, operator intervention
        StoreError::Unavailable(text)
    } else if class == "23" {
        StoreError::Conflict(text)
    } else {
        StoreError::Engine(text)
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        classify(e)
    }
}

fn pg_values<'a>(values: &'a [Value<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

/// Runs a shared statement (prepared once per connection); returns the rows it changed.
async fn execute(
    c: &impl GenericClient,
    sql: &str,
    values: &[Value<'_>],
) -> Result<u64, StoreError> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.execute(&statement, &pg_values(values)).await?)
}

/// Runs a shared query and decodes every row.
async fn query<T>(
    c: &impl GenericClient,
    sql: &str,
    values: &[Value<'_>],
    decode: impl Fn(&dyn SqlRow) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let statement = c.prepare_cached(sql).await?;
    c.query(&statement, &pg_values(values))
        .await?
        .iter()
        .map(|row| decode(row))
        .collect()
}

/// The first row of a shared query, decoded.
async fn query_opt<T>(
    c: &impl GenericClient,
    sql: &str,
    values: &[Value<'_>],
    decode: impl Fn(&dyn SqlRow) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    Ok(query(c, sql, values, decode).await?.into_iter().next())
}

/// Connections with their secrets, from one statement (one snapshot).
async fn credentials(
    c: &impl GenericClient,
    sql: &str,
    values: &[Value<'_>],
) -> Result<Vec<CredentialRecord>, StoreError> {
    let statement = c.prepare_cached(sql).await?;
    let mut records = Vec::new();
    for row in c.query(&statement, &pg_values(values)).await? {
        sql::push_credential_row(&mut records, &row)?;
    }
    Ok(records)
}

/// An event's canonical text after its sequence number: the database puts
/// the sequence in front of it when it appends.
fn tail(mut event: Event) -> Result<String, StoreError> {
    const PREFIX: &str = "{\"sequence\":0";
    event.sequence = 0;
    event
        .canonical()
        .strip_prefix(PREFIX)
        .map(str::to_owned)
        .ok_or_else(|| {
            StoreError::Audit("an event's encoding does not start with its sequence".into())
        })
}

/// An event as the append function stored it. The database hashes exactly
/// the text it stores; the hash is checked here against [`chain_hash`].
fn appended(row: &Row, tail: &str) -> Result<StoredEvent, StoreError> {
    let sequence = sql::count(row.try_get(0)?)?;
    let bytes = |i| -> Result<[u8; 32], StoreError> {
        row.try_get::<_, Vec<u8>>(i)?
            .try_into()
            .map_err(|_| StoreError::Corrupt("an audit hash is not 32 bytes"))
    };
    let (previous_hash, hash) = (bytes(1)?, bytes(2)?);
    let canonical = format!("{{\"sequence\":{sequence}{tail}");
    if chain_hash(&previous_hash, &canonical) != hash {
        return Err(StoreError::Corrupt(
            "the database computed another audit hash",
        ));
    }
    Ok(StoredEvent {
        sequence,
        canonical,
        previous_hash,
        hash,
    })
}

/// Appends `event` to the chain in one statement (see the migration's
/// `credvault_append_audit`): inside `c`'s transaction, the head's row lock is
/// then held until that transaction ends.
async fn append_in(c: &impl GenericClient, event: Event) -> Result<StoredEvent, StoreError> {
    let append = async {
        let tail = tail(event)?;
        let row = c
            .query_one("SELECT * FROM credvault_append_audit($1)", &[&tail])
            .await?;
        appended(&row, &tail)
    };
    append.await.map_err(audit_failure)
}

async fn sealed_material(
    c: &impl GenericClient,
    purpose: &str,
) -> Result<Option<Sealed>, StoreError> {
    query_opt(c, sql::KEY_MATERIAL, &values![purpose], sql::key_material).await
}

async fn database_id(c: &impl GenericClient) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(query_opt(c, sql::DATABASE_ID, &[], sql::single_bytes)
        .await?
        .flatten())
}

async fn insert_key_material(
    c: &impl GenericClient,
    purpose: &str,
    sealed: &Sealed,
) -> Result<(), StoreError> {
    let now = millis(SystemTime::now());
    execute(
        c,
        sql::INSERT_KEY_MATERIAL,
        &sql::key_material_values(purpose, sealed, now),
    )
    .await
    .map(drop)
}

/// Counts `n` data keys wrapped under `version`, which must still be active
/// when this transaction takes the version's row lock (a Retire holds it
/// until it commits).
async fn count_encryptions(
    c: &impl GenericClient,
    version: u32,
    n: u64,
) -> Result<u64, StoreError> {
    let total = query_opt(
        c,
        sql::COUNT_ENCRYPTIONS,
        &values![n, version],
        sql::single_int,
    )
    .await?
    .flatten()
    .ok_or(StoreError::VersionRetired(version))?;
    sql::count(total)
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
            versions: query(&c, sql::ACTIVE_KEY_VERSIONS, &[], sql::wrapped_key_version).await?,
            fingerprint_key,
            fingerprint_purpose,
        }))
    }

    async fn init_keys(&self, material: NewKeyMaterial) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let now = millis(SystemTime::now());
        let v = &material.first_version;
        execute(
            &tx,
            sql::INSERT_KEY_VERSION,
            &sql::key_version_values(v, now),
        )
        .await
        .map_err(taken(v.version))?;
        insert_key_material(&tx, FINGERPRINT_KEY, &material.fingerprint_key).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn put(
        &self,
        record: CredentialRecord,
        event: Event,
    ) -> Result<(CredentialRecord, StoredEvent, u64), StoreError> {
        self.writer.put(record, event).await
    }

    async fn get(
        &self,
        workspace_id: &str,
        provider: &str,
    ) -> Result<Option<CredentialRecord>, StoreError> {
        let c = self.client().await?;
        Ok(
            credentials(&c, sql::CREDENTIAL, &values![workspace_id, provider])
                .await?
                .pop(),
        )
    }

    async fn list(&self, workspace_id: &str) -> Result<Vec<CredentialRecord>, StoreError> {
        let c = self.client().await?;
        credentials(&c, sql::WORKSPACE_CREDENTIALS, &values![workspace_id]).await
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
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // The row first, then the head: the lock order of every transaction.
        let values = sql::verdict_values(
            &verdict,
            workspace_id,
            provider,
            data_key,
            previous.as_ref(),
        );
        let changed = execute(&tx, sql::NOTE_VERDICT, &values).await?;
        if changed == 0 {
            return Ok(Noted::Stale);
        }
        let stored = match event {
            Some(event) => Some(append_in(&tx, event).await?),
            None => None,
        };
        tx.commit().await?;
        Ok(Noted::Recorded(stored))
    }

    async fn monitor_due(
        &self,
        settled_before: SystemTime,
        unsettled_before: SystemTime,
        stored_before: SystemTime,
    ) -> Result<Vec<Watched>, StoreError> {
        let c = self.client().await?;
        query(
            &c,
            sql::MONITOR_DUE,
            &values![
                millis(settled_before),
                millis(unsettled_before),
                millis(stored_before)
            ],
            sql::watched,
        )
        .await
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
        // The connection's row first, then its secrets: the order every
        // transaction locks them in (a batch of Stores too), so a Zero and
        // a Store of the same connection on two replicas cannot deadlock.
        let row = query_opt(
            &tx,
            sql::ZERO_CREDENTIAL,
            &values![millis(at), workspace_id, provider],
            sql::credential,
        )
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        execute(&tx, sql::DELETE_SECRETS, &values![workspace_id, provider]).await?;
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
        // Secrets are not needed to bind params: the data key is.
        let c = self.client().await?;
        query(&c, sql::CONNECTED_CREDENTIALS, &[], sql::credential).await
    }

    async fn bind_params(
        &self,
        mut bindings: Vec<ParamsBinding>,
        fingerprint_key: Sealed,
        event: Event,
    ) -> Result<StoredEvent, StoreError> {
        in_lock_order(&mut bindings, |b| (&b.workspace_id, &b.provider));
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        for b in &bindings {
            execute(
                &tx,
                sql::SET_BINDING,
                &values![&b.tag, &b.workspace_id, &b.provider, &b.wrapped_dek],
            )
            .await?;
        }
        // Another replica starting at the same moment may have done it first:
        // its tags are the same, and either sealing of the key opens.
        insert_key_material(&tx, FINGERPRINT_KEY, &fingerprint_key).await?;
        execute(
            &tx,
            sql::DELETE_KEY_MATERIAL,
            &values![LEGACY_FINGERPRINT_KEY],
        )
        .await?;
        let stored = append_in(&tx, event).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn expiring(&self, before: SystemTime) -> Result<Vec<Expiring>, StoreError> {
        let c = self.client().await?;
        query(&c, sql::EXPIRING, &values![millis(before)], sql::expiring).await
    }

    async fn note_expiry(
        &self,
        workspace_id: &str,
        provider: &str,
        notice: ExpiryNotice,
        event: Event,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // The row first, then the head: the lock order of every transaction.
        let noted = execute(
            &tx,
            sql::NOTE_EXPIRY,
            &values![
                millis(notice.expires_at),
                notice.within_seconds,
                workspace_id,
                provider
            ],
        )
        .await?;
        if noted == 0 {
            return Ok(None);
        }
        let stored = append_in(&tx, event).await?;
        tx.commit().await?;
        Ok(Some(stored))
    }

    /// Each batch's round trips already gather what arrives meanwhile: no
    /// write waits on purpose, awaited or not.
    fn queue_audit(&self, event: Event, _: Awaited) -> Result<Queued, StoreError> {
        self.writer.queue_append(event)
    }

    async fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let c = self.client().await?;
        query(
            &c,
            sql::EVENTS_AFTER,
            &values![after, limit],
            sql::stored_event,
        )
        .await
    }

    async fn audit_head(&self) -> Result<Option<StoredEvent>, StoreError> {
        let c = self.client().await?;
        query_opt(&c, sql::LAST_EVENT, &[], sql::stored_event).await
    }

    async fn add_checkpoint(&self, cp: Checkpoint) -> Result<(), StoreError> {
        let c = self.client().await?;
        execute(
            &c,
            sql::PUT_CHECKPOINT,
            &values![
                cp.sequence,
                &cp.hash,
                &cp.signature,
                &cp.key_id,
                cp.signed_at_ms
            ],
        )
        .await
        .map(drop)
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let c = self.client().await?;
        query(&c, sql::CHECKPOINTS, &[], sql::checkpoint).await
    }

    async fn database_id(&self) -> Result<Option<Vec<u8>>, StoreError> {
        database_id(&self.client().await?).await
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
        let stored = query_opt(
            &tx,
            concat!(
                "SELECT nonce, wrapped_key FROM key_material WHERE purpose = $1",
                " FOR SHARE"
            ),
            &values![witness.purpose],
            sql::key_material,
        )
        .await?;
        if !witness.holds(stored.as_ref()) {
            return Err(StoreError::RootChanged);
        }
        let now = millis(SystemTime::now());
        execute(
            &tx,
            sql::INSERT_KEY_VERSION,
            &sql::key_version_values(&v, now),
        )
        .await
        .map_err(taken(v.version))?;
        let stored = append_in(&tx, event).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn key_versions(&self) -> Result<Vec<KeyVersionRow>, StoreError> {
        let c = self.client().await?;
        query(&c, sql::KEY_VERSIONS, &[], sql::key_version_row).await
    }

    async fn stale_data_keys(
        &self,
        primary: u32,
        limit: usize,
    ) -> Result<Vec<StaleDataKey>, StoreError> {
        let c = self.client().await?;
        query(
            &c,
            sql::STALE_DATA_KEYS,
            &values![primary, limit],
            sql::stale_data_key,
        )
        .await
    }

    async fn rewrap(&self, mut batch: Vec<Rewrapped>, event: Event) -> Result<usize, StoreError> {
        in_lock_order(&mut batch, |r| (&r.workspace_id, &r.provider));
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let mut applied = 0u64;
        for r in &batch {
            applied += execute(&tx, sql::REWRAP, &sql::rewrap_values(r)).await?;
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
        let state = query_opt(
            &tx,
            concat!(
                "SELECT state FROM key_versions WHERE version = $1",
                " FOR UPDATE"
            ),
            &values![version],
            sql::single_text,
        )
        .await?
        .flatten();
        match state.as_deref() {
            None => return Ok((RetireOutcome::Unknown, Shred::Done)),
            Some("retired") => return Ok((RetireOutcome::AlreadyRetired, Shred::Done)),
            Some(_) => {}
        }
        let newest = query_opt(&tx, sql::NEWEST_KEY_VERSION, &[], sql::single_int)
            .await?
            .flatten();
        if newest == Some(i64::from(version)) {
            return Ok((RetireOutcome::Newest, Shred::Done));
        }
        let users = query_opt(
            &tx,
            sql::CREDENTIALS_OF_VERSION,
            &values![version],
            sql::single_int,
        )
        .await?
        .flatten()
        .unwrap_or(0);
        if users > 0 {
            return Ok((RetireOutcome::InUse(sql::count(users)?), Shred::Done));
        }
        execute(&tx, sql::RETIRE_KEY_VERSION, &values![&[][..], version]).await?;
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
        let versions = query(&tx, sql::ACTIVE_KEY_VERSIONS, &[], sql::wrapped_key_version).await?;
        let material = query(
            &tx,
            concat!(
                "SELECT purpose, nonce, wrapped_key FROM key_material",
                " FOR UPDATE"
            ),
            &[],
            sql::purpose_and_material,
        )
        .await?;
        let new = reseal(RootSealed { versions, material }).map_err(StoreError::Refused)?;
        for v in &new.versions {
            execute(
                &tx,
                sql::RESEAL_KEY_VERSION,
                &values![v.sealed.nonce.as_slice(), &v.sealed.ciphertext, v.version],
            )
            .await?;
        }
        for (purpose, sealed) in &new.material {
            execute(
                &tx,
                sql::RESEAL_KEY_MATERIAL,
                &values![sealed.nonce.as_slice(), &sealed.ciphertext, purpose],
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
