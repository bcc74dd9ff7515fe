//! The HSMs people run, end to end through the real binary, real TLS and SigV4:
//! - every vendor way of handing out GCM IVs, through the project's PKCS#11 emulator wrapping a
//!   SoftHSM token (CloudHSM/nShield's zeroed `pIv`, Luna FIPS's appended IV, an HSM that silently
//!   overwrites the caller's IV) and Kryoptic's PKCS#11 3.0 message API: the IV source is probed
//!   with no setting, AWS's conformance client passes, and a known-answer test decrypts the
//!   proxy's ciphertext offline with the IV the reply carries;
//! - a second, independent token, Kryoptic, with the conformance client over HTTPS and mTLS;
//! - token objects anyone can plant without the PIN (a public disable marker, a public key with a
//!   known value, a public twin of a real key's label) are ignored, and `config check` warns;
//! - return values mapped per module profile, injected at the PKCS#11 boundary by the emulator.
//!
//! SoftHSM, Kryoptic (`hsm-config/build-kryoptic.sh`) and the emulator
//! (`cargo build --release -p xks-pkcs11-emulator`) are built or installed by `scripts/test`;
//! without them the tests skip, except in CI or with `XKS_REQUIRE_SOFTHSM=1`, where they fail.

mod common;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use common::hsm::*;
use common::*;
use serde_json::json;
use xks_proxy::client::bodies;

/// The value of the `known-key` imported for known-answer tests.
const KNOWN_KEY: [u8; 32] = *b"known-answer key for IV sources!";

/// The spec's key-manager AAD, written out here rather than taken from the crate under test:
/// `u16be(len AAD) || AAD || u8(len metadata) || metadata`.
fn spec_aad(aad: &[u8], metadata: &[u8]) -> Vec<u8> {
    let mut out = (aad.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(aad);
    out.push(metadata.len() as u8);
    out.extend_from_slice(metadata);
    out
}

/// Encrypts through the proxy with `known-key` and decrypts the reply offline with RustCrypto and
/// the key's known value: the IV in the reply must be the one the HSM used. Returns the IV.
async fn known_answer(hsm: &HsmProxy) -> Vec<u8> {
    let client = hsm.proxy.client();
    let plaintext = b"known answer through the HSM";
    let aad = b"kat-aad";
    let reply = client
        .call(
            "/keys/known-key/encrypt",
            &bodies::encrypt(plaintext, Some(aad), true),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}\n{}", reply.body, hsm.proxy.log());
    let iv = unb64(&reply.body["initializationVector"]);
    let mut data = unb64(&reply.body["ciphertext"]);
    let tag = unb64(&reply.body["authenticationTag"]);
    let metadata = unb64(&reply.body["ciphertextMetadata"]);
    assert_eq!(iv.len(), 12);
    assert_ne!(iv, vec![0u8; 12]);
    let cipher = Aes256Gcm::new((&KNOWN_KEY).into());
    cipher
        .decrypt_in_place_detached(
            Nonce::from_slice(&iv),
            &spec_aad(aad, &metadata),
            &mut data,
            Tag::from_slice(&tag),
        )
        .expect("the reply's IV, ciphertext and tag decrypt offline with the known key");
    assert_eq!(data, plaintext);
    // And back through the proxy.
    let decrypted = client
        .call(
            "/keys/known-key/decrypt",
            &bodies::decrypt_from(&reply.body, Some(aad)),
        )
        .await
        .unwrap();
    assert_eq!(decrypted.status, 200, "{}", decrypted.body);
    assert_eq!(unb64(&decrypted.body["plaintext"]), plaintext);
    iv
}

/// One vendor IV behaviour of the emulator: probed with no setting, known answer, conformance.
async fn vendor_iv_mode(iv_mode: &str, probed: &str) {
    let Some(hsm) = start(Hsm::Emulated(json!({ "iv_mode": iv_mode })), "", "") else {
        return;
    };
    hsm.proxy
        .wait_for_log(&format!("iv_source={probed} (probed)"));
    let check = hsm.config_check();
    assert!(
        check.contains(&format!(
            "ok   keystore {URI_PATH}: GCM IV source {probed} (probed)"
        )),
        "{check}"
    );
    hsm.import_key("known-key", &KNOWN_KEY);
    let first = known_answer(&hsm).await;
    let second = known_answer(&hsm).await;
    assert_ne!(first, second, "a fresh IV per encryption");
    let counters = hsm.emulator(json!({ "counters": true }));
    assert!(
        counters["counters"]["C_Encrypt"].as_u64().unwrap_or(0) > 0,
        "the calls went through the emulator: {counters}"
    );
    assert_conformance(&hsm.proxy, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudhsm_style_iv_written_into_a_zeroed_piv() {
    vendor_iv_mode("hsm_into_params", "hsm-into-params").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn luna_fips_style_iv_appended_after_the_tag() {
    vendor_iv_mode("hsm_appended", "hsm-appended").await;
}

/// An HSM that takes the caller's IV but encrypts under its own and overwrites `pIv`: the proxy
/// returns the IV the HSM wrote, not the one it chose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hsm_that_silently_overwrites_the_iv_is_reported_truthfully() {
    vendor_iv_mode("overwrite_silently", "proxy-random").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_softhsm_probes_the_proxys_own_iv() {
    vendor_iv_mode("passthrough", "proxy-random").await;
}

/// An `iv_source` that does not match the token: SoftHSM takes the zeroed IV as given and writes
/// nothing back, so the proxy must refuse to return a ciphertext under an all-zero IV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iv_the_hsm_did_not_report_is_never_returned() {
    let Some(hsm) = start(
        Hsm::Emulated(json!({})),
        "iv_source = \"hsm-into-params\"",
        "",
    ) else {
        return;
    };
    let reply = hsm
        .proxy
        .client()
        .call("/keys/foo/encrypt", &bodies::encrypt(b"x", None, false))
        .await
        .unwrap();
    assert_error(&reply, 500, "InternalException");
    assert!(reply.body.get("ciphertext").is_none());
    hsm.proxy.wait_for_log("all-zero IV");
    let check = hsm.config_check();
    assert!(
        check.contains("GCM IV source hsm-into-params (set by iv_source)"),
        "{check}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kryoptic_passes_the_conformance_client_over_https_and_mtls() {
    let Some(hsm) = start(Hsm::Kryoptic, "", MTLS_SERVER_LINES) else {
        return;
    };
    let check = hsm.config_check();
    assert!(check.contains(": profile kryoptic"), "{check}");
    assert_conformance(&hsm.proxy, true);
    let Some(https) = start(Hsm::Kryoptic, "", "") else {
        return;
    };
    assert_conformance(&https.proxy, false);
}

/// Kryoptic offers the PKCS#11 3.0 message API for CKM_AES_GCM: with `iv_source = "message-api"`
/// the token's own random IV generator picks every IV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kryoptic_message_api_with_the_tokens_iv_generator() {
    let Some(hsm) = start(Hsm::Kryoptic, "iv_source = \"message-api\"", "") else {
        return;
    };
    hsm.import_key("known-key", &KNOWN_KEY);
    let first = known_answer(&hsm).await;
    assert_ne!(first, known_answer(&hsm).await);
    assert_conformance(&hsm.proxy, false);
}

/// What anyone with access to the token but not the PIN can create: none of it changes what
/// the proxy serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_planted_without_the_pin_are_ignored() {
    let Some(hsm) = start(Hsm::Emulated(json!({})), "", "") else {
        return;
    };
    let dir = hsm.proxy.dir.path();
    let marker = dir.join("marker.bin");
    std::fs::write(&marker, b"DISABLED").unwrap();
    let key = dir.join("planted.bin");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let (marker, key) = (marker.display().to_string(), key.display().to_string());
    // Public session objects: no --login.
    hsm.pkcs11_tool(&[
        "--write-object",
        &marker,
        "--type",
        "data",
        "--label",
        "foo",
        "--application-label",
        "xks-proxy/disabled-key",
    ]);
    hsm.pkcs11_tool(&[
        "--write-object",
        &key,
        "--type",
        "secrkey",
        "--key-type",
        "AES:32",
        "--label",
        "planted",
        "--extractable",
    ]);
    hsm.pkcs11_tool(&[
        "--write-object",
        &key,
        "--type",
        "secrkey",
        "--key-type",
        "AES:32",
        "--label",
        "foo",
    ]);
    let listed = hsm.pkcs11_tool(&["--list-objects"]);
    assert!(
        listed.contains("planted") && listed.contains("xks-proxy/disabled-key"),
        "{listed}"
    );

    let client = hsm.proxy.client();
    let metadata = client
        .call("/keys/foo/metadata", &bodies::key_metadata())
        .await
        .unwrap();
    assert_eq!(metadata.status, 200, "{}", metadata.body);
    assert_eq!(
        metadata.body["keyStatus"], "ENABLED",
        "a public marker does not disable foo"
    );
    let encrypted = client
        .call(
            "/keys/foo/encrypt",
            &bodies::encrypt(b"still served", None, false),
        )
        .await
        .unwrap();
    assert_eq!(
        encrypted.status, 200,
        "a public twin does not break foo: {}",
        encrypted.body
    );
    let planted = client
        .call("/keys/planted/metadata", &bodies::key_metadata())
        .await
        .unwrap();
    assert_error(&planted, 404, "KeyNotFoundException");
    let listed = hsm.proxy.cli(&["keys", "list"]);
    assert!(!listed.contains("planted"), "{listed}");

    let check = hsm.config_check();
    for warning in [
        "WARN keystore /example/kms/xks/v1: AES key labelled \"planted\" is ignored: public (creatable without the PIN), not sensitive, extractable",
        "WARN keystore /example/kms/xks/v1: AES key labelled \"foo\" is ignored: public (creatable without the PIN)",
        "WARN keystore /example/kms/xks/v1: disable marker labelled \"foo\" is ignored: public (creatable without the PIN)",
    ] {
        assert!(check.contains(warning), "missing {warning:?} in:\n{check}");
    }
}

/// Return values, injected at the PKCS#11 boundary, and the XKS error each becomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_values_map_to_xks_errors_per_profile() {
    let Some(hsm) = start_with_limits(Hsm::Emulated(json!({})), "", "", QUIET_HEALTH) else {
        return;
    };
    wait_until_active(&hsm.proxy).await;
    let client = hsm.proxy.client();
    let encrypted = client
        .call(
            "/keys/foo/encrypt",
            &bodies::encrypt(b"mapped", None, false),
        )
        .await
        .unwrap();
    assert_eq!(encrypted.status, 200);
    let decrypt = || async {
        client
            .call(
                "/keys/foo/decrypt",
                &bodies::decrypt_from(&encrypted.body, None),
            )
            .await
            .unwrap()
    };
    let inject = |function: &str, rv: &str| hsm.fail_next(function, rv);

    // PKCS#11 3.0's bad-tag code is a bad tag on every profile.
    inject("C_Decrypt", "CKR_AEAD_DECRYPT_FAILED");
    assert_error(&decrypt().await, 400, "InvalidCiphertextException");
    // SoftHSM's own bad-tag code, under the profile chosen from its manufacturer id.
    inject("C_Decrypt", "CKR_GENERAL_ERROR");
    assert_error(&decrypt().await, 400, "InvalidCiphertextException");
    // ...but CKR_FUNCTION_FAILED means a bad tag only on nShield.
    inject("C_Decrypt", "CKR_FUNCTION_FAILED");
    assert_error(&decrypt().await, 500, "InternalException");
    // A key whose attributes forbid the operation.
    inject("C_EncryptInit", "CKR_KEY_FUNCTION_NOT_PERMITTED");
    let refused = client
        .call("/keys/foo/encrypt", &bodies::encrypt(b"x", None, false))
        .await
        .unwrap();
    assert_error(&refused, 400, "InvalidKeyUsageException");
    // A failure of the Init call is never a bad tag.
    inject("C_DecryptInit", "CKR_GENERAL_ERROR");
    assert_error(&decrypt().await, 500, "InternalException");
    // A lost session is retried once on a fresh one.
    inject("C_Decrypt", "CKR_SESSION_HANDLE_INVALID");
    let retried = decrypt().await;
    assert_eq!(retried.status, 200, "{}", retried.body);
    assert_eq!(unb64(&retried.body["plaintext"]), b"mapped");
    hsm.emulator(json!({ "set": {} }));
    assert_eq!(decrypt().await.status, 200);
}

/// The nShield profile: `CKR_FUNCTION_FAILED` on C_Decrypt is how it reports a bad tag, and a
/// general error is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nshield_profile_reads_function_failed_as_a_bad_tag() {
    let Some(hsm) = start_with_limits(
        Hsm::Emulated(
            json!({ "iv_mode": "hsm_into_params", "decrypt_failure_rv": "CKR_FUNCTION_FAILED" }),
        ),
        "profile = \"nshield-fips\"",
        "",
        QUIET_HEALTH,
    ) else {
        return;
    };
    wait_until_active(&hsm.proxy).await;
    let client = hsm.proxy.client();
    let mut encrypted = client
        .call(
            "/keys/foo/encrypt",
            &bodies::encrypt(b"nshield", None, false),
        )
        .await
        .unwrap()
        .body;
    assert!(encrypted.get("ciphertext").is_some(), "{encrypted}");
    let mut tag = unb64(&encrypted["authenticationTag"]);
    tag[0] ^= 1;
    encrypted["authenticationTag"] = json!(b64(&tag));
    let tampered = client
        .call("/keys/foo/decrypt", &bodies::decrypt_from(&encrypted, None))
        .await
        .unwrap();
    assert_error(&tampered, 400, "InvalidCiphertextException");
    hsm.emulator(json!({ "set": { "iv_mode": "hsm_into_params", "inject": [
        { "functions": ["C_Decrypt"], "rv": "CKR_GENERAL_ERROR", "count": 1 }
    ] } }));
    tag[0] ^= 1;
    encrypted["authenticationTag"] = json!(b64(&tag));
    let failed = client
        .call("/keys/foo/decrypt", &bodies::decrypt_from(&encrypted, None))
        .await
        .unwrap();
    assert_error(&failed, 500, "InternalException");
    let check = hsm.config_check();
    assert!(check.contains(": profile nshield-fips"), "{check}");
}
