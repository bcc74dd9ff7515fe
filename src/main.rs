//! The `xks-proxy` command line: `serve`, `keys`, `call`, `config check`, `credentials new`,
//! `dev-certs`, `load`. Output goes through [`say!`]: a closed or full stdout (`| head`,
//! `> /dev/full`) is an error message and exit 1, never a panic.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use serde_json::Value;
use xks_proxy::cli::{
    CallOperation, Cli, Command, ConfigAction, CredentialsAction, KeysAction, ProxyTarget,
};
use xks_proxy::client::{ClientSettings, XksClient, bodies};
use xks_proxy::config::Config;
use xks_proxy::keystore::{self, KeyId, KeyInfo, KeyState, KeyUsage};
use xks_proxy::telemetry;

/// `println!` that returns the write error (as the `String` the commands return) instead of
/// panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(|e| format!("stdout: {e}"))
    }};
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
        Command::Call { target, operation } => call(&connect(target)?.client, operation).await,
        Command::Config {
            action: ConfigAction::Check { config },
        } => {
            let report = xks_proxy::config_check::run(&config).await;
            for finding in &report.findings {
                say!("{finding}")?;
            }
            match report.failures() {
                0 => {
                    say!("config {} is ready to serve", config.display())?;
                    Ok(ExitCode::SUCCESS)
                }
                failures => {
                    say!("config {}: {failures} problem(s)", config.display())?;
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Credentials {
            action:
                CredentialsAction::New {
                    uri_path,
                    endpoint,
                    name,
                },
        } => {
            xks_proxy::api::check_uri_path(&uri_path).map_err(|e| format!("--uri-path: {e}"))?;
            let credential = xks_proxy::auth::Credential::generate().map_err(|e| e.to_string())?;
            say!("{}", credential.enrollment(&uri_path, &endpoint, &name))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DevCerts {
            out,
            names,
            client_cn,
            force,
        } => {
            let files = xks_proxy::dev::write_dev_certs(&out, &names, client_cn.as_deref(), force)?;
            say!(
                "wrote {} in {} (development only)",
                files.join(", "),
                out.display()
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Load {
            target,
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
            let Connection {
                client,
                endpoint,
                ca,
                client_cert,
            } = connect(target)?;
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

/// A signed client for one key store of a config file.
/// A signed client for a key store of a config file, and where and how it connects.
struct Connection {
    client: XksClient,
    endpoint: String,
    ca: PathBuf,
    client_cert: Option<(PathBuf, PathBuf)>,
}

/// Connects to `target` as its key store's first credential: the endpoint defaults to the
/// config's listen port on localhost, the trusted CA to the config's own certificate chain.
fn connect(target: ProxyTarget) -> Result<Connection, String> {
    let config = Config::load(&target.config).map_err(|e| e.to_string())?;
    let keystore = config.pick_keystore(target.keystore.as_deref())?;
    let credential = keystore
        .credentials
        .first()
        .ok_or("the key store has no credential")?;
    let endpoint = target
        .endpoint
        .unwrap_or_else(|| format!("https://localhost:{}", config.server.listen.port()));
    let ca = target.ca.unwrap_or_else(|| config.server.tls.cert.clone());
    let client_cert = target.client_cert.zip(target.client_key);
    let client = XksClient::new(ClientSettings {
        endpoint: endpoint.clone(),
        ca_file: ca.clone(),
        client_cert: client_cert.clone(),
        access_key_id: credential.access_key_id.clone(),
        secret_access_key: credential.secret_access_key.clone(),
        region: keystore.region.clone(),
        uri_path: keystore.uri_path.clone(),
    })
    .map_err(|e| e.to_string())?;
    Ok(Connection {
        client,
        endpoint,
        ca,
        client_cert,
    })
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
        mtls = config.server.tls.client_ca.is_some(),
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

async fn keys(
    action: KeysAction,
    config_file: &Path,
    uri_path: Option<&str>,
) -> Result<ExitCode, String> {
    let config = Config::load(config_file).map_err(|e| e.to_string())?;
    let keystore = config.pick_keystore(uri_path)?;
    let store = keystore::open_async(keystore.backend.clone(), Default::default()).await?;
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
