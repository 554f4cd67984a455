//! Several `dlbd` replicas on one real etcd (feature `etcd`): readiness follows the replica's
//! cache being in step with etcd. Each test starts its own etcd (`etcd_support`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod etcd_support;

use std::time::Duration;

use dlb::proto::discovery_client::DiscoveryClient;
use dlb::proto::{self, server_message};
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

/// A TCP backend that counts the connections (probes) it accepts.
struct Backend {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(conn);
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn checked_policy() -> proto::Policy {
    proto::Policy {
        health_check: Some(proto::HealthCheck {
            kind: Some(proto::health_check::Kind::Tcp(
                proto::TcpHealthCheck::default(),
            )),
            interval_ms: 100,
            timeout_ms: 100,
            healthy_threshold: 1,
            unhealthy_threshold: 1,
            ..Default::default()
        }),
        ..dlb::model::default_policy()
    }
}

/// Every replica's view of service `s`: backend id -> (prober, probed here, probes here).
async fn views(
    replicas: &[&RunningServer],
) -> Vec<std::collections::BTreeMap<String, (String, bool, u64)>> {
    let mut out = Vec::new();
    for r in replicas {
        let v = r.health().inspect_service("s").await;
        out.push(
            v.into_iter()
                .map(|(id, t)| (id, (t.prober, t.probed, t.probes)))
                .collect(),
        );
    }
    out
}

/// Waits until every replica checks `n` backends and agrees that each is probed by exactly
/// one member of `members`, which probed it more than `after[id]` times; returns the probes
/// per backend by its prober.
async fn wait_split(
    replicas: &[&RunningServer],
    members: &[&str],
    n: usize,
    after: &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, (String, u64)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let vs = views(replicas).await;
        let mut ok = vs.iter().all(|v| v.len() == n);
        let mut split = std::collections::BTreeMap::new();
        if ok {
            for id in vs[0].keys() {
                let probers: Vec<&String> = vs.iter().map(|v| &v[id].0).collect();
                let here: Vec<usize> = (0..vs.len()).filter(|&i| vs[i][id].1).collect();
                let agreed = probers.iter().all(|p| *p == probers[0]);
                let one = here.len() == 1 && replicas[here[0]].replica_id() == probers[0];
                let live = members.contains(&probers[0].as_str());
                let probing = one
                    && vs[here[0]][id].2 > after.get(id).copied().unwrap_or(0)
                    && (0..vs.len())
                        .filter(|&i| i != here[0])
                        .all(|i| !vs[i][id].1);
                ok &= agreed && one && live && probing;
                if one {
                    split.insert(id.clone(), (probers[0].clone(), vs[here[0]][id].2));
                }
            }
        }
        if ok {
            return split;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health checks not split as expected among {members:?}: {vs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn replica(etcd: &Etcd, id: &str) -> RunningServer {
    dlb_server::spawn(ServerConfig {
        replica_id: Some(id.into()),
        replica_ttl: Duration::from_secs(2),
        ..config(etcd, "/split")
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_are_split_among_live_replicas_and_taken_over() {
    let etcd = Etcd::start().await;
    let r0 = replica(&etcd, "r0").await;
    let r1 = replica(&etcd, "r1").await;
    let r2 = replica(&etcd, "r2").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while [&r0, &r1, &r2].iter().any(|r| r.members().ids().len() != 3) {
        assert!(tokio::time::Instant::now() < deadline, "members never met");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    const N: usize = 12;
    let mut backends = Vec::new();
    let mut writes = vec![dlb_server::store::Mutation::SetPolicy(checked_policy())];
    for i in 0..N {
        let b = Backend::start().await;
        writes.push(dlb_server::store::Mutation::Add(proto::Server {
            server_id: format!("b{i:02}"),
            address: b.addr.to_string(),
            weight: 1,
            ..Default::default()
        }));
        backends.push(b);
    }
    r0.store().apply("s".into(), writes, None).await.unwrap();

    let all = [&r0, &r1, &r2];
    let none = std::collections::BTreeMap::new();
    let split = wait_split(&all, &["r0", "r1", "r2"], N, &none).await;
    let mut per_replica = std::collections::BTreeMap::<&str, usize>::new();
    for (prober, _) in split.values() {
        *per_replica.entry(prober.as_str()).or_default() += 1;
    }
    eprintln!("3 replicas, {N} backends: probed per replica {per_replica:?}");
    // Each backend got probes (real TCP connections), and only from its one prober: the
    // connections it accepted are at most the probes its prober counted (+1 in flight).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let vs = views(&all).await;
    for (i, b) in backends.iter().enumerate() {
        let id = format!("b{i:02}");
        let total: u64 = vs.iter().map(|v| v[&id].2).sum();
        let accepted = b.accepted.load(std::sync::atomic::Ordering::Relaxed);
        assert!(accepted > 0, "{id} was never probed");
        assert!(
            accepted <= total + 1,
            "{id}: {accepted} connections for {total} probes"
        );
    }

    // A replica that leaves (graceful shutdown revokes its lease): its backends are taken over.
    let moved: std::collections::BTreeMap<String, u64> = split
        .iter()
        .filter(|(_, (p, _))| p == "r1")
        .map(|(id, _)| (id.clone(), 0))
        .collect();
    let left = std::time::Instant::now();
    r1.shutdown().await.unwrap();
    let survivors = [&r0, &r2];
    let after = wait_split(&survivors, &["r0", "r2"], N, &moved).await;
    let takeover_leave = left.elapsed();

    // A replica that dies without leaving: a member whose lease is no longer renewed. Its
    // backends go unprobed until etcd expires its key (the TTL), then the survivors take over.
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let lease = client.lease_grant(2, None).await.unwrap().id();
    client
        .put(
            "/split/replicas/ghost",
            "ghost",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let died = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + WAIT;
    while survivors.iter().any(|r| !r.members().contains("ghost")) {
        assert!(tokio::time::Instant::now() < deadline, "ghost never joined");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The checkers learn the member set a moment after `members()` shows it: poll their views.
    let ghosts: std::collections::BTreeMap<String, u64> = loop {
        let vs = views(&survivors).await;
        let ghosts: std::collections::BTreeMap<String, u64> = vs[0]
            .iter()
            .filter(|(_, (p, _, _))| p == "ghost")
            .map(|(id, _)| {
                let probes = vs.iter().map(|v| v[id].2).max().unwrap_or(0);
                (id.clone(), probes)
            })
            .collect();
        if !ghosts.is_empty() {
            break ghosts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ghost owns none of {N} backends"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let _ = wait_split(&survivors, &["r0", "r2"], N, &ghosts).await;
    let takeover_crash = died.elapsed();
    eprintln!(
        "takeover: {} backends of a leaving replica in {takeover_leave:?}; {} backends of a \
         dead one (lease TTL 2 s, probe interval 100 ms) in {takeover_crash:?} after its last renewal",
        moved.len(),
        ghosts.len()
    );
    assert!(after.values().all(|(p, _)| p != "r1"));
    r0.shutdown().await.unwrap();
    r2.shutdown().await.unwrap();
}

/// `dlb_replica_members` and `dlb_replica_leader` on each replica: both see two members and
/// exactly one leads; when the leader leaves, the other sees one member and leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_metrics_show_the_members_and_one_leader() {
    let etcd = Etcd::start().await;
    let mut servers = Vec::new();
    for id in ["m0", "m1"] {
        servers.push(
            dlb_server::spawn(ServerConfig {
                replica_id: Some(id.into()),
                replica_ttl: Duration::from_secs(2),
                metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
                ..config(&etcd, "/replica-metrics")
            })
            .await
            .unwrap(),
        );
    }
    // (members, leader) as each replica's /metrics says.
    async fn gauges(server: &RunningServer) -> (String, String) {
        let body = common_http_get(server.metrics_addr().unwrap()).await;
        let value = |name: &str| {
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_owned))
                .unwrap_or_default()
        };
        (value("dlb_replica_members"), value("dlb_replica_leader"))
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let leader = loop {
        let a = gauges(&servers[0]).await;
        let b = gauges(&servers[1]).await;
        let leaders: Vec<usize> = [&a, &b]
            .iter()
            .enumerate()
            .filter(|(_, g)| g.1 == "1")
            .map(|(i, _)| i)
            .collect();
        if a.0 == "2" && b.0 == "2" && leaders.len() == 1 && (a.1 == "0" || b.1 == "0") {
            break leaders[0];
        }
        assert!(tokio::time::Instant::now() < deadline, "{a:?} {b:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let gone = servers.remove(leader);
    gone.shutdown().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let g = gauges(&servers[0]).await;
        if g == ("1".to_owned(), "1".to_owned()) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{g:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    servers.remove(0).shutdown().await.unwrap();
}
