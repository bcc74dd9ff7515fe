//! Prometheus metrics, served in the text format on their own plain-HTTP listener (`[metrics]`,
//! off by default, loopback by default when on), never on the KMS-facing port.
//!
//! - `xks_requests_total{keystore,operation,outcome}`: requests by errorName (`ok` for success).
//! - `xks_request_duration_seconds{keystore,operation}`: latency histogram, 0.25 ms to 250 ms.
//! - `xks_key_encryptions_total{keystore,key}`: successful Encrypts per key since this instance
//!   started; summed over a fleet (with `increase()` across restarts) it is the fleet's use of the
//!   key's 2^32 random-IV budget.
//! - `xks_key_iv_budget_used_ratio{keystore,key}`: this instance's count (kept across restarts in
//!   the IV-budget ledger) over its share of 2^32; see [`crate::iv_budget`].
//! - `xks_ekm_health{keystore,ekm}`: the cached deep-health result: 2 ACTIVE, 1 DEGRADED,
//!   0 UNAVAILABLE.
//! - `xks_keystore_call_duration_seconds{keystore,call}` and
//!   `xks_keystore_call_errors_total{keystore,call,error}`: every call into the key manager
//!   (HSM calls for PKCS#11 key stores), through [`MeteredStore`].
//! - `xks_keystore_pool_in_use{keystore}` and `xks_keystore_pool_capacity{keystore}`: calls
//!   queued or running in a PKCS#11 worker pool, and how many it takes before 429.
//! - `xks_log_lines_dropped_total{log}`: lines the diagnostic (`log="diagnostic"`) or audit
//!   (`log="audit"`) log lost because its sink stalled or failed, read at scrape time from
//!   [`crate::telemetry::lines_lost`].
//!
//! - `xks_tls_certificate_not_after_seconds{certificate,subject}`: `notAfter` (Unix time) of each
//!   served certificate (`server`, `server_chain`) and client CA certificate (`client_ca`), as
//!   [`crate::tls::mark_served`] last set them; changes with a reload.
//! - `xks_build_info{version,commit}`: always 1.
//! - `xks_connections_open` and `xks_tls_handshakes_total{outcome}`: connections on the KMS-facing
//!   port, through [`Metrics::connection_opened`] and [`Metrics::handshake`].
//!
//! Counters survive configuration reloads: the registry lives as long as the process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use zeroize::Zeroizing;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::keystore::{
    BackendDescription, EkmHealth, EkmStatus, KeyId, KeyInfo, KeyState, KeyStore, KeyStoreError,
    KeyUsage, Sealed,
};
use crate::operation::{Operation, Outcome};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    keystore: String,
    operation: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    keystore: String,
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    keystore: String,
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    keystore: String,
    call: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallErrorLabels {
    keystore: String,
    call: String,
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeystoreLabels {
    keystore: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EkmLabels {
    keystore: String,
    ekm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LogLabels {
    log: String,
}

/// `xks_log_lines_dropped_total`, read from the logs' own counters at each scrape.
#[derive(Debug)]
struct LostLogLines;

impl Collector for LostLogLines {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "xks_log_lines_dropped",
            "Log lines lost because the log's sink stalled (queue full) or failed, by log",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for log in crate::telemetry::Log::ALL {
            let labels = LogLabels {
                log: log.name().into(),
            };
            ConstCounter::new(crate::telemetry::lines_lost(log))
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    ])
}

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    encryptions: Family<KeyLabels, Counter>,
    iv_budget_used: Family<KeyLabels, Gauge<f64, AtomicU64>>,
    ekm_health: Family<EkmLabels, Gauge>,
    call_latency: Family<CallLabels, Histogram, fn() -> Histogram>,
    call_errors: Family<CallErrorLabels, Counter>,
    pool_in_use: Family<KeystoreLabels, Gauge>,
    pool_capacity: Family<KeystoreLabels, Gauge>,
    refused: Family<RefusalLabels, Counter>,
    monitoring: Monitoring,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: String,
}

/// What [`Metrics::render`] reads from the live key stores at scrape time.
pub struct KeystoreSnapshot {
    pub keystore: String,
    pub health: Vec<EkmStatus>,
    pub occupancy: Option<(usize, usize)>,
    /// Key id and used fraction of this instance's IV-budget share, per counted key.
    pub iv_budget_used: Vec<(String, f64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let monitoring = Monitoring::register(&mut registry);
        let refused = Family::<RefusalLabels, Counter>::default();
        for reason in REFUSAL_REASONS {
            let _ = refused.get_or_create(&RefusalLabels {
                reason: reason.into(),
            });
        }
        registry.register(
            "xks_requests_refused",
            "Requests answered 429 ThrottlingException before they were looked at, by reason \
             (in_flight_limit: max_in_flight_requests; overload: the adaptive admission limit)",
            refused.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "xks_requests",
            "XKS API requests by key store, operation and outcome (errorName or ok)",
            requests.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "xks_request_duration_seconds",
            "XKS API request latency inside the proxy",
            latency.clone(),
        );
        let encryptions = Family::<KeyLabels, Counter>::default();
        registry.register(
            "xks_key_encryptions",
            "Successful Encrypts per key since this instance started (input to the 2^32 random-IV budget)",
            encryptions.clone(),
        );
        let iv_budget_used = Family::<KeyLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "xks_key_iv_budget_used_ratio",
            "Encryptions per key (kept in the IV-budget ledger) over this instance's share of 2^32",
            iv_budget_used.clone(),
        );
        let ekm_health = Family::<EkmLabels, Gauge>::default();
        registry.register(
            "xks_ekm_health",
            "Cached deep health per key manager: 2 ACTIVE, 1 DEGRADED, 0 UNAVAILABLE",
            ekm_health.clone(),
        );
        let call_latency = Family::<CallLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "xks_keystore_call_duration_seconds",
            "Latency of calls into the key manager (HSM calls for PKCS#11 key stores)",
            call_latency.clone(),
        );
        let call_errors = Family::<CallErrorLabels, Counter>::default();
        registry.register(
            "xks_keystore_call_errors",
            "Failed calls into the key manager by kind",
            call_errors.clone(),
        );
        let pool_in_use = Family::<KeystoreLabels, Gauge>::default();
        registry.register(
            "xks_keystore_pool_in_use",
            "Key-manager calls queued or running in the worker pool",
            pool_in_use.clone(),
        );
        let pool_capacity = Family::<KeystoreLabels, Gauge>::default();
        registry.register(
            "xks_keystore_pool_capacity",
            "Key-manager calls the worker pool takes before ThrottlingException",
            pool_capacity.clone(),
        );
        registry.register_collector(Box::new(LostLogLines));
        Self {
            registry,
            requests,
            latency,
            encryptions,
            iv_budget_used,
            ekm_health,
            call_latency,
            call_errors,
            pool_in_use,
            pool_capacity,
            refused,
            monitoring,
        }
    }
}

impl Metrics {
    /// Counts one finished API request.
    /// Counts a request refused before it was looked at.
    pub fn record_refusal(&self, reason: &str) {
        self.refused
            .get_or_create(&RefusalLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts one request and its latency; a successful Encrypt also counts against its key.
    pub fn record(
        &self,
        keystore: &str,
        operation: Option<Operation>,
        outcome: Outcome,
        key_id: Option<&str>,
        latency: Duration,
    ) {
        let operation_label = operation.map_or("-", |o| o.name());
        self.requests
            .get_or_create(&RequestLabels {
                keystore: keystore.into(),
                operation: operation_label.into(),
                outcome: outcome.label().into(),
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                keystore: keystore.into(),
                operation: operation_label.into(),
            })
            .observe(latency.as_secs_f64());
        if operation == Some(Operation::Encrypt)
            && outcome == Outcome::Ok
            && let Some(key) = key_id
        {
            self.encryptions
                .get_or_create(&KeyLabels {
                    keystore: keystore.into(),
                    key: key.into(),
                })
                .inc();
        }
    }

    /// The text exposition, with gauges taken from the live key stores at this moment.
    pub fn render(&self, snapshot: &[KeystoreSnapshot]) -> String {
        self.monitoring.refresh();
        for keystore in snapshot {
            for status in &keystore.health {
                let value = match status.health {
                    EkmHealth::Active => 2,
                    EkmHealth::Degraded => 1,
                    EkmHealth::Unavailable => 0,
                };
                self.ekm_health
                    .get_or_create(&EkmLabels {
                        keystore: keystore.keystore.clone(),
                        ekm: status.id.clone(),
                    })
                    .set(value);
            }
            for (key, used) in &keystore.iv_budget_used {
                self.iv_budget_used
                    .get_or_create(&KeyLabels {
                        keystore: keystore.keystore.clone(),
                        key: key.clone(),
                    })
                    .set(*used);
            }
            if let Some((in_use, capacity)) = keystore.occupancy {
                let labels = KeystoreLabels {
                    keystore: keystore.keystore.clone(),
                };
                self.pool_in_use
                    .get_or_create(&labels)
                    .set(i64::try_from(in_use).unwrap_or(i64::MAX));
                self.pool_capacity
                    .get_or_create(&labels)
                    .set(i64::try_from(capacity).unwrap_or(i64::MAX));
            }
        }
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    fn observe_call<T>(
        &self,
        keystore: &str,
        call: &'static str,
        started: Instant,
        result: &Result<T, KeyStoreError>,
    ) {
        self.call_latency
            .get_or_create(&CallLabels {
                keystore: keystore.into(),
                call: call.into(),
            })
            .observe(started.elapsed().as_secs_f64());
        if let Err(error @ (KeyStoreError::Unavailable(why) | KeyStoreError::Internal(why))) =
            result
        {
            // The cause stays here: the reply and the request line only say "key manager error".
            // Causes are return-value names and fixed texts, never data, keys or PINs.
            tracing::warn!(target: "xks_proxy::keystore", keystore, call, error = %error, cause = %why, "key manager call failed");
        }
        if let Err(error) = result {
            let kind = match error {
                KeyStoreError::KeyNotFound => "key_not_found",
                KeyStoreError::KeyDisabled => "key_disabled",
                KeyStoreError::UsageNotPermitted(_) => "usage_not_permitted",
                KeyStoreError::KeyExists => "key_exists",
                KeyStoreError::AuthenticationFailed => "authentication_failed",
                KeyStoreError::Busy => "busy",
                KeyStoreError::Timeout => "timeout",
                KeyStoreError::Unavailable(_) => "unavailable",
                KeyStoreError::Internal(_) => "internal",
            };
            self.call_errors
                .get_or_create(&CallErrorLabels {
                    keystore: keystore.into(),
                    call: call.into(),
                    error: kind.into(),
                })
                .inc();
        }
    }
}

// ---- Build, certificates, connections (issue 16's monitoring; kept apart from the rest) ----

/// The commit this binary was built from (`build.rs`: `git rev-parse --short HEAD`, or the
/// `XKS_BUILD_COMMIT` environment variable at build time), `unknown` without either.
pub const BUILD_COMMIT: &str = match option_env!("XKS_BUILD_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// `xks-proxy --version`: the crate version and the commit.
pub fn version_text() -> String {
    format!("{} (commit {BUILD_COMMIT})", env!("CARGO_PKG_VERSION"))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    certificate: String,
    subject: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    outcome: String,
}

/// How a TLS handshake on the KMS-facing port ended (`xks_tls_handshakes_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeOutcome {
    /// Completed.
    Ok,
    /// Refused or broken: a bad client certificate, no shared protocol, not TLS at all.
    Failed,
    /// Not complete within `tls_handshake_timeout_ms`.
    Timeout,
    /// Closed to make room while every connection slot was taken.
    Evicted,
}

impl HandshakeOutcome {
    const ALL: [HandshakeOutcome; 4] = [Self::Ok, Self::Failed, Self::Timeout, Self::Evicted];

    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Evicted => "evicted",
        }
    }
}

/// One open connection in `xks_connections_open`, until dropped.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The refusal reasons `crate::api` counts (`Refusal::label`), shown at 0 before the first.
const REFUSAL_REASONS: [&str; 2] = ["in_flight_limit", "overload"];

struct Monitoring {
    certificates: Family<CertificateLabels, Gauge>,
    /// The served certificates last put into `certificates`.
    shown: std::sync::Mutex<Option<Arc<Vec<crate::tls::CertificateDate>>>>,
    connections_open: Gauge,
    handshakes: Family<HandshakeLabels, Counter>,
}

impl Monitoring {
    fn register(registry: &mut Registry) -> Self {
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
                commit: BUILD_COMMIT.into(),
            })
            .set(1);
        registry.register(
            "xks_build_info",
            "Always 1; the labels say which build this is",
            build,
        );
        let certificates = Family::<CertificateLabels, Gauge>::default();
        registry.register(
            "xks_tls_certificate_not_after_seconds",
            "notAfter (Unix time) of each served certificate (server, server_chain) and client CA \
             certificate (client_ca)",
            certificates.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "xks_connections_open",
            "Connections open on the KMS-facing port (handshaking or established)",
            connections_open.clone(),
        );
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        for outcome in HandshakeOutcome::ALL {
            let _ = handshakes.get_or_create(&HandshakeLabels {
                outcome: outcome.label().into(),
            });
        }
        registry.register(
            "xks_tls_handshakes",
            "TLS handshakes on the KMS-facing port by outcome (ok, failed, timeout, evicted)",
            handshakes.clone(),
        );
        Self {
            certificates,
            shown: std::sync::Mutex::new(None),
            connections_open,
            handshakes,
        }
    }

    /// Puts the served certificates into their gauge when they changed (a reload).
    fn refresh(&self) {
        let served = crate::tls::served_certificates();
        let mut shown = self.shown.lock().unwrap_or_else(|p| p.into_inner());
        if shown.as_ref().is_some_and(|s| Arc::ptr_eq(s, &served)) {
            return;
        }
        self.certificates.clear();
        for date in served.iter() {
            self.certificates
                .get_or_create(&CertificateLabels {
                    certificate: date.role.into(),
                    subject: date.subject.clone(),
                })
                .set(date.not_after);
        }
        *shown = Some(served);
    }
}

impl Metrics {
    /// Counts a connection open until the returned guard drops.
    pub fn connection_opened(&self) -> OpenConnection {
        let gauge = self.monitoring.connections_open.clone();
        gauge.inc();
        OpenConnection(gauge)
    }

    /// Counts one ended TLS handshake.
    pub fn handshake(&self, outcome: HandshakeOutcome) {
        self.monitoring
            .handshakes
            .get_or_create(&HandshakeLabels {
                outcome: outcome.label().into(),
            })
            .inc();
    }
}

// ---- end of issue 16's monitoring block ----

/// A key store whose calls are timed and counted in [`Metrics`]
/// (`xks_keystore_call_duration_seconds`, `xks_keystore_call_errors_total`).
pub struct MeteredStore {
    pub inner: Arc<dyn KeyStore>,
    pub metrics: Arc<Metrics>,
    pub keystore: String,
}

#[async_trait]
impl KeyStore for MeteredStore {
    fn describe(&self) -> BackendDescription {
        self.inner.describe()
    }

    async fn key_info(&self, id: &KeyId) -> Result<KeyInfo, KeyStoreError> {
        let started = Instant::now();
        let result = self.inner.key_info(id).await;
        self.metrics
            .observe_call(&self.keystore, "key_info", started, &result);
        result
    }

    async fn encrypt(
        &self,
        id: &KeyId,
        plaintext: Zeroizing<Vec<u8>>,
        aad: Vec<u8>,
    ) -> Result<Sealed, KeyStoreError> {
        let started = Instant::now();
        let result = self.inner.encrypt(id, plaintext, aad).await;
        self.metrics
            .observe_call(&self.keystore, "encrypt", started, &result);
        result
    }

    async fn decrypt(
        &self,
        id: &KeyId,
        sealed: Sealed,
        aad: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
        let started = Instant::now();
        let result = self.inner.decrypt(id, sealed, aad).await;
        self.metrics
            .observe_call(&self.keystore, "decrypt", started, &result);
        result
    }

    async fn check_health(&self) -> Vec<EkmStatus> {
        self.inner.check_health().await
    }

    async fn create_key(&self, id: &KeyId, usage: KeyUsage) -> Result<KeyInfo, KeyStoreError> {
        self.inner.create_key(id, usage).await
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>, KeyStoreError> {
        self.inner.list_keys().await
    }

    async fn set_state(&self, id: &KeyId, state: KeyState) -> Result<KeyInfo, KeyStoreError> {
        self.inner.set_state(id, state).await
    }

    fn occupancy(&self) -> Option<(usize, usize)> {
        self.inner.occupancy()
    }

    async fn setup_report(&self) -> Vec<crate::keystore::SetupNote> {
        self.inner.setup_report().await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

/// Scrapers served at once on the metrics listener; more wait in the kernel's backlog.
const MAX_SCRAPE_CONNECTIONS: usize = 16;
/// A metrics connection must send its request head within this time...
const SCRAPE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// ...and is closed after this long, whatever it is doing.
const SCRAPE_CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Serves `GET /metrics` on `addr` until the task is dropped. `snapshot` gives the current health,
/// pool occupancy and IV-budget use. Connections are bounded in number and in time.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    snapshot: Arc<dyn Fn() -> Vec<KeystoreSnapshot> + Send + Sync>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPE_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = Arc::clone(&metrics);
        let snapshot = Arc::clone(&snapshot);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let response =
                    if request.method() == Method::GET && request.uri().path() == "/metrics" {
                        Response::builder()
                            .header(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(metrics.render(&snapshot()))))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"GET /metrics\n")))
                    };
                async move { response }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(SCRAPE_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(SCRAPE_CONNECTION_LIFETIME, connection).await;
        });
    }
}

/// The address `[metrics]` listens on.
pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
