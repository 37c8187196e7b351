//! Finding a connection's secrets in what a provider sends back, raw or base64-encoded, and replacing them.

use base64::Engine;
use memchr::memmem;
use zeroize::Zeroizing;

use crate::providers::validation::ProbeHeader;

/// Shorter values are not searched for: too many false hits, and no provider
/// key is that short.
pub const MIN_SECRET_LEN: usize = 6;
/// A base64 fragment shorter than this is not searched for.
const MIN_ENCODED_LEN: usize = 7;
/// What replaces a sensitive header value found in provider text.
pub const MASK: &str = "[redacted]";

/// The byte strings to remove from provider text, each with what replaces it.
#[derive(Default)]
pub struct Scrubber {
    /// Longest first, so that a value is replaced whole before any part of it.
    needles: Vec<(Zeroizing<Vec<u8>>, String)>,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrubber({} needles)", self.needles.len())
    }
}

impl Scrubber {
    pub fn new() -> Self {
        Self::default()
    }

    /// Searches for `secret` as is and base64-encoded (standard and URL-safe
    /// alphabets, at each of the three alignments it can take inside a longer
    /// encoded string), replacing each occurrence with `replacement`.
    pub fn secret(&mut self, secret: &[u8], replacement: &str) {
        if secret.len() < MIN_SECRET_LEN {
            return;
        }
        self.add(secret, replacement);
        for engine in [
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            for offset in 0..3 {
                let fragment = stable_fragment(engine, secret, offset);
                if fragment.len() >= MIN_ENCODED_LEN {
                    self.add(&fragment, replacement);
                }
            }
        }
    }

    /// Searches for a sensitive header's value, whole and after its auth
    /// scheme (`Basic …`, `Bearer …`).
    pub fn header(&mut self, header: &ProbeHeader) {
        if !header.sensitive {
            return;
        }
        let whole = header.value.as_bytes();
        let credential = header
            .value
            .split_once(' ')
            .map_or(whole, |(_, c)| c.as_bytes());
        for value in [whole, credential] {
            if value.len() >= MIN_SECRET_LEN {
                self.add(value, MASK);
            }
        }
    }

    /// Adds `needle`, and each other form a JSON encoder may give it inside
    /// a string.
    fn add(&mut self, needle: &[u8], replacement: &str) {
        self.add_exact(needle, replacement);
        if let Ok(text) = std::str::from_utf8(needle) {
            for form in json_forms(text) {
                self.add_exact(form.as_bytes(), replacement);
            }
        }
    }

    fn add_exact(&mut self, needle: &[u8], replacement: &str) {
        if self.needles.iter().any(|(n, _)| n.as_slice() == needle) {
            return;
        }
        self.needles
            .push((Zeroizing::new(needle.to_vec()), replacement.to_owned()));
        self.needles
            .sort_by_key(|(needle, _)| std::cmp::Reverse(needle.len()));
    }

    /// The longest needle: text cut short may end inside a secret this long.
    pub fn longest(&self) -> usize {
        self.needles.first().map_or(0, |(n, _)| n.len())
    }

    /// Replaces every occurrence of every needle; returns how many there were.
    pub fn scrub(&self, text: &mut Vec<u8>) -> usize {
        let mut count = 0;
        for (needle, replacement) in &self.needles {
            let finder = memmem::Finder::new(needle.as_slice());
            if finder.find(text).is_none() {
                continue;
            }
            let mut out = Vec::with_capacity(text.len());
            let mut rest = 0;
            for at in finder.find_iter(text) {
                if at < rest {
                    continue; // overlaps the occurrence just replaced
                }
                out.extend_from_slice(&text[rest..at]);
                out.extend_from_slice(replacement.as_bytes());
                rest = at + needle.len();
                count += 1;
            }
            out.extend_from_slice(&text[rest..]);
            // The old buffer held secrets: wipe it before letting it go.
            let old = std::mem::replace(text, out);
            drop(Zeroizing::new(old));
        }
        count
    }

    /// [`Scrubber::scrub`] for text already decoded.
    pub fn scrub_str(&self, text: &mut String) -> usize {
        let mut bytes = std::mem::take(text).into_bytes();
        let count = self.scrub(&mut bytes);
        // Needles and replacements are whole UTF-8 strings or ASCII, so the
        // result stays valid; fall back to a lossy copy rather than fail.
        *text = String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        count
    }

    /// Cuts `text` to at most `max` bytes, also dropping a tail that could be
    /// the start of a needle cut off at the limit. Returns whether it cut.
    pub fn truncate(&self, text: &mut Vec<u8>, max: usize) -> bool {
        if text.len() <= max {
            return false;
        }
        text.truncate(max);
        let partial = self
            .needles
            .iter()
            .filter_map(|(needle, _)| {
                (MIN_SECRET_LEN.min(needle.len())..needle.len())
                    .rev()
                    .find(|&n| n <= text.len() && text.ends_with(&needle[..n]))
            })
            .max()
            .unwrap_or(0);
        text.truncate(text.len() - partial);
        true
    }
}

/// The ways JSON encoders write `text` inside a string: `"`, `\` and control
/// characters escaped (all of them), `/` as `\/` (PHP's and some Java
/// encoders), and non-ASCII characters as `\uXXXX` in lower or upper case
/// (Python's default, Java's). Identical forms are dropped by the caller.
fn json_forms(text: &str) -> Vec<Zeroizing<String>> {
    use std::fmt::Write;
    let mut forms = Vec::new();
    for escape_slash in [false, true] {
        for unicode in [None, Some(false), Some(true)] {
            // Room for the longest form, so the buffer never moves and leaves a copy.
            let mut out = Zeroizing::new(String::with_capacity(text.len() * 6));
            for c in text.chars() {
                let _ = match c {
                    '"' => out.write_str("\\\""),
                    '\\' => out.write_str("\\\\"),
                    '/' if escape_slash => out.write_str("\\/"),
                    '\n' => out.write_str("\\n"),
                    '\r' => out.write_str("\\r"),
                    '\t' => out.write_str("\\t"),
                    '\u{8}' => out.write_str("\\b"),
                    '\u{c}' => out.write_str("\\f"),
                    c if c < ' ' => write!(out, "\\u{:04x}", u32::from(c)),
                    c if !c.is_ascii() && unicode.is_some() => {
                        let mut units = [0u16; 2];
                        c.encode_utf16(&mut units).iter().try_for_each(|unit| {
                            if unicode == Some(true) {
                                write!(out, "\\u{unit:04X}")
                            } else {
                                write!(out, "\\u{unit:04x}")
                            }
                        })
                    }
                    c => out.write_char(c),
                };
            }
            if out.as_str() != text {
                forms.push(out);
            }
        }
    }
    forms
}

/// The characters of `secret`'s base64 encoding that depend on its bytes
/// alone when it starts `offset` bytes into a 3-byte group: any encoding of a
/// text holding `secret` at that alignment contains them.
fn stable_fragment(
    engine: &base64::engine::GeneralPurpose,
    secret: &[u8],
    offset: usize,
) -> Zeroizing<Vec<u8>> {
    let mut padded = Zeroizing::new(vec![0u8; offset]);
    padded.extend_from_slice(secret);
    let encoded = Zeroizing::new(engine.encode(padded.as_slice()));
    // Character j carries bits [6j, 6j + 6); the secret holds bits
    // [8 * offset, 8 * (offset + len)).
    let start = (8 * offset).div_ceil(6);
    let end = (8 * (offset + secret.len())) / 6;
    Zeroizing::new(encoded.as_bytes()[start..end.max(start)].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    use proptest::prelude::*;

    const SECRET: &[u8] = b"Vq8rKw2Lx7Mz4Nc9Pb3Td6Yf1Gh5Js0U";

    fn scrubbed(text: &[u8]) -> (Vec<u8>, usize) {
        let mut s = Scrubber::new();
        s.secret(SECRET, "Vq8r…");
        let mut text = text.to_vec();
        let n = s.scrub(&mut text);
        (text, n)
    }

    #[test]
    fn replaces_raw_occurrences_with_the_hint() {
        let (text, n) = scrubbed(b"Invalid API key: Vq8rKw2Lx7Mz4Nc9Pb3Td6Yf1Gh5Js0U (twice: Vq8rKw2Lx7Mz4Nc9Pb3Td6Yf1Gh5Js0U)");
        assert_eq!(text, "Invalid API key: Vq8r… (twice: Vq8r…)".as_bytes());
        assert_eq!(n, 2);
    }

    #[test]
    fn replaces_base64_encodings() {
        let (text, n) = scrubbed(STANDARD.encode(SECRET).as_bytes());
        assert_eq!(n, 1);
        assert!(!text.windows(8).any(|w| STANDARD
            .encode(SECRET)
            .as_bytes()
            .windows(8)
            .any(|x| x == w)));
    }

    #[test]
    fn short_values_are_not_searched() {
        let mut s = Scrubber::new();
        s.secret(b"abc12", "x");
        let mut text = b"abc12abc12".to_vec();
        assert_eq!(s.scrub(&mut text), 0);
    }

    #[test]
    fn headers_are_found_whole_and_after_their_scheme() {
        let mut s = Scrubber::new();
        s.header(&ProbeHeader {
            name: "authorization",
            value: Zeroizing::new("Bearer phx_TOKEN123".into()),
            sensitive: true,
        });
        let mut text = "a Bearer phx_TOKEN123 b phx_TOKEN123".to_owned();
        assert_eq!(s.scrub_str(&mut text), 2);
        assert_eq!(text, "a [redacted] b [redacted]");
    }

    #[test]
    fn truncation_drops_a_secret_cut_at_the_limit() {
        let mut s = Scrubber::new();
        s.secret(SECRET, "h");
        let mut text = b"0123456789Vq8rKw2Lx7Mz".to_vec();
        assert!(s.truncate(&mut text, 20));
        assert_eq!(text, b"0123456789");
        let mut short = b"0123".to_vec();
        assert!(!s.truncate(&mut short, 20));
    }

    #[test]
    fn finds_base64_with_its_slashes_escaped() {
        // PHP's json_encode writes every `/` as `\/`, and base64 is full of them.
        let mut s = Scrubber::new();
        s.header(&ProbeHeader {
            name: "authorization",
            value: Zeroizing::new("Basic a2V5Pz8/OnNlY3JldD8/Pw==".into()),
            sensitive: true,
        });
        let mut text = r#"{"echo":"Basic a2V5Pz8\/OnNlY3JldD8\/Pw=="}"#.to_owned();
        assert_eq!(s.scrub_str(&mut text), 1);
        assert_eq!(text, r#"{"echo":"[redacted]"}"#);
    }

    #[test]
    fn finds_secrets_json_escaped() {
        let secret = "s3cr\"et\\p\u{e4}ss/\u{1f511}";
        let mut s = Scrubber::new();
        s.secret(secret.as_bytes(), "[hint]");
        let echoes = [
            // serde_json, Go: quote and backslash escaped.
            serde_json::to_string(secret).unwrap(),
            // Python's json.dumps: also non-ASCII as \uXXXX (a surrogate pair here).
            r#""s3cr\"et\\p\u00e4ss/\ud83d\udd11""#.to_owned(),
            // Java encoders: upper-case hex, and `/` escaped.
            r#""s3cr\"et\\p\u00E4ss\/\uD83D\uDD11""#.to_owned(),
        ];
        for echo in echoes {
            let mut text = echo.clone();
            assert_eq!(s.scrub_str(&mut text), 1, "{echo}");
            assert_eq!(text, r#""[hint]""#, "{echo}");
        }
    }

    proptest! {
        /// Any text secret, once JSON-encoded, is found.
        #[test]
        fn json_encoding_never_hides_a_secret(secret in "\\PC{6,40}") {
            let mut s = Scrubber::new();
            s.secret(secret.as_bytes(), "[hint]");
            let mut text = serde_json::to_string(&secret).unwrap();
            prop_assert_eq!(s.scrub_str(&mut text), 1);
            prop_assert_eq!(text, r#""[hint]""#);
        }

        /// Wherever a secret sits in a text, once that text is base64-encoded
        /// (either alphabet) and scrubbed, no 8-character run of the secret's
        /// own encodings is left.
        #[test]
        fn no_encoding_survives(
            secret in proptest::collection::vec(any::<u8>(), 6..64),
            prefix in proptest::collection::vec(any::<u8>(), 0..8),
            suffix in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut s = Scrubber::new();
            s.secret(&secret, "[hint]");
            let mut whole = prefix.clone();
            whole.extend_from_slice(&secret);
            whole.extend_from_slice(&suffix);
            for engine in [&STANDARD, &URL_SAFE] {
                let mut text = engine.encode(&whole).into_bytes();
                let found = s.scrub(&mut text);
                prop_assert!(found >= 1);
                let mut raw = secret.clone();
                prop_assert_eq!(s.scrub(&mut raw), 1);
            }
        }
    }
}
