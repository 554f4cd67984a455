//! Localities and priorities with stock xDS clients (Python `grpcio`, Node `@grpc/grpc-js-xds`)
//! through `xds:///s`: per-node EDS keeps a client of zone `a` (bootstrap `node.locality`) in
//! its zone, spills by the documented formula when half of `a` fails, and priority failover
//! works natively (primary healthy → nothing to priority 1; primary gone → everything to it;
//! primary back → traffic returns), and a zone whose backends SDKs report saturated (global
//! in-flight, `saturation_in_flight`) spills by the load-aware formula. Calls are counted at the real backends (each answers with
//! its id). Clients are found as in `xds_interop.rs` (`.ci/interop` installs them).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
mod xds_support;

use std::path::PathBuf;
use std::time::Duration;

use dlb::proto;
use xds_support::{grpc_js_client, grpcio_client, within_4_sigma, Backend, Calls, Driver};

type Registry = proto::registry_client::RegistryClient<tonic::transport::Channel>;

/// Calls that reached backends whose id starts with `prefix`.
fn to(r: &Calls, prefix: &str) -> u64 {
    r.ok.iter()
        .filter(|(id, _)| id.starts_with(prefix))
        .map(|(_, n)| n)
        .sum()
}

async fn set_health(reg: &mut Registry, id: &str, healthy: bool) {
    if healthy {
        reg.health_check_passed(common::hc("s", id)).await.unwrap();
    } else {
        reg.health_check_failed(common::hc("s", id)).await.unwrap();
    }
}

/// 3 zones × 4 backends at priority 0 (`a0`..`c3`) and 2 backends at priority 1 in zone a
/// (`p1-0`, `p1-1`); the client is in zone `a` of region `r`.
async fn scenario(program: PathBuf, args: Vec<String>) {
    let server = common::start().await;
    let mut reg = common::registry(&server).await;
    let mut backends = Vec::new();
    let mut p0 = Vec::new();
    for z in ["a", "b", "c"] {
        for i in 0..4 {
            p0.push((format!("{z}{i}"), z, 0));
        }
    }
    let all: Vec<(String, &str, u32)> = p0
        .iter()
        .cloned()
        .chain((0..2).map(|i| (format!("p1-{i}"), "a", 1)))
        .collect();
    for (id, zone, priority) in &all {
        let b = Backend::start(id).await;
        reg.add_server(proto::AddServerRequest {
            locality: Some(proto::Locality {
                region: "r".into(),
                zone: (*zone).into(),
                sub_zone: String::new(),
            }),
            priority: *priority,
            ..common::add("s", id, &b.addr.to_string(), 1)
        })
        .await
        .unwrap();
        backends.push(b);
    }
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("bootstrap.json");
    xds_support::write_bootstrap_in(&bootstrap, server.grpc_addr(), "zone-a-node", "r", "a");
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.push("xds:///s");
    let mut c = Driver::start(&program, &args, &bootstrap).await;
    eprintln!("client version {}", c.version);
    // A second client without node.locality: the zone-less plan (priority failover only).
    let zoneless = dir.path().join("zoneless.json");
    xds_support::write_bootstrap(&zoneless, server.grpc_addr(), "zoneless-node");
    let mut d = Driver::start(&program, &args, &zoneless).await;
    d.until(
        120,
        None,
        Duration::from_secs(60),
        "all of priority 0",
        |r| r.errors.is_empty() && r.ok.len() == 12 && to(r, "p1-") == 0,
    )
    .await;
    let r = d.calls(1200, None).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(to(&r, "p1-"), 0, "priority 0 healthy: {r:?}");

    // Zone a healthy: every call in a (so none to priority 1).
    c.until(
        60,
        None,
        Duration::from_secs(60),
        "all four backends of a",
        |r| r.errors.is_empty() && r.ok.len() == 4 && to(r, "a") == 60,
    )
    .await;
    let r = c.calls(2000, None).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(
        to(&r, "a"),
        2000,
        "calls left zone a while it is healthy: {r:?}"
    );
    assert_eq!(to(&r, "p1-"), 0, "{r:?}");

    // The client's locality is recorded and listed.
    let me = server
        .xds_clients()
        .list()
        .into_iter()
        .find(|c| c.node_id == "zone-a-node")
        .expect("listed");
    let loc = me.locality.expect("node.locality recorded");
    assert_eq!((loc.region.as_str(), loc.zone.as_str()), ("r", "a"));

    // Half of a down: keep up[a] / local[a] = (2/10) / (1/3) = 0.6 in a, spill 0.2 to each of
    // b and c (equal residual capacity). Priority 0 stays at 100 % (10/12 × 1.4 ≥ 1).
    set_health(&mut reg, "a0", false).await;
    set_health(&mut reg, "a1", false).await;
    c.until(
        300,
        None,
        Duration::from_secs(20),
        "spill to b and c",
        |r| r.errors.is_empty() && r.of("a0") + r.of("a1") == 0 && to(r, "b") > 0 && to(r, "c") > 0,
    )
    .await;
    let n = 4000;
    let r = c.calls(n, None).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.total_ok(), n);
    for (zone, p) in [("a", 0.6), ("b", 0.2), ("c", 0.2)] {
        assert!(
            within_4_sigma(to(&r, zone), n, p),
            "zone {zone}: {} of {n} calls, expected {:.0} ± 4σ; {r:?}",
            to(&r, zone),
            n as f64 * p
        );
    }
    assert_eq!(to(&r, "p1-"), 0, "{r:?}");
    eprintln!(
        "half of zone a down, {n} calls: a {} b {} c {} (expected 60/20/20 %)",
        to(&r, "a"),
        to(&r, "b"),
        to(&r, "c")
    );

    // Priority 0 at 50 % healthy (2 of 4 down in every zone): with the default
    // overprovisioning 1.4 it takes 70 %, priority 1 the other 30 % — for both clients (stock
    // clients do not implement overprovisioning: dlbd sends it as locality weights). The
    // client in a keeps all of priority 0's share in a (every zone is at half capacity).
    for id in ["b0", "b1", "c0", "c1"] {
        set_health(&mut reg, id, false).await;
    }
    for (who, drv) in [("zone a", &mut c), ("zone-less", &mut d)] {
        drv.until(
            100,
            None,
            Duration::from_secs(20),
            "priority 1 takes a share",
            |r| r.errors.is_empty() && to(r, "p1-") > 0 && r.of("b0") + r.of("c0") == 0,
        )
        .await;
        let r = drv.calls(n, None).await;
        assert!(r.errors.is_empty(), "{r:?}");
        assert!(
            within_4_sigma(to(&r, "p1-"), n, 0.3),
            "{who}: {} of {n} calls to priority 1, expected {:.0} ± 4σ; {r:?}",
            to(&r, "p1-"),
            n as f64 * 0.3
        );
        if who == "zone a" {
            assert_eq!(to(&r, "a") + to(&r, "p1-"), n, "{r:?}");
        }
        eprintln!(
            "{who}, priority 0 at 50 %: {} of {n} calls to priority 1 (expected 30 %), a {} b {} c {}",
            to(&r, "p1-"),
            to(&r, "a"),
            to(&r, "b"),
            to(&r, "c")
        );
    }

    // All of priority 0 down: everything to priority 1.
    for (id, _, _) in &p0 {
        set_health(&mut reg, id, false).await;
    }
    c.until(
        60,
        None,
        Duration::from_secs(20),
        "all to priority 1",
        |r| r.errors.is_empty() && to(r, "p1-") == 60,
    )
    .await;
    let r = c.calls(600, None).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(to(&r, "p1-"), 600, "{r:?}");
    let r = d
        .until(
            60,
            None,
            Duration::from_secs(20),
            "zone-less: all to priority 1",
            |r| r.errors.is_empty() && to(r, "p1-") == 60,
        )
        .await;
    assert_eq!(r.ok.len(), 2, "{r:?}");

    // Priority 0 back: traffic returns to zone a, none to priority 1.
    for (id, _, _) in &p0 {
        set_health(&mut reg, id, true).await;
    }
    c.until(60, None, Duration::from_secs(20), "back in zone a", |r| {
        r.errors.is_empty() && to(r, "a") == 60
    })
    .await;
    let r = c.calls(600, None).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(to(&r, "a"), 600, "{r:?}");
    d.until(
        120,
        None,
        Duration::from_secs(20),
        "zone-less: back on priority 0",
        |r| r.errors.is_empty() && to(r, "p1-") == 0 && r.ok.len() == 12,
    )
    .await;
    let r = d.calls(1200, None).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(to(&r, "p1-"), 0, "{r:?}");
    d.quit().await;

    // Load-aware, from the SDKs' reports: with `saturation_in_flight` 10 and one SDK session
    // per zone (equal demand), a's four backends at 9 in flight leave a a capacity of 0.4 of
    // 8.4: the stock client in a keeps (0.4 / 8.4) / (1/3) ≈ 14.3 % home, no backend ejected.
    reg.set_policy(proto::SetPolicyRequest {
        service: "s".into(),
        policy: Some(proto::Policy {
            locality: Some(proto::LocalityPolicy {
                saturation_in_flight: 10,
                ..Default::default()
            }),
            ..dlb::model::default_policy()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut sdks = Vec::new();
    for zone in ["a", "b", "c"] {
        let mut first = common::subscribe(&[("s", None)]);
        if let Some(proto::client_message::Kind::Subscribe(sub)) = &mut first.kind {
            sub.locality = Some(proto::Locality {
                region: "r".into(),
                zone: zone.into(),
                sub_zone: String::new(),
            });
        }
        let mut s = common::Session::open(&server, first).await;
        s.update().await;
        sdks.push(s);
    }
    let busy = |n: u64| {
        proto::client_message::Kind::LoadReport(proto::LoadReport {
            service: "s".into(),
            backends: (0..4)
                .map(|i| proto::BackendLoad {
                    server_id: format!("a{i}"),
                    in_flight: n,
                    ..Default::default()
                })
                .collect(),
            interval_ms: 1000,
        })
    };
    // The demand settles at a third per zone first (each session's follow is published: a
    // moment with only a's session would plan a at 100 % of the demand).
    let settled = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let proto::server_message::Kind::GlobalLoad(g) = sdks[2].next().await {
                if g.zone_demand.len() == 3 {
                    return;
                }
            }
        }
    });
    settled.await.expect("zone demand over a, b and c");
    sdks[0].send(busy(9)).await;
    // 600 calls: ≈ 86 in a at the target, ≈ 200 while the demand was a's alone.
    c.until(
        600,
        None,
        Duration::from_secs(20),
        "a spills on load",
        |r| r.errors.is_empty() && to(r, "a") < 137 && to(r, "b") > 0 && to(r, "c") > 0,
    )
    .await;
    let r = c.calls(n, None).await;
    assert!(r.errors.is_empty(), "{r:?}");
    let keep = (0.4 / 8.4) * 3.0;
    assert!(
        within_4_sigma(to(&r, "a"), n, keep),
        "a saturated: {} of {n} calls kept in a, expected {:.0} ± 4σ; {r:?}",
        to(&r, "a"),
        n as f64 * keep
    );
    eprintln!(
        "a's backends at 9 of 10 in flight, {n} calls: a {} b {} c {} (expected 14.3/42.9/42.9 %)",
        to(&r, "a"),
        to(&r, "b"),
        to(&r, "c")
    );
    // Drained: home again.
    sdks[0].send(busy(0)).await;
    c.until(60, None, Duration::from_secs(20), "a home again", |r| {
        r.errors.is_empty() && to(r, "a") == 60
    })
    .await;
    drop(sdks);

    c.quit().await;
    for b in backends {
        b.stop().await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_follows_zones_and_priorities() {
    let Some((program, args)) = grpcio_client() else {
        return;
    };
    scenario(program, args).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_grpc_js_follows_zones_and_priorities() {
    let Some((program, args)) = grpc_js_client() else {
        return;
    };
    scenario(program, args).await;
}
