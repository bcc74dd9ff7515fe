//! Unit tests of config parsing and validation: errors that name file and field, bounds, paths.
use super::*;

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8443"
tls_cert = "certs/server.pem"
tls_key = "certs/server-key.pem"

[[keystore]]
uri_path = "/example/kms/xks/v1"
region = "us-east-1"
backend = "software"
key_file = "keys/example.json"
[[keystore.credential]]
access_key_id = "BETWEEN2TENAND3TENCHARACTERS"
secret_access_key = "PleaseReplaceThisWithSomeSecretOfLength43To64"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/xks/proxy.toml"))
}

#[test]
fn good_config_resolves_relative_paths() {
    let config = parse(GOOD).unwrap();
    assert_eq!(
        config.server.tls.cert,
        PathBuf::from("/etc/xks/certs/server.pem")
    );
    let ks = config.keystore("/example/kms/xks/v1").unwrap();
    match &ks.backend {
        crate::keystore::BackendSettings::Software { key_file } => {
            assert_eq!(key_file, &PathBuf::from("/etc/xks/keys/example.json"))
        }
        other => panic!("unexpected backend {other:?}"),
    }
    assert!(!format!("{config:?}").contains("PleaseReplace"));
}

#[test]
fn a_secret_of_the_wrong_type_is_not_quoted_in_the_error() {
    let unquoted = GOOD.replace(
        "\"PleaseReplaceThisWithSomeSecretOfLength43To64\"",
        "918273645546372819",
    );
    let err = parse(&unquoted).unwrap_err().to_string();
    assert!(!err.contains("918273645546372819"), "{err}");
    assert!(err.contains("invalid type, expected a string"), "{err}");
    assert!(err.contains("line 14"), "{err}");
    let pin = GOOD.replace(
            "backend = \"software\"\nkey_file = \"keys/example.json\"",
            "backend = \"pkcs11\"\n[keystore.pkcs11]\nmodule = \"/x.so\"\ntoken_label = \"t\"\npin = 7395.5",
        );
    let err = parse(&pin).unwrap_err().to_string();
    assert!(!err.contains("7395"), "{err}");
    assert!(err.contains("invalid type"), "{err}");
}

#[test]
fn errors_name_file_and_field() {
    let bad = GOOD.replace("us-east-1", "US EAST");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(
        err.starts_with("/etc/xks/proxy.toml: keystore[0].region:"),
        "{err}"
    );

    let bad = GOOD.replace("BETWEEN2TENAND3TENCHARACTERS", "short");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(
        err.contains("keystore[0].credential[0].access_key_id"),
        "{err}"
    );

    let bad = GOOD.replace("/example/kms/xks/v1", "/example/xks");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(err.contains("keystore[0].uri_path"), "{err}");

    let bad = GOOD.replace("listen =", "lissen =");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(err.contains("line"), "{err}");

    let bad = format!("{GOOD}\n[limits]\nrequest_timeout_ms = 300\n");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(err.contains("limits.request_timeout_ms"), "{err}");

    let bad = format!("{GOOD}\n[limits]\nrequest_timeout_ms = 250\n");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(err.contains("limits.request_timeout_ms"), "{err}");
    let edge = format!("{GOOD}\n[limits]\nrequest_timeout_ms = 249\n");
    assert_eq!(parse(&edge).unwrap().limits.request_timeout_ms, 249);

    for (limit, value) in [
        ("max_body_bytes", 1_000_000_000_000u64),
        ("max_header_bytes", 1 << 30),
        ("max_connections", 4_000_000_000_000_000_000),
        ("max_in_flight_requests", 0),
        ("max_in_flight_requests", 65_537),
        ("max_streams_per_connection", 1025),
        ("tls_handshake_timeout_ms", 60_001),
        ("header_read_timeout_ms", 0),
        ("idle_timeout_ms", 1 << 40),
    ] {
        let bad = format!("{GOOD}\n[limits]\n{limit} = {value}\n");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains(&format!("limits.{limit}: must be")), "{err}");
    }
}

#[test]
fn pkcs11_pool_settings_are_bounded() {
    let pkcs11 = |extra: &str| {
        GOOD.replace(
                "backend = \"software\"\nkey_file = \"keys/example.json\"",
                &format!("backend = \"pkcs11\"\n[keystore.pkcs11]\nmodule = \"/x.so\"\ntoken_label = \"t\"\npin = \"1234\"\n{extra}"),
            )
    };
    assert!(parse(&pkcs11("queue_depth = 65536\nkey_cache_ttl_ms = 60000")).is_ok());
    for (setting, value) in [
        ("queue_depth", 0u64),
        ("queue_depth", 4_000_000_000),
        ("key_cache_ttl_ms", 60_001),
        ("call_timeout_ms", 0),
        ("call_timeout_ms", 60_001),
        ("session_pool_size", 1025),
    ] {
        let err = parse(&pkcs11(&format!("{setting} = {value}")))
            .unwrap_err()
            .to_string();
        assert!(err.contains(setting), "{setting} = {value}: {err}");
    }
}

#[test]
fn the_audit_queue_has_a_default_and_bounds() {
    assert_eq!(
        parse(GOOD).unwrap().server.audit_queue_lines,
        crate::audit::DEFAULT_QUEUE_LINES
    );
    let with = |lines: &str| {
        parse(&GOOD.replace(
            "tls_key = \"certs/server-key.pem\"",
            &format!("tls_key = \"certs/server-key.pem\"\naudit_queue_lines = {lines}"),
        ))
    };
    assert_eq!(with("1024").unwrap().server.audit_queue_lines, 1024);
    for bad in ["0", "1048577"] {
        let err = with(bad).unwrap_err().to_string();
        assert!(err.contains("server.audit_queue_lines"), "{err}");
    }
}

#[test]
fn metrics_are_off_by_default_and_on_loopback_when_on() {
    assert_eq!(parse(GOOD).unwrap().metrics, None);
    let on = parse(&format!("{GOOD}\n[metrics]\n")).unwrap();
    assert_eq!(on.metrics, Some("127.0.0.1:9464".parse().unwrap()));
    let chosen = parse(&format!("{GOOD}\n[metrics]\nlisten = \"0.0.0.0:9100\"\n")).unwrap();
    assert_eq!(chosen.metrics, Some("0.0.0.0:9100".parse().unwrap()));
}

fn with_server(lines: &str) -> String {
    GOOD.replace(
        "tls_key = \"certs/server-key.pem\"\n",
        &format!("tls_key = \"certs/server-key.pem\"\n{lines}\n"),
    )
}

#[test]
fn mtls_requires_a_client_subject_or_the_explicit_opt_out() {
    let err = parse(&with_server("client_ca = \"ca.pem\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "/etc/xks/proxy.toml: server.client_subject: is required with server.client_ca"
        ),
        "{err}"
    );
    assert!(err.contains("cks.kms.<region>.amazonaws.com"), "{err}");
    assert!(err.contains("client_any_subject = true"), "{err}");

    let pinned = parse(&with_server(
        "client_ca = \"ca.pem\"\nclient_subject = \"cks.kms.us-east-1.amazonaws.com\"",
    ))
    .unwrap();
    assert_eq!(
        pinned.server.tls.client_subject.as_deref(),
        Some("cks.kms.us-east-1.amazonaws.com")
    );
    assert!(!pinned.server.tls.client_any_subject);
    assert_eq!(pinned.server.tls.any_subject_warning(), None);

    let any = parse(&with_server(
        "client_ca = \"ca.pem\"\nclient_any_subject = true",
    ))
    .unwrap();
    assert_eq!(any.server.tls.client_subject, None);
    assert!(any.server.tls.client_any_subject);
    assert!(
        any.server
            .tls
            .any_subject_warning()
            .is_some_and(|w| w.contains("client_any_subject")),
    );
    // `false` is the same as leaving it out.
    let err = parse(&with_server(
        "client_ca = \"ca.pem\"\nclient_any_subject = false",
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("server.client_subject: is required"), "{err}");

    for (lines, field, problem) in [
        (
            "client_ca = \"ca.pem\"\nclient_subject = \"cks.kms.us-east-1.amazonaws.com\"\nclient_any_subject = true",
            "server.client_any_subject",
            "contradicts",
        ),
        (
            "client_any_subject = true",
            "server.client_any_subject",
            "needs server.client_ca",
        ),
        (
            "client_subject = \"x\"",
            "server.client_subject",
            "needs server.client_ca",
        ),
        (
            "client_ca = \"ca.pem\"\nclient_subject = \" \"",
            "server.client_subject",
            "must not be empty",
        ),
        (
            "client_ca = \"ca.pem\"\nclient_subject = \"*\"",
            "server.client_subject",
            "is an exact name, not a pattern",
        ),
        (
            "client_ca = \"ca.pem\"\nclient_subject = \"cks.kms.*.amazonaws.com\"",
            "server.client_subject",
            "is an exact name, not a pattern",
        ),
    ] {
        let err = parse(&with_server(lines)).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{field}: {problem}")),
            "{lines}: {err}"
        );
    }
    // No mTLS at all is still fine.
    assert!(parse(GOOD).unwrap().server.tls.client_ca.is_none());
}

#[cfg(unix)]
#[test]
fn secret_files_open_to_group_or_others_are_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let chmod = |name: &str, mode: u32| {
        let path = dir.path().join(name);
        std::fs::write(&path, "PleaseReplaceThisWithSomeSecretOfLength43To64").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    chmod("server-key.pem", 0o606);
    chmod("secret", 0o604);
    // Readable by the proxy's own group only (Kubernetes: defaultMode 0440 with fsGroup).
    chmod("keys.json", 0o640);
    chmod("pin", 0o400);
    chmod("pin-2", 0o644);
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:8443"
tls_cert = "server.pem"
tls_key = "server-key.pem"

[[keystore]]
uri_path = "/example/kms/xks/v1"
region = "us-east-1"
backend = "software"
key_file = "keys.json"
[[keystore.credential]]
access_key_id = "BETWEEN2TENAND3TENCHARACTERS"
secret_access_key_file = "secret"

[[keystore]]
uri_path = "/other/kms/xks/v1"
region = "us-east-1"
backend = "pkcs11"
[keystore.pkcs11]
module = "/x.so"
token_label = "t"
pin_file = "pin"
[[keystore.credential]]
access_key_id = "BETWEEN2TENAND3TENCHARACTERS"
secret_access_key = "PleaseReplaceThisWithSomeSecretOfLength43To64"

[[keystore]]
uri_path = "/third/kms/xks/v1"
region = "us-east-1"
backend = "pkcs11"
[keystore.pkcs11]
module = "/x.so"
token_label = "u"
pin_file = "{}"
[[keystore.credential]]
access_key_id = "BETWEEN2TENAND3TENCHARACTERS"
secret_access_key = "PleaseReplaceThisWithSomeSecretOfLength43To64"
"#,
        dir.path().join("pin-2").display()
    );
    let config = Config::parse(&text, &dir.path().join("proxy.toml")).unwrap();
    let found: Vec<(String, u32)> = config
        .readable_secrets()
        .into_iter()
        .map(|r| (r.file.field, r.mode))
        .collect();
    assert_eq!(
        found,
        [
            ("server.tls_key".to_string(), 0o606),
            ("keystore[2].pkcs11.pin_file".to_string(), 0o644),
            (
                "keystore[0].credential[0].secret_access_key_file".to_string(),
                0o604
            ),
        ]
    );
    let line = config.readable_secrets()[0].to_string();
    assert!(line.starts_with("server.tls_key: "), "{line}");
    assert!(line.contains("mode 0606"), "{line}");
    assert!(!line.contains("PleaseReplace"), "{line}");
}
