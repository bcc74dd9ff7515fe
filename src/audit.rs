//! The audit log: one JSON line per API request, to its own destination (stdout by default, or a
//! file), separate from the diagnostic log on stderr.
//!
//! A record says who asked what of which key and what happened: time, `kmsRequestId`, key store,
//! principal, `kmsOperation`, XKS operation, key id, outcome (`ok` or the errorName), HTTP status,
//! latency, client address, the mTLS client subject, the SigV4 access key id, and for refusals the
//! proxy's reason (for a policy denial, the deciding statement). It never holds plaintext,
//! ciphertext, key material, PINs, secrets or signatures: only the fields listed here exist.
//! Lines go through a writer thread; the queue is lossless.

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};

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

/// The audit log's writer.
pub struct AuditLog {
    sink: Option<NonBlocking>,
    _flush_on_drop: Option<WorkerGuard>,
}

impl AuditLog {
    pub fn open(target: &AuditTarget) -> std::io::Result<Self> {
        let (sink, guard) = match target {
            AuditTarget::Off => return Ok(Self::off()),
            AuditTarget::Stdout => builder().finish(std::io::stdout()),
            AuditTarget::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                builder().finish(file)
            }
        };
        Ok(Self {
            sink: Some(sink),
            _flush_on_drop: Some(guard),
        })
    }

    pub fn off() -> Self {
        Self {
            sink: None,
            _flush_on_drop: None,
        }
    }

    pub fn record(&self, record: &AuditRecord<'_>) {
        let Some(sink) = &self.sink else {
            return;
        };
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        if let Err(error) = sink.clone().write_all(&line) {
            tracing::warn!(%error, "audit record could not be written");
        }
    }
}

fn builder() -> NonBlockingBuilder {
    NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("xks-proxy-audit")
}

/// The current time as RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
