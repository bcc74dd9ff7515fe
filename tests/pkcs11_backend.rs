//! The PKCS#11 backend against a real token (no mocks): SoftHSM v2 by default, Kryoptic with
//! `XKS_PKCS11_TEST_TOKEN=kryoptic` (`scripts/test` runs this binary both ways).
//!
//! One token set is created per test binary (the module reads its configuration, `SOFTHSM2_CONF`
//! or `KRYOPTIC_CONF`, once, at `C_Initialize`) by `hsm-config/create-softhsm-token.sh` or
//! `create-kryoptic-token.sh` in a temporary directory; tests use distinct key labels. The module
//! and the tools are found as every other test finds them (`tests/common`): without one the tests
//! are skipped, unless `CI`, `XKS_REQUIRE_SOFTHSM=1` or `XKS_REQUIRE_TOOLS=1` is set, in which case
//! they fail.
// Each test holds its share of the token lock (`TOKEN_USE`) for its whole run, awaits included:
// every test has its own thread and runtime, so blocking on it only orders tests.
#![allow(clippy::await_holding_lock)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use aes_gcm::aead::consts::U16;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::aes::Aes256;
use aes_gcm::{AesGcm, Nonce, Tag};
use common::{kryoptic_module, required_tool, softhsm_module};
use xks_proxy::keystore::pkcs11::{Pkcs11KeyStore, Pkcs11Settings, Pkcs11Tokens};
use xks_proxy::keystore::software::SoftwareKeyStore;
use xks_proxy::keystore::{
    CryptoOp, EkmHealth, KeyId, KeyState, KeyStore, KeyStoreError, KeyUsage, Sealed,
};
use zeroize::Zeroizing;

const TOKEN: &str = "xks-proxy";
const OTHER_TOKEN: &str = "xks-other";
const PIN: &str = "1234";
const KNOWN_KEY: [u8; 32] = *b"0123456789abcdef0123456789ABCDEF";

struct Fixture {
    dir: PathBuf,
    module: PathBuf,
    kind: TokenKind,
}

/// Which soft token the binary runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    SoftHsm,
    Kryoptic,
}

impl TokenKind {
    fn chosen() -> Self {
        match std::env::var("XKS_PKCS11_TEST_TOKEN").as_deref() {
            Ok("kryoptic") => TokenKind::Kryoptic,
            _ => TokenKind::SoftHsm,
        }
    }

    /// What the token reports as its manufacturer and model.
    fn vendor(self) -> &'static str {
        match self {
            TokenKind::SoftHsm => "SoftHSM",
            TokenKind::Kryoptic => "Kryoptic",
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The chosen module (as `tests/common` finds it) and the tools the token scripts use; `None`
/// (skipped) when one is missing where dependencies are not required.
fn dependencies() -> Option<(TokenKind, PathBuf)> {
    let kind = TokenKind::chosen();
    let module = match kind {
        TokenKind::SoftHsm => {
            required_tool("softhsm2-util", "apt-get install softhsm2")?;
            softhsm_module()?
        }
        TokenKind::Kryoptic => kryoptic_module()?,
    };
    required_tool("pkcs11-tool", "apt-get install opensc")?;
    required_tool("python3", "apt-get install python3")?;
    Some((kind, module))
}

fn setup(kind: TokenKind, module: PathBuf) -> Result<Fixture, String> {
    match kind {
        TokenKind::SoftHsm => setup_softhsm(module),
        TokenKind::Kryoptic => setup_kryoptic(module),
    }
}

/// Two Kryoptic tokens (slots 1 and 2) in one configuration, and the known key on the first.
fn setup_kryoptic(module: PathBuf) -> Result<Fixture, String> {
    let dir = tempfile::Builder::new()
        .prefix("xks-kryoptic-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hsm-config/create-kryoptic-token.sh");
    let mut slots = String::new();
    for (slot, label) in [(1, TOKEN), (2, OTHER_TOKEN)] {
        let token_dir = dir.join(label);
        run(Command::new(&script)
            .arg(&token_dir)
            .arg(label)
            .arg(PIN)
            .env("KRYOPTIC_MODULE", &module))?;
        slots.push_str(&format!(
            "[[slots]]\nslot = {slot}\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n",
            token_dir.join("token.sql").display()
        ));
    }
    let conf = dir.join("kryoptic.conf");
    std::fs::write(&conf, slots).map_err(|e| e.to_string())?;
    import_known_key(&module, ("KRYOPTIC_CONF", &conf), &dir)?;
    // SAFETY: as in setup_softhsm.
    unsafe { std::env::set_var("KRYOPTIC_CONF", &conf) };
    Ok(Fixture {
        dir,
        module,
        kind: TokenKind::Kryoptic,
    })
}

/// Writes [`KNOWN_KEY`] to the first token as a private, sensitive key labelled `known-key`, for
/// interoperability with the software key store.
fn import_known_key(module: &Path, conf: (&str, &Path), dir: &Path) -> Result<(), String> {
    let key_file = dir.join("known.key");
    std::fs::write(&key_file, KNOWN_KEY).map_err(|e| e.to_string())?;
    run(Command::new("pkcs11-tool")
        .env(conf.0, conf.1)
        .args(["--module"])
        .arg(module)
        .args([
            "--token-label",
            TOKEN,
            "--login",
            "--pin",
            PIN,
            "--write-object",
        ])
        .arg(&key_file)
        .args([
            "--type",
            "secrkey",
            "--key-type",
            "AES:32",
            "--label",
            "known-key",
            "--private",
            "--sensitive",
        ]))?;
    std::fs::remove_file(&key_file).map_err(|e| e.to_string())
}

fn setup_softhsm(module: PathBuf) -> Result<Fixture, String> {
    let dir = tempfile::Builder::new()
        .prefix("xks-softhsm-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hsm-config/create-softhsm-token.sh");
    for label in [TOKEN, OTHER_TOKEN] {
        run(Command::new(&script)
            .arg(&dir)
            .arg(label)
            .arg(PIN)
            .env("SOFTHSM2_MODULE", &module))?;
    }
    let conf = dir.join("softhsm2.conf");
    import_known_key(&module, ("SOFTHSM2_CONF", &conf), &dir)?;
    // SAFETY: runs once, inside the OnceLock initializer that every test waits on before it
    // touches the module, so no other thread of this test binary reads the environment meanwhile.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
    Ok(Fixture {
        dir,
        module,
        kind: TokenKind::SoftHsm,
    })
}

/// Tests share one token. Tests that drop the session pool (as a lost device would) or create token
/// objects take it exclusively: SoftHSM 2.6 intermittently fails C_GenerateKey with
/// CKR_GENERAL_ERROR while other threads of the same process read the token (seen here in about
/// one run in four). Creating keys is an operator's command, never on the request path.
static TOKEN_USE: RwLock<()> = RwLock::new(());

/// The shared token for a test, or `None` (test skipped) when SoftHSM is not installed.
fn fixture() -> Option<(&'static Fixture, RwLockReadGuard<'static, ()>)> {
    let f = token()?;
    Some((f, TOKEN_USE.read().unwrap_or_else(|e| e.into_inner())))
}

/// The shared token, used alone.
fn fixture_exclusive() -> Option<(&'static Fixture, RwLockWriteGuard<'static, ()>)> {
    let f = token()?;
    Some((f, TOKEN_USE.write().unwrap_or_else(|e| e.into_inner())))
}

/// The shared token set, or `None` (test skipped) when the module or a tool is missing where
/// dependencies are not required. A token that cannot be made with everything present is a
/// failure.
fn token() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Result<Fixture, String>>> = OnceLock::new();
    let made = FIXTURE.get_or_init(|| {
        let (kind, module) = dependencies()?;
        Some(setup(kind, module))
    });
    match made.as_ref()? {
        Ok(f) => Some(f),
        Err(why) => panic!("the PKCS#11 test token could not be made: {why}"),
    }
}

fn settings(f: &Fixture, extra: &str) -> Pkcs11Settings {
    let text = format!(
        "module = {:?}\npin = {PIN:?}\n{extra}\n",
        f.module.display().to_string()
    );
    let text = if extra.contains("token_label") || extra.contains("slot") {
        text
    } else {
        format!("token_label = {TOKEN:?}\n{text}")
    };
    let mut s: Pkcs11Settings = toml::from_str(&text).expect("test settings parse");
    s.validate(&f.dir).expect("test settings are valid");
    s
}

fn open(f: &Fixture, extra: &str) -> Arc<Pkcs11KeyStore> {
    Pkcs11Tokens::default()
        .open_pkcs11(&settings(f, extra))
        .expect("open the test token")
}

fn id(s: &str) -> KeyId {
    KeyId::parse(s).expect("valid key id")
}

fn pt(bytes: &[u8]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(bytes.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_decrypt_round_trip_with_aad() {
    let Some((f, _token)) = fixture() else { return };
    let store = open(f, "");
    let foo = id("foo");
    let plaintext = vec![0x5a; 4300];
    let aad = b"\x00\x05hello\x01m".to_vec();
    let sealed = store
        .encrypt(&foo, pt(&plaintext), aad.clone())
        .await
        .unwrap();
    assert_eq!(sealed.iv.len(), 12);
    assert_eq!(sealed.ciphertext.len(), plaintext.len());
    assert_ne!(sealed.ciphertext, plaintext);
    let again = store
        .encrypt(&foo, pt(&plaintext), aad.clone())
        .await
        .unwrap();
    assert_ne!(again.iv, sealed.iv, "IVs must never repeat");
    let back = store.decrypt(&foo, sealed, aad).await.unwrap();
    assert_eq!(back.as_slice(), plaintext.as_slice());
    // Empty plaintext and empty AAD work too.
    let sealed = store.encrypt(&foo, pt(b""), vec![0, 0, 0]).await.unwrap();
    assert!(
        store
            .decrypt(&foo, sealed, vec![0, 0, 0])
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interoperates_with_software_store_and_16_byte_ivs() {
    let Some((f, _token)) = fixture() else { return };
    let store = open(f, "");
    let known = id("known-key");
    let soft_dir = tempfile::tempdir().unwrap();
    let soft = SoftwareKeyStore::open(&soft_dir.path().join("keys.json")).unwrap();
    soft.import_key(&known, KeyUsage::BOTH, &KNOWN_KEY).unwrap();
    let aad = b"\x00\x03abc\x00".to_vec();

    // HSM -> software.
    let sealed = store
        .encrypt(&known, pt(b"from the HSM"), aad.clone())
        .await
        .unwrap();
    let back = soft.decrypt(&known, sealed, aad.clone()).await.unwrap();
    assert_eq!(back.as_slice(), b"from the HSM");

    // Software -> HSM.
    let sealed = soft
        .encrypt(&known, pt(b"from software"), aad.clone())
        .await
        .unwrap();
    let back = store.decrypt(&known, sealed, aad.clone()).await.unwrap();
    assert_eq!(back.as_slice(), b"from software");

    // A 16-byte IV (GCM's GHASH-the-IV path), made with RustCrypto.
    let cipher = AesGcm::<Aes256, U16>::new((&KNOWN_KEY).into());
    let iv = [7u8; 16];
    let mut buffer = b"sixteen byte iv".to_vec();
    let tag: Tag = cipher
        .encrypt_in_place_detached(Nonce::<U16>::from_slice(&iv), &aad, &mut buffer)
        .unwrap();
    let sealed = Sealed {
        iv: iv.to_vec(),
        ciphertext: buffer,
        tag: tag.into(),
    };
    let back = store
        .decrypt(&known, sealed.clone(), aad.clone())
        .await
        .unwrap();
    assert_eq!(back.as_slice(), b"sixteen byte iv");
    let back = soft.decrypt(&known, sealed, aad).await.unwrap();
    assert_eq!(back.as_slice(), b"sixteen byte iv");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_matrix() {
    let Some((f, _token)) = fixture() else { return };
    let store = open(f, "");
    let info = store.key_info(&id("foo")).await.unwrap();
    assert_eq!(
        (info.usage, info.state),
        (KeyUsage::BOTH, KeyState::Enabled)
    );

    let enc = id("encrypt_only_key");
    let info = store.key_info(&enc).await.unwrap();
    assert_eq!(
        info.usage,
        KeyUsage {
            encrypt: true,
            decrypt: false
        }
    );
    let sealed = store.encrypt(&enc, pt(b"x"), vec![]).await.unwrap();
    assert!(matches!(
        store.decrypt(&enc, sealed.clone(), vec![]).await,
        Err(KeyStoreError::UsageNotPermitted(CryptoOp::Decrypt))
    ));

    let dec = id("decrypt_only_key");
    let info = store.key_info(&dec).await.unwrap();
    assert_eq!(
        info.usage,
        KeyUsage {
            encrypt: false,
            decrypt: true
        }
    );
    assert!(matches!(
        store.encrypt(&dec, pt(b"x"), vec![]).await,
        Err(KeyStoreError::UsageNotPermitted(CryptoOp::Encrypt))
    ));
    // Allowed to decrypt, but this ciphertext was made with another key.
    assert!(matches!(
        store.decrypt(&dec, sealed.clone(), vec![]).await,
        Err(KeyStoreError::AuthenticationFailed)
    ));

    let none = id("impotent_key");
    assert_eq!(
        store.key_info(&none).await.unwrap().usage,
        KeyUsage::default()
    );
    assert!(matches!(
        store.encrypt(&none, pt(b"x"), vec![]).await,
        Err(KeyStoreError::UsageNotPermitted(CryptoOp::Encrypt))
    ));
    assert!(matches!(
        store.decrypt(&none, sealed, vec![]).await,
        Err(KeyStoreError::UsageNotPermitted(CryptoOp::Decrypt))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_and_enable_persist_on_the_token() {
    let Some((f, _token)) = fixture_exclusive() else {
        return;
    };
    let store = open(f, "");
    let key = id("state-key");
    store.create_key(&key, KeyUsage::BOTH).await.unwrap();
    let sealed = store.encrypt(&key, pt(b"state"), vec![]).await.unwrap();

    let info = store.set_state(&key, KeyState::Disabled).await.unwrap();
    assert_eq!(info.state, KeyState::Disabled);
    assert!(matches!(
        store.encrypt(&key, pt(b"x"), vec![]).await,
        Err(KeyStoreError::KeyDisabled)
    ));
    assert!(matches!(
        store.decrypt(&key, sealed.clone(), vec![]).await,
        Err(KeyStoreError::KeyDisabled)
    ));

    // A fresh registry: new login, new pool, empty cache; the state comes from the token.
    let fresh = open(f, "");
    assert_eq!(
        fresh.key_info(&key).await.unwrap().state,
        KeyState::Disabled
    );
    let listed = fresh.list_keys().await.unwrap();
    let entry = listed.iter().find(|k| k.id == key).expect("listed");
    assert_eq!(entry.state, KeyState::Disabled);

    fresh.set_state(&key, KeyState::Enabled).await.unwrap();
    let again = open(f, "");
    assert_eq!(again.key_info(&key).await.unwrap().state, KeyState::Enabled);
    let back = again.decrypt(&key, sealed, vec![]).await.unwrap();
    assert_eq!(back.as_slice(), b"state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_and_allow_list() {
    let Some((f, _token)) = fixture() else { return };
    let store = open(f, "");
    let missing = id("no-such-key");
    assert!(matches!(
        store.key_info(&missing).await,
        Err(KeyStoreError::KeyNotFound)
    ));
    assert!(matches!(
        store.encrypt(&missing, pt(b"x"), vec![]).await,
        Err(KeyStoreError::KeyNotFound)
    ));
    assert!(matches!(
        store.set_state(&missing, KeyState::Disabled).await,
        Err(KeyStoreError::KeyNotFound)
    ));
    let all = store.list_keys().await.unwrap();
    for expected in [
        "foo",
        "encrypt_only_key",
        "decrypt_only_key",
        "impotent_key",
    ] {
        assert!(
            all.iter().any(|k| k.id.as_str() == expected),
            "{expected} listed"
        );
    }

    let limited = open(f, r#"keys = ["foo", "impotent_key"]"#);
    assert!(limited.key_info(&id("foo")).await.is_ok());
    assert!(matches!(
        limited.key_info(&id("encrypt_only_key")).await,
        Err(KeyStoreError::KeyNotFound)
    ));
    assert!(matches!(
        limited
            .encrypt(&id("encrypt_only_key"), pt(b"x"), vec![])
            .await,
        Err(KeyStoreError::KeyNotFound)
    ));
    assert!(matches!(
        limited.create_key(&id("not-allowed"), KeyUsage::BOTH).await,
        Err(KeyStoreError::KeyNotFound)
    ));
    let ids: Vec<String> = limited
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id.to_string())
        .collect();
    assert_eq!(ids, vec!["foo".to_string(), "impotent_key".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_fails_authentication() {
    let Some((f, _token)) = fixture() else { return };
    let store = open(f, "");
    let foo = id("foo");
    let aad = b"\x00\x02ok\x00".to_vec();
    let sealed = store
        .encrypt(&foo, pt(b"do not touch"), aad.clone())
        .await
        .unwrap();

    let mut bad = sealed.clone();
    bad.ciphertext[0] ^= 1;
    assert!(matches!(
        store.decrypt(&foo, bad, aad.clone()).await,
        Err(KeyStoreError::AuthenticationFailed)
    ));
    let mut bad = sealed.clone();
    bad.tag[15] ^= 0x80;
    assert!(matches!(
        store.decrypt(&foo, bad, aad.clone()).await,
        Err(KeyStoreError::AuthenticationFailed)
    ));
    let mut bad = sealed.clone();
    bad.iv[0] ^= 1;
    assert!(matches!(
        store.decrypt(&foo, bad, aad.clone()).await,
        Err(KeyStoreError::AuthenticationFailed)
    ));
    assert!(matches!(
        store
            .decrypt(&foo, sealed.clone(), b"\x00\x02oK\x00".to_vec())
            .await,
        Err(KeyStoreError::AuthenticationFailed)
    ));
    let mut bad = sealed.clone();
    bad.iv.truncate(8);
    assert!(matches!(
        store.decrypt(&foo, bad, aad.clone()).await,
        Err(KeyStoreError::AuthenticationFailed)
    ));
    // The sessions are still fine afterwards.
    let back = store.decrypt(&foo, sealed, aad).await.unwrap();
    assert_eq!(back.as_slice(), b"do not touch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_operations_are_all_correct() {
    let Some((f, _token)) = fixture() else { return };
    // Generous limits: this test is about correctness under concurrency, not about latency.
    let store = open(
        f,
        "call_timeout_ms = 30000\nqueue_depth = 1024\nsession_pool_size = 4",
    );
    let mut tasks = Vec::new();
    for t in 0..64u32 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let foo = id("foo");
            for i in 0..50u32 {
                let message = format!("task {t} op {i}");
                let aad = format!("aad {t}/{i}").into_bytes();
                let sealed = store
                    .encrypt(&foo, pt(message.as_bytes()), aad.clone())
                    .await
                    .unwrap();
                let back = store.decrypt(&foo, sealed, aad).await.unwrap();
                assert_eq!(back.as_slice(), message.as_bytes());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_pool_is_re_established() {
    let Some((f, _token)) = fixture_exclusive() else {
        return;
    };
    let store = open(f, "session_pool_size = 2");
    let foo = id("foo");
    let sealed = store.encrypt(&foo, pt(b"before"), vec![]).await.unwrap();
    store.drop_session_pool();
    let back = store.decrypt(&foo, sealed, vec![]).await.unwrap();
    assert_eq!(back.as_slice(), b"before");
    store.drop_session_pool();
    let health = store.check_health().await;
    assert_eq!(
        health[0].health,
        EkmHealth::Active,
        "{:?}",
        health[0].detail
    );
    let sealed = store.encrypt(&foo, pt(b"after"), vec![]).await.unwrap();
    assert_eq!(
        store
            .decrypt(&foo, sealed, vec![])
            .await
            .unwrap()
            .as_slice(),
        b"after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_keys_are_usable() {
    let Some((f, _token)) = fixture_exclusive() else {
        return;
    };
    let store = open(f, "");
    let key = id("created-key");
    let info = store.create_key(&key, KeyUsage::BOTH).await.unwrap();
    assert_eq!(
        (info.usage, info.state),
        (KeyUsage::BOTH, KeyState::Enabled)
    );
    assert!(matches!(
        store.create_key(&key, KeyUsage::BOTH).await,
        Err(KeyStoreError::KeyExists)
    ));
    let sealed = store.encrypt(&key, pt(b"new key"), vec![1]).await.unwrap();
    assert_eq!(
        store
            .decrypt(&key, sealed, vec![1])
            .await
            .unwrap()
            .as_slice(),
        b"new key"
    );

    let enc = id("created-encrypt-only");
    store
        .create_key(
            &enc,
            KeyUsage {
                encrypt: true,
                decrypt: false,
            },
        )
        .await
        .unwrap();
    // Read back from the token by a fresh registry, not from this store's cache.
    let info = open(f, "").key_info(&enc).await.unwrap();
    assert_eq!(
        info.usage,
        KeyUsage {
            encrypt: true,
            decrypt: false
        }
    );
    let sealed = store.encrypt(&enc, pt(b"x"), vec![]).await.unwrap();
    assert!(matches!(
        store.decrypt(&enc, sealed, vec![]).await,
        Err(KeyStoreError::UsageNotPermitted(CryptoOp::Decrypt))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_active_and_describes_the_token() {
    let Some((f, _token)) = fixture_exclusive() else {
        return;
    };
    let store = open(f, "");
    let health = store.check_health().await;
    assert_eq!(health.len(), 1);
    assert_eq!(
        health[0].health,
        EkmHealth::Active,
        "{:?}",
        health[0].detail
    );
    assert_eq!(health[0].id, TOKEN);
    let vendor = f.kind.vendor();
    assert!(health[0].model.contains(vendor), "{}", health[0].model);
    let description = store.describe();
    assert_eq!(description.kind, "pkcs11");
    assert!(
        description.ekm_vendor.contains(vendor),
        "{}",
        description.ekm_vendor
    );

    // A missing health-check key is generated at open.
    let store = open(f, r#"health_key = "generated-health-key""#);
    let health = store.check_health().await;
    assert_eq!(
        health[0].health,
        EkmHealth::Active,
        "{:?}",
        health[0].detail
    );
}

#[test]
fn open_errors_name_the_setting() {
    let Some((f, _token)) = fixture() else { return };
    let err = |extra: &str| match Pkcs11Tokens::default().open(&settings(f, extra)) {
        Ok(_) => panic!("open with {extra:?} should fail"),
        Err(e) => e,
    };
    let e = err("token_label = \"no-such-token\"");
    assert!(
        e.starts_with("pkcs11.token_label: no token labelled \"no-such-token\""),
        "{e}"
    );
    assert!(e.contains("\"xks-proxy\""), "lists the tokens present: {e}");

    let e = err("slot = 424242");
    assert!(e.starts_with("pkcs11.slot: "), "{e}");

    let mut s = settings(f, &format!("token_label = {OTHER_TOKEN:?}"));
    s.pin = Some(Zeroizing::new("0000".into()));
    let e = match Pkcs11Tokens::default().open(&s) {
        Ok(_) => panic!("a wrong PIN should fail"),
        Err(e) => e,
    };
    assert!(
        e.starts_with("pkcs11.pin: ") && e.contains("wrong PIN"),
        "{e}"
    );
    assert!(!e.contains("0000"));

    let mut s = settings(f, "");
    s.module = PathBuf::from("/nonexistent/libnothing.so");
    let e = match Pkcs11Tokens::default().open(&s) {
        Ok(_) => panic!("a bad module should fail"),
        Err(e) => e,
    };
    assert!(
        e.starts_with("pkcs11.module: cannot load /nonexistent/libnothing.so"),
        "{e}"
    );

    let mut s = settings(f, "");
    s.pin = None;
    s.pin_env = Some("XKS_TEST_PIN_THAT_IS_NOT_SET".into());
    let e = match Pkcs11Tokens::default().open(&s) {
        Ok(_) => panic!("an unset PIN variable should fail"),
        Err(e) => e,
    };
    assert!(e.starts_with("pkcs11.pin_env: "), "{e}");
}

#[test]
fn settings_validation() {
    let base = Path::new("/etc/xks");
    let parse = |text: &str| -> Result<Pkcs11Settings, String> {
        let mut s: Pkcs11Settings = toml::from_str(text).map_err(|e| e.to_string())?;
        s.validate(base).map_err(|e| e.to_string())?;
        Ok(s)
    };
    let s = parse("module = \"lib/x.so\"\ntoken_label = \"t\"\npin_file = \"pin\"").unwrap();
    assert_eq!(s.module, PathBuf::from("/etc/xks/lib/x.so"));
    assert_eq!(s.pin_file, Some(PathBuf::from("/etc/xks/pin")));
    let s = parse("module = \"libx.so\"\nslot = 3\npin_env = \"P\"").unwrap();
    assert_eq!(
        s.module,
        PathBuf::from("libx.so"),
        "a bare name is left to the loader"
    );
    let e = parse("module = \"x.so\"\ntoken_label = \"t\"\npin = \"1\"\npin_env = \"P\"")
        .err()
        .unwrap();
    assert_eq!(e, "pin_env: give exactly one of pin, pin_env or pin_file");
    let e = parse("module = \"x.so\"\npin = \"1\"").err().unwrap();
    assert!(e.starts_with("token_label: "), "{e}");
    let e = parse("module = \"x.so\"\ntoken_label = \"t\"\npin = \"1\"\nqueue_depth = 0")
        .err()
        .unwrap();
    assert!(e.starts_with("queue_depth: "), "{e}");
    let e = parse("module = \"x.so\"\ntoken_label = \"t\"\npin = \"1\"\nkeys = [\"a/b\"]")
        .err()
        .unwrap();
    assert!(e.starts_with("keys: "), "{e}");
    assert!(parse("module = \"x.so\"\ntoken_label = \"t\"\npin = \"1\"\nbogus = 1").is_err());
    let s = parse("module = \"x.so\"\ntoken_label = \"t\"\npin = \"secret-pin\"").unwrap();
    let shown = format!("{s:?}");
    assert!(
        shown.contains("<redacted>") && !shown.contains("secret-pin"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_busy_and_slow_hsm_is_timeout() {
    let Some((f, _token)) = fixture() else { return };
    let store = open(
        f,
        "session_pool_size = 1\nqueue_depth = 1\ncall_timeout_ms = 50\nkey_cache_ttl_ms = 60000",
    );
    let foo = id("foo");
    // Warm the key cache so that the calls below need exactly one job each.
    store.encrypt(&foo, pt(b"warm"), vec![]).await.unwrap();

    store.stall_workers(Duration::from_secs(3));
    // Once the only worker sleeps, one call fits in the queue and times out...
    let mut saw_timeout = false;
    for _ in 0..200 {
        match store.encrypt(&foo, pt(b"x"), vec![]).await {
            Err(KeyStoreError::Timeout) => {
                saw_timeout = true;
                break;
            }
            Err(KeyStoreError::Busy) => tokio::time::sleep(Duration::from_millis(10)).await,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        saw_timeout,
        "a queued call must time out while the HSM is stalled"
    );
    // ...and of two at once, one waits in the queue (and times out) while the other finds the
    // queue full and is refused at once.
    let (queued, refused) = tokio::join!(
        store.encrypt(&foo, pt(b"y"), vec![]),
        store.encrypt(&foo, pt(b"y"), vec![])
    );
    assert!(matches!(queued, Err(KeyStoreError::Timeout)), "{queued:?}");
    assert!(matches!(refused, Err(KeyStoreError::Busy)), "{refused:?}");
    // The pool recovers by itself once the HSM answers again.
    let mut recovered = false;
    for _ in 0..100 {
        match store.encrypt(&foo, pt(b"z"), vec![]).await {
            Ok(_) => {
                recovered = true;
                break;
            }
            Err(KeyStoreError::Busy | KeyStoreError::Timeout) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(recovered);
}
