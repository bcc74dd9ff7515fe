//! Per-function call counters: one atomic per wrapped function, bumped by
//! every wrapper call (including calls that are then hung, delayed or
//! answered by an injected return value), read and reset over the control
//! socket.

use crate::wrappers::Func;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTS: [AtomicU64; Func::COUNT] = [const { AtomicU64::new(0) }; Func::COUNT];

/// Counts one call of `f`.
pub fn bump(f: Func) {
    COUNTS[f as usize].fetch_add(1, Ordering::Relaxed);
}

/// The calls so far of `f`.
pub fn get(f: Func) -> u64 {
    COUNTS[f as usize].load(Ordering::Relaxed)
}

/// Functions called at least once, by name.
pub fn snapshot() -> BTreeMap<&'static str, u64> {
    Func::ALL
        .iter()
        .filter_map(|f| {
            let n = get(*f);
            (n > 0).then(|| (f.name(), n))
        })
        .collect()
}

/// Sets every counter back to zero.
pub fn reset() {
    for c in &COUNTS {
        c.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_resets() {
        // Other unit tests never call C_Encrypt or C_MessageVerifyFinal.
        let _g = crate::faults::TEST_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        reset();
        bump(Func::C_Encrypt);
        bump(Func::C_Encrypt);
        bump(Func::C_MessageVerifyFinal);
        let s = snapshot();
        assert_eq!(s.get("C_Encrypt"), Some(&2));
        assert_eq!(s.get("C_MessageVerifyFinal"), Some(&1));
        assert_eq!(s.get("C_Decrypt"), None);
        reset();
        assert_eq!(get(Func::C_Encrypt), 0);
        assert!(!snapshot().contains_key("C_Encrypt"));
    }
}
