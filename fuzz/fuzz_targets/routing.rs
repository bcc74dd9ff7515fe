//! The whole request path in memory: `Api::handle` with a software key store, on fuzzed methods,
//! paths, headers and bodies, unsigned or correctly signed (the harness knows the secret, so the
//! fuzzer also reaches routing after authentication, the parsers and the key manager).
//!
//! Properties: no panic; no 5xx except 501 (above a limit) and 503 (deadline); every non-2xx
//! answer has a JSON body with `errorName` and a printable `errorMessage` under 512 characters;
//! 405 carries `Allow: POST`; nothing but `/ping` succeeds without a valid signature; a successful
//! Encrypt returns a 12-byte IV, a 16-byte tag, a ciphertext as long as the plaintext and a CDIV
//! exactly when asked; a successful Decrypt of the known ciphertext returns its plaintext.
#![no_main]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use arbitrary::Arbitrary;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use xks_proxy::api::types::parse_encrypt;
use xks_proxy::api::{Api, ConnectionInfo, ProxyKeystore};
use xks_proxy::audit::AuditLog;
use xks_proxy::auth::SigV4Verifier;
use xks_proxy::client::{ClientSettings, XksClient};
use xks_proxy::auth::Credential;
use xks_proxy::limits::Limits;
use xks_proxy::crypto::key_manager_aad;
use xks_proxy::keystore::health::HealthMonitor;
use xks_proxy::keystore::software::SoftwareKeyStore;
use xks_proxy::keystore::{KeyId, KeyState, KeyStore, KeyUsage};
use xks_proxy::metrics::Metrics;

use common::{BodySpec, Goods};

const URI_PATH: &str = "/example/kms/xks/v1";
const REGION: &str = "us-east-1";
const PLAINTEXT: &[u8] = b"Hello World!";
const KEYS: [(&str, bool, bool); 5] = [
    ("foo", true, true),
    ("encrypt_only_key", true, false),
    ("decrypt_only_key", false, true),
    ("impotent_key", false, false),
    ("disabled_key", true, true),
];

struct Harness {
    runtime: tokio::runtime::Runtime,
    api: Api,
    client: XksClient,
    wrong_client: XksClient,
    goods: Goods,
    limits: Limits,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = std::env::temp_dir().join(format!("xks-fuzz-routing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let credential = Credential::generate().expect("credential");
        let ca = xks_proxy::dev::DevCa::generate("fuzz CA").expect("CA");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).expect("write CA");
        let settings = ClientSettings {
            endpoint: "https://localhost:8443".into(),
            ca_file,
            client_cert: None,
            access_key_id: credential.access_key_id.clone(),
            secret_access_key: credential.secret_access_key.clone(),
            region: REGION.into(),
            uri_path: URI_PATH.into(),
        };
        let client = XksClient::new(settings.clone()).expect("client");
        let other = Credential::generate().expect("credential");
        let wrong_client = XksClient::new(ClientSettings {
            secret_access_key: other.secret_access_key,
            ..settings
        })
        .expect("client");
        let limits = Limits::default();

        let (api, goods) = runtime.block_on(async {
            let key_file = dir.join("keys.json");
            let _ = std::fs::remove_file(&key_file);
            let store: Arc<dyn KeyStore> =
                Arc::new(SoftwareKeyStore::open(&key_file).expect("key store"));
            for (name, encrypt, decrypt) in KEYS {
                let id = KeyId::parse(name).unwrap();
                store
                    .create_key(&id, KeyUsage { encrypt, decrypt })
                    .await
                    .expect("create key");
            }
            store
                .set_state(&KeyId::parse("disabled_key").unwrap(), KeyState::Disabled)
                .await
                .expect("disable");
            let mut goods = Goods {
                ciphertext_metadata: "AQ==".into(),
                ..Goods::default()
            };
            let aad = STANDARD.decode(&goods.aad).unwrap();
            let sealed = store
                .encrypt(
                    &KeyId::parse("foo").unwrap(),
                    PLAINTEXT.to_vec().into(),
                    key_manager_aad(&aad, &[1]),
                )
                .await
                .expect("encrypt");
            goods.ciphertext = STANDARD.encode(&sealed.ciphertext);
            goods.iv = STANDARD.encode(&sealed.iv);
            goods.tag = STANDARD.encode(sealed.tag);
            let health = HealthMonitor::start(
                Arc::clone(&store),
                std::time::Duration::from_secs(5),
                std::time::Duration::from_secs(2),
            )
            .await;
            let keystore = ProxyKeystore::new(
                URI_PATH,
                SigV4Verifier::new(REGION, &[credential]),
                store,
                health,
                Arc::new(
                    xks_proxy::iv_budget::IvBudget::open(&Default::default(), 1)
                        .expect("an in-memory IV budget"),
                ),
            );
            let api = Api::new(
                vec![keystore],
                limits.clone(),
                1,
                AuditLog::off(),
                Arc::new(Metrics::default()),
            );
            (api, goods)
        });
        Harness {
            runtime,
            api,
            client,
            wrong_client,
            goods,
            limits,
        }
    })
}

#[derive(Arbitrary, Debug)]
enum MethodChoice {
    Post,
    Get,
    Put,
    Delete,
    Head,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Prefix {
    Registered,
    Other(String),
    /// The registered path with something appended or prepended.
    Around(String, bool),
    Root,
}

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Health,
    Metadata,
    Encrypt,
    Decrypt,
    Ping,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum PathSpec {
    Structured {
        prefix: Prefix,
        key: Key,
        op: Op,
        query: Option<String>,
    },
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum ContentType {
    Json,
    JsonCharset,
    Absent,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Signing {
    Unsigned,
    Signed,
    /// Signed, then the body changes.
    SignedOtherBody,
    /// Signed with another credential's secret.
    WrongSecret,
}

#[derive(Arbitrary, Debug)]
enum BodyChoice {
    Structured(Box<BodySpec>),
    Raw(Vec<u8>),
    /// A large body (up to 80 000 bytes) of one repeated byte.
    Large(u16, u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    method: MethodChoice,
    path: PathSpec,
    content_type: ContentType,
    declared_length: Option<u32>,
    headers: Vec<(String, Vec<u8>)>,
    signing: Signing,
    body: BodyChoice,
}

fn path(spec: &PathSpec) -> String {
    match spec {
        PathSpec::Raw(p) => p.clone(),
        PathSpec::Structured {
            prefix,
            key,
            op,
            query,
        } => {
            let prefix = match prefix {
                Prefix::Registered => URI_PATH.to_owned(),
                Prefix::Other(p) => p.clone(),
                Prefix::Around(s, true) => format!("{URI_PATH}{s}"),
                Prefix::Around(s, false) => format!("{s}{URI_PATH}"),
                Prefix::Root => String::new(),
            };
            let key = match key {
                Key::Known(i) => KEYS[usize::from(*i) % (KEYS.len() + 1)..]
                    .first()
                    .map_or("non_existing_key", |k| k.0)
                    .to_owned(),
                Key::Raw(k) => k.clone(),
            };
            let tail = match op {
                Op::Health => "/health".to_owned(),
                Op::Metadata => format!("/keys/{key}/metadata"),
                Op::Encrypt => format!("/keys/{key}/encrypt"),
                Op::Decrypt => format!("/keys/{key}/decrypt"),
                Op::Ping => "/ping".to_owned(),
                Op::Other(o) => format!("/keys/{key}/{o}"),
            };
            let mut path = format!("{prefix}{tail}");
            if let Some(q) = query {
                path.push('?');
                path.push_str(q);
            }
            path
        }
    }
}

fuzz_target!(|input: Input| {
    let h = harness();
    let method = match &input.method {
        MethodChoice::Post => Method::POST,
        MethodChoice::Get => Method::GET,
        MethodChoice::Put => Method::PUT,
        MethodChoice::Delete => Method::DELETE,
        MethodChoice::Head => Method::HEAD,
        MethodChoice::Other(m) => match Method::from_bytes(m.as_bytes()) {
            Ok(m) => m,
            Err(_) => return,
        },
    };
    let path = path(&input.path);
    let body: Vec<u8> = match &input.body {
        BodyChoice::Structured(spec) => spec.render(&h.goods),
        BodyChoice::Raw(bytes) => bytes.clone(),
        BodyChoice::Large(n, byte) => vec![*byte; usize::from(*n) + usize::from(*n) / 4],
    };
    let Ok(mut request) = Request::builder()
        .method(method.clone())
        .uri(&path)
        .header("host", "localhost:8443")
        .body(Full::new(Bytes::new()))
    else {
        return;
    };
    let headers = request.headers_mut();
    match &input.content_type {
        ContentType::Json => {
            headers.insert("content-type", HeaderValue::from_static("application/json"));
        }
        ContentType::JsonCharset => {
            headers.insert(
                "content-type",
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
        }
        ContentType::Absent => {}
        ContentType::Other(v) => {
            if let Ok(v) = HeaderValue::from_str(v) {
                headers.insert("content-type", v);
            }
        }
    }
    for (name, value) in input.headers.iter().take(4) {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) && n != "authorization"
            && n != "x-amz-date"
        {
            headers.append(n, v);
        }
    }
    if let Some(n) = input.declared_length {
        headers.insert("content-length", HeaderValue::from(n));
    }
    // aws-sigv4 panics signing a URI that is not in origin form (a client-side limit: the proxy's
    // client only signs paths under a configured uri_path).
    if !matches!(input.signing, Signing::Unsigned) && !path.starts_with('/') {
        return;
    }
    let signed_ok = match input.signing {
        Signing::Unsigned => false,
        Signing::Signed | Signing::SignedOtherBody => {
            if h.client
                .sign(&mut request, &body, SystemTime::now())
                .is_err()
            {
                return;
            }
            matches!(input.signing, Signing::Signed)
        }
        Signing::WrongSecret => {
            if h.wrong_client
                .sign(&mut request, &body, SystemTime::now())
                .is_err()
            {
                return;
            }
            false
        }
    };
    let mut body = body;
    if matches!(input.signing, Signing::SignedOtherBody) {
        body.push(b' ');
    }
    *request.body_mut() = Full::new(Bytes::from(body.clone()));

    let connection = ConnectionInfo {
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
        client_subject: None,
    };
    let response = h.runtime.block_on(h.api.handle(request, &connection));
    let status = response.status();
    let allow = response.headers().get("allow").cloned();
    let bytes = h
        .runtime
        .block_on(response.into_body().collect())
        .expect("a Full body")
        .to_bytes();

    assert!(
        !status.is_server_error() || status == 501 || status == 503,
        "{status} for {method} {path}: {}",
        String::from_utf8_lossy(&bytes)
    );
    let uri_path = path.split('?').next().unwrap_or("");
    if status.is_success() {
        if uri_path == "/ping" {
            return;
        }
        assert!(
            signed_ok,
            "{status} without a valid signature: {method} {path}"
        );
        assert_eq!(method, Method::POST);
        let reply: Value = serde_json::from_slice(&bytes).expect("a JSON reply");
        if uri_path.ends_with("/encrypt") {
            let request = parse_encrypt(&body, &h.limits)
                .unwrap_or_else(|_| panic!("200 for an Encrypt body the parser refuses"));
            let field = |name: &str| {
                STANDARD
                    .decode(reply[name].as_str().expect("a Base64 field"))
                    .expect("valid Base64")
            };
            assert_eq!(field("initializationVector").len(), 12);
            assert_eq!(field("authenticationTag").len(), 16);
            assert_eq!(field("ciphertext").len(), request.plaintext.len());
            assert_eq!(
                reply.get("ciphertextDataIntegrityValue").is_some(),
                request.want_cdiv
            );
        }
        let sent: Option<Value> = serde_json::from_slice(&body).ok();
        let known_ciphertext = sent
            .as_ref()
            .and_then(|v| v.get("ciphertext"))
            .and_then(Value::as_str)
            == Some(h.goods.ciphertext.as_str());
        if uri_path.ends_with("/decrypt") && known_ciphertext {
            let plaintext = STANDARD
                .decode(reply["plaintext"].as_str().expect("plaintext"))
                .expect("valid Base64");
            assert_eq!(plaintext, PLAINTEXT);
        }
        return;
    }
    let reply: Value = serde_json::from_slice(&bytes).expect("an error reply is JSON");
    let name = reply["errorName"].as_str().expect("errorName");
    assert!(name.ends_with("Exception"), "{name}");
    if let Some(message) = reply.get("errorMessage") {
        let message = message.as_str().expect("errorMessage is a string");
        assert!(message.len() < 512);
        assert!(message.bytes().all(|b| (0x20..=0x7e).contains(&b)));
    }
    if status == 405 {
        assert_eq!(allow.as_ref().map(|v| v.as_bytes()), Some(&b"POST"[..]));
    }
});
