//! Criterion benches of the request path, piece by piece and whole:
//! - `sigv4/verify`: header checks, canonical request and signature of a KMS-shaped Encrypt.
//! - `request/parse_encrypt`: JSON parsing and validation of an Encrypt body (32-byte plaintext, 32-byte AAD).
//! - `crypto/aad_and_cdiv`: the key-manager AAD layout plus the CDIV hash.
//! - `software/encrypt`, `software/decrypt`: the embedded software key store (AES-256-GCM in process).
//! - `end_to_end/encrypt_tls_sigv4`: one signed Encrypt over a keep-alive TLS connection to an
//!   in-process server on loopback (software key store), including client signing.

use std::sync::Arc;
use std::time::SystemTime;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use xks_proxy::auth::Credential;
use xks_proxy::auth::SigV4Verifier;
use xks_proxy::client::{ClientSettings, XksClient, bodies};
use xks_proxy::config::Config;
use xks_proxy::crypto::{CIPHERTEXT_METADATA, cdiv, key_manager_aad};
use xks_proxy::dev::{DevCa, write_private};
use xks_proxy::keystore::software::SoftwareKeyStore;
use xks_proxy::keystore::{KeyId, KeyStore, KeyUsage};
use xks_proxy::limits::Limits;
use zeroize::Zeroizing;

const URI_PATH: &str = "/example/kms/xks/v1";

struct Fixture {
    _dir: tempfile::TempDir,
    config: Config,
    credential: Credential,
    ca_file: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate("bench CA").unwrap();
    let server = ca.issue_server(&["localhost"]).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), &server.cert_pem).unwrap();
    write_private(&dir.path().join("server-key.pem"), &server.key_pem).unwrap();
    let credential = Credential::generate().unwrap();
    let text = format!(
        r#"[server]
listen = "127.0.0.1:0"
tls_cert = "server.pem"
tls_key = "server-key.pem"
[[keystore]]
uri_path = "{URI_PATH}"
region = "us-east-1"
backend = "software"
key_file = "keys.json"
[[keystore.credential]]
access_key_id = "{}"
secret_access_key = "{}"
"#,
        credential.access_key_id,
        credential.secret_access_key.expose()
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let store = SoftwareKeyStore::open(&dir.path().join("keys.json")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime
        .block_on(store.create_key(&KeyId::parse("foo").unwrap(), KeyUsage::BOTH))
        .unwrap();
    Fixture {
        config: Config::load(&path).unwrap(),
        _dir: dir,
        credential,
        ca_file,
    }
}

fn client(fixture: &Fixture, port: u16) -> XksClient {
    XksClient::new(ClientSettings {
        endpoint: format!("https://localhost:{port}"),
        ca_file: fixture.ca_file.clone(),
        client_cert: None,
        access_key_id: fixture.credential.access_key_id.clone(),
        secret_access_key: fixture.credential.secret_access_key.clone(),
        region: "us-east-1".into(),
        uri_path: URI_PATH.into(),
    })
    .unwrap()
}

fn benches(c: &mut Criterion) {
    let fixture = fixture();
    let body = bodies::encrypt(&[7u8; 32], Some(&[9u8; 32]), false)
        .to_string()
        .into_bytes();

    let signer = client(&fixture, 443);
    let request = signer.request("/keys/foo/encrypt", body.clone()).unwrap();
    let (parts, _) = request.into_parts();
    let verifier = SigV4Verifier::new("us-east-1", &fixture.config.keystores[0].credentials);
    c.bench_function("sigv4/verify", |b| {
        b.iter(|| {
            verifier
                .check_headers(&parts, SystemTime::now())
                .unwrap()
                .verify(&body)
                .unwrap()
        })
    });

    let limits = Limits::default();
    c.bench_function("request/parse_encrypt", |b| {
        b.iter(|| {
            xks_proxy::api::types::parse_encrypt(&body, &limits)
                .ok()
                .unwrap()
        })
    });

    c.bench_function("crypto/aad_and_cdiv", |b| {
        let aad = [9u8; 32];
        b.iter(|| {
            let hsm_aad = key_manager_aad(&aad, &CIPHERTEXT_METADATA);
            (
                hsm_aad,
                cdiv(&aad, &CIPHERTEXT_METADATA, &[1; 12], &[2; 32], &[3; 16]),
            )
        })
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = SoftwareKeyStore::open(&dir.path().join("keys.json")).unwrap();
    let key = KeyId::parse("foo").unwrap();
    runtime
        .block_on(store.create_key(&key, KeyUsage::BOTH))
        .unwrap();
    let aad = key_manager_aad(&[9u8; 32], &CIPHERTEXT_METADATA);
    let mut group = c.benchmark_group("software");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encrypt", |b| {
        b.iter(|| {
            runtime
                .block_on(store.encrypt(&key, Zeroizing::new(vec![7u8; 32]), aad.clone()))
                .unwrap()
        })
    });
    let sealed = runtime
        .block_on(store.encrypt(&key, Zeroizing::new(vec![7u8; 32]), aad.clone()))
        .unwrap();
    group.bench_function("decrypt", |b| {
        b.iter(|| {
            runtime
                .block_on(store.decrypt(&key, sealed.clone(), aad.clone()))
                .unwrap()
        })
    });
    group.finish();

    let server = runtime
        .block_on(xks_proxy::server::start(&fixture.config))
        .unwrap();
    let port = server.local_addr().unwrap().port();
    runtime.spawn(server.run(std::future::pending()));
    let client = Arc::new(client(&fixture, port));
    let mut connection = runtime.block_on(client.connect()).unwrap();
    let mut group = c.benchmark_group("end_to_end");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encrypt_tls_sigv4", |b| {
        b.iter(|| {
            let request = client.request("/keys/foo/encrypt", body.clone()).unwrap();
            let reply = runtime.block_on(connection.send(request)).unwrap();
            assert_eq!(reply.status, 200);
        })
    });
    group.finish();
}

criterion_group!(proxy, benches);
criterion_main!(proxy);
