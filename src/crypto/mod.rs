//! Envelope encryption: a root key wraps versioned key-encryption keys, which wrap per-credential data keys.

mod envelope;
mod keyring;
mod secret;
mod token;

pub use envelope::{associated_data, bind, open, seal, verify_binding, Sealed, NONCE_LEN};
pub use keyring::{
    Keyring, NewKeyMaterial, RootKey, RootKeyError, RootSource, WrappedKeyVersion,
    FINGERPRINT_KEY_PURPOSE, LEGACY_FINGERPRINT_KEY_PURPOSE,
};
pub use secret::{Key, Plaintext};
pub use token::{TokenError, TokenKey, TokenSettings};

/// A decryption or key failure. Deliberately says nothing more than that: which
/// check failed is no business of whoever reads the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    #[error("could not decrypt")]
    Decrypt,
    /// Not data loss: nothing stored is wrong (AES-GCM refuses only inputs
    /// over 64 GiB).
    #[error("could not encrypt")]
    Encrypt,
    #[error("the system random number generator failed")]
    Random,
    #[error("key version {0} is not in the keyring")]
    UnknownKeyVersion(u32),
    #[error("the hardware security module holding the root key is unavailable")]
    Token,
}
