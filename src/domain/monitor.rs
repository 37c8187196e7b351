//! The health monitor: with `[monitor] revalidate_every` set, the vault
//! revalidates every connected connection on that period, and writes a
//! system event to the audit chain when a connection's settled verdict
//! changes (VALID to REJECTED, and back: "recovered").
//!
//! - **Schedule.** A connection is due one period after its last validation,
//!   less up to a tenth of the period of jitter; one never validated, at a
//!   point spread over the period after it was stored. Only the database
//!   says when a connection was last validated, so a restart resumes the
//!   schedule, and connections overdue at start-up (the vault was down, or
//!   the monitor just turned on) are spread over the period after it: a
//!   crash never makes the monitor probe everything at once.
//! - **Unsettled verdicts** (UNREACHABLE, RATE_LIMITED, UNEXPECTED_RESPONSE)
//!   are asked again after [`Schedule::retry`], and never count as a change:
//!   the settled verdict before them is kept with them.
//! - **Budgets.** Each provider's [`MonitorBudget`] bounds the checks in
//!   flight and started per quota unit (a tenant, a team). A 429 stops the
//!   monitor's calls to that provider for its Retry-After (at least a
//!   minute), doubling while 429s continue.
//! - **Replicas** each run the monitor with their own random jitter: the
//!   first to check a connection records it, and the others find it
//!   validated when its turn comes. A verdict is recorded only over the one
//!   its check began from, so a change is announced once.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;

use super::{record_details, CredentialRef, Vault, VaultError};
use crate::audit::{self, Event};
use crate::providers::validation::{Validation, Verdict};
use crate::providers::{Provider, QuotaUnit};
use crate::store::{CredentialRecord, StoredStatus, Watched};

/// The method of the monitor's notices that a verdict changed.
pub const VERDICT_METHOD: &str = "Monitor.Verdict";
/// The method of the events that record the monitor's provider calls.
pub const REVALIDATE_METHOD: &str = "Monitor.Revalidate";
/// How often the monitor looks for connections that are due (on a manual
/// clock: each time it moves).
pub const PASS_EVERY: Duration = Duration::from_secs(10);
/// Monitor checks in flight at once, across providers.
const IN_FLIGHT: usize = 8;
/// The shortest back-off after a 429.
const BACK_OFF_MIN: Duration = Duration::from_secs(60);
/// The longest.
const BACK_OFF_MAX: Duration = Duration::from_secs(60 * 60);

/// When connections are due.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The configured period.
    pub every: Duration,
    /// The wait after an unsettled verdict: a twenty-fourth of the period,
    /// between a minute and an hour.
    pub retry: Duration,
    /// When the monitor started: nothing is due before a point spread over
    /// the period after it.
    started: SystemTime,
    /// This process's own: replicas spread their checks differently.
    salt: [u8; 16],
}

impl Schedule {
    pub fn new(every: Duration, started: SystemTime) -> Result<Self, VaultError> {
        let mut salt = [0; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .map_err(|_| VaultError::Internal("the system's random source failed".into()))?;
        Ok(Self {
            every,
            retry: (every / 24).clamp(Duration::from_secs(60), Duration::from_secs(60 * 60)),
            started,
            salt,
        })
    }

    /// When `row` is next due.
    pub fn due(&self, row: &Watched) -> SystemTime {
        let (baseline, wait, validated) = match (row.validated_at, row.settled) {
            (Some(at), Some(false)) => (at, self.retry, true),
            (Some(at), _) => (at, self.every, true),
            (None, _) => (row.updated_at, self.every, false),
        };
        let h = self.hash(row, baseline);
        let natural = if validated {
            baseline + wait - fraction(h, wait / 10)
        } else {
            baseline + fraction(h, wait)
        };
        if natural < self.started {
            // Overdue when the monitor started: spread over the next wait.
            self.started + fraction(h, wait)
        } else {
            natural
        }
    }

    /// The bounds for [`crate::store::Store::monitor_due`] at `now`: every
    /// row due by `now` is within them.
    fn candidates(&self, now: SystemTime) -> (SystemTime, SystemTime, SystemTime) {
        let before = |d: Duration| now.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH);
        (
            before(self.every - self.every / 10),
            before(self.retry - self.retry / 10),
            now,
        )
    }

    fn hash(&self, row: &Watched, baseline: SystemTime) -> u64 {
        let mut d = ring::digest::Context::new(&ring::digest::SHA256);
        d.update(&self.salt);
        for part in [row.workspace_id.as_bytes(), row.provider.as_bytes()] {
            d.update(&(part.len() as u64).to_be_bytes());
            d.update(part);
        }
        d.update(&crate::store::millis(baseline).to_be_bytes());
        let digest = d.finish();
        let mut first = [0; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        u64::from_be_bytes(first)
    }
}

/// The part `h` picks of `span`, uniformly, to the millisecond.
fn fraction(h: u64, span: Duration) -> Duration {
    let ms = u64::try_from(span.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(h % ms)
}

/// Whether a connection whose settled verdict was `before` and whose check
/// now says `now` changed, and how; `None` for no change, or for an
/// unsettled `now` (the provider could not tell).
pub fn verdict_change(before: Option<Verdict>, now: Verdict) -> Option<audit::VerdictChange> {
    if !now.is_settled() {
        return None;
    }
    match before {
        Some(before) if before == now => None,
        Some(before) => Some(audit::VerdictChange {
            previous: before.name().into(),
            recovered: now == Verdict::Valid,
        }),
        // A first verdict is news only when it is bad.
        None if now == Verdict::Valid => None,
        None => Some(audit::VerdictChange {
            previous: String::new(),
            recovered: false,
        }),
    }
}

/// The notice that `target`'s settled verdict changed to `verdict`.
pub(super) fn verdict_event(
    target: &CredentialRef,
    verdict: Verdict,
    change: audit::VerdictChange,
) -> Event {
    Event::new(
        &system_context(target, VERDICT_METHOD),
        audit::OUTCOME_OK,
        audit::Details {
            verdict: verdict.name().into(),
            verdict_change: Some(change),
            ..audit::Details::default()
        },
    )
}

fn system_context(target: &CredentialRef, method: &str) -> audit::Context {
    audit::Context {
        identity: audit::VAULT_IDENTITY.into(),
        method: method.into(),
        workspace_id: target.workspace_id.as_str().into(),
        provider: target.provider.name().into(),
        request_id: String::new(),
    }
}

/// What the monitor has done, for the metrics.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Checks finished, by provider and verdict.
    pub checks: BTreeMap<(&'static str, &'static str), u64>,
    /// By provider: connections due at the last pass and not yet started.
    pub due: BTreeMap<&'static str, u64>,
    /// By provider: seconds left of a 429's back-off.
    pub backing_off: BTreeMap<&'static str, u64>,
    /// Checks under way.
    pub in_flight: u64,
    /// Passes over the connections so far.
    pub passes: u64,
}

/// What the monitor spent of each quota unit, and which providers it is
/// backing off.
#[derive(Debug, Default)]
struct Budgets {
    /// Requests started per unit, oldest first, within the budget's window.
    started: HashMap<(Provider, String), VecDeque<SystemTime>>,
    in_flight: HashMap<(Provider, String), u32>,
    /// After 429s: until when, and how many in a row.
    back_off: HashMap<Provider, (SystemTime, u32)>,
}

impl Budgets {
    /// Takes `cost` requests of `unit`'s budget at `now`, if it has them.
    fn take(&mut self, provider: Provider, unit: &str, cost: u32, now: SystemTime) -> bool {
        let budget = &provider.spec().monitor;
        let key = (provider, unit.to_owned());
        if self.in_flight.get(&key).copied().unwrap_or(0) >= budget.concurrent {
            return false;
        }
        if let Some(rate) = budget.rate {
            let window = self.started.entry(key.clone()).or_default();
            while window
                .front()
                .is_some_and(|&at| at + rate.per <= now || at > now)
            {
                window.pop_front();
            }
            // A check's requests go together: one that costs more than the
            // whole window (an Amperity mint and its call, against one a
            // second) waits for an empty window, never for ever.
            if !window.is_empty() && window.len() + cost as usize > rate.requests as usize {
                return false;
            }
            window.extend(std::iter::repeat_n(now, cost as usize));
        }
        *self.in_flight.entry(key).or_default() += 1;
        true
    }

    fn release(&mut self, provider: Provider, unit: &str) {
        let key = (provider, unit.to_owned());
        if let Some(n) = self.in_flight.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(&key);
            }
        }
    }

    fn backing_off(&self, provider: Provider, now: SystemTime) -> Option<Duration> {
        let (until, _) = self.back_off.get(&provider)?;
        until.duration_since(now).ok().filter(|d| !d.is_zero())
    }

    /// After a check of `provider` that ended in `v`.
    fn answered(&mut self, provider: Provider, v: &Validation, now: SystemTime) {
        if v.provider_status == 429 {
            if self.backing_off(provider, now).is_some() {
                // Checks started before the first 429: that strike's
                // back-off stands, neither ended nor lengthened.
                return;
            }
            let asked = Duration::from_secs(v.retry_after_seconds.into()).max(BACK_OFF_MIN);
            let strikes = self.back_off.get(&provider).map_or(0, |(_, n)| *n) + 1;
            let wait = asked
                .saturating_mul(1 << (strikes - 1).min(10))
                .min(BACK_OFF_MAX);
            self.back_off.insert(provider, (now + wait, strikes));
            tracing::warn!(
                provider = provider.name(),
                seconds = wait.as_secs(),
                "a provider rate-limited the health monitor; its checks pause"
            );
        } else if v.provider_status != 0 && self.backing_off(provider, now).is_none() {
            // An answer to a check started before a 429 ends nothing.
            self.back_off.remove(&provider);
        }
    }

    /// Drops windows that hold nothing recent.
    fn tidy(&mut self, now: SystemTime) {
        self.started.retain(|(provider, _), window| {
            let per = provider
                .spec()
                .monitor
                .rate
                .map_or(Duration::ZERO, |r| r.per);
            window.back().is_some_and(|&at| at + per > now)
        });
    }
}

/// A check the monitor started.
struct Started {
    target: CredentialRef,
    unit: String,
}

/// The monitor of one vault.
struct Monitor {
    vault: Arc<Vault>,
    schedule: Schedule,
    budgets: Budgets,
    checks: JoinSet<(Started, Result<Validation, VaultError>)>,
    running: HashSet<CredentialRef>,
    /// Connections whose check failed (a row that fails its binding, a
    /// database error), left alone until then: not a warning every pass.
    failed: HashMap<CredentialRef, SystemTime>,
}

impl Monitor {
    /// Starts the checks due now that the budgets allow.
    async fn pass(&mut self) -> Result<(), VaultError> {
        let now = self.vault.clock.now();
        let (settled, unsettled, stored) = self.schedule.candidates(now);
        let mut due: Vec<(SystemTime, Watched)> = self
            .vault
            .store
            .monitor_due(settled, unsettled, stored)
            .await?
            .into_iter()
            .map(|row| (self.schedule.due(&row), row))
            .filter(|(at, _)| *at <= now)
            .collect();
        due.sort_by_key(|(at, _)| *at);
        self.budgets.tidy(now);
        self.failed.retain(|_, until| *until > now);
        let mut waiting: BTreeMap<&'static str, u64> =
            Provider::ALL.iter().map(|p| (p.name(), 0)).collect();
        for (_, row) in due {
            let Ok(target) = CredentialRef::parse(&row.workspace_id, &row.provider) else {
                continue;
            };
            if self.running.contains(&target) || self.failed.contains_key(&target) {
                continue;
            }
            let provider = target.provider;
            if self.checks.len() >= IN_FLIGHT || self.budgets.backing_off(provider, now).is_some() {
                *waiting.entry(provider.name()).or_default() += 1;
                continue;
            }
            let Some(record) = self
                .vault
                .store
                .get(&row.workspace_id, &row.provider)
                .await?
            else {
                continue;
            };
            // Validated (by another replica) or stored again since the scan:
            // the next pass sees its new schedule.
            if record.status != StoredStatus::Connected
                || record.last_validation != row.last_validation
            {
                continue;
            }
            let unit = quota_unit(&target, &record);
            if !self
                .budgets
                .take(provider, &unit, cost(provider, &record), now)
            {
                *waiting.entry(provider.name()).or_default() += 1;
                continue;
            }
            self.running.insert(target.clone());
            let vault = Arc::clone(&self.vault);
            self.checks.spawn(async move {
                let result = vault.revalidate(&target, record).await;
                (Started { target, unit }, result)
            });
        }
        let mut progress = self.vault.monitor_lock();
        progress.due = waiting;
        progress.backing_off = Provider::ALL
            .iter()
            .map(|p| {
                let left = self.budgets.backing_off(*p, now).unwrap_or_default();
                (p.name(), left.as_secs())
            })
            .collect();
        progress.in_flight = self.checks.len() as u64;
        progress.passes += 1;
        Ok(())
    }

    fn finished(&mut self, started: Started, result: Result<Validation, VaultError>) {
        let provider = started.target.provider;
        self.running.remove(&started.target);
        self.budgets.release(provider, &started.unit);
        self.vault.monitor_lock().in_flight = self.checks.len() as u64;
        match result {
            Ok(v) => {
                let now = self.vault.clock.now();
                self.budgets.answered(provider, &v, now);
                let left = self.budgets.backing_off(provider, now).unwrap_or_default();
                let mut progress = self.vault.monitor_lock();
                progress.backing_off.insert(provider.name(), left.as_secs());
                *progress
                    .checks
                    .entry((provider.name(), v.verdict.name()))
                    .or_default() += 1;
            }
            Err(e) => {
                let retry = self.schedule.retry;
                tracing::warn!(
                    workspace = %started.target.workspace_id,
                    provider = provider.name(),
                    error = %e,
                    retry_in = %humantime::format_duration(retry),
                    "the health monitor could not check a connection"
                );
                self.failed
                    .insert(started.target, self.vault.clock.now() + retry);
            }
        }
    }
}

/// What a connection's checks count against: the param its provider's
/// quota is counted per (a number in one spelling: `007` is `7`), or the
/// fingerprint of its key.
fn quota_unit(target: &CredentialRef, record: &CredentialRecord) -> String {
    match target.provider.spec().monitor.unit {
        QuotaUnit::Param(param) => {
            let value = record.params.get(param).map_or("", String::as_str);
            match value.parse::<u64>() {
                Ok(n) if value.bytes().all(|b| b.is_ascii_digit()) => n.to_string(),
                _ => value.to_owned(),
            }
        }
        QuotaUnit::Secret(field) => record
            .secrets
            .iter()
            .find(|s| s.field == field)
            .map_or_else(
                || format!("{}/{}", target.workspace_id, target.provider),
                |s| format!("key {}", s.fingerprint),
            ),
    }
}

/// How many requests a check of `record` makes, at most: the validating
/// call, the permissions call where the provider has one, and a mint.
fn cost(provider: Provider, record: &CredentialRecord) -> u32 {
    let spec = provider.spec();
    1 + u32::from(spec.validation.permissions.is_some())
        + u32::from(spec.mint.is_some_and(|m| (m.applies)(&record.params)))
}

impl Vault {
    /// One check by the health monitor: as a caller's Validate, with the
    /// vault's own identity, recorded only over the verdict read here.
    async fn revalidate(
        &self,
        target: &CredentialRef,
        record: CredentialRecord,
    ) -> Result<Validation, VaultError> {
        let details = record_details(&record);
        let context = system_context(target, REVALIDATE_METHOD);
        self.check_record(target, record, &context, &details).await
    }

    /// What the health monitor has done (all zero while it is off).
    pub fn monitor_progress(&self) -> Progress {
        self.monitor_lock().clone()
    }

    fn monitor_lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.monitor.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs the health monitor every [`PASS_EVERY`] (on a manual clock: each time
/// it moves), revalidating each connection every `every`, until the vault
/// stops.
pub async fn run(vault: Arc<Vault>, every: Duration) {
    let schedule = match Schedule::new(every, vault.clock.now()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "the health monitor could not start");
            return;
        }
    };
    tracing::info!(
        every = %humantime::format_duration(every),
        "the health monitor revalidates every connection on this period"
    );
    let mut ticks = vault.clock.ticks(PASS_EVERY);
    let mut monitor = Monitor {
        vault,
        schedule,
        budgets: Budgets::default(),
        checks: JoinSet::new(),
        running: HashSet::new(),
        failed: HashMap::new(),
    };
    loop {
        if let Err(e) = monitor.pass().await {
            tracing::warn!(error = %e, "the health monitor's pass failed; trying again later");
        }
        loop {
            tokio::select! {
                () = ticks.next() => break,
                Some(done) = monitor.checks.join_next() => {
                    if let Ok((started, result)) = done {
                        monitor.finished(started, result);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(60 * 60);

    fn row(ws: &str, stored: SystemTime, validated: Option<(SystemTime, bool)>) -> Watched {
        Watched {
            workspace_id: ws.into(),
            provider: "amplitude".into(),
            updated_at: stored,
            validated_at: validated.map(|(at, _)| at),
            settled: validated.map(|(_, s)| s),
            last_validation: None,
        }
    }

    #[test]
    fn a_validated_connection_is_due_within_the_last_tenth_of_its_period() {
        let t0 = SystemTime::UNIX_EPOCH + 1000 * HOUR;
        let s = Schedule::new(24 * HOUR, t0).unwrap();
        for i in 0..200 {
            let at = t0 + HOUR;
            let due = s.due(&row(&format!("ws-{i}"), t0, Some((at, true))));
            assert!(due <= at + 24 * HOUR && due > at + 21 * HOUR, "{i}");
            let retry = s.due(&row(&format!("ws-{i}"), t0, Some((at, false))));
            assert!(retry <= at + HOUR && retry > at + HOUR - HOUR / 10, "{i}");
        }
    }

    #[test]
    fn connections_stored_at_once_or_overdue_at_start_are_spread_over_the_period() {
        let t0 = SystemTime::UNIX_EPOCH + 1000 * HOUR;
        let s = Schedule::new(24 * HOUR, t0).unwrap();
        for stored_or_validated in [t0, t0 - 100 * HOUR] {
            let mut per_hour = [0u32; 24];
            for i in 0..2400 {
                let never = row(&format!("ws-{i}"), stored_or_validated, None);
                let overdue = row(
                    &format!("ws-{i}"),
                    t0 - 200 * HOUR,
                    Some((stored_or_validated - 30 * HOUR, true)),
                );
                for r in [never, overdue] {
                    let due = s.due(&r);
                    let after = due.duration_since(t0).unwrap();
                    assert!(after < 24 * HOUR);
                    per_hour[(after.as_secs() / 3600) as usize] += 1;
                }
            }
            // 200 an hour on average: none close to a burst.
            assert!(
                per_hour.iter().all(|&n| (120..=280).contains(&n)),
                "{per_hour:?}"
            );
        }
    }

    #[test]
    fn replicas_jitter_differently() {
        let t0 = SystemTime::UNIX_EPOCH + 1000 * HOUR;
        let (a, b) = (
            Schedule::new(24 * HOUR, t0).unwrap(),
            Schedule::new(24 * HOUR, t0).unwrap(),
        );
        let r = row("ws", t0, Some((t0, true)));
        let differ = (0..20)
            .map(|i| row(&format!("ws-{i}"), t0, Some((t0, true))))
            .filter(|r| a.due(r) != b.due(r))
            .count();
        assert!(differ >= 19, "{differ}");
        assert_eq!(a.due(&r), a.due(&r));
    }

    fn record(ws: &str, provider: &str, params: &[(&str, &str)], key: &str) -> CredentialRecord {
        CredentialRecord {
            workspace_id: ws.into(),
            provider: provider.into(),
            params: params
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            status: StoredStatus::Connected,
            created_at: SystemTime::UNIX_EPOCH,
            updated_at: SystemTime::UNIX_EPOCH,
            disconnected_at: None,
            expires_at: None,
            data_key: None,
            secrets: vec![crate::store::SecretRecord {
                field: "api_key".into(),
                sealed: crate::crypto::Sealed {
                    nonce: [0; crate::crypto::NONCE_LEN],
                    ciphertext: Vec::new(),
                },
                hint: String::new(),
                fingerprint: key.into(),
            }],
            last_validation: None,
            binding: None,
        }
    }

    #[test]
    fn a_quota_unit_is_the_providers_not_the_workspaces() {
        let unit = |ws: &str, provider: &str, params: &[(&str, &str)], key: &str| {
            let target = CredentialRef::parse(ws, provider).unwrap();
            quota_unit(&target, &record(ws, provider, params, key))
        };
        // One Amplitude key stored by two workspaces is one project (review:
        // each workspace had its own budget).
        assert_eq!(
            unit("ws-1", "amplitude", &[], "abcd1234"),
            unit("ws-2", "amplitude", &[], "abcd1234")
        );
        assert_ne!(
            unit("ws-1", "amplitude", &[], "abcd1234"),
            unit("ws-1", "amplitude", &[], "ffff0000")
        );
        // One PostHog team, however its number is written (review: `007`
        // had a budget of its own).
        for spelling in ["7", "07", "007"] {
            assert_eq!(
                unit("ws-1", "posthog", &[("project_id", spelling)], ""),
                "7"
            );
        }
        assert_eq!(
            unit("ws-1", "amperity", &[("tenant_id", "acme")], ""),
            unit("ws-9", "amperity", &[("tenant_id", "acme")], "")
        );
    }

    #[test]
    fn a_change_is_a_settled_verdict_that_differs() {
        use Verdict::*;
        assert!(verdict_change(Some(Valid), Valid).is_none());
        assert!(verdict_change(None, Valid).is_none());
        assert!(verdict_change(Some(Valid), Unreachable).is_none());
        assert!(verdict_change(Some(Rejected), RateLimited).is_none());
        let broke = verdict_change(Some(Valid), Rejected).unwrap();
        assert_eq!((broke.previous.as_str(), broke.recovered), ("VALID", false));
        let back = verdict_change(Some(Expired), Valid).unwrap();
        assert_eq!((back.previous.as_str(), back.recovered), ("EXPIRED", true));
        let first = verdict_change(None, WrongRegion).unwrap();
        assert_eq!((first.previous.as_str(), first.recovered), ("", false));
    }

    #[test]
    fn budgets_bound_each_unit_and_a_429_backs_off_the_provider() {
        let t0 = SystemTime::UNIX_EPOCH + 1000 * HOUR;
        let mut b = Budgets::default();
        // PostHog: 24 requests a minute per team; a check costs 2.
        let mut taken = 0;
        for _ in 0..20 {
            if b.take(Provider::Posthog, "team-1", 2, t0) {
                taken += 1;
                b.release(Provider::Posthog, "team-1");
            }
        }
        assert_eq!(taken, 12);
        assert!(b.take(Provider::Posthog, "team-2", 2, t0));
        assert!(b.take(Provider::Posthog, "team-1", 2, t0 + Duration::from_secs(60)));
        // One in flight per unit.
        assert!(!b.take(Provider::Posthog, "team-1", 2, t0 + Duration::from_secs(61)));

        // Amperity: one request a second; a mint and its call cost two, and
        // go when the window is empty (review: they never went).
        assert!(b.take(Provider::Amperity, "acme", 2, t0));
        b.release(Provider::Amperity, "acme");
        assert!(!b.take(Provider::Amperity, "acme", 2, t0));
        assert!(b.take(Provider::Amperity, "acme", 2, t0 + Duration::from_secs(1)));

        let mut limited = Validation::answered(Verdict::RateLimited, 429, "slow down");
        limited.retry_after_seconds = 5;
        b.answered(Provider::Amplitude, &limited, t0);
        assert_eq!(b.backing_off(Provider::Amplitude, t0), Some(BACK_OFF_MIN));
        // Answers of checks started before it: the same strike, not
        // lengthened by a longer Retry-After (review: it was).
        let mut longer = limited.clone();
        longer.retry_after_seconds = 3600;
        b.answered(Provider::Amplitude, &longer, t0);
        assert_eq!(b.backing_off(Provider::Amplitude, t0), Some(BACK_OFF_MIN));
        // A check started before the 429 answers 200: the back-off holds
        // (review: it ended it).
        let ok = Validation::answered(Verdict::Valid, 200, "ok");
        b.answered(Provider::Amplitude, &ok, t0);
        assert_eq!(b.backing_off(Provider::Amplitude, t0), Some(BACK_OFF_MIN));
        // A 429 after the back-off: twice as long.
        let later = t0 + BACK_OFF_MIN;
        b.answered(Provider::Amplitude, &limited, later);
        assert_eq!(
            b.backing_off(Provider::Amplitude, later),
            Some(2 * BACK_OFF_MIN)
        );
        let after = later + 2 * BACK_OFF_MIN;
        b.answered(Provider::Amplitude, &ok, after);
        assert_eq!(b.backing_off(Provider::Amplitude, after), None);
        assert!(
            !b.back_off.contains_key(&Provider::Amplitude),
            "strikes reset"
        );
    }
}
