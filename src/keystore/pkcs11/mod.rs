//! PKCS#11 key store: AES-256-GCM inside a real HSM, through `cryptoki`.
//!
//! # Model
//! - **Keys** are token objects `CKO_SECRET_KEY` / `CKK_AES` / 32 bytes; the XKS key id is
//!   `CKA_LABEL`; usage is `CKA_ENCRYPT` / `CKA_DECRYPT`. Keys made by other tools
//!   (`pkcs11-tool --keygen --key-type AES:32 --label foo`) work as they are.
//! - **State** (ENABLED / DISABLED) lives on the token: a key is DISABLED while a private data
//!   object with `CKA_APPLICATION` = `xks-proxy/disabled-key` and the key's label exists
//!   (`set_state` creates or destroys it). It survives restarts and is shared by every proxy using
//!   the HSM. `CKA_END_DATE` cannot be used (SoftHSM 2.6 breaks on it); see [`keys`].
//! - **Allow-list**: `keys = [...]` limits a key store to those labels; any other key is
//!   `KeyNotFound`. Without it every AES-256 key on the token is usable.
//! - **Health** runs a real encrypt + decrypt with the dedicated health-check key (`health_key`,
//!   default `xks-health-check`, generated at open if missing) through the same worker pool.
//!
//! # Speed
//! The module is loaded and initialized once per process; each token is logged in once and served
//! by a pool of sessions ([`pool`]), one per worker thread, so no PKCS#11 call ever runs on an
//! async worker. Key handles and attributes are cached by label ([`keys::KeyCache`]). An encrypt is
//! `C_EncryptInit` + `C_Encrypt` (plus one `C_GenerateRandom` per 64 IVs); a decrypt is
//! `C_DecryptInit` + `C_Decrypt`. (cryptoki's single-part calls first ask for the output length with
//! a `C_Encrypt`/`C_Decrypt` without buffer, which the module answers locally.)
//!
//! # Resilience
//! A return value meaning the session, token or module is gone drops the pool; the next call
//! re-initializes the module if needed, finds the token again, logs in and retries once
//! ([`token`], [`pool`]). A stale key handle is refetched once. Key stores that name the same
//! module and token share one [`Token`](token::Token), one pool and one key cache
//! ([`Pkcs11Tokens`]); each is a [`Pkcs11KeyStore`] view with its own allow-list.

mod errors;
mod gcm;
mod keys;
mod pool;
mod profile;
mod settings;
mod token;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use zeroize::Zeroizing;

pub use gcm::{IvSetting, IvSource};
pub use profile::ProfileName;
pub use settings::{
    DEFAULT_CALL_TIMEOUT_MS, DEFAULT_HEALTH_KEY, DEFAULT_KEY_CACHE_TTL_MS, DEFAULT_QUEUE_DEPTH,
    Pkcs11Settings,
};

use self::errors::{describe, is_stale_handle, rv};
use self::gcm::{GcmError, IvChoice};
use self::keys::{Flight, KeyCache, KeyEntry, Lookup};
use self::pool::{CallError, Pool, Worker};
use self::profile::Profile;
use self::settings::TokenSelector;
use self::token::Token;
use super::{
    BackendDescription, CryptoOp, EkmHealth, EkmStatus, KeyId, KeyInfo, KeyState, KeyStore,
    KeyStoreError, KeyUsage, Sealed, SetupNote,
};

/// Time allowed for key management (create, list, enable/disable), which KMS never waits on.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Time the workers get to finish their last call and close their sessions at shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// C_Finalize on every loaded module, after [`KeyStore::close`] on every PKCS#11 key store
/// (shutdown). Logs each module finalized.
pub fn finalize_modules() {
    for module in token::finalize_modules() {
        tracing::info!(module = %module.display(), "pkcs11 module finalized");
    }
}

/// One logged-in token with its worker pool and key cache, shared by its key-store views.
struct TokenService {
    token: Arc<Token>,
    pool: Pool,
    cache: KeyCache,
    call_timeout: Duration,
    health_key: KeyId,
    /// What this module does differently (bad-tag codes, buffer limits, documented IV source).
    profile: Profile,
    /// Where encryption IVs come from on this token.
    iv: IvChoice,
    /// The PIN it logged in with, and its pool and timing settings: a reload that changes them
    /// is told they need a restart.
    pin: Zeroizing<String>,
    tuning: String,
}

impl TokenService {
    /// Reads key `id` from the token as part of `flight` (or takes the answer of the lookup
    /// already flying), and caches it.
    async fn look_up(&self, id: &KeyId, flight: &Flight) -> Result<KeyEntry, KeyStoreError> {
        let answer = flight
            .get_or_init(|| async {
                let lookup = id.clone();
                self.pool
                    .run(self.call_timeout, move |w| keys::find_key(w, &lookup))
                    .await
                    .and_then(|found| found)
            })
            .await
            .clone();
        self.cache.land(id, flight);
        self.remember(id, answer)
    }

    /// Caches a lookup's answer (or forgets the key if it is gone).
    fn remember(
        &self,
        id: &KeyId,
        result: Result<KeyEntry, KeyStoreError>,
    ) -> Result<KeyEntry, KeyStoreError> {
        match result {
            Ok(entry) => {
                self.cache.put(entry.clone(), self.token.live_generation());
                Ok(entry)
            }
            Err(e) => {
                if matches!(e, KeyStoreError::KeyNotFound) {
                    self.cache.remove(id);
                }
                Err(e)
            }
        }
    }

    /// Logs the settings of `settings` that differ from those this token was opened with and
    /// that only a restart applies: the PIN (never printed) and the pool settings.
    fn warn_if_changed(&self, selector: &TokenSelector, settings: &Pkcs11Settings) {
        if settings.resolve_pin().ok() != Some(self.pin.clone()) {
            tracing::warn!(token = %selector, "the PIN setting changed (or cannot be read); the token stays logged in with the PIN it started with until the next restart");
        }
        let wanted = tuning(settings);
        if wanted != self.tuning {
            tracing::warn!(token = %selector, running = %self.tuning, configured = %wanted, "pool settings changed; they take effect at the next restart");
        }
    }

    /// Stops the workers (closing their sessions), then logs out. Blocking; idempotent.
    fn close(&self) {
        let stopped = self.pool.close(CLOSE_TIMEOUT);
        if stopped == 0 {
            return; // closed before, or every worker is stuck
        }
        let logged_out = self.token.close();
        self.cache.clear();
        tracing::info!(
            token = %self.token.selector(),
            sessions_closed = stopped,
            logged_out,
            "pkcs11 token closed"
        );
    }
}

/// Loaded PKCS#11 modules and logged-in tokens, shared by the key stores that name them. The
/// server keeps one for its whole life, so a reload that changes a key store's key list reuses
/// the token's login and session pool instead of logging in a second time.
#[derive(Default)]
pub struct Pkcs11Tokens {
    tokens: HashMap<(PathBuf, TokenSelector), Arc<TokenService>>,
    /// Tokens no key store names any more, possibly still serving requests that began before
    /// the reload that removed them; closed at shutdown if still alive.
    retired: Vec<std::sync::Weak<TokenService>>,
}

/// Pool and timing settings of a token, as [`TokenService::tuning`] records them.
fn tuning(settings: &Pkcs11Settings) -> String {
    format!(
        "pool {:?}, call_timeout {:?}, key_cache_ttl {:?}, profile {}, iv_source {:?}",
        settings.pool(),
        settings.call_timeout(),
        settings.key_cache_ttl(),
        settings.profile.unwrap_or_default(),
        settings.iv_source.unwrap_or_default(),
    )
}

impl Pkcs11Tokens {
    /// A key store view on the token that `settings` names, loading and logging in on first use.
    pub fn open(&mut self, settings: &Pkcs11Settings) -> Result<Arc<dyn KeyStore>, String> {
        let store: Arc<dyn KeyStore> = self.open_concrete(settings)?;
        Ok(store)
    }

    /// [`open`](Self::open), returning the concrete type, for the test hooks
    /// ([`Pkcs11KeyStore::stall_workers`], [`Pkcs11KeyStore::drop_session_pool`]).
    #[cfg(feature = "test-hooks")]
    pub fn open_pkcs11(
        &mut self,
        settings: &Pkcs11Settings,
    ) -> Result<Arc<Pkcs11KeyStore>, String> {
        self.open_concrete(settings)
    }

    /// Blocking: loads the module, logs in and generates the health-check key if it is missing.
    fn open_concrete(&mut self, settings: &Pkcs11Settings) -> Result<Arc<Pkcs11KeyStore>, String> {
        let selector = settings.selector()?;
        let health_key = settings.health_key_id()?;
        let key = (settings.module.clone(), selector.clone());
        let service = match self.tokens.get(&key) {
            Some(service) => {
                if service.health_key != health_key {
                    tracing::warn!(token = %selector, "key stores on one token name different health keys; using the first");
                }
                service.warn_if_changed(&selector, settings);
                Arc::clone(service)
            }
            None => {
                let pin = settings.resolve_pin()?;
                let token = Arc::new(Token::open(
                    &settings.module,
                    selector.clone(),
                    cryptoki::types::AuthPin::from(pin.as_str()),
                    settings.pin_field(),
                )?);
                ensure_health_key(&token, &health_key);
                let profile = Profile::resolve(
                    settings.profile.unwrap_or_default(),
                    &token.facts().manufacturer,
                );
                let iv = IvChoice::new(
                    settings.iv_source.unwrap_or_default(),
                    &profile,
                    health_key.clone(),
                );
                probe_iv_source(&token, &iv, &health_key);
                tracing::info!(
                    token = %selector,
                    profile = %profile.name,
                    iv_source = %iv.current().map(|(s, how)| format!("{s} ({how})")).unwrap_or_else(|| "unknown yet".into()),
                    "pkcs11 token profile"
                );
                let pool = Pool::start(Arc::clone(&token), settings.pool())?;
                let service = Arc::new(TokenService {
                    token,
                    pool,
                    cache: KeyCache::new(settings.key_cache_ttl()),
                    call_timeout: settings.call_timeout(),
                    health_key,
                    profile,
                    iv,
                    pin,
                    tuning: tuning(settings),
                });
                self.tokens.insert(key, Arc::clone(&service));
                service
            }
        };
        let allowed = settings.keys.as_ref().map(|keys| {
            keys.iter()
                .filter_map(|k| KeyId::parse(k).ok())
                .collect::<HashSet<_>>()
        });
        Ok(Arc::new(Pkcs11KeyStore { service, allowed }))
    }

    /// For a key store kept as it was across a reload: logs what changed underneath it that only
    /// a restart applies (a PIN file's contents, say).
    pub fn note_changes(&self, settings: &Pkcs11Settings) {
        let Ok(selector) = settings.selector() else {
            return;
        };
        if let Some(service) = self
            .tokens
            .get(&(settings.module.clone(), selector.clone()))
        {
            service.warn_if_changed(&selector, settings);
        }
    }

    /// After a reload: tokens that none of `in_use` names are retired (they close when their last
    /// request is done, or at [`close_all`](Self::close_all)).
    pub fn retire_unused(&mut self, in_use: &[&Pkcs11Settings]) {
        let named: HashSet<(PathBuf, TokenSelector)> = in_use
            .iter()
            .filter_map(|s| Some((s.module.clone(), s.selector().ok()?)))
            .collect();
        let unused: Vec<_> = self
            .tokens
            .keys()
            .filter(|key| !named.contains(*key))
            .cloned()
            .collect();
        for key in unused {
            if let Some(service) = self.tokens.remove(&key) {
                tracing::info!(token = %key.1, "pkcs11 token no longer configured; it closes when its last request is done");
                self.retired.push(Arc::downgrade(&service));
            }
        }
        self.retired.retain(|weak| weak.strong_count() > 0);
    }

    /// Shutdown: closes every token, configured or retired (blocking; idempotent).
    pub fn close_all(&mut self) {
        let retired = self.retired.drain(..).filter_map(|weak| weak.upgrade());
        for service in self.tokens.drain().map(|(_, s)| s).chain(retired) {
            service.close();
        }
    }
}

/// Generates the health-check key at start-up if the token has none (blocking, on a short-lived
/// session). A failure is logged; health checks then report why.
fn ensure_health_key(token: &Token, id: &KeyId) {
    let _writing = keys::token_write_guard();
    let result = token.connect().and_then(|(_, slot)| {
        let session = token
            .ctx()
            .open_rw_session(slot)
            .map_err(|e| describe(&e))?;
        let found = session
            .find_objects(&keys::key_template(id))
            .map_err(|e| describe(&e))?;
        if !found.is_empty() {
            return Ok(());
        }
        let template = [
            cryptoki::object::Attribute::Class(cryptoki::object::ObjectClass::SECRET_KEY),
            cryptoki::object::Attribute::KeyType(cryptoki::object::KeyType::AES),
            cryptoki::object::Attribute::ValueLen(cryptoki::types::Ulong::from(32u64)),
            cryptoki::object::Attribute::Token(true),
            cryptoki::object::Attribute::Private(true),
            cryptoki::object::Attribute::Sensitive(true),
            cryptoki::object::Attribute::Extractable(false),
            cryptoki::object::Attribute::Label(id.as_str().as_bytes().to_vec()),
            cryptoki::object::Attribute::Encrypt(true),
            cryptoki::object::Attribute::Decrypt(true),
        ];
        session
            .generate_key(&cryptoki::mechanism::Mechanism::AesKeyGen, &template)
            .map_err(|e| describe(&e))?;
        tracing::info!(key = %id, "pkcs11 health-check key generated");
        Ok(())
    });
    if let Err(e) = result {
        tracing::warn!(key = %id, error = %e, "cannot find or generate the health-check key");
    }
}

/// Probes the token's IV source with the health-check key on a short-lived session (blocking).
/// A failure is logged; the first encryption probes again.
fn probe_iv_source(token: &Token, iv: &IvChoice, health_key: &KeyId) {
    if iv.current().is_some() {
        return;
    }
    let probed = token.connect().and_then(|(_, slot)| {
        let session = token
            .ctx()
            .open_rw_session(slot)
            .map_err(|e| describe(&e))?;
        let key = match session.find_objects(&keys::key_template(health_key)) {
            Ok(found) => found.first().copied(),
            Err(e) => return Err(describe(&e)),
        };
        let key = key.ok_or_else(|| format!("no trusted health-check key {health_key}"))?;
        iv.probe_with(token.ctx(), slot, &session, key);
        Ok(())
    });
    if let Err(e) = probed {
        tracing::warn!(key = %health_key, error = %e, "cannot probe the GCM IV source yet");
    }
}

/// A key store on one PKCS#11 token, limited to its allow-list.
pub struct Pkcs11KeyStore {
    service: Arc<TokenService>,
    allowed: Option<HashSet<KeyId>>,
}

impl Pkcs11KeyStore {
    /// Drops the session pool and the login on purpose (as a lost token would): every worker
    /// closes its session, and the next call logs in again and opens new sessions. A test hook.
    #[cfg(feature = "test-hooks")]
    pub fn drop_session_pool(&self) {
        self.service.token.invalidate_all("dropped on request");
        self.service.cache.clear();
    }

    /// Keeps every worker busy for `duration`, as a hung HSM would (for tests and drills of the
    /// `Busy` and `Timeout` answers). A test hook.
    #[cfg(feature = "test-hooks")]
    pub fn stall_workers(&self, duration: Duration) {
        self.service.pool.stall(duration);
    }

    /// Whether this key store serves `id`: it is in the `keys` allow-list (all keys by default)
    /// and it is not the health-check key, which stays dedicated to health checks (spec §6).
    fn allows(&self, id: &KeyId) -> bool {
        *id != self.service.health_key && self.allowed.as_ref().is_none_or(|keys| keys.contains(id))
    }

    /// A key's cached entry, or a fresh one read from the token. Once warm, no request waits on
    /// the HSM for this: an entry past half its TTL is served while one background lookup renews
    /// it, and a cold miss is looked up once however many requests wait for it.
    async fn entry(&self, id: &KeyId) -> Result<KeyEntry, KeyStoreError> {
        if !self.allows(id) {
            return Err(KeyStoreError::KeyNotFound);
        }
        let service = &self.service;
        match service.cache.get(id, service.token.live_generation()) {
            Lookup::Fresh(entry) => return Ok(entry),
            Lookup::RenewDue(entry) => {
                if let Some(flight) = service.cache.start_flight(id) {
                    let service = Arc::clone(service);
                    let id = id.clone();
                    tokio::spawn(async move {
                        let _ = service.look_up(&id, &flight).await;
                    });
                }
                return Ok(entry);
            }
            Lookup::Missing => {}
        }
        let flight = service.cache.join_flight(id);
        service.look_up(id, &flight).await
    }

    /// Caches a lookup's answer (or forgets the key if it is gone).
    fn remember(
        &self,
        id: &KeyId,
        result: Result<KeyEntry, KeyStoreError>,
    ) -> Result<KeyEntry, KeyStoreError> {
        self.service.remember(id, result)
    }

    fn token_id(&self) -> String {
        self.service.token.selector().to_string()
    }
}

/// Runs `op` with the cached handle; if the handle is stale, refetches the key once (checking
/// state and usage again) and retries. Returns the fresh entry when there was one.
fn with_fresh_handle<T>(
    w: &mut Worker,
    id: &KeyId,
    handle: cryptoki::object::ObjectHandle,
    crypto: CryptoOp,
    mut op: impl FnMut(&mut Worker, cryptoki::object::ObjectHandle) -> Result<T, JobError>,
) -> (
    Result<T, KeyStoreError>,
    Option<Result<KeyEntry, KeyStoreError>>,
) {
    match op(w, handle) {
        Err(JobError::StaleHandle) => {
            let fresh = keys::find_key(w, id);
            let result = match &fresh {
                Ok(entry) => entry
                    .info
                    .require(crypto)
                    .and_then(|()| op(w, entry.handle).map_err(KeyStoreError::from)),
                Err(e) => Err(e.clone()),
            };
            (result, Some(fresh))
        }
        other => (other.map_err(KeyStoreError::from), None),
    }
}

/// How a crypto job on a cached key handle failed: the handle went stale (the object was
/// deleted or re-created on the token), so the key may be looked up again once; or for good.
enum JobError {
    StaleHandle,
    Failed(KeyStoreError),
}

impl From<KeyStoreError> for JobError {
    fn from(e: KeyStoreError) -> Self {
        JobError::Failed(e)
    }
}

impl From<JobError> for KeyStoreError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::StaleHandle => KeyStoreError::Internal("stale key handle".into()),
            JobError::Failed(e) => e,
        }
    }
}

/// The job error for a failed call of a `crypto` job.
fn call_error(e: CallError, crypto: CryptoOp) -> JobError {
    match e {
        CallError::Hsm(e) if is_stale_handle(&e) => JobError::StaleHandle,
        CallError::Hsm(e) if rv(&e) == Some(cryptoki::error::RvError::KeyFunctionNotPermitted) => {
            KeyStoreError::UsageNotPermitted(crypto).into()
        }
        other => other.into_keystore().into(),
    }
}

fn gcm_error(e: GcmError, crypto: CryptoOp) -> JobError {
    match e {
        GcmError::Call(e) => call_error(e, crypto),
        GcmError::BadTag => KeyStoreError::AuthenticationFailed.into(),
        GcmError::Malformed(why) => KeyStoreError::Internal(why).into(),
    }
}

fn encrypt_job(
    w: &mut Worker,
    service: &TokenService,
    handle: cryptoki::object::ObjectHandle,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Sealed, JobError> {
    service
        .profile
        .check_buffer(plaintext.len())
        .map_err(KeyStoreError::Internal)?;
    let source = service
        .iv
        .resolve(w)
        .map_err(|e| gcm_error(e, CryptoOp::Encrypt))?;
    gcm::encrypt(w, source, handle, aad, plaintext).map_err(|e| gcm_error(e, CryptoOp::Encrypt))
}

fn decrypt_job(
    w: &mut Worker,
    service: &TokenService,
    handle: cryptoki::object::ObjectHandle,
    sealed: &Sealed,
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, JobError> {
    service
        .profile
        .check_buffer(sealed.ciphertext.len() + crate::keystore::TAG_LEN)
        .map_err(KeyStoreError::Internal)?;
    gcm::decrypt(w, &service.profile, handle, sealed, aad)
        .map_err(|e| gcm_error(e, CryptoOp::Decrypt))
}

#[async_trait]
impl KeyStore for Pkcs11KeyStore {
    fn occupancy(&self) -> Option<(usize, usize)> {
        Some(self.service.pool.occupancy())
    }

    async fn setup_report(&self) -> Vec<SetupNote> {
        let service = &self.service;
        let note = |warning, text| SetupNote { warning, text };
        let mut notes = vec![note(false, format!("profile {}", service.profile.name))];
        notes.push(match service.iv.current() {
            Some((source, how)) => note(false, format!("GCM IV source {source} ({how})")),
            None => note(
                true,
                "GCM IV source unknown: the probe with the health-check key failed (see the log)"
                    .into(),
            ),
        });
        match service
            .pool
            .run(ADMIN_TIMEOUT, keys::untrusted_objects)
            .await
        {
            Ok(Ok(untrusted)) => notes.extend(untrusted.into_iter().map(|u| note(true, u))),
            Ok(Err(e)) | Err(e) => notes.push(note(
                true,
                format!("cannot list untrusted token objects: {e}"),
            )),
        }
        notes
    }

    async fn close(&self) {
        let service = Arc::clone(&self.service);
        let _ = tokio::task::spawn_blocking(move || service.close()).await;
    }

    fn describe(&self) -> BackendDescription {
        let facts = self.service.token.facts();
        BackendDescription {
            ekm_vendor: if facts.manufacturer.is_empty() {
                "PKCS#11 token".into()
            } else {
                facts.manufacturer
            },
            kind: "pkcs11",
        }
    }

    async fn key_info(&self, id: &KeyId) -> Result<KeyInfo, KeyStoreError> {
        Ok(self.entry(id).await?.info)
    }

    async fn encrypt(
        &self,
        id: &KeyId,
        plaintext: Zeroizing<Vec<u8>>,
        aad: Vec<u8>,
    ) -> Result<Sealed, KeyStoreError> {
        let entry = self.entry(id).await?;
        entry.info.require(CryptoOp::Encrypt)?;
        let key = id.clone();
        let service = Arc::clone(&self.service);
        let (result, fresh) = self
            .service
            .pool
            .run(self.service.call_timeout, move |w| {
                with_fresh_handle(w, &key, entry.handle, CryptoOp::Encrypt, |w, handle| {
                    encrypt_job(w, &service, handle, &plaintext, &aad)
                })
            })
            .await?;
        if let Some(fresh) = fresh {
            let _ = self.remember(id, fresh);
        }
        result
    }

    async fn decrypt(
        &self,
        id: &KeyId,
        sealed: Sealed,
        aad: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
        let entry = self.entry(id).await?;
        entry.info.require(CryptoOp::Decrypt)?;
        if sealed.iv.len() != 12 && sealed.iv.len() != 16 {
            return Err(KeyStoreError::AuthenticationFailed);
        }
        let key = id.clone();
        let service = Arc::clone(&self.service);
        let (result, fresh) = self
            .service
            .pool
            .run(self.service.call_timeout, move |w| {
                with_fresh_handle(w, &key, entry.handle, CryptoOp::Decrypt, |w, handle| {
                    decrypt_job(w, &service, handle, &sealed, &aad)
                })
            })
            .await?;
        if let Some(fresh) = fresh {
            let _ = self.remember(id, fresh);
        }
        result
    }

    async fn check_health(&self) -> Vec<EkmStatus> {
        let service = &self.service;
        let job_service = Arc::clone(service);
        let outcome = service
            .pool
            .run(service.call_timeout * 3, move |w| {
                let result = health_round_trip(w, &job_service);
                (result, w.recovered())
            })
            .await;
        let facts = service.token.facts();
        let stalled = service.pool.stalled();
        let (health, detail) = match outcome {
            // Work waits and nothing completes: the HSM does not answer, whatever this check saw.
            _ if stalled.is_some() => (
                EkmHealth::Unavailable,
                stalled.map(|since| {
                    format!(
                        "no HSM call has completed for {} ms while work waits",
                        since.as_millis()
                    )
                }),
            ),
            Ok((Ok(()), false)) => (EkmHealth::Active, None),
            Ok((Ok(()), true)) => (
                EkmHealth::Degraded,
                Some("worked only after re-establishing the session pool".to_string()),
            ),
            Ok((Err(e), _)) => (
                EkmHealth::Unavailable,
                Some(format!(
                    "health check with key {} failed: {e}",
                    service.health_key
                )),
            ),
            Err(KeyStoreError::Busy) => (
                EkmHealth::Degraded,
                Some("the HSM work queue is full".to_string()),
            ),
            Err(e) => (EkmHealth::Unavailable, Some(e.to_string())),
        };
        vec![EkmStatus {
            id: self.token_id(),
            model: if facts.model.is_empty() {
                "PKCS#11 token".into()
            } else {
                facts.model
            },
            health,
            detail,
        }]
    }

    async fn create_key(&self, id: &KeyId, usage: KeyUsage) -> Result<KeyInfo, KeyStoreError> {
        if !self.allows(id) {
            return Err(KeyStoreError::KeyNotFound);
        }
        let key = id.clone();
        let result = self
            .service
            .pool
            .run(ADMIN_TIMEOUT, move |w| keys::create_key(w, &key, usage))
            .await?;
        Ok(self.remember(id, result)?.info)
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>, KeyStoreError> {
        let entries = self
            .service
            .pool
            .run(ADMIN_TIMEOUT, keys::list_keys)
            .await??;
        Ok(entries
            .into_iter()
            .filter(|e| self.allows(&e.info.id))
            .map(|e| e.info)
            .collect())
    }

    async fn set_state(&self, id: &KeyId, state: KeyState) -> Result<KeyInfo, KeyStoreError> {
        if !self.allows(id) {
            return Err(KeyStoreError::KeyNotFound);
        }
        let key = id.clone();
        let result = self
            .service
            .pool
            .run(ADMIN_TIMEOUT, move |w| keys::set_state(w, &key, state))
            .await?;
        Ok(self.remember(id, result)?.info)
    }
}

/// Encrypts a random block with the health-check key, decrypts it and compares.
fn health_round_trip(w: &mut Worker, service: &TokenService) -> Result<(), KeyStoreError> {
    let entry = keys::find_key(w, &service.health_key)?;
    entry.info.require(CryptoOp::Encrypt)?;
    entry.info.require(CryptoOp::Decrypt)?;
    let probe = w.next_iv().map_err(CallError::into_keystore)?;
    let aad = b"xks-proxy health check";
    let sealed = encrypt_job(w, service, entry.handle, &probe, aad)?;
    let plaintext = decrypt_job(w, service, entry.handle, &sealed, aad)?;
    if plaintext.as_slice() == probe.as_slice() {
        Ok(())
    } else {
        Err(KeyStoreError::Internal(
            "decryption did not return the plaintext".into(),
        ))
    }
}
