//! Development mode and development certificates. Nothing here is for production.
//!
//! `xks-proxy serve` with no `--config` calls [`prepare`]: under a state directory it creates (once,
//! then reuses) a development CA, a server certificate for `localhost`/`127.0.0.1` signed by it, a
//! random SigV4 credential, a software key store with the conformance keys (`foo` for encrypt and
//! decrypt, `encrypt_only_key`, `decrypt_only_key`, `impotent_key`) and a config file tying them
//! together. The server then starts from that config file like any other.
//!
//! [`DevCa`] is also what tests use to issue server and mTLS client certificates.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::auth::Credential;
use crate::keystore::software::SoftwareKeyStore;
use crate::keystore::{KeyId, KeyStore, KeyStoreError, KeyUsage};

/// The key store path dev mode registers.
pub const DEV_URI_PATH: &str = "/example/kms/xks/v1";
/// The keys dev mode creates: the conformance client's defaults.
pub const DEV_KEYS: [(&str, KeyUsage); 4] = [
    ("foo", KeyUsage::BOTH),
    (
        "encrypt_only_key",
        KeyUsage {
            encrypt: true,
            decrypt: false,
        },
    ),
    (
        "decrypt_only_key",
        KeyUsage {
            encrypt: false,
            decrypt: true,
        },
    ),
    (
        "impotent_key",
        KeyUsage {
            encrypt: false,
            decrypt: false,
        },
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{0}")]
    Other(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes a file readable by its owner only, atomically.
pub fn write_private(path: &Path, contents: &str) -> Result<(), DevError> {
    crate::atomic_file::write_private(path, contents.as_bytes()).map_err(io_error(path))
}

/// A throw-away certificate authority.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A certificate and its private key, PEM-encoded.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl DevCa {
    pub fn generate(name: &str) -> Result<Self, DevError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A TLS server certificate for these DNS names and IP addresses.
    pub fn issue_server(&self, names: &[&str]) -> Result<IssuedCert, DevError> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("localhost"),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, Duration::days(825))
    }

    /// An mTLS client certificate with this common name (KMS uses `cks.kms.<region>.amazonaws.com`).
    pub fn issue_client(&self, common_name: &str) -> Result<IssuedCert, DevError> {
        let mut params = CertificateParams::new(vec![common_name.to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, Duration::days(825))
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        valid: Duration,
    ) -> Result<IssuedCert, DevError> {
        params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + valid;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What dev mode prepared.
pub struct DevState {
    pub config_file: PathBuf,
    pub ca_file: PathBuf,
    pub credential: Credential,
    pub listen: String,
}

/// Creates (or reuses) the dev state under `dir` and returns where it is.
pub async fn prepare(dir: &Path, listen: &str) -> Result<DevState, DevError> {
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    let config_file = dir.join("config.toml");
    let ca_file = dir.join("ca.pem");
    if config_file.exists() {
        let config = crate::config::Config::load(&config_file)
            .map_err(|e| DevError::Other(e.to_string()))?;
        let keystore = config.keystore(DEV_URI_PATH).ok_or_else(|| {
            DevError::Other(format!(
                "{}: no key store at {DEV_URI_PATH}",
                config_file.display()
            ))
        })?;
        let credential = keystore
            .credentials
            .first()
            .cloned()
            .ok_or_else(|| DevError::Other("no credential".into()))?;
        return Ok(DevState {
            config_file,
            ca_file,
            credential,
            listen: config.server.listen.to_string(),
        });
    }

    let ca = DevCa::generate("xks-proxy development CA (not for production)")?;
    let server = ca.issue_server(&["localhost", "127.0.0.1"])?;
    fs::write(&ca_file, ca.cert_pem()).map_err(io_error(&ca_file))?;
    let cert_file = dir.join("server.pem");
    fs::write(&cert_file, format!("{}{}", server.cert_pem, ca.cert_pem()))
        .map_err(io_error(&cert_file))?;
    write_private(&dir.join("server-key.pem"), &server.key_pem)?;

    let keys = SoftwareKeyStore::open(&dir.join("keys.json"))
        .map_err(|e| DevError::Other(e.to_string()))?;
    for (name, usage) in DEV_KEYS {
        let id = KeyId::parse(name).map_err(|e| DevError::Other(e.to_string()))?;
        match keys.create_key(&id, usage).await {
            Ok(_) | Err(KeyStoreError::KeyExists) => {}
            Err(e) => return Err(DevError::Other(e.to_string())),
        }
    }

    let credential = Credential::generate().map_err(|e| DevError::Other(e.to_string()))?;
    let config = format!(
        r#"# xks-proxy DEVELOPMENT configuration, generated by `xks-proxy serve` without --config.
# Self-signed CA, random credential, software key store (NOT an HSM). Do not use in production.

[server]
listen = "{listen}"
tls_cert = "server.pem"
tls_key = "server-key.pem"

[iv_budget]
ledger = "iv-ledger.json"

[[keystore]]
uri_path = "{DEV_URI_PATH}"
region = "us-east-1"
backend = "software"
key_file = "keys.json"
[[keystore.credential]]
access_key_id = "{}"
secret_access_key = "{}"
"#,
        credential.access_key_id,
        credential.secret_access_key.expose()
    );
    write_private(&config_file, &config)?;
    Ok(DevState {
        config_file,
        ca_file,
        credential,
        listen: listen.to_string(),
    })
}

/// The banner dev mode prints: a loud warning, a ready-to-paste health call and the KMS values.
pub fn banner(state: &DevState) -> String {
    let port = state.listen.rsplit(':').next().unwrap_or("8443");
    let secret = state.credential.secret_access_key.expose();
    let id = &state.credential.access_key_id;
    format!(
        r#"
################################################################################
#  DEVELOPMENT MODE: self-signed certificate, generated credential, software   #
#  key store (keys in a local file, NOT an HSM). Never register this in KMS    #
#  for real data. For production: xks-proxy serve --config FILE                #
################################################################################

config:  {config}
Health check (curl signs with SigV4 itself):

  curl --cacert {ca} https://localhost:{port}{DEV_URI_PATH}/health \
    -H 'Content-Type: application/json' \
    --aws-sigv4 'aws:amz:us-east-1:kms-xks-proxy' --user '{id}:{secret}' \
    -d '{{"requestMetadata":{{"kmsRequestId":"1","kmsOperation":"KmsHealthCheck"}}}}'

Or: xks-proxy call --config {config} --keystore {DEV_URI_PATH} health

Values for `aws kms create-custom-key-store` (once served on a public name, port 443,
with a publicly trusted certificate):
  XksProxyUriEndpoint    https://<your host name>
  XksProxyUriPath        {DEV_URI_PATH}
  AccessKeyId            {id}
  RawSecretAccessKey     {secret}
"#,
        config = state.config_file.display(),
        ca = state.ca_file.display(),
    )
}

/// `xks-proxy dev-certs`: a development CA and a server certificate for `names` in `out`, and
/// with `client_cn` a client CA and client certificate for mTLS. Returns the files written.
/// Existing files are kept unless `force`.
pub fn write_dev_certs(
    out: &Path,
    names: &[String],
    client_cn: Option<&str>,
    force: bool,
) -> Result<Vec<&'static str>, String> {
    let mut files = vec!["ca.pem", "server.pem", "server-key.pem"];
    if client_cn.is_some() {
        files.extend(["client-ca.pem", "client.pem", "client-key.pem"]);
    }
    if !force && let Some(existing) = files.iter().map(|f| out.join(f)).find(|p| p.exists()) {
        return Err(format!(
            "{} exists (use --force to replace it)",
            existing.display()
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let write = |name: &str, text: &str| {
        std::fs::write(out.join(name), text)
            .map_err(|e| format!("{}: {e}", out.join(name).display()))
    };
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let ca = DevCa::generate("xks-proxy development CA (not for production)")
        .map_err(|e| e.to_string())?;
    let server = ca.issue_server(&names).map_err(|e| e.to_string())?;
    write("ca.pem", ca.cert_pem())?;
    write(
        "server.pem",
        &format!("{}{}", server.cert_pem, ca.cert_pem()),
    )?;
    write_private(&out.join("server-key.pem"), &server.key_pem).map_err(|e| e.to_string())?;
    if let Some(cn) = client_cn {
        let client_ca = DevCa::generate("xks-proxy development client CA (not for production)")
            .map_err(|e| e.to_string())?;
        let client = client_ca.issue_client(cn).map_err(|e| e.to_string())?;
        write("client-ca.pem", client_ca.cert_pem())?;
        write("client.pem", &client.cert_pem)?;
        write_private(&out.join("client-key.pem"), &client.key_pem).map_err(|e| e.to_string())?;
    }
    Ok(files)
}
