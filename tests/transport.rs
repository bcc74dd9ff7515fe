//! Connections as ordinary clients use them, over real TLS with real SigV4 signatures written by
//! hand on the socket: keep-alive that lasts `idle_timeout_ms` between requests, an oversized body's
//! 501 that reaches a client that writes its whole body before reading, and connection slots that
//! idle or unauthenticated clients cannot keep from a signed client.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use xks_proxy::client::bodies;

/// Bounds every wait here (not a timing assertion: far above what each step needs).
const HANG_GUARD: Duration = Duration::from_secs(30);

/// An HTTP/1.1 request as bytes, signed by the library's client (aws-sigv4).
async fn signed_request(proxy: &TestProxy, suffix: &str, body: Vec<u8>) -> Vec<u8> {
    use http_body_util::BodyExt;
    let request = proxy.client().request(suffix, body).unwrap();
    let (parts, body) = request.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let mut head = format!("POST {} HTTP/1.1\r\n", parts.uri.path());
    head.push_str(&format!("host: localhost:{}\r\n", proxy.port));
    for (name, value) in &parts.headers {
        if name != http::header::HOST && name != http::header::CONTENT_LENGTH {
            head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
        }
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// Reads one HTTP/1.1 response (head and Content-Length body) and returns it as text.
async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        if let Some(end) = find(&received, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if received.len() >= end + 4 + length {
                return String::from_utf8_lossy(&received[..end + 4 + length]).into_owned();
            }
        }
        let n = tokio::time::timeout(HANG_GUARD, stream.read(&mut buffer))
            .await
            .expect("hang guard")
            .unwrap_or(0);
        if n == 0 {
            return String::from_utf8_lossy(&received).into_owned();
        }
        received.extend_from_slice(&buffer[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, request: &[u8]) -> String {
    stream.write_all(request).await.unwrap();
    stream.flush().await.unwrap();
    read_response(stream).await
}

/// A kept-alive connection idle for 12 s (more than `header_read_timeout_ms`, less than
/// `idle_timeout_ms`) still serves its next request; the slow-loris guard still closes a
/// connection whose first request never arrives.
#[tokio::test]
async fn keep_alive_lasts_idle_timeout_between_requests() {
    let proxy = TestProxy::start_with(ProxySpec {
        limits: "header_read_timeout_ms = 2000\nidle_timeout_ms = 60000".into(),
        ..ProxySpec::default()
    });
    let health = bodies::health().to_string().into_bytes();
    let mut connection = proxy.tls_connect(None).await.unwrap();
    let first = send(
        &mut connection,
        &signed_request(&proxy, "/health", health.clone()).await,
    )
    .await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let second = send(
        &mut connection,
        &signed_request(&proxy, "/health", health).await,
    )
    .await;
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "after 12 s idle: {second:?}"
    );

    // A connection that never sends a request is closed after header_read_timeout_ms.
    let mut silent = proxy.tls_connect(None).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(HANG_GUARD, silent.read(&mut byte))
        .await
        .expect("the proxy closes a connection whose first request never comes");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // And so is one whose next request head starts but never finishes.
    let mut slow = proxy.tls_connect(None).await.unwrap();
    let health = bodies::health().to_string().into_bytes();
    let reply = send(&mut slow, &signed_request(&proxy, "/health", health).await).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    slow.write_all(b"POST /example/kms/xks/v1/health HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    slow.flush().await.unwrap();
    let read = tokio::time::timeout(HANG_GUARD, slow.read(&mut byte))
        .await
        .expect("the proxy closes a connection whose request head never finishes");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

/// A client that writes its whole 1 MiB body before it reads (as Python's http.client does)
/// gets the 501, not a reset connection.
#[tokio::test]
async fn an_oversized_body_written_whole_before_reading_gets_its_501() {
    let proxy = TestProxy::start();
    for size in [100_000usize, 1024 * 1024, 3 * 1024 * 1024] {
        let mut connection = proxy.tls_connect(None).await.unwrap();
        let request = signed_request(&proxy, "/keys/foo/encrypt", vec![b' '; size]).await;
        let reply = send(&mut connection, &request).await;
        assert!(
            reply.starts_with("HTTP/1.1 501"),
            "{size} bytes: {:?}",
            &reply[..reply.len().min(200)]
        );
        assert!(reply.contains("UnsupportedOperationException"), "{reply}");
    }
}

/// Every connection slot taken by idle TCP connections, by TLS connections that never send a
/// request, and by clients that only ask `/ping`: a signed client is still served, because the
/// oldest idle or handshaking connection makes room.
#[tokio::test]
async fn idle_and_ping_only_clients_cannot_hold_every_slot() {
    let proxy = TestProxy::start_with(ProxySpec {
        // Every timeout far beyond the hang guard below: only eviction can make room in time.
        limits: "max_connections = 24\nheader_read_timeout_ms = 60000\nidle_timeout_ms = 120000\ntls_handshake_timeout_ms = 60000".into(),
        ..ProxySpec::default()
    });
    let mut hogs = Vec::new();
    for _ in 0..8 {
        hogs.push(
            tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
                .await
                .unwrap(),
        );
    }
    let mut tls_hogs = Vec::new();
    for _ in 0..8 {
        tls_hogs.push(proxy.tls_connect(None).await.unwrap());
    }
    let mut ping_hogs = Vec::new();
    for _ in 0..8 {
        let mut connection = proxy.tls_connect(None).await.unwrap();
        let ping = format!(
            "GET /ping HTTP/1.1\r\nhost: localhost:{}\r\n\r\n",
            proxy.port
        );
        let reply = send(&mut connection, ping.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        ping_hogs.push(connection);
    }
    // Every slot is now held by a client that is not using it.
    for round in 0..5 {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            proxy.client().call("/health", &bodies::health()),
        )
        .await
        .expect("a signed client is served while idle clients hold the slots")
        .unwrap();
        assert_eq!(reply.status, 200, "round {round}: {reply:?}");
    }
    drop((hogs, tls_hogs, ping_hogs));
}
