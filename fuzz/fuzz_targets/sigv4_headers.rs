//! SigV4 verification of fuzzed requests: method, path, query, headers, a raw or structured
//! `Authorization` header, `X-Amz-Date` near or far from the verifier's clock, and a body.
//!
//! Properties: no panic; nothing is ever accepted (the fuzzer does not know the secret, so every
//! request that passes `check_headers` must fail `verify`); a request that passes `check_headers`
//! names a configured access key id.
#![no_main]

mod common;

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::Arbitrary;
use http::{HeaderName, HeaderValue, Method, Request};
use libfuzzer_sys::fuzz_target;
use xks_proxy::auth::SigV4Verifier;
use xks_proxy::auth::Credential;

const REGION: &str = "us-east-1";
const URI_PATH: &str = "/example/kms/xks/v1";

/// 2025-06-15T16:53:20Z: the verifier's clock.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_006_400)
}

struct Setup {
    verifier: SigV4Verifier,
    access_key_id: String,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let credential = Credential::generate().expect("random credential");
        let rotated = Credential::generate().expect("random credential");
        Setup {
            verifier: SigV4Verifier::new(REGION, &[credential.clone(), rotated]),
            access_key_id: credential.access_key_id,
        }
    })
}

#[derive(Arbitrary, Debug)]
enum MethodChoice {
    Post,
    Get,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum PathChoice {
    Health,
    Key(String, u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum DateChoice {
    Absent,
    /// Seconds from the verifier's clock, scaled: most land inside the 5-minute window.
    Offset(i16),
    Raw(String),
    Twice(i16),
}

#[derive(Arbitrary, Debug)]
enum AuthChoice {
    Absent,
    Raw(Vec<u8>),
    Structured {
        algorithm: Option<String>,
        known_key: bool,
        access_key_id: String,
        date: Option<String>,
        region: Option<String>,
        service: Option<String>,
        terminator: Option<String>,
        signed_headers: Option<Vec<String>>,
        signature: SignatureChoice,
        separator: Separator,
        twice: bool,
    },
}

#[derive(Arbitrary, Debug)]
enum SignatureChoice {
    Hex([u8; 32]),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Separator {
    CommaSpace,
    Comma,
    CommaSpaces,
}

#[derive(Arbitrary, Debug)]
struct Input {
    method: MethodChoice,
    path: PathChoice,
    query: Option<String>,
    date: DateChoice,
    authorization: AuthChoice,
    host: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn amz_date(offset: i16) -> String {
    let seconds = i64::from(offset) * 2;
    let t = if seconds >= 0 {
        now() + Duration::from_secs(seconds as u64)
    } else {
        now() - Duration::from_secs(seconds.unsigned_abs())
    };
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fuzz_target!(|input: Input| {
    let setup = setup();
    let method = match &input.method {
        MethodChoice::Post => Method::POST,
        MethodChoice::Get => Method::GET,
        MethodChoice::Other(m) => match Method::from_bytes(m.as_bytes()) {
            Ok(m) => m,
            Err(_) => return,
        },
    };
    let mut uri = match &input.path {
        PathChoice::Health => format!("{URI_PATH}/health"),
        PathChoice::Key(id, op) => {
            let op = ["metadata", "encrypt", "decrypt"][usize::from(*op % 3)];
            format!("{URI_PATH}/keys/{id}/{op}")
        }
        PathChoice::Raw(p) => p.clone(),
    };
    if let Some(q) = &input.query {
        uri.push('?');
        uri.push_str(q);
    }
    let Ok(request) = Request::builder().method(method).uri(uri).body(()) else {
        return;
    };
    let (mut parts, ()) = request.into_parts();
    let headers = &mut parts.headers;

    let date = match &input.date {
        DateChoice::Absent => None,
        DateChoice::Offset(o) | DateChoice::Twice(o) => Some(amz_date(*o)),
        DateChoice::Raw(s) => Some(s.clone()),
    };
    if let Some(d) = &date
        && let Ok(v) = HeaderValue::from_str(d)
    {
        headers.append("x-amz-date", v.clone());
        if matches!(input.date, DateChoice::Twice(_)) {
            headers.append("x-amz-date", v);
        }
    }
    if let Some(h) = &input.host
        && let Ok(v) = HeaderValue::from_bytes(h)
    {
        headers.append("host", v);
    }
    for (name, value) in input.headers.iter().take(8) {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    match &input.authorization {
        AuthChoice::Absent => {}
        AuthChoice::Raw(bytes) => {
            if let Ok(v) = HeaderValue::from_bytes(bytes) {
                headers.append("authorization", v);
            }
        }
        AuthChoice::Structured {
            algorithm,
            known_key,
            access_key_id,
            date: scope_date,
            region,
            service,
            terminator,
            signed_headers,
            signature,
            separator,
            twice,
        } => {
            let algorithm = algorithm.as_deref().unwrap_or("AWS4-HMAC-SHA256");
            let key = if *known_key {
                setup.access_key_id.as_str()
            } else {
                access_key_id.as_str()
            };
            let default_date = date
                .as_deref()
                .and_then(|d| d.get(..8))
                .unwrap_or("20250615");
            let scope = format!(
                "{key}/{}/{}/{}/{}",
                scope_date.as_deref().unwrap_or(default_date),
                region.as_deref().unwrap_or(REGION),
                service.as_deref().unwrap_or("kms-xks-proxy"),
                terminator.as_deref().unwrap_or("aws4_request"),
            );
            let signed = match signed_headers {
                None => "host;x-amz-date".to_owned(),
                Some(names) => names.join(";"),
            };
            let signature = match signature {
                SignatureChoice::Hex(bytes) => hex(bytes),
                SignatureChoice::Raw(s) => s.clone(),
            };
            let sep = match separator {
                Separator::CommaSpace => ", ",
                Separator::Comma => ",",
                Separator::CommaSpaces => " ,  ",
            };
            let value = format!(
                "{algorithm} Credential={scope}{sep}SignedHeaders={signed}{sep}Signature={signature}"
            );
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.append("authorization", v.clone());
                if *twice {
                    headers.append("authorization", v);
                }
            }
        }
    }

    if let Ok(pending) = setup.verifier.check_headers(&parts, now()) {
        assert_eq!(pending.access_key_id(), setup.access_key_id);
        let result = pending.verify(&input.body);
        assert!(
            result.is_err(),
            "a request signed without the secret was accepted"
        );
    }
});
