//! Loading, once per process, of everything the emulator needs: the real
//! PKCS#11 module named by `XKS_EMULATOR_MODULE` (its 2.40 list, and its
//! 3.x list when it has `C_GetInterface`), the initial behaviour from
//! `XKS_EMULATOR_CONFIG`, and the control socket at `XKS_EMULATOR_SOCKET`.

use crate::behaviour::Behaviour;
use crate::{control, faults};
use cryptoki_sys::*;
use libloading::Library;
use std::ffi::OsString;
use std::mem::{MaybeUninit, size_of};
use std::ptr;
use std::sync::OnceLock;

/// Name of the environment variable holding the real module's path.
pub const ENV_MODULE: &str = "XKS_EMULATOR_MODULE";
/// Name of the environment variable holding the initial behaviour file.
pub const ENV_CONFIG: &str = "XKS_EMULATOR_CONFIG";
/// Name of the environment variable holding the control socket path.
pub const ENV_SOCKET: &str = "XKS_EMULATOR_SOCKET";

/// The real module, kept loaded for the life of the process.
pub struct Real {
    _lib: Library,
    /// The real entry points. For a 2.40 module the 3.0-only entries are
    /// `None`.
    pub list: CK_FUNCTION_LIST_3_0,
    /// Whether the real module offered a 3.x "PKCS 11" interface.
    pub v3: bool,
    /// The version the real module's 2.x `C_GetFunctionList` list reports.
    pub v2_version: CK_VERSION,
}

static REAL: OnceLock<Result<Real, String>> = OnceLock::new();

/// The real module, loading it (and the config and socket) on first use.
/// On failure, one line saying why goes to stderr (on the first attempt).
pub fn load() -> Result<&'static Real, CK_RV> {
    REAL.get_or_init(|| {
        let r = load_all();
        if let Err(why) = &r {
            eprintln!("xks-pkcs11-emulator: {why}");
        }
        r
    })
    .as_ref()
    .map_err(|_| CKR_GENERAL_ERROR)
}

/// The real module if it has been loaded successfully.
pub fn loaded() -> Option<&'static Real> {
    REAL.get().and_then(|r| r.as_ref().ok())
}

fn load_all() -> Result<Real, String> {
    let path = std::env::var_os(ENV_MODULE)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("{ENV_MODULE} is not set; it must name the real PKCS#11 module"))?;
    let real = load_module(&path)?;
    if let Some(cfg) = std::env::var_os(ENV_CONFIG).filter(|p| !p.is_empty()) {
        let text = std::fs::read_to_string(&cfg)
            .map_err(|e| format!("cannot read {ENV_CONFIG}={}: {e}", cfg.to_string_lossy()))?;
        let b = Behaviour::from_json(&text).map_err(|e| {
            format!(
                "bad behaviour in {ENV_CONFIG}={}: {e}",
                cfg.to_string_lossy()
            )
        })?;
        faults::set(b);
    }
    if let Some(sock) = std::env::var_os(ENV_SOCKET).filter(|p| !p.is_empty()) {
        control::start(sock.as_ref())
            .map_err(|e| format!("control socket {}: {e}", sock.to_string_lossy()))?;
    }
    Ok(real)
}

type GetFunctionListFn = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;
type GetInterfaceFn = unsafe extern "C" fn(
    *mut CK_UTF8CHAR,
    *mut CK_VERSION,
    *mut *mut CK_INTERFACE,
    CK_FLAGS,
) -> CK_RV;

fn load_module(path: &OsString) -> Result<Real, String> {
    let shown = path.to_string_lossy();
    // SAFETY: loading a PKCS#11 module runs its initialisers; that is what
    // the operator asked for by naming it.
    let lib = unsafe { Library::new(path) }.map_err(|e| format!("cannot load {shown}: {e}"))?;

    // SAFETY: the symbol has this type in every PKCS#11 module.
    let gfl: GetFunctionListFn = unsafe { lib.get::<GetFunctionListFn>(b"C_GetFunctionList\0") }
        .map(|s| *s)
        .map_err(|e| format!("{shown} has no C_GetFunctionList: {e}"))?;
    let mut p2: *mut CK_FUNCTION_LIST = ptr::null_mut();
    // SAFETY: valid out pointer.
    let rv = unsafe { gfl(&mut p2) };
    if rv != CKR_OK || p2.is_null() {
        return Err(format!("{shown}: C_GetFunctionList returned 0x{rv:X}"));
    }

    // The 3.0 list starts with exactly the 2.40 list's fields, so copy the
    // 2.40 list over an all-None 3.0 list.
    let mut list = MaybeUninit::<CK_FUNCTION_LIST_3_0>::zeroed();
    // SAFETY: an all-zero CK_FUNCTION_LIST_3_0 is valid (version 0.0, every
    // entry None); p2 points to a CK_FUNCTION_LIST owned by the module,
    // which is a layout prefix of CK_FUNCTION_LIST_3_0.
    let mut list = unsafe {
        ptr::copy_nonoverlapping(
            p2 as *const u8,
            list.as_mut_ptr() as *mut u8,
            size_of::<CK_FUNCTION_LIST>(),
        );
        list.assume_init()
    };
    let mut v2_version = list.version;
    if v2_version.major >= 3 {
        // Some 3.x modules hand their 3.x list to C_GetFunctionList; the
        // emulator's answer there is a 2.40 list.
        v2_version = CK_VERSION {
            major: 2,
            minor: 40,
        };
    }

    let mut v3 = false;
    // SAFETY: the symbol has this type in every PKCS#11 3.x module.
    if let Ok(gi) = unsafe { lib.get::<GetInterfaceFn>(b"C_GetInterface\0") } {
        let gi: GetInterfaceFn = *gi;
        let mut name = *b"PKCS 11\0";
        let mut iface: *mut CK_INTERFACE = ptr::null_mut();
        // SAFETY: NUL-terminated name, NULL version (any), valid out pointer.
        let rv = unsafe { gi(name.as_mut_ptr(), ptr::null_mut(), &mut iface, 0) };
        if rv == CKR_OK && !iface.is_null() {
            // SAFETY: the module returned a valid interface; its function
            // list starts with a CK_VERSION, and a 3.x list is at least a
            // CK_FUNCTION_LIST_3_0 (3.2 extends it at the end).
            unsafe {
                let fl = (*iface).pFunctionList as *const CK_FUNCTION_LIST_3_0;
                if !fl.is_null() && (*fl).version.major >= 3 {
                    list = *fl;
                    v3 = true;
                }
            }
        }
    }

    Ok(Real {
        _lib: lib,
        list,
        v3,
        v2_version,
    })
}
