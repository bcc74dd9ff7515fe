//! The wrapped function table: one `macro_rules!` invocation over the
//! PKCS#11 3.0 signature list generates the [`Func`] enum (names, counter
//! indices), one `extern "C"` wrapper per function, and the 2.40 and 3.0
//! function lists the emulator hands out. Every wrapper counts the call,
//! applies the fault settings, then forwards to the real module (or to a
//! hook in [`crate::gcm`] for the few calls the emulator rewrites).

use cryptoki_sys::*;
use std::ffi::c_void;

macro_rules! emulated_functions {
    (
        v2 { $( $n2:ident ( $($a2:ident : $t2:ty),* ) $([hook $h2:path])? $([ends $e2:path])? ; )* }
        v3 { $( $n3:ident ( $($a3:ident : $t3:ty),* ) $([hook $h3:path])? $([ends $e3:path])? ; )* }
    ) => {
        /// A PKCS#11 function the emulator wraps (everything in the 3.0 list
        /// except the three list/interface getters).
        #[allow(non_camel_case_types, clippy::enum_variant_names)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Func { $($n2,)* $($n3,)* }

        impl Func {
            /// All wrapped functions, in function-list order (also the
            /// counter index order).
            pub const ALL: &'static [Func] = &[$(Func::$n2,)* $(Func::$n3,)*];
            /// Number of wrapped functions.
            pub const COUNT: usize = Self::ALL.len();

            /// The PKCS#11 name, e.g. `"C_Encrypt"`.
            pub fn name(self) -> &'static str {
                match self {
                    $(Func::$n2 => stringify!($n2),)*
                    $(Func::$n3 => stringify!($n3),)*
                }
            }

            /// Looks a function up by its PKCS#11 name.
            pub fn from_name(name: &str) -> Option<Func> {
                Self::ALL.iter().copied().find(|f| f.name() == name)
            }
        }

        mod wrap {
            use super::*;
            $( emulated_functions!(@wrapper $n2 ( $($a2 : $t2),* ) [$($h2)?] [$($e2)?]); )*
            $( emulated_functions!(@wrapper $n3 ( $($a3 : $t3),* ) [$($h3)?] [$($e3)?]); )*
        }

        /// The 2.40 list: every entry is an emulator wrapper.
        pub(crate) fn list_v2(version: CK_VERSION) -> CK_FUNCTION_LIST {
            CK_FUNCTION_LIST {
                version,
                C_GetFunctionList: Some(crate::C_GetFunctionList),
                $($n2: Some(wrap::$n2),)*
            }
        }

        /// The 3.0 list: every entry is an emulator wrapper.
        pub(crate) fn list_v3() -> CK_FUNCTION_LIST_3_0 {
            CK_FUNCTION_LIST_3_0 {
                version: CK_VERSION { major: 3, minor: 0 },
                C_GetFunctionList: Some(crate::C_GetFunctionList),
                C_GetInterfaceList: Some(crate::C_GetInterfaceList),
                C_GetInterface: Some(crate::C_GetInterface),
                $($n2: Some(wrap::$n2),)*
                $($n3: Some(wrap::$n3),)*
            }
        }
    };

    (@wrapper $name:ident ( $($a:ident : $t:ty),* ) [$($hook:path)?] [$($end:path)?]) => {
        #[allow(non_snake_case, clippy::too_many_arguments)]
        pub(super) unsafe extern "C" fn $name($($a: $t),*) -> CK_RV {
            crate::guard(|| {
                let Some(real) = crate::loader::loaded() else {
                    return CKR_GENERAL_ERROR;
                };
                if let Some(rv) = crate::faults::before_call(Func::$name) {
                    emulated_functions!(@end real, rv, [$($end)?], ($($a),*));
                    return rv;
                }
                emulated_functions!(@forward real, $name, ($($a),*) $($hook)?)
            })
        }
    };

    // A failed call ends the caller's operation (PKCS#11 5.2); when the
    // emulator fails it without forwarding, end the real one too.
    (@end $real:ident, $rv:ident, [], ($($a:ident),*)) => {};
    (@end $real:ident, $rv:ident, [$end:path], ($($a:ident),*)) => {
        if $rv != CKR_OK && $rv != CKR_BUFFER_TOO_SMALL {
            // SAFETY: the caller's arguments, unchanged.
            unsafe { $end($real, $($a),*) }
        }
    };

    (@forward $real:ident, $name:ident, ($($a:ident),*)) => {
        match $real.list.$name {
            // SAFETY: same arguments, same signature, entry taken from the
            // real module's own function list.
            Some(f) => unsafe { f($($a),*) },
            None => CKR_FUNCTION_NOT_SUPPORTED,
        }
    };

    (@forward $real:ident, $name:ident, ($($a:ident),*) $hook:path) => {
        // SAFETY: the hook has the PKCS#11 contract of the function it
        // stands in for; the arguments are the caller's, unchanged.
        unsafe { $hook($real, $($a),*) }
    };
}

emulated_functions! {
    v2 {
        C_Initialize(arg1: *mut c_void);
        C_Finalize(arg1: *mut c_void) [hook crate::gcm::finalize];
        C_GetInfo(arg1: *mut CK_INFO);
        C_GetSlotList(arg1: CK_BBOOL, arg2: *mut CK_SLOT_ID, arg3: *mut CK_ULONG);
        C_GetSlotInfo(arg1: CK_SLOT_ID, arg2: *mut CK_SLOT_INFO);
        C_GetTokenInfo(arg1: CK_SLOT_ID, arg2: *mut CK_TOKEN_INFO);
        C_GetMechanismList(arg1: CK_SLOT_ID, arg2: *mut CK_MECHANISM_TYPE, arg3: *mut CK_ULONG);
        C_GetMechanismInfo(arg1: CK_SLOT_ID, arg2: CK_MECHANISM_TYPE, arg3: *mut CK_MECHANISM_INFO);
        C_InitToken(arg1: CK_SLOT_ID, arg2: *mut CK_UTF8CHAR, arg3: CK_ULONG, arg4: *mut CK_UTF8CHAR);
        C_InitPIN(arg1: CK_SESSION_HANDLE, arg2: *mut CK_UTF8CHAR, arg3: CK_ULONG);
        C_SetPIN(arg1: CK_SESSION_HANDLE, arg2: *mut CK_UTF8CHAR, arg3: CK_ULONG, arg4: *mut CK_UTF8CHAR, arg5: CK_ULONG);
        C_OpenSession(arg1: CK_SLOT_ID, arg2: CK_FLAGS, arg3: *mut c_void, arg4: CK_NOTIFY, arg5: *mut CK_SESSION_HANDLE);
        C_CloseSession(arg1: CK_SESSION_HANDLE) [hook crate::gcm::close_session];
        C_CloseAllSessions(arg1: CK_SLOT_ID) [hook crate::gcm::close_all_sessions];
        C_GetSessionInfo(arg1: CK_SESSION_HANDLE, arg2: *mut CK_SESSION_INFO);
        C_GetOperationState(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG);
        C_SetOperationState(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: CK_OBJECT_HANDLE, arg5: CK_OBJECT_HANDLE);
        C_Login(arg1: CK_SESSION_HANDLE, arg2: CK_USER_TYPE, arg3: *mut CK_UTF8CHAR, arg4: CK_ULONG);
        C_Logout(arg1: CK_SESSION_HANDLE);
        C_CreateObject(arg1: CK_SESSION_HANDLE, arg2: *mut CK_ATTRIBUTE, arg3: CK_ULONG, arg4: *mut CK_OBJECT_HANDLE);
        C_CopyObject(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE, arg3: *mut CK_ATTRIBUTE, arg4: CK_ULONG, arg5: *mut CK_OBJECT_HANDLE);
        C_DestroyObject(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE);
        C_GetObjectSize(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE, arg3: *mut CK_ULONG);
        C_GetAttributeValue(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE, arg3: *mut CK_ATTRIBUTE, arg4: CK_ULONG);
        C_SetAttributeValue(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE, arg3: *mut CK_ATTRIBUTE, arg4: CK_ULONG);
        C_FindObjectsInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_ATTRIBUTE, arg3: CK_ULONG);
        C_FindObjects(arg1: CK_SESSION_HANDLE, arg2: *mut CK_OBJECT_HANDLE, arg3: CK_ULONG, arg4: *mut CK_ULONG);
        C_FindObjectsFinal(arg1: CK_SESSION_HANDLE);
        C_EncryptInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE) [hook crate::gcm::encrypt_init];
        C_Encrypt(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG) [hook crate::gcm::encrypt] [ends crate::ends::encrypt];
        C_EncryptUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG) [ends crate::ends::encrypt_update];
        C_EncryptFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG) [hook crate::gcm::encrypt_final] [ends crate::ends::encrypt_final];
        C_DecryptInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
        C_Decrypt(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG) [hook crate::gcm::decrypt] [ends crate::ends::decrypt];
        C_DecryptUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG) [ends crate::ends::decrypt_update];
        C_DecryptFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG) [hook crate::gcm::decrypt_final] [ends crate::ends::decrypt_final];
        C_DigestInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM);
        C_Digest(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
        C_DigestUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
        C_DigestKey(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE);
        C_DigestFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG);
        C_SignInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
        C_Sign(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG) [ends crate::ends::sign];
        C_SignUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG) [ends crate::ends::sign_update];
        C_SignFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG) [ends crate::ends::sign_final];
        C_SignRecoverInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
        C_SignRecover(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
        C_VerifyInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
        C_Verify(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: CK_ULONG) [ends crate::ends::verify];
        C_VerifyUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
        C_VerifyFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
        C_VerifyRecoverInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
        C_VerifyRecover(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
        C_DigestEncryptUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
        C_DecryptDigestUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
        C_SignEncryptUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
        C_DecryptVerifyUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
        C_GenerateKey(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: *mut CK_ATTRIBUTE, arg4: CK_ULONG, arg5: *mut CK_OBJECT_HANDLE);
        C_GenerateKeyPair(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: *mut CK_ATTRIBUTE, arg4: CK_ULONG, arg5: *mut CK_ATTRIBUTE, arg6: CK_ULONG, arg7: *mut CK_OBJECT_HANDLE, arg8: *mut CK_OBJECT_HANDLE);
        C_WrapKey(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE, arg4: CK_OBJECT_HANDLE, arg5: *mut CK_BYTE, arg6: *mut CK_ULONG);
        C_UnwrapKey(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE, arg4: *mut CK_BYTE, arg5: CK_ULONG, arg6: *mut CK_ATTRIBUTE, arg7: CK_ULONG, arg8: *mut CK_OBJECT_HANDLE);
        C_DeriveKey(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE, arg4: *mut CK_ATTRIBUTE, arg5: CK_ULONG, arg6: *mut CK_OBJECT_HANDLE);
        C_SeedRandom(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
        C_GenerateRandom(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
        C_GetFunctionStatus(arg1: CK_SESSION_HANDLE);
        C_CancelFunction(arg1: CK_SESSION_HANDLE);
        C_WaitForSlotEvent(arg1: CK_FLAGS, arg2: *mut CK_SLOT_ID, arg3: *mut c_void);
    }
    v3 {
        C_LoginUser(arg1: CK_SESSION_HANDLE, arg2: CK_USER_TYPE, arg3: *mut CK_UTF8CHAR, arg4: CK_ULONG, arg5: *mut CK_UTF8CHAR, arg6: CK_ULONG);
        C_SessionCancel(arg1: CK_SESSION_HANDLE, arg2: CK_FLAGS);
        C_MessageEncryptInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
        C_EncryptMessage(arg1: CK_SESSION_HANDLE, arg2: *mut c_void, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: CK_ULONG, arg6: *mut CK_BYTE, arg7: CK_ULONG, arg8: *mut CK_BYTE, arg9: *mut CK_ULONG);
        C_EncryptMessageBegin(arg1: CK_SESSION_HANDLE, arg2: *mut c_void, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: CK_ULONG);
        C_EncryptMessageNext(arg1: CK_SESSION_HANDLE, arg2: *mut c_void, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: CK_ULONG, arg6: *mut CK_BYTE, arg7: *mut CK_ULONG, arg8: CK_FLAGS);
        C_MessageEncryptFinal(arg1: CK_SESSION_HANDLE);
        C_MessageDecryptInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
        C_DecryptMessage(arg1: CK_SESSION_HANDLE, arg2: *mut c_void, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: CK_ULONG, arg6: *mut CK_BYTE, arg7: CK_ULONG, arg8: *mut CK_BYTE, arg9: *mut CK_ULONG);
        C_DecryptMessageBegin(arg1: CK_SESSION_HANDLE, arg2: *mut c_void, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: CK_ULONG);
        C_DecryptMessageNext(arg1: CK_SESSION_HANDLE, arg2: *mut c_void, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: CK_ULONG, arg6: *mut CK_BYTE, arg7: *mut CK_ULONG, arg8: CK_FLAGS);
        C_MessageDecryptFinal(arg1: CK_SESSION_HANDLE);
        C_MessageSignInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
        C_SignMessage(arg1: CK_SESSION_HANDLE, arg2: *mut c_void, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: CK_ULONG, arg6: *mut CK_BYTE, arg7: *mut CK_ULONG);
        C_SignMessageBegin(arg1: CK_SESSION_HANDLE, arg2: *mut c_void, arg3: CK_ULONG);
        C_SignMessageNext(arg1: CK_SESSION_HANDLE, arg2: *mut c_void, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: CK_ULONG, arg6: *mut CK_BYTE, arg7: *mut CK_ULONG);
        C_MessageSignFinal(arg1: CK_SESSION_HANDLE);
        C_MessageVerifyInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
        C_VerifyMessage(arg1: CK_SESSION_HANDLE, arg2: *mut c_void, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: CK_ULONG, arg6: *mut CK_BYTE, arg7: CK_ULONG);
        C_VerifyMessageBegin(arg1: CK_SESSION_HANDLE, arg2: *mut c_void, arg3: CK_ULONG);
        C_VerifyMessageNext(arg1: CK_SESSION_HANDLE, arg2: *mut c_void, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: CK_ULONG, arg6: *mut CK_BYTE, arg7: CK_ULONG);
        C_MessageVerifyFinal(arg1: CK_SESSION_HANDLE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_3_0_function_but_the_getters_is_wrapped() {
        assert_eq!(Func::COUNT, 92 - 3);
        assert_eq!(Func::from_name("C_Encrypt"), Some(Func::C_Encrypt));
        assert_eq!(Func::from_name("C_GetInterface"), None);
        for (i, f) in Func::ALL.iter().enumerate() {
            assert_eq!(*f as usize, i, "counter index order");
        }
        let v3 = list_v3();
        assert_eq!((v3.version.major, v3.version.minor), (3, 0));
        assert!(v3.C_MessageEncryptInit.is_some() && v3.C_LoginUser.is_some());
        assert!(v3.C_GetInterface.is_some() && v3.C_GetFunctionList.is_some());
        let v2 = list_v2(CK_VERSION {
            major: 2,
            minor: 40,
        });
        assert_eq!((v2.version.major, v2.version.minor), (2, 40));
        assert!(v2.C_WaitForSlotEvent.is_some());
    }
}
