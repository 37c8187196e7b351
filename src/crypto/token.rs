//! A root key that never leaves a hardware security module: the token seals
//! and opens with AES-256-GCM itself, through PKCS#11 (`cryptoki`).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use secrecy::ExposeSecret;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::{CryptoError, Plaintext, Sealed, NONCE_LEN};

/// Bits in a GCM tag, as the software path writes it.
const TAG_BITS: u64 = 128;

/// Where the token and its key are, and where its user PIN comes from
/// (`[keys.pkcs11]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// The PKCS#11 module (a shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// The label of the AES-256 key on the token.
    pub key_label: String,
    /// A file holding the user PIN, mode 0600 or stricter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_file: Option<PathBuf>,
    /// An environment variable holding the user PIN (removed once read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_env: Option<String>,
    /// Accept a key the token would let out. For development only: an
    /// extractable key can be copied off the token with the PIN.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_extractable: bool,
}

/// Why the token's key could not be used. Never carries the PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("the PKCS#11 module {module} could not be loaded ({reason}): check keys.pkcs11.module names the token's library (for SoftHSMv2, /usr/lib/softhsm/libsofthsm2.so)")]
    Module { module: PathBuf, reason: String },
    /// The configured label is not repeated: a mistyped secret may be in it.
    #[error("no token has the label that keys.pkcs11.token_label names, in {module} (tokens present: {present}); check keys.pkcs11.token_label")]
    NoToken {
        label: String,
        module: PathBuf,
        present: String,
    },
    #[error("{count} tokens are labelled `{label}`: a label must name one token (someone who can write the token store may have added one); remove the others or relabel")]
    ManyTokens { label: String, count: usize },
    #[error("the user PIN for token `{label}` is wrong: check keys.pkcs11.pin_file or pin_env (the token may lock after more failed attempts)")]
    WrongPin { label: String },
    #[error(
        "the user PIN of token `{label}` is locked: the token's security officer must unlock it"
    )]
    PinLocked { label: String },
    #[error("token `{token}` has no secret key with the label that keys.pkcs11.key_label names: check it. If this vault's keys were sealed under a key of that label, it was deleted: restore the token from its backup, or recover with the break-glass file key (README, \"The root key in an HSM\"); a new key would not open them")]
    NoKey { token: String, key: String },
    #[error("token `{token}` has {count} secret keys labelled `{key}`: labels must name one key")]
    ManyKeys {
        token: String,
        key: String,
        count: usize,
    },
    #[error("the key `{key}` on token `{token}` is {why}, so it can be or may have been copied off the token: create a new key with `pkcs11-tool --keygen --private --sensitive` (README, \"The root key in an HSM\"), or set keys.pkcs11.allow_extractable = true for development")]
    Extractable {
        token: String,
        key: String,
        why: &'static str,
    },
    #[error(
        "the key `{key}` on token `{token}` is not an AES-256 key that may encrypt and decrypt"
    )]
    NotAes { token: String, key: String },
    #[error("configure exactly one of keys.pkcs11.pin_file and keys.pkcs11.pin_env")]
    PinSource,
    /// The variable's name is not repeated: it may be the PIN itself, written
    /// in the wrong place.
    #[error("the environment variable that keys.pkcs11.pin_env names is not set in the vault's environment (its name is not repeated here, in case the PIN itself was written there)")]
    MissingPinEnv,
    #[error(transparent)]
    PinFile(#[from] crate::hardening::FileError),
    #[error("the HSM PIN is not UTF-8 text")]
    PinNotText,
    #[error("the token failed: {0}")]
    Token(String),
}

/// The associated data of the probe a token key seals when the vault first
/// connects, to recognise the same key after a reconnection.
const PROBE_AAD: &[u8] = b"credvault/v1/token-probe";

/// How long a check of the token may take before the key counts as
/// unavailable (a token, or a network HSM, that hangs).
const CHECK_WAIT: Duration = Duration::from_secs(5);
/// How many different PINs the token may refuse while the vault logs in
/// again before it stops trying (tokens lock a PIN after 3 to 10 tries).
const MAX_PIN_REFUSALS: usize = 2;

/// A key on a token, with a logged-in session to use it, and what it takes to
/// log in again once the token comes back after going away.
pub struct TokenKey {
    settings: TokenSettings,
    /// The module, loaded once at start-up and never again: a second load
    /// would run whatever file the path names by then.
    pkcs11: Pkcs11,
    /// `None` while the token is away.
    connected: Mutex<Option<Connected>>,
    /// Random bytes the key sealed at start-up. A reconnection uses a key
    /// only if it opens them: a new key under the same label (made after the
    /// first was deleted) would seal new key versions that no copy of the
    /// vault's key could open, and must never be taken for the old one.
    probe: Sealed,
    /// What the last check found, for readers that must not wait on the token.
    health: Health,
    label: String,
}

/// The last check's result, readable without touching the token.
struct Health {
    available: AtomicBool,
    /// When the check in progress began, in ms after `epoch`; 0 if none.
    checking_since: AtomicU64,
    epoch: Instant,
    /// Digests of the PINs the token refused when logging in again: none is
    /// tried again, and after [`MAX_PIN_REFUSALS`] no PIN is (a token locks
    /// its PIN after a few tries) until the vault restarts.
    pin_refused: Mutex<Vec<ring::digest::Digest>>,
    /// Why the last reconnection failed, to log each new reason once.
    last_failure: Mutex<Option<String>>,
}

/// A logged-in session and the key's handle in it.
struct Connected {
    session: Session,
    key: ObjectHandle,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKey({})", self.label)
    }
}

impl TokenKey {
    /// Loads the module, finds the token and the key, logs in, and checks
    /// that the key is a non-extractable AES-256 key (unless allowed).
    pub fn connect(settings: &TokenSettings) -> Result<Self, TokenError> {
        let pin = read_pin(settings)?;
        let pkcs11 = load_module(&settings.module)?;
        let connected = Connected::log_in(&pkcs11, settings, pin)?;
        let label = format!("{}/{}", settings.token_label, settings.key_label);
        let rng = SystemRandom::new();
        let (mut bytes, mut nonce) = ([0u8; 32], [0u8; NONCE_LEN]);
        rng.fill(&mut bytes)
            .and_then(|()| rng.fill(&mut nonce))
            .map_err(|_| TokenError::Token("no randomness for the probe".into()))?;
        let probe = connected
            .seal(nonce, &bytes, PROBE_AAD)
            .map_err(|e| TokenError::Token(format!("the key could not seal: {e}")))?;
        Ok(Self {
            settings: settings.clone(),
            pkcs11,
            connected: Mutex::new(Some(connected)),
            probe,
            health: Health {
                available: true.into(),
                checking_since: 0.into(),
                epoch: Instant::now(),
                pin_refused: Mutex::new(Vec::new()),
                last_failure: Mutex::new(None),
            },
            label,
        })
    }

    /// What the last [`TokenKey::check`] found, without touching the token:
    /// false also while a check has hung for longer than [`CHECK_WAIT`].
    pub fn available(&self) -> bool {
        let since = self.health.checking_since.load(Ordering::Acquire);
        let hung = since != 0 && self.elapsed_ms().saturating_sub(since) > millis(CHECK_WAIT);
        !hung && self.health.available.load(Ordering::Acquire)
    }

    /// Asks the token whether it answers and still holds the key; while it
    /// does not, tries to log in again, and takes the key it then finds only
    /// if it is the same key. Blocks: call it off the async runtime.
    pub fn check(&self) -> bool {
        // One check at a time: while one hangs, the next reports that (and
        // its start stays, so the hang is seen), rather than queue behind it.
        let started = self.elapsed_ms().max(1);
        if self
            .health
            .checking_since
            .compare_exchange(0, started, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return self.available();
        }
        let available = self.check_now();
        self.health.available.store(available, Ordering::Release);
        self.health.checking_since.store(0, Ordering::Release);
        available
    }

    fn check_now(&self) -> bool {
        let Some(mut connected) = self.lock_within(CHECK_WAIT) else {
            // A seal or an open holds the session, and hangs.
            return false;
        };
        if connected.as_ref().is_some_and(Connected::answers) {
            return true;
        }
        *connected = None;
        match self.reconnect() {
            Ok(again) => {
                *connected = Some(again);
                *self.last_failure() = None;
                tracing::info!(key = %self.label, "logged in to the token again: the same key is back");
                true
            }
            Err(why) => {
                let text = why.to_string();
                let mut last = self.last_failure();
                if last.as_deref() != Some(text.as_str()) {
                    tracing::error!(key = %self.label, "logging in to the token again failed: {text}");
                    *last = Some(text);
                }
                false
            }
        }
    }

    /// A new session, if the token is back with the key that sealed the probe.
    fn reconnect(&self) -> Result<Connected, Reconnect> {
        // The PIN source is read again: a PIN taken from the environment is
        // gone from it, so such a vault reconnects only after a restart.
        let pin = read_pin(&self.settings).map_err(Reconnect::Token)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, pin.expose_secret().as_bytes());
        let mut refused = self
            .health
            .pin_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if refused.len() >= MAX_PIN_REFUSALS {
            return Err(Reconnect::PinsRefused);
        }
        if refused.iter().any(|r| r.as_ref() == digest.as_ref()) {
            return Err(Reconnect::PinRefusedBefore);
        }
        let again = match Connected::log_in(&self.pkcs11, &self.settings, pin) {
            Ok(again) => again,
            Err(e @ (TokenError::WrongPin { .. } | TokenError::PinLocked { .. })) => {
                refused.push(digest);
                return Err(Reconnect::Token(e));
            }
            Err(e) => return Err(Reconnect::Token(e)),
        };
        refused.clear();
        match again.open(&self.probe, PROBE_AAD) {
            Ok(_) => Ok(again),
            Err(_) => Err(Reconnect::DifferentKey),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        millis(self.health.epoch.elapsed())
    }

    fn last_failure(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.health
            .last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The session, if no other use of it (hung in the token) holds it for
    /// longer than `wait`: a use that would queue behind a hung one fails
    /// instead, and frees its thread.
    fn lock_within(&self, wait: Duration) -> Option<std::sync::MutexGuard<'_, Option<Connected>>> {
        let deadline = Instant::now() + wait;
        loop {
            match self.connected.try_lock() {
                Ok(guard) => return Some(guard),
                Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(std::sync::TryLockError::WouldBlock) => return None,
            }
        }
    }

    /// AES-256-GCM on the token, with a nonce from `rng`: the same bytes the
    /// software path writes for the same key.
    pub fn seal(
        &self,
        rng: &SystemRandom,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Sealed, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let connected = self.lock_within(CHECK_WAIT).ok_or(CryptoError::Token)?;
        let connected = connected.as_ref().ok_or(CryptoError::Token)?;
        connected.seal(nonce, plaintext, aad).map_err(|e| {
            tracing::warn!(key = %self.label, error = %e, "the token could not seal");
            CryptoError::Token
        })
    }

    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Plaintext, CryptoError> {
        let connected = self.lock_within(CHECK_WAIT).ok_or(CryptoError::Token)?;
        let connected = connected.as_ref().ok_or(CryptoError::Token)?;
        connected.open(sealed, aad).map_err(|e| match e {
            Opened::Unavailable(e) => {
                tracing::warn!(key = %self.label, error = %e, "the token could not open a sealed key");
                CryptoError::Token
            }
            Opened::Failed => CryptoError::Decrypt,
        })
    }
}

/// Why logging in to the token again failed.
#[derive(Debug, thiserror::Error)]
enum Reconnect {
    #[error(transparent)]
    Token(TokenError),
    #[error("the token holds a different key under the root key's label, which does not open what the vault's key sealed: refused. The vault's keys were sealed under the key that was deleted; restore the token from its backup (README, \"The root key in an HSM\")")]
    DifferentKey,
    #[error("the token refused this PIN when the vault logged in again: it is not tried again, since a token locks its PIN after a few tries. Put the right PIN in keys.pkcs11.pin_file; the vault tries once more when the PIN there changes")]
    PinRefusedBefore,
    #[error("the token refused {MAX_PIN_REFUSALS} PINs while the vault logged in again: no more are tried, so that the token does not lock its PIN. Put the right PIN in keys.pkcs11.pin_file and restart the vault")]
    PinsRefused,
}

/// Why a token did not open a sealed key.
enum Opened {
    /// The token or its session is gone.
    Unavailable(P11Error),
    /// The bytes did not check out under this key.
    Failed,
}

impl Connected {
    /// Finds the token and the key, logs in, and checks the key's kind and
    /// attributes.
    fn log_in(pkcs11: &Pkcs11, settings: &TokenSettings, pin: AuthPin) -> Result<Self, TokenError> {
        let module = &settings.module;
        let token = settings.token_label.as_str();
        let failed = |e: P11Error| TokenError::Token(e.to_string());
        let mut present = Vec::new();
        let mut matching = Vec::new();
        for s in pkcs11.get_slots_with_token().map_err(failed)? {
            let info = pkcs11.get_token_info(s).map_err(failed)?;
            if info.label() == token {
                matching.push(s);
            }
            present.push(format!("`{}`", info.label()));
        }
        if matching.len() > 1 {
            return Err(TokenError::ManyTokens {
                label: token.to_owned(),
                count: matching.len(),
            });
        }
        let slot = matching.pop().ok_or_else(|| TokenError::NoToken {
            label: token.to_owned(),
            module: module.clone(),
            present: if present.is_empty() {
                "none".into()
            } else {
                present.join(", ")
            },
        })?;
        let session = pkcs11.open_ro_session(slot).map_err(failed)?;
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(P11Error::Pkcs11(
                RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                _,
            )) => {
                return Err(TokenError::WrongPin {
                    label: token.to_owned(),
                })
            }
            Err(P11Error::Pkcs11(RvError::PinLocked, _)) => {
                return Err(TokenError::PinLocked {
                    label: token.to_owned(),
                })
            }
            Err(e) => return Err(failed(e)),
        }
        let key_label = settings.key_label.as_str();
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(key_label.as_bytes().to_vec()),
            ])
            .map_err(failed)?;
        let key = match found.as_slice() {
            [key] => *key,
            [] => {
                return Err(TokenError::NoKey {
                    token: token.to_owned(),
                    key: key_label.to_owned(),
                })
            }
            many => {
                return Err(TokenError::ManyKeys {
                    token: token.to_owned(),
                    key: key_label.to_owned(),
                    count: many.len(),
                })
            }
        };
        let attributes = session
            .get_attributes(
                key,
                &[
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Extractable,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                ],
            )
            .map_err(failed)?;
        let (mut aes, mut len, mut encrypt, mut decrypt) = (false, 0u64, false, false);
        // Assume the worst of what the token does not say.
        let (mut extractable, mut private, mut sensitive) = (true, false, false);
        let (mut always_sensitive, mut never_extractable) = (false, false);
        for attribute in attributes {
            match attribute {
                Attribute::KeyType(t) => aes = t == KeyType::AES,
                Attribute::ValueLen(n) => len = n.into(),
                Attribute::Extractable(e) => extractable = e,
                Attribute::Encrypt(e) => encrypt = e,
                Attribute::Decrypt(d) => decrypt = d,
                Attribute::Private(p) => private = p,
                Attribute::Sensitive(s) => sensitive = s,
                Attribute::AlwaysSensitive(s) => always_sensitive = s,
                Attribute::NeverExtractable(n) => never_extractable = n,
                _ => {}
            }
        }
        // Why the key's value is, or may once have been, readable off the token.
        let exposed = if extractable {
            Some("extractable")
        } else if !private {
            // A public object may be used without logging in, and SoftHSMv2
            // stores its value unencrypted in the token directory.
            Some("a public object (CKA_PRIVATE false)")
        } else if !sensitive {
            Some("not sensitive")
        } else if !never_extractable || !always_sensitive {
            Some("once extractable or readable (imported, or changed after it was made)")
        } else {
            None
        };
        if !(aes && len == 32 && encrypt && decrypt) {
            return Err(TokenError::NotAes {
                token: token.to_owned(),
                key: key_label.to_owned(),
            });
        }
        match exposed {
            Some(why) if !settings.allow_extractable => {
                return Err(TokenError::Extractable {
                    token: token.to_owned(),
                    key: key_label.to_owned(),
                    why,
                })
            }
            Some(why) => tracing::warn!(
                token,
                key = key_label,
                why,
                "the root key could be copied off the token (keys.pkcs11.allow_extractable): \
                 acceptable for development only"
            ),
            None => {}
        }
        Ok(Self { session, key })
    }

    fn answers(&self) -> bool {
        self.session.get_session_info().is_ok()
            && self
                .session
                .get_attributes(self.key, &[AttributeType::KeyType])
                .is_ok_and(|found| !found.is_empty())
    }

    /// AES-256-GCM under `nonce`, which the caller draws at random.
    fn seal(
        &self,
        nonce: [u8; NONCE_LEN],
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Sealed, P11Error> {
        let mut iv = nonce;
        let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())?;
        let ciphertext = self
            .session
            .encrypt(&Mechanism::AesGcm(params), self.key, plaintext)?;
        Ok(Sealed { nonce, ciphertext })
    }

    fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Plaintext, Opened> {
        let mut iv = sealed.nonce;
        let params = GcmParams::new(&mut iv, aad, TAG_BITS.into()).map_err(|_| Opened::Failed)?;
        self.session
            .decrypt(&Mechanism::AesGcm(params), self.key, &sealed.ciphertext)
            .map(Plaintext::new)
            .map_err(|e| {
                if unavailable(&e) {
                    Opened::Unavailable(e)
                } else {
                    // A wrong tag is GeneralError on some tokens (SoftHSMv2):
                    // anything but the token being gone is a failed check.
                    Opened::Failed
                }
            })
    }
}

/// Loads the PKCS#11 module at `module` and initializes it. The vault runs
/// whatever code this library holds, PIN in hand: it must be an absolute
/// path to a file only root or this user may change, and the file checked
/// is the file loaded (opened once, then loaded through its descriptor), so
/// that no one can swap it between the check and the load.
fn load_module(module: &Path) -> Result<Pkcs11, TokenError> {
    if !module.is_absolute() {
        return Err(TokenError::Module {
            module: module.to_owned(),
            reason: "the path must be absolute".into(),
        });
    }
    let file = crate::hardening::open_trusted("PKCS#11 module", module)?;
    let pkcs11 = Pkcs11::new(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(|e| {
        TokenError::Module {
            module: module.to_owned(),
            reason: e.to_string(),
        }
    })?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(pkcs11),
        Err(e) => Err(TokenError::Module {
            module: module.to_owned(),
            reason: e.to_string(),
        }),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn read_pin(settings: &TokenSettings) -> Result<AuthPin, TokenError> {
    let text: Zeroizing<Vec<u8>> = match (&settings.pin_file, &settings.pin_env) {
        (Some(path), None) => crate::hardening::read_private("HSM PIN file", path)?,
        (None, Some(name)) => {
            let value = Zeroizing::new(std::env::var(name).map_err(|_| TokenError::MissingPinEnv)?);
            // Not thread-safe in general: this runs once, at start-up, before
            // the vault starts any thread that reads the environment.
            #[allow(clippy::disallowed_methods)]
            std::env::remove_var(name);
            Zeroizing::new(value.as_bytes().to_vec())
        }
        _ => return Err(TokenError::PinSource),
    };
    let pin = std::str::from_utf8(text.trim_ascii()).map_err(|_| TokenError::PinNotText)?;
    Ok(AuthPin::from(pin.to_owned()))
}

/// Whether an error means the token or its session is gone, rather than
/// that the data did not check out.
fn unavailable(e: &P11Error) -> bool {
    matches!(
        e,
        P11Error::Pkcs11(
            RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SessionClosed
                | RvError::SessionHandleInvalid
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}
