//! Finding a connection's secrets in what a provider sends back, raw, base64-encoded,
//! JSON-escaped or percent-encoded, and replacing them.
//!
//! What an echoing provider can produce, and what is found:
//! - the value as sent, or any base64 encoding of a text that holds it (either
//!   alphabet, any alignment);
//! - either of those inside a JSON string, with any mix of escapes (`\"`,
//!   `\\`, `\/`, `\n`…, and `\uXXXX` for any character, ASCII included);
//! - either of those percent-encoded (`%XX` for any byte, upper or lower case);
//! - any of those split by control characters (line breaks in wrapped base64,
//!   or anything a later step would drop and so join up).
//!
//! - the value form-encoded (`+` for a space), as a token endpoint that
//!   echoes the form the vault sent it would write it.
//!
//! Out of scope, and documented as such: forms that nest two encodings of
//! these (a percent-encoded JSON escape), hexadecimal, compression (refused
//! by the caller), and any encryption or hashing of the value.
//!
//! No observable property of the result depends on a secret except through
//! the replacement of a whole occurrence: matches are whole needles only, and
//! [`Scrubber::scrub_and_cut`] cuts at a fixed position.

use std::collections::BTreeMap;

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
/// The most raw bytes one byte of a needle takes in any form searched:
/// `\u00XX` in a JSON string.
const MAX_EXPANSION: usize = 6;

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

/// A view of the text with one encoding undone, and for each of its bytes
/// the raw range it came from.
struct View {
    bytes: Zeroizing<Vec<u8>>,
    /// `spans[i]`: where byte `i` of the view starts and ends in the raw text.
    spans: Vec<(u32, u32)>,
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
        if secret.contains(&b' ') {
            // Form encoding writes a space as `+`; every other byte it
            // changes is a `%XX`, which the search undoes.
            let form: Zeroizing<Vec<u8>> = Zeroizing::new(
                secret
                    .iter()
                    .map(|&b| if b == b' ' { b'+' } else { b })
                    .collect(),
            );
            self.add(&form, replacement);
        }
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
    /// scheme (`Basic …`, `Bearer …`), as sent.
    pub fn header(&mut self, header: &ProbeHeader) {
        if !header.sensitive {
            return;
        }
        let whole = header.value.as_bytes();
        let credential = header
            .value
            .split_once(' ')
            .map_or(whole, |(_, c)| c.as_bytes());
        // Raw only: the values behind it (stored secrets, a minted token)
        // are searched in every form through `secret`.
        for value in [whole, credential] {
            if value.len() >= MIN_SECRET_LEN {
                self.add(value, MASK);
            }
        }
    }

    fn add(&mut self, needle: &[u8], replacement: &str) {
        if self.needles.iter().any(|(n, _)| n.as_slice() == needle) {
            return;
        }
        self.needles
            .push((Zeroizing::new(needle.to_vec()), replacement.to_owned()));
        self.needles
            .sort_by_key(|(needle, _)| std::cmp::Reverse(needle.len()));
    }

    /// The most raw bytes one occurrence of a needle can take: text cut short
    /// must be read this far past the cut for every occurrence that starts
    /// before it to be seen whole.
    pub fn longest(&self) -> usize {
        self.needles
            .first()
            .map_or(0, |(n, _)| n.len() * MAX_EXPANSION)
    }

    /// Replaces every occurrence of every needle; returns how many there were.
    pub fn scrub(&self, text: &mut Vec<u8>) -> usize {
        let found = self.find(text);
        let count = found.len();
        if count > 0 {
            let (out, _) = self.replace(text, &found, usize::MAX);
            let old = std::mem::replace(text, out);
            // The old buffer held secrets: wipe it before letting it go.
            drop(Zeroizing::new(old));
        }
        count
    }

    /// [`Scrubber::scrub`], then cuts the result at `max` bytes. `more` says
    /// the raw text was itself cut after `max + longest()` bytes. Returns the
    /// occurrences replaced and whether anything was cut.
    ///
    /// The cut is at a fixed position: at `max`, or earlier only where whole
    /// occurrences before `max` were replaced by shorter text (whatever of
    /// the raw text past `max` a replacement pulled forward is dropped, since
    /// an occurrence cut off at the read limit may start there).
    pub fn scrub_and_cut(&self, text: &mut Vec<u8>, max: usize, more: bool) -> (usize, bool) {
        let found = self.find(text);
        let (mut out, settled) = self.replace(text, &found, max);
        let limit = if more { settled.min(max) } else { max };
        let truncated = more || out.len() > limit;
        if out.len() > limit {
            // Wipe the tail before it is cut off: it may hold a partial occurrence.
            zeroize::Zeroize::zeroize(&mut out[limit..]);
            out.truncate(limit);
        }
        let old = std::mem::replace(text, out);
        drop(Zeroizing::new(old));
        (found.len(), truncated)
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

    /// Every whole occurrence, in the raw text and in its decoded views, as
    /// raw ranges that do not overlap (overlapping ones are merged), each
    /// with the needle whose replacement it takes, in order.
    fn find(&self, text: &[u8]) -> Vec<(usize, usize, usize)> {
        // start -> (end, needle)
        let mut claims: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        let mut claim = |start: usize, end: usize, needle: usize| {
            let (mut start, mut end, mut needle) = (start, end, needle);
            // Merge every claim this one overlaps; the longer needle's
            // replacement stands for the union.
            let overlapping: Vec<usize> = claims
                .range(..end)
                .rev()
                .take_while(|(_, (e, _))| *e > start)
                .map(|(s, _)| *s)
                .collect();
            for s in overlapping {
                if let Some((e, n)) = claims.remove(&s) {
                    start = start.min(s);
                    end = end.max(e);
                    needle = needle.min(n);
                }
            }
            claims.insert(start, (end, needle));
        };
        let views = [
            None,
            memchr::memchr(b'\\', text).and(Some(json_unescaped(text))),
            memchr::memchr(b'%', text).and(Some(percent_decoded(text))),
            text.iter()
                .zip(text.iter().skip(1).chain([&0]))
                .any(|(a, b)| is_control(*a) || is_c1(*a, *b))
                .then(|| without_controls(text)),
        ];
        for (index, (needle, _)) in self.needles.iter().enumerate() {
            let finder = memmem::Finder::new(needle.as_slice());
            for view in &views {
                match view {
                    None => {
                        for at in finder.find_iter(text) {
                            claim(at, at + needle.len(), index);
                        }
                    }
                    Some(Some(view)) => {
                        for at in finder.find_iter(&view.bytes) {
                            let start = view.spans[at].0 as usize;
                            let end = view.spans[at + needle.len() - 1].1 as usize;
                            claim(start, end, index);
                        }
                    }
                    Some(None) => {}
                }
            }
        }
        claims.into_iter().map(|(s, (e, n))| (s, e, n)).collect()
    }

    /// The text with each found range replaced, and where raw position `at`
    /// lands in it (the end of a replacement that spans `at`).
    fn replace(&self, text: &[u8], found: &[(usize, usize, usize)], at: usize) -> (Vec<u8>, usize) {
        let mut out = Vec::with_capacity(text.len());
        let mut rest = 0;
        let mut landed = None;
        for &(start, end, needle) in found {
            if landed.is_none() && start >= at {
                landed = Some(out.len().saturating_add(at - rest));
            }
            out.extend_from_slice(&text[rest..start]);
            out.extend_from_slice(self.needles[needle].1.as_bytes());
            rest = end;
            if landed.is_none() && end > at {
                landed = Some(out.len());
            }
        }
        let landed = landed.unwrap_or(out.len().saturating_add(at.saturating_sub(rest)));
        out.extend_from_slice(&text[rest..]);
        (out, landed)
    }
}

/// `text` with every JSON string escape undone: `\"`, `\\`, `\/`, `\b`,
/// `\f`, `\n`, `\r`, `\t` and `\uXXXX` (surrogate pairs joined). Anything
/// else stays as it is.
fn json_unescaped(text: &[u8]) -> Option<View> {
    let mut view = View::with_capacity(text.len())?;
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'\\' {
            if let Some((c, len)) = json_escape(&text[i..]) {
                // No secret holds a control character: one escaped into the
                // middle of an echo (`\n`) is dropped, as a reader would.
                if !c.is_control() {
                    let mut utf8 = [0u8; 4];
                    for b in c.encode_utf8(&mut utf8).bytes() {
                        view.push(b, i, i + len);
                    }
                }
                i += len;
                continue;
            }
        }
        view.push(text[i], i, i + 1);
        i += 1;
    }
    Some(view)
}

/// The character one escape at the start of `s` stands for, and its length.
fn json_escape(s: &[u8]) -> Option<(char, usize)> {
    let simple = match s.get(1)? {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => {
            let unit = |at: usize| {
                let hex = std::str::from_utf8(s.get(at..at + 4)?).ok()?;
                u32::from_str_radix(hex, 16).ok()
            };
            let first = unit(2)?;
            if (0xD800..0xDC00).contains(&first) && s.get(6..8) == Some(&b"\\u"[..]) {
                let second = unit(8)?;
                if (0xDC00..0xE000).contains(&second) {
                    let c = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
                    return Some((char::from_u32(c)?, 12));
                }
            }
            return Some((char::from_u32(first)?, 6));
        }
        _ => return None,
    };
    Some((simple, 2))
}

/// ASCII control characters and DEL: line breaks in wrapped base64, and
/// what text shown to people drops (`printable`), joining what surrounds it.
fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// Whether `a`, `b` is a C1 control character (U+0080 to U+009F) in UTF-8.
fn is_c1(a: u8, b: u8) -> bool {
    a == 0xc2 && (0x80..0xa0).contains(&b)
}

/// `text` without its control characters (ASCII, DEL, and C1 as UTF-8), so
/// that a value split by a line break (MIME base64) or by anything else a
/// later step removes is still seen whole.
fn without_controls(text: &[u8]) -> Option<View> {
    let mut view = View::with_capacity(text.len())?;
    let mut i = 0;
    while i < text.len() {
        if is_c1(text[i], text.get(i + 1).copied().unwrap_or(0)) {
            i += 2;
        } else {
            // `push` leaves control characters out.
            view.push(text[i], i, i + 1);
            i += 1;
        }
    }
    Some(view)
}

/// The byte a `%XX` escape at the start of `bytes` stands for, if there is one.
pub(crate) fn percent_escape(bytes: &[u8]) -> Option<u8> {
    match bytes {
        [b'%', hi, lo, ..] => {
            let hex = [*hi, *lo];
            u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()
        }
        _ => None,
    }
}

/// `text` with every `%XX` escape undone.
fn percent_decoded(text: &[u8]) -> Option<View> {
    let mut view = View::with_capacity(text.len())?;
    let mut i = 0;
    while i < text.len() {
        match percent_escape(&text[i..]) {
            Some(b) => {
                view.push(b, i, i + 3);
                i += 3;
            }
            None => {
                view.push(text[i], i, i + 1);
                i += 1;
            }
        }
    }
    Some(view)
}

impl View {
    /// `None` for text too long to index with 32 bits (never: bodies are capped far below).
    fn with_capacity(len: usize) -> Option<Self> {
        u32::try_from(len).ok()?;
        Some(Self {
            bytes: Zeroizing::new(Vec::with_capacity(len)),
            spans: Vec::with_capacity(len),
        })
    }

    /// Adds a byte of the decoded text; control characters are left out
    /// (no secret holds one, and a later step may drop them and so join what
    /// surrounds them).
    fn push(&mut self, byte: u8, start: usize, end: usize) {
        if is_control(byte) {
            return;
        }
        self.bytes.push(byte);
        // In range: `with_capacity` checked the raw length.
        self.spans.push((start as u32, end as u32));
    }
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

    /// A token endpoint that echoes the form it was sent writes a space as
    /// `+` (review round 3: such a secret came back whole).
    #[test]
    fn a_form_encoded_secret_is_found() {
        let mut s = Scrubber::new();
        s.secret(b"My Secret/Value+CSerr", "[x]");
        let mut text = b"{\"error\":\"My+Secret%2FValue%2BCSerr\"}".to_vec();
        assert_eq!(s.scrub(&mut text), 1);
        assert_eq!(text, b"{\"error\":\"[x]\"}");
    }

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
    fn the_cut_is_at_a_fixed_position_whatever_precedes_it() {
        // The attack: a caller makes the provider echo a guess so that it ends
        // just before the cap, and reads the answer's length.
        let mut s = Scrubber::new();
        s.secret(SECRET, "h");
        s.header(&ProbeHeader {
            name: "authorization",
            value: Zeroizing::new(format!("Bearer {}", std::str::from_utf8(SECRET).unwrap())),
            sensitive: true,
        });
        let max = 64;
        let mut seen = Vec::new();
        for guess in [
            &b"Bearer Vq8rKw2Lx"[..],
            b"Bearer Zq8rKw2Lx",
            b"Vq8rKw2Lx7",
            b"Xq8rKw2Lx7",
        ] {
            for more in [false, true] {
                let mut text = vec![b'.'; max - guess.len()];
                text.extend_from_slice(guess);
                text.extend_from_slice(&[b'.'; 40]);
                let (count, truncated) = s.scrub_and_cut(&mut text, max, more);
                seen.push((text.len(), count, truncated));
            }
        }
        assert!(seen.iter().all(|x| *x == (max, 0, true)), "{seen:?}");
    }

    #[test]
    fn a_secret_straddling_the_cut_is_replaced_not_cut() {
        let mut s = Scrubber::new();
        s.secret(SECRET, "[h]");
        let mut text = b"0123456789".to_vec();
        text.extend_from_slice(SECRET);
        let (count, truncated) = s.scrub_and_cut(&mut text, 20, false);
        assert_eq!((count, truncated), (1, false));
        assert_eq!(text, b"0123456789[h]");
        let mut short = b"0123".to_vec();
        assert_eq!(s.scrub_and_cut(&mut short, 20, false), (0, false));
        assert_eq!(short, b"0123");
    }

    #[test]
    fn text_pulled_forward_from_past_the_read_limit_is_dropped() {
        // A replacement shortens the text; an occurrence cut off at the read
        // limit must not move before the cut.
        let mut s = Scrubber::new();
        s.secret(SECRET, "h");
        let mut text = SECRET.to_vec();
        text.extend_from_slice(&[b'.'; 10]);
        text.extend_from_slice(&SECRET[..20]);
        let (count, truncated) = s.scrub_and_cut(&mut text, 40, true);
        assert_eq!((count, truncated), (1, true));
        assert_eq!(text, [&b"h"[..], &[b'.'; 8]].concat());
    }

    #[test]
    fn finds_a_secret_split_by_control_characters() {
        let mut s = Scrubber::new();
        s.secret(SECRET, "[hint]");
        let split = |sep: &str| {
            let text = std::str::from_utf8(SECRET).unwrap();
            format!("a {}{sep}{} b", &text[..20], &text[20..])
        };
        for sep in [
            "\n", "\r\n", "\t", "\u{7f}", "\u{85}", "\n\n\n", r"\n", r"\u0085", "%0A", "%7f",
        ] {
            let mut text = split(sep);
            assert_eq!(s.scrub_str(&mut text), 1, "{sep:?}");
            assert_eq!(text, "a [hint] b", "{sep:?}");
        }
        let wrapped: String = STANDARD
            .encode(SECRET)
            .as_bytes()
            .chunks(10)
            .map(|c| format!("{}\r\n", std::str::from_utf8(c).unwrap()))
            .collect();
        let mut text = wrapped;
        assert_eq!(s.scrub_str(&mut text), 1);
    }

    #[test]
    fn finds_every_json_escape_and_percent_encoding() {
        let mut s = Scrubber::new();
        s.secret(b"phx_Key/42+x", "[hint]");
        for echo in [
            r#""phx_Key\/42+x""#,
            r#""phx_Key/42+x""#,
            r#""phx_Key/42+x""#,
            "q=phx_Key%2F42%2bx&",
            "q=%70%68%78%5F%4B%65%79%2F%34%32%2B%78",
        ] {
            let mut text = echo.to_owned();
            assert_eq!(s.scrub_str(&mut text), 1, "{echo}");
            assert!(
                text.contains("[hint]") && !text.contains("42"),
                "{echo} -> {text}"
            );
        }
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
