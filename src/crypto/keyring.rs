//! The root key, the versioned key-encryption keys it wraps, and the fingerprint key.

use std::collections::BTreeMap;
use std::path::Path;

use data_encoding::{BASE32_NOPAD, HEXLOWER_PERMISSIVE};
use ring::hmac;
use ring::rand::SystemRandom;
use zeroize::Zeroizing;

use super::{associated_data, open, seal, CryptoError, Key, Sealed};

const KEK_PURPOSE: &str = "credvault/v1/key-encryption-key";
/// The fingerprint key's purpose among the keys sealed under the root key,
/// in a database whose every connection has its parameters bound to its data
/// key. Sealed under this name (and so under this associated data), it marks
/// that binding as done: an attacker without the root key can only replace it
/// with a copy from before the upgrade that introduced binding.
pub const FINGERPRINT_KEY_PURPOSE: &str = "fingerprint+bound-params";
/// The same key in a database written before parameters were bound.
pub const LEGACY_FINGERPRINT_KEY_PURPOSE: &str = "fingerprint";
const DATA_KEY_PURPOSE: &str = "credvault/v1/data-key";
const FINGERPRINT_PURPOSE: &str = "credvault/v1/fingerprint";
const ROOT_SEALED_PURPOSE: &str = "credvault/v1/root-sealed";

/// Why the root key could not be loaded. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootKeyError {
    #[error(transparent)]
    File(#[from] crate::hardening::FileError),
    #[error("root key from {origin} is not 64 hexadecimal characters (32 bytes)")]
    Malformed { origin: String },
    /// The variable's name is not repeated: it may be the key itself,
    /// written in the wrong place.
    #[error("the environment variable that keys.root_key_env names is not set in the vault's environment (its name is not repeated here, in case the key itself was written there)")]
    MissingEnv,
    #[error(transparent)]
    Token(#[from] super::TokenError),
}

/// Where the root key is: the choice `[keys]` makes.
#[derive(Debug, Clone, Copy)]
pub enum RootSource<'a> {
    /// 64 hex characters in a file of mode 0600.
    File(&'a Path),
    /// 64 hex characters in an environment variable.
    Env(&'a str),
    /// An AES-256 key on a PKCS#11 token, which seals and opens itself.
    Token(&'a super::TokenSettings),
}

/// The key that wraps key-encryption keys and nothing else.
pub struct RootKey(Root);

enum Root {
    Software(Key),
    /// The key never leaves the token.
    Token(Box<super::TokenKey>),
}

impl RootKey {
    /// Loads the root key from where the configuration says it is.
    pub fn load(source: RootSource<'_>) -> Result<Self, RootKeyError> {
        match source {
            RootSource::File(path) => Self::from_file(path),
            RootSource::Env(name) => Self::from_env(name),
            RootSource::Token(settings) => Ok(Self(Root::Token(Box::new(
                super::TokenKey::connect(settings)?,
            )))),
        }
    }

    /// Whether the root key is on a token (and so never in this process).
    pub fn on_token(&self) -> bool {
        matches!(self.0, Root::Token(_))
    }

    /// Whether the root key could seal at the last [`RootKey::check`]: a key
    /// in this process always can; a token when it answered and held the
    /// key. Never waits on a token.
    pub fn available(&self) -> bool {
        match &self.0 {
            Root::Software(_) => true,
            Root::Token(token) => token.available(),
        }
    }

    /// Asks the token whether it answers and holds the key, logging in again
    /// if it went away and came back. Blocks: call it off the async runtime.
    pub fn check(&self) -> bool {
        match &self.0 {
            Root::Software(_) => true,
            Root::Token(token) => token.check(),
        }
    }

    /// Reads 64 hex characters from a file that only its owner may read.
    pub fn from_file(path: &Path) -> Result<Self, RootKeyError> {
        let text = crate::hardening::read_private("root key file", path)?;
        Self::from_hex(&text, &path.display().to_string())
    }

    /// Reads 64 hex characters from an environment variable, then removes it
    /// from the process environment, so that no later reader of the
    /// environment (a library, a child process, a crash reporter) gets it.
    /// `/proc/PID/environ` still shows the environment the process started
    /// with, to its own user and root: prefer `root_key_file`.
    pub fn from_env(name: &str) -> Result<Self, RootKeyError> {
        let value = Zeroizing::new(std::env::var(name).map_err(|_| RootKeyError::MissingEnv)?);
        // Not thread-safe in general: this runs once, at start-up, before the
        // vault starts any thread that reads the environment.
        #[allow(clippy::disallowed_methods)]
        std::env::remove_var(name);
        Self::from_hex(value.as_bytes(), &format!("environment variable {name}"))
    }

    fn from_hex(text: &[u8], origin: &str) -> Result<Self, RootKeyError> {
        let malformed = || RootKeyError::Malformed {
            origin: origin.to_owned(),
        };
        let trimmed = text.trim_ascii();
        let mut bytes = Zeroizing::new(
            HEXLOWER_PERMISSIVE
                .decode(trimmed)
                .map_err(|_| malformed())?,
        );
        Key::from_slice(&mut bytes)
            .map(|key| Self(Root::Software(key)))
            .ok_or_else(malformed)
    }

    /// A fresh root key and its hex form, for a new development vault.
    pub fn generate(rng: &SystemRandom) -> Result<(Self, Zeroizing<String>), CryptoError> {
        let key = Key::generate(rng)?;
        let hex = Zeroizing::new(HEXLOWER_PERMISSIVE.encode(key.expose_secret()));
        Ok((Self(Root::Software(key)), hex))
    }
}

impl RootKey {
    /// AES-256-GCM under the root key, in this process or on the token: the
    /// same bytes either way for the same key.
    fn seal_bytes(
        &self,
        rng: &SystemRandom,
        bytes: &[u8],
        aad: &[u8],
    ) -> Result<Sealed, CryptoError> {
        match &self.0 {
            Root::Software(key) => seal(rng, key, bytes, aad),
            Root::Token(token) => token.seal(rng, bytes, aad),
        }
    }

    fn open_bytes(&self, sealed: &Sealed, aad: &[u8]) -> Result<super::Plaintext, CryptoError> {
        match &self.0 {
            Root::Software(key) => open(key, sealed, aad),
            Root::Token(token) => token.open(sealed, aad),
        }
    }

    /// Seals other key material (the audit signing key) under the root key.
    pub fn seal(
        &self,
        rng: &SystemRandom,
        purpose: &str,
        bytes: &[u8],
    ) -> Result<Sealed, CryptoError> {
        self.seal_bytes(
            rng,
            bytes,
            &associated_data(ROOT_SEALED_PURPOSE, &[purpose.as_bytes()]),
        )
    }

    pub fn open(&self, purpose: &str, sealed: &Sealed) -> Result<super::Plaintext, CryptoError> {
        self.open_bytes(
            sealed,
            &associated_data(ROOT_SEALED_PURPOSE, &[purpose.as_bytes()]),
        )
    }

    /// Seals a key-encryption key version.
    pub fn seal_key_version(
        &self,
        rng: &SystemRandom,
        version: u32,
        key: &Key,
    ) -> Result<WrappedKeyVersion, CryptoError> {
        Ok(WrappedKeyVersion {
            version,
            sealed: self.seal_bytes(rng, key.expose_secret(), &kek_aad(version))?,
        })
    }

    /// Unseals a key-encryption key version.
    pub fn open_key_version(&self, wrapped: &WrappedKeyVersion) -> Result<Key, CryptoError> {
        let plain = self.open_bytes(&wrapped.sealed, &kek_aad(wrapped.version))?;
        let mut bytes = plain.expose_secret().to_vec();
        Key::from_slice(&mut bytes).ok_or(CryptoError::Decrypt)
    }
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKey([REDACTED])")
    }
}

/// A key-encryption key as stored: sealed under the root key.
#[derive(Debug, Clone)]
pub struct WrappedKeyVersion {
    pub version: u32,
    pub sealed: Sealed,
}

/// The unwrapped keys a running vault works with.
pub struct Keyring {
    rng: SystemRandom,
    primary: u32,
    versions: BTreeMap<u32, Key>,
    fingerprint: Key,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &self.primary)
            .field("versions", &self.versions.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What a brand-new keyring needs persisted.
#[derive(Debug)]
pub struct NewKeyMaterial {
    pub first_version: WrappedKeyVersion,
    pub fingerprint_key: Sealed,
}

impl Keyring {
    /// Creates key version 1 and a fingerprint key, both sealed under `root`.
    pub fn create(root: &RootKey) -> Result<(Self, NewKeyMaterial), CryptoError> {
        let rng = SystemRandom::new();
        let kek = Key::generate(&rng)?;
        let fingerprint = Key::generate(&rng)?;
        let material = NewKeyMaterial {
            first_version: root.seal_key_version(&rng, 1, &kek)?,
            fingerprint_key: root.seal(
                &rng,
                FINGERPRINT_KEY_PURPOSE,
                fingerprint.expose_secret(),
            )?,
        };
        let keyring = Self {
            rng,
            primary: 1,
            versions: BTreeMap::from([(1, kek)]),
            fingerprint,
        };
        Ok((keyring, material))
    }

    /// Unwraps stored key material. The highest version is primary. The
    /// fingerprint key was sealed for `fingerprint_purpose`.
    pub fn unwrap(
        root: &RootKey,
        versions: &[WrappedKeyVersion],
        fingerprint_key: &Sealed,
        fingerprint_purpose: &str,
    ) -> Result<Self, CryptoError> {
        let versions = versions
            .iter()
            .map(|w| Ok((w.version, root.open_key_version(w)?)))
            .collect::<Result<BTreeMap<_, _>, CryptoError>>()?;
        let primary = *versions.keys().next_back().ok_or(CryptoError::Decrypt)?;
        let plain = root.open(fingerprint_purpose, fingerprint_key)?;
        let mut bytes = plain.expose_secret().to_vec();
        let fingerprint = Key::from_slice(&mut bytes).ok_or(CryptoError::Decrypt)?;
        Ok(Self {
            rng: SystemRandom::new(),
            primary,
            versions,
            fingerprint,
        })
    }

    /// The fingerprint key sealed anew under `root` for `purpose`.
    pub fn seal_fingerprint_key(
        &self,
        root: &RootKey,
        purpose: &str,
    ) -> Result<Sealed, CryptoError> {
        root.seal(&self.rng, purpose, self.fingerprint.expose_secret())
    }

    pub fn primary_version(&self) -> u32 {
        self.primary
    }

    /// The versions this keyring can unwrap with.
    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.versions.keys().copied()
    }

    /// The next version's number and a fresh key-encryption key for it, not
    /// yet sealed: seal it with [`RootKey::seal_key_version`], persist the
    /// sealed form, then [`Keyring::install`] the key.
    pub fn next_key(&self) -> Result<(u32, Key), CryptoError> {
        let version = self.versions.keys().next_back().map_or(1, |v| v + 1);
        Ok((version, Key::generate(&self.rng)?))
    }

    /// Makes `version` primary: new data keys are wrapped by it from now on.
    pub fn install(&mut self, version: u32, key: Key) {
        self.versions.insert(version, key);
        self.primary = self.primary.max(version);
    }

    /// Forgets a retired version's key (the primary cannot be removed).
    pub fn remove(&mut self, version: u32) {
        if version != self.primary {
            self.versions.remove(&version);
        }
    }

    /// Wraps an existing data key under the primary version, for the rewrap job.
    pub fn rewrap_data_key(
        &self,
        owner: &[&[u8]],
        data_key: &Key,
    ) -> Result<(u32, Sealed), CryptoError> {
        let kek = &self.versions[&self.primary];
        let aad = data_key_aad(owner, self.primary);
        Ok((
            self.primary,
            seal(&self.rng, kek, data_key.expose_secret(), &aad)?,
        ))
    }

    pub fn rng(&self) -> &SystemRandom {
        &self.rng
    }

    /// A fresh data key, and that key sealed under the primary key version with
    /// associated data naming its owner.
    pub fn new_data_key(&self, owner: &[&[u8]]) -> Result<(Key, u32, Sealed), CryptoError> {
        let data_key = Key::generate(&self.rng)?;
        let kek = &self.versions[&self.primary];
        let aad = data_key_aad(owner, self.primary);
        let sealed = seal(&self.rng, kek, data_key.expose_secret(), &aad)?;
        Ok((data_key, self.primary, sealed))
    }

    /// Unwraps a data key sealed by [`Keyring::new_data_key`] for the same owner.
    pub fn open_data_key(
        &self,
        owner: &[&[u8]],
        version: u32,
        sealed: &Sealed,
    ) -> Result<Key, CryptoError> {
        let kek = self
            .versions
            .get(&version)
            .ok_or(CryptoError::UnknownKeyVersion(version))?;
        let plain = open(kek, sealed, &data_key_aad(owner, version))?;
        let mut bytes = plain.expose_secret().to_vec();
        Key::from_slice(&mut bytes).ok_or(CryptoError::Decrypt)
    }

    /// A short keyed hash of a secret value: 8 base32 characters (40 bits).
    /// It depends only on the fingerprint key, so it survives key rotation.
    pub fn fingerprint(&self, value: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, self.fingerprint.expose_secret());
        let tag = hmac::sign(&key, &associated_data(FINGERPRINT_PURPOSE, &[value]));
        BASE32_NOPAD.encode(&tag.as_ref()[..5]).to_ascii_lowercase()
    }
}

fn kek_aad(version: u32) -> Vec<u8> {
    associated_data(KEK_PURPOSE, &[&version.to_be_bytes()])
}

fn data_key_aad(owner: &[&[u8]], version: u32) -> Vec<u8> {
    let version = version.to_be_bytes();
    let mut fields = owner.to_vec();
    fields.push(&version);
    associated_data(DATA_KEY_PURPOSE, &fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> RootKey {
        RootKey::generate(&SystemRandom::new()).unwrap().0
    }

    #[test]
    fn unwraps_what_it_created() {
        let root = root();
        let (ring, material) = Keyring::create(&root).unwrap();
        let again = Keyring::unwrap(
            &root,
            std::slice::from_ref(&material.first_version),
            &material.fingerprint_key,
            FINGERPRINT_KEY_PURPOSE,
        )
        .unwrap();
        assert_eq!(again.primary_version(), 1);
        assert_eq!(ring.fingerprint(b"abc"), again.fingerprint(b"abc"));
        let (dk, v, sealed) = ring.new_data_key(&[b"ws", b"amplitude"]).unwrap();
        let back = again
            .open_data_key(&[b"ws", b"amplitude"], v, &sealed)
            .unwrap();
        assert_eq!(dk.expose_secret(), back.expose_secret());
    }

    #[test]
    fn refuses_another_root_key() {
        let (_, material) = Keyring::create(&root()).unwrap();
        assert!(Keyring::unwrap(
            &root(),
            &[material.first_version],
            &material.fingerprint_key,
            FINGERPRINT_KEY_PURPOSE,
        )
        .is_err());
    }

    #[test]
    fn data_key_is_bound_to_owner_and_version() {
        let (ring, _) = Keyring::create(&root()).unwrap();
        let (_, v, sealed) = ring.new_data_key(&[b"ws", b"amplitude"]).unwrap();
        assert!(ring
            .open_data_key(&[b"ws2", b"amplitude"], v, &sealed)
            .is_err());
        assert!(ring
            .open_data_key(&[b"ws", b"posthog"], v, &sealed)
            .is_err());
        assert!(matches!(
            ring.open_data_key(&[b"ws", b"amplitude"], v + 1, &sealed),
            Err(CryptoError::UnknownKeyVersion(_))
        ));
    }

    #[test]
    fn fingerprint_is_short_stable_and_keyed() {
        let (a, _) = Keyring::create(&root()).unwrap();
        let (b, _) = Keyring::create(&root()).unwrap();
        let fp = a.fingerprint(b"secret");
        assert_eq!(fp.len(), 8);
        assert_eq!(fp, a.fingerprint(b"secret"));
        assert_ne!(fp, a.fingerprint(b"secreT"));
        assert_ne!(
            fp,
            b.fingerprint(b"secret"),
            "another vault's key gives another fingerprint"
        );
    }

    #[test]
    fn root_key_file_must_be_private_and_hex() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        std::fs::write(&path, "00".repeat(32)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            RootKey::from_file(&path),
            Err(RootKeyError::File(
                crate::hardening::FileError::Shared { .. }
            ))
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(RootKey::from_file(&path).is_ok());
        std::fs::write(&path, "zz").unwrap();
        let err = RootKey::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("64 hexadecimal"), "{err}");
    }
}
