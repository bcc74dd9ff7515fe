//! The server's TLS settings (`[server]`'s `tls_cert`, `tls_key`, `client_ca`, `client_subject`,
//! `client_any_subject`), the strict-mTLS rule they must follow, and the warning for its opt-out.

use std::path::PathBuf;
use std::sync::Arc;

use crate::field::FieldError;

/// What the server presents and, with mTLS, whom it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate chaining to one of these CAs (mTLS).
    pub client_ca: Option<PathBuf>,
    /// The name the client certificate's CN or a DNS SAN must equal; required with `client_ca`
    /// unless `client_any_subject` is set, and then `None`.
    pub client_subject: Option<String>,
    /// `client_any_subject = true`: with `client_ca`, any certificate chaining to it is accepted,
    /// whatever its subject (an explicit opt-out, warned about at start-up and on reload).
    pub client_any_subject: bool,
}

impl ServerTlsSettings {
    /// mTLS is strict: with `client_ca`, the client certificate's name must be pinned by
    /// `client_subject`, or any subject accepted on purpose with `client_any_subject = true`.
    /// Without either, any certificate chaining to the CA would do: for the Amazon Trust Services
    /// roots KMS's certificate chains to, that is any certificate those roots ever issued. Errors
    /// name the field below `[server]`.
    pub fn check(&self) -> Result<(), FieldError> {
        let error = |field: &str, problem: &str| Err(FieldError::new(field, problem));
        match (
            &self.client_ca,
            &self.client_subject,
            self.client_any_subject,
        ) {
            (None, Some(_), _) => error(
                "client_subject",
                "needs server.client_ca: the subject is checked on mTLS client certificates",
            ),
            (None, None, true) => error(
                "client_any_subject",
                "needs server.client_ca: it applies to mTLS client certificates",
            ),
            (Some(_), Some(_), true) => error(
                "client_any_subject",
                "contradicts server.client_subject: keep one of them",
            ),
            (Some(_), Some(subject), false) if subject.trim().is_empty() => error(
                "client_subject",
                "must not be empty: set KMS's client certificate name, \
                 cks.kms.<region>.amazonaws.com",
            ),
            (Some(_), Some(subject), false) if subject.contains(['*', '?']) => error(
                "client_subject",
                "is an exact name, not a pattern: set cks.kms.<region>.amazonaws.com, or \
                 client_any_subject = true to accept any subject",
            ),
            (Some(_), None, false) => error(
                "client_subject",
                "is required with server.client_ca: set it to the name KMS's client certificate \
                 carries, cks.kms.<region>.amazonaws.com (e.g. cks.kms.us-east-1.amazonaws.com), \
                 or set client_any_subject = true to accept any certificate chaining to client_ca",
            ),
            _ => Ok(()),
        }
    }

    /// The warning for `client_any_subject = true`, when it is set.
    pub fn any_subject_warning(&self) -> Option<&'static str> {
        (self.client_ca.is_some() && self.client_any_subject).then_some(
            "server.client_any_subject = true: mTLS accepts any client certificate chaining to \
             client_ca, not only KMS's; set client_subject = \"cks.kms.<region>.amazonaws.com\"",
        )
    }

    /// Loads the certificate, key and client CA into a rustls server config.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, super::TlsError> {
        super::server_config(
            &self.cert,
            &self.key,
            self.client_ca.as_deref(),
            self.client_subject.as_deref(),
        )
    }
}
