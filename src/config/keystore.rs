//! One `[[keystore]]`: its URI path and Region, its key manager (`backend` and its table), its
//! credentials, policy and rate limit, composed from the settings types their modules own.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use super::{NamedFile, Resolver};
use crate::auth::Credential;
use crate::auth::credentials::CredentialSettings;
use crate::auth::policy::{Policy, PolicyConfig};
use crate::field::FieldError;
use crate::keystore::BackendSettings;
use crate::keystore::pkcs11::Pkcs11Settings;

/// One external key store: a URI path registered in KMS, its credentials and its key manager.
#[derive(Debug, Clone)]
pub struct KeystoreConfig {
    pub uri_path: String,
    pub region: String,
    pub backend: BackendSettings,
    pub credentials: Vec<Credential>,
    /// Secondary authorization; none means every authenticated request is allowed.
    pub policy: Option<Arc<Policy>>,
    /// Requests per second this key store accepts (burst: one second's worth); above it 429.
    pub rate_limit_rps: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeystore {
    pub(super) uri_path: String,
    region: String,
    backend: String,
    key_file: Option<PathBuf>,
    pkcs11: Option<Pkcs11Settings>,
    #[serde(default)]
    credential: Vec<CredentialSettings>,
    policy: Option<PolicyConfig>,
    rate_limit_rps: Option<u32>,
}

/// One `[[keystore]]`, read from `table`; errors name the field below it.
pub(super) fn compose_keystore(
    raw: RawKeystore,
    paths: &Resolver,
    table: &str,
    secret_files: &mut Vec<NamedFile>,
) -> Result<KeystoreConfig, FieldError> {
    crate::api::check_uri_path(&raw.uri_path).map_err(|p| FieldError::new("uri_path", p))?;
    let region_ok = !raw.region.is_empty()
        && raw
            .region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !region_ok {
        return Err(FieldError::new(
            "region",
            format!("{:?} is not an AWS Region such as us-east-1", raw.region),
        ));
    }
    let backend = match raw.backend.as_str() {
        "software" => {
            let key_file = raw.key_file.ok_or_else(|| {
                FieldError::new("key_file", "required for backend = \"software\"")
            })?;
            if raw.pkcs11.is_some() {
                return Err(FieldError::new("pkcs11", "only for backend = \"pkcs11\""));
            }
            BackendSettings::Software {
                key_file: paths.resolve(&key_file),
            }
        }
        "pkcs11" => {
            let mut settings = raw.pkcs11.ok_or_else(|| {
                FieldError::new(
                    "pkcs11",
                    "a [keystore.pkcs11] table is required for backend = \"pkcs11\"",
                )
            })?;
            if raw.key_file.is_some() {
                return Err(FieldError::new(
                    "key_file",
                    "only for backend = \"software\"",
                ));
            }
            settings
                .validate(paths.base_dir)
                .map_err(|e| e.under("pkcs11"))?;
            BackendSettings::Pkcs11(settings)
        }
        other => {
            return Err(FieldError::new(
                "backend",
                format!("{other:?} is not a backend: use \"software\" or \"pkcs11\""),
            ));
        }
    };
    if raw.credential.is_empty() {
        return Err(FieldError::new(
            "credential",
            "at least one [[keystore.credential]] is required",
        ));
    }
    let mut credentials: Vec<Credential> = Vec::new();
    for (j, raw) in raw.credential.into_iter().enumerate() {
        let at = format!("credential[{j}]");
        if credentials
            .iter()
            .any(|k| k.access_key_id == raw.access_key_id())
        {
            return Err(
                FieldError::new("access_key_id", "appears twice in this key store").under(&at),
            );
        }
        let (credential, secret_file) = raw
            .load(|path| paths.resolve(path))
            .map_err(|e| e.under(&at))?;
        secret_files.extend(secret_file.map(|path| NamedFile {
            field: format!("{table}.{at}.secret_access_key_file"),
            path,
        }));
        credentials.push(credential);
    }
    let policy = raw
        .policy
        .as_ref()
        .map(|p| Policy::compile(p).map(Arc::new))
        .transpose()
        .map_err(|e| e.under("policy"))?;
    if raw.rate_limit_rps == Some(0) {
        return Err(FieldError::new("rate_limit_rps", "must be at least 1"));
    }
    Ok(KeystoreConfig {
        uri_path: raw.uri_path,
        region: raw.region,
        backend,
        credentials,
        policy,
        rate_limit_rps: raw.rate_limit_rps,
    })
}
