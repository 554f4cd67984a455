//! Every task of a running `dlbd` is owned: a full server (active health checks on a real HTTP
//! backend, a DNS-followed service, a lease, the replica machinery, a DLB session, an xDS
//! stream, the metrics port) runs on a runtime of its own, and once `shutdown()` has returned
//! and the clients are gone, no task is left alive on that runtime.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
#[cfg(feature = "etcd")]
mod etcd_support;
mod fake_dns;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use dlb::proto::{self, membership_client::MembershipClient};
use dlb_server::membership::dns::{DnsConfig, DnsDeclaration};
use dlb_server::{RunningServer, ServerConfig, StoreConfig};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use fake_dns::FakeDns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio_stream::wrappers::ReceiverStream;

/// How long the server's runtime may take to have no task alive after the shutdown (generous:
/// this VM stalls for seconds).
const SETTLE: Duration = Duration::from_secs(10);

/// A tiny HTTP/1.1 backend answering `200 ok` to every request, counting them. One task, which
/// handles one connection at a time.
struct HttpBackend {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpBackend {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    true
                })
                .await;
                if read != Ok(true) {
                    continue;
                }
                counted.fetch_add(1, Ordering::Relaxed);
                let _ = conn
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            }
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// A policy with an HTTP health check every second.
fn checked_policy() -> proto::SetPolicyRequest {
    proto::SetPolicyRequest {
        service: "checked".into(),
        policy: Some(proto::Policy {
            algorithm: proto::Algorithm::RoundRobin as i32,
            health_check: Some(proto::HealthCheck {
                kind: Some(proto::health_check::Kind::Http(proto::HttpHealthCheck {
                    path: "/health".into(),
                    ..Default::default()
                })),
                interval_ms: 1000,
                timeout_ms: 200,
                fast_interval_ms: 250,
                down_interval_ms: 1000,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Polls `cond` every 20 ms for at most [`WAIT`].
async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Drives the running server from the test's runtime: every kind of task gets started.
async fn exercise(server: &RunningServer, backend: &HttpBackend) -> Vec<Box<dyn Send>> {
    let mut registry = registry(server).await;
    registry.set_policy(checked_policy()).await.unwrap();
    registry
        .add_server(add("checked", "b1", &backend.addr.to_string(), 1))
        .await
        .unwrap();
    // Active health checks: the backend is probed.
    until("a health probe", async || backend.requests() > 0).await;

    // A lease.
    let mut membership = MembershipClient::new(channel(server).await);
    membership
        .register(proto::RegisterRequest {
            service: "leased".into(),
            server_id: "l1".into(),
            address: "10.0.0.1:80".into(),
            ttl_seconds: 30,
            ..Default::default()
        })
        .await
        .unwrap();

    // The DNS-followed service.
    until("the DNS name's backends", async || {
        server
            .store()
            .get_service("dnsweb".into())
            .await
            .unwrap()
            .is_some_and(|s| !s.servers.is_empty())
    })
    .await;

    // A DLB session, acknowledged.
    let mut session = Session::open(server, subscribe(&[("checked", None)])).await;
    let update = session.update().await;
    session
        .send(proto::client_message::Kind::Ack(proto::Ack {
            service: "checked".into(),
            version: update.version,
            nonce: update.nonce.clone(),
        }))
        .await;

    // An xDS stream.
    let mut ads = AggregatedDiscoveryServiceClient::new(channel(server).await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "tasks-test".into(),
            ..Default::default()
        }),
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        resource_names: vec!["checked".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = ads
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an xDS answer in time")
        .expect("an xDS answer");
    vec![
        Box::new(registry),
        Box::new(membership),
        Box::new(session),
        Box::new(ads),
        Box::new(tx),
        Box::new(stream),
    ]
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn no_task_of_a_stopped_server_stays_alive() {
    starts_and_stops(|| async { (StoreConfig::Memory, Box::new(()) as Box<dyn Send>) });
}

/// The same on etcd: the replica set's tasks (membership, progress checks, the forwarded sums'
/// receiver) and the leases' expiry run too. The etcd clients' own connection tasks end with
/// the clients.
#[cfg(feature = "etcd")]
#[test]
fn no_task_of_a_stopped_etcd_replica_stays_alive() {
    starts_and_stops(|| async {
        let etcd = etcd_support::Etcd::start().await;
        let store = StoreConfig::Etcd(etcd.config("/tasks"));
        (store, Box::new(etcd) as Box<dyn Send>)
    });
}

/// Starts a full server on `store` (made on the test's runtime, with whatever must live as long
/// as the test), exercises it, stops it and waits for its runtime to have no task alive.
fn starts_and_stops<F, Fut>(store: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = (StoreConfig, Box<dyn Send>)>,
{
    // The server's own runtime: only its tasks run there. The test's clients, backend, name
    // server (and etcd) run on another one.
    let server_rt = runtime();
    let test_rt = runtime();
    let server_handle = server_rt.handle().clone();
    test_rt.block_on(async move {
        let (store, keep) = store().await;
        let backend = HttpBackend::start().await;
        let dns = FakeDns::start().await;
        dns.set("web.test", &["127.0.0.1"]);
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            dns: DnsConfig {
                nameservers: vec![dns.addr],
                services: vec![DnsDeclaration {
                    service: "dnsweb".into(),
                    target: "web.test:8080".into(),
                    weight: 1,
                    locality: None,
                    priority: 0,
                }],
                min_refresh: Duration::from_millis(200),
                max_refresh: Duration::from_secs(1),
                retry_min: Duration::from_millis(200),
                retry_max: Duration::from_millis(400),
                timeout: Duration::from_millis(300),
                attempts: 1,
                ..DnsConfig::default()
            },
            store,
            ..Default::default()
        };
        let server = server_handle
            .spawn(async move { start_with(config).await })
            .await
            .unwrap();
        let clients = exercise(&server, &backend).await;
        let alive = server_handle.metrics().num_alive_tasks();
        assert!(alive > 5, "a running server has its tasks: {alive}");

        server_handle
            .spawn(server.shutdown())
            .await
            .unwrap()
            .expect("a clean shutdown");
        drop(clients);
        backend.task.abort();
        drop(dns);

        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let alive = server_handle.metrics().num_alive_tasks();
            if alive == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{alive} task(s) of the server still alive {SETTLE:?} after its shutdown"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(keep);
    });
    drop(test_rt);
    drop(server_rt);
}
