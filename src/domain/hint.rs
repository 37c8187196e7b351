//! The redacted hint of a secret: at most four revealing characters, after any public prefix.

/// Prefixes that say what kind of key this is, and nothing about which key.
const PUBLIC_PREFIXES: &[&str] = &["phx_"];
/// Shorter secrets reveal nothing.
const MIN_LEN_FOR_HINT: usize = 16;
const MAX_REVEALED: usize = 4;
const ELLIPSIS: char = '…';

/// A hint that reveals at most 4 characters and never more than a quarter of
/// the secret, and none at all for secrets under 16 characters. Well-known
/// public prefixes (`phx_`, a JWT's `eyJ` header) are shown but not counted,
/// so the revealed characters carry information.
pub fn hint(secret: &str) -> String {
    let len = secret.chars().count();
    let revealed = if len < MIN_LEN_FOR_HINT {
        0
    } else {
        MAX_REVEALED.min(len / 4)
    };
    if is_jwt(secret) {
        // Header and payload both start with the public `eyJ`; the signature's
        // tail is the informative part.
        let tail: String = secret.chars().skip(len - revealed).collect();
        return format!("eyJ{ELLIPSIS}{tail}");
    }
    let prefix = PUBLIC_PREFIXES
        .iter()
        .copied()
        .find(|p| secret.starts_with(p))
        .unwrap_or("");
    let shown: String = secret[prefix.len()..].chars().take(revealed).collect();
    format!("{prefix}{shown}{ELLIPSIS}")
}

fn is_jwt(secret: &str) -> bool {
    secret.starts_with("eyJ") && secret.split('.').count() == 3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revealed(secret: &str, hint: &str) -> usize {
        hint.chars().filter(|c| *c != ELLIPSIS).count()
            - PUBLIC_PREFIXES
                .iter()
                .find(|p| secret.starts_with(*p))
                .map_or(0, |p| p.len())
            - if is_jwt(secret) { 3 } else { 0 }
    }

    #[test]
    fn short_secrets_reveal_nothing() {
        assert_eq!(hint("abcdefghijklmno"), "…");
        assert_eq!(hint(""), "…");
        assert_eq!(hint("phx_short"), "phx_…");
    }

    #[test]
    fn reveals_at_most_four_and_a_quarter() {
        assert_eq!(hint("0123456789abcdef"), "0123…");
        assert_eq!(hint("a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"), "a1b2…");
        for len in 0..200 {
            let s: String = "x".repeat(len);
            let n = revealed(&s, &hint(&s));
            assert!(n <= 4 && n * 4 <= len, "len {len} revealed {n}");
        }
    }

    #[test]
    fn skips_public_prefixes() {
        assert_eq!(hint("phx_AbCdEfGhIjKlMnOpQrStUv"), "phx_AbCd…");
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlWXZ6";
        assert_eq!(hint(jwt), "eyJ…WXZ6");
    }

    #[test]
    fn counts_characters_not_bytes() {
        let s = "ééééééééééééééééé";
        assert_eq!(hint(s), "éééé…");
    }

    proptest::proptest! {
        #[test]
        fn hints_never_reveal_more_than_allowed(secret in "\\PC{0,80}") {
            let h = hint(&secret);
            let n = revealed(&secret, &h);
            let len = secret.chars().count();
            proptest::prop_assert!(n <= 4);
            proptest::prop_assert!(n * 4 <= len);
            proptest::prop_assert!(len >= 16 || n == 0);
        }
    }
}
