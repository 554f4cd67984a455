//! The control-plane core seams over real gRPC: compare-and-set writes from two clients, a
//! burst of writes coalesced into a few picker builds without any write waiting for one, and
//! the source precedence as `ListServers` shows it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use dlb::proto;
use tokio::time::Instant;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compare_and_set_exactly_one_wins() {
    let server = start().await;
    for round in 0..20 {
        let mut c1 = registry(&server).await;
        let mut c2 = registry(&server).await;
        let v = c1
            .get_policy(proto::GetPolicyRequest::default())
            .await
            .unwrap()
            .into_inner()
            .version
            .unwrap()
            .version;
        let set = |algorithm: proto::Algorithm| proto::SetPolicyRequest {
            policy: Some(proto::Policy {
                algorithm: algorithm as i32,
                ..Default::default()
            }),
            expected_version: Some(v),
            ..Default::default()
        };
        // Two admins decided on the same version; both write at once.
        let (a, b) = if round % 2 == 0 {
            (proto::Algorithm::Maglev, proto::Algorithm::RingHash)
        } else {
            (proto::Algorithm::LeastConnP2c, proto::Algorithm::RoundRobin)
        };
        let (r1, r2) = tokio::join!(c1.set_policy(set(a)), c2.set_policy(set(b)));
        let (winner, loser) = match (r1, r2) {
            (Ok(w), Err(l)) => (w.into_inner(), l),
            (Err(l), Ok(w)) => (w.into_inner(), l),
            (r1, r2) => panic!("round {round}: expected exactly one winner: {r1:?} {r2:?}"),
        };
        assert_eq!(loser.code(), Code::FailedPrecondition, "{loser:?}");
        let now = winner.version.unwrap().version;
        assert!(
            loser.message().contains(&format!("version {now}")),
            "the loser is told the current version: {}",
            loser.message()
        );
        let stored = c1
            .get_policy(proto::GetPolicyRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stored.policy, winner.policy, "state is not the winner's");
        assert_eq!(stored.version.unwrap().version, now);
    }
    server.shutdown().await.unwrap();
}

/// The newest picker's version for `big` (waiting for the builder as `GetNextServer` does).
async fn pick_version(
    c: &mut dlb::proto::registry_client::RegistryClient<tonic::transport::Channel>,
) -> u64 {
    c.get_next_server(proto::GetNextServerRequest {
        service: "big".into(),
        key: b"k".to_vec(),
    })
    .await
    .ok()
    .and_then(|r| r.into_inner().version)
    .map_or(0, |v| v.version)
}

/// Polls until the picker of `big` is built from `version` (generous: this VM stalls).
async fn until_picked(
    c: &mut dlb::proto::registry_client::RegistryClient<tonic::transport::Channel>,
    version: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = pick_version(c).await;
        if v == version {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the picker never reached version {version} (at {v})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes never wait for a picker build, and a burst of writes during a build costs one more
/// build, not one per write. Deterministic whatever the machine's speed: the runtime has one
/// blocking thread (builds run there) and the test holds it while it writes, so no build can
/// run during the burst; the builder must then catch up to the last write in a few builds.
#[test]
fn a_burst_of_writes_costs_a_few_builds() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = start().await;
        let mut c = registry(&server).await;
        c.set_policy(proto::SetPolicyRequest {
            service: "big".into(),
            policy: Some(proto::Policy {
                algorithm: proto::Algorithm::Maglev as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        let backends: Vec<proto::Server> = (0..2_000)
            .map(|i| proto::Server {
                server_id: format!("b{i}"),
                address: format!("10.0.{}.{}:80", i / 250, i % 250),
                weight: 1,
                ..Default::default()
            })
            .collect();
        // One declarative batch through the store creates the 2,000 backends at once.
        let applied = server
            .store()
            .apply(
                "big".into(),
                backends
                    .into_iter()
                    .map(dlb_server::store::Mutation::Add)
                    .collect(),
                None,
            )
            .await
            .unwrap();
        let version = applied.version.version;
        until_picked(&mut c, version).await;
        // Hold the only blocking thread: from here no picker can be built.
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (held, holding) = tokio::sync::oneshot::channel::<()>();
        let hold = tokio::task::spawn_blocking(move || {
            let _ = held.send(());
            let _ = gate.recv();
        });
        holding.await.unwrap();
        // (Read once the thread is held: a build still running before counts, not after.)
        let before = server.picker_builds();
        // 300 writes back to back: each returns once committed and cached, never after a
        // build (none can run).
        let n: u32 = 300;
        let writes = async {
            let mut last = 0;
            for i in 0..n {
                let r = c
                    .update_server(proto::UpdateServerRequest {
                        service: "big".into(),
                        server_id: format!("b{}", i % 2_000),
                        weight: Some(2 + (i % 7)),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                last = r.version.unwrap().version;
            }
            last
        };
        let last = tokio::time::timeout(Duration::from_secs(120), writes)
            .await
            .expect("writes waited for a picker build");
        assert_eq!(server.picker_builds(), before, "a build ran with no thread");
        release.send(()).unwrap();
        hold.await.unwrap();
        // The builder catches up with the last version...
        until_picked(&mut c, last).await;
        // ... in a few builds: the one queued since the first write (its snapshot may be
        // older), then the newest. One per write would be 300.
        let builds = server.picker_builds() - before;
        assert!(
            builds <= 3,
            "{builds} builds for {n} writes: bursts are not coalesced"
        );
        server.shutdown().await.unwrap();
    });
}

#[tokio::test]
async fn list_servers_shows_sources_and_reason() {
    let server = start().await;
    let mut c = registry(&server).await;
    c.add_server(add("", "a", "10.0.0.1:80", 1)).await.unwrap();
    c.add_server(add("", "b", "10.0.0.2:80", 1)).await.unwrap();
    c.health_check_failed(hc("", "a")).await.unwrap();
    c.update_server(proto::UpdateServerRequest {
        server_id: "b".into(),
        draining: Some(true),
        ..Default::default()
    })
    .await
    .unwrap();
    let list = c
        .list_servers(proto::ListServersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let a = &list.servers[0];
    assert_eq!(a.health, proto::HealthStatus::Unhealthy as i32);
    assert_eq!(a.reason, "admin: health_check_failed");
    assert_eq!(
        a.sources.as_ref().unwrap().admin,
        proto::Verdict::Unhealthy as i32
    );
    let b = &list.servers[1];
    assert_eq!(b.health, proto::HealthStatus::Healthy as i32);
    assert_eq!(b.reason, "draining");
    // health_check_passed clears the admin verdict; the backend is eligible again.
    let r = c
        .health_check_passed(hc("", "a"))
        .await
        .unwrap()
        .into_inner();
    let a = r.server.unwrap();
    assert_eq!(a.health, proto::HealthStatus::Healthy as i32);
    assert_eq!(a.reason, "");
    server.shutdown().await.unwrap();
}

fn meta_server(i: usize, entries: usize) -> proto::Server {
    proto::Server {
        server_id: format!("b{i:05}"),
        address: format!("10.{}.{}.{}:80", i / 65_536, (i / 256) % 256, i % 256),
        weight: 1,
        metadata: (0..entries)
            .map(|k| (format!("key-{k:03}-{}", "k".repeat(248)), "v".repeat(256)))
            .collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_service_reaches_sessions_and_one_too_large_is_refused() {
    use dlb::proto::{discovery_client::DiscoveryClient, server_message};
    use dlb_server::store::Mutation;

    let server = start().await;
    // 10,000 backends with 512 bytes of metadata each: ~6 MB, over tonic's default 4 MiB.
    let big: Vec<Mutation> = (0..10_000)
        .map(|i| {
            let mut s = meta_server(i, 0);
            s.metadata.insert("zone".into(), "z".repeat(252));
            s.metadata.insert("rack".into(), "r".repeat(252));
            Mutation::Add(s)
        })
        .collect();
    let v = server.store().apply("big".into(), big, None).await.unwrap();
    assert!(
        server
            .cache()
            .wait_for_revision(v.version.version, WAIT)
            .await
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(subscribe(&[("big", None)])).await.unwrap();
    let mut d = DiscoveryClient::new(channel(&server).await)
        .max_decoding_message_size(dlb::model::MAX_MESSAGE_BYTES);
    let mut stream = d
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let m = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match m.kind {
        Some(server_message::Kind::Update(u)) => {
            assert!(u.full);
            assert_eq!(u.upserts.len(), 10_000);
        }
        other => panic!("{other:?}"),
    }
    drop(tx);

    // A service that would pass the limit is refused at write time, naming the limit, and the
    // write changes nothing. Each record here is ~32 KiB (64 entries of 256 + 256 bytes).
    let mut c = registry(&server).await;
    let mut accepted = 0;
    let refused = loop {
        let s = meta_server(accepted, 64);
        let r = c
            .add_server(proto::AddServerRequest {
                service: "fat".into(),
                server_id: s.server_id,
                address: s.address,
                weight: 1,
                metadata: s.metadata,
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 2_000, "never refused");
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains(&dlb::model::MAX_SNAPSHOT_BYTES.to_string()),
        "{}",
        refused.message()
    );
    assert!(refused.message().len() <= 512);
    // dlbctl's limit is dlbd's: the listing of the largest service fits in one message.
    let mut c = c.max_decoding_message_size(dlb::model::MAX_MESSAGE_BYTES);
    let list = c
        .list_servers(proto::ListServersRequest {
            service: "fat".into(),
        })
        .await;
    let n = match list {
        Ok(l) => l.into_inner().servers.len(),
        Err(e) => panic!("{e:?}"),
    };
    assert_eq!(n, accepted);
    server.shutdown().await.unwrap();
}
