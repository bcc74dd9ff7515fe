//! The random-IV budget of each key (NIST SP 800-38D §8.3): with random 96-bit IVs, one AES-GCM key
//! may be used for at most 2^32 encryptions over its whole life. At KMS's 1800 requests/s that is
//! about 27 days of one busy key, so the proxy counts.
//!
//! - Every Encrypt the key manager may have performed is counted per key store (`uri_path`) and key
//!   id: the Encrypt handler holds an [`IvCharge`] across the key manager's call. Charged are
//!   successes, and also timeouts, internal errors and calls abandoned at the request deadline,
//!   since the HSM may have used an IV for those (the count errs high, never low).
//! - Counts persist in a ledger file (`[iv_budget] ledger`), written every few seconds when they
//!   changed and at shutdown, by atomic rename; a crash forgets at most those few seconds. Without
//!   a ledger the counts start at zero with each process, and a warning at start says so.
//! - An instance counts only what it encrypted itself, so its share of the budget is
//!   2^32 / `server.fleet_size` (the load balancer spreads requests evenly). Fleet-wide, the figure
//!   is the sum of `xks_key_encryptions_total` over instances.
//! - When a key passes `warn_fraction` of that share: a WARN line at the crossing (and again every
//!   hour while it stays over), GetHealthStatus reports the key store's key managers as DEGRADED
//!   (still serving, but needing attention: KMS publishes it in CloudWatch), and the
//!   `xks_key_iv_budget_used_ratio` gauge shows it. Encryption is never refused: rotating to a new
//!   key is the operator's decision.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::field::FieldError;
use crate::keystore::KeyStoreError;

/// Encryptions with random 96-bit IVs one AES-GCM key may perform (NIST SP 800-38D §8.3).
pub const GCM_RANDOM_IV_LIMIT: u64 = 1 << 32;

/// How often changed counts are written to the ledger.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// How often a key that stays over its warning level is logged again.
const REMINDER_INTERVAL: Duration = Duration::from_secs(3600);

/// `[iv_budget]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IvBudgetConfig {
    /// Warn when a key has used this fraction of this instance's share of 2^32 (0 < f <= 1).
    pub warn_fraction: f64,
    /// Where counts persist across restarts (relative to the config file); none: per process.
    pub ledger: Option<PathBuf>,
}

impl Default for IvBudgetConfig {
    fn default() -> Self {
        Self {
            warn_fraction: 0.5,
            ledger: None,
        }
    }
}

impl IvBudgetConfig {
    /// Checks the warning level; the error names the field below `[iv_budget]`.
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        if !(self.warn_fraction > 0.0 && self.warn_fraction <= 1.0) {
            return Err(FieldError::new(
                "warn_fraction",
                "must be greater than 0 and at most 1",
            ));
        }
        Ok(())
    }
}

/// One key's use of its budget, as [`IvBudget::usage`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyUsage {
    pub keystore: String,
    pub key: String,
    pub encryptions: u64,
    /// `encryptions` over this instance's share of 2^32.
    pub used: f64,
}

/// The ledger file's contents.
#[derive(Serialize, Deserialize, Default)]
struct Ledger {
    version: u32,
    /// Key store `uri_path` → key id → encryptions.
    encryptions: HashMap<String, HashMap<String, u64>>,
}

const LEDGER_VERSION: u32 = 1;

struct Count {
    encryptions: u64,
    /// When the last warning about this key was logged.
    warned: Option<Instant>,
}

struct Thresholds {
    /// This instance's share of [`GCM_RANDOM_IV_LIMIT`].
    share: u64,
    /// Encryptions at which a key is over its warning level.
    warn_at: u64,
    warn_fraction: f64,
}

impl Thresholds {
    fn new(warn_fraction: f64, fleet_size: u32) -> Self {
        let share = GCM_RANDOM_IV_LIMIT / u64::from(fleet_size.max(1));
        // Exact for the fractions anyone writes; the cast saturates on anything odd.
        let warn_at = ((share as f64) * warn_fraction).ceil() as u64;
        Self {
            share,
            warn_at: warn_at.clamp(1, share),
            warn_fraction,
        }
    }
}

/// One encryption's charge against the IV budget ([`IvBudget::charge`]), made when it drops:
/// after a success, and whenever the key manager may have used an IV without saying so (a
/// timeout, an internal error, or the request abandoned mid-call at its deadline, so that
/// [`IvCharge::settle`] was never reached). Refusals before any encryption (unknown or disabled
/// key, usage, busy, unavailable) are not charged.
pub struct IvCharge<'a> {
    budget: &'a IvBudget,
    keystore: &'a str,
    key: &'a str,
    due: bool,
}

impl IvCharge<'_> {
    /// Settles the charge with the key manager's answer.
    pub fn settle<T>(mut self, result: &Result<T, KeyStoreError>) {
        self.due = matches!(
            result,
            Ok(_) | Err(KeyStoreError::Timeout | KeyStoreError::Internal(_))
        );
    }
}

impl Drop for IvCharge<'_> {
    fn drop(&mut self) {
        if self.due {
            self.budget.record(self.keystore, self.key);
        }
    }
}

/// The per-key encryption counts of this process, with their ledger.
pub struct IvBudget {
    counts: Mutex<HashMap<String, HashMap<String, Count>>>,
    thresholds: Mutex<Thresholds>,
    ledger: Option<PathBuf>,
    dirty: AtomicBool,
}

impl IvBudget {
    /// Loads the ledger (if configured). An unreadable or malformed ledger is an error: starting
    /// from zero would hide how much of the budget is gone.
    pub fn open(config: &IvBudgetConfig, fleet_size: u32) -> Result<Self, String> {
        let mut counts: HashMap<String, HashMap<String, Count>> = HashMap::new();
        if let Some(path) = &config.ledger {
            for (keystore, keys) in read_ledger(path)?.encryptions {
                let keys = keys
                    .into_iter()
                    .map(|(key, encryptions)| {
                        let count = Count {
                            encryptions,
                            warned: None,
                        };
                        (key, count)
                    })
                    .collect();
                counts.insert(keystore, keys);
            }
        } else {
            tracing::warn!(
                "iv_budget.ledger is not set: per-key encryption counts start at zero with each process"
            );
        }
        let budget = Self {
            counts: Mutex::new(counts),
            thresholds: Mutex::new(Thresholds::new(config.warn_fraction, fleet_size)),
            ledger: config.ledger.clone(),
            dirty: AtomicBool::new(false),
        };
        budget.remind();
        Ok(budget)
    }

    /// The ledger path, fixed for the life of the process.
    pub fn ledger(&self) -> Option<&Path> {
        self.ledger.as_deref()
    }

    /// Applies a reloaded `warn_fraction` and `fleet_size`.
    pub fn configure(&self, warn_fraction: f64, fleet_size: u32) {
        if let Ok(mut thresholds) = self.thresholds.lock() {
            *thresholds = Thresholds::new(warn_fraction, fleet_size);
        }
        self.remind();
    }

    /// A charge for one encryption with `key` of the key store at `keystore`, due unless settled
    /// with a refusal: take it before calling the key manager.
    pub fn charge<'a>(&'a self, keystore: &'a str, key: &'a str) -> IvCharge<'a> {
        IvCharge {
            budget: self,
            keystore,
            key,
            due: true,
        }
    }

    /// Counts one encryption; logs the moment the key passes its warning level.
    pub fn record(&self, keystore: &str, key: &str) {
        let warn_at = match self.thresholds.lock() {
            Ok(t) => t.warn_at,
            Err(_) => return,
        };
        let Ok(mut counts) = self.counts.lock() else {
            return;
        };
        let keys = match counts.get_mut(keystore) {
            Some(keys) => keys,
            None => counts.entry(keystore.to_owned()).or_default(),
        };
        let count = match keys.get_mut(key) {
            Some(count) => count,
            None => keys.entry(key.to_owned()).or_insert(Count {
                encryptions: 0,
                warned: None,
            }),
        };
        count.encryptions = count.encryptions.saturating_add(1);
        self.dirty.store(true, Ordering::Relaxed);
        if count.encryptions >= warn_at && count.warned.is_none() {
            count.warned = Some(Instant::now());
            let encryptions = count.encryptions;
            drop(counts);
            self.warn(keystore, key, encryptions);
        }
    }

    /// Keys of `keystore` at or over their warning level.
    pub fn keys_over_warning(&self, keystore: &str) -> usize {
        let warn_at = match self.thresholds.lock() {
            Ok(t) => t.warn_at,
            Err(_) => return 0,
        };
        let Ok(counts) = self.counts.lock() else {
            return 0;
        };
        counts.get(keystore).map_or(0, |keys| {
            keys.values().filter(|c| c.encryptions >= warn_at).count()
        })
    }

    /// Every counted key, for metrics and `config check`.
    pub fn usage(&self) -> Vec<KeyUsage> {
        let share = match self.thresholds.lock() {
            Ok(t) => t.share,
            Err(_) => return Vec::new(),
        };
        let Ok(counts) = self.counts.lock() else {
            return Vec::new();
        };
        let mut usage: Vec<KeyUsage> = counts
            .iter()
            .flat_map(|(keystore, keys)| {
                keys.iter().map(move |(key, count)| KeyUsage {
                    keystore: keystore.clone(),
                    key: key.clone(),
                    encryptions: count.encryptions,
                    used: count.encryptions as f64 / share as f64,
                })
            })
            .collect();
        usage.sort_by(|a, b| (&a.keystore, &a.key).cmp(&(&b.keystore, &b.key)));
        usage
    }

    /// Writes the counts to the ledger if they changed since the last write.
    pub fn flush(&self) -> Result<(), String> {
        let Some(path) = &self.ledger else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let ledger = match self.counts.lock() {
            Ok(counts) => Ledger {
                version: LEDGER_VERSION,
                encryptions: counts
                    .iter()
                    .map(|(keystore, keys)| {
                        let keys = keys
                            .iter()
                            .map(|(key, count)| (key.clone(), count.encryptions))
                            .collect();
                        (keystore.clone(), keys)
                    })
                    .collect(),
            },
            Err(_) => return Err("the counts are poisoned".into()),
        };
        write_ledger(path, &ledger).inspect_err(|_| self.dirty.store(true, Ordering::Relaxed))
    }

    /// Writes the ledger every [`FLUSH_INTERVAL`] and repeats warnings, until the task is dropped.
    pub async fn keep_ledger(self: std::sync::Arc<Self>) {
        let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let budget = std::sync::Arc::clone(&self);
            let written = tokio::task::spawn_blocking(move || {
                budget.remind();
                budget.flush()
            })
            .await;
            if let Ok(Err(error)) = written {
                tracing::error!(%error, "the IV-budget ledger was not written; retrying");
            }
        }
    }

    /// Logs every key over its warning level that was not logged within the reminder interval.
    pub fn remind(&self) {
        let warn_at = match self.thresholds.lock() {
            Ok(t) => t.warn_at,
            Err(_) => return,
        };
        let mut due = Vec::new();
        if let Ok(mut counts) = self.counts.lock() {
            for (keystore, keys) in counts.iter_mut() {
                for (key, count) in keys.iter_mut() {
                    let recently = count
                        .warned
                        .is_some_and(|at| at.elapsed() < REMINDER_INTERVAL);
                    if count.encryptions >= warn_at && !recently {
                        count.warned = Some(Instant::now());
                        due.push((keystore.clone(), key.clone(), count.encryptions));
                    }
                }
            }
        }
        for (keystore, key, encryptions) in due {
            self.warn(&keystore, &key, encryptions);
        }
    }

    fn warn(&self, keystore: &str, key: &str, encryptions: u64) {
        let (share, fraction) = match self.thresholds.lock() {
            Ok(t) => (t.share, t.warn_fraction),
            Err(_) => return,
        };
        tracing::warn!(
            keystore,
            key,
            encryptions,
            budget_share = share,
            warn_fraction = fraction,
            used = encryptions as f64 / share as f64,
            "key is past its random-IV budget warning level (NIST SP 800-38D: 2^32 encryptions \
             per key); health reports DEGRADED; move KMS to a new key"
        );
    }
}

fn read_ledger(path: &Path) -> Result<Ledger, String> {
    let at = |what: String| format!("iv_budget.ledger {}: {what}", path.display());
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ledger::default()),
        Err(e) => return Err(at(format!("cannot read: {e}"))),
    };
    let ledger: Ledger = serde_json::from_str(&text).map_err(|e| {
        at(format!(
            "is not a ledger ({e}); restore it or remove it knowingly"
        ))
    })?;
    if ledger.version != LEDGER_VERSION {
        return Err(at(format!("unknown version {}", ledger.version)));
    }
    Ok(ledger)
}

fn write_ledger(path: &Path, ledger: &Ledger) -> Result<(), String> {
    let at = |what: String| format!("iv_budget.ledger {}: {what}", path.display());
    let text = serde_json::to_vec_pretty(ledger).map_err(|e| at(e.to_string()))?;
    crate::atomic_file::write_private(path, &text).map_err(|e| at(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ledger: Option<PathBuf>, warn_fraction: f64) -> IvBudgetConfig {
        IvBudgetConfig {
            warn_fraction,
            ledger,
        }
    }

    #[test]
    fn share_divides_the_budget_by_the_fleet() {
        let t = Thresholds::new(0.5, 4);
        assert_eq!(t.share, 1 << 30);
        assert_eq!(t.warn_at, 1 << 29);
        assert_eq!(Thresholds::new(1.0, 1).warn_at, GCM_RANDOM_IV_LIMIT);
    }

    #[test]
    fn counts_persist_through_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        let budget = IvBudget::open(&config(Some(path.clone()), 0.5), 1).unwrap();
        for _ in 0..3 {
            budget.record("/a", "k1");
        }
        budget.record("/b", "k1");
        budget.flush().unwrap();
        let again = IvBudget::open(&config(Some(path.clone()), 0.5), 1).unwrap();
        let usage = again.usage();
        assert_eq!(usage.len(), 2);
        assert_eq!(
            (usage[0].keystore.as_str(), usage[0].encryptions),
            ("/a", 3)
        );
        assert_eq!(
            (usage[1].keystore.as_str(), usage[1].encryptions),
            ("/b", 1)
        );
    }

    #[test]
    fn warning_level_is_per_key_store() {
        let budget = IvBudget::open(&config(None, 0.5), 1).unwrap();
        budget.configure(1e-9, 1); // warn_at = ceil(4.29) = 5
        for _ in 0..4 {
            budget.record("/a", "k");
        }
        assert_eq!(budget.keys_over_warning("/a"), 0);
        budget.record("/a", "k");
        assert_eq!(budget.keys_over_warning("/a"), 1);
        assert_eq!(budget.keys_over_warning("/b"), 0);
        budget.configure(0.5, 1);
        assert_eq!(budget.keys_over_warning("/a"), 0);
    }

    #[test]
    fn a_broken_ledger_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        std::fs::write(&path, "{not json").unwrap();
        let error = IvBudget::open(&config(Some(path), 0.5), 1).err().unwrap();
        assert!(error.starts_with("iv_budget.ledger"), "{error}");
    }

    #[test]
    fn fraction_out_of_range_is_refused() {
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(config(None, bad).validate().is_err(), "{bad}");
        }
        assert!(config(None, 1.0).validate().is_ok());
    }
}
