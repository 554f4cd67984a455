//! Issue 18 through the whole stack: real HTTP backends in zones and priorities, a real `dlbd`,
//! and SDK clients (each with its own `ClientBuilder::locality`) carrying real calls through
//! [`dlb_client::Balance`]; the calls are counted **at the backends**.
//!
//! Zones: 3 zones × 4 backends and one SDK per zone, calling in lockstep (so the demand `dlbd`
//! measures and pushes is a third per zone): all calls stay in their zone; with 2 of a's 4
//! failed, a's client keeps 0.2 / (1/3) = 60 % and spills 20 % to b and 20 % to c (within 4σ),
//! while b's and c's clients stay home; with all of a failed, a's client spreads 50/50 over b
//! and c; with a 10 % cross-zone budget and a at 2 of 4, a's client spills 10 %, never more.
//! Priorities: primary healthy → no call reaches priority 1; primary at 50 % (factor 1.4) → 30 %
//! of calls go to priority 1; primary gone → all of them; primary back → none again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod call_support;
mod common;

use std::time::Duration;

use bytes::Bytes;
use call_support::*;
use common::*;
use dlb::proto;
use dlb_client::{Balance, Client, ServiceHandle};
use http_body_util::{BodyExt, Empty};
use tower::ServiceExt;

fn loc(zone: &str) -> Option<proto::Locality> {
    Some(proto::Locality {
        region: "r".into(),
        zone: zone.into(),
        sub_zone: String::new(),
    })
}

async fn sdk(server: &dlb_server::RunningServer, zone: Option<&str>) -> Client {
    let mut b = Client::builder([endpoint(server)])
        .report_interval(Duration::from_millis(20))
        .ack_delay(Duration::ZERO);
    if let Some(z) = zone {
        b = b.locality("r", z);
    }
    b.connect().await.unwrap()
}

async fn call(b: &Balance) {
    let req = http::Request::get("/").body(Empty::<Bytes>::new()).unwrap();
    let resp = b.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.into_body().collect().await.unwrap();
}

/// Calls made so far at each of `group`.
fn total(group: &[Backend]) -> u64 {
    group.iter().map(Backend::calls).sum()
}

fn within_4_sigma(observed: u64, n: u64, p: f64) -> bool {
    let mean = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    (observed as f64 - mean).abs() <= 4.0 * sigma + 1.0
}

async fn backends(n: usize) -> Vec<Backend> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(http_backend().await);
    }
    v
}

fn records(prefix: &str, group: &[Backend], f: impl Fn(&mut proto::Server)) -> Vec<proto::Server> {
    group
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut s = proto::Server {
                server_id: format!("{prefix}{i}"),
                address: b.addr.to_string(),
                weight: 1,
                health: proto::HealthStatus::Healthy as i32,
                ..Default::default()
            };
            f(&mut s);
            s
        })
        .collect()
}

/// Fails (or passes) each of `ids`, then waits until every handle routes on the last version.
async fn set_health(
    admin: &Client,
    service: &str,
    ids: &[&str],
    ok: bool,
    handles: &[&ServiceHandle],
) {
    let mut version = None;
    for id in ids {
        let r = if ok {
            admin.admin().health_check_passed(service, id).await
        } else {
            admin.admin().health_check_failed(service, id).await
        };
        version = r.unwrap().version;
    }
    for h in handles {
        converge(h, version).await;
    }
}

/// Zones a, b, c: each round, each client makes one call. Returns the calls each zone's
/// backends received during the rounds.
async fn rounds(n: u64, clients: &[&Balance; 3], zones: &[Vec<Backend>; 3]) -> [u64; 3] {
    let before = [total(&zones[0]), total(&zones[1]), total(&zones[2])];
    for _ in 0..n {
        for c in clients {
            call(c).await;
        }
    }
    [
        total(&zones[0]) - before[0],
        total(&zones[1]) - before[1],
        total(&zones[2]) - before[2],
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stay_in_their_zone_and_spill_by_the_formula() {
    fastrand::seed(18);
    let zones = [backends(4).await, backends(4).await, backends(4).await];
    let mut svc = dlb_server::ServiceConfig::empty("web");
    for (z, group) in ["a", "b", "c"].iter().zip(&zones) {
        svc.backends
            .extend(records(z, group, |s| s.locality = loc(z)));
    }
    svc.policy.algorithm = proto::Algorithm::RoundRobin as i32;
    let server = dlb_server::spawn(config(vec![svc])).await.unwrap();
    let sdks = [
        sdk(&server, Some("a")).await,
        sdk(&server, Some("b")).await,
        sdk(&server, Some("c")).await,
    ];
    let mut handles = Vec::new();
    for s in &sdks {
        handles.push(s.service("web").await.unwrap());
    }
    let hs: Vec<&ServiceHandle> = handles.iter().collect();
    let balances: Vec<Balance> = handles.iter().map(ServiceHandle::http).collect();
    let clients = [&balances[0], &balances[1], &balances[2]];
    const N: u64 = 2_000;
    // Every client knows the three zones' demand (a third each, by followers) before calling.
    for h in &handles {
        eventually("zone demand of a, b, c", || {
            h.locality()
                .is_some_and(|l| l.zone_demand.len() == 3 && l.local == 1.0)
        })
        .await;
    }

    // Healthy: every client's calls stay in its zone.
    let got = rounds(N, &clients, &zones).await;
    assert_eq!(got, [N, N, N], "healthy zones keep their calls");

    // 2 of a's 4 fail: a keeps 60 %, b and c each take 20 % of a's calls on top of their own.
    set_health(&sdks[0], "web", &["a0", "a1"], false, &hs).await;
    let failed_before = total(&zones[0][..2]);
    // One warm-up round so the demand reflects the lockstep after the rebuild.
    rounds(200, &clients, &zones).await;
    let got = rounds(N, &clients, &zones).await;
    assert!(
        within_4_sigma(got[0], N, 0.6),
        "a kept {} of {N}: {got:?}",
        got[0]
    );
    let plan = handles[0].locality().unwrap();
    assert_eq!(plan.spill, "local_capacity", "{plan:?}");
    assert!((plan.local - 0.6).abs() < 0.05, "{plan:?}");
    let mut text = String::new();
    sdks[0].metrics().encode_text(&mut text).unwrap();
    let local = sample(&text, r#"dlb_sdk_locality_local_share{service="web"}"#).unwrap();
    assert!((local - plan.local).abs() < 0.05, "{text}");
    assert!(
        text.contains(r#"dlb_sdk_locality_spill{service="web",reason="local_capacity"} 1"#),
        "{text}"
    );
    assert!(got[1] >= N && got[2] >= N, "b and c stay home: {got:?}");
    assert!(within_4_sigma(got[1] - N, N, 0.2), "a→b {got:?}");
    assert!(within_4_sigma(got[2] - N, N, 0.2), "a→c {got:?}");
    assert_eq!(got.iter().sum::<u64>(), 3 * N);
    assert_eq!(
        total(&zones[0][..2]),
        failed_before,
        "failed backends get nothing"
    );

    // All of a fails: a's clients spread over b and c by capacity (equal).
    set_health(&sdks[0], "web", &["a2", "a3"], false, &hs).await;
    let got = rounds(N, &clients, &zones).await;
    assert_eq!(got[0], 0, "{got:?}");
    assert!(within_4_sigma(got[1] - N, N, 0.5), "{got:?}");

    // A 10 % budget with a back at 2 of 4 (the default threshold is 50 %): a spills 10 %.
    let mut policy = sdks[0]
        .admin()
        .get_policy("web")
        .await
        .unwrap()
        .policy
        .unwrap();
    policy.locality = Some(proto::LocalityPolicy {
        cross_zone_budget_percent: 10,
        ..Default::default()
    });
    let v = sdks[0]
        .admin()
        .set_policy("web", policy)
        .await
        .unwrap()
        .version;
    for h in &hs {
        converge(h, v).await;
    }
    set_health(&sdks[0], "web", &["a2", "a3"], true, &hs).await;
    let got = rounds(N, &clients, &zones).await;
    let spilled = N - got[0];
    assert_eq!(handles[0].locality().unwrap().spill, "budget_capped");
    assert!(
        within_4_sigma(spilled, N, 0.1),
        "a spilled {spilled} of {N}: {got:?}"
    );
    assert!(
        got[1] + got[2] == N + N + spilled,
        "b and c stay home: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_fail_over_with_overprovisioning_and_come_back() {
    fastrand::seed(19);
    let primary = backends(4).await;
    let secondary = backends(4).await;
    let mut svc = dlb_server::ServiceConfig::empty("pri");
    svc.backends = records("p", &primary, |_| {});
    svc.backends
        .extend(records("s", &secondary, |s| s.priority = 1));
    svc.policy.algorithm = proto::Algorithm::RoundRobin as i32;
    let server = dlb_server::spawn(config(vec![svc])).await.unwrap();
    let client = sdk(&server, None).await;
    let handle = client.service("pri").await.unwrap();
    let b = handle.http();
    const N: u64 = 4_000;
    let measure = |n: u64| {
        let b = b.clone();
        let before = total(&secondary);
        async move {
            for _ in 0..n {
                call(&b).await;
            }
            before
        }
    };
    // Primary healthy: nothing reaches priority 1.
    let before = measure(N).await;
    assert_eq!(total(&secondary) - before, 0);

    // Primary at 50 %: min(1, 0.5 × 1.4) = 70 % stays, 30 % goes to priority 1.
    set_health(&client, "pri", &["p0", "p1"], false, &[&handle]).await;
    let before = measure(N).await;
    let spilled = total(&secondary) - before;
    assert!(
        within_4_sigma(spilled, N, 0.3),
        "{spilled} of {N} to priority 1"
    );

    // Primary gone: everything to priority 1.
    set_health(&client, "pri", &["p2", "p3"], false, &[&handle]).await;
    let before = measure(N).await;
    assert_eq!(total(&secondary) - before, N);

    // Primary back: traffic returns.
    set_health(&client, "pri", &["p0", "p1", "p2", "p3"], true, &[&handle]).await;
    let before = measure(N).await;
    assert_eq!(total(&secondary) - before, 0);
    assert!(total(&primary) > 0);
}
