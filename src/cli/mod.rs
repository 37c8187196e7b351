//! The command line: `serve`, `check-config`, `certs init`, the key and audit commands,
//! and the client subcommands for people.

pub mod audit;
mod check;
pub mod client;
mod keys;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::dev;

#[derive(Debug, Parser)]
#[command(
    name = "credvault",
    version,
    about = "A credential vault behind mutual-TLS gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the vault.
    Serve(ServeArgs),
    /// Development certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Store a connection's credentials; secrets are read from stdin or a no-echo prompt.
    #[command(
        after_help = "Secrets never go on the command line. Piped in, they are NAME=VALUE \
        lines, one per secret, for example:\n  printf 'api_key=%s\\nsecret_key=%s\\n' \"$K\" \"$S\" | \
        credvault store --workspace acme --provider amplitude --param region=eu\nOn a terminal, \
        the vault asks for each one without echo. `credvault providers` lists each provider's \
        secrets and params."
    )]
    Store(client::StoreArgs),
    /// Show a connection's parameters and redacted secrets.
    Redact(client::RefArgs),
    /// Disconnect: destroy a connection's secrets, keep its metadata.
    Zero(client::RefArgs),
    /// List a workspace's connections.
    List(client::ListArgs),
    /// Have the vault check a connection's credentials with the provider.
    Validate(client::RefArgs),
    /// List the providers the vault knows and the fields each needs.
    Providers(client::ProvidersArgs),
    /// Call a provider's API through the vault, which adds the credentials.
    /// Prints the status and headers to stderr and the body to stdout; a POST
    /// body is read from stdin. Exit status 1 for a 4xx or 5xx answer.
    Call(client::CallArgs),
    /// The audit log: tail it, export it, verify its chain.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Key rotation: rotate, status, retire, rotate-root.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Check a configuration and the files it names without serving.
    CheckConfig {
        /// The configuration file to check, as `serve --config` would read it.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Development mode: on first run create certificates, a root key, a
    /// configuration and a database in --data-dir; later runs reuse them.
    #[arg(long, conflicts_with = "config")]
    dev: bool,
    /// The development vault's folder (with --dev).
    #[arg(long, default_value = "credvault-dev", requires = "dev")]
    data_dir: PathBuf,
    /// Run from this configuration file alone.
    #[arg(long, required_unless_present = "dev")]
    config: Option<PathBuf>,
    /// Listen on this address instead of the configured one.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Log lines for people (text) or for a log shipper (json).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a development CA, server certificate and app/admin/auditor client certificates.
    Init {
        /// The folder to write them into.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Parses the command line and runs the subcommand.
pub fn main() -> ExitCode {
    withhold_panic_messages();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Certs(CertsCommand::Init { out }) => certs_init(&out),
        Command::Store(args) => runtime.block_on(client::store(args)),
        Command::Redact(args) => runtime.block_on(client::redact(args)),
        Command::Zero(args) => runtime.block_on(client::zero(args)),
        Command::List(args) => runtime.block_on(client::list(args)),
        Command::Validate(args) => runtime.block_on(client::validate(args)),
        Command::Providers(args) => runtime.block_on(client::providers(args)),
        Command::Call(args) => runtime.block_on(client::call(args)),
        Command::Audit(command) => runtime.block_on(audit::run(command)),
        Command::Keys(command) => runtime.block_on(keys::run(command)),
        Command::CheckConfig { config } => runtime.block_on(check::run(&config)),
    };
    // A blocking call stuck in a hung HSM must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("credvault: error: {message}");
    ExitCode::FAILURE
}

/// Libraries whose debug and trace events quote bytes a peer sent (HTTP/2
/// frames, TLS messages): capped at `info` whatever `RUST_LOG` asks, since a
/// provider may echo a credential into them.
const QUOTING_LIBRARIES: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "reqwest",
    "rustls",
    "tonic",
    "tower",
];

/// `RUST_LOG` (or `info`), with [`QUOTING_LIBRARIES`] capped.
fn log_filter(rust_log: Option<&str>) -> tracing_subscriber::EnvFilter {
    let mut filter = rust_log
        .and_then(|directives| tracing_subscriber::EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    for library in QUOTING_LIBRARIES {
        if let Ok(cap) = format!("{library}=info").parse() {
            filter = filter.add_directive(cap);
        }
    }
    filter
}

fn init_logging(format: LogFormat) {
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    init_logging(args.log_format);
    let config_path = if args.dev {
        let vault = dev::prepare(&args.data_dir).map_err(|e| e.to_string())?;
        if vault.created {
            match args.log_format {
                LogFormat::Text => announce_dev_vault(&args.data_dir),
                // A log shipper reads stderr: keep every line JSON.
                LogFormat::Json => tracing::warn!(
                    data_dir = %args.data_dir.display(),
                    "CREATED A NEW DEVELOPMENT VAULT: certificates, root key, configuration and \
                     database; not for production"
                ),
            }
        }
        vault.config_path
    } else {
        // clap requires --config unless --dev.
        args.config.ok_or("serve needs --config FILE, or --dev")?
    };
    let mut config = Config::load(&config_path).map_err(|e| e.to_string())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    // The port first: a port in use is one line, not one after the whole configuration.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {}: {e} (another process has it? choose another with \
                 --listen ADDR, or `listen` in {})",
                config.listen,
                config_path.display()
            )
        })?;
    crate::run(config, listener, shutdown_signal())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("credvault stopped");
    Ok(())
}

/// A panic's message may quote a value it was handed (an `unwrap` prints the
/// error, an index the bytes): report where it happened, never what it said.
fn withhold_panic_messages() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        tracing::error!(%location, thread, "panicked; the message is withheld");
        eprintln!("credvault: thread `{thread}` panicked at {location}; the message is withheld");
    }));
}

fn announce_dev_vault(dir: &Path) {
    let d = dir.display();
    // The command as this process was started (`target/release/credvault`
    // after `cargo run`), so the suggestion works as printed.
    let me = std::env::args()
        .next()
        .filter(|arg0| arg0.contains('/'))
        .unwrap_or_else(|| "credvault".to_owned());
    eprintln!(
        "\n\
         ================================================================\n\
         credvault: CREATED A NEW DEVELOPMENT VAULT in {d}\n\
         \x20 {d}/certs/ca.pem                       the development CA\n\
         \x20 {d}/certs/server.pem, server-key.pem   localhost, 127.0.0.1, ::1\n\
         \x20 {d}/certs/{{app,admin,auditor}}.pem     client certificates (+ -key.pem)\n\
         \x20 {d}/root.key                           the root key (mode 0600)\n\
         \x20 {d}/credvault.toml                     the configuration in use\n\
         \x20 {d}/credvault.db                       the database\n\
         Not for production: the root key sits beside the database.\n\
         Try: {me} providers --data-dir {d}\n\
         ================================================================\n"
    );
}

fn certs_init(out: &Path) -> Result<(), String> {
    let paths = dev::certs::init(out).map_err(|e| e.to_string())?;
    eprintln!(
        "wrote a development CA, a server certificate and app, admin and auditor client certificates to {}",
        paths.dir.display()
    );
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag and argument of every subcommand says what it is for.
    #[test]
    fn every_flag_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() {
                    missing.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "credvault", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn trace_logging_leaves_out_what_transport_libraries_quote() {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        for rust_log in ["trace", "h2=trace,trace", "debug"] {
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(log_filter(Some(rust_log)))
                .with_writer({
                    let sink = sink.clone();
                    move || Sink(sink.clone())
                })
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                tracing::debug!(target: "h2::codec", "received GoAway debug_data=CANARY-H2");
                tracing::trace!(target: "rustls::client", "CANARY-TLS");
                tracing::debug!(target: "credvault::outbound", "own-debug-line");
            });
            let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
            assert!(!text.contains("CANARY"), "{rust_log}: {text}");
            assert!(text.contains("own-debug-line"), "{rust_log}: {text}");
            out.lock().unwrap().clear();
        }
    }

    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
