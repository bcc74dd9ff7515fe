//! Security defaults end to end, against the real binary: mTLS refuses to run without a pinned
//! client subject unless `client_any_subject = true` says so (and then warns at start-up and on
//! reload), and secret files open to group or others are warned about at start-up and by
//! `config check`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use xks_proxy::client::bodies;

const ANY_SUBJECT_LINES: &str = "client_ca = \"client-ca.pem\"\nclient_any_subject = true";
const ANY_SUBJECT_WARNING: &str = "mTLS accepts ANY client certificate chaining to client_ca";

fn client_with(
    proxy: &TestProxy,
    cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> xks_proxy::client::XksClient {
    let mut settings = proxy.client_settings();
    settings.client_cert = cert;
    xks_proxy::client::XksClient::new(settings).unwrap()
}

/// Runs the binary with `args` and `--config config`; returns (success, stdout, stderr).
fn run(args: &[&str], config: &Path) -> (bool, String, String) {
    let output = std::process::Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run xks-proxy");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_any_subject_opt_out_accepts_other_subjects_and_warns_at_start_and_reload() {
    let proxy = TestProxy::start_with(ProxySpec {
        server_extra: ANY_SUBJECT_LINES.into(),
        ..Default::default()
    });
    proxy.wait_for_log(ANY_SUBJECT_WARNING);

    // A certificate from the client CA for a name that is not KMS's is accepted...
    let stranger = client_with(&proxy, Some(proxy.client_cert("not-kms.example.com")));
    let reply = stranger.call("/health", &bodies::health()).await.unwrap();
    assert_eq!(reply.status, 200);
    // ...but mTLS is still on: no certificate, no connection.
    let none = client_with(&proxy, None);
    assert!(none.call("/health", &bodies::health()).await.is_err());

    // A reload keeps warning.
    let mark = proxy.log_mark();
    proxy.sighup();
    proxy.wait_for_log_after(mark, "configuration reloaded");
    let log = proxy.log();
    assert!(
        log[mark..].contains(ANY_SUBJECT_WARNING),
        "{}",
        &log[mark..]
    );

    // config check says it too, as a WARN line, and passes.
    let (ok, stdout, _) = run(&["config", "check"], &proxy.config_file);
    assert!(ok, "{stdout}");
    assert!(
        stdout.contains("WARN mtls: server.client_any_subject = true"),
        "{stdout}"
    );

    // A reload to client_ca without either setting is refused; the running config stays.
    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    std::fs::write(
        &proxy.config_file,
        config.replace("client_any_subject = true\n", ""),
    )
    .unwrap();
    let mark = proxy.log_mark();
    proxy.sighup();
    let log = proxy.wait_for_log_after(mark, "configuration NOT reloaded");
    assert!(
        log[mark..].contains("server.client_subject: is required with server.client_ca"),
        "{}",
        &log[mark..]
    );
    let reply = stranger.call("/health", &bodies::health()).await.unwrap();
    assert_eq!(reply.status, 200);
}

#[test]
fn client_ca_without_a_subject_does_not_start_and_fails_config_check() {
    let proxy = TestProxy::start();
    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    let strict = proxy.dir.path().join("no-subject.toml");
    let port = free_port();
    std::fs::write(
        &strict,
        config
            .replace(
                "tls_key = \"server-key.pem\"",
                "tls_key = \"server-key.pem\"\nclient_ca = \"client-ca.pem\"",
            )
            .replace(&format!(":{}\"", proxy.port), &format!(":{port}\"")),
    )
    .unwrap();

    let (ok, _, stderr) = run(&["serve"], &strict);
    assert!(!ok, "serve started without client_subject");
    assert!(
        stderr.contains("server.client_subject: is required with server.client_ca"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cks.kms.<region>.amazonaws.com") && stderr.contains("client_any_subject"),
        "{stderr}"
    );

    let (ok, stdout, _) = run(&["config", "check"], &strict);
    assert!(!ok, "{stdout}");
    assert!(
        stdout.contains("FAIL config:") && stdout.contains("server.client_subject"),
        "{stdout}"
    );
}

#[tokio::test]
async fn secret_files_open_to_group_or_others_are_warned_about() {
    let mut proxy = TestProxy::start();
    let (ok, stdout, _) = run(&["config", "check"], &proxy.config_file);
    assert!(ok && !stdout.contains("WARN file:"), "{stdout}");
    assert!(!proxy.log().contains("secret file open to group or others"));

    // A secret file for the credential and the TLS key, both readable beyond the owner.
    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    let secret_file = proxy.dir.path().join("secret");
    std::fs::write(&secret_file, proxy.credential.secret_access_key.expose()).unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let secret_line = format!(
        "secret_access_key = \"{}\"",
        proxy.credential.secret_access_key.expose()
    );
    std::fs::write(
        &proxy.config_file,
        config.replace(&secret_line, "secret_access_key_file = \"secret\""),
    )
    .unwrap();
    let key = proxy.dir.path().join("server-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();

    let (ok, stdout, _) = run(&["config", "check"], &proxy.config_file);
    assert!(ok, "a warning is not a failure: {stdout}");
    assert!(
        stdout.contains("WARN file: server.tls_key:") && stdout.contains("mode 0604"),
        "{stdout}"
    );
    assert!(
        stdout.contains("WARN file: keystore[0].credential[0].secret_access_key_file:")
            && stdout.contains("mode 0644"),
        "{stdout}"
    );
    let secret = proxy.credential.secret_access_key.expose().to_string();
    assert!(!stdout.contains(&secret));

    let mark = proxy.log_mark();
    proxy.restart();
    let log = proxy.wait_for_log_after(mark, "secret file open to group or others");
    let new = &log[mark..];
    assert!(
        new.contains("server.tls_key") && new.contains("0604"),
        "{new}"
    );
    assert!(
        new.contains("keystore[0].credential[0].secret_access_key_file") && new.contains("0644"),
        "{new}"
    );
    assert!(!new.contains(&secret));
    // Still serving: the warning does not stop it.
    let reply = proxy.client().call("/health", &bodies::health()).await;
    assert_eq!(reply.unwrap().status, 200);
}
