//! Keys and disable markers as PKCS#11 objects: finding, listing, creating, and which objects on
//! a token can be trusted at all.
//!
//! A key is a `CKO_SECRET_KEY` of type `CKK_AES` and 32 bytes whose `CKA_LABEL` is the XKS key id.
//! Usage comes from `CKA_ENCRYPT` / `CKA_DECRYPT`.
//!
//! **Trust.** Anyone who can open a session can create *public* token objects, without the PIN.
//! So only private token objects count: a key must be `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`
//! and not `CKA_EXTRACTABLE`; a disable marker must be a private token object. Searches ask for
//! `CKA_TOKEN` and `CKA_PRIVATE` true, and a key found that way is still refused when it is
//! extractable, not sensitive, or not 32 bytes. [`untrusted_objects`] lists what is ignored, for
//! `config check` and the start-up log.
//!
//! **State.** A key is DISABLED while the token holds a *disable marker*: a private token data
//! object (`CKO_DATA`, `CKA_APPLICATION` = [`DISABLED_MARKER_APP`], `CKA_LABEL` = the key id).
//! Disabling creates the marker, enabling destroys it; no marker means ENABLED. The marker lives on
//! the token, so the state survives restarts and is seen by every proxy sharing the HSM, and it is
//! visible to any PKCS#11 tool (`pkcs11-tool --list-objects --type data`).
//! `CKA_END_DATE` was the first choice but cannot be used: SoftHSM 2.6 stores a date written by
//! `C_SetAttributeValue` on a private object unencrypted and then fails every later
//! `C_GetAttributeValue` of it with `CKR_GENERAL_ERROR`.
//!
//! [`KeyCache`] keeps handles and attributes by label for `key_cache_ttl_ms`, and only for the
//! connection generation they were read under; past half the TTL an entry is renewed in the
//! background while it is still served, and concurrent lookups of one key share one flight;
//! create, enable and disable refresh their entry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::types::Ulong;

use super::errors::describe;
use super::pool::{CallError, Worker};
use crate::keystore::{KEY_LEN, KeyId, KeyInfo, KeyState, KeyStoreError, KeyUsage};

/// A key's handle and what its attributes say.
#[derive(Debug, Clone)]
pub(crate) struct KeyEntry {
    pub handle: ObjectHandle,
    pub info: KeyInfo,
}

/// Serializes this process's writes of token objects (key generation, disable markers). They are
/// rare, and SoftHSM 2.6 fails concurrent token-object creation now and then.
static TOKEN_WRITES: Mutex<()> = Mutex::new(());

pub(crate) fn token_write_guard() -> MutexGuard<'static, ()> {
    TOKEN_WRITES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `CKA_APPLICATION` of the data objects that mark a key DISABLED.
pub const DISABLED_MARKER_APP: &str = "xks-proxy/disabled-key";

const INFO_ATTRIBUTES: [AttributeType; 8] = [
    AttributeType::Label,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::ValueLen,
    AttributeType::Token,
    AttributeType::Private,
    AttributeType::Sensitive,
    AttributeType::Extractable,
];

/// Only private token objects: what nobody can create without the PIN.
fn trusted() -> [Attribute; 2] {
    [Attribute::Token(true), Attribute::Private(true)]
}

fn marker_template(id: Option<&KeyId>) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Application(DISABLED_MARKER_APP.as_bytes().to_vec()),
    ];
    template.extend(trusted());
    if let Some(id) = id {
        template.push(Attribute::Label(id.as_str().as_bytes().to_vec()));
    }
    template
}

/// The disable markers of `id` (or of every key).
fn find_markers(
    worker: &mut Worker,
    id: Option<&KeyId>,
) -> Result<Vec<ObjectHandle>, KeyStoreError> {
    let template = marker_template(id);
    worker
        .call(|s| s.find_objects(&template))
        .map_err(CallError::into_keystore)
}

/// Labels of every key that has a disable marker.
fn disabled_labels(worker: &mut Worker) -> Result<Vec<Vec<u8>>, KeyStoreError> {
    let mut labels = Vec::new();
    for marker in find_markers(worker, None)? {
        let attributes = worker
            .call(|s| s.get_attributes(marker, &[AttributeType::Label]))
            .map_err(CallError::into_keystore)?;
        for attribute in attributes {
            if let Attribute::Label(label) = attribute {
                labels.push(label);
            }
        }
    }
    Ok(labels)
}

fn aes_key_template() -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
    ];
    template.extend(trusted());
    template
}

/// The template that finds the trusted AES key labelled `id` (see the module's Trust note).
pub(crate) fn key_template(id: &KeyId) -> Vec<Attribute> {
    let mut template = aes_key_template();
    template.push(Attribute::Label(id.as_str().as_bytes().to_vec()));
    template
}

/// Finds the AES key labelled `id`: `FindObjects` + one `GetAttributeValue`.
pub(crate) fn find_key(worker: &mut Worker, id: &KeyId) -> Result<KeyEntry, KeyStoreError> {
    let template = key_template(id);
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
        Some(mut entry) if entry.info.id == *id => {
            if !find_markers(worker, Some(id))?.is_empty() {
                entry.info.state = KeyState::Disabled;
            }
            Ok(entry)
        }
        _ => Err(KeyStoreError::KeyNotFound),
    }
}

/// Every AES-256 key on the token with a label that is a valid key id.
pub(crate) fn list_keys(worker: &mut Worker) -> Result<Vec<KeyEntry>, KeyStoreError> {
    let template = aes_key_template();
    let handles = worker
        .call(|s| s.find_objects(&template))
        .map_err(CallError::into_keystore)?;
    let disabled = disabled_labels(worker)?;
    let mut keys = Vec::with_capacity(handles.len());
    for handle in handles {
        match read_entry(worker, handle) {
            Ok(Some(mut entry)) => {
                if disabled
                    .iter()
                    .any(|l| l == entry.info.id.as_str().as_bytes())
                {
                    entry.info.state = KeyState::Disabled;
                }
                keys.push(entry)
            }
            Ok(None) => {}
            // Deleted between the search and the read: not a key any more.
            Err(KeyStoreError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    keys.sort_by(|a, b| a.info.id.cmp(&b.info.id));
    Ok(keys)
}

/// Reads a key's attributes; `None` if it is not a trusted AES-256 key with a valid key-id label.
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
    let facts = ObjectFacts::read(attributes);
    let Some(id) = facts.label.as_deref().and_then(|l| KeyId::parse(l).ok()) else {
        return Ok(None);
    };
    if !facts.weaknesses().is_empty() {
        return Ok(None);
    }
    let usage = facts.usage;
    Ok(Some(KeyEntry {
        handle,
        info: KeyInfo {
            id,
            usage,
            state: KeyState::Enabled,
        },
    }))
}

/// Writes the state to the token, then reads the key back.
pub(crate) fn set_state(
    worker: &mut Worker,
    id: &KeyId,
    state: KeyState,
) -> Result<KeyEntry, KeyStoreError> {
    let _writing = token_write_guard();
    let entry = find_key(worker, id)?;
    if entry.info.state != state {
        match state {
            KeyState::Disabled => {
                let mut template = marker_template(Some(id));
                template.push(Attribute::Value(b"DISABLED".to_vec()));
                worker
                    .call(|s| s.create_object(&template))
                    .map_err(|e| state_error(e, id))?;
            }
            KeyState::Enabled => {
                for marker in find_markers(worker, Some(id))? {
                    worker
                        .call(|s| s.destroy_object(marker))
                        .map_err(|e| state_error(e, id))?;
                }
            }
        }
    }
    let updated = find_key(worker, id)?;
    if updated.info.state != state {
        return Err(KeyStoreError::Internal(format!(
            "the token did not keep the state of {id}"
        )));
    }
    Ok(updated)
}

fn state_error(e: CallError, id: &KeyId) -> KeyStoreError {
    match e {
        CallError::Hsm(e) => KeyStoreError::Internal(format!(
            "cannot change the disable marker of {id}: {}",
            describe(&e)
        )),
        other => other.into_keystore(),
    }
}

/// `C_GenerateKey` of a token-resident, sensitive, non-extractable AES-256 key.
pub(crate) fn create_key(
    worker: &mut Worker,
    id: &KeyId,
    usage: KeyUsage,
) -> Result<KeyEntry, KeyStoreError> {
    let _writing = token_write_guard();
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
    let generate = |w: &mut Worker| w.call(|s| s.generate_key(&Mechanism::AesKeyGen, &template));
    let handle = match generate(worker) {
        // SoftHSM 2.6 now and then answers this to concurrent key generations; once more is enough.
        Err(CallError::Hsm(e))
            if matches!(
                super::errors::rv(&e),
                Some(RvError::TemplateInconsistent | RvError::GeneralError)
            ) =>
        {
            tracing::warn!(key = %id, error = %describe(&e), "C_GenerateKey failed; retrying once");
            match find_key(worker, id) {
                Ok(_) => return Err(KeyStoreError::KeyExists),
                Err(KeyStoreError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
            generate(worker)
        }
        other => other,
    }
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

/// What a key's or marker's attributes say about whether it can be trusted.
#[derive(Debug, Default)]
struct ObjectFacts {
    label: Option<String>,
    usage: KeyUsage,
    length: Option<u64>,
    token: Option<bool>,
    private: Option<bool>,
    sensitive: Option<bool>,
    extractable: Option<bool>,
}

impl ObjectFacts {
    fn read(attributes: Vec<Attribute>) -> Self {
        let mut facts = Self::default();
        for attribute in attributes {
            match attribute {
                Attribute::Label(bytes) => facts.label = String::from_utf8(bytes).ok(),
                Attribute::Encrypt(on) => facts.usage.encrypt = on,
                Attribute::Decrypt(on) => facts.usage.decrypt = on,
                Attribute::ValueLen(len) => facts.length = Some(*len),
                Attribute::Token(on) => facts.token = Some(on),
                Attribute::Private(on) => facts.private = Some(on),
                Attribute::Sensitive(on) => facts.sensitive = Some(on),
                Attribute::Extractable(on) => facts.extractable = Some(on),
                _ => {}
            }
        }
        facts
    }

    /// Why a key cannot be trusted (empty: it can). An attribute the module does not report
    /// counts against the key.
    fn weaknesses(&self) -> Vec<&'static str> {
        let mut weak = self.marker_weaknesses();
        if self.sensitive != Some(true) {
            weak.push("not sensitive");
        }
        if self.extractable != Some(false) {
            weak.push("extractable");
        }
        if self.length != Some(KEY_LEN as u64) {
            weak.push("not 32 bytes");
        }
        weak
    }

    /// Why a disable marker cannot be trusted.
    fn marker_weaknesses(&self) -> Vec<&'static str> {
        let mut weak = Vec::new();
        if self.token != Some(true) {
            weak.push("not a token object");
        }
        if self.private != Some(true) {
            weak.push("public (creatable without the PIN)");
        }
        weak
    }
}

/// Token objects that look like keys or disable markers but are ignored because they cannot be
/// trusted, one line each (label and why). For `config check` and the start-up log.
pub(crate) fn untrusted_objects(worker: &mut Worker) -> Result<Vec<String>, KeyStoreError> {
    let look_for = [
        (
            "AES key",
            vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
            ],
        ),
        (
            "disable marker",
            vec![
                Attribute::Class(ObjectClass::DATA),
                Attribute::Application(DISABLED_MARKER_APP.as_bytes().to_vec()),
            ],
        ),
    ];
    let mut found = Vec::new();
    for (what, template) in look_for {
        let handles = worker
            .call(|s| s.find_objects(&template))
            .map_err(CallError::into_keystore)?;
        for handle in handles {
            let Ok(attributes) = worker.call(|s| s.get_attributes(handle, &INFO_ATTRIBUTES)) else {
                continue; // deleted meanwhile
            };
            let facts = ObjectFacts::read(attributes);
            let weak = if what == "AES key" {
                facts.weaknesses()
            } else {
                facts.marker_weaknesses()
            };
            if !weak.is_empty() {
                found.push(format!(
                    "{what} labelled {:?} is ignored: {}",
                    facts.label.as_deref().unwrap_or(""),
                    weak.join(", ")
                ));
            }
        }
    }
    Ok(found)
}

struct Cached {
    entry: KeyEntry,
    read_at: Instant,
    generation: u64,
}

/// What the cache holds for a key.
pub(crate) enum Lookup {
    /// Read less than half a TTL ago.
    Fresh(KeyEntry),
    /// Still within its TTL, but due for renewal: serve it and renew in the background.
    RenewDue(KeyEntry),
    /// Nothing usable: look it up before serving.
    Missing,
}

/// One lookup of a key on the token, shared by every request that waits for it.
pub(crate) type Flight = Arc<tokio::sync::OnceCell<Result<KeyEntry, KeyStoreError>>>;

/// Key handles and attributes by label, trusted for a TTL and one connection generation, with
/// the lookups in flight (at most one per key).
pub(crate) struct KeyCache {
    ttl: Duration,
    entries: RwLock<HashMap<KeyId, Cached>>,
    flights: Mutex<HashMap<KeyId, Flight>>,
}

impl KeyCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: RwLock::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn get(&self, id: &KeyId, generation: u64) -> Lookup {
        let Ok(entries) = self.entries.read() else {
            return Lookup::Missing;
        };
        let Some(cached) = entries.get(id) else {
            return Lookup::Missing;
        };
        if generation == 0 || cached.generation != generation {
            return Lookup::Missing;
        }
        let age = cached.read_at.elapsed();
        if age < self.ttl / 2 {
            Lookup::Fresh(cached.entry.clone())
        } else if age < self.ttl {
            Lookup::RenewDue(cached.entry.clone())
        } else {
            Lookup::Missing
        }
    }

    fn flights(&self) -> MutexGuard<'_, HashMap<KeyId, Flight>> {
        self.flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new lookup of `id`, unless one is already flying.
    pub(crate) fn start_flight(&self, id: &KeyId) -> Option<Flight> {
        let mut flights = self.flights();
        if flights.contains_key(id) {
            return None;
        }
        let flight = Flight::default();
        flights.insert(id.clone(), Arc::clone(&flight));
        Some(flight)
    }

    /// The lookup of `id` flying now, or a new one.
    pub(crate) fn join_flight(&self, id: &KeyId) -> Flight {
        Arc::clone(self.flights().entry(id.clone()).or_default())
    }

    /// Ends `flight` once it has its answer: later requests read the cache (or start anew).
    pub(crate) fn land(&self, id: &KeyId, flight: &Flight) {
        let mut flights = self.flights();
        if flights.get(id).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            flights.remove(id);
        }
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
