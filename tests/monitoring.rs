//! The monitoring that ships with the proxy, against the running binary.
//!
//! - Drift: every metric name and label name that the alert rules
//!   (packaging/prometheus/xks-proxy-rules.yml) and the Grafana dashboard
//!   (packaging/grafana/xks-proxy.json) use exists in a real scrape of a proxy serving a SoftHSM
//!   token with mTLS, after requests that succeed and fail. The PromQL is read simply: `xks_...`
//!   identifiers are metrics; label names are those before a matcher inside `{}`, inside
//!   `by`/`without`/`on`/`ignoring`/`group_left`/`group_right (...)`, the second argument of
//!   `label_values`, and the rules' `$labels.x`. `instance` and `job` are Prometheus's target
//!   labels, not the proxy's. The dashboard's queries also go through `promtool check rules`.
//! - Certificate expiry: the `notAfter` gauge, `config check`'s days-left lines (ok, WARN under
//!   30 days, FAIL once expired), the start-up line, and the WARN for a certificate with less
//!   than 30 days left, after a reload and at start-up.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use xks_proxy::client::bodies;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const PIN: &str = "xks-monitoring-pin-3318";
/// Labels Prometheus adds to every scraped series: not in the proxy's exposition.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

// ---- a small reader of PromQL and of the exposition format ----

/// `expr` with the contents of every string literal removed (`"..."` becomes `""`).
fn without_strings(expr: &str) -> String {
    let mut out = String::new();
    let mut chars = expr.chars();
    while let Some(c) = chars.next() {
        if c == '"' || c == '\'' || c == '`' {
            out.push_str("\"\"");
            while let Some(inner) = chars.next() {
                if inner == '\\' {
                    chars.next();
                } else if inner == c {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The identifiers of `text`, in order, with the byte offset just after each.
fn identifiers(text: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    let mut current = String::new();
    for (i, c) in text.char_indices() {
        if is_ident(c) {
            current.push(c);
        } else if !current.is_empty() {
            found.push((std::mem::take(&mut current), i));
        }
    }
    if !current.is_empty() {
        found.push((current, text.len()));
    }
    found
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    identifiers(&without_strings(expr))
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with("xks_"))
        .collect()
}

/// The text between the `(` at or after `from` and its matching `)`.
fn parenthesized(text: &str, from: usize) -> Option<&str> {
    let open = from + text[from..].find('(')?;
    if !text[from..open].trim().is_empty() {
        return None;
    }
    let mut depth = 0;
    for (i, c) in text[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[open + 1..open + i]);
                }
            }
            _ => {}
        }
    }
    None
}

fn label_names(expr: &str) -> BTreeSet<String> {
    let text = without_strings(expr);
    let mut labels = BTreeSet::new();
    // Matchers: `{name op "", ...}`.
    let mut rest = text.as_str();
    while let Some(open) = rest.find('{') {
        let close = open + rest[open..].find('}').expect("a closing brace");
        for matcher in rest[open + 1..close].split(',') {
            let name: String = matcher
                .trim()
                .chars()
                .take_while(|&c| is_ident(c))
                .collect();
            let after = matcher.trim()[name.len()..].trim_start();
            if !name.is_empty()
                && ["=~", "!~", "!=", "="]
                    .iter()
                    .any(|op| after.starts_with(op))
            {
                labels.insert(name);
            }
        }
        rest = &rest[close + 1..];
    }
    // Grouping clauses, and label_values(metric, label).
    for (word, end) in identifiers(&text) {
        let grouping = [
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        ];
        if let Some(inside) = parenthesized(&text, end) {
            if grouping.contains(&word.as_str()) {
                labels.extend(
                    inside
                        .split(',')
                        .map(|l| l.trim().to_string())
                        .filter(|l| !l.is_empty()),
                );
            } else if word == "label_values" {
                let (_, label) = inside
                    .rsplit_once(',')
                    .expect("label_values(metric, label)");
                labels.insert(label.trim().to_string());
            }
        }
    }
    labels
}

/// Every sample of a scrape: metric name to the label names seen on it.
fn exposition(scrape: &str) -> BTreeMap<String, BTreeSet<String>> {
    let body = scrape
        .split_once("\r\n\r\n")
        .map_or(scrape, |(_, body)| body);
    let mut metrics: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name: String = line.chars().take_while(|&c| is_ident(c)).collect();
        let labels = metrics.entry(name.clone()).or_default();
        let Some(pairs) = line[name.len()..].strip_prefix('{') else {
            continue;
        };
        // name="value" pairs, values with \" and \\ escapes.
        let mut chars = pairs.chars().peekable();
        loop {
            let label: String = std::iter::from_fn(|| chars.next_if(|&c| is_ident(c))).collect();
            if label.is_empty() {
                break;
            }
            assert_eq!(chars.next(), Some('='), "{line}");
            assert_eq!(chars.next(), Some('"'), "{line}");
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => break,
                    _ => {}
                }
            }
            labels.insert(label);
            if chars.next() != Some(',') {
                break;
            }
        }
    }
    metrics
}

// ---- what the rules file and the dashboard use ----

/// One alert of the rules file: its name, its expression and the `$labels.x` of its annotations.
struct Rule {
    alert: String,
    expr: String,
    annotation_labels: BTreeSet<String>,
}

fn rules() -> Vec<Rule> {
    let text =
        std::fs::read_to_string(Path::new(REPO).join("packaging/prometheus/xks-proxy-rules.yml"))
            .unwrap();
    let mut rules = Vec::new();
    for chunk in text.split("- alert: ").skip(1) {
        let alert = chunk.lines().next().unwrap().trim().to_string();
        let lines: Vec<&str> = chunk.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with("expr:"))
            .unwrap_or_else(|| panic!("{alert} has no expr"));
        let first = lines[at].trim_start().trim_start_matches("expr:").trim();
        let expr = if first.starts_with('>') || first.starts_with('|') {
            // A block scalar: the lines indented deeper than `expr:`.
            let indent = lines[at].len() - lines[at].trim_start().len();
            lines[at + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            first.to_string()
        };
        let mut annotation_labels = BTreeSet::new();
        for piece in chunk.split("$labels.").skip(1) {
            annotation_labels.insert(piece.chars().take_while(|&c| is_ident(c)).collect());
        }
        rules.push(Rule {
            alert,
            expr,
            annotation_labels,
        });
    }
    assert!(rules.len() >= 10, "{} alerts read", rules.len());
    rules
}

/// Every `expr` and string `query` of the dashboard (panels and template variables).
fn dashboard_queries() -> Vec<String> {
    fn walk(value: &serde_json::Value, found: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "query", serde_json::Value::String(q)) if q.contains("xks_") => {
                            found.push(q.clone())
                        }
                        _ => walk(value, found),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let text =
        std::fs::read_to_string(Path::new(REPO).join("packaging/grafana/xks-proxy.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut found = Vec::new();
    walk(&dashboard, &mut found);
    assert!(found.len() >= 15, "{} queries read", found.len());
    found
}

/// What `what` uses that the scrape lacks: metrics not scraped, and labels none of its metrics
/// carry.
fn missing(
    what: &str,
    expr: &str,
    extra_labels: &BTreeSet<String>,
    scraped: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let metrics = metric_names(expr);
    let mut problems = Vec::new();
    if metrics.is_empty() {
        problems.push(format!("{what}: no xks_ metric in {expr:?}"));
    }
    let mut carried: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
    for metric in &metrics {
        match scraped.get(metric) {
            Some(labels) => carried.extend(labels.iter().map(String::as_str)),
            None => problems.push(format!("{what}: metric {metric} is not in the scrape")),
        }
    }
    for label in label_names(expr).iter().chain(extra_labels) {
        if !carried.contains(label.as_str()) {
            problems.push(format!(
                "{what}: label {label} is on none of {metrics:?} in the scrape"
            ));
        }
    }
    problems
}

/// promtool: `$XKS_PROMTOOL`, scripts/test's copy in target/tools, or the PATH.
fn promtool() -> Option<PathBuf> {
    const HOW: &str = "scripts/test extracts it from Debian's prometheus package";
    if let Some(path) = std::env::var_os("XKS_PROMTOOL") {
        return required_file(PathBuf::from(path), HOW);
    }
    let local = Path::new(REPO).join("target/tools/promtool");
    if local.exists() {
        return Some(local);
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("promtool"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| required_file(local, HOW))
}

#[test]
fn the_readers_find_metrics_and_labels() {
    let expr = r#"sum by (job, keystore) (rate(xks_requests_total{outcome=~"a|b",keystore!="x{y}"}[5m])) / on (keystore) group_left (ekm) xks_ekm_health"#;
    assert_eq!(
        metric_names(expr),
        BTreeSet::from(["xks_ekm_health".into(), "xks_requests_total".into()])
    );
    assert_eq!(
        label_names(expr),
        ["ekm", "job", "keystore", "outcome"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        label_names("label_values(xks_build_info{instance=~\"$i\"}, commit)"),
        ["commit", "instance"].map(String::from).into()
    );
    let scraped = exposition(
        "HTTP/1.1 200 OK\r\n\r\n# HELP x y\nxks_a_total{k=\"v,\\\"w\\\"\",l=\"\"} 1\nxks_b 2\n# EOF\n",
    );
    assert_eq!(scraped["xks_a_total"], ["k", "l"].map(String::from).into());
    assert!(scraped["xks_b"].is_empty());
}

#[tokio::test]
async fn every_metric_and_label_of_the_rules_and_the_dashboard_is_scraped() {
    let Some(token) = softhsm_token(PIN) else {
        return;
    };
    let metrics_port = free_port();
    let proxy = TestProxy::start_with(ProxySpec {
        backend: "backend = \"pkcs11\"\n[keystore.pkcs11]\nmodule = \"".to_string()
            + SOFTHSM_MODULE
            + "\"\ntoken_label = \"xks-proxy\"\npin_env = \"XKS_HSM_PIN\"\n",
        create_keys: false,
        server_extra: MTLS_SERVER_LINES.into(),
        limits: format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\""),
        env: vec![
            (
                "SOFTHSM2_CONF".into(),
                token.path().join("softhsm2.conf").display().to_string(),
            ),
            ("XKS_HSM_PIN".into(), PIN.into()),
        ],
    });
    let mut settings = proxy.client_settings();
    settings.client_cert = Some(proxy.client_cert(KMS_CLIENT_SUBJECT));
    let client = xks_proxy::client::XksClient::new(settings).unwrap();
    let health = client.call("/health", &bodies::health()).await.unwrap();
    assert_eq!(health.status, 200, "{health:?}");
    let sealed = client
        .call("/keys/foo/encrypt", &bodies::encrypt(b"m", None, false))
        .await
        .unwrap();
    assert_eq!(sealed.status, 200, "{sealed:?}");
    let opened = client
        .call(
            "/keys/foo/decrypt",
            &bodies::decrypt_from(&sealed.body, None),
        )
        .await
        .unwrap();
    assert_eq!(opened.status, 200, "{opened:?}");
    // Errors: an unknown key (a key-manager call error too), and a handshake without a client
    // certificate.
    let missing_key = client
        .call("/keys/nope/encrypt", &bodies::encrypt(b"m", None, false))
        .await
        .unwrap();
    assert_error(&missing_key, 404, "KeyNotFoundException");
    let anonymous = proxy.client();
    assert!(anonymous.call("/health", &bodies::health()).await.is_err());

    let scrape = scrape(metrics_port);
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    let scraped = exposition(&scrape);

    let mut problems = Vec::new();
    for rule in rules() {
        problems.extend(missing(
            &format!("rule {}", rule.alert),
            &rule.expr,
            &rule.annotation_labels,
            &scraped,
        ));
    }
    let queries = dashboard_queries();
    for query in &queries {
        problems.extend(missing("dashboard", query, &BTreeSet::new(), &scraped));
    }
    assert!(
        problems.is_empty(),
        "{}\n\nscraped: {scraped:#?}",
        problems.join("\n")
    );

    // The values that are not counts: the build and the certificates served.
    let build = scrape
        .lines()
        .find(|l| l.starts_with("xks_build_info{"))
        .unwrap();
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build.contains(&format!("commit=\"{}\"", xks_proxy::metrics::BUILD_COMMIT))
            && build.ends_with(" 1"),
        "{build}"
    );
    let served = xks_proxy::tls::certificate_expiry(
        &proxy.dir.path().join("server.pem"),
        Some(&proxy.dir.path().join("client-ca.pem")),
    )
    .unwrap();
    assert_eq!(
        served.len(),
        3,
        "leaf, CA in the chain, client CA: {served:?}"
    );
    for date in &served {
        let line = format!(
            "xks_tls_certificate_not_after_seconds{{certificate=\"{}\",subject=\"{}\"}}",
            date.role, date.subject
        );
        assert_eq!(
            sample(&scrape, &line),
            Some(date.not_after as f64),
            "{line}\n{scrape}"
        );
    }

    // The dashboard's queries are PromQL that Prometheus parses: as recording rules, with
    // Grafana's variables given values.
    let Some(promtool) = promtool() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in queries
        .iter()
        .filter(|q| !q.contains("label_values"))
        .enumerate()
    {
        let query = query
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*")
            .replace("$keystore", ".*");
        file.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&query).unwrap()
        ));
    }
    let rules_file = dir.path().join("dashboard.yml");
    std::fs::write(&rules_file, &file).unwrap();
    let output = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules_file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}\n{file}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA and a server certificate for localhost valid for `days` from now (negative: expired),
/// written as `{prefix}.pem` (the chain) and `{prefix}-key.pem` in `dir`. Returns the CA's PEM.
fn write_certificate(dir: &Path, prefix: &str, days: i64, name: &str) -> String {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let now = time::OffsetDateTime::now_utc();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ca.not_before = now - time::Duration::days(400);
    ca.not_after = now + time::Duration::days(3650);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, name);
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.not_before = now - time::Duration::days(365);
    leaf.not_after = now + time::Duration::days(days);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();

    xks_proxy::dev::write_private(
        &dir.join(format!("{prefix}-key.pem")),
        &leaf_key.serialize_pem(),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{prefix}.pem")),
        format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
    )
    .unwrap();
    ca_cert.pem()
}

/// Whether `text` has `{before}{n}{after}` for one of `days`: a certificate made for N days has
/// N days left in the second it is made, N - 1 after.
fn either(text: &str, before: &str, days: [i64; 2], after: &str) -> bool {
    days.iter()
        .any(|n| text.contains(&format!("{before}{n}{after}")))
}

fn config_check(config: &Path) -> (bool, String) {
    let output = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The `xks_tls_certificate_not_after_seconds` sample for the served end-entity certificate.
fn served_not_after(metrics_port: u16, subject: &str) -> Option<f64> {
    sample(
        &scrape(metrics_port),
        &format!(
            "xks_tls_certificate_not_after_seconds{{certificate=\"server\",subject=\"CN={subject}\"}}"
        ),
    )
}

#[tokio::test]
async fn certificate_expiry_is_a_metric_a_config_check_line_and_a_daily_warning() {
    let metrics_port = free_port();
    let mut proxy = TestProxy::start_with(ProxySpec {
        limits: format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\""),
        ..Default::default()
    });
    // The harness's certificate: 825 days, no warning.
    let listening = proxy.wait_for_log("xks-proxy listening");
    let startup = listening
        .lines()
        .find(|l| l.contains("xks-proxy listening"))
        .unwrap();
    assert!(
        startup.contains("certificate_days_left=824")
            || startup.contains("certificate_days_left=825"),
        "{startup}"
    );
    let (ok, text) = config_check(&proxy.config_file);
    assert!(ok, "{text}");
    assert!(
        text.contains("ok   tls: server certificate CN=localhost expires ")
            && text.contains("ok   tls: server_chain certificate CN=xks-proxy test CA expires "),
        "{text}"
    );
    let long = served_not_after(metrics_port, "localhost").expect("the served certificate");
    let days = (long - time::OffsetDateTime::now_utc().unix_timestamp() as f64) / 86400.0;
    assert!((824.0..=825.0).contains(&days), "{days}");
    assert!(!proxy.log().contains("expires in less than 30 days"));

    // A certificate with 20 days left, picked up by a reload: the gauge follows, a WARN comes at
    // once, and config check says WARN (still usable: exit 0).
    let mark = proxy.log_mark();
    let ca = write_certificate(proxy.dir.path(), "server", 20, "short-lived");
    std::fs::write(&proxy.ca_file, ca).unwrap();
    proxy.sighup();
    proxy.wait_for_log_after(mark, "configuration reloaded");
    let warning = proxy.wait_for_log_after(mark, "expires in less than 30 days");
    let warning = warning
        .lines()
        .find(|l| l.contains("expires in less than 30 days"))
        .unwrap();
    assert!(
        warning.contains("WARN")
            && warning.contains("certificate=\"server\"")
            && warning.contains("CN=short-lived")
            && either(warning, "days_left=", [19, 20], ""),
        "{warning}"
    );
    eventually("the gauge shows the reloaded certificate", || async {
        served_not_after(metrics_port, "short-lived").is_some()
    })
    .await;
    let scrape = scrape(metrics_port);
    assert!(
        !scrape.contains("subject=\"CN=localhost\""),
        "the old certificate's series is gone:\n{scrape}"
    );
    let (ok, text) = config_check(&proxy.config_file);
    assert!(ok, "{text}");
    assert!(
        text.contains("WARN tls: server certificate CN=short-lived expires ")
            && either(&text, "(", [19, 20], " days left)"),
        "{text}"
    );
    // Only once: the next line for it is due in a day.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        proxy.log()[mark..]
            .matches("expires in less than 30 days")
            .count(),
        1
    );

    // At start-up: the days left in the listening line, and the WARN.
    let mark = proxy.log_mark();
    proxy.restart();
    let log = proxy.wait_for_log_after(mark, "expires in less than 30 days");
    assert!(
        either(&log[mark..], "certificate_days_left=", [19, 20], ""),
        "{log}"
    );

    // Expired: config check fails.
    let config = std::fs::read_to_string(&proxy.config_file).unwrap();
    let expired_config = proxy.dir.path().join("expired.toml");
    std::fs::write(
        &expired_config,
        config
            .replace("\"server.pem\"", "\"expired.pem\"")
            .replace("\"server-key.pem\"", "\"expired-key.pem\""),
    )
    .unwrap();
    write_certificate(proxy.dir.path(), "expired", -2, "expired");
    let (ok, text) = config_check(&expired_config);
    assert!(!ok, "{text}");
    assert!(
        text.contains("FAIL tls: server certificate CN=expired expires ")
            && either(&text, "(", [-3, -2], " days left)"),
        "{text}"
    );
}
