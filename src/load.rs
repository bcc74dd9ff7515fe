//! `xks-proxy load`: a load generator that behaves like AWS KMS as a client, for operators to run
//! against their own deployment before registering it in KMS, and the tool behind the README's
//! performance figures.
//!
//! Requests are SigV4-signed XKS calls over keep-alive HTTPS, as KMS sends them. Every reply is
//! checked: an Encrypt must have a 12-byte IV, a 16-byte tag and a ciphertext as long as the
//! plaintext; a Decrypt must return the plaintext that was encrypted. A fast wrong answer counts
//! as an error.
//!
//! Two shapes. Closed loop: `concurrency` workers, each sending its next request when the previous
//! one is done. Open loop: `rate` requests per second on a fixed schedule (KMS's shape, 1800 req/s
//! per key store) served by `concurrency` connections, one request at a time on each.
//!
//! **Deadlines.** KMS gives each call 250 ms (`timeout`). In open loop a request's deadline is
//! counted from its *scheduled* time, so time spent waiting for a free connection uses it up; in
//! closed loop it is counted from when the worker starts the request. A request not answered by
//! its deadline is abandoned and counted `late`: its HTTP/1.1 connection is dropped and the worker
//! opens a new one (TCP and TLS handshake) before it takes its next ticket, as a client that gives
//! up mid-call must. A ticket whose deadline has already passed when a worker takes it is also
//! `late`, never sent, and counted in `dropped_before_send` too. Connections are opened before the
//! clock starts; a reopened one may resume its TLS session (rustls' client cache), as a pooled
//! client may.
//!
//! **Transports.** HTTP/1.1 by default, one connection per worker. With HTTP/2 (`--http2`,
//! [`Http2Target`], since `client::XksClient` speaks HTTP/1.1 only) the workers share
//! `ceil(concurrency / 100)` connections, one stream each at a time; a late request's future is
//! dropped, which resets its stream (RST_STREAM CANCEL), and the connection stays; only a
//! connection that has gone is reopened.
//!
//! **Counting.** `requests` is every ticket (closed loop: every attempt); `requests = ok + the sum
//! of errors`, where errors are keyed by errorName (`ThrottlingException` among them), transport
//! failures (`transport:connect`, `transport:io`), `wrong-answer`, and the late ones
//! (`late:abandoned`, `late:not-sent`). `throughput_rps` is `requests` per second. `latency_ms`
//! and `over_250ms` are over *answered* requests (any status), measured from the scheduled time;
//! late requests have no answer and are only in `late`, so with the default timeout `over_250ms`
//! counts only answers the generator saw after the deadline had passed (its worker ran late), and
//! `late` is the number to watch. `goodput_rps` counts only correct answers within the deadline.
//! `refused` are the 429 ThrottlingException answers, with their own percentiles. `reconnects`
//! are connections opened after the first ones (per worker on HTTP/1.1, per shared connection on
//! HTTP/2). `send_lag_ms` is, per sent request, how long after its scheduled time it was handed
//! to its connection.
//!
//! **Saturation** (open loop only). The numbers are the proxy's only if the generator kept its
//! schedule, so the run is marked `saturated` (and the command fails) when any of these hold:
//! - the send lag p99 exceeds [`MAX_SEND_LAG`] (50 ms): requests left late whatever the cause;
//! - more than [`MAX_BEHIND_FRACTION`] (1 %) of tickets were released by the scheduler more than
//!   [`MAX_WAIT`] (10 ms) after their due time: the generator's own timer or CPU fell behind (this
//!   includes the scheduler blocking on a full ticket queue);
//! - more than 1 % of tickets waited more than 10 ms between release and a worker taking them:
//!   all connections were busy, so the offered rate was the generator's pool limit, not the
//!   proxy's (raise `--concurrency`, at least rate × timeout connections to model KMS fully).
//!
//! Dropped-before-send tickets waited at least the whole timeout, so they always fall under the
//! last rule. A generator short of CPU also sees answers late (latency above the deadline); the
//! scheduler rule catches that, since the scheduler runs on the same starved runtime. Closed loop
//! has no schedule to fall behind: its throughput is the pair's, generator included.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde::Serialize;
use serde_json::Value;

use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::client::{Connection, Reply, XksClient, bodies};

/// KMS's per-call timeout, the default `timeout`.
pub const KMS_TIMEOUT: Duration = Duration::from_millis(250);
/// Saturation: the largest acceptable send lag p99.
pub const MAX_SEND_LAG: Duration = Duration::from_millis(50);
/// Saturation: a ticket released, or taken by a worker, later than this counts as behind.
pub const MAX_WAIT: Duration = Duration::from_millis(10);
/// Saturation: the largest acceptable fraction of tickets behind, per rule.
pub const MAX_BEHIND_FRACTION: f64 = 0.01;
/// HTTP/2: workers per connection (the proxy allows 128 streams per connection by default).
pub const HTTP2_STREAMS_PER_CONNECTION: usize = 100;

/// Which requests to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadOperation {
    Encrypt,
    Decrypt,
    Health,
    /// Encrypt, then decrypt what came back, alternating.
    Mixed,
}

/// The shape of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadMode {
    ClosedLoop,
    OpenLoop,
}

/// A load run's settings.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub operation: LoadOperation,
    pub key_id: String,
    /// Closed-loop workers, or (with `rate`) the number of connections serving the schedule.
    pub concurrency: usize,
    /// Open loop: requests per second.
    pub rate: Option<u32>,
    pub duration: Duration,
    /// Each request's deadline (open loop: from its scheduled time).
    pub timeout: Duration,
    pub plaintext_bytes: usize,
    pub aad_bytes: usize,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    pub transport: Transport,
}

/// How requests travel.
#[derive(Debug, Clone)]
pub enum Transport {
    /// One request at a time per connection (`client::Connection`); a late request's connection
    /// is closed.
    Http1,
    /// Workers share connections, [`HTTP2_STREAMS_PER_CONNECTION`] each; a late request resets its
    /// stream and the connection stays.
    Http2(Arc<Http2Target>),
}

impl Transport {
    fn name(&self) -> TransportName {
        match self {
            Transport::Http1 => TransportName::Http1,
            Transport::Http2(_) => TransportName::Http2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportName {
    Http1,
    Http2,
}

/// Where and how to open HTTP/2 connections: `client::XksClient` speaks HTTP/1.1 only, so the
/// load generator opens its own (same trust anchors and client certificate, ALPN `h2` only) and
/// still signs with the `XksClient`.
pub struct Http2Target {
    connector: TlsConnector,
    address: String,
    server_name: ServerName<'static>,
}

impl fmt::Debug for Http2Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http2Target")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

type Http2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

impl Http2Target {
    /// `endpoint` is `https://host[:port]`, as for `ClientSettings`.
    pub fn new(
        endpoint: &str,
        ca: &std::path::Path,
        client_cert: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<Self, String> {
        let bad = || format!("endpoint {endpoint:?} must look like https://host[:port]");
        let uri: http::Uri = endpoint.parse().map_err(|_| bad())?;
        let (Some("https"), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(bad());
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_owned()).map_err(|_| bad())?;
        let mut tls =
            (*crate::tls::client_config(ca, client_cert).map_err(|e| e.to_string())?).clone();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            connector: TlsConnector::from(Arc::new(tls)),
            address: format!(
                "{}:{}",
                authority.host(),
                authority.port_u16().unwrap_or(443)
            ),
            server_name,
        })
    }

    async fn connect(&self) -> Result<Http2Sender, String> {
        let tcp = TcpStream::connect(&self.address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err("the server did not agree to HTTP/2 (ALPN h2)".into());
        }
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

/// A worker's way to the proxy.
enum Conn {
    Http1(Connection),
    /// A handle on a shared connection.
    Http2(Http2Sender),
}

impl Conn {
    async fn send(&mut self, mut request: Request<Full<Bytes>>) -> Result<Reply, Failure> {
        match self {
            Conn::Http1(connection) => connection.send(request).await.map_err(|_| Failure::Io),
            Conn::Http2(sender) => {
                // HTTP/2 wants the authority in the URI (`:authority`); the signed Host header
                // stays as it is.
                let authority = request
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let path = request
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default();
                *request.uri_mut() = format!("https://{authority}{path}")
                    .parse()
                    .map_err(|_| Failure::Signing)?;
                *request.version_mut() = http::Version::HTTP_2;
                sender.ready().await.map_err(|_| Failure::Io)?;
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|_| Failure::Io)?;
                let status = response.status();
                let bytes = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|_| Failure::Io)?
                    .to_bytes();
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                Ok(Reply { status, body })
            }
        }
    }

    /// Whether abandoning a request on it means closing it (HTTP/1.1), or only resetting the
    /// request's stream (HTTP/2, still usable unless the connection itself has gone).
    fn usable_after_abandon(&self) -> bool {
        match self {
            Conn::Http1(_) => false,
            Conn::Http2(sender) => !sender.is_closed(),
        }
    }
}

impl LoadPlan {
    fn mode(&self) -> LoadMode {
        if self.rate.is_some() {
            LoadMode::OpenLoop
        } else {
            LoadMode::ClosedLoop
        }
    }
}

/// What a run measured (see the module doc for what each count means).
#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub operation: LoadOperation,
    pub mode: LoadMode,
    pub transport: TransportName,
    pub concurrency: usize,
    /// Connections opened at the start (HTTP/1.1: one per worker).
    pub connections: usize,
    pub target_rate: Option<u32>,
    pub timeout_ms: f64,
    pub duration_s: f64,
    pub requests: u64,
    pub ok: u64,
    pub throughput_rps: f64,
    pub goodput_rps: f64,
    pub latency_ms: Percentiles,
    pub over_250ms: u64,
    pub late: u64,
    pub dropped_before_send: u64,
    pub refused: u64,
    pub refused_latency_ms: Percentiles,
    /// Failed requests by errorName (or the kind of transport, verification or deadline failure).
    pub errors: BTreeMap<String, u64>,
    pub reconnects: u64,
    pub send_lag_ms: Percentiles,
    /// Open loop: tickets the scheduler released more than `MAX_WAIT` after their due time.
    pub schedule_behind: u64,
    /// Open loop: tickets that waited more than `MAX_WAIT` for a free connection.
    pub waited_for_connection: u64,
    pub saturated: bool,
    /// Why the run is saturated, one sentence per rule broken.
    pub saturation: Vec<String>,
}

#[derive(Debug, Serialize, Default, Clone, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

/// Why a failed request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// 429 ThrottlingException (or a bare 429).
    Refused,
    /// Another error answer: its errorName, or `http-<status>` without one.
    Answer(String),
    /// A 2xx whose body did not check out.
    WrongAnswer,
    Signing,
    Connect,
    /// The connection failed mid-request; it is dropped.
    Io,
}

impl Failure {
    fn key(&self) -> String {
        match self {
            Failure::Refused => "ThrottlingException".into(),
            Failure::Answer(name) => name.clone(),
            Failure::WrongAnswer => "wrong-answer".into(),
            Failure::Signing => "signing".into(),
            Failure::Connect => "transport:connect".into(),
            Failure::Io => "transport:io".into(),
        }
    }

    /// The connection cannot carry another request.
    fn loses_connection(&self) -> bool {
        matches!(self, Failure::Connect | Failure::Io)
    }
}

/// What became of one ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// Answered 2xx with a verified body, before the deadline.
    Ok,
    Failed(Failure),
    /// Not answered by the deadline: abandoned, its connection dropped.
    Late,
    /// The deadline had passed when a worker took the ticket: never sent.
    DroppedBeforeSend,
}

/// What a worker does with a ticket it takes at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pickup {
    Send { deadline: Instant },
    Expired,
}

fn pick_up(due: Instant, now: Instant, timeout: Duration) -> Pickup {
    let deadline = due + timeout;
    if now >= deadline {
        Pickup::Expired
    } else {
        Pickup::Send { deadline }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// One worker's counts, merged into the report.
#[derive(Default, Debug)]
struct Tally {
    requests: u64,
    ok: u64,
    ok_in_time: u64,
    late: u64,
    dropped_before_send: u64,
    /// Answered requests (any status).
    latencies_us: Vec<u32>,
    refused_us: Vec<u32>,
    send_lag_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
    reconnects: u64,
    waited_for_connection: u64,
}

impl Tally {
    /// Records a ticket's fate; `latency` is from its scheduled time to the answer (or failure),
    /// `send_lag` from its scheduled time to being handed to a connection, if it was.
    fn record(
        &mut self,
        fate: Fate,
        latency: Duration,
        send_lag: Option<Duration>,
        timeout: Duration,
    ) {
        self.requests += 1;
        if let Some(lag) = send_lag {
            self.send_lag_us.push(micros(lag));
        }
        let error = match fate {
            Fate::Ok => {
                self.latencies_us.push(micros(latency));
                self.ok += 1;
                if latency <= timeout {
                    self.ok_in_time += 1;
                }
                None
            }
            Fate::Failed(failure) => {
                self.latencies_us.push(micros(latency));
                if failure == Failure::Refused {
                    self.refused_us.push(micros(latency));
                }
                Some(failure.key())
            }
            Fate::Late => {
                self.late += 1;
                Some("late:abandoned".to_string())
            }
            Fate::DroppedBeforeSend => {
                self.late += 1;
                self.dropped_before_send += 1;
                Some("late:not-sent".to_string())
            }
        };
        if let Some(kind) = error {
            *self.errors.entry(kind).or_default() += 1;
        }
    }

    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.ok_in_time += other.ok_in_time;
        self.late += other.late;
        self.dropped_before_send += other.dropped_before_send;
        self.latencies_us.extend(other.latencies_us);
        self.refused_us.extend(other.refused_us);
        self.send_lag_us.extend(other.send_lag_us);
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        self.reconnects += other.reconnects;
        self.waited_for_connection += other.waited_for_connection;
    }
}

/// A rule of the saturation check that a run broke.
#[derive(Debug, Clone, PartialEq)]
enum Saturation {
    SendLag { p99_ms: f64 },
    ScheduleBehind { tickets: u64, of: u64 },
    ConnectionsBusy { tickets: u64, of: u64 },
}

impl fmt::Display for Saturation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Saturation::SendLag { p99_ms } => write!(
                f,
                "send lag p99 {p99_ms:.1} ms exceeds {} ms: requests left the generator late",
                MAX_SEND_LAG.as_millis()
            ),
            Saturation::ScheduleBehind { tickets, of } => write!(
                f,
                "{tickets} of {of} tickets were released more than {} ms after their due time: \
                 the generator's scheduler fell behind (its CPU was busy or its ticket queue \
                 full)",
                MAX_WAIT.as_millis()
            ),
            Saturation::ConnectionsBusy { tickets, of } => write!(
                f,
                "{tickets} of {of} tickets waited more than {} ms for a free connection: all \
                 connections were busy (raise --concurrency)",
                MAX_WAIT.as_millis()
            ),
        }
    }
}

/// The saturation rules of the module doc, for an open-loop run of `tickets` tickets.
fn saturation(
    tickets: u64,
    send_lag_p99: Duration,
    schedule_behind: u64,
    waited_for_connection: u64,
) -> Vec<Saturation> {
    let too_many = |n: u64| n > 0 && n as f64 > tickets as f64 * MAX_BEHIND_FRACTION;
    let mut broken = Vec::new();
    if send_lag_p99 > MAX_SEND_LAG {
        broken.push(Saturation::SendLag {
            p99_ms: send_lag_p99.as_secs_f64() * 1000.0,
        });
    }
    if too_many(schedule_behind) {
        broken.push(Saturation::ScheduleBehind {
            tickets: schedule_behind,
            of: tickets,
        });
    }
    if too_many(waited_for_connection) {
        broken.push(Saturation::ConnectionsBusy {
            tickets: waited_for_connection,
            of: tickets,
        });
    }
    broken
}

/// Builds the report from the merged tally.
fn report(
    plan: &LoadPlan,
    mut tally: Tally,
    schedule_behind: u64,
    elapsed: Duration,
) -> LoadReport {
    tally.latencies_us.sort_unstable();
    tally.refused_us.sort_unstable();
    tally.send_lag_us.sort_unstable();
    let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
    let over = tally
        .latencies_us
        .iter()
        .filter(|&&us| u128::from(us) > KMS_TIMEOUT.as_micros())
        .count() as u64;
    let send_lag_ms = percentiles(&tally.send_lag_us);
    let broken = match plan.mode() {
        LoadMode::ClosedLoop => Vec::new(),
        LoadMode::OpenLoop => saturation(
            tally.requests,
            Duration::from_secs_f64(send_lag_ms.p99 / 1000.0),
            schedule_behind,
            tally.waited_for_connection,
        ),
    };
    LoadReport {
        operation: plan.operation,
        mode: plan.mode(),
        transport: plan.transport.name(),
        concurrency: plan.concurrency,
        connections: connections(plan),
        target_rate: plan.rate,
        timeout_ms: plan.timeout.as_secs_f64() * 1000.0,
        duration_s: seconds,
        requests: tally.requests,
        ok: tally.ok,
        throughput_rps: tally.requests as f64 / seconds,
        goodput_rps: tally.ok_in_time as f64 / seconds,
        latency_ms: percentiles(&tally.latencies_us),
        over_250ms: over,
        late: tally.late,
        dropped_before_send: tally.dropped_before_send,
        refused: tally.refused_us.len() as u64,
        refused_latency_ms: percentiles(&tally.refused_us),
        errors: tally.errors,
        reconnects: tally.reconnects,
        send_lag_ms,
        schedule_behind,
        waited_for_connection: tally.waited_for_connection,
        saturated: !broken.is_empty(),
        saturation: broken.iter().map(ToString::to_string).collect(),
    }
}

/// One request of the plan, ready to be signed and sent, with what its reply must show.
struct Sample {
    plaintext: Vec<u8>,
    aad: Vec<u8>,
    /// For Decrypt: a Decrypt body prepared from a real Encrypt reply.
    decrypt_body: Option<Vec<u8>>,
}

/// An open-loop ticket: when it was due, and when the scheduler released it.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    due: Instant,
    released: Instant,
}

/// What every worker shares.
struct Shared {
    client: Arc<XksClient>,
    plan: LoadPlan,
    samples: Vec<Sample>,
    /// Closed loop: when workers stop taking work.
    end: Instant,
    /// HTTP/2: the shared connections, `None` once one has to be reopened.
    http2: Vec<tokio::sync::Mutex<Option<Http2Sender>>>,
    completed: AtomicU64,
    failed: AtomicU64,
}

/// Runs the plan against the proxy behind `client`.
pub async fn run(client: Arc<XksClient>, plan: LoadPlan) -> Result<LoadReport, String> {
    let samples = prepare_samples(&client, &plan).await?;
    let workers = plan.concurrency.max(1);

    // Connections are opened before the clock starts, as KMS's would be warm.
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..connections(&plan) {
        let client = Arc::clone(&client);
        let transport = plan.transport.clone();
        opening.spawn(async move {
            match transport {
                Transport::Http1 => client
                    .connect()
                    .await
                    .map(Conn::Http1)
                    .map_err(|e| e.to_string()),
                Transport::Http2(target) => target.connect().await.map(Conn::Http2),
            }
        });
    }
    let mut opened = Vec::new();
    while let Some(conn) = opening.join_next().await {
        opened.push(
            conn.map_err(|e| format!("connecting: {e}"))?
                .map_err(|e| format!("connecting: {e}"))?,
        );
    }
    let mut http2 = Vec::new();
    let links: Vec<Conn> = match plan.transport {
        Transport::Http1 => opened,
        Transport::Http2(_) => {
            let senders: Vec<Http2Sender> = opened
                .into_iter()
                .filter_map(|conn| match conn {
                    Conn::Http2(sender) => Some(sender),
                    Conn::Http1(_) => None,
                })
                .collect();
            if senders.is_empty() {
                return Err("connecting: no HTTP/2 connection".into());
            }
            let links = (0..workers)
                .map(|i| Conn::Http2(senders[i % senders.len()].clone()))
                .collect();
            http2 = senders
                .into_iter()
                .map(|s| tokio::sync::Mutex::new(Some(s)))
                .collect();
            links
        }
    };

    let started = Instant::now();
    let shared = Arc::new(Shared {
        client,
        plan: plan.clone(),
        samples,
        end: started + plan.duration,
        http2,
        completed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });

    let progress = plan.progress.then(|| {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            ticker.tick().await;
            let mut last = 0;
            loop {
                ticker.tick().await;
                let done = shared.completed.load(Ordering::Relaxed);
                eprintln!(
                    "[{:>5.1}s] {done} requests, {} req/s in the last second, {} errors or late",
                    started.elapsed().as_secs_f64(),
                    done - last,
                    shared.failed.load(Ordering::Relaxed)
                );
                last = done;
            }
        })
    });

    // Open loop: a schedule of tickets, ticket i due at started + i / rate.
    let (tickets, scheduler) = match plan.rate {
        None => (None, None),
        Some(rate) => {
            let (sender, receiver) = ticket_queue(workers * 64);
            let end = shared.end;
            let scheduler = tokio::spawn(async move {
                let rate = f64::from(rate.max(1));
                let mut behind = 0u64;
                for i in 0u64.. {
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    if due >= end {
                        break;
                    }
                    // At rates above 1000 req/s several tickets share a timer tick (1 ms).
                    if due > Instant::now() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let released = Instant::now();
                    if released.duration_since(due) > MAX_WAIT {
                        behind += 1;
                    }
                    if sender.send(Ticket { due, released }).await.is_err() {
                        break;
                    }
                }
                behind
            });
            (Some(receiver), Some(scheduler))
        }
    };

    let mut tasks = Vec::with_capacity(workers);
    for (index, link) in links.into_iter().enumerate() {
        tasks.push(tokio::spawn(worker(
            Arc::clone(&shared),
            index,
            tickets.clone(),
            link,
        )));
    }
    drop(tickets);

    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(
            task.await
                .map_err(|e| format!("a load worker failed: {e}"))?,
        );
    }
    let schedule_behind = match scheduler {
        Some(scheduler) => scheduler
            .await
            .map_err(|e| format!("the load scheduler failed: {e}"))?,
        None => 0,
    };
    if let Some(progress) = progress {
        progress.abort();
    }
    Ok(report(&plan, tally, schedule_behind, started.elapsed()))
}

/// One worker: one connection, one request at a time.
async fn worker(
    shared: Arc<Shared>,
    index: usize,
    tickets: Option<TicketReceiver>,
    first: Conn,
) -> Tally {
    let plan = &shared.plan;
    let mut tally = Tally::default();
    let mut connection = Some(first);
    let mut turn = index;
    loop {
        let due = match &tickets {
            Some(tickets) => match tickets.recv().await {
                Some(ticket) => {
                    if ticket.released.elapsed() > MAX_WAIT {
                        tally.waited_for_connection += 1;
                    }
                    ticket.due
                }
                None => break,
            },
            None if Instant::now() >= shared.end => break,
            None => Instant::now(),
        };
        // When the answer (or failure) came, before any reconnect.
        let mut ended = Instant::now();
        let fate_and_lag = match pick_up(due, ended, plan.timeout) {
            Pickup::Expired => (Fate::DroppedBeforeSend, None),
            Pickup::Send { deadline } => {
                let sample = &shared.samples[turn % shared.samples.len()];
                turn += 1;
                let mut written = None;
                let attempt = tokio::time::timeout_at(
                    deadline.into(),
                    attempt(
                        &shared,
                        &mut connection,
                        &mut tally,
                        sample,
                        index,
                        turn,
                        &mut written,
                    ),
                )
                .await;
                ended = Instant::now();
                let fate = match attempt {
                    Ok(Ok(())) => Fate::Ok,
                    Ok(Err(failure)) => {
                        if failure.loses_connection() {
                            connection = None;
                            reconnect(&shared, index, &mut connection, &mut tally).await;
                        }
                        Fate::Failed(failure)
                    }
                    Err(_) => {
                        // Abandoned mid-call (the request's future is dropped). An HTTP/1.1
                        // connection still has the request on it, so it goes, and a fresh one
                        // is opened for the next ticket; on HTTP/2 the stream was reset.
                        if !connection.as_ref().is_some_and(Conn::usable_after_abandon) {
                            connection = None;
                            reconnect(&shared, index, &mut connection, &mut tally).await;
                        }
                        Fate::Late
                    }
                };
                (fate, written.map(|at: Instant| at.duration_since(due)))
            }
        };
        let (fate, send_lag) = fate_and_lag;
        if fate != Fate::Ok {
            shared.failed.fetch_add(1, Ordering::Relaxed);
        }
        shared.completed.fetch_add(1, Ordering::Relaxed);
        tally.record(fate, ended.duration_since(due), send_lag, plan.timeout);
    }
    tally
}

/// Opens a replacement for a lost or dropped connection before the worker takes its next ticket,
/// bounded by the request timeout; on failure the next request tries again within its deadline.
async fn reconnect(
    shared: &Shared,
    index: usize,
    connection: &mut Option<Conn>,
    tally: &mut Tally,
) {
    if let Ok(Ok(conn)) =
        tokio::time::timeout(shared.plan.timeout, open(shared, index, tally)).await
    {
        *connection = Some(conn);
    }
}

/// A connection for worker `index`: HTTP/1.1, a new one; HTTP/2, its shared connection, reopened
/// if it has gone. Counts the connections it opens as reconnects (the first ones were opened
/// before the run).
async fn open(shared: &Shared, index: usize, tally: &mut Tally) -> Result<Conn, Failure> {
    match &shared.plan.transport {
        Transport::Http1 => {
            let connection = shared
                .client
                .connect()
                .await
                .map_err(|_| Failure::Connect)?;
            tally.reconnects += 1;
            Ok(Conn::Http1(connection))
        }
        Transport::Http2(target) => {
            let Some(slot) = shared.http2.get(index % shared.http2.len().max(1)) else {
                return Err(Failure::Connect);
            };
            let mut slot = slot.lock().await;
            if let Some(sender) = slot.as_ref().filter(|s| !s.is_closed()) {
                return Ok(Conn::Http2(sender.clone()));
            }
            *slot = None;
            let sender = target.connect().await.map_err(|_| Failure::Connect)?;
            tally.reconnects += 1;
            *slot = Some(sender.clone());
            Ok(Conn::Http2(sender))
        }
    }
}

/// One ticket's request(s) on the worker's connection, opening one first if it has none.
async fn attempt(
    shared: &Shared,
    connection: &mut Option<Conn>,
    tally: &mut Tally,
    sample: &Sample,
    index: usize,
    turn: usize,
    written: &mut Option<Instant>,
) -> Result<(), Failure> {
    if connection.is_none() {
        *connection = Some(open(shared, index, tally).await?);
    }
    let Some(open) = connection.as_mut() else {
        return Err(Failure::Connect);
    };
    let mut link = Link {
        client: &shared.client,
        connection: open,
        written,
    };
    one_request(&mut link, &shared.plan, sample, turn).await
}

async fn prepare_samples(client: &XksClient, plan: &LoadPlan) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for i in 0..16u8 {
        let plaintext: Vec<u8> = (0..plan.plaintext_bytes).map(|j| (j as u8) ^ i).collect();
        let aad: Vec<u8> = (0..plan.aad_bytes)
            .map(|j| (j as u8).wrapping_mul(7) ^ i)
            .collect();
        let decrypt_body = if plan.operation == LoadOperation::Decrypt {
            let reply = client
                .call(
                    &format!("/keys/{}/encrypt", plan.key_id),
                    &bodies::encrypt(&plaintext, Some(&aad), false),
                )
                .await
                .map_err(|e| format!("preparing ciphertexts: {e}"))?;
            if !reply.status.is_success() {
                return Err(format!(
                    "preparing ciphertexts: Encrypt answered {} {}",
                    reply.status, reply.body
                ));
            }
            Some(
                bodies::decrypt_from(&reply.body, Some(&aad))
                    .to_string()
                    .into_bytes(),
            )
        } else {
            None
        };
        samples.push(Sample {
            plaintext,
            aad,
            decrypt_body,
        });
    }
    Ok(samples)
}

/// A connection in use for one ticket: signs and sends, noting when the first request was handed
/// to the connection.
struct Link<'a> {
    client: &'a XksClient,
    connection: &'a mut Conn,
    written: &'a mut Option<Instant>,
}

impl Link<'_> {
    async fn send(&mut self, suffix: &str, body: Vec<u8>) -> Result<Value, Failure> {
        let request: Request<Full<Bytes>> = self
            .client
            .request(suffix, body)
            .map_err(|_| Failure::Signing)?;
        self.written.get_or_insert_with(Instant::now);
        judge(self.connection.send(request).await?)
    }
}

/// How many connections the run opens at the start.
fn connections(plan: &LoadPlan) -> usize {
    let workers = plan.concurrency.max(1);
    match plan.transport {
        Transport::Http1 => workers,
        Transport::Http2(_) => workers.div_ceil(HTTP2_STREAMS_PER_CONNECTION),
    }
}

/// A reply's body if it is a success, else why not.
fn judge(reply: Reply) -> Result<Value, Failure> {
    if reply.status.is_success() {
        return Ok(reply.body);
    }
    match reply.error_name() {
        Some("ThrottlingException") => Err(Failure::Refused),
        None if reply.status == http::StatusCode::TOO_MANY_REQUESTS => Err(Failure::Refused),
        Some(name) => Err(Failure::Answer(name.to_owned())),
        None => Err(Failure::Answer(format!("http-{}", reply.status.as_u16()))),
    }
}

async fn one_request(
    link: &mut Link<'_>,
    plan: &LoadPlan,
    sample: &Sample,
    turn: usize,
) -> Result<(), Failure> {
    let key = &plan.key_id;
    match plan.operation {
        LoadOperation::Health => {
            let body = bodies::health().to_string().into_bytes();
            link.send("/health", body).await.map(|_| ())
        }
        LoadOperation::Encrypt => encrypt_checked(link, key, sample).await.map(|_| ()),
        LoadOperation::Decrypt => {
            let body = sample.decrypt_body.clone().unwrap_or_default();
            let reply = link.send(&format!("/keys/{key}/decrypt"), body).await?;
            check_plaintext(&reply, &sample.plaintext)
        }
        LoadOperation::Mixed if turn.is_multiple_of(2) => {
            let body = bodies::health().to_string().into_bytes();
            link.send("/health", body).await.map(|_| ())
        }
        LoadOperation::Mixed => {
            let encrypted = encrypt_checked(link, key, sample).await?;
            let body = bodies::decrypt_from(&encrypted, Some(&sample.aad))
                .to_string()
                .into_bytes();
            let reply = link.send(&format!("/keys/{key}/decrypt"), body).await?;
            check_plaintext(&reply, &sample.plaintext)
        }
    }
}

async fn encrypt_checked(
    link: &mut Link<'_>,
    key: &str,
    sample: &Sample,
) -> Result<Value, Failure> {
    let body = bodies::encrypt(&sample.plaintext, Some(&sample.aad), false)
        .to_string()
        .into_bytes();
    let reply = link.send(&format!("/keys/{key}/encrypt"), body).await?;
    let length = |field: &str| {
        reply
            .get(field)
            .and_then(Value::as_str)
            .and_then(|v| BASE64.decode(v).ok())
            .map(|v| v.len())
    };
    if length("ciphertext") != Some(sample.plaintext.len())
        || length("initializationVector") != Some(12)
        || length("authenticationTag") != Some(16)
    {
        return Err(Failure::WrongAnswer);
    }
    Ok(reply)
}

fn check_plaintext(reply: &Value, expected: &[u8]) -> Result<(), Failure> {
    let plaintext = reply
        .get("plaintext")
        .and_then(Value::as_str)
        .and_then(|v| BASE64.decode(v).ok());
    if plaintext.as_deref() == Some(expected) {
        Ok(())
    } else {
        Err(Failure::WrongAnswer)
    }
}

fn percentiles(sorted_us: &[u32]) -> Percentiles {
    if sorted_us.is_empty() {
        return Percentiles::default();
    }
    let at = |q: f64| {
        let index = ((sorted_us.len() as f64 * q).ceil() as usize).clamp(1, sorted_us.len()) - 1;
        f64::from(sorted_us[index]) / 1000.0
    };
    Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        p99_9: at(0.999),
        max: f64::from(sorted_us[sorted_us.len() - 1]) / 1000.0,
    }
}

/// A multi-consumer queue of open-loop tickets.
fn ticket_queue(capacity: usize) -> (TicketSender, TicketReceiver) {
    let (sender, receiver) = tokio::sync::mpsc::channel(capacity);
    (
        TicketSender(sender),
        TicketReceiver(Arc::new(tokio::sync::Mutex::new(receiver))),
    )
}

struct TicketSender(tokio::sync::mpsc::Sender<Ticket>);

impl TicketSender {
    async fn send(&self, ticket: Ticket) -> Result<(), ()> {
        self.0.send(ticket).await.map_err(|_| ())
    }
}

#[derive(Clone)]
struct TicketReceiver(Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Ticket>>>);

impl TicketReceiver {
    async fn recv(&self) -> Option<Ticket> {
        self.0.lock().await.recv().await
    }
}

impl LoadReport {
    /// The human-readable summary.
    pub fn summary(&self) -> String {
        let ms = |p: &Percentiles| {
            format!(
                "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                p.p50, p.p90, p.p99, p.p99_9, p.max
            )
        };
        let mode = match self.mode {
            LoadMode::ClosedLoop => "closed-loop",
            LoadMode::OpenLoop => "open-loop",
        };
        let mut out = format!(
            "{:?} {mode} (concurrency {}{}, timeout {} ms): {} requests in {:.1} s = {:.0} req/s, \
             {} ok, goodput {:.0} req/s\n\
             latency ms (answered): {}\n\
             replies over 250 ms: {}\n\
             late: {} ({} dropped before send)   refused (429): {}   reconnects: {}\n",
            self.operation,
            self.concurrency,
            self.target_rate
                .map(|r| format!(", target {r} req/s"))
                .unwrap_or_default(),
            self.timeout_ms,
            self.requests,
            self.duration_s,
            self.throughput_rps,
            self.ok,
            self.goodput_rps,
            ms(&self.latency_ms),
            self.over_250ms,
            self.late,
            self.dropped_before_send,
            self.refused,
            self.reconnects,
        );
        if self.refused > 0 {
            out.push_str(&format!(
                "refused latency ms: {}\n",
                ms(&self.refused_latency_ms)
            ));
        }
        if self.mode == LoadMode::OpenLoop {
            out.push_str(&format!(
                "send lag ms: p50 {:.3}  p99 {:.3}  max {:.3}   released late: {}   waited for a \
                 connection: {}\n",
                self.send_lag_ms.p50,
                self.send_lag_ms.p99,
                self.send_lag_ms.max,
                self.schedule_behind,
                self.waited_for_connection,
            ));
        }
        if self.errors.is_empty() {
            out.push_str("errors: none\n");
        } else {
            for (kind, n) in &self.errors {
                out.push_str(&format!("errors: {kind}: {n}\n"));
            }
        }
        for reason in &self.saturation {
            out.push_str(&format!("SATURATED: {reason}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rate: Option<u32>) -> LoadPlan {
        LoadPlan {
            operation: LoadOperation::Encrypt,
            key_id: "foo".into(),
            concurrency: 4,
            rate,
            duration: Duration::from_secs(1),
            timeout: KMS_TIMEOUT,
            plaintext_bytes: 32,
            aad_bytes: 32,
            progress: false,
            transport: Transport::Http1,
        }
    }

    #[test]
    fn percentiles_pick_ranks() {
        let data: Vec<u32> = (1..=1000).map(|i| i * 1000).collect();
        let p = percentiles(&data);
        assert_eq!(p.p50, 500.0);
        assert_eq!(p.p99, 990.0);
        assert_eq!(p.p99_9, 999.0);
        assert_eq!(p.max, 1000.0);
        assert_eq!(percentiles(&[]).max, 0.0);
    }

    #[test]
    fn deadline_counts_from_the_scheduled_time() {
        let due = Instant::now();
        let timeout = Duration::from_millis(250);
        assert_eq!(
            pick_up(due, due + Duration::from_millis(100), timeout),
            Pickup::Send {
                deadline: due + timeout
            }
        );
        // A ticket that waited for a connection keeps only what is left of its deadline.
        assert_eq!(
            pick_up(due, due + Duration::from_millis(249), timeout),
            Pickup::Send {
                deadline: due + timeout
            }
        );
        assert_eq!(pick_up(due, due + timeout, timeout), Pickup::Expired);
        assert_eq!(
            pick_up(due, due + Duration::from_secs(1), timeout),
            Pickup::Expired
        );
    }

    #[test]
    fn tally_keeps_requests_equal_to_ok_plus_errors() {
        let mut tally = Tally::default();
        let ms = Duration::from_millis;
        tally.record(Fate::Ok, ms(2), Some(ms(0)), KMS_TIMEOUT);
        tally.record(Fate::Ok, ms(3), Some(ms(1)), KMS_TIMEOUT);
        tally.record(
            Fate::Failed(Failure::Refused),
            ms(1),
            Some(ms(0)),
            KMS_TIMEOUT,
        );
        tally.record(
            Fate::Failed(Failure::Answer("DependencyTimeoutException".into())),
            ms(200),
            Some(ms(0)),
            KMS_TIMEOUT,
        );
        tally.record(Fate::Late, ms(250), Some(ms(5)), KMS_TIMEOUT);
        tally.record(Fate::DroppedBeforeSend, ms(300), None, KMS_TIMEOUT);
        let mut other = Tally::default();
        other.record(
            Fate::Failed(Failure::WrongAnswer),
            ms(1),
            Some(ms(0)),
            KMS_TIMEOUT,
        );
        tally.merge(other);

        let r = report(&plan(Some(100)), tally, 0, Duration::from_secs(2));
        assert_eq!(r.requests, 7);
        assert_eq!(r.ok, 2);
        assert_eq!(r.requests, r.ok + r.errors.values().sum::<u64>());
        assert_eq!(r.late, 2);
        assert_eq!(r.dropped_before_send, 1);
        assert_eq!(r.errors["late:abandoned"], 1);
        assert_eq!(r.errors["late:not-sent"], 1);
        assert_eq!(r.errors["ThrottlingException"], 1);
        assert_eq!(r.errors["wrong-answer"], 1);
        assert_eq!(r.refused, 1);
        assert_eq!(r.refused_latency_ms.max, 1.0);
        // Latency is over answered requests only: 5 of them, the slowest 200 ms.
        assert_eq!(r.latency_ms.max, 200.0);
        assert_eq!(r.over_250ms, 0);
        assert_eq!(r.goodput_rps, 1.0);
        assert_eq!(r.throughput_rps, 3.5);
        assert_eq!(r.send_lag_ms.max, 5.0);
        assert!(!r.saturated, "{:?}", r.saturation);
    }

    #[test]
    fn goodput_leaves_out_correct_answers_past_the_deadline() {
        let mut tally = Tally::default();
        let timeout = Duration::from_millis(100);
        tally.record(Fate::Ok, Duration::from_millis(99), None, timeout);
        tally.record(Fate::Ok, Duration::from_millis(101), None, timeout);
        let r = report(&plan(None), tally, 0, Duration::from_secs(1));
        assert_eq!(r.ok, 2);
        assert_eq!(r.goodput_rps, 1.0);
    }

    #[test]
    fn saturation_rules() {
        let ms = Duration::from_millis;
        assert!(saturation(1000, ms(50), 10, 10).is_empty());
        assert_eq!(
            saturation(1000, ms(51), 0, 0),
            vec![Saturation::SendLag { p99_ms: 51.0 }]
        );
        assert_eq!(
            saturation(1000, ms(0), 11, 0),
            vec![Saturation::ScheduleBehind {
                tickets: 11,
                of: 1000
            }]
        );
        assert_eq!(
            saturation(1000, ms(0), 0, 11),
            vec![Saturation::ConnectionsBusy {
                tickets: 11,
                of: 1000
            }]
        );
        // A short run: one ticket behind of 50 is 2 %.
        assert_eq!(saturation(50, ms(0), 1, 1).len(), 2);
        assert_eq!(saturation(0, ms(0), 0, 0), vec![]);
    }

    #[test]
    fn closed_loop_is_never_saturated_and_open_loop_reports_why() {
        let mut tally = Tally::default();
        for _ in 0..100 {
            tally.record(
                Fate::Ok,
                Duration::from_millis(90),
                Some(Duration::from_millis(80)),
                KMS_TIMEOUT,
            );
        }
        tally.waited_for_connection = 100;
        let open = report(&plan(Some(100)), tally, 0, Duration::from_secs(1));
        assert!(open.saturated);
        assert_eq!(open.saturation.len(), 2, "{:?}", open.saturation);
        assert!(open.summary().contains("SATURATED: send lag p99 80.0 ms"));

        let closed = report(&plan(None), Tally::default(), 0, Duration::from_secs(1));
        assert!(!closed.saturated);
    }

    #[test]
    fn replies_are_judged_by_status_and_error_name() {
        let reply = |status: u16, body: Value| Reply {
            status: http::StatusCode::from_u16(status).unwrap(),
            body,
        };
        assert!(judge(reply(200, Value::Null)).is_ok());
        assert_eq!(
            judge(reply(
                429,
                serde_json::json!({"errorName": "ThrottlingException"})
            )),
            Err(Failure::Refused)
        );
        assert_eq!(judge(reply(429, Value::Null)), Err(Failure::Refused));
        assert_eq!(
            judge(reply(
                503,
                serde_json::json!({"errorName": "DependencyTimeoutException"})
            )),
            Err(Failure::Answer("DependencyTimeoutException".into()))
        );
        assert_eq!(
            judge(reply(502, Value::Null)),
            Err(Failure::Answer("http-502".into()))
        );
    }
}
