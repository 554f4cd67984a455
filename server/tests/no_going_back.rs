//! "Nobody goes back in time" on DLB sessions against a real server: a client that says it
//! holds a newer version (same epoch) than the replica's cache is never sent the older state —
//! it gets `UNAVAILABLE` after the bounded wait, or the state once the cache reaches its
//! version — and deltas only ever go on the base the client holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use dlb::proto::{self, server_message};
use tonic::Code;

/// The next message of `s`, or the status that ended the stream.
async fn next_or_status(s: &mut Session) -> Result<server_message::Kind, tonic::Status> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), s.rx.message())
            .await
            .expect("nothing within 30 s")?
            .expect("stream ended without a status");
        match msg.kind.expect("empty server message") {
            server_message::Kind::Heartbeat(_) => continue,
            other => return Ok(other),
        }
    }
}

#[tokio::test]
async fn a_client_ahead_of_the_replica_is_refused_not_sent_an_older_snapshot() {
    let server = start().await;
    let mut c = registry(&server).await;
    let at = c
        .add_server(add("", "a", "10.0.0.1:80", 1))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    // The client saw this service at a version this replica never reached.
    let ahead = proto::Version {
        epoch: at.epoch,
        version: at.version + 100,
    };
    let started = tokio::time::Instant::now();
    let mut s = Session::open(&server, subscribe(&[("", Some(ahead))])).await;
    match next_or_status(&mut s).await {
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(status.message().contains("behind"), "{status:?}");
        }
        Ok(m) => panic!("a client ahead of the replica was sent {m:?}"),
    }
    assert!(
        started.elapsed() >= dlb_server::cache::AHEAD_WAIT,
        "refused before the bounded wait"
    );

    // Another epoch (another store history): its version means nothing here, a full snapshot.
    let other = proto::Version {
        epoch: at.epoch.wrapping_add(1),
        version: at.version + 100,
    };
    let mut s = Session::open(&server, subscribe(&[("", Some(other))])).await;
    let u = s.update().await;
    assert!(u.full, "{u:?}");
    assert_eq!(v(&u), at.version);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_ahead_gets_the_state_once_the_cache_reaches_its_version() {
    let server = start().await;
    let mut c = registry(&server).await;
    let at = c
        .add_server(add("", "a", "10.0.0.1:80", 1))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    // The next write is revision at + 1: the client claims it holds it already.
    let next = proto::Version {
        epoch: at.epoch,
        version: at.version + 1,
    };
    let mut s = Session::open(&server, subscribe(&[("", Some(next))])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let w = c
        .add_server(add("", "b", "10.0.0.2:80", 1))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(w, next, "the write is the version the client claimed");
    // Answered from the client's version once the cache reached it: confirmed (empty delta),
    // never the older snapshot at `at`.
    let u = match next_or_status(&mut s).await {
        Ok(server_message::Kind::Update(u)) => u,
        other => panic!("expected an update, got {other:?}"),
    };
    assert!(!u.full, "{u:?}");
    assert_eq!(u.base, Some(next));
    assert_eq!(u.version, Some(next));
    // And it follows from there.
    c.add_server(add("", "c", "10.0.0.3:80", 1)).await.unwrap();
    let u = s.update().await;
    assert_eq!(u.base, Some(next));
    assert_eq!(u.upserts.len(), 1);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_resubscribe_before_reading_gets_deltas_on_the_base_it_will_hold() {
    let server = start().await;
    let mut c = registry(&server).await;
    c.add_server(add("", "a", "10.0.0.1:80", 1)).await.unwrap();
    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    let first = s.update().await;
    assert!(first.full);
    let v1 = first.version.unwrap();
    // An observer proves the cache applied v2 and woke every watcher of the service
    // (`s`'s included) before `s` sends its second Subscribe.
    let mut observer = Session::open(&server, subscribe(&[("", Some(v1))])).await;
    assert_eq!(observer.update().await.version, Some(v1));
    c.add_server(add("", "b", "10.0.0.2:80", 1)).await.unwrap();
    let v2 = observer.update().await.version.unwrap();
    // `s` has not read the delta v1 -> v2 yet, and says again that it holds v1.
    s.send(subscribe(&[("", Some(v1))]).kind.unwrap()).await;
    // Every update `s` reads applies on what it holds by then.
    let u = s.update().await;
    assert_eq!((u.base, u.version), (Some(v1), Some(v2)), "{u:?}");
    let u = s.update().await;
    assert_eq!(
        u.base,
        Some(v2),
        "the answer to the second Subscribe is a delta on a base the client no longer holds: {u:?}"
    );
    assert_eq!(u.version, Some(v2));
    server.shutdown().await.unwrap();
}
