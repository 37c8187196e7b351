//! Store requests checked field by field against the provider's declaration.

use std::collections::HashMap;

use secrecy::SecretString;

use super::{CredentialRef, VaultError};
use crate::providers::{Checked, FieldSpec, Params, Provider, Rejection, Secrets};

/// A credential that passed every check and may be encrypted and stored.
#[derive(Debug)]
pub struct NewCredential {
    pub target: CredentialRef,
    pub secrets: Secrets,
    pub params: Params,
    pub checked: Checked,
}

impl NewCredential {
    /// Takes ownership of the secret strings so no unzeroized copy is left behind.
    pub fn parse(
        workspace_id: &str,
        provider: &str,
        secrets: HashMap<String, String>,
        params: HashMap<String, String>,
    ) -> Result<Self, VaultError> {
        let target = CredentialRef::parse(workspace_id, provider)?;
        let spec = target.provider.spec();
        let secrets = parse_secrets(target.provider, secrets)?;
        let params = parse_params(target.provider, params)?;
        let checked = (spec.check)(&secrets, &params).map_err(|r| match r {
            Rejection::Invalid(m) => VaultError::InvalidArgument(m),
            Rejection::Precondition(m) => VaultError::FailedPrecondition(m),
        })?;
        Ok(Self {
            target,
            secrets,
            params,
            checked,
        })
    }
}

/// Runs every check a Store runs on values read back from the database,
/// which someone with write access to it may have edited. `false` if any
/// fails (an expired token is not a failure here: it was fine when stored).
pub(super) fn still_valid(provider: Provider, secrets: &Secrets, params: &Params) -> bool {
    let given: HashMap<String, String> = params.clone().into_iter().collect();
    let same = parse_params(provider, given).is_ok_and(|parsed| parsed == *params);
    same && !matches!(
        (provider.spec().check)(secrets, params),
        Err(Rejection::Invalid(_))
    )
}

#[derive(Clone, Copy)]
enum Kind {
    Secret,
    Param,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Secret => "field",
            Kind::Param => "parameter",
        }
    }
}

fn parse_secrets(
    provider: Provider,
    mut given: HashMap<String, String>,
) -> Result<Secrets, VaultError> {
    let spec = provider.spec();
    reject_unknown(provider, Kind::Secret, spec.secrets, given.keys())?;
    let mut secrets = Secrets::new();
    for field in spec.secrets {
        let Some(value) = given.remove(field.name) else {
            if field.required {
                return Err(missing(provider, Kind::Secret, field));
            }
            // Which optional fields a shape needs, the provider's check says.
            continue;
        };
        // Into the zeroizing box first, so an error below drops it safely.
        let value = SecretString::from(value);
        check_value(
            Kind::Secret,
            field,
            secrecy::ExposeSecret::expose_secret(&value),
        )?;
        secrets.insert(field.name.to_owned(), value);
    }
    Ok(secrets)
}

fn parse_params(
    provider: Provider,
    mut given: HashMap<String, String>,
) -> Result<Params, VaultError> {
    let spec = provider.spec();
    reject_unknown(provider, Kind::Param, spec.params, given.keys())?;
    let mut params = Params::new();
    for field in spec.params {
        let value = match (given.remove(field.name), field.default) {
            (Some(v), _) => v,
            (None, Some(default)) => default.to_owned(),
            (None, None) if field.required => return Err(missing(provider, Kind::Param, field)),
            (None, None) => continue,
        };
        check_value(Kind::Param, field, &value)?;
        if !field.allowed.is_empty() && !field.allowed.contains(&value.as_str()) {
            return Err(VaultError::InvalidArgument(format!(
                "parameter `{}` must be one of {}",
                field.name,
                field.allowed.join(", ")
            )));
        }
        params.insert(field.name.to_owned(), value);
    }
    Ok(params)
}

fn reject_unknown<'a>(
    provider: Provider,
    kind: Kind,
    declared: &[FieldSpec],
    names: impl Iterator<Item = &'a String>,
) -> Result<(), VaultError> {
    let spec = provider.spec();
    for name in names {
        if declared.iter().any(|f| f.name == name) {
            continue;
        }
        let (other_kind, other) = match kind {
            Kind::Secret => (Kind::Param, spec.params),
            Kind::Param => (Kind::Secret, spec.secrets),
        };
        if other.iter().any(|f| f.name == name) {
            return Err(VaultError::InvalidArgument(format!(
                "`{name}` is a {} of provider `{provider}`, not a {}",
                other_kind.noun(),
                kind.noun()
            )));
        }
        let expected: Vec<_> = declared.iter().map(|f| f.name).collect();
        return Err(VaultError::InvalidArgument(format!(
            "unknown {} {} for provider `{provider}`; expected {}",
            kind.noun(),
            printable_name(name),
            expected.join(", ")
        )));
    }
    Ok(())
}

/// A caller-supplied name, shown only if it looks like a field name: a secret
/// pasted into the wrong box must not come back in an error.
fn printable_name(name: &str) -> String {
    let plain = name.len() <= 32
        && !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        format!("`{name}`")
    } else {
        "(name not shown)".to_owned()
    }
}

fn missing(provider: Provider, kind: Kind, field: &FieldSpec) -> VaultError {
    VaultError::InvalidArgument(format!(
        "{} `{}` is missing for provider `{provider}`",
        kind.noun(),
        field.name
    ))
}

/// The checks every value passes; messages name the field and never the value.
fn check_value(kind: Kind, field: &FieldSpec, value: &str) -> Result<(), VaultError> {
    let problem = if value.is_empty() {
        "is empty".to_owned()
    } else if value.len() > field.max_bytes {
        format!("is longer than {} bytes", field.max_bytes)
    } else if value.trim() != value {
        "has leading or trailing whitespace (browsers often add a space when copying); remove it"
            .to_owned()
    } else if value.chars().any(char::is_control) {
        "contains control characters".to_owned()
    } else {
        return Ok(());
    };
    Err(VaultError::InvalidArgument(format!(
        "{} `{}` {problem}",
        kind.noun(),
        field.name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANARY: &str = "CANARYcanary0123456789";

    fn amplitude(
        secrets: &[(&str, &str)],
        params: &[(&str, &str)],
    ) -> Result<NewCredential, VaultError> {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        NewCredential::parse("ws", "amplitude", map(secrets), map(params))
    }

    fn message(r: Result<NewCredential, VaultError>) -> String {
        match r {
            Err(VaultError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn fills_defaults() {
        let c = amplitude(&[("api_key", CANARY), ("secret_key", CANARY)], &[]).unwrap();
        assert_eq!(c.params["region"], "us");
    }

    #[test]
    fn names_the_field_and_never_the_value() {
        type Pairs<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Pairs, Pairs, &str)] = &[
            (&[("api_key", CANARY)], &[], "field `secret_key` is missing"),
            (
                &[("api_key", CANARY), ("secret_key", "")],
                &[],
                "field `secret_key` is empty",
            ),
            (
                &[
                    ("api_key", "CANARYcanary0123456789 "),
                    ("secret_key", CANARY),
                ],
                &[],
                "field `api_key` has leading or trailing whitespace",
            ),
            (
                &[
                    ("api_key", " CANARYcanary0123456789"),
                    ("secret_key", CANARY),
                ],
                &[],
                "whitespace",
            ),
            (
                &[("api_key", "CANARY\u{7}canary"), ("secret_key", CANARY)],
                &[],
                "field `api_key` contains control characters",
            ),
            (
                &[("api_key", &"CANARY".repeat(100)), ("secret_key", CANARY)],
                &[],
                "field `api_key` is longer than 256 bytes",
            ),
            (
                &[
                    ("api_key", CANARY),
                    ("secret_key", CANARY),
                    ("extra", CANARY),
                ],
                &[],
                "unknown field `extra`",
            ),
            (
                &[("api_key", CANARY), ("secret_key", CANARY), (CANARY, "x")],
                &[],
                "(name not shown)",
            ),
            (
                &[
                    ("api_key", CANARY),
                    ("secret_key", CANARY),
                    ("region", "us"),
                ],
                &[],
                "`region` is a parameter",
            ),
            (
                &[("api_key", CANARY), ("secret_key", CANARY)],
                &[("region", "ap")],
                "parameter `region` must be one of us, eu",
            ),
            (
                &[("api_key", CANARY), ("secret_key", CANARY)],
                &[("api_key", CANARY)],
                "`api_key` is a field",
            ),
        ];
        for (secrets, params, expected) in cases {
            let m = message(amplitude(secrets, params));
            assert!(m.contains(expected), "{m:?} lacks {expected:?}");
            assert!(!m.contains("CANARY"), "{m:?} echoes a value");
        }
    }

    #[test]
    fn required_param_without_default_is_missing() {
        let secrets = HashMap::from([(
            "personal_api_key".to_owned(),
            "phx_abcdefghijklmnop".to_owned(),
        )]);
        let m = message(NewCredential::parse(
            "ws",
            "posthog",
            secrets,
            HashMap::new(),
        ));
        assert!(m.contains("parameter `project_id` is missing"), "{m}");
    }
}
