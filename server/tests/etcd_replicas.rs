//! Several `dlbd` replicas on one real etcd (feature `etcd`): readiness follows the replica's
//! cache being in step with etcd. Each test starts its own etcd (`etcd_support`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod etcd_support;

use std::time::Duration;

use dlb::proto::discovery_client::DiscoveryClient;
use dlb::proto::server_message;
use dlb_server::{RunningServer, ServerConfig, StoreConfig};
use etcd_support::Etcd;
use tokio_stream::wrappers::ReceiverStream;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Longest any state change below may take.
const WAIT: Duration = Duration::from_secs(20);

fn config(etcd: &Etcd, prefix: &str) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        store: StoreConfig::Etcd(etcd.config(prefix)),
        ready_grace: Duration::from_millis(300),
        going_away_after: Duration::from_secs(1),
        ..Default::default()
    }
}

async fn status(server: &RunningServer, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(common::channel(server).await);
    let r = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

async fn wait_status(server: &RunningServer, want: ServingStatus) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let overall = status(server, "").await;
        let discovery = status(server, "dlb.v1.Discovery").await;
        if overall == want && discovery == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health is {overall:?}/{discovery:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a session on `default`; the status when the server refuses it.
async fn try_session(server: &RunningServer) -> Result<common::Session, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(common::subscribe(&[("default", None)]))
        .await
        .unwrap();
    let mut client = DiscoveryClient::new(common::channel(server).await);
    let rx = client.session(ReceiverStream::new(rx)).await?.into_inner();
    Ok(common::Session { tx, rx })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_from_etcd_stops_serving_and_comes_back() {
    let mut etcd = Etcd::start().await;
    let server = dlb_server::spawn(config(&etcd, "/ready")).await.unwrap();
    wait_status(&server, ServingStatus::Serving).await;
    assert!(server.readiness().is_ready());
    let mut open = try_session(&server).await.expect("a synced replica serves");
    let first = open.update().await;
    assert!(first.full);

    etcd.kill();
    let cut = std::time::Instant::now();
    wait_status(&server, ServingStatus::NotServing).await;
    let not_serving = cut.elapsed();
    let refused = try_session(&server)
        .await
        .err()
        .expect("an unsynced replica refuses sessions");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused.message().contains("not synced"),
        "{}",
        refused.message()
    );
    // Past the going-away bound the open session is sent away.
    match tokio::time::timeout(WAIT, open.next()).await.unwrap() {
        server_message::Kind::GoingAway(g) => assert!(g.reason.contains("not synced"), "{g:?}"),
        other => panic!("expected GoingAway, got {other:?}"),
    }
    let away = cut.elapsed();

    etcd.restart().await;
    let back = std::time::Instant::now();
    wait_status(&server, ServingStatus::Serving).await;
    let serving = back.elapsed();
    let mut again = try_session(&server).await.expect("serving again");
    assert!(again.update().await.full);
    // And it follows etcd again: a write shows up in the session.
    let mut registry = common::registry(&server).await;
    registry
        .add_server(common::add("default", "b1", "10.0.0.1:80", 1))
        .await
        .unwrap();
    let u = again.update().await;
    assert!(u.upserts.iter().any(|s| s.server_id == "b1"), "{u:?}");
    eprintln!(
        "etcd killed -> NOT_SERVING in {not_serving:?}, GoingAway after {away:?}; \
         etcd back -> SERVING in {serving:?}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_shows_in_metrics() {
    let etcd = Etcd::start().await;
    let server = dlb_server::spawn(ServerConfig {
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..config(&etcd, "/metrics")
    })
    .await
    .unwrap();
    let v = server
        .store()
        .apply(
            "s".into(),
            vec![dlb_server::store::Mutation::SetPolicy(
                dlb::model::default_policy(),
            )],
            None,
        )
        .await
        .unwrap()
        .version
        .version;
    assert!(server.cache().wait_for_revision(v, WAIT).await);
    let addr = server.metrics_addr().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = common_http_get(addr).await;
        if body.contains("dlb_ready 1") && body.contains(&format!("dlb_cache_revision {v}")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await.unwrap();
}

/// GET /metrics over a plain TCP connection.
async fn common_http_get(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
