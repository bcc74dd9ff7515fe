//! Runs AWS's official XKS proxy conformance client (vendored in `tests/conformance/xks-testclient`,
//! driven by `tests/conformance/run.sh`) against the real `xks-proxy` binary, started as a
//! subprocess from a config file: once over HTTPS (49 tests) and once over mTLS (51 tests).
//!
//! The client is bash plus curl, jq, uuidgen, xxd, openssl and base64. When one of them is missing
//! the tests are skipped, unless `CI` is set or `XKS_REQUIRE_TOOLS=1`, in which case they fail.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xks_proxy::config::Credential;
use xks_proxy::dev::{DevCa, write_private};

const BIN: &str = env!("CARGO_BIN_EXE_xks-proxy");
const URI_PATH: &str = "/example/kms/xks/v1";
const TOOLS: [&str; 6] = ["curl", "jq", "uuidgen", "xxd", "openssl", "base64"];
const KEYS: [(&str, &str); 4] = [
    ("foo", "encrypt,decrypt"),
    ("encrypt_only_key", "encrypt"),
    ("decrypt_only_key", "decrypt"),
    ("impotent_key", "none"),
];
/// The subject KMS presents in its mTLS client certificate (us-east-1).
const KMS_CLIENT_SUBJECT: &str = "cks.kms.us-east-1.amazonaws.com";

#[test]
fn conformance_https() {
    run_conformance(false, "conformance: 49 passed, 0 failed");
}

#[test]
fn conformance_mtls() {
    run_conformance(true, "conformance: 51 passed, 0 failed");
}

/// True if the client's tools are all on PATH. Otherwise panics (CI or `XKS_REQUIRE_TOOLS=1`) or
/// explains the skip on stderr and returns false.
fn tools_present() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|tool| !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let required = std::env::var_os("CI").is_some_and(|v| !v.is_empty())
        || std::env::var("XKS_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
    let why = format!(
        "conformance client tools missing: {} (Debian: apt-get install -y curl jq uuid-runtime xxd openssl)",
        missing.join(", ")
    );
    if required {
        panic!("{why}; required because CI or XKS_REQUIRE_TOOLS=1 is set");
    }
    eprintln!("skipping the conformance test: {why}");
    false
}

/// The proxy subprocess; killed when dropped, also when a test panics.
struct Server {
    child: Child,
    stderr_file: PathBuf,
}

impl Server {
    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_file).unwrap_or_default()
    }

    /// Waits until the proxy accepts TCP connections on `addr`.
    fn wait_ready(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "xks-proxy serve exited with {status} before listening; stderr:\n{}",
                    self.stderr()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "xks-proxy serve did not listen on {addr} within 20 s; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

fn write(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn run_conformance(mtls: bool, expected: &str) {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();

    // Server certificate for localhost/127.0.0.1, sent as leaf + CA chain.
    let ca = DevCa::generate("xks-proxy conformance test CA").expect("CA");
    let server = ca
        .issue_server(&["localhost", "127.0.0.1"])
        .expect("server cert");
    write(&dir.join("ca.pem"), ca.cert_pem());
    write(
        &dir.join("server.pem"),
        &format!("{}{}", server.cert_pem, ca.cert_pem()),
    );
    write_private(&dir.join("server-key.pem"), &server.key_pem).expect("server key");

    // mTLS: a separate client CA and a client certificate with KMS's subject.
    let mut mtls_lines = String::new();
    if mtls {
        let client_ca = DevCa::generate("xks-proxy conformance client CA").expect("client CA");
        let client = client_ca
            .issue_client(KMS_CLIENT_SUBJECT)
            .expect("client cert");
        write(&dir.join("client-ca.pem"), client_ca.cert_pem());
        write(&dir.join("client.pem"), &client.cert_pem);
        write_private(&dir.join("client-key.pem"), &client.key_pem).expect("client key");
        mtls_lines =
            format!("client_ca = \"client-ca.pem\"\nclient_subject = \"{KMS_CLIENT_SUBJECT}\"\n");
    }

    let credential = Credential::generate().expect("credential");
    let port = free_port();
    let config = dir.join("config.toml");
    write_private(
        &config,
        &format!(
            r#"[server]
listen = "127.0.0.1:{port}"
tls_cert = "server.pem"
tls_key = "server-key.pem"
{mtls_lines}
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
        ),
    )
    .expect("config");

    for (id, usage) in KEYS {
        let out = Command::new(BIN)
            .args(["keys", "create", id, "--usage", usage, "--config"])
            .arg(&config)
            .args(["--keystore", URI_PATH])
            .output()
            .expect("run xks-proxy keys create");
        assert!(
            out.status.success(),
            "xks-proxy keys create {id} --usage {usage}: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let stderr_file = dir.join("server.stderr");
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("server.stdout")).expect("stdout file"))
        .stderr(fs::File::create(&stderr_file).expect("stderr file"))
        .spawn()
        .expect("spawn xks-proxy serve");
    let mut server = Server { child, stderr_file };
    server.wait_ready(SocketAddr::from(([127, 0, 0, 1], port)));

    let run_sh = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/run.sh");
    let log = dir.join("conformance.log");
    let mut command = Command::new(&run_sh);
    command
        .arg("--endpoint")
        .arg(format!("https://localhost:{port}"))
        .args(["--uri-path", URI_PATH])
        .args(["--access-key-id", &credential.access_key_id])
        .args(["--secret", credential.secret_access_key.expose()])
        .arg("--cacert")
        .arg(dir.join("ca.pem"))
        .arg("--log")
        .arg(&log)
        .stdin(Stdio::null());
    if mtls {
        command
            .arg("--mtls-cert")
            .arg(dir.join("client.pem"))
            .arg("--mtls-key")
            .arg(dir.join("client-key.pem"));
    }
    let out = command.output().expect("run tests/conformance/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    if !(out.status.success() && stdout.contains(expected)) {
        // Keep the whole transcript and proxy log: the temporary directory goes away.
        let name = if mtls { "mtls" } else { "https" };
        let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("conformance-{name}.log"));
        let proxy_log = kept.with_extension("proxy.log");
        let _ = fs::copy(&log, &kept);
        let _ = fs::write(&proxy_log, server.stderr());
        let transcript = fs::read(&log).unwrap_or_default();
        let transcript = tail(&String::from_utf8_lossy(&transcript), 80);
        panic!(
            "conformance run failed (exit {}; expected \"{expected}\")\n\
             --- run.sh stdout ---\n{stdout}\n--- run.sh stderr ---\n{stderr}\n\
             --- transcript tail (all of it: {}) ---\n{transcript}\n\
             --- proxy stderr tail (all of it: {}) ---\n{}",
            out.status,
            kept.display(),
            proxy_log.display(),
            tail(&server.stderr(), 40)
        );
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
