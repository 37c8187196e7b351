//! Store input parsing, JWT decoding included: any field names and values are
//! accepted or refused, never a panic, and a refusal never echoes a value.
#![no_main]

use std::collections::HashMap;

use credvault::domain::NewCredential;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\u{1}');
    let (provider, name, value) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    for provider in [provider, "amplitude", "amperity", "posthog"] {
        let secrets: HashMap<String, String> = [
            (name.to_owned(), value.to_owned()),
            ("access_token".to_owned(), value.to_owned()),
            ("personal_api_key".to_owned(), value.to_owned()),
        ]
        .into();
        let params: HashMap<String, String> = [("tenant_id".to_owned(), "acme".to_owned())].into();
        if let Err(e) = NewCredential::parse("ws", provider, secrets, params) {
            // A value unlike any message text (upper case and a digit) must not appear in it.
            let distinctive = value.len() >= 8
                && value.chars().any(|c| c.is_ascii_uppercase())
                && value.chars().any(|c| c.is_ascii_digit());
            if distinctive {
                assert!(!e.to_string().contains(value));
            }
        }
    }
});
