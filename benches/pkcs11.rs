//! Criterion benches of AES-256-GCM on a SoftHSM v2 token (32-byte plaintext, 35-byte AAD):
//! - `pkcs11/raw_cryptoki_encrypt` and `raw_cryptoki_decrypt`: the floor. One logged-in session,
//!   a cached key handle, `C_EncryptInit`+`C_Encrypt` straight through `cryptoki` on this thread.
//! - `pkcs11/backend_encrypt` and `backend_decrypt`: the same through the proxy's PKCS#11 key store
//!   (session pool threads, bounded queue, key cache, IVs from the HSM's RNG).
//!
//! The bench makes its own token with `hsm-config/create-softhsm-token.sh` in a temporary directory
//! and re-runs itself with `SOFTHSM2_CONF` pointing there. Without SoftHSM it prints why and exits.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use criterion::{Criterion, Throughput};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::{AuthPin, Ulong};
use xks_proxy::keystore::pkcs11::{Pkcs11Settings, Pkcs11Tokens};
use xks_proxy::keystore::{KeyId, KeyStore};
use zeroize::Zeroizing;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "1234";
const TOKEN: &str = "xks-proxy";

fn main() {
    if std::env::var_os("XKS_BENCH_SOFTHSM_CONF").is_none() {
        if !Path::new(MODULE).exists() {
            eprintln!(
                "skipping PKCS#11 benches: {MODULE} not found (apt-get install softhsm2 opensc)"
            );
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/hsm-config/create-softhsm-token.sh"
        );
        let made = Command::new(script)
            .arg(dir.path())
            .arg(TOKEN)
            .arg(PIN)
            .output()
            .expect("run script");
        if !made.status.success() {
            eprintln!(
                "skipping PKCS#11 benches: {}",
                String::from_utf8_lossy(&made.stderr)
            );
            return;
        }
        let conf = dir.path().join("softhsm2.conf");
        let status = Command::new(std::env::current_exe().expect("bench path"))
            .args(std::env::args_os().skip(1))
            .env("SOFTHSM2_CONF", &conf)
            .env("XKS_BENCH_SOFTHSM_CONF", &conf)
            .status()
            .expect("re-run the bench");
        std::process::exit(status.code().unwrap_or(1));
    }
    let mut criterion = Criterion::default().configure_from_args();
    raw_cryptoki(&mut criterion);
    backend(&mut criterion);
    criterion.final_summary();
}

fn raw_cryptoki(c: &mut Criterion) {
    let pkcs11 = Pkcs11::new(MODULE).expect("load SoftHSM");
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
                .is_ok_and(|t| t.label().trim() == TOKEN)
        })
        .expect("the bench token");
    let session = pkcs11.open_rw_session(slot).expect("session");
    session
        .login(UserType::User, Some(&AuthPin::new(PIN.into())))
        .expect("login");
    let key = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(b"foo".to_vec()),
        ])
        .expect("find foo")[0];
    let plaintext = [7u8; 32];
    let aad = [9u8; 35];
    let mut counter = 0u64;
    let mut group = c.benchmark_group("pkcs11");
    group.throughput(Throughput::Elements(1));
    group.bench_function("raw_cryptoki_encrypt", |b| {
        b.iter(|| {
            counter += 1;
            let mut iv = [0u8; 12];
            iv[..8].copy_from_slice(&counter.to_be_bytes());
            let params = GcmParams::new(&mut iv, &aad, Ulong::from(128u64)).unwrap();
            session
                .encrypt(&Mechanism::AesGcm(params), key, &plaintext)
                .unwrap()
        })
    });
    let mut iv = [1u8; 12];
    let sealed = {
        let params = GcmParams::new(&mut iv, &aad, Ulong::from(128u64)).unwrap();
        session
            .encrypt(&Mechanism::AesGcm(params), key, &plaintext)
            .unwrap()
    };
    group.bench_function("raw_cryptoki_decrypt", |b| {
        b.iter(|| {
            let mut iv = [1u8; 12];
            let params = GcmParams::new(&mut iv, &aad, Ulong::from(128u64)).unwrap();
            session
                .decrypt(&Mechanism::AesGcm(params), key, &sealed)
                .unwrap()
        })
    });
    group.finish();
}

fn backend(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let text = format!("module = {MODULE:?}\ntoken_label = {TOKEN:?}\npin = {PIN:?}\n");
    let mut settings: Pkcs11Settings = toml::from_str(&text).expect("settings");
    settings.validate(Path::new(".")).expect("valid settings");
    let store: Arc<dyn KeyStore> = Pkcs11Tokens::default().open(&settings).expect("open token");
    let key = KeyId::parse("foo").unwrap();
    let aad = vec![9u8; 35];
    let mut group = c.benchmark_group("pkcs11");
    group.throughput(Throughput::Elements(1));
    group.bench_function("backend_encrypt", |b| {
        b.iter(|| {
            runtime
                .block_on(store.encrypt(&key, Zeroizing::new(vec![7u8; 32]), aad.clone()))
                .unwrap()
        })
    });
    let sealed = runtime
        .block_on(store.encrypt(&key, Zeroizing::new(vec![7u8; 32]), aad.clone()))
        .unwrap();
    group.bench_function("backend_decrypt", |b| {
        b.iter(|| {
            runtime
                .block_on(store.decrypt(&key, sealed.clone(), aad.clone()))
                .unwrap()
        })
    });
    group.finish();
}
