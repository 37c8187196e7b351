//! Access tokens the vault mints from stored client credentials (OAuth
//! client credentials): held only in memory, zeroized when dropped, shared by
//! concurrent needs of one connection, and renewed before they expire. Each
//! replica mints for itself: the grant is stateless, with no refresh token
//! to race over.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ring::hmac;
use secrecy::SecretString;

use super::CredentialRef;
use crate::providers::validation::Validation;
use crate::providers::Minted;

/// A token is renewed when this much of its life is left (at most a
/// quarter of its lifetime).
const RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);
/// A failed mint is the answer for this long: concurrent and repeated needs
/// do not each ask the token endpoint again.
const FAILURE_HOLD: Duration = Duration::from_secs(10);

/// The tokens minted so far, by connection.
pub(super) struct Minter {
    /// Names the credentials a token was minted from, without their value.
    key: hmac::Key,
    slots: Mutex<HashMap<CredentialRef, Arc<tokio::sync::Mutex<Option<Held>>>>>,
}

/// What a connection's slot holds.
struct Held {
    /// The credentials it came from (their keyed hash).
    from: Vec<u8>,
    outcome: Outcome,
}

enum Outcome {
    Token {
        token: SecretString,
        renew_at: SystemTime,
        expires_at: SystemTime,
    },
    Failed {
        verdict: Validation,
        until: SystemTime,
    },
}

impl Minter {
    pub(super) fn new() -> Result<Self, crate::crypto::CryptoError> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| crate::crypto::CryptoError::Random)?;
        Ok(Self {
            key,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// The token for `target` minted from `credentials`: the one held if it
    /// is not due for renewal at `now`, else a new one from `mint`.
    /// Concurrent callers for one connection wait for one mint.
    pub(super) async fn token<F, Fut>(
        &self,
        target: &CredentialRef,
        credentials: &[&[u8]],
        now: SystemTime,
        mint: F,
    ) -> Result<SecretString, Validation>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Minted, Validation>>,
    {
        let mut context = hmac::Context::with_key(&self.key);
        for part in credentials {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        let from = context.sign().as_ref().to_vec();
        let slot = Arc::clone(self.lock().entry(target.clone()).or_default());
        let mut held = slot.lock().await;
        if let Some(h) = held.as_ref().filter(|h| h.from == from) {
            match &h.outcome {
                Outcome::Token {
                    token, renew_at, ..
                } if now < *renew_at => return Ok(token.clone()),
                Outcome::Failed { verdict, until } if now < *until => return Err(verdict.clone()),
                _ => {}
            }
        }
        // Whatever was held goes before anything new is asked for.
        *held = None;
        let outcome = match mint().await {
            Ok(minted) => {
                let margin = (minted.lifetime / 4).min(RENEW_BEFORE);
                Outcome::Token {
                    token: minted.token,
                    renew_at: now + minted.lifetime - margin,
                    expires_at: now + minted.lifetime,
                }
            }
            Err(verdict) => Outcome::Failed {
                verdict,
                until: now + FAILURE_HOLD,
            },
        };
        let result = match &outcome {
            Outcome::Token { token, .. } => Ok(token.clone()),
            Outcome::Failed { verdict, .. } => Err(verdict.clone()),
        };
        *held = Some(Held { from, outcome });
        result
    }

    /// Drops what is held for `target`: its credentials changed or were
    /// destroyed.
    pub(super) fn forget(&self, target: &CredentialRef) {
        self.lock().remove(target);
    }

    /// Drops every token that has expired at `now` and every failure past
    /// its hold, so that no token outlives its use in memory.
    pub(super) fn sweep(&self, now: SystemTime) {
        self.lock().retain(|_, slot| {
            // A slot in use is kept: its holder decides.
            let Ok(held) = slot.try_lock() else {
                return true;
            };
            held.as_ref().is_some_and(|h| match &h.outcome {
                Outcome::Token { expires_at, .. } => now < *expires_at,
                Outcome::Failed { until, .. } => now < *until,
            })
        });
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<CredentialRef, Arc<tokio::sync::Mutex<Option<Held>>>>>
    {
        // The map holds no invariant a panic could break halfway.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}
