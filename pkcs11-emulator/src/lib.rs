//! A PKCS#11 emulator module: a `cdylib` that loads a real PKCS#11 module
//! (named by `XKS_EMULATOR_MODULE`), forwards every call to it, and changes
//! only what its behaviour settings say — vendor GCM IV handling, latency,
//! hangs, injected return values — so tests and rehearsals of the XKS proxy
//! can see CloudHSM-, Luna- or outage-like behaviour from SoftHSM. This file
//! owns the three exported entry points (`C_GetFunctionList`,
//! `C_GetInterfaceList`, `C_GetInterface`), the function lists and
//! interfaces they hand out, and the panic guard every entry point uses.
//! All `unsafe` FFI of the project lives in this crate.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod behaviour;
pub mod control;
pub mod counters;
mod ends;
pub mod faults;
mod gcm;
pub mod loader;
pub mod rv;
pub mod wrappers;

use cryptoki_sys::*;
use std::ffi::{CStr, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

/// Runs `f`, turning a panic into `CKR_GENERAL_ERROR` so that no panic
/// unwinds across the C ABI.
pub(crate) fn guard(f: impl FnOnce() -> CK_RV) -> CK_RV {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(CKR_GENERAL_ERROR)
}

/// The interface name of standard PKCS#11 function lists.
static INTERFACE_NAME: &[u8; 8] = b"PKCS 11\0";

/// The lists and interfaces handed out; built once, never freed, never
/// written after construction.
struct Exported {
    v2: &'static CK_FUNCTION_LIST,
    /// Default interface first: the 3.0 one when the real module is 3.x.
    interfaces: Vec<CK_INTERFACE>,
}

// SAFETY: the raw pointers in `interfaces` point to leaked, immutable
// statics (the interface name and the function lists).
unsafe impl Send for Exported {}
// SAFETY: as above; nothing is mutated after construction.
unsafe impl Sync for Exported {}

static EXPORTED: OnceLock<Exported> = OnceLock::new();

fn interface(list: *const c_void) -> CK_INTERFACE {
    CK_INTERFACE {
        pInterfaceName: INTERFACE_NAME.as_ptr() as *mut CK_UTF8CHAR,
        pFunctionList: list as *mut c_void,
        flags: 0,
    }
}

fn exported() -> Result<&'static Exported, CK_RV> {
    let real = loader::load()?;
    Ok(EXPORTED.get_or_init(|| {
        let v2: &'static CK_FUNCTION_LIST = Box::leak(Box::new(wrappers::list_v2(real.v2_version)));
        let v2_iface = interface(v2 as *const CK_FUNCTION_LIST as *const c_void);
        let interfaces = if real.v3 {
            let v3: &'static CK_FUNCTION_LIST_3_0 = Box::leak(Box::new(wrappers::list_v3()));
            vec![
                interface(v3 as *const CK_FUNCTION_LIST_3_0 as *const c_void),
                v2_iface,
            ]
        } else {
            vec![v2_iface]
        };
        Exported { v2, interfaces }
    }))
}

/// The version at the head of an interface's function list.
fn interface_version(iface: &CK_INTERFACE) -> CK_VERSION {
    // SAFETY: every exported interface points at one of our function lists,
    // which all start with a CK_VERSION.
    unsafe { (*(iface.pFunctionList as *const CK_FUNCTION_LIST)).version }
}

/// PKCS#11 `C_GetFunctionList`: the emulator's 2.40 function list.
///
/// # Safety
/// `ppFunctionList` must be NULL or valid for a pointer write.
#[unsafe(no_mangle)]
#[allow(non_snake_case)]
pub unsafe extern "C" fn C_GetFunctionList(ppFunctionList: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    guard(|| {
        let ex = match exported() {
            Ok(ex) => ex,
            Err(rv) => return rv,
        };
        if ppFunctionList.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        // SAFETY: checked non-NULL; caller's out pointer.
        unsafe { *ppFunctionList = ex.v2 as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST };
        CKR_OK
    })
}

/// PKCS#11 3.0 `C_GetInterfaceList`: "PKCS 11" 3.0 and 2.40 when the real
/// module is 3.x, only "PKCS 11" 2.40 otherwise.
///
/// # Safety
/// `pulCount` must be NULL or valid; `pInterfacesList` NULL or valid for
/// `*pulCount` entries.
#[unsafe(no_mangle)]
#[allow(non_snake_case)]
pub unsafe extern "C" fn C_GetInterfaceList(
    pInterfacesList: *mut CK_INTERFACE,
    pulCount: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let ex = match exported() {
            Ok(ex) => ex,
            Err(rv) => return rv,
        };
        if pulCount.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        let n = ex.interfaces.len();
        // SAFETY: checked non-NULL; caller's in/out count.
        unsafe {
            if pInterfacesList.is_null() {
                *pulCount = n as CK_ULONG;
                return CKR_OK;
            }
            if (*pulCount as usize) < n {
                *pulCount = n as CK_ULONG;
                return CKR_BUFFER_TOO_SMALL;
            }
            ptr_copy(ex.interfaces.as_ptr(), pInterfacesList, n);
            *pulCount = n as CK_ULONG;
        }
        CKR_OK
    })
}

/// # Safety
/// `dst` valid for `n` writes.
unsafe fn ptr_copy(src: *const CK_INTERFACE, dst: *mut CK_INTERFACE, n: usize) {
    // SAFETY: caller's contract; src is our own vector.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, n) }
}

/// PKCS#11 3.0 `C_GetInterface`.
///
/// With a 2.40-only real module the only interface is "PKCS 11" 2.40, so a
/// caller asking for the default (cryptoki does) gets a 2.40 list and falls
/// back to `C_GetFunctionList`; with a 3.x real module the default is the
/// 3.0 list, message functions included.
///
/// # Safety
/// `pInterfaceName` NULL or a NUL-terminated string, `pVersion` NULL or
/// valid, `ppInterface` NULL or valid for a pointer write.
#[unsafe(no_mangle)]
#[allow(non_snake_case)]
pub unsafe extern "C" fn C_GetInterface(
    pInterfaceName: *mut CK_UTF8CHAR,
    pVersion: *mut CK_VERSION,
    ppInterface: *mut *mut CK_INTERFACE,
    flags: CK_FLAGS,
) -> CK_RV {
    guard(|| {
        let ex = match exported() {
            Ok(ex) => ex,
            Err(rv) => return rv,
        };
        if ppInterface.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        if !pInterfaceName.is_null() {
            // SAFETY: caller's NUL-terminated name.
            let name = unsafe { CStr::from_ptr(pInterfaceName as *const std::ffi::c_char) };
            if name.to_bytes_with_nul() != INTERFACE_NAME {
                return CKR_ARGUMENTS_BAD;
            }
        }
        // SAFETY: caller's version, if given.
        let want = (!pVersion.is_null()).then(|| unsafe { *pVersion });
        let found = ex.interfaces.iter().find(|i| {
            let v = interface_version(i);
            want.is_none_or(|w| w.major == v.major && w.minor == v.minor)
                && (i.flags & flags) == flags
        });
        match found {
            Some(i) => {
                // SAFETY: checked non-NULL; caller's out pointer. The
                // interface lives for the rest of the process.
                unsafe { *ppInterface = i as *const CK_INTERFACE as *mut CK_INTERFACE };
                CKR_OK
            }
            None => CKR_ARGUMENTS_BAD,
        }
    })
}
