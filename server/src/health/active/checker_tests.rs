//! Scheduler tests on paused tokio time with a scripted prober (no network).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dlb::proto;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::checker::{Checker, Command};
use super::metrics::HealthMetrics;
use super::probe::{Outcome, ProbeTarget, Prober};
use super::writer::Write;
use crate::cache::Cache;
use crate::store::{Servers, ServiceSnapshot, StoreSnapshot};

/// What the scripted prober does for an address.
#[derive(Clone, Copy)]
enum Script {
    Pass,
    Fail,
    Hang,
    /// Pass, fail, pass, fail…
    Alternate,
}

#[derive(Default)]
struct Scripted {
    scripts: Mutex<HashMap<String, Script>>,
    calls: Mutex<Vec<(String, Instant)>>,
}

impl Prober for Arc<Scripted> {
    fn probe(&self, target: ProbeTarget) -> BoxFuture<'static, Outcome> {
        let script = self
            .scripts
            .lock()
            .get(&target.address)
            .copied()
            .unwrap_or(Script::Pass);
        let n = {
            let mut calls = self.calls.lock();
            calls.push((target.address.clone(), Instant::now()));
            calls.iter().filter(|(a, _)| *a == target.address).count()
        };
        Box::pin(async move {
            match script {
                Script::Pass => Outcome::Pass("ok".into()),
                Script::Fail => Outcome::Fail("HTTP 503".into()),
                Script::Hang => futures::future::pending().await,
                Script::Alternate if n % 2 == 1 => Outcome::Pass("ok".into()),
                Script::Alternate => Outcome::Fail("HTTP 503".into()),
            }
        })
    }
}

fn check(interval_ms: u32, timeout_ms: u32, rise: u32, fall: u32) -> proto::HealthCheck {
    proto::HealthCheck {
        kind: Some(proto::health_check::Kind::Http(
            proto::HttpHealthCheck::default(),
        )),
        interval_ms,
        timeout_ms,
        healthy_threshold: rise,
        unhealthy_threshold: fall,
        ..Default::default()
    }
}

fn cache_with(n: usize, hc: proto::HealthCheck) -> Arc<Cache> {
    let mut servers = Servers::new();
    for i in 0..n {
        let s = proto::Server {
            server_id: format!("b{i}"),
            address: format!("10.0.0.{}:{}", i / 250 + 1, 1000 + i),
            weight: 1,
            ..Default::default()
        };
        servers.insert(s.server_id.as_str().into(), Arc::new(s));
    }
    let mut policy = dlb::model::default_policy();
    policy.health_check = Some(hc);
    let cache = Arc::new(Cache::new(1, 16));
    cache.load(StoreSnapshot {
        epoch: 1,
        revision: 1,
        services: vec![ServiceSnapshot {
            name: "s".into(),
            version: proto::Version {
                epoch: 1,
                version: 1,
            },
            policy,
            servers,
        }],
    });
    cache
}

struct Running {
    prober: Arc<Scripted>,
    writes: mpsc::UnboundedReceiver<Write>,
    commands: mpsc::Sender<Command>,
    registry: Arc<Mutex<prometheus_client::registry::Registry>>,
}

fn start(cache: Arc<Cache>, max_in_flight: usize, scripts: &[(&str, Script)]) -> Running {
    let prober = Arc::new(Scripted::default());
    for (a, s) in scripts {
        prober.scripts.lock().insert((*a).to_owned(), *s);
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = HealthMetrics::register(&mut registry);
    let (wtx, writes) = mpsc::unbounded_channel();
    let (commands, crx) = mpsc::channel(16);
    let checker = Checker::new(
        cache,
        Arc::new(prober.clone()),
        max_in_flight,
        metrics,
        wtx,
        crate::replicas::Share::alone(),
    );
    tokio::spawn(checker.run(crx, futures::future::pending()));
    Running {
        prober,
        writes,
        commands,
        registry: Arc::new(Mutex::new(registry)),
    }
}

fn metric(r: &Running, line_prefix: &str) -> f64 {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r.registry.lock()).unwrap();
    out.lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn drain(r: &mut Running) -> Vec<(String, proto::SourceState)> {
    let mut out = Vec::new();
    while let Ok(w) = r.writes.try_recv() {
        out.push((w.id.to_string(), w.state));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn first_probes_of_100_backends_spread_over_the_interval() {
    // Seeded: the checker draws its offsets on this (current-thread) runtime's thread.
    fastrand::seed(0x5eed_0001);
    let cache = cache_with(100, check(10_000, 1_000, 1, 1));
    let t0 = Instant::now();
    let r = start(cache, 1024, &[]);
    // First probes are due within [0, interval) and timers fire on millisecond ticks: one tick
    // past the interval every backend has had one.
    // (Second probes may have started too; only each backend's first counts below.)
    tokio::time::sleep(Duration::from_millis(10_001)).await;
    let mut first: HashMap<String, Instant> = HashMap::new();
    for (a, at) in r.prober.calls.lock().iter() {
        first.entry(a.clone()).or_insert(*at);
    }
    assert_eq!(
        first.len(),
        100,
        "each backend probed in the first interval"
    );
    let mut buckets = [0usize; 10];
    for at in first.values() {
        // Due within the interval; the timer fires on the next millisecond tick at the latest.
        let after = at.duration_since(t0);
        assert!(
            after <= Duration::from_millis(10_001),
            "a first probe after the interval: {after:?}"
        );
        buckets[(after.as_secs() as usize).min(9)] += 1;
    }
    // Uniform spread expects 10 per second; a burst would put them all in one.
    assert!(
        buckets.iter().all(|b| *b <= 30),
        "probes bunched up: {buckets:?}"
    );
    assert!(
        buckets.iter().filter(|b| **b > 0).count() >= 7,
        "{buckets:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_status_counts_once_and_fall_is_respected() {
    let cache = cache_with(1, check(1_000, 500, 2, 3));
    let mut r = start(cache, 16, &[("10.0.0.1:1000", Script::Pass)]);
    // Unknown → healthy after 2 passes (≤ 2 intervals).
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let w = drain(&mut r);
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].1.verdict, proto::Verdict::Healthy as i32);
    r.prober
        .scripts
        .lock()
        .insert("10.0.0.1:1000".into(), Script::Fail);
    // Each 503 is one failure: after two of them the backend is still healthy…
    let before = r.prober.calls.lock().len();
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if r.prober.calls.lock().len() == before + 2 {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(
        drain(&mut r).is_empty(),
        "two failures must not reach fall = 3"
    );
    // …and the third makes it unhealthy, with the status as the detail.
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if r.prober.calls.lock().len() == before + 3 {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let w = drain(&mut r);
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].1.verdict, proto::Verdict::Unhealthy as i32);
    assert_eq!(w[0].1.detail, "HTTP 503");
}

#[tokio::test(start_paused = true)]
async fn an_overloaded_checker_reports_unknown_not_unhealthy() {
    fastrand::seed(0x5eed_0002);
    // One probe at a time; b0 hangs until its timeout (the whole interval), b1 would pass.
    let cache = cache_with(2, check(1_000, 1_000, 1, 1));
    let mut r = start(cache, 1, &[("10.0.0.1:1000", Script::Hang)]);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let unknown = metric(
        &r,
        "dlb_health_probes_total{kind=\"http\",result=\"unknown\"}",
    );
    assert!(unknown >= 1.0, "some probes could not run: {unknown}");
    let writes = drain(&mut r);
    let verdicts = |id: &str| -> Vec<i32> {
        writes
            .iter()
            .filter(|(w, _)| w == id)
            .map(|(_, s)| s.verdict)
            .collect()
    };
    // b1 did get probes through (else "never unhealthy" below would say nothing), and b0's
    // timeouts are failures: the checker was overloaded, not idle.
    assert_eq!(
        verdicts("b1"),
        vec![proto::Verdict::Healthy as i32],
        "{writes:?}"
    );
    assert_eq!(
        verdicts("b0"),
        vec![proto::Verdict::Unhealthy as i32],
        "{writes:?}"
    );
    let b1_probes = r
        .prober
        .calls
        .lock()
        .iter()
        .filter(|(a, _)| a == "10.0.0.1:1001")
        .count();
    assert!(b1_probes >= 2, "b1 probed {b1_probes} times");
}

#[tokio::test(start_paused = true)]
async fn flap_damping_holds_down_and_the_hold_grows() {
    let mut hc = check(1_000, 500, 1, 1);
    hc.flap_threshold = 2;
    hc.flap_window_ms = 60_000;
    hc.flap_hold_down_ms = 10_000;
    hc.flap_max_hold_down_ms = 100_000;
    let cache = cache_with(1, hc);
    let mut r = start(cache, 16, &[("10.0.0.1:1000", Script::Alternate)]);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let holds: Vec<String> = drain(&mut r)
        .into_iter()
        .filter(|(_, s)| s.detail.starts_with("flapping"))
        .map(|(_, s)| s.detail)
        .collect();
    assert!(holds.len() >= 2, "{holds:?}");
    assert_eq!(holds[0], "flapping: held down for 10 s (hold-down #1)");
    assert_eq!(holds[1], "flapping: held down for 20 s (hold-down #2)");
    assert!(metric(&r, "dlb_health_flap_hold_downs_total") >= 2.0);
    drop(r.commands);
}
