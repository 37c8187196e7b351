//! Names parsed once at the edge: workspace ids and connection references.

use std::fmt;

use super::VaultError;
use crate::providers::Provider;

const MAX_WORKSPACE_ID: usize = 128;

/// A workspace id: 1 to 128 of `A-Z a-z 0-9 . _ : @ -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkspaceId(String);

impl WorkspaceId {
    pub fn parse(raw: &str) -> Result<Self, VaultError> {
        let invalid = |why: &str| Err(VaultError::InvalidArgument(format!("`workspace_id` {why}")));
        if raw.is_empty() {
            return invalid("must not be empty");
        }
        if raw.len() > MAX_WORKSPACE_ID {
            return invalid(&format!("is longer than {MAX_WORKSPACE_ID} bytes"));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || ".:_@-".contains(c);
        if !raw.chars().all(allowed) {
            return invalid("may hold only letters, digits and . _ : @ -");
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses a provider name, or says which ones exist.
pub fn parse_provider(raw: &str) -> Result<Provider, VaultError> {
    Provider::parse(raw).ok_or_else(|| {
        let known: Vec<_> = Provider::ALL.iter().map(|p| p.name()).collect();
        let shown = if raw.is_empty() {
            "is missing".to_owned()
        } else if raw.len() <= 32 && raw.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            format!("`{raw}` is unknown")
        } else {
            "is unknown".to_owned()
        };
        VaultError::InvalidArgument(format!(
            "provider {shown}; expected one of {}",
            known.join(", ")
        ))
    })
}

/// One connection: a workspace has at most one per provider.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CredentialRef {
    pub workspace_id: WorkspaceId,
    pub provider: Provider,
}

impl CredentialRef {
    pub fn parse(workspace_id: &str, provider: &str) -> Result<Self, VaultError> {
        Ok(Self {
            workspace_id: WorkspaceId::parse(workspace_id)?,
            provider: parse_provider(provider)?,
        })
    }

    /// The owner fields every ciphertext of this connection is bound to.
    pub(crate) fn owner(&self) -> [&[u8]; 2] {
        [
            self.workspace_id.as_str().as_bytes(),
            self.provider.name().as_bytes(),
        ]
    }

    pub(crate) fn not_found(&self) -> VaultError {
        VaultError::NotFound {
            workspace_id: self.workspace_id.to_string(),
            provider: self.provider.name(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_ids() {
        assert!(WorkspaceId::parse("ws_1.a:b@c-d").is_ok());
        for bad in ["", " ws", "ws\n", "ws/1", &"a".repeat(129)] {
            assert!(WorkspaceId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unknown_provider_names_the_known_ones_without_echoing_odd_input() {
        let err = parse_provider("salesforce").unwrap_err().to_string();
        assert!(
            err.contains("`salesforce` is unknown") && err.contains("amplitude"),
            "{err}"
        );
        let err = parse_provider("phx_secret value!").unwrap_err().to_string();
        assert!(!err.contains("phx_"), "{err}");
    }
}
