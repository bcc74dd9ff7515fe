//! `xks-proxy load`: a load generator for operators to run against their own deployment before
//! registering it in KMS, and the tool behind the README's performance figures.
//!
//! Requests are SigV4-signed XKS calls over keep-alive HTTPS, exactly as KMS sends them. Two shapes:
//! closed loop (`concurrency` workers, each sending its next request when the previous one returns)
//! and open loop (`rate` requests per second on a fixed schedule, KMS's shape: 1800 req/s per key
//! store). In open loop, latency is measured from the moment the schedule releases each request,
//! so a stalled proxy cannot hide its queueing delay behind busy connections. Every reply is checked: an Encrypt must have a 12-byte IV,
//! a 16-byte tag and a ciphertext as long as the plaintext; a Decrypt must return the plaintext that
//! was encrypted. A fast wrong answer counts as an error.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use serde_json::Value;

use crate::client::{Connection, XksClient, bodies};

/// KMS's per-call timeout.
pub const KMS_TIMEOUT: Duration = Duration::from_millis(250);

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
    pub plaintext_bytes: usize,
    pub aad_bytes: usize,
    /// Print a progress line to stderr every second.
    pub progress: bool,
}

/// What a run measured.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub operation: LoadOperation,
    pub mode: &'static str,
    pub concurrency: usize,
    pub target_rate: Option<u32>,
    pub duration_s: f64,
    pub requests: u64,
    pub ok: u64,
    pub throughput_rps: f64,
    pub latency_ms: Percentiles,
    pub over_250ms: u64,
    /// Failed requests by errorName (or the kind of transport or verification failure).
    pub errors: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

#[derive(Default)]
struct WorkerStats {
    latencies_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

impl WorkerStats {
    fn record(&mut self, latency: Duration, outcome: Result<(), String>) {
        self.latencies_us
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
        if let Err(kind) = outcome {
            *self.errors.entry(kind).or_default() += 1;
        }
    }
}

/// One request of the plan, ready to be signed and sent, with what its reply must show.
struct Sample {
    plaintext: Vec<u8>,
    aad: Vec<u8>,
    /// For Decrypt: a Decrypt body prepared from a real Encrypt reply.
    decrypt_body: Option<Vec<u8>>,
}

/// Runs the plan against the proxy behind `client`.
pub async fn run(client: Arc<XksClient>, plan: LoadPlan) -> Result<LoadReport, String> {
    let samples = Arc::new(prepare_samples(&client, &plan).await?);
    let completed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + plan.duration;

    let progress = plan.progress.then(|| {
        let completed = Arc::clone(&completed);
        let failed = Arc::clone(&failed);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            ticker.tick().await;
            let mut last = 0;
            loop {
                ticker.tick().await;
                let done = completed.load(Ordering::Relaxed);
                eprintln!(
                    "[{:>5.1}s] {done} requests, {} req/s in the last second, {} errors",
                    started.elapsed().as_secs_f64(),
                    done - last,
                    failed.load(Ordering::Relaxed)
                );
                last = done;
            }
        })
    });

    // Open loop: a schedule of tickets, each carrying the instant it was due.
    let tickets = plan.rate.map(|rate| {
        let (sender, receiver) = async_channel(plan.concurrency.max(1) * 64);
        tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            let mut due = Instant::now();
            while due < deadline {
                tokio::time::sleep_until(due.into()).await;
                // Stamped when released (the timer may wake up to 1 ms late); a ticket that then
                // waits for a free connection has that wait counted in its latency.
                if sender.send(Instant::now()).await.is_err() {
                    return;
                }
                due += period;
            }
        });
        receiver
    });

    let mut workers = Vec::with_capacity(plan.concurrency);
    for worker in 0..plan.concurrency.max(1) {
        let client = Arc::clone(&client);
        let samples = Arc::clone(&samples);
        let plan = plan.clone();
        let tickets = tickets.clone();
        let completed = Arc::clone(&completed);
        let failed = Arc::clone(&failed);
        workers.push(tokio::spawn(async move {
            let mut stats = WorkerStats::default();
            let mut connection: Option<Connection> = None;
            let mut turn = worker;
            loop {
                let scheduled = match &tickets {
                    Some(tickets) => match tickets.recv().await {
                        Some(due) => due,
                        None => break,
                    },
                    None if Instant::now() >= deadline => break,
                    None => Instant::now(),
                };
                let sample = &samples[turn % samples.len()];
                turn += 1;
                let outcome = one_request(&client, &mut connection, &plan, sample, turn).await;
                if outcome.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                completed.fetch_add(1, Ordering::Relaxed);
                stats.record(scheduled.elapsed(), outcome);
            }
            stats
        }));
    }

    let mut latencies = Vec::new();
    let mut errors = BTreeMap::new();
    for worker in workers {
        let stats = worker
            .await
            .map_err(|e| format!("a load worker failed: {e}"))?;
        latencies.extend(stats.latencies_us);
        for (kind, n) in stats.errors {
            *errors.entry(kind).or_default() += n;
        }
    }
    if let Some(progress) = progress {
        progress.abort();
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let requests = latencies.len() as u64;
    let failed_total: u64 = errors.values().sum();
    let over = latencies
        .iter()
        .filter(|&&us| u128::from(us) > KMS_TIMEOUT.as_micros())
        .count() as u64;
    Ok(LoadReport {
        operation: plan.operation,
        mode: if plan.rate.is_some() {
            "open-loop"
        } else {
            "closed-loop"
        },
        concurrency: plan.concurrency,
        target_rate: plan.rate,
        duration_s: elapsed,
        requests,
        ok: requests - failed_total,
        throughput_rps: requests as f64 / elapsed,
        latency_ms: percentiles(&latencies),
        over_250ms: over,
        errors,
    })
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

async fn one_request(
    client: &XksClient,
    connection: &mut Option<Connection>,
    plan: &LoadPlan,
    sample: &Sample,
    turn: usize,
) -> Result<(), String> {
    let key = &plan.key_id;
    match plan.operation {
        LoadOperation::Health => {
            let body = bodies::health().to_string().into_bytes();
            send(client, connection, "/health", body).await.map(|_| ())
        }
        LoadOperation::Encrypt => encrypt_checked(client, connection, key, sample)
            .await
            .map(|_| ()),
        LoadOperation::Decrypt => {
            let body = sample.decrypt_body.clone().unwrap_or_default();
            let reply = send(client, connection, &format!("/keys/{key}/decrypt"), body).await?;
            check_plaintext(&reply, &sample.plaintext)
        }
        LoadOperation::Mixed if turn.is_multiple_of(2) => {
            let body = bodies::health().to_string().into_bytes();
            send(client, connection, "/health", body).await.map(|_| ())
        }
        LoadOperation::Mixed => {
            let encrypted = encrypt_checked(client, connection, key, sample).await?;
            let body = bodies::decrypt_from(&encrypted, Some(&sample.aad))
                .to_string()
                .into_bytes();
            let reply = send(client, connection, &format!("/keys/{key}/decrypt"), body).await?;
            check_plaintext(&reply, &sample.plaintext)
        }
    }
}

async fn encrypt_checked(
    client: &XksClient,
    connection: &mut Option<Connection>,
    key: &str,
    sample: &Sample,
) -> Result<Value, String> {
    let body = bodies::encrypt(&sample.plaintext, Some(&sample.aad), false)
        .to_string()
        .into_bytes();
    let reply = send(client, connection, &format!("/keys/{key}/encrypt"), body).await?;
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
        return Err("wrong-answer".into());
    }
    Ok(reply)
}

fn check_plaintext(reply: &Value, expected: &[u8]) -> Result<(), String> {
    let plaintext = reply
        .get("plaintext")
        .and_then(Value::as_str)
        .and_then(|v| BASE64.decode(v).ok());
    if plaintext.as_deref() == Some(expected) {
        Ok(())
    } else {
        Err("wrong-answer".into())
    }
}

/// Sends on the worker's keep-alive connection, reconnecting when it is gone.
async fn send(
    client: &XksClient,
    connection: &mut Option<Connection>,
    suffix: &str,
    body: Vec<u8>,
) -> Result<Value, String> {
    let request = client
        .request(suffix, body)
        .map_err(|e| format!("signing: {e}"))?;
    if connection.is_none() {
        *connection = Some(
            client
                .connect()
                .await
                .map_err(|_| "transport:connect".to_string())?,
        );
    }
    let Some(open) = connection.as_mut() else {
        return Err("transport:connect".into());
    };
    match tokio::time::timeout(Duration::from_secs(10), open.send(request)).await {
        Ok(Ok(reply)) if reply.status.is_success() => Ok(reply.body),
        Ok(Ok(reply)) => Err(reply
            .error_name()
            .map_or_else(|| format!("http-{}", reply.status.as_u16()), str::to_owned)),
        Ok(Err(_)) => {
            *connection = None;
            Err("transport:io".into())
        }
        Err(_) => {
            *connection = None;
            Err("transport:timeout-10s".into())
        }
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
fn async_channel(capacity: usize) -> (TicketSender, TicketReceiver) {
    let (sender, receiver) = tokio::sync::mpsc::channel(capacity);
    (
        TicketSender(sender),
        TicketReceiver(Arc::new(tokio::sync::Mutex::new(receiver))),
    )
}

struct TicketSender(tokio::sync::mpsc::Sender<Instant>);

impl TicketSender {
    async fn send(&self, due: Instant) -> Result<(), ()> {
        self.0.send(due).await.map_err(|_| ())
    }
}

#[derive(Clone)]
struct TicketReceiver(Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Instant>>>);

impl TicketReceiver {
    async fn recv(&self) -> Option<Instant> {
        self.0.lock().await.recv().await
    }
}

impl LoadReport {
    /// The human-readable summary.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{:?} {} (concurrency {}{}): {} requests in {:.1} s = {:.0} req/s, {} ok\n\
             latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}\n\
             replies over 250 ms: {}\n",
            self.operation,
            self.mode,
            self.concurrency,
            self.target_rate
                .map(|r| format!(", target {r} req/s"))
                .unwrap_or_default(),
            self.requests,
            self.duration_s,
            self.throughput_rps,
            self.ok,
            self.latency_ms.p50,
            self.latency_ms.p90,
            self.latency_ms.p99,
            self.latency_ms.p99_9,
            self.latency_ms.max,
            self.over_250ms,
        );
        if self.errors.is_empty() {
            out.push_str("errors: none\n");
        } else {
            for (kind, n) in &self.errors {
                out.push_str(&format!("errors: {kind}: {n}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
