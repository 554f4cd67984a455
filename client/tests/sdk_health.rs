//! Issue 9 items 6 and 8: slow start and the SDK's circuit breaker, with a real `dlbd` and real
//! SDK clients on loopback.
//!
//! No assertion depends on how fast the machine is: slow-start shares are asserted only for
//! picks that, by the records' own `ready_since_ms` and the clock read after them, were all made
//! in the first half of the window (otherwise that check is skipped), and the final parity is
//! awaited by bounded polling. Breaker cool-downs are checked from below only (a circuit can
//! never half-open before its cool-down), never from above.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use dlb::proto;
use dlb_client::{Client, Error, ServiceHandle};
use dlb_server::RunningServer;

async fn sdk(server: &RunningServer) -> Client {
    Client::builder([endpoint(server)])
        .report_interval(Duration::from_millis(20))
        .ack_delay(Duration::ZERO)
        .connect()
        .await
        .unwrap()
}

/// Local picks per backend id over `n` picks (each guard dropped at once).
fn shares(handle: &ServiceHandle, n: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let g = handle.get_next_server(None).unwrap();
        *m.entry(g.server_id().to_owned()).or_insert(0) += 1;
    }
    m
}

const WINDOW_MS: u32 = 3_000;

fn slow_start_policy() -> proto::Policy {
    let mut p = dlb::model::default_policy();
    p.slow_start = Some(proto::SlowStart {
        window_ms: WINDOW_MS,
        min_percent: 10,
    });
    p
}

#[tokio::test]
async fn slow_start_ramp_is_seen_in_pick_proportions_then_parity() {
    let mut svc = service_with("ss", &["old"]);
    svc.policy = slow_start_policy();
    let server = dlb_server::spawn(config(vec![svc])).await.unwrap();
    let client = sdk(&server).await;
    let handle = client.service("ss").await.unwrap();
    // "old" became eligible at dlbd's start; wait for its own window to end so that only the
    // next backend ramps (were both ramping, neither would be held back).
    let old = server_ready_since(&client, "ss", "old").await;
    within("old's window to end", async {
        while dlb::slow_start::now_ms() < old + u64::from(WINDOW_MS) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let added = handle.add_server("new", "127.0.0.1:9100", 1).await.unwrap();
    converge(&handle, added.version).await;
    let ready = added.server.unwrap().ready_since_ms;
    assert!(ready > 0, "the store stamps ready_since_ms on add");

    // Early in the window: the SDK's share, and dlbd's GetNextServer share.
    let local = shares(&handle, 1_000);
    let mut remote: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..200 {
        let r = handle.get_next_server_remote(None).await.unwrap();
        *remote.entry(r.server.unwrap().server_id).or_insert(0) += 1;
    }
    let elapsed = dlb::slow_start::now_ms().saturating_sub(ready);
    if elapsed < u64::from(WINDOW_MS) / 2 {
        // Factor ≤ 55 % (weight ≤ 55 of 100): "new" takes at most 55/155 ≈ 35.5 %.
        let new = local.get("new").copied().unwrap_or(0);
        assert!(new > 0, "a ramping backend still gets picks: {local:?}");
        assert!(new < 400, "ramping backend got {new} of 1000 local picks");
        let new = remote.get("new").copied().unwrap_or(0);
        assert!(
            new < 85,
            "ramping backend got {new} of 200 GetNextServer picks"
        );
    } else {
        // Too slow a machine to see the early ramp. Parity is still checked below.
        eprintln!("skipping the early-share check: elapsed {elapsed} ms");
    }

    // After the window: parity (smooth WRR is exact: 500 ± 1 of 1000).
    within("parity after the ramp", async {
        loop {
            let s = shares(&handle, 1_000);
            if s.get("new").copied().unwrap_or(0).abs_diff(500) <= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    within("dlbd parity after the ramp", async {
        loop {
            let mut n = 0;
            for _ in 0..100 {
                let r = handle.get_next_server_remote(None).await.unwrap();
                n += usize::from(r.server.unwrap().server_id == "new");
            }
            if n.abs_diff(50) <= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

async fn server_ready_since(client: &Client, service: &str, id: &str) -> u64 {
    let r = client.admin().list_servers(service).await.unwrap();
    r.servers
        .into_iter()
        .find(|s| s.server_id == id)
        .unwrap()
        .ready_since_ms
}

#[tokio::test]
async fn slow_start_all_new_holds_none_back_and_recovery_ramps_again() {
    let mut svc = service_with("an", &["a", "b"]);
    svc.policy = slow_start_policy();
    let server = dlb_server::spawn(config(vec![svc])).await.unwrap();
    let client = sdk(&server).await;
    let handle = client.service("an").await.unwrap();
    eventually("both backends", || handle.backends().len() == 2).await;
    // Both became eligible at dlbd's start: both ramp, so neither is held back.
    let s = shares(&handle, 1_000);
    assert_eq!(s.get("a"), Some(&500), "{s:?}");
    assert_eq!(s.get("b"), Some(&500), "{s:?}");
    let ra = server_ready_since(&client, "an", "a").await;
    assert!(ra > 0);

    // Wait out the window, then take "b" down and back: it ramps again from a new stamp.
    within("a's ramp to end", async {
        while dlb::slow_start::now_ms() < ra + u64::from(WINDOW_MS) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let down = handle.health_check_failed("b").await.unwrap();
    assert_eq!(
        down.server.unwrap().ready_since_ms,
        0,
        "ineligible: no stamp"
    );
    let up = handle.health_check_passed("b").await.unwrap();
    converge(&handle, up.version).await;
    let rb = up.server.unwrap().ready_since_ms;
    assert!(
        rb > ra + u64::from(WINDOW_MS) - 1,
        "recovered: stamped again"
    );
    let s = shares(&handle, 1_000);
    if dlb::slow_start::now_ms() - rb < u64::from(WINDOW_MS) / 2 {
        assert!(s.get("b").copied().unwrap_or(0) < 400, "{s:?}");
    }
}

fn breaker_policy(base_ms: u32, cap: u32) -> proto::Policy {
    let mut p = dlb::model::default_policy();
    p.circuit_breaker = Some(proto::CircuitBreaker {
        consecutive_failures: 3,
        base_cooldown_ms: base_ms,
        max_cooldown_ms: 60_000,
        half_open_max_calls: 1,
        max_concurrent_calls: cap,
        ..Default::default()
    });
    p
}

/// Picks until backend `id` comes up (bounded), returning its guard; other guards are
/// completed as successes.
async fn pick_until(handle: &ServiceHandle, id: &str) -> dlb_client::CallGuard {
    within(&format!("a pick of {id}"), async {
        loop {
            let g = handle.get_next_server(None).unwrap();
            if g.server_id() == id {
                return g;
            }
            g.success();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
}

async fn circuits(client: &Client, service: &str) -> Vec<proto::CircuitReport> {
    client.admin().list_servers(service).await.unwrap().circuits
}

#[tokio::test]
async fn breaker_opens_half_opens_closes_and_cool_down_grows() {
    let mut svc = service_with("cb", &["a", "b", "c"]);
    svc.policy = breaker_policy(1_000, 0);
    let server = dlb_server::spawn(config(vec![svc])).await.unwrap();
    let client = sdk(&server).await;
    let handle = client.service("cb").await.unwrap();
    eventually("three backends", || handle.backends().len() == 3).await;

    // Three failures in a row on "a" open its circuit.
    for _ in 0..2 {
        pick_until(&handle, "a").await.failure();
    }
    let third = pick_until(&handle, "a").await;
    // Taken before the failure is recorded: the circuit opens at or after this instant.
    let opened = Instant::now();
    third.failure();
    assert_eq!(handle.circuit_trips(), 1);
    // While open (the cool-down cannot have ended before `opened + 1 s`), "a" is skipped and
    // the others share the traffic. Every pick is checked: "a" may only come as the half-open
    // trial, after the cool-down (if this machine stalled that long); it is kept for below.
    let mut seen = BTreeMap::new();
    let mut early_trial = None;
    for _ in 0..300 {
        let g = handle.get_next_server(None).unwrap();
        if g.server_id() == "a" {
            assert!(
                opened.elapsed() >= Duration::from_millis(1_000),
                "open circuit picked after {:?}: {seen:?}",
                opened.elapsed()
            );
            early_trial = Some(g);
            break;
        }
        *seen.entry(g.server_id().to_owned()).or_insert(0) += 1;
        g.success();
    }
    assert!(seen.contains_key("b") && seen.contains_key("c"), "{seen:?}");

    // Reported to the control plane and shown by ListServers and the metric.
    within("the open circuit in ListServers", async {
        loop {
            let c = circuits(&client, "cb").await;
            if c.iter().any(|r| r.server_id == "a" && r.open_sessions == 1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let m = scrape(server.metrics_addr().unwrap()).await;
    assert!(
        m.lines().any(|l| l.starts_with("dlb_sdk_circuits{")
            && l.contains("state=\"open\"")
            && l.ends_with(" 1")),
        "{m}"
    );

    // After the cool-down: one trial (half-open); while it is in flight "a" gets nothing more.
    let trial = match early_trial {
        Some(t) => t,
        None => pick_until(&handle, "a").await,
    };
    assert!(opened.elapsed() >= Duration::from_millis(1_000));
    let states: BTreeMap<_, _> = handle.circuit_states().into_iter().collect();
    assert_eq!(states["a"], dlb::circuit::State::HalfOpen);
    for _ in 0..100 {
        let g = handle.get_next_server(None).unwrap();
        assert_ne!(g.server_id(), "a", "a second trial while one is in flight");
        g.success();
    }
    // The trial fails: open again, with a doubled cool-down (2 s).
    let reopened = Instant::now();
    trial.failure();
    let trial = pick_until(&handle, "a").await;
    assert!(
        reopened.elapsed() >= Duration::from_millis(2_000),
        "the second cool-down is 2 s"
    );
    // A successful trial closes the circuit: "a" is back in the rotation.
    trial.success();
    let states: BTreeMap<_, _> = handle.circuit_states().into_iter().collect();
    assert_eq!(states["a"], dlb::circuit::State::Closed);
    let s = shares(&handle, 300);
    assert_eq!(s.get("a"), Some(&100), "{s:?}");
    within("the closed circuit leaves ListServers", async {
        while !circuits(&client, "cb").await.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn concurrent_call_cap_fails_fast_with_resource_exhausted() {
    let mut svc = service_with("cap", &["a", "b"]);
    svc.policy = breaker_policy(1_000, 2);
    let server = dlb_server::spawn(config(vec![svc])).await.unwrap();
    let client = sdk(&server).await;
    let handle = client.service("cap").await.unwrap();
    eventually("two backends", || handle.backends().len() == 2).await;
    let g1 = handle.get_next_server(None).unwrap();
    let g2 = handle.get_next_server(None).unwrap();
    match handle.get_next_server(None) {
        Err(Error::ResourceExhausted(msg)) => {
            assert!(msg.contains("max_concurrent_calls"), "{msg}")
        }
        other => panic!("expected ResourceExhausted, got {other:?}"),
    }
    g1.success();
    let g3 = handle.get_next_server(None).unwrap();
    drop(g2);
    drop(g3);
    // Every permit came back.
    let guards: Vec<_> = (0..2)
        .map(|_| handle.get_next_server(None).unwrap())
        .collect();
    assert!(handle.get_next_server(None).is_err());
    drop(guards);

    // Picks that fail for want of a backend give their permit back too.
    handle.health_check_failed("a").await.unwrap();
    let down = handle.health_check_failed("b").await.unwrap();
    converge(&handle, down.version).await;
    for _ in 0..5 {
        assert!(matches!(
            handle.get_next_server(None),
            Err(Error::NoBackend { .. })
        ));
    }
    let up = handle.health_check_passed("a").await.unwrap();
    converge(&handle, up.version).await;
    let guards: Vec<_> = (0..2)
        .map(|_| handle.get_next_server(None).unwrap())
        .collect();
    assert!(matches!(
        handle.get_next_server(None),
        Err(Error::ResourceExhausted(_))
    ));
    drop(guards);
}

#[tokio::test]
async fn policy_fields_are_validated_and_round_trip() {
    let server = spawn_server().await;
    let client = sdk(&server).await;
    let mut p = slow_start_policy();
    p.circuit_breaker = Some(proto::CircuitBreaker {
        failure_rate_percent: 101,
        ..Default::default()
    });
    let e = client.admin().set_policy("v", p.clone()).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("circuit_breaker.failure_rate_percent"),
        "{e}"
    );
    p.circuit_breaker = Some(proto::CircuitBreaker::default());
    let r = client.admin().set_policy("v", p.clone()).await.unwrap();
    let got = r.policy.unwrap();
    assert_eq!(got.slow_start, p.slow_start);
    assert_eq!(got.circuit_breaker, p.circuit_breaker);
}
