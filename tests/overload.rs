//! Admission control end to end, over real TLS with real SigV4: a flood of signed requests on
//! separate connections against a proxy whose HSM is held back (the PKCS#11 emulator adds latency
//! to every call) and whose admission limit is small gets, for every request, either its answer or
//! a 429 ThrottlingException (or the HSM's own 503 DependencyTimeoutException): never a hang or a
//! dropped connection; the refusals are counted by reason; and once the flood is over every
//! request is served again.

mod common;

use std::time::Duration;

use common::hsm::*;
use common::*;
use serde_json::json;
use xks_proxy::client::{Reply, XksClient, bodies};

/// Bounds every wait here (not a timing assertion: far above what each request needs).
const HANG_GUARD: Duration = Duration::from_secs(30);

async fn encrypt(client: &XksClient) -> Reply {
    tokio::time::timeout(
        HANG_GUARD,
        client.call("/keys/foo/encrypt", &bodies::encrypt(b"flood", None, false)),
    )
    .await
    .expect("every request is answered: none hangs")
    .expect("every request is answered on its connection: none is dropped")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_the_admission_limit_is_answered_or_refused_never_left_hanging() {
    let metrics_port = free_port();
    // 3 calls of 10 ms per Encrypt, 4 requests admitted at once, sessions for all of them: a
    // request admitted takes 30 ms or more, and 48 at once cannot all get a permit in time.
    let Some(hsm) = start_with_limits(
        Hsm::Emulated(json!({ "latency_us": 10000 })),
        "session_pool_size = 8\ncall_timeout_ms = 1000",
        "",
        &format!(
            "{QUIET_HEALTH}\nmax_in_flight_requests = 4\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\""
        ),
    ) else {
        return;
    };
    wait_until_active(&hsm.proxy).await;
    let (mut served, mut refused) = (0, 0u32);
    for _round in 0..3 {
        let flood: Vec<_> = (0..48)
            .map(|_| {
                let client = hsm.proxy.client();
                tokio::spawn(async move { encrypt(&client).await })
            })
            .collect();
        for reply in flood {
            let reply = reply.await.unwrap();
            match reply.status.as_u16() {
                200 => served += 1,
                429 => {
                    assert_error(&reply, 429, "ThrottlingException");
                    refused += 1;
                }
                // The held-back HSM itself may time a request out: an answer, not a hang.
                503 => assert_error(&reply, 503, "DependencyTimeoutException"),
                _ => panic!("only 200, 429 or 503 under a flood: {reply:?}"),
            }
        }
    }
    assert!(served > 0, "the admitted requests are served");
    assert!(
        refused > 0,
        "the requests past the limit are refused at once"
    );
    // Refused before being looked at: by the admission queue (`overload`), or, while those
    // refusals are being written, by `max_in_flight_requests` itself.
    let scraped = scrape(metrics_port);
    let counted: f64 = ["overload", "in_flight_limit"]
        .iter()
        .filter_map(|reason| {
            sample(
                &scraped,
                &format!("xks_requests_refused_total{{reason=\"{reason}\"}}"),
            )
        })
        .sum();
    assert!(
        counted > 0.0 && counted <= f64::from(refused),
        "the refusals are counted: {counted} of {refused}"
    );
    // The flood is over: one request at a time is served again.
    for _ in 0..4 {
        assert_eq!(encrypt(&hsm.proxy.client()).await.status, 200);
    }
}
