//! Runs AWS's official XKS proxy conformance client (every suite, through `tests/conformance/run.sh`;
//! the client itself is read from `../shared/conformance/xks-testclient` or `XKS_CONFORMANCE_DIR`,
//! never copied into this repository) against the real `xks-proxy` binary on the embedded software
//! key store: once over HTTPS (49 tests) and once over mTLS with KMS's client subject (51 tests).
//! The PKCS#11 tokens get the same runs in `pkcs11_api.rs` (SoftHSM) and `hsm_fidelity.rs`
//! (Kryoptic and the emulator's vendor IV modes).
//!
//! Without the client or its tools (curl, jq, uuidgen, xxd, openssl, base64) the tests are
//! skipped, unless `CI` or `XKS_REQUIRE_TOOLS=1` is set, in which case they fail.

mod common;

use common::*;

#[test]
fn conformance_https() {
    let proxy = TestProxy::start();
    assert_conformance(&proxy, false);
}

#[test]
fn conformance_mtls() {
    let proxy = TestProxy::start_with(ProxySpec {
        server_extra: MTLS_SERVER_LINES.into(),
        ..ProxySpec::default()
    });
    assert_conformance(&proxy, true);
}
