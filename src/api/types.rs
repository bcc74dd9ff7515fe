//! Request and response bodies of the four XKS operations, with the spec's validation (spec §3).
//!
//! Requests are read into permissive serde shapes (every field optional, unknown fields ignored),
//! then validated into typed values with decoded bytes, so each failure gets a precise
//! ValidationException message written by the proxy. Inputs above this proxy's configured maximums
//! (which are at least the spec's minimums) get 501 UnsupportedOperationException.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::error::XksError;
use crate::auth::policy::PolicyRequest;
use crate::crypto::MAX_CIPHERTEXT_METADATA;
use crate::keystore::{IV_LEN, TAG_LEN};
use crate::limits::Limits;

/// Longest logged `kmsRequestId`; longer ones are cut in logs (they are opaque, never validated).
const LOGGED_ID_MAX: usize = 128;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawMetadata {
    aws_principal_arn: Option<String>,
    aws_source_vpc: Option<String>,
    aws_source_vpce: Option<String>,
    kms_key_arn: Option<String>,
    kms_operation: Option<String>,
    kms_request_id: Option<String>,
    kms_via_service: Option<String>,
}

/// `requestMetadata` after validation. Content is opaque: only presence is checked (spec §3).
#[derive(Debug, Clone, Default)]
pub struct RequestMetadata {
    pub kms_request_id: String,
    pub kms_operation: String,
    pub aws_principal_arn: Option<String>,
    pub kms_key_arn: Option<String>,
    pub kms_via_service: Option<String>,
    pub aws_source_vpc: Option<String>,
    pub aws_source_vpce: Option<String>,
}

impl RequestMetadata {
    /// The fields a secondary-authorization policy looks at.
    pub fn policy_request(&self) -> PolicyRequest<'_> {
        PolicyRequest {
            kms_operation: &self.kms_operation,
            aws_principal_arn: self.aws_principal_arn.as_deref(),
            kms_key_arn: self.kms_key_arn.as_deref(),
            kms_via_service: self.kms_via_service.as_deref(),
            aws_source_vpc: self.aws_source_vpc.as_deref(),
            aws_source_vpce: self.aws_source_vpce.as_deref(),
        }
    }

    /// The request id as it may appear in a log line: at most 128 characters.
    pub fn loggable_request_id(&self) -> &str {
        let id = &self.kms_request_id;
        match id.char_indices().nth(LOGGED_ID_MAX) {
            Some((cut, _)) => &id[..cut],
            None => id,
        }
    }
}

/// Which metadata fields an operation requires.
#[derive(Clone, Copy)]
enum Needs {
    Health,
    KeyMetadata,
    Crypto,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEnvelope {
    request_metadata: Option<RawMetadata>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEncrypt {
    request_metadata: Option<RawMetadata>,
    plaintext: Option<String>,
    encryption_algorithm: Option<String>,
    additional_authenticated_data: Option<String>,
    ciphertext_data_integrity_value_algorithm: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDecrypt {
    request_metadata: Option<RawMetadata>,
    ciphertext: Option<String>,
    ciphertext_metadata: Option<String>,
    encryption_algorithm: Option<String>,
    additional_authenticated_data: Option<String>,
    initialization_vector: Option<String>,
    authentication_tag: Option<String>,
}

/// A validated Encrypt request.
pub struct EncryptRequest {
    pub metadata: RequestMetadata,
    pub plaintext: Zeroizing<Vec<u8>>,
    /// Empty when absent: the spec encodes both the same way.
    pub aad: Vec<u8>,
    /// `ciphertextDataIntegrityValueAlgorithm` was `SHA_256`.
    pub want_cdiv: bool,
}

/// A validated Decrypt request.
pub struct DecryptRequest {
    pub metadata: RequestMetadata,
    pub ciphertext: Vec<u8>,
    pub ciphertext_metadata: Vec<u8>,
    pub aad: Vec<u8>,
    pub iv: Vec<u8>,
    pub tag: [u8; TAG_LEN],
}

/// Parses a GetHealthStatus body.
pub fn parse_health(body: &[u8]) -> Result<RequestMetadata, XksError> {
    let raw: RawEnvelope = from_json(body)?;
    metadata(raw.request_metadata, Needs::Health)
}

/// Parses a GetKeyMetadata body.
pub fn parse_key_metadata(body: &[u8]) -> Result<RequestMetadata, XksError> {
    let raw: RawEnvelope = from_json(body)?;
    metadata(raw.request_metadata, Needs::KeyMetadata)
}

/// Parses an Encrypt body. On a validation error the metadata, if it was valid, is returned too,
/// so that the failure can be logged with its `kmsRequestId`.
pub fn parse_encrypt(
    body: &[u8],
    limits: &Limits,
) -> Result<EncryptRequest, (XksError, Option<Box<RequestMetadata>>)> {
    let raw: RawEncrypt = from_json(body).map_err(|e| (e, None))?;
    let metadata = metadata(raw.request_metadata, Needs::Crypto).map_err(|e| (e, None))?;
    let fields = || -> Result<_, XksError> {
        check_algorithm(raw.encryption_algorithm.as_deref())?;
        let want_cdiv = match raw.ciphertext_data_integrity_value_algorithm.as_deref() {
            None => false,
            Some("SHA_256") => true,
            Some(_) => {
                return Err(XksError::Validation(
                    "ciphertextDataIntegrityValueAlgorithm must be SHA_256".into(),
                ));
            }
        };
        let plaintext = raw
            .plaintext
            .as_deref()
            .ok_or_else(|| missing("plaintext"))?;
        let plaintext = Zeroizing::new(decode_bounded(
            "plaintext",
            plaintext,
            limits.max_plaintext_bytes,
        )?);
        if plaintext.is_empty() {
            return Err(XksError::Validation("plaintext must not be empty".into()));
        }
        let aad = decode_optional_aad(raw.additional_authenticated_data.as_deref(), limits)?;
        Ok((plaintext, aad, want_cdiv))
    };
    match fields() {
        Ok((plaintext, aad, want_cdiv)) => Ok(EncryptRequest {
            metadata,
            plaintext,
            aad,
            want_cdiv,
        }),
        Err(e) => Err((e, Some(Box::new(metadata)))),
    }
}

/// Parses a Decrypt body; like [`parse_encrypt`] for errors.
pub fn parse_decrypt(
    body: &[u8],
    limits: &Limits,
) -> Result<DecryptRequest, (XksError, Option<Box<RequestMetadata>>)> {
    let raw: RawDecrypt = from_json(body).map_err(|e| (e, None))?;
    let metadata = metadata(raw.request_metadata, Needs::Crypto).map_err(|e| (e, None))?;
    let fields = || -> Result<_, XksError> {
        check_algorithm(raw.encryption_algorithm.as_deref())?;
        let ciphertext = raw
            .ciphertext
            .as_deref()
            .ok_or_else(|| missing("ciphertext"))?;
        let ciphertext = decode_bounded("ciphertext", ciphertext, limits.max_plaintext_bytes)?;
        if ciphertext.is_empty() {
            return Err(XksError::Validation("ciphertext must not be empty".into()));
        }
        let ciphertext_metadata = match raw.ciphertext_metadata.as_deref() {
            None => Vec::new(),
            Some(value) => decode_exact(
                "ciphertextMetadata",
                value,
                0..=MAX_CIPHERTEXT_METADATA,
                "at most 20 bytes",
            )?,
        };
        let aad = decode_optional_aad(raw.additional_authenticated_data.as_deref(), limits)?;
        let iv = raw
            .initialization_vector
            .as_deref()
            .ok_or_else(|| missing("initializationVector"))?;
        let iv = decode_exact("initializationVector", iv, IV_LEN..=16, "12 or 16 bytes")?;
        if iv.len() != IV_LEN && iv.len() != 16 {
            return Err(XksError::Validation(
                "initializationVector must be 12 or 16 bytes".into(),
            ));
        }
        let tag = raw
            .authentication_tag
            .as_deref()
            .ok_or_else(|| missing("authenticationTag"))?;
        let tag = decode_exact("authenticationTag", tag, TAG_LEN..=TAG_LEN, "16 bytes")?;
        let tag: [u8; TAG_LEN] = tag
            .try_into()
            .map_err(|_| XksError::Validation("authenticationTag must be 16 bytes".into()))?;
        Ok((ciphertext, ciphertext_metadata, aad, iv, tag))
    };
    match fields() {
        Ok((ciphertext, ciphertext_metadata, aad, iv, tag)) => Ok(DecryptRequest {
            metadata,
            ciphertext,
            ciphertext_metadata,
            aad,
            iv,
            tag,
        }),
        Err(e) => Err((e, Some(Box::new(metadata)))),
    }
}

fn missing(field: &str) -> XksError {
    XksError::Validation(format!("{field} is required"))
}

fn from_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, XksError> {
    // The whole body must be UTF-8 (RFC 8259), ignored fields included.
    let text = std::str::from_utf8(body)
        .map_err(|_| XksError::Validation("request body is not valid UTF-8".into()))?;
    serde_json::from_str(text).map_err(|e| {
        // serde's own text can quote client values; keep only what names our schema.
        let text = e.to_string();
        let message = if text.starts_with("duplicate field") {
            text.split(" at line")
                .next()
                .unwrap_or("duplicate field")
                .to_string()
        } else {
            match e.classify() {
                serde_json::error::Category::Data => {
                    "a field of the request body has the wrong JSON type".to_string()
                }
                _ => format!(
                    "request body is not valid JSON (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            }
        };
        XksError::Validation(message)
    })
}

fn metadata(raw: Option<RawMetadata>, needs: Needs) -> Result<RequestMetadata, XksError> {
    let raw = raw.ok_or_else(|| missing("requestMetadata"))?;
    let required = |value: Option<String>, name: &str| {
        value
            .filter(|v| !v.is_empty())
            .ok_or_else(|| missing(&format!("requestMetadata.{name}")))
    };
    let kms_request_id = required(raw.kms_request_id, "kmsRequestId")?;
    let kms_operation = required(raw.kms_operation, "kmsOperation")?;
    let (aws_principal_arn, kms_key_arn) = match needs {
        Needs::Health => (raw.aws_principal_arn, raw.kms_key_arn),
        Needs::KeyMetadata => (
            Some(required(raw.aws_principal_arn, "awsPrincipalArn")?),
            raw.kms_key_arn,
        ),
        Needs::Crypto => (
            Some(required(raw.aws_principal_arn, "awsPrincipalArn")?),
            Some(required(raw.kms_key_arn, "kmsKeyArn")?),
        ),
    };
    Ok(RequestMetadata {
        kms_request_id,
        kms_operation,
        aws_principal_arn,
        kms_key_arn,
        kms_via_service: raw.kms_via_service,
        aws_source_vpc: raw.aws_source_vpc,
        aws_source_vpce: raw.aws_source_vpce,
    })
}

fn check_algorithm(value: Option<&str>) -> Result<(), XksError> {
    match value {
        Some("AES_GCM") => Ok(()),
        None => Err(missing("encryptionAlgorithm")),
        Some(_) => Err(XksError::Validation(
            "encryptionAlgorithm must be AES_GCM".into(),
        )),
    }
}

/// Decodes a large field; above `max` decoded bytes the answer is 501, as the spec directs.
fn decode_bounded(field: &str, value: &str, max: usize) -> Result<Vec<u8>, XksError> {
    let too_large = || {
        XksError::UnsupportedOperation(format!(
            "{field} is larger than this proxy's limit of {max} bytes"
        ))
    };
    if value.len() > max.div_ceil(3) * 4 {
        return Err(too_large());
    }
    let bytes = BASE64
        .decode(value)
        .map_err(|_| XksError::Validation(format!("{field} is not valid Base64")))?;
    if bytes.len() > max {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Decodes a small field whose decoded length must lie in `allowed`.
fn decode_exact(
    field: &str,
    value: &str,
    allowed: std::ops::RangeInclusive<usize>,
    rule: &str,
) -> Result<Vec<u8>, XksError> {
    let wrong_length = || XksError::Validation(format!("{field} must be {rule}"));
    if value.len() > allowed.end().div_ceil(3) * 4 {
        return Err(wrong_length());
    }
    let bytes = BASE64
        .decode(value)
        .map_err(|_| XksError::Validation(format!("{field} is not valid Base64")))?;
    if !allowed.contains(&bytes.len()) {
        return Err(wrong_length());
    }
    Ok(bytes)
}

fn decode_optional_aad(value: Option<&str>, limits: &Limits) -> Result<Vec<u8>, XksError> {
    match value {
        None => Ok(Vec::new()),
        Some(value) => decode_bounded("additionalAuthenticatedData", value, limits.max_aad_bytes),
    }
}

/// Encodes bytes as the spec's standard, padded Base64.
pub fn base64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyMetadataResponse {
    pub key_spec: &'static str,
    pub key_usage: Vec<&'static str>,
    pub key_status: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptResponse {
    pub authentication_tag: String,
    pub ciphertext: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext_data_integrity_value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext_metadata: Option<String>,
    pub initialization_vector: String,
}

#[derive(Serialize)]
pub struct DecryptResponse {
    pub plaintext: Zeroizing<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthResponse {
    pub xks_proxy_fleet_size: u32,
    pub xks_proxy_vendor: &'static str,
    pub xks_proxy_model: String,
    pub ekm_vendor: String,
    pub ekm_fleet_details: Vec<EkmFleetMember>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EkmFleetMember {
    pub id: String,
    pub model: String,
    pub health_status: crate::keystore::EkmHealth,
}

/// KMS's XksProxyUriPath rule: `^(/[a-zA-Z0-9/_-]+/kms/xks/v\d{1,2})$|^(/kms/xks/v\d{1,2})$`, 10–128.
pub fn check_uri_path(path: &str) -> Result<(), String> {
    let rule = "must look like /kms/xks/v1 or /PREFIX/kms/xks/v1 (10 to 128 characters of a-z A-Z 0-9 / _ -)";
    if !(10..=128).contains(&path.len()) {
        return Err(format!("{path:?} {rule}"));
    }
    let Some((prefix, version)) = path.rsplit_once("/kms/xks/v") else {
        return Err(format!("{path:?} {rule}"));
    };
    let version_ok =
        (1..=2).contains(&version.len()) && version.bytes().all(|b| b.is_ascii_digit());
    let prefix_ok = prefix.is_empty()
        || (prefix.starts_with('/')
            && prefix.len() > 1
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-')));
    if version_ok && prefix_ok {
        Ok(())
    } else {
        Err(format!("{path:?} {rule}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_path_rule() {
        assert!(check_uri_path("/kms/xks/v1").is_ok());
        assert!(check_uri_path("/example/kms/xks/v1").is_ok());
        assert!(check_uri_path("/a/b_c-d/kms/xks/v12").is_ok());
        assert!(check_uri_path("/kms/xks/v").is_err());
        assert!(check_uri_path("/a b/kms/xks/v1").is_err());
        assert!(check_uri_path("example/kms/xks/v1").is_err());
        assert!(check_uri_path(&format!("/{}/kms/xks/v1", "a".repeat(120))).is_err());
    }

    fn limits() -> Limits {
        Limits::default()
    }

    const META: &str = r#""requestMetadata":{"awsPrincipalArn":"arn:aws:iam::123456789012:user/Alice","kmsKeyArn":"arn:aws:kms:us-east-2:123456789012:/key/1","kmsOperation":"Encrypt","kmsRequestId":"r1","kmsViaService":"ebs","futureField":{"x":[1,2,3]}}"#;

    fn encrypt_body(extra: &str) -> String {
        format!(
            r#"{{{META},"plaintext":"SGVsbG8gV29ybGQh","encryptionAlgorithm":"AES_GCM"{extra}}}"#
        )
    }

    fn encrypt_error(body: &str) -> XksError {
        match parse_encrypt(body.as_bytes(), &limits()) {
            Ok(_) => panic!("accepted {body}"),
            Err((e, _)) => e,
        }
    }

    #[test]
    fn spec_example_encrypt_parses() {
        let body = encrypt_body(
            r#","additionalAuthenticatedData":"cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n","ciphertextDataIntegrityValueAlgorithm":"SHA_256","unknownTopLevel":12345678901234567890123456789"#,
        );
        let request =
            parse_encrypt(body.as_bytes(), &limits()).unwrap_or_else(|(e, _)| panic!("{e}"));
        assert_eq!(request.plaintext.as_slice(), b"Hello World!");
        assert_eq!(request.aad, b"project=nile,department=marketing");
        assert!(request.want_cdiv);
        assert_eq!(request.metadata.kms_request_id, "r1");
    }

    #[test]
    fn health_needs_request_metadata() {
        for body in [
            "{}",
            r#"{"requestMetadata":{}}"#,
            "",
            "[]",
            "null",
            r#"{"requestMetadata":{"kmsRequestId":"x"}}"#,
        ] {
            let err = parse_health(body.as_bytes()).unwrap_err();
            assert_eq!(err.name(), "ValidationException", "{body}");
        }
        let ok = parse_health(
            br#"{"requestMetadata":{"kmsRequestId":"x","kmsOperation":"SomethingNew"}}"#,
        );
        assert_eq!(ok.unwrap().kms_operation, "SomethingNew");
    }

    #[test]
    fn key_metadata_requires_the_principal() {
        let err = parse_key_metadata(
            br#"{"requestMetadata":{"kmsRequestId":"x","kmsOperation":"CreateKey"}}"#,
        )
        .unwrap_err();
        assert_eq!(
            err,
            XksError::Validation("requestMetadata.awsPrincipalArn is required".into())
        );
    }

    #[test]
    fn encrypt_validation_errors() {
        let cases = [
            (
                encrypt_body("").replace(r#""plaintext":"SGVsbG8gV29ybGQh","#, ""),
                "plaintext is required",
            ),
            (
                encrypt_body("").replace("AES_GCM", "AES_CBC"),
                "encryptionAlgorithm must be AES_GCM",
            ),
            (
                encrypt_body("").replace("SGVsbG8gV29ybGQh", "not base64!"),
                "plaintext is not valid Base64",
            ),
            (
                encrypt_body("").replace("SGVsbG8gV29ybGQh", "SGVsbG8gV29ybGQ"),
                "plaintext is not valid Base64",
            ),
            (
                encrypt_body("").replace("SGVsbG8gV29ybGQh", ""),
                "plaintext must not be empty",
            ),
            (
                encrypt_body(r#","ciphertextDataIntegrityValueAlgorithm":"MD5""#),
                "ciphertextDataIntegrityValueAlgorithm must be SHA_256",
            ),
            (
                encrypt_body(r#","additionalAuthenticatedData":"***""#),
                "additionalAuthenticatedData is not valid Base64",
            ),
            (
                encrypt_body("").replace(
                    r#""kmsKeyArn":"arn:aws:kms:us-east-2:123456789012:/key/1","#,
                    "",
                ),
                "requestMetadata.kmsKeyArn is required",
            ),
            (
                encrypt_body(r#","plaintext":"AA==""#),
                "duplicate field `plaintext`",
            ),
            (
                encrypt_body("").replace(r#""SGVsbG8gV29ybGQh""#, "5"),
                "a field of the request body has the wrong JSON type",
            ),
        ];
        for (body, message) in cases {
            let err = encrypt_error(&body);
            assert_eq!(err, XksError::Validation(message.into()), "{body}");
        }
    }

    #[test]
    fn oversized_inputs_are_unsupported() {
        let big = BASE64.encode(vec![0u8; limits().max_plaintext_bytes + 1]);
        let body = encrypt_body("").replace("SGVsbG8gV29ybGQh", &big);
        assert_eq!(encrypt_error(&body).name(), "UnsupportedOperationException");
        let big_aad = BASE64.encode(vec![0u8; limits().max_aad_bytes + 1]);
        let body = encrypt_body(&format!(r#","additionalAuthenticatedData":"{big_aad}""#));
        assert_eq!(encrypt_error(&body).name(), "UnsupportedOperationException");
        // The spec minimums are accepted.
        let plaintext = BASE64.encode(vec![1u8; 4300]);
        let aad = BASE64.encode(vec![2u8; 8192]);
        let body = encrypt_body(&format!(r#","additionalAuthenticatedData":"{aad}""#))
            .replace("SGVsbG8gV29ybGQh", &plaintext);
        assert!(parse_encrypt(body.as_bytes(), &limits()).is_ok());
    }

    fn decrypt_body(iv: &str, tag: &str, metadata: &str) -> String {
        format!(
            r#"{{{META},"ciphertext":"ghxkK1txeDNn3q8Y","ciphertextMetadata":"{metadata}","encryptionAlgorithm":"AES_GCM","initializationVector":"{iv}","authenticationTag":"{tag}"}}"#
        )
    }

    #[test]
    fn decrypt_checks_iv_tag_and_metadata_lengths() {
        let ok = parse_decrypt(
            decrypt_body(
                "HMrlRw85cAJUd5Ax",
                "vBxN2ncH1oEkR8WVXpmyYQ==",
                "a2V5X3ZlcnNpb249MQ==",
            )
            .as_bytes(),
            &limits(),
        );
        let ok = ok.unwrap_or_else(|(e, _)| panic!("{e}"));
        assert_eq!(ok.ciphertext_metadata, b"key_version=1");
        let sixteen = BASE64.encode([0u8; 16]);
        assert!(
            parse_decrypt(
                decrypt_body(&sixteen, "vBxN2ncH1oEkR8WVXpmyYQ==", "AQ==").as_bytes(),
                &limits()
            )
            .is_ok()
        );
        let cases = [
            (
                BASE64.encode([0u8; 13]),
                "vBxN2ncH1oEkR8WVXpmyYQ==".to_string(),
                "AQ==".to_string(),
                "initializationVector must be 12 or 16 bytes",
            ),
            (
                "HMrlRw85cAJUd5Ax".into(),
                BASE64.encode([0u8; 15]),
                "AQ==".into(),
                "authenticationTag must be 16 bytes",
            ),
            (
                "HMrlRw85cAJUd5Ax".into(),
                "vBxN2ncH1oEkR8WVXpmyYQ==".into(),
                BASE64.encode([0u8; 21]),
                "ciphertextMetadata must be at most 20 bytes",
            ),
        ];
        for (iv, tag, metadata, message) in cases {
            let body = decrypt_body(&iv, &tag, &metadata);
            match parse_decrypt(body.as_bytes(), &limits()) {
                Ok(_) => panic!("accepted {body}"),
                Err((e, meta)) => {
                    assert_eq!(e, XksError::Validation(message.into()));
                    assert_eq!(meta.unwrap().kms_request_id, "r1");
                }
            }
        }
    }

    #[test]
    fn invalid_utf8_and_truncation_are_validation_errors() {
        let mut body = encrypt_body("").into_bytes();
        body.truncate(body.len() / 2);
        assert_eq!(
            parse_encrypt(&body, &limits()).err().unwrap().0.name(),
            "ValidationException"
        );
        let bad = [b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'];
        assert_eq!(
            parse_health(&bad).unwrap_err().name(),
            "ValidationException"
        );
    }

    #[test]
    fn logged_request_id_is_bounded() {
        let metadata = RequestMetadata {
            kms_request_id: "é".repeat(300),
            ..Default::default()
        };
        assert_eq!(metadata.loggable_request_id().chars().count(), 128);
    }
}
