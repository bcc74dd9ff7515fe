//! End-to-end tests of the XKS API against the real binary: real TLS, real SigV4, the software key
//! store. Signatures come from aws-sigv4's request signer and, independently, from curl.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use xks_proxy::client::bodies;

async fn encrypt(
    proxy: &TestProxy,
    key: &str,
    plaintext: &[u8],
    aad: Option<&[u8]>,
    cdiv: bool,
) -> Value {
    let reply = proxy
        .client()
        .call(
            &format!("/keys/{key}/encrypt"),
            &bodies::encrypt(plaintext, aad, cdiv),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body
}

#[tokio::test]
async fn health_reports_the_spec_shape() {
    let proxy = TestProxy::start();
    let reply = proxy
        .client()
        .call("/health", &bodies::health())
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let body = &reply.body;
    assert_eq!(body["xksProxyFleetSize"], 1);
    assert_eq!(body["xksProxyVendor"], "xks-proxy");
    assert!(
        body["xksProxyModel"]
            .as_str()
            .unwrap()
            .contains(env!("CARGO_PKG_VERSION"))
    );
    assert!(body["ekmVendor"].as_str().unwrap().contains("NOT an HSM"));
    let fleet = body["ekmFleetDetails"].as_array().unwrap();
    assert_eq!(fleet.len(), 1);
    assert_eq!(fleet[0]["healthStatus"], "ACTIVE");
    assert!(fleet[0]["id"].is_string() && fleet[0]["model"].is_string());

    // Unknown kmsOperation values are accepted (spec: MUST NOT be rejected).
    let body =
        json!({"requestMetadata": {"kmsRequestId": "r", "kmsOperation": "SomeFutureOperation"}});
    assert_eq!(
        proxy.client().call("/health", &body).await.unwrap().status,
        200
    );
    for bad in [json!({}), json!({"requestMetadata": {}})] {
        let reply = proxy.client().call("/health", &bad).await.unwrap();
        assert_error(&reply, 400, "ValidationException");
    }
}

#[tokio::test]
async fn encrypt_decrypt_round_trips_with_cdiv() {
    let proxy = TestProxy::start();
    let client = proxy.client();
    let cases: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![
        (
            b"Hello World!".to_vec(),
            Some(b"project=nile,department=marketing".to_vec()),
        ),
        (b"no aad".to_vec(), None),
        (vec![0xA5; 4300], Some(vec![0x5A; 8192])), // the spec's minimum sizes
    ];
    for (plaintext, aad) in cases {
        let encrypted = encrypt(&proxy, "foo", &plaintext, aad.as_deref(), true).await;
        let ciphertext = unb64(&encrypted["ciphertext"]);
        let iv = unb64(&encrypted["initializationVector"]);
        let tag = unb64(&encrypted["authenticationTag"]);
        let metadata = unb64(&encrypted["ciphertextMetadata"]);
        assert_eq!(ciphertext.len(), plaintext.len());
        assert_eq!(iv.len(), 12);
        assert_eq!(tag.len(), 16);
        assert!(metadata.len() <= 20);
        // CDIV = SHA-256(AAD || metadata || IV || ciphertext || tag), recomputed here.
        let mut hash = Sha256::new();
        for part in [
            aad.as_deref().unwrap_or(b""),
            &metadata,
            &iv,
            &ciphertext,
            &tag,
        ] {
            hash.update(part);
        }
        assert_eq!(
            unb64(&encrypted["ciphertextDataIntegrityValue"]),
            hash.finalize().to_vec()
        );

        let reply = client
            .call(
                "/keys/foo/decrypt",
                &bodies::decrypt_from(&encrypted, aad.as_deref()),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(unb64(&reply.body["plaintext"]), plaintext);
    }
    // Without CDIV the field is absent; two encryptions never share an IV.
    let a = encrypt(&proxy, "foo", b"x", None, false).await;
    let b = encrypt(&proxy, "foo", b"x", None, false).await;
    assert!(a.get("ciphertextDataIntegrityValue").is_none());
    assert_ne!(a["initializationVector"], b["initializationVector"]);
}

#[tokio::test]
async fn tampering_is_invalid_ciphertext() {
    let proxy = TestProxy::start();
    let client = proxy.client();
    let aad = b"context".as_slice();
    let encrypted = encrypt(&proxy, "foo", b"secret data", Some(aad), false).await;
    let flip = |field: &str| {
        let mut bytes = unb64(&encrypted[field]);
        bytes[0] ^= 1;
        let mut copy = encrypted.clone();
        copy[field] = b64(&bytes).into();
        copy
    };
    let mut without_metadata = encrypted.clone();
    without_metadata
        .as_object_mut()
        .unwrap()
        .remove("ciphertextMetadata");
    let cases = [
        ("no AAD", bodies::decrypt_from(&encrypted, None)),
        (
            "other AAD",
            bodies::decrypt_from(&encrypted, Some(b"other")),
        ),
        (
            "ciphertext",
            bodies::decrypt_from(&flip("ciphertext"), Some(aad)),
        ),
        (
            "tag",
            bodies::decrypt_from(&flip("authenticationTag"), Some(aad)),
        ),
        (
            "iv",
            bodies::decrypt_from(&flip("initializationVector"), Some(aad)),
        ),
        (
            "metadata",
            bodies::decrypt_from(&flip("ciphertextMetadata"), Some(aad)),
        ),
        (
            "metadata dropped",
            bodies::decrypt_from(&without_metadata, Some(aad)),
        ),
    ];
    for (what, body) in cases {
        let reply = client.call("/keys/foo/decrypt", &body).await.unwrap();
        assert_eq!(
            reply.error_name(),
            Some("InvalidCiphertextException"),
            "{what}: {reply:?}"
        );
        assert_eq!(reply.status, 400, "{what}");
    }
    // A 16-byte IV is a valid length: it reaches the cipher and fails authentication there.
    let mut long_iv = bodies::decrypt_from(&encrypted, Some(aad));
    long_iv["initializationVector"] = b64(&[0u8; 16]).into();
    let reply = client.call("/keys/foo/decrypt", &long_iv).await.unwrap();
    assert_error(&reply, 400, "InvalidCiphertextException");
}

#[tokio::test]
async fn key_metadata_and_the_usage_matrix() {
    let proxy = TestProxy::start();
    assert_usage_matrix(&proxy.client()).await;
}

#[tokio::test]
async fn disabled_keys_are_invalid_state_and_survive_restarts() {
    let mut proxy = TestProxy::start();
    let encrypted = encrypt(&proxy, "foo", b"data", None, false).await;
    proxy.cli(&["keys", "disable", "foo"]);
    proxy.restart();
    let client = proxy.client();
    let reply = client
        .call("/keys/foo/metadata", &bodies::key_metadata())
        .await
        .unwrap();
    assert_eq!(reply.body["keyStatus"], "DISABLED");
    let reply = client
        .call("/keys/foo/encrypt", &bodies::encrypt(b"x", None, false))
        .await
        .unwrap();
    assert_error(&reply, 400, "InvalidStateException");
    let reply = client
        .call("/keys/foo/decrypt", &bodies::decrypt_from(&encrypted, None))
        .await
        .unwrap();
    assert_error(&reply, 400, "InvalidStateException");

    // Enabling on a running server takes effect without a restart (the key file is re-read).
    proxy.cli(&["keys", "enable", "foo"]);
    let reply = eventually_ok("the key is re-enabled", || async {
        let reply = client
            .call("/keys/foo/decrypt", &bodies::decrypt_from(&encrypted, None))
            .await
            .unwrap();
        if reply.status == 200 {
            Ok(reply)
        } else {
            Err(format!("{reply:?}"))
        }
    })
    .await;
    assert_eq!(unb64(&reply.body["plaintext"]), b"data");
}

#[tokio::test]
async fn authentication_failures_are_401() {
    let proxy = TestProxy::start();
    let body = bodies::health();
    let id = proxy.credential.access_key_id.clone();
    let secret = proxy.credential.secret_access_key.expose().to_string();
    let other_secret = xks_proxy::auth::Credential::generate().unwrap();
    let clients = [
        (
            "unknown access key id",
            proxy.client_as(&format!("Invalid{id}"), &secret, REGION),
        ),
        (
            "wrong secret",
            proxy.client_as(&id, other_secret.secret_access_key.expose(), REGION),
        ),
        ("other region", proxy.client_as(&id, &secret, "eu-west-1")),
    ];
    for (what, client) in clients {
        let reply = client.call("/health", &body).await.unwrap();
        assert_eq!(
            reply.error_name(),
            Some("AuthenticationFailedException"),
            "{what}"
        );
        assert_eq!(reply.status, 401, "{what}");
    }

    let client = proxy.client();
    let send = |request| async {
        let mut connection = client.connect().await.unwrap();
        connection.send(request).await.unwrap()
    };
    let bytes = body.to_string().into_bytes();
    for skew in [-360i64, 360] {
        let at = if skew < 0 {
            SystemTime::now() - Duration::from_secs(skew.unsigned_abs())
        } else {
            SystemTime::now() + Duration::from_secs(skew as u64)
        };
        let reply = send(client.request_at("/health", bytes.clone(), at).unwrap()).await;
        assert_error(&reply, 401, "AuthenticationFailedException");
    }
    // Four minutes off is inside the 5-minute window.
    let at = SystemTime::now() - Duration::from_secs(240);
    assert_eq!(
        send(client.request_at("/health", bytes.clone(), at).unwrap())
            .await
            .status,
        200
    );

    // The body is covered by the signature.
    let mut request = client.request("/health", bytes.clone()).unwrap();
    *request.body_mut() = http_body_util::Full::new(bytes::Bytes::from(
        json!({"requestMetadata": {"kmsRequestId": "changed", "kmsOperation": "KmsHealthCheck"}})
            .to_string(),
    ));
    assert_error(&send(request).await, 401, "AuthenticationFailedException");

    // Missing, garbled and duplicated Authorization headers.
    let mut request = client.request("/health", bytes.clone()).unwrap();
    request.headers_mut().remove("authorization");
    assert_error(&send(request).await, 401, "AuthenticationFailedException");
    let mut request = client.request("/health", bytes.clone()).unwrap();
    request
        .headers_mut()
        .insert("authorization", "AWS4-HMAC-SHA256 garbage".parse().unwrap());
    assert_error(&send(request).await, 401, "AuthenticationFailedException");
    let mut request = client.request("/health", bytes.clone()).unwrap();
    let value = request.headers()["authorization"].clone();
    request.headers_mut().append("authorization", value);
    assert_error(&send(request).await, 401, "AuthenticationFailedException");
    // A signed header changed after signing.
    let mut request = client.request("/health", bytes.clone()).unwrap();
    request
        .headers_mut()
        .insert("host", format!("127.0.0.1:{}", proxy.port).parse().unwrap());
    assert_error(&send(request).await, 401, "AuthenticationFailedException");

    // Nothing secret in the log (once the failures above are logged).
    let log = proxy.wait_for_log("authentication failed: signature does not match");
    assert!(log.contains("authentication failed: signature does not match"));
    assert!(!log.contains(&secret));
    assert!(!log.to_ascii_lowercase().contains("signature="));
}

#[tokio::test]
async fn routing_methods_and_ping() {
    let proxy = TestProxy::start();
    let client = proxy.client();
    let other = XksClientFor::new(&proxy, "/example/invalid/kms/xks/v1");
    let reply = other.0.call("/health", &bodies::health()).await.unwrap();
    assert_error(&reply, 404, "InvalidUriPathException");
    // Under a known key store, an unknown route is 404 only after authentication.
    let reply = client
        .call("/nothing/here", &bodies::health())
        .await
        .unwrap();
    assert_error(&reply, 404, "InvalidUriPathException");
    let reply = client
        .call("/keys/foo/sign", &bodies::health())
        .await
        .unwrap();
    assert_error(&reply, 404, "InvalidUriPathException");
    let stranger = proxy.client_as("AAAAAAAAAAAAAAAAAAAA", &"A".repeat(44), REGION);
    let reply = stranger
        .call("/nothing/here", &bodies::health())
        .await
        .unwrap();
    assert_error(&reply, 401, "AuthenticationFailedException");
    // A malformed key id is a validation error, not a lookup.
    let reply = client
        .call("/keys/bad%20key/metadata", &bodies::key_metadata())
        .await
        .unwrap();
    assert_error(&reply, 400, "ValidationException");

    let url = format!("{}{URI_PATH}", proxy.endpoint());
    for path in [
        "/health",
        "/keys/foo/encrypt",
        "/keys/foo/decrypt",
        "/keys/foo/metadata",
    ] {
        let output = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&proxy.ca_file)
            .arg(format!("{url}{path}"))
            .output();
        if let Ok(output) = output {
            assert_eq!(String::from_utf8_lossy(&output.stdout), "405", "GET {path}");
        }
    }
    let output = std::process::Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(&proxy.ca_file)
        .arg(format!("{}/ping", proxy.endpoint()))
        .output();
    if let Ok(output) = output {
        assert_eq!(String::from_utf8_lossy(&output.stdout), "ok\n");
    }
}

/// A client for another uri_path with the proxy's credential.
struct XksClientFor(xks_proxy::client::XksClient);

impl XksClientFor {
    fn new(proxy: &TestProxy, uri_path: &str) -> Self {
        let mut settings = proxy.client_settings();
        settings.uri_path = uri_path.into();
        Self(xks_proxy::client::XksClient::new(settings).unwrap())
    }
}

#[tokio::test]
async fn validation_and_size_limits() {
    let proxy = TestProxy::start_with(ProxySpec {
        limits: "max_body_bytes = 40000\nmax_plaintext_bytes = 5000".into(),
        ..Default::default()
    });
    let client = proxy.client();
    let good = bodies::encrypt(b"data", Some(b"aad"), false);
    let mutate = |f: &dyn Fn(&mut Value)| {
        let mut body = good.clone();
        f(&mut body);
        body
    };
    let validation = [
        mutate(&|b| {
            b.as_object_mut().unwrap().remove("plaintext");
        }),
        mutate(&|b| b["plaintext"] = "%%%".into()),
        mutate(&|b| b["plaintext"] = json!(12)),
        mutate(&|b| b["plaintext"] = Value::Null),
        mutate(&|b| b["encryptionAlgorithm"] = "RSAES_OAEP_SHA_256".into()),
        mutate(&|b| b["ciphertextDataIntegrityValueAlgorithm"] = "SHA_1".into()),
        mutate(&|b| {
            b["requestMetadata"]
                .as_object_mut()
                .unwrap()
                .remove("kmsKeyArn");
        }),
        mutate(&|b| b["requestMetadata"] = json!("not an object")),
        json!([1, 2, 3]),
    ];
    for body in validation {
        let reply = client.call("/keys/foo/encrypt", &body).await.unwrap();
        assert_error(&reply, 400, "ValidationException");
    }
    let encrypted = encrypt(&proxy, "foo", b"data", None, false).await;
    for (field, bytes) in [
        ("initializationVector", 13usize),
        ("authenticationTag", 12),
        ("ciphertextMetadata", 21),
    ] {
        let mut body = bodies::decrypt_from(&encrypted, None);
        body[field] = b64(&vec![0u8; bytes]).into();
        let reply = client.call("/keys/foo/decrypt", &body).await.unwrap();
        assert_error(&reply, 400, "ValidationException");
    }
    // Above this proxy's configured maximums: 501, as the spec directs.
    let big = bodies::encrypt(&vec![1u8; 5001], None, false);
    assert_error(
        &client.call("/keys/foo/encrypt", &big).await.unwrap(),
        501,
        "UnsupportedOperationException",
    );
    let huge = bodies::encrypt(b"x", Some(&vec![1u8; 40_000]), false);
    assert_error(
        &client.call("/keys/foo/encrypt", &huge).await.unwrap(),
        501,
        "UnsupportedOperationException",
    );

    // Non-JSON content type, invalid UTF-8 and truncated JSON, each followed by a good request.
    let mut connection = client.connect().await.unwrap();
    let mut request = client
        .request("/health", b"{\"requestMetadata\":".to_vec())
        .unwrap();
    let reply = connection.send(request).await.unwrap();
    assert_error(&reply, 400, "ValidationException");
    request = client
        .request("/health", vec![b'{', 0xff, 0xfe, b'}'])
        .unwrap();
    assert_error(
        &connection.send(request).await.unwrap(),
        400,
        "ValidationException",
    );
    let health = bodies::health().to_string();
    request = client
        .request("/health", health.clone().into_bytes())
        .unwrap();
    request
        .headers_mut()
        .insert("content-type", "text/plain".parse().unwrap());
    // Content-Type is signed by our client, so re-sign after changing it.
    request.headers_mut().remove("authorization");
    request.headers_mut().remove("x-amz-date");
    client
        .sign(&mut request, health.as_bytes(), SystemTime::now())
        .unwrap();
    let reply = connection.send(request).await.unwrap();
    assert_error(&reply, 400, "ValidationException");
    let mut connection = client.connect().await.unwrap();
    let reply = connection
        .send(
            client
                .request("/health", bodies::health().to_string().into_bytes())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn curl_as_an_independent_signer() {
    if !have_curl() {
        return;
    }
    let proxy = TestProxy::start();
    // curl negotiates HTTP/2 by ALPN (Host comes from :authority) unless told otherwise.
    for http in ["--http2", "--http1.1"] {
        let reply = proxy.curl("/health", &bodies::health().to_string(), &[http]);
        assert_eq!(reply.status, 200, "{http}: {reply:?}");
        assert_eq!(reply.body["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");

        let aad = b"project=nile".as_slice();
        let reply = proxy.curl(
            "/keys/foo/encrypt",
            &bodies::encrypt(b"curl plaintext", Some(aad), true).to_string(),
            &[http],
        );
        assert_eq!(reply.status, 200, "{reply:?}");
        let reply = proxy.curl(
            "/keys/foo/decrypt",
            &bodies::decrypt_from(&reply.body, Some(aad)).to_string(),
            &[http],
        );
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(unb64(&reply.body["plaintext"]), b"curl plaintext");

        let reply = proxy.curl(
            "/keys/foo/metadata",
            &bodies::key_metadata().to_string(),
            &[http],
        );
        assert_eq!(reply.body["keyStatus"], "ENABLED");
    }
    // A curl request signed with the wrong secret.
    let reply = curl_post(
        &format!("{}{URI_PATH}/health", proxy.endpoint()),
        &proxy.ca_file,
        &format!("{}:{}", proxy.credential.access_key_id, "B".repeat(44)),
        &bodies::health().to_string(),
        &[],
    );
    assert_error(&reply, 401, "AuthenticationFailedException");
}

#[tokio::test]
async fn mutual_tls_requires_the_configured_ca_and_subject() {
    let proxy = TestProxy::start_with(ProxySpec {
        server_extra:
            "client_ca = \"client-ca.pem\"\nclient_subject = \"cks.kms.us-east-1.amazonaws.com\""
                .into(),
        ..Default::default()
    });
    let with_cert = |cert: Option<(std::path::PathBuf, std::path::PathBuf)>| {
        let mut settings = proxy.client_settings();
        settings.client_cert = cert;
        xks_proxy::client::XksClient::new(settings).unwrap()
    };
    let good = with_cert(Some(proxy.client_cert("cks.kms.us-east-1.amazonaws.com")));
    let reply = good.call("/health", &bodies::health()).await.unwrap();
    assert_eq!(reply.status, 200);

    let wrong_name = with_cert(Some(proxy.client_cert("cks.kms.eu-west-1.amazonaws.com")));
    assert!(wrong_name.call("/health", &bodies::health()).await.is_err());
    let no_cert = with_cert(None);
    assert!(no_cert.call("/health", &bodies::health()).await.is_err());
    // A certificate from another CA, with the right name.
    let stranger_ca = xks_proxy::dev::DevCa::generate("stranger").unwrap();
    let issued = stranger_ca
        .issue_client("cks.kms.us-east-1.amazonaws.com")
        .unwrap();
    let cert = proxy.dir.path().join("stranger.pem");
    let key = proxy.dir.path().join("stranger-key.pem");
    std::fs::write(&cert, issued.cert_pem).unwrap();
    std::fs::write(&key, issued.key_pem).unwrap();
    let stranger = with_cert(Some((cert, key)));
    assert!(stranger.call("/health", &bodies::health()).await.is_err());
    let log = proxy.wait_for_log("mTLS client certificate rejected");
    assert!(log.contains("mTLS client certificate rejected"));
}

#[tokio::test]
async fn many_parallel_clients_get_correct_answers() {
    let proxy = TestProxy::start();
    let client = std::sync::Arc::new(proxy.client());
    let mut tasks = Vec::new();
    for worker in 0..32u32 {
        let client = std::sync::Arc::clone(&client);
        tasks.push(tokio::spawn(async move {
            let mut connection = client.connect().await.unwrap();
            for i in 0..20u32 {
                let plaintext = format!("worker {worker} message {i}").into_bytes();
                let aad = worker.to_be_bytes();
                let body = bodies::encrypt(&plaintext, Some(&aad), i % 2 == 0)
                    .to_string()
                    .into_bytes();
                let encrypted = connection
                    .send(client.request("/keys/foo/encrypt", body).unwrap())
                    .await
                    .unwrap();
                assert_eq!(encrypted.status, 200);
                let body = bodies::decrypt_from(&encrypted.body, Some(&aad))
                    .to_string()
                    .into_bytes();
                let decrypted = connection
                    .send(client.request("/keys/foo/decrypt", body).unwrap())
                    .await
                    .unwrap();
                assert_eq!(unb64(&decrypted.body["plaintext"]), plaintext);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}
