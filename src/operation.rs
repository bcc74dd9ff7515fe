//! The XKS operations, and how a request ended: the names the diagnostic log, the audit record
//! and the metrics all label requests with.

/// The XKS operations, as routes name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    GetHealthStatus,
    GetKeyMetadata,
    Encrypt,
    Decrypt,
}

impl Operation {
    pub fn name(&self) -> &'static str {
        match self {
            Operation::GetHealthStatus => "GetHealthStatus",
            Operation::GetKeyMetadata => "GetKeyMetadata",
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
        }
    }
}

/// How a request ended: answered, or refused with an XKS errorName.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The errorName of the answer (`ValidationException`, `ThrottlingException`, ...).
    Error(&'static str),
}

impl Outcome {
    /// `ok`, or the errorName.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error(name) => name,
        }
    }
}
