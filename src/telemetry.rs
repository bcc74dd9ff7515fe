//! Diagnostic logging with `tracing`: one line per request (see `api`), start-up, reloads and
//! health changes. Text or JSON lines on stderr. Nothing logs plaintext, key material, PINs,
//! secrets or signatures.
//!
//! The level: `server.log_level` in the config file when it is set (applied at start and by every
//! reload, see [`apply_level`]), otherwise `RUST_LOG`, otherwise `--log-level`.
//!
//! Lines are handed to a writer thread (`tracing-appender`), so a request never waits on a
//! `write(2)` to stderr; the queue is lossless (a full queue slows logging callers rather than
//! dropping lines). Colours only when stderr is a terminal.

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
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

/// Installs the global subscriber. `level` is an `EnvFilter` directive such as `info`.
/// Keep the returned guard alive until exit: dropping it flushes the remaining lines.
pub fn init(format: LogFormat, level: &str) -> WorkerGuard {
    let at_start = std::env::var("RUST_LOG")
        .ok()
        .filter(|env| parse_level(env).is_ok())
        .unwrap_or_else(|| level.to_owned());
    let filter = parse_level(&at_start).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("xks-proxy-log")
        .finish(std::io::stderr());
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(writer)
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
    }
    guard
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

#[cfg(test)]
mod tests {
    #[test]
    fn level_directives_are_checked() {
        assert!(super::parse_level("info").is_ok());
        assert!(super::parse_level("warn,xks_proxy=debug").is_ok());
        assert!(super::parse_level("loud").is_err());
        assert!(super::parse_level("xks_proxy=[").is_err());
    }
}
