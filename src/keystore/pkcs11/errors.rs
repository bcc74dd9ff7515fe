//! What a PKCS#11 return value means to this backend: a lost session/token/module (drop the pool and
//! reconnect), a stale object handle (refetch the key once), or anything else (a bad GCM tag is the
//! module's [`Profile`](super::profile::Profile)'s call). Also short names for return values.

use cryptoki::error::{Error, RvError};

use crate::keystore::KeyStoreError;

/// The return value of a failed PKCS#11 call, if the failure came from the module.
pub(crate) fn rv(err: &Error) -> Option<RvError> {
    match err {
        Error::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Errors after which no session of the token can be trusted: the pool is dropped, the token is
/// found and logged in again, and the module re-initialized if it says it is not initialized.
pub(crate) fn is_connection_lost(err: &Error) -> bool {
    matches!(
        rv(err),
        Some(
            RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized
                | RvError::SlotIdInvalid
        )
    )
}

/// A cached object handle no longer names the key.
pub(crate) fn is_stale_handle(err: &Error) -> bool {
    matches!(
        rv(err),
        Some(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid)
    )
}

/// Errors that leave this one session in doubt (an operation still active, say): the worker
/// closes its own session and opens a new one for the next job.
pub(crate) fn spoils_session(err: &Error) -> bool {
    matches!(
        rv(err),
        Some(RvError::OperationActive | RvError::OperationNotInitialized)
    )
}

/// A short, PIN-free description of a cryptoki error: `C_Encrypt: CKR_DEVICE_ERROR`.
pub(crate) fn describe(err: &Error) -> String {
    match err {
        Error::Pkcs11(rv, function) => format!("{function:?}: {}", rv_name(*rv)),
        other => other.to_string(),
    }
}

/// `CKR_PIN_INCORRECT`-style name of a return value.
pub(crate) fn rv_name(rv: RvError) -> String {
    let camel = format!("{rv:?}");
    let mut name = String::from("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// The key-store error for a failed HSM call that has no more specific meaning.
pub(crate) fn to_keystore_error(err: &Error) -> KeyStoreError {
    if is_connection_lost(err) {
        KeyStoreError::Unavailable(describe(err))
    } else {
        KeyStoreError::Internal(describe(err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(rv_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
    }
}
