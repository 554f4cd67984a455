//! Issue 9 (items 4, 5, 9): outlier detection, panic mode and global least connections, with a
//! real `dlbd` and real SDK clients on loopback.
//!
//! Backends are only addresses here: the tests report call outcomes through the SDK's call
//! guards (`success` / `failure`), which is exactly what the SDK reports for real calls.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use dlb::health_policy::max_ejected;
use dlb::proto;
use dlb_client::{Client, ServerUpdate, ServiceHandle};
use dlb_server::{RunningServer, ServiceConfig};

/// A service with `n` backends b00.. and outlier detection (`consecutive` failures, `percent`
/// max ejection, `base_ms` ejection time).
fn outlier_service(
    name: &str,
    n: usize,
    consecutive: u32,
    percent: u32,
    base_ms: u32,
) -> ServiceConfig {
    let ids: Vec<String> = (0..n).map(|i| format!("b{i:02}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut s = service_with(name, &refs);
    s.policy.outlier_detection = Some(proto::OutlierDetection {
        consecutive_failures: consecutive,
        max_ejection_percent: percent,
        base_ejection_ms: base_ms,
        max_ejection_ms: 3_600_000,
        ..Default::default()
    });
    s
}

async fn sdk(server: &RunningServer) -> Client {
    Client::builder([endpoint(server)])
        .report_interval(Duration::from_millis(20))
        .ack_delay(Duration::ZERO)
        .connect()
        .await
        .unwrap()
}

/// Backends whose outlier source says UNHEALTHY, by id, with the detail.
async fn ejected(client: &Client, service: &str) -> BTreeMap<String, String> {
    let r = client.admin().list_servers(service).await.unwrap();
    r.servers
        .into_iter()
        .filter_map(|s| {
            let o = s.sources?.outlier?;
            (o.verdict == proto::Verdict::Unhealthy as i32).then_some((s.server_id, o.detail))
        })
        .collect()
}

async fn metric(server: &RunningServer, prefix: &str) -> Option<f64> {
    sample(&scrape(server.metrics_addr().unwrap()).await, prefix)
}

/// One round: one pick per eligible backend, each failed when `fails(id)`.
fn round(handle: &ServiceHandle, fails: impl Fn(&str) -> bool) -> u64 {
    let eligible = handle.backends().iter().filter(|b| b.eligible).count();
    let mut calls = 0;
    for _ in 0..eligible {
        if let Ok(g) = handle.get_next_server(None) {
            calls += 1;
            if fails(g.server_id()) {
                g.failure();
            } else {
                g.success();
            }
        }
    }
    calls
}

#[tokio::test]
async fn max_ejection_rule_is_exact_for_1_2_3_7_10_and_20_backends() {
    let sizes = [1usize, 2, 3, 7, 10, 20];
    // 50 %: limits 0, 1, 1, 3, 5, 10; 10 % (the default): 0, 1, 1, 1, 1, 2.
    let mut services = Vec::new();
    for &n in &sizes {
        services.push(outlier_service(&format!("half{n}"), n, 3, 50, 3_600_000));
        services.push(outlier_service(&format!("tenth{n}"), n, 3, 0, 3_600_000));
    }
    let server = dlb_server::spawn(config(services)).await.unwrap();
    let client = sdk(&server).await;
    for &n in &sizes {
        for (name, percent) in [(format!("half{n}"), 50), (format!("tenth{n}"), 10)] {
            let handle = client.service(&name).await.unwrap();
            let want = max_ejected(n, percent);
            // Every backend fails every call; keep failing well past the point where the
            // limit is reached (20 rounds ≥ 3 failures in a row for everyone).
            let mut sent = 0u64;
            for _ in 0..20 {
                sent += round(&handle, |_| true);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Every reported failure has reached the detector…
            let requests = format!("dlb_requests_total{{service=\"{name}\"}}");
            within(&format!("{name}: all {sent} outcomes counted"), async {
                while metric(&server, &requests).await != Some(sent as f64) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            // …and exactly limit(n, p) backends are ejected, never more.
            within(&format!("{name}: {want} ejected"), async {
                while ejected(&client, &name).await.len() != want {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            for _ in 0..5 {
                sent += round(&handle, |_| true);
            }
            within(&format!("{name}: the extra outcomes counted"), async {
                while metric(&server, &requests).await != Some(sent as f64) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            assert_eq!(ejected(&client, &name).await.len(), want, "{name}");
            // The SDK routes to the others only (n = 1: the lone backend stays).
            eventually(&format!("{name}: SDK sees {want} ejected"), || {
                handle.backends().iter().filter(|b| b.eligible).count() == n - want
            })
            .await;
        }
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_ejected_backend_returns_after_its_time_and_the_time_grows_on_repeat() {
    let server = dlb_server::spawn(config(vec![outlier_service("s", 4, 3, 50, 1_000)]))
        .await
        .unwrap();
    let client = sdk(&server).await;
    let handle = client.service("s").await.unwrap();
    let bad = |id: &str| id == "b01";
    for expect in [
        "ejected for 1000 ms (time 1)",
        "ejected for 2000 ms (time 2)",
    ] {
        // Fail b01 until it is ejected.
        within("b01 ejected", async {
            loop {
                round(&handle, bad);
                if ejected(&client, "s").await.contains_key("b01") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let detail = ejected(&client, "s").await.remove("b01").unwrap();
        assert!(detail.contains(expect), "{detail:?} should say {expect:?}");
        assert!(detail.contains("failures in a row"), "{detail:?}");
        // The reason says so, and the SDK stops picking it.
        let r = client.admin().list_servers("s").await.unwrap();
        let b01 = r.servers.iter().find(|s| s.server_id == "b01").unwrap();
        assert!(b01.reason.starts_with("outlier: "), "{:?}", b01.reason);
        converge(&handle, r.version).await;
        assert!(!picked(&handle, 40).contains("b01"));
        // It returns by itself once its ejection time is over, and is picked again.
        within("b01 returned", async {
            while ejected(&client, "s").await.contains_key("b01") {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        eventually("SDK picks b01 again", || {
            picked(&handle, 40).contains("b01")
        })
        .await;
    }
    // Only b01 was ever ejected: the others always succeeded.
    assert_eq!(
        metric(&server, "dlb_outlier_ejections_total{service=\"s\"}").await,
        Some(2.0)
    );
    // The request metrics saw the traffic: at least 2 × 3 failures, every call measured.
    let text = scrape(server.metrics_addr().unwrap()).await;
    let requests = sample(&text, "dlb_requests_total{service=\"s\"}").unwrap();
    let errors = sample(&text, "dlb_request_errors_total{service=\"s\"}").unwrap();
    let measured = sample(&text, "dlb_request_latency_measured_total{service=\"s\"}").unwrap();
    assert!(errors >= 6.0 && requests > errors, "{requests} {errors}");
    assert_eq!(measured, requests);
    assert!(sample(&text, "dlb_request_latency_seconds_total{service=\"s\"}").is_some());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn two_sdks_see_identical_eligibility_after_every_ejection() {
    let server = dlb_server::spawn(config(vec![outlier_service("s", 10, 3, 50, 3_600_000)]))
        .await
        .unwrap();
    let (c1, c2) = (sdk(&server).await, sdk(&server).await);
    let (h1, h2) = (
        c1.service("s").await.unwrap(),
        c2.service("s").await.unwrap(),
    );
    let eligible = |h: &ServiceHandle| -> Vec<(String, bool)> {
        h.backends()
            .into_iter()
            .map(|b| (b.server_id, b.eligible))
            .collect()
    };
    let mut seen_versions = 0;
    let mut last = 0;
    within("5 ejections, compared at every version", async {
        loop {
            // Both SDKs send traffic; b00..b04 fail for both.
            round(&h1, |id| id < "b05");
            round(&h2, |id| id < "b05");
            let r = c1.admin().list_servers("s").await.unwrap();
            let v = r.version.unwrap().version;
            converge(&h1, r.version).await;
            converge(&h2, r.version).await;
            // Compare only when both routed on one version throughout the reads (a newer one
            // may arrive at any time; versions only grow).
            let (v1, e1, v2, e2) = (h1.version(), eligible(&h1), h2.version(), eligible(&h2));
            if v1 == v2 && h1.version() == v1 && h2.version() == v2 {
                assert_eq!(e1, e2, "split decision at {v}");
                if v != last {
                    seen_versions += 1;
                    last = v;
                }
            }
            let ejected_now = r
                .servers
                .iter()
                .filter(|s| s.reason.starts_with("outlier"))
                .count();
            if ejected_now == 5 && h1.version().version == v && h2.version().version == v {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(seen_versions >= 1);
    let e = eligible(&h1);
    assert_eq!(e, eligible(&h2));
    assert_eq!(e.iter().filter(|(_, ok)| !ok).count(), 5);
    assert!(e.iter().all(|(id, ok)| *ok == (id.as_str() >= "b05")));
    server.shutdown().await.unwrap();
}

/// Reads session updates of `service` until one carries a panic state with `active`.
async fn panic_event(server: &RunningServer, service: &str, active: bool) -> proto::PanicState {
    use dlb::proto::discovery_client::DiscoveryClient;
    let mut d = DiscoveryClient::connect(endpoint(server)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(proto::ClientMessage {
        kind: Some(proto::client_message::Kind::Subscribe(proto::Subscribe {
            locality: None,
            client_id: "test".into(),
            services: vec![proto::ServiceSubscription {
                service: service.into(),
                known: None,
            }],
        })),
    })
    .await
    .unwrap();
    let mut inbound = d
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    within("panic event", async {
        loop {
            let m = inbound.message().await.unwrap().unwrap();
            if let Some(proto::server_message::Kind::Update(u)) = m.kind {
                if let Some(p) = u.panic.filter(|p| p.active == active) {
                    drop(tx);
                    return p;
                }
            }
        }
    })
    .await
}

#[tokio::test]
async fn panic_route_all_and_fail_with_event_metric_and_transitions() {
    let mut s = service_with("p", &["a", "b", "c", "d"]);
    s.policy.panic = Some(proto::PanicPolicy {
        threshold_percent: 50,
        mode: proto::PanicMode::RouteAll as i32,
    });
    let server = dlb_server::spawn(config(vec![s])).await.unwrap();
    let client = sdk(&server).await;
    let handle = client.service("p").await.unwrap();
    let admin = client.admin();
    // 2 of 4 eligible = 50 %: not below the threshold.
    admin.health_check_failed("p", "a").await.unwrap();
    let r = admin.health_check_failed("p", "b").await.unwrap();
    converge(&handle, r.version).await;
    assert!(!handle.panic_state().unwrap().active);
    assert_eq!(picked(&handle, 40), set(&["c", "d"]));
    // 1 of 4: panic, route_all: every backend is picked again.
    let r = admin.health_check_failed("p", "c").await.unwrap();
    converge(&handle, r.version).await;
    let st = handle.panic_state().unwrap();
    assert!(st.active && st.eligible == 1 && st.total == 4);
    assert_eq!(picked(&handle, 40), set(&["a", "b", "c", "d"]));
    assert_eq!(handle.stats().panic_transitions, 1);
    // The event on the session, the list and the metrics.
    let ev = panic_event(&server, "p", true).await;
    assert_eq!((ev.eligible, ev.total), (1, 4));
    assert_eq!(ev.mode, proto::PanicMode::RouteAll as i32);
    let list = admin.list_servers("p").await.unwrap();
    assert!(list.panic.unwrap().active);
    let m = server.metrics_addr().unwrap();
    within("panic metrics", async {
        loop {
            let text = scrape(m).await;
            if sample(&text, "dlb_panic{service=\"p\"}") == Some(1.0)
                && sample(
                    &text,
                    "dlb_panic_transitions_total{service=\"p\",to=\"panic\"}",
                ) == Some(1.0)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // dlbd's GetNextServer routes the same way: a pick may land on an unhealthy backend.
    // (GetNextServer bounds its wait for the newest picker, so poll until it answers from it.)
    within("GetNextServer routes to all in panic", async {
        loop {
            let mut remote = std::collections::BTreeSet::new();
            for _ in 0..40 {
                let r = admin.get_next_server("p", None).await.unwrap();
                remote.insert(r.server.unwrap().server_id);
            }
            if remote == set(&["a", "b", "c", "d"]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Mode fail: every pick fails fast, in the SDK and in dlbd.
    let mut policy = admin.get_policy("p").await.unwrap().policy.unwrap();
    policy.panic.as_mut().unwrap().mode = proto::PanicMode::Fail as i32;
    let r = admin.set_policy("p", policy).await.unwrap();
    converge(&handle, r.version).await;
    let err = handle.get_next_server(None).unwrap_err();
    assert!(err.to_string().contains("panic"), "{err}");
    within("GetNextServer fails in panic", async {
        loop {
            match admin.get_next_server("p", None).await {
                Err(e) if e.to_string().contains("panic") => break,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;

    // Leaving panic: 3 of 4 eligible.
    admin.health_check_passed("p", "a").await.unwrap();
    let r = admin.health_check_passed("p", "b").await.unwrap();
    converge(&handle, r.version).await;
    assert!(!handle.panic_state().unwrap().active);
    assert_eq!(handle.stats().panic_transitions, 2);
    assert_eq!(picked(&handle, 40), set(&["a", "b", "d"]));
    let ev = panic_event(&server, "p", false).await;
    assert_eq!((ev.eligible, ev.total), (3, 4));
    within("left-panic metric", async {
        while metric(
            &server,
            "dlb_panic_transitions_total{service=\"p\",to=\"normal\"}",
        )
        .await
            != Some(1.0)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn global_least_connections_two_sdks() {
    let mut s = service_with("lc", &["A", "B"]);
    s.policy.algorithm = proto::Algorithm::LeastConnExact as i32;
    let server = dlb_server::spawn(config(vec![s])).await.unwrap();
    let (c1, c2) = (sdk(&server).await, sdk(&server).await);
    let (h1, h2) = (
        c1.service("lc").await.unwrap(),
        c2.service("lc").await.unwrap(),
    );
    // SDK 1 holds 50 calls on A (B drained while it picks).
    let mut drain = ServerUpdate::new("B");
    drain.draining = Some(true);
    let r = c1.admin().update_server("lc", drain).await.unwrap();
    converge(&h1, r.version).await;
    let held: Vec<_> = (0..50).map(|_| h1.get_next_server(None).unwrap()).collect();
    assert!(held.iter().all(|g| g.server_id() == "A"));
    let mut undrain = ServerUpdate::new("B");
    undrain.draining = Some(false);
    let r = c1.admin().update_server("lc", undrain).await.unwrap();
    converge(&h1, r.version).await;
    converge(&h2, r.version).await;
    // SDK 2 learns, from dlbd, that others hold 50 calls on A (and none of its own).
    eventually("SDK 2 sees A's global count", || {
        h2.backends()
            .iter()
            .any(|b| b.server_id == "A" && b.others_in_flight == 50)
    })
    .await;
    assert!(h2
        .backends()
        .iter()
        .all(|b| b.server_id != "B" || b.others_in_flight == 0));
    // SDK 1 is told only about the others: nothing.
    assert!(h1.backends().iter().all(|b| b.others_in_flight == 0));
    // SDK 2's next picks avoid A: its own live count on B stays below A's global 50.
    let mine: Vec<_> = (0..30).map(|_| h2.get_next_server(None).unwrap()).collect();
    assert!(
        mine.iter().all(|g| g.server_id() == "B"),
        "{:?}",
        mine.iter().map(|g| g.server_id()).collect::<Vec<_>>()
    );
    drop(mine);
    drop(held);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn stored_ejections_are_returned_when_detection_is_off_and_adopted_when_on() {
    use dlb_server::store::{MemoryStore, Mutation, ServerPatch, Store};
    use std::sync::Arc;
    let store = Arc::new(MemoryStore::new(64));
    let eject = |id: &str| {
        Mutation::Update(
            id.to_owned(),
            ServerPatch {
                outlier: Some(proto::SourceState {
                    verdict: proto::Verdict::Unhealthy as i32,
                    detail: "ejected before a restart".into(),
                }),
                ..Default::default()
            },
        )
    };
    // "off": no outlier detection; "on": detection with a 3 s base ejection time.
    let base = Duration::from_secs(3);
    for name in ["off", "on"] {
        let mut s = if name == "on" {
            outlier_service(name, 3, 3, 50, base.as_millis() as u32)
        } else {
            service_with(name, &["b00", "b01", "b02"])
        };
        s.backends.iter_mut().for_each(|b| b.health = 0);
        let mut m: Vec<Mutation> = vec![Mutation::SetPolicy(s.policy)];
        m.extend(s.backends.into_iter().map(Mutation::Add));
        m.push(eject("b01"));
        store.apply(name.to_owned(), m, None).await.unwrap();
    }
    // Nothing of dlbd runs before this instant, so nothing it adopts can end before
    // `started + base`.
    let started = tokio::time::Instant::now();
    let server = dlb_server::spawn_with_store(config(vec![]), store)
        .await
        .unwrap();
    let client = sdk(&server).await;
    // Off: nobody would ever return it, so dlbd does at start.
    within("stale ejection returned", async {
        while !ejected(&client, "off").await.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // On: adopted, so returned one base time after the start at the earliest (a dlbd that
    // returned it at start, as for "off", fails here), and at the latest when it ends
    // (generous: this VM stalls).
    let returned = tokio::time::timeout(Duration::from_secs(60), async {
        while !ejected(&client, "on").await.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    })
    .await
    .expect("the adopted ejection was never returned");
    assert!(
        returned >= base,
        "the adopted ejection was returned after {returned:?}, before its base time {base:?}"
    );
    server.shutdown().await.unwrap();
}
