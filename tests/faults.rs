//! Key-manager faults: a hanging key manager (a fault-injecting wrapper around the real software
//! store, driven through the real API handler) and a SoftHSM token whose files disappear while the
//! real binary serves.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use xks_proxy::api::{Api, ConnectionInfo, ProxyKeystore};
use xks_proxy::audit::AuditLog;
use xks_proxy::auth::Credential;
use xks_proxy::auth::SigV4Verifier;
use xks_proxy::client::bodies;
use xks_proxy::keystore::health::HealthMonitor;
use xks_proxy::keystore::software::SoftwareKeyStore;
use xks_proxy::keystore::{
    BackendDescription, EkmStatus, KeyId, KeyInfo, KeyState, KeyStore, KeyStoreError, KeyUsage,
    Sealed,
};
use xks_proxy::limits::Limits;
use zeroize::Zeroizing;

/// The software store, except that while `hang` is set every call takes 10 s (a hung HSM).
struct HangingStore {
    inner: SoftwareKeyStore,
    hang: AtomicBool,
}

impl HangingStore {
    async fn maybe_hang(&self) {
        if self.hang.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }
}

#[async_trait]
impl KeyStore for HangingStore {
    fn describe(&self) -> BackendDescription {
        self.inner.describe()
    }
    async fn key_info(&self, id: &KeyId) -> Result<KeyInfo, KeyStoreError> {
        self.maybe_hang().await;
        self.inner.key_info(id).await
    }
    async fn encrypt(
        &self,
        id: &KeyId,
        plaintext: Zeroizing<Vec<u8>>,
        aad: Vec<u8>,
    ) -> Result<Sealed, KeyStoreError> {
        self.maybe_hang().await;
        self.inner.encrypt(id, plaintext, aad).await
    }
    async fn decrypt(
        &self,
        id: &KeyId,
        sealed: Sealed,
        aad: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
        self.maybe_hang().await;
        self.inner.decrypt(id, sealed, aad).await
    }
    async fn check_health(&self) -> Vec<EkmStatus> {
        self.maybe_hang().await;
        self.inner.check_health().await
    }
    async fn create_key(&self, id: &KeyId, usage: KeyUsage) -> Result<KeyInfo, KeyStoreError> {
        self.inner.create_key(id, usage).await
    }
    async fn list_keys(&self) -> Result<Vec<KeyInfo>, KeyStoreError> {
        self.inner.list_keys().await
    }
    async fn set_state(&self, id: &KeyId, state: KeyState) -> Result<KeyInfo, KeyStoreError> {
        self.inner.set_state(id, state).await
    }
}

async fn send(
    api: &Api,
    client: &xks_proxy::client::XksClient,
    suffix: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let request = client
        .request(suffix, body.to_string().into_bytes())
        .unwrap();
    let connection = ConnectionInfo {
        peer: "127.0.0.1:1".parse().unwrap(),
        client_subject: None,
    };
    let response = api.handle::<Full<Bytes>>(request, &connection).await;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

#[tokio::test]
async fn a_hanging_key_manager_gives_503_within_the_deadline_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let inner = SoftwareKeyStore::open(&dir.path().join("keys.json")).unwrap();
    inner
        .create_key(&KeyId::parse("foo").unwrap(), KeyUsage::BOTH)
        .await
        .unwrap();
    let store = Arc::new(HangingStore {
        inner,
        hang: AtomicBool::new(false),
    });
    let health = HealthMonitor::start(
        Arc::clone(&store) as Arc<dyn KeyStore>,
        Duration::from_millis(100),
        Duration::from_millis(300),
    )
    .await;
    let credential = Credential::generate().unwrap();
    let limits = Limits::default();
    let iv_budget = Arc::new(xks_proxy::iv_budget::IvBudget::open(&Default::default(), 1).unwrap());
    let api = Api::new(
        vec![ProxyKeystore::new(
            URI_PATH,
            SigV4Verifier::new(REGION, std::slice::from_ref(&credential)),
            Arc::clone(&store) as Arc<dyn KeyStore>,
            health,
            Arc::clone(&iv_budget),
        )],
        limits,
        1,
        AuditLog::off(),
        Arc::default(),
    );
    let client = xks_proxy::client::XksClient::new(xks_proxy::client::ClientSettings {
        endpoint: "https://localhost:443".into(),
        ca_file: {
            let ca = xks_proxy::dev::DevCa::generate("unused").unwrap();
            let path = dir.path().join("ca.pem");
            std::fs::write(&path, ca.cert_pem()).unwrap();
            path
        },
        client_cert: None,
        access_key_id: credential.access_key_id.clone(),
        secret_access_key: credential.secret_access_key.clone(),
        region: REGION.into(),
        uri_path: URI_PATH.into(),
    })
    .unwrap();

    let (status, _) = send(
        &api,
        &client,
        "/keys/foo/encrypt",
        &bodies::encrypt(b"x", None, false),
    )
    .await;
    assert_eq!(status, 200);

    store.hang.store(true, Ordering::SeqCst);
    // A 503 from the deadline: had it waited out the hang, the answer would have been a 200.
    let (status, body) = send(
        &api,
        &client,
        "/keys/foo/encrypt",
        &bodies::encrypt(b"x", None, false),
    )
    .await;
    assert_eq!(
        (status, body["errorName"].as_str()),
        (503, Some("DependencyTimeoutException"))
    );
    // The abandoned call may have used an IV: it is charged with the one that succeeded.
    let usage = iv_budget.usage();
    assert_eq!(usage.len(), 1, "{usage:?}");
    assert_eq!(usage[0].encryptions, 2, "{usage:?}");

    // Health answers at once from its cache and turns UNAVAILABLE once the check times out.
    eventually_ok("health turns UNAVAILABLE", || async {
        let (status, body) = send(&api, &client, "/health", &bodies::health()).await;
        assert_eq!(status, 200);
        if body["ekmFleetDetails"][0]["healthStatus"] == "UNAVAILABLE" {
            Ok(())
        } else {
            Err(body.to_string())
        }
    })
    .await;

    store.hang.store(false, Ordering::SeqCst);
    eventually_ok("health recovers", || async {
        let (_, body) = send(&api, &client, "/health", &bodies::health()).await;
        if body["ekmFleetDetails"][0]["healthStatus"] == "ACTIVE" {
            Ok(())
        } else {
            Err(body.to_string())
        }
    })
    .await;
    let (status, _) = send(
        &api,
        &client,
        "/keys/foo/encrypt",
        &bodies::encrypt(b"x", None, false),
    )
    .await;
    assert_eq!(status, 200, "serving again without a restart");
}

#[tokio::test]
async fn a_vanished_softhsm_token_is_unavailable_and_serves_again_once_back() {
    let Some(token) = softhsm_token("1234") else {
        return;
    };
    let module = SOFTHSM_MODULE;
    let mut proxy = TestProxy::start_with(ProxySpec {
        backend: format!(
            "backend = \"pkcs11\"\n[keystore.pkcs11]\nmodule = \"{module}\"\ntoken_label = \"xks-proxy\"\npin_env = \"XKS_HSM_PIN\"\n"
        ),
        limits: "health_interval_ms = 200".into(),
        create_keys: false,
        env: vec![
            (
                "SOFTHSM2_CONF".into(),
                token.path().join("softhsm2.conf").display().to_string(),
            ),
            ("XKS_HSM_PIN".into(), "1234".into()),
        ],
        ..Default::default()
    });
    let client = proxy.client();
    let encrypted = client
        .call(
            "/keys/foo/encrypt",
            &bodies::encrypt(b"before", None, false),
        )
        .await
        .unwrap();
    assert_eq!(encrypted.status, 200);

    // The token's directory disappears (a removed device, an unmounted volume).
    let tokens = token.path().join("tokens");
    let moved = token.path().join("tokens-away");
    std::fs::rename(&tokens, &moved).unwrap();
    std::fs::create_dir(&tokens).unwrap();
    eventually_ok("health notices the vanished token", || async {
        let reply = client.call("/health", &bodies::health()).await.unwrap();
        assert_eq!(reply.status, 200, "health itself keeps answering");
        if reply.body["ekmFleetDetails"][0]["healthStatus"] == "UNAVAILABLE" {
            Ok(())
        } else {
            Err(reply.body.to_string())
        }
    })
    .await;
    let reply = client
        .call(
            "/keys/foo/encrypt",
            &bodies::encrypt(b"during", None, false),
        )
        .await
        .unwrap();
    assert!(
        reply.status.as_u16() >= 400,
        "no success without a token: {reply:?}"
    );
    assert!(reply.error_name().is_some(), "{reply:?}");

    // The files come back. SoftHSM 2.6 does not re-read a token whose files vanished under a
    // running process (it then reports the keys as missing), so the proxy is restarted here;
    // an HSM that reports CKR_TOKEN_NOT_PRESENT / CKR_DEVICE_REMOVED is reconnected in place.
    std::fs::remove_dir(&tokens).unwrap();
    std::fs::rename(&moved, &tokens).unwrap();
    proxy.restart();
    let client = proxy.client();
    let reply = client
        .call(
            "/keys/foo/decrypt",
            &bodies::decrypt_from(&encrypted.body, None),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(unb64(&reply.body["plaintext"]), b"before");
    let reply = client.call("/health", &bodies::health()).await.unwrap();
    assert_eq!(reply.body["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");
}
