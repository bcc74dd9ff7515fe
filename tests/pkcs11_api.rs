//! The proxy binary with a `pkcs11` key store on a real SoftHSM v2 token, over real TLS and SigV4:
//! the four operations, the usage matrix, tampering, key management through the CLI on a running
//! server, `config check` logging in and finding the listed keys, the official conformance client
//! with every suite, and a clean shutdown (sessions closed, logout, C_Finalize) as recorded by
//! OpenSC's pkcs11-spy. The PIN is distinctive and no log line or command output may contain it.
//!
//! Each test makes its own token in a temporary directory with `hsm-config/create-softhsm-token.sh`
//! and points the server at it with `SOFTHSM2_CONF`. Without SoftHSM the tests are skipped, unless
//! `CI` or `XKS_REQUIRE_SOFTHSM=1` is set: then they fail.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use xks_proxy::client::bodies;

/// Distinctive, so the tests can look for it in every log and output.
const PIN: &str = "xks-PIN-canary-40917";

/// A proxy serving a fresh SoftHSM token, or `None` when SoftHSM is absent outside CI.
fn softhsm_proxy(server_extra: &str, limits: &str) -> Option<(TestProxy, tempfile::TempDir)> {
    softhsm_proxy_through(SOFTHSM_MODULE, Vec::new(), server_extra, limits)
}

/// [`softhsm_proxy`] loading `module` (SoftHSM itself, or a module wrapping it) with `env`.
fn softhsm_proxy_through(
    module: &str,
    env: Vec<(String, String)>,
    server_extra: &str,
    limits: &str,
) -> Option<(TestProxy, tempfile::TempDir)> {
    let token = softhsm_token(PIN)?;
    let token_dir = token.path();
    let backend = format!(
        "backend = \"pkcs11\"\n[keystore.pkcs11]\nmodule = \"{module}\"\ntoken_label = \"xks-proxy\"\npin_env = \"XKS_HSM_PIN\"\n"
    );
    let proxy = TestProxy::start_with(ProxySpec {
        backend,
        create_keys: false,
        server_extra: server_extra.into(),
        limits: limits.into(),
        env: vec![
            (
                "SOFTHSM2_CONF".into(),
                token_dir.join("softhsm2.conf").display().to_string(),
            ),
            ("XKS_HSM_PIN".into(), PIN.into()),
        ]
        .into_iter()
        .chain(env)
        .collect(),
    });
    Some((proxy, token))
}

#[tokio::test]
async fn four_operations_and_the_usage_matrix_on_softhsm() {
    let metrics_port = free_port();
    let metrics =
        format!("max_connections = 4096\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"");
    let Some((proxy, _token)) = softhsm_proxy("", &metrics) else {
        return;
    };
    let client = proxy.client();

    let health = client.call("/health", &bodies::health()).await.unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(health.body["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");
    assert!(
        health.body["ekmVendor"]
            .as_str()
            .unwrap()
            .contains("SoftHSM"),
        "{}",
        health.body
    );

    assert_usage_matrix(&client).await;
    // The health-check key is not a KMS key.
    let reply = client
        .call("/keys/xks-health-check/metadata", &bodies::key_metadata())
        .await
        .unwrap();
    assert_error(&reply, 404, "KeyNotFoundException");

    let aad = b"project=nile".as_slice();
    let encrypted = client
        .call(
            "/keys/foo/encrypt",
            &bodies::encrypt(b"in the HSM", Some(aad), true),
        )
        .await
        .unwrap();
    assert_eq!(encrypted.status, 200, "{encrypted:?}");
    assert_eq!(unb64(&encrypted.body["initializationVector"]).len(), 12);
    let decrypted = client
        .call(
            "/keys/foo/decrypt",
            &bodies::decrypt_from(&encrypted.body, Some(aad)),
        )
        .await
        .unwrap();
    assert_eq!(unb64(&decrypted.body["plaintext"]), b"in the HSM");

    // Tampering and AAD mistakes are InvalidCiphertextException.
    let mut tampered = encrypted.body.clone();
    let mut tag = unb64(&tampered["authenticationTag"]);
    tag[3] ^= 0x40;
    tampered["authenticationTag"] = b64(&tag).into();
    for body in [
        bodies::decrypt_from(&tampered, Some(aad)),
        bodies::decrypt_from(&encrypted.body, None),
        bodies::decrypt_from(&encrypted.body, Some(b"other")),
    ] {
        let reply = client.call("/keys/foo/decrypt", &body).await.unwrap();
        assert_error(&reply, 400, "InvalidCiphertextException");
    }

    // Many clients at once, every answer checked.
    let client = std::sync::Arc::new(client);
    let mut tasks = Vec::new();
    for worker in 0..16u8 {
        let client = std::sync::Arc::clone(&client);
        tasks.push(tokio::spawn(async move {
            let mut connection = client.connect().await.unwrap();
            for i in 0..25u8 {
                let plaintext = [worker, i, 7, 7];
                let body = bodies::encrypt(&plaintext, Some(&[i]), false)
                    .to_string()
                    .into_bytes();
                let sealed = connection
                    .send(client.request("/keys/foo/encrypt", body).unwrap())
                    .await
                    .unwrap();
                assert_eq!(sealed.status, 200, "{sealed:?}");
                let body = bodies::decrypt_from(&sealed.body, Some(&[i]))
                    .to_string()
                    .into_bytes();
                let opened = connection
                    .send(client.request("/keys/foo/decrypt", body).unwrap())
                    .await
                    .unwrap();
                assert_eq!(unb64(&opened.body["plaintext"]), plaintext);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    // The HSM worker pool is visible in the metrics, idle now.
    let text = scrape(metrics_port);
    let ks = format!("{{keystore=\"{URI_PATH}\"}}");
    assert!(
        text.contains(&format!("xks_keystore_pool_in_use{ks} 0")),
        "{text}"
    );
    assert!(
        text.contains(&format!("xks_keystore_pool_capacity{ks} ")),
        "{text}"
    );
    assert!(text.contains("xks_keystore_call_duration_seconds_count{keystore=\"/example/kms/xks/v1\",call=\"encrypt\"}"));
}

#[tokio::test]
async fn key_management_on_the_token_while_serving() {
    let Some((proxy, _token)) = softhsm_proxy("log_level = \"trace\"", "") else {
        return;
    };
    let client = proxy.client();
    let listed = proxy.cli(&["keys", "list"]);
    assert!(
        listed.contains("foo\tusage=encrypt,decrypt\tstate=ENABLED"),
        "{listed}"
    );
    assert!(
        listed.contains("impotent_key\tusage=none\tstate=ENABLED"),
        "{listed}"
    );

    proxy.cli(&["keys", "create", "fresh", "--usage", "encrypt,decrypt"]);
    let created = proxy.cli_output(&["keys", "create", "fresh"]);
    assert!(
        !created.status.success(),
        "creating an existing key must fail"
    );
    let encrypted = eventually_ok("the new key becomes usable", || async {
        let reply = client
            .call("/keys/fresh/encrypt", &bodies::encrypt(b"new", None, false))
            .await
            .unwrap();
        if reply.status == 200 {
            Ok(reply.body)
        } else {
            Err(format!("{reply:?}"))
        }
    })
    .await;

    // Disabled on the token by the CLI: the running server refuses it once its cache refreshes.
    proxy.cli(&["keys", "disable", "fresh"]);
    assert!(
        proxy
            .cli(&["keys", "show", "fresh"])
            .contains("state=DISABLED")
    );
    let reply = eventually_ok("the key is seen disabled", || async {
        let reply = client
            .call(
                "/keys/fresh/decrypt",
                &bodies::decrypt_from(&encrypted, None),
            )
            .await
            .unwrap();
        if reply.status == 400 {
            Ok(reply)
        } else {
            Err(format!("{reply:?}"))
        }
    })
    .await;
    assert_error(&reply, 400, "InvalidStateException");
    let reply = client
        .call("/keys/fresh/metadata", &bodies::key_metadata())
        .await
        .unwrap();
    assert_eq!(reply.body["keyStatus"], "DISABLED");

    proxy.cli(&["keys", "enable", "fresh"]);
    let reply = eventually_ok("the key is seen enabled again", || async {
        let reply = client
            .call(
                "/keys/fresh/decrypt",
                &bodies::decrypt_from(&encrypted, None),
            )
            .await
            .unwrap();
        if reply.status == 200 {
            Ok(reply)
        } else {
            Err(format!("{reply:?}"))
        }
    })
    .await;
    assert_eq!(unb64(&reply.body["plaintext"]), b"new");
    let everything = format!("{listed}{}", proxy.log());
    assert!(
        !everything.contains(PIN),
        "the PIN is in a log line or output"
    );
}

#[tokio::test]
async fn a_reload_applies_a_new_key_list_on_the_token() {
    let Some((proxy, _token)) = softhsm_proxy("", "") else {
        return;
    };
    let client = proxy.client();
    let metadata = async |key: &str| {
        let path = format!("/keys/{key}/metadata");
        client.call(&path, &bodies::key_metadata()).await.unwrap()
    };
    assert_eq!(metadata("encrypt_only_key").await.status, 200);
    let sealed = client
        .call("/keys/foo/encrypt", &bodies::encrypt(b"kept", None, false))
        .await
        .unwrap();
    assert_eq!(sealed.status, 200);

    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    let narrowed = config.replace("[keystore.pkcs11]", "[keystore.pkcs11]\nkeys = [\"foo\"]");
    std::fs::write(&proxy.config_file, narrowed).unwrap();
    proxy.sighup();
    let log = proxy.wait_for_log("configuration reloaded");
    assert!(log.contains("configuration reloaded"), "{log}");
    assert_error(
        &metadata("encrypt_only_key").await,
        404,
        "KeyNotFoundException",
    );
    // The key manager was reopened with the new settings: the token serves as before.
    let opened = client
        .call(
            "/keys/foo/decrypt",
            &bodies::decrypt_from(&sealed.body, None),
        )
        .await
        .unwrap();
    assert_eq!(unb64(&opened.body["plaintext"]), b"kept");
    let health = client.call("/health", &bodies::health()).await.unwrap();
    assert_eq!(health.body["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");

    // The PIN moves to a file (same PIN: nothing to say), then the file changes: the token stays
    // logged in with the PIN it started with, and the reload says a restart is needed.
    let reloads = || proxy.log().matches("configuration reloaded").count();
    let before = reloads();
    let pin_file = proxy.dir.path().join("hsm-pin");
    std::fs::write(&pin_file, PIN).unwrap();
    let with_file = std::fs::read_to_string(&proxy.config_file)
        .unwrap()
        .replace("pin_env = \"XKS_HSM_PIN\"", "pin_file = \"hsm-pin\"");
    std::fs::write(&proxy.config_file, with_file).unwrap();
    proxy.sighup();
    eventually("the move to a PIN file is reloaded", || async {
        reloads() > before
    })
    .await;
    assert!(!proxy.log().contains("the PIN setting changed"));
    let new_pin = "xks-NEW-pin-canary-8812";
    std::fs::write(&pin_file, new_pin).unwrap();
    proxy.sighup();
    let log = proxy.wait_for_log("the PIN setting changed");
    assert!(log.contains("until the next restart"), "{log}");
    assert!(
        !log.contains(new_pin) && !log.contains(PIN),
        "a PIN is in the log"
    );
    let opened = client
        .call(
            "/keys/foo/decrypt",
            &bodies::decrypt_from(&sealed.body, None),
        )
        .await
        .unwrap();
    assert_eq!(opened.status, 200, "still logged in: {opened:?}");
}

#[test]
fn config_check_logs_in_to_the_token_and_finds_listed_keys() {
    let Some((proxy, token)) = softhsm_proxy("", "") else {
        return;
    };
    let good = proxy.cli_output(&["config", "check"]);
    let text = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{text}");
    assert!(text.contains("pkcs11 key manager opened"), "{text}");
    assert!(text.contains("foo"), "{text}");

    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    let broken = proxy.dir.path().join("broken.toml");
    let wrong_pin = "xks-WRONG-pin-canary-2271";
    for (change, pin, expected) in [
        (
            config.clone(),
            wrong_pin,
            "FAIL keystore /example/kms/xks/v1: pkcs11.pin_env: token xks-proxy refused the login: wrong PIN",
        ),
        (
            config.replace(
                "[keystore.pkcs11]",
                "[keystore.pkcs11]\nkeys = [\"foo\", \"absent\"]",
            ),
            PIN,
            "FAIL keystore /example/kms/xks/v1: listed key \"absent\" is not on the token",
        ),
    ] {
        std::fs::write(&broken, change).unwrap();
        let output = Command::new(BIN)
            .args(["config", "check", "--config"])
            .arg(&broken)
            .env("SOFTHSM2_CONF", token.path().join("softhsm2.conf"))
            .env("XKS_HSM_PIN", pin)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!output.status.success(), "{text}");
        assert!(text.contains(expected), "expected {expected:?} in {text}");
        assert!(!text.contains(pin), "the PIN is in the output: {text}");
    }
}

#[test]
fn official_conformance_client_against_a_pkcs11_key_store() {
    conformance(false);
}

#[test]
fn official_conformance_client_over_mtls_against_a_pkcs11_key_store() {
    conformance(true);
}

fn conformance(mtls: bool) {
    let server_extra = if mtls { MTLS_SERVER_LINES } else { "" };
    let Some((proxy, _token)) = softhsm_proxy(server_extra, "") else {
        return;
    };
    assert_conformance(&proxy, mtls);
}

/// OpenSC's PKCS#11 spy: a module that logs every call and forwards it to the real one.
const SPY: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so";

/// A proxy whose PKCS#11 calls OpenSC's pkcs11-spy records; `None` when SoftHSM is absent
/// outside CI. Returns the proxy, the token and spy directories, and the spy's log.
fn spied_proxy() -> Option<(
    TestProxy,
    tempfile::TempDir,
    tempfile::TempDir,
    std::path::PathBuf,
)> {
    required_file(SPY.into(), "apt-get install opensc")?;
    let spy_dir = tempfile::tempdir().unwrap();
    let spy_log = spy_dir.path().join("pkcs11-spy.log");
    let env = vec![
        ("PKCS11SPY".into(), SOFTHSM_MODULE.into()),
        ("PKCS11SPY_OUTPUT".into(), spy_log.display().to_string()),
    ];
    let (proxy, token) = softhsm_proxy_through(SPY, env, "", "")?;
    Some((proxy, token, spy_dir, spy_log))
}

/// SIGTERM, exit 0, then the PKCS#11 calls the spy saw, in order; asserts the clean shutdown:
/// every session opened was closed, then C_Logout, and C_Finalize last.
fn terminate_and_spy(proxy: &mut TestProxy, spy_log: &Path) -> Vec<String> {
    let kill = Command::new("kill")
        .args(["-TERM", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let exit = proxy
        .wait_exit(Duration::from_secs(30))
        .expect("the proxy exits after SIGTERM");
    assert!(exit.success(), "{exit:?}");
    let log = proxy.log();
    assert!(log.contains("pkcs11 token closed"), "{log}");
    assert!(log.contains("pkcs11 module finalized"), "{log}");
    let spied = std::fs::read_to_string(spy_log).unwrap();
    let calls: Vec<String> = spied
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|name| name.starts_with("C_"))
        .map(String::from)
        .collect();
    let count = |name: &str| calls.iter().filter(|c| *c == name).count();
    assert!(count("C_OpenSession") >= 2, "{calls:?}");
    assert_eq!(count("C_OpenSession"), count("C_CloseSession"), "{calls:?}");
    let last_logout = calls.iter().rposition(|c| c == "C_Logout");
    let last_finalize = calls.iter().rposition(|c| c == "C_Finalize");
    assert!(
        last_logout.is_some() && last_finalize > last_logout,
        "{calls:?}"
    );
    assert_eq!(
        calls.last().map(String::as_str),
        Some("C_Finalize"),
        "{calls:?}"
    );
    calls
}

#[tokio::test]
async fn sigterm_closes_every_session_logs_out_and_finalizes() {
    let Some((mut proxy, _token, _spy_dir, spy_log)) = spied_proxy() else {
        return;
    };
    let client = std::sync::Arc::new(proxy.client());
    // Keep every worker busy at once so that each opens its session.
    let calls: Vec<_> = (0..32)
        .map(|_| {
            let client = std::sync::Arc::clone(&client);
            tokio::spawn(async move {
                client
                    .call("/keys/foo/encrypt", &bodies::encrypt(b"spied", None, false))
                    .await
                    .unwrap()
                    .status
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    terminate_and_spy(&mut proxy, &spy_log);
}

#[tokio::test]
async fn reloads_share_the_token_login_and_shutdown_still_closes_everything() {
    let Some((mut proxy, token, _spy_dir, spy_log)) = spied_proxy() else {
        return;
    };
    // A second token, which only a refused reload below logs in to. SoftHSM lists its tokens when
    // the module is loaded: the proxy starts again to see it (the spy's record starts anew).
    let init = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", "second"])
        .args(["--so-pin", PIN, "--pin", PIN])
        .env("SOFTHSM2_CONF", token.path().join("softhsm2.conf"))
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    terminate_and_spy(&mut proxy, &spy_log);
    std::fs::write(&spy_log, "").unwrap();
    proxy.restart();
    let client = proxy.client();
    let encrypt = async |key: &str| {
        let path = format!("/keys/{key}/encrypt");
        let body = bodies::encrypt(b"spied", None, false);
        client.call(&path, &body).await.unwrap()
    };
    assert_eq!(encrypt("encrypt_only_key").await.status, 200);
    let config = std::fs::read_to_string(&proxy.config_file).unwrap();

    // A changed key list: the key store is rebuilt on the same logged-in token.
    let narrowed = config.replace("[keystore.pkcs11]", "[keystore.pkcs11]\nkeys = [\"foo\"]");
    std::fs::write(&proxy.config_file, &narrowed).unwrap();
    proxy.sighup();
    proxy.wait_for_log("configuration reloaded");
    assert_error(
        &encrypt("encrypt_only_key").await,
        404,
        "KeyNotFoundException",
    );
    assert_eq!(encrypt("foo").await.status, 200);

    // A reload that fails late, after the first key store was rebuilt (with a wider key list),
    // the second logged in to another token, and the third fails to open its module: nothing of
    // it applies, and the other token is let go again.
    let credential = narrowed
        .split("[[keystore.credential]]")
        .nth(1)
        .expect("the credential block");
    let keystore = |uri_path: &str, module: &str, label: &str| {
        format!(
            "\n[[keystore]]\nuri_path = \"{uri_path}\"\nregion = \"{REGION}\"\nbackend = \"pkcs11\"\n[keystore.pkcs11]\nmodule = \"{module}\"\ntoken_label = \"{label}\"\npin = \"{PIN}\"\n[[keystore.credential]]{credential}"
        )
    };
    let broken = format!(
        "{}{}{}",
        narrowed.replace("keys = [\"foo\"]", "keys = [\"foo\", \"encrypt_only_key\"]"),
        keystore("/second/kms/xks/v1", SPY, "second"),
        keystore("/other/kms/xks/v1", "/nonexistent/libpkcs11.so", "x"),
    );
    let mark = proxy.log_mark();
    std::fs::write(&proxy.config_file, broken).unwrap();
    proxy.sighup();
    let log = proxy.wait_for_log_after(mark, "configuration NOT reloaded");
    let refused = log
        .lines()
        .find(|l| l.contains("configuration NOT reloaded"));
    assert!(
        refused.is_some_and(|l| l.contains("/nonexistent/libpkcs11.so")),
        "{log}"
    );
    let let_go = log[mark..]
        .lines()
        .find(|l| l.contains("pkcs11 token no longer configured"));
    assert!(let_go.is_some_and(|l| l.contains("second")), "{log}");
    assert_error(
        &encrypt("encrypt_only_key").await,
        404,
        "KeyNotFoundException",
    );
    assert_eq!(encrypt("foo").await.status, 200);

    let calls = terminate_and_spy(&mut proxy, &spy_log);
    let logins = calls.iter().filter(|c| *c == "C_Login").count();
    assert_eq!(
        logins, 2,
        "one login per token for the life of the process (the second token's by the refused reload): {calls:?}"
    );
}
