//! Interop with stock xDS clients nobody here wrote: Python `grpcio` and Node
//! `@grpc/grpc-js-xds`, each balancing real gRPC backends on loopback through `dlbd`'s ADS with a
//! bootstrap file and the target `xds:///s`.
//!
//! The clients are the scripts in `interop/` (line protocol: `calls N [KEY]`), found through
//! `DLB_INTEROP_PYTHON` (a Python with grpcio installed) and `DLB_INTEROP_NODE_DIR` (the
//! `interop/node` directory after `npm install`); `.ci/interop` sets both. Unset, the tests use
//! what `.ci/interop` installed (`target/interop-venv`, `interop/node/node_modules`) if present;
//! otherwise they say they are skipped — unless `CI` is set, where a missing client is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
mod xds_support;

use std::path::PathBuf;
use std::time::Duration;

use dlb::proto;
use dlb_server::api::xds::resources::{CLUSTER, ENDPOINTS};
use xds_support::{grpc_js_client, grpcio_client, within_4_sigma, Backend, Driver};

/// The whole flow against one stock client: shares follow weights, a failed health check stops
/// a backend's traffic, an added backend gets traffic, a draining one gets none, a killed one is
/// found by dlbd's active check and loses its traffic until it is restarted, Maglev keeps a key
/// on one backend.
async fn scenario(program: PathBuf, args: Vec<String>) {
    let server = common::start().await;
    let mut reg = common::registry(&server).await;
    let mut backends = Vec::new();
    let weights = [("b1", 1u32), ("b2", 2), ("b3", 3)];
    for (id, w) in weights {
        let b = Backend::start(id).await;
        reg.add_server(common::add("s", id, &b.addr.to_string(), w))
            .await
            .unwrap();
        backends.push(b);
    }
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("bootstrap.json");
    xds_support::write_bootstrap(&bootstrap, server.grpc_addr(), "interop-node");
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.push("xds:///s");
    let mut c = Driver::start(&program, &args, &bootstrap).await;
    eprintln!("client version {}", c.version);

    // Every backend reached, every call succeeds.
    c.until(
        60,
        None,
        Duration::from_secs(60),
        "all three backends",
        |r| r.errors.is_empty() && r.ok.len() == 3,
    )
    .await;

    // Shares follow the weights: within 4 standard deviations of a binomial over 6,000 calls.
    let r = c.calls(6000, None).await;
    assert!(r.errors.is_empty(), "failed calls: {r:?}");
    assert_eq!(r.total_ok(), 6000);
    for (id, w) in weights {
        let p = f64::from(w) / 6.0;
        assert!(
            within_4_sigma(r.of(id), 6000, p),
            "{id}: {} of 6000 calls, expected {:.0} ± 4σ; {r:?}",
            r.of(id),
            6000.0 * p
        );
    }
    eprintln!("shares over 6000 calls (weights 1:2:3): {:?}", r.ok);

    // health_check_failed stops the backend's traffic.
    let t0 = std::time::Instant::now();
    reg.health_check_failed(common::hc("s", "b3"))
        .await
        .unwrap();
    c.until(
        20,
        None,
        Duration::from_secs(10),
        "b3 drained of traffic",
        |r| r.of("b3") == 0 && r.errors.is_empty(),
    )
    .await;
    eprintln!(
        "health_check_failed: traffic to b3 stopped after {:?} (observed)",
        t0.elapsed()
    );
    let r = c.calls(600, None).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.of("b3"), 0, "{r:?}");

    // An added backend starts receiving traffic.
    let b4 = Backend::start("b4").await;
    reg.add_server(common::add("s", "b4", &b4.addr.to_string(), 1))
        .await
        .unwrap();
    backends.push(b4);
    c.until(
        40,
        None,
        Duration::from_secs(10),
        "b4 receives traffic",
        |r| r.of("b4") > 0 && r.errors.is_empty(),
    )
    .await;

    // A draining backend gets no new calls; undrained, it gets them again.
    let drain = |on: bool| proto::UpdateServerRequest {
        service: "s".into(),
        server_id: "b4".into(),
        draining: Some(on),
        ..Default::default()
    };
    reg.update_server(drain(true)).await.unwrap();
    c.until(40, None, Duration::from_secs(10), "b4 drained", |r| {
        r.of("b4") == 0 && r.errors.is_empty()
    })
    .await;
    reg.update_server(drain(false)).await.unwrap();
    c.until(40, None, Duration::from_secs(10), "b4 undrained", |r| {
        r.of("b4") > 0 && r.errors.is_empty()
    })
    .await;

    // A killed backend: dlbd's active TCP check finds it down and pushes it unhealthy, and the
    // stock client stops sending it calls; restarted on the same address, it passes the check
    // and gets traffic again.
    set_policy(
        &mut reg,
        proto::Policy {
            health_check: Some(proto::HealthCheck {
                kind: Some(proto::health_check::Kind::Tcp(
                    proto::TcpHealthCheck::default(),
                )),
                interval_ms: 100,
                timeout_ms: 100,
                healthy_threshold: 1,
                unhealthy_threshold: 2,
                ..Default::default()
            }),
            ..dlb::model::default_policy()
        },
    )
    .await;
    let i = backends.iter().position(|b| b.id == "b2").unwrap();
    let b2_addr = backends[i].addr;
    backends.remove(i).kill().await;
    wait_health(&mut reg, "b2", proto::HealthStatus::Unhealthy).await;
    c.until(40, None, Duration::from_secs(10), "b2 (killed) out", |r| {
        r.of("b2") == 0 && r.errors.is_empty()
    })
    .await;
    backends.push(Backend::start_on("b2", b2_addr).await);
    wait_health(&mut reg, "b2", proto::HealthStatus::Healthy).await;
    c.until(
        40,
        None,
        Duration::from_secs(10),
        "b2 (restarted) back",
        |r| r.of("b2") > 0 && r.errors.is_empty(),
    )
    .await;

    // Least connections: the client takes the first policy of the list it supports; with
    // sequential calls the shares tell which (least_request ignores weights, the
    // wrr_locality fallback follows them). Every call must succeed either way.
    set_algorithm(&server, &mut reg, proto::Algorithm::LeastConnP2c).await;
    let r = c.calls(3000, None).await;
    assert!(r.errors.is_empty(), "least-conn: {r:?}");
    eprintln!(
        "least-conn (weights b1:b2:b4 = 1:2:1, b3 unhealthy), 3000 sequential calls: {:?}",
        r.ok
    );

    // Maglev: one header value keeps hitting one backend.
    set_algorithm(&server, &mut reg, proto::Algorithm::Maglev).await;
    c.until(30, Some("k0"), Duration::from_secs(10), "k0 sticks", |r| {
        r.ok.len() == 1 && r.errors.is_empty()
    })
    .await;
    let mut seen = std::collections::BTreeSet::new();
    let mut owner = std::collections::BTreeMap::new();
    for k in 0..10 {
        let key = format!("key-{k}");
        let r = c.calls(40, Some(&key)).await;
        assert!(r.errors.is_empty(), "{key}: {r:?}");
        assert_eq!(r.ok.len(), 1, "{key} hit several backends: {r:?}");
        seen.extend(r.ok.keys().cloned());
        owner.insert(key, r.ok.keys().next().cloned().unwrap_or_default());
    }
    assert!(seen.len() >= 2, "ten keys all on one backend: {seen:?}");
    assert!(!seen.contains("b3"), "an unhealthy backend got a key");

    // A backend that moves to a new address keeps its hash key (endpoint metadata
    // envoy.lb/hash_key, gRFC A76): observed, not asserted (older clients hash the address).
    let moved = owner["key-0"].clone();
    let again = Backend::start(&moved).await;
    let before = type_state(&server, ENDPOINTS).map_or(0, |t| t.responses);
    reg.update_server(proto::UpdateServerRequest {
        service: "s".into(),
        server_id: moved.clone(),
        address: Some(again.addr.to_string()),
        ..Default::default()
    })
    .await
    .unwrap();
    backends.push(again);
    wait_acked(&server, ENDPOINTS, before).await;
    let mut kept = 0;
    for (key, was) in &owner {
        let r = c.calls(20, Some(key)).await;
        assert!(r.errors.is_empty(), "{key}: {r:?}");
        assert_eq!(r.ok.len(), 1, "{key} hit several backends: {r:?}");
        kept += usize::from(r.ok.contains_key(was));
    }
    eprintln!(
        "after {moved} moved to a new address: {kept} of {} keys kept their backend (observed)",
        owner.len()
    );

    // The client is listed with its node id and acked versions.
    let clients = server.xds_clients().list();
    let me = clients
        .iter()
        .find(|c| c.node_id == "interop-node")
        .expect("listed");
    assert!(me
        .types
        .values()
        .all(|t| !t.acked_version.is_empty() && t.nacks == 0));

    c.quit().await;
    for b in backends {
        b.stop().await;
    }
    server.shutdown().await.unwrap();
}

type Registry = proto::registry_client::RegistryClient<tonic::transport::Channel>;

/// Sets the service's algorithm (and no health check) and waits until the client has
/// acknowledged the new Cluster.
async fn set_algorithm(
    server: &dlb_server::RunningServer,
    reg: &mut Registry,
    algorithm: proto::Algorithm,
) {
    let before = type_state(server, CLUSTER).map_or(0, |t| t.responses);
    set_policy(
        reg,
        proto::Policy {
            algorithm: algorithm as i32,
            ..dlb::model::default_policy()
        },
    )
    .await;
    wait_acked(server, CLUSTER, before).await;
}

/// Replaces the policy of service `s`.
async fn set_policy(reg: &mut Registry, policy: proto::Policy) {
    reg.set_policy(proto::SetPolicyRequest {
        service: "s".into(),
        policy: Some(policy),
        expected_version: None,
    })
    .await
    .unwrap();
}

/// Waits (up to 10 s) until backend `id` of service `s` has the effective `health`.
async fn wait_health(reg: &mut Registry, id: &str, health: proto::HealthStatus) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = reg
            .list_servers(proto::ListServersRequest {
                service: "s".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let s = list.servers.iter().find(|s| s.server_id == id).cloned();
        if s.as_ref().is_some_and(|s| s.health == health as i32) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never became {health:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the client has acknowledged a response of `type_url` newer than the
/// `before`-th (a NACK fails the test).
async fn wait_acked(server: &dlb_server::RunningServer, type_url: &str, before: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = type_state(server, type_url).expect("the client follows the type");
        assert_eq!(t.nacks, 0, "{type_url} rejected: {:?}", t.last_nack);
        if t.responses > before && t.acked_version == t.sent_version {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{type_url}: new response not acked: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn type_state(
    server: &dlb_server::RunningServer,
    type_url: &str,
) -> Option<dlb_server::api::xds::clients::TypeState> {
    server
        .xds_clients()
        .list()
        .into_iter()
        .find(|c| c.node_id == "interop-node")
        .and_then(|c| c.types.get(type_url).cloned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_balances_through_dlbd() {
    let Some((program, args)) = grpcio_client() else {
        return;
    };
    scenario(program, args).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_grpc_js_balances_through_dlbd() {
    let Some((program, args)) = grpc_js_client() else {
        return;
    };
    scenario(program, args).await;
}
