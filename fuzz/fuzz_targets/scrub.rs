//! The scrubber: a secret (8 to 39 bytes) planted anywhere in arbitrary text,
//! as is, is gone after a scrub, and scrubbing never panics.
#![no_main]

use credvault::outbound::Scrubber;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let n = 8 + usize::from(first) % 32;
    if rest.len() < n {
        return;
    }
    let (secret, around) = rest.split_at(n);
    // A secret holding the replacement's byte could be rebuilt around it.
    if secret.contains(&b'#') {
        return;
    }
    let mut scrubber = Scrubber::new();
    scrubber.secret(secret, "#");
    let cut = around.len() / 2;
    let mut text = around[..cut].to_vec();
    text.extend_from_slice(secret);
    text.extend_from_slice(&around[cut..]);
    assert!(scrubber.scrub(&mut text) >= 1);
    assert!(!text.windows(secret.len()).any(|w| w == secret));
});
