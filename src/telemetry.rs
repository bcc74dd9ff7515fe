//! Diagnostic logging with `tracing`: one line per request (see `api`), start-up, reloads and
//! health changes. Text or JSON lines on stderr. Nothing logs plaintext, key material, PINs,
//! secrets or signatures.
//!
//! The level: `server.log_level` in the config file when it is set (applied at start and by every
//! reload, see [`apply_level`]), otherwise `RUST_LOG`, otherwise `--log-level`.
//!
//! This module also owns how both logs (this one and the audit log, [`crate::audit`]) reach their
//! sinks, through [`LineQueue`]: a bounded queue and a writer thread (`tracing-appender`), so a
//! request never waits on a `write(2)`. When a sink stalls (a pipe nobody reads, a hung disk) and
//! its queue is full, further lines are dropped rather than making requests wait: a stalled log
//! must not become an outage. Every lost line is counted, per log ([`lines_lost`], exposed as
//! `xks_log_lines_dropped_total{log}`), with the lines a sink failed to take (a write error), and
//! reported by a WARN on this log at most every [`LOSS_REPORT_INTERVAL`], written only while this
//! log's sink takes lines (a report into a stalled sink would only be lost as well). Colours only
//! when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The installed filter, and the one the process started with (`RUST_LOG` or `--log-level`).
struct LevelControl {
    handle: reload::Handle<EnvFilter, Registry>,
    at_start: String,
    current: Mutex<String>,
}

static LEVEL: OnceLock<LevelControl> = OnceLock::new();

/// Checks a filter directive such as `info` or `warn,xks_proxy=debug`.
pub fn parse_level(directive: &str) -> Result<EnvFilter, String> {
    // EnvFilter takes a bare word as a target name; here each part must name a level.
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let names_a_level = |part: &str| {
        let level = part.rsplit('=').next().unwrap_or(part).trim();
        LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level))
    };
    if directive.trim().is_empty() || !directive.split(',').all(names_a_level) {
        return Err(format!(
            "{directive:?} is not a log filter such as \"info\" or \"warn,xks_proxy=debug\""
        ));
    }
    EnvFilter::builder()
        .with_regex(false)
        .parse(directive)
        .map_err(|e| format!("{directive:?} is not a log filter such as \"info\": {e}"))
}

/// Lines the diagnostic log's queue holds while its sink is slow; beyond them lines are dropped
/// (and counted). At KMS's 1800 requests/s per key store that is 9 s of request lines.
pub const LOG_QUEUE_LINES: usize = 16_384;

/// Installs the global subscriber. `level` is an `EnvFilter` directive such as `info`.
/// Keep the returned queue alive until exit: dropping it flushes the remaining lines.
pub fn init(format: LogFormat, level: &str) -> LineQueue {
    let at_start = std::env::var("RUST_LOG")
        .ok()
        .filter(|env| parse_level(env).is_ok())
        .unwrap_or_else(|| level.to_owned());
    let filter = parse_level(&at_start).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let queue = LineQueue::open(Log::Diagnostic, std::io::stderr(), LOG_QUEUE_LINES);
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(queue.writer().clone())
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let lines = match format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines.json().flatten_event(true).boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .try_init()
        .is_ok()
    {
        let _ = LEVEL.set(LevelControl {
            handle,
            current: Mutex::new(at_start.clone()),
            at_start,
        });
        let _ = DIAGNOSTIC_SINK.set(Arc::clone(&queue.sink));
        start_loss_reports();
    }
    queue
}

/// Makes `configured` (a config file's `server.log_level`) the filter, or goes back to the
/// start-up filter when it is `None`. Logs the change; does nothing when nothing changes or no
/// subscriber was installed by [`init`].
pub fn apply_level(configured: Option<&str>) -> Result<(), String> {
    let Some(control) = LEVEL.get() else {
        return Ok(());
    };
    let wanted = configured.unwrap_or(&control.at_start);
    let Ok(mut current) = control.current.lock() else {
        return Err("the log filter lock is poisoned".into());
    };
    if *current == wanted {
        return Ok(());
    }
    let filter = parse_level(wanted)?;
    // Logged under the old filter, so the line is there even when the new one is quieter.
    tracing::warn!(from = %*current, to = %wanted, "log level changing");
    control
        .handle
        .reload(filter)
        .map_err(|e| format!("cannot change the log filter: {e}"))?;
    *current = wanted.to_owned();
    Ok(())
}

/// The two logs whose lost lines are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    Diagnostic,
    Audit,
}

impl Log {
    pub const ALL: [Log; 2] = [Log::Diagnostic, Log::Audit];

    /// The `log` label of `xks_log_lines_dropped_total`.
    pub fn name(self) -> &'static str {
        match self {
            Log::Diagnostic => "diagnostic",
            Log::Audit => "audit",
        }
    }

    fn losses(self) -> &'static Losses {
        match self {
            Log::Diagnostic => &DIAGNOSTIC_LOSSES,
            Log::Audit => &AUDIT_LOSSES,
        }
    }
}

/// What one log lost over the life of the process, over every queue it had (the audit log opens
/// a new one on each reload).
struct Losses {
    /// Lines a sink failed to take, and the drops of queues already closed.
    settled: AtomicU64,
    /// The drop counters of the queues now open (each also held by its [`LineQueue`]).
    open: Mutex<Vec<Arc<ErrorCounter>>>,
}

impl Losses {
    const fn new() -> Self {
        Self {
            settled: AtomicU64::new(0),
            open: Mutex::new(Vec::new()),
        }
    }

    fn total(&self) -> u64 {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let queued: u64 = open.iter().map(|c| c.dropped_lines() as u64).sum();
        self.settled.load(Ordering::Relaxed).saturating_add(queued)
    }

    fn add_queue(&self, counter: &Arc<ErrorCounter>) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.push(Arc::clone(counter));
    }

    /// Moves a closing queue's drops into `settled`. No more lines reach a queue once its
    /// [`LineQueue`] is gone, so the count is final.
    fn close_queue(&self, counter: &Arc<ErrorCounter>) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|c| !Arc::ptr_eq(c, counter));
        self.settled
            .fetch_add(counter.dropped_lines() as u64, Ordering::Relaxed);
    }
}

static DIAGNOSTIC_LOSSES: Losses = Losses::new();
static AUDIT_LOSSES: Losses = Losses::new();

/// Lines `log` has lost since the process started: dropped at a full queue, or refused by the
/// sink (a write error).
pub fn lines_lost(log: Log) -> u64 {
    log.losses().total()
}

/// A write into a sink taking longer than this means the sink is stalled.
const SINK_STALLED_AFTER: Duration = Duration::from_secs(1);

/// What the writer thread is doing, seen from outside: since when it has been inside a write.
struct SinkState {
    /// Milliseconds since [`clock_origin`] plus one when the current write began; 0 between writes.
    writing_since: AtomicU64,
}

fn clock_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(clock_origin().elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl SinkState {
    /// Whether a write has been blocked in the sink for [`SINK_STALLED_AFTER`] or more.
    fn stalled(&self) -> bool {
        let since = self.writing_since.load(Ordering::Acquire);
        since != 0
            && now_ms().saturating_sub(since - 1)
                >= u64::try_from(SINK_STALLED_AFTER.as_millis()).unwrap_or(u64::MAX)
    }
}

/// The sink as the writer thread sees it: marks each write's start and end, counts failed writes.
struct Watched<W> {
    inner: W,
    state: Arc<SinkState>,
    losses: &'static Losses,
}

impl<W: Write> Write for Watched<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }

    /// The writer thread hands over one line per call.
    fn write_all(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.state
            .writing_since
            .store(now_ms().saturating_add(1), Ordering::Release);
        let written = self.inner.write_all(line);
        self.state.writing_since.store(0, Ordering::Release);
        if written.is_err() {
            // The line is gone; the writer thread would only skip to the next one.
            self.losses.settled.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A bounded queue of lines in front of a sink, and the thread that writes them. Writing into
/// [`Self::writer`] never blocks: with the queue full the line is dropped and counted for its log.
pub struct LineQueue {
    writer: NonBlocking,
    dropped: Arc<ErrorCounter>,
    sink: Arc<SinkState>,
    log: Log,
    flush_on_drop: Option<WorkerGuard>,
}

impl LineQueue {
    /// Starts a writer thread for `sink` behind a queue of `lines` lines.
    pub fn open<W: Write + Send + 'static>(log: Log, sink: W, lines: usize) -> Self {
        let sink_state = Arc::new(SinkState {
            writing_since: AtomicU64::new(0),
        });
        let watched = Watched {
            inner: sink,
            state: Arc::clone(&sink_state),
            losses: log.losses(),
        };
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(lines.max(1))
            .thread_name(match log {
                Log::Diagnostic => "xks-proxy-log",
                Log::Audit => "xks-proxy-audit",
            })
            .finish(watched);
        let dropped = Arc::new(writer.error_counter());
        log.losses().add_queue(&dropped);
        Self {
            writer,
            dropped,
            sink: sink_state,
            log,
            flush_on_drop: Some(guard),
        }
    }

    /// Where lines go: each `write` is one line.
    pub fn writer(&self) -> &NonBlocking {
        &self.writer
    }
}

/// The longest a closing queue waits for its lines to be written.
const FLUSH_AT_CLOSE: Duration = Duration::from_secs(2);

impl Drop for LineQueue {
    /// Waits (at most [`FLUSH_AT_CLOSE`]) for the queued lines to be written, unless the sink is
    /// stalled: then the writer thread is left to finish if the sink ever takes lines again, and
    /// nobody waits for it (its flush would block on the stalled sink).
    ///
    /// The wait is bounded even when the sink stalled only a moment ago: `tracing-appender`'s
    /// guard, finding the queue full, prints a complaint to stdout, which blocks for good when
    /// stdout is the stalled sink. So the guard is dropped on a thread of its own, and left there
    /// when it does not finish in time.
    fn drop(&mut self) {
        self.log.losses().close_queue(&self.dropped);
        let Some(guard) = self.flush_on_drop.take() else {
            return;
        };
        if self.sink.stalled() {
            std::mem::forget(guard);
            return;
        }
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let flush = std::thread::Builder::new()
            .name("xks-proxy-log-close".into())
            .spawn(move || {
                drop(guard);
                let _ = done.send(());
            });
        if flush.is_ok() {
            let _ = finished.recv_timeout(FLUSH_AT_CLOSE);
        }
    }
}

/// The diagnostic log's sink, set by [`init`]: loss reports wait while it is stalled.
static DIAGNOSTIC_SINK: OnceLock<Arc<SinkState>> = OnceLock::new();

/// At most one WARN about lost lines per log this often.
pub const LOSS_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Starts the thread that reports lost lines on the diagnostic log (once per process).
fn start_loss_reports() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("xks-proxy-log-loss".into())
            .spawn(report_losses);
        if let Err(error) = spawned {
            tracing::warn!(%error, "lost log lines will be counted but not reported in the log");
        }
    });
}

/// Every second: for each log that lost lines since its last report, and was last reported at
/// least [`LOSS_REPORT_INTERVAL`] ago, a WARN with the count, unless the diagnostic sink is
/// stalled. The WARN goes through the same lossy queue: if it is dropped too, it is counted and
/// reported next time.
fn report_losses() {
    let mut reported = [0u64; Log::ALL.len()];
    let mut last_report: [Option<Instant>; Log::ALL.len()] = [None; Log::ALL.len()];
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if DIAGNOSTIC_SINK.get().is_some_and(|sink| sink.stalled()) {
            continue;
        }
        for (i, log) in Log::ALL.into_iter().enumerate() {
            let lost = lines_lost(log);
            let due = last_report[i].is_none_or(|at| at.elapsed() >= LOSS_REPORT_INTERVAL);
            if lost > reported[i] && due {
                tracing::warn!(
                    target: "xks_proxy::logs",
                    log = log.name(),
                    lines = lost - reported[i],
                    total = lost,
                    "log lines dropped: the log's sink did not keep up (see xks_log_lines_dropped_total)"
                );
                reported[i] = lost;
                last_report[i] = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn level_directives_are_checked() {
        assert!(super::parse_level("info").is_ok());
        assert!(super::parse_level("warn,xks_proxy=debug").is_ok());
        assert!(super::parse_level("loud").is_err());
        assert!(super::parse_level("xks_proxy=[").is_err());
    }

    /// A sink that blocks every write until the test lets it go, then fails the next ones.
    struct Gate {
        open: std::sync::mpsc::Receiver<()>,
        fail: bool,
    }

    impl std::io::Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.fail {
                return Err(std::io::Error::other("sink failure"));
            }
            let _ = self.open.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_drops_and_counts_instead_of_blocking() {
        use std::io::Write;
        let (release, open) = std::sync::mpsc::channel();
        let before = super::lines_lost(super::Log::Audit);
        let queue = super::LineQueue::open(super::Log::Audit, Gate { open, fail: false }, 4);
        // One line blocks in the sink, four wait in the queue, the rest are dropped: none blocks.
        for _ in 0..100 {
            queue.writer().clone().write_all(b"line\n").unwrap();
        }
        let lost = super::lines_lost(super::Log::Audit) - before;
        assert!((95..=96).contains(&lost), "{lost} lines lost");
        std::thread::sleep(super::SINK_STALLED_AFTER + std::time::Duration::from_millis(100));
        assert!(queue.sink.stalled());
        // Closing a queue keeps its count; a stalled sink is not waited for.
        drop(queue);
        assert_eq!(super::lines_lost(super::Log::Audit) - before, lost);
        drop(release);
    }

    #[test]
    fn failed_sink_writes_are_counted() {
        use std::io::Write;
        let (_release, open) = std::sync::mpsc::channel();
        let before = super::lines_lost(super::Log::Diagnostic);
        let queue = super::LineQueue::open(super::Log::Diagnostic, Gate { open, fail: true }, 64);
        for _ in 0..10 {
            queue.writer().clone().write_all(b"line\n").unwrap();
        }
        drop(queue); // waits for the writer thread to try them all
        assert_eq!(super::lines_lost(super::Log::Diagnostic) - before, 10);
    }
}
