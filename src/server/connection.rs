//! One connection's life, from the accepted socket to its close.
//!
//! - **Handshake** within `tls_handshake_timeout_ms` (1 s by default); a failed one lingers a
//!   moment so that the client reads the alert.
//! - **Serving**: HTTP/1.1 with keep-alive, or HTTP/2 (ALPN), with hyper. At most
//!   `max_in_flight_requests` requests are answered at once over all connections; the rest get
//!   429 at once ([`RequestSlot`]). `/ping` and requests refused by authentication or routing
//!   (401, 403, 404, 405) do not keep an HTTP/1.1 connection alive.
//! - **Idle rules** ([`Activity`]), checked a few times a second: the first request must arrive
//!   within `header_read_timeout_ms` of the handshake; a request head that has begun to arrive
//!   must be complete within `header_read_timeout_ms` (the slow-loris guard); between requests a
//!   connection may sit idle for `idle_timeout_ms`. (hyper's own header timer is not used: it also
//!   runs while a kept-alive connection waits for its next request.)
//! - **Eviction**: when every connection slot is taken, the accept loop asks the connection that
//!   has been idle (or handshaking) longest to close ([`Registry::evict_one`]).
//! - **Lingering close** ([`Watched`]): when hyper closes a connection, our side is shut down
//!   first (the response and a close are on their way), then what the client still sends is read
//!   and dropped, for at most [`LINGER_TIME`] and [`LINGER_BYTES`], so that a client that writes a
//!   whole oversized body before reading gets its 501 instead of a reset.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_rustls::TlsAcceptor;

use super::{Live, admission};
use crate::api::{ConnectionInfo, Refusal};
use crate::limits::Limits;
use crate::metrics::HandshakeOutcome;

/// How long a closing connection keeps reading what the client still sends.
pub(super) const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much a closing connection reads and drops at most.
pub(super) const LINGER_BYTES: usize = 4 * 1024 * 1024;

/// What is known of one open connection, for the idle rules and eviction.
pub(super) struct Activity {
    opened: Instant,
    handshaken: AtomicBool,
    in_flight: AtomicUsize,
    served: AtomicU64,
    /// Milliseconds after `opened` when the last request finished.
    last_end_ms: AtomicU64,
    /// Milliseconds after `opened` (+1) when bytes of the next request head began to arrive; 0
    /// while none have.
    head_started_ms: AtomicU64,
    /// Whether bytes between requests start a request head (HTTP/1.1; HTTP/2 also sends
    /// frames of its own between requests).
    tracks_heads: AtomicBool,
    /// Set by eviction: the connection closes at its next check.
    evict: Notify,
    /// The admission decision for the request whose head is arriving (HTTP/1.1).
    admitted: Mutex<Option<admission::Permit>>,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            handshaken: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            last_end_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            tracks_heads: AtomicBool::new(false),
            evict: Notify::new(),
            admitted: Mutex::new(None),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Marks a request in flight until the returned guard drops (also when hyper drops the
    /// request future, as on an HTTP/2 stream reset).
    /// Also returns when the request's head began to arrive, and its admission decision.
    fn begin(self: &Arc<Self>) -> (InFlight, Option<Instant>, Option<admission::Permit>) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let head_started = self.head_started_ms.swap(0, Ordering::Relaxed);
        let head_started =
            (head_started != 0).then(|| self.opened + Duration::from_millis(head_started - 1));
        let admitted = self.admitted.lock().ok().and_then(|mut a| a.take());
        (InFlight(Arc::clone(self)), head_started, admitted)
    }

    /// Whether the request whose head arrives next has its admission decided.
    fn has_admission(&self) -> bool {
        self.admitted.lock().is_ok_and(|a| a.is_some())
    }

    fn set_admission(&self, permit: admission::Permit) {
        if let Ok(mut admitted) = self.admitted.lock() {
            *admitted = Some(permit);
        }
    }

    fn end(&self) {
        self.last_end_ms.store(self.now_ms(), Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Bytes arrived: between requests, they are the start of the next request head.
    fn bytes_arrived(&self) {
        if self.tracks_heads.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started_ms.load(Ordering::Relaxed) == 0
        {
            self.head_started_ms
                .store(self.now_ms() + 1, Ordering::Relaxed);
        }
    }

    /// Whether the connection broke an idle rule (see the module doc).
    fn idle_too_long(&self, header_read_timeout: Duration, idle_timeout: Duration) -> bool {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return false;
        }
        let now = self.now_ms();
        let head_started = self.head_started_ms.load(Ordering::Relaxed);
        let header_ms = header_read_timeout.as_millis() as u64;
        if head_started != 0 && now.saturating_sub(head_started - 1) > header_ms {
            return true; // a head that does not finish
        }
        if self.served.load(Ordering::Relaxed) == 0 {
            now > header_ms
        } else {
            now.saturating_sub(self.last_end_ms.load(Ordering::Relaxed))
                > idle_timeout.as_millis() as u64
        }
    }

    /// When the connection last did something, if it is idle now (handshaking counts as idle).
    fn idle_since(&self) -> Option<u64> {
        if self.in_flight.load(Ordering::Relaxed) > 0
            || (self.handshaken.load(Ordering::Relaxed)
                && self.head_started_ms.load(Ordering::Relaxed) != 0)
        {
            return None;
        }
        Some(self.last_end_ms.load(Ordering::Relaxed))
    }
}

/// One request of a connection in flight; ends it on drop.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A request admitted under `max_in_flight_requests`; its place is given back on drop.
struct RequestSlot(Arc<AtomicUsize>);

impl RequestSlot {
    /// A place among `limit` requests in flight, if one is free. The limit is read from the
    /// configuration each time, so a reload changes it at once.
    fn take(in_flight: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
        in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| RequestSlot(Arc::clone(in_flight)))
    }
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The open connections, for eviction when every slot is taken.
#[derive(Default)]
pub(super) struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
}

impl Registry {
    fn add(self: &Arc<Self>, activity: Arc<Activity>) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, activity);
        }
        Registered(Arc::clone(self), id)
    }

    /// Asks the connection idle (or handshaking) the longest to close. Returns whether there was
    /// one.
    pub(super) fn evict_one(&self) -> bool {
        let Ok(open) = self.open.lock() else {
            return false;
        };
        // The one whose last activity (relative to process time) is oldest.
        let oldest = open
            .values()
            .filter_map(|a| {
                a.idle_since()
                    .map(|since| (a.opened + Duration::from_millis(since), a))
            })
            .min_by_key(|(at, _)| *at);
        match oldest {
            Some((_, activity)) => {
                activity.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// A connection's place in the [`Registry`]; removed on drop.
struct Registered(Arc<Registry>, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut open) = self.0.open.lock() {
            open.remove(&self.1);
        }
    }
}

/// The socket as hyper sees it: records when request bytes arrive, holds the first bytes of an
/// HTTP/1.1 request head back until the request is admitted ([`admission`]), and lingers on close.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    /// HTTP/1.1 connections only.
    gate: Option<Gate>,
    /// Set once our side is shut down: reading and dropping until then.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    lingered: usize,
}

/// A connection's side of admission control: the bytes read while its request waits for a
/// permit, and how long it has waited.
struct Gate {
    admission: Arc<admission::Admission>,
    permits: tokio_util::sync::PollSemaphore,
    held: Vec<u8>,
    /// Held bytes remain to be handed over after the decision.
    released: bool,
    waiting: Option<(Pin<Box<tokio::time::Sleep>>, admission::Waiting)>,
}

impl<S: AsyncRead + Unpin> Watched<S> {
    /// Reads from the socket, noting the start of a request head.
    fn read_inner(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_arrived();
        }
        read
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let Some(gate) = this.gate.as_mut() else {
            return this.read_inner(cx, buf);
        };
        if gate.released {
            // The admitted (or refused) head's first bytes, then the socket again.
            let n = gate.held.len().min(buf.remaining());
            buf.put_slice(&gate.held[..n]);
            gate.held.drain(..n);
            gate.released = !gate.held.is_empty();
            return Poll::Ready(Ok(()));
        }
        let between_requests =
            this.activity.in_flight.load(Ordering::Relaxed) == 0 && !this.activity.has_admission();
        if !between_requests {
            return this.read_inner(cx, buf);
        }
        if gate.held.is_empty() {
            // A permit is asked for only once the first byte of a head has come.
            let mut scratch = [0u8; 4096];
            let mut first = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut first) {
                Poll::Ready(Ok(())) if first.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    this.activity.bytes_arrived();
                    gate.held.extend_from_slice(first.filled());
                }
                other => return other,
            }
        }
        let decided = match gate.permits.poll_acquire(cx) {
            Poll::Ready(permit) => gate.admission.admit(permit),
            Poll::Pending => {
                let (timer, _) = gate.waiting.get_or_insert_with(|| {
                    (
                        Box::pin(tokio::time::sleep(admission::QUEUE_WAIT)),
                        gate.admission.waiting(),
                    )
                });
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // Waited long enough: read it anyway, to be refused at once.
                gate.admission.admit(None)
            }
        };
        gate.waiting = None;
        this.activity.set_admission(decided);
        let n = gate.held.len().min(buf.remaining());
        buf.put_slice(&gate.held[..n]);
        gate.held.drain(..n);
        gate.released = !gate.held.is_empty();
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// Shuts our side down, then reads and drops what the client still sends (lingering close).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER_TIME)));
        }
        let mut scratch = [0u8; 8192];
        loop {
            if let Some(linger) = this.linger.as_mut()
                && linger.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Ok(()));
            }
            if this.lingered >= LINGER_BYTES {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => this.lingered += buf.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Status codes after which an HTTP/1.1 connection is not kept alive: the client failed
/// authentication or asked for something that is not there.
fn closes_connection(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 401 | 403 | 404 | 405)
}

/// Serves one accepted connection until it closes: handshake, requests, idle rules, eviction.
pub(super) async fn serve(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    live: Arc<Live>,
    watcher: Watcher,
    slot: OwnedSemaphorePermit,
) {
    let _slot = slot;
    let activity = Arc::new(Activity::new());
    let _registered = live.connections.add(Arc::clone(&activity));
    let _open = live.metrics.connection_opened();
    let limits = live.api.load().limits().clone();
    let acceptor = TlsAcceptor::from(live.tls.load_full());
    let accept = acceptor.accept(tcp).into_fallible();
    let stream = tokio::select! {
        accepted = tokio::time::timeout(limits.tls_handshake_timeout(), accept) => match accepted {
            Ok(Ok(stream)) => {
                live.metrics.handshake(HandshakeOutcome::Ok);
                stream
            }
            Ok(Err((error, tcp))) => {
                live.metrics.handshake(HandshakeOutcome::Failed);
                tracing::debug!(%peer, %error, "TLS handshake failed");
                linger_after_alert(tcp).await;
                return;
            }
            Err(_) => {
                live.metrics.handshake(HandshakeOutcome::Timeout);
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
        () = activity.evict.notified() => {
            live.metrics.handshake(HandshakeOutcome::Evicted);
            tracing::debug!(%peer, "evicted while handshaking: every connection slot was taken");
            return;
        }
    };
    activity.handshaken.store(true, Ordering::Relaxed);
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    activity.tracks_heads.store(!h2, Ordering::Relaxed);
    let client_subject = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(crate::tls::client_subject)
        .map(Arc::from);
    let connection = Arc::new(ConnectionInfo {
        peer,
        client_subject,
    });
    let in_service = Arc::clone(&activity);
    let service_live = Arc::clone(&live);
    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let api = service_live.api.load_full();
        let connection = Arc::clone(&connection);
        let activity = Arc::clone(&in_service);
        let slot = RequestSlot::take(
            &service_live.requests_in_flight,
            api.limits().max_in_flight_requests,
        );
        let ping = request.uri().path() == "/ping";
        // The load balancer's `/ping` is never refused: a busy instance is alive.
        let refused = slot.is_none() && !ping;
        let http1 = request.version() < http::Version::HTTP_2;
        async move {
            let (_in_flight, head_started, admitted) = activity.begin();
            let _slot = slot;
            // Not admitted under the adaptive limit: refused like a full server, at once.
            let refusal = if refused {
                Some(Refusal::InFlightLimit)
            } else if admitted.as_ref().is_some_and(|a| !a.is_admitted()) {
                Some(Refusal::Overload)
            } else {
                None
            };
            let mut response = match refusal {
                Some(reason) => api.overloaded(request, &connection, reason).await,
                None => api.handle(request, &connection).await,
            };
            if let (Some(admitted), Some(started)) = (&admitted, head_started)
                && admitted.is_admitted()
            {
                admitted.observe(started.elapsed());
            }
            if http1 && (ping || closes_connection(response.status())) {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(response)
        }
    });
    let gate = (!h2).then(|| Gate {
        admission: Arc::clone(&live.admission),
        permits: tokio_util::sync::PollSemaphore::new(live.admission.semaphore()),
        held: Vec::new(),
        released: false,
        waiting: None,
    });
    let io = Watched {
        inner: stream,
        activity: Arc::clone(&activity),
        gate,
        linger: None,
        lingered: 0,
    };
    let connection = http_builder(&limits)
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    let served = watcher.watch(connection);
    tokio::pin!(served);
    let header_read_timeout = limits.header_read_timeout();
    let idle_timeout = limits.idle_timeout();
    let every = (header_read_timeout.min(idle_timeout) / 4).max(Duration::from_millis(50));
    let mut check = tokio::time::interval(every);
    loop {
        tokio::select! {
            result = &mut served => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                break;
            }
            _ = check.tick() => {
                if activity.idle_too_long(header_read_timeout, idle_timeout) {
                    tracing::debug!(%peer, "closing an idle connection");
                    break; // dropping the connection closes it
                }
            }
            () = activity.evict.notified() => {
                if activity.in_flight.load(Ordering::Relaxed) == 0 {
                    tracing::debug!(%peer, "evicted while idle: every connection slot was taken");
                    break;
                }
            }
        }
    }
}

/// After a failed handshake (the alert is already written), closes our side and reads what the
/// client still sends for a moment before dropping the socket. A TLS 1.3 client may already have
/// sent its first request; closing with that unread makes the kernel answer with a reset, which
/// can destroy the alert before the client reads it (it would then see "broken pipe" instead of
/// "handshake failure").
async fn linger_after_alert(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut buffer = [0u8; 4096];
        let mut budget: usize = 64 * 1024;
        while budget > 0 {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => budget = budget.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_streams_per_connection)
        .keep_alive_interval(Duration::from_secs(30));
    builder
}
