//! The tracker: follows, reports, the sliding window on paused time, publication and bounds.

use super::*;

fn zone(name: &str) -> ZoneKey {
    ZoneKey {
        region: "eu".into(),
        zone: name.into(),
    }
}

fn calls(n: u64) -> Vec<proto::BackendLoad> {
    vec![
        proto::BackendLoad {
            server_id: "b1".into(),
            successes: n / 2,
            failures: n - n / 2,
            ..Default::default()
        },
        proto::BackendLoad {
            server_id: "b2".into(),
            in_flight: 3,
            ..Default::default()
        },
    ]
}

fn shares(t: &DemandTracker, service: &str) -> Vec<(String, f64)> {
    t.published(service)
        .1
        .iter()
        .map(|(z, s)| (z.zone.clone(), (s * 1000.0).round() / 1000.0))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn followers_then_calls_then_the_window_slides_back() {
    let t = DemandTracker::new(DemandMetrics::default());
    let mut rx = t.subscribe();
    t.join(1, zone("a"));
    t.join(2, zone("a"));
    t.join(3, zone("b"));
    for s in 1..=3 {
        t.follow(s, "web");
    }
    // Session 4 has no zone: it follows and reports, and counts nowhere.
    t.follow(4, "web");
    t.report(4, "web", &calls(1000));
    assert!(rx.has_changed().unwrap());
    rx.borrow_and_update();
    // Before any call: followers, 2 in a and 1 in b.
    assert_eq!(
        shares(&t, "web"),
        vec![("a".into(), 0.667), ("b".into(), 0.333)]
    );
    let (g1, _) = t.published("web");
    // Calls replace followers: a 10, b 30.
    t.report(1, "web", &calls(10));
    t.report(3, "web", &calls(30));
    assert_eq!(
        shares(&t, "web"),
        vec![("a".into(), 0.25), ("b".into(), 0.75)]
    );
    assert!(rx.has_changed().unwrap());
    rx.borrow_and_update();
    // A move under 1 % publishes nothing (and wakes no session).
    tokio::time::advance(Duration::from_secs(1)).await;
    t.report(2, "web", &calls(0));
    let (g2, _) = t.published("web");
    t.report(3, "web", &calls(1)); // b: 31/41 = 0.756, +0.6 %
    assert_eq!(t.published("web").0, g2);
    assert!(!rx.has_changed().unwrap());
    assert_ne!(g1, g2);
    // Ten seconds on, the first reports leave the window; the second-1 report is alone.
    tokio::time::advance(Duration::from_secs(9)).await;
    t.tick();
    assert_eq!(
        shares(&t, "web"),
        vec![("a".into(), 0.0), ("b".into(), 1.0)]
    );
    // And then back to followers once every call has left it.
    tokio::time::advance(Duration::from_secs(1)).await;
    t.tick();
    assert_eq!(
        shares(&t, "web"),
        vec![("a".into(), 0.667), ("b".into(), 0.333)]
    );
    // Sessions leave: their follows go at once.
    t.unfollow(3, "web");
    assert_eq!(shares(&t, "web"), vec![("a".into(), 1.0)]);
    t.remove_session(1);
    t.remove_session(2);
    assert_eq!(t.published("web").0, 0, "nothing left: not tracked");
    assert!(shares(&t, "web").is_empty());
    assert_eq!(t.zones("web"), 0);
}

#[tokio::test(start_paused = true)]
async fn calls_of_gone_sessions_expire_with_the_window() {
    let t = DemandTracker::new(DemandMetrics::default());
    t.join(1, zone("a"));
    t.join(2, zone("b"));
    t.follow(1, "web");
    t.follow(2, "web");
    t.report(1, "web", &calls(30));
    t.report(2, "web", &calls(10));
    t.remove_session(1);
    // a's calls still count until they leave the window, then a goes.
    assert_eq!(
        shares(&t, "web"),
        vec![("a".into(), 0.75), ("b".into(), 0.25)]
    );
    tokio::time::advance(window::WINDOW).await;
    t.tick();
    assert_eq!(shares(&t, "web"), vec![("b".into(), 1.0)]);
    assert_eq!(t.zones("web"), 1);
    // A report from a session that is not (or no longer) counted on the service is ignored.
    t.report(1, "web", &calls(100));
    t.report(2, "other", &calls(100));
    assert_eq!(shares(&t, "web"), vec![("b".into(), 1.0)]);
    assert!(shares(&t, "other").is_empty());
}

#[tokio::test(start_paused = true)]
async fn zones_per_service_are_capped_and_the_rest_is_dropped() {
    let metrics = DemandMetrics::default();
    let t = DemandTracker::new(metrics.clone());
    let n = MAX_ZONES as u64 + 5;
    for s in 0..n {
        t.join(s, zone(&format!("z{s:03}")));
        t.follow(s, "web");
        t.report(s, "web", &calls(1));
    }
    assert_eq!(t.zones("web"), MAX_ZONES);
    assert_eq!(metrics.dropped.get(), 5);
    let published = t.published("web").1;
    assert_eq!(published.len(), MAX_ZONES);
    let sum: f64 = published.iter().map(|(_, s)| s).sum();
    assert!((sum - 1.0).abs() < 1e-9, "{sum}");
    // A dropped session's calls count nowhere, and it can leave cleanly.
    t.report(n - 1, "web", &calls(1_000_000));
    assert_eq!(t.published("web").1.len(), MAX_ZONES);
    t.remove_session(n - 1);
    // Hostile counts are clamped per report.
    t.report(
        0,
        "web",
        &[proto::BackendLoad {
            server_id: "x".into(),
            successes: u64::MAX,
            failures: u64::MAX,
            ..Default::default()
        }],
    );
    let top = t.published("web").1[0].1;
    assert!(top > 0.99 && top <= 1.0, "{top}");
}

#[tokio::test(start_paused = true)]
async fn the_share_gauges_follow_the_publications() {
    let mut registry = Registry::default();
    let metrics = DemandMetrics::register(&mut registry);
    let t = DemandTracker::new(metrics);
    t.join(1, zone("a"));
    t.join(2, zone("b"));
    t.follow(1, "web");
    t.follow(2, "web");
    let text = || {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        out
    };
    let out = text();
    assert!(
        out.contains(r#"dlb_zone_demand_share{service="web",zone="eu/a"} 0.5"#),
        "{out}"
    );
    t.remove_session(2);
    let out = text();
    assert!(
        out.contains(r#"dlb_zone_demand_share{service="web",zone="eu/a"} 1"#),
        "{out}"
    );
    assert!(!out.contains(r#"zone="eu/b""#), "{out}");
}
