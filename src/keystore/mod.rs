//! The key-store seam: what the XKS API layer needs from a key manager, and nothing about HTTP.
//!
//! A [`KeyStore`] holds AES-256 keys named by [`KeyId`] and performs AES-256-GCM with them. The API
//! layer builds the spec's AAD bytes (see `crate::crypto`) and hands them over as opaque bytes; the
//! backend returns the IV, ciphertext and tag separately. Two backends implement the trait:
//! [`software`] (embedded, RustCrypto, the development default, *not an HSM*) and [`pkcs11`]
//! (a real HSM through `cryptoki`). Health is checked by [`health::HealthMonitor`], which runs each
//! backend's deep check in the background and caches the answer so that a health request never waits.

pub mod health;
pub mod pkcs11;
pub mod software;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Length of the IV this proxy generates (GCM's 96-bit nonce).
pub const IV_LEN: usize = 12;
/// Length of the GCM authentication tag: always 128 bits.
pub const TAG_LEN: usize = 16;
/// Length of an AES-256 key.
pub const KEY_LEN: usize = 32;

/// An external key id: 1 to 128 characters of `A-Z a-z 0-9 - . _` (spec §1.5).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    pub const MAX_LEN: usize = 128;

    /// Checks the spec's length and character rules.
    pub fn parse(s: &str) -> Result<Self, InvalidKeyId> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
        if s.is_empty() || s.len() > Self::MAX_LEN || !s.chars().all(valid_char) {
            return Err(InvalidKeyId);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

/// A key id that breaks the spec's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a key id is 1 to 128 characters of A-Z a-z 0-9 - . _")]
pub struct InvalidKeyId;

/// Which of the two XKS operations a key may perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyUsage {
    pub encrypt: bool,
    pub decrypt: bool,
}

impl KeyUsage {
    pub const BOTH: Self = Self {
        encrypt: true,
        decrypt: true,
    };

    /// Parses the CLI form: `encrypt,decrypt`, `encrypt`, `decrypt` or `none`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut usage = Self::default();
        for part in s.split(',').map(str::trim) {
            match part.to_ascii_lowercase().as_str() {
                "encrypt" => usage.encrypt = true,
                "decrypt" => usage.decrypt = true,
                "none" | "" => {}
                other => {
                    return Err(format!(
                        "unknown key usage {other:?}: use encrypt,decrypt | encrypt | decrypt | none"
                    ));
                }
            }
        }
        Ok(usage)
    }

    /// The upper-case names GetKeyMetadata reports (`ENCRYPT`, `DECRYPT`).
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::with_capacity(2);
        if self.encrypt {
            names.push("ENCRYPT");
        }
        if self.decrypt {
            names.push("DECRYPT");
        }
        names
    }
}

impl fmt::Display for KeyUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.names();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(",").to_ascii_lowercase())
        }
    }
}

/// Whether the key manager lets the key be used at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KeyState {
    Enabled,
    Disabled,
}

impl KeyState {
    /// The spec's `keyStatus` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyState::Enabled => "ENABLED",
            KeyState::Disabled => "DISABLED",
        }
    }
}

/// One of the two cryptographic operations, as a key-usage check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CryptoOp {
    Encrypt,
    Decrypt,
}

/// What the key manager knows about one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: KeyId,
    pub usage: KeyUsage,
    pub state: KeyState,
}

impl KeyInfo {
    /// Refuses `op` on a disabled key or a key whose usage does not include it.
    /// A disabled key is reported first, as the spec's InvalidStateException.
    pub fn require(&self, op: CryptoOp) -> Result<(), KeyStoreError> {
        if self.state == KeyState::Disabled {
            return Err(KeyStoreError::KeyDisabled);
        }
        let allowed = match op {
            CryptoOp::Encrypt => self.usage.encrypt,
            CryptoOp::Decrypt => self.usage.decrypt,
        };
        if allowed {
            Ok(())
        } else {
            Err(KeyStoreError::UsageNotPermitted(op))
        }
    }
}

/// AES-GCM output: the three values the Encrypt response carries, kept apart.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// 12 bytes when this proxy encrypts; 12 or 16 bytes on decrypt.
    pub iv: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub tag: [u8; TAG_LEN],
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Sealed {{ iv: {} bytes, ciphertext: {} bytes, tag }}",
            self.iv.len(),
            self.ciphertext.len()
        )
    }
}

/// Health of one key-manager instance, in the spec's terms (§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EkmHealth {
    Active,
    Degraded,
    Unavailable,
}

/// One `ekmFleetDetails` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkmStatus {
    pub id: String,
    pub model: String,
    pub health: EkmHealth,
    /// Why the instance is not ACTIVE; for logs only, never sent to KMS.
    pub detail: Option<String>,
}

/// Why a key-store operation failed. The API layer maps each to an XKS error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyStoreError {
    #[error("key not found")]
    KeyNotFound,
    #[error("key is disabled")]
    KeyDisabled,
    #[error("key usage does not permit {0:?}")]
    UsageNotPermitted(CryptoOp),
    #[error("key already exists")]
    KeyExists,
    /// GCM authentication failed: wrong key, IV, AAD, ciphertext or tag.
    #[error("ciphertext failed authentication")]
    AuthenticationFailed,
    /// The key manager's work queue is full; retry later.
    #[error("key manager is busy")]
    Busy,
    /// The key manager did not answer within its configured time.
    #[error("key manager did not answer in time")]
    Timeout,
    /// The key manager cannot be reached or is not logged in.
    #[error("key manager unavailable: {0}")]
    Unavailable(String),
    #[error("key manager error: {0}")]
    Internal(String),
}

/// Fixed facts about a backend, for health responses and logs.
#[derive(Debug, Clone)]
pub struct BackendDescription {
    /// `ekmVendor` in health responses.
    pub ekm_vendor: String,
    /// A short backend name for logs and the CLI (`software`, `pkcs11`).
    pub kind: &'static str,
}

/// One line of what `config check` reports about a backend's set-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupNote {
    /// Something the operator should look at (an object the backend ignores, say).
    pub warning: bool,
    pub text: String,
}

/// A key manager that keeps AES-256 keys and performs AES-256-GCM with them.
///
/// Implementations never block the async runtime: slow or blocking work (every PKCS#11 call) runs on
/// a bounded blocking pool inside the implementation.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    fn describe(&self) -> BackendDescription;

    /// Usage and state of a key, from a cache where the backend has one.
    async fn key_info(&self, id: &KeyId) -> Result<KeyInfo, KeyStoreError>;

    /// Encrypts with a fresh 12-byte IV from the key manager. `aad` is the complete AAD for GCM.
    async fn encrypt(
        &self,
        id: &KeyId,
        plaintext: Zeroizing<Vec<u8>>,
        aad: Vec<u8>,
    ) -> Result<Sealed, KeyStoreError>;

    /// Decrypts and authenticates; a tag mismatch is [`KeyStoreError::AuthenticationFailed`].
    async fn decrypt(
        &self,
        id: &KeyId,
        sealed: Sealed,
        aad: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>, KeyStoreError>;

    /// A deep check: a real encrypt and decrypt on a dedicated health-check key, per instance.
    /// Called by [`health::HealthMonitor`] in the background, never by a request.
    async fn check_health(&self) -> Vec<EkmStatus>;

    /// Creates a new AES-256 key inside the key manager.
    async fn create_key(&self, id: &KeyId, usage: KeyUsage) -> Result<KeyInfo, KeyStoreError>;

    /// Every key this key store may use.
    async fn list_keys(&self) -> Result<Vec<KeyInfo>, KeyStoreError>;

    /// Enables or disables a key; the state survives restarts.
    async fn set_state(&self, id: &KeyId, state: KeyState) -> Result<KeyInfo, KeyStoreError>;

    /// Calls queued or running in the key manager's worker pool, and the most it takes before
    /// answering `Busy`; `None` for a backend without a pool.
    fn occupancy(&self) -> Option<(usize, usize)> {
        None
    }

    /// How the backend was set up and what it ignores, for `config check` (PKCS#11: the profile,
    /// the IV source, token objects that cannot be trusted). Nothing by default.
    async fn setup_report(&self) -> Vec<SetupNote> {
        Vec::new()
    }

    /// Releases the key manager at shutdown (PKCS#11: worker sessions closed, token logged out).
    /// Calls made afterwards fail with `Unavailable`. Idempotent; nothing to do by default.
    async fn close(&self) {}
}

/// The key manager a key store uses (`backend` and its table in `[[keystore]]`).
#[derive(Debug, Clone, PartialEq)]
pub enum BackendSettings {
    /// Embedded software key store (not an HSM).
    Software {
        key_file: PathBuf,
    },
    Pkcs11(pkcs11::Pkcs11Settings),
}

impl BackendSettings {
    /// The settings of a `pkcs11` key store.
    pub fn pkcs11(&self) -> Option<&pkcs11::Pkcs11Settings> {
        match self {
            BackendSettings::Pkcs11(settings) => Some(settings),
            BackendSettings::Software { .. } => None,
        }
    }
}

/// Opens the key manager `backend` names. Blocking: it may load a PKCS#11 module and log in, so
/// call it from a blocking context, or use [`open_async`]. `tokens` lets key stores share PKCS#11
/// tokens.
pub fn open(
    backend: &BackendSettings,
    tokens: &mut pkcs11::Pkcs11Tokens,
) -> Result<Arc<dyn KeyStore>, String> {
    match backend {
        BackendSettings::Software { key_file } => {
            tracing::warn!(
                key_file = %key_file.display(),
                "using the embedded software key store: keys are in a local file, NOT in an HSM"
            );
            software::SoftwareKeyStore::open(key_file)
                .map(|s| Arc::new(s) as Arc<dyn KeyStore>)
                .map_err(|e| e.to_string())
        }
        BackendSettings::Pkcs11(settings) => tokens.open(settings),
    }
}

/// [`open`] on a blocking thread, for async callers: the one way the server, `config check` and
/// `keys` open a key manager.
pub async fn open_async(
    backend: BackendSettings,
    tokens: Arc<Mutex<pkcs11::Pkcs11Tokens>>,
) -> Result<Arc<dyn KeyStore>, String> {
    tokio::task::spawn_blocking(move || {
        let mut tokens = tokens.lock().unwrap_or_else(|p| p.into_inner());
        open(&backend, &mut tokens)
    })
    .await
    .map_err(|e| format!("opening the key store failed: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_rules() {
        assert!(KeyId::parse("foo").is_ok());
        assert!(KeyId::parse("a-b.c_D9").is_ok());
        assert!(KeyId::parse(&"k".repeat(128)).is_ok());
        assert_eq!(KeyId::parse(&"k".repeat(129)), Err(InvalidKeyId));
        assert_eq!(KeyId::parse(""), Err(InvalidKeyId));
        assert_eq!(KeyId::parse("a/b"), Err(InvalidKeyId));
        assert_eq!(KeyId::parse("a%20b"), Err(InvalidKeyId));
        assert_eq!(KeyId::parse("é"), Err(InvalidKeyId));
    }

    #[test]
    fn usage_parse_and_names() {
        assert_eq!(KeyUsage::parse("encrypt,decrypt").unwrap(), KeyUsage::BOTH);
        assert_eq!(KeyUsage::parse("none").unwrap(), KeyUsage::default());
        assert!(KeyUsage::parse("sign").is_err());
        assert_eq!(KeyUsage::BOTH.names(), vec!["ENCRYPT", "DECRYPT"]);
        assert_eq!(KeyUsage::default().to_string(), "none");
    }

    #[test]
    fn require_reports_disabled_before_usage() {
        let info = KeyInfo {
            id: KeyId::parse("k").unwrap(),
            usage: KeyUsage::default(),
            state: KeyState::Disabled,
        };
        assert!(matches!(
            info.require(CryptoOp::Encrypt),
            Err(KeyStoreError::KeyDisabled)
        ));
        let info = KeyInfo {
            state: KeyState::Enabled,
            ..info
        };
        assert!(matches!(
            info.require(CryptoOp::Decrypt),
            Err(KeyStoreError::UsageNotPermitted(CryptoOp::Decrypt))
        ));
    }
}
