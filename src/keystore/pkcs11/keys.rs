//! Keys as PKCS#11 objects, and the AES-GCM calls on them.
//!
//! A key is a `CKO_SECRET_KEY` of type `CKK_AES` and 32 bytes whose `CKA_LABEL` is the XKS key id.
//! Usage comes from `CKA_ENCRYPT` / `CKA_DECRYPT`. State is `CKA_END_DATE`: a date before today
//! means DISABLED (this backend writes 1970-01-01 to disable); an empty, absent, unparsable or
//! future end date means ENABLED (enabling writes an empty date). The attribute lives on the token,
//! so the state survives restarts and is seen by every proxy sharing the HSM.
//!
//! [`KeyCache`] keeps handles and attributes by label for `key_cache_ttl_ms`, and only for the
//! connection generation they were read under; create, enable and disable refresh their entry.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::types::{Date, Ulong};
use zeroize::Zeroizing;

use super::errors::{describe, is_gcm_auth_failure};
use super::pool::{CallError, Worker};
use crate::keystore::{
    IV_LEN, KEY_LEN, KeyId, KeyInfo, KeyState, KeyStoreError, KeyUsage, Sealed, TAG_LEN,
};

/// A key's handle and what its attributes say.
#[derive(Debug, Clone)]
pub(crate) struct KeyEntry {
    pub handle: ObjectHandle,
    pub info: KeyInfo,
}

const INFO_ATTRIBUTES: [AttributeType; 5] = [
    AttributeType::Label,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::EndDate,
    AttributeType::ValueLen,
];

fn aes_key_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
    ]
}

/// Finds the AES key labelled `id`: `FindObjects` + one `GetAttributeValue`.
pub(crate) fn find_key(worker: &mut Worker, id: &KeyId) -> Result<KeyEntry, KeyStoreError> {
    let mut template = aes_key_template();
    template.push(Attribute::Label(id.as_str().as_bytes().to_vec()));
    let handles = worker
        .call(|s| s.find_objects(&template))
        .map_err(CallError::into_keystore)?;
    let handle = match handles.as_slice() {
        [] => return Err(KeyStoreError::KeyNotFound),
        [handle] => *handle,
        more => {
            return Err(KeyStoreError::Internal(format!(
                "{} AES keys are labelled {id}; labels must be unique",
                more.len()
            )));
        }
    };
    match read_entry(worker, handle)? {
        Some(entry) if entry.info.id == *id => Ok(entry),
        _ => Err(KeyStoreError::KeyNotFound),
    }
}

/// Every AES-256 key on the token with a label that is a valid key id.
pub(crate) fn list_keys(worker: &mut Worker) -> Result<Vec<KeyEntry>, KeyStoreError> {
    let template = aes_key_template();
    let handles = worker
        .call(|s| s.find_objects(&template))
        .map_err(CallError::into_keystore)?;
    let mut keys = Vec::with_capacity(handles.len());
    for handle in handles {
        match read_entry(worker, handle) {
            Ok(Some(entry)) => keys.push(entry),
            Ok(None) => {}
            // Deleted between the search and the read: not a key any more.
            Err(KeyStoreError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    keys.sort_by(|a, b| a.info.id.cmp(&b.info.id));
    Ok(keys)
}

/// Reads a key's attributes; `None` if it is not an AES-256 key with a valid key-id label.
fn read_entry(
    worker: &mut Worker,
    handle: ObjectHandle,
) -> Result<Option<KeyEntry>, KeyStoreError> {
    let attributes = worker
        .call(|s| s.get_attributes(handle, &INFO_ATTRIBUTES))
        .map_err(|e| match e {
            CallError::Hsm(e) if super::errors::is_stale_handle(&e) => KeyStoreError::KeyNotFound,
            other => other.into_keystore(),
        })?;
    let mut label = None;
    let mut usage = KeyUsage::default();
    let mut state = KeyState::Enabled;
    let mut length = None;
    for attribute in attributes {
        match attribute {
            Attribute::Label(bytes) => label = String::from_utf8(bytes).ok(),
            Attribute::Encrypt(on) => usage.encrypt = on,
            Attribute::Decrypt(on) => usage.decrypt = on,
            Attribute::EndDate(date) => state = state_from_end_date(&date),
            Attribute::ValueLen(len) => length = Some(*len),
            _ => {}
        }
    }
    let Some(id) = label.and_then(|l| KeyId::parse(&l).ok()) else {
        return Ok(None);
    };
    if length.is_some_and(|len| len != KEY_LEN as u64) {
        return Ok(None);
    }
    Ok(Some(KeyEntry {
        handle,
        info: KeyInfo { id, usage, state },
    }))
}

/// DISABLED when the end date is a valid date before today (UTC).
pub(crate) fn state_from_end_date(date: &Date) -> KeyState {
    if date.is_empty() {
        return KeyState::Enabled;
    }
    let digits = |bytes: &[u8]| -> Option<u32> {
        if bytes.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(bytes).ok()?.parse().ok()
        } else {
            None
        }
    };
    let (Some(year), Some(month), Some(day)) =
        (digits(&date.year), digits(&date.month), digits(&date.day))
    else {
        return KeyState::Enabled;
    };
    let today = time::OffsetDateTime::now_utc().date();
    let today = (
        today.year() as u32,
        u8::from(today.month()) as u32,
        today.day() as u32,
    );
    if (year, month, day) < today {
        KeyState::Disabled
    } else {
        KeyState::Enabled
    }
}

/// The `CKA_END_DATE` value that stands for `state`.
fn end_date_for(state: KeyState) -> Date {
    match state {
        KeyState::Disabled => Date::new(*b"1970", *b"01", *b"01"),
        KeyState::Enabled => Date::new_empty(),
    }
}

/// Writes the state to the token, then reads the key back.
pub(crate) fn set_state(
    worker: &mut Worker,
    id: &KeyId,
    state: KeyState,
) -> Result<KeyEntry, KeyStoreError> {
    let entry = find_key(worker, id)?;
    let template = [Attribute::EndDate(end_date_for(state))];
    worker
        .call(|s| s.update_attributes(entry.handle, &template))
        .map_err(|e| match e {
            CallError::Hsm(e) => KeyStoreError::Internal(format!(
                "cannot set CKA_END_DATE on {id}: {}",
                describe(&e)
            )),
            other => other.into_keystore(),
        })?;
    let updated = find_key(worker, id)?;
    if updated.info.state != state {
        return Err(KeyStoreError::Internal(format!(
            "the token did not keep CKA_END_DATE on {id}"
        )));
    }
    Ok(updated)
}

/// `C_GenerateKey` of a token-resident, sensitive, non-extractable AES-256 key.
pub(crate) fn create_key(
    worker: &mut Worker,
    id: &KeyId,
    usage: KeyUsage,
) -> Result<KeyEntry, KeyStoreError> {
    match find_key(worker, id) {
        Ok(_) => return Err(KeyStoreError::KeyExists),
        Err(KeyStoreError::KeyNotFound) => {}
        Err(e) => return Err(e),
    }
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(Ulong::from(KEY_LEN as u64)),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Label(id.as_str().as_bytes().to_vec()),
        Attribute::Encrypt(usage.encrypt),
        Attribute::Decrypt(usage.decrypt),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
    ];
    let handle = worker
        .call(|s| s.generate_key(&Mechanism::AesKeyGen, &template))
        .map_err(|e| match e {
            CallError::Hsm(e) => {
                KeyStoreError::Internal(format!("cannot generate key {id}: {}", describe(&e)))
            }
            other => other.into_keystore(),
        })?;
    tracing::info!(key = %id, %usage, "pkcs11 key generated");
    Ok(KeyEntry {
        handle,
        info: KeyInfo {
            id: id.clone(),
            usage,
            state: KeyState::Enabled,
        },
    })
}

/// One AES-GCM encryption: `C_EncryptInit` + `C_Encrypt` (cryptoki asks for the output length
/// first, a second `C_Encrypt` that the module answers without doing the crypto).
pub(crate) fn encrypt(
    worker: &mut Worker,
    handle: ObjectHandle,
    iv: [u8; IV_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Sealed, CallError> {
    let mut output = worker.call(|s| {
        let mut iv = iv;
        let params = GcmParams::new(&mut iv, aad, Ulong::from((TAG_LEN * 8) as u64))?;
        s.encrypt(&Mechanism::AesGcm(params), handle, plaintext)
    })?;
    if output.len() != plaintext.len() + TAG_LEN {
        return Err(CallError::NoSession(KeyStoreError::Internal(format!(
            "AES-GCM returned {} bytes for {} bytes of plaintext",
            output.len(),
            plaintext.len()
        ))));
    }
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&output[plaintext.len()..]);
    output.truncate(plaintext.len());
    Ok(Sealed {
        iv: iv.to_vec(),
        ciphertext: output,
        tag,
    })
}

/// Why a decryption failed.
pub(crate) enum DecryptError {
    AuthenticationFailed,
    Call(CallError),
}

/// One AES-GCM decryption of ciphertext || tag, with a 12- or 16-byte IV.
pub(crate) fn decrypt(
    worker: &mut Worker,
    handle: ObjectHandle,
    sealed: &Sealed,
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
    let mut input = Vec::with_capacity(sealed.ciphertext.len() + TAG_LEN);
    input.extend_from_slice(&sealed.ciphertext);
    input.extend_from_slice(&sealed.tag);
    let result = worker.call(|s| {
        let mut iv = sealed.iv.clone();
        let params = GcmParams::new(&mut iv, aad, Ulong::from((TAG_LEN * 8) as u64))?;
        s.decrypt(&Mechanism::AesGcm(params), handle, &input)
            .map(Zeroizing::new)
    });
    match result {
        Ok(plaintext) if plaintext.len() == sealed.ciphertext.len() => Ok(plaintext),
        Ok(_) => Err(DecryptError::Call(CallError::NoSession(
            KeyStoreError::Internal("AES-GCM decryption returned a wrong length".into()),
        ))),
        Err(CallError::Hsm(e)) if is_gcm_auth_failure(&e) => {
            Err(DecryptError::AuthenticationFailed)
        }
        Err(e) => Err(DecryptError::Call(e)),
    }
}

struct Cached {
    entry: KeyEntry,
    read_at: Instant,
    generation: u64,
}

/// Key handles and attributes by label, trusted for a TTL and one connection generation.
pub(crate) struct KeyCache {
    ttl: Duration,
    entries: RwLock<HashMap<KeyId, Cached>>,
}

impl KeyCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: RwLock::new(HashMap::new()),
        }
    }

    pub(crate) fn get(&self, id: &KeyId, generation: u64) -> Option<KeyEntry> {
        let entries = self.entries.read().ok()?;
        let cached = entries.get(id)?;
        (generation != 0 && cached.generation == generation && cached.read_at.elapsed() < self.ttl)
            .then(|| cached.entry.clone())
    }

    pub(crate) fn put(&self, entry: KeyEntry, generation: u64) {
        if let Ok(mut entries) = self.entries.write() {
            entries.insert(
                entry.info.id.clone(),
                Cached {
                    entry,
                    read_at: Instant::now(),
                    generation,
                },
            );
        }
    }

    pub(crate) fn remove(&self, id: &KeyId) {
        if let Ok(mut entries) = self.entries.write() {
            entries.remove(id);
        }
    }

    pub(crate) fn clear(&self) {
        if let Ok(mut entries) = self.entries.write() {
            entries.clear();
        }
    }
}
