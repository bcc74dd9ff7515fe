//! Differential SigV4 check: KMS-shaped requests signed by `aws-sigv4`'s request signer (the AWS
//! SDKs' signer, through `XksClient::sign`) with fuzzed key ids (".." included), paths with dot
//! and empty segments, extra signed headers, bodies and clock offsets inside the 5-minute window
//! must be accepted by the proxy's verifier; the same
//! request with one thing changed after signing (body, a signed header, the path, the date) must
//! be refused.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::Arbitrary;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::Full;
use libfuzzer_sys::fuzz_target;
use xks_proxy::auth::SigV4Verifier;
use xks_proxy::client::{ClientSettings, XksClient};
use xks_proxy::auth::Credential;

const REGION: &str = "us-east-1";
const URI_PATH: &str = "/example/kms/xks/v1";

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_006_400)
}

struct Setup {
    verifier: SigV4Verifier,
    client: XksClient,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let credential = Credential::generate().expect("random credential");
        let ca = xks_proxy::dev::DevCa::generate("fuzz CA").expect("CA");
        let ca_file = std::env::temp_dir().join(format!("xks-fuzz-ca-{}.pem", std::process::id()));
        std::fs::write(&ca_file, ca.cert_pem()).expect("write CA");
        let client = XksClient::new(ClientSettings {
            endpoint: "https://localhost:8443".into(),
            ca_file,
            client_cert: None,
            access_key_id: credential.access_key_id.clone(),
            secret_access_key: credential.secret_access_key.clone(),
            region: REGION.into(),
            uri_path: URI_PATH.into(),
        })
        .expect("client");
        Setup {
            verifier: SigV4Verifier::new(REGION, &[credential]),
            client,
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Tamper {
    Body(u16, u8),
    Header(u8),
    Path,
    Date,
    Method,
}

#[derive(Arbitrary, Debug)]
struct Input {
    key_id: Vec<u8>,
    operation: u8,
    /// Signing time relative to the verifier's clock, in seconds: clamped inside ±299.
    offset: i16,
    content_type: bool,
    /// Extra signed headers: a name from a small set (so names repeat) and a printable value.
    headers: Vec<(u8, Vec<u8>)>,
    body: Vec<u8>,
    tamper: Tamper,
}

const KEY_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._";
const HEADER_NAMES: [&str; 5] = [
    "x-amz-target",
    "x-custom",
    "user-agent-ish",
    "accept",
    "x-a",
];

fn build(input: &Input, time: SystemTime) -> Option<Request<Full<Bytes>>> {
    let key: String = input
        .key_id
        .iter()
        .take(128)
        .map(|b| KEY_CHARS[usize::from(*b) % KEY_CHARS.len()] as char)
        .collect();
    let path = match input.operation % 5 {
        0 => format!("{URI_PATH}/health"),
        // Any path of dots, slashes and letters under the key store: the verifier must
        // canonicalize it (dot segments, empty segments) exactly as aws-sigv4 does.
        4 => {
            let tail: String = input
                .key_id
                .iter()
                .take(64)
                .map(|b| b"ab./"[usize::from(*b) % 4] as char)
                .collect();
            format!("{URI_PATH}/{tail}")
        }
        1 if !key.is_empty() => format!("{URI_PATH}/keys/{key}/metadata"),
        2 if !key.is_empty() => format!("{URI_PATH}/keys/{key}/encrypt"),
        _ if !key.is_empty() => format!("{URI_PATH}/keys/{key}/decrypt"),
        _ => format!("{URI_PATH}/health"),
    };
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(&path)
        .header("host", "localhost:8443");
    if input.content_type {
        builder = builder.header("content-type", "application/json");
    }
    let mut request = builder.body(Full::new(Bytes::new())).ok()?;
    for (name, value) in input.headers.iter().take(6) {
        let name = HEADER_NAMES[usize::from(*name) % HEADER_NAMES.len()];
        // Printable ASCII, no leading/trailing or repeated spaces: what KMS's signer sends.
        let value: String = value.iter().map(|b| (b'!' + b % 94) as char).collect();
        if value.is_empty() {
            continue;
        }
        request.headers_mut().append(
            HeaderName::from_static(name),
            HeaderValue::from_str(&value).ok()?,
        );
    }
    setup()
        .client
        .sign(&mut request, &input.body, time)
        .expect("aws-sigv4 signs");
    *request.body_mut() = Full::new(Bytes::from(input.body.clone()));
    Some(request)
}

fn verify(request: &Request<Full<Bytes>>, body: &[u8]) -> bool {
    let mut copy = Request::new(());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    let (parts, ()) = copy.into_parts();
    match setup().verifier.check_headers(&parts, now()) {
        Ok(pending) => pending.verify(body).is_ok(),
        Err(_) => false,
    }
}

fuzz_target!(|input: Input| {
    let offset = i64::from(input.offset) % 300;
    let time = if offset >= 0 {
        now() + Duration::from_secs(offset as u64)
    } else {
        now() - Duration::from_secs(offset.unsigned_abs())
    };
    let Some(request) = build(&input, time) else {
        return;
    };
    assert!(
        verify(&request, &input.body),
        "a request signed by aws-sigv4 was refused: {request:?}"
    );

    let mut tampered = request;
    let mut body = input.body.clone();
    match input.tamper {
        Tamper::Body(at, bit) => {
            if body.is_empty() {
                body.push(b' ');
            } else {
                let at = usize::from(at) % body.len();
                body[at] ^= 1 << (bit % 8);
            }
        }
        Tamper::Header(which) => {
            let signed: Vec<HeaderName> = tampered
                .headers()
                .keys()
                .filter(|n| *n != "authorization")
                .cloned()
                .collect();
            let name = &signed[usize::from(which) % signed.len()];
            let old = tampered.headers()[name].as_bytes().to_vec();
            let mut new = old.clone();
            new.push(b'x');
            tampered
                .headers_mut()
                .insert(name.clone(), HeaderValue::from_bytes(&new).expect("value"));
        }
        Tamper::Path => {
            let path = format!("{}x", tampered.uri().path());
            *tampered.uri_mut() = path.parse().expect("path");
        }
        Tamper::Date => {
            let date = tampered.headers()["x-amz-date"]
                .to_str()
                .expect("date")
                .to_owned();
            let mut bytes = date.into_bytes();
            // Change the seconds' last digit (stays a valid date).
            let i = bytes.len() - 2;
            bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
            tampered
                .headers_mut()
                .insert("x-amz-date", HeaderValue::from_bytes(&bytes).expect("date"));
        }
        Tamper::Method => *tampered.method_mut() = Method::PUT,
    }
    assert!(
        !verify(&tampered, &body),
        "a request changed after signing was accepted ({:?})",
        input.tamper
    );
});
