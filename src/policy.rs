//! Who may call what: the configuration's `[[policy]]` rules. Anything no rule allows is denied.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use wildmatch::WildMatch;

use crate::identity::SpiffeId;

/// Every method a rule may name, by service.
pub const METHODS: &[(&str, &[&str])] = &[
    (
        "Credentials",
        &[
            "Store",
            "Redact",
            "Zero",
            "List",
            "ListProviders",
            "ValidateConnection",
            "Proxy",
        ],
    ),
    ("KeyAdmin", &["Rotate", "Status", "Retire"]),
    ("Audit", &["Subscribe", "Head"]),
];

/// Services whose methods concern every workspace and provider at once.
const GLOBAL_SERVICES: &[&str] = &["Audit", "KeyAdmin"];

/// One `[[policy]]` table as written in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A client identity, exactly, or a prefix ending in `/*`.
    pub identity: String,
    /// `Store` (a Credentials method), `Service.Method`, or `Service.*`.
    pub allow: Vec<String>,
    /// Provider names, or `*` (the default) for all.
    #[serde(default = "everything")]
    pub providers: Vec<String>,
    /// Workspace id globs (`*`, `?`); `*` (the default) for all.
    #[serde(default = "everything")]
    pub workspaces: Vec<String>,
    /// Narrows `Proxy` under this rule to these `METHOD /template` routes
    /// (from the providers' allowlists). Unset: every allowlisted route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<Vec<String>>,
}

fn everything() -> Vec<String> {
    vec!["*".to_owned()]
}

/// What a call is about, as far as the policy cares.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub service: &'a str,
    pub method: &'a str,
    /// For calls on a workspace.
    pub workspace: Option<&'a str>,
    /// For calls on one provider's connection.
    pub provider: Option<&'a str>,
    /// For Proxy: the allowlisted route the request fits, as `METHOD /template`.
    pub route: Option<&'a str>,
}

/// Rules compiled for matching.
#[derive(Debug, Default)]
pub struct Policy {
    rules: Vec<Compiled>,
}

#[derive(Debug)]
struct Compiled {
    identity: String,
    identity_is_prefix: bool,
    /// (service, method); method `None` for `Service.*`.
    methods: Vec<(String, Option<String>)>,
    /// `None` for all providers.
    providers: Option<Vec<String>>,
    workspaces: Vec<WildMatch>,
    /// `None` for every allowlisted route.
    proxy: Option<Vec<String>>,
}

impl Policy {
    /// Checks every rule: identities non-empty, methods that exist.
    pub fn compile(rules: &[Rule]) -> Result<Self, String> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, rule)| compile_rule(rule).map_err(|e| format!("policy rule {}: {e}", i + 1)))
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any rule lets `identity` make `call`.
    pub fn allows(&self, identity: &str, call: &Call<'_>) -> bool {
        self.grant(identity, call).is_some()
    }

    /// Whether any rule names `identity`, whatever it allows.
    pub fn names(&self, identity: &str) -> bool {
        self.rules.iter().any(|rule| rule.names(identity))
    }

    /// Whether any rule lets `identity` call `service.method` at all, for
    /// some workspace, provider and route: what can be decided before a
    /// request's body is read.
    pub fn may_call(&self, identity: &str, service: &str, method: &str) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.names(identity) && rule.grants(service, method))
    }

    /// What the rules that let `identity` make `call` cover together, to
    /// narrow the answer to; `None` when no rule allows the call.
    pub fn grant(&self, identity: &str, call: &Call<'_>) -> Option<Grant> {
        let mut grant: Option<Grant> = None;
        for rule in self.rules.iter().filter(|rule| rule.allows(identity, call)) {
            let providers = match (grant.map(|g| g.providers), &rule.providers) {
                (Some(None), _) | (_, None) => None,
                (None, Some(list)) => Some(list.clone()),
                (Some(Some(mut union)), Some(list)) => {
                    union.extend(list.iter().cloned());
                    Some(union)
                }
            };
            grant = Some(Grant { providers });
        }
        grant
    }
}

/// What the rules that allowed a call cover beyond the call itself. An
/// answer about several providers (List, ListProviders) shows only these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `None` for every provider.
    providers: Option<Vec<String>>,
}

impl Grant {
    pub fn covers_provider(&self, provider: &str) -> bool {
        self.providers
            .as_ref()
            .is_none_or(|list| list.iter().any(|p| p == provider))
    }
}

impl Compiled {
    fn names(&self, identity: &str) -> bool {
        if self.identity_is_prefix {
            identity.starts_with(&self.identity)
        } else {
            identity == self.identity
        }
    }

    fn grants(&self, service: &str, method: &str) -> bool {
        self.methods
            .iter()
            .any(|(s, m)| s == service && m.as_deref().is_none_or(|m| m == method))
    }

    fn allows(&self, identity: &str, call: &Call<'_>) -> bool {
        let identity_ok = self.names(identity);
        let method_ok = self.grants(call.service, call.method);
        let provider_ok = match (&self.providers, call.provider) {
            (None, _) | (Some(_), None) => true,
            (Some(list), Some(p)) => list.iter().any(|x| x == p),
        };
        let workspace_ok = call
            .workspace
            .is_none_or(|w| self.workspaces.iter().any(|g| g.matches(w)));
        let route_ok = match &self.proxy {
            Some(routes) if call.service == "Credentials" && call.method == "Proxy" => {
                call.route.is_some_and(|r| routes.iter().any(|x| x == r))
            }
            _ => true,
        };
        identity_ok && method_ok && provider_ok && workspace_ok && route_ok
    }
}

fn compile_rule(rule: &Rule) -> Result<Compiled, String> {
    let (identity, identity_is_prefix) = match rule.identity.strip_suffix('*') {
        Some(prefix) if prefix.ends_with('/') => (prefix.to_owned(), true),
        Some(_) => return Err("`identity` may end in `/*` only".into()),
        None => (rule.identity.clone(), false),
    };
    if identity.is_empty() || identity.contains('*') {
        return Err("`identity` must name an identity, or a prefix ending in `/*`".into());
    }
    // A prefix names at least a trust domain and one path segment.
    let whole = identity.strip_suffix('/').unwrap_or(&identity);
    SpiffeId::parse(whole).map_err(|why| {
        format!(
            "`identity` `{}` is not a SPIFFE ID (`spiffe://trust-domain/path`, the URI SAN of a \
             client certificate; DNS names are never identities): it {why}",
            rule.identity
        )
    })?;
    let methods = rule
        .allow
        .iter()
        .map(|entry| parse_method(entry))
        .collect::<Result<Vec<_>, _>>()?;
    if methods.is_empty() {
        return Err("`allow` is empty".into());
    }
    // The audit log is one hash chain over every workspace and provider (a
    // consumer cannot verify a filtered copy), and KeyAdmin reports on and
    // acts on every connection's keys: only a rule that covers everything
    // may grant either.
    let narrowed =
        !rule.workspaces.iter().any(|w| w == "*") || !rule.providers.iter().any(|p| p == "*");
    if let Some((service, _)) = methods
        .iter()
        .find(|(service, _)| narrowed && GLOBAL_SERVICES.contains(&service.as_str()))
    {
        return Err(format!(
            "`{service}` methods concern every workspace and provider, but this rule is \
             narrowed by `workspaces` or `providers`: grant {service} in a rule of its own \
             that covers all of them"
        ));
    }
    let providers = if rule.providers.iter().any(|p| p == "*") {
        None
    } else {
        for p in &rule.providers {
            if crate::providers::Provider::parse(p).is_none() {
                return Err(format!("unknown provider `{p}`"));
            }
        }
        Some(rule.providers.clone())
    };
    for route in rule.proxy.iter().flatten() {
        let named = |p: &crate::providers::Provider| {
            let listed = providers
                .as_ref()
                .is_none_or(|list| list.iter().any(|x| x == p.name()));
            listed && p.spec().route(route).is_some()
        };
        if !crate::providers::Provider::ALL.iter().any(named) {
            return Err(format!(
                "`proxy` entry `{route}` is not an allowlisted route (`METHOD /template`) of \
                 the rule's providers"
            ));
        }
    }
    Ok(Compiled {
        identity,
        identity_is_prefix,
        methods,
        providers,
        workspaces: rule.workspaces.iter().map(|g| WildMatch::new(g)).collect(),
        proxy: rule.proxy.clone(),
    })
}

fn parse_method(entry: &str) -> Result<(String, Option<String>), String> {
    let (service, method) = entry.split_once('.').unwrap_or(("Credentials", entry));
    let Some((_, methods)) = METHODS.iter().find(|(s, _)| *s == service) else {
        return Err(format!("unknown service in `{entry}`"));
    };
    if method == "*" {
        return Ok((service.to_owned(), None));
    }
    if !methods.contains(&method) {
        return Err(format!("unknown method `{entry}`"));
    }
    Ok((service.to_owned(), Some(method.to_owned())))
}

/// The policy in force, replaceable while serving (SIGHUP). Long calls (an
/// audit stream) watch it, to end when a new policy takes their right away.
#[derive(Debug, Clone)]
pub struct SharedPolicy(Arc<tokio::sync::watch::Sender<Arc<Policy>>>);

impl SharedPolicy {
    pub fn new(policy: Policy) -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(Arc::new(policy))))
    }

    pub fn current(&self) -> Arc<Policy> {
        self.0.borrow().clone()
    }

    pub fn replace(&self, policy: Policy) {
        self.0.send_replace(Arc::new(policy));
    }

    /// Wakes on every replacement.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<Arc<Policy>> {
        self.0.subscribe()
    }
}

/// The policy `--dev` writes: the three development identities, each with its role.
pub fn dev_rules() -> Vec<Rule> {
    let rule = |who: &str, allow: &[&str]| Rule {
        identity: format!("spiffe://credvault.local/{who}"),
        allow: allow.iter().map(|s| (*s).to_owned()).collect(),
        providers: everything(),
        workspaces: everything(),
        proxy: None,
    };
    vec![
        rule(
            "app",
            &[
                "Store",
                "Redact",
                "Zero",
                "List",
                "ListProviders",
                "ValidateConnection",
                "Proxy",
            ],
        ),
        rule("admin", &["KeyAdmin.*"]),
        rule("auditor", &["Audit.*"]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<'a>(
        service: &'a str,
        method: &'a str,
        ws: Option<&'a str>,
        p: Option<&'a str>,
    ) -> Call<'a> {
        Call {
            service,
            method,
            workspace: ws,
            provider: p,
            route: None,
        }
    }

    const APP: &str = "spiffe://credvault.local/app";

    #[test]
    fn dev_roles_get_exactly_their_methods() {
        let policy = Policy::compile(&dev_rules()).unwrap();
        for (service, methods) in METHODS {
            for method in *methods {
                let c = call(service, method, Some("ws"), Some("amplitude"));
                assert_eq!(
                    policy.allows(APP, &c),
                    *service == "Credentials",
                    "app {service}.{method}"
                );
                assert_eq!(
                    policy.allows("spiffe://credvault.local/admin", &c),
                    *service == "KeyAdmin"
                );
                assert_eq!(
                    policy.allows("spiffe://credvault.local/auditor", &c),
                    *service == "Audit"
                );
                assert!(!policy.allows("spiffe://credvault.local/other", &c));
            }
        }
    }

    #[test]
    fn identity_prefix_and_scopes() {
        let policy = Policy::compile(&[Rule {
            identity: "spiffe://corp/team-a/*".into(),
            allow: vec!["Redact".into(), "Credentials.List".into()],
            providers: vec!["posthog".into()],
            workspaces: vec!["team-a-*".into()],
            proxy: None,
        }])
        .unwrap();
        let who = "spiffe://corp/team-a/billing";
        assert!(policy.allows(
            who,
            &call("Credentials", "Redact", Some("team-a-1"), Some("posthog"))
        ));
        assert!(policy.allows(who, &call("Credentials", "List", Some("team-a-1"), None)));
        assert!(!policy.allows(
            who,
            &call("Credentials", "Redact", Some("team-b-1"), Some("posthog"))
        ));
        assert!(!policy.allows(
            who,
            &call("Credentials", "Redact", Some("team-a-1"), Some("amplitude"))
        ));
        assert!(!policy.allows(
            who,
            &call("Credentials", "Store", Some("team-a-1"), Some("posthog"))
        ));
        assert!(!policy.allows(
            "spiffe://corp/team-a",
            &call("Credentials", "Redact", Some("team-a-1"), Some("posthog"))
        ));
        assert!(!policy.allows(
            "spiffe://corp/team-ab/x",
            &call("Credentials", "Redact", Some("team-a-1"), Some("posthog"))
        ));
    }

    #[test]
    fn a_proxy_list_narrows_proxy_only() {
        let policy = Policy::compile(&[Rule {
            identity: APP.into(),
            allow: vec!["Proxy".into(), "Redact".into()],
            providers: everything(),
            workspaces: everything(),
            proxy: Some(vec!["GET /api/3/cohorts".into()]),
        }])
        .unwrap();
        let proxy = |route| Call {
            route,
            ..call("Credentials", "Proxy", Some("ws"), Some("amplitude"))
        };
        assert!(policy.allows(APP, &proxy(Some("GET /api/3/cohorts"))));
        assert!(!policy.allows(APP, &proxy(Some("POST /api/3/annotations"))));
        assert!(!policy.allows(APP, &proxy(None)));
        assert!(policy.allows(
            APP,
            &call("Credentials", "Redact", Some("ws"), Some("amplitude"))
        ));
    }

    #[test]
    fn empty_policy_denies_everything() {
        let policy = Policy::compile(&[]).unwrap();
        assert!(!policy.allows(APP, &call("Credentials", "ListProviders", None, None)));
    }

    #[test]
    fn refuses_rules_that_name_nothing_real() {
        let base = Rule {
            identity: APP.into(),
            allow: vec!["Store".into()],
            providers: everything(),
            workspaces: everything(),
            proxy: None,
        };
        for (rule, expected) in [
            (
                Rule {
                    allow: vec!["Stroe".into()],
                    ..base.clone()
                },
                "unknown method `Stroe`",
            ),
            (
                Rule {
                    allow: vec!["Keys.*".into()],
                    ..base.clone()
                },
                "unknown service",
            ),
            (
                Rule {
                    allow: vec![],
                    ..base.clone()
                },
                "`allow` is empty",
            ),
            (
                Rule {
                    identity: "spiffe://x*".into(),
                    ..base.clone()
                },
                "`/*`",
            ),
            (
                Rule {
                    providers: vec!["salesforce".into()],
                    ..base.clone()
                },
                "unknown provider",
            ),
            (
                Rule {
                    allow: vec!["Proxy".into()],
                    providers: vec!["posthog".into()],
                    proxy: Some(vec!["GET /api/3/cohorts".into()]),
                    ..base.clone()
                },
                "not an allowlisted route",
            ),
        ] {
            let err = Policy::compile(&[rule]).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn a_grant_is_the_union_of_the_rules_that_allow_the_call() {
        let rule = |providers: &[&str]| Rule {
            identity: APP.into(),
            allow: vec!["List".into()],
            providers: providers.iter().map(|p| (*p).to_owned()).collect(),
            workspaces: vec!["*".into()],
            proxy: None,
        };
        let list = call("Credentials", "List", Some("ws"), None);
        let one = Policy::compile(&[rule(&["posthog"])]).unwrap();
        let grant = one.grant(APP, &list).unwrap();
        assert!(grant.covers_provider("posthog") && !grant.covers_provider("amplitude"));
        let two = Policy::compile(&[rule(&["posthog"]), rule(&["amperity"])]).unwrap();
        let grant = two.grant(APP, &list).unwrap();
        assert!(grant.covers_provider("amperity") && !grant.covers_provider("amplitude"));
        let all = Policy::compile(&[rule(&["posthog"]), rule(&["*"])]).unwrap();
        assert!(all.grant(APP, &list).unwrap().covers_provider("amplitude"));
        assert!(one.grant("spiffe://credvault.local/other", &list).is_none());
    }

    #[test]
    fn only_a_rule_covering_everything_may_grant_audit_or_key_admin() {
        for (workspaces, providers, method) in [
            (vec!["team-*"], vec!["*"], "Audit.Head"),
            (vec!["*"], vec!["posthog"], "Audit.Subscribe"),
            (vec!["acme"], vec!["amplitude"], "KeyAdmin.Status"),
            (vec!["*"], vec!["amplitude"], "KeyAdmin.*"),
        ] {
            let err = Policy::compile(&[Rule {
                identity: APP.into(),
                allow: vec![method.into()],
                providers: providers.iter().map(|p| (*p).to_owned()).collect(),
                workspaces: workspaces.iter().map(|p| (*p).to_owned()).collect(),
                proxy: None,
            }])
            .unwrap_err();
            assert!(err.contains(method.split('.').next().unwrap()), "{err}");
        }
    }
}
