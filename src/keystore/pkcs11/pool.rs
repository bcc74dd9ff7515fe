//! The worker pool that runs every PKCS#11 call off the async runtime, sized by the HSM's latency
//! rather than by the CPU count, and healing itself when calls hang.
//!
//! **Sessions.** Each worker is a std thread owning one session of the token (all under the
//! token's single login). A few start with the pool and open their session at once (warm); more
//! start on demand, when a job finds no idle worker, up to `max_sessions`; they stay open.
//!
//! **Admission.** Callers hand jobs to one queue of at most `queue_depth` and wait on a oneshot
//! channel until their deadline: the request's own deadline ([`crate::deadline`]) capped by the
//! call timeout. A job is refused at once with [`KeyStoreError::Busy`] (429) when no worker is
//! idle, no more may start, and either the queue is full or the wait it would have (jobs ahead ×
//! measured service time ÷ workers) ends past its deadline. A job whose deadline passes while it
//! is queued is dropped from the queue, never handed to the HSM; its caller gets
//! [`KeyStoreError::Timeout`] (503).
//!
//! **Stuck workers.** A worker whose job has run for `stuck_after` (a multiple of the call timeout)
//! is abandoned: it stops counting against `max_sessions`, so a replacement can start, with at most
//! `2 × max_sessions` threads alive in all. An abandoned worker whose call returns closes its
//! session and exits. [`Pool::stalled`] tells health checks that work waits while no call has
//! completed for `stuck_after` (UNAVAILABLE, not DEGRADED).
//!
//! [`Worker::call`] runs one PKCS#11 call on the worker's session. If the call reports that the
//! session, token or module is gone, the whole pool is dropped ([`Token::invalidate`]) and the
//! worker reconnects (logging in again). The call is retried once on the fresh session only when
//! that is safe: never an encryption whose output the HSM may have produced, nor a key or object
//! creation; a decryption or a read always. [`Worker::recovered`] then tells the health check that
//! the answer came only after a recovery.
//!
//! [`Pool::close`] (shutdown) stops the workers, each closing its session, and waits for them.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::Error;
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::errors::{describe, is_connection_lost, spoils_session, to_keystore_error};
use super::token::Token;
use crate::keystore::{IV_LEN, KeyStoreError};

/// IVs fetched from the HSM's RNG per `C_GenerateRandom`.
const IV_BATCH: usize = 64;

/// How often an idle worker wakes to look at the stop flag.
const IDLE_WAKE: Duration = Duration::from_millis(500);

/// Why [`Worker::call`] failed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// No usable session (token gone, login refused...).
    NoSession(KeyStoreError),
    /// The call itself failed; the caller decides what the return value means.
    Hsm(Error),
}

impl CallError {
    /// The key-store error for a failure with no more specific meaning.
    pub(crate) fn into_keystore(self) -> KeyStoreError {
        match self {
            CallError::NoSession(e) => e,
            CallError::Hsm(e) => to_keystore_error(&e),
        }
    }
}

/// Whether a call that failed because the connection was lost may run again on a new session:
/// not when the HSM may already have produced its output (an encryption: the IV is spent) or
/// created something.
fn retry_is_safe(err: &Error) -> bool {
    let Error::Pkcs11(_, function) = err else {
        return true;
    };
    !matches!(
        function,
        Function::Encrypt
            | Function::EncryptUpdate
            | Function::EncryptFinal
            | Function::EncryptMessage
            | Function::EncryptMessageNext
            | Function::MessageEncryptFinal
            | Function::GenerateKey
            | Function::CreateObject
            | Function::DestroyObject
    )
}

/// How many sessions, how deep a queue, when a worker counts as stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolSettings {
    /// Workers started (and sessions opened) with the pool.
    pub warm_sessions: usize,
    /// The most workers (sessions) serving at once.
    pub max_sessions: usize,
    pub queue_depth: usize,
    /// A job running this long marks its worker stuck.
    pub stuck_after: Duration,
}

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

struct Envelope {
    deadline: Instant,
    job: Job,
}

/// One worker thread's state: its session (with the generation and slot it was opened under),
/// its unused IV bytes and the last IV an encryption on it returned.
pub(crate) struct Worker {
    token: Arc<Token>,
    session: Option<(u64, Slot, Session)>,
    ivs: Vec<u8>,
    last_iv: Option<[u8; IV_LEN]>,
    recovered: bool,
}

impl Worker {
    /// True if a call of the current job succeeded only after the pool was re-established.
    pub(crate) fn recovered(&self) -> bool {
        self.recovered
    }

    /// This worker's session under the live connection, opening one if needed.
    fn session(&mut self) -> Result<(u64, Slot, &Session), KeyStoreError> {
        let live = self.token.live_generation();
        if self.session.as_ref().is_some_and(|(g, _, _)| *g != live) {
            self.session = None; // closes the old session (errors are ignored by cryptoki)
        }
        if self.session.is_none() {
            let (generation, slot) = self.token.connect().map_err(KeyStoreError::Unavailable)?;
            match self.token.ctx().open_rw_session(slot) {
                Ok(session) => self.session = Some((generation, slot, session)),
                Err(e) => {
                    if is_connection_lost(&e) {
                        self.token.invalidate(generation, &describe(&e));
                    }
                    return Err(KeyStoreError::Unavailable(format!(
                        "cannot open a session: {}",
                        describe(&e)
                    )));
                }
            }
        }
        match &self.session {
            Some((generation, slot, session)) => Ok((*generation, *slot, session)),
            None => Err(KeyStoreError::Unavailable("no session".into())),
        }
    }

    /// Runs one PKCS#11 call on this worker's session. A lost connection drops the pool and
    /// reconnects; the call is retried once on the new session when [`retry_is_safe`].
    pub(crate) fn call<T>(
        &mut self,
        mut f: impl FnMut(&Session) -> Result<T, Error>,
    ) -> Result<T, CallError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (generation, _, session) = self.session().map_err(CallError::NoSession)?;
            match f(session) {
                Ok(value) => {
                    if attempt > 1 {
                        self.recovered = true;
                    }
                    return Ok(value);
                }
                Err(e) if is_connection_lost(&e) => {
                    self.session = None;
                    self.token.invalidate(generation, &describe(&e));
                    if attempt >= 2 || !retry_is_safe(&e) {
                        return Err(CallError::Hsm(e));
                    }
                }
                Err(e) => {
                    if spoils_session(&e) {
                        self.session = None;
                    }
                    return Err(CallError::Hsm(e));
                }
            }
        }
    }

    /// Runs `f` with the module, slot and session of this worker (for a probe that makes several
    /// calls and judges their return values itself).
    pub(crate) fn with_session<T>(
        &mut self,
        f: impl FnOnce(&Pkcs11, Slot, &Session) -> T,
    ) -> Result<T, CallError> {
        let token = Arc::clone(&self.token);
        let (_, slot, session) = self.session().map_err(CallError::NoSession)?;
        Ok(f(token.ctx(), slot, session))
    }

    /// Records the IV an encryption on this session returned; the same IV twice in a row is an
    /// error (an HSM that does not fill in the IV, or fills in a constant).
    pub(crate) fn accept_iv(&mut self, iv: &[u8]) -> Result<(), String> {
        let Ok(iv) = <[u8; IV_LEN]>::try_from(iv) else {
            return Err(format!("the HSM reported a {}-byte IV", iv.len()));
        };
        if self.last_iv == Some(iv) {
            return Err("the HSM reported the same IV as for the previous encryption".into());
        }
        self.last_iv = Some(iv);
        Ok(())
    }

    /// A fresh 12-byte IV from the HSM's RNG, taken from a per-worker batch (never reused).
    pub(crate) fn next_iv(&mut self) -> Result<[u8; IV_LEN], CallError> {
        if self.ivs.len() < IV_LEN {
            let mut batch = vec![0u8; IV_LEN * IV_BATCH];
            self.call(|s| s.generate_random_slice(&mut batch))?;
            self.ivs = batch;
        }
        let start = self.ivs.len() - IV_LEN;
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&self.ivs[start..]);
        self.ivs.truncate(start);
        Ok(iv)
    }
}

/// What the stuck-worker check sees of one worker.
#[derive(Default)]
struct WorkerState {
    /// When its current job counts as stuck, in ms since the pool's epoch; 0 while idle. That is
    /// `stuck_after` after the job started, or its own deadline if later (key management).
    stuck_at_ms: AtomicU64,
    abandoned: AtomicBool,
}

/// The queue and the worker counts, under one lock.
#[derive(Default)]
struct Queue {
    jobs: VecDeque<Envelope>,
    /// Workers waiting for a job, and how many of them a submitter has already woken.
    waiting: usize,
    woken: usize,
    /// Workers counted against `max_sessions` (live and not abandoned).
    serving: usize,
    /// Every worker thread still alive, abandoned ones included.
    threads: usize,
}

struct Shared {
    token: Arc<Token>,
    settings: PoolSettings,
    queue: Mutex<Queue>,
    wake: Condvar,
    workers: Mutex<Vec<Arc<WorkerState>>>,
    handles: Mutex<Vec<std::thread::JoinHandle<()>>>,
    stopping: AtomicBool,
    epoch: Instant,
    /// Jobs queued or running now.
    in_use: AtomicUsize,
    last_completion_ms: AtomicU64,
    /// Moving average of a job's run time, in µs.
    service_us: AtomicU64,
    last_stuck_check_ms: AtomicU64,
    next_worker: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        // +1: 0 means "idle" in WorkerState.
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

/// The worker threads of one token and the queue that feeds them.
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    /// Starts the warm workers; the rest start on demand.
    pub(crate) fn start(token: Arc<Token>, settings: PoolSettings) -> Result<Self, String> {
        let shared = Arc::new(Shared {
            token,
            settings,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            workers: Mutex::new(Vec::new()),
            handles: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            epoch: Instant::now(),
            in_use: AtomicUsize::new(0),
            last_completion_ms: AtomicU64::new(0),
            service_us: AtomicU64::new(0),
            last_stuck_check_ms: AtomicU64::new(0),
            next_worker: AtomicUsize::new(0),
        });
        let pool = Self { shared };
        for _ in 0..settings.warm_sessions.min(settings.max_sessions) {
            {
                let mut queue = pool.shared.lock();
                queue.serving += 1;
                queue.threads += 1;
            }
            pool.spawn_worker()
                .map_err(|e| format!("pkcs11.session_pool_size: cannot start a worker: {e}"))?;
        }
        Ok(pool)
    }

    /// Starts one worker thread, already counted in `serving` and `threads`.
    fn spawn_worker(&self) -> Result<(), String> {
        let shared = Arc::clone(&self.shared);
        let state = Arc::new(WorkerState::default());
        let n = shared.next_worker.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name(format!("xks-pkcs11-{n}"))
            .spawn({
                let state = Arc::clone(&state);
                let shared = Arc::clone(&shared);
                move || work(shared, state)
            });
        match spawned {
            Ok(handle) => {
                if let Ok(mut workers) = shared.workers.lock() {
                    workers.retain(|w| Arc::strong_count(w) > 1);
                    workers.push(state);
                }
                if let Ok(mut handles) = shared.handles.lock() {
                    handles.retain(|h| !h.is_finished());
                    handles.push(handle);
                }
                Ok(())
            }
            Err(e) => {
                let mut queue = shared.lock();
                queue.serving -= 1;
                queue.threads -= 1;
                Err(e.to_string())
            }
        }
    }

    /// Abandons workers whose job has run past `stuck_after` (at most a few times a second).
    fn abandon_stuck_workers(&self) {
        let shared = &self.shared;
        let now = shared.now_ms();
        let stuck_ms = shared.settings.stuck_after.as_millis() as u64;
        let last = shared.last_stuck_check_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < (stuck_ms / 4).max(1)
            || shared
                .last_stuck_check_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let Ok(workers) = shared.workers.lock() else {
            return;
        };
        let mut abandoned = 0;
        for worker in workers.iter() {
            let stuck_at = worker.stuck_at_ms.load(Ordering::Acquire);
            if stuck_at != 0 && now > stuck_at && !worker.abandoned.swap(true, Ordering::AcqRel) {
                abandoned += 1;
            }
        }
        drop(workers);
        if abandoned > 0 {
            let mut queue = shared.lock();
            queue.serving = queue.serving.saturating_sub(abandoned);
            let threads = queue.threads;
            drop(queue);
            tracing::warn!(
                token = %shared.token.selector(),
                abandoned,
                threads,
                stuck_after_ms = stuck_ms,
                "pkcs11 workers stuck in an HSM call were abandoned; new sessions replace them"
            );
        }
    }

    /// Whether work waits while no HSM call has completed for `stuck_after`: how long since the
    /// last completion, if so.
    pub(crate) fn stalled(&self) -> Option<Duration> {
        let shared = &self.shared;
        self.abandon_stuck_workers();
        if shared.in_use.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let now = shared.now_ms();
        let last = shared.last_completion_ms.load(Ordering::Relaxed);
        let since = Duration::from_millis(now.saturating_sub(last));
        let some_stuck = shared.workers.lock().is_ok_and(|workers| {
            workers.iter().any(|w| {
                let stuck_at = w.stuck_at_ms.load(Ordering::Acquire);
                stuck_at != 0 && now > stuck_at
            })
        });
        (since > shared.settings.stuck_after && some_stuck).then_some(since)
    }

    /// Stops every worker (each closes its session as it exits) and waits up to `within` for
    /// them. Blocking. Returns how many stopped; a worker stuck in a hung HSM call is left behind.
    /// Calls made after this answer `Unavailable`.
    pub(crate) fn close(&self, within: Duration) -> usize {
        let shared = &self.shared;
        if shared.stopping.swap(true, Ordering::AcqRel) {
            return 0; // already closed
        }
        let deadline = Instant::now() + within;
        shared.wake.notify_all();
        let handles = match shared.handles.lock() {
            Ok(mut handles) => std::mem::take(&mut *handles),
            Err(_) => return 0,
        };
        while handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        handles
            .into_iter()
            .filter(|h| h.is_finished())
            .filter_map(|h| h.join().ok())
            .count()
    }

    /// Calls queued or running, and how many there may be before `Busy`.
    pub(crate) fn occupancy(&self) -> (usize, usize) {
        let settings = &self.shared.settings;
        (
            self.shared.in_use.load(Ordering::Relaxed),
            settings.queue_depth + settings.max_sessions,
        )
    }

    /// Queues `f` for a worker, or says at once why it cannot be served in time.
    fn submit(&self, deadline: Instant, job: Job) -> Result<(), KeyStoreError> {
        let shared = &self.shared;
        let settings = shared.settings;
        let now = Instant::now();
        if deadline <= now {
            return Err(KeyStoreError::Busy); // no time left to wait for anything
        }
        self.abandon_stuck_workers();
        let mut queue = shared.lock();
        let idle = queue.waiting.saturating_sub(queue.woken);
        let mut start_worker = false;
        if idle == 0 {
            if queue.serving < settings.max_sessions && queue.threads < 2 * settings.max_sessions {
                queue.serving += 1;
                queue.threads += 1;
                start_worker = true;
            } else {
                if queue.jobs.len() >= settings.queue_depth {
                    let before = queue.jobs.len();
                    queue.jobs.retain(|envelope| envelope.deadline > now);
                    let dropped = before - queue.jobs.len();
                    shared.in_use.fetch_sub(dropped, Ordering::Relaxed);
                }
                if queue.jobs.len() >= settings.queue_depth {
                    return Err(KeyStoreError::Busy);
                }
                let service = Duration::from_micros(shared.service_us.load(Ordering::Relaxed));
                let ahead = queue.jobs.len() as u32 + 1;
                let wait = service * ahead / queue.serving.max(1) as u32;
                if now + wait > deadline {
                    return Err(KeyStoreError::Busy);
                }
            }
        } else {
            queue.woken += 1;
        }
        queue.jobs.push_back(Envelope { deadline, job });
        shared.in_use.fetch_add(1, Ordering::Relaxed);
        drop(queue);
        if start_worker {
            if let Err(e) = self.spawn_worker() {
                tracing::warn!(error = %e, "cannot start another pkcs11 worker");
            }
        } else {
            shared.wake.notify_one();
        }
        Ok(())
    }

    /// Runs `f` on a worker and waits for its answer until `timeout` from now, or the request's
    /// deadline if that comes first.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&mut Worker) -> T + Send + 'static,
    ) -> Result<T, KeyStoreError> {
        if self.shared.stopping.load(Ordering::Relaxed) {
            return Err(KeyStoreError::Unavailable(
                "the HSM worker pool is closed (shutting down)".into(),
            ));
        }
        let deadline = crate::deadline::cap(Instant::now() + timeout);
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |worker| {
            if !reply.is_closed() {
                let _ = reply.send(f(worker));
            }
        });
        self.submit(deadline, job)?;
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) if Instant::now() >= deadline => Err(KeyStoreError::Timeout),
            Ok(Err(_)) => Err(KeyStoreError::Internal(
                "an HSM worker dropped the call".into(),
            )),
            Err(_) => Err(KeyStoreError::Timeout),
        }
    }

    /// Occupies every worker the pool may have for `duration` (as a slow or hung HSM would). For
    /// tests and drills.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn stall(&self, duration: Duration) {
        for _ in 0..self.shared.settings.max_sessions {
            let deadline = Instant::now() + duration + Duration::from_secs(1);
            let job: Job = Box::new(move |_| std::thread::sleep(duration));
            let _ = self.submit(deadline, job);
        }
    }
}

/// A worker thread: opens its session, then runs jobs until the pool stops or abandons it.
fn work(shared: Arc<Shared>, state: Arc<WorkerState>) {
    let mut worker = Worker {
        token: Arc::clone(&shared.token),
        session: None,
        ivs: Vec::new(),
        last_iv: None,
        recovered: false,
    };
    let stuck_ms = shared.settings.stuck_after.as_millis() as u64;
    state
        .stuck_at_ms
        .store(shared.now_ms() + stuck_ms, Ordering::Release);
    let _ = worker.session(); // warm; a failure shows on the first job
    state.stuck_at_ms.store(0, Ordering::Release);
    while let Some(envelope) = next_job(&shared, &state) {
        let allowed = envelope
            .deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        state
            .stuck_at_ms
            .store(shared.now_ms() + stuck_ms.max(allowed), Ordering::Release);
        let started = Instant::now();
        worker.recovered = false;
        let job = envelope.job;
        if std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut worker))).is_err() {
            tracing::error!("an HSM job panicked; its session is closed");
            worker.session = None;
        }
        state.stuck_at_ms.store(0, Ordering::Release);
        shared.in_use.fetch_sub(1, Ordering::Relaxed);
        shared
            .last_completion_ms
            .store(shared.now_ms(), Ordering::Relaxed);
        // A moving average over about 16 jobs.
        let took = started.elapsed().as_micros() as u64;
        let old = shared.service_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            took
        } else {
            old - old / 16 + took / 16
        };
        shared.service_us.store(new, Ordering::Relaxed);
    }
    let mut queue = shared.lock();
    queue.threads -= 1;
    if !state.abandoned.load(Ordering::Acquire) {
        queue.serving = queue.serving.saturating_sub(1);
    }
    // Dropping the worker closes its session.
}

/// The next job whose deadline has not passed, or `None` when the worker must exit (the pool
/// stops, or abandoned it).
fn next_job(shared: &Shared, state: &WorkerState) -> Option<Envelope> {
    let mut queue = shared.lock();
    loop {
        if shared.stopping.load(Ordering::Acquire) || state.abandoned.load(Ordering::Acquire) {
            return None;
        }
        let now = Instant::now();
        while let Some(envelope) = queue.jobs.pop_front() {
            if envelope.deadline > now {
                return Some(envelope);
            }
            // Its caller has been told Timeout already: not handed to the HSM.
            shared.in_use.fetch_sub(1, Ordering::Relaxed);
        }
        queue.waiting += 1;
        queue = match shared.wake.wait_timeout(queue, IDLE_WAKE) {
            Ok((queue, _)) => queue,
            Err(poisoned) => poisoned.into_inner().0,
        };
        queue.waiting -= 1;
        queue.woken = queue.woken.saturating_sub(1);
    }
}
