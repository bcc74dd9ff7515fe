//! Test harness: starts the real `xks-proxy` binary from a config file in a temporary directory,
//! with a test CA and real TLS, and talks to it with real SigV4 — through the library's client
//! (aws-sigv4's request signer) and through `curl --aws-sigv4`, an independent signer. Its stdout
//! and stderr go to files, or to pipes nobody reads (a stalled sink for both logs).
#![allow(dead_code)]

pub mod hsm;
pub mod sockets;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;
use xks_proxy::auth::{Credential, Secret};
use xks_proxy::client::{ClientSettings, Reply, XksClient};
use xks_proxy::dev::{DevCa, write_private};

pub const URI_PATH: &str = "/example/kms/xks/v1";
pub const REGION: &str = "us-east-1";
pub const BIN: &str = env!("CARGO_BIN_EXE_xks-proxy");

/// The four conformance keys: id and `--usage`.
pub const KEYS: [(&str, &str); 4] = [
    ("foo", "encrypt,decrypt"),
    ("encrypt_only_key", "encrypt"),
    ("decrypt_only_key", "decrypt"),
    ("impotent_key", "none"),
];

/// How to set up a proxy for a test.
pub struct ProxySpec {
    /// The `[[keystore]]` backend lines (default: a software key file).
    pub backend: String,
    /// Extra TOML appended to `[server]`.
    pub server_extra: String,
    /// Extra TOML for a `[limits]` table.
    pub limits: String,
    /// Create the four conformance keys with `xks-proxy keys create`.
    pub create_keys: bool,
    /// Environment for the server process.
    pub env: Vec<(String, String)>,
}

impl Default for ProxySpec {
    fn default() -> Self {
        Self {
            backend: "backend = \"software\"\nkey_file = \"keys.json\"\n".into(),
            server_extra: String::new(),
            limits: String::new(),
            create_keys: true,
            env: Vec::new(),
        }
    }
}

/// A running proxy process; killed on drop.
pub struct TestProxy {
    pub dir: TempDir,
    pub port: u16,
    pub credential: Credential,
    pub config_file: PathBuf,
    pub ca_file: PathBuf,
    pub client_ca: DevCa,
    child: Child,
    log_file: PathBuf,
    stdout_file: PathBuf,
    env: Vec<(String, String)>,
    /// With [`Self::start_with_unread_output`]: the pipes of stdout and stderr, held open and
    /// unread, so the server's writes to them stall once the pipe buffers are full.
    unread_stdout: Option<ChildStdout>,
    unread_stderr: Option<ChildStderr>,
    unread_output: bool,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl TestProxy {
    pub fn start() -> Self {
        Self::start_with(ProxySpec::default())
    }

    pub fn start_with(spec: ProxySpec) -> Self {
        Self::start_as(spec, false)
    }

    /// As [`Self::start_with`], with stdout (the audit log) and stderr (the diagnostic log) going
    /// to pipes nobody reads: a stalled sink for both logs. [`Self::take_stderr`] reads it later.
    pub fn start_with_unread_output(spec: ProxySpec) -> Self {
        Self::start_as(spec, true)
    }

    fn start_as(spec: ProxySpec, unread_output: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = DevCa::generate("xks-proxy test CA").expect("CA");
        let server = ca
            .issue_server(&["localhost", "127.0.0.1"])
            .expect("server cert");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        std::fs::write(
            dir.path().join("server.pem"),
            format!("{}{}", server.cert_pem, ca.cert_pem()),
        )
        .unwrap();
        write_private(&dir.path().join("server-key.pem"), &server.key_pem).unwrap();
        let client_ca = DevCa::generate("xks-proxy test client CA").expect("client CA");
        std::fs::write(dir.path().join("client-ca.pem"), client_ca.cert_pem()).unwrap();

        let credential = Credential::generate().unwrap();
        let port = free_port();
        let limits = if spec.limits.is_empty() {
            String::new()
        } else {
            format!("[limits]\n{}\n", spec.limits)
        };
        let config = format!(
            r#"[server]
listen = "127.0.0.1:{port}"
tls_cert = "server.pem"
tls_key = "server-key.pem"
{server_extra}

{limits}
[[keystore]]
uri_path = "{URI_PATH}"
region = "{REGION}"
{backend}
[[keystore.credential]]
access_key_id = "{id}"
secret_access_key = "{secret}"
"#,
            server_extra = spec.server_extra,
            backend = spec.backend,
            id = credential.access_key_id,
            secret = credential.secret_access_key.expose(),
        );
        let config_file = dir.path().join("config.toml");
        std::fs::write(&config_file, config).unwrap();

        let mut proxy = TestProxy {
            log_file: dir.path().join("server.log"),
            stdout_file: dir.path().join("stdout.log"),
            port,
            credential,
            config_file,
            ca_file,
            client_ca,
            child: Command::new("true").spawn().unwrap(),
            env: spec.env,
            unread_stdout: None,
            unread_stderr: None,
            unread_output,
            dir,
        };
        if spec.create_keys {
            for (id, usage) in KEYS {
                proxy.cli(&["keys", "create", id, "--usage", usage]);
            }
        }
        proxy.spawn();
        proxy
    }

    /// Starts the server process and waits until it answers TLS handshakes with this test's
    /// certificate. A port taken since [`free_port`] picked it (by another test's proxy, or as
    /// the local port of an outgoing connection) is replaced by a new one, a few times.
    fn spawn(&mut self) {
        for _attempt in 0..5 {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log_file)
                .unwrap();
            let stdout = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.stdout_file)
                .unwrap();
            let mark = self.log().len();
            let mut command = Command::new(BIN);
            command
                .args(["--log-level", "info", "serve", "--config"])
                .arg(&self.config_file);
            if self.unread_output {
                command.stdout(Stdio::piped()).stderr(Stdio::piped());
            } else {
                command.stdout(stdout).stderr(log);
            }
            for (k, v) in &self.env {
                command.env(k, v);
            }
            self.child = command.spawn().expect("start xks-proxy");
            self.unread_stdout = self.child.stdout.take();
            self.unread_stderr = self.child.stderr.take();
            let deadline = Instant::now() + Duration::from_secs(30);
            while !self.answers_as_itself() {
                if let Ok(Some(status)) = self.child.try_wait() {
                    let log = self.log() + &self.read_unread_stderr();
                    let taken = format!(
                        "server.listen 127.0.0.1:{}: Address already in use",
                        self.port
                    );
                    if log.get(mark..).is_some_and(|new| new.contains(&taken)) {
                        self.move_to_a_new_port();
                        break;
                    }
                    panic!("xks-proxy exited with {status}:\n{log}");
                }
                assert!(
                    Instant::now() < deadline,
                    "xks-proxy did not start:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.is_running() {
                return;
            }
        }
        panic!("no free port for xks-proxy:\n{}", self.log());
    }

    /// Whether the port answers a TLS handshake with a certificate from this test's CA (another
    /// test's proxy on a reused port does not).
    fn answers_as_itself(&self) -> bool {
        let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
        let config = xks_proxy::tls::client_config(&self.ca_file, None).expect("client TLS config");
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = rustls::ClientConnection::new(config, name).expect("TLS client");
        while tls.is_handshaking() {
            match tls.complete_io(&mut tcp) {
                Ok(_) => {}
                // Another CA's certificate (another test's proxy), not TLS at all, no answer:
                // not this proxy, or not yet. (An mTLS proxy lets a TLS 1.3 client without a
                // certificate finish its side of the handshake, then refuses it.)
                Err(_) => return false,
            }
        }
        true
    }

    /// Picks a new port and writes it into the config file's `listen`.
    fn move_to_a_new_port(&mut self) {
        let old = format!("127.0.0.1:{}", self.port);
        self.port = free_port();
        let config = std::fs::read_to_string(&self.config_file).unwrap();
        let config = config.replacen(&old, &format!("127.0.0.1:{}", self.port), 1);
        std::fs::write(&self.config_file, config).unwrap();
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A raw TLS connection to the proxy (for requests written by hand), trusting its CA, with an
    /// mTLS client certificate and key when given: [`tls_connect_to`] this proxy.
    pub async fn tls_connect(
        &self,
        client_cert: Option<(&Path, &Path)>,
    ) -> std::io::Result<TlsStream> {
        tls_connect_to(self.port, &self.ca_file, client_cert).await
    }

    /// Asks the server to reload its configuration (SIGHUP).
    pub fn sighup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (up to `limit`, a hang guard) for the server process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops and starts the server process again (same config, keys and port).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.spawn();
    }

    /// Runs the binary's CLI against this proxy's config; panics on failure; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = self.cli_output(args);
        assert!(
            output.status.success(),
            "xks-proxy {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub fn cli_output(&self, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(BIN);
        command.args(args).arg("--config").arg(&self.config_file);
        if args.first() == Some(&"keys") {
            command.args(["--keystore", URI_PATH]);
        }
        for (k, v) in &self.env {
            command.env(k, v);
        }
        command.output().expect("run xks-proxy")
    }

    /// The unread stderr pipe of [`Self::start_with_unread_output`], for the test to drain
    /// (stdout stays open and unread).
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.unread_stderr.take()
    }

    /// What an exited server wrote to its unread stderr pipe.
    fn read_unread_stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut pipe) = self.unread_stderr.take() {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_file) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Everything the server wrote to its standard output so far (the audit log, by default).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_file).unwrap_or_default()
    }

    /// Where the log ends now: for [`Self::wait_for_log_after`].
    pub fn log_mark(&self) -> usize {
        self.log().len()
    }

    /// Waits (up to 10 s, a hang guard) until the log contains `needle`, and returns the log;
    /// panics if it never does. Log lines are written by a background thread, a moment after the
    /// request they describe.
    #[track_caller]
    pub fn wait_for_log(&self, needle: &str) -> String {
        self.wait_for_log_after(0, needle)
    }

    /// As [`Self::wait_for_log`], looking only at what was logged after `mark` ([`Self::log_mark`]).
    #[track_caller]
    pub fn wait_for_log_after(&self, mark: usize, needle: &str) -> String {
        eventually_blocking(&format!("logged: {needle}"), || {
            let log = self.log();
            if log.get(mark..).is_some_and(|new| new.contains(needle)) {
                Ok(log)
            } else {
                Err(log)
            }
        })
    }

    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    pub fn client_settings(&self) -> ClientSettings {
        ClientSettings {
            endpoint: self.endpoint(),
            ca_file: self.ca_file.clone(),
            client_cert: None,
            access_key_id: self.credential.access_key_id.clone(),
            secret_access_key: self.credential.secret_access_key.clone(),
            region: REGION.into(),
            uri_path: URI_PATH.into(),
        }
    }

    pub fn client(&self) -> XksClient {
        XksClient::new(self.client_settings()).expect("client")
    }

    /// A client with another credential or region.
    pub fn client_as(&self, access_key_id: &str, secret: &str, region: &str) -> XksClient {
        XksClient::new(ClientSettings {
            access_key_id: access_key_id.into(),
            secret_access_key: Secret::new(secret.into()),
            region: region.into(),
            ..self.client_settings()
        })
        .expect("client")
    }

    /// Writes an mTLS client certificate signed by the proxy's client CA; returns (cert, key).
    pub fn client_cert(&self, common_name: &str) -> (PathBuf, PathBuf) {
        let issued = self.client_ca.issue_client(common_name).unwrap();
        let cert = self.dir.path().join(format!("{common_name}.pem"));
        let key = self.dir.path().join(format!("{common_name}-key.pem"));
        std::fs::write(&cert, issued.cert_pem).unwrap();
        write_private(&key, &issued.key_pem).unwrap();
        (cert, key)
    }

    /// POSTs `body` to `{uri_path}{suffix}` with `curl --aws-sigv4` (an independent signer).
    pub fn curl(&self, suffix: &str, body: &str, extra: &[&str]) -> Reply {
        curl_post(
            &format!("{}{}{}", self.endpoint(), URI_PATH, suffix),
            &self.ca_file,
            &format!(
                "{}:{}",
                self.credential.access_key_id,
                self.credential.secret_access_key.expose()
            ),
            body,
            extra,
        )
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long the polling helpers wait for what they wait for: a hang guard for a loaded host, never
/// a timing assertion (it is only reached when the awaited state never comes).
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// How often the polling helpers look.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// Polls until `check` holds; panics, naming `what`, after [`HANG_GUARD`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_ok(what, || {
        let holds = check();
        async move {
            if holds.await {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        }
    })
    .await
}

/// Polls `check` until it returns `Ok(value)`, and returns the value; panics after [`HANG_GUARD`]
/// with `what` and the last `Err` (what was seen instead).
pub async fn eventually_ok<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "never happened: {what}\nlast seen: {seen}"
            ),
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// [`eventually_ok`] for synchronous code (it blocks the thread between looks).
#[track_caller]
pub fn eventually_blocking<T>(what: &str, check: impl FnMut() -> Result<T, String>) -> T {
    eventually_blocking_every(POLL_EVERY, what, check)
}

/// [`eventually_blocking`], looking every `every`: for a caller racing a short server deadline.
#[track_caller]
pub fn eventually_blocking_every<T>(
    every: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        match check() {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "never happened: {what}\nlast seen: {seen}"
            ),
        }
        std::thread::sleep(every);
    }
}

/// A TLS client stream to a test proxy.
pub type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A raw TLS connection to the proxy on `port` (for requests written by hand), trusting `ca_file`,
/// with an mTLS client certificate and key when given.
pub async fn tls_connect_to(
    port: u16,
    ca_file: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> std::io::Result<TlsStream> {
    let handshake = tls_handshake(
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await?,
        ca_file,
        client_cert,
    );
    handshake.await
}

/// The client's TLS handshake as `localhost` on a connected `tcp`, trusting `ca_file`: a future
/// that owns what it needs (for `tokio::spawn`).
pub fn tls_handshake(
    tcp: tokio::net::TcpStream,
    ca_file: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> impl std::future::Future<Output = std::io::Result<TlsStream>> + Send + 'static {
    let config = xks_proxy::tls::client_config(ca_file, client_cert).expect("client TLS config");
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp)
}

pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// SoftHSM's module ([`SOFTHSM_MODULE`], as Debian's softhsm2 package installs it), or `None`
/// (skipped) when it is absent where dependencies are not required ([`required_file`]).
pub fn softhsm_module() -> Option<PathBuf> {
    required_file(
        PathBuf::from(SOFTHSM_MODULE),
        "apt-get install softhsm2 opensc (scripts/test does)",
    )
}

/// Whether SoftHSM is installed ([`softhsm_module`]).
pub fn have_softhsm() -> bool {
    softhsm_module().is_some()
}

/// A fresh SoftHSM token labelled `xks-proxy` with the conformance keys, made by
/// `hsm-config/create-softhsm-token.sh` in a temporary directory (its `softhsm2.conf` is there).
/// `None` when SoftHSM is absent ([`have_softhsm`]).
pub fn softhsm_token(pin: &str) -> Option<TempDir> {
    if !have_softhsm() {
        return None;
    }
    let token = tempfile::tempdir().unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/hsm-config/create-softhsm-token.sh"
    );
    let output = Command::new(script)
        .arg(token.path())
        .arg("xks-proxy")
        .arg(pin)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "create-softhsm-token.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(token)
}

/// Whether curl with `--aws-sigv4` is here; where dependencies are required
/// ([`dependencies_required`]) its absence is a failure.
pub fn have_curl() -> bool {
    let ok = Command::new("curl")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        missing_dependency("curl", "apt-get install -y curl");
    }
    ok
}

pub fn curl_post(url: &str, ca: &Path, user: &str, body: &str, extra: &[&str]) -> Reply {
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--cacert"])
        .arg(ca)
        .args([
            "-H",
            "Content-Type: application/json",
            "--aws-sigv4",
            &format!("aws:amz:{REGION}:kms-xks-proxy"),
            "--user",
            user,
            "--data-binary",
            body,
            "--write-out",
            "\n%{http_code}",
        ])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (json, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Reply {
        status: http::StatusCode::from_u16(status.trim().parse().unwrap_or(599))
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR),
        body: serde_json::from_str(json).unwrap_or(Value::Null),
    }
}

/// Asserts an XKS error reply: status, errorName, and a printable errorMessage under 512 chars.
#[track_caller]
pub fn assert_error(reply: &Reply, status: u16, name: &str) {
    assert_eq!(reply.status.as_u16(), status, "reply: {reply:?}");
    assert_eq!(reply.error_name(), Some(name), "reply: {reply:?}");
    let message = reply.body["errorMessage"].as_str();
    assert!(
        message.is_some_and(|m| m.len() < 512 && m.bytes().all(|b| (0x20..=0x7e).contains(&b))),
        "errorMessage missing or not printable ASCII under 512 characters: {reply:?}"
    );
}

/// The usage matrix of the four conformance keys ([`KEYS`]) on any key store: each key's metadata,
/// unknown keys, and which of encrypt, encrypt with CDIV (which needs a verification decrypt) and
/// decrypt each key's usage allows.
pub async fn assert_usage_matrix(client: &XksClient) {
    use serde_json::json;
    use xks_proxy::client::bodies;
    let expected = [
        ("foo", json!(["ENCRYPT", "DECRYPT"])),
        ("encrypt_only_key", json!(["ENCRYPT"])),
        ("decrypt_only_key", json!(["DECRYPT"])),
        ("impotent_key", json!([])),
    ];
    for (key, usage) in expected {
        let reply = client
            .call(&format!("/keys/{key}/metadata"), &bodies::key_metadata())
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{key}: {reply:?}");
        assert_eq!(
            reply.body,
            json!({"keySpec": "AES_256", "keyUsage": usage, "keyStatus": "ENABLED"}),
            "{key}"
        );
    }
    let reply = client
        .call("/keys/non_existing_key/metadata", &bodies::key_metadata())
        .await
        .unwrap();
    assert_error(&reply, 404, "KeyNotFoundException");
    let reply = client
        .call(
            "/keys/non_existing_key/encrypt",
            &bodies::encrypt(b"x", None, false),
        )
        .await
        .unwrap();
    assert_error(&reply, 404, "KeyNotFoundException");

    // Encrypt-only: encrypt works (with and without AAD), decrypt and encrypt-with-CDIV do not.
    let mut sealed = Vec::new();
    for aad in [Some(b"a".as_slice()), None] {
        let reply = client
            .call(
                "/keys/encrypt_only_key/encrypt",
                &bodies::encrypt(b"data", aad, false),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
        let refused = client
            .call(
                "/keys/encrypt_only_key/decrypt",
                &bodies::decrypt_from(&reply.body, aad),
            )
            .await
            .unwrap();
        assert_error(&refused, 400, "InvalidKeyUsageException");
        sealed.push((reply.body, aad));
    }
    let reply = client
        .call(
            "/keys/encrypt_only_key/encrypt",
            &bodies::encrypt(b"data", None, true),
        )
        .await
        .unwrap();
    assert_error(&reply, 400, "InvalidKeyUsageException");
    // Decrypt-only and no usage: no encryption of any kind.
    for key in ["decrypt_only_key", "impotent_key"] {
        for aad in [Some(b"a".as_slice()), None] {
            for cdiv in [false, true] {
                let reply = client
                    .call(
                        &format!("/keys/{key}/encrypt"),
                        &bodies::encrypt(b"data", aad, cdiv),
                    )
                    .await
                    .unwrap();
                assert_error(&reply, 400, "InvalidKeyUsageException");
            }
        }
    }
    // No usage: no decryption either.
    for (encrypted, aad) in &sealed {
        let reply = client
            .call(
                "/keys/impotent_key/decrypt",
                &bodies::decrypt_from(encrypted, *aad),
            )
            .await
            .unwrap();
        assert_error(&reply, 400, "InvalidKeyUsageException");
    }
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(value: &Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(value.as_str().expect("a base64 string"))
        .expect("valid base64")
}

impl TestProxy {
    /// Whether the server process is still running (it has not exited or crashed).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Whether a missing test dependency is a failure here: in CI, or with `XKS_REQUIRE_SOFTHSM=1` /
/// `XKS_REQUIRE_TOOLS=1` (which `scripts/test` sets), every PKCS#11 module and tool must be present.
pub fn dependencies_required() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
        || std::env::var("XKS_REQUIRE_SOFTHSM").is_ok_and(|v| v == "1")
        || std::env::var("XKS_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// Marks a missing test dependency: a failure where dependencies are required
/// ([`dependencies_required`]), otherwise a skip line saying how to get it. The one place that
/// decides whether a test may skip.
#[track_caller]
pub fn missing_dependency(what: &str, how_to_get_it: &str) {
    assert!(
        !dependencies_required(),
        "{what} is required here: {how_to_get_it}"
    );
    eprintln!("skipping: {what} not found ({how_to_get_it})");
}

/// `Some(path)` when `path` exists; otherwise a failure where dependencies are required, or a
/// skip line saying how to get it ([`missing_dependency`]).
#[track_caller]
pub fn required_file(path: PathBuf, how_to_get_it: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    missing_dependency(&path.display().to_string(), how_to_get_it);
    None
}

/// A program on the `PATH`; otherwise as [`required_file`].
#[track_caller]
pub fn required_tool(name: &str, how_to_get_it: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    found.or_else(|| required_file(PathBuf::from(name), how_to_get_it))
}

/// The PKCS#11 emulator module built from this repository (`pkcs11-emulator/`).
pub fn emulator_module() -> Option<PathBuf> {
    let path = std::env::var_os("XKS_EMULATOR_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/libxks_pkcs11_emulator.so")
        });
    required_file(
        path,
        "cargo build --release -p xks-pkcs11-emulator (scripts/test does)",
    )
}

/// The Kryoptic PKCS#11 module, as `hsm-config/build-kryoptic.sh` builds it.
pub fn kryoptic_module() -> Option<PathBuf> {
    let path = std::env::var_os("KRYOPTIC_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kryoptic/lib/libkryoptic_pkcs11.so")
        });
    required_file(path, "hsm-config/build-kryoptic.sh (scripts/test does)")
}

/// A fresh Kryoptic token labelled `xks-proxy` with the conformance keys, made by
/// `hsm-config/create-kryoptic-token.sh`; its config is `kryoptic.conf` in the directory.
pub fn kryoptic_token(module: &Path, pin: &str) -> TempDir {
    let token = tempfile::tempdir().unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/hsm-config/create-kryoptic-token.sh"
    );
    let output = Command::new(script)
        .arg(token.path())
        .arg("xks-proxy")
        .arg(pin)
        .env("KRYOPTIC_MODULE", module)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "create-kryoptic-token.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    token
}

/// Runs AWS's official conformance client (`tests/conformance/run.sh`, every suite) against
/// `proxy`, over mTLS with KMS's client subject when `mtls` (the proxy must then require it), and
/// asserts that all 49 (51 with mTLS) pass. Skips when the client is absent and dependencies are
/// not required (the script says how to get it).
#[track_caller]
pub fn assert_conformance(proxy: &TestProxy, mtls: bool) {
    let (passed, mtls_args) = if mtls {
        let (cert, key) = proxy.client_cert(KMS_CLIENT_SUBJECT);
        (
            "conformance: 51 passed, 0 failed",
            vec!["--mtls-cert".into(), cert, "--mtls-key".into(), key],
        )
    } else {
        ("conformance: 49 passed, 0 failed", vec![])
    };
    let run = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/conformance/run.sh");
    let transcript = proxy.dir.path().join("conformance.log");
    let output = Command::new(run)
        .args(["--endpoint", &proxy.endpoint(), "--uri-path", URI_PATH])
        .arg("--access-key-id")
        .arg(&proxy.credential.access_key_id)
        .arg("--secret")
        .arg(proxy.credential.secret_access_key.expose())
        .arg("--cacert")
        .arg(&proxy.ca_file)
        .args(&mtls_args)
        .arg("--log")
        .arg(&transcript)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let client_or_tools_missing = matches!(output.status.code(), Some(2 | 3)) && stdout.is_empty();
    if client_or_tools_missing && !dependencies_required() {
        eprintln!("skipping the conformance run: {stderr}");
        return;
    }
    assert!(
        output.status.success() && stdout.contains(passed),
        "expected \"{passed}\"\n{stdout}{stderr}\n--- transcript ---\n{}\n--- proxy log ---\n{}",
        std::fs::read_to_string(&transcript).unwrap_or_default(),
        proxy.log()
    );
}

/// The subject KMS presents in its mTLS client certificate (us-east-1).
pub const KMS_CLIENT_SUBJECT: &str = "cks.kms.us-east-1.amazonaws.com";

/// `[server]` lines that require mTLS with KMS's client subject (the test client CA).
pub const MTLS_SERVER_LINES: &str =
    "client_ca = \"client-ca.pem\"\nclient_subject = \"cks.kms.us-east-1.amazonaws.com\"";

/// `GET /metrics` from the proxy's metrics listener on `port`: the whole HTTP response.
pub fn scrape(port: u16) -> String {
    use std::io::Write;
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    text
}

/// The value of one sample line (`name{labels} value`) of a scrape.
pub fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
