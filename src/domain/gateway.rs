//! The gateway for every provider call the vault makes with a connection's
//! credentials: ValidateConnection's checks (turning answers into verdicts),
//! Proxy's calls, and token mints, with the rate-limit memory they share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use secrecy::ExposeSecret;
use tokio::sync::OnceCell;

use super::CredentialRef;
use crate::config::ProvidersConfig;
use crate::outbound::{parse_base_url, scrub, Outbound, Scrubber, Unreachable};
use crate::providers::validation::{Validation, Verdict};
use crate::providers::{Params, Provider, Secrets};

/// Provider calls, for validation and proxy alike, with the per-connection
/// rate-limit memory both share.
pub(super) struct Gateway {
    outbound: Outbound,
    /// Tokens minted from stored client credentials.
    minter: super::mint::Minter,
    base_urls: ProvidersConfig,
    in_flight: Mutex<HashMap<CredentialRef, Arc<OnceCell<Validation>>>>,
    rate_limited_until: Mutex<HashMap<CredentialRef, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps hold no invariant a panic could break halfway.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Gateway {
    pub(super) fn new(
        outbound: Outbound,
        providers: &ProvidersConfig,
    ) -> Result<Self, crate::crypto::CryptoError> {
        Ok(Self {
            outbound,
            minter: super::mint::Minter::new()?,
            base_urls: providers.with_defaults(),
            in_flight: Mutex::new(HashMap::new()),
            rate_limited_until: Mutex::new(HashMap::new()),
        })
    }

    /// Drops any token minted for `target` (its credentials changed or were
    /// destroyed).
    pub(super) fn forget_token(&self, target: &CredentialRef) {
        self.minter.forget(target);
    }

    /// Drops the minted tokens that expired by `now`.
    pub(super) fn sweep_tokens(&self, now: SystemTime) {
        self.minter.sweep(now);
    }

    /// The secrets a call to the provider carries: for a connection that
    /// mints (client credentials), a token minted at most once for all
    /// concurrent needs, or the verdict of the failed mint; otherwise `None`:
    /// the stored secrets themselves.
    pub(super) async fn call_secrets(
        &self,
        target: &CredentialRef,
        secrets: &Secrets,
        params: &Params,
        now: SystemTime,
    ) -> Result<Option<Secrets>, Validation> {
        let provider = target.provider;
        let Some(mint) = provider.spec().mint.filter(|m| (m.applies)(params)) else {
            return Ok(None);
        };
        let mut credentials: Vec<&[u8]> = secrets
            .iter()
            .flat_map(|(k, v)| [k.as_bytes(), v.expose_secret().as_bytes()])
            .collect();
        credentials.extend(
            params
                .iter()
                .flat_map(|(k, v)| [k.as_bytes(), v.as_bytes()]),
        );
        let token = self
            .minter
            .token(target, &credentials, now, || {
                self.mint(provider, mint, secrets, params)
            })
            .await?;
        Ok(Some(Secrets::from([(mint.token_field.to_owned(), token)])))
    }

    /// One request to the provider's token endpoint.
    async fn mint(
        &self,
        provider: Provider,
        mint: &crate::providers::MintSpec,
        secrets: &Secrets,
        params: &Params,
    ) -> Result<crate::providers::Minted, Validation> {
        let name = provider.spec().display_name;
        let base = self
            .base_url_for(provider, mint.base_url_key, params)
            .map_err(|why| Validation::new(Verdict::Unreachable, why))?;
        let mut request = (mint.request)(secrets, params);
        let scrubber = masking(secrets);
        let outgoing = crate::outbound::Outgoing {
            method: http::Method::POST,
            path_and_query: request.path.to_owned(),
            headers: request.headers,
            body: std::mem::take(&mut *request.body),
            max_response: 64 * 1024,
        };
        let answer = self
            .outbound
            .ask(provider, &base, outgoing, &scrubber)
            .await
            .map_err(|Unreachable(why)| {
                Validation::new(
                    Verdict::Unreachable,
                    format!("couldn't reach {name}'s token endpoint: {why}"),
                )
            })?;
        (mint.read)(&answer)
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

    pub(super) fn outbound(&self) -> &Outbound {
        &self.outbound
    }

    /// What the configuration says about `provider`, defaults filled in.
    pub(super) fn configured(&self, provider: Provider) -> &crate::config::ProviderConfig {
        self.base_urls.get(provider)
    }

    /// Seconds left of the cool-down a 429 started for `target`, if any.
    pub(super) fn cooling_down(&self, target: &CredentialRef) -> Option<u32> {
        let mut map = lock(&self.rate_limited_until);
        let until = *map.get(target)?;
        let now = Instant::now();
        if until <= now {
            map.remove(target);
            return None;
        }
        Some(u32::try_from((until - now).as_secs().max(1)).unwrap_or(u32::MAX))
    }

    /// After a 429: no call with these credentials for `seconds`.
    pub(super) fn cool_down(&self, target: &CredentialRef, seconds: u32) {
        let until = Instant::now() + Duration::from_secs(seconds.into());
        lock(&self.rate_limited_until).insert(target.clone(), until);
    }

    /// The configured base URL for the connection's region or host.
    pub(super) fn base_url(&self, provider: Provider, params: &Params) -> Result<url::Url, String> {
        let key = params
            .get(provider.spec().validation.base_url_param)
            .map_or("", String::as_str);
        self.base_url_for(provider, key, params)
    }

    fn base_url_for(
        &self,
        provider: Provider,
        key: &str,
        params: &Params,
    ) -> Result<url::Url, String> {
        // `with_defaults` wrote out every key the provider declares.
        let template = self
            .base_urls
            .get(provider)
            .base_urls
            .get(key)
            .map_or("", String::as_str);
        let tenant = params.get("tenant_id").map_or("", String::as_str);
        parse_base_url(template, tenant).map_err(|why| {
            format!(
                "the configured {} base URL for `{key}` is unusable: {why}",
                provider.spec().display_name
            )
        })
    }

    /// RATE_LIMITED without a provider call while a 429's Retry-After lasts.
    pub(super) fn rate_limited(&self, target: &CredentialRef) -> Option<Validation> {
        let secs = self.cooling_down(target)?;
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
        now: SystemTime,
    ) -> Validation {
        if let Some(limited) = self.rate_limited(target) {
            return limited;
        }
        let started = Instant::now();
        let (mut v, minted) = match self.call_secrets(target, secrets, params, now).await {
            Ok(minted) => {
                let call = minted.as_ref().unwrap_or(secrets);
                (self.check_with(target, call, params).await, minted)
            }
            // A failed mint is the verdict: the token endpoint refused the
            // secret, or did not answer.
            Err(failed) => (failed, None),
        };
        if v.verdict == Verdict::RateLimited {
            self.cool_down(target, v.retry_after_seconds);
        }
        v.checked_at = SystemTime::now();
        v.duration_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
        scrub(&mut v, secrets);
        if let Some(minted) = &minted {
            scrub(&mut v, minted);
        }
        v
    }

    /// The validating call with `secrets` (stored, or a minted token), on the
    /// stored region or host, and on the others where that tells a wrong
    /// region from a bad key.
    async fn check_with(
        &self,
        target: &CredentialRef,
        secrets: &Secrets,
        params: &Params,
    ) -> Validation {
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
        v
    }

    async fn attempt(
        &self,
        provider: Provider,
        key: &str,
        secrets: &Secrets,
        params: &Params,
    ) -> Validation {
        let spec = provider.spec();
        let name = spec.display_name;
        let base = match self.base_url_for(provider, key, params) {
            Ok(url) => url,
            Err(why) => return Validation::new(Verdict::Unreachable, why),
        };
        let probe = spec.probe(secrets, params);
        let mut scrubber = masking(secrets);
        for h in &probe.headers {
            scrubber.header(h);
        }
        let first = match self.outbound.call(provider, &base, probe, &scrubber).await {
            Ok(answer) => (spec.validation.interpret)(&answer, params),
            Err(Unreachable(why)) => {
                return Validation::new(
                    Verdict::Unreachable,
                    format!("couldn't reach {name}: {why}"),
                )
            }
        };
        match &spec.validation.permissions {
            Some(permissions) if first.verdict == Verdict::Valid => self
                .judge_permissions(provider, permissions, &base, secrets, params, &scrubber)
                .await
                .map_or(first.clone(), |judged| Validation {
                    display_name: first.display_name,
                    ..judged
                }),
            _ => first,
        }
    }

    /// Asks the provider what a valid credential may do, for the calls this
    /// vault makes with it; `None` when the answer cannot tell.
    async fn judge_permissions(
        &self,
        provider: Provider,
        permissions: &crate::providers::Permissions,
        base: &url::Url,
        secrets: &Secrets,
        params: &Params,
        scrubber: &Scrubber,
    ) -> Option<Validation> {
        let spec = provider.spec();
        let allowed = self.configured(provider);
        let routes: Vec<&'static crate::providers::Route> =
            spec.routes.iter().filter(|r| allowed.proxies(r)).collect();
        let probe = crate::providers::validation::Probe {
            path_and_query: (permissions.path)(params),
            headers: (spec.auth)(secrets, params),
        };
        let answer = self
            .outbound
            .call(provider, base, probe, scrubber)
            .await
            .ok()?;
        if answer.status == 429 {
            // The check is not complete, and the provider said why: the
            // monitor must back off, and the caller may ask again later
            // (review: the first call's 200 stood, and ended the back-off).
            return Some(crate::providers::validation::rate_limited(
                &answer,
                spec.display_name,
            ));
        }
        (permissions.judge)(&answer, params, &routes)
    }
}

/// A scrubber that masks each of `secrets`, in every form it searches.
fn masking(secrets: &Secrets) -> Scrubber {
    let mut scrubber = Scrubber::new();
    for secret in secrets.values() {
        scrubber.secret(secret.expose_secret().as_bytes(), scrub::MASK);
    }
    scrubber
}

/// Removes any secret value a provider echoed into text the caller will see.
fn scrub(v: &mut Validation, secrets: &Secrets) {
    let scrubber = masking(secrets);
    scrubber.scrub_str(&mut v.message);
    scrubber.scrub_str(&mut v.display_name);
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
