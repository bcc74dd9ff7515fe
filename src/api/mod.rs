//! The XKS protocol: routing, authentication order, body limits, dispatch to the four operation
//! handlers (one file each), and one log line per request.
//!
//! Order of checks for a request (spec §1.5, §2.1, §5):
//! 1. `GET /ping` is the load-balancer liveness route; it never touches a key store.
//! 2. The path picks a key store by its registered `uri_path`. No key store: 404
//!    InvalidUriPathException at once (there is no credential to check against).
//! 3. A non-POST method on an API path: 405.
//! 4. The body, within its size limit (501 above it), then SigV4: headers, credential scope, clock
//!    and the signature over the exact body bytes: 401 on any failure. The body is not parsed
//!    before the signature is verified.
//! 5. A path under a key store that names no operation: 404 InvalidUriPathException (after
//!    authentication, so the proxy does not reveal its routes to unauthenticated callers).
//! 6. JSON parsing and validation (400), then the key manager.
//!
//! The whole request runs under the configured deadline (below KMS's 250 ms); past it the answer
//! is 503 DependencyTimeoutException.

mod decrypt;
mod encrypt;
mod error;
mod health;
mod metadata;
mod quota;
mod record;
pub mod types;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

pub use crate::operation::{Operation, Outcome};
pub use error::XksError;
use record::RequestLog;
use record::{LogLine, REFUSALS};
use types::RequestMetadata;
pub use types::check_uri_path;

use crate::audit::AuditLog;
use crate::auth::SigV4Verifier;
use crate::auth::policy::{Effect, Policy};
use crate::limits::Limits;

use crate::iv_budget::IvBudget;
use crate::keystore::health::HealthMonitor;
use crate::keystore::{KeyId, KeyStore};
use crate::metrics::{KeystoreSnapshot, Metrics};

/// One external key store as the API serves it: its URI path, who may sign for it, its key
/// manager with cached health, its policy and quota, and its keys' IV budget.
pub struct ProxyKeystore {
    uri_path: String,
    verifier: SigV4Verifier,
    store: Arc<dyn KeyStore>,
    health: HealthMonitor,
    /// Secondary authorization for GetKeyMetadata, Encrypt and Decrypt.
    policy: Option<Arc<Policy>>,
    quota: Option<quota::Quota>,
    /// Per-key encryption counts; keys past their warning level make health DEGRADED.
    iv_budget: Arc<IvBudget>,
}

impl ProxyKeystore {
    /// A key store at `uri_path` whose requests `verifier` authenticates and `store` answers
    /// (with `health` its cached deep health); no policy and no quota until they are set.
    pub fn new(
        uri_path: impl Into<String>,
        verifier: SigV4Verifier,
        store: Arc<dyn KeyStore>,
        health: HealthMonitor,
        iv_budget: Arc<IvBudget>,
    ) -> Self {
        Self {
            uri_path: uri_path.into(),
            verifier,
            store,
            health,
            policy: None,
            quota: None,
            iv_budget,
        }
    }

    /// Secondary authorization (`[keystore.policy]`); none allows every authenticated request.
    pub fn with_policy(self, policy: Option<Arc<Policy>>) -> Self {
        Self { policy, ..self }
    }

    /// At most `rps` requests a second (burst: one second's worth); above it 429.
    pub fn with_rate_limit(self, rps: Option<u32>) -> Self {
        Self {
            quota: rps.map(quota::Quota::per_second),
            ..self
        }
    }

    /// Applies the key store's policy (spec §2.2); a denial names the deciding statement in the log.
    fn authorize(
        &self,
        key_id: &KeyId,
        metadata: &RequestMetadata,
        log: &mut RequestLog,
    ) -> Result<(), XksError> {
        let Some(policy) = &self.policy else {
            return Ok(());
        };
        let decision = policy.decide(key_id.as_str(), &metadata.policy_request());
        if decision.effect == Effect::Allow {
            return Ok(());
        }
        log.detail = Some(format!(
            "denied by policy statement {:?} (principal {:?}, kmsOperation {:?})",
            decision.statement,
            metadata.aws_principal_arn.as_deref().unwrap_or("-"),
            metadata.kms_operation
        ));
        Err(XksError::AccessDenied)
    }
}

/// The request handler shared by every connection.
pub struct Api {
    keystores: HashMap<String, Arc<ProxyKeystore>>,
    limits: Limits,
    fleet_size: u32,
    audit: AuditLog,
    metrics: Arc<Metrics>,
}

impl Api {
    /// The limits this API was built with (connection-level ones are read per connection).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

/// What the connection knows about its client.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    /// CN (or DNS SAN) of the mTLS client certificate.
    pub client_subject: Option<Arc<str>>,
}

enum Route<'a> {
    Ping,
    Operation {
        keystore: &'a Arc<ProxyKeystore>,
        operation: Operation,
        key_id: Option<&'a str>,
    },
    /// Under a key store's path, but no operation there.
    UnknownUnder(&'a Arc<ProxyKeystore>),
    Unknown,
}

type HttpResponse = Response<Full<Bytes>>;

impl Api {
    pub fn new(
        keystores: Vec<ProxyKeystore>,
        limits: Limits,
        fleet_size: u32,
        audit: AuditLog,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            keystores: keystores
                .into_iter()
                .map(|k| (k.uri_path.clone(), Arc::new(k)))
                .collect(),
            limits,
            fleet_size,
            audit,
            metrics,
        }
    }

    /// Each key store's cached health and worker-pool occupancy, for metrics.
    pub fn metrics_snapshot(&self) -> Vec<KeystoreSnapshot> {
        self.keystores
            .values()
            .map(|k| KeystoreSnapshot {
                keystore: k.uri_path.clone(),
                health: k.health.current(),
                occupancy: k.store.occupancy(),
                iv_budget_used: k
                    .iv_budget
                    .usage()
                    .into_iter()
                    .filter(|u| u.keystore == k.uri_path)
                    .map(|u| (u.key, u.used))
                    .collect(),
            })
            .collect()
    }

    /// Answers one HTTP request, logs it and writes its audit record.
    pub async fn handle<B>(&self, request: Request<B>, connection: &ConnectionInfo) -> HttpResponse
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let is_ping = request.uri().path() == "/ping";
        let mut log = RequestLog::default();
        let deadline = started + self.limits.request_timeout();
        let outcome = tokio::time::timeout_at(
            deadline.into(),
            crate::deadline::scope(deadline, self.process(request, &mut log)),
        )
        .await
        .unwrap_or(Err(XksError::DependencyTimeout(
            "the request did not complete within the proxy's deadline",
        )));
        let (response, error) = match outcome {
            Ok(response) => (response, None),
            Err(error) => {
                log.detail.get_or_insert_with(|| error.to_string());
                (error.to_response(), Some(error))
            }
        };
        if !(is_ping && error.is_none()) {
            self.finish(
                &log,
                connection,
                response.status(),
                error.as_ref(),
                started,
                LogLine::Own,
            );
        }
        response
    }

    /// Answers a request the server has no room for: 429 ThrottlingException at once, before
    /// authentication and parsing, its body read (within the deadline) but not kept. Audited and
    /// counted like any other answer (by reason, in `xks_requests_refused`); the diagnostic log
    /// says how many were refused and why at most once a second, not once per request.
    pub async fn overloaded<B>(
        &self,
        request: Request<B>,
        connection: &ConnectionInfo,
        reason: Refusal,
    ) -> HttpResponse
    where
        B: hyper::body::Body<Data = Bytes>,
    {
        let started = Instant::now();
        let mut log = RequestLog::default();
        match self.route(request.uri().path()) {
            Route::Operation {
                keystore,
                operation,
                ..
            } => {
                log.keystore = Some(keystore.uri_path.clone());
                log.operation = Some(operation);
            }
            Route::UnknownUnder(keystore) => log.keystore = Some(keystore.uri_path.clone()),
            Route::Ping | Route::Unknown => {}
        }
        let discarded = discard_body(request.into_body(), DRAIN_LIMIT);
        let _ = tokio::time::timeout(self.limits.request_timeout(), discarded).await;
        let error = XksError::Throttling(reason.message());
        log.detail = Some(error.to_string());
        let response = error.to_response();
        self.metrics.record_refusal(reason.label());
        REFUSALS.count(reason);
        self.finish(
            &log,
            connection,
            response.status(),
            Some(&error),
            started,
            LogLine::Summarized,
        );
        response
    }

    async fn process<B>(
        &self,
        request: Request<B>,
        log: &mut RequestLog,
    ) -> Result<HttpResponse, XksError>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = request.into_parts();
        let (keystore, operation, key_id) = match self.route(parts.uri.path()) {
            Route::Ping => {
                return if parts.method == Method::GET || parts.method == Method::HEAD {
                    Ok(Response::builder()
                        .status(StatusCode::OK)
                        .header(header::CONTENT_TYPE, "text/plain")
                        .body(Full::new(Bytes::from_static(b"ok\n")))
                        .unwrap_or_default())
                } else {
                    Err(XksError::MethodNotAllowed)
                };
            }
            Route::Unknown => {
                // Read (so that the answer reaches the client, see below) but neither kept nor
                // judged: no key store here is the answer, whatever the body.
                discard_body(body, DRAIN_LIMIT).await;
                return Err(XksError::InvalidUriPath);
            }
            Route::UnknownUnder(keystore) => (keystore, None, None),
            Route::Operation {
                keystore,
                operation,
                key_id,
            } => (keystore, Some(operation), key_id),
        };
        log.keystore = Some(keystore.uri_path.clone());
        log.operation = operation;
        if operation.is_some() && parts.method != Method::POST {
            return Err(XksError::MethodNotAllowed);
        }

        // The body is read (within its limit) before any answer, even an error: answering an
        // HTTP/2 stream whose body is still arriving resets it, and some clients then lose the
        // answer. Nothing in it is parsed before the signature is verified.
        let body = self.read_body(&parts.headers, body).await?;
        let pending = keystore
            .verifier
            .check_headers(&parts, SystemTime::now())
            .map_err(|reason| {
                log.detail = Some(format!("authentication failed: {reason}"));
                XksError::AuthenticationFailed
            })?;
        log.access_key_id = Some(pending.access_key_id().to_owned());
        pending.verify(&body).map_err(|reason| {
            log.detail = Some(format!("authentication failed: {reason}"));
            XksError::AuthenticationFailed
        })?;
        // Only authenticated requests spend the quota: nobody without the key store's secret
        // can use it up and lock KMS out.
        if keystore.quota.as_ref().is_some_and(|q| !q.try_take()) {
            return Err(XksError::Throttling(
                "this key store's request quota is spent; retry",
            ));
        }

        let Some(operation) = operation else {
            return Err(XksError::InvalidUriPath);
        };
        check_content_type(&parts.headers)?;
        let key_id = match key_id {
            None => None,
            Some(raw) => Some(KeyId::parse(raw).map_err(|e| XksError::Validation(e.to_string()))?),
        };
        log.key_id = key_id.clone();

        let json = match (operation, &key_id) {
            (Operation::GetHealthStatus, _) => {
                health::handle(keystore, self.fleet_size, &body, log)?
            }
            (Operation::GetKeyMetadata, Some(id)) => {
                metadata::handle(keystore, id, &body, log).await?
            }
            (Operation::Encrypt, Some(id)) => {
                encrypt::handle(keystore, &self.limits, id, &body, log).await?
            }
            (Operation::Decrypt, Some(id)) => {
                decrypt::handle(keystore, &self.limits, id, &body, log).await?
            }
            (_, None) => return Err(XksError::InvalidUriPath),
        };
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(json)))
            .unwrap_or_default())
    }

    fn route<'a>(&'a self, path: &'a str) -> Route<'a> {
        if path == "/ping" {
            return Route::Ping;
        }
        if let Some(keystore) = path
            .strip_suffix("/health")
            .and_then(|base| self.keystores.get(base))
        {
            return Route::Operation {
                keystore,
                operation: Operation::GetHealthStatus,
                key_id: None,
            };
        }
        if let Some((rest, action)) = path.rsplit_once('/') {
            let operation = match action {
                "metadata" => Some(Operation::GetKeyMetadata),
                "encrypt" => Some(Operation::Encrypt),
                "decrypt" => Some(Operation::Decrypt),
                _ => None,
            };
            let target = operation
                .zip(rest.rsplit_once('/'))
                .and_then(|(op, (keys, id))| {
                    let keystore = keys
                        .strip_suffix("/keys")
                        .and_then(|base| self.keystores.get(base))?;
                    Some((keystore, op, id))
                });
            if let Some((keystore, operation, id)) = target {
                return Route::Operation {
                    keystore,
                    operation,
                    key_id: Some(id),
                };
            }
        }
        self.keystores
            .values()
            .filter(|k| {
                path.strip_prefix(k.uri_path.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
            .max_by_key(|k| k.uri_path.len())
            .map_or(Route::Unknown, Route::UnknownUnder)
    }

    /// Reads the body, refusing more than the configured maximum with 501 (spec §4.1). An
    /// oversized body is still read to its end (up to [`DRAIN_LIMIT`]) and dropped, so that the
    /// client is not reset mid-upload and gets its 501.
    async fn read_body<B>(&self, headers: &http::HeaderMap, body: B) -> Result<Bytes, XksError>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let max = self.limits.max_body_bytes;
        let drain_limit = DRAIN_LIMIT.max(max);
        let too_large = || {
            XksError::UnsupportedOperation(format!(
                "request body is larger than this proxy's limit of {max} bytes"
            ))
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > drain_limit as u64) {
            return Err(too_large());
        }
        let mut body = std::pin::pin!(body);
        // What the client declares is a hint, not a promise: reserve at most a typical body.
        let mut kept =
            Vec::with_capacity(declared.map_or(4096, |n| (n as usize).min(max).min(16 * 1024)));
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|_| XksError::Validation("the request body could not be read".into()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            seen = seen.saturating_add(data.len());
            if seen > drain_limit {
                return Err(too_large());
            }
            if seen <= max {
                kept.extend_from_slice(&data);
            }
        }
        if seen > max {
            return Err(too_large());
        }
        Ok(Bytes::from(kept))
    }
}

/// How much of an oversized body is read and dropped before the proxy answers 501 anyway.
const DRAIN_LIMIT: usize = 1024 * 1024;

/// Reads a body to its end, at most `limit` bytes, keeping none of it: answering before the
/// body is read resets an HTTP/2 stream (and can reset an HTTP/1.1 connection), and some clients
/// then lose the answer.
async fn discard_body<B: hyper::body::Body<Data = Bytes>>(body: B, limit: usize) {
    let mut body = std::pin::pin!(body);
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            seen = seen.saturating_add(data.len());
            if seen > limit {
                return;
            }
        }
    }
}

/// KMS sends `application/json`; a request that declares another media type is refused.
fn check_content_type(headers: &http::HeaderMap) -> Result<(), XksError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let media_type = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if media_type.as_deref() == Some("application/json") {
        Ok(())
    } else {
        Err(XksError::Validation(
            "Content-Type must be application/json".into(),
        ))
    }
}

/// Why a request was refused before it was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_in_flight_requests` requests are being answered.
    InFlightLimit,
    /// The adaptive admission limit is reached (the server is past its capacity).
    Overload,
}

impl Refusal {
    fn message(self) -> &'static str {
        match self {
            Refusal::InFlightLimit => "the proxy is at its limit of requests in flight; retry",
            Refusal::Overload => "the proxy is past its capacity; retry",
        }
    }

    /// The `reason` label of `xks_requests_refused`.
    fn label(self) -> &'static str {
        match self {
            Refusal::InFlightLimit => "in_flight_limit",
            Refusal::Overload => "overload",
        }
    }
}
