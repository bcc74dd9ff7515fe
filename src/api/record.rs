//! The per-request record, written once when a request ends: one diagnostic log line (refusals
//! under overload are summarized once a second instead), one audit record, and the request
//! metrics. What a request did is gathered in a [`RequestLog`] on the way; it never holds
//! plaintext, keys, secrets or signatures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::StatusCode;

use super::types::RequestMetadata;
use super::{Api, ConnectionInfo, Operation, Outcome, Refusal, XksError};
use crate::audit::AuditRecord;
use crate::keystore::KeyId;

/// What one request's log line says. Never plaintext, keys, secrets or signatures.
#[derive(Default)]
pub(super) struct RequestLog {
    pub(super) operation: Option<Operation>,
    pub(super) keystore: Option<String>,
    pub(super) key_id: Option<KeyId>,
    pub(super) kms_request_id: Option<String>,
    pub(super) kms_operation: Option<String>,
    pub(super) principal: Option<String>,
    pub(super) access_key_id: Option<String>,
    pub(super) detail: Option<String>,
}

impl RequestLog {
    pub(super) fn record_metadata(&mut self, metadata: &RequestMetadata) {
        self.kms_request_id = Some(metadata.loggable_request_id().to_owned());
        self.kms_operation = Some(metadata.kms_operation.chars().take(64).collect());
        self.principal = metadata
            .aws_principal_arn
            .as_ref()
            .map(|p| p.chars().take(256).collect());
    }
}

/// Refusals counted for the diagnostic log's once-a-second summary.
pub(super) struct RefusalLog {
    in_flight_limit: AtomicU64,
    overload: AtomicU64,
    /// When the last summary was written, in ms since the Unix epoch.
    last_ms: AtomicU64,
}

pub(super) static REFUSALS: RefusalLog = RefusalLog {
    in_flight_limit: AtomicU64::new(0),
    overload: AtomicU64::new(0),
    last_ms: AtomicU64::new(0),
};

impl RefusalLog {
    pub(super) fn count(&self, reason: Refusal) {
        match reason {
            Refusal::InFlightLimit => &self.in_flight_limit,
            Refusal::Overload => &self.overload,
        }
        .fetch_add(1, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            let in_flight_limit = self.in_flight_limit.swap(0, Ordering::Relaxed);
            let overload = self.overload.swap(0, Ordering::Relaxed);
            tracing::warn!(
                target: "xks_proxy::request",
                overload,
                in_flight_limit,
                "requests refused with 429 ThrottlingException since the last summary"
            );
        }
    }
}

/// Whether a request writes its own diagnostic log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LogLine {
    Own,
    /// Refusals under overload: counted into [`REFUSALS`]'s once-a-second summary instead.
    Summarized,
}

impl Api {
    /// The request's diagnostic log line (unless summarized), metrics and audit record.
    pub(super) fn finish(
        &self,
        log: &RequestLog,
        connection: &ConnectionInfo,
        status: StatusCode,
        error: Option<&XksError>,
        started: Instant,
        line: LogLine,
    ) {
        let latency = started.elapsed();
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let operation = log.operation.map(|o| o.name());
        let outcome = error.map_or(Outcome::Ok, |e| Outcome::Error(e.name()));
        let peer = connection.peer;
        if line == LogLine::Own {
            let operation = operation.unwrap_or("-");
            let keystore = log.keystore.as_deref().unwrap_or("-");
            let key_id = log.key_id.as_ref().map_or("-", |k| k.as_str());
            let kms_request_id = log.kms_request_id.as_deref().unwrap_or("-");
            let kms_operation = log.kms_operation.as_deref().unwrap_or("-");
            let detail = log.detail.as_deref().unwrap_or("");
            let outcome = outcome.label();
            if status.is_server_error() {
                tracing::warn!(
                    target: "xks_proxy::request",
                    operation, keystore, key_id, kms_request_id, kms_operation,
                    status = status.as_u16(), outcome, detail, latency_us, %peer,
                    "request failed"
                );
            } else {
                tracing::info!(
                    target: "xks_proxy::request",
                    operation, keystore, key_id, kms_request_id, kms_operation,
                    status = status.as_u16(), outcome, detail, latency_us, %peer,
                    "request"
                );
            }
        }
        self.metrics.record(
            log.keystore.as_deref().unwrap_or("-"),
            log.operation,
            outcome,
            log.key_id.as_ref().map(|k| k.as_str()),
            latency,
        );
        self.audit.record(&AuditRecord {
            time: crate::audit::now_rfc3339(),
            kms_request_id: log.kms_request_id.as_deref(),
            keystore: log.keystore.as_deref(),
            principal: log.principal.as_deref(),
            kms_operation: log.kms_operation.as_deref(),
            operation,
            key_id: log.key_id.as_ref().map(|k| k.as_str()),
            outcome: outcome.label(),
            status: status.as_u16(),
            latency_us,
            client: peer.to_string(),
            tls_client_subject: connection.client_subject.as_deref(),
            access_key_id: log.access_key_id.as_deref(),
            detail: log.detail.as_deref(),
        });
    }
}
