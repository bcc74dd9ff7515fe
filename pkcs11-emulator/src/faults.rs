//! The live behaviour and the faults applied before every forwarded call:
//! counting, hangs (timed, or held on a Condvar until cleared), latency and
//! injected return values. The behaviour sits behind an `RwLock`; the
//! common path (no injection rules) only takes the read lock.

use crate::behaviour::{Behaviour, HangKind, IvMode};
use crate::counters;
use crate::rv::Rv;
use crate::wrappers::Func;
use cryptoki_sys::{CK_RV, CKR_DEVICE_ERROR};
use serde_json::Value;
use std::sync::{Condvar, LazyLock, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

struct Shared {
    behaviour: RwLock<Behaviour>,
    /// Held (with `released`) by calls waiting out a `"forever"` hang.
    hang_lock: Mutex<()>,
    released: Condvar,
}

static SHARED: LazyLock<Shared> = LazyLock::new(|| Shared {
    behaviour: RwLock::new(Behaviour::default()),
    hang_lock: Mutex::new(()),
    released: Condvar::new(),
});

fn read() -> RwLockReadGuard<'static, Behaviour> {
    SHARED.behaviour.read().unwrap_or_else(|e| e.into_inner())
}

fn write() -> RwLockWriteGuard<'static, Behaviour> {
    SHARED.behaviour.write().unwrap_or_else(|e| e.into_inner())
}

/// Wakes hung calls so they re-check whether their hang is still set.
fn wake_hung() {
    let _g = SHARED.hang_lock.lock().unwrap_or_else(|e| e.into_inner());
    SHARED.released.notify_all();
}

/// Replaces the whole behaviour.
pub fn set(b: Behaviour) {
    *write() = b;
    wake_hung();
}

/// Merges top-level fields into the behaviour; unchanged on error.
pub fn patch(p: Value) -> Result<(), String> {
    {
        let mut cur = write();
        let next = cur.patched(p)?;
        *cur = next;
    }
    wake_hung();
    Ok(())
}

/// A copy of the current behaviour.
pub fn current() -> Behaviour {
    read().clone()
}

/// The IV mode a C_EncryptInit starting now should use.
pub fn iv_mode() -> IvMode {
    read().iv_mode
}

/// The rv a failed C_Decrypt should be reported with, if any.
pub fn decrypt_failure_rv() -> Option<Rv> {
    read().decrypt_failure_rv
}

fn hung_forever(f: Func) -> bool {
    matches!(&read().hang, Some(h) if h.kind == HangKind::Forever && h.functions.matches(f))
}

/// Everything that happens to a call of `f` before it is forwarded.
/// `Some(rv)` means: return `rv` and do not forward.
pub fn before_call(f: Func) -> Option<CK_RV> {
    counters::bump(f);
    let (hang, latency_us, has_rules) = {
        let b = read();
        let hang = b
            .hang
            .as_ref()
            .filter(|h| h.functions.matches(f))
            .map(|h| h.kind);
        (hang, b.latency_us, !b.inject.is_empty())
    };
    match hang {
        Some(HangKind::Ms(ms)) => std::thread::sleep(Duration::from_millis(ms)),
        Some(HangKind::Forever) => {
            let mut g = SHARED.hang_lock.lock().unwrap_or_else(|e| e.into_inner());
            // The setter changes the behaviour before taking hang_lock to
            // notify, so checking under hang_lock cannot miss a release.
            while hung_forever(f) {
                g = SHARED.released.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            // The link "died" under this call.
            return Some(CKR_DEVICE_ERROR);
        }
        None => {}
    }
    if latency_us > 0 {
        std::thread::sleep(Duration::from_micros(latency_us));
    }
    if has_rules {
        let mut b = write();
        for rule in b.inject.iter_mut() {
            if rule.fire(f) {
                return Some(rule.rv.0);
            }
        }
    }
    None
}

/// Serialises unit tests that change the process-wide behaviour.
#[cfg(test)]
pub static TEST_LOCK: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki_sys::CKR_SESSION_HANDLE_INVALID;
    use std::time::Instant;

    #[test]
    fn injection_latency_and_hangs() {
        let _g = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        set(Behaviour::default());
        assert_eq!(before_call(Func::C_SeedRandom), None);

        // count rules, checked in order, used up as they fire
        set(Behaviour::from_json(
            r#"{"inject": [
                {"functions": ["C_SeedRandom"], "rv": "CKR_DEVICE_ERROR", "count": 2},
                {"functions": ["*"], "rv": "CKR_SESSION_HANDLE_INVALID", "count": 1}
            ]}"#,
        )
        .unwrap());
        assert_eq!(before_call(Func::C_SeedRandom), Some(CKR_DEVICE_ERROR));
        assert_eq!(before_call(Func::C_SeedRandom), Some(CKR_DEVICE_ERROR));
        assert_eq!(
            before_call(Func::C_SeedRandom),
            Some(CKR_SESSION_HANDLE_INVALID)
        );
        assert_eq!(before_call(Func::C_SeedRandom), None);
        assert_eq!(current().inject[0].count, Some(0));

        // latency
        patch(serde_json::json!({"inject": [], "latency_us": 20_000})).unwrap();
        let t = Instant::now();
        assert_eq!(before_call(Func::C_SeedRandom), None);
        assert!(t.elapsed() >= Duration::from_millis(20));

        // timed hang, only for the named function
        set(
            Behaviour::from_json(r#"{"hang": {"ms": 30, "functions": ["C_SeedRandom"]}}"#).unwrap(),
        );
        let t = Instant::now();
        assert_eq!(before_call(Func::C_GetInfo), None);
        assert!(t.elapsed() < Duration::from_millis(30));
        assert_eq!(before_call(Func::C_SeedRandom), None);
        assert!(t.elapsed() >= Duration::from_millis(30));

        // forever, released by a later set
        set(Behaviour::from_json(r#"{"hang": "forever"}"#).unwrap());
        let held = std::thread::spawn(|| before_call(Func::C_SeedRandom));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!held.is_finished(), "call must be held");
        // a patch that keeps the hang does not release it
        patch(serde_json::json!({"latency_us": 0})).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!held.is_finished(), "still held");
        set(Behaviour::default());
        assert_eq!(held.join().unwrap(), Some(CKR_DEVICE_ERROR));
        assert_eq!(before_call(Func::C_SeedRandom), None);

        // a bad patch leaves the behaviour unchanged
        set(Behaviour::from_json(r#"{"latency_us": 1}"#).unwrap());
        assert!(patch(serde_json::json!({"latency_us": 2, "nope": 1})).is_err());
        assert_eq!(current().latency_us, 1);
        set(Behaviour::default());
    }
}
