//! A problem with one setting: where it is in the config file (`keystore[0].pkcs11.pin_env`) and
//! what is wrong with it.
//!
//! Each module that owns a settings type validates it into a [`FieldError`] whose path starts at
//! its own table (`pin_env`); whoever read that table from a larger one places the error under it
//! with [`FieldError::under`] (`keystore[0].pkcs11`), and [`crate::config`] adds the file name.

use std::fmt;

/// A setting that is wrong, and why. The problem text never quotes a secret's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    field: String,
    problem: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The same problem seen from the table that holds this one: `pin_env` under
    /// `keystore[0].pkcs11` is `keystore[0].pkcs11.pin_env`.
    pub fn under(self, table: &str) -> Self {
        let field = if self.field.is_empty() {
            table.to_owned()
        } else {
            format!("{table}.{}", self.field)
        };
        Self { field, ..self }
    }

    /// The field's path, e.g. `limits.max_body_bytes`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for FieldError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_placed_under_the_tables_that_hold_it() {
        let error = FieldError::new("pin_env", "not set")
            .under("pkcs11")
            .under("keystore[0]");
        assert_eq!(error.field(), "keystore[0].pkcs11.pin_env");
        assert_eq!(error.problem(), "not set");
        assert_eq!(error.to_string(), "keystore[0].pkcs11.pin_env: not set");
        assert_eq!(FieldError::new("", "x").under("policy").field(), "policy");
    }
}
