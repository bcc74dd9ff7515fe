//! The embedded software key store: AES-256-GCM in this process with RustCrypto's `aes-gcm`.
//!
//! **This is not an HSM.** Key material sits in a local JSON key file (created with mode 0600) and in
//! this process's memory. It exists so that the proxy runs, and the whole test suite passes, with
//! nothing installed; production key stores use the `pkcs11` backend.
//!
//! The key file is re-read when its modification time changes (checked at most once a second), so
//! `xks-proxy keys enable|disable|create` take effect on a running server. IVs are 96 bits from the
//! operating system's CSPRNG.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use aes_gcm::aead::consts::U16;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::aes::Aes256;
use aes_gcm::{Aes256Gcm, AesGcm, Nonce, Tag};
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{
    BackendDescription, CryptoOp, EkmHealth, EkmStatus, IV_LEN, KEY_LEN, KeyId, KeyInfo, KeyState,
    KeyStore, KeyStoreError, KeyUsage, Sealed,
};

/// Label used wherever this backend names itself to an operator or to KMS.
pub const NOT_AN_HSM: &str = "xks-proxy embedded software key store (NOT an HSM)";
const FILE_FORMAT: &str = "xks-proxy-software-keys-v1";
const RELOAD_CHECK_EVERY: Duration = Duration::from_secs(1);

type Aes256Gcm16 = AesGcm<Aes256, U16>;

/// The key file on disk.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    format: String,
    warning: String,
    keys: Vec<StoredKey>,
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    id: String,
    usage: KeyUsage,
    state: KeyState,
    /// Base64 of the 32 key bytes.
    material: Zeroizing<String>,
}

struct LoadedKey {
    info: KeyInfo,
    material: Zeroizing<[u8; KEY_LEN]>,
    cipher: Aes256Gcm,
}

type KeyMap = BTreeMap<KeyId, Arc<LoadedKey>>;

struct Freshness {
    checked_at: Instant,
    modified: Option<SystemTime>,
}

/// A software key store backed by one key file.
pub struct SoftwareKeyStore {
    path: PathBuf,
    keys: RwLock<Arc<KeyMap>>,
    freshness: Mutex<Freshness>,
}

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a software key file: {reason}")]
    Format { path: String, reason: String },
}

impl SoftwareKeyStore {
    /// Opens the key file, creating an empty one (mode 0600) if it does not exist.
    pub fn open(path: &Path) -> Result<Self, KeyFileError> {
        if !path.exists() {
            write_key_file(path, &KeyMap::new())?;
        }
        let modified = modified_time(path);
        let keys = read_key_file(path)?;
        Ok(Self {
            path: path.to_owned(),
            keys: RwLock::new(Arc::new(keys)),
            freshness: Mutex::new(Freshness {
                checked_at: Instant::now(),
                modified,
            }),
        })
    }

    /// Imports existing key material (used by tests to check interoperability with an HSM). A
    /// test hook.
    #[cfg(feature = "test-hooks")]
    pub fn import_key(
        &self,
        id: &KeyId,
        usage: KeyUsage,
        material: &[u8; KEY_LEN],
    ) -> Result<KeyInfo, KeyStoreError> {
        self.insert_key(id, usage, Zeroizing::new(*material))
    }

    /// The current key map, re-read from disk if the file changed.
    fn keys(&self) -> Arc<KeyMap> {
        self.reload_if_changed();
        match self.keys.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn reload_if_changed(&self) {
        let Ok(mut freshness) = self.freshness.lock() else {
            return;
        };
        if freshness.checked_at.elapsed() < RELOAD_CHECK_EVERY {
            return;
        }
        freshness.checked_at = Instant::now();
        let modified = modified_time(&self.path);
        if modified == freshness.modified {
            return;
        }
        match read_key_file(&self.path) {
            Ok(keys) => {
                freshness.modified = modified;
                self.replace(keys);
                tracing::info!(path = %self.path.display(), "software key file reloaded");
            }
            Err(err) => {
                tracing::warn!(error = %err, "software key file changed but cannot be read; keeping the keys in memory")
            }
        }
    }

    fn replace(&self, keys: KeyMap) {
        match self.keys.write() {
            Ok(mut guard) => *guard = Arc::new(keys),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(keys),
        }
    }

    fn lookup(&self, id: &KeyId) -> Result<Arc<LoadedKey>, KeyStoreError> {
        self.keys()
            .get(id)
            .cloned()
            .ok_or(KeyStoreError::KeyNotFound)
    }

    /// Applies `change` to a copy of the key map, writes it, then publishes it.
    fn update(
        &self,
        change: impl FnOnce(&mut KeyMap) -> Result<KeyInfo, KeyStoreError>,
    ) -> Result<KeyInfo, KeyStoreError> {
        let mut keys = (*self.keys()).clone();
        let info = change(&mut keys)?;
        write_key_file(&self.path, &keys).map_err(|e| KeyStoreError::Internal(e.to_string()))?;
        if let Ok(mut freshness) = self.freshness.lock() {
            freshness.modified = modified_time(&self.path);
        }
        self.replace(keys);
        Ok(info)
    }

    fn insert_key(
        &self,
        id: &KeyId,
        usage: KeyUsage,
        material: Zeroizing<[u8; KEY_LEN]>,
    ) -> Result<KeyInfo, KeyStoreError> {
        self.update(|keys| {
            if keys.contains_key(id) {
                return Err(KeyStoreError::KeyExists);
            }
            let key = loaded_key(id.clone(), usage, KeyState::Enabled, material);
            let info = key.info.clone();
            keys.insert(id.clone(), Arc::new(key));
            Ok(info)
        })
    }
}

fn loaded_key(
    id: KeyId,
    usage: KeyUsage,
    state: KeyState,
    material: Zeroizing<[u8; KEY_LEN]>,
) -> LoadedKey {
    let cipher = Aes256Gcm::new((&*material).into());
    LoadedKey {
        info: KeyInfo { id, usage, state },
        material,
        cipher,
    }
}

fn modified_time(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_key_file(path: &Path) -> Result<KeyMap, KeyFileError> {
    let shown = path.display().to_string();
    let format_error = |reason: String| KeyFileError::Format {
        path: shown.clone(),
        reason,
    };
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|source| KeyFileError::Io {
        path: shown.clone(),
        source,
    })?);
    let file: KeyFile = serde_json::from_str(&text).map_err(|e| format_error(e.to_string()))?;
    if file.format != FILE_FORMAT {
        return Err(format_error(format!("format must be {FILE_FORMAT:?}")));
    }
    let mut keys = KeyMap::new();
    for stored in file.keys {
        let id = KeyId::parse(&stored.id)
            .map_err(|e| format_error(format!("key {:?}: {e}", stored.id)))?;
        let bytes = Zeroizing::new(
            BASE64
                .decode(stored.material.as_bytes())
                .map_err(|_| format_error(format!("key {id}: material is not base64")))?,
        );
        let material: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| format_error(format!("key {id}: material is not 32 bytes")))?;
        let key = loaded_key(
            id.clone(),
            stored.usage,
            stored.state,
            Zeroizing::new(material),
        );
        if keys.insert(id.clone(), Arc::new(key)).is_some() {
            return Err(format_error(format!("key {id} appears twice")));
        }
    }
    Ok(keys)
}

/// Writes the key file atomically (temp file + rename), readable by its owner only.
fn write_key_file(path: &Path, keys: &KeyMap) -> Result<(), KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = KeyFile {
        format: FILE_FORMAT.into(),
        warning: format!("{NOT_AN_HSM}: key material below is in the clear; protect this file"),
        keys: keys
            .values()
            .map(|k| StoredKey {
                id: k.info.id.to_string(),
                usage: k.info.usage,
                state: k.info.state,
                material: Zeroizing::new(BASE64.encode(*k.material)),
            })
            .collect(),
    };
    let text = Zeroizing::new(
        serde_json::to_string_pretty(&file).map_err(|e| io(std::io::Error::other(e)))?,
    );
    crate::atomic_file::write_private(path, text.as_bytes()).map_err(io)
}

fn random_bytes<const N: usize>() -> Result<[u8; N], KeyStoreError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)
        .map_err(|e| KeyStoreError::Internal(format!("OS random generator failed: {e}")))?;
    Ok(bytes)
}

fn seal(cipher: &Aes256Gcm, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, KeyStoreError> {
    let iv = random_bytes::<IV_LEN>()?;
    let mut buffer = plaintext.to_vec();
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&iv), aad, &mut buffer)
        .map_err(|_| KeyStoreError::Internal("AES-GCM encryption failed".into()))?;
    Ok(Sealed {
        iv: iv.to_vec(),
        ciphertext: buffer,
        tag: tag.into(),
    })
}

fn open(key: &LoadedKey, sealed: Sealed, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
    let mut buffer = Zeroizing::new(sealed.ciphertext);
    let tag = Tag::from_slice(&sealed.tag);
    let result = match sealed.iv.len() {
        IV_LEN => key.cipher.decrypt_in_place_detached(
            Nonce::from_slice(&sealed.iv),
            aad,
            &mut buffer,
            tag,
        ),
        16 => Aes256Gcm16::new((&*key.material).into()).decrypt_in_place_detached(
            aes_gcm::Nonce::<U16>::from_slice(&sealed.iv),
            aad,
            &mut buffer,
            tag,
        ),
        _ => return Err(KeyStoreError::AuthenticationFailed),
    };
    result.map_err(|_| KeyStoreError::AuthenticationFailed)?;
    Ok(buffer)
}

#[async_trait]
impl KeyStore for SoftwareKeyStore {
    fn describe(&self) -> BackendDescription {
        BackendDescription {
            ekm_vendor: NOT_AN_HSM.into(),
            kind: "software",
        }
    }

    async fn key_info(&self, id: &KeyId) -> Result<KeyInfo, KeyStoreError> {
        Ok(self.lookup(id)?.info.clone())
    }

    async fn encrypt(
        &self,
        id: &KeyId,
        plaintext: Zeroizing<Vec<u8>>,
        aad: Vec<u8>,
    ) -> Result<Sealed, KeyStoreError> {
        let key = self.lookup(id)?;
        key.info.require(CryptoOp::Encrypt)?;
        seal(&key.cipher, &plaintext, &aad)
    }

    async fn decrypt(
        &self,
        id: &KeyId,
        sealed: Sealed,
        aad: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
        let key = self.lookup(id)?;
        key.info.require(CryptoOp::Decrypt)?;
        open(&key, sealed, &aad)
    }

    async fn check_health(&self) -> Vec<EkmStatus> {
        // A round trip through the same cipher code with a throw-away key: the software store has
        // no dedicated health key in its file, and must not use a key that KMS uses.
        let outcome = (|| {
            let material = Zeroizing::new(random_bytes::<KEY_LEN>()?);
            let probe = loaded_key(
                KeyId::parse("health-check").map_err(|e| KeyStoreError::Internal(e.to_string()))?,
                KeyUsage::BOTH,
                KeyState::Enabled,
                material,
            );
            let plaintext = random_bytes::<32>()?;
            let sealed = seal(&probe.cipher, &plaintext, b"xks-proxy health check")?;
            let opened = open(&probe, sealed, b"xks-proxy health check")?;
            if opened.as_slice() == plaintext {
                Ok(())
            } else {
                Err(KeyStoreError::Internal(
                    "round trip returned other bytes".into(),
                ))
            }
        })();
        let keys_readable = fs::metadata(&self.path).is_ok();
        let (health, detail) = match (outcome, keys_readable) {
            (Ok(()), true) => (EkmHealth::Active, None),
            (Ok(()), false) => (
                EkmHealth::Degraded,
                Some(format!(
                    "key file {} cannot be read; serving keys in memory",
                    self.path.display()
                )),
            ),
            (Err(e), _) => (EkmHealth::Unavailable, Some(e.to_string())),
        };
        vec![EkmStatus {
            id: "software-1".into(),
            model: format!("{NOT_AN_HSM} {}", env!("CARGO_PKG_VERSION")),
            health,
            detail,
        }]
    }

    async fn create_key(&self, id: &KeyId, usage: KeyUsage) -> Result<KeyInfo, KeyStoreError> {
        self.insert_key(id, usage, Zeroizing::new(random_bytes::<KEY_LEN>()?))
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>, KeyStoreError> {
        Ok(self.keys().values().map(|k| k.info.clone()).collect())
    }

    async fn set_state(&self, id: &KeyId, state: KeyState) -> Result<KeyInfo, KeyStoreError> {
        self.update(|keys| {
            let current = keys.get(id).ok_or(KeyStoreError::KeyNotFound)?;
            let key = loaded_key(
                id.clone(),
                current.info.usage,
                state,
                current.material.clone(),
            );
            let info = key.info.clone();
            keys.insert(id.clone(), Arc::new(key));
            Ok(info)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SoftwareKeyStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SoftwareKeyStore::open(&dir.path().join("keys.json")).unwrap();
        (dir, store)
    }

    fn id(s: &str) -> KeyId {
        KeyId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn round_trip_and_tamper() {
        let (_dir, store) = store();
        store.create_key(&id("k"), KeyUsage::BOTH).await.unwrap();
        let sealed = store
            .encrypt(&id("k"), Zeroizing::new(b"hello".to_vec()), b"aad".to_vec())
            .await
            .unwrap();
        assert_eq!(sealed.iv.len(), IV_LEN);
        assert_eq!(sealed.ciphertext.len(), 5);
        let opened = store
            .decrypt(&id("k"), sealed.clone(), b"aad".to_vec())
            .await
            .unwrap();
        assert_eq!(opened.as_slice(), b"hello");
        let wrong_aad = store
            .decrypt(&id("k"), sealed.clone(), b"other".to_vec())
            .await;
        assert!(matches!(
            wrong_aad,
            Err(KeyStoreError::AuthenticationFailed)
        ));
        let mut bad_tag = sealed;
        bad_tag.tag[0] ^= 1;
        let result = store.decrypt(&id("k"), bad_tag, b"aad".to_vec()).await;
        assert!(matches!(result, Err(KeyStoreError::AuthenticationFailed)));
    }

    #[tokio::test]
    async fn key_file_is_private_and_state_persists() {
        let (dir, store) = store();
        let path = dir.path().join("keys.json");
        store.create_key(&id("k"), KeyUsage::BOTH).await.unwrap();
        store.set_state(&id("k"), KeyState::Disabled).await.unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let reopened = SoftwareKeyStore::open(&path).unwrap();
        let info = reopened.key_info(&id("k")).await.unwrap();
        assert_eq!(info.state, KeyState::Disabled);
        let refused = reopened
            .encrypt(&id("k"), Zeroizing::new(vec![1]), vec![])
            .await;
        assert!(matches!(refused, Err(KeyStoreError::KeyDisabled)));
    }

    #[tokio::test]
    async fn sixteen_byte_iv_decrypts() {
        // Encrypt with a 16-byte nonce directly, then decrypt through the store.
        let (_dir, store) = store();
        let material = [7u8; KEY_LEN];
        store
            .import_key(&id("k"), KeyUsage::BOTH, &material)
            .unwrap();
        let iv = [9u8; 16];
        let mut buffer = b"sixteen".to_vec();
        let tag = Aes256Gcm16::new((&material).into())
            .encrypt_in_place_detached(aes_gcm::Nonce::<U16>::from_slice(&iv), b"a", &mut buffer)
            .unwrap();
        let sealed = Sealed {
            iv: iv.to_vec(),
            ciphertext: buffer,
            tag: tag.into(),
        };
        let opened = store
            .decrypt(&id("k"), sealed, b"a".to_vec())
            .await
            .unwrap();
        assert_eq!(opened.as_slice(), b"sixteen");
    }

    #[tokio::test]
    async fn health_is_active() {
        let (_dir, store) = store();
        let statuses = store.check_health().await;
        assert_eq!(statuses.len(), 1);
        assert_eq!(statuses[0].health, EkmHealth::Active);
    }
}
