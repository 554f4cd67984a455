//! Peak-EWMA through the SDK's own call path: the latencies the `CallGuard` measures feed the
//! picker with no other call, so a slow backend stops getting calls. Runs on paused tokio time
//! with the client's call clock on tokio (`CallClock::Tokio`), so the simulated latencies are
//! exact.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use dlb::proto;
use dlb_client::{CallClock, Client, ServiceHandle};

fn snapshot(algorithm: proto::Algorithm) -> proto::ServiceUpdate {
    proto::ServiceUpdate {
        service: "api".into(),
        version: Some(proto::Version {
            epoch: 1,
            version: 1,
        }),
        full: true,
        policy: Some(proto::Policy {
            algorithm: algorithm as i32,
            // A backend never called reads 2 ms: below the slow one, so every backend is tried.
            peak_ewma: Some(proto::PeakEwma {
                decay_ms: 0,
                default_rtt_us: 2_000,
            }),
            ..Default::default()
        }),
        upserts: ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, id)| proto::Server {
                server_id: (*id).into(),
                address: format!("10.0.0.{i}:80"),
                weight: 1,
                health: proto::HealthStatus::Healthy as i32,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

async fn offline_client() -> Client {
    let client = Client::builder(["http://127.0.0.1:9"])
        .wait_connected(false)
        .call_clock(CallClock::Tokio)
        .connect()
        .await
        .unwrap();
    client.close();
    client
}

/// `n` sequential calls; calls to "b" take 20 ms, the others 1 ms; each ends with `success()`.
async fn calls(handle: &ServiceHandle, n: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let call = handle.get_next_server(None).unwrap();
        let ms = if call.server_id() == "b" { 20 } else { 1 };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        *m.entry(call.server_id().to_owned()).or_insert(0) += 1;
        call.success();
    }
    m
}

#[tokio::test(start_paused = true)]
async fn the_call_guard_feeds_peak_ewma_and_a_slow_backend_gets_few_calls() {
    fastrand::seed(9);
    let client = offline_client().await;
    let handle = client
        .detached_service(&snapshot(proto::Algorithm::PeakEwma))
        .unwrap();
    let shares = calls(&handle, 300).await;
    let b = shares.get("b").copied().unwrap_or(0);
    assert!(b <= 10, "the 20x slower backend got {b} of 300: {shares:?}");
    // No retries nor hedging unless the policy asks.
    let call = handle.call_config().unwrap();
    assert!(call.retry.is_none() && call.hedge.is_none());

    // Round robin over the same backends gives b its third.
    let rr = client
        .detached_service(&snapshot(proto::Algorithm::RoundRobin))
        .unwrap();
    let shares = calls(&rr, 300).await;
    assert_eq!(shares.get("b").copied(), Some(100));
}
