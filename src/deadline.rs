//! The request deadline, carried with the request's task: the API sets it around each request
//! ([`scope`]); the PKCS#11 worker pool reads it ([`cap`]), so that a job never waits for a
//! session past the moment its caller gives up, and a job that cannot start in time is refused
//! at once instead of answering late. Work outside a request (health checks, key management)
//! has no request deadline and keeps its own timeouts.

use std::future::Future;
use std::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `work` with `deadline` as its request deadline.
pub async fn scope<F: Future>(deadline: Instant, work: F) -> F::Output {
    DEADLINE.scope(deadline, work).await
}

/// The current request's deadline, if this task serves a request.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|deadline| *deadline).ok()
}

/// `deadline`, or the request's deadline if that comes first.
pub fn cap(deadline: Instant) -> Instant {
    current().map_or(deadline, |request| request.min(deadline))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_earlier_deadline_wins_inside_a_request_only() {
        let now = Instant::now();
        let soon = now + Duration::from_millis(10);
        let later = now + Duration::from_secs(10);
        assert_eq!(cap(later), later, "no request: the job's own timeout");
        scope(soon, async {
            assert_eq!(current(), Some(soon));
            assert_eq!(cap(later), soon);
            assert_eq!(cap(now), now);
        })
        .await;
    }
}
