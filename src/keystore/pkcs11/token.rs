//! One token of one loaded PKCS#11 module: loading and initializing the module (once per process),
//! finding the token by label or slot, the application-wide user login, and the connection
//! *generation* that tells pool workers when their sessions must be thrown away.
//!
//! A [`Token`] keeps one "anchor" session that carries the login (PKCS#11 login state belongs to
//! the application and token, and ends when the last session closes). When a call reports that the
//! session, token or module is gone, [`Token::invalidate`] drops the anchor and bumps nothing until
//! the next [`Token::connect`], which re-initializes the module if needed, finds the token again
//! (its slot id may have changed), opens a new anchor session and logs in again. Workers compare
//! the generation their session was opened under with [`Token::live_generation`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::errors::{describe, rv, rv_name};
use super::settings::TokenSelector;

/// Loaded modules, one per path for the whole process: C_Initialize is process-wide anyway.
fn modules() -> &'static Mutex<HashMap<PathBuf, Pkcs11>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    MODULES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Loads (or reuses) and initializes a module. Errors are prefixed `pkcs11.module:`.
pub(crate) fn load_module(path: &Path) -> Result<Pkcs11, String> {
    let mut modules = modules()
        .lock()
        .map_err(|_| "pkcs11.module: module registry poisoned".to_string())?;
    if let Some(ctx) = modules.get(path) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(path).map_err(|e| {
        format!(
            "pkcs11.module: cannot load {}: {}",
            path.display(),
            describe(&e)
        )
    })?;
    initialize(&ctx).map_err(|e| {
        format!(
            "pkcs11.module: cannot initialize {}: {}",
            path.display(),
            describe(&e)
        )
    })?;
    modules.insert(path.to_owned(), ctx.clone());
    Ok(ctx)
}

/// C_Finalize on every loaded module (shutdown, after every token is closed). Returns the modules
/// that accepted it.
pub(crate) fn finalize_modules() -> Vec<PathBuf> {
    let Ok(mut modules) = modules().lock() else {
        return Vec::new();
    };
    modules
        .drain()
        .filter(|(_, ctx)| ctx.clone().finalize().is_ok())
        .map(|(path, _)| path)
        .collect()
}

/// C_Initialize, accepting "already initialized" (another user of the module in this process).
fn initialize(ctx: &Pkcs11) -> Result<(), Error> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Err(e) if rv(&e) == Some(RvError::CryptokiAlreadyInitialized) => Ok(()),
        other => other,
    }
}

/// What the token says about itself, for health and `describe`.
#[derive(Debug, Clone, Default)]
pub(crate) struct TokenFacts {
    pub manufacturer: String,
    pub model: String,
}

struct Anchor {
    generation: u64,
    slot: Slot,
    session: Session,
}

/// A logged-in token, shared by every key store that names the same module and token.
pub(crate) struct Token {
    ctx: Pkcs11,
    module: PathBuf,
    selector: TokenSelector,
    pin: AuthPin,
    pin_field: &'static str,
    anchor: Mutex<Option<Anchor>>,
    /// Generation of the current anchor, 0 when disconnected.
    live: AtomicU64,
    next_generation: AtomicU64,
    facts: RwLock<TokenFacts>,
    /// Set by [`Token::close`]: no new connection is made.
    closed: AtomicBool,
}

impl Token {
    /// Loads the module, finds the token and logs in. Errors name the setting at fault.
    pub(crate) fn open(
        module: &Path,
        selector: TokenSelector,
        pin: AuthPin,
        pin_field: &'static str,
    ) -> Result<Self, String> {
        let ctx = load_module(module)?;
        let token = Self {
            ctx,
            module: module.to_owned(),
            selector,
            pin,
            pin_field,
            anchor: Mutex::new(None),
            live: AtomicU64::new(0),
            next_generation: AtomicU64::new(1),
            facts: RwLock::new(TokenFacts::default()),
            closed: AtomicBool::new(false),
        };
        token.connect()?;
        Ok(token)
    }

    pub(crate) fn ctx(&self) -> &Pkcs11 {
        &self.ctx
    }

    pub(crate) fn selector(&self) -> &TokenSelector {
        &self.selector
    }

    pub(crate) fn facts(&self) -> TokenFacts {
        match self.facts.read() {
            Ok(facts) => facts.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The generation of the live connection, or 0 when there is none.
    pub(crate) fn live_generation(&self) -> u64 {
        self.live.load(Ordering::Acquire)
    }

    /// The live connection's generation and slot, connecting (and logging in) first if needed.
    pub(crate) fn connect(&self) -> Result<(u64, Slot), String> {
        let mut anchor = self
            .anchor
            .lock()
            .map_err(|_| "token state poisoned".to_string())?;
        if let Some(a) = anchor.as_ref() {
            return Ok((a.generation, a.slot));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(format!("token {} is closed (shutting down)", self.selector));
        }
        let (slot, session) = match self.establish() {
            Err(ConnectError::NotInitialized(_)) => {
                // The module forgot its initialization (C_Finalize elsewhere, a restart of the
                // vendor's daemon...): initialize again and retry once.
                initialize(&self.ctx).map_err(|e| {
                    format!(
                        "pkcs11.module: cannot re-initialize {}: {}",
                        self.module.display(),
                        describe(&e)
                    )
                })?;
                self.establish().map_err(ConnectError::into_message)?
            }
            other => other.map_err(ConnectError::into_message)?,
        };
        let generation = self.next_generation.fetch_add(1, Ordering::AcqRel);
        *anchor = Some(Anchor {
            generation,
            slot,
            session,
        });
        self.live.store(generation, Ordering::Release);
        tracing::info!(token = %self.selector, generation, "pkcs11 token connected and logged in");
        Ok((generation, slot))
    }

    /// Drops the connection made under `generation` (if it is still the live one): every worker
    /// session opened under it is closed on its next job, and the next call logs in again.
    pub(crate) fn invalidate(&self, generation: u64, why: &str) {
        let Ok(mut anchor) = self.anchor.lock() else {
            return;
        };
        if anchor.as_ref().is_some_and(|a| a.generation == generation) {
            self.live.store(0, Ordering::Release);
            *anchor = None;
            tracing::warn!(token = %self.selector, generation, reason = why, "pkcs11 session pool dropped");
        }
    }

    /// Logs out and closes the anchor session for good (shutdown). Worker sessions must be closed
    /// first (see `Pool::close`). Returns whether the logout was accepted.
    pub(crate) fn close(&self) -> bool {
        self.closed.store(true, Ordering::Release);
        self.live.store(0, Ordering::Release);
        let anchor = match self.anchor.lock() {
            Ok(mut anchor) => anchor.take(),
            Err(_) => None,
        };
        anchor.is_some_and(|a| a.session.logout().is_ok())
        // the anchor session closes as it drops here
    }

    /// Drops the live connection, whatever its generation.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn invalidate_all(&self, why: &str) {
        let generation = self.live_generation();
        if generation != 0 {
            self.invalidate(generation, why);
        }
    }

    /// Finds the slot, opens the anchor session and logs in.
    fn establish(&self) -> Result<(Slot, Session), ConnectError> {
        let slot = self.find_slot()?;
        let info = self.ctx.get_token_info(slot).map_err(|e| {
            ConnectError::of(
                format!(
                    "pkcs11.token_label: cannot read token info: {}",
                    describe(&e)
                ),
                &e,
            )
        })?;
        if let Ok(mut facts) = self.facts.write() {
            *facts = TokenFacts {
                manufacturer: info.manufacturer_id().trim().to_owned(),
                model: format!(
                    "{} {} (hardware {}, firmware {})",
                    info.manufacturer_id().trim(),
                    info.model().trim(),
                    info.hardware_version(),
                    info.firmware_version()
                ),
            };
        }
        let session = self.ctx.open_rw_session(slot).map_err(|e| {
            ConnectError::of(
                format!(
                    "pkcs11.token_label: cannot open a session on token {}: {}",
                    self.selector,
                    describe(&e)
                ),
                &e,
            )
        })?;
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) => {}
            Err(e) if rv(&e) == Some(RvError::UserAlreadyLoggedIn) => {}
            Err(e) => {
                let problem = match rv(&e) {
                    Some(RvError::PinIncorrect) => "wrong PIN".to_string(),
                    Some(RvError::PinLocked) => "the user PIN is locked".to_string(),
                    Some(RvError::PinExpired) => "the user PIN has expired".to_string(),
                    Some(RvError::UserPinNotInitialized) => {
                        "the token's user PIN is not initialized".to_string()
                    }
                    Some(other) => format!("login failed: {}", rv_name(other)),
                    None => format!("login failed: {e}"),
                };
                return Err(ConnectError::of(
                    format!(
                        "pkcs11.{}: token {} refused the login: {problem}",
                        self.pin_field, self.selector
                    ),
                    &e,
                ));
            }
        }
        Ok((slot, session))
    }

    fn find_slot(&self) -> Result<Slot, ConnectError> {
        let slots = self.ctx.get_slots_with_token().map_err(|e| {
            ConnectError::of(
                format!("pkcs11.module: cannot list slots: {}", describe(&e)),
                &e,
            )
        })?;
        match &self.selector {
            TokenSelector::Slot(id) => slots.into_iter().find(|s| s.id() == *id).ok_or_else(|| {
                ConnectError::Failed(format!(
                    "pkcs11.slot: no token in slot {id} (slots with a token: {})",
                    {
                        let ids: Vec<String> = self
                            .ctx
                            .get_slots_with_token()
                            .unwrap_or_default()
                            .iter()
                            .map(|s| s.id().to_string())
                            .collect();
                        if ids.is_empty() {
                            "none".to_string()
                        } else {
                            ids.join(", ")
                        }
                    }
                ))
            }),
            TokenSelector::Label(label) => {
                let mut present = Vec::new();
                for slot in slots {
                    match self.ctx.get_token_info(slot) {
                        Ok(info) => {
                            let found = info.label().trim_end();
                            if found == label {
                                return Ok(slot);
                            }
                            present.push(format!("{found:?}"));
                        }
                        Err(e) if rv(&e) == Some(RvError::CryptokiNotInitialized) => {
                            return Err(ConnectError::NotInitialized(describe(&e)));
                        }
                        Err(_) => {}
                    }
                }
                Err(ConnectError::Failed(format!(
                    "pkcs11.token_label: no token labelled {label:?} (tokens present: {})",
                    if present.is_empty() {
                        "none".to_string()
                    } else {
                        present.join(", ")
                    }
                )))
            }
        }
    }
}

/// Why the token could not be connected to; the message names the setting at fault.
enum ConnectError {
    /// The module forgot its initialization (C_Finalize elsewhere, a restart of the vendor's
    /// daemon...): initializing it again may help.
    NotInitialized(String),
    Failed(String),
}

impl ConnectError {
    /// `message` for a failed call, by what the call returned.
    fn of(message: String, e: &Error) -> Self {
        if rv(e) == Some(RvError::CryptokiNotInitialized) {
            ConnectError::NotInitialized(message)
        } else {
            ConnectError::Failed(message)
        }
    }

    fn into_message(self) -> String {
        match self {
            ConnectError::NotInitialized(message) | ConnectError::Failed(message) => message,
        }
    }
}
