//! Cached deep health checks: GetHealthStatus answers from here and never waits on a key manager.
//!
//! [`HealthMonitor::start`] runs the backend's deep check once (so the first answer is real), then
//! again every `interval` on a background task. A check that does not finish within `check_timeout`
//! counts as UNAVAILABLE. A snapshot older than [`MAX_AGE`] (the spec's one-minute bound) is never
//! served as it is: every instance is then reported UNAVAILABLE.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::{EkmHealth, EkmStatus, KeyStore};

/// The spec's limit on the age of a cached health result.
pub const MAX_AGE: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Snapshot {
    statuses: Vec<EkmStatus>,
    checked_at: Instant,
}

/// The latest deep-check result of one backend, refreshed in the background.
#[derive(Debug, Clone)]
pub struct HealthMonitor {
    latest: Arc<RwLock<Arc<Snapshot>>>,
}

impl HealthMonitor {
    /// Runs the first check now, then refreshes every `interval` until the runtime shuts down.
    pub async fn start(
        store: Arc<dyn KeyStore>,
        interval: Duration,
        check_timeout: Duration,
    ) -> Self {
        let first = run_check(store.as_ref(), check_timeout).await;
        let monitor = Self {
            latest: Arc::new(RwLock::new(Arc::new(first))),
        };
        let latest = Arc::downgrade(&monitor.latest);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await; // the first tick is immediate: that check already ran
            loop {
                ticker.tick().await;
                let snapshot = run_check(store.as_ref(), check_timeout).await;
                let Some(latest) = latest.upgrade() else {
                    return; // every holder of the monitor is gone
                };
                log_changes(&latest_statuses(&latest), &snapshot.statuses);
                if let Ok(mut slot) = latest.write() {
                    *slot = Arc::new(snapshot);
                }
            }
        });
        monitor
    }

    /// The cached statuses, or UNAVAILABLE for every instance if the cache is too old.
    pub fn current(&self) -> Vec<EkmStatus> {
        let snapshot = match self.latest.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        if snapshot.checked_at.elapsed() <= MAX_AGE {
            return snapshot.statuses.clone();
        }
        snapshot
            .statuses
            .iter()
            .map(|s| EkmStatus {
                health: EkmHealth::Unavailable,
                detail: Some("health check result is older than 60 s".into()),
                ..s.clone()
            })
            .collect()
    }
}

fn latest_statuses(latest: &RwLock<Arc<Snapshot>>) -> Vec<EkmStatus> {
    match latest.read() {
        Ok(guard) => guard.statuses.clone(),
        Err(poisoned) => poisoned.into_inner().statuses.clone(),
    }
}

async fn run_check(store: &dyn KeyStore, check_timeout: Duration) -> Snapshot {
    let statuses = match tokio::time::timeout(check_timeout, store.check_health()).await {
        Ok(statuses) => statuses,
        Err(_) => vec![EkmStatus {
            id: store.describe().kind.to_string(),
            model: store.describe().ekm_vendor,
            health: EkmHealth::Unavailable,
            detail: Some(format!(
                "deep health check did not finish within {} ms",
                check_timeout.as_millis()
            )),
        }],
    };
    Snapshot {
        statuses,
        checked_at: Instant::now(),
    }
}

fn log_changes(before: &[EkmStatus], after: &[EkmStatus]) {
    for status in after {
        let previous = before.iter().find(|b| b.id == status.id).map(|b| b.health);
        if previous != Some(status.health) {
            if status.health == EkmHealth::Active {
                tracing::info!(ekm = %status.id, health = ?status.health, "key manager health changed");
            } else {
                tracing::warn!(
                    ekm = %status.id,
                    health = ?status.health,
                    detail = status.detail.as_deref().unwrap_or(""),
                    "key manager health changed"
                );
            }
        }
    }
}
