//! Shared pieces of the fuzz targets: a structured generator of XKS request bodies (valid fields,
//! wrong types, nulls, duplicates, huge numbers, bad Base64, raw tokens) so that the fuzzer reaches
//! the validation code behind the JSON parser, and the checks every error answer must pass.
#![allow(dead_code)]

use arbitrary::Arbitrary;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use xks_proxy::api::XksError;

/// One field's value in a generated body.
#[derive(Arbitrary, Debug, Clone)]
pub enum Field {
    /// The field is left out.
    Absent,
    /// A valid value for this field.
    Good,
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A decimal integer with `4 * n` digits (far outside every integer type).
    BigNumber(u8),
    /// `1e<n>`: overflows f64 for large `n`.
    Exponent(u16),
    Str(String),
    /// Standard Base64 of these bytes.
    Base64(Vec<u8>),
    /// Standard Base64 of `n` bytes (`n` up to 12 000): exercises the length rules.
    Base64Len(u16),
    /// URL-safe Base64 without padding.
    UrlSafe(Vec<u8>),
    /// Text inserted as it is, not quoted: may or may not be JSON.
    Raw(String),
    Array(Vec<i8>),
    Object(Vec<(String, i8)>),
    /// A JSON string with escapes: lone surrogates, NUL, control characters.
    Escaped(Vec<EscapeUnit>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum EscapeUnit {
    Char(char),
    Unicode(u16),
    Nul,
    Backslash,
}

/// Values the generator uses for [`Field::Good`].
#[derive(Debug, Clone)]
pub struct Goods {
    pub plaintext: String,
    pub aad: String,
    pub ciphertext: String,
    pub ciphertext_metadata: String,
    pub iv: String,
    pub tag: String,
}

impl Default for Goods {
    fn default() -> Self {
        Self {
            plaintext: "SGVsbG8gV29ybGQh".into(),
            aad: "cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n".into(),
            ciphertext: "ghxkK1txeDNn3q8Y".into(),
            ciphertext_metadata: "a2V5X3ZlcnNpb249MQ==".into(),
            iv: "HMrlRw85cAJUd5Ax".into(),
            tag: "vBxN2ncH1oEkR8WVXpmyYQ==".into(),
        }
    }
}

/// The fields of every operation's body, with their own generated values.
#[derive(Arbitrary, Debug, Clone)]
pub struct BodySpec {
    pub request_metadata: MetadataSpec,
    pub plaintext: Field,
    pub encryption_algorithm: Field,
    pub additional_authenticated_data: Field,
    pub cdiv_algorithm: Field,
    pub ciphertext: Field,
    pub ciphertext_metadata: Field,
    pub initialization_vector: Field,
    pub authentication_tag: Field,
    /// Unknown fields (must be ignored).
    pub extra: Vec<(String, Field)>,
    /// Repeat the n-th emitted top-level field (a duplicate key).
    pub duplicate: Option<u8>,
    /// Cut the rendered text to this many bytes (truncated bodies).
    pub truncate: Option<u16>,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum MetadataSpec {
    Absent,
    NotAnObject(Field),
    Object {
        aws_principal_arn: Field,
        kms_key_arn: Field,
        kms_operation: Field,
        kms_request_id: Field,
        kms_via_service: Field,
        aws_source_vpc: Field,
        extra: Vec<(String, Field)>,
        duplicate: Option<u8>,
    },
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

impl Field {
    /// The JSON text of this value; `good` is the valid text for the field (already quoted).
    pub fn render(&self, good: &str) -> Option<String> {
        Some(match self {
            Field::Absent => return None,
            Field::Good => good.to_owned(),
            Field::Null => "null".into(),
            Field::Bool(b) => b.to_string(),
            Field::Int(i) => i.to_string(),
            Field::Float(f) => serde_json::to_string(f).unwrap_or_else(|_| "0.5".into()),
            Field::BigNumber(n) => format!("1{}", "0".repeat(usize::from(*n) * 4)),
            Field::Exponent(n) => format!("1e{n}"),
            Field::Str(s) => quote(s),
            Field::Base64(bytes) => quote(&STANDARD.encode(bytes)),
            Field::Base64Len(n) => quote(&STANDARD.encode(vec![0x5au8; usize::from(*n % 12_000)])),
            Field::UrlSafe(bytes) => {
                quote(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
            }
            Field::Raw(s) => s.clone(),
            Field::Array(items) => serde_json::to_string(items).unwrap_or_default(),
            Field::Object(pairs) => {
                let map: serde_json::Map<String, serde_json::Value> = pairs
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::from(*v)))
                    .collect();
                serde_json::Value::Object(map).to_string()
            }
            Field::Escaped(units) => {
                let mut out = String::from("\"");
                for unit in units {
                    match unit {
                        EscapeUnit::Char(c) if *c == '"' || *c == '\\' || (*c as u32) < 0x20 => {
                            out.push_str(&format!("\\u{:04x}", *c as u32))
                        }
                        EscapeUnit::Char(c) => out.push(*c),
                        EscapeUnit::Unicode(u) => out.push_str(&format!("\\u{u:04x}")),
                        EscapeUnit::Nul => out.push_str("\\u0000"),
                        EscapeUnit::Backslash => out.push_str("\\\\"),
                    }
                }
                out.push('"');
                out
            }
        })
    }
}

fn object(pairs: &[(String, String)], duplicate: Option<u8>) -> String {
    let mut items: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}:{v}", quote(k)))
        .collect();
    if let Some(n) = duplicate
        && !items.is_empty()
    {
        let again = items[usize::from(n) % items.len()].clone();
        items.push(again);
    }
    format!("{{{}}}", items.join(","))
}

fn push(pairs: &mut Vec<(String, String)>, name: &str, field: &Field, good: &str) {
    if let Some(value) = field.render(good) {
        pairs.push((name.to_owned(), value));
    }
}

impl BodySpec {
    /// The body's bytes.
    pub fn render(&self, goods: &Goods) -> Vec<u8> {
        let mut pairs = Vec::new();
        match &self.request_metadata {
            MetadataSpec::Absent => {}
            MetadataSpec::NotAnObject(field) => {
                push(&mut pairs, "requestMetadata", field, "{}");
            }
            MetadataSpec::Object {
                aws_principal_arn,
                kms_key_arn,
                kms_operation,
                kms_request_id,
                kms_via_service,
                aws_source_vpc,
                extra,
                duplicate,
            } => {
                let mut meta = Vec::new();
                push(
                    &mut meta,
                    "awsPrincipalArn",
                    aws_principal_arn,
                    "\"arn:aws:iam::123456789012:user/Alice\"",
                );
                push(
                    &mut meta,
                    "kmsKeyArn",
                    kms_key_arn,
                    "\"arn:aws:kms:us-east-1:123456789012:key/k\"",
                );
                push(&mut meta, "kmsOperation", kms_operation, "\"Encrypt\"");
                push(&mut meta, "kmsRequestId", kms_request_id, "\"r-1\"");
                push(&mut meta, "kmsViaService", kms_via_service, "\"ebs\"");
                push(&mut meta, "awsSourceVpc", aws_source_vpc, "\"vpc-1\"");
                for (name, field) in extra.iter().take(4) {
                    push(&mut meta, name, field, "1");
                }
                pairs.push(("requestMetadata".into(), object(&meta, *duplicate)));
            }
        }
        let q = quote;
        push(
            &mut pairs,
            "plaintext",
            &self.plaintext,
            &q(&goods.plaintext),
        );
        push(
            &mut pairs,
            "encryptionAlgorithm",
            &self.encryption_algorithm,
            "\"AES_GCM\"",
        );
        push(
            &mut pairs,
            "additionalAuthenticatedData",
            &self.additional_authenticated_data,
            &q(&goods.aad),
        );
        push(
            &mut pairs,
            "ciphertextDataIntegrityValueAlgorithm",
            &self.cdiv_algorithm,
            "\"SHA_256\"",
        );
        push(
            &mut pairs,
            "ciphertext",
            &self.ciphertext,
            &q(&goods.ciphertext),
        );
        push(
            &mut pairs,
            "ciphertextMetadata",
            &self.ciphertext_metadata,
            &q(&goods.ciphertext_metadata),
        );
        push(
            &mut pairs,
            "initializationVector",
            &self.initialization_vector,
            &q(&goods.iv),
        );
        push(
            &mut pairs,
            "authenticationTag",
            &self.authentication_tag,
            &q(&goods.tag),
        );
        for (name, field) in self.extra.iter().take(4) {
            push(&mut pairs, name, field, "1");
        }
        let mut text = object(&pairs, self.duplicate).into_bytes();
        if let Some(n) = self.truncate {
            text.truncate(usize::from(n));
        }
        text
    }
}

/// An error answer's message must be printable ASCII and shorter than 512 characters (spec §5.1).
pub fn check_message(error: &XksError) {
    let message = error.message();
    assert!(
        message.len() < 512,
        "errorMessage too long: {}",
        message.len()
    );
    assert!(
        message.bytes().all(|b| (0x20..=0x7e).contains(&b)),
        "errorMessage not printable ASCII: {message:?}"
    );
}

/// A parser may only answer ValidationException (400) or, for inputs above the configured
/// maximums, UnsupportedOperationException (501).
pub fn check_parse_error(error: &XksError, allow_unsupported: bool) {
    check_message(error);
    match error.name() {
        "ValidationException" => assert_eq!(error.status().as_u16(), 400),
        "UnsupportedOperationException" if allow_unsupported => {
            assert_eq!(error.status().as_u16(), 501)
        }
        other => panic!("a parser answered {other}: {error:?}"),
    }
}
