//! Start-up and shutdown: load keys and TLS material, open storage, serve until told to stop.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{AuditConfig, Backend, Config};
use crate::crypto::{RootKey, RootKeyError};
use crate::domain::clock::Clock;
use crate::domain::{Vault, VaultError};
use crate::edge::tls::{SharedTls, TlsError};
use crate::edge::{self};
use crate::outbound::{Outbound, OutboundError};
use crate::policy::{Policy, SharedPolicy};
use crate::store::StoreError;
use crate::telemetry::{self, Metrics};

/// Why the vault did not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error(transparent)]
    RootKey(#[from] RootKeyError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Outbound(#[from] OutboundError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error(
        "the database {0} is corrupt or was altered: its key material cannot be read. \
         `credvault check-config` shows what fails; restore the database from a backup"
    )]
    Corrupt(PathBuf),
    #[error("keyring: {0}")]
    Keyring(#[from] VaultError),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    File(#[from] crate::hardening::FileError),
    #[error("cannot listen for metrics: {0}")]
    Metrics(std::io::Error),
    #[error("policy: {0}")]
    Policy(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error(
        "the audit log in the database does not reach the last head in audit.anchor_file {path} \
         (event {sequence}): {why}. `credvault audit verify --config` names what is wrong. To \
         serve a restored backup on purpose, move the anchor file aside first"
    )]
    BehindAnchor {
        path: PathBuf,
        sequence: u64,
        why: String,
    },
    #[error("audit.anchor_file: {0}")]
    Anchor(String),
}

/// Runs the vault on `listener` until `shutdown` resolves, then lets in-flight
/// calls finish within the configured grace period.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_with_clock(config, listener, shutdown, Clock::system()).await
}

/// As [`run`], judging credentials' expiry by `clock` (which tests move).
pub async fn run_with_clock(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    clock: Clock,
) -> Result<(), ServeError> {
    crate::hardening::disable_core_dumps();
    // A token that hangs would hold start-up silently, the port bound.
    let watchdog = config
        .keys
        .pkcs11
        .as_ref()
        .map(|_| StartupWatchdog::arm(TOKEN_STARTUP_WAIT));
    let root = RootKey::load(config.keys.root_source().map_err(ServeError::Config)?)?;
    let tls = SharedTls::load(&config.tls)?;
    let store = crate::store::open(&config.storage).await?;
    // Held until `run` returns: `keys rotate-root` and `bind-params` refuse
    // to run while any vault serves the database.
    let _serving = store.hold(crate::store::Hold::Serving).await?;
    let policy = SharedPolicy::new(Policy::compile(&config.policy).map_err(ServeError::Policy)?);
    if policy.current().is_empty() {
        tracing::warn!("the configuration has no [[policy]] rules: every call will be denied");
    }
    let outbound = Outbound::new(&config.outbound)?;
    let vault = Vault::open(store, root, outbound, &config.providers, &config.keys)
        .await
        .map_err(|e| match e {
            VaultError::DataLoss => ServeError::Corrupt(config.storage.path.clone()),
            other => ServeError::Keyring(other),
        })?;
    drop(watchdog);
    // Only now, with the root key and the database's password read: a secret
    // written where a variable's name belongs stops start-up before this.
    tracing::info!(
        config = %config.source.as_deref().map_or_else(|| "-".into(), |p| p.display().to_string()),
        "configuration:\n{}",
        config.to_toml_for_log()
    );
    let mut vault = vault;
    vault.set_audit_durability(config.audit.durability);
    vault.set_clock(clock);
    let vault = Arc::new(vault);
    if let Some(path) = &config.audit.public_key_file {
        let hex = data_encoding::HEXLOWER.encode(vault.audit().public_key());
        crate::hardening::write_public(
            "audit.public_key_file",
            path,
            format!("{hex}\n").as_bytes(),
        )?;
    }
    if let Some(path) = &config.audit.anchor_file {
        check_anchor(&vault, path).await?;
    }
    let metrics = Arc::new(Metrics::new());
    let metrics_listener = telemetry::bind(config.metrics.listen)
        .await
        .map_err(ServeError::Metrics)?;

    // Background work, stopped when `run` returns.
    let mut tasks = vec![
        tokio::spawn(checkpoints(Arc::clone(&vault), config.audit.clone())),
        tokio::spawn(crate::domain::rotation::run(Arc::clone(&vault))),
        tokio::spawn(crate::domain::expiry::run(Arc::clone(&vault))),
        tokio::spawn(watch_tls_files(
            tls.clone(),
            Duration::from_millis(config.tls.reload_poll_ms.max(100)),
        )),
    ];
    if let Some(every) = config.monitor.revalidate_every {
        tasks.push(tokio::spawn(crate::domain::monitor::run(
            Arc::clone(&vault),
            every,
        )));
    }
    if let Some(path) = config.source.clone() {
        tasks.extend(watch_sighup(path, policy.clone(), tls.clone()));
    }
    if config.storage.backend == Backend::Postgres {
        tasks.push(tokio::spawn(follow_other_replicas(Arc::clone(&vault))));
    }
    if let Some(listener) = metrics_listener {
        tracing::info!(listen = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), "metrics on /metrics");
        tasks.push(tokio::spawn(telemetry::serve(
            listener,
            Arc::clone(&metrics),
            Arc::clone(&vault),
        )));
    }
    // Storage is open and the keys unwrapped: only now is the vault SERVING.
    let health = tonic_health::server::HealthReporter::new();
    for service in edge::SERVICES {
        health
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }
    tasks.push(tokio::spawn(watch_root_key(
        Arc::clone(&vault),
        health.clone(),
    )));
    let tasks = AbortOnDrop(tasks);
    tracing::info!(
        listen = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
        key_version = vault.primary_key_version(),
        "credvault serving"
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
    let last_checkpoint = Arc::clone(&vault);
    let edge = edge::Edge {
        vault,
        policy,
        tls,
        limits: config.limits.clone(),
        metrics,
        health: health.clone(),
        stopping: stopping_rx,
    };
    let serve = edge::serve(edge, listener, async {
        let _ = stop_rx.await;
    });
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => return Ok(result?),
        () = shutdown => {}
    }
    tracing::info!("shutting down: NOT_SERVING, no new calls; finishing in-flight calls");
    for service in std::iter::once("").chain(edge::SERVICES) {
        health
            .set_service_status(service, tonic_health::ServingStatus::NotServing)
            .await;
    }
    // Let health watchers see NOT_SERVING before connections close.
    tokio::time::sleep(Duration::from_millis(config.limits.shutdown_drain_ms)).await;
    let _ = stop_tx.send(());
    let _ = stopping.send(true);
    let grace = Duration::from_millis(config.limits.shutdown_grace_ms);
    let result = match tokio::time::timeout(grace, serve).await {
        Ok(result) => result.map_err(ServeError::from),
        Err(_) => {
            // Long-lived streams (a health Watch, say) end here; the vault still stops cleanly.
            tracing::warn!(
                ?grace,
                "calls still open after the grace period were cut off"
            );
            Ok(())
        }
    };
    drop(tasks);
    // Every event answered before it was durable, committed...
    last_checkpoint.audit().settle().await;
    // ...then the head as the vault leaves it, signed, stored and anchored.
    checkpoint(&last_checkpoint, 0, config.audit.anchor_file.as_deref()).await;
    result
}

/// How long start-up may wait on the root key's token (logging in, opening
/// the sealed keys) before the vault gives up.
const TOKEN_STARTUP_WAIT: Duration = Duration::from_secs(30);

/// Ends the process if start-up is not done within its limit: a call into
/// a token that hangs cannot be interrupted, and a vault that neither serves
/// nor says why is worse than one that exits naming the cause. Disarmed
/// when dropped.
struct StartupWatchdog(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

impl StartupWatchdog {
    fn arm(limit: Duration) -> Self {
        let (armed, watch) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watch.recv_timeout(limit) {
                let why = format!(
                    "start-up did not finish within {} s: the root key's hardware security \
                     module (logging in, opening the sealed keys) or the database does not \
                     answer. Check both, then start the vault again",
                    limit.as_secs()
                );
                tracing::error!("{why}");
                eprintln!("credvault: error: {why}");
                std::process::exit(1);
            }
        });
        Self(armed)
    }
}

/// How often the root key's token is asked whether it still answers.
const ROOT_KEY_CHECK: Duration = Duration::from_secs(2);

/// Keeps the health status of [`edge::ROOT_KEY_HEALTH`] true to whether the
/// root key can seal: NOT_SERVING while its token does not answer (calls go
/// on; rotations fail), with a log line when that changes.
async fn watch_root_key(vault: Arc<Vault>, health: tonic_health::server::HealthReporter) {
    let mut was = None;
    loop {
        let available = vault.check_root_key().await;
        if was != Some(available) {
            let status = if available {
                tonic_health::ServingStatus::Serving
            } else {
                tracing::error!(
                    "the root key's hardware security module does not answer: calls go on with \
                     the keys unsealed at start-up; rotations fail until it is back"
                );
                tonic_health::ServingStatus::NotServing
            };
            if was == Some(false) {
                tracing::info!("the root key's hardware security module answers again");
            }
            health
                .set_service_status(edge::ROOT_KEY_HEALTH, status)
                .await;
            was = Some(available);
        }
        tokio::time::sleep(ROOT_KEY_CHECK).await;
    }
}

/// Aborts background tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Reloads the TLS material whenever one of its files changes. A file that
/// does not load keeps the material in force, and the log says why.
async fn watch_tls_files(tls: SharedTls, every: Duration) {
    let mut seen = tls.files_changed_at();
    loop {
        tokio::time::sleep(every).await;
        let now = tls.files_changed_at();
        if now != seen {
            seen = now;
            reload_tls(&tls, "files changed");
        }
    }
}

fn reload_tls(tls: &SharedTls, why: &str) {
    match tls.reload() {
        Ok(0) => tracing::info!(why, "TLS material reloaded: new handshakes use it"),
        Ok(ended) => tracing::warn!(
            why,
            ended,
            "TLS material reloaded: new handshakes use it, and connections whose client \
             certificate it no longer trusts were closed"
        ),
        Err(e) => tracing::warn!(why, error = %e, "TLS material not reloaded; the old one stays"),
    }
}

/// On every SIGHUP, re-reads the policy from the configuration file and the
/// TLS material from its files. What does not load stays as it was, and the
/// log says why.
fn watch_sighup(
    path: PathBuf,
    policy: SharedPolicy,
    tls: SharedTls,
) -> Option<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP: nothing will reload on it");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let loaded = Config::load(&path)
                .map_err(|e| e.to_string())
                .and_then(|c| Policy::compile(&c.policy).map(|p| (p, c.policy.len())));
            match loaded {
                Ok((new, rules)) => {
                    policy.replace(new);
                    tracing::info!(rules, "SIGHUP: policy reloaded");
                }
                Err(why) => tracing::warn!(%why, "SIGHUP: policy not reloaded; the old one stays"),
            }
            reload_tls(&tls, "SIGHUP");
        }
    }))
}

/// Refuses a database whose audit log does not continue from the highest
/// head in the anchor file, or that already has events while the file is
/// gone; then appends the current head, so the file exists and is writable.
async fn check_anchor(vault: &Vault, path: &Path) -> Result<(), ServeError> {
    let log = vault.audit();
    match std::fs::symlink_metadata(path) {
        Ok(_) => {
            let highest = crate::audit::anchor::highest(path).map_err(ServeError::Anchor)?;
            if let Some(head) = highest {
                if let Some(why) = log.continues_from(&head).await? {
                    return Err(ServeError::BehindAnchor {
                        path: path.to_owned(),
                        sequence: head.sequence,
                        why,
                    });
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let events = *log.watch().borrow();
            if events > 0 {
                return Err(ServeError::Anchor(format!(
                    "{} does not exist, but the database already holds {events} audit events: \
                     the file was removed, or the anchor is new for this database. To start \
                     anchoring this database, create the file empty (`touch {}`)",
                    path.display(),
                    path.display()
                )));
            }
        }
        Err(e) => return Err(ServeError::Anchor(format!("{}: {e}", path.display()))),
    }
    let head = log.signed_head().await?;
    crate::audit::anchor::append(path, &head)?;
    Ok(())
}

/// Signs and stores a checkpoint unless the one at `last` covers the head,
/// and appends it to the anchor file, if any. Returns the newest checkpoint.
async fn checkpoint(vault: &Vault, last: u64, anchor: Option<&Path>) -> u64 {
    let signed = match vault.audit().checkpoint(last).await {
        Ok(Some(signed)) => signed,
        Ok(None) => return last,
        Err(e) => {
            tracing::warn!(error = %e, "could not sign an audit checkpoint");
            return last;
        }
    };
    let sequence = signed.head.sequence;
    if let Some(path) = anchor {
        let path = path.to_owned();
        let written =
            tokio::task::spawn_blocking(move || crate::audit::anchor::append(&path, &signed)).await;
        let written = written
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::error!(error = %e, "could not append to the audit anchor file");
        }
    }
    sequence
}

/// Signs the audit head every `checkpoint_every` events, and every
/// `checkpoint_interval_ms` while events arrive (a steady trickle of events
/// does not hold the interval off), appending each to the anchor file.
async fn checkpoints(vault: Arc<Vault>, config: AuditConfig) {
    let mut head = vault.audit().watch();
    let mut last = 0;
    let mut every =
        tokio::time::interval(Duration::from_millis(config.checkpoint_interval_ms.max(1)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            changed = head.changed() => {
                if changed.is_err() {
                    return;
                }
                if *head.borrow_and_update() < last + config.checkpoint_every.max(1) {
                    continue;
                }
            }
        }
        last = checkpoint(&vault, last, config.anchor_file.as_deref()).await;
    }
}

/// With a shared database, other replicas append audit events and rotate
/// keys: follow both, so that this replica's audit streams carry every
/// replica's events and its keyring has every key version.
async fn follow_other_replicas(vault: Arc<Vault>) {
    const AUDIT_POLL: Duration = Duration::from_millis(200);
    const KEYS_EVERY: u32 = 5;
    let mut ticks = 0u32;
    loop {
        tokio::time::sleep(AUDIT_POLL).await;
        if let Err(e) = vault.audit().refresh_head().await {
            tracing::warn!(error = %e, "cannot read the audit head from the database");
        }
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(KEYS_EVERY) {
            if let Err(e) = vault.sync_keyring().await {
                tracing::warn!(error = %e, "cannot reload the key versions from the database");
            }
        }
    }
}
