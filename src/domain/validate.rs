//! ValidateConnection: the vault calls the provider with the credentials it holds and turns the answer into a verdict.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use secrecy::ExposeSecret;
use tokio::sync::OnceCell;

use super::CredentialRef;
use crate::config::ProvidersConfig;
use crate::outbound::{parse_base_url, Outbound, Unreachable};
use crate::providers::validation::{Validation, Verdict};
use crate::providers::{Params, Provider, Secrets};

/// Secrets shorter than this are not searched for in provider text: too many
/// false hits, and no provider key is that short.
const MIN_SCRUB_LEN: usize = 6;

/// Provider calls, shared between concurrent validations, with rate-limit memory.
pub(super) struct Validator {
    outbound: Outbound,
    base_urls: ProvidersConfig,
    in_flight: Mutex<HashMap<CredentialRef, Arc<OnceCell<Validation>>>>,
    rate_limited_until: Mutex<HashMap<CredentialRef, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps hold no invariant a panic could break halfway.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Validator {
    pub(super) fn new(outbound: Outbound, providers: &ProvidersConfig) -> Self {
        Self {
            outbound,
            base_urls: providers.with_defaults(),
            in_flight: Mutex::new(HashMap::new()),
            rate_limited_until: Mutex::new(HashMap::new()),
        }
    }

    /// The validation already under way for `target`, or a new slot for one:
    /// concurrent validations of one connection share one provider call.
    pub(super) fn join(&self, target: &CredentialRef) -> Arc<OnceCell<Validation>> {
        lock(&self.in_flight)
            .entry(target.clone())
            .or_default()
            .clone()
    }

    pub(super) fn leave(&self, target: &CredentialRef, slot: &Arc<OnceCell<Validation>>) {
        let mut map = lock(&self.in_flight);
        if map.get(target).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            map.remove(target);
        }
    }

    /// RATE_LIMITED without a provider call while a 429's Retry-After lasts.
    pub(super) fn rate_limited(&self, target: &CredentialRef) -> Option<Validation> {
        let mut map = lock(&self.rate_limited_until);
        let until = *map.get(target)?;
        let now = Instant::now();
        if until <= now {
            map.remove(target);
            return None;
        }
        let secs = u32::try_from((until - now).as_secs().max(1)).unwrap_or(u32::MAX);
        Some(Validation {
            retry_after_seconds: secs,
            ..Validation::new(
                Verdict::RateLimited,
                format!(
                    "{} rate-limited these credentials recently; not calling it again for {secs} s",
                    target.provider.spec().display_name
                ),
            )
        })
    }

    /// Calls the provider with these credentials on the stored region or host;
    /// where the provider answers a wrong region like a bad key, tries the
    /// other regions once to tell the two apart.
    pub(super) async fn check(
        &self,
        target: &CredentialRef,
        secrets: &Secrets,
        params: &Params,
    ) -> Validation {
        if let Some(limited) = self.rate_limited(target) {
            return limited;
        }
        let started = Instant::now();
        let provider = target.provider;
        let spec = &provider.spec().validation;
        let key = params.get(spec.base_url_param).map_or("", String::as_str);
        let mut v = self.attempt(provider, key, secrets, params).await;
        if v.verdict == Verdict::Rejected && spec.wrong_region_on.contains(&v.provider_status) {
            for (other, _) in spec.base_urls.iter().filter(|(k, _)| *k != key) {
                let alt = self.attempt(provider, other, secrets, params).await;
                if alt.verdict == Verdict::Valid {
                    v = Validation {
                        verdict: Verdict::WrongRegion,
                        suggested_region: (*other).to_owned(),
                        display_name: alt.display_name,
                        message: format!(
                            "{} refused the credentials in region {key} but accepted them in \
                             region {other}; store them again with region={other}",
                            provider.spec().display_name
                        ),
                        ..v
                    };
                    break;
                }
            }
        }
        if v.verdict == Verdict::RateLimited {
            let until = Instant::now() + Duration::from_secs(v.retry_after_seconds.into());
            lock(&self.rate_limited_until).insert(target.clone(), until);
        }
        v.checked_at = SystemTime::now();
        v.duration_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
        scrub(&mut v, secrets);
        v
    }

    async fn attempt(
        &self,
        provider: Provider,
        key: &str,
        secrets: &Secrets,
        params: &Params,
    ) -> Validation {
        let spec = &provider.spec().validation;
        let name = provider.spec().display_name;
        // `with_defaults` wrote out every key the provider declares.
        let template = self
            .base_urls
            .get(provider)
            .base_urls
            .get(key)
            .map_or("", String::as_str);
        let tenant = params.get("tenant_id").map_or("", String::as_str);
        let base = match parse_base_url(template, tenant) {
            Ok(url) => url,
            Err(why) => {
                return Validation::new(
                    Verdict::Unreachable,
                    format!("the configured {name} base URL for `{key}` is unusable: {why}"),
                )
            }
        };
        match self
            .outbound
            .call(provider, &base, (spec.probe)(secrets, params))
            .await
        {
            Ok(answer) => (spec.interpret)(&answer, params),
            Err(Unreachable(why)) => Validation::new(
                Verdict::Unreachable,
                format!("couldn't reach {name}: {why}"),
            ),
        }
    }
}

/// Removes any secret value a provider echoed into text the caller will see.
fn scrub(v: &mut Validation, secrets: &Secrets) {
    for secret in secrets.values() {
        let secret = secret.expose_secret();
        if secret.len() < MIN_SCRUB_LEN {
            continue;
        }
        for text in [&mut v.message, &mut v.display_name] {
            if text.contains(secret) {
                *text = text.replace(secret, "[redacted]");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_echoed_secrets() {
        let secrets = Secrets::from([("k".to_owned(), "phx_CANARY123".into())]);
        let mut v = Validation::new(Verdict::InsufficientPermission, "bad key phx_CANARY123!");
        v.display_name = "phx_CANARY123".into();
        scrub(&mut v, &secrets);
        assert_eq!(v.message, "bad key [redacted]!");
        assert_eq!(v.display_name, "[redacted]");
    }
}
