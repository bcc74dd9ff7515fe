//! The vendor IV behaviours for `CKM_AES_GCM` and the hooks that carry
//! them: C_EncryptInit picks the IV, C_Encrypt / C_EncryptFinal hand it back
//! (into the caller's `pIv`, or appended to the output), C_Decrypt /
//! C_DecryptFinal may re-label failures, and C_CloseSession /
//! C_CloseAllSessions / C_Finalize drop per-session state. The IV bytes are
//! never logged.

use crate::behaviour::IvMode;
use crate::faults;
use crate::loader::Real;
use cryptoki_sys::*;
use std::collections::HashMap;
use std::ffi::c_void;
use std::io::Read;
use std::mem::size_of;
use std::ptr;
use std::sync::{LazyLock, Mutex, MutexGuard};

/// GCM IV length the vendor modes generate (and require from the caller).
pub const IV_LEN: usize = 12;

/// An active GCM encryption whose IV the emulator chose.
struct Op {
    mode: IvMode,
    /// The caller's `pIv` from C_EncryptInit (the caller keeps it alive
    /// until the operation ends, as PKCS#11 requires of mechanism params).
    caller_iv: *mut CK_BYTE,
    caller_iv_len: usize,
    /// The IV and params handed to the real module; kept alive until the
    /// operation ends in case the real module keeps the pointers.
    iv: Box<[u8; IV_LEN]>,
    _params: Box<CK_GCM_PARAMS>,
}

// SAFETY: the raw pointers are only dereferenced by the thread making the
// PKCS#11 call on that session, which is the caller's contract anyway.
unsafe impl Send for Op {}

static OPS: LazyLock<Mutex<HashMap<CK_SESSION_HANDLE, Op>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn ops() -> MutexGuard<'static, HashMap<CK_SESSION_HANDLE, Op>> {
    OPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Drops the tracked operation of `session`, if any.
pub fn forget(session: CK_SESSION_HANDLE) {
    ops().remove(&session);
}

fn random_iv() -> std::io::Result<[u8; IV_LEN]> {
    let mut iv = [0u8; IV_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut iv)?;
    Ok(iv)
}

/// C_EncryptInit: for the vendor modes, check the caller's IV, substitute
/// the emulator's own, and remember the operation.
///
/// # Safety
/// PKCS#11 C_EncryptInit contract.
pub unsafe fn encrypt_init(
    real: &Real,
    session: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    let Some(init) = real.list.C_EncryptInit else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    // Any new C_EncryptInit ends the previous operation on the session.
    ops().remove(&session);
    let mode = faults::iv_mode();
    // SAFETY: mech is the caller's mechanism pointer (or NULL).
    let is_gcm = !mech.is_null() && unsafe { (*mech).mechanism } == CKM_AES_GCM;
    if mode == IvMode::Passthrough || !is_gcm {
        // SAFETY: forwarding the caller's arguments unchanged.
        return unsafe { init(session, mech, key) };
    }
    // SAFETY: non-NULL, checked above.
    let m = unsafe { *mech };
    if m.pParameter.is_null() || m.ulParameterLen as usize != size_of::<CK_GCM_PARAMS>() {
        return CKR_MECHANISM_PARAM_INVALID;
    }
    // SAFETY: the caller says pParameter holds a CK_GCM_PARAMS (length
    // checked); read unaligned to be safe with odd callers.
    let caller: CK_GCM_PARAMS =
        unsafe { ptr::read_unaligned(m.pParameter as *const CK_GCM_PARAMS) };
    let caller_iv_len = caller.ulIvLen as usize;
    match mode {
        IvMode::HsmIntoParams | IvMode::HsmAppended => {
            if caller_iv_len != IV_LEN || caller.pIv.is_null() {
                return CKR_MECHANISM_PARAM_INVALID;
            }
            // SAFETY: caller's buffer of ulIvLen (= 12) bytes.
            let given = unsafe { std::slice::from_raw_parts(caller.pIv, IV_LEN) };
            if given.iter().any(|b| *b != 0) {
                return CKR_MECHANISM_PARAM_INVALID;
            }
        }
        IvMode::OverwriteSilently => {
            if caller_iv_len > 0 && caller.pIv.is_null() {
                return CKR_MECHANISM_PARAM_INVALID;
            }
        }
        IvMode::Passthrough => {}
    }
    let Ok(iv) = random_iv() else {
        return CKR_FUNCTION_FAILED;
    };
    let mut iv = Box::new(iv);
    let mut params = Box::new(CK_GCM_PARAMS {
        pIv: iv.as_mut_ptr(),
        ulIvLen: IV_LEN as CK_ULONG,
        ulIvBits: (IV_LEN * 8) as CK_ULONG,
        ..caller
    });
    let mut m2 = CK_MECHANISM {
        mechanism: CKM_AES_GCM,
        pParameter: &mut *params as *mut CK_GCM_PARAMS as *mut c_void,
        ulParameterLen: size_of::<CK_GCM_PARAMS>() as CK_ULONG,
    };
    // SAFETY: same call with our params, which outlive it (kept in Op).
    let rv = unsafe { init(session, &mut m2, key) };
    if rv == CKR_OK {
        ops().insert(
            session,
            Op {
                mode,
                caller_iv: caller.pIv,
                caller_iv_len,
                iv,
                _params: params,
            },
        );
    }
    rv
}

/// Completes a single-part or final encrypt step `call(out, out_len)` for
/// an operation the emulator tracks, applying its IV mode.
///
/// # Safety
/// `out` / `out_len` are the caller's output arguments of C_Encrypt or
/// C_EncryptFinal; `call` forwards them to the real module.
unsafe fn finish(
    session: CK_SESSION_HANDLE,
    op: Op,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
    call: impl Fn(*mut CK_BYTE, *mut CK_ULONG) -> CK_RV,
) -> CK_RV {
    let keep = |op: Op| {
        ops().insert(session, op);
    };
    match op.mode {
        IvMode::HsmIntoParams | IvMode::OverwriteSilently => {
            let rv = call(out, out_len);
            if rv == CKR_OK && !out.is_null() {
                if !op.caller_iv.is_null() {
                    let n = op.caller_iv_len.min(IV_LEN);
                    // SAFETY: the caller's pIv of caller_iv_len bytes.
                    unsafe { ptr::copy_nonoverlapping(op.iv.as_ptr(), op.caller_iv, n) };
                }
            } else if rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL {
                keep(op);
            }
            rv
        }
        IvMode::HsmAppended => {
            if out_len.is_null() {
                return call(out, out_len);
            }
            let extra = IV_LEN as CK_ULONG;
            if out.is_null() {
                let rv = call(out, out_len);
                if rv == CKR_OK {
                    // SAFETY: non-NULL, caller's.
                    unsafe { *out_len = (*out_len).saturating_add(extra) };
                }
                if rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL {
                    keep(op);
                }
                return rv;
            }
            // SAFETY: non-NULL, caller's.
            let cap = unsafe { *out_len };
            let mut need: CK_ULONG = 0;
            let rv = call(ptr::null_mut(), &mut need);
            if rv != CKR_OK {
                if rv == CKR_BUFFER_TOO_SMALL {
                    keep(op);
                }
                return rv;
            }
            if cap < need.saturating_add(extra) {
                // SAFETY: non-NULL, caller's.
                unsafe { *out_len = need.saturating_add(extra) };
                keep(op);
                return CKR_BUFFER_TOO_SMALL;
            }
            let mut got = cap - extra;
            let rv = call(out, &mut got);
            if rv == CKR_OK {
                // SAFETY: got + 12 <= cap, the caller's buffer size.
                unsafe {
                    ptr::copy_nonoverlapping(op.iv.as_ptr(), out.add(got as usize), IV_LEN);
                    *out_len = got + extra;
                }
            } else if rv == CKR_BUFFER_TOO_SMALL {
                // SAFETY: non-NULL, caller's.
                unsafe { *out_len = got.saturating_add(extra) };
                keep(op);
            }
            rv
        }
        IvMode::Passthrough => call(out, out_len),
    }
}

/// C_Encrypt: see [`finish`].
///
/// # Safety
/// PKCS#11 C_Encrypt contract.
pub unsafe fn encrypt(
    real: &Real,
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    let Some(f) = real.list.C_Encrypt else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    let op = ops().remove(&session);
    // SAFETY: forwarding the caller's arguments (output possibly redirected
    // to a length query or a shortened length, both within the caller's
    // buffer).
    let call = |o: *mut CK_BYTE, l: *mut CK_ULONG| unsafe { f(session, data, data_len, o, l) };
    match op {
        // SAFETY: caller's output arguments.
        Some(op) => unsafe { finish(session, op, out, out_len, call) },
        None => call(out, out_len),
    }
}

/// C_EncryptFinal (multi-part GCM): see [`finish`].
///
/// # Safety
/// PKCS#11 C_EncryptFinal contract.
pub unsafe fn encrypt_final(
    real: &Real,
    session: CK_SESSION_HANDLE,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    let Some(f) = real.list.C_EncryptFinal else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    let op = ops().remove(&session);
    // SAFETY: as in `encrypt`.
    let call = |o: *mut CK_BYTE, l: *mut CK_ULONG| unsafe { f(session, o, l) };
    match op {
        // SAFETY: caller's output arguments.
        Some(op) => unsafe { finish(session, op, out, out_len, call) },
        None => call(out, out_len),
    }
}

fn relabel_decrypt_failure(rv: CK_RV) -> CK_RV {
    if rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL {
        return rv;
    }
    faults::decrypt_failure_rv().map_or(rv, |r| r.0)
}

/// C_Decrypt: forwarded unchanged, failures optionally re-labelled.
///
/// # Safety
/// PKCS#11 C_Decrypt contract.
pub unsafe fn decrypt(
    real: &Real,
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    let Some(f) = real.list.C_Decrypt else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    // SAFETY: caller's arguments, unchanged.
    relabel_decrypt_failure(unsafe { f(session, data, data_len, out, out_len) })
}

/// C_DecryptFinal: forwarded unchanged, failures optionally re-labelled.
///
/// # Safety
/// PKCS#11 C_DecryptFinal contract.
pub unsafe fn decrypt_final(
    real: &Real,
    session: CK_SESSION_HANDLE,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    let Some(f) = real.list.C_DecryptFinal else {
        return CKR_FUNCTION_NOT_SUPPORTED;
    };
    // SAFETY: caller's arguments, unchanged.
    relabel_decrypt_failure(unsafe { f(session, out, out_len) })
}

/// C_CloseSession: forget the session's operation.
///
/// # Safety
/// PKCS#11 C_CloseSession contract.
pub unsafe fn close_session(real: &Real, session: CK_SESSION_HANDLE) -> CK_RV {
    ops().remove(&session);
    match real.list.C_CloseSession {
        // SAFETY: caller's argument.
        Some(f) => unsafe { f(session) },
        None => CKR_FUNCTION_NOT_SUPPORTED,
    }
}

/// C_CloseAllSessions: forget the operations of that slot's sessions.
///
/// # Safety
/// PKCS#11 C_CloseAllSessions contract.
pub unsafe fn close_all_sessions(real: &Real, slot: CK_SLOT_ID) -> CK_RV {
    let sessions: Vec<CK_SESSION_HANDLE> = ops().keys().copied().collect();
    for s in sessions {
        let mut info = CK_SESSION_INFO {
            slotID: 0,
            state: 0,
            flags: 0,
            ulDeviceError: 0,
        };
        let rv = match real.list.C_GetSessionInfo {
            // SAFETY: valid out pointer.
            Some(f) => unsafe { f(s, &mut info) },
            None => CKR_FUNCTION_NOT_SUPPORTED,
        };
        if rv != CKR_OK || info.slotID == slot {
            ops().remove(&s);
        }
    }
    match real.list.C_CloseAllSessions {
        // SAFETY: caller's argument.
        Some(f) => unsafe { f(slot) },
        None => CKR_FUNCTION_NOT_SUPPORTED,
    }
}

/// C_Finalize: forget every operation.
///
/// # Safety
/// PKCS#11 C_Finalize contract.
pub unsafe fn finalize(real: &Real, reserved: *mut c_void) -> CK_RV {
    let rv = match real.list.C_Finalize {
        // SAFETY: caller's argument.
        Some(f) => unsafe { f(reserved) },
        None => CKR_FUNCTION_NOT_SUPPORTED,
    };
    ops().clear();
    rv
}
