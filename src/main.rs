//! The `xks-proxy` command line: `serve`, `keys`, `call`, `config check`, `credentials new`,
//! `dev-certs`, `load`. Output goes through [`say!`]: a closed or full stdout (`| head`,
//! `> /dev/full`) is an error message and exit 1, never a panic.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::Value;
use xks_proxy::client::{ClientSettings, XksClient, bodies};
use xks_proxy::config::{Config, KeystoreConfig};
use xks_proxy::keystore::{self, KeyId, KeyInfo, KeyState, KeyUsage, pkcs11::Pkcs11Tokens};
use xks_proxy::telemetry::{self, LogFormat};

/// `println!` that returns the write error (as the `String` the commands return) instead of
/// panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(|e| format!("stdout: {e}"))
    }};
}

/// `--version`: the crate version and the commit it was built from.
static VERSION: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(xks_proxy::metrics::version_text);

#[derive(Parser)]
#[command(
    name = "xks-proxy",
    version = VERSION.as_str(),
    about = "AWS KMS External Key Store (XKS) proxy"
)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log level or filter (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        keystore: Option<String>,
        /// https://host:port (default: the config's listen port on localhost).
        #[arg(long)]
        endpoint: Option<String>,
        /// CA certificate(s) to trust (default: the config's tls_cert chain).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Client certificate for mTLS.
        #[arg(long, requires = "client_key")]
        client_cert: Option<PathBuf>,
        #[arg(long)]
        client_key: Option<PathBuf>,
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
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        keystore: Option<String>,
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long, requires = "client_key")]
        client_cert: Option<PathBuf>,
        #[arg(long)]
        client_key: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "encrypt")]
        operation: xks_proxy::load::LoadOperation,
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
enum ConfigAction {
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CredentialsAction {
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
enum KeysAction {
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
enum CallOperation {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_writer = telemetry::init(cli.log_format, &cli.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("xks-proxy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command));
    // A start-up abandoned on a signal may leave a PKCS#11 call (a module load, a login) running
    // on a blocking thread: exit without waiting for it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("xks-proxy: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Serve {
            config,
            state_dir,
            listen,
        } => serve(config, &state_dir, &listen).await,
        Command::Keys {
            action,
            config,
            keystore,
        } => {
            let config = config.ok_or("keys: --config FILE is required")?;
            keys(action, &config, keystore.as_deref()).await
        }
        Command::Call {
            config,
            keystore,
            endpoint,
            ca,
            client_cert,
            client_key,
            operation,
        } => {
            let config = Config::load(&config).map_err(|e| e.to_string())?;
            let keystore = pick_keystore(&config, keystore.as_deref())?;
            let client = client_for(&config, keystore, endpoint, ca, client_cert.zip(client_key))?;
            call(&client, operation).await
        }
        Command::Config {
            action: ConfigAction::Check { config },
        } => config_check(&config).await,
        Command::Credentials {
            action:
                CredentialsAction::New {
                    uri_path,
                    endpoint,
                    name,
                },
        } => credentials_new(&uri_path, &endpoint, &name),
        Command::DevCerts {
            out,
            names,
            client_cn,
            force,
        } => dev_certs(&out, &names, client_cn.as_deref(), force),
        Command::Load {
            config,
            keystore,
            endpoint,
            ca,
            client_cert,
            client_key,
            operation,
            key,
            concurrency,
            rate,
            timeout_ms,
            http2,
            duration,
            plaintext_bytes,
            aad_bytes,
            json,
        } => {
            let config = Config::load(&config).map_err(|e| e.to_string())?;
            let keystore = pick_keystore(&config, keystore.as_deref())?;
            let endpoint = endpoint
                .unwrap_or_else(|| format!("https://localhost:{}", config.server.listen.port()));
            let ca = ca.unwrap_or_else(|| config.server.tls_cert.clone());
            let client_cert = client_cert.zip(client_key);
            let transport = if http2 {
                xks_proxy::load::Transport::Http2(std::sync::Arc::new(
                    xks_proxy::load::Http2Target::new(
                        &endpoint,
                        &ca,
                        client_cert
                            .as_ref()
                            .map(|(c, k)| (c.as_path(), k.as_path())),
                    )?,
                ))
            } else {
                xks_proxy::load::Transport::Http1
            };
            let client = client_for(&config, keystore, Some(endpoint), Some(ca), client_cert)?;
            let plan = xks_proxy::load::LoadPlan {
                operation,
                key_id: key,
                concurrency: concurrency.max(1),
                rate,
                duration: std::time::Duration::from_secs_f64(duration.max(0.1)),
                timeout: std::time::Duration::from_millis(timeout_ms.max(1)),
                plaintext_bytes: plaintext_bytes.max(1),
                aad_bytes,
                progress: !json,
                transport,
            };
            let report = xks_proxy::load::run(std::sync::Arc::new(client), plan).await?;
            if json {
                say!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                )?;
            } else {
                say!("{}", report.summary().trim_end())?;
            }
            if report.saturated {
                eprintln!(
                    "error: the load generator could not keep up, so these numbers are its own limit, \
                     not the proxy's:"
                );
                for reason in &report.saturation {
                    eprintln!("  - {reason}");
                }
                return Ok(ExitCode::from(3));
            }
            Ok(if report.ok == report.requests {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}

/// Validates everything `serve` would need, without binding the port. Prints one line per check.
async fn config_check(path: &Path) -> Result<ExitCode, String> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            say!("FAIL config: {e}")?;
            return Ok(ExitCode::FAILURE);
        }
    };
    say!("ok   config: {} key store(s)", config.keystores.len())?;
    if let Some(warning) = xks_proxy::config::any_subject_warning(&config.server) {
        say!("WARN mtls: {warning}")?;
    }
    for readable in config.readable_secrets() {
        say!("WARN file: {readable}")?;
    }
    let mut failures = 0;
    let server = &config.server;
    match xks_proxy::tls::server_config(
        &server.tls_cert,
        &server.tls_key,
        server.client_ca.as_deref(),
        server.client_subject.as_deref(),
    ) {
        Ok(_) => say!(
            "ok   tls: certificate and key load{}",
            if server.client_ca.is_some() {
                ", mTLS client CA loads"
            } else {
                ""
            }
        )?,
        Err(e) => {
            failures += 1;
            say!("FAIL tls: {e}")?;
        }
    }
    // Certificate expiry: WARN under 30 days (the proxy warns daily then), FAIL once expired.
    if let Ok(dates) =
        xks_proxy::tls::certificate_expiry(&server.tls_cert, server.client_ca.as_deref())
    {
        for date in &dates {
            let days_left = date.days_left();
            let status = if days_left < 0 {
                failures += 1;
                "FAIL"
            } else if days_left < xks_proxy::tls::EXPIRY_WARNING_DAYS {
                "WARN"
            } else {
                "ok  "
            };
            say!(
                "{status} tls: {} certificate {} expires {} ({days_left} days left)",
                date.role,
                date.subject,
                date.not_after_text()
            )?;
        }
    }
    match xks_proxy::iv_budget::IvBudget::open(&config.iv_budget, server.fleet_size) {
        Ok(budget) => {
            let usage = budget.usage();
            let highest = usage.iter().max_by(|a, b| a.used.total_cmp(&b.used));
            match (budget.ledger(), highest) {
                (None, _) => say!("ok   iv_budget: no ledger; counts start at zero each run")?,
                (Some(ledger), None) => say!(
                    "ok   iv_budget: ledger {} (no counts yet)",
                    ledger.display()
                )?,
                (Some(ledger), Some(top)) => say!(
                    "{} iv_budget: ledger {}: {} key(s); most used {} {} at {:.3e} of its share",
                    if top.used >= config.iv_budget.warn_fraction {
                        "WARN"
                    } else {
                        "ok  "
                    },
                    ledger.display(),
                    usage.len(),
                    top.keystore,
                    top.key,
                    top.used
                )?,
            }
        }
        Err(e) => {
            failures += 1;
            say!("FAIL {e}")?;
        }
    }
    let backends: Vec<_> = config.keystores.iter().map(|k| k.backend.clone()).collect();
    let opened = tokio::task::spawn_blocking(move || {
        let mut tokens = Pkcs11Tokens::default();
        backends
            .iter()
            .map(|b| keystore::open(b, &mut tokens))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| e.to_string())?;
    for (settings, store) in config.keystores.iter().zip(opened) {
        let name = &settings.uri_path;
        let store = match store {
            Ok(store) => store,
            Err(e) => {
                failures += 1;
                say!("FAIL keystore {name}: {e}")?;
                continue;
            }
        };
        say!(
            "ok   keystore {name}: {} key manager opened",
            store.describe().kind
        )?;
        for note in store.setup_report().await {
            say!(
                "{} keystore {name}: {}",
                if note.warning { "WARN" } else { "ok  " },
                note.text
            )?;
        }
        for status in store.check_health().await {
            let healthy = status.health == keystore::EkmHealth::Active;
            if !healthy {
                failures += 1;
            }
            say!(
                "{} keystore {name}: health {} {:?}{}",
                if healthy { "ok  " } else { "FAIL" },
                status.id,
                status.health,
                status.detail.map(|d| format!(": {d}")).unwrap_or_default()
            )?;
        }
        match store.list_keys().await {
            Ok(keys) => {
                let names: Vec<String> = keys.iter().map(|k| k.id.to_string()).collect();
                say!("ok   keystore {name}: keys {}", names.join(", "))?;
                if let Some(p) = settings.backend.pkcs11() {
                    for wanted in p.keys.iter().flatten() {
                        if !names.contains(wanted) {
                            failures += 1;
                            say!(
                                "FAIL keystore {name}: listed key {wanted:?} is not on the token"
                            )?;
                        }
                    }
                }
            }
            Err(e) => {
                failures += 1;
                say!("FAIL keystore {name}: cannot list keys: {e}")?;
            }
        }
    }
    if failures == 0 {
        say!("config {} is ready to serve", path.display())?;
        Ok(ExitCode::SUCCESS)
    } else {
        say!("config {}: {failures} problem(s)", path.display())?;
        Ok(ExitCode::FAILURE)
    }
}

/// Prints a new credential, the config snippet and what to give KMS.
fn credentials_new(uri_path: &str, endpoint: &str, name: &str) -> Result<ExitCode, String> {
    xks_proxy::config::check_uri_path(uri_path).map_err(|e| format!("--uri-path: {e}"))?;
    let credential = xks_proxy::config::Credential::generate().map_err(|e| e.to_string())?;
    let id = &credential.access_key_id;
    let secret = credential.secret_access_key.expose();
    let console = serde_json::json!({
        "XksProxyUriPath": uri_path,
        "XksProxyAuthenticationCredential": { "AccessKeyId": id, "RawSecretAccessKey": secret },
    });
    say!(
        r#"# 1. Add to the [[keystore]] with uri_path = "{uri_path}" (keep the old credential during rotation):
[[keystore.credential]]
access_key_id = "{id}"
secret_access_key = "{secret}"

# 2. Give KMS the same values. A new key store:
aws kms create-custom-key-store   --custom-key-store-name {name}   --custom-key-store-type EXTERNAL_KEY_STORE   --xks-proxy-connectivity PUBLIC_ENDPOINT   --xks-proxy-uri-endpoint {endpoint}   --xks-proxy-uri-path {uri_path}   --xks-proxy-authentication-credential AccessKeyId={id},RawSecretAccessKey={secret}
# or, rotating an existing one (disconnect is not needed):
aws kms update-custom-key-store --custom-key-store-id cks-...   --xks-proxy-authentication-credential AccessKeyId={id},RawSecretAccessKey={secret}

# Console: XksProxyUriEndpoint {endpoint}, XksProxyUriPath {uri_path}; or upload this file:
{console}"#
    )?;
    Ok(ExitCode::SUCCESS)
}

fn dev_certs(
    out: &Path,
    names: &[String],
    client_cn: Option<&str>,
    force: bool,
) -> Result<ExitCode, String> {
    use xks_proxy::dev::{DevCa, write_private};
    let mut files = vec!["ca.pem", "server.pem", "server-key.pem"];
    if client_cn.is_some() {
        files.extend(["client-ca.pem", "client.pem", "client-key.pem"]);
    }
    if !force && let Some(existing) = files.iter().map(|f| out.join(f)).find(|p| p.exists()) {
        return Err(format!(
            "{} exists (use --force to replace it)",
            existing.display()
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let write = |name: &str, text: &str| {
        std::fs::write(out.join(name), text)
            .map_err(|e| format!("{}: {e}", out.join(name).display()))
    };
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let ca = DevCa::generate("xks-proxy development CA (not for production)")
        .map_err(|e| e.to_string())?;
    let server = ca.issue_server(&names).map_err(|e| e.to_string())?;
    write("ca.pem", ca.cert_pem())?;
    write(
        "server.pem",
        &format!("{}{}", server.cert_pem, ca.cert_pem()),
    )?;
    write_private(&out.join("server-key.pem"), &server.key_pem).map_err(|e| e.to_string())?;
    if let Some(cn) = client_cn {
        let client_ca = DevCa::generate("xks-proxy development client CA (not for production)")
            .map_err(|e| e.to_string())?;
        let client = client_ca.issue_client(cn).map_err(|e| e.to_string())?;
        write("client-ca.pem", client_ca.cert_pem())?;
        write("client.pem", &client.cert_pem)?;
        write_private(&out.join("client-key.pem"), &client.key_pem).map_err(|e| e.to_string())?;
    }
    say!(
        "wrote {} in {} (development only)",
        files.join(", "),
        out.display()
    )?;
    Ok(ExitCode::SUCCESS)
}

/// A signed client for one key store of a config file.
fn client_for(
    config: &Config,
    keystore: &KeystoreConfig,
    endpoint: Option<String>,
    ca: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
) -> Result<XksClient, String> {
    let credential = keystore
        .credentials
        .first()
        .ok_or("the key store has no credential")?;
    let endpoint =
        endpoint.unwrap_or_else(|| format!("https://localhost:{}", config.server.listen.port()));
    XksClient::new(ClientSettings {
        endpoint,
        ca_file: ca.unwrap_or_else(|| config.server.tls_cert.clone()),
        client_cert,
        access_key_id: credential.access_key_id.clone(),
        secret_access_key: credential.secret_access_key.clone(),
        region: keystore.region.clone(),
        uri_path: keystore.uri_path.clone(),
    })
    .map_err(|e| e.to_string())
}

async fn serve(
    config: Option<PathBuf>,
    state_dir: &Path,
    listen: &str,
) -> Result<ExitCode, String> {
    let config_file = match config {
        Some(file) => file,
        None => {
            let state = xks_proxy::dev::prepare(state_dir, listen)
                .await
                .map_err(|e| format!("development mode: {e}"))?;
            let _ = say!("{}", xks_proxy::dev::banner(&state));
            state.config_file
        }
    };
    let shutdown = xks_proxy::server::shutdown_signal();
    tokio::pin!(shutdown);
    let config = Config::load(&config_file).map_err(|e| e.to_string())?;
    for readable in config.readable_secrets() {
        tracing::warn!(
            field = %readable.file.field,
            path = %readable.file.path.display(),
            mode = %format_args!("{:04o}", readable.mode),
            "secret file open to group or others; chmod go= it"
        );
    }
    // A signal during start-up (a PKCS#11 module load or login may hang) stops here.
    let server = tokio::select! {
        started = xks_proxy::server::start(&config) => started.map_err(|e| e.to_string())?,
        () = &mut shutdown => {
            tracing::warn!("stopped during start-up, before serving");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let addr = server.local_addr().map_err(|e| e.to_string())?;
    let certificates = xks_proxy::tls::served_certificates();
    tracing::info!(
        %addr,
        config = %config_file.display(),
        keystores = config.keystores.len(),
        mtls = config.server.client_ca.is_some(),
        version = env!("CARGO_PKG_VERSION"),
        commit = xks_proxy::metrics::BUILD_COMMIT,
        certificate_days_left = xks_proxy::tls::fewest_days_left(&certificates, false),
        client_ca_days_left = xks_proxy::tls::fewest_days_left(&certificates, true),
        "xks-proxy listening"
    );
    // A WARN once a day for each served certificate with less than 30 days left.
    let _expiry_watch = AbortOnDrop(tokio::spawn(xks_proxy::tls::watch_expiry()));
    server.run(shutdown).await;
    Ok(ExitCode::SUCCESS)
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn pick_keystore<'a>(
    config: &'a Config,
    uri_path: Option<&str>,
) -> Result<&'a KeystoreConfig, String> {
    match uri_path {
        Some(path) => config.keystore(path).ok_or_else(|| {
            format!(
                "no key store with uri_path {path:?} in {}",
                config.source.display()
            )
        }),
        None if config.keystores.len() == 1 => Ok(&config.keystores[0]),
        None => Err("this config has several key stores: name one with --keystore URI_PATH".into()),
    }
}

async fn keys(
    action: KeysAction,
    config_file: &Path,
    uri_path: Option<&str>,
) -> Result<ExitCode, String> {
    let config = Config::load(config_file).map_err(|e| e.to_string())?;
    let keystore = pick_keystore(&config, uri_path)?;
    let backend = keystore.backend.clone();
    let store =
        tokio::task::spawn_blocking(move || keystore::open(&backend, &mut Pkcs11Tokens::default()))
            .await
            .map_err(|e| e.to_string())??;
    let parse_id = |id: &str| KeyId::parse(id).map_err(|e| format!("{id:?}: {e}"));
    let fail = |e: keystore::KeyStoreError| e.to_string();
    match action {
        KeysAction::Create { id, usage } => {
            let usage = KeyUsage::parse(&usage)?;
            let info = store
                .create_key(&parse_id(&id)?, usage)
                .await
                .map_err(fail)?;
            print_key(&info)?;
        }
        KeysAction::List => {
            for info in store.list_keys().await.map_err(fail)? {
                print_key(&info)?;
            }
        }
        KeysAction::Show { id } => {
            print_key(&store.key_info(&parse_id(&id)?).await.map_err(fail)?)?
        }
        KeysAction::Enable { id } => print_key(
            &store
                .set_state(&parse_id(&id)?, KeyState::Enabled)
                .await
                .map_err(fail)?,
        )?,
        KeysAction::Disable { id } => print_key(
            &store
                .set_state(&parse_id(&id)?, KeyState::Disabled)
                .await
                .map_err(fail)?,
        )?,
    }
    Ok(ExitCode::SUCCESS)
}

fn print_key(info: &KeyInfo) -> Result<(), String> {
    say!(
        "{}\tusage={}\tstate={}",
        info.id,
        info.usage,
        info.state.as_str()
    )
}

async fn call(client: &XksClient, operation: CallOperation) -> Result<ExitCode, String> {
    let (suffix, body) = match &operation {
        CallOperation::Health => ("/health".to_string(), bodies::health()),
        CallOperation::Metadata { id } => (format!("/keys/{id}/metadata"), bodies::key_metadata()),
        CallOperation::Encrypt {
            id,
            text,
            aad,
            cdiv,
        } => (
            format!("/keys/{id}/encrypt"),
            bodies::encrypt(text.as_bytes(), aad.as_deref().map(str::as_bytes), *cdiv),
        ),
        CallOperation::Decrypt { id, encrypted, aad } => {
            let text = if encrypted.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).map_err(|e| e.to_string())?
            } else {
                std::fs::read_to_string(encrypted)
                    .map_err(|e| format!("{}: {e}", encrypted.display()))?
            };
            let encrypted: Value =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", encrypted.display()))?;
            (
                format!("/keys/{id}/decrypt"),
                bodies::decrypt_from(&encrypted, aad.as_deref().map(str::as_bytes)),
            )
        }
    };
    let reply = client
        .call(&suffix, &body)
        .await
        .map_err(|e| e.to_string())?;
    let mut shown = reply.body.clone();
    if let CallOperation::Decrypt { .. } = operation
        && let Some(text) = shown
            .get("plaintext")
            .and_then(Value::as_str)
            .and_then(base64_text)
    {
        shown["plaintextText"] = text.into();
    }
    say!(
        "{}",
        serde_json::to_string_pretty(&shown).unwrap_or_default()
    )?;
    if reply.status.is_success() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("xks-proxy: HTTP {}", reply.status);
        Ok(ExitCode::from(2))
    }
}

fn base64_text(value: &str) -> Option<String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()?;
    String::from_utf8(bytes).ok()
}
