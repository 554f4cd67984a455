//! The drain barrier over several `dlbd` replicas on a real etcd (feature `etcd`): the
//! acknowledgements of every replica's clients count (50 SDKs over two replicas), a silent
//! session on another replica is named with its replica at the deadline. Each test starts its
//! own etcd (`etcd_support`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod etcd_support;

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
    proto::DrainServerRequest {
        service: "web".into(),
        server_id: id.into(),
        wait: Some(proto::BarrierWait {
            in_flight_zero: false,
            timeout_ms,
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replicas_clients_confirm() {
    let etcd = Etcd::start().await;
    let r0 = dlb_server::spawn(config(&etcd, "r0")).await.unwrap();
    let r1 = dlb_server::spawn(config(&etcd, "r1")).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while r0.members().ids().len() < 2 || r1.members().ids().len() < 2 {
        assert!(Instant::now() < deadline, "replicas did not see each other");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
