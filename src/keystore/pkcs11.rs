//! PKCS#11 key store (placeholder until the PKCS#11 backend lands: issue 4).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::KeyStore;

/// `[keystore.pkcs11]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Settings {
    pub module: PathBuf,
}

impl Pkcs11Settings {
    /// Checks the settings and resolves relative paths against `base_dir`.
    /// Errors name the field below `[keystore.pkcs11]` and what is wrong with it.
    pub fn validate(&mut self, _base_dir: &Path) -> Result<(), String> {
        Ok(())
    }
}

/// Loaded PKCS#11 modules and logged-in tokens, shared by the key stores that name them.
#[derive(Default)]
pub struct Pkcs11Tokens {}

impl Pkcs11Tokens {
    /// A key store view on the token that `settings` names, loading and logging in on first use.
    pub fn open(&mut self, _settings: &Pkcs11Settings) -> Result<Arc<dyn KeyStore>, String> {
        Err("the pkcs11 backend is not available in this build yet".into())
    }
}
