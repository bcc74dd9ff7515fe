//! Admission control: under overload, answer what can be answered in time and refuse the rest
//! at once, instead of letting every request go late.
//!
//! A KMS-like client sends one request at a time per HTTP/1.1 connection, gives up after 250 ms
//! and reconnects. Past capacity, a server that reads every connection fairly makes every request
//! late, and every late request costs a new TLS handshake. So:
//!
//! - **A concurrency limit on requests being served**, adapted to measured latency (AIMD): every
//!   [`WINDOW`], if the slowest tenth of requests took longer than [`TARGET_LATENCY`] (from the
//!   first byte of the request head to the end of the answer) *while the runtime lags* (a probe
//!   task ticking every [`LAG_PROBE`] runs more than [`CPU_SATURATED_LAG`] late: the CPU is the
//!   bottleneck), the limit shrinks to three quarters; if the limit was nearly used up and
//!   requests were fast, it grows by an eighth. A slow HSM does not shrink it: the PKCS#11 pool
//!   refuses what it cannot start in time on its own. A connection reads its next request head
//!   only with a permit.
//! - **Quick refusals.** A connection that waits [`QUEUE_WAIT`] without a permit reads its request
//!   anyway and gets 429 ThrottlingException at once, before authentication and parsing (the
//!   cheap path, [`crate::api::Api::overloaded`]).
//! - **Handshakes paced.** While connections wait for permits, the accept loop takes at most
//!   [`HANDSHAKES_WHILE_OVERLOADED`] new connections a second: established connections keep the
//!   CPU that new TLS handshakes would take.
//!
//! HTTP/2 connections are bounded by `max_in_flight_requests` and their stream limit only.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The latency the limit is steered to keep the slowest tenth of requests under.
pub(super) const TARGET_LATENCY: Duration = Duration::from_millis(50);
/// How long a connection waits for a permit before its request is refused.
pub(super) const QUEUE_WAIT: Duration = Duration::from_millis(2);
/// How often the limit is reconsidered.
const WINDOW: Duration = Duration::from_millis(100);
/// How often the runtime-lag probe ticks.
pub(super) const LAG_PROBE: Duration = Duration::from_millis(10);
/// A probe this late (the worst of the current window) means the CPU is saturated.
const CPU_SATURATED_LAG: Duration = Duration::from_millis(5);
/// New connections accepted per second while requests wait for permits.
pub(super) const HANDSHAKES_WHILE_OVERLOADED: u32 = 100;
/// The limit starts here and never goes below [`MIN_LIMIT`].
const INITIAL_LIMIT: usize = 64;
const MIN_LIMIT: usize = 4;

/// Latency samples of the current window.
struct Window {
    started: Instant,
    latencies_us: Vec<u32>,
    peak_in_use: usize,
}

/// The shared admission state of the server.
pub(super) struct Admission {
    permits: Arc<Semaphore>,
    limit: AtomicUsize,
    max_limit: usize,
    /// Permits to take out of circulation as they come back (after a decrease).
    debt: AtomicUsize,
    in_use: AtomicUsize,
    waiting: AtomicUsize,
    refused: AtomicU64,
    /// The latest probe's lateness, in µs (the worst since the last window).
    lag_us: AtomicU64,
    window: Mutex<Window>,
}

/// A request's place among those being served; given back (or retired) on drop.
pub(super) struct Permit {
    admission: Arc<Admission>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Permit {
    /// Whether the request holds a place (else it is to be refused).
    pub(super) fn is_admitted(&self) -> bool {
        self.permit.is_some()
    }

    /// Records how long the admitted request took (see [`Admission::observe`]).
    pub(super) fn observe(&self, latency: Duration) {
        self.admission.observe(latency);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.in_use.fetch_sub(1, Ordering::Relaxed);
        let Some(permit) = self.permit.take() else {
            return;
        };
        let retire = self
            .admission
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if retire {
            permit.forget();
        }
    }
}

/// Counts a connection waiting for a permit while it lives.
pub(super) struct Waiting(Arc<Admission>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// `max_limit` is `max_in_flight_requests`.
    pub(super) fn new(max_limit: usize) -> Arc<Self> {
        let initial = INITIAL_LIMIT.min(max_limit).max(1);
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(initial)),
            limit: AtomicUsize::new(initial),
            max_limit: max_limit.max(1),
            debt: AtomicUsize::new(0),
            in_use: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            lag_us: AtomicU64::new(0),
            window: Mutex::new(Window {
                started: Instant::now(),
                latencies_us: Vec::with_capacity(1024),
                peak_in_use: 0,
            }),
        })
    }

    /// Measures how late the runtime runs a task that asks to wake every [`LAG_PROBE`], until
    /// the runtime shuts down. Spawned once by the server.
    pub(super) async fn probe_lag(self: Arc<Self>) {
        let mut due = tokio::time::Instant::now() + LAG_PROBE;
        loop {
            tokio::time::sleep_until(due).await;
            let late = tokio::time::Instant::now().saturating_duration_since(due);
            let late = u64::try_from(late.as_micros()).unwrap_or(u64::MAX);
            self.lag_us.fetch_max(late, Ordering::Relaxed);
            due = tokio::time::Instant::now() + LAG_PROBE;
        }
    }

    pub(super) fn semaphore(&self) -> Arc<Semaphore> {
        Arc::clone(&self.permits)
    }

    /// Marks a connection as waiting for a permit until the guard drops.
    pub(super) fn waiting(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(Arc::clone(self))
    }

    /// Whether connections wait for permits now (the accept loop paces handshakes then).
    pub(super) fn overloaded(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// A request admitted with `permit` (or, without one, to be refused).
    pub(super) fn admit(self: &Arc<Self>, permit: Option<OwnedSemaphorePermit>) -> Permit {
        let in_use = self.in_use.fetch_add(1, Ordering::Relaxed) + 1;
        if permit.is_none() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        } else if let Ok(mut window) = self.window.lock() {
            window.peak_in_use = window.peak_in_use.max(in_use);
        }
        Permit {
            admission: Arc::clone(self),
            permit,
        }
    }

    /// The current limit and the requests refused so far, for metrics.
    #[cfg(test)]
    pub(super) fn state(&self) -> (usize, u64) {
        (
            self.limit.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    /// Records how long an admitted request took, and reconsiders the limit once a window is over.
    pub(super) fn observe(&self, latency: Duration) {
        let Ok(mut window) = self.window.lock() else {
            return;
        };
        window
            .latencies_us
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
        if window.started.elapsed() < WINDOW || window.latencies_us.len() < 10 {
            return;
        }
        let n = window.latencies_us.len();
        let slow_tenth = *window.latencies_us.select_nth_unstable(n - n / 10 - 1).1;
        let peak = window.peak_in_use;
        window.latencies_us.clear();
        window.peak_in_use = 0;
        window.started = Instant::now();
        drop(window);
        let limit = self.limit.load(Ordering::Relaxed);
        let lag = Duration::from_micros(self.lag_us.swap(0, Ordering::Relaxed));
        let new = next_limit(
            limit,
            Duration::from_micros(u64::from(slow_tenth)),
            lag,
            peak,
            self.max_limit,
        );
        if new > limit {
            self.permits.add_permits(new - limit);
        } else if new < limit {
            let forgotten = self.permits.forget_permits(limit - new);
            self.debt
                .fetch_add(limit - new - forgotten, Ordering::AcqRel);
        }
        if new != limit {
            self.limit.store(new, Ordering::Relaxed);
            tracing::debug!(
                from = limit,
                to = new,
                slow_tenth_us = slow_tenth,
                "admission limit changed"
            );
        }
    }
}

/// The AIMD step: shrink to 3/4 when the slowest tenth is over target while the runtime lags
/// (the CPU, not the HSM, is slow), grow by 1/8 when the limit was nearly used up and requests
/// were fast, else keep it.
fn next_limit(
    limit: usize,
    slow_tenth: Duration,
    lag: Duration,
    peak_in_use: usize,
    max: usize,
) -> usize {
    if slow_tenth > TARGET_LATENCY && lag > CPU_SATURATED_LAG {
        (limit * 3 / 4).max(MIN_LIMIT).min(max)
    } else if slow_tenth > TARGET_LATENCY {
        limit // slow for another reason (the HSM): more concurrency would not help either
    } else if peak_in_use * 4 >= limit * 3 {
        (limit + (limit / 8).max(1)).min(max)
    } else {
        limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_shrinks_when_slow_and_grows_when_used_and_fast() {
        let slow = TARGET_LATENCY * 2;
        let fast = TARGET_LATENCY / 10;
        let lagging = CPU_SATURATED_LAG * 2;
        let prompt = Duration::ZERO;
        assert_eq!(next_limit(64, slow, lagging, 64, 1024), 48);
        assert_eq!(next_limit(5, slow, lagging, 5, 1024), MIN_LIMIT);
        assert_eq!(
            next_limit(64, slow, prompt, 64, 1024),
            64,
            "a slow HSM, not the CPU"
        );
        assert_eq!(next_limit(64, fast, prompt, 60, 1024), 72);
        assert_eq!(next_limit(1020, fast, prompt, 1020, 1024), 1024);
        assert_eq!(
            next_limit(64, fast, prompt, 10, 1024),
            64,
            "no demand, no growth"
        );
    }

    #[tokio::test]
    async fn a_decrease_retires_permits_as_they_come_back() {
        let admission = Admission::new(1024);
        let semaphore = admission.semaphore();
        let held: Vec<_> = (0..INITIAL_LIMIT)
            .map(|_| admission.admit(Arc::clone(&semaphore).try_acquire_owned().ok()))
            .collect();
        assert_eq!(semaphore.available_permits(), 0);
        {
            let mut window = admission.window.lock().unwrap();
            window.started = Instant::now() - WINDOW;
        }
        admission
            .lag_us
            .store(CPU_SATURATED_LAG.as_micros() as u64 * 2, Ordering::Relaxed);
        for _ in 0..10 {
            admission.observe(TARGET_LATENCY * 2);
        }
        assert_eq!(admission.state().0, 48);
        drop(held);
        assert_eq!(semaphore.available_permits(), 48);
    }
}
