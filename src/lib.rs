//! xks-proxy: an AWS KMS External Key Store (XKS) proxy.
//!
//! KMS calls the proxy over HTTPS with SigV4-signed requests; the proxy checks them and performs
//! AES-256-GCM in a key manager: an HSM through PKCS#11, or the embedded software key store for
//! development. The requirement is the XKS Proxy API specification v1.0.3.
//!
//! # Layout
//! One request, top to bottom (main → server → api → auth / keystore → crypto; no import cycle,
//! `tests/layering.rs` checks it):
//! - [`server`]: start, accept, shutdown. One connection's life (TLS handshake, HTTP/1.1 + h2,
//!   keep-alive, slow-loris guard, lingering close) is `server/connection.rs`; admission control
//!   under overload `server/admission.rs`; reload and file watching `server/reload.rs`.
//! - [`api`]: the XKS protocol. `Api::process` reads the check order line by line (route, body
//!   limit, SigV4, parse, policy, handler); one handler file per operation (`api/encrypt.rs`, ...);
//!   request/response types and validation `api/types.rs`; the errorName/status table
//!   `api/error.rs`; the per-request log line, audit record and metrics `api/record.rs`.
//! - [`auth`]: SigV4 verification per key store (several credentials for rotation), the
//!   credentials themselves, and the secondary-authorization policy.
//! - [`keystore`]: the `KeyStore` trait, cached deep health (`keystore/health.rs`), the software
//!   backend and the PKCS#11 backend (`keystore/pkcs11/`: worker pool and HSM call timeouts in
//!   `pool.rs`, sessions and login in `token.rs`, key cache in `keys.rs`, GCM and IV sources in
//!   `gcm.rs`, vendor profiles in `profile.rs`).
//! - [`crypto`]: the spec's byte layouts: key-manager AAD and CDIV.
//!
//! Beside the request path:
//! - [`config`]: reads the TOML file and composes the sections each module owns ([`limits`],
//!   [`tls::ServerTlsSettings`], [`keystore::BackendSettings`], [`auth::credentials`],
//!   [`auth::policy`], [`iv_budget::IvBudgetConfig`]); [`field::FieldError`] names the field at
//!   fault. [`config_check`] is `xks-proxy config check`.
//! - [`limits`]: every size, count and time limit, and where each timeout applies: TLS handshake,
//!   request head, idle keep-alive and shutdown grace in the server; the request deadline
//!   ([`deadline`], set by the API, read by the PKCS#11 pool, which also has its own per-call
//!   timeout); the health-check interval in `keystore/health.rs`.
//! - [`iv_budget`]: per-key encryption counts against GCM's 2^32 random-IV limit, charged by the
//!   Encrypt handler ([`iv_budget::IvCharge`]), with a ledger.
//! - [`audit`]: the audit log, one JSON line per request; [`telemetry`]: log set-up and the
//!   bounded queues both logs write through; [`metrics`]: Prometheus metrics on their own
//!   listener, and HSM call timing ([`metrics::MeteredStore`]).
//! - [`tls`]: rustls settings for both ends; mTLS client verification with a subject check.
//! - [`client`]: a SigV4-signing HTTPS client (`xks-proxy call`, tests); [`load`]: the
//!   `xks-proxy load` generator; [`cli`]: the command line's shape; [`dev`]: development mode and
//!   certificates; [`atomic_file`]: whole-or-nothing writes of state files.
#![forbid(unsafe_code)]

pub mod api;
pub(crate) mod atomic_file;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod config_check;
pub mod crypto;
pub(crate) mod deadline;
pub mod dev;
pub mod field;
pub mod iv_budget;
pub mod keystore;
pub mod limits;
pub mod load;
pub mod metrics;
pub(crate) mod operation;
pub mod server;
pub mod telemetry;
pub mod tls;
