//! The etcd store as replicas see it (feature `etcd`): two `EtcdStore`s on one etcd and prefix
//! stand for two `dlbd` replicas. They agree on the epoch and versions, concurrent writes of the
//! same id or version have exactly one winner, a write through one reaches the other's watch,
//! and a store survives etcd being killed and restarted on its data. Each test starts its own
//! etcd (`etcd_support`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod etcd_support;

use std::time::Duration;

use dlb::proto;
use dlb_server::store::{EtcdStore, Mutation, Store, WatchEvent};
use dlb_server::Error;
use etcd_support::{Etcd, TestTls};
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

fn server(id: &str) -> proto::Server {
    proto::Server {
        server_id: id.into(),
        address: format!("{id}.internal:80"),
        weight: 1,
        ..Default::default()
    }
}

async fn replicas(etcd: &Etcd) -> (EtcdStore, EtcdStore) {
    let config = etcd.config("/replicas");
    let a = EtcdStore::connect(&config).await.unwrap();
    let b = EtcdStore::connect(&config).await.unwrap();
    (a, b)
}

async fn add(store: &dyn Store, service: &str, id: &str) -> Result<u64, Error> {
    store
        .apply(service.into(), vec![Mutation::Add(server(id))], None)
        .await
        .map(|a| a.version.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_agree_on_epoch_and_versions() {
    let etcd = Etcd::start().await;
    let (a, b) = replicas(&etcd).await;
    assert_ne!(a.epoch(), 0);
    assert_eq!(a.epoch(), b.epoch(), "one epoch per etcd and prefix");
    let v = add(&a, "s", "x").await.unwrap();
    let seen = b.get_service("s".into()).await.unwrap().unwrap();
    assert_eq!(seen.version.version, v);
    assert_eq!(seen.version.epoch, a.epoch());
    assert_eq!(a.snapshot().await.unwrap(), b.snapshot().await.unwrap());
    // Another prefix on the same etcd is another history.
    let other = EtcdStore::connect(&etcd.config("/other")).await.unwrap();
    assert_ne!(other.epoch(), a.epoch());
    assert!(other.get_service("s".into()).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_of_one_id_have_one_winner() {
    let etcd = Etcd::start().await;
    let (a, b) = replicas(&etcd).await;
    for round in 0..20 {
        let id = format!("x{round}");
        let (ra, rb) = tokio::join!(add(&a, "s", &id), add(&b, "s", &id));
        let codes: Vec<_> = [ra, rb]
            .into_iter()
            .map(|r| r.map_err(|e| tonic::Status::from(e).code()))
            .collect();
        let won = codes.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {codes:?}");
        assert!(
            codes.contains(&Err(tonic::Code::AlreadyExists)),
            "round {round}: {codes:?}"
        );
    }
    let s = b.get_service("s".into()).await.unwrap().unwrap();
    assert_eq!(s.servers.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compare_and_set_has_one_winner() {
    let etcd = Etcd::start().await;
    let (a, b) = replicas(&etcd).await;
    let mut v = add(&a, "s", "base").await.unwrap();
    for round in 0..20 {
        let ma = vec![Mutation::Add(server(&format!("a{round}")))];
        let mb = vec![Mutation::Add(server(&format!("b{round}")))];
        let (ra, rb) = tokio::join!(
            a.apply("s".into(), ma, Some(v)),
            b.apply("s".into(), mb, Some(v))
        );
        let (ok, err) = match (ra, rb) {
            (Ok(ok), Err(err)) | (Err(err), Ok(ok)) => (ok, err),
            other => panic!("round {round}: expected one winner, got {other:?}"),
        };
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(ok.version.version > v);
        v = ok.version.version;
    }
    let s = a.get_service("s".into()).await.unwrap().unwrap();
    assert_eq!(s.servers.len(), 21);
    assert_eq!(s.version.version, v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_lose_no_update() {
    let etcd = Etcd::start().await;
    let (a, b) = replicas(&etcd).await;
    let writes = |st: EtcdStore, tag: &'static str| async move {
        let mut versions = Vec::new();
        for i in 0..15 {
            versions.push(add(&st, "s", &format!("{tag}{i}")).await.unwrap());
        }
        versions
    };
    let (va, vb) = tokio::join!(
        tokio::spawn(writes(a.clone(), "a")),
        tokio::spawn(writes(b.clone(), "b"))
    );
    let mut all: Vec<u64> = va.unwrap().into_iter().chain(vb.unwrap()).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 30, "two writes got one version");
    let s = a.get_service("s".into()).await.unwrap().unwrap();
    assert_eq!(s.servers.len(), 30);
    assert_eq!(s.version.version, *all.last().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_replica_reaches_the_others_watch() {
    let etcd = Etcd::start().await;
    let (a, b) = replicas(&etcd).await;
    let v = add(&a, "s", "x").await.unwrap();
    let mut w = b.watch(v + 1);
    let applied = a
        .apply(
            "s".into(),
            vec![
                Mutation::Add(server("y")),
                Mutation::RemoveWithReason("x".into(), "lease expired".into()),
            ],
            None,
        )
        .await
        .unwrap();
    let c = match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(Ok(WatchEvent::Changes(cs)))) => cs[0].clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!((c.base, c.version), (v, applied.version.version));
    assert_eq!(c.service, "s");
    assert_eq!(c.upserts, applied.servers);
    assert_eq!(c.created, ["y"]);
    assert_eq!(c.removals, ["x"]);
    assert_eq!(
        c.removal_reasons.get("x").map(String::as_str),
        Some("lease expired")
    );
    assert!(c.policy.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_recovers_when_etcd_restarts() {
    let mut etcd = Etcd::start().await;
    let config = etcd.config("/restart");
    let st = EtcdStore::connect(&config).await.unwrap();
    let epoch = st.epoch();
    let v = add(&st, "s", "x").await.unwrap();
    let mut w = st.watch(v + 1);
    let w2 = add(&st, "s", "y").await.unwrap();
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(Ok(WatchEvent::Changes(cs)))) => assert_eq!(cs[0].version, w2),
        other => panic!("{other:?}"),
    }
    etcd.kill();
    // The watch ends with an error item (never silently, never a panic).
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(Err(e))) => assert!(e.to_string().contains("etcd"), "{e}"),
        other => panic!("expected an error item, got {other:?}"),
    }
    assert!(tokio::time::timeout(WAIT, w.next())
        .await
        .unwrap()
        .is_none());
    // Calls fail while etcd is down (bounded by the request deadline).
    assert!(add(&st, "s", "down").await.is_err());
    etcd.restart().await;
    // New calls succeed once the client has reconnected.
    let deadline = tokio::time::Instant::now() + WAIT;
    let v3 = loop {
        match add(&st, "s", "z").await {
            Ok(v) => break v,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    };
    assert!(v3 > w2);
    assert_eq!(st.epoch(), epoch);
    let s = st.get_service("s".into()).await.unwrap().unwrap();
    let ids: Vec<&str> = s.servers.keys().map(|k| &**k).collect();
    assert_eq!(ids, ["x", "y", "z"]);
    // A new watch from the last revision seen + 1 resumes, missing nothing.
    let mut w = st.watch(w2 + 1);
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(Ok(WatchEvent::Changes(cs)))) => {
            assert_eq!(cs[0].version, v3);
            assert_eq!(cs[0].created, ["z"]);
        }
        other => panic!("{other:?}"),
    }
    // A second store connecting after the restart reads the same epoch.
    let again = EtcdStore::connect(&config).await.unwrap();
    assert_eq!(again.epoch(), epoch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_watch_outlives_the_request_deadline() {
    let etcd = Etcd::start().await;
    let config = dlb_server::EtcdConfig {
        timeout: Duration::from_millis(500),
        ..etcd.config("/idle")
    };
    let st = EtcdStore::connect(&config).await.unwrap();
    let v = add(&st, "s", "x").await.unwrap();
    let mut w = st.watch(v + 1);
    // Nothing to say for longer than the per-request deadline: the watch must stay open.
    assert!(tokio::time::timeout(Duration::from_millis(1500), w.next())
        .await
        .is_err());
    let v2 = add(&st, "s", "y").await.unwrap();
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(Ok(WatchEvent::Changes(cs)))) => assert_eq!(cs[0].version, v2),
        other => panic!("{other:?}"),
    }
}

/// TLS to etcd: against a member that serves TLS only and requires client certificates, stores
/// and a whole `dlbd` (store, membership and leases connections) work with the CA and a client
/// certificate; without the certificate, or in plaintext, connecting fails (an error, no hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_an_etcd_that_requires_client_certificates() {
    let tls = std::sync::Arc::new(TestTls::new());
    let etcd = Etcd::start_tls(tls.clone()).await;
    let config = etcd.config("/tls");
    let a = EtcdStore::connect(&config).await.unwrap();
    let v = add(&a, "s", "x").await.unwrap();
    let server = dlb_server::spawn(dlb_server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        store: dlb_server::StoreConfig::Etcd(config.clone()),
        replica_id: Some("tls-0".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(server.cache().wait_for_revision(v, WAIT).await);
    assert!(server
        .cache()
        .get("s")
        .is_some_and(|s| s.servers.contains_key("x")));
    let deadline = tokio::time::Instant::now() + WAIT;
    while !server.is_leader() {
        assert!(tokio::time::Instant::now() < deadline, "never led over TLS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await.unwrap();

    for (what, tls) in [
        ("without a client certificate", Some(tls.config(false))),
        ("in plaintext", None),
    ] {
        let refused = dlb_server::EtcdConfig {
            tls,
            timeout: Duration::from_secs(2),
            ..config.clone()
        };
        let r = tokio::time::timeout(Duration::from_secs(30), EtcdStore::connect(&refused))
            .await
            .unwrap_or_else(|_| panic!("connecting {what} hangs"));
        assert!(r.is_err(), "connected {what}");
    }
}
