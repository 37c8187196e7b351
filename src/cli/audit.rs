//! `credvault audit tail|export|head|verify`: follow the audit stream, save it and its signed
//! head, and check its chain.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::client::{status_error, Connect};
use crate::audit::{self, Checkpoint, Event, SecretSummary, SignedHead, StoredEvent, HASH_LEN};
use crate::config::Config;
use crate::proto::audit_client::AuditClient;
use crate::proto::{self, HeadRequest, SubscribeRequest};

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Print audit events as JSON lines, then follow new ones (for log shippers).
    Tail {
        #[command(flatten)]
        connect: Connect,
        /// The first sequence to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
    /// Write every event up to the current head, then the signed head, as JSON lines.
    Export {
        #[command(flatten)]
        connect: Connect,
        /// The file to write (JSON lines; replaced if it exists).
        #[arg(long)]
        to: PathBuf,
    },
    /// Print the current signed head (sequence, hash, database identity, time)
    /// as one JSON line. Keep these outside the vault: `audit verify --head`
    /// later proves the log still reaches each one.
    Head {
        #[command(flatten)]
        connect: Connect,
        /// Refuse a head not signed by this audit public key (hex).
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// Check the hash chain, the signed checkpoints and any saved heads; exit
    /// 1 naming the first broken link, or when signatures could not be checked
    /// against a key you trust.
    Verify {
        /// Check the database this configuration names (the vault may be
        /// stopped), and its `audit.anchor_file` when it has one.
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        config: Option<PathBuf>,
        /// Check an export written by `credvault audit export`.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The vault's audit public key (hex). For --config, by default the
        /// configuration's `audit.public_key_file`. Required for --file: the
        /// key inside an export is whatever its writer chose.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// A head saved from `credvault audit head`, or an anchor file
        /// (repeatable): the log must reach each one with the same hash,
        /// under the same database identity.
        #[arg(long)]
        head: Vec<PathBuf>,
    },
}

/// One line of `tail` and `export` output.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    Event {
        event: Box<Event>,
        #[serde(with = "audit::hex")]
        previous_hash: Vec<u8>,
        #[serde(with = "audit::hex")]
        hash: Vec<u8>,
    },
    Head(SignedHead),
}

pub async fn run(command: AuditCommand) -> Result<(), String> {
    match command {
        AuditCommand::Tail { connect, from } => tail(connect, from).await,
        AuditCommand::Export { connect, to } => export(connect, &to).await,
        AuditCommand::Head {
            connect,
            public_key,
        } => print_head(connect, public_key.as_deref()).await,
        AuditCommand::Verify {
            config,
            file,
            public_key,
            head,
        } => {
            let trusted = public_key.as_deref().map(read_public_key).transpose()?;
            let saved = read_heads(&head)?;
            match (config, file) {
                (Some(config), _) => verify_database(&config, trusted, saved).await,
                (None, Some(file)) => verify_export(&file, trusted, saved),
                // clap requires one of them.
                (None, None) => Err("audit verify needs --config FILE or --file EXPORT".into()),
            }
        }
    }
}

async fn client(connect: &Connect) -> Result<AuditClient<tonic::transport::Channel>, String> {
    connect.channel("auditor").await.map(AuditClient::new)
}

async fn tail(connect: Connect, from: u64) -> Result<(), String> {
    let mut client = client(&connect).await?;
    let mut stream = client
        .subscribe(SubscribeRequest {
            after_sequence: from.saturating_sub(1),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(event) = stream.message().await.map_err(status_error)? {
        writeln!(out, "{}", to_line(&event)).map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn signed_head(
    client: &mut AuditClient<tonic::transport::Channel>,
) -> Result<SignedHead, String> {
    let head = client
        .head(HeadRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(SignedHead {
        head: Checkpoint {
            sequence: head.sequence,
            hash: head.hash,
            signature: head.signature,
            key_id: head.public_key_id,
            database_id: head.database_id,
            signed_at_ms: (head.signed_at_ms != 0).then_some(head.signed_at_ms),
        },
        public_key: head.public_key,
    })
}

async fn print_head(connect: Connect, public_key: Option<&Path>) -> Result<(), String> {
    let mut client = client(&connect).await?;
    let signed = signed_head(&mut client).await?;
    if let Some(path) = public_key {
        if !audit::signature_ok(&read_public_key(path)?, &signed.head) {
            return Err(format!(
                "the vault's head is not signed by the key in {}: not printed",
                path.display()
            ));
        }
    }
    println!("{}", signed.to_json());
    Ok(())
}

async fn export(connect: Connect, to: &Path) -> Result<(), String> {
    let mut client = client(&connect).await?;
    // The head first: every event up to it is then already in the log.
    let signed = signed_head(&mut client).await?;
    let last = signed.head.sequence;
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(to).map_err(|e| format!("{}: {e}", to.display()))?,
    );
    let write_err = |e: std::io::Error| format!("{}: {e}", to.display());
    if last > 0 {
        let mut stream = client
            .subscribe(SubscribeRequest { after_sequence: 0 })
            .await
            .map_err(status_error)?
            .into_inner();
        while let Some(event) = stream.message().await.map_err(status_error)? {
            if event.sequence > last {
                break;
            }
            writeln!(file, "{}", to_line(&event)).map_err(write_err)?;
            if event.sequence == last {
                break;
            }
        }
    }
    // Last: an export without it, or with lines after it, does not verify.
    writeln!(file, "{}", signed.to_json()).map_err(write_err)?;
    file.flush().map_err(write_err)?;
    eprintln!(
        "exported events 1..{last} and the signed head to {}",
        to.display()
    );
    Ok(())
}

fn json(line: &Line) -> String {
    // Strings, numbers and maps of strings always serialize.
    serde_json::to_string(line).unwrap_or_default()
}

fn to_line(e: &proto::AuditEvent) -> String {
    json(&Line::Event {
        event: Box::new(event_from_proto(e)),
        previous_hash: e.previous_hash.clone(),
        hash: e.hash.clone(),
    })
}

/// The event exactly as the vault hashed it.
fn event_from_proto(e: &proto::AuditEvent) -> Event {
    let time_ms = e.time.as_ref().map_or(0, timestamp_millis);
    Event {
        sequence: e.sequence,
        time_ms,
        identity: e.identity.clone(),
        method: e.method.clone(),
        workspace_id: e.workspace_id.clone(),
        provider: e.provider.clone(),
        outcome: e.outcome.clone(),
        verdict: e.verdict.clone(),
        key_version: e.key_version,
        secrets: e
            .secrets
            .iter()
            .map(|(field, r)| {
                let summary = SecretSummary {
                    hint: r.hint.clone(),
                    fingerprint: r.fingerprint.clone(),
                };
                (field.clone(), summary)
            })
            .collect::<BTreeMap<_, _>>(),
        request_id: e.request_id.clone(),
        proxy: e.proxy.as_ref().map(|p| audit::Proxied {
            method: p.method.clone(),
            route: p.route.clone(),
            // Written from a u16, so it fits unless forged; a forged value fails the chain.
            status: u16::try_from(p.status).unwrap_or(u16::MAX),
            request_bytes: p.request_bytes,
            response_bytes: p.response_bytes,
            redactions: p.redactions,
            answered_by_vault: p.answered_by_vault,
        }),
        count: (e.count != 0).then_some(e.count),
        expiry: e.expiry.as_ref().map(|x| audit::Expiry {
            within: x.within.clone(),
            expires_at_ms: x.expires_at.as_ref().map_or(0, timestamp_millis),
        }),
        verdict_change: e.verdict_change.as_ref().map(|c| audit::VerdictChange {
            previous: c.previous.clone(),
            recovered: c.recovered,
        }),
    }
}

/// A timestamp as the vault wrote it: milliseconds since the epoch.
fn timestamp_millis(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

fn read_public_key(path: &Path) -> Result<Vec<u8>, String> {
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut crate::hardening::open_public("audit public key file", path)
            .map_err(|e| e.to_string())?,
        &mut text,
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    data_encoding::HEXLOWER_PERMISSIVE
        .decode(text.trim().as_bytes())
        .map_err(|_| format!("{} is not a hex public key", path.display()))
}

fn hash(bytes: &[u8], line: usize) -> Result<[u8; HASH_LEN], String> {
    bytes
        .try_into()
        .map_err(|_| format!("line {line}: a hash is not {HASH_LEN} bytes"))
}

fn read_heads(paths: &[PathBuf]) -> Result<Vec<Checkpoint>, String> {
    let mut heads = Vec::new();
    for path in paths {
        heads.extend(audit::anchor::read(path)?.into_iter().map(|h| h.head));
    }
    Ok(heads)
}

/// What `audit verify` cannot see without a head kept outside the database.
const WITHOUT_ANCHOR: &str = "note: no head kept outside the database was checked (--head, \
    audit.anchor_file): events deleted from the end together with their checkpoints, or an \
    older copy of the database, would still verify";

async fn verify_database(
    path: &Path,
    trusted: Option<Vec<u8>>,
    mut saved: Vec<Checkpoint>,
) -> Result<(), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    // The heads first, then the database: a vault that keeps running only
    // adds to the log after every head read here.
    if let Some(anchor) = &config.audit.anchor_file {
        saved.extend(read_heads(std::slice::from_ref(anchor))?);
    }
    let record = crate::store::read_audit_log_of(&config.storage)
        .await
        .map_err(|e| e.to_string())?;
    let key = match (trusted, &config.audit.public_key_file) {
        (Some(k), _) => Some(k),
        (None, Some(p)) => Some(read_public_key(p)?),
        (None, None) => None,
    };
    let log = audit::Log {
        events: &record.events,
        checkpoints: &record.checkpoints,
        anchors: &saved,
        database_id: record.database_id.as_deref(),
    };
    let source = crate::store::describe(&config.storage);
    let checked = audit::verify(&log, key.as_deref())
        .map_err(|broken| format!("audit log BROKEN: {broken} ({source})"))?;
    if key.is_none() {
        return Err(format!(
            "audit log NOT VERIFIED: the chain holds, but no audit public key was given, so no \
             signature was checked ({source}). Set audit.public_key_file (the vault writes it \
             at start-up) or pass --public-key"
        ));
    }
    report(&checked, &source);
    Ok(())
}

fn verify_export(
    path: &Path,
    trusted: Option<Vec<u8>>,
    saved: Vec<Checkpoint>,
) -> Result<(), String> {
    let source = path.display().to_string();
    let (events, last) =
        read_export(path).map_err(|why| format!("audit log BROKEN: {why} ({source})"))?;
    let key = trusted.as_deref().unwrap_or(&last.public_key);
    let log = audit::Log {
        events: &events,
        checkpoints: std::slice::from_ref(&last.head),
        anchors: &saved,
        database_id: (!last.head.database_id.is_empty()).then_some(&last.head.database_id),
    };
    let checked = audit::verify(&log, Some(key))
        .map_err(|broken| format!("audit log BROKEN: {broken} ({source})"))?;
    if trusted.is_none() {
        return Err(format!(
            "audit log NOT VERIFIED: the chain and its signed head agree, but only with the \
             public key written inside the export (key id {}), which whoever wrote the file \
             chose: a rewritten history signed with a new key looks the same ({source}). Pass \
             --public-key with the vault's audit public key (audit.public_key_file)",
            audit::key_id(&last.public_key)
        ));
    }
    report(&checked, &source);
    println!(
        "the export ends at the head signed at {} (Unix ms), key id {}: an export cut at an \
         older head verifies too; compare it with a head you saved",
        last.head
            .signed_at_ms
            .map_or_else(|| "an unknown time".to_owned(), |t| t.to_string()),
        last.head.key_id
    );
    Ok(())
}

fn report(checked: &audit::Checked, source: &str) {
    println!(
        "audit log intact: {} events (1..{}), {} signed checkpoints, {} heads kept outside \
         the database ({source})",
        checked.events, checked.last, checked.checkpoints, checked.anchors
    );
    if checked.anchors == 0 {
        eprintln!("{WITHOUT_ANCHOR}");
    }
}

/// An export's events, and the signed head it must end with, at its last event.
fn read_export(path: &Path) -> Result<(Vec<StoredEvent>, SignedHead), String> {
    let file = crate::hardening::open_public("audit export", path).map_err(|e| e.to_string())?;
    let mut events = Vec::new();
    let mut head: Option<SignedHead> = None;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        if head.is_some() {
            return Err(format!("line {}: a line follows the signed head", i + 1));
        }
        let parsed: Line = serde_json::from_str(&line)
            .map_err(|_| format!("line {}: not an audit export line", i + 1))?;
        match parsed {
            Line::Event {
                event,
                previous_hash,
                hash: h,
            } => events.push(StoredEvent {
                sequence: event.sequence,
                canonical: event.canonical(),
                previous_hash: hash(&previous_hash, i + 1)?,
                hash: hash(&h, i + 1)?,
            }),
            Line::Head(signed) => head = Some(signed),
        }
    }
    let head = head.ok_or(
        "the export does not end with its signed head: it was cut short, or the head was removed",
    )?;
    let last = events.last().map_or(0, |e| e.sequence);
    if head.head.sequence != last {
        return Err(format!(
            "the export's signed head is at event {}, but its events end at {last}",
            head.head.sequence
        ));
    }
    Ok((events, head))
}
