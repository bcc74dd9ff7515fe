//! The listener: from a validated [`Config`] to a running HTTPS server, and back down again.
//!
//! Start-up ([`start`]): load the TLS certificate, open every key store's key manager (on a blocking
//! thread: a PKCS#11 module may take a while to load and log in), run each backend's first deep
//! health check, bind the listener.
//!
//! Each accepted connection ([`run`]): wait for a connection slot (at most `max_connections` open;
//! the rest wait in the kernel's backlog), finish the TLS handshake within its timeout, then serve
//! HTTP/1.1 with keep-alive or HTTP/2 (ALPN) with hyper. Request heads are bounded in size and in
//! the time they may take to arrive (slow-loris guard); bodies and per-request deadlines are bounded
//! by the API layer.
//!
//! Shutdown: on SIGTERM or SIGINT the listener closes, open connections finish their in-flight
//! requests (keep-alive connections are told to close), and after the grace period the rest are
//! dropped.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::api::{Api, ConnectionInfo, ProxyKeystore};
use crate::audit::AuditLog;
use crate::auth::SigV4Verifier;
use crate::config::{Config, Limits};
use crate::keystore::health::HealthMonitor;
use crate::keystore::{self, pkcs11::Pkcs11Tokens};

/// How long in-flight requests may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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
    #[error("server.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A server that is listening and ready to be run.
pub struct Server {
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    api: Arc<Api>,
    limits: Limits,
}

/// Loads certificates, opens key stores, runs the first health checks and binds the listener.
pub async fn start(config: &Config) -> Result<Server, StartError> {
    let server = &config.server;
    let tls = crate::tls::server_config(
        &server.tls_cert,
        &server.tls_key,
        server.client_ca.as_deref(),
        server.client_subject.as_deref(),
    )?;
    let keystores = open_keystores(config).await?;
    let listener = TcpListener::bind(server.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: server.listen,
            source,
        })?;
    let audit = AuditLog::open(&server.audit_log).map_err(|e| StartError::Audit(e.to_string()))?;
    Ok(Server {
        listener,
        tls,
        api: Arc::new(Api::new(
            keystores,
            config.limits.clone(),
            server.fleet_size,
            audit,
        )),
        limits: config.limits.clone(),
    })
}

async fn open_keystores(config: &Config) -> Result<Vec<ProxyKeystore>, StartError> {
    let backends: Vec<_> = config
        .keystores
        .iter()
        .map(|k| (k.uri_path.clone(), k.backend.clone()))
        .collect();
    let opened = tokio::task::spawn_blocking(move || {
        let mut tokens = Pkcs11Tokens::default();
        backends
            .into_iter()
            .map(|(uri_path, backend)| {
                keystore::open(&backend, &mut tokens)
                    .map_err(|problem| StartError::Keystore { uri_path, problem })
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| StartError::Keystore {
        uri_path: "(all)".into(),
        problem: format!("opening key stores failed: {e}"),
    })??;

    let mut keystores = Vec::with_capacity(opened.len());
    for (settings, store) in config.keystores.iter().zip(opened) {
        let health = HealthMonitor::start(
            Arc::clone(&store),
            config.limits.health_interval(),
            HEALTH_CHECK_TIMEOUT,
        )
        .await;
        keystores.push(ProxyKeystore {
            uri_path: settings.uri_path.clone(),
            verifier: SigV4Verifier::new(&settings.region, &settings.credentials),
            store,
            health,
            policy: settings.policy.clone(),
            quota: settings
                .rate_limit_rps
                .map(crate::api::quota::Quota::per_second),
        });
    }
    Ok(keystores)
}

impl Server {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then drains connections for up to [`SHUTDOWN_GRACE`].
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            listener,
            tls,
            api,
            limits,
        } = self;
        let acceptor = TlsAcceptor::from(tls);
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let graceful = GracefulShutdown::new();
        let http = Arc::new(http_builder(&limits));
        tokio::pin!(shutdown);

        loop {
            let slot = tokio::select! {
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
                () = &mut shutdown => break,
            };
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
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let api = Arc::clone(&api);
            let http = Arc::clone(&http);
            let watcher = graceful.watcher();
            let handshake_timeout = limits.tls_handshake_timeout();
            tokio::spawn(async move {
                let _slot = slot;
                let accept = acceptor.accept(tcp).into_fallible();
                let stream = match tokio::time::timeout(handshake_timeout, accept).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err((error, tcp))) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        linger_after_alert(tcp).await;
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let client_subject = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(crate::tls::client_subject)
                    .map(Arc::from);
                let connection = Arc::new(ConnectionInfo {
                    peer,
                    client_subject,
                });
                let service = service_fn(move |request| {
                    let api = Arc::clone(&api);
                    let connection = Arc::clone(&connection);
                    async move { Ok::<_, Infallible>(api.handle(request, &connection).await) }
                });
                let connection = http
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                if let Err(error) = watcher.watch(connection).await {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
            });
        }

        drop(listener);
        tracing::info!(
            open_connections = graceful.count(),
            "shutting down: no new connections"
        );
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections closed"),
            () = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("grace period over; dropping remaining connections"),
        }
    }
}

/// After a failed handshake (the alert is already written), closes our side and reads what the
/// client still sends for a moment before dropping the socket. A TLS 1.3 client may already have
/// sent its first request; closing with that unread makes the kernel answer with a reset, which
/// can destroy the alert before the client reads it (it would then see "broken pipe" instead of
/// "handshake failure").
async fn linger_after_alert(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut buffer = [0u8; 4096];
        let mut budget: usize = 64 * 1024;
        while budget > 0 {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => budget = budget.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.header_read_timeout())
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
