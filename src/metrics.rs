//! Prometheus metrics, served in the text format on their own plain-HTTP listener (`[metrics]`,
//! off by default, loopback by default when on), never on the KMS-facing port.
//!
//! - `xks_requests_total{keystore,operation,outcome}`: requests by errorName (`ok` for success).
//! - `xks_request_duration_seconds{keystore,operation}`: latency histogram, 0.25 ms to 250 ms.
//! - `xks_key_encryptions_total{keystore,key}`: successful Encrypts per key since this instance
//!   started. GCM with random 96-bit IVs must stay below 2^32 encryptions per key over the key's
//!   whole life (NIST SP 800-38D); this counter is per instance and per process lifetime, so it is
//!   an input to that budget, not the budget.
//! - `xks_ekm_health{keystore,ekm}`: the cached deep-health result: 2 ACTIVE, 1 DEGRADED,
//!   0 UNAVAILABLE.
//!
//! Counters survive configuration reloads: the registry lives as long as the process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::keystore::{EkmHealth, EkmStatus};

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
struct EkmLabels {
    keystore: String,
    ekm: String,
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
    ekm_health: Family<EkmLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
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
        let ekm_health = Family::<EkmLabels, Gauge>::default();
        registry.register(
            "xks_ekm_health",
            "Cached deep health per key manager: 2 ACTIVE, 1 DEGRADED, 0 UNAVAILABLE",
            ekm_health.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            encryptions,
            ekm_health,
        }
    }
}

impl Metrics {
    /// Counts one finished API request.
    pub fn record(
        &self,
        keystore: &str,
        operation: &str,
        outcome: &str,
        key_id: Option<&str>,
        latency: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                keystore: keystore.into(),
                operation: operation.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                keystore: keystore.into(),
                operation: operation.into(),
            })
            .observe(latency.as_secs_f64());
        if operation == "Encrypt"
            && outcome == "ok"
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

    /// The text exposition, with health gauges taken from `health` at this moment.
    pub fn render(&self, health: &[(String, EkmStatus)]) -> String {
        for (keystore, status) in health {
            let value = match status.health {
                EkmHealth::Active => 2,
                EkmHealth::Degraded => 1,
                EkmHealth::Unavailable => 0,
            };
            self.ekm_health
                .get_or_create(&EkmLabels {
                    keystore: keystore.clone(),
                    ekm: status.id.clone(),
                })
                .set(value);
        }
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Serves `GET /metrics` on `addr` until the task is dropped. `health` gives the current health.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<dyn Fn() -> Vec<(String, EkmStatus)> + Send + Sync>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = Arc::clone(&metrics);
        let health = Arc::clone(&health);
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let response =
                    if request.method() == Method::GET && request.uri().path() == "/metrics" {
                        Response::builder()
                            .header(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(metrics.render(&health()))))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"GET /metrics\n")))
                    };
                async move { response }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// The address `[metrics]` listens on.
pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
