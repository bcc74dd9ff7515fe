//! Operator commands of the binary: `config check` on good and broken configs, `credentials new`.

mod common;

use common::*;
use std::path::Path;

#[test]
fn config_check_passes_a_working_config_and_names_what_is_broken() {
    let proxy = TestProxy::start();
    let good = proxy.cli_output(&["config", "check"]);
    let text = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{text}");
    assert!(
        text.contains("ok   tls:") && text.contains("health software-1 Active"),
        "{text}"
    );
    assert!(
        text.contains("keys decrypt_only_key, encrypt_only_key, foo, impotent_key"),
        "{text}"
    );
    assert!(text.contains("ok   iv_budget: no ledger"), "{text}");

    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    let broken = proxy.dir.path().join("broken.toml");
    for (change, expected) in [
        (
            config.replace("server-key.pem", "missing-key.pem"),
            "FAIL tls:",
        ),
        (
            config.replace("region = \"us-east-1\"", "region = \"US\""),
            "keystore[0].region",
        ),
        (
            config.replace("keys.json", "no-such-dir/keys.json\"\nbackend2 = \"x"),
            "FAIL config:",
        ),
        (
            config.replace(
                "[[keystore]]",
                "[iv_budget]\nledger = \"garbled-ledger.json\"\n[[keystore]]",
            ),
            "FAIL iv_budget.ledger",
        ),
        (
            config.replace(
                "[[keystore]]",
                "[iv_budget]\nwarn_fraction = 2\n[[keystore]]",
            ),
            "iv_budget.warn_fraction: must be greater than 0 and at most 1",
        ),
        (
            config.replace("tls_key", "log_level = \"chatty\"\ntls_key"),
            "server.log_level",
        ),
    ] {
        std::fs::write(
            proxy.dir.path().join("garbled-ledger.json"),
            "{\"version\": 1,",
        )
        .unwrap();
        std::fs::write(&broken, change).unwrap();
        let output = std::process::Command::new(BIN)
            .args(["config", "check", "--config"])
            .arg(&broken)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success(), "{text}");
        assert!(text.contains(expected), "expected {expected:?} in {text}");
    }
}

#[tokio::test]
async fn credentials_new_gives_a_snippet_the_proxy_accepts() {
    let proxy = TestProxy::start();
    let output = std::process::Command::new(BIN)
        .args([
            "credentials",
            "new",
            "--uri-path",
            URI_PATH,
            "--endpoint",
            "https://xks.example.com",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("aws kms create-custom-key-store"), "{text}");
    assert!(
        text.contains("--xks-proxy-uri-path /example/kms/xks/v1"),
        "{text}"
    );
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("access_key_id = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap();
    let secret = text
        .lines()
        .find_map(|l| l.strip_prefix("secret_access_key = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap();
    assert!(xks_proxy::auth::credentials::check_access_key_id(id).is_ok());
    assert!(xks_proxy::auth::credentials::check_secret(secret).is_ok());
    assert!(text.contains(&format!("AccessKeyId={id},RawSecretAccessKey={secret}")));
    // The snippet, appended as a second credential, is a valid config.
    let snippet: String = text
        .lines()
        .skip_while(|l| !l.starts_with("[[keystore.credential]]"))
        .take(3)
        .map(|l| format!("{l}\n"))
        .collect();
    let mut config = std::fs::read_to_string(&proxy.config_file).unwrap();
    config.push_str(&snippet);
    let rotated = proxy.dir.path().join("rotated.toml");
    std::fs::write(&rotated, &config).unwrap();
    let parsed = xks_proxy::config::Config::load(&rotated).unwrap();
    assert_eq!(parsed.keystores[0].credentials.len(), 2);
    // ...and the running proxy, given it, accepts requests signed with the new credential.
    let with_new = proxy.client_as(id, secret, REGION);
    let health = xks_proxy::client::bodies::health();
    assert_eq!(with_new.call("/health", &health).await.unwrap().status, 401);
    std::fs::write(&proxy.config_file, &config).unwrap();
    proxy.sighup();
    eventually("the new credential is accepted", || async {
        with_new.call("/health", &health).await.unwrap().status == 200
    })
    .await;
    // The console's configuration file, as the spec gives it.
    let console = text
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("the console JSON");
    let console: serde_json::Value = serde_json::from_str(console).unwrap();
    assert_eq!(console["XksProxyUriPath"], URI_PATH, "{text}");
    assert_eq!(
        console["XksProxyAuthenticationCredential"]["AccessKeyId"],
        id
    );
    assert_eq!(
        console["XksProxyAuthenticationCredential"]["RawSecretAccessKey"],
        secret
    );
}

#[test]
fn a_full_or_closed_stdout_is_an_error_not_a_panic() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let output = std::process::Command::new(BIN)
        .args(["credentials", "new"])
        .stdout(full)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("xks-proxy: stdout: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Every vendor profile in `hsm-config/examples/` is a valid `[keystore.pkcs11]` section: in a
/// config of its own, `config check` parses it and gets as far as loading the vendor's module
/// (absent here, except SoftHSM's, whose token is then absent).
#[test]
fn every_vendor_example_parses_as_a_pkcs11_key_store() {
    let proxy = TestProxy::start();
    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    let software = "backend = \"software\"\nkey_file = \"keys.json\"\n";
    assert!(config.contains(software));
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("hsm-config/examples");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        let snippet = std::fs::read_to_string(&path).unwrap();
        // The snippet's table goes where the software backend's lines were; the credential that
        // follows them stays a [[keystore.credential]] of the same key store.
        let with_example = config.replace(software, &format!("backend = \"pkcs11\"\n{snippet}\n"));
        let file = proxy.dir.path().join("example.toml");
        std::fs::write(&file, with_example).unwrap();
        let output = std::process::Command::new(BIN)
            .args(["config", "check", "--config"])
            .arg(&file)
            .env("XKS_HSM_PIN", "1234")
            .env("SOFTHSM2_CONF", proxy.dir.path().join("no-softhsm.conf"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            text.contains("ok   config: 1 key store(s)"),
            "{}: {text}",
            path.display()
        );
        assert!(
            text.contains("FAIL keystore /example/kms/xks/v1: pkcs11."),
            "{}: the module load or token search is what fails here: {text}",
            path.display()
        );
        seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "cloudhsm.toml",
            "fortanix.toml",
            "kryoptic.toml",
            "luna7-fips.toml",
            "luna7.toml",
            "nshield5-fips.toml",
            "softhsm.toml"
        ]
    );
}
