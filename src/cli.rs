//! The command line's shape (clap): `serve`, `keys`, `call`, `config check`, `credentials new`,
//! `dev-certs`, `load`, and their options. What each command does is in `main.rs` and the modules
//! it calls.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

/// `--version`: the crate version and the commit it was built from.
static VERSION: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(crate::metrics::version_text);

#[derive(Parser)]
#[command(
    name = "xks-proxy",
    version = VERSION.as_str(),
    about = "AWS KMS External Key Store (XKS) proxy"
)]
pub struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log level or filter (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the proxy. Without --config: development mode (self-signed certificate, generated
    /// credential, software key store) under --state-dir.
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where development mode keeps its certificate, credential, keys and config.
        #[arg(long, default_value = ".xks-proxy/dev")]
        state_dir: PathBuf,
        /// Listen address for development mode (the first run fixes it in the generated config).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
    },
    /// Manage the keys of a key store: software key file or PKCS#11 token.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// The key store's uri_path, e.g. /example/kms/xks/v1 (optional with one key store).
        #[arg(long, global = true)]
        keystore: Option<String>,
    },
    /// Send one signed request to a running proxy, as KMS would, and print the reply.
    Call {
        #[command(flatten)]
        target: ProxyTarget,
        #[command(subcommand)]
        operation: CallOperation,
    },
    /// Check a config file completely: fields, certificates, key managers (module, token, PIN),
    /// a health round trip and the listed keys. Exit status 0 when everything is usable.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Generate SigV4 credentials for a key store.
    Credentials {
        #[command(subcommand)]
        action: CredentialsAction,
    },
    /// Write development TLS files: a throw-away CA, a server certificate signed by it and,
    /// with --client-cn, an mTLS client CA and client certificate. Never for production.
    DevCerts {
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// DNS names and IP addresses for the server certificate.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
        /// Also issue a client certificate with this CN (KMS presents cks.kms.<region>.amazonaws.com).
        #[arg(long)]
        client_cn: Option<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Load-test a running proxy with signed requests (checks every reply) and report latency.
    /// Exit status: 0 all answered correctly in time, 2 some failed or were late, 3 the generator
    /// could not keep its schedule (open loop; the numbers are then its own limit).
    Load {
        #[command(flatten)]
        target: ProxyTarget,
        #[arg(long, value_enum, default_value = "encrypt")]
        operation: crate::load::LoadOperation,
        /// Key id for encrypt, decrypt and mixed.
        #[arg(long, default_value = "foo")]
        key: String,
        /// Closed-loop workers (each on its own keep-alive connection); with --rate, the number
        /// of connections that serve the schedule.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Open loop: requests per second on a fixed schedule (KMS sends up to 1800 per key store).
        #[arg(long)]
        rate: Option<u32>,
        /// Each request's deadline in ms (KMS: 250), in open loop counted from its scheduled time;
        /// a request not answered by then is abandoned (late) and its connection replaced.
        #[arg(long, default_value_t = 250)]
        timeout_ms: u64,
        /// Send over HTTP/2: workers share connections (100 streams each) and a late request
        /// resets its stream instead of closing its connection.
        #[arg(long)]
        http2: bool,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 32)]
        plaintext_bytes: usize,
        #[arg(long, default_value_t = 32)]
        aad_bytes: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ConfigAction {
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum CredentialsAction {
    /// A new KMS-conformant access key id and secret, with the config snippet and the KMS values.
    New {
        /// The key store's uri_path (XksProxyUriPath).
        #[arg(long, default_value = "/example/kms/xks/v1")]
        uri_path: String,
        /// The proxy's public endpoint (XksProxyUriEndpoint), https://host without a port.
        #[arg(long, default_value = "https://xks.example.com")]
        endpoint: String,
        /// Name for the new custom key store.
        #[arg(long, default_value = "my-external-key-store")]
        name: String,
    },
}

#[derive(Subcommand)]
pub enum KeysAction {
    /// Create an AES-256 key.
    Create {
        id: String,
        /// encrypt,decrypt | encrypt | decrypt | none
        #[arg(long, default_value = "encrypt,decrypt")]
        usage: String,
    },
    /// List the key store's keys.
    List,
    /// Show one key.
    Show { id: String },
    /// Let a key be used again.
    Enable { id: String },
    /// Refuse every use of a key (InvalidStateException) until it is enabled.
    Disable { id: String },
}

#[derive(Subcommand)]
pub enum CallOperation {
    Health,
    Metadata {
        id: String,
    },
    Encrypt {
        id: String,
        /// Plaintext (UTF-8 text).
        text: String,
        #[arg(long)]
        aad: Option<String>,
        /// Ask for a ciphertext data integrity value.
        #[arg(long)]
        cdiv: bool,
    },
    /// Decrypt the JSON reply of an earlier `call encrypt` (a file, or - for stdin).
    Decrypt {
        id: String,
        encrypted: PathBuf,
        #[arg(long)]
        aad: Option<String>,
    },
}

/// Which running proxy `call` and `load` talk to, and as whom: a key store of a config file.
#[derive(clap::Args)]
pub struct ProxyTarget {
    #[arg(long)]
    pub config: PathBuf,
    /// The key store's uri_path (optional with one key store).
    #[arg(long)]
    pub keystore: Option<String>,
    /// https://host:port (default: the config's listen port on localhost).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// CA certificate(s) to trust (default: the config's tls_cert chain).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate for mTLS.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    #[arg(long)]
    pub client_key: Option<PathBuf>,
}
