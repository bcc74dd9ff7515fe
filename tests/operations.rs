//! Production operation features over real TLS and SigV4: secondary authorization, the audit log,
//! no secret in any log line whatever the request, per-key-store quotas, graceful shutdown, hot
//! reload (credentials, certificates, log level, connection limit), the IV budget, and logs whose
//! sinks stall (lines dropped and counted, requests never held up).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use xks_proxy::client::bodies;

const POLICY: &str = r#"backend = "software"
key_file = "keys.json"
[keystore.policy]
default = "deny"
[[keystore.policy.rule]]
name = "no-mallory"
effect = "deny"
principals = ["arn:aws:iam::123456789012:user/mallory"]
[[keystore.policy.rule]]
name = "client-account-on-foo"
effect = "allow"
principals = ["arn:aws:iam::123456789012:*"]
operations = ["Encrypt", "Decrypt", "CreateKey"]
keys = ["foo"]
"#;

fn as_principal(mut body: Value, principal: &str, operation: &str) -> Value {
    body["requestMetadata"]["awsPrincipalArn"] = principal.into();
    body["requestMetadata"]["kmsOperation"] = operation.into();
    body
}

/// The audit log's records, once one of them mentions `until`.
fn audit_records(proxy: &TestProxy, until: &str) -> Vec<Value> {
    let path = proxy.dir.path().join("audit.jsonl");
    let text = eventually_blocking(&format!("an audit record with {until}"), || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains(until) {
            Ok(text)
        } else {
            Err(text)
        }
    });
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each audit line is JSON"))
        .collect()
}

#[tokio::test]
async fn policy_allows_and_denies_and_never_applies_to_health() {
    let proxy = TestProxy::start_with(ProxySpec {
        backend: POLICY.into(),
        server_extra: "audit_log = \"audit.jsonl\"".into(),
        ..Default::default()
    });
    let client = proxy.client();
    let alice = "arn:aws:iam::123456789012:user/alice";
    let cases = [
        (alice, "Encrypt", "foo", 200),
        (alice, "GenerateDataKey", "foo", 403), // operation not listed
        (alice, "Encrypt", "encrypt_only_key", 403), // key not listed
        (
            "arn:aws:iam::123456789012:user/mallory",
            "Encrypt",
            "foo",
            403,
        ), // denied first
        ("arn:aws:iam::999999999999:root", "Encrypt", "foo", 403), // other account: default
    ];
    for (principal, operation, key, status) in cases {
        let body = as_principal(bodies::encrypt(b"x", None, false), principal, operation);
        let reply = client
            .call(&format!("/keys/{key}/encrypt"), &body)
            .await
            .unwrap();
        if status == 200 {
            assert_eq!(
                reply.status, 200,
                "{principal} {operation} {key}: {reply:?}"
            );
        } else {
            assert_error(&reply, 403, "AccessDeniedException");
        }
    }
    let body = as_principal(bodies::key_metadata(), alice, "CreateKey");
    assert_eq!(
        client
            .call("/keys/foo/metadata", &body)
            .await
            .unwrap()
            .status,
        200
    );
    let body = as_principal(bodies::key_metadata(), alice, "DescribeKey");
    assert_error(
        &client.call("/keys/foo/metadata", &body).await.unwrap(),
        403,
        "AccessDeniedException",
    );
    // Health is never subject to the policy, even with default = "deny".
    assert_eq!(
        client
            .call("/health", &bodies::health())
            .await
            .unwrap()
            .status,
        200
    );

    // Each denial is audited with the statement that decided it.
    let records = audit_records(&proxy, "GetHealthStatus");
    let denied: Vec<&Value> = records
        .iter()
        .filter(|r| r["outcome"] == "AccessDeniedException")
        .collect();
    assert_eq!(denied.len(), 5, "{records:?}");
    assert!(
        denied
            .iter()
            .any(|r| r["detail"].as_str().unwrap().contains("\"no-mallory\""))
    );
    assert!(
        denied
            .iter()
            .any(|r| r["detail"].as_str().unwrap().contains("\"default\""))
    );
}

#[tokio::test]
async fn audit_records_every_request_without_secrets() {
    let proxy = TestProxy::start_with(ProxySpec {
        server_extra: format!("audit_log = \"audit.jsonl\"\n{MTLS_SERVER_LINES}"),
        ..Default::default()
    });
    let mut settings = proxy.client_settings();
    settings.client_cert = Some(proxy.client_cert("cks.kms.us-east-1.amazonaws.com"));
    let client = xks_proxy::client::XksClient::new(settings).unwrap();
    let plaintext = b"AUDIT-PLAINTEXT-CANARY-5521";
    let aad = b"AUDIT-AAD-CANARY";
    let mut body = bodies::encrypt(plaintext, Some(aad), true);
    body["requestMetadata"]["kmsRequestId"] = "audit-request-1".into();
    let encrypted = client.call("/keys/foo/encrypt", &body).await.unwrap().body;
    let decrypted = client
        .call(
            "/keys/foo/decrypt",
            &bodies::decrypt_from(&encrypted, Some(aad)),
        )
        .await
        .unwrap();
    assert_eq!(decrypted.status, 200);
    let missing = client
        .call("/keys/nope/metadata", &bodies::key_metadata())
        .await
        .unwrap();
    assert_error(&missing, 404, "KeyNotFoundException");
    let mut marker = bodies::health();
    marker["requestMetadata"]["kmsRequestId"] = "audit-last".into();
    client.call("/health", &marker).await.unwrap();

    let records = audit_records(&proxy, "audit-last");
    assert_eq!(records.len(), 4, "{records:?}");
    let first = &records[0];
    assert_eq!(first["kmsRequestId"], "audit-request-1");
    assert_eq!(first["operation"], "Encrypt");
    assert_eq!(first["kmsOperation"], "Encrypt");
    assert_eq!(first["keyId"], "foo");
    assert_eq!(first["outcome"], "ok");
    assert_eq!(first["status"], 200);
    assert_eq!(first["keystore"], URI_PATH);
    assert_eq!(
        first["principal"],
        "arn:aws:iam::123456789012:user/xks-proxy-client"
    );
    assert_eq!(first["tlsClientSubject"], "cks.kms.us-east-1.amazonaws.com");
    assert_eq!(
        first["accessKeyId"],
        proxy.credential.access_key_id.as_str()
    );
    assert!(first["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(first["latencyUs"].is_u64() && first["time"].is_string());
    assert_eq!(records[2]["outcome"], "KeyNotFoundException");
    assert_eq!(records[2]["status"], 404);
}

#[tokio::test]
async fn a_spent_quota_is_throttling() {
    let proxy = TestProxy::start_with(ProxySpec {
        backend: "backend = \"software\"\nkey_file = \"keys.json\"\nrate_limit_rps = 5\n".into(),
        ..Default::default()
    });
    // Requests that fail authentication do not spend the quota: no one without the secret can
    // lock KMS out.
    let forger = proxy.client_as(
        &proxy.credential.access_key_id,
        "NotTheSecretNotTheSecretNotTheSecretNotTheSec",
        REGION,
    );
    for _ in 0..20 {
        // A failed authentication closes the connection: each forgery connects anew.
        let mut forged = forger.connect().await.unwrap();
        let request = forger
            .request("/health", bodies::health().to_string().into_bytes())
            .unwrap();
        assert_error(
            &forged.send(request).await.unwrap(),
            401,
            "AuthenticationFailedException",
        );
    }
    // A burst on one connection until the quota refuses a request. However fast or slow this host
    // is, the burst is served what the bucket held (5: it is full, the forgeries took nothing) and
    // what refilled (5/s) while it lasted, and not one request more.
    let client = proxy.client();
    let mut connection = client.connect().await.unwrap();
    let started = std::time::Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..10_000 {
        let request = client
            .request("/health", bodies::health().to_string().into_bytes())
            .unwrap();
        let reply = connection.send(request).await.unwrap();
        let refused = reply.status == 429;
        statuses.push(reply);
        if refused {
            break;
        }
    }
    let lasted = started.elapsed().as_secs_f64();
    let throttled = statuses.last().filter(|r| r.status == 429);
    let throttled = throttled.expect("a burst of requests against a quota of 5/s is throttled");
    assert_error(throttled, 429, "ThrottlingException");
    assert!(
        statuses[..5].iter().all(|r| r.status == 200),
        "{statuses:?}"
    );
    let served = statuses.len() - 1;
    assert!(
        statuses[..served].iter().all(|r| r.status == 200),
        "{statuses:?}"
    );
    let allowed = 5.0 + 5.0 * lasted;
    assert!(
        served as f64 <= allowed + 0.001,
        "{served} requests served in {lasted:.3} s: at most {allowed:.1} are allowed"
    );
}

#[tokio::test]
async fn requests_beyond_the_in_flight_limit_are_throttled_at_once() {
    let proxy = TestProxy::start_with(ProxySpec {
        limits: "request_timeout_ms = 249\nmax_in_flight_requests = 2".into(),
        ..Default::default()
    });
    let client = proxy.client();
    let mut connection = client.connect().await.unwrap();
    let body = bodies::encrypt(b"held", None, false);
    // The two held requests stay in flight for at most the 249 ms deadline; on a loaded host that
    // window can pass before the third request gets there, so the scene is played again.
    let mut scene = None;
    for _attempt in 0..5 {
        let (one, two) = (proxy.tls_connect(None).await, proxy.tls_connect(None).await);
        let first = HalfSent::start_on(one.unwrap(), &client, "/keys/foo/encrypt", &body).await;
        let second = HalfSent::start_on(two.unwrap(), &client, "/keys/foo/encrypt", &body).await;
        // The two heads reach the server a moment after they were sent (there is no ordering
        // between connections): ask until the third request meets them there.
        let mut refused = None;
        for _ in 0..100 {
            let request = client
                .request("/health", bodies::health().to_string().into_bytes())
                .unwrap();
            let reply = connection.send(request).await.unwrap();
            if reply.status != 200 {
                refused = Some(reply);
                break;
            }
        }
        match refused {
            Some(refused) => {
                scene = Some((refused, first, second));
                break;
            }
            None => drop((first, second)),
        }
    }
    let (refused, first, second) = scene.expect("a third request in flight is refused");
    for held in [first, second] {
        let reply = held.finish().await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }
    assert_error(&refused, 429, "ThrottlingException");
    let request = client
        .request("/health", bodies::health().to_string().into_bytes())
        .unwrap();
    assert_eq!(connection.send(request).await.unwrap().status, 200);
    // Refusals are summarized in the log (at most once a second), not logged one by one.
    let log = proxy.wait_for_log("requests refused with 429 ThrottlingException");
    assert!(log.contains("in_flight_limit=1"), "{log}");
    let audit = proxy.stdout();
    assert!(
        audit.contains("\"outcome\":\"ThrottlingException\""),
        "the refusal is audited: {audit}"
    );
}

/// A signed request written by hand over its own TLS connection, stopped after the head and 10
/// bytes of body: in flight until [`HalfSent::finish`].
struct HalfSent {
    stream: TlsStream,
    rest: Vec<u8>,
}

impl HalfSent {
    async fn start(
        proxy: &TestProxy,
        client: &xks_proxy::client::XksClient,
        suffix: &str,
        body: &Value,
        client_cert: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Self {
        let stream = proxy.tls_connect(client_cert).await.unwrap();
        Self::start_on(stream, client, suffix, body).await
    }

    /// As [`HalfSent::start`], on a connection opened before (so that the request's deadline
    /// does not also cover a TLS handshake).
    async fn start_on(
        mut stream: TlsStream,
        client: &xks_proxy::client::XksClient,
        suffix: &str,
        body: &Value,
    ) -> Self {
        use tokio::io::AsyncWriteExt;
        let body = body.to_string().into_bytes();
        let request = client.request(suffix, body.clone()).unwrap();
        let mut head = format!("POST {} HTTP/1.1\r\n", request.uri());
        for (name, value) in request.headers() {
            head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
        }
        head.push_str("connection: close\r\n");
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body[..10]).await.unwrap();
        stream.flush().await.unwrap();
        Self {
            stream,
            rest: body[10..].to_vec(),
        }
    }

    /// Sends the rest of the body; returns the raw HTTP reply.
    async fn finish(mut self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(&self.rest).await.unwrap();
        self.stream.flush().await.unwrap();
        let mut reply = Vec::new();
        let read = self.stream.read_to_end(&mut reply);
        let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
        String::from_utf8_lossy(&reply).into_owned()
    }
}

/// Sends `signal` while a request is in flight: the listener closes at once, the request
/// completes, and the process exits 0.
async fn a_stop_signal_lets_an_in_flight_request_finish(signal: &str, logged: &str) {
    // The whole request, slow body included, must fit in the deadline: give it the most.
    let mut proxy = TestProxy::start_with(ProxySpec {
        limits: "request_timeout_ms = 249".into(),
        ..Default::default()
    });
    let client = proxy.client();
    let body = bodies::encrypt(b"in flight", None, false);
    let in_flight = HalfSent::start(&proxy, &client, "/keys/foo/encrypt", &body, None).await;

    let kill = std::process::Command::new("kill")
        .args([signal, &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // The signal is seen when the listener closes: new connections are refused from then on.
    // (Looked for every millisecond: the in-flight request has its 249 ms deadline to finish.)
    let closed = format!("the listener closes after {signal}");
    eventually_blocking_every(Duration::from_millis(1), &closed, || {
        match std::net::TcpStream::connect(("127.0.0.1", proxy.port)) {
            Ok(_) => Err("still accepting".to_string()),
            Err(_) => Ok(()),
        }
    });
    let reply = in_flight.finish().await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"ciphertext\""), "{reply}");
    let exit = proxy
        .wait_exit(Duration::from_secs(15))
        .expect("the proxy exits after the signal");
    assert!(exit.success(), "{exit:?}");
    let log = proxy.log();
    assert!(log.contains(logged), "{log}");
    assert!(log.contains("all connections closed"), "{log}");
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_0() {
    a_stop_signal_lets_an_in_flight_request_finish("-TERM", "SIGTERM received").await;
}

#[tokio::test]
async fn sigint_lets_an_in_flight_request_finish_then_exits_0() {
    a_stop_signal_lets_an_in_flight_request_finish("-INT", "SIGINT received").await;
}

#[tokio::test]
async fn credentials_rotate_without_a_restart_or_a_dropped_connection() {
    let mut proxy = TestProxy::start();
    let old = proxy.client();
    let mut kept_alive = old.connect().await.unwrap();
    let new_credential = xks_proxy::auth::Credential::generate().unwrap();
    let new = proxy.client_as(
        &new_credential.access_key_id,
        new_credential.secret_access_key.expose(),
        REGION,
    );
    let original = std::fs::read_to_string(&proxy.config_file).unwrap();
    let snippet = format!(
        "[[keystore.credential]]\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        new_credential.access_key_id,
        new_credential.secret_access_key.expose()
    );
    // 1. Add the new credential (picked up from the file change): both are accepted.
    std::fs::write(&proxy.config_file, format!("{original}{snippet}")).unwrap();
    eventually("the new credential is accepted", || async {
        new.call("/health", &bodies::health()).await.unwrap().status == 200
    })
    .await;
    assert_eq!(
        old.call("/health", &bodies::health()).await.unwrap().status,
        200
    );
    let request = old
        .request("/health", bodies::health().to_string().into_bytes())
        .unwrap();
    assert_eq!(
        kept_alive.send(request).await.unwrap().status,
        200,
        "a connection from before the reload"
    );

    // 2. A config that does not parse, and one that parses but fails validation (it also drops
    // the old credential), are refused whole: the running configuration stays.
    let without_old: String = original
        .split("[[keystore.credential]]")
        .next()
        .unwrap()
        .to_string();
    let invalid = format!(
        "{without_old}{snippet}[[keystore.credential]]\naccess_key_id = \"SHORT\"\nsecret_access_key = \"{}\"\n",
        new_credential.secret_access_key.expose()
    );
    for (broken, refusal) in [
        ("this is not toml", "configuration NOT reloaded"),
        (
            invalid.as_str(),
            "access_key_id: must be 20 to 30 characters",
        ),
    ] {
        let mark = proxy.log_mark();
        std::fs::write(&proxy.config_file, broken).unwrap();
        proxy.sighup();
        proxy.wait_for_log_after(mark, refusal);
        for client in [&old, &new] {
            assert_eq!(
                client
                    .call("/health", &bodies::health())
                    .await
                    .unwrap()
                    .status,
                200
            );
        }
    }

    // 3. Remove the old credential (SIGHUP): the old one fails, the new one works.
    std::fs::write(&proxy.config_file, format!("{without_old}{snippet}")).unwrap();
    proxy.sighup();
    eventually("the old credential is refused", || async {
        old.call("/health", &bodies::health()).await.unwrap().status == 401
    })
    .await;
    assert_eq!(
        new.call("/health", &bodies::health()).await.unwrap().status,
        200
    );
    assert!(proxy.is_running());
    assert_eq!(
        proxy.log().matches("xks-proxy listening").count(),
        1,
        "same process throughout"
    );
}

#[tokio::test]
async fn a_rotated_secret_file_is_picked_up_without_a_signal() {
    // The Kubernetes way: the secret lives in a mounted file that is replaced in place.
    let mut proxy = TestProxy::start();
    let secret_file = proxy.dir.path().join("secret-access-key");
    std::fs::write(&secret_file, proxy.credential.secret_access_key.expose()).unwrap();
    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    let inline = format!(
        "secret_access_key = \"{}\"",
        proxy.credential.secret_access_key.expose()
    );
    assert!(config.contains(&inline));
    std::fs::write(
        &proxy.config_file,
        config.replace(&inline, "secret_access_key_file = \"secret-access-key\""),
    )
    .unwrap();
    proxy.restart();
    let mark = proxy.log_mark();
    let old = proxy.client();
    assert_eq!(
        old.call("/health", &bodies::health()).await.unwrap().status,
        200
    );

    let rotated = xks_proxy::auth::Credential::generate().unwrap();
    let new = proxy.client_as(
        &proxy.credential.access_key_id,
        rotated.secret_access_key.expose(),
        REGION,
    );
    std::fs::write(&secret_file, rotated.secret_access_key.expose()).unwrap();
    eventually("the new secret is accepted", || async {
        new.call("/health", &bodies::health()).await.unwrap().status == 200
    })
    .await;
    assert_error(
        &old.call("/health", &bodies::health()).await.unwrap(),
        401,
        "AuthenticationFailedException",
    );
    let log = proxy.wait_for_log_after(mark, "trigger=\"file change\"");
    assert!(!log.contains(rotated.secret_access_key.expose()));
}

#[tokio::test]
async fn a_reload_applies_policy_and_client_ca_and_spares_a_request_in_flight() {
    let proxy = TestProxy::start_with(ProxySpec {
        server_extra: MTLS_SERVER_LINES.into(),
        limits: "request_timeout_ms = 249".into(),
        ..Default::default()
    });
    let (old_cert, old_key) = proxy.client_cert("cks.kms.us-east-1.amazonaws.com");
    let mut settings = proxy.client_settings();
    settings.client_cert = Some((old_cert.clone(), old_key.clone()));
    let old_ca_client = xks_proxy::client::XksClient::new(settings).unwrap();
    let mallory = "arn:aws:iam::123456789012:user/mallory";
    let by_mallory = || as_principal(bodies::encrypt(b"m", None, false), mallory, "Encrypt");
    let reply = old_ca_client.call("/keys/foo/encrypt", &by_mallory()).await;
    assert_eq!(reply.unwrap().status, 200, "no policy yet");

    // Mallory's request is in flight while a reload brings a policy against her and another
    // client CA: it completes under the configuration it started with. Everything but the write
    // and the signal is prepared first: the in-flight request has its deadline (249 ms) to finish.
    let new_ca = xks_proxy::dev::DevCa::generate("rotated client CA").unwrap();
    std::fs::write(proxy.dir.path().join("client-ca-2.pem"), new_ca.cert_pem()).unwrap();
    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    let config = config.replace("client-ca.pem", "client-ca-2.pem");
    let policy = "[keystore.policy]\ndefault = \"allow\"\n[[keystore.policy.rule]]\nname = \"no-mallory\"\neffect = \"deny\"\nprincipals = [\"arn:aws:iam::123456789012:user/mallory\"]\n";
    let new_config = format!("{config}{policy}");
    let mark = proxy.log_mark();
    let in_flight = HalfSent::start(
        &proxy,
        &old_ca_client,
        "/keys/foo/encrypt",
        &by_mallory(),
        Some((&old_cert, &old_key)),
    )
    .await;
    std::fs::write(&proxy.config_file, new_config).unwrap();
    proxy.sighup();
    proxy.wait_for_log_after(mark, "configuration reloaded");
    let reply = in_flight.finish().await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    // New handshakes need the new CA; new requests meet the policy.
    assert!(
        old_ca_client
            .call("/health", &bodies::health())
            .await
            .is_err(),
        "a certificate from the old client CA is refused"
    );
    let issued = new_ca
        .issue_client("cks.kms.us-east-1.amazonaws.com")
        .unwrap();
    let new_cert = proxy.dir.path().join("new-client.pem");
    let new_key = proxy.dir.path().join("new-client-key.pem");
    std::fs::write(&new_cert, issued.cert_pem).unwrap();
    xks_proxy::dev::write_private(&new_key, &issued.key_pem).unwrap();
    let mut settings = proxy.client_settings();
    settings.client_cert = Some((new_cert, new_key));
    let new_ca_client = xks_proxy::client::XksClient::new(settings).unwrap();
    let reply = new_ca_client.call("/keys/foo/encrypt", &by_mallory()).await;
    assert_error(&reply.unwrap(), 403, "AccessDeniedException");
    let alice = as_principal(
        bodies::encrypt(b"a", None, false),
        "arn:aws:iam::123456789012:user/alice",
        "Encrypt",
    );
    let reply = new_ca_client.call("/keys/foo/encrypt", &alice).await;
    assert_eq!(reply.unwrap().status, 200);
}

#[tokio::test]
async fn a_new_certificate_is_served_to_new_handshakes() {
    let proxy = TestProxy::start();
    let other_ca = xks_proxy::dev::DevCa::generate("rotated CA").unwrap();
    let issued = other_ca.issue_server(&["localhost"]).unwrap();
    let other_ca_file = proxy.dir.path().join("rotated-ca.pem");
    std::fs::write(&other_ca_file, other_ca.cert_pem()).unwrap();
    let mut settings = proxy.client_settings();
    settings.ca_file = other_ca_file;
    let trusting_new = xks_proxy::client::XksClient::new(settings).unwrap();
    assert!(
        trusting_new
            .call("/health", &bodies::health())
            .await
            .is_err()
    );

    std::fs::write(proxy.dir.path().join("server.pem"), &issued.cert_pem).unwrap();
    xks_proxy::dev::write_private(&proxy.dir.path().join("server-key.pem"), &issued.key_pem)
        .unwrap();
    // No signal: the changed files are noticed (SIGHUP is tested with the other reloads).
    eventually("the rotated certificate is served", || async {
        matches!(trusting_new.call("/health", &bodies::health()).await, Ok(r) if r.status == 200)
    })
    .await;
    assert!(
        proxy
            .client()
            .call("/health", &bodies::health())
            .await
            .is_err(),
        "the old CA no longer matches"
    );
}

#[tokio::test]
async fn metrics_are_scraped_from_their_own_listener() {
    let metrics_port = free_port();
    let proxy = TestProxy::start_with(ProxySpec {
        limits: format!("max_connections = 4096\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\""),
        ..Default::default()
    });
    let client = proxy.client();
    for _ in 0..3 {
        let reply = client
            .call("/keys/foo/encrypt", &bodies::encrypt(b"m", None, false))
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    let missing = client
        .call("/keys/nope/encrypt", &bodies::encrypt(b"m", None, false))
        .await
        .unwrap();
    assert_error(&missing, 404, "KeyNotFoundException");

    let text = scrape(metrics_port);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let ks = "keystore=\"/example/kms/xks/v1\"";
    assert_eq!(
        sample(
            &text,
            &format!("xks_requests_total{{{ks},operation=\"Encrypt\",outcome=\"ok\"}}")
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "xks_requests_total{{{ks},operation=\"Encrypt\",outcome=\"KeyNotFoundException\"}}"
            )
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!("xks_request_duration_seconds_count{{{ks},operation=\"Encrypt\"}}")
        ),
        Some(4.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!("xks_key_encryptions_total{{{ks},key=\"foo\"}}")
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, &format!("xks_ekm_health{{{ks},ekm=\"software-1\"}}")),
        Some(2.0)
    );
    assert!(text.contains("# TYPE xks_requests counter"));
    // Calls into the key manager: the three Encrypts and the failed lookup.
    assert_eq!(
        sample(
            &text,
            &format!("xks_keystore_call_duration_seconds_count{{{ks},call=\"encrypt\"}}")
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "xks_keystore_call_errors_total{{{ks},call=\"encrypt\",error=\"key_not_found\"}}"
            )
        ),
        Some(1.0)
    );
    check_exposition(&text);

    // A connection that sends nothing is closed by the metrics listener; scrapes go on.
    let idle: Vec<_> = (0..20)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap())
        .collect();
    for mut connection in idle {
        use std::io::Read;
        connection
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buffer = [0u8; 64];
        // A read with a timeout is not restarted after a signal (socket(7)): ask again.
        let read = loop {
            match connection.read(&mut buffer) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                read => break read,
            }
        };
        assert_eq!(read.unwrap(), 0, "an idle metrics connection is closed");
    }
    assert!(scrape(metrics_port).starts_with("HTTP/1.1 200"));
}

/// Checks a scrape line by line: OpenMetrics text ending in `# EOF`, every sample a name, optional
/// labels and a number, and every histogram's buckets cumulative and ending at `+Inf` = `_count`.
fn check_exposition(response: &str) {
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "{body}");
    let mut buckets: std::collections::HashMap<String, Vec<f64>> = Default::default();
    for line in &lines[..lines.len() - 1] {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            assert!(
                matches!(words.next(), Some("HELP" | "TYPE" | "UNIT")) && words.next().is_some(),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("a number: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "{line}");
        }
        if let Some(base) = name.strip_suffix("_bucket") {
            let labels = &series[name_end..];
            // The same labels without `le` (which prometheus-client writes first).
            let inner = labels.trim_start_matches('{').trim_end_matches('}');
            let others: Vec<String> = inner
                .split("\",")
                .filter(|pair| !pair.is_empty() && !pair.starts_with("le="))
                .map(|pair| format!("{}\"", pair.trim_end_matches('"')))
                .collect();
            let without_le = if others.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", others.join(","))
            };
            buckets
                .entry(format!("{base}{without_le}"))
                .or_default()
                .push(value);
            if labels.contains("le=\"+Inf\"") {
                let count = format!("{base}_count{without_le} ");
                assert_eq!(sample(body, &count), Some(value), "{line}");
            }
        }
    }
    assert!(!buckets.is_empty(), "histograms in {body}");
    for (series, counts) in buckets {
        assert!(
            counts.windows(2).all(|w| w[0] <= w[1]),
            "{series}: {counts:?}"
        );
    }
}

/// SIGTERM a moment after stdout (the audit log) stalled, with the audit queue full: the proxy
/// still exits. Before the sink has been blocked long enough to count as stalled, closing the
/// audit queue used to wait on it (its guard prints a complaint to that same stdout).
#[tokio::test]
async fn sigterm_right_after_the_audit_sink_stalls_still_exits() {
    let mut proxy = TestProxy::start_with_unread_output(ProxySpec {
        server_extra: "audit_queue_lines = 1".into(),
        ..Default::default()
    });
    // About 300 bytes a record: 400 records overfill the 64 KiB pipe and the one-line queue, and
    // the last ones come within moments of the first write that blocks.
    encrypts_all_ok(&proxy, 400, 1).await;
    stop(&mut proxy);
}

/// SIGTERM, then waits (hang guard) for a clean exit.
fn stop(proxy: &mut TestProxy) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = proxy
        .wait_exit(Duration::from_secs(20))
        .expect("the proxy exits after SIGTERM");
    assert!(exit.success(), "{exit:?}");
}

async fn health_status(client: &xks_proxy::client::XksClient) -> String {
    let reply = client.call("/health", &bodies::health()).await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body["ekmFleetDetails"][0]["healthStatus"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn encrypt_ok(client: &xks_proxy::client::XksClient, key: &str, cdiv: bool) -> Value {
    let reply = client
        .call(
            &format!("/keys/{key}/encrypt"),
            &bodies::encrypt(b"budget", None, cdiv),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body
}

#[tokio::test]
async fn iv_budget_warns_in_health_logs_and_metrics_and_survives_a_restart() {
    const WARNING: &str = "past its random-IV budget warning level";
    let metrics_port = free_port();
    // A fleet of 2: this instance's share is 2^31 encryptions per key; 1e-9 of it is 2.15, so the
    // third encryption of a key crosses the warning level.
    let mut proxy = TestProxy::start_with(ProxySpec {
        server_extra:
            "fleet_size = 2\n[iv_budget]\nwarn_fraction = 1e-9\nledger = \"iv-ledger.json\"".into(),
        limits: format!("max_connections = 4096\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\""),
        ..Default::default()
    });
    let client = proxy.client();
    assert_eq!(health_status(&client).await, "ACTIVE");
    let health = client.call("/health", &bodies::health()).await.unwrap();
    assert_eq!(health.body["xksProxyFleetSize"], 2, "{health:?}");
    let sealed = encrypt_ok(&client, "foo", false).await;
    encrypt_ok(&client, "foo", true).await; // CDIV: one encryption (and a verification decrypt)
    encrypt_ok(&client, "encrypt_only_key", false).await;
    for _ in 0..5 {
        // Decrypts use no IV.
        let reply = client
            .call("/keys/foo/decrypt", &bodies::decrypt_from(&sealed, None))
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    assert_eq!(health_status(&client).await, "ACTIVE");
    assert!(!proxy.log().contains(WARNING));

    encrypt_ok(&client, "foo", false).await;
    assert_eq!(health_status(&client).await, "DEGRADED");
    let log = proxy.wait_for_log(WARNING);
    let line = log.lines().find(|l| l.contains(WARNING)).unwrap();
    assert!(
        line.contains("key=\"foo\"") && line.contains("encryptions=3"),
        "{line}"
    );
    let text = scrape(metrics_port);
    let ratio = sample(
        &text,
        "xks_key_iv_budget_used_ratio{keystore=\"/example/kms/xks/v1\",key=\"foo\"}",
    )
    .expect("the IV-budget gauge");
    assert_eq!(ratio, 3.0 / 2f64.powi(31), "{text}");

    // A clean stop writes the ledger; a restart starts from it, and is DEGRADED at once.
    stop(&mut proxy);
    let ledger: Value = serde_json::from_str(
        &std::fs::read_to_string(proxy.dir.path().join("iv-ledger.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ledger["encryptions"][URI_PATH]["foo"], 3, "{ledger}");
    assert_eq!(ledger["encryptions"][URI_PATH]["encrypt_only_key"], 1);
    proxy.restart();
    assert_eq!(health_status(&client).await, "DEGRADED");
    assert_eq!(
        proxy.log().matches(WARNING).count(),
        2,
        "warned again at start"
    );

    // Reloading with a higher warning level clears it.
    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    std::fs::write(
        &proxy.config_file,
        config.replace("warn_fraction = 1e-9", "warn_fraction = 0.5"),
    )
    .unwrap();
    proxy.sighup();
    eventually("health is ACTIVE again", || async {
        health_status(&client).await == "ACTIVE"
    })
    .await;
}

#[tokio::test]
async fn log_level_follows_the_config_file_on_reload() {
    let proxy = TestProxy::start_with(ProxySpec {
        server_extra: "log_level = \"warn\"".into(),
        ..Default::default()
    });
    let client = proxy.client();
    let request_line = |log: &str, id: &str| {
        log.lines()
            .any(|l| l.contains(&format!("kms_request_id=\"{id}\"")))
    };
    let mut body = bodies::health();
    body["requestMetadata"]["kmsRequestId"] = "quiet-1".into();
    assert_eq!(client.call("/health", &body).await.unwrap().status, 200);

    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    std::fs::write(
        &proxy.config_file,
        config.replace("log_level = \"warn\"", "log_level = \"info\""),
    )
    .unwrap();
    proxy.sighup();
    proxy.wait_for_log("configuration reloaded");
    body["requestMetadata"]["kmsRequestId"] = "loud-1".into();
    assert_eq!(client.call("/health", &body).await.unwrap().status, 200);
    let log = proxy.wait_for_log("kms_request_id=\"loud-1\"");
    assert!(log.contains("log level changing"), "{log}");
    assert!(request_line(&log, "loud-1"), "{log}");
    assert!(!request_line(&log, "quiet-1"), "{log}");

    // A filter that names no level is refused: the running level stays.
    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    std::fs::write(
        &proxy.config_file,
        config.replace("log_level = \"info\"", "log_level = \"loud\""),
    )
    .unwrap();
    proxy.sighup();
    let log = proxy.wait_for_log("server.log_level");
    assert!(log.contains("configuration NOT reloaded"), "{log}");
    body["requestMetadata"]["kmsRequestId"] = "loud-2".into();
    assert_eq!(client.call("/health", &body).await.unwrap().status, 200);
    assert!(request_line(
        &proxy.wait_for_log("kms_request_id=\"loud-2\""),
        "loud-2"
    ));
}

/// The client's port of a raw TLS connection (its end in [`sockets`]).
fn client_port(stream: &TlsStream) -> u16 {
    stream.get_ref().0.local_addr().unwrap().port()
}

/// Writes the start of a request head on `connection` and waits until the server has read it:
/// from then on the connection is busy (a head under way), never evicted for a newcomer and never
/// idle for a graceful shutdown.
async fn begin_a_head(proxy: &TestProxy, connection: &mut TlsStream) {
    use tokio::io::AsyncWriteExt;
    connection
        .write_all(format!("POST {URI_PATH}/health HTTP/1.1\r\nhost: localhost\r\n").as_bytes())
        .await
        .unwrap();
    connection.flush().await.unwrap();
    let port = client_port(connection);
    eventually("the server read the start of a request head", || async {
        sockets::server_read_all(proxy.port, port)
    })
    .await;
}

/// Opens a TCP connection and starts the TLS handshake on it in a task; returns once the server
/// has accepted the connection (taken it off its listen queue) and left its ClientHello unread:
/// it is waiting for a connection slot.
async fn connect_and_wait_for_a_slot(
    proxy: &TestProxy,
) -> tokio::task::JoinHandle<std::io::Result<TlsStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    let port = tcp.local_addr().unwrap().port();
    let handshake = tokio::spawn(tls_handshake(tcp, &proxy.ca_file, None));
    eventually(
        "the server accepted the connection and left it unread",
        || async {
            sockets::accept_queue(proxy.port) == 0 && sockets::server_holds_unread(proxy.port, port)
        },
    )
    .await;
    handshake
}

#[tokio::test]
async fn a_reload_resizes_the_connection_limit() {
    use tokio::io::AsyncWriteExt;
    let proxy = TestProxy::start_with(ProxySpec {
        limits: "max_connections = 2".into(),
        ..Default::default()
    });
    let client = proxy.client();
    // Two connections in the middle of a request head: busy, so not evicted for a newcomer.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut connection = proxy.tls_connect(None).await.unwrap();
        begin_a_head(&proxy, &mut connection).await;
        held.push(connection);
    }
    // Both slots are held: a third client is accepted but not even handshaken.
    let third = connect_and_wait_for_a_slot(&proxy).await;
    assert!(!third.is_finished(), "a third connection was let in");

    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    std::fs::write(
        &proxy.config_file,
        config.replace("max_connections = 2", "max_connections = 3"),
    )
    .unwrap();
    proxy.sighup();
    let mut third = tokio::time::timeout(HANG_GUARD, third)
        .await
        .expect("the third connection is served after the reload")
        .unwrap()
        .unwrap();

    // Shrinking takes effect as connections close: with max_connections = 1 and every earlier
    // connection gone, one client is served and the next waits for it.
    let reloads = || proxy.log().matches("configuration reloaded").count();
    let before = reloads();
    std::fs::write(
        &proxy.config_file,
        config.replace("max_connections = 2", "max_connections = 1"),
    )
    .unwrap();
    proxy.sighup();
    eventually("the reload to 1", || async { reloads() > before }).await;
    third.shutdown().await.unwrap();
    let closed: Vec<u16> = held.iter().chain([&third]).map(client_port).collect();
    drop((held, third));
    eventually("the server sees the three close", || async {
        closed
            .iter()
            .all(|port| sockets::server_end(proxy.port, *port).is_none())
    })
    .await;
    let mut only = client.connect().await.unwrap();
    let request = client
        .request("/health", bodies::health().to_string().into_bytes())
        .unwrap();
    assert_eq!(only.send(request).await.unwrap().status, 200);
    // Busy (a request head under way), so the next client cannot evict it.
    let mut only = proxy.tls_connect(None).await.unwrap();
    begin_a_head(&proxy, &mut only).await;
    let waiting = connect_and_wait_for_a_slot(&proxy).await;
    assert!(!waiting.is_finished(), "a second connection was let in");
    drop(only);
    tokio::time::timeout(HANG_GUARD, waiting)
        .await
        .expect("the waiting connection is served once the first closes")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn the_shutdown_grace_period_is_configurable() {
    use tokio::io::AsyncReadExt;
    let mut proxy = TestProxy::start_with(ProxySpec {
        limits: "shutdown_grace_ms = 300".into(),
        ..Default::default()
    });
    // A request head that never finishes (within header_read_timeout_ms, 5 s) keeps its
    // connection open past the grace period; request bodies are cut off by the request deadline.
    let mut stream = proxy.tls_connect(None).await.unwrap();
    begin_a_head(&proxy, &mut stream).await;
    proxy.wait_for_log("xks-proxy listening");
    stop(&mut proxy);
    let log = proxy.log();
    assert!(log.contains("grace_ms=300"), "{log}");
    assert!(log.contains("grace period over"), "{log}");
    // Dropped, not answered: the client reads the end of the connection (EOF, or a reset).
    let mut rest = Vec::new();
    let read = tokio::time::timeout(HANG_GUARD, stream.read_to_end(&mut rest))
        .await
        .expect("the connection is closed");
    assert!(
        rest.is_empty(),
        "an answer instead of a dropped connection: {}",
        String::from_utf8_lossy(&rest)
    );
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the connection is closed: {read:?}"
    );
}

/// Signs `body` for `suffix` and keeps the request's signature, to look for it in the logs later.
fn signed(
    client: &xks_proxy::client::XksClient,
    suffix: &str,
    body: Vec<u8>,
    signatures: &mut Vec<String>,
) -> hyper::Request<http_body_util::Full<hyper::body::Bytes>> {
    let request = client.request(suffix, body).unwrap();
    let authorization = request.headers()["authorization"].to_str().unwrap();
    let signature = authorization.rsplit("Signature=").next().unwrap();
    assert_eq!(signature.len(), 64, "{authorization}");
    signatures.push(signature.to_owned());
    request
}

#[tokio::test]
async fn no_log_line_carries_a_secret_from_any_operation_or_error() {
    // Every operation and every error a client can cause, each carrying distinctive values, with
    // the diagnostic log at its most verbose (dependencies included) and the audit log on.
    let mut proxy = TestProxy::start_with(ProxySpec {
        backend: POLICY
            .replace("keys.json\"\n", "keys.json\"\nrate_limit_rps = 40\n")
            .replace("default = \"deny\"", "default = \"allow\""),
        server_extra: "audit_log = \"audit.jsonl\"\nlog_level = \"trace\"".into(),
        ..Default::default()
    });
    proxy.cli(&["keys", "create", "disabled_key"]);
    proxy.cli(&["keys", "disable", "disabled_key"]);
    let client = proxy.client();
    eventually("the running server sees the disabled key", || async {
        let body = bodies::key_metadata();
        let reply = client.call("/keys/disabled_key/metadata", &body).await;
        reply.unwrap().body["keyStatus"] == "DISABLED"
    })
    .await;
    let mut connection = client.connect().await.unwrap();
    let mut signatures = Vec::new();
    let plaintext = b"LOG-PLAINTEXT-CANARY-40917";
    let aad = b"LOG-AAD-CANARY-88";
    let wrong_aad = b"LOG-WRONG-AAD-CANARY-31";
    let not_base64 = "LOG-NOT-BASE64-CANARY-77!!";
    let oversized = b"LOG-OVERSIZED-CANARY-5".repeat(4000);
    let wrong_secret = "LOGwrongSECRETcanary0000000000000000000001";
    let alice = "arn:aws:iam::123456789012:user/alice";
    let mallory = "arn:aws:iam::123456789012:user/mallory";

    let mut send = async |suffix: &str, body: Value, signatures: &mut Vec<String>| {
        let request = signed(&client, suffix, body.to_string().into_bytes(), signatures);
        match connection.send(request.clone()).await {
            Ok(reply) => reply,
            // A refused authentication or route closes the connection: connect anew.
            Err(_) => {
                connection = client.connect().await.unwrap();
                connection.send(request).await.unwrap()
            }
        }
    };
    let mut encrypt_body = as_principal(
        bodies::encrypt(plaintext, Some(aad), true),
        alice,
        "Encrypt",
    );
    encrypt_body["requestMetadata"]["kmsRequestId"] = "log-request-id-1".into();
    let encrypted = send("/keys/foo/encrypt", encrypt_body, &mut signatures).await;
    assert_eq!(encrypted.status, 200, "{encrypted:?}");
    let encrypted = encrypted.body;
    let decrypt_body = as_principal(
        bodies::decrypt_from(&encrypted, Some(aad)),
        alice,
        "Decrypt",
    );
    let decrypted = send("/keys/foo/decrypt", decrypt_body, &mut signatures).await;
    assert_eq!(unb64(&decrypted.body["plaintext"]), plaintext);
    let metadata = as_principal(bodies::key_metadata(), alice, "CreateKey");
    assert_eq!(
        send("/keys/foo/metadata", metadata, &mut signatures)
            .await
            .status,
        200
    );
    assert_eq!(
        send("/health", bodies::health(), &mut signatures)
            .await
            .status,
        200
    );

    let mut bad_base64 = bodies::encrypt(plaintext, None, false);
    bad_base64["plaintext"] = not_base64.into();
    let errors = [
        ("/keys/foo/encrypt", bad_base64, 400, "ValidationException"),
        (
            "/keys/foo/decrypt",
            bodies::decrypt_from(&encrypted, Some(wrong_aad)),
            400,
            "InvalidCiphertextException",
        ),
        (
            "/keys/encrypt_only_key/decrypt",
            bodies::decrypt_from(&encrypted, Some(aad)),
            400,
            "InvalidKeyUsageException",
        ),
        (
            "/keys/disabled_key/encrypt",
            bodies::encrypt(plaintext, Some(aad), false),
            400,
            "InvalidStateException",
        ),
        (
            "/keys/missing/encrypt",
            bodies::encrypt(plaintext, Some(aad), false),
            404,
            "KeyNotFoundException",
        ),
        (
            "/keys/foo/encrypt",
            as_principal(
                bodies::encrypt(plaintext, Some(aad), false),
                mallory,
                "Encrypt",
            ),
            403,
            "AccessDeniedException",
        ),
        (
            "/keys/foo/encrypt",
            bodies::encrypt(&oversized, None, false),
            501,
            "UnsupportedOperationException",
        ),
    ];
    for (suffix, body, status, error) in errors {
        let reply = send(suffix, body, &mut signatures).await;
        assert_error(&reply, status, error);
    }
    // A wrong secret: 401. Neither its signature nor the one the proxy expected (the one the right
    // secret gives the same request) is logged.
    let forger = proxy.client_as(&proxy.credential.access_key_id, wrong_secret, REGION);
    let body = bodies::encrypt(plaintext, Some(aad), false).to_string();
    let now = std::time::SystemTime::now();
    let forged = forger
        .request_at("/keys/foo/encrypt", body.clone().into_bytes(), now)
        .unwrap();
    let expected = client
        .request_at("/keys/foo/encrypt", body.into_bytes(), now)
        .unwrap();
    for request in [&forged, &expected] {
        let authorization = request.headers()["authorization"].to_str().unwrap();
        signatures.push(
            authorization
                .rsplit("Signature=")
                .next()
                .unwrap()
                .to_owned(),
        );
    }
    assert_error(
        &forger.connect().await.unwrap().send(forged).await.unwrap(),
        401,
        "AuthenticationFailedException",
    );
    // Bodies a parser refuses, on a connection of their own, each carrying a canary: not JSON, a
    // field of the wrong JSON type, a value outside its enumeration; and a GET on an API path.
    let mut wrong_type = bodies::encrypt(plaintext, None, false);
    wrong_type["plaintext"] = json!({ "LOG-TYPE-CANARY-55": [1] });
    let mut wrong_enum = bodies::encrypt(plaintext, None, false);
    wrong_enum["encryptionAlgorithm"] = "LOG-ALG-CANARY-12".into();
    let unparsable = [
        br#"{"requestMetadata":{"kmsRequestId":"LOG-MALFORMED-CANARY-9"#.to_vec(),
        wrong_type.to_string().into_bytes(),
        wrong_enum.to_string().into_bytes(),
    ];
    let mut other = client.connect().await.unwrap();
    for body in unparsable {
        let request = signed(&client, "/keys/foo/encrypt", body, &mut signatures);
        let reply = other.send(request).await.unwrap();
        assert_error(&reply, 400, "ValidationException");
    }
    let mut get = signed(
        &client,
        "/keys/foo/encrypt",
        bodies::encrypt(plaintext, Some(aad), false)
            .to_string()
            .into_bytes(),
        &mut signatures,
    );
    *get.method_mut() = hyper::Method::GET;
    let reply = other.send(get).await.unwrap();
    assert_error(&reply, 405, "UnsupportedOperationException");
    // A key store that does not exist.
    let mut settings = proxy.client_settings();
    settings.uri_path = "/example/elsewhere/kms/xks/v1".into();
    let elsewhere = xks_proxy::client::XksClient::new(settings).unwrap();
    let request = signed(
        &elsewhere,
        "/keys/foo/encrypt",
        bodies::encrypt(plaintext, Some(aad), false)
            .to_string()
            .into_bytes(),
        &mut signatures,
    );
    assert_error(
        &elsewhere
            .connect()
            .await
            .unwrap()
            .send(request)
            .await
            .unwrap(),
        404,
        "InvalidUriPathException",
    );
    // The quota (40/s) spent by a burst.
    let mut throttled = None;
    for _ in 0..1000 {
        let reply = send(
            "/keys/foo/encrypt",
            bodies::encrypt(plaintext, Some(aad), false),
            &mut signatures,
        )
        .await;
        if reply.status == 429 {
            throttled = Some(reply);
            break;
        }
    }
    assert_error(
        &throttled.expect("a burst is throttled"),
        429,
        "ThrottlingException",
    );

    let mut marker = bodies::health();
    marker["requestMetadata"]["kmsRequestId"] = "log-last".into();
    eventually("the quota refills", || async {
        proxy
            .client()
            .call("/health", &marker)
            .await
            .unwrap()
            .status
            == 200
    })
    .await;
    let audit_outcomes: Vec<String> = audit_records(&proxy, "log-last")
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_owned())
        .collect();
    let log = proxy.wait_for_log("log-last");
    assert!(log.contains("log-request-id-1"), "request ids are logged");
    for outcome in [
        "ValidationException",
        "InvalidCiphertextException",
        "InvalidKeyUsageException",
        "InvalidStateException",
        "KeyNotFoundException",
        "AccessDeniedException",
        "UnsupportedOperationException",
        "AuthenticationFailedException",
        "InvalidUriPathException",
        "ThrottlingException",
    ] {
        assert!(
            audit_outcomes.iter().any(|o| o == outcome),
            "{outcome} audited: {audit_outcomes:?}"
        );
    }

    let keys = std::fs::read_to_string(proxy.dir.path().join("keys.json")).unwrap();
    let key_material: Vec<String> = serde_json::from_str::<Value>(&keys).unwrap()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["material"].as_str().unwrap().to_string())
        .collect();
    let canaries = [
        String::from_utf8_lossy(plaintext).into_owned(),
        b64(plaintext),
        String::from_utf8_lossy(aad).into_owned(),
        b64(aad),
        b64(wrong_aad),
        "CANARY".into(),
        b64(&oversized[..30]),
        not_base64.into(),
        "LOG-MALFORMED-CANARY".into(),
        "LOG-TYPE-CANARY".into(),
        "LOG-ALG-CANARY".into(),
        encrypted["ciphertext"].as_str().unwrap().into(),
        encrypted["authenticationTag"].as_str().unwrap().into(),
        proxy.credential.secret_access_key.expose().into(),
        wrong_secret.into(),
    ];
    // Everything the process wrote, shutdown included.
    stop(&mut proxy);
    let audit = std::fs::read_to_string(proxy.dir.path().join("audit.jsonl")).unwrap();
    let every_line = format!("{audit}\n{}\n{}", proxy.log(), proxy.stdout());
    assert!(every_line.contains("all connections closed"));
    for secret in canaries.iter().chain(&key_material).chain(&signatures) {
        assert!(
            !every_line.contains(secret.as_str()),
            "{secret} is in a log"
        );
    }
}

/// `n` signed Encrypts over `workers` keep-alive connections; each must answer 200 within a hang
/// guard (10 s, far above any real latency: only a request held up by a log would take it).
async fn encrypts_all_ok(proxy: &TestProxy, n: usize, workers: usize) {
    let client = std::sync::Arc::new(proxy.client());
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let client = std::sync::Arc::clone(&client);
        let share = n / workers + usize::from(worker < n % workers);
        tasks.push(tokio::spawn(async move {
            let mut connection = client.connect().await.expect("connect");
            for _ in 0..share {
                let body = bodies::encrypt(b"log sink", None, false).to_string();
                let request = client
                    .request("/keys/foo/encrypt", body.into_bytes())
                    .unwrap();
                let reply = tokio::time::timeout(Duration::from_secs(10), connection.send(request))
                    .await
                    .expect("a request waited 10 s: a stalled log sink held it up")
                    .expect("a reply");
                assert_eq!(reply.status, 200, "{reply:?}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

fn lines_dropped(metrics_port: u16, log: &str) -> f64 {
    let text = scrape(metrics_port);
    sample(
        &text,
        &format!("xks_log_lines_dropped_total{{log=\"{log}\"}}"),
    )
    .unwrap_or_else(|| panic!("no drop counter for the {log} log:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_log_sinks_drop_counted_lines_and_never_hold_up_requests() {
    let metrics_port = free_port();
    // stdout (audit) and stderr (diagnostic log) are pipes nobody reads.
    let mut proxy = TestProxy::start_with_unread_output(ProxySpec {
        server_extra: "audit_queue_lines = 1024".into(),
        limits: format!("max_connections = 4096\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\""),
        ..Default::default()
    });
    assert_eq!(lines_dropped(metrics_port, "audit"), 0.0);
    assert_eq!(lines_dropped(metrics_port, "diagnostic"), 0.0);

    // Fill both pipes (64 KiB each) and both queues: 1024 audit records, 16384 log lines (one
    // request line per request at INFO), then lines are dropped.
    let mut sent = 0;
    while lines_dropped(metrics_port, "diagnostic") == 0.0 {
        assert!(
            sent < 60_000,
            "{sent} requests and no diagnostic line dropped"
        );
        encrypts_all_ok(&proxy, 2_000, 4).await;
        sent += 2_000;
    }
    let audit_before = lines_dropped(metrics_port, "audit");
    let log_before = lines_dropped(metrics_port, "diagnostic");
    assert!(audit_before > 0.0);

    // With both sinks stalled, requests go on being answered; each of their records is lost and
    // counted.
    encrypts_all_ok(&proxy, 2_000, 4).await;
    assert_eq!(lines_dropped(metrics_port, "audit") - audit_before, 2_000.0);
    assert!(lines_dropped(metrics_port, "diagnostic") - log_before >= 2_000.0);
    assert!(proxy.is_running());

    // Once stderr is read again, the queued lines come out, then a WARN per log says what was lost.
    let audit_lost = lines_dropped(metrics_port, "audit");
    let stderr = proxy.take_stderr().expect("the stderr pipe");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let seen = std::sync::Arc::clone(&seen);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("log lines dropped") {
                    let mut seen = seen.lock().unwrap();
                    seen.push_str(&line);
                    seen.push('\n');
                }
            }
        })
    };
    // A WARN comes at most every 10 s per log and says how many since the last one, and in all:
    // the audit log's last one has the total the metric shows.
    let audit_warning = "log=\"audit\" lines=";
    let audit_total = format!("total={audit_lost}");
    eventually_ok(
        "a WARN with the audit log's total and one for the diagnostic log",
        || async {
            let seen = seen.lock().unwrap();
            let audit_total_seen = seen
                .lines()
                .any(|l| l.contains(audit_warning) && l.ends_with(&audit_total));
            if audit_total_seen && seen.contains("log=\"diagnostic\" lines=") {
                Ok(())
            } else {
                Err(format!("{audit_total} wanted; seen:\n{seen}"))
            }
        },
    )
    .await;
    encrypts_all_ok(&proxy, 100, 1).await;

    // With stdout still stalled, SIGTERM still ends the process (its audit queue is not waited for).
    stop(&mut proxy);
    reader.join().unwrap();
}
