//! The `[keystore.pkcs11]` settings: parsing, validation, path resolution and the PIN source.
//!
//! The PIN itself is only read when the token is opened ([`Pkcs11Settings::resolve_pin`]), so that an
//! environment variable set only at serve time works, and it is held in zeroizing memory.
//! `Debug` prints every PIN source as `<redacted>`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zeroize::Zeroizing;

use super::gcm::IvSetting;
use super::profile::ProfileName;
use crate::field::FieldError;
use crate::keystore::KeyId;

/// Label of the dedicated health-check key unless `health_key` says otherwise.
pub const DEFAULT_HEALTH_KEY: &str = "xks-health-check";
/// Default `call_timeout_ms`.
pub const DEFAULT_CALL_TIMEOUT_MS: u32 = 100;
/// Default `queue_depth`.
pub const DEFAULT_QUEUE_DEPTH: u32 = 256;
/// Default `key_cache_ttl_ms`.
pub const DEFAULT_KEY_CACHE_TTL_MS: u32 = 1000;
/// Default `session_pool_size`: the most sessions (and worker threads) serving at once. With a
/// network HSM at 2 ms per call an Encrypt holds a session about 6 ms, so 32 sessions carry about
/// 5,000 Encrypt/s; KMS's default 1,800/s keeps about 11 busy.
pub const DEFAULT_SESSION_POOL_SIZE: u32 = 32;
/// A job running this many call timeouts (at least [`MIN_STUCK_AFTER`]) marks its worker stuck.
const STUCK_AFTER_CALL_TIMEOUTS: u32 = 5;
const MIN_STUCK_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// `[keystore.pkcs11]` settings.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Settings {
    /// Path of the vendor's PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// Label of the token to use (exactly one of `token_label` and `slot`).
    #[serde(default)]
    pub token_label: Option<String>,
    /// Slot id of the token to use.
    #[serde(default)]
    pub slot: Option<u64>,
    /// Name of an environment variable holding the user PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// The user PIN itself (development only).
    #[serde(default)]
    pub pin: Option<Zeroizing<String>>,
    /// A file holding the user PIN (trailing newline ignored); relative to the config file.
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// Labels this key store may use; every AES key on the token when absent.
    #[serde(default)]
    pub keys: Option<Vec<String>>,
    /// Label of the dedicated health-check key (default `xks-health-check`).
    #[serde(default)]
    pub health_key: Option<String>,
    /// The most sessions serving at once, one worker thread each, opened on demand and kept
    /// (default 32; as many as the CPUs are opened at start).
    #[serde(default)]
    pub session_pool_size: Option<u32>,
    /// How long a request waits for the HSM before `Timeout` (default 100 ms).
    #[serde(default)]
    pub call_timeout_ms: Option<u32>,
    /// How many HSM calls may wait for a worker before `Busy` (default 256).
    #[serde(default)]
    pub queue_depth: Option<u32>,
    /// How long cached key handles and attributes are trusted (default 1000 ms).
    #[serde(default)]
    pub key_cache_ttl_ms: Option<u32>,
    /// The module's vendor profile (default `auto`: from the token's manufacturer).
    #[serde(default)]
    pub profile: Option<ProfileName>,
    /// Where GCM IVs come from (default `auto`: probed at start-up with the health-check key).
    #[serde(default)]
    pub iv_source: Option<IvSetting>,
}

impl fmt::Debug for Pkcs11Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |set: bool| if set { Some("<redacted>") } else { None };
        f.debug_struct("Pkcs11Settings")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("slot", &self.slot)
            .field("pin_env", &self.pin_env)
            .field("pin", &redacted(self.pin.is_some()))
            .field("pin_file", &self.pin_file)
            .field("keys", &self.keys)
            .field("health_key", &self.health_key)
            .field("session_pool_size", &self.session_pool_size)
            .field("call_timeout_ms", &self.call_timeout_ms)
            .field("queue_depth", &self.queue_depth)
            .field("key_cache_ttl_ms", &self.key_cache_ttl_ms)
            .field("profile", &self.profile)
            .field("iv_source", &self.iv_source)
            .finish()
    }
}

/// Which token of a module a key store uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum TokenSelector {
    Label(String),
    Slot(u64),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(label) => f.write_str(label),
            TokenSelector::Slot(slot) => write!(f, "slot-{slot}"),
        }
    }
}

impl Pkcs11Settings {
    /// Checks the settings and resolves relative paths against `base_dir`. Errors name the field
    /// below `[keystore.pkcs11]`.
    pub fn validate(&mut self, base_dir: &Path) -> Result<(), FieldError> {
        if self.module.as_os_str().is_empty() {
            return Err(FieldError::new(
                "module",
                "give the path of the PKCS#11 module (.so)",
            ));
        }
        if self.module.is_relative() && self.module.components().count() > 1 {
            self.module = base_dir.join(&self.module);
        }
        match (&self.token_label, self.slot) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "token_label",
                    "give token_label or slot, not both",
                ));
            }
            (None, None) => return Err(FieldError::new("token_label", "give token_label or slot")),
            (Some(label), None) if label.is_empty() || label.len() > 32 => {
                return Err(FieldError::new(
                    "token_label",
                    "a token label is 1 to 32 characters",
                ));
            }
            _ => {}
        }
        let sources = [
            self.pin.is_some(),
            self.pin_env.is_some(),
            self.pin_file.is_some(),
        ];
        if sources.iter().filter(|set| **set).count() != 1 {
            return Err(FieldError::new(
                "pin_env",
                "give exactly one of pin, pin_env or pin_file",
            ));
        }
        if let Some(var) = &self.pin_env
            && (var.is_empty() || var.contains('=') || var.contains('\0'))
        {
            return Err(FieldError::new(
                "pin_env",
                "not a valid environment variable name",
            ));
        }
        if self.pin.as_ref().is_some_and(|pin| pin.is_empty()) {
            return Err(FieldError::new("pin", "must not be empty"));
        }
        if let Some(file) = &self.pin_file
            && file.is_relative()
        {
            self.pin_file = Some(base_dir.join(file));
        }
        if let Some(keys) = &self.keys {
            for key in keys {
                KeyId::parse(key).map_err(|e| FieldError::new("keys", format!("{key:?}: {e}")))?;
            }
        }
        if let Some(key) = &self.health_key {
            KeyId::parse(key)
                .map_err(|e| FieldError::new("health_key", format!("{key:?}: {e}")))?;
        }
        if self.session_pool_size == Some(0) {
            return Err(FieldError::new("session_pool_size", "must be at least 1"));
        }
        if self.session_pool_size.is_some_and(|n| n > 1024) {
            return Err(FieldError::new("session_pool_size", "at most 1024"));
        }
        if self
            .call_timeout_ms
            .is_some_and(|ms| !(1..=60_000).contains(&ms))
        {
            return Err(FieldError::new(
                "call_timeout_ms",
                "must be between 1 and 60000",
            ));
        }
        if self.queue_depth.is_some_and(|n| !(1..=65_536).contains(&n)) {
            return Err(FieldError::new(
                "queue_depth",
                "must be between 1 and 65536",
            ));
        }
        if self.key_cache_ttl_ms.is_some_and(|ms| ms > 60_000) {
            return Err(FieldError::new(
                "key_cache_ttl_ms",
                "at most 60000 (a key disabled elsewhere is seen within it)",
            ));
        }
        Ok(())
    }

    pub(crate) fn selector(&self) -> Result<TokenSelector, String> {
        match (&self.token_label, self.slot) {
            (Some(label), _) => Ok(TokenSelector::Label(label.clone())),
            (None, Some(slot)) => Ok(TokenSelector::Slot(slot)),
            (None, None) => Err("pkcs11.token_label: give token_label or slot".into()),
        }
    }

    /// The setting the PIN came from, for error messages.
    pub(crate) fn pin_field(&self) -> &'static str {
        if self.pin.is_some() {
            "pin"
        } else if self.pin_file.is_some() {
            "pin_file"
        } else {
            "pin_env"
        }
    }

    /// Reads the PIN from its source. Errors name the setting, never the PIN.
    pub(crate) fn resolve_pin(&self) -> Result<Zeroizing<String>, String> {
        let pin: Zeroizing<String> = if let Some(pin) = &self.pin {
            pin.clone()
        } else if let Some(var) = &self.pin_env {
            match std::env::var(var) {
                Ok(value) => Zeroizing::new(value),
                Err(std::env::VarError::NotPresent) => {
                    return Err(format!(
                        "pkcs11.pin_env: environment variable {var} is not set"
                    ));
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(format!("pkcs11.pin_env: {var} is not valid UTF-8"));
                }
            }
        } else if let Some(file) = &self.pin_file {
            let text =
                Zeroizing::new(std::fs::read_to_string(file).map_err(|e| {
                    format!("pkcs11.pin_file: cannot read {}: {e}", file.display())
                })?);
            Zeroizing::new(text.trim_end_matches(['\r', '\n']).to_owned())
        } else {
            return Err("pkcs11.pin_env: give exactly one of pin, pin_env or pin_file".into());
        };
        if pin.is_empty() {
            return Err(format!("pkcs11.{}: the PIN is empty", self.pin_field()));
        }
        Ok(pin)
    }

    /// How the worker pool is sized.
    pub(crate) fn pool(&self) -> super::pool::PoolSettings {
        let max_sessions = self
            .session_pool_size
            .unwrap_or(DEFAULT_SESSION_POOL_SIZE)
            .max(1) as usize;
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        super::pool::PoolSettings {
            warm_sessions: cpus.min(max_sessions),
            max_sessions,
            queue_depth: self.queue_capacity(),
            stuck_after: (self.call_timeout() * STUCK_AFTER_CALL_TIMEOUTS).max(MIN_STUCK_AFTER),
        }
    }

    pub(crate) fn call_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(
            self.call_timeout_ms
                .unwrap_or(DEFAULT_CALL_TIMEOUT_MS)
                .max(1),
        ))
    }

    pub(crate) fn queue_capacity(&self) -> usize {
        self.queue_depth.unwrap_or(DEFAULT_QUEUE_DEPTH).max(1) as usize
    }

    pub(crate) fn key_cache_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(
            self.key_cache_ttl_ms.unwrap_or(DEFAULT_KEY_CACHE_TTL_MS),
        ))
    }

    pub(crate) fn health_key_id(&self) -> Result<KeyId, String> {
        let label = self.health_key.as_deref().unwrap_or(DEFAULT_HEALTH_KEY);
        KeyId::parse(label).map_err(|e| format!("pkcs11.health_key: {label:?}: {e}"))
    }
}
