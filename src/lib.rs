//! xks-proxy: an AWS KMS External Key Store (XKS) proxy.
//!
//! KMS calls the proxy over HTTPS with SigV4-signed requests; the proxy checks them and performs
//! AES-256-GCM in a key manager: an HSM through PKCS#11, or the embedded software key store for
//! development. The requirement is the XKS Proxy API specification v1.0.3.
//!
//! # Layout
//! - [`server`]: listener, TLS handshakes, connection limits, HTTP/1.1 + h2, graceful shutdown.
//! - [`tls`]: rustls settings for both ends; mTLS client verification with a subject check.
//! - [`api`]: the XKS protocol: routes, check order, request/response types and validation,
//!   the [`api::XksError`] table, one handler file per operation, the per-request log line.
//! - [`audit`]: the audit log, one JSON line per request, apart from diagnostics.
//! - [`auth`]: SigV4 verification per key store (several credentials for rotation).
//! - [`crypto`]: the spec's byte layouts: key-manager AAD and CDIV.
//! - [`deadline`]: the request deadline, set by the API, read by the PKCS#11 pool.
//! - [`keystore`]: the `KeyStore` trait, cached deep health, the software and PKCS#11 backends.
//! - [`config`]: the TOML config file, validated into typed settings with precise errors.
//! - [`client`]: a SigV4-signing HTTPS client (`xks-proxy call`, tests).
//! - [`dev`]: development mode and development certificates.
//! - [`load`]: the `xks-proxy load` generator: signed, verified requests; latency percentiles.
//! - [`metrics`]: Prometheus metrics on their own listener.
//! - [`iv_budget`]: per-key encryption counts against GCM's 2^32 random-IV limit, with a ledger.
//! - [`atomic_file`]: whole-or-nothing writes of the proxy's state files.
//! - [`telemetry`]: log set-up, and the bounded queues both logs write through (lost lines counted).
#![forbid(unsafe_code)]

pub mod api;
pub mod atomic_file;
pub mod audit;
pub mod auth;
pub mod client;
pub mod config;
pub mod crypto;
pub mod deadline;
pub mod dev;
pub mod iv_budget;
pub mod keystore;
pub mod load;
pub mod metrics;
pub mod server;
pub mod telemetry;
pub mod tls;
