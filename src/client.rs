//! A SigV4-signing XKS client over HTTPS keep-alive: what `xks-proxy call` uses, and what tests use
//! to talk to a real server the way KMS does.
//!
//! Requests are signed with `aws-sigv4`'s request signer (the same crate the AWS SDKs use), which
//! is independent of the server's verification code path: it builds its own canonical request.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::auth::SERVICE;
use crate::auth::Secret;

/// Where and how to reach one key store of a proxy.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// `https://host[:port]`
    pub endpoint: String,
    /// Trust anchors for the server certificate (PEM).
    pub ca_file: std::path::PathBuf,
    /// Client certificate and key (PEM) for mTLS.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub region: String,
    pub uri_path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("endpoint {0:?} must look like https://host[:port]")]
    Endpoint(String),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("signing: {0}")]
    Signing(String),
}

/// A client for one key store.
pub struct XksClient {
    connector: TlsConnector,
    address: String,
    server_name: ServerName<'static>,
    authority: String,
    settings: ClientSettings,
}

/// One keep-alive HTTPS connection.
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

/// A response: status and parsed JSON body (`Value::Null` when the body is not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Reply {
    /// `errorName` of an error reply.
    pub fn error_name(&self) -> Option<&str> {
        self.body.get("errorName").and_then(Value::as_str)
    }
}

impl XksClient {
    pub fn new(settings: ClientSettings) -> Result<Self, ClientError> {
        let uri: Uri = settings
            .endpoint
            .parse()
            .map_err(|_| ClientError::Endpoint(settings.endpoint.clone()))?;
        let (Some("https"), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(ClientError::Endpoint(settings.endpoint.clone()));
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| ClientError::Endpoint(settings.endpoint.clone()))?;
        let address = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(443)
        );
        let client_cert = settings
            .client_cert
            .as_ref()
            .map(|(cert, key)| (cert.as_path(), key.as_path()));
        let tls = crate::tls::client_config(&settings.ca_file, client_cert)?;
        Ok(Self {
            connector: TlsConnector::from(tls),
            address,
            server_name,
            authority: authority.as_str().to_owned(),
            settings,
        })
    }

    /// Opens a TLS connection and an HTTP/1.1 keep-alive session on it.
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let tcp = TcpStream::connect(&self.address)
            .await
            .map_err(ClientError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(ClientError::Handshake)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Connection { sender })
    }

    /// A POST to `{uri_path}{suffix}` (for example `/health` or `/keys/foo/encrypt`), signed now.
    pub fn request(
        &self,
        suffix: &str,
        body: Vec<u8>,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        self.request_at(suffix, body, SystemTime::now())
    }

    /// Like [`Self::request`], signed as if at `time` (tests use this for clock-skew cases).
    pub fn request_at(
        &self,
        suffix: &str,
        body: Vec<u8>,
        time: SystemTime,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let path = format!("{}{}", self.settings.uri_path, suffix);
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(&path)
            .header(header::HOST, &self.authority)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Signing(e.to_string()))?;
        self.sign(&mut request, &body, time)?;
        *request.body_mut() = Full::new(Bytes::from(body));
        Ok(request)
    }

    /// Adds `X-Amz-Date` and `Authorization` for these headers and this body.
    pub fn sign<B>(
        &self,
        request: &mut Request<B>,
        body: &[u8],
        time: SystemTime,
    ) -> Result<(), ClientError> {
        let identity = Credentials::new(
            &self.settings.access_key_id,
            self.settings.secret_access_key.expose(),
            None,
            None,
            "xks-proxy",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.settings.region)
            .name(SERVICE)
            .time(time)
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| ClientError::Signing(e.to_string()))?
            .into();
        let headers: Vec<(String, String)> = request
            .headers()
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let signable = SignableRequest::new(
            request.method().as_str(),
            request.uri().to_string(),
            headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            SignableBody::Bytes(body),
        )
        .map_err(|e| ClientError::Signing(e.to_string()))?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| ClientError::Signing(e.to_string()))?
            .into_parts();
        instructions.apply_to_request_http1x(request);
        Ok(())
    }

    /// Signs and sends one operation on a fresh connection.
    pub async fn call(&self, suffix: &str, body: &Value) -> Result<Reply, ClientError> {
        let mut connection = self.connect().await?;
        connection
            .send(self.request(suffix, body.to_string().into_bytes())?)
            .await
    }
}

impl Connection {
    /// Sends a request and reads the whole reply.
    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<Reply, ClientError> {
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply { status, body })
    }
}

/// Request bodies the way KMS builds them.
pub mod bodies {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;

    const PRINCIPAL: &str = "arn:aws:iam::123456789012:user/xks-proxy-client";
    const KEY_ARN: &str = "arn:aws:kms:us-east-1:123456789012:key/xks-proxy-client";

    fn request_id() -> String {
        let mut bytes = [0u8; 16];
        let _ = getrandom::fill(&mut bytes);
        hex::encode(bytes)
    }

    pub fn health() -> Value {
        json!({ "requestMetadata": { "kmsRequestId": request_id(), "kmsOperation": "KmsHealthCheck" } })
    }

    pub fn key_metadata() -> Value {
        json!({ "requestMetadata": {
            "awsPrincipalArn": PRINCIPAL, "kmsOperation": "CreateKey", "kmsRequestId": request_id() } })
    }

    pub fn encrypt(plaintext: &[u8], aad: Option<&[u8]>, cdiv: bool) -> Value {
        let mut body = json!({
            "requestMetadata": { "awsPrincipalArn": PRINCIPAL, "kmsKeyArn": KEY_ARN,
                "kmsOperation": "Encrypt", "kmsRequestId": request_id() },
            "plaintext": BASE64.encode(plaintext),
            "encryptionAlgorithm": "AES_GCM",
        });
        if let Some(aad) = aad {
            body["additionalAuthenticatedData"] = BASE64.encode(aad).into();
        }
        if cdiv {
            body["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256".into();
        }
        body
    }

    /// A Decrypt body from an Encrypt reply, as KMS builds it.
    pub fn decrypt_from(encrypted: &Value, aad: Option<&[u8]>) -> Value {
        let mut body = json!({
            "requestMetadata": { "awsPrincipalArn": PRINCIPAL, "kmsKeyArn": KEY_ARN,
                "kmsOperation": "Decrypt", "kmsRequestId": request_id() },
            "ciphertext": encrypted["ciphertext"],
            "encryptionAlgorithm": "AES_GCM",
            "initializationVector": encrypted["initializationVector"],
            "authenticationTag": encrypted["authenticationTag"],
        });
        if let Some(metadata) = encrypted.get("ciphertextMetadata") {
            body["ciphertextMetadata"] = metadata.clone();
        }
        if let Some(aad) = aad {
            body["additionalAuthenticatedData"] = BASE64.encode(aad).into();
        }
        body
    }
}
