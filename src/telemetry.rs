//! Prometheus metrics, on their own listener. No label ever carries a secret, a hint or a workspace id.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::domain::Vault;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    provider: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExpiringLabels {
    provider: String,
    /// `1d`, `7d` or `30d`.
    within: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs to about 1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Every metric the vault exports.
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    call_seconds: Histograms<MethodLabels>,
    verdicts: Family<VerdictLabels, Counter>,
    provider_seconds: Histograms<ProviderLabels>,
    open_connections: Gauge,
    rewrap_pending: Gauge,
    shreds_pending: Gauge,
    audit_sequence: Gauge,
    primary_key_version: Gauge,
    key_versions_in_use: Gauge,
    root_key_available: Gauge,
    credentials_expiring: Family<ExpiringLabels, Gauge>,
    credentials_expired: Family<ProviderLabels, Gauge>,
    monitor_checks: Family<VerdictLabels, Counter>,
    monitor_due: Family<ProviderLabels, Gauge>,
    monitor_backoff: Family<ProviderLabels, Gauge>,
    monitor_passes: Counter,
    monitor_in_flight: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("credvault");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register("calls", "Calls by method and gRPC code", calls.clone());
        let call_seconds: Histograms<MethodLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "call_duration_seconds",
            "Call latency by method",
            call_seconds.clone(),
        );
        let verdicts = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "validations",
            "Validation verdicts by provider",
            verdicts.clone(),
        );
        let provider_seconds: Histograms<ProviderLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "provider_call_duration_seconds",
            "Time spent validating with each provider",
            provider_seconds.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections open now",
            open_connections.clone(),
        );
        let rewrap_pending = Gauge::default();
        registry.register(
            "rewrap_pending",
            "Data keys not yet rewrapped under the primary key version",
            rewrap_pending.clone(),
        );
        let shreds_pending = Gauge::default();
        registry.register(
            "shreds_pending",
            "Writes that destroyed secrets or keys whose old bytes the database files still \
             hold, waiting for a reader to let go",
            shreds_pending.clone(),
        );
        let audit_sequence = Gauge::default();
        registry.register(
            "audit_sequence",
            "The newest audit event's sequence",
            audit_sequence.clone(),
        );
        let primary_key_version = Gauge::default();
        registry.register(
            "primary_key_version",
            "The primary key version",
            primary_key_version.clone(),
        );
        let root_key_available = Gauge::default();
        registry.register(
            "root_key_available",
            "1 when the root key can seal (a key file always; an HSM token when it answers and \
             holds the key), 0 when its token does not: calls go on, rotations fail",
            root_key_available.clone(),
        );
        let credentials_expiring = Family::<ExpiringLabels, Gauge>::default();
        registry.register(
            "credentials_expiring",
            "Connected connections whose stored credential expires within 1d, 7d or 30d (each \
             window includes the nearer ones; expired ones are not counted), as of the last \
             check (every minute)",
            credentials_expiring.clone(),
        );
        let credentials_expired = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "credentials_expired",
            "Connected connections whose stored credential has expired, as of the last check",
            credentials_expired.clone(),
        );
        let monitor_checks = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "monitor_checks",
            "The health monitor's revalidations, by provider and verdict",
            monitor_checks.clone(),
        );
        let monitor_due = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "monitor_due",
            "Connections due for revalidation at the monitor's last pass that wait for the \
             provider's budget or back-off",
            monitor_due.clone(),
        );
        let monitor_backoff = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "monitor_backoff_seconds",
            "Seconds left before the monitor calls a provider that answered it 429 again",
            monitor_backoff.clone(),
        );
        let monitor_passes = Counter::default();
        registry.register(
            "monitor_passes",
            "The health monitor's passes over the connections (one every 10 s while on)",
            monitor_passes.clone(),
        );
        let monitor_in_flight = Gauge::default();
        registry.register(
            "monitor_in_flight",
            "The health monitor's revalidations under way",
            monitor_in_flight.clone(),
        );
        let key_versions_in_use = Gauge::default();
        registry.register(
            "key_versions_in_use",
            "Key versions that still wrap at least one data key",
            key_versions_in_use.clone(),
        );
        Self {
            registry,
            calls,
            call_seconds,
            verdicts,
            provider_seconds,
            open_connections,
            rewrap_pending,
            shreds_pending,
            audit_sequence,
            primary_key_version,
            key_versions_in_use,
            root_key_available,
            credentials_expiring,
            credentials_expired,
            monitor_checks,
            monitor_due,
            monitor_backoff,
            monitor_passes,
            monitor_in_flight,
        }
    }

    pub fn call(&self, method: &str, code: &str, seconds: f64) {
        self.calls
            .get_or_create(&CallLabels {
                method: method.to_owned(),
                code: code.to_owned(),
            })
            .inc();
        self.call_seconds
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(seconds);
    }

    pub fn validation(&self, provider: &str, verdict: &str, seconds: f64) {
        self.verdicts
            .get_or_create(&VerdictLabels {
                provider: provider.to_owned(),
                verdict: verdict.to_owned(),
            })
            .inc();
        self.provider_seconds
            .get_or_create(&ProviderLabels {
                provider: provider.to_owned(),
            })
            .observe(seconds);
    }

    pub fn connection_opened(&self) {
        self.open_connections.inc();
    }

    pub fn connection_closed(&self) {
        self.open_connections.dec();
    }

    /// Reads the gauges that describe stored state, then encodes everything.
    pub async fn render(&self, vault: &Vault) -> String {
        if let Ok(status) = vault.key_status().await {
            self.rewrap_pending
                .set(i64::try_from(status.rewrap_total - status.rewrap_done).unwrap_or(i64::MAX));
            self.primary_key_version.set(status.primary.into());
            let in_use = status.versions.iter().filter(|v| v.credentials > 0).count();
            self.key_versions_in_use
                .set(i64::try_from(in_use).unwrap_or(i64::MAX));
        }
        self.shreds_pending
            .set(i64::try_from(vault.shreds_pending()).unwrap_or(i64::MAX));
        self.root_key_available
            .set(i64::from(vault.root_key_available()));
        for (provider, counts) in vault.expiry_counts() {
            for (threshold, n) in crate::domain::expiry::THRESHOLDS
                .iter()
                .zip(counts.expiring)
            {
                self.credentials_expiring
                    .get_or_create(&ExpiringLabels {
                        provider: provider.to_owned(),
                        within: threshold.name.to_owned(),
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            self.credentials_expired
                .get_or_create(&ProviderLabels {
                    provider: provider.to_owned(),
                })
                .set(i64::try_from(counts.expired).unwrap_or(i64::MAX));
        }
        self.render_monitor(&vault.monitor_progress());
        let head = *vault.audit().watch().borrow();
        self.audit_sequence
            .set(i64::try_from(head).unwrap_or(i64::MAX));
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl Metrics {
    /// The monitor counts in the vault; its counters here mirror them.
    fn render_monitor(&self, progress: &crate::domain::monitor::Progress) {
        use std::sync::atomic::Ordering;
        for ((provider, verdict), n) in &progress.checks {
            self.monitor_checks
                .get_or_create(&VerdictLabels {
                    provider: (*provider).to_owned(),
                    verdict: (*verdict).to_owned(),
                })
                .inner()
                .store(*n, Ordering::Relaxed);
        }
        for (gauges, by_provider) in [
            (&self.monitor_due, &progress.due),
            (&self.monitor_backoff, &progress.backing_off),
        ] {
            for (provider, n) in by_provider {
                gauges
                    .get_or_create(&ProviderLabels {
                        provider: (*provider).to_owned(),
                    })
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
        }
        self.monitor_passes
            .inner()
            .store(progress.passes, Ordering::Relaxed);
        self.monitor_in_flight
            .set(i64::try_from(progress.in_flight).unwrap_or(i64::MAX));
    }
}

/// Serves `GET /metrics` over plain HTTP on `listener` (bind it to a private
/// address: the figures are not secret, but the listener has no TLS).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, vault: Arc<Vault>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, vault) = (Arc::clone(&metrics), Arc::clone(&vault));
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (metrics, vault) = (Arc::clone(&metrics), Arc::clone(&vault));
                    async move {
                        let response = if req.uri().path() == "/metrics" {
                            hyper::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                .body(Full::new(Bytes::from(metrics.render(&vault).await)))
                        } else {
                            hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
                        };
                        response
                    }
                });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

/// Binds the metrics listener, if configured.
pub async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => TcpListener::bind(addr).await.map(Some),
        None => Ok(None),
    }
}
