//! The audit log: typed events, hash-chained, with signed heads, and the check that finds a broken link.

pub mod anchor;
mod verify;

use std::collections::BTreeMap;

use ring::digest;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

pub use verify::{verify, verify_links, Broken, Checked, Log};

pub const HASH_LEN: usize = 32;
pub const GENESIS: [u8; HASH_LEN] = [0; HASH_LEN];
pub const OUTCOME_OK: &str = "OK";
/// The identity of the events the vault writes on its own (no caller's).
pub const VAULT_IDENTITY: &str = "credvault";
/// The outcome of the event a call that reaches a provider commits before it
/// sends anything; the call's own event, with its outcome, follows.
pub const OUTCOME_STARTED: &str = "STARTED";
/// Heads signed before heads named their database and time.
const HEAD_V1_PURPOSE: &[u8] = b"credvault/v1/audit-head";
const HEAD_V2_PURPOSE: &[u8] = b"credvault/v2/audit-head";
/// Bytes in a database identity.
pub const DATABASE_ID_LEN: usize = 16;

/// When a call's event must be durable, relative to its answer
/// (`audit.durability`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Every event is committed before its call is answered.
    #[default]
    EveryCall,
    /// An event of a call that changed nothing and used no plaintext is
    /// answered once queued in order, and committed by the next group commit
    /// (see `domain::audit_log::UNDURABLE_MAX`); every other event as
    /// `every-call`.
    Changes,
}

/// Who did what, as the gate saw it before the call ran.
#[derive(Debug, Clone)]
pub struct Context {
    pub identity: String,
    /// `Service.Method`.
    pub method: String,
    pub workspace_id: String,
    pub provider: String,
    pub request_id: String,
}

/// What a secret looks like in an event: its redaction, never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretSummary {
    pub hint: String,
    pub fingerprint: String,
}

/// One audit event. Built only from these typed fields, never from error
/// strings, request bodies or `Debug` output. Its JSON (fields in this order,
/// maps sorted) is the canonical encoding the hash chain covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub sequence: u64,
    pub time_ms: i64,
    pub identity: String,
    pub method: String,
    pub workspace_id: String,
    pub provider: String,
    pub outcome: String,
    pub verdict: String,
    pub key_version: u32,
    pub secrets: BTreeMap<String, SecretSummary>,
    pub request_id: String,
    /// For Proxy calls. Absent from every other event, so events written
    /// before Proxy existed keep their canonical encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<Proxied>,
    /// For refused calls summed into one event: how many it stands for.
    /// Absent from an event for one call, so older events keep their
    /// canonical encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// For the vault's own notice that a connection's credential expires
    /// soon, or has expired. Absent from every other event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<Expiry>,
    /// For the health monitor's notice that a connection's settled verdict
    /// changed (`verdict` is the new one). Absent from every other event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict_change: Option<VerdictChange>,
}

/// That a connection's settled verdict changed, as the health monitor's
/// notice states it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictChange {
    /// The settled verdict before; empty for a connection's first.
    pub previous: String,
    /// VALID again after a verdict that was not.
    pub recovered: bool,
}

/// A connection's expiry, as an expiry notice states it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expiry {
    /// The nearest threshold crossed: `30d`, `7d`, `1d`, or `expired`.
    pub within: String,
    /// When the stored credential expires, in ms since the Unix epoch.
    pub expires_at_ms: i64,
}

/// What a proxied call did: never a raw path, query or body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proxied {
    pub method: String,
    /// The allowlisted path template the call matched, e.g. `/api/3/cohorts`.
    pub route: String,
    /// The provider's HTTP status.
    pub status: u16,
    pub request_bytes: u64,
    /// As passed to the caller, after redaction and the size cap.
    pub response_bytes: u64,
    /// Occurrences of the connection's secrets replaced in the response.
    pub redactions: u32,
    pub answered_by_vault: bool,
}

/// What the call itself adds to its event.
#[derive(Debug, Clone, Default)]
pub struct Details {
    pub verdict: String,
    pub key_version: u32,
    pub secrets: BTreeMap<String, SecretSummary>,
    pub proxy: Option<Proxied>,
    pub expiry: Option<Expiry>,
    pub verdict_change: Option<VerdictChange>,
}

impl Event {
    /// An event for `context` with `outcome`; the store assigns the sequence.
    pub fn new(context: &Context, outcome: &str, details: Details) -> Self {
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Self {
            sequence: 0,
            time_ms,
            identity: context.identity.clone(),
            method: context.method.clone(),
            workspace_id: context.workspace_id.clone(),
            provider: context.provider.clone(),
            outcome: outcome.to_owned(),
            verdict: details.verdict,
            key_version: details.key_version,
            secrets: details.secrets,
            request_id: context.request_id.clone(),
            proxy: details.proxy,
            count: None,
            expiry: details.expiry,
            verdict_change: details.verdict_change,
        }
    }

    pub fn canonical(&self) -> String {
        // Strings, integers and string maps always serialize.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// An event as stored: its canonical text and its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub sequence: u64,
    pub canonical: String,
    pub previous_hash: [u8; HASH_LEN],
    pub hash: [u8; HASH_LEN],
}

impl StoredEvent {
    pub fn event(&self) -> Option<Event> {
        serde_json::from_str(&self.canonical).ok()
    }
}

/// `SHA-256(previous_hash || canonical)`.
pub fn chain_hash(previous: &[u8; HASH_LEN], canonical: &str) -> [u8; HASH_LEN] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(previous);
    ctx.update(canonical.as_bytes());
    let mut out = [0; HASH_LEN];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A signed statement that the log of one database held `sequence` events
/// ending in `hash`, at `signed_at_ms`. Stored in the database as a
/// checkpoint; kept outside it (a saved `audit head`, an anchor file, an
/// export's last line) it proves the history to whoever does not trust the
/// database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub sequence: u64,
    #[serde(with = "hex")]
    pub hash: Vec<u8>,
    #[serde(with = "hex")]
    pub signature: Vec<u8>,
    pub key_id: String,
    /// The database's identity, fixed when it was created. Empty only in
    /// heads signed before heads carried it (version 1).
    #[serde(default, with = "hex", skip_serializing_if = "Vec::is_empty")]
    pub database_id: Vec<u8>,
    /// When the head was signed; `None` only in version 1 heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_at_ms: Option<i64>,
}

impl Checkpoint {
    /// The bytes the signature covers. Version 2 (with a signing time):
    /// purpose || len(database_id) || database_id || signed_at_ms || sequence || hash,
    /// integers big-endian. Version 1: purpose || sequence || hash.
    fn message(&self) -> Vec<u8> {
        match self.signed_at_ms {
            Some(at) => [
                HEAD_V2_PURPOSE,
                &[u8::try_from(self.database_id.len()).unwrap_or(u8::MAX)],
                &self.database_id,
                &at.to_be_bytes(),
                &self.sequence.to_be_bytes(),
                &self.hash,
            ]
            .concat(),
            None => [HEAD_V1_PURPOSE, &self.sequence.to_be_bytes(), &self.hash].concat(),
        }
    }
}

/// A signed head with the public key that signed it: one line of JSON, the
/// form `audit head` prints, an export ends with, and an anchor file holds.
/// The key is the signer's claim; only a key the verifier already trusts
/// proves anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedHead {
    pub head: Checkpoint,
    #[serde(with = "hex")]
    pub public_key: Vec<u8>,
}

impl SignedHead {
    pub fn to_json(&self) -> String {
        // Strings, integers and hex strings always serialize.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The vault's Ed25519 audit key.
pub struct Signer {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.key_id())
    }
}

impl Signer {
    /// A new key, as PKCS#8 bytes to be sealed and stored.
    pub fn generate(rng: &ring::rand::SystemRandom) -> Option<zeroize::Zeroizing<Vec<u8>>> {
        Ed25519KeyPair::generate_pkcs8(rng)
            .ok()
            .map(|doc| zeroize::Zeroizing::new(doc.as_ref().to_vec()))
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Option<Self> {
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .ok()
            .map(|pair| Self { pair })
    }

    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    pub fn key_id(&self) -> String {
        key_id(self.public_key())
    }

    /// Signs that the log of `database_id` held `sequence` events ending in
    /// `hash`, now.
    pub fn sign_head(&self, database_id: &[u8], sequence: u64, hash: &[u8]) -> Checkpoint {
        let mut head = Checkpoint {
            sequence,
            hash: hash.to_vec(),
            signature: Vec::new(),
            key_id: self.key_id(),
            database_id: database_id.to_vec(),
            signed_at_ms: Some(crate::store::millis(std::time::SystemTime::now())),
        };
        head.signature = self.pair.sign(&head.message()).as_ref().to_vec();
        head
    }
}

/// The first 8 bytes of the public key's SHA-256, in hex.
pub fn key_id(public_key: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&digest::digest(&digest::SHA256, public_key).as_ref()[..8])
}

/// Whether `checkpoint` is signed by `public_key`.
pub fn signature_ok(public_key: &[u8], checkpoint: &Checkpoint) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(&checkpoint.message(), &checkpoint.signature)
        .is_ok()
}

/// Hex for byte fields in JSON.
pub mod hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&data_encoding::HEXLOWER.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_encoding_is_stable_and_sorted() {
        let ctx = Context {
            identity: "i".into(),
            method: "Credentials.Store".into(),
            workspace_id: "w".into(),
            provider: "amplitude".into(),
            request_id: "r".into(),
        };
        let mut details = Details::default();
        for f in ["z", "a"] {
            details.secrets.insert(
                f.into(),
                SecretSummary {
                    hint: "h…".into(),
                    fingerprint: "f".into(),
                },
            );
        }
        let mut e = Event::new(&ctx, OUTCOME_OK, details);
        e.time_ms = 5;
        let text = e.canonical();
        assert!(
            text.starts_with(r#"{"sequence":0,"time_ms":5,"identity":"i""#),
            "{text}"
        );
        assert!(text.find("\"a\"") < text.find("\"z\""));
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), e);
    }

    #[test]
    fn signatures_verify_only_for_their_head() {
        let rng = ring::rand::SystemRandom::new();
        let signer = Signer::from_pkcs8(&Signer::generate(&rng).unwrap()).unwrap();
        let cp = signer.sign_head(&[3; DATABASE_ID_LEN], 7, &[1; 32]);
        assert!(signature_ok(signer.public_key(), &cp));
        let mut other = cp.clone();
        other.sequence = 8;
        assert!(!signature_ok(signer.public_key(), &other));
        let mut elsewhere = cp.clone();
        elsewhere.database_id = vec![4; DATABASE_ID_LEN];
        assert!(!signature_ok(signer.public_key(), &elsewhere));
        let mut later = cp.clone();
        later.signed_at_ms = later.signed_at_ms.map(|t| t + 1);
        assert!(!signature_ok(signer.public_key(), &later));
        let mut as_v1 = cp.clone();
        as_v1.signed_at_ms = None;
        assert!(!signature_ok(signer.public_key(), &as_v1));
        let stranger = Signer::from_pkcs8(&Signer::generate(&rng).unwrap()).unwrap();
        assert!(!signature_ok(stranger.public_key(), &cp));
    }
}
