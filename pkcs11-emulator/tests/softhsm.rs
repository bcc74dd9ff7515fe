//! End-to-end tests of the built emulator `cdylib` over a real SoftHSM 2
//! token, driven through `cryptoki` exactly as the proxy drives its module:
//! the vendor GCM IV modes, injected errors, decrypt failure re-labelling,
//! the control socket, and a `"forever"` hang released by a later `set`.
//!
//! The library is taken from `XKS_EMULATOR_LIB`, else from the workspace
//! (or `CARGO_TARGET_DIR`) target directory of the current profile. When it
//! is missing the tests print a skip line, or fail if `CI` is set.
//! `XKS_EMULATOR_TEST_MODULE` swaps the wrapped module (default SoftHSM);
//! the token is always created with `softhsm2-util`.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Overrides the module the emulator wraps (default SoftHSM), e.g. a 3.x
/// module or OpenSC's pkcs11-spy in front of SoftHSM (`PKCS11SPY=...`).
const ENV_REAL: &str = "XKS_EMULATOR_TEST_MODULE";
const LIB_NAME: &str = "libxks_pkcs11_emulator.so";
const AAD: &[u8] = b"xks aad";
const PT: &[u8] = b"forty-two bytes of very secret plaintext!!";

struct Fixture {
    pkcs11: Pkcs11,
    /// The logged-in session; holding its lock serialises the tests (the
    /// emulator's behaviour is process-wide).
    session: Mutex<Session>,
    key: ObjectHandle,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

fn real_module() -> PathBuf {
    std::env::var_os(ENV_REAL)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SOFTHSM))
}

fn find_lib() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("XKS_EMULATOR_LIB") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let mut dirs = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(t));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    dirs.into_iter()
        .map(|d| d.join(profile).join(LIB_NAME))
        .find(|p| p.exists())
}

fn fixture() -> Option<&'static Fixture> {
    static FX: OnceLock<Option<Fixture>> = OnceLock::new();
    FX.get_or_init(|| {
        let Some(lib) = find_lib() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{LIB_NAME} not found (set XKS_EMULATOR_LIB or build it with \
                 `cargo build --release -p xks-pkcs11-emulator`)"
            );
            eprintln!("skipping emulator tests: {LIB_NAME} not built");
            return None;
        };
        if !Path::new(SOFTHSM).exists() {
            assert!(std::env::var_os("CI").is_none(), "{SOFTHSM} missing");
            eprintln!("skipping emulator tests: {SOFTHSM} missing");
            return None;
        }
        Some(setup(&lib))
    })
    .as_ref()
}

fn setup(lib: &Path) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).expect("token dir");
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .expect("softhsm conf");
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", "t"])
        .args(["--so-pin", "87654321", "--pin", "1234"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("run softhsm2-util");
    assert!(out.status.success(), "softhsm2-util: {out:?}");

    let socket = dir.path().join("emu.sock");
    // SAFETY: set once, before the module is loaded, from the one-time
    // fixture initialiser; nothing else in this test binary touches these.
    unsafe {
        std::env::set_var("SOFTHSM2_CONF", &conf);
        std::env::set_var("XKS_EMULATOR_MODULE", real_module());
        std::env::set_var("XKS_EMULATOR_SOCKET", &socket);
        std::env::remove_var("XKS_EMULATOR_CONFIG");
    }

    let pkcs11 = Pkcs11::new(lib).expect("load emulator through cryptoki");
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = pkcs11
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            pkcs11
                .get_token_info(*s)
                .map(|i| i.label() == "t")
                .unwrap_or(false)
        })
        .expect("token t");
    let session = pkcs11.open_rw_session(slot).expect("session");
    session
        .login(UserType::User, Some(&AuthPin::new("1234".into())))
        .expect("login");
    let key = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::ValueLen(32.into()),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(b"emu-test".to_vec()),
            ],
        )
        .expect("AES-256 key");
    Fixture {
        pkcs11,
        session: Mutex::new(session),
        key,
        socket,
        _dir: dir,
    }
}

/// The fixture and the test lock (with the behaviour reset to default).
fn start() -> Option<(&'static Fixture, MutexGuard<'static, Session>)> {
    let fx = fixture()?;
    let guard = fx.session.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(control(fx, &json!({"set": {}})), json!({"ok": true}));
    Some((fx, guard))
}

/// One request over the control socket (new connection each time).
fn control(fx: &Fixture, req: &Value) -> Value {
    let mut conn = UnixStream::connect(&fx.socket).expect("connect control socket");
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    writeln!(conn, "{req}").expect("send");
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).expect("reply");
    serde_json::from_str(&line).expect("reply is JSON")
}

fn set(fx: &Fixture, behaviour: Value) {
    assert_eq!(
        control(fx, &json!({ "set": behaviour })),
        json!({"ok": true})
    );
}

fn encrypt(s: &Session, key: ObjectHandle, iv: &mut [u8; 12]) -> Result<Vec<u8>, Error> {
    let mech = Mechanism::AesGcm(GcmParams::new(iv, AAD, 128.into())?);
    s.encrypt(&mech, key, PT)
}

fn decrypt(s: &Session, key: ObjectHandle, iv: &[u8; 12], ct: &[u8]) -> Result<Vec<u8>, Error> {
    let mut iv = *iv;
    let mech = Mechanism::AesGcm(GcmParams::new(&mut iv, AAD, 128.into())?);
    s.decrypt(&mech, key, ct)
}

/// An error's rv and function (`Function` has no `PartialEq`, so by name).
fn expected(rv: RvError, f: Function) -> (RvError, String) {
    (rv, format!("{f:?}"))
}

fn rv_of(e: Error) -> (RvError, String) {
    match e {
        Error::Pkcs11(rv, f) => (rv, format!("{f:?}")),
        other => panic!("expected a PKCS#11 error, got {other}"),
    }
}

#[test]
fn passthrough_round_trip() {
    let Some((fx, s)) = start() else { return };
    let mut iv = [7u8; 12];
    let ct = encrypt(&s, fx.key, &mut iv).unwrap();
    assert_eq!(iv, [7u8; 12], "passthrough leaves the IV alone");
    assert_eq!(ct.len(), PT.len() + 16);
    assert_eq!(decrypt(&s, fx.key, &iv, &ct).unwrap(), PT);
}

#[test]
fn hsm_into_params() {
    let Some((fx, s)) = start() else { return };
    set(fx, json!({"iv_mode": "hsm_into_params"}));
    let mut iv = [1u8; 12];
    let e = encrypt(&s, fx.key, &mut iv).unwrap_err();
    assert_eq!(
        rv_of(e),
        expected(RvError::MechanismParamInvalid, Function::EncryptInit)
    );

    let mut iv = [0u8; 12];
    let ct = encrypt(&s, fx.key, &mut iv).unwrap();
    assert_ne!(iv, [0u8; 12], "the module wrote its IV into pIv");
    assert_eq!(ct.len(), PT.len() + 16);
    assert_eq!(decrypt(&s, fx.key, &iv, &ct).unwrap(), PT);

    let mut iv2 = [0u8; 12];
    encrypt(&s, fx.key, &mut iv2).unwrap();
    assert_ne!(iv, iv2, "a fresh IV per operation");
}

#[test]
fn hsm_appended() {
    let Some((fx, s)) = start() else { return };
    set(fx, json!({"iv_mode": "hsm_appended"}));
    let mut iv = [9u8; 12];
    let e = encrypt(&s, fx.key, &mut iv).unwrap_err();
    assert_eq!(
        rv_of(e),
        expected(RvError::MechanismParamInvalid, Function::EncryptInit)
    );

    let mut iv = [0u8; 12];
    let out = encrypt(&s, fx.key, &mut iv).unwrap();
    assert_eq!(iv, [0u8; 12], "pIv stays zero in appended mode");
    assert_eq!(out.len(), PT.len() + 16 + 12);
    let (ct, tail) = out.split_at(out.len() - 12);
    let used: [u8; 12] = tail.try_into().unwrap();
    assert_ne!(used, [0u8; 12]);
    assert_eq!(decrypt(&s, fx.key, &used, ct).unwrap(), PT);
}

#[test]
fn overwrite_silently() {
    let Some((fx, s)) = start() else { return };
    set(fx, json!({"iv_mode": "overwrite_silently"}));
    let mine = [5u8; 12];
    let mut iv = mine;
    let ct = encrypt(&s, fx.key, &mut iv).unwrap();
    assert_ne!(iv, mine, "the caller's IV was replaced");
    assert!(
        decrypt(&s, fx.key, &mine, &ct).is_err(),
        "not encrypted under the caller's IV"
    );
    assert_eq!(decrypt(&s, fx.key, &iv, &ct).unwrap(), PT);
}

#[test]
fn injected_device_error_then_success() {
    let Some((fx, s)) = start() else { return };
    set(
        fx,
        json!({"inject": [{"functions": ["C_Encrypt"], "rv": "CKR_DEVICE_ERROR", "count": 2}]}),
    );
    for _ in 0..2 {
        let mut iv = [3u8; 12];
        let e = encrypt(&s, fx.key, &mut iv).unwrap_err();
        assert_eq!(rv_of(e), expected(RvError::DeviceError, Function::Encrypt));
    }
    // Same session: the failed calls ended the real operation too.
    let mut iv = [3u8; 12];
    let ct = encrypt(&s, fx.key, &mut iv).unwrap();
    assert_eq!(decrypt(&s, fx.key, &iv, &ct).unwrap(), PT);
    let got = control(fx, &json!({"get": true}));
    assert_eq!(got["behaviour"]["inject"][0]["count"], json!(0));
}

#[test]
fn decrypt_failure_relabelled() {
    let Some((fx, s)) = start() else { return };
    let mut iv = [4u8; 12];
    let mut ct = encrypt(&s, fx.key, &mut iv).unwrap();
    let last = ct.len() - 1;
    ct[last] ^= 1;
    let (plain_rv, _) = rv_of(decrypt(&s, fx.key, &iv, &ct).unwrap_err());
    assert_ne!(plain_rv, RvError::UnknownErrorCode(0x42));

    set(fx, json!({"decrypt_failure_rv": "CKR_AEAD_DECRYPT_FAILED"}));
    let e = decrypt(&s, fx.key, &iv, &ct).unwrap_err();
    assert_eq!(
        rv_of(e),
        expected(RvError::UnknownErrorCode(0x42), Function::Decrypt)
    );
    ct[last] ^= 1;
    assert_eq!(
        decrypt(&s, fx.key, &iv, &ct).unwrap(),
        PT,
        "good tags still pass"
    );
}

#[test]
fn counters_over_the_socket() {
    let Some((fx, s)) = start() else { return };
    assert_eq!(
        control(fx, &json!({"reset_counters": true})),
        json!({"ok": true})
    );
    let mut iv = [6u8; 12];
    let ct = encrypt(&s, fx.key, &mut iv).unwrap();
    decrypt(&s, fx.key, &iv, &ct).unwrap();
    let c = control(fx, &json!({"counters": true}));
    assert_eq!(c["ok"], json!(true));
    // cryptoki asks for the length first, then encrypts.
    assert_eq!(c["counters"]["C_EncryptInit"], json!(1));
    assert_eq!(c["counters"]["C_Encrypt"], json!(2));
    assert_eq!(c["counters"]["C_DecryptInit"], json!(1));
    assert_eq!(c["counters"]["C_Decrypt"], json!(2));
    assert!(
        c["counters"].get("C_Sign").is_none(),
        "uncalled functions omitted"
    );

    // several requests on one connection, and errors leave things alone
    let mut conn = UnixStream::connect(&fx.socket).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut ask = |req: &str| {
        writeln!(conn, "{req}").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        serde_json::from_str::<Value>(&line).unwrap()
    };
    assert_eq!(ask(r#"{"set": {"latency_us": 10}}"#), json!({"ok": true}));
    assert_eq!(
        ask(r#"{"patch": {"iv_mode": "hsm_appended"}}"#),
        json!({"ok": true})
    );
    let bad = ask(r#"{"patch": {"latency_us": 1, "lag": 3}}"#);
    assert_eq!(bad["ok"], json!(false));
    assert!(bad["error"].as_str().unwrap().contains("lag"));
    assert_eq!(ask("not json")["ok"], json!(false));
    let got = ask(r#"{"get": true}"#);
    assert_eq!(got["behaviour"]["latency_us"], json!(10));
    assert_eq!(got["behaviour"]["iv_mode"], json!("hsm_appended"));
    assert_eq!(ask(r#"{"set": {}}"#), json!({"ok": true}));
}

#[test]
fn forever_hang_released_by_set() {
    let Some((fx, s)) = start() else { return };
    set(
        fx,
        json!({"hang": {"forever": true, "functions": ["C_Encrypt"]}}),
    );
    let pkcs11 = fx.pkcs11.clone();
    let key = fx.key;
    let slot = s.get_session_info().unwrap().slot_id();
    let held = std::thread::spawn(move || {
        let s = pkcs11.open_rw_session(slot).unwrap();
        let mut iv = [8u8; 12];
        let first = encrypt(&s, key, &mut iv).map_err(rv_of);
        // the failed call ended the operation: the session is usable again
        let mut iv = [8u8; 12];
        let second = encrypt(&s, key, &mut iv).map(|ct| ct.len());
        (first, second.map_err(rv_of))
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!held.is_finished(), "C_Encrypt must be held by the hang");
    // other functions are not held
    let e = decrypt(&s, fx.key, &[0u8; 12], &[0u8; 40]);
    assert!(e.is_err(), "a bad tag, answered at once");

    set(fx, json!({}));
    let (first, second) = held.join().unwrap();
    assert_eq!(
        first.unwrap_err(),
        expected(RvError::DeviceError, Function::Encrypt)
    );
    assert_eq!(second.unwrap(), PT.len() + 16);
}

/// Whether `module` offers a 3.x "PKCS 11" interface of its own.
fn offers_v3(module: &Path) -> bool {
    // SAFETY: PKCS#11 3.0 symbol type; the module is already loaded.
    unsafe {
        let Ok(l) = libloading::Library::new(module) else {
            return false;
        };
        let Ok(gi) = l.get::<GetInterface>(b"C_GetInterface\0") else {
            return false;
        };
        let mut p: *mut cryptoki_sys::CK_INTERFACE = std::ptr::null_mut();
        let mut name = *b"PKCS 11\0";
        if gi(name.as_mut_ptr(), std::ptr::null_mut(), &mut p, 0) != 0 || p.is_null() {
            return false;
        }
        let list = (*p).pFunctionList as *const cryptoki_sys::CK_FUNCTION_LIST;
        !list.is_null() && (*list).version.major >= 3
    }
}

type GetInterface = unsafe extern "C" fn(
    *mut u8,
    *mut cryptoki_sys::CK_VERSION,
    *mut *mut cryptoki_sys::CK_INTERFACE,
    cryptoki_sys::CK_FLAGS,
) -> cryptoki_sys::CK_RV;
type GetInterfaceList = unsafe extern "C" fn(
    *mut cryptoki_sys::CK_INTERFACE,
    *mut cryptoki_sys::CK_ULONG,
) -> cryptoki_sys::CK_RV;

#[test]
fn interfaces_follow_the_real_module() {
    let Some((_fx, _s)) = start() else { return };
    let v3 = offers_v3(&real_module());
    let lib = find_lib().unwrap();
    // SAFETY: the same library cryptoki already loaded; symbol types as in
    // PKCS#11 3.0.
    unsafe {
        let l = libloading::Library::new(&lib).unwrap();
        let gi: libloading::Symbol<GetInterface> = l.get(b"C_GetInterface\0").unwrap();
        let mut p: *mut cryptoki_sys::CK_INTERFACE = std::ptr::null_mut();
        assert_eq!(gi(std::ptr::null_mut(), std::ptr::null_mut(), &mut p, 0), 0);
        assert!(!p.is_null());
        let list = (*p).pFunctionList as *const cryptoki_sys::CK_FUNCTION_LIST_3_0;
        let mut want3 = cryptoki_sys::CK_VERSION { major: 3, minor: 0 };
        let mut p3: *mut cryptoki_sys::CK_INTERFACE = std::ptr::null_mut();
        let rv3 = gi(std::ptr::null_mut(), &mut want3, &mut p3, 0);
        let gil: libloading::Symbol<GetInterfaceList> = l.get(b"C_GetInterfaceList\0").unwrap();
        let mut n: cryptoki_sys::CK_ULONG = 0;
        assert_eq!(gil(std::ptr::null_mut(), &mut n), 0);
        if v3 {
            assert_eq!(((*list).version.major, (*list).version.minor), (3, 0));
            assert!((*list).C_MessageEncryptInit.is_some());
            assert_eq!(rv3, 0);
            assert_eq!(n, 2, "3.0 and 2.40");
        } else {
            assert_eq!((*list).version.major, 2, "a 2.40-only module stays 2.40");
            assert_ne!(rv3, 0, "no 3.0 interface over a 2.40 module");
            assert_eq!(n, 1);
        }
    }
}
