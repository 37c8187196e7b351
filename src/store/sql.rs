//! The SQL both engines run: each statement, each parameter list and each row
//! decoding written once.
//!
//! Statements use PostgreSQL's `$N` placeholders. SQLite reads `$N` as a named
//! parameter and numbers those in order of first appearance, so every shared
//! statement names its parameters for the first time in ascending order; a
//! test prepares each one on SQLite and checks that `$N` is parameter N.

use std::collections::BTreeMap;

use super::{
    time, CredentialRecord, KeyVersionRow, SecretRecord, StaleDataKey, StoreError, StoredStatus,
    WrappedDataKey,
};
use crate::audit::{Checkpoint, StoredEvent, HASH_LEN};
use crate::crypto::{Sealed, WrappedKeyVersion, NONCE_LEN};

/// The columns [`credential`] decodes, in its order.
macro_rules! credential_columns {
    () => {
        "workspace_id, provider, status, params, created_at, updated_at, disconnected_at, \
         expires_at, key_version, dek_nonce, wrapped_dek, last_validation, binding"
    };
    ($t:literal) => {
        concat!(
            $t,
            ".workspace_id, ",
            $t,
            ".provider, ",
            $t,
            ".status, ",
            $t,
            ".params, ",
            $t,
            ".created_at, ",
            $t,
            ".updated_at, ",
            $t,
            ".disconnected_at, ",
            $t,
            ".expires_at, ",
            $t,
            ".key_version, ",
            $t,
            ".dek_nonce, ",
            $t,
            ".wrapped_dek, ",
            $t,
            ".last_validation, ",
            $t,
            ".binding"
        )
    };
}

/// How many columns [`credential`] reads; a secret's columns follow them.
const CREDENTIAL_WIDTH: usize = 13;

macro_rules! statements {
    ($($(#[$doc:meta])* $name:ident = $sql:expr;)*) => {
        $($(#[$doc])* pub(super) const $name: &str = $sql;)*
        /// Every statement both engines run, for the tests that prepare them.
        #[cfg(test)]
        pub(super) const SHARED: &[(&str, &str)] = &[$((stringify!($name), $name)),*];
    };
}

statements! {
    /// A connection with its secrets, one row per secret (one row with NULL
    /// secret columns if it has none), in one statement: one snapshot on
    /// either engine, and one round trip.
    CREDENTIAL = concat!(
        "SELECT ", credential_columns!("c"),
        ", s.field, s.nonce, s.ciphertext, s.hint, s.fingerprint \
         FROM credentials c LEFT JOIN credential_secrets s \
           ON s.workspace_id = c.workspace_id AND s.provider = c.provider \
         WHERE c.workspace_id = $1 AND c.provider = $2 ORDER BY s.field"
    );
    /// A workspace's connections with their secrets, as [`CREDENTIAL`].
    WORKSPACE_CREDENTIALS = concat!(
        "SELECT ", credential_columns!("c"),
        ", s.field, s.nonce, s.ciphertext, s.hint, s.fingerprint \
         FROM credentials c LEFT JOIN credential_secrets s \
           ON s.workspace_id = c.workspace_id AND s.provider = c.provider \
         WHERE c.workspace_id = $1 ORDER BY c.provider, s.field"
    );
    /// Every connected credential, without its secrets.
    CONNECTED_CREDENTIALS = concat!(
        "SELECT ", credential_columns!("c"), " FROM credentials c WHERE c.status = 'connected'"
    );
    /// Inserts or replaces a connection, keeping its `created_at`; returns the row.
    /// Its columns are [`credential`]'s, in [`put_values`]' order (`created_at`
    /// and `updated_at` both take `$5`).
    PUT_CREDENTIAL = concat!(
        "INSERT INTO credentials (", credential_columns!(), ") \
         VALUES ($1, $2, $3, $4, $5, $5, NULL, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (workspace_id, provider) DO UPDATE SET \
             status = excluded.status, params = excluded.params, \
             updated_at = excluded.updated_at, disconnected_at = NULL, \
             expires_at = excluded.expires_at, key_version = excluded.key_version, \
             dek_nonce = excluded.dek_nonce, wrapped_dek = excluded.wrapped_dek, \
             last_validation = excluded.last_validation, binding = excluded.binding, \
             validated_at = NULL, validation_settled = NULL \
         RETURNING ", credential_columns!()
    );
    DELETE_SECRETS = "DELETE FROM credential_secrets WHERE workspace_id = $1 AND provider = $2";
    /// Marks a connection disconnected at `$1` (unless it already was) and
    /// drops its data key; returns the row.
    ZERO_CREDENTIAL = concat!(
        "UPDATE credentials SET \
             updated_at = CASE WHEN status = 'connected' THEN $1 ELSE updated_at END, \
             disconnected_at = COALESCE(disconnected_at, $1), status = 'disconnected', \
             expires_at = NULL, key_version = NULL, dek_nonce = NULL, wrapped_dek = NULL, \
             binding = NULL \
         WHERE workspace_id = $2 AND provider = $3 RETURNING ", credential_columns!()
    );
    /// Records a verdict reached at `$2` (`$3`: 1 if settled), unless the
    /// secrets changed since the data key `$6` was read, and only while the
    /// stored verdict is still `$7`: of two checks that ran at once only
    /// one records, and announces a change.
    NOTE_VERDICT = "UPDATE credentials \
         SET last_validation = $1, validated_at = $2, validation_settled = $3 \
         WHERE workspace_id = $4 AND provider = $5 AND wrapped_dek = $6 \
           AND last_validation IS NOT DISTINCT FROM $7";
    /// Connected connections the health monitor may find due: validated
    /// with a settled verdict at or before `$1`, with an unsettled one at or
    /// before `$2`, or never validated since stored at or before `$3`.
    MONITOR_DUE = "SELECT workspace_id, provider, updated_at, validated_at, \
         validation_settled, last_validation FROM credentials \
         WHERE status = 'connected' AND ( \
             (validation_settled = 1 AND validated_at <= $1) \
             OR (validation_settled = 0 AND validated_at <= $2) \
             OR (validated_at IS NULL AND updated_at <= $3)) \
         ORDER BY workspace_id, provider";
    /// Connected connections that expire at or before `$1`, with the expiry
    /// notice last written for each.
    EXPIRING = "SELECT workspace_id, provider, expires_at, expiry_notice_for, \
         expiry_notice_within FROM credentials \
         WHERE status = 'connected' AND expires_at <= $1 ORDER BY workspace_id, provider";
    /// Records the notice that the expiry `$1` is within `$2` seconds, unless
    /// the connection's expiry is no longer `$1`, or a notice for `$1` at
    /// `$2` or nearer was written already (by this replica or another).
    NOTE_EXPIRY = "UPDATE credentials SET expiry_notice_for = $1, expiry_notice_within = $2 \
         WHERE workspace_id = $3 AND provider = $4 AND status = 'connected' \
           AND expires_at = $1 \
           AND (expiry_notice_for IS NULL OR expiry_notice_for <> $1 \
                OR expiry_notice_within > $2)";
    SET_BINDING = "UPDATE credentials SET binding = $1 \
         WHERE workspace_id = $2 AND provider = $3 AND wrapped_dek = $4";
    /// Counts `$1` data keys wrapped under version `$2`, only while it is
    /// active; returns the version's count so far.
    COUNT_ENCRYPTIONS = "UPDATE key_versions SET encryptions = encryptions + $1 \
         WHERE version = $2 AND state = 'active' RETURNING encryptions";
    ACTIVE_KEY_VERSIONS = "SELECT version, nonce, wrapped_key FROM key_versions \
         WHERE state = 'active' ORDER BY version";
    INSERT_KEY_VERSION = "INSERT INTO key_versions (version, nonce, wrapped_key, created_at) \
         VALUES ($1, $2, $3, $4)";
    KEY_VERSIONS = "SELECT v.version, v.state, v.created_at, v.encryptions, \
             (SELECT count(*) FROM credentials c WHERE c.key_version = v.version) \
         FROM key_versions v ORDER BY v.version";
    /// Up to `$2` data keys wrapped under a version older than `$1`.
    STALE_DATA_KEYS = "SELECT workspace_id, provider, key_version, dek_nonce, wrapped_dek \
         FROM credentials WHERE key_version < $1 LIMIT $2";
    /// Moves a data key to another version, only if the row still holds the old one.
    REWRAP = "UPDATE credentials SET key_version = $1, dek_nonce = $2, wrapped_dek = $3 \
         WHERE workspace_id = $4 AND provider = $5 AND key_version = $6 AND wrapped_dek = $7";
    KEY_VERSION_STATE = "SELECT state FROM key_versions WHERE version = $1";
    NEWEST_KEY_VERSION = "SELECT max(version) FROM key_versions";
    CREDENTIALS_OF_VERSION = "SELECT count(*) FROM credentials WHERE key_version = $1";
    /// Destroys a version's material; `$1` is an empty byte string.
    RETIRE_KEY_VERSION = "UPDATE key_versions SET state = 'retired', nonce = $1, \
         wrapped_key = $1 WHERE version = $2";
    RESEAL_KEY_VERSION = "UPDATE key_versions SET nonce = $1, wrapped_key = $2 WHERE version = $3";
    KEY_MATERIAL = "SELECT nonce, wrapped_key FROM key_material WHERE purpose = $1";
    ALL_KEY_MATERIAL = "SELECT purpose, nonce, wrapped_key FROM key_material";
    /// Stores root-sealed material, unless some is there already (another
    /// replica made it first: read it back after).
    INSERT_KEY_MATERIAL = "INSERT INTO key_material (purpose, nonce, wrapped_key, created_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (purpose) DO NOTHING";
    DELETE_KEY_MATERIAL = "DELETE FROM key_material WHERE purpose = $1";
    RESEAL_KEY_MATERIAL = "UPDATE key_material SET nonce = $1, wrapped_key = $2 WHERE purpose = $3";
    EVENTS_AFTER = "SELECT sequence, event, previous_hash, hash FROM audit_events \
         WHERE sequence > $1 ORDER BY sequence LIMIT $2";
    ALL_EVENTS = "SELECT sequence, event, previous_hash, hash FROM audit_events ORDER BY sequence";
    LAST_EVENT = "SELECT sequence, event, previous_hash, hash FROM audit_events \
         ORDER BY sequence DESC LIMIT 1";
    PUT_CHECKPOINT = "INSERT INTO audit_checkpoints (sequence, hash, signature, key_id, signed_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sequence) DO UPDATE SET \
             hash = excluded.hash, signature = excluded.signature, key_id = excluded.key_id, \
             signed_at = excluded.signed_at";
    /// Checkpoints; the database identity only beside v2 (signed_at) ones.
    CHECKPOINTS = "SELECT c.sequence, c.hash, c.signature, c.key_id, c.signed_at, \
             CASE WHEN c.signed_at IS NULL THEN NULL \
                  ELSE (SELECT database_id FROM vault_identity) END \
         FROM audit_checkpoints c ORDER BY c.sequence";
    DATABASE_ID = "SELECT database_id FROM vault_identity";
}

/// Most secrets [`insert_secrets`] writes in one statement; a provider has far fewer.
pub(super) const SECRETS_PER_STATEMENT: usize = 8;

/// Inserts `n` (1 to [`SECRETS_PER_STATEMENT`]) secrets in one statement, with
/// [`secrets_values`]' parameters: one statement per Store, however many
/// fields its provider has.
pub(super) fn insert_secrets(n: usize) -> &'static str {
    static TEXTS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        (1..=SECRETS_PER_STATEMENT)
            .map(|n| {
                let rows: Vec<String> = (0..n)
                    .map(|row| {
                        let first = row * 7 + 1;
                        let params: Vec<String> =
                            (first..first + 7).map(|p| format!("${p}")).collect();
                        format!("({})", params.join(", "))
                    })
                    .collect();
                format!(
                    "INSERT INTO credential_secrets \
                     (workspace_id, provider, field, nonce, ciphertext, hint, fingerprint) \
                     VALUES {}",
                    rows.join(", ")
                )
            })
            .collect()
    });
    &TEXTS[n.clamp(1, SECRETS_PER_STATEMENT) - 1]
}

/// A parameter, typed as both engines bind it. Integers go to the column's
/// own width on PostgreSQL.
#[derive(Debug, Clone, Copy)]
pub(super) enum Value<'a> {
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
    Null,
}

impl From<u32> for Value<'_> {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}

impl From<u64> for Value<'_> {
    fn from(v: u64) -> Self {
        // Sequences and counts stay far below 2^63.
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<usize> for Value<'_> {
    fn from(v: usize) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(v)
    }
}

impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Value<'a> {
    fn from(v: &'a [u8]) -> Self {
        Value::Bytes(v)
    }
}

impl<'a> From<&'a Vec<u8>> for Value<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}

impl<'a, T: Into<Value<'a>>> From<Option<T>> for Value<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Builds a parameter list: `values![a, b, c]`.
macro_rules! values {
    ($($v:expr),* $(,)?) => { [$($crate::store::sql::Value::from($v)),*] };
}
pub(super) use values;

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            Value::Int(v) => ValueRef::Integer(v),
            Value::Text(v) => ValueRef::Text(v.as_bytes()),
            Value::Bytes(v) => ValueRef::Blob(v),
            Value::Null => ValueRef::Null,
        }))
    }
}

impl tokio_postgres::types::ToSql for Value<'_> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use tokio_postgres::types::{IsNull, Type};
        match *self {
            Value::Int(v) if *ty == Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
            Value::Int(v) if *ty == Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
            Value::Int(v) => v.to_sql(ty, out),
            Value::Text(v) => v.to_sql(ty, out),
            Value::Bytes(v) => v.to_sql(ty, out),
            Value::Null => Ok(IsNull::Yes),
        }
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        use tokio_postgres::types::Type;
        [
            Type::INT2,
            Type::INT4,
            Type::INT8,
            Type::TEXT,
            Type::VARCHAR,
            Type::BYTEA,
        ]
        .contains(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A row of either engine, read by column index.
pub(super) trait SqlRow {
    fn int(&self, i: usize) -> Result<Option<i64>, StoreError>;
    fn text(&self, i: usize) -> Result<Option<String>, StoreError>;
    fn bytes(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError>;
}

impl SqlRow for rusqlite::Row<'_> {
    fn int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.get(i)?)
    }
    fn text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.get(i)?)
    }
    fn bytes(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get(i)?)
    }
}

impl SqlRow for tokio_postgres::Row {
    fn int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        use tokio_postgres::types::Type;
        let ty = self
            .columns()
            .get(i)
            .map(|c| c.type_().clone())
            .ok_or(StoreError::Corrupt("a row has too few columns"))?;
        Ok(match ty {
            Type::INT2 => self.try_get::<_, Option<i16>>(i)?.map(i64::from),
            Type::INT4 => self.try_get::<_, Option<i32>>(i)?.map(i64::from),
            _ => self.try_get::<_, Option<i64>>(i)?,
        })
    }
    fn text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn bytes(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.try_get(i)?)
    }
}

const NULL: StoreError = StoreError::Corrupt("a required column is NULL");

fn int(row: &dyn SqlRow, i: usize) -> Result<i64, StoreError> {
    row.int(i)?.ok_or(NULL)
}

fn text(row: &dyn SqlRow, i: usize) -> Result<String, StoreError> {
    row.text(i)?.ok_or(NULL)
}

fn bytes(row: &dyn SqlRow, i: usize) -> Result<Vec<u8>, StoreError> {
    row.bytes(i)?.ok_or(NULL)
}

pub(super) fn version(v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt("a key version is out of range"))
}

pub(super) fn count(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt("a sequence or count is negative"))
}

/// A nonce and ciphertext read back from a row.
pub(super) fn sealed_from(nonce: Vec<u8>, ciphertext: Vec<u8>) -> Result<Sealed, StoreError> {
    Ok(Sealed {
        nonce: <[u8; NONCE_LEN]>::try_from(nonce)
            .map_err(|_| StoreError::Corrupt("nonce has the wrong length"))?,
        ciphertext,
    })
}

fn sealed(row: &dyn SqlRow, nonce: usize) -> Result<Sealed, StoreError> {
    sealed_from(bytes(row, nonce)?, bytes(row, nonce + 1)?)
}

fn hash(row: &dyn SqlRow, i: usize) -> Result<[u8; HASH_LEN], StoreError> {
    bytes(row, i)?
        .try_into()
        .map_err(|_| StoreError::Corrupt("an audit hash is not 32 bytes"))
}

pub(super) fn status_text(status: StoredStatus) -> &'static str {
    match status {
        StoredStatus::Connected => "connected",
        StoredStatus::Disconnected => "disconnected",
    }
}

/// A `credentials` row selected with `credential_columns!`, without its secrets.
pub(super) fn credential(row: &dyn SqlRow) -> Result<CredentialRecord, StoreError> {
    let status = match text(row, 2)?.as_str() {
        "connected" => StoredStatus::Connected,
        "disconnected" => StoredStatus::Disconnected,
        _ => return Err(StoreError::Corrupt("unknown status")),
    };
    let data_key = match (row.int(8)?, row.bytes(9)?, row.bytes(10)?) {
        (Some(v), Some(nonce), Some(ciphertext)) => Some(WrappedDataKey {
            key_version: version(v)?,
            sealed: sealed_from(nonce, ciphertext)?,
        }),
        (None, None, None) => None,
        _ => return Err(StoreError::Corrupt("partial data key")),
    };
    let params: BTreeMap<String, String> = serde_json::from_str(&text(row, 3)?)
        .map_err(|_| StoreError::Corrupt("params are not a JSON object of strings"))?;
    Ok(CredentialRecord {
        workspace_id: text(row, 0)?,
        provider: text(row, 1)?,
        params,
        status,
        created_at: time(int(row, 4)?),
        updated_at: time(int(row, 5)?),
        disconnected_at: row.int(6)?.map(time),
        expires_at: row.int(7)?.map(time),
        data_key,
        secrets: Vec::new(),
        last_validation: row.text(11)?,
        binding: row.bytes(12)?,
    })
}

/// A row of [`MONITOR_DUE`].
pub(super) fn watched(row: &dyn SqlRow) -> Result<super::Watched, StoreError> {
    Ok(super::Watched {
        workspace_id: text(row, 0)?,
        provider: text(row, 1)?,
        updated_at: time(int(row, 2)?),
        validated_at: row.int(3)?.map(time),
        settled: row.int(4)?.map(|s| s == 1),
        last_validation: row.text(5)?,
    })
}

/// A row of [`EXPIRING`].
pub(super) fn expiring(row: &dyn SqlRow) -> Result<super::Expiring, StoreError> {
    let notice = match (row.int(3)?, row.int(4)?) {
        (Some(expires_at), Some(within)) => Some(super::ExpiryNotice {
            expires_at: time(expires_at),
            within_seconds: within,
        }),
        _ => None,
    };
    Ok(super::Expiring {
        workspace_id: text(row, 0)?,
        provider: text(row, 1)?,
        expires_at: time(int(row, 2)?),
        notice,
    })
}

/// The secret columns after a credential's, or `None` where the join found none.
fn secret(row: &dyn SqlRow) -> Result<Option<SecretRecord>, StoreError> {
    let i = CREDENTIAL_WIDTH;
    let Some(field) = row.text(i)? else {
        return Ok(None);
    };
    Ok(Some(SecretRecord {
        field,
        sealed: sealed(row, i + 1)?,
        hint: text(row, i + 3)?,
        fingerprint: text(row, i + 4)?,
    }))
}

/// Adds a [`CREDENTIAL`] or [`WORKSPACE_CREDENTIALS`] row to `records`: a
/// new connection, or one more secret of the last one (a connection's rows
/// are adjacent).
pub(super) fn push_credential_row(
    records: &mut Vec<CredentialRecord>,
    row: &dyn SqlRow,
) -> Result<(), StoreError> {
    let (workspace_id, provider) = (text(row, 0)?, text(row, 1)?);
    let same = records
        .last()
        .is_some_and(|r| r.provider == provider && r.workspace_id == workspace_id);
    if !same {
        records.push(credential(row)?);
    }
    if let (Some(secret), Some(record)) = (secret(row)?, records.last_mut()) {
        record.secrets.push(secret);
    }
    Ok(())
}

/// A credential's parameters for [`PUT_CREDENTIAL`]; `params_json` its params as stored.
pub(super) fn put_values<'a>(r: &'a CredentialRecord, params_json: &'a str) -> [Value<'a>; 11] {
    let key = r.data_key.as_ref();
    values![
        &r.workspace_id,
        &r.provider,
        status_text(r.status),
        params_json,
        super::millis(r.updated_at),
        r.expires_at.map(super::millis),
        key.map(|k| k.key_version),
        key.map(|k| k.sealed.nonce.as_slice()),
        key.map(|k| k.sealed.ciphertext.as_slice()),
        r.last_validation.as_ref(),
        r.binding.as_ref(),
    ]
}

/// A credential's params as stored: JSON text.
pub(super) fn params_json(r: &CredentialRecord) -> Result<String, StoreError> {
    serde_json::to_string(&r.params).map_err(|_| StoreError::Corrupt("params do not serialize"))
}

/// Parameters for [`insert_secrets`]`(secrets.len())`.
pub(super) fn secrets_values<'a>(
    r: &'a CredentialRecord,
    secrets: &'a [SecretRecord],
) -> Vec<Value<'a>> {
    secrets
        .iter()
        .flat_map(|s| {
            values![
                &r.workspace_id,
                &r.provider,
                &s.field,
                s.sealed.nonce.as_slice(),
                &s.sealed.ciphertext,
                &s.hint,
                &s.fingerprint,
            ]
        })
        .collect()
}

/// The parameters of [`NOTE_VERDICT`].
pub(super) fn verdict_values<'a>(
    verdict: &'a super::VerdictRecord,
    workspace_id: &'a str,
    provider: &'a str,
    data_key: &'a super::WrappedDataKey,
    previous: Option<&'a String>,
) -> [Value<'a>; 7] {
    values![
        &verdict.json,
        super::millis(verdict.at),
        i64::from(verdict.settled),
        workspace_id,
        provider,
        &data_key.sealed.ciphertext,
        previous
    ]
}

/// A new key version's parameters for [`INSERT_KEY_VERSION`].
pub(super) fn key_version_values(v: &WrappedKeyVersion, created_at: i64) -> [Value<'_>; 4] {
    values![
        v.version,
        v.sealed.nonce.as_slice(),
        &v.sealed.ciphertext,
        created_at
    ]
}

/// Root-sealed key material's parameters for [`INSERT_KEY_MATERIAL`].
pub(super) fn key_material_values<'a>(
    purpose: &'a str,
    sealed: &'a Sealed,
    created_at: i64,
) -> [Value<'a>; 4] {
    values![
        purpose,
        sealed.nonce.as_slice(),
        &sealed.ciphertext,
        created_at
    ]
}

pub(super) fn rewrap_values(r: &super::Rewrapped) -> [Value<'_>; 7] {
    values![
        r.new.key_version,
        r.new.sealed.nonce.as_slice(),
        &r.new.sealed.ciphertext,
        &r.workspace_id,
        &r.provider,
        r.old.key_version,
        &r.old.sealed.ciphertext,
    ]
}

pub(super) fn stored_event(row: &dyn SqlRow) -> Result<StoredEvent, StoreError> {
    Ok(StoredEvent {
        sequence: count(int(row, 0)?)?,
        canonical: text(row, 1)?,
        previous_hash: hash(row, 2)?,
        hash: hash(row, 3)?,
    })
}

pub(super) fn checkpoint(row: &dyn SqlRow) -> Result<Checkpoint, StoreError> {
    Ok(Checkpoint {
        sequence: count(int(row, 0)?)?,
        hash: bytes(row, 1)?,
        signature: bytes(row, 2)?,
        key_id: text(row, 3)?,
        signed_at_ms: row.int(4)?,
        database_id: row.bytes(5)?.unwrap_or_default(),
    })
}

pub(super) fn key_version_row(row: &dyn SqlRow) -> Result<KeyVersionRow, StoreError> {
    Ok(KeyVersionRow {
        version: version(int(row, 0)?)?,
        retired: text(row, 1)? == "retired",
        created_at: time(int(row, 2)?),
        encryptions: count(int(row, 3)?)?,
        credentials: count(int(row, 4)?)?,
    })
}

pub(super) fn wrapped_key_version(row: &dyn SqlRow) -> Result<WrappedKeyVersion, StoreError> {
    Ok(WrappedKeyVersion {
        version: version(int(row, 0)?)?,
        sealed: sealed(row, 1)?,
    })
}

pub(super) fn stale_data_key(row: &dyn SqlRow) -> Result<StaleDataKey, StoreError> {
    Ok(StaleDataKey {
        workspace_id: text(row, 0)?,
        provider: text(row, 1)?,
        key: WrappedDataKey {
            key_version: version(int(row, 2)?)?,
            sealed: sealed(row, 3)?,
        },
    })
}

/// A [`KEY_MATERIAL`] row.
pub(super) fn key_material(row: &dyn SqlRow) -> Result<Sealed, StoreError> {
    sealed(row, 0)
}

/// An [`ALL_KEY_MATERIAL`] row.
pub(super) fn purpose_and_material(row: &dyn SqlRow) -> Result<(String, Sealed), StoreError> {
    Ok((text(row, 0)?, sealed(row, 1)?))
}

/// A single integer, as `count(*)`, `max(...)` and RETURNING give it.
pub(super) fn single_int(row: &dyn SqlRow) -> Result<Option<i64>, StoreError> {
    row.int(0)
}

pub(super) fn single_text(row: &dyn SqlRow) -> Result<Option<String>, StoreError> {
    row.text(0)
}

pub(super) fn single_bytes(row: &dyn SqlRow) -> Result<Option<Vec<u8>>, StoreError> {
    row.bytes(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite numbers `$N` by first appearance: every statement must name
    /// `$1`, `$2`, ... first in that order, or its parameters bind wrongly.
    #[test]
    fn every_shared_statement_binds_dollar_n_as_parameter_n_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::SqliteStore::open(&dir.path().join("v.db")).unwrap();
        let conn = rusqlite::Connection::open(store.path()).unwrap();
        let inserts = (1..=SECRETS_PER_STATEMENT).map(|n| ("insert_secrets", insert_secrets(n)));
        for (name, sql) in SHARED.iter().copied().chain(inserts) {
            let stmt = conn
                .prepare(sql)
                .unwrap_or_else(|e| panic!("{name} does not prepare on SQLite: {e}"));
            for i in 1..=stmt.parameter_count() {
                assert_eq!(
                    stmt.parameter_name(i),
                    Some(format!("${i}").as_str()),
                    "{name}: parameter {i} is not $${i}"
                );
            }
        }
    }

    #[test]
    fn a_statement_naming_parameters_out_of_order_is_caught() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let stmt = conn.prepare("SELECT $2, $1").unwrap();
        assert_eq!(stmt.parameter_name(1), Some("$2"));
    }
}
