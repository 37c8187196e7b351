//! Types for key material and decrypted secrets: zeroized on drop, redacted in `Debug`.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

use super::CryptoError;

/// A 256-bit symmetric key. Zeroized on drop; `Debug` never shows the bytes;
/// not `Clone`, so every copy is an explicit [`Key::duplicate`].
pub struct Key(Box<[u8; 32]>);

impl Key {
    pub const LEN: usize = 32;

    /// A fresh key from the operating system's random number generator.
    pub fn generate(rng: &SystemRandom) -> Result<Self, CryptoError> {
        let mut bytes = Box::new([0u8; 32]);
        rng.fill(bytes.as_mut_slice())
            .map_err(|_| CryptoError::Random)?;
        Ok(Self(bytes))
    }

    /// Takes ownership of the bytes, zeroizing the source buffer.
    pub fn from_slice(bytes: &mut [u8]) -> Option<Self> {
        let key = <[u8; 32]>::try_from(&*bytes)
            .ok()
            .map(|a| Self(Box::new(a)));
        bytes.zeroize();
        key
    }

    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn duplicate(&self) -> Self {
        Self(Box::new(*self.0))
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key([REDACTED])")
    }
}

/// Decrypted bytes: zeroized on drop, redacted in `Debug`, read only through
/// [`Plaintext::expose_secret`].
pub struct Plaintext(Zeroizing<Vec<u8>>);

impl Plaintext {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Plaintext([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let mut bytes = [0x41u8; 32];
        let key = Key::from_slice(&mut bytes).unwrap();
        assert_eq!(bytes, [0u8; 32], "source buffer is zeroized");
        assert_eq!(format!("{key:?}"), "Key([REDACTED])");
        let text = Plaintext::new(b"canary-AAAA".to_vec());
        assert!(!format!("{text:?}").contains("canary"));
    }

    #[test]
    fn from_slice_rejects_wrong_length() {
        assert!(Key::from_slice(&mut [1u8; 31]).is_none());
    }
}
