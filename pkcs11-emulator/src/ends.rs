//! Ending the real module's operation when the emulator fails an operation
//! step itself (an injected rv, or a `"forever"` hang released). PKCS#11
//! says a failed C_Encrypt, C_Sign, ... ends the active operation, so the
//! caller will start a new one on the same session next; if the real
//! module still had the old one active it would answer
//! CKR_OPERATION_ACTIVE, which no real HSM would. So the step is completed
//! against the real module into a scratch buffer that is wiped and dropped.

use crate::loader::Real;
use cryptoki_sys::*;
use std::ptr;

/// Runs `call(out, out_len)` as a length query and then for real into a
/// scratch buffer, discarding (and zeroing) the output.
fn drain(call: impl Fn(*mut CK_BYTE, *mut CK_ULONG) -> CK_RV) {
    let mut n: CK_ULONG = 0;
    if call(ptr::null_mut(), &mut n) != CKR_OK {
        // A failed length query has ended the operation already.
        return;
    }
    let mut buf = vec![0u8; (n as usize).max(1)];
    let mut got = n;
    let _ = call(buf.as_mut_ptr(), &mut got);
    buf.iter_mut().for_each(|b| *b = 0);
}

macro_rules! finish_with {
    ($real:ident . $final:ident, $session:ident) => {
        if let Some(f) = $real.list.$final {
            // SAFETY: a final call on the caller's session with our buffers.
            drain(|o, l| unsafe { f($session, o, l) });
        }
    };
}

/// # Safety
/// The caller's C_Encrypt arguments.
pub unsafe fn encrypt(
    real: &Real,
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    _out: *mut CK_BYTE,
    _out_len: *mut CK_ULONG,
) {
    crate::gcm::forget(session);
    if let Some(f) = real.list.C_Encrypt {
        // SAFETY: the caller's input, our output buffers.
        drain(|o, l| unsafe { f(session, data, data_len, o, l) });
    }
}

/// # Safety
/// The caller's C_EncryptUpdate arguments.
pub unsafe fn encrypt_update(
    real: &Real,
    session: CK_SESSION_HANDLE,
    _data: *mut CK_BYTE,
    _data_len: CK_ULONG,
    _out: *mut CK_BYTE,
    _out_len: *mut CK_ULONG,
) {
    crate::gcm::forget(session);
    finish_with!(real.C_EncryptFinal, session);
}

/// # Safety
/// The caller's C_EncryptFinal arguments.
pub unsafe fn encrypt_final(
    real: &Real,
    session: CK_SESSION_HANDLE,
    _out: *mut CK_BYTE,
    _out_len: *mut CK_ULONG,
) {
    crate::gcm::forget(session);
    finish_with!(real.C_EncryptFinal, session);
}

/// # Safety
/// The caller's C_Decrypt arguments.
pub unsafe fn decrypt(
    real: &Real,
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    _out: *mut CK_BYTE,
    _out_len: *mut CK_ULONG,
) {
    if let Some(f) = real.list.C_Decrypt {
        // SAFETY: the caller's input, our output buffers.
        drain(|o, l| unsafe { f(session, data, data_len, o, l) });
    }
}

/// # Safety
/// The caller's C_DecryptUpdate arguments.
pub unsafe fn decrypt_update(
    real: &Real,
    session: CK_SESSION_HANDLE,
    _data: *mut CK_BYTE,
    _data_len: CK_ULONG,
    _out: *mut CK_BYTE,
    _out_len: *mut CK_ULONG,
) {
    finish_with!(real.C_DecryptFinal, session);
}

/// # Safety
/// The caller's C_DecryptFinal arguments.
pub unsafe fn decrypt_final(
    real: &Real,
    session: CK_SESSION_HANDLE,
    _out: *mut CK_BYTE,
    _out_len: *mut CK_ULONG,
) {
    finish_with!(real.C_DecryptFinal, session);
}

/// # Safety
/// The caller's C_Sign arguments.
pub unsafe fn sign(
    real: &Real,
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    _out: *mut CK_BYTE,
    _out_len: *mut CK_ULONG,
) {
    if let Some(f) = real.list.C_Sign {
        // SAFETY: the caller's input, our output buffers.
        drain(|o, l| unsafe { f(session, data, data_len, o, l) });
    }
}

/// # Safety
/// The caller's C_SignUpdate arguments.
pub unsafe fn sign_update(
    real: &Real,
    session: CK_SESSION_HANDLE,
    _data: *mut CK_BYTE,
    _data_len: CK_ULONG,
) {
    finish_with!(real.C_SignFinal, session);
}

/// # Safety
/// The caller's C_SignFinal arguments.
pub unsafe fn sign_final(
    real: &Real,
    session: CK_SESSION_HANDLE,
    _out: *mut CK_BYTE,
    _out_len: *mut CK_ULONG,
) {
    finish_with!(real.C_SignFinal, session);
}

/// # Safety
/// The caller's C_Verify arguments.
pub unsafe fn verify(
    real: &Real,
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    sig: *mut CK_BYTE,
    sig_len: CK_ULONG,
) {
    if let Some(f) = real.list.C_Verify {
        // SAFETY: the caller's arguments; any result ends the operation.
        let _ = unsafe { f(session, data, data_len, sig, sig_len) };
    }
}
