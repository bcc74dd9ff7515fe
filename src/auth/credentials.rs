//! The SigV4 credentials KMS signs with: an access key id and a secret (zeroed on drop, never
//! printed), KMS's format rules for both, and the generator behind `credentials new`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::field::FieldError;

/// `[[keystore.credential]]` as written: the secret inline or in a file of its own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSettings {
    access_key_id: String,
    secret_access_key: Option<Zeroizing<String>>,
    secret_access_key_file: Option<PathBuf>,
}

impl CredentialSettings {
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// Checks KMS's formats and reads the secret, from `secret_access_key_file` (resolved with
    /// `resolve`) when it is given there; returns the credential and the file it read. Errors name
    /// the field below the credential's table and never quote the secret.
    pub fn load(
        self,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<(Credential, Option<PathBuf>), FieldError> {
        check_access_key_id(&self.access_key_id)
            .map_err(|p| FieldError::new("access_key_id", p))?;
        let (secret, file) = match (self.secret_access_key, self.secret_access_key_file) {
            (Some(secret), None) => (secret, None),
            (None, Some(file)) => {
                let file = resolve(&file);
                let text = std::fs::read_to_string(&file).map_err(|e| {
                    FieldError::new(
                        "secret_access_key_file",
                        format!("cannot read {}: {e}", file.display()),
                    )
                })?;
                (Zeroizing::new(text.trim().to_string()), Some(file))
            }
            _ => {
                return Err(FieldError::new(
                    "secret_access_key",
                    "give exactly one of secret_access_key or secret_access_key_file",
                ));
            }
        };
        check_secret(&secret).map_err(|p| FieldError::new("secret_access_key", p))?;
        let credential = Credential {
            access_key_id: self.access_key_id,
            secret_access_key: Secret(secret),
        };
        Ok((credential, file))
    }
}

/// A SigV4 credential that KMS uses for this key store.
#[derive(Clone)]
pub struct Credential {
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .finish()
    }
}

impl Credential {
    /// A new random credential in KMS's format: a 20-character `[A-Z2-7]` id and a 44-character
    /// Base64 secret carrying 256 bits from the OS CSPRNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        use base64::Engine;
        const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        let mut id_bytes = [0u8; 20];
        getrandom::fill(&mut id_bytes)?;
        let access_key_id = id_bytes
            .iter()
            .map(|b| BASE32[usize::from(b % 32)] as char)
            .collect();
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::fill(secret.as_mut())?;
        let secret = base64::engine::general_purpose::STANDARD.encode(secret.as_ref());
        Ok(Self {
            access_key_id,
            secret_access_key: Secret::new(secret),
        })
    }
}

impl Credential {
    /// What `credentials new` prints: the config snippet for the key store at `uri_path`, and the
    /// same values for KMS (a `create-custom-key-store` for a key store named `name` at
    /// `endpoint`, an `update-custom-key-store` for a rotation, the console's JSON). It holds the
    /// secret: for the operator's terminal only, never a log.
    pub fn enrollment(&self, uri_path: &str, endpoint: &str, name: &str) -> String {
        let id = &self.access_key_id;
        let secret = self.secret_access_key.expose();
        let console = serde_json::json!({
            "XksProxyUriPath": uri_path,
            "XksProxyAuthenticationCredential": { "AccessKeyId": id, "RawSecretAccessKey": secret },
        });
        format!(
            r#"# 1. Add to the [[keystore]] with uri_path = "{uri_path}" (keep the old credential during rotation):
[[keystore.credential]]
access_key_id = "{id}"
secret_access_key = "{secret}"

# 2. Give KMS the same values. A new key store:
aws kms create-custom-key-store   --custom-key-store-name {name}   --custom-key-store-type EXTERNAL_KEY_STORE   --xks-proxy-connectivity PUBLIC_ENDPOINT   --xks-proxy-uri-endpoint {endpoint}   --xks-proxy-uri-path {uri_path}   --xks-proxy-authentication-credential AccessKeyId={id},RawSecretAccessKey={secret}
# or, rotating an existing one (disconnect is not needed):
aws kms update-custom-key-store --custom-key-store-id cks-...   --xks-proxy-authentication-credential AccessKeyId={id},RawSecretAccessKey={secret}

# Console: XksProxyUriEndpoint {endpoint}, XksProxyUriPath {uri_path}; or upload this file:
{console}"#
        )
    }
}

/// A secret string: zeroed on drop, never printed by `Debug` or `Display`.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// KMS's AccessKeyId rule: 20–30 characters of `A-Z2-7`.
pub fn check_access_key_id(id: &str) -> Result<(), String> {
    let ok = (20..=30).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b));
    if ok {
        Ok(())
    } else {
        Err("must be 20 to 30 characters of A-Z and 2-7 (KMS's format)".into())
    }
}

/// KMS's RawSecretAccessKey rule: 43–64 characters of `A-Z a-z 0-9 + / =`.
pub fn check_secret(secret: &str) -> Result<(), String> {
    let ok = (43..=64).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if ok {
        Ok(())
    } else {
        Err("must be 43 to 64 characters of A-Z a-z 0-9 + / = (for example: openssl rand -base64 32)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_credentials_pass_kms_rules() {
        let c = Credential::generate().unwrap();
        assert!(check_access_key_id(&c.access_key_id).is_ok());
        assert!(check_secret(c.secret_access_key.expose()).is_ok());
        assert_ne!(
            c.access_key_id,
            Credential::generate().unwrap().access_key_id
        );
    }
}
