//! Property tests of everything a client's bytes reach before the key manager: the request
//! parsers (`api::types`) and the spec's byte layouts (`crypto`). Bounded case counts, so the whole
//! file runs in a few seconds; `PROPTEST_CASES` raises them for a longer run. The coverage-guided
//! fuzz targets in `fuzz/` check the same properties without a bound.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use xks_proxy::api::XksError;
use xks_proxy::api::types::{parse_decrypt, parse_encrypt, parse_health, parse_key_metadata};
use xks_proxy::crypto::{MAX_CIPHERTEXT_METADATA, cdiv, key_manager_aad};
use xks_proxy::limits::Limits;

fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn limits() -> Limits {
    Limits::default()
}

/// The only errors a parser may give: 400 ValidationException, or 501
/// UnsupportedOperationException for inputs above the configured maximums; with a printable ASCII
/// message under 512 characters.
fn assert_parse_error(error: &XksError, allow_unsupported: bool) {
    let ok_name = match error.name() {
        "ValidationException" => error.status() == 400,
        "UnsupportedOperationException" => allow_unsupported && error.status() == 501,
        _ => false,
    };
    assert!(ok_name, "a parser answered {error:?}");
    let message = error.message();
    assert!(message.len() < 512 && message.bytes().all(|b| (0x20..=0x7e).contains(&b)));
}

/// Runs all four parsers; none may panic, every error must be a spec error.
fn parse_all(body: &[u8]) {
    let limits = limits();
    if let Err(e) = parse_health(body) {
        assert_parse_error(&e, false);
    }
    if let Err(e) = parse_key_metadata(body) {
        assert_parse_error(&e, false);
    }
    if let Err((e, _)) = parse_encrypt(body, &limits) {
        assert_parse_error(&e, true);
    }
    if let Err((e, _)) = parse_decrypt(body, &limits) {
        assert_parse_error(&e, true);
    }
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::from),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(|b| Value::from(STANDARD.encode(b))),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(field_name(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names: mostly the schema's own, so values land where the validation looks.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "requestMetadata",
            "kmsRequestId",
            "kmsOperation",
            "awsPrincipalArn",
            "kmsKeyArn",
            "kmsViaService",
            "plaintext",
            "ciphertext",
            "ciphertextMetadata",
            "encryptionAlgorithm",
            "additionalAuthenticatedData",
            "ciphertextDataIntegrityValueAlgorithm",
            "initializationVector",
            "authenticationTag",
        ])
        .prop_map(String::from),
        1 => "[a-zA-Z]{1,8}",
    ]
}

fn metadata() -> impl Strategy<Value = Value> {
    (
        ".{1,40}",
        ".{1,40}",
        ".{1,60}",
        ".{1,80}",
        prop::option::of(".{0,10}"),
    )
        .prop_map(|(id, op, principal, arn, via)| {
            let mut m = json!({
                "kmsRequestId": id, "kmsOperation": op,
                "awsPrincipalArn": principal, "kmsKeyArn": arn,
            });
            if let Some(via) = via {
                m["kmsViaService"] = via.into();
            }
            m
        })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn parsers_never_panic_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..600)) {
        parse_all(&body);
    }

    #[test]
    fn parsers_never_panic_on_json_prefixed_bytes(
        prefix in prop::sample::select(vec![
            "{", "{\"requestMetadata\":", "{\"requestMetadata\":{\"kmsRequestId\":", "[", "\"",
            "{\"plaintext\":\"", "{\"initializationVector\":",
        ]),
        tail in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut body = prefix.as_bytes().to_vec();
        body.extend_from_slice(&tail);
        parse_all(&body);
    }

    #[test]
    fn parsers_never_panic_on_arbitrary_json(value in json_value()) {
        parse_all(value.to_string().as_bytes());
    }

    #[test]
    fn arbitrary_values_in_every_field_give_spec_errors(
        meta in metadata(),
        fields in prop::collection::btree_map(field_name(), json_value(), 0..8),
    ) {
        let mut body = json!({ "requestMetadata": meta, "encryptionAlgorithm": "AES_GCM" });
        for (name, value) in fields {
            body[name] = value;
        }
        parse_all(body.to_string().as_bytes());
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn valid_encrypt_bodies_parse_and_round_trip(
        meta in metadata(),
        plaintext in prop::collection::vec(any::<u8>(), 1..=Limits::default().max_plaintext_bytes),
        aad in prop::option::of(prop::collection::vec(any::<u8>(), 0..=Limits::default().max_aad_bytes)),
        cdiv_wanted in any::<bool>(),
        unknown in prop::option::of(json_value()),
    ) {
        let mut body = json!({
            "requestMetadata": meta,
            "plaintext": STANDARD.encode(&plaintext),
            "encryptionAlgorithm": "AES_GCM",
        });
        if let Some(aad) = &aad {
            body["additionalAuthenticatedData"] = STANDARD.encode(aad).into();
        }
        if cdiv_wanted {
            body["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256".into();
        }
        if let Some(unknown) = unknown {
            body["someFutureField"] = unknown;
        }
        let parsed = parse_encrypt(body.to_string().as_bytes(), &limits())
            .unwrap_or_else(|(e, _)| panic!("refused a valid body: {e:?}"));
        prop_assert_eq!(parsed.plaintext.as_slice(), plaintext.as_slice());
        prop_assert_eq!(parsed.aad, aad.unwrap_or_default());
        prop_assert_eq!(parsed.want_cdiv, cdiv_wanted);
        prop_assert_eq!(&parsed.metadata.kms_request_id, meta["kmsRequestId"].as_str().unwrap());
    }

    #[test]
    fn valid_decrypt_bodies_parse_and_round_trip(
        meta in metadata(),
        ciphertext in prop::collection::vec(any::<u8>(), 1..=Limits::default().max_plaintext_bytes),
        iv_len in prop::sample::select(vec![12usize, 16]),
        iv_byte in any::<u8>(),
        tag in any::<[u8; 16]>(),
        metadata_bytes in prop::option::of(prop::collection::vec(any::<u8>(), 0..=MAX_CIPHERTEXT_METADATA)),
        aad in prop::option::of(prop::collection::vec(any::<u8>(), 0..=Limits::default().max_aad_bytes)),
    ) {
        let iv = vec![iv_byte; iv_len];
        let mut body = json!({
            "requestMetadata": meta,
            "ciphertext": STANDARD.encode(&ciphertext),
            "encryptionAlgorithm": "AES_GCM",
            "initializationVector": STANDARD.encode(&iv),
            "authenticationTag": STANDARD.encode(tag),
        });
        if let Some(m) = &metadata_bytes {
            body["ciphertextMetadata"] = STANDARD.encode(m).into();
        }
        if let Some(aad) = &aad {
            body["additionalAuthenticatedData"] = STANDARD.encode(aad).into();
        }
        let parsed = parse_decrypt(body.to_string().as_bytes(), &limits())
            .unwrap_or_else(|(e, _)| panic!("refused a valid body: {e:?}"));
        prop_assert_eq!(parsed.ciphertext, ciphertext);
        prop_assert_eq!(parsed.iv, iv);
        prop_assert_eq!(parsed.tag, tag);
        prop_assert_eq!(parsed.ciphertext_metadata, metadata_bytes.unwrap_or_default());
        prop_assert_eq!(parsed.aad, aad.unwrap_or_default());
    }

    #[test]
    fn wrong_lengths_are_validation_errors(
        iv_len in (0usize..64).prop_filter("not 12 or 16", |n| *n != 12 && *n != 16),
        tag_len in (0usize..64).prop_filter("not 16", |n| *n != 16),
        metadata_len in (MAX_CIPHERTEXT_METADATA + 1)..200,
        which in 0..3u8,
    ) {
        let mut body = json!({
            "requestMetadata": {"kmsRequestId": "r", "kmsOperation": "Decrypt",
                "awsPrincipalArn": "p", "kmsKeyArn": "k"},
            "ciphertext": STANDARD.encode(b"ciphertext"),
            "encryptionAlgorithm": "AES_GCM",
            "initializationVector": STANDARD.encode([0u8; 12]),
            "authenticationTag": STANDARD.encode([0u8; 16]),
        });
        match which {
            0 => body["initializationVector"] = STANDARD.encode(vec![1u8; iv_len]).into(),
            1 => body["authenticationTag"] = STANDARD.encode(vec![1u8; tag_len]).into(),
            _ => body["ciphertextMetadata"] = STANDARD.encode(vec![1u8; metadata_len]).into(),
        }
        let (error, meta) = parse_decrypt(body.to_string().as_bytes(), &limits())
            .err()
            .expect("a wrong length is refused");
        prop_assert_eq!(error.name(), "ValidationException");
        prop_assert_eq!(error.status().as_u16(), 400);
        // The metadata was valid, so the failure can be logged with its request id.
        prop_assert_eq!(meta.map(|m| m.kms_request_id), Some("r".to_string()));
    }

    #[test]
    fn bad_base64_is_a_validation_error(
        field in prop::sample::select(vec![
            "plaintext", "additionalAuthenticatedData",
        ]),
        bytes in prop::collection::vec(any::<u8>(), 1..64),
        corruption in 0..4u8,
        at in any::<prop::sample::Index>(),
    ) {
        let good = STANDARD.encode(&bytes);
        let bad = match corruption {
            // A character outside the standard alphabet.
            0 => {
                let mut chars: Vec<char> = good.chars().collect();
                let i = at.index(chars.len());
                chars[i] = '*';
                chars.into_iter().collect::<String>()
            }
            // URL-safe alphabet where it differs (or a '-' if it does not).
            1 => {
                let url = base64::engine::general_purpose::URL_SAFE.encode(&bytes);
                if url == good { format!("-{}", &good[1..]) } else { url }
            }
            // Padding removed or a character dropped.
            2 => if good.ends_with('=') { good.trim_end_matches('=').to_string() } else { good[..good.len() - 1].to_string() },
            // Whitespace inside.
            _ => format!("{} {}", &good[..good.len() / 2], &good[good.len() / 2..]),
        };
        let mut body = json!({
            "requestMetadata": {"kmsRequestId": "r", "kmsOperation": "Encrypt",
                "awsPrincipalArn": "p", "kmsKeyArn": "k"},
            "plaintext": STANDARD.encode(b"x"),
            "encryptionAlgorithm": "AES_GCM",
        });
        body[field] = bad.clone().into();
        let error = parse_encrypt(body.to_string().as_bytes(), &limits())
            .err()
            .map(|(e, _)| e)
            .unwrap_or_else(|| panic!("accepted {bad:?}"));
        prop_assert_eq!(error.name(), "ValidationException");
    }

    #[test]
    fn inputs_above_the_limits_are_unsupported_operation(
        extra in 1usize..64,
        field in prop::sample::select(vec!["plaintext", "additionalAuthenticatedData"]),
    ) {
        let limits = limits();
        let max = if field == "plaintext" { limits.max_plaintext_bytes } else { limits.max_aad_bytes };
        let mut body = json!({
            "requestMetadata": {"kmsRequestId": "r", "kmsOperation": "Encrypt",
                "awsPrincipalArn": "p", "kmsKeyArn": "k"},
            "plaintext": STANDARD.encode(b"x"),
            "encryptionAlgorithm": "AES_GCM",
        });
        body[field] = STANDARD.encode(vec![7u8; max + extra]).into();
        let (error, _) = parse_encrypt(body.to_string().as_bytes(), &limits).err().unwrap();
        prop_assert_eq!(error.name(), "UnsupportedOperationException");
        prop_assert_eq!(error.status().as_u16(), 501);
    }

    #[test]
    fn duplicate_fields_are_validation_errors(
        field in prop::sample::select(vec![
            "requestMetadata", "plaintext", "encryptionAlgorithm", "additionalAuthenticatedData",
        ]),
    ) {
        let body = json!({
            "requestMetadata": {"kmsRequestId": "r", "kmsOperation": "Encrypt",
                "awsPrincipalArn": "p", "kmsKeyArn": "k"},
            "plaintext": STANDARD.encode(b"x"),
            "encryptionAlgorithm": "AES_GCM",
            "additionalAuthenticatedData": STANDARD.encode(b"a"),
        });
        let text = body.to_string();
        let repeated = format!("{},{}:{}}}", &text[..text.len() - 1], json!(field), body[field]);
        let (error, _) = parse_encrypt(repeated.as_bytes(), &limits()).err().expect("refused");
        prop_assert_eq!(error.name(), "ValidationException");
    }
}

/// Decodes a key-manager AAD back into (AAD, metadata).
fn decode_layout(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::from(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]));
    let aad = bytes.get(2..2 + len)?;
    let meta_len = usize::from(*bytes.get(2 + len)?);
    let meta = bytes.get(3 + len..)?;
    (meta.len() == meta_len).then_some((aad, meta))
}

fn aad_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..8),
        prop::collection::vec(any::<u8>(), 0..=Limits::MAX_AAD_BYTES),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn aad_layout_is_the_spec_layout_and_decodes_back(
        aad in aad_bytes(),
        meta in prop::collection::vec(any::<u8>(), 0..=MAX_CIPHERTEXT_METADATA),
    ) {
        let layout = key_manager_aad(&aad, &meta);
        prop_assert_eq!(layout.len(), 3 + aad.len() + meta.len());
        prop_assert_eq!(&layout[..2], &(aad.len() as u16).to_be_bytes());
        prop_assert_eq!(decode_layout(&layout), Some((aad.as_slice(), meta.as_slice())));
    }

    #[test]
    fn aad_layout_is_injective(
        a in prop::collection::vec(0u8..3, 0..6),
        m in prop::collection::vec(0u8..3, 0..4),
        b in prop::collection::vec(0u8..3, 0..6),
        n in prop::collection::vec(0u8..3, 0..4),
    ) {
        // Small alphabets and lengths, so equal concatenations with different splits are common.
        prop_assert_eq!(key_manager_aad(&a, &m) == key_manager_aad(&b, &n), a == b && m == n);
    }

    #[test]
    fn moving_bytes_between_aad_and_metadata_changes_the_layout(
        aad in prop::collection::vec(any::<u8>(), 0..64),
        meta in prop::collection::vec(any::<u8>(), 1..=MAX_CIPHERTEXT_METADATA),
        k in any::<prop::sample::Index>(),
    ) {
        let k = k.index(meta.len()) + 1;
        let mut joined = aad.clone();
        joined.extend_from_slice(&meta[..k]);
        prop_assert_ne!(key_manager_aad(&aad, &meta), key_manager_aad(&joined, &meta[k..]));
    }

    #[test]
    fn cdiv_is_sha256_of_the_concatenation(
        aad in prop::collection::vec(any::<u8>(), 0..300),
        meta in prop::collection::vec(any::<u8>(), 0..=MAX_CIPHERTEXT_METADATA),
        iv in prop::collection::vec(any::<u8>(), 12..=16),
        ciphertext in prop::collection::vec(any::<u8>(), 1..300),
        tag in any::<[u8; 16]>(),
    ) {
        let mut all = Vec::new();
        for part in [&aad[..], &meta, &iv, &ciphertext, &tag] {
            all.extend_from_slice(part);
        }
        let value = cdiv(&aad, &meta, &iv, &ciphertext, &tag);
        let expected = Sha256::digest(&all);
        prop_assert_eq!(value.as_slice(), expected.as_slice());
    }
}

const NOT_UTF8: [&[u8]; 4] = [&[0xff], &[0xc3, 0x28], &[0xed, 0xa0, 0x80], &[0xe2, 0x82]];

/// Every body `before || bad bytes || after` must be refused with ValidationException.
fn assert_not_utf8_refused(places: &[(&str, &str)]) {
    for (before, after) in places {
        for bad in NOT_UTF8 {
            let mut body = before.as_bytes().to_vec();
            body.extend_from_slice(bad);
            body.extend_from_slice(after.as_bytes());
            let result = parse_health(&body);
            assert!(
                matches!(&result, Err(e) if e.name() == "ValidationException"),
                "{:?}: {:?}",
                String::from_utf8_lossy(&body),
                result.map(|m| m.kms_request_id)
            );
        }
    }
}

/// README: a body that is not UTF-8 is a ValidationException.
#[test]
fn invalid_utf8_in_a_field_the_proxy_reads_is_a_validation_error() {
    assert_not_utf8_refused(&[
        (
            r#"{"requestMetadata":{"kmsRequestId":"a"#,
            r#"","kmsOperation":"x"}}"#,
        ),
        (
            r#"{"requestMetadata":{"kmsRequestId":"a","kmsOperation":""#,
            r#""}}"#,
        ),
    ]);
}

/// The same where the bad bytes sit in a field the proxy ignores: serde_json skips ignored
/// strings without checking their UTF-8, so such a body is accepted.
#[test]
fn invalid_utf8_in_an_ignored_field_is_a_validation_error() {
    assert_not_utf8_refused(&[
        (
            r#"{"requestMetadata":{"kmsRequestId":"a","kmsOperation":"x","unknownField":""#,
            r#""}}"#,
        ),
        (
            r#"{"requestMetadata":{"kmsRequestId":"a","kmsOperation":"x"},"unknownTop":""#,
            r#""}"#,
        ),
    ]);
}
