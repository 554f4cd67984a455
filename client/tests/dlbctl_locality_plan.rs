//! `dlbctl locality show` and dlbd's locality metrics against a real `dlbd`: 3 zones × 4
//! backends with the default policy and no zone demand reported (equal demand over the zones
//! with backends). Healthy, every zone keeps all of its traffic; with 2 of zone a's 4 backends
//! failed (`health_check_failed`), zone a keeps 0.2 / (1/3) = 60 % and spills 20 % to each of b
//! and c for `local_capacity` (docs/locality.md), in the JSON, the text and the `/metrics`
//! series alike. An unknown service exits 3 (NOT_FOUND) naming it; a bad name exits 2 naming
//! the field.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use dlb_client::{AdminClient, NewServer};
use serde_json::Value;

const ZONES: [&str; 3] = ["a", "b", "c"];

fn json(s: &str) -> Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn zone<'a>(plan: &'a Value, name: &str) -> &'a Value {
    plan["zones"]
        .as_array()
        .unwrap()
        .iter()
        .find(|z| z["zone"] == format!("eu/{name}"))
        .unwrap_or_else(|| panic!("no zone eu/{name} in {plan}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// The share a client zone's plan gives the group of `group_zone` (0 when it lists none).
fn share(z: &Value, group_zone: &str) -> f64 {
    z["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["zone"] == format!("eu/{group_zone}"))
        .map_or(0.0, |g| g["share"].as_f64().unwrap())
}

/// The metric sample with exactly these labels (the text encoder keeps the order given).
fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    sample(text, &format!("{name}{{{labels}}} "))
}

/// Four backends in each of [`ZONES`] (region `eu`), ids `a0`…, ports from `port`.
async fn add_zones(admin: &AdminClient, port: usize) {
    for (zi, z) in ZONES.iter().enumerate() {
        for i in 0..4 {
            let s = NewServer {
                server_id: format!("{z}{i}"),
                address: format!("127.0.0.1:{}", port + zi * 10 + i),
                weight: 1,
                hash_key: String::new(),
                metadata: Default::default(),
                locality: Some(dlb_client::locality::locality("eu", *z)),
                priority: 0,
            };
            admin.add_server("web", s).await.unwrap();
        }
    }
}

async fn plan(ep: &str) -> Value {
    json(&dlbctl_ok(ep, &["locality", "show", "web", "--json"]).await)
}

#[tokio::test]
async fn locality_show_and_metrics_follow_the_plan() {
    let srv = dlb_server::spawn(config(dlb_server::ServerConfig::default().services))
        .await
        .unwrap();
    let ep = endpoint(&srv);
    let admin = AdminClient::new([ep.clone()]).unwrap();
    add_zones(&admin, 9000).await;

    // Healthy: every zone keeps all of its traffic.
    let p = plan(&ep).await;
    assert_eq!(p["service"], "web");
    assert_eq!(p["demand_known"], false, "{p}");
    assert_eq!(p["zones_total"], 3, "{p}");
    assert_eq!(p["groups"].as_array().unwrap().len(), 3, "{p}");
    for g in p["groups"].as_array().unwrap() {
        assert_eq!(
            (g["eligible"].as_u64(), g["total"].as_u64()),
            (Some(4), Some(4)),
            "{p}"
        );
        assert_eq!(g["priority"], 0);
    }
    for z in ZONES {
        let zp = zone(&p, z);
        assert!(close(zp["local_share"].as_f64().unwrap(), 1.0), "{zp}");
        assert_eq!(zp["spill"], "none", "{zp}");
        assert!(close(share(zp, z), 1.0), "{zp}");
        assert_eq!(zp["groups"].as_array().unwrap().len(), 1, "{zp}");
        assert!(
            close(zp["priority_load"][0]["load"].as_f64().unwrap(), 1.0),
            "{zp}"
        );
    }
    let m = scrape(srv.metrics_addr().unwrap()).await;
    for z in ZONES {
        let l = format!("service=\"web\",client_zone=\"eu/{z}\"");
        assert_eq!(metric(&m, "dlb_locality_local_share", &l), Some(1.0), "{m}");
        assert_eq!(
            metric(&m, "dlb_locality_spill", &format!("{l},reason=\"none\"")),
            Some(1.0),
            "{m}"
        );
    }

    // 2 of a's 4 fail: capacity 2, 4, 4 of 10; a keeps 0.2 / (1/3) = 60 %, b and c take 20 %.
    for id in ["a0", "a1"] {
        admin.health_check_failed("web", id).await.unwrap();
    }
    let p = plan(&ep).await;
    let a = zone(&p, "a");
    assert!(close(a["local_share"].as_f64().unwrap(), 0.6), "{a}");
    assert_eq!(a["spill"], "local_capacity", "{a}");
    assert!(close(share(a, "a"), 0.6), "{a}");
    assert!(close(share(a, "b"), 0.2), "{a}");
    assert!(close(share(a, "c"), 0.2), "{a}");
    let ga = a["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["zone"] == "eu/a")
        .unwrap();
    assert_eq!(
        (ga["eligible"].as_u64(), ga["total"].as_u64()),
        (Some(2), Some(4)),
        "{a}"
    );
    for z in ["b", "c"] {
        let zp = zone(&p, z);
        assert!(close(zp["local_share"].as_f64().unwrap(), 1.0), "{zp}");
        assert_eq!(zp["spill"], "none", "{zp}");
    }
    let text = dlbctl_ok(&ep, &["locality", "show", "web"]).await;
    assert!(
        text.contains("zone eu/a: demand=- local=60.0% spill=local_capacity priorities p0=100.0%"),
        "{text}"
    );
    assert!(text.contains("p0 eu/b"), "{text}");
    assert!(text.contains("2/4 eligible"), "{text}");
    assert!(
        text.contains("zone eu/b: demand=- local=100.0% spill=none"),
        "{text}"
    );
    // The global --service works as well as the positional name.
    let same = json(&dlbctl_ok(&ep, &["--service", "web", "locality", "show", "--json"]).await);
    assert_eq!(zone(&same, "a")["spill"], "local_capacity");

    let m = scrape(srv.metrics_addr().unwrap()).await;
    let la = "service=\"web\",client_zone=\"eu/a\"";
    let local_a = metric(&m, "dlb_locality_local_share", la).unwrap();
    assert!(close(local_a, 0.6), "{local_a}: {m}");
    assert_eq!(
        metric(
            &m,
            "dlb_locality_spill",
            &format!("{la},reason=\"local_capacity\"")
        ),
        Some(1.0),
        "{m}"
    );
    // Only the current reason is exported.
    assert_eq!(
        metric(&m, "dlb_locality_spill", &format!("{la},reason=\"none\"")),
        None,
        "{m}"
    );
    let lb = "service=\"web\",client_zone=\"eu/b\"";
    assert_eq!(metric(&m, "dlb_locality_local_share", lb), Some(1.0), "{m}");
    // A service without localities exports no locality series.
    assert!(!m.contains("service=\"default\",client_zone"), "{m}");

    // Unknown service: NOT_FOUND, exit 3, naming it; a bad name: exit 2 naming the field.
    let out = run_dlbctl(&ep, &["locality", "show", "nope"]).await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains("nope"), "{}", out.stderr);
    let out = run_dlbctl(&ep, &["locality", "show", "bad name"]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("service"), "{}", out.stderr);
    let e = admin.get_locality_plan("nope").await.unwrap_err();
    assert!(matches!(e, dlb_client::Error::NotFound(_)), "{e:?}");

    srv.shutdown().await.unwrap();
}

/// With SDK clients in the zones (followers, before any call), the plan reads the pushed
/// demand: 2 clients in a, 1 in b, 1 in c → demand 0.5 / 0.25 / 0.25. With 2 of a's 4 down
/// (capacity 0.2 / 0.4 / 0.4), a keeps 0.2 / 0.5 = 40 % and spills 30 % to each of b and c
/// (residuals 0.15 each).
#[tokio::test]
async fn locality_show_reads_the_pushed_zone_demand() {
    let srv = dlb_server::spawn(config(dlb_server::ServerConfig::default().services))
        .await
        .unwrap();
    let ep = endpoint(&srv);
    let admin = AdminClient::new([ep.clone()]).unwrap();
    add_zones(&admin, 9100).await;
    for id in ["a0", "a1"] {
        admin.health_check_failed("web", id).await.unwrap();
    }
    let mut clients = Vec::new();
    for z in ["a", "a", "b", "c"] {
        let c = dlb_client::Client::builder([ep.clone()])
            .locality("eu", z)
            .connect()
            .await
            .unwrap();
        let web = within("web", c.service("web")).await.unwrap();
        clients.push((c, web));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let p = loop {
        let p = plan(&ep).await;
        let a = zone(&p, "a");
        if p["demand_known"] == true && close(a["demand"].as_f64().unwrap(), 0.5) {
            break p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no demand pushed: {p}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let a = zone(&p, "a");
    assert!(
        close(zone(&p, "b")["demand"].as_f64().unwrap(), 0.25),
        "{p}"
    );
    assert!(close(a["local_share"].as_f64().unwrap(), 0.4), "{a}");
    assert_eq!(a["spill"], "local_capacity", "{a}");
    assert!(close(share(a, "b"), 0.3), "{a}");
    assert!(close(share(a, "c"), 0.3), "{a}");
    let text = dlbctl_ok(&ep, &["locality", "show", "web"]).await;
    assert!(text.contains("demand=reported"), "{text}");
    assert!(
        text.contains("zone eu/a: demand=50.0% local=40.0% spill=local_capacity"),
        "{text}"
    );
    let m = scrape(srv.metrics_addr().unwrap()).await;
    let la = "service=\"web\",client_zone=\"eu/a\"";
    let local_a = metric(&m, "dlb_locality_local_share", la).unwrap();
    assert!(close(local_a, 0.4), "{local_a}: {m}");
    drop(clients);
    srv.shutdown().await.unwrap();
}
