//! The configuration file: TOML in, a typed and validated [`Config`] out.
//!
//! Every error names the file, the field and what is wrong with it. Relative paths resolve against
//! the directory of the config file. Secrets can live in the file or in files of their own
//! (`secret_access_key_file`), and are redacted in `Debug` output.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::auth::policy::{Policy, PolicyConfig};
use crate::keystore::pkcs11::Pkcs11Settings;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from.
    pub source: PathBuf,
    pub server: ServerConfig,
    pub limits: Limits,
    pub keystores: Vec<KeystoreConfig>,
    /// Where Prometheus metrics are served (`[metrics]`); none when the table is absent.
    pub metrics: Option<SocketAddr>,
    /// Per-key encryption counting against the random-IV limit (`[iv_budget]`).
    pub iv_budget: crate::iv_budget::IvBudgetConfig,
    /// The `secret_access_key_file`s read for the credentials, with the field naming each.
    pub secret_files: Vec<NamedFile>,
}

/// A file the configuration names, and the field that names it (`keystore[0].key_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFile {
    pub field: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// When set, clients must present a certificate chaining to one of these CAs (mTLS).
    pub client_ca: Option<PathBuf>,
    /// The name the client certificate's CN or a DNS SAN must equal; required with `client_ca`
    /// unless `client_any_subject` is set, and then `None`.
    pub client_subject: Option<String>,
    /// `client_any_subject = true`: with `client_ca`, any certificate chaining to it is accepted,
    /// whatever its subject (an explicit opt-out, warned about at start-up and on reload).
    pub client_any_subject: bool,
    /// `xksProxyFleetSize` in health responses: how many proxy instances serve this endpoint.
    pub fleet_size: u32,
    /// Where the audit log goes: `stdout` (default), `off`, or a file path.
    pub audit_log: crate::audit::AuditTarget,
    /// Audit records queued for a slow sink before further ones are dropped (and counted).
    pub audit_queue_lines: usize,
    /// Diagnostic log filter (`tracing` `EnvFilter` syntax, e.g. `info` or `info,xks_proxy=debug`).
    /// When set it wins over `--log-level` and `RUST_LOG`, and a reload applies it.
    pub log_level: Option<String>,
}

/// Explicit limits on what a client can make the proxy hold or wait for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body; above it the answer is 501 UnsupportedOperationException.
    pub max_body_bytes: usize,
    /// Largest decoded plaintext (Encrypt) or ciphertext (Decrypt); at least the spec's 4300.
    pub max_plaintext_bytes: usize,
    /// Largest decoded AAD; at least the spec's 8192, at most 65535 (the 2-byte length prefix).
    pub max_aad_bytes: usize,
    /// Largest request head (request line and headers) in bytes.
    pub max_header_bytes: usize,
    /// Open connections at most; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Requests being answered at once, over all connections (HTTP/2 multiplexes many on one);
    /// above it 429 ThrottlingException at once, before the body is read.
    pub max_in_flight_requests: usize,
    /// Concurrent HTTP/2 streams one connection may open.
    pub max_streams_per_connection: u32,
    /// Time allowed for the TLS handshake.
    pub tls_handshake_timeout_ms: u64,
    /// Time allowed for a request's headers to arrive (slow-loris guard).
    pub header_read_timeout_ms: u64,
    /// Deadline for a request once its headers arrived; 503 DependencyTimeoutException after it.
    pub request_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this long.
    pub idle_timeout_ms: u64,
    /// Deep health checks run this often (at most 60 s).
    pub health_interval_ms: u64,
    /// After SIGTERM/SIGINT, in-flight requests get this long to finish before connections drop.
    pub shutdown_grace_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            max_plaintext_bytes: 8192,
            max_aad_bytes: 8192,
            max_header_bytes: 16 * 1024,
            max_connections: 4096,
            max_in_flight_requests: 1024,
            max_streams_per_connection: 128,
            tls_handshake_timeout_ms: 1_000,
            header_read_timeout_ms: 5_000,
            request_timeout_ms: 200,
            idle_timeout_ms: 120_000,
            health_interval_ms: 5_000,
            shutdown_grace_ms: 10_000,
        }
    }
}

impl Limits {
    pub const MIN_PLAINTEXT_BYTES: usize = 4300;
    pub const MIN_AAD_BYTES: usize = 8192;
    pub const MAX_AAD_BYTES: usize = u16::MAX as usize;
    /// Upper bounds: far above anything KMS sends, low enough that no setting lets one request
    /// or one process ask for unbounded memory.
    pub const MAX_BODY_BYTES: usize = 1 << 20;
    pub const MAX_HEADER_BYTES: usize = 1 << 20;
    pub const MAX_CONNECTIONS: usize = 1_000_000;
    /// With the largest body this bounds buffered request bodies to 64 GiB; the default, 64 MiB.
    pub const MAX_IN_FLIGHT_REQUESTS: usize = 65_536;

    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms)
    }
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let field = |name: &str, what: String| Err((format!("limits.{name}"), what));
        if self.max_plaintext_bytes < Self::MIN_PLAINTEXT_BYTES {
            return field(
                "max_plaintext_bytes",
                format!(
                    "must be at least {} (spec minimum)",
                    Self::MIN_PLAINTEXT_BYTES
                ),
            );
        }
        if !(Self::MIN_AAD_BYTES..=Self::MAX_AAD_BYTES).contains(&self.max_aad_bytes) {
            return field(
                "max_aad_bytes",
                format!(
                    "must be between {} (spec minimum) and {} (2-byte length prefix)",
                    Self::MIN_AAD_BYTES,
                    Self::MAX_AAD_BYTES
                ),
            );
        }
        // Base64 of the largest plaintext and AAD, two 2048-character ARNs and the JSON around them.
        let needed = (self.max_plaintext_bytes + self.max_aad_bytes).div_ceil(3) * 4 + 6 * 1024;
        if self.max_body_bytes < needed {
            return field(
                "max_body_bytes",
                format!("must be at least {needed} to carry the largest plaintext and AAD allowed"),
            );
        }
        if self.max_body_bytes > Self::MAX_BODY_BYTES {
            return field(
                "max_body_bytes",
                format!("must be at most {}", Self::MAX_BODY_BYTES),
            );
        }
        if !(8192..=Self::MAX_HEADER_BYTES).contains(&self.max_header_bytes) {
            return field(
                "max_header_bytes",
                format!("must be between 8192 and {}", Self::MAX_HEADER_BYTES),
            );
        }
        if !(1..=Self::MAX_CONNECTIONS).contains(&self.max_connections) {
            return field(
                "max_connections",
                format!("must be between 1 and {}", Self::MAX_CONNECTIONS),
            );
        }
        if !(1..=Self::MAX_IN_FLIGHT_REQUESTS).contains(&self.max_in_flight_requests) {
            return field(
                "max_in_flight_requests",
                format!("must be between 1 and {}", Self::MAX_IN_FLIGHT_REQUESTS),
            );
        }
        if !(1..=1024).contains(&self.max_streams_per_connection) {
            return field(
                "max_streams_per_connection",
                "must be between 1 and 1024".into(),
            );
        }
        if self.request_timeout_ms == 0 || self.request_timeout_ms >= 250 {
            return field(
                "request_timeout_ms",
                "must be between 1 and 249: KMS gives each call 250 ms".into(),
            );
        }
        for (name, value, most) in [
            (
                "tls_handshake_timeout_ms",
                self.tls_handshake_timeout_ms,
                60_000,
            ),
            (
                "header_read_timeout_ms",
                self.header_read_timeout_ms,
                60_000,
            ),
            ("idle_timeout_ms", self.idle_timeout_ms, 3_600_000),
        ] {
            if !(1..=most).contains(&value) {
                return field(name, format!("must be between 1 and {most}"));
            }
        }
        if self.shutdown_grace_ms > 600_000 {
            return field(
                "shutdown_grace_ms",
                "must be at most 600000 (10 minutes)".into(),
            );
        }
        if !(100..=60_000).contains(&self.health_interval_ms) {
            return field(
                "health_interval_ms",
                "must be between 100 and 60000: cached health may be at most 1 minute old".into(),
            );
        }
        Ok(())
    }
}

/// One external key store: a URI path registered in KMS, its credentials and its key manager.
#[derive(Debug, Clone)]
pub struct KeystoreConfig {
    pub uri_path: String,
    pub region: String,
    pub backend: BackendConfig,
    pub credentials: Vec<Credential>,
    /// Secondary authorization; none means every authenticated request is allowed.
    pub policy: Option<std::sync::Arc<Policy>>,
    /// Requests per second this key store accepts (burst: one second's worth); above it 429.
    pub rate_limit_rps: Option<u32>,
}

#[derive(Debug, Clone)]
pub enum BackendConfig {
    /// Embedded software key store (not an HSM).
    Software {
        key_file: PathBuf,
    },
    Pkcs11(Pkcs11Settings),
}

impl BackendConfig {
    /// The settings of a `pkcs11` key store.
    pub fn pkcs11(&self) -> Option<&Pkcs11Settings> {
        match self {
            BackendConfig::Pkcs11(settings) => Some(settings),
            BackendConfig::Software { .. } => None,
        }
    }
}

/// A SigV4 credential that KMS uses for this key store.
#[derive(Clone)]
pub struct Credential {
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .finish()
    }
}

impl Credential {
    /// A new random credential in KMS's format: a 20-character `[A-Z2-7]` id and a 44-character
    /// Base64 secret carrying 256 bits from the OS CSPRNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        use base64::Engine;
        const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        let mut id_bytes = [0u8; 20];
        getrandom::fill(&mut id_bytes)?;
        let access_key_id = id_bytes
            .iter()
            .map(|b| BASE32[usize::from(b % 32)] as char)
            .collect();
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::fill(secret.as_mut())?;
        let secret = base64::engine::general_purpose::STANDARD.encode(secret.as_ref());
        Ok(Self {
            access_key_id,
            secret_access_key: Secret::new(secret),
        })
    }
}

/// A secret string: zeroed on drop, never printed by `Debug` or `Display`.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A configuration error: which file, which field, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {problem}")]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub problem: String,
}

// ---- the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    keystore: Vec<RawKeystore>,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    iv_budget: crate::iv_budget::IvBudgetConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    tls_cert: PathBuf,
    tls_key: PathBuf,
    client_ca: Option<PathBuf>,
    client_subject: Option<String>,
    #[serde(default)]
    client_any_subject: bool,
    #[serde(default = "one")]
    fleet_size: u32,
    audit_log: Option<String>,
    #[serde(default = "default_audit_queue_lines")]
    audit_queue_lines: usize,
    log_level: Option<String>,
}

fn default_audit_queue_lines() -> usize {
    crate::audit::DEFAULT_QUEUE_LINES
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeystore {
    uri_path: String,
    region: String,
    backend: String,
    key_file: Option<PathBuf>,
    pkcs11: Option<Pkcs11Settings>,
    #[serde(default)]
    credential: Vec<RawCredential>,
    policy: Option<PolicyConfig>,
    rate_limit_rps: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    access_key_id: String,
    secret_access_key: Option<Zeroizing<String>>,
    secret_access_key_file: Option<PathBuf>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            field: "(file)".into(),
            problem: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Validates config text as if it were read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let error = |field: String, problem: String| ConfigError {
            file: file.clone(),
            field,
            problem,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let problem = without_value(e.message());
            let at = e
                .span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].lines().count().max(1);
                    format!("line {line}")
                })
                .unwrap_or_else(|| "(toml)".into());
            error(at, problem)
        })?;
        let base_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base_dir.join(p)
            }
        };

        let listen: SocketAddr = raw.server.listen.parse().map_err(|_| {
            error(
                "server.listen".into(),
                format!(
                    "{:?} is not an address:port such as 0.0.0.0:443",
                    raw.server.listen
                ),
            )
        })?;
        check_client_auth(&raw.server).map_err(|(field, problem)| error(field.into(), problem))?;
        if raw.server.fleet_size == 0 {
            return Err(error(
                "server.fleet_size".into(),
                "must be at least 1".into(),
            ));
        }
        let audit_log = match raw.server.audit_log.as_deref() {
            None | Some("stdout") => crate::audit::AuditTarget::Stdout,
            Some("off") => crate::audit::AuditTarget::Off,
            Some("") => {
                return Err(error(
                    "server.audit_log".into(),
                    "use \"stdout\", \"off\" or a file path".into(),
                ));
            }
            Some(path) => crate::audit::AuditTarget::File(resolve(Path::new(path))),
        };
        if !(1..=crate::audit::MAX_QUEUE_LINES).contains(&raw.server.audit_queue_lines) {
            return Err(error(
                "server.audit_queue_lines".into(),
                format!("must be between 1 and {}", crate::audit::MAX_QUEUE_LINES),
            ));
        }
        if let Some(level) = &raw.server.log_level {
            crate::telemetry::parse_level(level)
                .map_err(|problem| error("server.log_level".into(), problem))?;
        }
        let server = ServerConfig {
            audit_log,
            audit_queue_lines: raw.server.audit_queue_lines,
            log_level: raw.server.log_level,
            listen,
            tls_cert: resolve(&raw.server.tls_cert),
            tls_key: resolve(&raw.server.tls_key),
            client_ca: raw.server.client_ca.as_deref().map(resolve),
            client_subject: raw.server.client_subject,
            client_any_subject: raw.server.client_any_subject,
            fleet_size: raw.server.fleet_size,
        };
        raw.limits
            .validate()
            .map_err(|(field, problem)| error(field, problem))?;
        let mut iv_budget = raw.iv_budget;
        iv_budget
            .validate()
            .map_err(|(field, problem)| error(field, problem))?;
        iv_budget.ledger = iv_budget.ledger.as_deref().map(resolve);

        if raw.keystore.is_empty() {
            return Err(error(
                "keystore".into(),
                "at least one [[keystore]] is required".into(),
            ));
        }
        let mut keystores: Vec<KeystoreConfig> = Vec::new();
        let mut secret_files: Vec<NamedFile> = Vec::new();
        for (i, ks) in raw.keystore.into_iter().enumerate() {
            let at = |name: &str| format!("keystore[{i}].{name}");
            check_uri_path(&ks.uri_path).map_err(|p| error(at("uri_path"), p))?;
            if keystores.iter().any(|k| k.uri_path == ks.uri_path) {
                return Err(error(
                    at("uri_path"),
                    format!("{:?} is used by another key store", ks.uri_path),
                ));
            }
            let region_ok = !ks.region.is_empty()
                && ks
                    .region
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !region_ok {
                return Err(error(
                    at("region"),
                    format!("{:?} is not an AWS Region such as us-east-1", ks.region),
                ));
            }
            let backend = match ks.backend.as_str() {
                "software" => {
                    let key_file = ks.key_file.ok_or_else(|| {
                        error(at("key_file"), "required for backend = \"software\"".into())
                    })?;
                    if ks.pkcs11.is_some() {
                        return Err(error(at("pkcs11"), "only for backend = \"pkcs11\"".into()));
                    }
                    BackendConfig::Software {
                        key_file: resolve(&key_file),
                    }
                }
                "pkcs11" => {
                    let mut settings = ks.pkcs11.ok_or_else(|| {
                        error(
                            at("pkcs11"),
                            "a [keystore.pkcs11] table is required for backend = \"pkcs11\"".into(),
                        )
                    })?;
                    if ks.key_file.is_some() {
                        return Err(error(
                            at("key_file"),
                            "only for backend = \"software\"".into(),
                        ));
                    }
                    settings.validate(&base_dir).map_err(|problem| {
                        let (field, what) = problem.split_once(": ").unwrap_or(("", &problem));
                        error(at(&format!("pkcs11.{field}")), what.to_string())
                    })?;
                    BackendConfig::Pkcs11(settings)
                }
                other => {
                    return Err(error(
                        at("backend"),
                        format!("{other:?} is not a backend: use \"software\" or \"pkcs11\""),
                    ));
                }
            };
            if ks.credential.is_empty() {
                return Err(error(
                    at("credential"),
                    "at least one [[keystore.credential]] is required".into(),
                ));
            }
            let mut credentials: Vec<Credential> = Vec::new();
            for (j, c) in ks.credential.into_iter().enumerate() {
                let cat = |name: &str| format!("keystore[{i}].credential[{j}].{name}");
                check_access_key_id(&c.access_key_id)
                    .map_err(|p| error(cat("access_key_id"), p))?;
                if credentials
                    .iter()
                    .any(|k| k.access_key_id == c.access_key_id)
                {
                    return Err(error(
                        cat("access_key_id"),
                        "appears twice in this key store".into(),
                    ));
                }
                let secret = match (c.secret_access_key, c.secret_access_key_file) {
                    (Some(secret), None) => secret,
                    (None, Some(file)) => {
                        let file = resolve(&file);
                        secret_files.push(NamedFile {
                            field: cat("secret_access_key_file"),
                            path: file.clone(),
                        });
                        let text = std::fs::read_to_string(&file).map_err(|e| {
                            error(
                                cat("secret_access_key_file"),
                                format!("cannot read {}: {e}", file.display()),
                            )
                        })?;
                        Zeroizing::new(text.trim().to_string())
                    }
                    _ => {
                        return Err(error(
                            cat("secret_access_key"),
                            "give exactly one of secret_access_key or secret_access_key_file"
                                .into(),
                        ));
                    }
                };
                check_secret(&secret).map_err(|p| error(cat("secret_access_key"), p))?;
                credentials.push(Credential {
                    access_key_id: c.access_key_id,
                    secret_access_key: Secret(secret),
                });
            }
            let policy = ks
                .policy
                .as_ref()
                .map(|p| Policy::compile(p).map(std::sync::Arc::new))
                .transpose()
                .map_err(|problem| {
                    let (field, what) = problem.split_once(": ").unwrap_or(("", &problem));
                    error(at(&format!("policy.{field}")), what.to_string())
                })?;
            if ks.rate_limit_rps == Some(0) {
                return Err(error(at("rate_limit_rps"), "must be at least 1".into()));
            }
            keystores.push(KeystoreConfig {
                uri_path: ks.uri_path,
                region: ks.region,
                backend,
                credentials,
                policy,
                rate_limit_rps: ks.rate_limit_rps,
            });
        }
        let metrics = match raw.metrics {
            None => None,
            Some(RawMetrics { listen: None }) => Some(crate::metrics::default_listen()),
            Some(RawMetrics {
                listen: Some(listen),
            }) => Some(listen.parse().map_err(|_| {
                error(
                    "metrics.listen".into(),
                    format!("{listen:?} is not an address:port such as 127.0.0.1:9464"),
                )
            })?),
        };
        Ok(Config {
            source: path.to_path_buf(),
            server,
            limits: raw.limits,
            keystores,
            metrics,
            iv_budget,
            secret_files,
        })
    }

    /// Every file this configuration was read from, or names for a reload to read again: the
    /// config file, the TLS certificate, key and client CA, the credentials' secret files and
    /// the PKCS#11 PIN files. A change to any of them is a reason to reload.
    pub fn files(&self) -> Vec<PathBuf> {
        let server = &self.server;
        let pin_files = self
            .keystores
            .iter()
            .filter_map(|k| k.backend.pkcs11()?.pin_file.clone());
        [&self.source, &server.tls_cert, &server.tls_key]
            .into_iter()
            .chain(&server.client_ca)
            .chain(self.secret_files.iter().map(|f| &f.path))
            .cloned()
            .chain(pin_files)
            .collect()
    }

    /// The key store registered at `uri_path`.
    pub fn keystore(&self, uri_path: &str) -> Option<&KeystoreConfig> {
        self.keystores.iter().find(|k| k.uri_path == uri_path)
    }
}

/// mTLS is strict: with `client_ca`, the client certificate's name must be pinned by
/// `client_subject`, or any subject accepted on purpose with `client_any_subject = true`. Without
/// either, any certificate chaining to the CA would do: for the Amazon Trust Services roots KMS's
/// certificate chains to, that is any certificate those roots ever issued.
fn check_client_auth(server: &RawServer) -> Result<(), (&'static str, String)> {
    match (
        &server.client_ca,
        &server.client_subject,
        server.client_any_subject,
    ) {
        (None, Some(_), _) => Err((
            "server.client_subject",
            "needs server.client_ca: the subject is checked on mTLS client certificates".into(),
        )),
        (None, None, true) => Err((
            "server.client_any_subject",
            "needs server.client_ca: it applies to mTLS client certificates".into(),
        )),
        (Some(_), Some(_), true) => Err((
            "server.client_any_subject",
            "contradicts server.client_subject: keep one of them".into(),
        )),
        (Some(_), Some(subject), false) if subject.trim().is_empty() => Err((
            "server.client_subject",
            "must not be empty: set KMS's client certificate name, \
             cks.kms.<region>.amazonaws.com"
                .into(),
        )),
        (Some(_), Some(subject), false) if subject.contains(['*', '?']) => Err((
            "server.client_subject",
            "is an exact name, not a pattern: set cks.kms.<region>.amazonaws.com, or \
             client_any_subject = true to accept any subject"
                .into(),
        )),
        (Some(_), None, false) => Err((
            "server.client_subject",
            "is required with server.client_ca: set it to the name KMS's client certificate \
             carries, cks.kms.<region>.amazonaws.com (e.g. cks.kms.us-east-1.amazonaws.com), \
             or set client_any_subject = true to accept any certificate chaining to client_ca"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// The warning for `client_any_subject = true`, when it is set.
pub fn any_subject_warning(server: &ServerConfig) -> Option<&'static str> {
    (server.client_ca.is_some() && server.client_any_subject).then_some(
        "server.client_any_subject = true: mTLS accepts any client certificate chaining to \
         client_ca, not only KMS's; set client_subject = \"cks.kms.<region>.amazonaws.com\"",
    )
}

/// A file holding a secret that group or others may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadableSecret {
    pub file: NamedFile,
    /// The file's permission bits.
    pub mode: u32,
}

impl fmt::Display for ReadableSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} is open to group or others (mode {:04o}), though it holds a secret: chmod go= it",
            self.file.field,
            self.file.path.display(),
            self.mode
        )
    }
}

impl Config {
    /// The secret files this configuration names (`server.tls_key`, each
    /// `secret_access_key_file`, each `pkcs11.pin_file`, each software `key_file`) whose mode lets
    /// others in, or a group other than the proxy's own. A file that cannot be examined is left out:
    /// reading it fails with its own error.
    pub fn readable_secrets(&self) -> Vec<ReadableSecret> {
        let mut named = vec![NamedFile {
            field: "server.tls_key".into(),
            path: self.server.tls_key.clone(),
        }];
        for (i, keystore) in self.keystores.iter().enumerate() {
            let (field, path) = match &keystore.backend {
                BackendConfig::Software { key_file } => ("key_file", Some(key_file)),
                BackendConfig::Pkcs11(settings) => ("pkcs11.pin_file", settings.pin_file.as_ref()),
            };
            named.extend(path.map(|path| NamedFile {
                field: format!("keystore[{i}].{field}"),
                path: path.clone(),
            }));
        }
        named.extend(self.secret_files.iter().cloned());
        named
            .into_iter()
            .filter_map(|file| {
                let mode = group_or_other_accessible(&file.path)?;
                Some(ReadableSecret { file, mode })
            })
            .collect()
    }
}

/// The permission bits of `path` when others, or a group other than the proxy's own, have any
/// access to it. Group access for the proxy's own group is how Kubernetes hands a non-root process
/// its Secret volume (`defaultMode: 0440` with `fsGroup`), and it lets in no one else.
#[cfg(unix)]
fn group_or_other_accessible(path: &Path) -> Option<u32> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let metadata = std::fs::metadata(path).ok()?;
    let mode = metadata.permissions().mode() & 0o7777;
    let foreign_group = mode & 0o070 != 0 && !own_groups().contains(&metadata.gid());
    (mode & 0o007 != 0 || foreign_group).then_some(mode)
}

/// The process's effective and supplementary group ids (from `/proc/self/status`; none where it
/// cannot be read, so every group access then counts).
#[cfg(unix)]
fn own_groups() -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Vec::new();
    };
    let mut groups = Vec::new();
    for line in status.lines() {
        if let Some(gids) = line.strip_prefix("Gid:") {
            // real, effective, saved, filesystem: the effective one.
            groups.extend(
                gids.split_whitespace()
                    .nth(1)
                    .and_then(|g| g.parse::<u32>().ok()),
            );
        } else if let Some(list) = line.strip_prefix("Groups:") {
            groups.extend(
                list.split_whitespace()
                    .filter_map(|g| g.parse::<u32>().ok()),
            );
        }
    }
    groups
}

#[cfg(not(unix))]
fn group_or_other_accessible(_path: &Path) -> Option<u32> {
    None
}

/// A TOML/serde error message without the value it quotes: serde writes a value of the wrong type
/// or out of range into its message (``invalid type: integer `123456`, expected a string``), and
/// that value may be a PIN or a secret written without quotes.
fn without_value(message: &str) -> String {
    for kind in ["invalid type", "invalid value"] {
        if message.starts_with(kind) {
            return match message.rsplit_once(", expected ") {
                Some((_, expected)) => format!("{kind}, expected {expected}"),
                None => kind.to_owned(),
            };
        }
    }
    message.to_owned()
}

/// KMS's XksProxyUriPath rule: `^(/[a-zA-Z0-9/_-]+/kms/xks/v\d{1,2})$|^(/kms/xks/v\d{1,2})$`, 10–128.
pub fn check_uri_path(path: &str) -> Result<(), String> {
    let rule = "must look like /kms/xks/v1 or /PREFIX/kms/xks/v1 (10 to 128 characters of a-z A-Z 0-9 / _ -)";
    if !(10..=128).contains(&path.len()) {
        return Err(format!("{path:?} {rule}"));
    }
    let Some((prefix, version)) = path.rsplit_once("/kms/xks/v") else {
        return Err(format!("{path:?} {rule}"));
    };
    let version_ok =
        (1..=2).contains(&version.len()) && version.bytes().all(|b| b.is_ascii_digit());
    let prefix_ok = prefix.is_empty()
        || (prefix.starts_with('/')
            && prefix.len() > 1
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-')));
    if version_ok && prefix_ok {
        Ok(())
    } else {
        Err(format!("{path:?} {rule}"))
    }
}

/// KMS's AccessKeyId rule: 20–30 characters of `A-Z2-7`.
pub fn check_access_key_id(id: &str) -> Result<(), String> {
    let ok = (20..=30).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b));
    if ok {
        Ok(())
    } else {
        Err("must be 20 to 30 characters of A-Z and 2-7 (KMS's format)".into())
    }
}

/// KMS's RawSecretAccessKey rule: 43–64 characters of `A-Z a-z 0-9 + / =`.
pub fn check_secret(secret: &str) -> Result<(), String> {
    let ok = (43..=64).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if ok {
        Ok(())
    } else {
        Err("must be 43 to 64 characters of A-Z a-z 0-9 + / = (for example: openssl rand -base64 32)".into())
    }
}

#[cfg(test)]
mod tests {
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
            config.server.tls_cert,
            PathBuf::from("/etc/xks/certs/server.pem")
        );
        let ks = config.keystore("/example/kms/xks/v1").unwrap();
        match &ks.backend {
            BackendConfig::Software { key_file } => {
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
            pinned.server.client_subject.as_deref(),
            Some("cks.kms.us-east-1.amazonaws.com")
        );
        assert!(!pinned.server.client_any_subject);
        assert_eq!(any_subject_warning(&pinned.server), None);

        let any = parse(&with_server(
            "client_ca = \"ca.pem\"\nclient_any_subject = true",
        ))
        .unwrap();
        assert_eq!(any.server.client_subject, None);
        assert!(any.server.client_any_subject);
        assert!(any_subject_warning(&any.server).is_some_and(|w| w.contains("client_any_subject")),);
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
        assert!(parse(GOOD).unwrap().server.client_ca.is_none());
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

    #[test]
    fn uri_path_rule() {
        assert!(check_uri_path("/kms/xks/v1").is_ok());
        assert!(check_uri_path("/example/kms/xks/v1").is_ok());
        assert!(check_uri_path("/a/b_c-d/kms/xks/v12").is_ok());
        assert!(check_uri_path("/kms/xks/v").is_err());
        assert!(check_uri_path("/a b/kms/xks/v1").is_err());
        assert!(check_uri_path("example/kms/xks/v1").is_err());
        assert!(check_uri_path(&format!("/{}/kms/xks/v1", "a".repeat(120))).is_err());
    }

    #[test]
    fn generated_credentials_pass_kms_rules() {
        let c = Credential::generate().unwrap();
        assert!(check_access_key_id(&c.access_key_id).is_ok());
        assert!(check_secret(c.secret_access_key.expose()).is_ok());
        assert_ne!(
            c.access_key_id,
            Credential::generate().unwrap().access_key_id
        );
    }
}
