//! Per-node EDS through a raw ADS client against a real `dlbd` on loopback: the
//! ClusterLoadAssignment a stream receives depends on its `node.locality` (state-of-the-world
//! and delta), the locality is listed with the stream, and a change is pushed to every zone.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use dlb::proto;
use dlb_server::api::xds::resources::ENDPOINTS;
use dlb_server::RunningServer;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const WAIT: Duration = Duration::from_secs(30);

fn node(id: &str, zone: &str) -> Option<Node> {
    Some(Node {
        id: id.into(),
        locality: (!zone.is_empty()).then(|| Locality {
            region: "r".into(),
            zone: zone.into(),
            sub_zone: "rack-1".into(),
        }),
        ..Default::default()
    })
}

/// 3 backends in zone a and 3 in zone b (6: zone-aware routing's minimum cluster size).
async fn service(server: &RunningServer) {
    let mut reg = common::registry(server).await;
    for (i, zone) in ["a", "a", "a", "b", "b", "b"].into_iter().enumerate() {
        reg.add_server(proto::AddServerRequest {
            locality: Some(proto::Locality {
                region: "r".into(),
                zone: zone.into(),
                sub_zone: String::new(),
            }),
            ..common::add(
                "s",
                &format!("{zone}{i}"),
                &format!("127.0.0.1:{}", 2000 + i),
                1,
            )
        })
        .await
        .unwrap();
    }
}

/// Per backend (sub_zone): (priority, locality weight).
fn layout(bytes: &[u8]) -> BTreeMap<String, (u32, u32)> {
    ClusterLoadAssignment::decode(bytes)
        .unwrap()
        .endpoints
        .into_iter()
        .map(|l| {
            let loc = l.locality.unwrap();
            (
                loc.sub_zone,
                (l.priority, l.load_balancing_weight.map_or(0, |w| w.value)),
            )
        })
        .collect()
}

/// Backends in priority 0.
fn first(l: &BTreeMap<String, (u32, u32)>) -> Vec<String> {
    l.iter()
        .filter(|(_, (p, _))| *p == 0)
        .map(|(id, _)| id.clone())
        .collect()
}

async fn sotw(server: &RunningServer, id: &str, zone: &str) -> DiscoveryResponse {
    let (tx, mut stream) = common::sotw(
        server,
        DiscoveryRequest {
            node: node(id, zone),
            type_url: ENDPOINTS.into(),
            resource_names: vec!["s".into()],
            ..Default::default()
        },
    )
    .await;
    let r = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop(tx);
    r
}

#[tokio::test]
async fn each_zone_gets_its_own_assignment() {
    let server = common::start().await;
    service(&server).await;
    let a = layout(&sotw(&server, "in-a", "a").await.resources[0].value);
    assert_eq!(first(&a), vec!["a0", "a1", "a2"], "{a:?}");
    assert!(a.values().all(|(p, _)| *p <= 1));
    assert_eq!(a["a0"].1, 333_333);
    let b = layout(&sotw(&server, "in-b", "b").await.resources[0].value);
    assert_eq!(first(&b), vec!["b3", "b4", "b5"], "{b:?}");
    // Without a locality, or in a zone no backend is in: every backend in priority 0.
    for (id, zone) in [("nowhere", ""), ("elsewhere", "z")] {
        let n = layout(&sotw(&server, id, zone).await.resources[0].value);
        assert_eq!(first(&n).len(), 6, "{id}: {n:?}");
    }
    server.shutdown().await.unwrap();
}

async fn recv(stream: &mut tonic::Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn delta_streams_follow_their_zone_and_list_their_locality() {
    let server = common::start().await;
    service(&server).await;
    let mut client = AggregatedDiscoveryServiceClient::new(common::channel(&server).await);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: node("delta-b", "b"),
        type_url: ENDPOINTS.into(),
        resource_names_subscribe: vec!["s".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = recv(&mut stream).await;
    let l = layout(&r.resources[0].resource.as_ref().unwrap().value);
    assert_eq!(first(&l), vec!["b3", "b4", "b5"], "{l:?}");
    tx.send(DeltaDiscoveryRequest {
        type_url: ENDPOINTS.into(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Listed with its locality.
    let me = server
        .xds_clients()
        .list()
        .into_iter()
        .find(|c| c.node_id == "delta-b")
        .expect("listed");
    let loc = me.locality.expect("locality recorded");
    assert_eq!(
        (
            loc.region.as_str(),
            loc.zone.as_str(),
            loc.sub_zone.as_str()
        ),
        ("r", "b", "rack-1")
    );

    // Two of b's three backends fail: b keeps (1/4) / (1/2) = 50 %, a takes the rest.
    let mut reg = common::registry(&server).await;
    for id in ["b3", "b4"] {
        reg.health_check_failed(common::hc("s", id)).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = recv(&mut stream).await;
        let l = layout(&r.resources[0].resource.as_ref().unwrap().value);
        tx.send(DeltaDiscoveryRequest {
            type_url: ENDPOINTS.into(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        if l["b4"].1 == 1 {
            assert_eq!(l["b5"], (0, 500_000), "{l:?}");
            assert_eq!(l["a0"], (0, 166_667), "{l:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{l:?}");
    }
    server.shutdown().await.unwrap();
}
