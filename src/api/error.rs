//! [`XksError`]: every error the API answers with, mapped to the spec's `errorName` and HTTP status
//! (spec §5.2). Lower layers have their own error types; this is the only place that knows HTTP.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;

use crate::keystore::{CryptoOp, KeyStoreError};

/// An XKS error answer. Messages are written by the proxy and never echo client data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XksError {
    #[error("{0}")]
    Validation(String),
    #[error("{0}")]
    InvalidState(&'static str),
    #[error("{0}")]
    InvalidCiphertext(&'static str),
    #[error("{0}")]
    InvalidKeyUsage(&'static str),
    #[error("request signature could not be verified")]
    AuthenticationFailed,
    #[error("request denied by the proxy's authorization policy")]
    AccessDenied,
    #[error("no such key in this key store")]
    KeyNotFound,
    #[error("no such XKS API path on this proxy")]
    InvalidUriPath,
    #[error("{0}")]
    Throttling(&'static str),
    #[error("{0}")]
    UnsupportedOperation(String),
    #[error("{0}")]
    DependencyTimeout(&'static str),
    #[error("{0}")]
    Internal(&'static str),
    /// Not in the spec's table: a GET (or other non-POST) on an API path must be 405.
    #[error("use POST")]
    MethodNotAllowed,
}

impl XksError {
    /// The spec's `errorName`.
    pub fn name(&self) -> &'static str {
        match self {
            XksError::Validation(_) => "ValidationException",
            XksError::InvalidState(_) => "InvalidStateException",
            XksError::InvalidCiphertext(_) => "InvalidCiphertextException",
            XksError::InvalidKeyUsage(_) => "InvalidKeyUsageException",
            XksError::AuthenticationFailed => "AuthenticationFailedException",
            XksError::AccessDenied => "AccessDeniedException",
            XksError::KeyNotFound => "KeyNotFoundException",
            XksError::InvalidUriPath => "InvalidUriPathException",
            XksError::Throttling(_) => "ThrottlingException",
            XksError::UnsupportedOperation(_) | XksError::MethodNotAllowed => {
                "UnsupportedOperationException"
            }
            XksError::DependencyTimeout(_) => "DependencyTimeoutException",
            XksError::Internal(_) => "InternalException",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            XksError::Validation(_)
            | XksError::InvalidState(_)
            | XksError::InvalidCiphertext(_)
            | XksError::InvalidKeyUsage(_) => StatusCode::BAD_REQUEST,
            XksError::AuthenticationFailed => StatusCode::UNAUTHORIZED,
            XksError::AccessDenied => StatusCode::FORBIDDEN,
            XksError::KeyNotFound | XksError::InvalidUriPath => StatusCode::NOT_FOUND,
            XksError::Throttling(_) => StatusCode::TOO_MANY_REQUESTS,
            XksError::UnsupportedOperation(_) => StatusCode::NOT_IMPLEMENTED,
            XksError::DependencyTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            XksError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            XksError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The `errorMessage`: printable ASCII only, at most 511 characters.
    pub fn message(&self) -> String {
        self.to_string()
            .chars()
            .filter(|c| (' '..='~').contains(c))
            .take(511)
            .collect()
    }

    /// `{"errorName": ..., "errorMessage": ...}` with the spec's status. The message is printable
    /// ASCII and shorter than 512 characters, as the spec requires.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({ "errorName": self.name(), "errorMessage": self.message() });
        let mut builder = Response::builder()
            .status(self.status())
            .header(header::CONTENT_TYPE, "application/json");
        if *self == XksError::MethodNotAllowed {
            builder = builder.header(header::ALLOW, "POST");
        }
        builder
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }
}

impl From<KeyStoreError> for XksError {
    fn from(err: KeyStoreError) -> Self {
        match err {
            KeyStoreError::KeyNotFound => XksError::KeyNotFound,
            KeyStoreError::KeyDisabled => XksError::InvalidState("the key is disabled"),
            KeyStoreError::UsageNotPermitted(CryptoOp::Encrypt) => {
                XksError::InvalidKeyUsage("the key's usage does not include ENCRYPT")
            }
            KeyStoreError::UsageNotPermitted(CryptoOp::Decrypt) => {
                XksError::InvalidKeyUsage("the key's usage does not include DECRYPT")
            }
            KeyStoreError::AuthenticationFailed => XksError::InvalidCiphertext(
                "the ciphertext, IV, tag, AAD or ciphertext metadata failed authentication",
            ),
            KeyStoreError::Busy => {
                XksError::Throttling("the key manager's work queue is full; retry")
            }
            KeyStoreError::Timeout => {
                XksError::DependencyTimeout("the key manager did not answer in time")
            }
            KeyStoreError::Unavailable(_) => XksError::Internal("the key manager is unavailable"),
            KeyStoreError::KeyExists | KeyStoreError::Internal(_) => {
                XksError::Internal("the key manager reported an error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_statuses_follow_the_spec_table() {
        let table = [
            (XksError::Validation("x".into()), 400, "ValidationException"),
            (XksError::InvalidState("x"), 400, "InvalidStateException"),
            (
                XksError::InvalidCiphertext("x"),
                400,
                "InvalidCiphertextException",
            ),
            (
                XksError::InvalidKeyUsage("x"),
                400,
                "InvalidKeyUsageException",
            ),
            (
                XksError::AuthenticationFailed,
                401,
                "AuthenticationFailedException",
            ),
            (XksError::AccessDenied, 403, "AccessDeniedException"),
            (XksError::KeyNotFound, 404, "KeyNotFoundException"),
            (XksError::InvalidUriPath, 404, "InvalidUriPathException"),
            (XksError::Throttling("x"), 429, "ThrottlingException"),
            (
                XksError::UnsupportedOperation("x".into()),
                501,
                "UnsupportedOperationException",
            ),
            (
                XksError::DependencyTimeout("x"),
                503,
                "DependencyTimeoutException",
            ),
            (XksError::Internal("x"), 500, "InternalException"),
        ];
        for (error, status, name) in table {
            assert_eq!(error.status().as_u16(), status);
            assert_eq!(error.name(), name);
        }
    }

    #[test]
    fn messages_are_printable_ascii_and_short() {
        let error = XksError::Validation(format!("bad\n\u{7f}é{}", "x".repeat(600)));
        let message = error.message();
        assert_eq!(message.len(), 511);
        assert!(message.starts_with("badx"));
        assert!(message.bytes().all(|b| (0x20..=0x7e).contains(&b)));
    }
}
