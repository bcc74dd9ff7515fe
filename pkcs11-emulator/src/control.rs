//! The control socket: a Unix stream socket speaking line-delimited JSON,
//! one request object per line and one reply object per line, any number
//! per connection. Requests: `set`, `patch`, `get`, `counters`,
//! `reset_counters`. Served on a background thread (one more per client).

use crate::behaviour::Behaviour;
use crate::{counters, faults};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Longest request line accepted, in bytes.
const MAX_LINE: u64 = 1 << 20;

/// Binds `path` (removing a stale socket there first) and serves it on a
/// background thread. A socket that another live process serves is left to it.
pub fn start(path: &Path) -> Result<(), String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && UnixStream::connect(path).is_ok() {
            // Another process (the proxy this one is a CLI beside, say) serves it: leave it be.
            eprintln!(
                "xks-pkcs11-emulator: control socket {} is served by another process; this process has none",
                path.display()
            );
            return Ok(());
        }
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(|e| format!("cannot remove stale socket: {e}"))?;
        } else {
            return Err("path exists and is not a socket".into());
        }
    }
    let listener = UnixListener::bind(path).map_err(|e| format!("cannot bind: {e}"))?;
    std::thread::Builder::new()
        .name("xks-emu-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let _ = std::thread::Builder::new()
                    .name("xks-emu-client".into())
                    .spawn(move || serve(conn));
            }
        })
        .map_err(|e| format!("cannot start control thread: {e}"))?;
    Ok(())
}

fn serve(conn: UnixStream) {
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = conn;
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let too_long = !line.ends_with('\n') && line.len() as u64 >= MAX_LINE;
        if line.trim().is_empty() {
            continue;
        }
        let reply = if too_long {
            error("request line too long")
        } else {
            respond(&line)
        };
        if writeln!(out, "{reply}").and_then(|_| out.flush()).is_err() || too_long {
            return;
        }
    }
}

fn error(msg: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": msg.to_string()})
}

/// Answers one request line.
pub fn respond(line: &str) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return error(format!("bad JSON: {e}")),
    };
    let Value::Object(mut req) = req else {
        return error("request must be a JSON object");
    };
    if req.len() != 1 {
        return error("request must have exactly one of set, patch, get, counters, reset_counters");
    }
    let Some((verb, arg)) = req.iter_mut().next().map(|(k, v)| (k.clone(), v.take())) else {
        return error("empty request");
    };
    match verb.as_str() {
        "set" => match Behaviour::from_value(arg) {
            Ok(b) => {
                faults::set(b);
                json!({"ok": true})
            }
            Err(e) => error(e),
        },
        "patch" => match faults::patch(arg) {
            Ok(()) => json!({"ok": true}),
            Err(e) => error(e),
        },
        "get" => match serde_json::to_value(faults::current()) {
            Ok(b) => json!({"ok": true, "behaviour": b}),
            Err(e) => error(e),
        },
        "counters" => json!({"ok": true, "counters": counters::snapshot()}),
        "reset_counters" => {
            counters::reset();
            json!({"ok": true})
        }
        other => error(format!("unknown request {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol() {
        let _g = faults::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(
            respond(r#"{"set": {"latency_us": 5, "iv_mode": "hsm_appended"}}"#),
            json!({"ok": true})
        );
        let got = respond(r#"{"get": true}"#);
        assert_eq!(got["ok"], json!(true));
        assert_eq!(got["behaviour"]["latency_us"], json!(5));
        assert_eq!(got["behaviour"]["iv_mode"], json!("hsm_appended"));
        assert_eq!(
            respond(r#"{"patch": {"latency_us": 7}}"#),
            json!({"ok": true})
        );
        let got = respond(r#"{"get": true}"#);
        assert_eq!(got["behaviour"]["latency_us"], json!(7));
        assert_eq!(got["behaviour"]["iv_mode"], json!("hsm_appended"));

        for bad in [
            "nope",
            "[1]",
            r#"{"set": {"latency_us": 1}, "get": true}"#,
            r#"{"frobnicate": true}"#,
            r#"{"set": {"latency_us": 1, "typo": 2}}"#,
            r#"{"patch": {"iv_mode": "sideways"}}"#,
        ] {
            let r = respond(bad);
            assert_eq!(r["ok"], json!(false), "{bad}");
            assert!(r["error"].is_string(), "{bad}");
        }
        // behaviour unchanged by the bad requests
        assert_eq!(
            respond(r#"{"get": true}"#)["behaviour"]["latency_us"],
            json!(7)
        );

        let c = respond(r#"{"counters": true}"#);
        assert_eq!(c["ok"], json!(true));
        assert!(c["counters"].is_object());
        assert_eq!(respond(r#"{"set": {}}"#), json!({"ok": true}));
    }
}
