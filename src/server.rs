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
//! Reload ([`reload`]): on SIGHUP and when a file of the configuration changes, the config is
//! read again; a good one replaces TLS settings, API and limits without dropping a connection.
//!
//! Shutdown: on SIGTERM or SIGINT the listener closes, open connections finish their in-flight
//! requests (keep-alive connections are told to close), and after `shutdown_grace_ms` the rest are
//! dropped. Then the IV-budget ledger is written and the key managers are closed (PKCS#11
//! sessions closed, token logged out).

mod admission;
mod connection;
mod reload;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::Api;
use crate::config::Config;
use crate::iv_budget::IvBudget;
use crate::keystore::pkcs11::Pkcs11Tokens;
use crate::metrics::Metrics;
use reload::{FixedSettings, OpenBackend, build_api, tls_config};

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

/// The server's shared state. A reload replaces, without dropping connections, the TLS settings
/// for new handshakes and the API (credentials, policies, key lists, limits inside requests) for
/// every new request.
struct Live {
    source: std::path::PathBuf,
    /// The files the running configuration was read from ([`Config::files`]), watched for changes.
    watched: std::sync::Mutex<Vec<std::path::PathBuf>>,
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
            watched: std::sync::Mutex::new(config.files()),
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
