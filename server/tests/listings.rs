//! Every listing RPC answers within [`MAX_LIST_BYTES`] whatever was created (issue 15): with
//! more entries than fit, the call succeeds with the first entries in the listing's order,
//! `truncated` set and `total` the true count. The state is real and seeded in bulk at start
//! (the configured services, lease-owned records) or sent by one SDK-style session (circuit
//! reports), with long ids so the counts stay small. ListDns is covered by a unit test of its
//! answer (`membership::tests`): over 4 MiB of DNS statuses needs thousands of failed
//! resolutions with long errors, too slow through a test DNS server.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use dlb::model::{MAX_LIST_BYTES, MAX_MESSAGE_BYTES};
use dlb::proto::{self, client_message, discovery_client::DiscoveryClient};
use dlb::proto::{membership_client::MembershipClient, registry_client::RegistryClient};
use dlb_server::{RunningServer, ServerConfig, ServiceConfig};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Upper bound of every wait (generous: this VM stalls for seconds).
const WAIT: Duration = Duration::from_secs(60);

/// A 128-byte id (the longest allowed), sorting in `i`'s order.
fn id(i: usize) -> String {
    format!("{i:0>128}")
}

async fn start(services: Vec<ServiceConfig>) -> RunningServer {
    common::start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        services,
        ..Default::default()
    })
    .await
}

async fn registry(server: &RunningServer) -> RegistryClient<Channel> {
    RegistryClient::new(common::channel(server).await)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

async fn membership(server: &RunningServer) -> MembershipClient<Channel> {
    MembershipClient::new(common::channel(server).await)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// `n` backends of `service` with 128-byte ids, on a closed port of 127.0.0.1.
fn backends(n: usize, f: impl Fn(&mut proto::Server)) -> Vec<proto::Server> {
    (0..n)
        .map(|i| {
            let mut s = proto::Server {
                server_id: id(i),
                address: "127.0.0.1:1".into(),
                weight: 1,
                ..Default::default()
            };
            f(&mut s);
            s
        })
        .collect()
}

/// Asserts a listing of `listed` ids (in order) out of `expected` (in order) is the truncated
/// prefix the bound asks for, in an answer of `bytes` bytes.
fn assert_prefix(listed: &[&str], truncated: bool, total: u32, expected: &[String], bytes: usize) {
    assert!(truncated, "not truncated ({} listed)", listed.len());
    assert_eq!(total as usize, expected.len());
    assert!(!listed.is_empty() && listed.len() < expected.len());
    assert_eq!(
        listed,
        &expected[..listed.len()],
        "not the first ones in order"
    );
    assert!(bytes <= MAX_LIST_BYTES, "{bytes} bytes");
}

#[tokio::test]
async fn list_services_is_truncated_with_a_count() {
    // 2,000 services whose policy carries a health check of long strings (≈ 2.3 kB each,
    // ≈ 4.6 MB in all).
    let mut policy = dlb::model::default_policy();
    policy.health_check = Some(proto::HealthCheck {
        kind: Some(proto::health_check::Kind::Http(proto::HttpHealthCheck {
            path: format!("/{}", "p".repeat(1_000)),
            host: "h".repeat(255),
            body_contains: "b".repeat(1_000),
            ..Default::default()
        })),
        ..Default::default()
    });
    let names: Vec<String> = (0..2_000).map(id).collect();
    let services = names
        .iter()
        .map(|n| ServiceConfig {
            name: n.clone(),
            policy: policy.clone(),
            backends: Vec::new(),
        })
        .collect();
    let server = start(services).await;
    let r = registry(&server)
        .await
        .list_services(proto::ListServicesRequest {})
        .await
        .expect("listed")
        .into_inner();
    let listed: Vec<&str> = r.services.iter().map(|s| s.service.as_str()).collect();
    assert_prefix(&listed, r.truncated, r.total, &names, r.encoded_len());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn get_health_is_truncated_with_a_count() {
    // 30,000 checked backends of 128-byte ids (≥ 140 bytes each in the answer: ≥ 4.2 MB). The
    // first probe fails (nothing listens on port 1) but thresholds of 10 keep every backend
    // `unknown`: no transitions, no writes.
    let mut policy = dlb::model::default_policy();
    policy.health_check = Some(proto::HealthCheck {
        kind: Some(proto::health_check::Kind::Tcp(
            proto::TcpHealthCheck::default(),
        )),
        interval_ms: 3_600_000,
        healthy_threshold: 10,
        unhealthy_threshold: 10,
        ..Default::default()
    });
    const N: usize = 30_000;
    let server = start(vec![ServiceConfig {
        name: "checked".into(),
        policy,
        backends: backends(N, |_| {}),
    }])
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.health().inspect_service("checked").await.len() < N {
        assert!(tokio::time::Instant::now() < deadline, "targets not set up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = registry(&server)
        .await
        .get_health(proto::GetHealthRequest {
            service: "checked".into(),
        })
        .await
        .expect("listed")
        .into_inner();
    let expected: Vec<String> = (0..N).map(id).collect();
    let listed: Vec<&str> = r.backends.iter().map(|b| b.server_id.as_str()).collect();
    assert_prefix(&listed, r.truncated, r.total, &expected, r.encoded_len());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn list_leases_is_truncated_with_a_count() {
    // 32,000 lease-owned records of 128-byte ids (≈ 146 bytes each in the answer: ≈ 4.7 MB):
    // at start every one gets a lease of its TTL.
    const N: usize = 32_000;
    let server = start(vec![ServiceConfig {
        name: "leased".into(),
        policy: dlb::model::default_policy(),
        backends: backends(N, |s| {
            s.source = proto::BackendSource::Lease as i32;
            s.lease_ttl_seconds = 3_600;
        }),
    }])
    .await;
    let r = membership(&server)
        .await
        .list_leases(proto::ListLeasesRequest {
            service: "leased".into(),
        })
        .await
        .expect("listed")
        .into_inner();
    let expected: Vec<String> = (0..N).map(id).collect();
    let listed: Vec<&str> = r.leases.iter().map(|l| l.server_id.as_str()).collect();
    assert_prefix(&listed, r.truncated, r.total, &expected, r.encoded_len());
    assert!(r.leases.iter().all(|l| l.ttl_seconds == 3_600));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn list_servers_truncates_its_circuit_reports_with_a_count() {
    // 34,000 backends of 128-byte ids, every circuit reported open by one session: ≈ 140 bytes
    // each, ≈ 4.8 MB of reports beside ≈ 7 MB of backends (which are always listed).
    const N: usize = 34_000;
    let server = start(vec![ServiceConfig {
        name: "big".into(),
        policy: dlb::model::default_policy(),
        backends: backends(N, |_| {}),
    }])
    .await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(common::subscribe(&[("big", None)])).await.unwrap();
    let mut session = DiscoveryClient::new(common::channel(&server).await)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
        .session(ReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner();
    let report = proto::LoadReport {
        service: "big".into(),
        backends: (0..N)
            .map(|i| proto::BackendLoad {
                server_id: id(i),
                circuit: proto::CircuitState::Open as i32,
                ..Default::default()
            })
            .collect(),
        interval_ms: 1_000,
    };
    tx.send(proto::ClientMessage {
        kind: Some(client_message::Kind::LoadReport(report)),
    })
    .await
    .unwrap();
    // Keep reading the session (its snapshot is large) while polling the listing.
    let reader = tokio::spawn(async move { while let Ok(Some(_)) = session.message().await {} });
    let mut client = registry(&server).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let r = loop {
        let r = client
            .list_servers(proto::ListServersRequest {
                service: "big".into(),
            })
            .await
            .expect("listed")
            .into_inner();
        if r.circuits_total as usize == N {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "report not applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(r.servers.len(), N, "every backend is listed");
    let expected: Vec<String> = (0..N).map(id).collect();
    let listed: Vec<&str> = r.circuits.iter().map(|c| c.server_id.as_str()).collect();
    let circuits_bytes: usize = r.circuits.iter().map(|c| c.encoded_len() + 8).sum();
    assert_prefix(
        &listed,
        r.circuits.len() < N,
        r.circuits_total,
        &expected,
        circuits_bytes,
    );
    assert!(r.encoded_len() <= MAX_MESSAGE_BYTES);
    drop(tx);
    reader.abort();
    server.shutdown().await.unwrap();
}
