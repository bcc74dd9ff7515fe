//! The request parsers of the four operations on arbitrary bytes and on structured bodies.
//!
//! Properties: no panic; only UTF-8 bodies are accepted; every error is ValidationException (400)
//! or, for inputs above the configured maximums, UnsupportedOperationException (501), with a
//! printable message under 512 characters; every accepted request satisfies the spec's field
//! rules, and its decoded bytes are exactly what the body's Base64 says.
#![no_main]

mod common;

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use xks_proxy::api::types::{
    RequestMetadata, parse_decrypt, parse_encrypt, parse_health, parse_key_metadata,
};
use xks_proxy::limits::Limits;

use common::{BodySpec, Goods, check_parse_error};

fn check_metadata(m: &RequestMetadata, crypto: bool, principal: bool) {
    assert!(!m.kms_request_id.is_empty() && !m.kms_operation.is_empty());
    if principal {
        assert!(
            m.aws_principal_arn
                .as_deref()
                .is_some_and(|v| !v.is_empty())
        );
    }
    if crypto {
        assert!(m.kms_key_arn.as_deref().is_some_and(|v| !v.is_empty()));
    }
    assert!(m.loggable_request_id().chars().count() <= 128);
}

/// Checks that an accepted Base64 field decodes to `decoded` as the JSON text says it (an absent
/// field decodes to nothing). Skipped when `serde_json::Value` cannot hold the body (an ignored
/// number beyond f64, which the typed parser skips without converting).
fn check_field(value: &Option<Value>, name: &str, decoded: &[u8]) {
    let Some(value) = value else {
        return;
    };
    let from_text = match value.get(name) {
        // serde reads `null` for an optional field as absent.
        None | Some(Value::Null) => Vec::new(),
        Some(field) => STANDARD
            .decode(field.as_str().expect("an accepted field is a string"))
            .expect("an accepted field is valid Base64"),
    };
    assert_eq!(from_text, decoded, "{name}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let structured;
    let body: &[u8] = if selector & 0x80 != 0 {
        let Ok(spec) = BodySpec::arbitrary_take_rest(Unstructured::new(rest)) else {
            return;
        };
        structured = spec.render(&Goods::default());
        &structured
    } else {
        rest
    };
    let limits = Limits::default();
    let value = serde_json::from_slice::<Value>(body).ok();
    let utf8 = std::str::from_utf8(body).is_ok();
    match selector & 3 {
        0 => match parse_health(body) {
            Ok(m) => {
                assert!(utf8, "accepted a body that is not UTF-8");
                check_metadata(&m, false, false);
            }
            Err(e) => check_parse_error(&e, false),
        },
        1 => match parse_key_metadata(body) {
            Ok(m) => {
                assert!(utf8, "accepted a body that is not UTF-8");
                check_metadata(&m, false, true);
            }
            Err(e) => check_parse_error(&e, false),
        },
        2 => match parse_encrypt(body, &limits) {
            Ok(r) => {
                assert!(utf8, "accepted a body that is not UTF-8");
                check_metadata(&r.metadata, true, true);
                assert!(!r.plaintext.is_empty() && r.plaintext.len() <= limits.max_plaintext_bytes);
                assert!(r.aad.len() <= limits.max_aad_bytes);
                check_field(&value, "plaintext", &r.plaintext);
                check_field(&value, "additionalAuthenticatedData", &r.aad);
            }
            Err((e, meta)) => {
                check_parse_error(&e, true);
                if let Some(m) = meta {
                    check_metadata(&m, true, true);
                }
            }
        },
        _ => match parse_decrypt(body, &limits) {
            Ok(r) => {
                assert!(utf8, "accepted a body that is not UTF-8");
                check_metadata(&r.metadata, true, true);
                assert!(
                    !r.ciphertext.is_empty() && r.ciphertext.len() <= limits.max_plaintext_bytes
                );
                assert!(r.iv.len() == 12 || r.iv.len() == 16);
                assert!(r.ciphertext_metadata.len() <= 20);
                assert!(r.aad.len() <= limits.max_aad_bytes);
                check_field(&value, "ciphertext", &r.ciphertext);
                check_field(&value, "initializationVector", &r.iv);
                check_field(&value, "authenticationTag", &r.tag);
                check_field(&value, "ciphertextMetadata", &r.ciphertext_metadata);
            }
            Err((e, meta)) => {
                check_parse_error(&e, true);
                if let Some(m) = meta {
                    check_metadata(&m, true, true);
                }
            }
        },
    }
});
