//! The audit log: one JSON line per API request, to its own destination (stdout by default, or a
//! file), separate from the diagnostic log on stderr.
//!
//! A record says who asked what of which key and what happened: time, `kmsRequestId`, key store,
//! principal, `kmsOperation`, XKS operation, key id, outcome (`ok` or the errorName), HTTP status,
//! latency, client address, the mTLS client subject, the SigV4 access key id, and for refusals the
//! proxy's reason (for a policy denial, the deciding statement). It never holds plaintext,
//! ciphertext, key material, PINs, secrets or signatures: only the fields listed here exist.
//!
//! Records go through a bounded queue to a writer thread ([`crate::telemetry::LineQueue`],
//! `[server] audit_queue_lines` long). When the sink stalls and the queue is full, records are
//! dropped rather than holding up requests: a stalled audit sink must not become an outage. What is
//! lost is never silent: it is counted (`xks_log_lines_dropped_total{log="audit"}`) and reported
//! by a WARN on the diagnostic log. Lossless auditing needs a sink that keeps up, such as a file on
//! a local disk.

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;

use crate::telemetry::{LineQueue, Log};

/// Records the audit queue holds by default while the sink is slow (`[server] audit_queue_lines`):
/// at KMS's 1800 requests/s per key store, 36 s of records.
pub const DEFAULT_QUEUE_LINES: usize = 65_536;
/// The most `audit_queue_lines` may ask for (records are a few hundred bytes each).
pub const MAX_QUEUE_LINES: usize = 1 << 20;

/// Where audit records go (`[server] audit_log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
    Off,
}

/// One audit record.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord<'a> {
    pub time: String,
    pub kms_request_id: Option<&'a str>,
    pub keystore: Option<&'a str>,
    pub principal: Option<&'a str>,
    pub kms_operation: Option<&'a str>,
    pub operation: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub outcome: &'a str,
    pub status: u16,
    pub latency_us: u64,
    pub client: String,
    pub tls_client_subject: Option<&'a str>,
    pub access_key_id: Option<&'a str>,
    pub detail: Option<&'a str>,
}

/// The audit log's writer. Dropping it (a reload opens a new one) flushes what is queued.
pub struct AuditLog {
    queue: Option<LineQueue>,
}

impl AuditLog {
    /// Opens `target` behind a queue of `queue_lines` records.
    pub fn open(target: &AuditTarget, queue_lines: usize) -> std::io::Result<Self> {
        let queue = match target {
            AuditTarget::Off => return Ok(Self::off()),
            AuditTarget::Stdout => LineQueue::open(Log::Audit, std::io::stdout(), queue_lines),
            AuditTarget::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                LineQueue::open(Log::Audit, file, queue_lines)
            }
        };
        Ok(Self { queue: Some(queue) })
    }

    pub fn off() -> Self {
        Self { queue: None }
    }

    /// Queues one record; never waits (a full queue drops it and counts the loss).
    pub fn record(&self, record: &AuditRecord<'_>) {
        let Some(queue) = &self.queue else {
            return;
        };
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        // One write is one line; a lossy queue does not fail, it counts what it drops.
        let _ = queue.writer().clone().write_all(&line);
    }
}

/// The current time as RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
