//! What a validation call sends and how a provider's answer becomes a verdict (PROVIDERS.md's table).

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Retry-After when the provider sends none (the seed document's advice).
pub const DEFAULT_RETRY_AFTER_SECS: u32 = 60;
/// A Retry-After beyond this is taken as this.
const MAX_RETRY_AFTER_SECS: u32 = 3600;
/// Provider text passed on to the caller is cut to this many characters.
const MAX_PROVIDER_TEXT: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    Valid,
    Rejected,
    WrongRegion,
    InsufficientPermission,
    RateLimited,
    Unreachable,
    UnexpectedResponse,
    Expired,
    Disconnected,
}

impl Verdict {
    /// Whether the verdict says something lasting about the credential,
    /// rather than that the provider could not tell now (UNREACHABLE,
    /// RATE_LIMITED, UNEXPECTED_RESPONSE) or that there is nothing to ask
    /// (DISCONNECTED).
    pub fn is_settled(self) -> bool {
        match self {
            Verdict::Valid
            | Verdict::Rejected
            | Verdict::WrongRegion
            | Verdict::InsufficientPermission
            | Verdict::Expired => true,
            Verdict::RateLimited
            | Verdict::Unreachable
            | Verdict::UnexpectedResponse
            | Verdict::Disconnected => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Valid => "VALID",
            Verdict::Rejected => "REJECTED",
            Verdict::WrongRegion => "WRONG_REGION",
            Verdict::InsufficientPermission => "INSUFFICIENT_PERMISSION",
            Verdict::RateLimited => "RATE_LIMITED",
            Verdict::Unreachable => "UNREACHABLE",
            Verdict::UnexpectedResponse => "UNEXPECTED_RESPONSE",
            Verdict::Expired => "EXPIRED",
            Verdict::Disconnected => "DISCONNECTED",
        }
    }
}

/// A verdict with what the caller is told. Non-secret: it is stored as the
/// connection's `last_validation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validation {
    pub verdict: Verdict,
    /// The HTTP status; 0 if none was received.
    pub provider_status: u16,
    pub display_name: String,
    pub message: String,
    pub retry_after_seconds: u32,
    pub suggested_region: String,
    pub checked_at: SystemTime,
    pub duration_ms: u32,
    /// With INSUFFICIENT_PERMISSION: the scopes the credential lacks for the
    /// calls this vault makes with it. (Absent from verdicts stored before.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_scopes: Vec<String>,
    /// With an unsettled verdict (see [`Verdict::is_settled`]): the settled
    /// one recorded before it, so that a provider's outage does not make
    /// the health monitor forget what it last knew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_settled: Option<Verdict>,
    /// As stored: a tag (hex) binding the rest to the connection's data key,
    /// so that the verdict a change is measured from is one the vault
    /// recorded, not one a database writer wrote. Empty elsewhere.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tag: String,
}

impl Validation {
    pub fn new(verdict: Verdict, message: impl Into<String>) -> Self {
        Self {
            verdict,
            provider_status: 0,
            display_name: String::new(),
            message: message.into(),
            retry_after_seconds: 0,
            suggested_region: String::new(),
            checked_at: SystemTime::now(),
            duration_ms: 0,
            missing_scopes: Vec::new(),
            last_settled: None,
            tag: String::new(),
        }
    }

    pub(crate) fn answered(verdict: Verdict, status: u16, message: impl Into<String>) -> Self {
        Self {
            provider_status: status,
            ..Self::new(verdict, message)
        }
    }
}

/// One header of a validation request. Secret values live in a zeroizing
/// buffer and are marked sensitive on the wire.
pub struct ProbeHeader {
    pub name: &'static str,
    pub value: Zeroizing<String>,
    pub sensitive: bool,
}

impl std::fmt::Debug for ProbeHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = if self.sensitive {
            "[REDACTED]"
        } else {
            self.value.as_str()
        };
        write!(f, "{}: {value}", self.name)
    }
}

/// A validation request: always a GET, to a path on the configured base URL.
#[derive(Debug)]
pub struct Probe {
    /// Path and query, origin-form.
    pub path_and_query: String,
    pub headers: Vec<ProbeHeader>,
}

/// What the provider answered, with the body read up to the size cap.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Retry-After in seconds, when sent as a number.
    pub retry_after: Option<u64>,
    pub body: Vec<u8>,
    /// The body was longer than the cap and was abandoned.
    pub truncated: bool,
}

impl Answer {
    pub fn json(&self) -> Option<serde_json::Value> {
        if self.truncated {
            return None;
        }
        serde_json::from_slice(&self.body).ok()
    }

    /// The provider's own `message` (or `detail`), cleaned and cut short.
    pub fn provider_message(&self) -> Option<String> {
        let json = self.json()?;
        let text = ["message", "detail", "error"]
            .iter()
            .find_map(|k| json.get(k).and_then(serde_json::Value::as_str))?;
        Some(printable(text))
    }
}

/// How long to leave a connection alone after a 429 that said `retry_after`.
pub fn cool_down_seconds(retry_after: Option<u64>) -> u32 {
    retry_after
        .map_or(DEFAULT_RETRY_AFTER_SECS, |s| {
            u32::try_from(s).unwrap_or(MAX_RETRY_AFTER_SECS)
        })
        .min(MAX_RETRY_AFTER_SECS)
}

/// Text from outside, safe to show: no control characters, bounded length.
pub fn printable(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_PROVIDER_TEXT)
        .collect();
    if text.chars().count() > MAX_PROVIDER_TEXT {
        format!("{cleaned}…")
    } else {
        cleaned
    }
}

/// How one provider reads an answer's status codes.
#[derive(Debug)]
pub struct Reading {
    /// Statuses that mean "valid credentials, missing permission".
    pub forbidden_is_permission: bool,
    /// 404 means the credentials reach no such resource (PostHog's project).
    pub not_found_is_permission: bool,
}

/// The table in PROVIDERS.md: statuses to verdicts. `accept` checks a 2xx
/// body's shape and returns the display name.
/// RATE_LIMITED, with the answer's Retry-After (defaulted and capped).
pub fn rate_limited(answer: &Answer, provider: &str) -> Validation {
    let secs = cool_down_seconds(answer.retry_after);
    Validation {
        retry_after_seconds: secs,
        ..Validation::answered(
            Verdict::RateLimited,
            answer.status,
            format!("{provider} is rate-limiting these credentials; retry in {secs} s"),
        )
    }
}

pub fn classify(
    answer: &Answer,
    reading: &Reading,
    provider: &str,
    accept: impl FnOnce(&serde_json::Value) -> Option<String>,
) -> Validation {
    let status = answer.status;
    match status {
        200..=299 => {
            if answer.truncated {
                return Validation::answered(
                    Verdict::UnexpectedResponse,
                    status,
                    format!("{provider} answered with a body over the size limit; it was not read"),
                );
            }
            match answer.json().as_ref().and_then(accept) {
                Some(display_name) => Validation {
                    display_name,
                    ..Validation::answered(
                        Verdict::Valid,
                        status,
                        format!("{provider} accepted the credentials"),
                    )
                },
                None => Validation::answered(
                    Verdict::UnexpectedResponse,
                    status,
                    format!("{provider} answered {status} with a body of an unexpected shape"),
                ),
            }
        }
        300..=399 => Validation::answered(
            Verdict::UnexpectedResponse,
            status,
            format!("{provider} answered with a redirect ({status}), which is never followed"),
        ),
        401 => Validation::answered(
            Verdict::Rejected,
            status,
            "the provider rejected the credentials",
        ),
        403 if reading.forbidden_is_permission => permission(answer, provider),
        403 => Validation::answered(
            Verdict::Rejected,
            status,
            "the provider rejected the credentials",
        ),
        404 if reading.not_found_is_permission => permission(answer, provider),
        429 => rate_limited(answer, provider),
        500..=599 => Validation::answered(
            Verdict::Unreachable,
            status,
            format!("{provider} answered {status}: a failure on the provider's side"),
        ),
        _ => Validation::answered(
            Verdict::UnexpectedResponse,
            status,
            format!("{provider} answered with an unexpected status {status}"),
        ),
    }
}

fn permission(answer: &Answer, provider: &str) -> Validation {
    let detail = answer
        .provider_message()
        .map_or_else(String::new, |m| format!(": {m}"));
    Validation::answered(
        Verdict::InsufficientPermission,
        answer.status,
        format!("{provider} accepted the credentials but refused the request{detail}"),
    )
}

/// An answer with `status` and `body`, for the providers' tests.
#[cfg(test)]
pub(crate) fn answer(status: u16, body: &str) -> Answer {
    Answer {
        status,
        retry_after: None,
        body: body.as_bytes().to_vec(),
        truncated: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: Reading = Reading {
        forbidden_is_permission: true,
        not_found_is_permission: false,
    };

    fn verdict(a: &Answer) -> Verdict {
        classify(a, &STRICT, "P", |j| j.get("ok").map(|_| "name".into())).verdict
    }

    #[test]
    fn maps_the_table() {
        assert_eq!(verdict(&answer(200, r#"{"ok":1}"#)), Verdict::Valid);
        assert_eq!(
            verdict(&answer(200, r#"{"nope":1}"#)),
            Verdict::UnexpectedResponse
        );
        assert_eq!(
            verdict(&answer(200, "not json")),
            Verdict::UnexpectedResponse
        );
        assert_eq!(verdict(&answer(302, "")), Verdict::UnexpectedResponse);
        assert_eq!(verdict(&answer(401, "")), Verdict::Rejected);
        assert_eq!(verdict(&answer(403, "")), Verdict::InsufficientPermission);
        assert_eq!(verdict(&answer(404, "")), Verdict::UnexpectedResponse);
        assert_eq!(verdict(&answer(429, "")), Verdict::RateLimited);
        assert_eq!(verdict(&answer(503, "")), Verdict::Unreachable);
        assert_eq!(verdict(&answer(418, "")), Verdict::UnexpectedResponse);
        let mut big = answer(200, r#"{"ok":1}"#);
        big.truncated = true;
        assert_eq!(verdict(&big), Verdict::UnexpectedResponse);
    }

    #[test]
    fn retry_after_defaults_to_sixty_and_is_capped() {
        let mut a = answer(429, "");
        assert_eq!(classify(&a, &STRICT, "P", |_| None).retry_after_seconds, 60);
        a.retry_after = Some(7);
        assert_eq!(classify(&a, &STRICT, "P", |_| None).retry_after_seconds, 7);
        a.retry_after = Some(10_000_000_000);
        assert_eq!(
            classify(&a, &STRICT, "P", |_| None).retry_after_seconds,
            3600
        );
    }

    #[test]
    fn provider_text_is_cleaned_and_cut() {
        let long = format!(r#"{{"message":"a\u0007b{}"}}"#, "x".repeat(500));
        let v = classify(&answer(403, &long), &STRICT, "P", |_| None);
        assert!(v.message.contains(": ab"), "{}", v.message);
        assert!(v.message.chars().count() < 300);
    }

    proptest::proptest! {
        #[test]
        fn any_answer_maps_to_a_verdict_without_panic(status in 100u16..600, body: Vec<u8>, retry: Option<u64>, truncated: bool) {
            let answer = Answer { status, retry_after: retry, body, truncated };
            let v = classify(&answer, &STRICT, "P", |j| j.get("ok").map(|_| String::new()));
            proptest::prop_assert_eq!(v.provider_status, status);
            proptest::prop_assert!(v.message.chars().count() < 400);
            if v.verdict == Verdict::Valid {
                proptest::prop_assert!((200..300).contains(&status) && !truncated);
            }
            if v.verdict == Verdict::RateLimited {
                proptest::prop_assert!(v.retry_after_seconds <= 3600);
            }
        }
    }
}
