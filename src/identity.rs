//! A caller's identity: a SPIFFE ID from its certificate's URI SAN, and the trust domain it names.

/// The longest SPIFFE ID accepted, from the SPIFFE ID specification.
const MAX_ID_BYTES: usize = 2048;
/// The longest DNS name, in its text form.
const MAX_HOSTNAME_BYTES: usize = 253;

/// A well-formed SPIFFE ID, `spiffe://trust-domain/path`, in the one
/// spelling the specification allows: lowercase trust domain, no port,
/// user, query or fragment, and no empty, `.` or `..` path segments. Any
/// other spelling is refused rather than normalized, so two spellings can
/// never name one identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpiffeId<'a> {
    id: &'a str,
    /// Where the trust domain ends, as an index into `id`.
    domain_end: usize,
}

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    #[error("does not start with `spiffe://`")]
    Scheme,
    #[error("is longer than {MAX_ID_BYTES} bytes")]
    TooLong,
    #[error(
        "has a trust domain that is not lowercase letters, digits, `.`, `-` and `_` \
         (no port, no user)"
    )]
    TrustDomain,
    #[error(
        "has a path segment that is empty, `.` or `..`, or holds characters other than \
         letters, digits, `.`, `-` and `_`"
    )]
    Path,
}

impl<'a> SpiffeId<'a> {
    /// A SPIFFE ID with a path (a workload), as client certificates carry.
    pub fn parse(id: &'a str) -> Result<Self, SpiffeIdError> {
        let parsed = Self::parse_any(id)?;
        if parsed.path().is_empty() {
            return Err(SpiffeIdError::Path);
        }
        Ok(parsed)
    }

    /// A trust domain alone, `spiffe://trust-domain`, as the configuration binds it.
    pub fn parse_trust_domain(id: &'a str) -> Result<Self, SpiffeIdError> {
        let parsed = Self::parse_any(id)?;
        if !parsed.path().is_empty() {
            return Err(SpiffeIdError::Path);
        }
        Ok(parsed)
    }

    fn parse_any(id: &'a str) -> Result<Self, SpiffeIdError> {
        const SCHEME: &str = "spiffe://";
        if id.len() > MAX_ID_BYTES {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = id.strip_prefix(SCHEME).ok_or(SpiffeIdError::Scheme)?;
        let (domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let domain_ok = !domain.is_empty()
            && domain.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if !domain_ok {
            return Err(SpiffeIdError::TrustDomain);
        }
        if !path.is_empty() {
            let segments_ok = path[1..].split('/').all(|segment| {
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            });
            if !segments_ok {
                return Err(SpiffeIdError::Path);
            }
        }
        Ok(Self {
            id,
            domain_end: SCHEME.len() + domain.len(),
        })
    }

    pub fn as_str(&self) -> &'a str {
        self.id
    }

    /// `spiffe://trust-domain`, as `tls.trust_domains` names it.
    pub fn trust_domain(&self) -> &'a str {
        &self.id[..self.domain_end]
    }

    fn path(&self) -> &'a str {
        &self.id[self.domain_end..]
    }
}

/// Whether `name` is a DNS hostname: dot-separated labels of letters, digits
/// and inner hyphens, no wildcard, no trailing dot.
pub fn is_hostname(name: &str) -> bool {
    name.len() <= MAX_HOSTNAME_BYTES
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_have_one_spelling() {
        let id = SpiffeId::parse("spiffe://credvault.local/team-a/billing_1.v2").unwrap();
        assert_eq!(id.trust_domain(), "spiffe://credvault.local");
        for bad in [
            "spiffe://credvault.local",
            "spiffe://credvault.local/",
            "spiffe://credvault.local/a/",
            "spiffe://credvault.local//a",
            "spiffe://credvault.local/a/../b",
            "spiffe://credvault.local/./a",
            "spiffe://credvault.local/%2e%2e",
            "spiffe://credvault.local/a?b",
            "spiffe://credvault.local/a#b",
            "spiffe://Credvault.local/a",
            "spiffe://credvault.local:443/a",
            "spiffe://user@credvault.local/a",
            "SPIFFE://credvault.local/a",
            "https://credvault.local/a",
            "spiffe:///a",
            "svc.internal",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
        assert!(SpiffeId::parse(&format!("spiffe://d/{}", "a".repeat(2100))).is_err());
    }

    #[test]
    fn trust_domains_have_no_path() {
        let td = SpiffeId::parse_trust_domain("spiffe://credvault.local").unwrap();
        assert_eq!(td.trust_domain(), td.as_str());
        assert!(SpiffeId::parse_trust_domain("spiffe://credvault.local/").is_err());
        assert!(SpiffeId::parse_trust_domain("spiffe://credvault.local/app").is_err());
    }

    #[test]
    fn hostnames() {
        assert!(is_hostname("svc.internal"));
        assert!(is_hostname("a-1.example.com"));
        for bad in [
            "spiffe://credvault.local/admin",
            "",
            "a..b",
            "-a.b",
            "*.example.com",
            "example.com.",
            "a b",
        ] {
            assert!(!is_hostname(bad), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics_and_keeps_the_trust_domain_a_prefix(s in "\\PC{0,80}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                proptest::prop_assert!(s.starts_with(id.trust_domain()));
                proptest::prop_assert!(s[id.trust_domain().len()..].starts_with('/'));
            }
        }
    }
}
