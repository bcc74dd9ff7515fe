//! SigV4 verification of XKS requests (spec §2.1, Appendix A).
//!
//! Verification has two steps, so that everything the headers decide is settled first:
//! [`SigV4Verifier::check_headers`] parses the `Authorization` header, looks the access key id up
//! among this key store's credentials, checks the credential scope (service `kms-xks-proxy`, this
//! key store's Region, the date of `X-Amz-Date`) and the ±5 minute clock window, and builds the
//! canonical request from the request's own `SignedHeaders`; [`PendingSignature::verify`] then adds
//! the SHA-256 of the exact body bytes and compares signatures in constant time. `aws-sigv4`
//! derives the signing key and computes the signature.
//!
//! Failures carry a reason for the log; the client only ever learns "authentication failed". No
//! signature, secret or signing key is ever logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sigv4::sign::v4::{calculate_signature, generate_signing_key};
use http::HeaderMap;
use http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::credentials::{Credential, Secret};

/// The SigV4 service name KMS signs XKS requests with.
pub const SERVICE: &str = "kms-xks-proxy";
const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// How far a request's `X-Amz-Date` may be from this host's clock.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Why a request failed authentication. Logged, never sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing Authorization header")]
    MissingAuthorization,
    #[error("malformed Authorization header: {0}")]
    MalformedAuthorization(&'static str),
    #[error("missing or malformed X-Amz-Date header")]
    BadDate,
    #[error("request time is more than 5 minutes from this host's clock")]
    StaleDate,
    #[error("unknown access key id")]
    UnknownAccessKey,
    #[error("credential scope names another date, region or service")]
    WrongScope,
    #[error("signed header {0} is missing from the request")]
    MissingSignedHeader(String),
    #[error("signature does not match")]
    SignatureMismatch,
}

/// Verifies requests for one key store: its Region and its credentials (several during rotation).
pub struct SigV4Verifier {
    region: String,
    secrets: HashMap<String, Secret>,
    /// Derived signing keys by (access key id, date): four HMACs saved per request. Bounded: it
    /// is emptied when it would grow past [`SIGNING_KEY_CACHE`] entries.
    signing_keys: Mutex<HashMap<(String, String), SigningKey>>,
}

/// At most this many cached signing keys (credentials times the dates inside the clock window).
const SIGNING_KEY_CACHE: usize = 64;

type SigningKey = Arc<Zeroizing<Vec<u8>>>;

/// A request whose headers passed; the body decides.
pub struct PendingSignature {
    access_key_id: String,
    signing_key: SigningKey,
    amz_date: String,
    scope: String,
    /// The canonical request up to and including the signed-headers line and its newline.
    canonical_head: Vec<u8>,
    signature: String,
}

struct AuthorizationHeader<'a> {
    access_key_id: &'a str,
    scope_date: &'a str,
    scope_region: &'a str,
    scope_service: &'a str,
    scope_terminator: &'a str,
    signed_headers: &'a str,
    signature: &'a str,
}

impl SigV4Verifier {
    pub fn new(region: &str, credentials: &[Credential]) -> Self {
        Self {
            region: region.to_owned(),
            secrets: credentials
                .iter()
                .map(|c| (c.access_key_id.clone(), c.secret_access_key.clone()))
                .collect(),
            signing_keys: Mutex::new(HashMap::new()),
        }
    }

    /// Everything that can be checked before the body arrives.
    pub fn check_headers(
        &self,
        parts: &Parts,
        now: SystemTime,
    ) -> Result<PendingSignature, AuthError> {
        let authorization = single_header(&parts.headers, "authorization")
            .map_err(|_| AuthError::MalformedAuthorization("repeated"))?
            .ok_or(AuthError::MissingAuthorization)?;
        let authorization = std::str::from_utf8(authorization)
            .map_err(|_| AuthError::MalformedAuthorization("not ASCII"))?;
        let auth = parse_authorization(authorization)?;

        let amz_date = single_header(&parts.headers, "x-amz-date")
            .ok()
            .flatten()
            .and_then(|v| std::str::from_utf8(v).ok())
            .ok_or(AuthError::BadDate)?;
        let time = parse_amz_date(amz_date).ok_or(AuthError::BadDate)?;
        let skew = now
            .duration_since(time)
            .or_else(|_| time.duration_since(now))
            .unwrap_or(Duration::MAX);
        if skew > MAX_CLOCK_SKEW {
            return Err(AuthError::StaleDate);
        }

        let secret = self
            .secrets
            .get(auth.access_key_id)
            .ok_or(AuthError::UnknownAccessKey)?;
        if auth.scope_date != &amz_date[..8]
            || auth.scope_region != self.region
            || auth.scope_service != SERVICE
            || auth.scope_terminator != "aws4_request"
        {
            return Err(AuthError::WrongScope);
        }

        let canonical_head = canonical_head(parts, auth.signed_headers)?;
        Ok(PendingSignature {
            access_key_id: auth.access_key_id.to_owned(),
            signing_key: self.signing_key(auth.access_key_id, auth.scope_date, secret, time),
            amz_date: amz_date.to_owned(),
            scope: format!(
                "{}/{}/{}/aws4_request",
                auth.scope_date, auth.scope_region, SERVICE
            ),
            canonical_head,
            signature: auth.signature.to_owned(),
        })
    }
}

impl SigV4Verifier {
    /// The signing key for this credential and day, derived once and then cached.
    fn signing_key(
        &self,
        access_key_id: &str,
        date: &str,
        secret: &Secret,
        time: SystemTime,
    ) -> SigningKey {
        let cache_key = (access_key_id.to_owned(), date.to_owned());
        if let Ok(cache) = self.signing_keys.lock()
            && let Some(key) = cache.get(&cache_key)
        {
            return Arc::clone(key);
        }
        let derived = generate_signing_key(secret.expose(), time, &self.region, SERVICE);
        let key: SigningKey = Arc::new(Zeroizing::new(derived.as_ref().to_vec()));
        if let Ok(mut cache) = self.signing_keys.lock() {
            if cache.len() >= SIGNING_KEY_CACHE {
                cache.clear();
            }
            cache.insert(cache_key, Arc::clone(&key));
        }
        key
    }
}

impl PendingSignature {
    /// The access key id the request claims (already known to this key store).
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// Completes the canonical request with the body's hash and compares signatures.
    pub fn verify(self, body: &[u8]) -> Result<(), AuthError> {
        let mut canonical = self.canonical_head;
        canonical.extend_from_slice(hex::encode(Sha256::digest(body)).as_bytes());
        let string_to_sign = format!(
            "{ALGORITHM}\n{}\n{}\n{}",
            self.amz_date,
            self.scope,
            hex::encode(Sha256::digest(&canonical))
        );
        let expected = calculate_signature(self.signing_key.as_slice(), string_to_sign.as_bytes());
        let matches = expected.len() == self.signature.len()
            && bool::from(expected.as_bytes().ct_eq(self.signature.as_bytes()));
        if matches {
            Ok(())
        } else {
            Err(AuthError::SignatureMismatch)
        }
    }
}

/// The value of a header that must appear at most once.
fn single_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a [u8]>, ()> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(());
    }
    Ok(first.map(|v| v.as_bytes()))
}

fn parse_authorization(value: &str) -> Result<AuthorizationHeader<'_>, AuthError> {
    let malformed = AuthError::MalformedAuthorization;
    let rest = value
        .strip_prefix(ALGORITHM)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or(malformed("algorithm is not AWS4-HMAC-SHA256"))?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (name, value) = part
            .trim()
            .split_once('=')
            .ok_or(malformed("component without '='"))?;
        let slot = match name {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => return Err(malformed("unknown component")),
        };
        if slot.replace(value).is_some() {
            return Err(malformed("repeated component"));
        }
    }
    let credential = credential.ok_or(malformed("no Credential"))?;
    let signed_headers = signed_headers.ok_or(malformed("no SignedHeaders"))?;
    let signature = signature.ok_or(malformed("no Signature"))?;
    let mut scope = credential.split('/');
    let mut next = || {
        scope
            .next()
            .ok_or(malformed("Credential has too few parts"))
    };
    let header = AuthorizationHeader {
        access_key_id: next()?,
        scope_date: next()?,
        scope_region: next()?,
        scope_service: next()?,
        scope_terminator: next()?,
        signed_headers,
        signature,
    };
    if scope.next().is_some() {
        return Err(malformed("Credential has too many parts"));
    }
    Ok(header)
}

/// `YYYYMMDD'T'HHMMSS'Z'` to a point in time.
fn parse_amz_date(value: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let parsed = time::PrimitiveDateTime::parse(value, format).ok()?;
    Some(parsed.assume_utc().into())
}

/// `POST\n<uri>\n<query>\n<canonical headers>\n<signed headers>\n`: everything but the body hash.
fn canonical_head(parts: &Parts, signed_headers: &str) -> Result<Vec<u8>, AuthError> {
    let names: Vec<&str> = signed_headers.split(';').collect();
    let well_formed = names.iter().all(|n| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase())
    }) && names.windows(2).all(|w| w[0] < w[1]);
    if !well_formed {
        return Err(AuthError::MalformedAuthorization(
            "SignedHeaders is not a sorted list of lower-case names",
        ));
    }
    if !names.contains(&"host") || !names.contains(&"x-amz-date") {
        return Err(AuthError::MalformedAuthorization(
            "SignedHeaders must include host and x-amz-date",
        ));
    }

    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b'\n');
    encode_path(parts.uri.path(), &mut out);
    out.push(b'\n');
    canonical_query(parts.uri.query().unwrap_or(""), &mut out);
    out.push(b'\n');
    for name in &names {
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        let mut values = parts.headers.get_all(*name).iter().peekable();
        if values.peek().is_none() {
            // HTTP/2 carries the host in the :authority pseudo-header.
            let authority = (*name == "host")
                .then(|| parts.uri.authority())
                .flatten()
                .ok_or_else(|| AuthError::MissingSignedHeader((*name).to_owned()))?;
            out.extend_from_slice(authority.as_str().as_bytes());
        }
        let mut first = true;
        for value in values {
            if !first {
                out.push(b',');
            }
            first = false;
            push_trimmed(value.as_bytes(), &mut out);
        }
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(signed_headers.as_bytes());
    out.push(b'\n');
    Ok(out)
}

/// Trims a header value and collapses inner runs of spaces to one (SigV4 canonical form).
fn push_trimmed(value: &[u8], out: &mut Vec<u8>) {
    let mut pending_space = false;
    let mut started = false;
    for &b in value {
        if b == b' ' || b == b'\t' {
            pending_space = started;
            continue;
        }
        if pending_space {
            out.push(b' ');
            pending_space = false;
        }
        started = true;
        out.push(b);
    }
}

/// The path as AWS signers canonicalize it for services other than S3: dot segments resolved and
/// empty segments dropped (RFC 3986 §5.2.4, as the SDKs' signers do), a trailing slash kept, then
/// every byte URI-encoded except unreserved characters and `/` (a `%` becomes `%25`).
fn encode_path(path: &str, out: &mut Vec<u8>) {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    let mut normalized = String::with_capacity(path.len() + 1);
    for segment in &segments {
        normalized.push('/');
        normalized.push_str(segment);
    }
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    if normalized.is_empty() || (trailing && !normalized.ends_with('/')) {
        normalized.push('/');
    }
    for &b in normalized.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
}

/// Sorted `name=value` pairs, as sent (XKS never uses a query string; this keeps a signed one valid).
fn canonical_query(query: &str, out: &mut Vec<u8>) {
    if query.is_empty() {
        return;
    }
    let mut pairs: Vec<(&str, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    pairs.sort_unstable();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        out.extend_from_slice(value.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kms_header_form() {
        let header = "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLEAA/20240101/us-east-1/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature=abcd";
        let parsed = parse_authorization(header).unwrap();
        assert_eq!(parsed.access_key_id, "AKIAIOSFODNN7EXAMPLEAA");
        assert_eq!(parsed.scope_date, "20240101");
        assert_eq!(parsed.scope_region, "us-east-1");
        assert_eq!(parsed.scope_service, "kms-xks-proxy");
        assert_eq!(parsed.signed_headers, "host;x-amz-date");
        assert_eq!(parsed.signature, "abcd");
    }

    #[test]
    fn rejects_malformed_headers() {
        for bad in [
            "",
            "AWS4-HMAC-SHA1 Credential=a/b/c/d/e, SignedHeaders=host, Signature=x",
            "AWS4-HMAC-SHA256 Credential=a/b/c/d, SignedHeaders=host, Signature=x",
            "AWS4-HMAC-SHA256 Credential=a/b/c/d/e/f, SignedHeaders=host, Signature=x",
            "AWS4-HMAC-SHA256 Credential=a/b/c/d/e, Signature=x",
            "AWS4-HMAC-SHA256 Credential=a/b/c/d/e, SignedHeaders=host, Signature=x, Signature=y",
            "AWS4-HMAC-SHA256 Credential",
        ] {
            assert!(parse_authorization(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn amz_date_parses_utc() {
        let t = parse_amz_date("20240101T000000Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_704_067_200
        );
        assert!(parse_amz_date("2024-01-01T00:00:00Z").is_none());
        assert!(parse_amz_date("20241301T000000Z").is_none());
    }

    #[test]
    fn header_values_are_trimmed_and_collapsed() {
        let mut out = Vec::new();
        push_trimmed(b"  a   b  c ", &mut out);
        assert_eq!(out, b"a b c");
    }

    #[test]
    fn path_encoding_keeps_unreserved() {
        let mut out = Vec::new();
        encode_path("/ex/kms/xks/v1/keys/a-b.c_d~/encrypt", &mut out);
        assert_eq!(out, b"/ex/kms/xks/v1/keys/a-b.c_d~/encrypt");
        let mut out = Vec::new();
        encode_path("/a b/%", &mut out);
        assert_eq!(out, b"/a%20b/%25");
        for (raw, canonical) in [
            ("/p/kms/xks/v1/keys/./encrypt", "/p/kms/xks/v1/keys/encrypt"),
            ("/p/kms/xks/v1/keys/../encrypt", "/p/kms/xks/v1/encrypt"),
            ("/a//b/", "/a/b/"),
            ("/..", "/"),
            ("", "/"),
        ] {
            let mut out = Vec::new();
            encode_path(raw, &mut out);
            assert_eq!(out, canonical.as_bytes(), "{raw}");
        }
    }
}
