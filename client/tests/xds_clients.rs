//! `dlbctl xds-clients` end to end: a raw ADS stream (as a stock gRPC client opens one) against
//! a real `dlbd`, listed by the real binary with its node id, user agent, resources, acked
//! version and last NACK.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::core::v3::{node::UserAgentVersionType, Locality, Node};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use serde_json::Value;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

async fn xds_clients(endpoint: &str) -> Value {
    serde_json::from_str(&dlbctl_ok(endpoint, &["xds-clients", "--json"]).await).unwrap()
}

#[tokio::test]
async fn xds_clients_lists_streams_with_acks_and_nacks() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    let empty = xds_clients(&ep).await;
    assert_eq!(empty["clients"].as_array().map(Vec::len), Some(0));

    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "ctl-node".into(),
            user_agent_name: "gRPC Test".into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion("9.9".into())),
            locality: Some(Locality {
                region: "eu".into(),
                zone: "eu-a".into(),
                sub_zone: "rack-1".into(),
            }),
            ..Default::default()
        }),
        type_url: LISTENER.into(),
        resource_names: vec!["default".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let l = within("listener", stream.message()).await.unwrap().unwrap();
    tx.send(DiscoveryRequest {
        type_url: LISTENER.into(),
        resource_names: vec!["default".into()],
        version_info: l.version_info.clone(),
        response_nonce: l.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(DiscoveryRequest {
        type_url: CLUSTER.into(),
        resource_names: vec!["default".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let c = within("cluster", stream.message()).await.unwrap().unwrap();
    tx.send(DiscoveryRequest {
        type_url: CLUSTER.into(),
        resource_names: vec!["default".into()],
        response_nonce: c.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "rejected for the test".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();

    // Poll until the NACK is in the bookkeeping (requests are handled asynchronously).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let client = loop {
        let v = xds_clients(&ep).await;
        let found = v["clients"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["node_id"] == "ctl-node").cloned());
        if let Some(c) = found {
            let nacked = c["types"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["nacks"] == 1));
            if nacked {
                break c;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "not listed: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(client["protocol"], "sotw");
    assert_eq!(client["user_agent"], "gRPC Test 9.9");
    assert_eq!(client["locality"]["zone"], "eu-a", "{client}");
    let types = client["types"].as_array().unwrap();
    let lds = types.iter().find(|t| t["type_url"] == LISTENER).unwrap();
    assert_eq!(lds["names"][0], "default");
    assert_eq!(lds["acked_version"], Value::from(l.version_info.clone()));
    let cds = types.iter().find(|t| t["type_url"] == CLUSTER).unwrap();
    assert_eq!(cds["acked_version"], "");
    assert_eq!(cds["last_nack"]["message"], "rejected for the test");

    // The text form names the node and the NACK.
    let out = Command::new(env!("CARGO_BIN_EXE_dlbctl"))
        .args(["--endpoint", &ep, "xds-clients"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("node=\"ctl-node\""), "{text}");
    assert!(text.contains("locality=eu/eu-a/rack-1"), "{text}");
    assert!(text.contains("last NACK"), "{text}");
    drop(tx);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn xds_clients_says_how_many_names_are_not_shown() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // 150 names: the listing shows 100 of them and counts the rest.
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "many-names".into(),
            ..Default::default()
        }),
        type_url: CLUSTER.into(),
        resource_names: (0..150).map(|i| format!("svc-{i:03}")).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    within("cluster", stream.message()).await.unwrap().unwrap();
    let text = dlbctl_ok(&ep, &["xds-clients"]).await;
    assert!(text.contains("svc-099"), "{text}");
    assert!(!text.contains("svc-100"), "{text}");
    assert!(text.contains("(50 more not shown)"), "{text}");
    drop(tx);
}
