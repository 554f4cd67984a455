//! Zone demand over two `dlbd` replicas on a real etcd (feature `etcd`): sessions of zone a on
//! one replica and of zone b on the other are pushed the same shares, summed over both (followers
//! first, then calls). Starts its own etcd (`etcd_support`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod demand_support;
mod etcd_support;

use std::time::{Duration, Instant};

use common::{add, Session, WAIT};
use demand_support::{demand, report, subscribe_in};
use dlb::proto::server_message;
use dlb_server::{ServerConfig, StoreConfig};
use etcd_support::Etcd;

fn config(etcd: &Etcd, id: &str) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        store: StoreConfig::Etcd(etcd.config("/demand")),
        replica_id: Some(id.into()),
        replica_ttl: Duration::from_secs(2),
        ..Default::default()
    }
}

/// A session in `zone` that holds the backend `b1` (so its reports count).
async fn open(server: &dlb_server::RunningServer, zone: &str) -> Session {
    let mut s = Session::open(server, subscribe_in(Some(("eu", zone)))).await;
    loop {
        if let server_message::Kind::Update(u) = s.next().await {
            if u.upserts.iter().any(|b| b.server_id == "b1") {
                return s;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_are_summed_over_the_replicas() {
    let etcd = Etcd::start().await;
    let r0 = dlb_server::spawn(config(&etcd, "r0")).await.unwrap();
    let r1 = dlb_server::spawn(config(&etcd, "r1")).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while r0.members().ids().len() < 2 || r1.members().ids().len() < 2 {
        assert!(Instant::now() < deadline, "replicas did not see each other");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut reg = common::registry(&r0).await;
    reg.add_server(add("web", "b1", "127.0.0.1:1", 1))
        .await
        .unwrap();
    let mut a1 = open(&r0, "a").await;
    let mut a2 = open(&r0, "a").await;
    let mut b1 = open(&r1, "b").await;

    // Followers, summed: 2 in a (on r0), 1 in b (on r1), seen on both replicas.
    demand(&mut b1, &[("a", 2.0 / 3.0), ("b", 1.0 / 3.0)]).await;
    demand(&mut a1, &[("a", 2.0 / 3.0), ("b", 1.0 / 3.0)]).await;

    // Calls: a 10 + 30 on r0, b 60 on r1.
    a1.send(report(10)).await;
    a2.send(report(30)).await;
    b1.send(report(60)).await;
    demand(&mut b1, &[("a", 0.4), ("b", 0.6)]).await;
    demand(&mut a2, &[("a", 0.4), ("b", 0.6)]).await;
    r0.shutdown().await.unwrap();
    r1.shutdown().await.unwrap();
}
