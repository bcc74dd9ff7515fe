//! Diagnostic logging with `tracing`: one line per request (see `api`), start-up and health
//! changes. Text or JSON lines on stderr; the level comes from `--log-level` or `RUST_LOG`.
//! Nothing logs plaintext, key material, PINs, secrets or signatures.
//!
//! Lines are handed to a writer thread (`tracing-appender`), so a request never waits on a
//! `write(2)` to stderr; the queue is lossless (a full queue slows logging callers rather than
//! dropping lines). Colours only when stderr is a terminal.

use std::io::IsTerminal;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `level` is an `EnvFilter` directive such as `info`.
/// Keep the returned guard alive until exit: dropping it flushes the remaining lines.
pub fn init(format: LogFormat, level: &str) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("xks-proxy-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    guard
}
