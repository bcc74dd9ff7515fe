//! Request authentication (SigV4 signatures from KMS, per key store) and secondary authorization
//! (an optional policy over the request metadata).

pub mod credentials;
pub mod policy;
mod sigv4;

pub use credentials::{Credential, Secret};
pub use sigv4::{AuthError, PendingSignature, SERVICE, SigV4Verifier};
