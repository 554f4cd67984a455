//! High availability with real processes (feature `etcd`): one etcd (or a three-member
//! cluster), three `dlbd --store etcd` replicas, twenty SDK clients picking continuously while
//! an admin adds and removes backends.
//!
//! * `kill -9` one replica, then a second: no pick fails, every client converges to the
//!   store's final state, and the failover time (replica killed → the client applies an update
//!   from another replica) is printed;
//! * all replicas restarted: the state is preserved (same epoch and version) and clients
//!   resume with deltas, never a full snapshot;
//! * concurrent `AddServer` of one id through two replicas: exactly one wins;
//! * on a three-member etcd, the etcd leader is killed, then a follower: writes succeed again
//!   within a bound and keep succeeding, every replica keeps serving, no pick fails.
#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod etcd_support;
mod ha_support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dlb_client::{AdminClient, Client, NewServer};
use etcd_support::{Etcd, EtcdCluster};
use ha_support::*;
use tonic_health::pb::health_check_response::ServingStatus;

const SERVICE: &str = "web";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_two_of_three_replicas_fails_no_pick() {
    let etcd = Etcd::start().await;
    let mut replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&etcd.endpoint(), "127.0.0.1:0"))
        .collect();
    let urls: Vec<String> = replicas.iter().map(Replica::url).collect();
    seed(&urls[0], SERVICE, 5).await;
    let mut fleet = Fleet::start(20, &urls, SERVICE, Duration::from_millis(1)).await;
    let mut writer = Writer::start(&urls, SERVICE, Duration::from_millis(20), 5);
    tokio::time::sleep(Duration::from_millis(500)).await;

    for victim in [0usize, 1] {
        let times = kill_and_measure(&fleet, &mut replicas[victim], Duration::from_secs(10)).await;
        assert!(!times.is_empty(), "no client used replica {victim}");
        println!(
            "kill -9 of replica {victim}: {} clients failed over; p50 {:?}, max {:?}",
            times.len(),
            quantile(&times, 0.5),
            quantile(&times, 1.0)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let survivor = replicas[2].url();
    let picks = settle_and_check(&mut fleet, &mut writer, &survivor, SERVICE).await;
    println!(
        "{picks} picks, 0 failed, {} writes",
        writer.writes.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_replica_keeps_the_state_and_clients_resume_with_deltas() {
    let etcd = Etcd::start().await;
    let mut replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&etcd.endpoint(), "127.0.0.1:0"))
        .collect();
    let urls: Vec<String> = replicas.iter().map(Replica::url).collect();
    seed(&urls[0], SERVICE, 3).await;
    let mut fleet = Fleet::start(6, &urls, SERVICE, Duration::from_millis(5)).await;
    let version = store_version(&urls[1], SERVICE).await;
    fleet.converge(version, Duration::from_secs(5)).await;
    let before: Vec<_> = fleet.clients.iter().map(|(_, h)| h.stats()).collect();

    for r in &mut replicas {
        r.kill9();
    }
    for r in &mut replicas {
        r.restart();
    }
    assert_eq!(store_version(&urls[2], SERVICE).await, version);
    // Every client reconnects and gets an (empty) delta from the version it holds.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resumed = fleet
            .clients
            .iter()
            .zip(&before)
            .all(|((c, h), b)| c.is_connected() && h.stats().delta_updates > b.delta_updates);
        if resumed {
            break;
        }
        assert!(Instant::now() < deadline, "clients did not resume");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for ((_, h), b) in fleet.clients.iter().zip(&before) {
        assert_eq!(
            h.stats().full_updates,
            b.full_updates,
            "a full snapshot after restart"
        );
        assert_eq!(h.version().version, version);
    }
    fleet.stop().await;
    assert_eq!(fleet.failed.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_add_of_one_id_on_two_replicas_has_one_winner() {
    let etcd = Etcd::start().await;
    let a = Replica::start(&etcd.endpoint(), "127.0.0.1:0");
    let b = Replica::start(&etcd.endpoint(), "127.0.0.1:0");
    let (ca, cb) = (
        AdminClient::new([a.url()]).unwrap(),
        AdminClient::new([b.url()]).unwrap(),
    );
    for round in 0..20 {
        let id = format!("race-{round}");
        let (ra, rb) = tokio::join!(
            ca.add_server(SERVICE, NewServer::new(&id, "127.0.0.1:9001")),
            cb.add_server(SERVICE, NewServer::new(&id, "127.0.0.1:9002")),
        );
        let wins = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {ra:?} / {rb:?}");
        let loser = if ra.is_ok() { rb } else { ra };
        assert!(
            matches!(loser, Err(dlb_client::Error::AlreadyExists(_))),
            "{loser:?}"
        );
    }
}

/// After two replicas are killed every client sits on the survivor; with a maximum session age
/// the restarted replicas get their share back within a few periods (each session moves to a
/// random other replica when sent away), and no pick fails meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maximum_session_age_spreads_clients_again_after_a_failover() {
    let etcd = Etcd::start().await;
    let age = ["--max-session-age-seconds", "1"];
    let mut replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::start_with(&etcd.endpoint(), "127.0.0.1:0", &age))
        .collect();
    let urls: Vec<String> = replicas.iter().map(Replica::url).collect();
    seed(&urls[0], SERVICE, 5).await;
    let fleet = Fleet::start(30, &urls, SERVICE, Duration::from_millis(2)).await;
    // Kill two replicas and wait until every client is on the third.
    replicas[0].kill9();
    replicas[1].kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.on(&urls[2]).len() < 30 {
        assert!(
            Instant::now() < deadline,
            "clients did not all fail over to replica 2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replicas[0].restart();
    replicas[1].restart();
    // Spread again: at least 5 of 30 on each (10 expected), within 10 periods.
    let deadline = Instant::now() + Duration::from_secs(10);
    let counts = loop {
        let counts: Vec<usize> = urls.iter().map(|u| fleet.on(u).len()).collect();
        if counts.iter().all(|&n| n >= 5) {
            break counts;
        }
        assert!(
            Instant::now() < deadline,
            "clients still piled up: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("clients per replica after rebalancing: {counts:?}");
    let mut fleet = fleet;
    fleet.stop().await;
    assert_eq!(fleet.failed.load(Ordering::Relaxed), 0, "picks failed");
    assert!(fleet.picks.load(Ordering::Relaxed) > 1_000);
}

/// A three-member etcd loses one member, twice, under three `dlbd` replicas (each given all
/// three endpoints), an admin writing every 20 ms and 20 SDKs picking every millisecond.
///
/// 1. The etcd **leader** is `kill -9`ed. It was made member 0 beforehand (`MoveLeader`), so it
///    is also the endpoint every replica lists first: a replica that used only its first
///    endpoint, or that stayed on the dead one, could not write again and the test fails; one
///    that keeps sending a share of its requests to the dead member (etcd-client's own
///    balanced channel did, see `server/src/etcd/channel.rs`) fails writes after the
///    first success, and the test fails too.
/// 2. Member 0 is restarted (it rejoins as a follower) and a **follower** listed second or
///    third is killed: no election, only connections lost.
///
/// Each time: the remaining two elect (or keep) a leader; a write succeeds within 10 s of the
/// kill, every client has it within 10 s, and from that write on none fails while the member
/// stays down (3 s); every replica is `SERVING` and serves a new session with the latest
/// write; at the end every client holds the store's final state and no pick failed. The
/// gaps (kill → first write, kill → every client has it) are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_of_three_etcd_members_interrupts_nothing() {
    let mut etcd = EtcdCluster::start().await;
    etcd.make_leader(0).await;
    let endpoints = etcd.endpoints().join(",");
    let replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&endpoints, "127.0.0.1:0"))
        .collect();
    let urls: Vec<String> = replicas.iter().map(Replica::url).collect();
    seed(&urls[0], SERVICE, 5).await;
    let mut fleet = Fleet::start(20, &urls, SERVICE, Duration::from_millis(1)).await;
    let mut writer = Writer::start(&urls, SERVICE, Duration::from_millis(20), 5);
    let sampler = HealthSampler::start(&urls);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. The leader (member 0, listed first).
    etcd.make_leader(0).await;
    lose_member(
        &mut etcd,
        0,
        "the leader (member 0, listed first)",
        &writer,
        &fleet,
        &urls,
    )
    .await;

    // 2. Member 0 back, then a follower.
    etcd.restart(0).await;
    let leader = etcd.leader(Duration::from_secs(10)).await;
    let follower = (1..EtcdCluster::SIZE).find(|&i| i != leader).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let what = format!("a follower (member {follower})");
    lose_member(&mut etcd, follower, &what, &writer, &fleet, &urls).await;

    let picks = settle_and_check(&mut fleet, &mut writer, &urls[0], SERVICE).await;
    println!(
        "{picks} picks, 0 failed; {} writes, {} failed; health samples per replica \
         (taken, not SERVING): {:?}",
        writer.writes.load(Ordering::Relaxed),
        writer.failed.load(Ordering::Relaxed),
        sampler.counts()
    );
}

/// Kills etcd member `victim` and checks that the deployment carries on (see
/// [`losing_one_of_three_etcd_members_interrupts_nothing`]); prints the gaps.
async fn lose_member(
    etcd: &mut EtcdCluster,
    victim: usize,
    what: &str,
    writer: &Writer,
    fleet: &Fleet,
    urls: &[String],
) {
    let killed = Instant::now();
    etcd.kill(victim);
    let (sent, wrote, version) = writer
        .wait_write_since(killed, Duration::from_secs(10))
        .await;
    let everyone = fleet.reach(version, Duration::from_secs(10)).await;
    let leader = etcd.leader(Duration::from_secs(10)).await;
    assert_ne!(leader, victim);
    println!(
        "etcd lost {what}: member {leader} leads; first write after {:?}, every client had it \
         after {:?}",
        wrote - killed,
        everyone - killed
    );
    // While the member stays down, nothing fails any more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late = writer.failures_between(sent, Instant::now());
    assert!(
        late.is_empty(),
        "with {what} down, {} writes failed after one had succeeded, e.g. {:?}",
        late.len(),
        &late[..late.len().min(2)]
    );
    let (_, _, now) = writer
        .wait_write_since(Instant::now(), Duration::from_secs(1))
        .await;
    for (i, url) in urls.iter().enumerate() {
        assert_eq!(
            health(url, "").await,
            Some(ServingStatus::Serving),
            "replica {i}"
        );
        serves(url, now).await;
        assert!(
            store_version(url, SERVICE).await >= now,
            "replica {i} lists an old version"
        );
    }
    assert!(!etcd.is_running(victim));
}

/// Opens a new session on the replica at `url` alone and waits until it routes on `version`
/// or a later one (panics after 10 s).
async fn serves(url: &str, version: u64) {
    let client = Client::builder([url.to_owned()])
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{url} takes no session: {e}"));
    let handle = client
        .service(SERVICE)
        .await
        .unwrap_or_else(|e| panic!("{url} serves no snapshot: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.version().version < version {
        assert!(
            Instant::now() < deadline,
            "{url} does not serve version {version}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
