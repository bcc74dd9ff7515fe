//! Per-key-store request quotas (spec §1.5: a proxy MAY throttle each path prefix): a token bucket
//! refilled at `rate_limit_rps` per second, holding at most one second's worth. A request takes
//! its token once its signature is verified (unauthenticated requests spend nothing); an empty
//! bucket answers 429 ThrottlingException at once.

use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug)]
pub struct Quota {
    rate: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl Quota {
    pub fn per_second(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            bucket: Mutex::new((rate, Instant::now())),
        }
    }

    /// Takes one request's token; `false` when the quota is spent.
    pub fn try_take(&self) -> bool {
        let Ok(mut bucket) = self.bucket.lock() else {
            return true;
        };
        let (tokens, last) = &mut *bucket;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst takes what the bucket holds (one second's worth) and what refills while the burst
    /// lasts, and is refused beyond that, however fast or slow the host runs the burst.
    #[test]
    fn a_burst_beyond_one_second_of_quota_is_refused() {
        let started = Instant::now();
        let quota = Quota::per_second(5);
        let taken: Vec<bool> = (0..20).map(|_| quota.try_take()).collect();
        let lasted = started.elapsed().as_secs_f64();
        // The full bucket: the first five are granted whatever the time.
        assert!(taken[..5].iter().all(|t| *t), "{taken:?}");
        // Beyond them, only what refilled meanwhile (5/s), at most.
        let granted = taken.iter().filter(|t| **t).count();
        let allowed = 5.0 + 5.0 * lasted;
        assert!(
            granted as f64 <= allowed + 1e-9,
            "{granted} granted in {lasted} s: at most {allowed} allowed ({taken:?})"
        );
    }
}
