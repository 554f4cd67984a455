//! The drain barrier (`DrainServer` / `RemoveServer` with `wait`) against real SDK sessions
//! (dlb-client) and raw sessions that stop acknowledging.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use dlb::proto::{self, client_message};
use dlb_client::{Client, ServiceHandle};
use dlb_server::ServerConfig;

const SERVICE: &str = "drained";

async fn seed(server: &dlb_server::RunningServer) {
    let mut r = registry(server).await;
    r.add_server(add(SERVICE, "a", "127.0.0.1:1", 1))
        .await
        .unwrap();
    r.add_server(add(SERVICE, "b", "127.0.0.1:2", 1))
        .await
        .unwrap();
}

async fn sdk(server: &dlb_server::RunningServer, i: usize) -> (Client, ServiceHandle) {
    let client = Client::builder([format!("http://{}", server.grpc_addr())])
        .client_id(format!("sdk-{i}"))
        .report_interval(Duration::from_millis(50))
        .connect()
        .await
        .expect("client connects");
    let handle = client.service(SERVICE).await.expect("subscribes");
    (client, handle)
}

fn drain(server_id: &str, wait: Option<proto::BarrierWait>) -> proto::DrainServerRequest {
    proto::DrainServerRequest {
        service: SERVICE.into(),
        server_id: server_id.into(),
        wait,
        ..Default::default()
    }
}

fn wait(in_flight_zero: bool, timeout_ms: u32) -> Option<proto::BarrierWait> {
    Some(proto::BarrierWait {
        in_flight_zero,
        timeout_ms,
    })
}

#[tokio::test]
async fn drain_wait_returns_once_every_sdk_holds_the_drain() {
    let server = start().await;
    seed(&server).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(sdk(&server, i).await);
    }
    let mut r = registry(&server).await;
    let resp = r
        .drain_server(drain("a", wait(false, 30_000)))
        .await
        .unwrap()
        .into_inner();
    // The moment the call returns, every SDK holds the drain (it acks only what it applied).
    let versions: Vec<u64> = clients.iter().map(|(_, h)| h.version().version).collect();
    let v = resp.version.unwrap().version;
    let b = resp.barrier.expect("a barrier answer");
    assert_eq!(b.ended(), proto::BarrierEnd::Confirmed, "{b:?}");
    assert_eq!((b.version, b.confirmed, b.pending_total), (v, 20, 0));
    assert!(versions.iter().all(|&x| x >= v), "{versions:?} < {v}");
    assert!(resp.server.unwrap().draining);
    for (_, h) in &clients {
        for _ in 0..50 {
            let g = h.get_next_server(None).expect("b takes calls");
            assert_eq!(g.server_id(), "b");
        }
    }
    // Removing with a wait: every SDK acknowledges a version without the backend.
    let resp = r
        .remove_server(proto::RemoveServerRequest {
            service: SERVICE.into(),
            server_id: "a".into(),
            wait: wait(false, 30_000),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let v = resp.version.unwrap().version;
    assert!(clients.iter().all(|(_, h)| h.version().version >= v));
    let b = resp.barrier.unwrap();
    assert_eq!((b.ended(), b.confirmed), (proto::BarrierEnd::Confirmed, 20));
    for (_, h) in &clients {
        assert!(h.backends().iter().all(|x| x.server_id != "a"));
    }
    // No wait asked: no barrier answer.
    let resp = r.drain_server(drain("b", None)).await.unwrap().into_inner();
    assert!(resp.barrier.is_none());
}

/// A raw session that received the service and acknowledged it, then goes silent.
async fn silent_session(server: &dlb_server::RunningServer) -> (Session, u64) {
    let mut s = Session::open(server, subscribe(&[(SERVICE, None)])).await;
    let u = s.update().await;
    s.send(client_message::Kind::Ack(proto::Ack {
        service: SERVICE.into(),
        version: u.version,
        nonce: u.nonce.clone(),
    }))
    .await;
    (s, v(&u))
}

#[tokio::test]
async fn a_silent_session_is_named_at_the_deadline() {
    let server = start().await;
    seed(&server).await;
    let (_sdk, _h) = sdk(&server, 0).await;
    let (_silent, acked) = silent_session(&server).await;
    let mut r = registry(&server).await;
    let resp = r
        .drain_server(drain("a", wait(false, 1_500)))
        .await
        .unwrap()
        .into_inner();
    let b = resp.barrier.unwrap();
    assert_eq!(b.ended(), proto::BarrierEnd::Deadline, "{b:?}");
    assert_eq!((b.confirmed, b.pending_total), (1, 1));
    let p = &b.pending[0];
    assert_eq!(
        (p.kind.as_str(), p.id.as_str(), p.acked_version),
        ("sdk", "test", acked)
    );
    assert_eq!(p.replica, server.replica_id());
    assert!(b.waited_ms >= 1_500);
}

#[tokio::test]
async fn a_session_past_the_stall_cut_off_no_longer_counts() {
    let server = start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        stall_deadline: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    seed(&server).await;
    let (_sdk, _h) = sdk(&server, 0).await;
    let (_silent, _) = silent_session(&server).await;
    let mut r = registry(&server).await;
    let resp = r
        .drain_server(drain("a", wait(false, 30_000)))
        .await
        .unwrap()
        .into_inner();
    let b = resp.barrier.unwrap();
    assert_eq!(b.ended(), proto::BarrierEnd::Confirmed, "{b:?}");
    assert_eq!((b.confirmed, b.pending_total, b.stalled.len()), (1, 0, 1));
    assert_eq!(b.stalled[0].id, "test");
    assert!(b.waited_ms >= 1_000);
}

#[tokio::test]
async fn in_flight_zero_waits_for_the_call_held_open() {
    let server = start().await;
    seed(&server).await;
    let (_client, h) = sdk(&server, 0).await;
    let held = loop {
        let g = h.get_next_server(None).unwrap();
        if g.server_id() == "a" {
            break g;
        }
    };
    let mut r = registry(&server).await;
    // Until the SDK's load report has reached dlbd, a short barrier may see 0 in flight.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let b = r
            .drain_server(drain("a", wait(true, 200)))
            .await
            .unwrap()
            .into_inner()
            .barrier
            .unwrap();
        if b.ended() == proto::BarrierEnd::Deadline && b.in_flight == 1 {
            assert_eq!(b.pending_total, 0, "{b:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "in-flight never seen"
        );
    }
    let mut r2 = r.clone();
    let waiting =
        tokio::spawn(async move { r2.drain_server(drain("a", wait(true, 30_000))).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "answered while a call was in flight"
    );
    held.success();
    let b = waiting
        .await
        .unwrap()
        .unwrap()
        .into_inner()
        .barrier
        .unwrap();
    assert_eq!(b.ended(), proto::BarrierEnd::InFlightZero, "{b:?}");
    assert_eq!((b.in_flight, b.confirmed), (0, 1));
}

#[tokio::test]
async fn bad_wait_options_are_refused_and_change_nothing() {
    let server = start().await;
    seed(&server).await;
    let mut r = registry(&server).await;
    let e = r
        .drain_server(drain("a", wait(false, 3_600_001)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("wait.timeout_ms"), "{}", e.message());
    let e = r
        .remove_server(proto::RemoveServerRequest {
            service: SERVICE.into(),
            server_id: "a".into(),
            wait: wait(true, 1_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("wait.in_flight_zero"),
        "{}",
        e.message()
    );
    let list = r
        .list_servers(proto::ListServersRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let a = list.servers.iter().find(|s| s.server_id == "a").unwrap();
    assert!(!a.draining);
    let e = r.drain_server(drain("nope", None)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

mod raw_xds {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use tokio::sync::mpsc;

    pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

    /// A SotW ADS stream following the service's endpoints.
    pub struct Eds {
        tx: mpsc::Sender<DiscoveryRequest>,
        rx: tonic::Streaming<DiscoveryResponse>,
    }

    impl Eds {
        pub async fn open(server: &dlb_server::RunningServer, node: &str) -> Eds {
            let (tx, rx) = sotw(
                server,
                DiscoveryRequest {
                    node: Some(Node {
                        id: node.into(),
                        ..Default::default()
                    }),
                    type_url: EDS.into(),
                    resource_names: vec![SERVICE.into()],
                    ..Default::default()
                },
            )
            .await;
            Eds { tx, rx }
        }

        pub async fn recv(&mut self) -> DiscoveryResponse {
            tokio::time::timeout(WAIT, self.rx.message())
                .await
                .expect("no response in time")
                .unwrap()
                .unwrap()
        }

        pub async fn ack(&self, r: &DiscoveryResponse) {
            self.tx
                .send(DiscoveryRequest {
                    type_url: EDS.into(),
                    resource_names: vec![SERVICE.into()],
                    version_info: r.version_info.clone(),
                    response_nonce: r.nonce.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn an_xds_client_confirms_by_acknowledging_the_endpoints() {
    let server = start().await;
    seed(&server).await;
    let mut eds = raw_xds::Eds::open(&server, "grpc-node").await;
    let first = eds.recv().await;
    eds.ack(&first).await;
    let mut r = registry(&server).await;
    let mut r2 = r.clone();
    let waiting =
        tokio::spawn(async move { r2.drain_server(drain("a", wait(false, 30_000))).await });
    let update = eds.recv().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "answered before the xDS client acked"
    );
    eds.ack(&update).await;
    let b = waiting
        .await
        .unwrap()
        .unwrap()
        .into_inner()
        .barrier
        .unwrap();
    assert_eq!((b.ended(), b.confirmed), (proto::BarrierEnd::Confirmed, 1));

    // Not acknowledging: named at the deadline, with the version it holds.
    let held = b.version;
    r.health_check_failed(hc(SERVICE, "b")).await.unwrap();
    let b = r
        .drain_server(drain("b", wait(false, 500)))
        .await
        .unwrap()
        .into_inner()
        .barrier
        .unwrap();
    assert_eq!(b.ended(), proto::BarrierEnd::Deadline, "{b:?}");
    let p = &b.pending[0];
    assert_eq!(
        (p.kind.as_str(), p.id.as_str(), p.acked_version),
        ("xds", "grpc-node", held)
    );
    // Once it holds the endpoints with `b` unhealthy, draining `b` changes nothing it sees (no
    // response is sent): it confirms at once.
    let unhealthy = eds.recv().await;
    eds.ack(&unhealthy).await;
    let b = r
        .drain_server(drain("b", wait(false, 30_000)))
        .await
        .unwrap()
        .into_inner()
        .barrier
        .unwrap();
    assert_eq!((b.ended(), b.confirmed), (proto::BarrierEnd::Confirmed, 1));
}

#[tokio::test]
async fn a_lease_owned_backend_deregisters_itself_after_the_barrier() {
    use dlb::proto::membership_client::MembershipClient;
    let server = start().await;
    seed(&server).await;
    let mut m = MembershipClient::new(channel(&server).await);
    m.register(proto::RegisterRequest {
        service: SERVICE.into(),
        server_id: "self".into(),
        address: "127.0.0.1:9".into(),
        ttl_seconds: 60,
        ..Default::default()
    })
    .await
    .unwrap();
    let (_c, h) = sdk(&server, 0).await;
    let (_silent, _) = silent_session(&server).await;
    let r = m
        .deregister(proto::DeregisterRequest {
            service: SERVICE.into(),
            server_id: "self".into(),
            drain: wait(false, 800),
        })
        .await
        .unwrap()
        .into_inner();
    // The barrier ran on the drain (the SDK confirmed, the silent session is named), then the
    // backend went whatever ended the wait.
    let b = r.barrier.unwrap();
    assert_eq!(b.ended(), proto::BarrierEnd::Deadline, "{b:?}");
    assert_eq!((b.confirmed, b.pending_total), (1, 1), "{b:?}");
    assert!(h.version().version >= b.version);
    assert!(b.version < r.version.unwrap().version);
    // An API-owned backend cannot drain itself through Membership.
    let e = m
        .deregister(proto::DeregisterRequest {
            service: SERVICE.into(),
            server_id: "a".into(),
            drain: wait(false, 800),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let list = registry(&server)
        .await
        .list_servers(proto::ListServersRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.servers.iter().all(|s| s.server_id != "self"));
    assert!(list.servers.iter().all(|s| !s.draining), "a was drained");
}
