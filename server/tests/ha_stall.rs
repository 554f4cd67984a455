//! A replica whose etcd member stalls (feature `etcd`, real processes): two `dlbd` replicas on a
//! three-member etcd, each following its own member. The member replica A alone follows is
//! `SIGSTOP`ped; writes go on through replica B, where the clients are; then B is killed.
//!
//! * no client ever routes on an older version than one it routed on (regressions counted by
//!   sampling every client's version every millisecond: 0) — A's cache is frozen at the state
//!   before the stall, and it must neither serve it as current nor hand it to a client that
//!   holds newer;
//! * A reports `NOT_SERVING` and sends sessions away within 3 s of the stall: asserted on A's
//!   own report (`unproven_ms` in its transition log lines: time since its last successful etcd
//!   progress check, which is an upper bound of the time since the stall); the wall-clock figure
//!   seen by polling its health is printed;
//! * when the member resumes, A serves again and the clients reach the newest version.
#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod etcd_support;
mod ha_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlb_client::{AdminClient, Client, NewServer, ServiceHandle};
use etcd_support::EtcdCluster;
use ha_support::*;
use tonic_health::pb::health_check_response::ServingStatus;

const SERVICE: &str = "web";

/// `unproven_ms=N` in the first log line of `replica` containing `needle` (polled up to 20 s).
async fn reported_ms(replica: &Replica, needle: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(line) = replica.log_lines(needle).into_iter().next() {
            let ms = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("unproven_ms="))
                .unwrap_or_else(|| panic!("no unproven_ms in {line:?}"));
            return ms
                .trim_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap();
        }
        assert!(Instant::now() < deadline, "no {needle:?} line in the log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts, for every client, each time the version it routes on went down within one epoch.
fn count_regressions(handles: Vec<ServiceHandle>, stop: Arc<AtomicBool>) -> Arc<AtomicU64> {
    let regressions = Arc::new(AtomicU64::new(0));
    let r = regressions.clone();
    tokio::spawn(async move {
        let mut last: Vec<_> = handles.iter().map(ServiceHandle::version).collect();
        while !stop.load(Ordering::Relaxed) {
            for (h, last) in handles.iter().zip(last.iter_mut()) {
                let v = h.version();
                if v.epoch == last.epoch && v.version < last.version {
                    eprintln!("regression: {last} -> {v}");
                    r.fetch_add(1, Ordering::Relaxed);
                }
                *last = v;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    regressions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_etcd_member_stalls_stops_serving_and_no_client_goes_back() {
    let cluster = EtcdCluster::start().await;
    let endpoints = cluster.endpoints();
    // A follows a member that is not the etcd leader (the cluster keeps its quorum), B another.
    let leader = cluster.leader(Duration::from_secs(20)).await;
    let stalled = (leader + 1) % EtcdCluster::SIZE;
    let healthy = (leader + 2) % EtcdCluster::SIZE;
    let a = Replica::start(&endpoints[stalled], "127.0.0.1:0");
    let mut b = Replica::start(&endpoints[healthy], "127.0.0.1:0");
    seed(&b.url(), SERVICE, 4).await;

    // Clients start on B and know A as their other endpoint.
    let mut clients = Vec::new();
    for i in 0..4 {
        let client = Client::builder([b.url(), a.url()])
            .client_id(format!("stall-{i}"))
            .update_deadline(Duration::from_secs(12))
            .keepalive(Duration::from_millis(500), Duration::from_millis(500))
            .backoff(Duration::from_millis(10), Duration::from_millis(200))
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
            .expect("client connects");
        let handle = client.service(SERVICE).await.expect("subscribes");
        clients.push((client, handle));
    }
    let before = store_version(&b.url(), SERVICE).await;
    for (_, h) in &clients {
        let deadline = Instant::now() + Duration::from_secs(20);
        while h.version().version < before {
            assert!(Instant::now() < deadline, "clients did not converge");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(health(&a.url(), "").await, Some(ServingStatus::Serving));
    let stop = Arc::new(AtomicBool::new(false));
    let regressions = count_regressions(
        clients.iter().map(|(_, h)| h.clone()).collect(),
        stop.clone(),
    );

    // Stall A's member; write through B: the clients move ahead of A's frozen cache.
    let stalled_at = Instant::now();
    cluster.stall(stalled);
    let admin = AdminClient::new([b.url()]).expect("admin");
    for i in 0..10 {
        admin
            .add_server(
                SERVICE,
                NewServer::new(format!("new-{i}"), format!("127.0.0.1:{}", 20_000 + i)),
            )
            .await
            .expect("write through B");
    }
    admin
        .remove_server(SERVICE, "base-0")
        .await
        .expect("remove");
    let after = store_version(&b.url(), SERVICE).await;
    assert!(after > before);
    for (_, h) in &clients {
        let deadline = Instant::now() + Duration::from_secs(20);
        while h.version().version < after {
            assert!(Instant::now() < deadline, "clients did not follow B");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // A stops serving on its own: measured by polling (printed), asserted on its own report.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if health(&a.url(), "").await == Some(ServingStatus::NotServing) {
            break;
        }
        assert!(Instant::now() < deadline, "A never went NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = stalled_at.elapsed();
    let not_serving_ms = reported_ms(&a, "NOT_SERVING").await;
    let away_ms = reported_ms(&a, "sending sessions away").await;
    println!(
        "etcd member stalled: A NOT_SERVING seen by polling after {seen:?}; A reports \
         NOT_SERVING {not_serving_ms} ms and sessions sent away {away_ms} ms after its last \
         successful etcd check"
    );
    assert!(
        not_serving_ms <= 3000,
        "NOT_SERVING {not_serving_ms} ms after the last proof of contact"
    );
    assert!(
        away_ms <= 3000,
        "sessions sent away {away_ms} ms after the last proof of contact"
    );

    // The clients' replica dies: they may only go to A, which must not take them back in time.
    b.kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (c, h) in &clients {
        assert!(
            h.version().version >= after,
            "a client went back to {}",
            h.version()
        );
        assert!(
            !c.is_connected() || c.current_endpoint() != a.url(),
            "a client is served by the stalled replica"
        );
    }

    // The member resumes: A catches up, serves again, and the clients reach the newest state
    // through it.
    cluster.resume(stalled);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = clients
            .iter()
            .all(|(c, h)| c.is_connected() && h.version().version >= after);
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "clients did not resume through A"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let refused: u64 = clients
        .iter()
        .map(|(_, h)| h.stats().regressions_refused)
        .sum();
    println!(
        "regressions seen: {}; updates the SDKs refused as older: {refused}",
        regressions.load(Ordering::Relaxed)
    );
    assert_eq!(
        regressions.load(Ordering::Relaxed),
        0,
        "a client went back in time"
    );
    let _ = a;
}
