//! TLS settings for both ends: the server's rustls config (TLS 1.2 and 1.3 only, ALPN h2 and
//! http/1.1, optional mTLS with a subject check) and the client config used by `xks-proxy call`
//! and the tests.
//!
//! mTLS (spec §1.3): a client certificate must chain to the configured CA and, when a subject is
//! configured, carry it as its CN or as a DNS SAN (KMS presents `cks.kms.<region>.amazonaws.com`).
//! Any failure terminates the handshake with a `handshake_failure` alert, the alert the official
//! conformance client looks for; the precise reason goes to the log.
//!
//! Certificate expiry: every [`server_config`] reads the `notAfter` of the certificates it loaded
//! (the served chain and the client CA file). [`mark_served`] makes one built config's dates the
//! served ones, read by the metrics ([`served_certificates`]) and by [`watch_expiry`], which logs
//! a WARN once a day for each certificate with less than [`EXPIRY_WARNING_DAYS`] left.

mod settings;

pub use settings::ServerTlsSettings;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

/// A TLS file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {problem}")]
    File { path: String, problem: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |problem: String| TlsError::File {
        path: path.display().to_string(),
        problem,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(file_error("no CERTIFICATE found".into()));
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.display().to_string(),
        problem: format!("cannot read a private key: {e}"),
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::File {
            path: path.display().to_string(),
            problem: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The server's TLS config. `client_ca` turns on mTLS; `client_subject` then restricts the name.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    client_subject: Option<&str>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            if client_subject.is_none() {
                tracing::warn!(
                    client_ca = %ca.display(),
                    "mTLS accepts ANY client certificate chaining to client_ca \
                     (client_any_subject = true), not only KMS's"
                );
            }
            let inner = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                .build()
                .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(Arc::new(KmsClientVerifier {
                inner,
                subject: client_subject.map(str::to_ascii_lowercase),
            }))
        }
    };
    let chain = load_certs(cert)?;
    let mut expiry = certificate_dates(&chain, "server", cert)?;
    if let Some(ca) = client_ca {
        expiry.extend(certificate_dates(&load_certs(ca)?, "client_ca", ca)?);
    }
    let mut config = builder
        .with_single_cert(chain, load_key(key)?)
        .map_err(|e| TlsError::Config(format!("server certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    let config = Arc::new(config);
    remember_dates(&config, expiry);
    Ok(config)
}

/// The client's TLS config: trust `ca` (PEM), optionally present a client certificate.
pub fn client_config(
    ca: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?,
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// WebPKI chain verification plus the configured subject, failing with `handshake_failure`.
#[derive(Debug)]
struct KmsClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    subject: Option<String>,
}

impl KmsClientVerifier {
    fn reject(reason: String) -> rustls::Error {
        tracing::warn!(reason = %reason, "mTLS client certificate rejected");
        rustls::Error::General("client certificate rejected".into())
    }
}

impl ClientCertVerifier for KmsClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| Self::reject(e.to_string()))?;
        if let Some(subject) = &self.subject {
            let names = certificate_names(end_entity)
                .map_err(|e| Self::reject(format!("unreadable certificate: {e}")))?;
            if !names.iter().any(|n| n == subject) {
                return Err(Self::reject(format!(
                    "subject {names:?} is not the configured client_subject {subject:?}"
                )));
            }
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The first subject name (CN, else DNS SAN) of an mTLS client's certificate, for logs.
pub fn client_subject(der: &CertificateDer<'_>) -> Option<String> {
    certificate_names(der).ok()?.into_iter().next()
}

/// The subject CNs and DNS SANs of a certificate, lower-cased.
fn certificate_names(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_ascii_lowercase)
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

// ---- Certificate expiry ----

/// Days before `notAfter` from which [`watch_expiry`] warns (and `config check` says WARN).
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// How often [`watch_expiry`] looks; each certificate is warned about at most once a day.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(60);
const EXPIRY_WARNING_REPEAT: Duration = Duration::from_secs(24 * 60 * 60);

/// One loaded certificate's end of validity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CertificateDate {
    /// `server` (the end-entity certificate served), `server_chain` (the other certificates
    /// served with it) or `client_ca` (a certificate of the mTLS client CA file).
    pub role: &'static str,
    /// The subject as a distinguished name, e.g. `CN=localhost`.
    pub subject: String,
    /// `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
}

impl CertificateDate {
    /// Whole days from now until `notAfter` (negative once expired).
    pub fn days_left(&self) -> i64 {
        (self.not_after - unix_now()).div_euclid(86_400)
    }

    /// `notAfter` as an RFC 3339 date and time, UTC.
    pub fn not_after_text(&self) -> String {
        time::OffsetDateTime::from_unix_timestamp(self.not_after)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| self.not_after.to_string())
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The `notAfter` of each certificate of a PEM file already read: the first takes `role`
/// (`server` becomes `server_chain` after the first).
fn certificate_dates(
    certs: &[CertificateDer<'_>],
    role: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDate>, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    certs
        .iter()
        .enumerate()
        .map(|(i, der)| {
            let (_, cert) =
                X509Certificate::from_der(der.as_ref()).map_err(|e| TlsError::File {
                    path: path.display().to_string(),
                    problem: format!("certificate {} is not readable X.509: {e}", i + 1),
                })?;
            Ok(CertificateDate {
                role: if role == "server" && i > 0 {
                    "server_chain"
                } else {
                    role
                },
                subject: cert.subject().to_string(),
                not_after: cert.validity().not_after.timestamp(),
            })
        })
        .collect()
}

/// Reads the certificate dates of a server certificate chain and an optional client CA file,
/// the way [`server_config`] does (for `config check`).
pub fn certificate_expiry(
    cert: &Path,
    client_ca: Option<&Path>,
) -> Result<Vec<CertificateDate>, TlsError> {
    let mut dates = certificate_dates(&load_certs(cert)?, "server", cert)?;
    if let Some(ca) = client_ca {
        dates.extend(certificate_dates(&load_certs(ca)?, "client_ca", ca)?);
    }
    Ok(dates)
}

/// The dates read by each [`server_config`] still alive, by the config's address.
type BuiltDates = HashMap<usize, (Weak<rustls::ServerConfig>, Arc<Vec<CertificateDate>>)>;

static BUILT: Mutex<Option<BuiltDates>> = Mutex::new(None);
static SERVED: Mutex<Option<Arc<Vec<CertificateDate>>>> = Mutex::new(None);
/// Wakes [`watch_expiry`] when [`mark_served`] changes the served certificates.
static SERVED_CHANGED: tokio::sync::Notify = tokio::sync::Notify::const_new();

fn remember_dates(config: &Arc<rustls::ServerConfig>, dates: Vec<CertificateDate>) {
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    built.retain(|_, (config, _)| config.strong_count() > 0);
    built.insert(
        Arc::as_ptr(config) as usize,
        (Arc::downgrade(config), Arc::new(dates)),
    );
}

/// The certificate dates of a config built by [`server_config`].
pub fn dates_of(config: &Arc<rustls::ServerConfig>) -> Vec<CertificateDate> {
    let built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    built
        .as_ref()
        .and_then(|b| b.get(&(Arc::as_ptr(config) as usize)))
        .filter(|(weak, _)| weak.as_ptr() == Arc::as_ptr(config))
        .map(|(_, dates)| dates.as_ref().clone())
        .unwrap_or_default()
}

/// Makes `config`'s certificates the served ones: call it when the config starts being used for
/// new handshakes (at start-up and when a reload applies).
pub fn mark_served(config: &Arc<rustls::ServerConfig>) {
    let dates = Arc::new(dates_of(config));
    *SERVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(dates);
    SERVED_CHANGED.notify_one();
}

/// The fewest days left among the certificates of one role (`server` counts its whole chain).
pub fn fewest_days_left(dates: &[CertificateDate], client_ca: bool) -> Option<i64> {
    dates
        .iter()
        .filter(|d| (d.role == "client_ca") == client_ca)
        .map(CertificateDate::days_left)
        .min()
}

/// The served certificates' dates (empty before [`mark_served`]).
pub fn served_certificates() -> Arc<Vec<CertificateDate>> {
    SERVED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default()
}

/// The WARN (or, once expired, ERROR) line for one certificate, if it is due one.
fn log_expiry(date: &CertificateDate) {
    let days_left = date.days_left();
    if days_left < 0 {
        tracing::error!(
            certificate = date.role,
            subject = %date.subject,
            days_left,
            "TLS certificate has EXPIRED: KMS cannot connect until it is replaced"
        );
    } else {
        tracing::warn!(
            certificate = date.role,
            subject = %date.subject,
            days_left,
            "TLS certificate expires in less than {EXPIRY_WARNING_DAYS} days: replace it \
             (the proxy reloads changed certificate files by itself)"
        );
    }
}

/// Logs, once a day for each served certificate that expires within [`EXPIRY_WARNING_DAYS`]:
/// at once for a certificate newly served (start-up, a reload), then when a day has passed since
/// its last line (checked every minute). Runs until dropped.
pub async fn watch_expiry() {
    let mut warned: HashMap<CertificateDate, std::time::Instant> = HashMap::new();
    let mut ticker = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = SERVED_CHANGED.notified() => {}
        }
        let served = served_certificates();
        warned.retain(|date, _| served.contains(date));
        for date in served.iter() {
            if date.days_left() >= EXPIRY_WARNING_DAYS {
                continue;
            }
            let due = warned
                .get(date)
                .is_none_or(|at| at.elapsed() >= EXPIRY_WARNING_REPEAT);
            if due {
                log_expiry(date);
                warned.insert(date.clone(), std::time::Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_chain(dir: &Path, days: i64) -> (std::path::PathBuf, std::path::PathBuf) {
        use rcgen::{CertificateParams, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "expiry test");
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
        let cert = params.self_signed(&key).unwrap();
        let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }

    #[test]
    fn a_built_config_carries_its_certificate_dates_until_marked_served() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_chain(dir.path(), 12);
        let config = server_config(&cert, &key, Some(&cert), None).unwrap();
        let dates = dates_of(&config);
        assert_eq!(dates.len(), 2, "{dates:?}");
        assert_eq!(dates[0].role, "server");
        assert_eq!(dates[1].role, "client_ca");
        assert_eq!(dates[0].subject, "CN=expiry test");
        // Now + 12 days, to the second: 11 or 12 whole days left.
        assert!((11..=12).contains(&dates[0].days_left()), "{dates:?}");
        assert_eq!(certificate_expiry(&cert, None).unwrap(), dates[..1]);
        mark_served(&config);
        assert_eq!(*served_certificates(), dates);
    }
}
