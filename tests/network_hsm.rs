//! An HSM across a network, end to end: the real binary on a SoftHSM token seen through the
//! project's PKCS#11 emulator, which adds a round trip to every call, hangs calls, injects the
//! return values of a failing device, and counts every call.
//! - sessions open on demand beyond the CPU count;
//! - once a key is warm, requests do not look it up on the HSM; a renewal runs once in the
//!   background, and a cold miss is looked up once however many requests wait for it;
//! - a hung link: every answer is a prompt refusal or timeout (never a hang), health turns
//!   UNAVAILABLE, and once the link returns every request succeeds again, same process;
//! - a failing device: a decryption or an `Init` call is retried once on a fresh session, an
//!   encryption whose output the HSM may have produced never is.
//!
//! Assertions are on outcomes and call counts; durations only bound waits (hang guards).

mod common;

use std::time::{Duration, Instant};

use common::hsm::*;
use common::*;
use serde_json::{Value, json};
use xks_proxy::client::{Reply, XksClient, bodies};

/// A call's count in the emulator's counters.
fn count(counters: &Value, function: &str) -> u64 {
    counters["counters"][function].as_u64().unwrap_or(0)
}

async fn encrypt(client: &XksClient, key: &str) -> Reply {
    client
        .call(
            &format!("/keys/{key}/encrypt"),
            &bodies::encrypt(b"across the network", None, false),
        )
        .await
        .unwrap()
}

/// `n` encryptions of `foo` at once, each on its own connection.
async fn encrypt_at_once(proxy: &TestProxy, n: usize) -> Vec<Reply> {
    let calls = (0..n).map(|_| {
        let client = proxy.client();
        tokio::spawn(async move { encrypt(&client, "foo").await })
    });
    let mut replies = Vec::with_capacity(n);
    for call in calls.collect::<Vec<_>>() {
        replies.push(call.await.unwrap());
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_open_on_demand_beyond_the_cpu_count() {
    let Some(hsm) = start_with_limits(
        Hsm::Emulated(json!({ "latency_us": 2000 })),
        "",
        "",
        QUIET_HEALTH,
    ) else {
        return;
    };
    wait_until_active(&hsm.proxy).await;
    let opened_at_start = count(&hsm.emulator(json!({ "counters": true })), "C_OpenSession");
    let replies = encrypt_at_once(&hsm.proxy, 48).await;
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");
    let opened = count(&hsm.emulator(json!({ "counters": true })), "C_OpenSession");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert!(
        opened > opened_at_start && opened - 1 > cpus,
        "48 requests at once on a 2 ms HSM open more sessions than the {cpus} CPUs \
         (C_OpenSession: {opened_at_start} at start, {opened} after; one is the login's)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_keys_are_not_looked_up_on_the_request_path() {
    let Some(hsm) = start_with_limits(
        Hsm::Emulated(json!({})),
        "key_cache_ttl_ms = 2000",
        "",
        QUIET_HEALTH,
    ) else {
        return;
    };
    wait_until_active(&hsm.proxy).await;
    // A cold miss: 20 requests at once, one lookup (the key, then its disable markers).
    hsm.emulator(json!({ "reset_counters": true }));
    let replies = encrypt_at_once(&hsm.proxy, 20).await;
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");
    let counters = hsm.emulator(json!({ "counters": true }));
    assert_eq!(
        count(&counters, "C_FindObjectsInit"),
        2,
        "one lookup for 20 waiting requests: {counters}"
    );
    assert_eq!(count(&counters, "C_EncryptInit"), 20, "{counters}");

    // Warm: requests within the first half of the TTL make no lookup at all.
    hsm.emulator(json!({ "reset_counters": true }));
    let client = hsm.proxy.client();
    for _ in 0..20 {
        assert_eq!(encrypt(&client, "foo").await.status, 200);
    }
    let counters = hsm.emulator(json!({ "counters": true }));
    assert_eq!(count(&counters, "C_FindObjectsInit"), 0, "{counters}");

    // Past half the TTL the entry is still served while one lookup renews it in the background.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    hsm.emulator(json!({ "reset_counters": true }));
    let replies = encrypt_at_once(&hsm.proxy, 20).await;
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");
    eventually("the background renewal ran", || async {
        count(
            &hsm.emulator(json!({ "counters": true })),
            "C_FindObjectsFinal",
        ) >= 2
    })
    .await;
    let counters = hsm.emulator(json!({ "counters": true }));
    assert_eq!(
        count(&counters, "C_FindObjectsInit"),
        2,
        "one renewal for 20 requests: {counters}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_link_is_answered_in_time_and_heals_without_a_restart() {
    let Some(hsm) = start(Hsm::Emulated(json!({ "latency_us": 2000 })), "", "") else {
        return;
    };
    wait_until_active(&hsm.proxy).await;
    let client = hsm.proxy.client();
    assert_eq!(encrypt(&client, "foo").await.status, 200);

    hsm.emulator(json!({ "set": { "latency_us": 2000, "hang": "forever" } }));
    // Every answer during the hang is a refusal (429) or a dependency timeout (503), each from
    // the proxy's own deadline: the hang guard of 10 s is far above it.
    for round in 0..3 {
        let replies = encrypt_at_once(&hsm.proxy, 24).await;
        for reply in &replies {
            assert!(
                matches!(reply.status.as_u16(), 429 | 503),
                "round {round}: {reply:?}"
            );
        }
    }
    let started = Instant::now();
    eventually("health reports the hung HSM UNAVAILABLE", || async {
        let health = client.call("/health", &bodies::health()).await.unwrap();
        health.body["ekmFleetDetails"][0]["healthStatus"] == "UNAVAILABLE"
    })
    .await;
    hsm.proxy.wait_for_log("abandoned");
    assert!(started.elapsed() < Duration::from_secs(60), "hang guard");

    // The link comes back: the stuck calls fail, sessions are opened again, all is served.
    hsm.emulator(json!({ "set": { "latency_us": 2000 } }));
    eventually("every request succeeds again", || async {
        let replies = encrypt_at_once(&hsm.proxy, 16).await;
        replies.iter().all(|r| r.status == 200)
    })
    .await;
    eventually("health reports ACTIVE again", || async {
        let health = client.call("/health", &bodies::health()).await.unwrap();
        health.body["ekmFleetDetails"][0]["healthStatus"] == "ACTIVE"
    })
    .await;
    let log = hsm.proxy.log();
    assert_eq!(
        log.matches("xks-proxy listening").count(),
        1,
        "the same process: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_device_is_retried_only_where_that_is_safe() {
    let Some(hsm) = start_with_limits(Hsm::Emulated(json!({})), "", "", QUIET_HEALTH) else {
        return;
    };
    wait_until_active(&hsm.proxy).await;
    let client = hsm.proxy.client();
    let encrypted = encrypt(&client, "foo").await;
    assert_eq!(encrypted.status, 200);
    let decrypt = || async {
        client
            .call(
                "/keys/foo/decrypt",
                &bodies::decrypt_from(&encrypted.body, None),
            )
            .await
            .unwrap()
    };
    let fail_next = |function: &str, rv: &str| {
        hsm.fail_next(function, rv);
        hsm.emulator(json!({ "reset_counters": true }));
    };

    for rv in [
        "CKR_DEVICE_ERROR",
        "CKR_DEVICE_REMOVED",
        "CKR_SESSION_HANDLE_INVALID",
        "CKR_TOKEN_NOT_PRESENT",
    ] {
        // A decryption is always safe to repeat: one failure costs no request.
        fail_next("C_Decrypt", rv);
        let reply = decrypt().await;
        assert_eq!(reply.status, 200, "{rv} on C_Decrypt: {}", reply.body);
        assert_eq!(unb64(&reply.body["plaintext"]), b"across the network");
        let counters = hsm.emulator(json!({ "counters": true }));
        assert!(
            count(&counters, "C_Login") >= 1,
            "logged in again after {rv}: {counters}"
        );

        // So is C_EncryptInit: nothing was encrypted.
        fail_next("C_EncryptInit", rv);
        assert_eq!(
            encrypt(&client, "foo").await.status,
            200,
            "{rv} on C_EncryptInit"
        );

        // C_Encrypt may have produced output (and spent its IV): never run again.
        fail_next("C_Encrypt", rv);
        let reply = encrypt(&client, "foo").await;
        assert_error(&reply, 500, "InternalException");
        let counters = hsm.emulator(json!({ "counters": true }));
        assert_eq!(
            count(&counters, "C_Encrypt"),
            1,
            "the failed C_Encrypt ({rv}) was not repeated: {counters}"
        );
        assert_eq!(
            encrypt(&client, "foo").await.status,
            200,
            "served again after {rv}"
        );
    }
}

/// An HSM slower than the traffic (3 calls of 30 ms per Encrypt, 2 sessions): what the pool cannot
/// start within the request's deadline is refused at once with 429 while the rest is served;
/// nothing is a 5xx, and the slow HSM does not shrink the CPU's admission limit (no refusal is
/// counted as `overload`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_hsms_capacity_the_excess_is_refused_and_the_rest_served() {
    let metrics_port = free_port();
    let Some(hsm) = start_with_limits(
        Hsm::Emulated(json!({ "latency_us": 30000 })),
        "session_pool_size = 2\ncall_timeout_ms = 1000",
        "",
        &format!(
            "{QUIET_HEALTH}\nrequest_timeout_ms = 249\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\""
        ),
    ) else {
        return;
    };
    wait_until_active(&hsm.proxy).await;
    let (mut served, mut refused) = (0, 0);
    for round in 0..40 {
        let replies = encrypt_at_once(&hsm.proxy, 24).await;
        for reply in &replies {
            match reply.status.as_u16() {
                200 => served += 1,
                429 => {
                    assert_error(reply, 429, "ThrottlingException");
                    refused += 1;
                }
                503 => assert_error(reply, 503, "DependencyTimeoutException"),
                _ => panic!("round {round}: {reply:?}"),
            }
        }
        if refused > 0 && served > 0 {
            break;
        }
    }
    assert!(served > 0, "some requests are served");
    assert!(refused > 0, "the excess is refused at once");
    let overload = sample(
        &scrape(metrics_port),
        "xks_requests_refused_total{reason=\"overload\"}",
    );
    assert_eq!(overload, Some(0.0), "a slow HSM is not CPU overload");
}
