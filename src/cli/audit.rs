//! `credvault audit tail|export|verify`: follow the audit stream, save it, and check its chain.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::client::{status_error, Connect};
use crate::audit::{self, Checkpoint, Event, SecretSummary, StoredEvent, HASH_LEN};
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
        #[arg(long)]
        to: PathBuf,
    },
    /// Check the hash chain and the signed checkpoints; exit 1 naming the first broken link.
    Verify {
        /// Check the database this configuration names (the vault may be stopped).
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        config: Option<PathBuf>,
        /// Check an export written by `credvault audit export`.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The vault's audit public key (hex); by default the configuration's
        /// `audit.public_key_file`, or for --file the key inside the export.
        #[arg(long)]
        public_key: Option<PathBuf>,
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
    Head {
        head: Checkpoint,
        #[serde(with = "audit::hex")]
        public_key: Vec<u8>,
    },
}

pub async fn run(command: AuditCommand) -> Result<(), String> {
    match command {
        AuditCommand::Tail { connect, from } => tail(connect, from).await,
        AuditCommand::Export { connect, to } => export(connect, &to).await,
        AuditCommand::Verify {
            config,
            file,
            public_key,
        } => verify(config.as_deref(), file.as_deref(), public_key.as_deref()).await,
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

async fn export(connect: Connect, to: &Path) -> Result<(), String> {
    let mut client = client(&connect).await?;
    // The head first: every event up to it is then already in the log.
    let head = client
        .head(HeadRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(to).map_err(|e| format!("{}: {e}", to.display()))?,
    );
    let write_err = |e: std::io::Error| format!("{}: {e}", to.display());
    if head.sequence > 0 {
        let mut stream = client
            .subscribe(SubscribeRequest { after_sequence: 0 })
            .await
            .map_err(status_error)?
            .into_inner();
        while let Some(event) = stream.message().await.map_err(status_error)? {
            if event.sequence > head.sequence {
                break;
            }
            writeln!(file, "{}", to_line(&event)).map_err(write_err)?;
            if event.sequence == head.sequence {
                break;
            }
        }
        let line = Line::Head {
            head: Checkpoint {
                sequence: head.sequence,
                hash: head.hash,
                signature: head.signature,
                key_id: head.public_key_id,
            },
            public_key: head.public_key,
        };
        writeln!(file, "{}", json(&line)).map_err(write_err)?;
    }
    file.flush().map_err(write_err)?;
    eprintln!("exported events 1..{} to {}", head.sequence, to.display());
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
    let time_ms = e
        .time
        .as_ref()
        .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
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
    }
}

fn read_public_key(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    data_encoding::HEXLOWER_PERMISSIVE
        .decode(text.trim().as_bytes())
        .map_err(|_| format!("{} is not a hex public key", path.display()))
}

fn hash(bytes: &[u8], line: usize) -> Result<[u8; HASH_LEN], String> {
    bytes
        .try_into()
        .map_err(|_| format!("line {line}: a hash is not {HASH_LEN} bytes"))
}

async fn verify(
    config: Option<&Path>,
    file: Option<&Path>,
    public_key: Option<&Path>,
) -> Result<(), String> {
    let pinned = public_key.map(read_public_key).transpose()?;
    let (events, checkpoints, key, source) = if let Some(path) = config {
        let config = Config::load(path).map_err(|e| e.to_string())?;
        let (events, checkpoints) = crate::store::read_audit_log_of(&config.storage)
            .await
            .map_err(|e| e.to_string())?;
        let key = match (pinned, &config.audit.public_key_file) {
            (Some(k), _) => Some(k),
            (None, Some(p)) => Some(read_public_key(p)?),
            (None, None) => None,
        };
        (
            events,
            checkpoints,
            key,
            crate::store::describe(&config.storage),
        )
    } else {
        // clap requires --config or --file.
        let path = file.ok_or("audit verify needs --config FILE or --file EXPORT")?;
        let (events, head) = read_export(path)?;
        let key = pinned.or(head.as_ref().map(|(_, k)| k.clone()));
        (
            events,
            head.into_iter().map(|(h, _)| h).collect(),
            key,
            path.display().to_string(),
        )
    };
    if key.is_none() {
        eprintln!("no audit public key: checkpoint signatures are not checked");
    }
    match audit::verify(&events, &checkpoints, key.as_deref()) {
        Ok(checked) => {
            println!(
                "audit log intact: {} events ({}..{}), {} signed checkpoints ({source})",
                checked.events, checked.first, checked.last, checked.checkpoints
            );
            Ok(())
        }
        Err(broken) => Err(format!("audit log BROKEN: {broken} ({source})")),
    }
}

type Head = (Checkpoint, Vec<u8>);

fn read_export(path: &Path) -> Result<(Vec<StoredEvent>, Option<Head>), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut events = Vec::new();
    let mut head = None;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
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
            Line::Head {
                head: h,
                public_key,
            } => head = Some((h, public_key)),
        }
    }
    Ok((events, head))
}
