//! The listener: from a validated [`Config`] to a running HTTPS server, and back down again.
//!
//! Start-up ([`start`]): load the TLS certificate, open every key store's key manager (on a blocking
//! thread: a PKCS#11 module may take a while to load and log in), run each backend's first deep
//! health check, bind the listener.
//!
//! Each accepted connection ([`Server::run`]) takes a connection slot (at most `max_connections`
//! open; when every slot is taken, the connection idle or handshaking longest is asked to close),
//! then lives in [`connection`]: the TLS handshake within its timeout, HTTP/1.1 with keep-alive or
//! HTTP/2 with hyper, the idle and slow-loris rules, a lingering close. Bodies and per-request
//! deadlines are bounded by the API layer.
//!
//! Reload: on SIGHUP, and when the config file or a TLS file changes (checked every 2 s), the
//! config is read and validated again. If it is good, new handshakes get the new certificate, key
//! and client CA, and new requests (on old connections too) the new credentials, policies, quotas,
//! key stores and limits; the log level and IV-budget warning level change; key managers whose
//! settings did not change stay open, and a changed PKCS#11 key store on a token already logged in
//! shares that login and session pool (a new PIN or pool setting for it needs a restart, and the
//! log says so); a token no key store names any more closes after its last request, or at
//! shutdown. If it is not good, the running configuration stays and the error is logged. Limits
//! apply to connections opened after the reload (`max_connections` at once). `listen`,
//! `[metrics] listen`, `iv_budget.ledger` and `health_interval_ms` need a restart; a reload that
//! changes them says so in the log.
//!
//! Shutdown: on SIGTERM or SIGINT the listener closes, open connections finish their in-flight
//! requests (keep-alive connections are told to close), and after `shutdown_grace_ms` the rest are
//! dropped. Then the IV-budget ledger is written and the key managers are closed (PKCS#11
//! sessions closed, token logged out).

mod admission;
mod connection;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::{Api, ProxyKeystore};
use crate::audit::AuditLog;
use crate::auth::SigV4Verifier;
use crate::config::Config;
use crate::iv_budget::IvBudget;
use crate::keystore::health::HealthMonitor;
use crate::keystore::{self, KeyStore, pkcs11::Pkcs11Tokens};
use crate::metrics::{MeteredStore, Metrics};

/// How often the config and TLS files are checked for changes.
const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// How long changed files must stay unchanged before a reload reads them.
const FILE_SETTLE_TIME: Duration = Duration::from_millis(250);

/// A background deep health check that takes longer than this counts as UNAVAILABLE.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the server could not start. Each message names the setting or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("keystore {uri_path}: {problem}")]
    Keystore { uri_path: String, problem: String },
    #[error("server.audit_log: {0}")]
    Audit(String),
    #[error("{0}")]
    IvBudget(String),
    #[error("{setting} {addr}: {source}")]
    Bind {
        setting: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A server that is listening and ready to be run.
pub struct Server {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    live: Arc<Live>,
}

/// What a reload replaces without dropping connections: TLS settings for new handshakes, and the
/// API (credentials, policies, key lists, limits inside requests) for every new request.
struct Live {
    source: std::path::PathBuf,
    /// The settings fixed until restart, to warn when a reload changes them.
    fixed: FixedSettings,
    tls: ArcSwap<rustls::ServerConfig>,
    api: ArcSwap<Api>,
    /// The key managers the current API uses; also serializes reloads.
    backends: tokio::sync::Mutex<Vec<OpenBackend>>,
    /// Every PKCS#11 token opened, for the life of the process (shared logins, closed at exit).
    tokens: Arc<std::sync::Mutex<Pkcs11Tokens>>,
    metrics: Arc<Metrics>,
    iv_budget: Arc<IvBudget>,
    /// Requests being answered now, over all connections (`max_in_flight_requests`).
    requests_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// One permit per connection that may be open; resized by reloads.
    connection_slots: Arc<Semaphore>,
    /// `max_connections` as the slots were last sized.
    connection_capacity: std::sync::Mutex<usize>,
    /// The open connections, for eviction when every slot is taken.
    connections: Arc<connection::Registry>,
    /// The adaptive limit on HTTP/1.1 requests being served.
    admission: Arc<admission::Admission>,
}

/// What a reload cannot change.
#[derive(PartialEq)]
struct FixedSettings {
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    ledger: Option<std::path::PathBuf>,
    /// Key managers kept across a reload keep the health check interval they started with.
    health_interval_ms: u64,
}

impl FixedSettings {
    fn of(config: &Config) -> Self {
        Self {
            listen: config.server.listen,
            metrics: config.metrics,
            ledger: config.iv_budget.ledger.clone(),
            health_interval_ms: config.limits.health_interval_ms,
        }
    }

    /// The names of the settings that differ, for the log.
    fn changed(&self, other: &Self) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.listen != other.listen {
            changed.push("server.listen");
        }
        if self.metrics != other.metrics {
            changed.push("metrics.listen");
        }
        if self.ledger != other.ledger {
            changed.push("iv_budget.ledger");
        }
        if self.health_interval_ms != other.health_interval_ms {
            changed.push("limits.health_interval_ms");
        }
        changed
    }
}

/// An opened key manager, kept across reloads while its settings do not change.
#[derive(Clone)]
struct OpenBackend {
    /// `backend` as `Debug` prints it (secrets redacted): equal strings, same key manager.
    settings: String,
    backend: crate::config::BackendConfig,
    store: Arc<dyn KeyStore>,
    health: HealthMonitor,
}

impl OpenBackend {
    fn pkcs11(&self) -> Option<&crate::keystore::pkcs11::Pkcs11Settings> {
        self.backend.pkcs11()
    }
}

/// Loads certificates, opens key stores, runs the first health checks and binds the listener.
pub async fn start(config: &Config) -> Result<Server, StartError> {
    if let Err(problem) = crate::telemetry::apply_level(config.server.log_level.as_deref()) {
        tracing::warn!(%problem, "server.log_level not applied");
    }
    let tls = tls_config(config)?;
    let metrics = Arc::new(Metrics::default());
    let iv_budget = Arc::new(
        IvBudget::open(&config.iv_budget, config.server.fleet_size)
            .map_err(StartError::IvBudget)?,
    );
    let tokens = Arc::new(std::sync::Mutex::new(Pkcs11Tokens::default()));
    let (api, backends) = build_api(config, &[], &tokens, &metrics, &iv_budget).await?;
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| StartError::Bind {
            setting: "server.listen",
            addr: config.server.listen,
            source,
        })?;
    let metrics_listener = match config.metrics {
        None => None,
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    setting: "metrics.listen",
                    addr,
                    source,
                })?,
        ),
    };
    crate::tls::mark_served(&tls);
    Ok(Server {
        listener,
        metrics_listener,
        live: Arc::new(Live {
            source: config.source.clone(),
            fixed: FixedSettings::of(config),
            tls: ArcSwap::new(tls),
            api: ArcSwap::new(Arc::new(api)),
            backends: tokio::sync::Mutex::new(backends),
            tokens,
            metrics,
            iv_budget,
            requests_in_flight: Arc::default(),
            connection_slots: Arc::new(Semaphore::new(config.limits.max_connections)),
            connection_capacity: std::sync::Mutex::new(config.limits.max_connections),
            connections: Arc::default(),
            admission: admission::Admission::new(config.limits.max_in_flight_requests),
        }),
    })
}

fn tls_config(config: &Config) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let server = &config.server;
    Ok(crate::tls::server_config(
        &server.tls_cert,
        &server.tls_key,
        server.client_ca.as_deref(),
        server.client_subject.as_deref(),
    )?)
}

/// The API for `config` and the key managers it uses: those of `existing` whose settings are
/// unchanged are reused, the others opened (PKCS#11 tokens through `tokens`, so a token already
/// logged in is shared). `existing` is left as it is, so a failure changes nothing: a token this
/// attempt logged in to is retired again.
async fn build_api(
    config: &Config,
    existing: &[OpenBackend],
    tokens: &Arc<std::sync::Mutex<Pkcs11Tokens>>,
    metrics: &Arc<Metrics>,
    iv_budget: &Arc<IvBudget>,
) -> Result<(Api, Vec<OpenBackend>), StartError> {
    let built = open_api(config, existing, tokens, metrics, iv_budget).await;
    let in_use = match &built {
        Ok((_, backends)) => backends.as_slice(),
        Err(_) => existing,
    };
    let in_use: Vec<_> = in_use.iter().filter_map(OpenBackend::pkcs11).collect();
    tokens
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retire_unused(&in_use);
    built
}

async fn open_api(
    config: &Config,
    existing: &[OpenBackend],
    tokens: &Arc<std::sync::Mutex<Pkcs11Tokens>>,
    metrics: &Arc<Metrics>,
    iv_budget: &Arc<IvBudget>,
) -> Result<(Api, Vec<OpenBackend>), StartError> {
    let audit = AuditLog::open(&config.server.audit_log, config.server.audit_queue_lines)
        .map_err(|e| StartError::Audit(e.to_string()))?;
    let mut keystores = Vec::with_capacity(config.keystores.len());
    let mut backends: Vec<OpenBackend> = Vec::with_capacity(config.keystores.len());
    for settings in &config.keystores {
        let fingerprint = format!("{:?}", settings.backend);
        let reused = existing
            .iter()
            .chain(&backends)
            .find(|b| b.settings == fingerprint)
            .cloned();
        let backend = match reused {
            Some(backend) => {
                if let Some(p) = settings.backend.pkcs11() {
                    tokens
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .note_changes(p);
                }
                backend
            }
            None => {
                let uri_path = settings.uri_path.clone();
                let settings_copy = settings.backend.clone();
                let tokens = Arc::clone(tokens);
                let store = tokio::task::spawn_blocking(move || {
                    let mut tokens = tokens.lock().unwrap_or_else(|p| p.into_inner());
                    keystore::open(&settings_copy, &mut tokens)
                })
                .await
                .map_err(|e| StartError::Keystore {
                    uri_path: uri_path.clone(),
                    problem: format!("opening the key store failed: {e}"),
                })?;
                let store = store.map_err(|problem| StartError::Keystore { uri_path, problem })?;
                let health = HealthMonitor::start(
                    Arc::clone(&store),
                    config.limits.health_interval(),
                    HEALTH_CHECK_TIMEOUT,
                )
                .await;
                OpenBackend {
                    settings: fingerprint,
                    backend: settings.backend.clone(),
                    store,
                    health,
                }
            }
        };
        keystores.push(ProxyKeystore {
            uri_path: settings.uri_path.clone(),
            verifier: SigV4Verifier::new(&settings.region, &settings.credentials),
            store: Arc::new(MeteredStore {
                inner: Arc::clone(&backend.store),
                metrics: Arc::clone(metrics),
                iv_budget: Arc::clone(iv_budget),
                keystore: settings.uri_path.clone(),
            }),
            health: backend.health.clone(),
            policy: settings.policy.clone(),
            quota: settings
                .rate_limit_rps
                .map(crate::api::quota::Quota::per_second),
            iv_budget: Arc::clone(iv_budget),
        });
        backends.push(backend);
    }
    let api = Api::new(
        keystores,
        config.limits.clone(),
        config.server.fleet_size,
        audit,
        Arc::clone(metrics),
    );
    Ok((api, backends))
}

impl Live {
    /// Re-reads the config file and swaps in the new settings; on any error the running
    /// configuration stays and the error is logged.
    async fn reload(&self, why: &str) {
        match self.try_reload().await {
            Ok(()) => {
                tracing::info!(trigger = why, config = %self.source.display(), "configuration reloaded")
            }
            Err(error) => tracing::error!(
                trigger = why,
                %error,
                "configuration NOT reloaded; the running configuration stays"
            ),
        }
    }

    async fn try_reload(&self) -> Result<(), String> {
        let source = self.source.clone();
        let (config, tls) = tokio::task::spawn_blocking(move || {
            let config = Config::load(&source).map_err(|e| e.to_string())?;
            let tls = tls_config(&config).map_err(|e| e.to_string())?;
            Ok::<_, String>((config, tls))
        })
        .await
        .map_err(|e| format!("reading the configuration failed: {e}"))??;
        let mut backends = self.backends.lock().await;
        let (api, in_use) = build_api(
            &config,
            &backends,
            &self.tokens,
            &self.metrics,
            &self.iv_budget,
        )
        .await
        .map_err(|e| e.to_string())?;
        // Nothing below fails: the new configuration applies whole.
        *backends = in_use;
        if let Err(problem) = crate::telemetry::apply_level(config.server.log_level.as_deref()) {
            tracing::warn!(%problem, "server.log_level not applied");
        }
        self.resize_connection_slots(config.limits.max_connections);
        self.iv_budget
            .configure(config.iv_budget.warn_fraction, config.server.fleet_size);
        crate::tls::mark_served(&tls);
        self.tls.store(tls);
        self.api.store(Arc::new(api));
        for setting in self.fixed.changed(&FixedSettings::of(&config)) {
            tracing::warn!(setting, "changed; it takes effect at the next restart");
        }
        Ok(())
    }

    /// Closes every key manager (after the last request): those in use, and PKCS#11 tokens a
    /// reload retired; then finalizes the PKCS#11 modules.
    async fn close_key_managers(&self) {
        let backends = std::mem::take(&mut *self.backends.lock().await);
        for backend in &backends {
            backend.store.close().await;
        }
        let tokens = Arc::clone(&self.tokens);
        let _ = tokio::task::spawn_blocking(move || {
            tokens.lock().unwrap_or_else(|p| p.into_inner()).close_all();
        })
        .await;
        crate::keystore::pkcs11::finalize_modules();
    }

    /// Makes `max_connections` slots: more at once; fewer as open connections close.
    fn resize_connection_slots(&self, wanted: usize) {
        let Ok(mut capacity) = self.connection_capacity.lock() else {
            return;
        };
        if wanted > *capacity {
            self.connection_slots.add_permits(wanted - *capacity);
        } else if wanted < *capacity {
            let surplus = u32::try_from(*capacity - wanted).unwrap_or(u32::MAX);
            let slots = Arc::clone(&self.connection_slots);
            tokio::spawn(async move {
                if let Ok(permits) = slots.acquire_many_owned(surplus).await {
                    permits.forget();
                }
            });
        }
        *capacity = wanted;
    }

    /// Modification times of the files a reload reads ([`Config::files`]), read off the runtime.
    async fn watched_files(&self) -> Vec<Option<std::time::SystemTime>> {
        let source = self.source.clone();
        let stamps = tokio::task::spawn_blocking(move || {
            let paths = match Config::load(&source) {
                Ok(config) => config.files(),
                Err(_) => vec![source],
            };
            paths
                .iter()
                .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                .collect()
        });
        stamps.await.unwrap_or_default()
    }

    /// Reloads on SIGHUP and when the config file or a TLS file changes (checked every 2 s).
    async fn watch(self: Arc<Self>) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "SIGHUP reload unavailable");
                None
            }
        };
        let mut seen = self.watched_files().await;
        let mut ticker = tokio::time::interval(FILE_CHECK_INTERVAL);
        loop {
            let signalled = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = signalled => {
                    self.reload("SIGHUP").await;
                    seen = self.watched_files().await;
                }
                _ = ticker.tick() => {
                    let now = self.watched_files().await;
                    // Reload once the files hold still (a certificate and its key are written
                    // one after the other); while they change, the next check looks again.
                    if now != seen {
                        tokio::time::sleep(FILE_SETTLE_TIME).await;
                        if self.watched_files().await == now {
                            seen = now;
                            self.reload("file change").await;
                        }
                    }
                }
            }
        }
    }
}

impl Server {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then drains connections for up to [`SHUTDOWN_GRACE`].
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            listener,
            metrics_listener,
            live,
        } = self;
        let watcher_task = tokio::spawn(Arc::clone(&live).watch());
        let metrics_task = metrics_listener.map(|metrics_listener| {
            let for_health = Arc::clone(&live);
            tokio::spawn(crate::metrics::serve(
                metrics_listener,
                Arc::clone(&live.metrics),
                Arc::new(move || for_health.api.load().metrics_snapshot()),
            ))
        });
        let ledger_task = tokio::spawn(Arc::clone(&live.iv_budget).keep_ledger());
        let lag_probe = tokio::spawn(Arc::clone(&live.admission).probe_lag());
        let slots = Arc::clone(&live.connection_slots);
        let graceful = GracefulShutdown::new();
        let mut connections = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);

        let handshake_spacing = Duration::from_secs(1) / admission::HANDSHAKES_WHILE_OVERLOADED;
        let mut last_accept = tokio::time::Instant::now();
        loop {
            // Past capacity, new TLS handshakes would take the CPU of established connections.
            if live.admission.overloaded() {
                tokio::select! {
                    () = tokio::time::sleep_until(last_accept + handshake_spacing) => {}
                    () = &mut shutdown => break,
                }
            }
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Usually EMFILE: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            // Every slot taken: the connection idle (or handshaking) longest makes room.
            let slot = match Arc::clone(&slots).try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    live.connections.evict_one();
                    tokio::select! {
                        slot = Arc::clone(&slots).acquire_owned() => match slot {
                            Ok(slot) => slot,
                            Err(_) => break,
                        },
                        () = &mut shutdown => break,
                    }
                }
            };
            last_accept = tokio::time::Instant::now();
            let _ = tcp.set_nodelay(true);
            while connections.try_join_next().is_some() {} // reap finished connections
            connections.spawn(connection::serve(
                tcp,
                peer,
                Arc::clone(&live),
                graceful.watcher(),
                slot,
            ));
        }

        drop(listener);
        watcher_task.abort();
        if let Some(task) = metrics_task {
            task.abort();
        }
        let grace = live.api.load().limits().shutdown_grace();
        tracing::info!(
            open_connections = graceful.count(),
            grace_ms = grace.as_millis(),
            "shutting down: no new connections"
        );
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections closed"),
            () = tokio::time::sleep(grace) => {
                tracing::warn!(open_connections = connections.len(), "grace period over; dropping remaining connections");
                connections.abort_all();
                while connections.join_next().await.is_some() {}
            }
        }
        ledger_task.abort();
        lag_probe.abort();
        if let Err(error) = live.iv_budget.flush() {
            tracing::error!(%error, "the IV-budget ledger was not written");
        }
        live.close_key_managers().await;
    }
}

/// Completes on SIGTERM or SIGINT. The handlers are installed by this call, not when the future
/// is first polled, so that a signal that arrives while the server is still starting (loading a
/// PKCS#11 module, logging in) is seen.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        let received = async |stream: std::io::Result<tokio::signal::unix::Signal>| match stream {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        };
        tokio::select! {
            () = received(interrupt) => tracing::info!("SIGINT received"),
            () = received(terminate) => tracing::info!("SIGTERM received"),
        }
    }
}
