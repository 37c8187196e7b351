//! credvault-bench: the vault beside the bare transport, in one run on one machine.
//!
//! Starts a dev vault (a child process) and an HTTPS fake provider on 127.0.0.1,
//! runs each scenario for a fixed time after a warm-up at concurrency 1 and 32
//! over a few HTTP/2 connections, and prints throughput and latency percentiles
//! with each row's ratio to its limit (`noop` for vault calls, `direct` for
//! validation).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use credvault::audit::Durability;
use credvault::config::Config;
use credvault::dev::certs::DevCertPaths;
use credvault::proto::credentials_client::CredentialsClient;
use credvault::proto::key_admin_client::KeyAdminClient;
use credvault::proto::{
    CredentialRef, ListRequest, ProxyRequest, RotateRequest, StatusRequest, StoreRequest,
};
use credvault_testkit::fake::{FakeProvider, Reply};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Debug, Parser)]
#[command(
    name = "credvault-bench",
    about = "Benchmark credvault against the bare mTLS transport"
)]
struct Args {
    /// Short runs and small data sets: checks that every scenario works.
    #[arg(long)]
    quick: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Credentials stored for the rewrap and memory figures (default 100000, 5000 with --quick).
    #[arg(long)]
    credentials: Option<usize>,
    /// Also measure Redact and Store on PostgreSQL with 1, 2 and 3 replicas:
    /// a server URL whose user may create databases (one is made per run).
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
    /// Run only these scenarios (comma-separated names from the table, e.g.
    /// `noop,redact`; `store-new-no-group-commit` and `rewrap` count as scenarios).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    only: Vec<String>,
    /// The vault's `keys.rewrap_batch` (default: the dev configuration's), to
    /// measure how it trades the rewrap's speed against calls during it.
    #[arg(long, value_name = "N")]
    rewrap_batch: Option<usize>,
    /// Internal: run the vault from this configuration (the benchmark's own child process).
    #[arg(long, hide = true)]
    serve_config: Option<PathBuf>,
}

/// The same allocator as the `credvault` binary, so the vault child measures what ships.
#[global_allocator]
static ALLOCATOR: zeroizing_alloc::ZeroAlloc<std::alloc::System> =
    zeroizing_alloc::ZeroAlloc(std::alloc::System);

type Op = Arc<
    dyn Fn(usize, u64) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync,
>;

#[derive(Debug, Serialize, Clone)]
struct Row {
    scenario: String,
    concurrency: usize,
    ops_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    errors: u64,
    /// The vault process's CPU time (user and system, all threads) per call, in µs.
    server_cpu_us: Option<f64>,
    /// Throughput relative to this scenario's limit at the same concurrency.
    ratio: Option<f64>,
    ratio_to: Option<String>,
}

#[derive(Debug, Serialize, Default)]
struct Report {
    machine: String,
    quick: bool,
    rows: Vec<Row>,
    extra: BTreeMap<String, f64>,
}

const CONNECTIONS: usize = 4;
const CONCURRENCY: [usize; 2] = [1, 32];

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("credvault-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match &args.serve_config {
        Some(config) => runtime.block_on(serve(config)),
        None => runtime.block_on(bench(&args)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("credvault-bench: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The child process: a vault, exactly as `credvault serve --config` runs it.
async fn serve(config: &Path) -> Result<(), String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "listening on {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    credvault::run(config, listener, shutdown)
        .await
        .map_err(|e| e.to_string())
}

struct Vault {
    child: tokio::process::Child,
    url: String,
    certs: DevCertPaths,
    startup: Duration,
}

impl Vault {
    async fn channel(&self, identity: &str) -> Result<Channel, String> {
        let read = |p: PathBuf| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()));
        credvault::cli::client::connect_channel(
            &self.url,
            &read(self.certs.ca.clone())?,
            &read(self.certs.client_cert(identity))?,
            &read(self.certs.client_key(identity))?,
        )
        .await
    }

    fn rss_kib(&self, field: &str) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with(field))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

/// CPU time process `pid` has used so far (user and system, all threads), in ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the parenthesised name start at the 3rd; utime and stime are the 14th and 15th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

async fn start_vault(
    dir: &Path,
    fake: &FakeProvider,
    fake_ca: &Path,
    group_commit: bool,
    rewrap_batch: Option<usize>,
) -> Result<Vault, String> {
    let name = if group_commit {
        "vault"
    } else {
        "vault-no-group-commit"
    };
    let (config, data) = prepare_vault(dir, name, fake, fake_ca, |c| {
        c.storage.group_commit = group_commit;
        if let Some(batch) = rewrap_batch {
            c.keys.rewrap_batch = batch;
        }
    })?;
    spawn_vault(&config, &data).await
}

/// A dev vault folder `dir/name` whose providers are the fake; `tweak` edits
/// its configuration. Returns the configuration file and the folder.
fn prepare_vault(
    dir: &Path,
    name: &str,
    fake: &FakeProvider,
    fake_ca: &Path,
    tweak: impl FnOnce(&mut Config),
) -> Result<(PathBuf, PathBuf), String> {
    let data = dir.join(name);
    let prepared = credvault::dev::prepare(&data).map_err(|e| e.to_string())?;
    let mut config = Config::load(&prepared.config_path).map_err(|e| e.to_string())?;
    config.listen = "127.0.0.1:0".parse().map_err(|_| "address")?;
    config.outbound.extra_ca_file = Some(fake_ca.to_owned());
    config.outbound.allow_private_addresses = true;
    for (provider, key) in [
        (&mut config.providers.amplitude, "us"),
        (&mut config.providers.posthog, "us"),
    ] {
        provider.base_urls.insert(key.into(), fake.url());
    }
    config.limits.max_concurrent_calls = 4096;
    tweak(&mut config);
    std::fs::write(&prepared.config_path, config.to_toml()).map_err(|e| e.to_string())?;
    Ok((prepared.config_path, data))
}

/// Runs the vault of `config` as a child process and waits until it is SERVING.
async fn spawn_vault(config: &Path, data: &Path) -> Result<Vault, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .arg("--serve-config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| e.to_string())?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let port = loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the vault exited")?;
        if let Some(addr) = line.strip_prefix("listening on ") {
            break addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse::<u16>().ok())
                .ok_or("port")?;
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let mut vault = Vault {
        child,
        url: format!("https://localhost:{port}"),
        certs: DevCertPaths::new(&data.join("certs")),
        startup: Duration::ZERO,
    };
    // Start-up: from spawning the process to the first SERVING answer.
    loop {
        if let Ok(channel) = vault.channel("app").await {
            let mut health = HealthClient::new(channel);
            if let Ok(r) = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                if r.into_inner().status == 1 {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    vault.startup = started.elapsed();
    Ok(vault)
}

fn amplitude(workspace: &str) -> StoreRequest {
    StoreRequest {
        workspace_id: workspace.to_owned(),
        provider: "amplitude".into(),
        secrets: [
            (
                "api_key".to_owned(),
                "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6".to_owned(),
            ),
            (
                "secret_key".to_owned(),
                "Vq8rKw2Lx7Mz4Nc9Pb3Td6Yf1Gh5Js0U".to_owned(),
            ),
        ]
        .into(),
        ..StoreRequest::default()
    }
}

/// The bench's PostHog key: a made-up value the fake accepts.
const PHX: &str = "phx_Rk3Vw9Qm2Lx8Tz5Nc1Bd7Yf4Gh6Js0";

fn posthog(workspace: &str) -> StoreRequest {
    StoreRequest {
        workspace_id: workspace.to_owned(),
        provider: "posthog".into(),
        secrets: [("personal_api_key".to_owned(), PHX.to_owned())].into(),
        params: [("project_id".to_owned(), "42".to_owned())].into(),
        ..StoreRequest::default()
    }
}

fn reference(workspace: &str, provider: &str) -> CredentialRef {
    CredentialRef {
        workspace_id: workspace.to_owned(),
        provider: provider.to_owned(),
    }
}

/// Runs `op` from `concurrency` workers for `duration` after `warmup`.
async fn measure(
    name: &str,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    op: Op,
    server: Option<&Vault>,
) -> Row {
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measuring_from = start + warmup;
    let end = measuring_from + duration;
    let cpu = server.map(|vault| {
        let pid = vault.child.id();
        tokio::spawn(async move {
            let ticks = || pid.and_then(cpu_ticks);
            tokio::time::sleep_until(measuring_from.into()).await;
            let before = ticks();
            tokio::time::sleep_until(end.into()).await;
            Some(ticks()? - before?)
        })
    });
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let (op, errors) = (Arc::clone(&op), Arc::clone(&errors));
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let mut i = 0u64;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let ok = op(worker, i).await.is_ok();
                i += 1;
                if t >= measuring_from {
                    if ok {
                        latencies.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap_or_default());
    }
    all.sort_unstable();
    let server_cpu_us = match cpu {
        Some(task) => task
            .await
            .ok()
            .flatten()
            .map(|ticks| ticks as f64 * 1e6 / TICKS_PER_SECOND / all.len().max(1) as f64),
        None => None,
    };
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Row {
        scenario: name.to_owned(),
        concurrency,
        ops_per_sec: all.len() as f64 / duration.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        errors: errors.load(Ordering::Relaxed),
        server_cpu_us,
        ratio: None,
        ratio_to: None,
    }
}

/// The unit of `/proc/PID/stat` CPU times: USER_HZ, which Linux fixes at 100
/// for user space on every architecture this builds for.
const TICKS_PER_SECOND: f64 = 100.0;

fn boxed<F: Future<Output = Result<(), String>> + Send + 'static>(
    f: F,
) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> {
    Box::pin(f)
}

async fn bench(args: &Args) -> Result<(), String> {
    let (warmup, duration) = if args.quick {
        (Duration::from_millis(200), Duration::from_millis(800))
    } else {
        (Duration::from_secs(1), Duration::from_secs(5))
    };
    let stored = args
        .credentials
        .unwrap_or(if args.quick { 5_000 } else { 100_000 });
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let fake_ca =
        credvault::dev::certs::DevCa::generate("bench provider CA").map_err(|e| e.to_string())?;
    let fake_ca_file = tmp.path().join("provider-ca.pem");
    std::fs::write(&fake_ca_file, fake_ca.cert_pem()).map_err(|e| e.to_string())?;
    let cohorts = cohorts_body();
    let fake = FakeProvider::start(&fake_ca, move |r| {
        if r.path_and_query.ends_with("/cohorts/") {
            Reply::json(200, &cohorts)
        } else if r.path_and_query.starts_with("/api/projects/") {
            Reply::json(200, r#"{"id":42,"name":"bench"}"#)
        } else {
            Reply::json(200, r#"{"data":[{"name":"Signed Up"}]}"#)
        }
    })
    .await;
    let vault = start_vault(tmp.path(), &fake, &fake_ca_file, true, args.rewrap_batch).await?;
    let mut report = Report {
        machine: machine(),
        quick: args.quick,
        ..Report::default()
    };
    report.extra.insert(
        "startup_to_serving_ms".into(),
        vault.startup.as_secs_f64() * 1000.0,
    );
    eprintln!(
        "vault up in {:.1} ms; running scenarios ({} s each after {} ms warm-up)",
        vault.startup.as_secs_f64() * 1000.0,
        duration.as_secs_f64(),
        warmup.as_millis()
    );

    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(vault.channel("app").await?);
    }
    let channels = Arc::new(channels);
    store_read_fixtures(&channels[0]).await?;
    let mut setup = CredentialsClient::new(channels[0].clone());
    for i in 0..64 {
        setup
            .store(posthog(&format!("val-{i}")))
            .await
            .map_err(|e| e.to_string())?;
    }

    let health = |channels: Arc<Vec<Channel>>| -> Op {
        Arc::new(move |w, _| {
            let mut c = HealthClient::new(channels[w % CONNECTIONS].clone());
            boxed(async move {
                c.check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(drop)
                .map_err(|e| e.to_string())
            })
        })
    };
    let creds = |channels: &Arc<Vec<Channel>>, w: usize| {
        CredentialsClient::new(channels[w % CONNECTIONS].clone())
    };
    let scenarios: Vec<(&str, Op)> = vec![
        ("noop", health(Arc::clone(&channels))),
        ("redact", redact_op(Arc::clone(&channels))),
        ("list", list_op(Arc::clone(&channels))),
        ("store-new", store_new_op(Arc::clone(&channels))),
        ("store-replace", {
            let ch = Arc::clone(&channels);
            Arc::new(move |w, i| {
                let mut c = creds(&ch, w);
                boxed(async move {
                    c.store(amplitude(&format!("hot-{}", (w as u64 + i) % 10)))
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                })
            })
        }),
        ("validate", {
            let ch = Arc::clone(&channels);
            Arc::new(move |w, i| {
                let mut c = creds(&ch, w);
                // Distinct connections per worker, so no two calls share one provider call.
                let ws = format!("val-{}", (w as u64 * 2 + i % 2) % 64);
                boxed(async move {
                    let v = c
                        .validate_connection(reference(&ws, "posthog"))
                        .await
                        .map_err(|e| e.to_string())?
                        .into_inner();
                    if v.verdict == 1 {
                        Ok(())
                    } else {
                        Err(format!("verdict {}", v.verdict))
                    }
                })
            })
        }),
        ("direct", direct(&fake_ca_file, &fake.url())?),
        ("proxy", {
            let ch = Arc::clone(&channels);
            Arc::new(move |w, i| {
                let mut c = creds(&ch, w);
                let ws = format!("val-{}", (w as u64 * 2 + i % 2) % 64);
                boxed(async move {
                    let answer = c
                        .proxy(ProxyRequest {
                            workspace_id: ws,
                            provider: "posthog".into(),
                            method: "GET".into(),
                            path: PROXY_PATH.into(),
                            ..ProxyRequest::default()
                        })
                        .await
                        .map_err(|e| e.to_string())?
                        .into_inner();
                    if answer.status == 200 && answer.body.len() == PROXY_BODY_BYTES {
                        Ok(())
                    } else {
                        Err(format!("status {}", answer.status))
                    }
                })
            })
        }),
        ("proxy-direct", proxy_direct(&fake_ca_file, &fake.url())?),
    ];
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    for (name, op) in scenarios.iter().filter(|(name, _)| wanted(name)) {
        for concurrency in CONCURRENCY {
            let rss_before = vault.rss_kib("VmRSS:");
            // The direct rows never reach the vault: nothing of its to measure.
            let server = (!name.ends_with("direct")).then_some(&vault);
            let row = measure(name, concurrency, warmup, duration, Arc::clone(op), server).await;
            let rss_after = vault.rss_kib("VmRSS:");
            eprintln!(
                "  {name:<14} c={concurrency:<3} {:>9.0}/s  p50 {:>6} µs  p99 {:>6} µs  errors {}  vault CPU {:>5.1} µs/call  server RSS {} → {} KiB",
                row.ops_per_sec, row.p50_us, row.p99_us, row.errors, row.server_cpu_us.unwrap_or(0.0),
                rss_before.unwrap_or(0), rss_after.unwrap_or(0)
            );
            report.rows.push(row);
        }
    }
    // The reads again, on a vault that answers them once their events are
    // queued (`audit.durability = "changes"`).
    let lazy_reads: Vec<(&str, OpOn)> =
        vec![("redact-changes", redact_op), ("list-changes", list_op)];
    if lazy_reads.iter().any(|(name, _)| wanted(name)) {
        let (config, data) =
            prepare_vault(tmp.path(), "vault-changes", &fake, &fake_ca_file, |c| {
                c.audit.durability = Durability::Changes;
            })?;
        let lazy = spawn_vault(&config, &data).await?;
        let mut chans = Vec::new();
        for _ in 0..CONNECTIONS {
            chans.push(lazy.channel("app").await?);
        }
        let chans = Arc::new(chans);
        store_read_fixtures(&chans[0]).await?;
        for (name, op) in lazy_reads.into_iter().filter(|(name, _)| wanted(name)) {
            for concurrency in CONCURRENCY {
                let row = measure(
                    name,
                    concurrency,
                    warmup,
                    duration,
                    op(Arc::clone(&chans)),
                    Some(&lazy),
                )
                .await;
                eprintln!(
                    "  {name:<14} c={concurrency:<3} {:>9.0}/s  p50 {:>6} µs  p99 {:>6} µs  errors {}  vault CPU {:>5.1} µs/call",
                    row.ops_per_sec, row.p50_us, row.p99_us, row.errors, row.server_cpu_us.unwrap_or(0.0),
                );
                report.rows.push(row);
            }
        }
    }
    fake.clear_requests();
    // The same Store load on a vault with group commit off: one fsync per Store.
    if wanted("store-new-no-group-commit") {
        let plain = start_vault(tmp.path(), &fake, &fake_ca_file, false, args.rewrap_batch).await?;
        let mut chans = Vec::new();
        for _ in 0..CONNECTIONS {
            chans.push(plain.channel("app").await?);
        }
        let op = store_new_op(Arc::new(chans));
        let row = measure(
            "store-new-no-group-commit",
            32,
            warmup,
            duration,
            op,
            Some(&plain),
        )
        .await;
        eprintln!(
            "  {:<26} c=32 {:>9.0}/s  p50 {:>6} µs  p99 {:>6} µs",
            row.scenario, row.ops_per_sec, row.p50_us, row.p99_us
        );
        report.rows.push(row);
    }
    if let Some(server) = &args.postgres {
        replicas(
            server,
            tmp.path(),
            &fake,
            &fake_ca_file,
            (warmup, duration),
            &mut report,
        )
        .await?;
    }
    if wanted("rewrap") {
        rewrap(&vault, &channels, stored, &mut report).await?;
    }
    if let Some(peak) = vault.rss_kib("VmHWM:") {
        report.extra.insert(
            format!("server_peak_rss_mib_with_{stored}_credentials"),
            peak as f64 / 1024.0,
        );
    }
    add_ratios(&mut report.rows);
    print_table(&report);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let errors: u64 = report.rows.iter().map(|r| r.errors).sum();
    if errors > 0 {
        return Err(format!("{errors} calls failed during the benchmark"));
    }
    Ok(())
}

/// The provider call alone, with the vault's own outbound client and settings.
fn direct(ca: &Path, url: &str) -> Result<Op, String> {
    let direct = Direct::new(ca, url)?;
    Ok(Arc::new(move |_, _| {
        let Direct {
            outbound,
            base,
            provider,
            secrets,
            params,
        } = direct.clone();
        boxed(async move {
            let spec = provider.spec();
            let answer = outbound
                .call(
                    provider,
                    &base,
                    spec.probe(&secrets, &params),
                    &credvault::outbound::Scrubber::new(),
                )
                .await
                .map_err(|e| e.0)?;
            let v = (spec.validation.interpret)(&answer, &params);
            if v.verdict == credvault::providers::validation::Verdict::Valid {
                Ok(())
            } else {
                Err(v.message)
            }
        })
    }))
}

/// Redact and Store at concurrency 32 on 1, 2 and 3 replicas over one
/// PostgreSQL database (a fresh one per replica count), with the clients'
/// connections spread evenly over the replicas.
async fn replicas(
    server: &str,
    dir: &Path,
    fake: &FakeProvider,
    fake_ca: &Path,
    (warmup, duration): (Duration, Duration),
    report: &mut Report,
) -> Result<(), String> {
    for count in 1..=3usize {
        let database = create_database(server).await?;
        // The vault refuses a password in the URL: it goes in a 0600 file.
        let mut url = url::Url::parse(&database).map_err(|e| format!("--postgres: {e}"))?;
        let password_file = dir.join(format!("pg-{count}-password"));
        write_private(&password_file, url.password().unwrap_or_default())?;
        url.set_password(None)
            .map_err(|()| "--postgres: the URL cannot lose its password")?;
        let (config, data) = prepare_vault(dir, &format!("pg-{count}"), fake, fake_ca, |c| {
            c.storage.backend = credvault::config::Backend::Postgres;
            c.storage.url = Some(url.to_string());
            c.storage.password_file = Some(password_file.clone());
        })?;
        let mut vaults = Vec::new();
        for _ in 0..count {
            vaults.push(spawn_vault(&config, &data).await?);
        }
        let mut channels = Vec::new();
        for vault in &vaults {
            for _ in 0..2 {
                channels.push(vault.channel("app").await?);
            }
        }
        let channels = Arc::new(channels);
        let mut setup = CredentialsClient::new(channels[0].clone());
        for i in 0..10 {
            setup
                .store(amplitude(&format!("hot-{i}")))
                .await
                .map_err(|e| e.to_string())?;
        }
        let redact = redact_op(Arc::clone(&channels));
        let store = store_new_op(channels);
        for (scenario, op) in [("redact", redact), ("store-new", store)] {
            let name = format!("{scenario}-postgres-{count}r");
            let row = measure(&name, 32, warmup, duration, op, None).await;
            eprintln!(
                "  {name:<26} c=32 {:>9.0}/s  p50 {:>6} µs  p99 {:>6} µs  errors {}",
                row.ops_per_sec, row.p50_us, row.p99_us, row.errors
            );
            report.rows.push(row);
        }
    }
    Ok(())
}

/// Redact of one of the ten `hot-*` connections, over worker `w`'s channel.
/// A scenario's calls, on the given connections.
type OpOn = fn(Arc<Vec<Channel>>) -> Op;

/// The connections the read scenarios read.
async fn store_read_fixtures(channel: &Channel) -> Result<(), String> {
    let mut setup = CredentialsClient::new(channel.clone());
    for i in 0..10 {
        setup
            .store(amplitude(&format!("hot-{i}")))
            .await
            .map_err(|e| e.to_string())?;
    }
    // A workspace holds one connection per provider, so `list` reads a
    // workspace with both providers' connections (the issue's 10 do not fit).
    setup
        .store(amplitude("list-ws"))
        .await
        .map_err(|e| e.to_string())?;
    setup
        .store(posthog("list-ws"))
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn list_op(channels: Arc<Vec<Channel>>) -> Op {
    Arc::new(move |w, _| {
        let mut c = CredentialsClient::new(channels[w % channels.len()].clone());
        boxed(async move {
            c.list(ListRequest {
                workspace_id: "list-ws".into(),
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(|e| e.to_string())
        })
    })
}

fn redact_op(channels: Arc<Vec<Channel>>) -> Op {
    Arc::new(move |w, i| {
        let mut c = CredentialsClient::new(channels[w % channels.len()].clone());
        boxed(async move {
            c.redact(reference(
                &format!("hot-{}", (w as u64 + i) % 10),
                "amplitude",
            ))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
        })
    })
}

/// Store of a connection no one has stored before, over worker `w`'s channel.
fn store_new_op(channels: Arc<Vec<Channel>>) -> Op {
    let next = Arc::new(AtomicU64::new(0));
    Arc::new(move |w, _| {
        let mut c = CredentialsClient::new(channels[w % channels.len()].clone());
        let id = next.fetch_add(1, Ordering::Relaxed);
        boxed(async move {
            c.store(amplitude(&format!("new-{id}")))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    })
}

/// A fresh database on `server`, returned as a URL.
/// Writes `text` to a new file only its owner may read.
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

async fn create_database(server: &str) -> Result<String, String> {
    let (client, connection) = tokio_postgres::connect(server, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("--postgres: {e}"))?;
    tokio::spawn(connection);
    let name = format!(
        "credvault_bench_{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
    );
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(|e| format!("--postgres: {e}"))?;
    let mut url = url::Url::parse(server).map_err(|e| format!("--postgres: {e}"))?;
    url.set_path(&name);
    Ok(url.to_string())
}

/// The proxied GET, and the size of the fake's answer to it.
const PROXY_PATH: &str = "/api/projects/42/cohorts/";
const PROXY_BODY_BYTES: usize = 2048;

/// A cohort list of exactly [`PROXY_BODY_BYTES`].
fn cohorts_body() -> String {
    let mut body = String::from(r#"{"results":[{"id":1,"name":"bench","description":""#);
    let tail = r#""}]}"#;
    while body.len() + tail.len() < PROXY_BODY_BYTES {
        body.push('x');
    }
    body.push_str(tail);
    body
}

/// The proxied call alone: the same GET with the vault's outbound client,
/// its settings and the credential headers, straight from the bench.
fn proxy_direct(ca: &Path, url: &str) -> Result<Op, String> {
    use credvault::outbound::{Outgoing, Scrubber};
    let direct = Direct::new(ca, url)?;
    Ok(Arc::new(move |_, _| {
        let Direct {
            outbound,
            base,
            provider,
            secrets,
            params,
        } = direct.clone();
        boxed(async move {
            let outgoing = Outgoing {
                method: reqwest::Method::GET,
                path_and_query: PROXY_PATH.to_owned(),
                headers: (provider.spec().auth)(&secrets, &params),
                body: Vec::new(),
                max_response: 4 << 20,
            };
            let answer = outbound
                .send(provider, &base, outgoing, &Scrubber::new())
                .await
                .map_err(|e| e.0)?;
            if answer.status == 200 && answer.body.len() == PROXY_BODY_BYTES {
                Ok(())
            } else {
                Err(format!("status {}", answer.status))
            }
        })
    }))
}

/// What a call straight from the bench needs: the vault's own outbound
/// client and settings, the fake's URL, and PostHog credentials.
#[derive(Clone)]
struct Direct {
    outbound: Arc<credvault::outbound::Outbound>,
    base: url::Url,
    provider: credvault::providers::Provider,
    secrets: Arc<credvault::providers::Secrets>,
    params: Arc<credvault::providers::Params>,
}

impl Direct {
    fn new(ca: &Path, url: &str) -> Result<Self, String> {
        let config = credvault::config::OutboundConfig {
            extra_ca_file: Some(ca.to_owned()),
            allow_private_addresses: true,
            ..Default::default()
        };
        let outbound = credvault::outbound::Outbound::new(&config).map_err(|e| e.to_string())?;
        let (secrets, params) = posthog_credentials();
        Ok(Self {
            outbound: Arc::new(outbound),
            base: url::Url::parse(url).map_err(|e| e.to_string())?,
            provider: credvault::providers::Provider::Posthog,
            secrets: Arc::new(secrets),
            params: Arc::new(params),
        })
    }
}

/// The PostHog credentials every bench connection holds.
fn posthog_credentials() -> (credvault::providers::Secrets, credvault::providers::Params) {
    let secrets = [("personal_api_key".to_owned(), PHX.into())].into();
    let params = [
        ("project_id".to_owned(), "42".to_owned()),
        ("region".to_owned(), "us".to_owned()),
    ]
    .into();
    (secrets, params)
}

/// Stores `count` credentials, rotates, and times the rewrap while `redact`
/// runs at concurrency 32 beside it.
async fn rewrap(
    vault: &Vault,
    channels: &Arc<Vec<Channel>>,
    count: usize,
    report: &mut Report,
) -> Result<(), String> {
    eprintln!("storing {count} credentials for the rewrap and memory figures…");
    let next = Arc::new(AtomicU64::new(0));
    let mut fill = Vec::new();
    for w in 0..32 {
        let (next, mut c) = (
            Arc::clone(&next),
            CredentialsClient::new(channels[w % CONNECTIONS].clone()),
        );
        fill.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count as u64 {
                    return Ok::<(), String>(());
                }
                c.store(amplitude(&format!("bulk-{i}")))
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }));
    }
    let filling = Instant::now();
    for f in fill {
        f.await.map_err(|e| e.to_string())??;
    }
    report.extra.insert(
        "bulk_store_per_sec_c32".into(),
        count as f64 / filling.elapsed().as_secs_f64(),
    );

    let mut admin = KeyAdminClient::new(vault.channel("admin").await?);
    let total = admin
        .status(StatusRequest {})
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .rewrap_total;
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..32 {
        let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
        let mut c = CredentialsClient::new(channels[w % CONNECTIONS].clone());
        load.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if c.redact(reference(
                    &format!("hot-{}", (w as u64 + i) % 10),
                    "amplitude",
                ))
                .await
                .is_ok()
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    let started = Instant::now();
    admin
        .rotate(RotateRequest {})
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let s = admin
            .status(StatusRequest {})
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        if s.rewrap_done == s.rewrap_total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    report
        .extra
        .insert("rewrap_credentials".into(), total as f64);
    report
        .extra
        .insert("rewrap_seconds".into(), elapsed.as_secs_f64());
    report.extra.insert(
        "rewrap_credentials_per_sec".into(),
        total as f64 / elapsed.as_secs_f64(),
    );
    report.rows.push(Row {
        scenario: "redact-during-rewrap".into(),
        concurrency: 32,
        ops_per_sec: done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        p50_us: 0,
        p99_us: 0,
        p999_us: 0,
        errors: 0,
        server_cpu_us: None,
        ratio: None,
        ratio_to: None,
    });
    Ok(())
}

fn add_ratios(rows: &mut [Row]) {
    let limit = |rows: &[Row], name: &str, c: usize| {
        rows.iter()
            .find(|r| r.scenario == name && r.concurrency == c)
            .map(|r| r.ops_per_sec)
    };
    let snapshot = rows.to_vec();
    for row in rows.iter_mut() {
        let base = match row.scenario.as_str() {
            "noop" | "direct" | "proxy-direct" => None,
            "proxy" => Some("proxy-direct"),
            name if name.starts_with("redact-postgres") => Some("redact"),
            name if name.starts_with("store-new-postgres") => Some("store-new"),
            "redact-during-rewrap" => Some("redact"),
            "store-new-no-group-commit" => Some("store-new"),
            "validate" => Some("direct"),
            _ => Some("noop"),
        };
        if let Some(base) = base {
            if let Some(limit) = limit(&snapshot, base, row.concurrency) {
                row.ratio = Some(row.ops_per_sec / limit);
                row.ratio_to = Some(base.to_owned());
            }
        }
    }
}

fn print_table(report: &Report) {
    println!("\n{}", report.machine);
    println!(
        "{:<22} {:>4} {:>11} {:>9} {:>9} {:>9} {:>11}  ratio",
        "scenario", "conc", "ops/s", "p50 µs", "p99 µs", "p99.9 µs", "CPU µs/call"
    );
    for r in &report.rows {
        let ratio = match (&r.ratio, &r.ratio_to) {
            (Some(x), Some(to)) => format!("{x:.2} of {to}"),
            _ => String::new(),
        };
        let cpu = r
            .server_cpu_us
            .map_or(String::new(), |us| format!("{us:.1}"));
        println!(
            "{:<22} {:>4} {:>11.0} {:>9} {:>9} {:>9} {cpu:>11}  {ratio}",
            r.scenario, r.concurrency, r.ops_per_sec, r.p50_us, r.p99_us, r.p999_us
        );
    }
    for (k, v) in &report.extra {
        println!("{k}: {v:.1}");
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}
