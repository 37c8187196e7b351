//! AES-256-GCM sealing with a random 96-bit nonce and associated data.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use ring::rand::{SecureRandom, SystemRandom};

use super::{CryptoError, Key, Plaintext};

pub const NONCE_LEN: usize = 12;

/// A ciphertext (with its tag) and the nonce it was sealed under.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: [u8; NONCE_LEN],
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed({} bytes)", self.ciphertext.len())
    }
}

/// Encrypts `plaintext` under `key`, binding it to `aad`.
pub fn seal(
    rng: &SystemRandom,
    key: &Key,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Sealed, CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce).map_err(|_| CryptoError::Random)?;
    let cipher = Aes256Gcm::new(key.expose_secret().into());
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        // AES-GCM encryption fails only for inputs over 64 GiB.
        .map_err(|_| CryptoError::Encrypt)?;
    Ok(Sealed { nonce, ciphertext })
}

/// Decrypts what [`seal`] produced. Any mismatch (key, nonce, ciphertext or
/// associated data) gives the same [`CryptoError::Decrypt`].
pub fn open(key: &Key, sealed: &Sealed, aad: &[u8]) -> Result<Plaintext, CryptoError> {
    let cipher = Aes256Gcm::new(key.expose_secret().into());
    cipher
        .decrypt(
            Nonce::from_slice(&sealed.nonce),
            Payload {
                msg: &sealed.ciphertext,
                aad,
            },
        )
        .map(Plaintext::new)
        .map_err(|_| CryptoError::Decrypt)
}

/// An HMAC-SHA256 tag of `fields` under `key`, for binding plaintext values
/// (a connection's parameters) to key material only the vault can open.
pub fn bind(key: &Key, purpose: &str, fields: &[&[u8]]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.expose_secret());
    ring::hmac::sign(&key, &associated_data(purpose, fields))
        .as_ref()
        .to_vec()
}

/// Whether `tag` is [`bind`]'s tag of `fields`, compared in constant time.
pub fn verify_binding(key: &Key, purpose: &str, fields: &[&[u8]], tag: &[u8]) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.expose_secret());
    ring::hmac::verify(&key, &associated_data(purpose, fields), tag).is_ok()
}

/// Builds associated data from a purpose label and fields, each length-prefixed
/// so that no two different field lists encode alike (`"ab","c"` vs `"a","bc"`).
pub fn associated_data(purpose: &str, fields: &[&[u8]]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64);
    for part in std::iter::once(purpose.as_bytes()).chain(fields.iter().copied()) {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::generate(&SystemRandom::new()).unwrap()
    }

    #[test]
    fn round_trips() {
        let rng = SystemRandom::new();
        let k = key();
        let sealed = seal(&rng, &k, b"secret", b"aad").unwrap();
        assert_eq!(
            open(&k, &sealed, b"aad").unwrap().expose_secret(),
            b"secret"
        );
    }

    #[test]
    fn nonces_are_fresh() {
        let rng = SystemRandom::new();
        let k = key();
        let a = seal(&rng, &k, b"same", b"").unwrap();
        let b = seal(&rng, &k, b"same", b"").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn rejects_every_single_bit_flip() {
        let rng = SystemRandom::new();
        let k = key();
        let sealed = seal(&rng, &k, b"secret value", b"aad").unwrap();
        for i in 0..sealed.ciphertext.len() * 8 {
            let mut bad = sealed.clone();
            bad.ciphertext[i / 8] ^= 1 << (i % 8);
            assert!(matches!(open(&k, &bad, b"aad"), Err(CryptoError::Decrypt)));
        }
        for i in 0..NONCE_LEN * 8 {
            let mut bad = sealed.clone();
            bad.nonce[i / 8] ^= 1 << (i % 8);
            assert!(matches!(open(&k, &bad, b"aad"), Err(CryptoError::Decrypt)));
        }
    }

    #[test]
    fn rejects_other_associated_data_and_key() {
        let rng = SystemRandom::new();
        let k = key();
        let sealed = seal(&rng, &k, b"secret", b"row-1").unwrap();
        assert!(open(&k, &sealed, b"row-2").is_err());
        assert!(open(&key(), &sealed, b"row-1").is_err());
    }

    #[test]
    fn associated_data_is_unambiguous() {
        assert_ne!(
            associated_data("p", &[b"ab", b"c"]),
            associated_data("p", &[b"a", b"bc"])
        );
        assert_ne!(associated_data("p", &[b"x"]), associated_data("q", &[b"x"]));
    }

    proptest::proptest! {
        #[test]
        fn seal_then_open_returns_the_input(plain: Vec<u8>, aad: Vec<u8>) {
            let rng = SystemRandom::new();
            let k = key();
            let sealed = seal(&rng, &k, &plain, &aad).unwrap();
            let opened = open(&k, &sealed, &aad).unwrap();
            proptest::prop_assert_eq!(opened.expose_secret(), &plain[..]);
        }

        #[test]
        fn any_single_bit_change_fails(plain: Vec<u8>, aad: Vec<u8>, bit: usize) {
            let rng = SystemRandom::new();
            let k = key();
            let sealed = seal(&rng, &k, &plain, &aad).unwrap();
            let total = (sealed.ciphertext.len() + NONCE_LEN + aad.len()) * 8;
            let bit = bit % total;
            let (mut bad, mut bad_aad) = (sealed.clone(), aad.clone());
            if bit < sealed.ciphertext.len() * 8 {
                bad.ciphertext[bit / 8] ^= 1 << (bit % 8);
            } else if bit < (sealed.ciphertext.len() + NONCE_LEN) * 8 {
                let b = bit - sealed.ciphertext.len() * 8;
                bad.nonce[b / 8] ^= 1 << (b % 8);
            } else {
                let b = bit - (sealed.ciphertext.len() + NONCE_LEN) * 8;
                bad_aad[b / 8] ^= 1 << (b % 8);
            }
            proptest::prop_assert!(open(&k, &bad, &bad_aad).is_err());
        }
    }
}
