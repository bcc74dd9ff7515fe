//! The configuration file: TOML in, one typed and validated [`Config`] out.
//!
//! Each module owns its section's settings type and its checks ([`Limits`], [`ServerTlsSettings`],
//! [`BackendSettings`], [`Credential`], [`Policy`], [`IvBudgetConfig`]); this module reads the
//! file, hands each table to its owner, places the owner's [`FieldError`] under the table it was
//! read from, and adds the file name. Relative paths resolve against the directory of the config
//! file. Secrets can live in the file or in files of their own (`secret_access_key_file`), and are
//! redacted in `Debug` output; [`secret_files`] finds those open to others.

mod secret_files;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::audit::AuditTarget;
use crate::auth::Credential;
use crate::auth::credentials::CredentialSettings;
use crate::auth::policy::{Policy, PolicyConfig};
use crate::field::FieldError;
use crate::iv_budget::IvBudgetConfig;
use crate::keystore::BackendSettings;
use crate::keystore::pkcs11::Pkcs11Settings;
use crate::limits::Limits;
use crate::tls::ServerTlsSettings;

pub use secret_files::ReadableSecret;

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
    pub iv_budget: IvBudgetConfig,
    /// The `secret_access_key_file`s read for the credentials, with the field naming each.
    pub secret_files: Vec<NamedFile>,
}

/// A file the configuration names, and the field that names it (`keystore[0].key_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFile {
    pub field: String,
    pub path: PathBuf,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// The certificate and key served, and mTLS.
    pub tls: ServerTlsSettings,
    /// `xksProxyFleetSize` in health responses: how many proxy instances serve this endpoint.
    pub fleet_size: u32,
    /// Where the audit log goes: `stdout` (default), `off`, or a file path.
    pub audit_log: AuditTarget,
    /// Audit records queued for a slow sink before further ones are dropped (and counted).
    pub audit_queue_lines: usize,
    /// Diagnostic log filter (`tracing` `EnvFilter` syntax, e.g. `info` or `info,xks_proxy=debug`).
    /// When set it wins over `--log-level` and `RUST_LOG`, and a reload applies it.
    pub log_level: Option<String>,
}

/// One external key store: a URI path registered in KMS, its credentials and its key manager.
#[derive(Debug, Clone)]
pub struct KeystoreConfig {
    pub uri_path: String,
    pub region: String,
    pub backend: BackendSettings,
    pub credentials: Vec<Credential>,
    /// Secondary authorization; none means every authenticated request is allowed.
    pub policy: Option<Arc<Policy>>,
    /// Requests per second this key store accepts (burst: one second's worth); above it 429.
    pub rate_limit_rps: Option<u32>,
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
    iv_budget: IvBudgetConfig,
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
    credential: Vec<CredentialSettings>,
    policy: Option<PolicyConfig>,
    rate_limit_rps: Option<u32>,
}

/// Resolves paths written in the config file against the file's directory.
struct Resolver<'a> {
    base_dir: &'a Path,
}

impl Resolver<'_> {
    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            field: "(file)".into(),
            problem: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Validates config text as if it were read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::compose(text, path).map_err(|error| ConfigError {
            file: path.display().to_string(),
            field: error.field().to_owned(),
            problem: error.problem().to_owned(),
        })
    }

    fn compose(text: &str, path: &Path) -> Result<Self, FieldError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].lines().count().max(1);
                    format!("line {line}")
                })
                .unwrap_or_else(|| "(toml)".into());
            FieldError::new(at, without_value(e.message()))
        })?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        let paths = Resolver { base_dir };
        let server = compose_server(raw.server, &paths).map_err(|e| e.under("server"))?;
        raw.limits.validate().map_err(|e| e.under("limits"))?;
        let mut iv_budget = raw.iv_budget;
        iv_budget.validate().map_err(|e| e.under("iv_budget"))?;
        iv_budget.ledger = iv_budget.ledger.as_deref().map(|p| paths.resolve(p));

        if raw.keystore.is_empty() {
            return Err(FieldError::new(
                "keystore",
                "at least one [[keystore]] is required",
            ));
        }
        let mut keystores: Vec<KeystoreConfig> = Vec::new();
        let mut secret_files: Vec<NamedFile> = Vec::new();
        for (i, raw) in raw.keystore.into_iter().enumerate() {
            let table = format!("keystore[{i}]");
            if keystores.iter().any(|k| k.uri_path == raw.uri_path) {
                return Err(FieldError::new(
                    "uri_path",
                    format!("{:?} is used by another key store", raw.uri_path),
                )
                .under(&table));
            }
            let keystore = compose_keystore(raw, &paths, &table, &mut secret_files)
                .map_err(|e| e.under(&table))?;
            keystores.push(keystore);
        }
        let metrics = match raw.metrics {
            None => None,
            Some(RawMetrics { listen: None }) => Some(crate::metrics::default_listen()),
            Some(RawMetrics {
                listen: Some(listen),
            }) => Some(listen.parse().map_err(|_| {
                FieldError::new(
                    "metrics.listen",
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
        let tls = &self.server.tls;
        let pin_files = self
            .keystores
            .iter()
            .filter_map(|k| k.backend.pkcs11()?.pin_file.clone());
        [&self.source, &tls.cert, &tls.key]
            .into_iter()
            .chain(&tls.client_ca)
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

/// `[server]`; errors name the field below it.
fn compose_server(raw: RawServer, paths: &Resolver) -> Result<ServerConfig, FieldError> {
    let listen: SocketAddr = raw.listen.parse().map_err(|_| {
        FieldError::new(
            "listen",
            format!(
                "{:?} is not an address:port such as 0.0.0.0:443",
                raw.listen
            ),
        )
    })?;
    let tls = ServerTlsSettings {
        cert: paths.resolve(&raw.tls_cert),
        key: paths.resolve(&raw.tls_key),
        client_ca: raw.client_ca.as_deref().map(|p| paths.resolve(p)),
        client_subject: raw.client_subject,
        client_any_subject: raw.client_any_subject,
    };
    tls.check()?;
    if raw.fleet_size == 0 {
        return Err(FieldError::new("fleet_size", "must be at least 1"));
    }
    let audit_log = match raw.audit_log.as_deref() {
        None | Some("stdout") => AuditTarget::Stdout,
        Some("off") => AuditTarget::Off,
        Some("") => {
            return Err(FieldError::new(
                "audit_log",
                "use \"stdout\", \"off\" or a file path",
            ));
        }
        Some(path) => AuditTarget::File(paths.resolve(Path::new(path))),
    };
    if !(1..=crate::audit::MAX_QUEUE_LINES).contains(&raw.audit_queue_lines) {
        return Err(FieldError::new(
            "audit_queue_lines",
            format!("must be between 1 and {}", crate::audit::MAX_QUEUE_LINES),
        ));
    }
    if let Some(level) = &raw.log_level {
        crate::telemetry::parse_level(level).map_err(|p| FieldError::new("log_level", p))?;
    }
    Ok(ServerConfig {
        listen,
        tls,
        fleet_size: raw.fleet_size,
        audit_log,
        audit_queue_lines: raw.audit_queue_lines,
        log_level: raw.log_level,
    })
}

/// One `[[keystore]]`, read from `table`; errors name the field below it.
fn compose_keystore(
    raw: RawKeystore,
    paths: &Resolver,
    table: &str,
    secret_files: &mut Vec<NamedFile>,
) -> Result<KeystoreConfig, FieldError> {
    crate::api::check_uri_path(&raw.uri_path).map_err(|p| FieldError::new("uri_path", p))?;
    let region_ok = !raw.region.is_empty()
        && raw
            .region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !region_ok {
        return Err(FieldError::new(
            "region",
            format!("{:?} is not an AWS Region such as us-east-1", raw.region),
        ));
    }
    let backend = match raw.backend.as_str() {
        "software" => {
            let key_file = raw.key_file.ok_or_else(|| {
                FieldError::new("key_file", "required for backend = \"software\"")
            })?;
            if raw.pkcs11.is_some() {
                return Err(FieldError::new("pkcs11", "only for backend = \"pkcs11\""));
            }
            BackendSettings::Software {
                key_file: paths.resolve(&key_file),
            }
        }
        "pkcs11" => {
            let mut settings = raw.pkcs11.ok_or_else(|| {
                FieldError::new(
                    "pkcs11",
                    "a [keystore.pkcs11] table is required for backend = \"pkcs11\"",
                )
            })?;
            if raw.key_file.is_some() {
                return Err(FieldError::new(
                    "key_file",
                    "only for backend = \"software\"",
                ));
            }
            settings
                .validate(paths.base_dir)
                .map_err(|e| e.under("pkcs11"))?;
            BackendSettings::Pkcs11(settings)
        }
        other => {
            return Err(FieldError::new(
                "backend",
                format!("{other:?} is not a backend: use \"software\" or \"pkcs11\""),
            ));
        }
    };
    if raw.credential.is_empty() {
        return Err(FieldError::new(
            "credential",
            "at least one [[keystore.credential]] is required",
        ));
    }
    let mut credentials: Vec<Credential> = Vec::new();
    for (j, raw) in raw.credential.into_iter().enumerate() {
        let at = format!("credential[{j}]");
        if credentials
            .iter()
            .any(|k| k.access_key_id == raw.access_key_id())
        {
            return Err(
                FieldError::new("access_key_id", "appears twice in this key store").under(&at),
            );
        }
        let (credential, secret_file) = raw
            .load(|path| paths.resolve(path))
            .map_err(|e| e.under(&at))?;
        secret_files.extend(secret_file.map(|path| NamedFile {
            field: format!("{table}.{at}.secret_access_key_file"),
            path,
        }));
        credentials.push(credential);
    }
    let policy = raw
        .policy
        .as_ref()
        .map(|p| Policy::compile(p).map(Arc::new))
        .transpose()
        .map_err(|e| e.under("policy"))?;
    if raw.rate_limit_rps == Some(0) {
        return Err(FieldError::new("rate_limit_rps", "must be at least 1"));
    }
    Ok(KeystoreConfig {
        uri_path: raw.uri_path,
        region: raw.region,
        backend,
        credentials,
        policy,
        rate_limit_rps: raw.rate_limit_rps,
    })
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
