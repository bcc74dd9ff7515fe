//! The configuration file: TOML in, one typed and validated [`Config`] out.
//!
//! Each module owns its section's settings type and its checks ([`Limits`], [`ServerTlsSettings`],
//! [`BackendSettings`], [`Credential`], [`Policy`], [`IvBudgetConfig`]); this module reads the
//! file, hands each table to its owner, places the owner's [`FieldError`] under the table it was
//! read from, and adds the file name. Relative paths resolve against the directory of the config
//! file. Secrets can live in the file or in files of their own (`secret_access_key_file`), and are
//! redacted in `Debug` output; [`secret_files`] finds those open to others.

mod keystore;
mod secret_files;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::audit::AuditTarget;
use crate::field::FieldError;
use crate::iv_budget::IvBudgetConfig;
use crate::limits::Limits;
use crate::tls::ServerTlsSettings;

pub use keystore::KeystoreConfig;
use keystore::{RawKeystore, compose_keystore};
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

/// Resolves paths written in the config file against the file's directory.
pub(super) struct Resolver<'a> {
    base_dir: &'a Path,
}

impl Resolver<'_> {
    pub(super) fn resolve(&self, path: &Path) -> PathBuf {
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

    /// The key store a command names with `--keystore`, or the only one when it names none.
    pub fn pick_keystore(&self, uri_path: Option<&str>) -> Result<&KeystoreConfig, String> {
        match uri_path {
            Some(path) => self.keystore(path).ok_or_else(|| {
                format!(
                    "no key store with uri_path {path:?} in {}",
                    self.source.display()
                )
            }),
            None if self.keystores.len() == 1 => Ok(&self.keystores[0]),
            None => {
                Err("this config has several key stores: name one with --keystore URI_PATH".into())
            }
        }
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
