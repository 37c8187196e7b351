//! The decrypt path: any nonce, ciphertext and associated data must fail cleanly.
#![no_main]

use credvault::crypto::{open, Key, Sealed, NONCE_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < NONCE_LEN + 1 {
        return;
    }
    let mut key_bytes = [7u8; 32];
    let Some(key) = Key::from_slice(&mut key_bytes) else { return };
    let (nonce, rest) = data.split_at(NONCE_LEN);
    let split = usize::from(rest[0]).min(rest.len() - 1);
    let (aad, ciphertext) = rest[1..].split_at(split);
    let sealed = Sealed {
        nonce: nonce.try_into().unwrap_or([0; NONCE_LEN]),
        ciphertext: ciphertext.to_vec(),
    };
    // Forging a tag by chance is not something a fuzzer does: this must fail.
    assert!(open(&key, &sealed, aad).is_err());
});
