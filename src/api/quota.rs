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

    #[test]
    fn a_burst_beyond_one_second_of_quota_is_refused() {
        let quota = Quota::per_second(5);
        let granted = (0..20).filter(|_| quota.try_take()).count();
        assert!((5..=6).contains(&granted), "{granted}");
    }
}
