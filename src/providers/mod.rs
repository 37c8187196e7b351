//! The providers the vault knows: one module each, declaring its fields, the checks its
//! values must pass, how it is validated, its Proxy routes, its mint and its monitor budget.

mod amperity;
mod amplitude;
mod posthog;
pub mod routes;
pub mod validation;

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use secrecy::SecretString;

pub use routes::Route;
use validation::{Answer, Probe, ProbeHeader, Validation};

/// A provider the vault can hold credentials for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Provider {
    Amplitude,
    Amperity,
    Posthog,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::Amplitude, Provider::Amperity, Provider::Posthog];

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    pub fn spec(self) -> &'static ProviderSpec {
        match self {
            Provider::Amplitude => &amplitude::SPEC,
            Provider::Amperity => &amperity::SPEC,
            Provider::Posthog => &posthog::SPEC,
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether `label` can be one DNS label of a host name: lowercase letters,
/// digits and inner hyphens, 1 to 63 of them. A stored value that fills a
/// host name template must be one, or it could change the host's domain.
pub fn is_host_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// What a provider's credential consists of.
#[derive(Debug)]
pub struct ProviderSpec {
    pub name: &'static str,
    pub display_name: &'static str,
    pub secrets: &'static [FieldSpec],
    pub params: &'static [FieldSpec],
    /// Provider-specific checks, run after every field passed the generic ones.
    pub check: fn(&Secrets, &Params) -> Result<Checked, Rejection>,
    /// The headers that carry the credential on every call to the provider.
    pub auth: fn(&Secrets, &Params) -> Vec<ProbeHeader>,
    pub validation: ValidationSpec,
    /// The calls Proxy may make; the configuration may narrow this, never widen it.
    pub routes: &'static [Route],
    /// Where the credential is one the vault exchanges for short-lived
    /// access tokens (OAuth client credentials), how.
    pub mint: Option<&'static MintSpec>,
    /// What the health monitor may spend of the provider's quota.
    pub monitor: MonitorBudget,
}

/// The share of a provider's quota the health monitor may use: a small
/// one, so that the product keeps the rest. Each replica keeps its own.
#[derive(Debug)]
pub struct MonitorBudget {
    /// The provider's own limit, as its documentation states it.
    pub quota: &'static str,
    /// What the quota is counted per.
    pub unit: QuotaUnit,
    /// Monitor checks in flight per unit, at most.
    pub concurrent: u32,
    /// Requests the monitor starts per unit within a window, at most
    /// (`None`: only [`MonitorBudget::concurrent`] bounds it).
    pub rate: Option<Rate>,
}

/// What a provider counts its quota per.
#[derive(Debug, Clone, Copy)]
pub enum QuotaUnit {
    /// The value of this param (a tenant, a team).
    Param(&'static str),
    /// The key stored in this secret field, known by its fingerprint (an
    /// Amplitude API key is one project, whichever workspaces store it).
    Secret(&'static str),
}

/// At most `requests` within any `per`.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub requests: u32,
    pub per: std::time::Duration,
}

/// How the vault mints an access token from a stored credential: one POST
/// to the provider's token endpoint.
#[derive(Debug)]
pub struct MintSpec {
    /// Whether a connection with these params mints (a provider may also
    /// take a stored token as is).
    pub applies: fn(&Params) -> bool,
    /// The base URL key (see [`ValidationSpec::base_urls`]) of the host that
    /// mints.
    pub base_url_key: &'static str,
    /// The request: path, headers and a form body holding the secret.
    pub request: fn(&Secrets, &Params) -> MintRequest,
    /// The minted token and its lifetime, or the verdict of a failed mint.
    pub read: fn(&Answer) -> Result<Minted, Validation>,
    /// The secret field the minted token stands in for in [`ProviderSpec::auth`].
    pub token_field: &'static str,
}

/// One token request.
pub struct MintRequest {
    pub path: &'static str,
    pub headers: Vec<ProbeHeader>,
    /// `application/x-www-form-urlencoded`; holds the secret.
    pub body: zeroize::Zeroizing<Vec<u8>>,
}

/// A minted access token. Never logged, stored or returned (its `Debug`
/// shows `[REDACTED]`).
#[derive(Debug)]
pub struct Minted {
    pub token: SecretString,
    pub lifetime: std::time::Duration,
}

impl ProviderSpec {
    /// The request that validates a credential.
    pub fn probe(&self, secrets: &Secrets, params: &Params) -> Probe {
        Probe {
            path_and_query: (self.validation.path)(params),
            headers: (self.auth)(secrets, params),
        }
    }

    /// The allowlisted route named `METHOD /template`, if there is one.
    pub fn route(&self, name: &str) -> Option<&'static Route> {
        self.routes.iter().find(|r| r.to_string() == name)
    }
}

/// How the vault checks a credential with the provider itself.
#[derive(Debug)]
pub struct ValidationSpec {
    /// Default base URLs by key; the configuration may override each.
    pub base_urls: &'static [(&'static str, &'static str)],
    /// The parameter whose value picks the base URL.
    pub base_url_param: &'static str,
    /// Answers on the stored region that make the vault try the other
    /// region(s) once, to tell a wrong region from a bad key.
    pub wrong_region_on: &'static [u16],
    /// Validation calls in flight to this provider at once, at most.
    pub max_concurrent: usize,
    /// The path and query of the GET that validates a credential.
    pub path: fn(&Params) -> String,
    /// What the provider's answer means.
    pub interpret: fn(&Answer, &Params) -> Validation,
    /// Where the provider can say what a valid credential may do: asked
    /// after a VALID answer.
    pub permissions: Option<Permissions>,
}

/// A second validating call, about what the credential may do.
#[derive(Debug)]
pub struct Permissions {
    /// The path and query of the GET.
    pub path: fn(&Params) -> String,
    /// The verdict, given the answer and the Proxy routes this vault allows
    /// for the connection; `None` when the answer cannot tell (the first
    /// verdict stands).
    pub judge: fn(&Answer, &Params, &[&'static Route]) -> Option<Validation>,
}

impl ValidationSpec {
    pub fn default_base_url(&self, key: &str) -> Option<&'static str> {
        self.base_urls
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, url)| *url)
    }
}

/// One secret field or parameter.
#[derive(Debug)]
pub struct FieldSpec {
    pub name: &'static str,
    pub description: &'static str,
    pub required: bool,
    /// For a parameter that takes one of a fixed set of values.
    pub allowed: &'static [&'static str],
    pub default: Option<&'static str>,
    pub max_bytes: usize,
}

impl FieldSpec {
    /// A field that must be given, with no fixed set of values.
    const fn required(name: &'static str, description: &'static str, max_bytes: usize) -> Self {
        Self {
            name,
            description,
            required: true,
            allowed: &[],
            default: None,
            max_bytes,
        }
    }

    /// A field that one shape of the credential needs and another does not
    /// (the provider's `check` says which).
    const fn optional(name: &'static str, description: &'static str, max_bytes: usize) -> Self {
        Self {
            required: false,
            ..Self::required(name, description, max_bytes)
        }
    }

    const fn choice(
        name: &'static str,
        description: &'static str,
        allowed: &'static [&'static str],
        default: &'static str,
    ) -> Self {
        Self {
            name,
            description,
            required: false,
            allowed,
            default: Some(default),
            max_bytes: 32,
        }
    }
}

/// Secret values by field name, already through the generic checks.
pub type Secrets = BTreeMap<String, SecretString>;
/// Parameter values by name, defaults filled in, already through the generic checks.
pub type Params = BTreeMap<String, String>;

/// What the provider's own checks learned from a credential.
#[derive(Debug, Default)]
pub struct Checked {
    /// When the secret stops working, where the credential itself says so.
    pub expires_at: Option<SystemTime>,
}

/// Why a provider refused a credential. The message names fields, never values.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The value can never be right.
    Invalid(String),
    /// The value is well formed but unusable now (an expired token).
    Precondition(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_provider_by_its_name() {
        for p in Provider::ALL {
            assert_eq!(Provider::parse(p.name()), Some(p));
        }
        assert_eq!(Provider::parse("Amplitude"), None);
        assert_eq!(Provider::parse(""), None);
    }
}
