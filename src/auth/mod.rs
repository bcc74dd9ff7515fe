//! Request authentication: SigV4 signatures from KMS, checked per key store.

pub mod sigv4;

pub use sigv4::{AuthError, PendingSignature, SigV4Verifier};
