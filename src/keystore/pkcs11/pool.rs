//! The bounded worker pool that runs every PKCS#11 call off the async runtime.
//!
//! `session_pool_size` std threads each own one session of the token (opened lazily, after the
//! token's single login) and a buffer of IV bytes from the HSM's RNG. Callers hand jobs over a
//! bounded channel of `queue_depth` slots and wait for the answer on a oneshot channel:
//! - channel full: [`KeyStoreError::Busy`] at once (the API answers 429 ThrottlingException);
//! - no answer within the call timeout: [`KeyStoreError::Timeout`] (503 DependencyTimeoutException);
//!   a job still queued when its deadline passes is skipped, so an overloaded HSM is not handed
//!   work whose caller already gave up.
//!
//! [`Pool::close`] (shutdown) stops the workers, each closing its session, and waits for them.
//!
//! [`Worker::call`] runs one PKCS#11 call on the worker's session. If the call reports that the
//! session, token or module is gone, the whole pool is dropped ([`Token::invalidate`]), the worker
//! reconnects (logging in again) and retries once; [`Worker::recovered`] then tells the health
//! check that the answer came only after a recovery.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::error::Error;
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::errors::{describe, is_connection_lost, spoils_session, to_keystore_error};
use super::token::Token;
use crate::keystore::{IV_LEN, KeyStoreError};

/// IVs fetched from the HSM's RNG per `C_GenerateRandom`.
const IV_BATCH: usize = 64;

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

    /// Runs one PKCS#11 call on this worker's session. A lost connection drops the pool,
    /// reconnects and retries once.
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
                    if attempt >= 2 {
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

/// The worker threads of one token and the bounded queue that feeds them.
pub(crate) struct Pool {
    queue: SyncSender<Envelope>,
    workers: usize,
    depth: usize,
    /// Calls queued or running now.
    in_use: Arc<AtomicUsize>,
    /// Set by [`Pool::close`]: workers exit after their next job.
    stopping: Arc<AtomicBool>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Pool {
    /// Starts `workers` threads fed by a queue of `depth` slots.
    pub(crate) fn start(token: Arc<Token>, workers: usize, depth: usize) -> Result<Self, String> {
        let (queue, rx) = sync_channel::<Envelope>(depth);
        let rx = Arc::new(Mutex::new(rx));
        let in_use = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers {
            let worker = Worker {
                token: Arc::clone(&token),
                session: None,
                ivs: Vec::new(),
                last_iv: None,
                recovered: false,
            };
            let rx = Arc::clone(&rx);
            let in_use = Arc::clone(&in_use);
            let stopping = Arc::clone(&stopping);
            let thread = std::thread::Builder::new()
                .name(format!("xks-pkcs11-{i}"))
                .spawn(move || work(rx, worker, &in_use, &stopping))
                .map_err(|e| {
                    format!("pkcs11.session_pool_size: cannot start a worker thread: {e}")
                })?;
            threads.push(thread);
        }
        Ok(Self {
            queue,
            workers,
            depth,
            in_use,
            stopping,
            threads: Mutex::new(threads),
        })
    }

    /// Stops every worker (each closes its session as it exits) and waits up to `within` for
    /// them. Blocking. Returns how many stopped; a worker stuck in a hung HSM call is left behind.
    /// Calls made after this answer `Unavailable`.
    pub(crate) fn close(&self, within: Duration) -> usize {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return 0; // already closed
        }
        let deadline = Instant::now() + within;
        // One wake-up per worker: a worker exits after the first job it takes from now on.
        let mut woken = 0;
        while woken < self.workers && Instant::now() < deadline {
            let wake_up = Envelope {
                deadline: Instant::now(), // already due: skipped, not run
                job: Box::new(|_| {}),
            };
            self.in_use.fetch_add(1, Ordering::Relaxed);
            match self.queue.try_send(wake_up) {
                Ok(()) => woken += 1,
                Err(TrySendError::Full(_)) => {
                    self.in_use.fetch_sub(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.in_use.fetch_sub(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        let Ok(mut threads) = self.threads.lock() else {
            return 0;
        };
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut stopped = 0;
        for thread in std::mem::take(&mut *threads) {
            if thread.is_finished() && thread.join().is_ok() {
                stopped += 1;
            }
        }
        stopped
    }

    /// Calls queued or running, and how many there may be before `Busy`.
    pub(crate) fn occupancy(&self) -> (usize, usize) {
        (
            self.in_use.load(Ordering::Relaxed),
            self.depth + self.workers,
        )
    }

    /// Runs `f` on a worker and waits at most `timeout` for its answer.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&mut Worker) -> T + Send + 'static,
    ) -> Result<T, KeyStoreError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(KeyStoreError::Unavailable(
                "the HSM worker pool is closed (shutting down)".into(),
            ));
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let deadline = Instant::now() + timeout;
        let job: Job = Box::new(move |worker| {
            if !reply.is_closed() {
                let _ = reply.send(f(worker));
            }
        });
        // Counted before it is queued: a worker may finish it before try_send returns.
        self.in_use.fetch_add(1, Ordering::Relaxed);
        let queued = self.queue.try_send(Envelope { deadline, job });
        if queued.is_err() {
            self.in_use.fetch_sub(1, Ordering::Relaxed);
        }
        match queued {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(KeyStoreError::Busy),
            Err(TrySendError::Disconnected(_)) => {
                return Err(KeyStoreError::Unavailable(
                    "the HSM worker pool has stopped".into(),
                ));
            }
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) if Instant::now() >= deadline => Err(KeyStoreError::Timeout),
            Ok(Err(_)) => Err(KeyStoreError::Internal(
                "an HSM worker dropped the call".into(),
            )),
            Err(_) => Err(KeyStoreError::Timeout),
        }
    }

    /// Occupies every worker for `duration` (as a slow or hung HSM would). For tests and drills.
    pub(crate) fn stall(&self, duration: Duration) {
        for _ in 0..self.workers {
            let deadline = Instant::now() + duration + Duration::from_secs(1);
            let job: Job = Box::new(move |_| std::thread::sleep(duration));
            self.in_use.fetch_add(1, Ordering::Relaxed);
            if self.queue.try_send(Envelope { deadline, job }).is_err() {
                self.in_use.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

fn work(
    rx: Arc<Mutex<Receiver<Envelope>>>,
    mut worker: Worker,
    in_use: &AtomicUsize,
    stopping: &AtomicBool,
) {
    loop {
        let next = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(envelope) = next else {
            return; // the pool is gone
        };
        if Instant::now() < envelope.deadline {
            worker.recovered = false;
            let job = envelope.job;
            if std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut worker))).is_err() {
                tracing::error!("an HSM job panicked; its session is closed");
                worker.session = None;
            }
        } // else the caller has already been told Timeout
        in_use.fetch_sub(1, Ordering::Relaxed);
        if stopping.load(Ordering::Acquire) {
            return; // dropping the worker closes its session
        }
    }
}
