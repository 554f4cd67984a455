//! The drain barrier over several `dlbd` replicas on a real etcd (feature `etcd`): the
//! acknowledgements of every replica's clients count (50 SDKs over two replicas, with a stock
//! grpcio xDS client on the replica the drain was not asked of), a silent session on another
//! replica is named with its replica at the deadline, and a call held open through another
//! replica delays an `in_flight_zero` wait. Each test starts its own etcd (`etcd_support`); the
//! grpcio test needs the interop venv (`xds_support::python`, skipped without it outside CI).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod etcd_support;
mod xds_support;

use std::time::{Duration, Instant};

use dlb::proto::{self, client_message};
use dlb_client::{Client, ServiceHandle};
use dlb_server::{RunningServer, ServerConfig, StoreConfig};
use etcd_support::Etcd;

const WAIT: Duration = Duration::from_secs(20);

fn config(etcd: &Etcd, id: &str) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        store: StoreConfig::Etcd(etcd.config("/drain")),
        replica_id: Some(id.into()),
        replica_ttl: Duration::from_secs(2),
        ..Default::default()
    }
}

async fn sdk(server: &RunningServer, i: usize) -> (Client, ServiceHandle) {
    let client = Client::builder([format!("http://{}", server.grpc_addr())])
        .client_id(format!("sdk-{i}"))
        .connect()
        .await
        .unwrap();
    let h = client.service("web").await.unwrap();
    (client, h)
}

fn drain(id: &str, timeout_ms: u32) -> proto::DrainServerRequest {
    drain_with(id, false, timeout_ms)
}

fn drain_with(id: &str, in_flight_zero: bool, timeout_ms: u32) -> proto::DrainServerRequest {
    proto::DrainServerRequest {
        service: "web".into(),
        server_id: id.into(),
        wait: Some(proto::BarrierWait {
            in_flight_zero,
            timeout_ms,
        }),
        ..Default::default()
    }
}

/// Two replicas `r0` and `r1` on `etcd`, each seeing the other.
async fn replicas(etcd: &Etcd) -> (RunningServer, RunningServer) {
    let r0 = dlb_server::spawn(config(etcd, "r0")).await.unwrap();
    let r1 = dlb_server::spawn(config(etcd, "r1")).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while r0.members().ids().len() < 2 || r1.members().ids().len() < 2 {
        assert!(Instant::now() < deadline, "replicas did not see each other");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (r0, r1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replicas_clients_confirm() {
    let etcd = Etcd::start().await;
    let (r0, r1) = replicas(&etcd).await;
    let mut reg = common::registry(&r0).await;
    for (id, port) in [("a", 1), ("b", 2), ("c", 3)] {
        reg.add_server(common::add("web", id, &format!("127.0.0.1:{port}"), 1))
            .await
            .unwrap();
    }
    let mut sdks = Vec::new();
    for i in 0..50 {
        sdks.push(sdk(if i % 2 == 0 { &r0 } else { &r1 }, i).await);
    }

    // Every SDK, on either replica, holds the drain when the call returns.
    let resp = reg
        .drain_server(drain("a", 30_000))
        .await
        .unwrap()
        .into_inner();
    let versions: Vec<u64> = sdks.iter().map(|(_, h)| h.version().version).collect();
    let v = resp.version.unwrap().version;
    let b = resp.barrier.unwrap();
    assert_eq!(b.ended(), proto::BarrierEnd::Confirmed, "{b:?}");
    assert_eq!((b.confirmed, b.pending_total), (50, 0), "{b:?}");
    assert!(versions.iter().all(|&x| x >= v), "{versions:?} < {v}");

    // A session on r1 that never acknowledges: named with its replica at the deadline.
    let mut silent = common::Session::open(&r1, common::subscribe(&[("web", None)])).await;
    let u = silent.update().await;
    silent
        .send(client_message::Kind::Ack(proto::Ack {
            service: "web".into(),
            version: u.version,
            nonce: u.nonce.clone(),
        }))
        .await;
    let b = reg
        .drain_server(drain("b", 1_500))
        .await
        .unwrap()
        .into_inner()
        .barrier
        .unwrap();
    assert_eq!(b.ended(), proto::BarrierEnd::Deadline, "{b:?}");
    assert_eq!((b.confirmed, b.pending_total), (50, 1), "{b:?}");
    let p = &b.pending[0];
    assert_eq!(
        (p.kind.as_str(), p.id.as_str(), p.replica.as_str()),
        ("sdk", "test", "r1")
    );
    assert_eq!(p.acked_version, common::v(&u));

    // Once it is gone, a drain confirms again; the requests and answers are withdrawn.
    drop(silent);
    let b = reg
        .drain_server(drain("c", 30_000))
        .await
        .unwrap()
        .into_inner()
        .barrier
        .unwrap();
    assert_eq!(
        (b.ended(), b.confirmed),
        (proto::BarrierEnd::Confirmed, 50),
        "{b:?}"
    );
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let left = client
        .get(
            "/drain/barrier",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .unwrap();
    let keys: Vec<&str> = left.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sdks_over_two_replicas_and_grpcio_confirm() {
    let Some(python) = xds_support::python() else {
        return;
    };
    let etcd = Etcd::start().await;
    let (r0, r1) = replicas(&etcd).await;
    let mut reg = common::registry(&r0).await;
    let mut backends = Vec::new();
    for id in ["b1", "b2"] {
        let b = xds_support::Backend::start(id).await;
        reg.add_server(common::add("web", id, &b.addr.to_string(), 1))
            .await
            .unwrap();
        backends.push(b);
    }
    // The stock client follows r1; the drain is asked of r0.
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("bootstrap.json");
    xds_support::write_bootstrap(&bootstrap, r1.grpc_addr(), "interop-node");
    let script = xds_support::grpcio_script();
    let mut grpcio =
        xds_support::Driver::start(&python, &[script.as_str(), "xds:///web"], &bootstrap).await;
    grpcio
        .until(40, None, Duration::from_secs(60), "both backends", |r| {
            r.errors.is_empty() && r.ok.len() == 2
        })
        .await;
    let mut sdks = Vec::new();
    for i in 0..50 {
        sdks.push(sdk(if i % 2 == 0 { &r0 } else { &r1 }, i).await);
    }

    let resp = reg
        .drain_server(drain("b1", 30_000))
        .await
        .unwrap()
        .into_inner();
    // At the moment the call returns: every SDK, on either replica, holds the drain, and r1 has
    // grpcio's acknowledgement of endpoints built from it.
    let versions: Vec<u64> = sdks.iter().map(|(_, h)| h.version().version).collect();
    let grpcio_acked = r1
        .xds_clients()
        .list()
        .into_iter()
        .find(|c| c.node_id == "interop-node")
        .and_then(|c| c.endpoints_acked.get("web").map(|h| h.version))
        .unwrap_or(0);
    let v = resp.version.unwrap().version;
    let b = resp.barrier.unwrap();
    assert_eq!(b.ended(), proto::BarrierEnd::Confirmed, "{b:?}");
    assert_eq!(
        (b.version, b.confirmed, b.pending_total),
        (v, 51, 0),
        "{b:?}"
    );
    assert!(versions.iter().all(|&x| x >= v), "{versions:?} < {v}");
    assert!(grpcio_acked >= v, "grpcio acked {grpcio_acked} < {v}");

    // From now on no SDK pick and no grpcio call reaches b1.
    for (_, h) in &sdks {
        for _ in 0..20 {
            assert_eq!(h.get_next_server(None).unwrap().server_id(), "b2");
        }
    }
    let calls = grpcio.calls(300, None).await;
    assert!(calls.errors.is_empty(), "{calls:?}");
    assert_eq!((calls.of("b1"), calls.of("b2")), (0, 300), "{calls:?}");
    grpcio.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_held_open_through_another_replica_delays_in_flight_zero() {
    let etcd = Etcd::start().await;
    let (r0, r1) = replicas(&etcd).await;
    let mut reg = common::registry(&r0).await;
    for (id, port) in [("a", 1), ("b", 2)] {
        reg.add_server(common::add("web", id, &format!("127.0.0.1:{port}"), 1))
            .await
            .unwrap();
    }
    // The call is held by an SDK of r1; the drain is asked of r0, which learns of the call only
    // through the replicas' forwarded load reports.
    let (_client, h) = sdk(&r1, 0).await;
    let held = loop {
        let g = h.get_next_server(None).unwrap();
        if g.server_id() == "a" {
            break g;
        }
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let b = reg
            .drain_server(drain_with("a", true, 200))
            .await
            .unwrap()
            .into_inner()
            .barrier
            .unwrap();
        if b.ended() == proto::BarrierEnd::Deadline && b.in_flight == 1 {
            assert_eq!(b.pending_total, 0, "{b:?}");
            break;
        }
        assert!(Instant::now() < deadline, "r0 never saw r1's call: {b:?}");
    }
    let mut r = reg.clone();
    let waiting = tokio::spawn(async move { r.drain_server(drain_with("a", true, 30_000)).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !waiting.is_finished(),
        "answered while a call was in flight on r1"
    );
    let released = Instant::now();
    held.success();
    let b = waiting
        .await
        .unwrap()
        .unwrap()
        .into_inner()
        .barrier
        .unwrap();
    assert_eq!(b.ended(), proto::BarrierEnd::InFlightZero, "{b:?}");
    assert_eq!((b.in_flight, b.confirmed), (0, 1), "{b:?}");
    eprintln!("answered {:?} after the call ended", released.elapsed());
}
