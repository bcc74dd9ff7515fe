//! Explicit limits on what a client can make the proxy hold or wait for (`[limits]`): body,
//! header and decoded sizes, connections and requests at once, and every timeout of a request's
//! life. The API reads the size limits while decoding, the server the connection limits and
//! timeouts.

use std::time::Duration;

use serde::Deserialize;

use crate::field::FieldError;

/// Explicit limits on what a client can make the proxy hold or wait for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body; above it the answer is 501 UnsupportedOperationException.
    pub max_body_bytes: usize,
    /// Largest decoded plaintext (Encrypt) or ciphertext (Decrypt); at least the spec's 4300.
    pub max_plaintext_bytes: usize,
    /// Largest decoded AAD; at least the spec's 8192, at most 65535 (the 2-byte length prefix).
    pub max_aad_bytes: usize,
    /// Largest request head (request line and headers) in bytes.
    pub max_header_bytes: usize,
    /// Open connections at most; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Requests being answered at once, over all connections (HTTP/2 multiplexes many on one);
    /// above it 429 ThrottlingException at once, before the body is read.
    pub max_in_flight_requests: usize,
    /// Concurrent HTTP/2 streams one connection may open.
    pub max_streams_per_connection: u32,
    /// Time allowed for the TLS handshake.
    pub tls_handshake_timeout_ms: u64,
    /// Time allowed for a request's headers to arrive (slow-loris guard).
    pub header_read_timeout_ms: u64,
    /// Deadline for a request once its headers arrived; 503 DependencyTimeoutException after it.
    pub request_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this long.
    pub idle_timeout_ms: u64,
    /// Deep health checks run this often (at most 60 s).
    pub health_interval_ms: u64,
    /// After SIGTERM/SIGINT, in-flight requests get this long to finish before connections drop.
    pub shutdown_grace_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            max_plaintext_bytes: 8192,
            max_aad_bytes: 8192,
            max_header_bytes: 16 * 1024,
            max_connections: 4096,
            max_in_flight_requests: 1024,
            max_streams_per_connection: 128,
            tls_handshake_timeout_ms: 1_000,
            header_read_timeout_ms: 5_000,
            request_timeout_ms: 200,
            idle_timeout_ms: 120_000,
            health_interval_ms: 5_000,
            shutdown_grace_ms: 10_000,
        }
    }
}

impl Limits {
    pub const MIN_PLAINTEXT_BYTES: usize = 4300;
    pub const MIN_AAD_BYTES: usize = 8192;
    pub const MAX_AAD_BYTES: usize = u16::MAX as usize;
    /// Upper bounds: far above anything KMS sends, low enough that no setting lets one request
    /// or one process ask for unbounded memory.
    pub const MAX_BODY_BYTES: usize = 1 << 20;
    pub const MAX_HEADER_BYTES: usize = 1 << 20;
    pub const MAX_CONNECTIONS: usize = 1_000_000;
    /// With the largest body this bounds buffered request bodies to 64 GiB; the default, 64 MiB.
    pub const MAX_IN_FLIGHT_REQUESTS: usize = 65_536;

    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms)
    }
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// Checks every limit against its bounds; the error names the field below `[limits]`.
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        let field = |name: &str, what: String| Err(FieldError::new(name, what));
        if self.max_plaintext_bytes < Self::MIN_PLAINTEXT_BYTES {
            return field(
                "max_plaintext_bytes",
                format!(
                    "must be at least {} (spec minimum)",
                    Self::MIN_PLAINTEXT_BYTES
                ),
            );
        }
        if !(Self::MIN_AAD_BYTES..=Self::MAX_AAD_BYTES).contains(&self.max_aad_bytes) {
            return field(
                "max_aad_bytes",
                format!(
                    "must be between {} (spec minimum) and {} (2-byte length prefix)",
                    Self::MIN_AAD_BYTES,
                    Self::MAX_AAD_BYTES
                ),
            );
        }
        // Base64 of the largest plaintext and AAD, two 2048-character ARNs and the JSON around them.
        let needed = (self.max_plaintext_bytes + self.max_aad_bytes).div_ceil(3) * 4 + 6 * 1024;
        if self.max_body_bytes < needed {
            return field(
                "max_body_bytes",
                format!("must be at least {needed} to carry the largest plaintext and AAD allowed"),
            );
        }
        if self.max_body_bytes > Self::MAX_BODY_BYTES {
            return field(
                "max_body_bytes",
                format!("must be at most {}", Self::MAX_BODY_BYTES),
            );
        }
        if !(8192..=Self::MAX_HEADER_BYTES).contains(&self.max_header_bytes) {
            return field(
                "max_header_bytes",
                format!("must be between 8192 and {}", Self::MAX_HEADER_BYTES),
            );
        }
        if !(1..=Self::MAX_CONNECTIONS).contains(&self.max_connections) {
            return field(
                "max_connections",
                format!("must be between 1 and {}", Self::MAX_CONNECTIONS),
            );
        }
        if !(1..=Self::MAX_IN_FLIGHT_REQUESTS).contains(&self.max_in_flight_requests) {
            return field(
                "max_in_flight_requests",
                format!("must be between 1 and {}", Self::MAX_IN_FLIGHT_REQUESTS),
            );
        }
        if !(1..=1024).contains(&self.max_streams_per_connection) {
            return field(
                "max_streams_per_connection",
                "must be between 1 and 1024".into(),
            );
        }
        if self.request_timeout_ms == 0 || self.request_timeout_ms >= 250 {
            return field(
                "request_timeout_ms",
                "must be between 1 and 249: KMS gives each call 250 ms".into(),
            );
        }
        for (name, value, most) in [
            (
                "tls_handshake_timeout_ms",
                self.tls_handshake_timeout_ms,
                60_000,
            ),
            (
                "header_read_timeout_ms",
                self.header_read_timeout_ms,
                60_000,
            ),
            ("idle_timeout_ms", self.idle_timeout_ms, 3_600_000),
        ] {
            if !(1..=most).contains(&value) {
                return field(name, format!("must be between 1 and {most}"));
            }
        }
        if self.shutdown_grace_ms > 600_000 {
            return field(
                "shutdown_grace_ms",
                "must be at most 600000 (10 minutes)".into(),
            );
        }
        if !(100..=60_000).contains(&self.health_interval_ms) {
            return field(
                "health_interval_ms",
                "must be between 100 and 60000: cached health may be at most 1 minute old".into(),
            );
        }
        Ok(())
    }
}
