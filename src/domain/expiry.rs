//! Connections over time: which stored credentials expire soon, counted by
//! provider for the metrics, and announced once per connection and threshold
//! in the audit chain, so that the audit consumer's stream carries it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{CredentialRef, Vault, VaultError};
use crate::audit::{self, Event};
use crate::providers::Provider;
use crate::store::{Expiring, ExpiryNotice};

/// The method of the vault's own expiry notices (identity `credvault`).
pub const EXPIRY_METHOD: &str = "Monitor.Expiry";
/// How often the vault looks for credentials nearing their expiry.
pub const CHECK_EVERY: Duration = Duration::from_secs(60);

const DAY: u64 = 24 * 60 * 60;

/// A point before a credential's expiry that is announced once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    /// As metrics and notices name it: `30d`, `7d`, `1d`, `expired`.
    pub name: &'static str,
    /// How long before the expiry it begins.
    pub before: Duration,
}

/// The thresholds, farthest first; the last is the expiry itself.
pub const THRESHOLDS: [Threshold; 4] = [
    Threshold {
        name: "30d",
        before: Duration::from_secs(30 * DAY),
    },
    Threshold {
        name: "7d",
        before: Duration::from_secs(7 * DAY),
    },
    Threshold {
        name: "1d",
        before: Duration::from_secs(DAY),
    },
    Threshold {
        name: "expired",
        before: Duration::ZERO,
    },
];

/// How many connections of one provider are within each threshold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProviderExpiry {
    /// By [`THRESHOLDS`] (index 0: `30d`): connections not yet expired that
    /// expire within it. A connection within `1d` is also within `7d` and
    /// `30d`.
    pub expiring: [u64; 3],
    pub expired: u64,
}

/// [`ProviderExpiry`] for every provider, as of the last check.
pub type ExpiryCounts = BTreeMap<&'static str, ProviderExpiry>;

/// The nearest threshold that a credential expiring at `expires_at` has
/// crossed at `now`, if any.
pub fn crossed(expires_at: SystemTime, now: SystemTime) -> Option<Threshold> {
    let left = expires_at.duration_since(now).unwrap_or(Duration::ZERO);
    THRESHOLDS.iter().rev().find(|t| left <= t.before).copied()
}

impl Vault {
    /// Counts the connections within each threshold, and writes each notice
    /// not yet written (by this replica or another) to the audit chain.
    pub async fn check_expiry(&self) -> Result<ExpiryCounts, VaultError> {
        let now = self.clock.now();
        let horizon = now
            .checked_add(THRESHOLDS[0].before)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut counts: ExpiryCounts = Provider::ALL
            .iter()
            .map(|p| (p.name(), ProviderExpiry::default()))
            .collect();
        for row in self.store.expiring(horizon).await? {
            let Some(threshold) = crossed(row.expires_at, now) else {
                continue;
            };
            // The expiry is bound to the connection's key with its params:
            // one a database writer edited is neither counted nor announced
            // (review round 3: it forged a signed notice).
            if !self.expiry_is_bound(&row).await {
                continue;
            }
            if let Some(c) = Provider::ALL
                .iter()
                .find(|p| p.name() == row.provider)
                .and_then(|p| counts.get_mut(p.name()))
            {
                count(c, threshold);
            }
            self.announce(&row, threshold).await?;
        }
        *self.expiry_lock() = counts.clone();
        Ok(counts)
    }

    /// Whether `row`'s expiry is the one bound to its connection's data key.
    async fn expiry_is_bound(&self, row: &Expiring) -> bool {
        let Ok(target) = CredentialRef::parse(&row.workspace_id, &row.provider) else {
            return false;
        };
        let Ok(Some(record)) = self.store.get(&row.workspace_id, &row.provider).await else {
            return false;
        };
        let Some(wrapped) = &record.data_key else {
            return false;
        };
        if record.expires_at != Some(row.expires_at) {
            // Stored again meanwhile: the next check sees the new expiry.
            return false;
        }
        if self.know_key_version(&record).await.is_err() {
            return false;
        }
        self.bound_data_key(&target, &record, wrapped).is_ok()
    }

    /// The counts of the last [`Vault::check_expiry`].
    pub fn expiry_counts(&self) -> ExpiryCounts {
        self.expiry_lock().clone()
    }

    fn expiry_lock(&self) -> std::sync::MutexGuard<'_, ExpiryCounts> {
        self.expiry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the notice that `row` crossed `threshold`, unless one as near
    /// was written for its current expiry.
    async fn announce(&self, row: &Expiring, threshold: Threshold) -> Result<(), VaultError> {
        let notice = ExpiryNotice {
            expires_at: row.expires_at,
            within_seconds: i64::try_from(threshold.before.as_secs()).unwrap_or(i64::MAX),
        };
        let written = row.notice.is_some_and(|last| {
            last.expires_at == notice.expires_at && last.within_seconds <= notice.within_seconds
        });
        if written {
            return Ok(());
        }
        let context = audit::Context {
            identity: audit::VAULT_IDENTITY.into(),
            method: EXPIRY_METHOD.into(),
            workspace_id: row.workspace_id.clone(),
            provider: row.provider.clone(),
            request_id: String::new(),
        };
        let event = Event::new(
            &context,
            audit::OUTCOME_OK,
            audit::Details {
                expiry: Some(audit::Expiry {
                    within: threshold.name.into(),
                    expires_at_ms: crate::store::millis(row.expires_at),
                }),
                ..audit::Details::default()
            },
        );
        let noted = self
            .store
            .note_expiry(&row.workspace_id, &row.provider, notice, event)
            .await?;
        if let Some(stored) = noted {
            self.audit.appended(&stored);
            tracing::info!(
                workspace = %row.workspace_id,
                provider = %row.provider,
                within = threshold.name,
                "a stored credential nears its expiry"
            );
        }
        Ok(())
    }
}

fn count(c: &mut ProviderExpiry, threshold: Threshold) {
    if threshold.before.is_zero() {
        c.expired += 1;
        return;
    }
    for (i, t) in THRESHOLDS[..3].iter().enumerate() {
        if threshold.before <= t.before {
            c.expiring[i] += 1;
        }
    }
}

/// Checks expiry on start-up and every [`CHECK_EVERY`] (on a manual clock:
/// each time it moves), until the vault stops; drops expired minted tokens
/// on the same beat.
pub async fn run(vault: Arc<Vault>) {
    let mut ticks = vault.clock.ticks(CHECK_EVERY);
    loop {
        // Minted tokens past their expiry leave memory too.
        vault.gateway.sweep_tokens(vault.clock.now());
        if let Err(e) = vault.check_expiry().await {
            tracing::warn!(error = %e, "checking credentials' expiry failed; trying again later");
        }
        ticks.next().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_threshold_crossed() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 * DAY);
        let at = |days: u64, secs: i64| {
            let base = now + Duration::from_secs(days * DAY);
            if secs >= 0 {
                base + Duration::from_secs(secs.unsigned_abs())
            } else {
                base - Duration::from_secs(secs.unsigned_abs())
            }
        };
        assert_eq!(crossed(at(31, 0), now), None);
        assert_eq!(crossed(at(30, 1), now), None);
        assert_eq!(crossed(at(30, 0), now).unwrap().name, "30d");
        assert_eq!(crossed(at(7, 1), now).unwrap().name, "30d");
        assert_eq!(crossed(at(7, 0), now).unwrap().name, "7d");
        assert_eq!(crossed(at(1, 0), now).unwrap().name, "1d");
        assert_eq!(crossed(at(0, 1), now).unwrap().name, "1d");
        assert_eq!(crossed(now, now).unwrap().name, "expired");
        assert_eq!(crossed(at(0, -5), now).unwrap().name, "expired");
    }

    #[test]
    fn a_connection_within_one_day_counts_in_every_wider_window() {
        let mut c = ProviderExpiry::default();
        count(&mut c, THRESHOLDS[2]);
        count(&mut c, THRESHOLDS[1]);
        count(&mut c, THRESHOLDS[0]);
        count(&mut c, THRESHOLDS[3]);
        assert_eq!(c.expiring, [3, 2, 1]);
        assert_eq!(c.expired, 1);
    }
}
