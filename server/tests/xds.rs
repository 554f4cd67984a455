//! A raw ADS client against a real `dlbd` on loopback: state-of-the-world and delta streams,
//! ACK/NACK bookkeeping, resources that do not exist (yet), resume after reconnect, and the
//! read token on the ADS path.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use dlb_server::api::xds::clients::ClientState;
use dlb_server::api::xds::resources::{CLUSTER, ENDPOINTS, LISTENER};
use dlb_server::{RunningServer, ServerConfig};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// How long anything that must happen may take (generous: this VM stalls for seconds).
const WAIT: Duration = Duration::from_secs(30);

struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Sotw {
    async fn open(server: &RunningServer, node: &str) -> Sotw {
        let mut client = AggregatedDiscoveryServiceClient::new(common::channel(server).await);
        let (tx, rx) = mpsc::channel(16);
        let stream = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("ADS stream")
            .into_inner();
        let s = Sotw { tx, rx: stream };
        s.tx.send(DiscoveryRequest {
            node: Some(Node {
                id: node.into(),
                user_agent_name: "raw-test".into(),
                ..Default::default()
            }),
            // A first request of a type nobody serves: answered with no resources.
            type_url: "type.googleapis.com/envoy.config.route.v3.RouteConfiguration".into(),
            resource_names: vec!["unused".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        s
    }

    async fn send(&self, type_url: &str, names: &[&str], version: &str, nonce: &str) {
        self.tx
            .send(DiscoveryRequest {
                type_url: type_url.into(),
                resource_names: names.iter().map(|s| s.to_string()).collect(),
                version_info: version.into(),
                response_nonce: nonce.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn nack(&self, type_url: &str, names: &[&str], version: &str, nonce: &str, msg: &str) {
        self.tx
            .send(DiscoveryRequest {
                type_url: type_url.into(),
                resource_names: names.iter().map(|s| s.to_string()).collect(),
                version_info: version.into(),
                response_nonce: nonce.into(),
                error_detail: Some(RpcStatus {
                    code: 3,
                    message: msg.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no response in time")
            .expect("stream failed")
            .expect("stream ended")
    }

    /// Receives the next response of `type_url`, skipping the route answer of `open`.
    async fn recv_type(&mut self, type_url: &str) -> DiscoveryResponse {
        loop {
            let r = self.recv().await;
            if r.type_url.ends_with("RouteConfiguration") {
                assert!(r.resources.is_empty());
                continue;
            }
            assert_eq!(r.type_url, type_url, "unexpected response {r:?}");
            return r;
        }
    }

    async fn ack(&self, r: &DiscoveryResponse, names: &[&str]) {
        self.send(&r.type_url, names, &r.version_info, &r.nonce)
            .await;
    }
}

fn names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| match a.type_url.as_str() {
            t if t == LISTENER => Listener::decode(&a.value[..]).unwrap().name,
            t if t == ENDPOINTS => {
                ClusterLoadAssignment::decode(&a.value[..])
                    .unwrap()
                    .cluster_name
            }
            _ => {
                envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(&a.value[..])
                    .unwrap()
                    .name
            }
        })
        .collect()
}

async fn client_state(
    server: &RunningServer,
    node: &str,
    cond: impl Fn(&ClientState) -> bool,
) -> ClientState {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = server
            .xds_clients()
            .list()
            .into_iter()
            .find(|c| c.node_id == node);
        if let Some(c) = &found {
            if cond(c) {
                return c.clone();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "client state not reached: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn add(server: &RunningServer, service: &str, id: &str, port: u16, weight: u32) {
    common::registry(server)
        .await
        .add_server(common::add(
            service,
            id,
            &format!("127.0.0.1:{port}"),
            weight,
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn sotw_serves_the_three_resources_and_records_acks() {
    let server = common::start().await;
    add(&server, "s", "a", 1001, 2).await;
    add(&server, "s", "b", 1002, 5).await;
    let mut c = Sotw::open(&server, "raw-sotw").await;

    c.send(LISTENER, &["s"], "", "").await;
    let l = c.recv_type(LISTENER).await;
    assert_eq!(names(&l), vec!["s"]);
    c.ack(&l, &["s"]).await;
    c.send(CLUSTER, &["s"], "", "").await;
    let cl = c.recv_type(CLUSTER).await;
    assert_eq!(names(&cl), vec!["s"]);
    c.ack(&cl, &["s"]).await;
    c.send(ENDPOINTS, &["s"], "", "").await;
    let e = c.recv_type(ENDPOINTS).await;
    let cla = ClusterLoadAssignment::decode(&e.resources[0].value[..]).unwrap();
    let weights: Vec<u32> = cla
        .endpoints
        .iter()
        .map(|l| l.load_balancing_weight.as_ref().unwrap().value)
        .collect();
    // Locality weights are the backends' shares in millionths (weights 2 and 5).
    assert_eq!(
        weights,
        vec![285_714, 714_286],
        "one locality per backend, weighted"
    );
    c.ack(&e, &["s"]).await;

    let st = client_state(&server, "raw-sotw", |c| {
        c.types
            .get(ENDPOINTS)
            .is_some_and(|t| !t.acked_version.is_empty())
    })
    .await;
    assert_eq!(st.protocol, "sotw");
    assert_eq!(st.user_agent, "raw-test");
    assert_eq!(st.types[LISTENER].acked_version, l.version_info);
    assert_eq!(st.types[LISTENER].acked_nonce, l.nonce);
    assert_eq!(st.types[CLUSTER].acked_version, cl.version_info);
    assert_eq!(st.types[ENDPOINTS].acked_version, e.version_info);
    assert!(st.types[ENDPOINTS].names.contains("s"));

    // A new backend changes only the endpoints: the next response is EDS.
    add(&server, "s", "c", 1003, 1).await;
    let e2 = c.recv_type(ENDPOINTS).await;
    assert_ne!(e2.version_info, e.version_info);
    let cla = ClusterLoadAssignment::decode(&e2.resources[0].value[..]).unwrap();
    assert_eq!(cla.endpoints.len(), 3);
    c.ack(&e2, &["s"]).await;

    // A failed health check is pushed as an unhealthy endpoint.
    common::registry(&server)
        .await
        .health_check_failed(common::hc("s", "c"))
        .await
        .unwrap();
    let e3 = c.recv_type(ENDPOINTS).await;
    let cla = ClusterLoadAssignment::decode(&e3.resources[0].value[..]).unwrap();
    let health: Vec<i32> = cla
        .endpoints
        .iter()
        .map(|l| l.lb_endpoints[0].health_status)
        .collect();
    assert_eq!(health, vec![1, 1, 2], "HEALTHY, HEALTHY, UNHEALTHY");
    server.shutdown().await.unwrap();
}

async fn scrape(addr: SocketAddr) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn a_nack_is_recorded_escaped_and_counted_and_a_stale_nonce_ignored() {
    let server = common::start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    })
    .await;
    add(&server, "s", "a", 1001, 1).await;
    let mut c = Sotw::open(&server, "raw-nack").await;
    c.send(CLUSTER, &["s"], "", "").await;
    let cl = c.recv_type(CLUSTER).await;
    // A stale nonce changes nothing.
    c.nack(CLUSTER, &["s"], "", "not-a-nonce", "ignored").await;
    c.nack(CLUSTER, &["s"], "", &cl.nonce, "bad\ncluster \"s\"")
        .await;
    let st = client_state(&server, "raw-nack", |c| {
        c.types.get(CLUSTER).is_some_and(|t| t.last_nack.is_some())
    })
    .await;
    let t = &st.types[CLUSTER];
    assert_eq!(t.nacks, 1, "the stale-nonce NACK was counted");
    let nack = t.last_nack.as_ref().unwrap();
    assert_eq!(nack.message, "bad\\ncluster \\\"s\\\"");
    assert_eq!(nack.nonce, cl.nonce);
    assert!(t.acked_version.is_empty(), "a NACK is not an ACK");
    let maddr = server.metrics_addr().unwrap();
    let text = scrape(maddr).await;
    assert!(
        text.contains("dlb_xds_nacks_total{type=\"cluster\"} 1"),
        "{text}"
    );
    assert!(text.contains("dlb_xds_streams 1"), "{text}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_resources_are_absent_then_delivered_when_created() {
    let server = common::start().await;
    let mut c = Sotw::open(&server, "raw-absent").await;
    c.send(LISTENER, &["later"], "", "").await;
    let l = c.recv_type(LISTENER).await;
    assert!(l.resources.is_empty(), "an absent listener is left out");
    c.ack(&l, &["later"]).await;
    add(&server, "later", "a", 1001, 1).await;
    let l2 = c.recv_type(LISTENER).await;
    assert_eq!(names(&l2), vec!["later"]);
    assert_ne!(l2.version_info, l.version_info);
    c.ack(&l2, &["later"]).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn sotw_resumes_after_reconnect() {
    let server = common::start().await;
    add(&server, "s", "a", 1001, 1).await;
    let mut c = Sotw::open(&server, "raw-resume").await;
    c.send(LISTENER, &["s"], "", "").await;
    let l = c.recv_type(LISTENER).await;
    c.ack(&l, &["s"]).await;
    drop(c);

    // Reconnect holding the current version: no listener is resent; the first answer is the
    // cluster asked for next.
    let mut c = Sotw::open(&server, "raw-resume-2").await;
    c.send(LISTENER, &["s"], &l.version_info, "").await;
    c.send(CLUSTER, &["s"], "", "").await;
    let first = c.recv_type(CLUSTER).await;
    assert_eq!(names(&first), vec!["s"]);
    let st = client_state(&server, "raw-resume-2", |c| c.types.contains_key(LISTENER)).await;
    assert_eq!(st.types[LISTENER].acked_version, l.version_info);
    drop(c);

    // Reconnect holding an old version: the listener is sent.
    let mut c = Sotw::open(&server, "raw-resume-3").await;
    c.send(LISTENER, &["s"], "0000000000000000", "").await;
    let again = c.recv_type(LISTENER).await;
    assert_eq!(again.version_info, l.version_info);
    server.shutdown().await.unwrap();
}

struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Delta {
    async fn open(server: &RunningServer) -> Delta {
        let mut client = AggregatedDiscoveryServiceClient::new(common::channel(server).await);
        let (tx, rx) = mpsc::channel(16);
        let stream = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("delta stream")
            .into_inner();
        Delta { tx, rx: stream }
    }

    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no response in time")
            .expect("stream failed")
            .expect("stream ended")
    }
}

fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn delta_sends_changes_and_removals_and_records_acks() {
    let server = common::start().await;
    add(&server, "s", "a", 1001, 1).await;
    let mut d = Delta::open(&server).await;
    d.send(DeltaDiscoveryRequest {
        node: node("raw-delta"),
        type_url: ENDPOINTS.into(),
        resource_names_subscribe: vec!["s".into(), "nope".into()],
        ..Default::default()
    })
    .await;
    let r = d.recv().await;
    assert_eq!(r.type_url, ENDPOINTS);
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.resources[0].name, "s");
    assert_eq!(
        r.removed_resources,
        vec!["nope"],
        "absent names are reported"
    );
    let v1 = r.resources[0].version.clone();
    d.send(DeltaDiscoveryRequest {
        type_url: ENDPOINTS.into(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    })
    .await;
    let st = client_state(&server, "raw-delta", |c| {
        c.types
            .get(ENDPOINTS)
            .is_some_and(|t| !t.acked_version.is_empty())
    })
    .await;
    assert_eq!(st.protocol, "delta");
    assert_eq!(st.types[ENDPOINTS].acked_version, r.system_version_info);

    // A change of s: only s is sent.
    add(&server, "s", "b", 1002, 1).await;
    let r2 = d.recv().await;
    assert_eq!(r2.resources.len(), 1);
    assert_eq!(r2.resources[0].name, "s");
    assert_ne!(r2.resources[0].version, v1);
    assert!(r2.removed_resources.is_empty());
    // The absent name appears when created.
    add(&server, "nope", "x", 1003, 1).await;
    let r3 = d.recv().await;
    assert_eq!(r3.resources.len(), 1);
    assert_eq!(r3.resources[0].name, "nope");

    // A NACK is recorded.
    d.send(DeltaDiscoveryRequest {
        type_url: ENDPOINTS.into(),
        response_nonce: r3.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "no thanks".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let st = client_state(&server, "raw-delta", |c| {
        c.types.get(ENDPOINTS).is_some_and(|t| t.nacks == 1)
    })
    .await;
    assert_eq!(
        st.types[ENDPOINTS].last_nack.as_ref().unwrap().message,
        "no thanks"
    );

    // Unsubscribed names get no more updates: the next response is for s only.
    d.send(DeltaDiscoveryRequest {
        type_url: ENDPOINTS.into(),
        resource_names_unsubscribe: vec!["nope".into()],
        ..Default::default()
    })
    .await;
    add(&server, "nope", "y", 1004, 1).await;
    add(&server, "s", "c", 1005, 1).await;
    let r4 = d.recv().await;
    assert_eq!(r4.resources.len(), 1);
    assert_eq!(r4.resources[0].name, "s");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn delta_resumes_from_initial_resource_versions() {
    let server = common::start().await;
    add(&server, "s", "a", 1001, 1).await;
    add(&server, "t", "a", 1002, 1).await;
    let mut d = Delta::open(&server).await;
    d.send(DeltaDiscoveryRequest {
        node: node("raw-delta-resume"),
        type_url: LISTENER.into(),
        resource_names_subscribe: vec!["s".into(), "t".into()],
        ..Default::default()
    })
    .await;
    let r = d.recv().await;
    assert_eq!(r.resources.len(), 2);
    let held: std::collections::HashMap<String, String> = r
        .resources
        .iter()
        .map(|x| (x.name.clone(), x.version.clone()))
        .collect();
    drop(d);

    // Reconnect holding s at its version and t at an old one: only t is sent.
    let mut d = Delta::open(&server).await;
    let mut initial = held.clone();
    initial.insert("t".into(), "stale".into());
    d.send(DeltaDiscoveryRequest {
        node: node("raw-delta-resume-2"),
        type_url: LISTENER.into(),
        resource_names_subscribe: vec!["s".into(), "t".into()],
        initial_resource_versions: initial,
        ..Default::default()
    })
    .await;
    let r = d.recv().await;
    let names: Vec<&str> = r.resources.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, vec!["t"]);
    assert_eq!(r.resources[0].version, held["t"]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn ads_needs_a_read_token_where_configured() {
    let token = "read-token-0123456789";
    let server = common::start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        auth: dlb_server::api::auth::AuthConfig {
            admin_tokens: vec![],
            read_tokens: vec![token.into()],
        },
        ..Default::default()
    })
    .await;
    let channel = common::channel(&server).await;
    let (_tx, rx) = mpsc::channel::<DiscoveryRequest>(1);
    let err = AggregatedDiscoveryServiceClient::new(channel.clone())
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut client = AggregatedDiscoveryServiceClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        },
    );
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(4);
    tx.send(DiscoveryRequest {
        type_url: LISTENER.into(),
        resource_names: vec!["default".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("with a read token")
        .into_inner();
    let r = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.type_url, LISTENER);
    assert_eq!(
        r.resources.len(),
        1,
        "the default service is served by name"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_subscriptions_and_too_many_streams_are_refused() {
    let server = common::start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        max_sessions: 1,
        ..Default::default()
    })
    .await;
    // Over the per-type quota: the stream ends with RESOURCE_EXHAUSTED naming the field.
    let mut c = Sotw::open(&server, "raw-quota").await;
    let names: Vec<String> = (0..=dlb_server::api::xds::MAX_NAMES_PER_TYPE)
        .map(|i| format!("n{i}"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    c.send(LISTENER, &refs, "", "").await;
    let err = loop {
        match tokio::time::timeout(WAIT, c.rx.message()).await.unwrap() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(err.message().contains("resource_names"), "{err:?}");
    drop(c);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !server.xds_clients().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused stream stays listed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // One stream allowed: a second one is refused while the first is open.
    let _first = Sotw::open(&server, "raw-first").await;
    client_state(&server, "raw-first", |_| true).await;
    let (_tx, rx) = mpsc::channel::<DiscoveryRequest>(1);
    let err = AggregatedDiscoveryServiceClient::new(common::channel(&server).await)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect_err("over max_sessions");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    server.shutdown().await.unwrap();
}

async fn status_of(c: &mut Sotw) -> tonic::Status {
    loop {
        match tokio::time::timeout(WAIT, c.rx.message()).await.unwrap() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    }
}

#[tokio::test]
async fn bad_type_urls_are_refused_naming_the_field() {
    let server = common::start().await;
    let mut c = Sotw::open(&server, "raw-type").await;
    c.send("", &["s"], "", "").await;
    let err = status_of(&mut c).await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("DiscoveryRequest.type_url"),
        "{err:?}"
    );

    // More resource types than any xDS client uses.
    let mut c = Sotw::open(&server, "raw-types").await;
    for i in 0..dlb_server::api::xds::MAX_TYPES {
        c.send(&format!("type.googleapis.com/x.T{i}"), &["s"], "", "")
            .await;
    }
    let err = status_of(&mut c).await;
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(
        err.message().contains("DiscoveryRequest.type_url"),
        "{err:?}"
    );
    server.shutdown().await.unwrap();
}
