//! Leases through `dlb.v1.Membership` on a real server: registration, renewal without writes,
//! expiry as one pushed removal with the reason `lease expired`, the ownership rule, bad input; and a real `dlbd` killed with
//! `kill -9` and restarted on the embedded store keeps a lease-owned backend and gives it a
//! fresh deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dlb::proto::{self, membership_client::MembershipClient};
use dlb_server::RunningServer;
use tonic::transport::Channel;

/// Upper bound of every wait (generous: this VM stalls for seconds).
const DEADLINE: Duration = Duration::from_secs(30);

async fn membership(server: &RunningServer) -> MembershipClient<Channel> {
    MembershipClient::new(channel(server).await)
}

fn reg(service: &str, id: &str, address: &str, ttl: u32) -> proto::RegisterRequest {
    proto::RegisterRequest {
        service: service.into(),
        server_id: id.into(),
        address: address.into(),
        ttl_seconds: ttl,
        ..Default::default()
    }
}

async fn has(server: &RunningServer, service: &str, id: &str) -> bool {
    server
        .store()
        .get_service(service.into())
        .await
        .unwrap()
        .is_some_and(|s| s.servers.contains_key(id))
}

#[tokio::test]
async fn register_renew_update_and_expire() {
    let server = start().await;
    let mut m = membership(&server).await;
    let mut session = Session::open(&server, subscribe(&[("web", None)])).await;
    assert!(matches!(
        session.next().await,
        proto::server_message::Kind::NotFound(_)
    ));

    let r = m
        .register(reg("web", "w1", "10.0.0.1:80", 3))
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    let s = r.server.unwrap();
    assert_eq!(s.source, proto::BackendSource::Lease as i32);
    assert_eq!(s.lease_ttl_seconds, 3);
    let created = session.update().await;
    assert!(created.upserts.iter().any(|s| s.server_id == "w1"));

    // A renewal that changes nothing writes nothing.
    let again = m
        .register(reg("web", "w1", "10.0.0.1:80", 3))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.version, r.version);

    // A re-register with another address updates the record in place: one write, a delta.
    let moved = m
        .register(reg("web", "w1", "10.0.0.2:80", 3))
        .await
        .unwrap()
        .into_inner();
    assert!(!moved.created);
    assert_ne!(moved.version, r.version);
    let u = session.update().await;
    assert!(!u.full);
    assert_eq!(u.upserts.len(), 1);
    assert_eq!(u.upserts[0].address, "10.0.0.2:80");

    let leases = m
        .list_leases(proto::ListLeasesRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].ttl_seconds, 3);
    assert!(leases[0].remaining_ms <= 3000);

    // Renewals keep it past several TTLs (renewing every 500 ms of a 3 s lease).
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        m.register(reg("web", "w1", "10.0.0.2:80", 3))
            .await
            .unwrap();
        assert!(has(&server, "web", "w1").await, "expired while renewed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Configured by an operator, the service outlives its last lease (one created by a lease
    // and never configured goes with it: tests/remove_service.rs).
    let mut policy = dlb::model::default_policy();
    policy.algorithm = proto::Algorithm::Maglev as i32;
    registry(&server)
        .await
        .set_policy(proto::SetPolicyRequest {
            service: "web".into(),
            policy: Some(policy),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(session.update().await.policy.is_some());
    // Renewals stop: the removal is pushed as one delta.
    let gone = tokio::time::timeout(DEADLINE, session.update())
        .await
        .expect("no removal pushed");
    assert_eq!(gone.removals, vec!["w1".to_string()]);
    assert_eq!(
        gone.removal_reasons.get("w1").map(String::as_str),
        Some("lease expired"),
        "{gone:?}"
    );
    assert!(gone.upserts.is_empty());
    assert!(!has(&server, "web", "w1").await);
    let leases = m
        .list_leases(proto::ListLeasesRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert!(leases.is_empty(), "{leases:?}");
}

#[tokio::test]
async fn deregister_removes_at_once() {
    let server = start().await;
    let mut m = membership(&server).await;
    m.register(reg("", "w1", "10.0.0.1:80", 3600))
        .await
        .unwrap();
    assert!(has(&server, "default", "w1").await);
    let r = m
        .deregister(proto::DeregisterRequest {
            service: String::new(),
            server_id: "w1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.service, "default");
    assert!(!has(&server, "default", "w1").await);
    let err = m
        .deregister(proto::DeregisterRequest {
            service: String::new(),
            server_id: "w1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn bad_input_and_the_ownership_rule() {
    let server = start().await;
    let mut m = membership(&server).await;
    let mut r = registry(&server).await;

    for ttl in [0, 3601, u32::MAX] {
        let err = m
            .register(reg("web", "w1", "10.0.0.1:80", ttl))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "ttl {ttl}");
        assert!(err.message().contains("ttl_seconds"), "{}", err.message());
    }
    for (id, address) in [("bad id!", "10.0.0.1:80"), ("w1", "no-port")] {
        let err = m.register(reg("web", id, address, 5)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{id} {address}");
    }
    assert!(server
        .store()
        .get_service("web".into())
        .await
        .unwrap()
        .is_none());

    // An id owned by add_server cannot be taken by a lease…
    r.add_server(add("web", "api1", "10.0.0.9:80", 1))
        .await
        .unwrap();
    let before = server.store().get_service("web".into()).await.unwrap();
    let err = m
        .register(reg("web", "api1", "10.0.0.1:80", 5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("add_server"), "{}", err.message());
    assert_eq!(
        server.store().get_service("web".into()).await.unwrap(),
        before
    );
    // … is never deregistered by one …
    let err = m
        .deregister(proto::DeregisterRequest {
            service: "web".into(),
            server_id: "api1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // … and add_server cannot take a lease-owned id.
    m.register(reg("web", "l1", "10.0.0.1:80", 5))
        .await
        .unwrap();
    let err = r
        .add_server(add("web", "l1", "10.0.0.2:80", 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    // A backend added by add_server has no lease and never expires.
    let leases = m
        .list_leases(proto::ListLeasesRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .leases;
    let ids: Vec<_> = leases.iter().map(|l| l.server_id.as_str()).collect();
    assert_eq!(ids, ["l1"]);
}

/// Kills the child if the test fails before it exits.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `dlbd` on the embedded store in `dir` listening on `listen`; returns the guard, the
/// gRPC address and when the process was spawned.
fn start_dlbd(dir: &std::path::Path, listen: &str) -> (Guard, String, Instant) {
    let spawned = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_dlbd"))
        .args(["--listen", listen, "--no-metrics", "--data-dir"])
        .arg(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = Guard(Some(child));
    let stderr = guard.0.as_mut().unwrap().stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let ready = loop {
        let line = rx.recv_timeout(DEADLINE).expect("no ready line");
        if line.contains("dlbd listening") {
            break line;
        }
    };
    let grpc = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .expect("grpc= in the ready line")
        .to_owned();
    (guard, grpc, spawned)
}

async fn client(
    grpc: &str,
) -> (
    MembershipClient<Channel>,
    proto::registry_client::RegistryClient<Channel>,
) {
    let channel = tokio::time::timeout(
        DEADLINE,
        Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap()
    .unwrap();
    (
        MembershipClient::new(channel.clone()),
        proto::registry_client::RegistryClient::new(channel),
    )
}

async fn listed(r: &mut proto::registry_client::RegistryClient<Channel>) -> Vec<String> {
    match r
        .list_servers(proto::ListServersRequest {
            service: "web".into(),
        })
        .await
    {
        Ok(l) => l
            .into_inner()
            .servers
            .into_iter()
            .map(|s| s.server_id)
            .collect(),
        Err(s) if s.code() == tonic::Code::NotFound => Vec::new(),
        Err(s) => panic!("{s:?}"),
    }
}

#[tokio::test]
async fn kill_9_and_restart_keeps_a_lease_and_gives_it_a_fresh_deadline() {
    const TTL: u32 = 8;
    let dir = tempfile::tempdir().unwrap();
    let (mut guard, grpc, _) = start_dlbd(dir.path(), "127.0.0.1:0");
    let (mut m, _) = client(&grpc).await;
    m.register(reg("web", "w1", "10.0.0.1:80", TTL))
        .await
        .unwrap();
    drop(m);

    let mut child = guard.0.take().unwrap();
    let status = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap();
    // Down for a while: a deadline kept from before the crash would now be this much closer.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (_guard, grpc2, spawned) = start_dlbd(dir.path(), &grpc);
    assert_eq!(grpc2, grpc);
    let (mut m, mut r) = client(&grpc).await;
    assert_eq!(
        listed(&mut r).await,
        ["w1"],
        "the lease-owned backend is gone"
    );
    let lease = m
        .list_leases(proto::ListLeasesRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .leases
        .pop()
        .expect("the lease was restored");
    // A fresh deadline is set after the process was spawned, to then + TTL: the lease has at
    // least TTL minus the time since the spawn. A deadline kept from before the crash would
    // have at most TTL minus the 3 s downtime minus that.
    let since_spawn = u64::try_from(spawned.elapsed().as_millis()).unwrap();
    let floor = (u64::from(TTL) * 1000).saturating_sub(since_spawn);
    assert!(
        lease.remaining_ms >= floor,
        "remaining {} ms < {floor} ms: the restart did not give a fresh deadline",
        lease.remaining_ms
    );

    // Renewed on the restarted dlbd it stays; then it expires without renewals.
    m.register(reg("web", "w1", "10.0.0.1:80", TTL))
        .await
        .unwrap();
    assert_eq!(listed(&mut r).await, ["w1"]);
    let deadline = Instant::now() + Duration::from_secs(u64::from(TTL)) + DEADLINE;
    while !listed(&mut r).await.is_empty() {
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn membership_writes_need_an_admin_token_and_reads_do_not() {
    let server = start_with(dlb_server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        auth: dlb_server::api::auth::AuthConfig {
            admin_tokens: vec!["admin-token-for-leases".into()],
            read_tokens: Vec::new(),
        },
        ..Default::default()
    })
    .await;
    let mut m = membership(&server).await;
    let e = m
        .register(reg("web", "w1", "10.0.0.1:80", 5))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = m
        .declare_dns(proto::DeclareDnsRequest {
            locality: None,
            priority: 0,
            service: "web".into(),
            target: "127.0.0.1:80".into(),
            weight: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let mut req = tonic::Request::new(reg("web", "w1", "10.0.0.1:80", 5));
    req.metadata_mut().insert(
        "authorization",
        "Bearer admin-token-for-leases".parse().unwrap(),
    );
    m.register(req).await.unwrap();
    // Reads are open when no read tokens are configured.
    m.list_leases(proto::ListLeasesRequest {
        service: "web".into(),
    })
    .await
    .unwrap();
    m.list_dns(proto::ListDnsRequest::default()).await.unwrap();
}
