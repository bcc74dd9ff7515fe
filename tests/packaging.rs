//! The shipped packaging, run for real where this machine can: the container entrypoint's SoftHSM
//! demo (outside a container, its paths moved by its own environment knobs), and the Kubernetes
//! ConfigMap's `proxy.toml` served through the entrypoint with the Deployment's arguments, its
//! files laid out as the Deployment projects them and SoftHSM standing in for the vendor module.
//! `docker build`, systemd and a cluster are not available here (see packaging/README.md).
//!
//! Checked statically instead: every Kubernetes manifest against the Kubernetes API schemas
//! (`kubernetes-validate --strict`, offline: the package ships the schemas), and the systemd unit
//! with `systemd-analyze verify` in a scratch root. scripts/test installs both tools.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use xks_proxy::auth::Secret;
use xks_proxy::client::{ClientSettings, XksClient, bodies};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The entrypoint with its paths pointed into `dir`, serving on `port`; stderr to `dir/stderr`.
fn entrypoint(dir: &Path, config: &Path, port: u16, args: &[&str]) -> Command {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stderr"))
        .unwrap();
    let mut command = Command::new(Path::new(REPO).join("packaging/docker-entrypoint.sh"));
    command
        .args(args)
        .stderr(stderr)
        .env("XKS_CONFIG", config)
        .env("XKS_DEMO_DIR", dir.join("demo"))
        .env("XKS_DEMO_LISTEN", format!("127.0.0.1:{port}"))
        .env("XKS_HSM_CONFIG_DIR", Path::new(REPO).join("hsm-config"))
        .env("XKS_PROXY_BIN", BIN)
        .env("SOFTHSM2_MODULE", SOFTHSM_MODULE);
    command
}

/// Waits until `port` accepts connections; panics if `child` exits first.
fn wait_serving(child: &mut Child, port: u16, dir: &Path) {
    let stderr = || std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    eventually_blocking(&format!("something listens on {port}"), || {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the entrypoint exited with {status}:\n{}", stderr());
        }
        Err(stderr())
    });
}

/// SIGTERM reaches the proxy (the entrypoint `exec`s it) and it exits 0.
fn terminate(mut child: Child) {
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = eventually_blocking("the proxy exits after SIGTERM", || {
        child
            .try_wait()
            .unwrap()
            .ok_or_else(|| "still running".to_string())
    });
    assert!(status.success(), "{status}");
}

fn client(port: u16, ca_file: PathBuf, access_key_id: &str, secret: &str) -> XksClient {
    XksClient::new(ClientSettings {
        endpoint: format!("https://localhost:{port}"),
        ca_file,
        client_cert: None,
        access_key_id: access_key_id.into(),
        secret_access_key: Secret::new(secret.into()),
        region: REGION.into(),
        uri_path: URI_PATH.into(),
    })
    .unwrap()
}

/// The value after `label` on the banner line that starts with it.
fn banner_value(banner: &str, label: &str) -> String {
    banner
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} in the banner:\n{banner}"))
        .trim()
        .to_owned()
}

#[tokio::test]
async fn the_container_demo_serves_the_softhsm_token_and_survives_a_restart() {
    // The demo needs SoftHSM and OpenSC like the tests of the pkcs11 key store.
    if !have_softhsm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let absent = dir.path().join("no-config-mounted.toml");
    let mut child = entrypoint(dir.path(), &absent, port, &[])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_serving(&mut child, port, dir.path());
    // The banner, printed before the entrypoint execs the proxy (which keeps stdout: the audit
    // log goes there, so the pipe stays open until the end).
    let mut stdout = child.stdout.take().unwrap();
    let mut banner = String::new();
    while !banner.contains("--aws-sigv4") {
        use std::io::Read;
        let mut chunk = [0u8; 4096];
        let read = stdout.read(&mut chunk).unwrap();
        assert!(read > 0, "stdout closed:\n{banner}");
        banner.push_str(&String::from_utf8_lossy(&chunk[..read]));
    }
    assert!(banner.contains("DEMO: SoftHSM token"), "{banner}");
    let access_key_id = banner_value(&banner, "AccessKeyId");
    let secret = banner_value(&banner, "RawSecretAccessKey");
    let ca = dir.path().join("demo/certs/ca.pem");
    let demo = client(port, ca.clone(), &access_key_id, &secret);

    let health = demo.call("/health", &bodies::health()).await.unwrap();
    assert_eq!(health.body["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");
    assert!(
        health.body["ekmVendor"]
            .as_str()
            .unwrap()
            .contains("SoftHSM")
    );
    let sealed = demo
        .call("/keys/foo/encrypt", &bodies::encrypt(b"demo", None, false))
        .await
        .unwrap();
    assert_eq!(sealed.status, 200, "{sealed:?}");
    // The printed curl command, with the printed credential: an independent signer.
    if have_curl() {
        let reply = curl_post(
            &format!("https://localhost:{port}{URI_PATH}/health"),
            &ca,
            &format!("{access_key_id}:{secret}"),
            &bodies::health().to_string(),
            &[],
        );
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    terminate(child);
    drop(stdout);

    // A restart of the same container reuses the token, certificates and credential.
    let mut child = entrypoint(dir.path(), &absent, port, &[])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_serving(&mut child, port, dir.path());
    let opened = demo
        .call(
            "/keys/foo/decrypt",
            &bodies::decrypt_from(&sealed.body, None),
        )
        .await
        .unwrap();
    assert_eq!(unb64(&opened.body["plaintext"]), b"demo");
    terminate(child);
}

/// The `proxy.toml` block of the ConfigMap, unindented.
fn configmap_proxy_toml() -> String {
    let yaml =
        std::fs::read_to_string(Path::new(REPO).join("packaging/k8s/configmap.yaml")).unwrap();
    let block = yaml
        .split_once("  proxy.toml: |\n")
        .expect("configmap.yaml has data.proxy.toml")
        .1;
    block
        .lines()
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A scalar of the Deployment: the value after `key:` on the first line that has it.
fn deployment_value(key: &str) -> String {
    let yaml =
        std::fs::read_to_string(Path::new(REPO).join("packaging/k8s/deployment.yaml")).unwrap();
    yaml.lines()
        .find_map(|line| line.trim().strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in deployment.yaml"))
        .trim()
        .to_owned()
}

#[tokio::test]
async fn the_kubernetes_config_serves_with_the_deployments_probes_and_fleet_size() {
    let pin = "k8s-demo-pin";
    let Some(token) = softhsm_token(pin) else {
        return;
    };
    // /etc/xks-proxy as the Deployment projects it: the ConfigMap and the Secrets.
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    let certs = xks_proxy::dev::DevCa::generate("k8s test CA").unwrap();
    let server = certs.issue_server(&["localhost"]).unwrap();
    std::fs::create_dir_all(etc.join("tls")).unwrap();
    std::fs::create_dir_all(etc.join("credentials")).unwrap();
    std::fs::write(etc.join("tls/tls.crt"), &server.cert_pem).unwrap();
    xks_proxy::dev::write_private(&etc.join("tls/tls.key"), &server.key_pem).unwrap();
    let credential = xks_proxy::auth::Credential::generate().unwrap();
    let secret = credential.secret_access_key.expose();
    std::fs::write(etc.join("credentials/secret-access-key"), secret).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, certs.cert_pem()).unwrap();

    // Only what cannot be the same here changes: the vendor module, the port, the state volume
    // and the placeholder access key id.
    let port = free_port();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let original = configmap_proxy_toml();
    let config = original
        .replace("/opt/hsm/lib/libvendor-pkcs11.so", SOFTHSM_MODULE)
        .replace("0.0.0.0:8443", &format!("127.0.0.1:{port}"))
        .replace("/var/lib/xks-proxy/state", &state.display().to_string())
        .replace("REPLACEWITHYOURACCESSKEYID", &credential.access_key_id);
    assert_eq!(config.lines().count(), original.lines().count(), "{config}");
    let config_file = etc.join("proxy.toml");
    std::fs::write(&config_file, &config).unwrap();

    let softhsm_conf = token.path().join("softhsm2.conf");
    let check = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&config_file)
        .env("SOFTHSM2_CONF", &softhsm_conf)
        .env("XKS_HSM_PIN", pin)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{text}");

    // The Deployment's container arguments, through the entrypoint's mounted-config path.
    let args = deployment_value("args");
    let args: Vec<String> = serde_json::from_str(args.split('#').next().unwrap().trim()).unwrap();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = entrypoint(dir.path(), &config_file, port, &args)
        .env("SOFTHSM2_CONF", &softhsm_conf)
        .env("XKS_HSM_PIN", pin)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_serving(&mut child, port, dir.path());

    // The probes: GET on the Deployment's path, over HTTPS.
    if have_curl() {
        let probe = deployment_value("path");
        let output = Command::new("curl")
            .args(["--silent", "--cacert"])
            .arg(&ca)
            .arg(format!("https://localhost:{port}{probe}"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&output.stdout), "ok\n");
    }
    let replicas: u64 = deployment_value("replicas").parse().unwrap();
    let client = client(port, ca, &credential.access_key_id, secret);
    let health = client.call("/health", &bodies::health()).await.unwrap();
    assert_eq!(health.body["xksProxyFleetSize"], replicas, "{health:?}");
    assert_eq!(health.body["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");
    let sealed = client
        .call("/keys/foo/encrypt", &bodies::encrypt(b"k8s", None, false))
        .await
        .unwrap();
    assert_eq!(sealed.status, 200, "{sealed:?}");
    terminate(child);
    assert!(
        state.join("iv-ledger.json").exists(),
        "the IV ledger is kept on the state volume"
    );
}

/// `kubernetes-validate` from PyPI: `$XKS_KUBERNETES_VALIDATE`, the virtualenv scripts/test
/// makes (target/tools/venv), or the PATH.
fn kubernetes_validate() -> Option<PathBuf> {
    const HOW: &str = "pip install kubernetes-validate (scripts/test does, into target/tools/venv)";
    if let Some(path) = std::env::var_os("XKS_KUBERNETES_VALIDATE") {
        return required_file(PathBuf::from(path), HOW);
    }
    let venv = Path::new(REPO).join("target/tools/venv/bin/kubernetes-validate");
    if venv.exists() {
        return Some(venv);
    }
    required_tool("kubernetes-validate", HOW)
}

fn run(mut command: Command) -> (bool, String) {
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn the_kubernetes_manifests_pass_the_kubernetes_schemas() {
    let Some(validate) = kubernetes_validate() else {
        return;
    };
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(Path::new(REPO).join("packaging/k8s"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 4, "{manifests:?}");
    // --strict: a field the schema does not have is an error, not a warning.
    let mut command = Command::new(&validate);
    command.arg("--strict").args(&manifests);
    let (ok, text) = run(command);
    assert!(ok, "{text}");
    // Each YAML document was checked against a schema (a kind it does not know is skipped).
    let documents: usize = manifests
        .iter()
        .map(|path| {
            let yaml = std::fs::read_to_string(path).unwrap();
            yaml.split("\n---")
                .filter(|doc| doc.lines().any(|l| l.starts_with("kind:")))
                .count()
        })
        .sum();
    assert_eq!(
        text.matches(" passed for resource ").count(),
        documents,
        "{text}"
    );

    // The validator does see mistakes: a misspelt field and a wrong type.
    let deployment =
        std::fs::read_to_string(Path::new(REPO).join("packaging/k8s/deployment.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("replicas:", "replicaCount:"),
        ("replicas: ", "replicas: two # "),
    ] {
        assert!(deployment.contains(from));
        let broken = dir.path().join("deployment.yaml");
        std::fs::write(&broken, deployment.replacen(from, to, 1)).unwrap();
        let mut command = Command::new(&validate);
        command.arg("--strict").arg(&broken);
        let (ok, text) = run(command);
        assert!(!ok, "{to}: {text}");
    }
}

/// A scratch root for `systemd-analyze verify --root`: the system's unit directory (for the
/// targets the unit names), the unit where an administrator installs it, and executables at the
/// paths it runs (stand-ins: verify checks that they exist and are executable).
fn systemd_root(unit: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("usr/lib/systemd");
    std::fs::create_dir_all(&units).unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg("/usr/lib/systemd/system")
        .arg(&units)
        .status()
        .unwrap();
    assert!(copied.success());
    for executable in ["usr/local/bin/xks-proxy", "bin/kill"] {
        let path = root.path().join(executable);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let installed = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&installed).unwrap();
    std::fs::write(installed.join("xks-proxy.service"), unit).unwrap();
    root
}

fn systemd_verify(analyze: &Path, root: &Path) -> (bool, String) {
    let mut command = Command::new(analyze);
    command
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(["--man=no", "xks-proxy.service"]);
    run(command)
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = required_tool(
        "systemd-analyze",
        "apt-get install systemd (scripts/test does)",
    ) else {
        return;
    };
    let unit =
        std::fs::read_to_string(Path::new(REPO).join("packaging/xks-proxy.service")).unwrap();
    let root = systemd_root(&unit);
    // verify exits 0 on unknown keys and bad values (it only warns): any output is a failure.
    let (ok, text) = systemd_verify(&analyze, root.path());
    assert!(ok && text.trim().is_empty(), "{text}");

    // It does read the unit: a misspelt directive and a bad value are reported.
    let broken = unit.replacen(
        "Restart=on-failure",
        "Restart=sometimes\nProtectSystm=strict",
        1,
    );
    let root = systemd_root(&broken);
    let (_, text) = systemd_verify(&analyze, root.path());
    assert!(
        text.contains("ProtectSystm") && text.contains("sometimes"),
        "{text}"
    );
}
