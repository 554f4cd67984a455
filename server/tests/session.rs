//! Discovery sessions against a real server: ordering and exactly-once delivery of changes,
//! no-op suppression, resumption from a known version, ServiceNotFound then creation, Nack
//! resync, LoadReport accounting, protocol errors and graceful shutdown with GoingAway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use dlb::proto::{self, client_message, server_message};
use dlb_server::ServerConfig;
use tonic::Code;

#[tokio::test]
async fn watcher_sees_each_change_once_in_order() {
    let server = start().await;
    let mut c = registry(&server).await;
    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    let snap = s.update().await;
    assert!(snap.full);
    assert_eq!(snap.service, "default");
    assert!(snap.upserts.is_empty());
    assert!(snap.policy.is_some());
    let mut last = v(&snap);
    let mut nonces = vec![snap.nonce.clone()];

    // add a
    c.add_server(add("", "a", "10.0.0.1:80", 1)).await.unwrap();
    let u = s.update().await;
    assert!(!u.full);
    assert_eq!(u.base.unwrap().version, last);
    assert_eq!(v(&u), last + 1);
    assert_eq!(u.upserts.len(), 1);
    assert_eq!(u.upserts[0].server_id, "a");
    assert!(u.policy.is_none(), "policy only when it changed");
    last = v(&u);
    nonces.push(u.nonce.clone());

    // add b
    c.add_server(add("", "b", "10.0.0.2:80", 2)).await.unwrap();
    let u = s.update().await;
    assert_eq!((u.base.unwrap().version, v(&u)), (last, last + 1));
    assert_eq!(u.upserts[0].server_id, "b");
    last = v(&u);
    nonces.push(u.nonce.clone());

    // no-op: a is already healthy — nothing is pushed ...
    c.health_check_passed(hc("", "a")).await.unwrap();
    // ... which the next real write proves: it arrives next, with version last + 1.
    c.update_server(proto::UpdateServerRequest {
        server_id: "b".into(),
        weight: Some(5),
        ..Default::default()
    })
    .await
    .unwrap();
    let u = s.update().await;
    assert_eq!((u.base.unwrap().version, v(&u)), (last, last + 1));
    assert_eq!(u.upserts[0].weight, 5);
    last = v(&u);
    nonces.push(u.nonce.clone());

    // health failure
    c.health_check_failed(hc("", "a")).await.unwrap();
    let u = s.update().await;
    assert_eq!(v(&u), last + 1);
    assert_eq!(u.upserts[0].health, proto::HealthStatus::Unhealthy as i32);
    last = v(&u);
    nonces.push(u.nonce.clone());

    // policy change
    c.set_policy(proto::SetPolicyRequest {
        service: String::new(),
        policy: Some(proto::Policy {
            algorithm: proto::Algorithm::LeastConnP2c as i32,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let u = s.update().await;
    assert_eq!(v(&u), last + 1);
    assert_eq!(
        u.policy.as_ref().unwrap().algorithm,
        proto::Algorithm::LeastConnP2c as i32
    );
    assert!(u.upserts.is_empty());
    last = v(&u);
    nonces.push(u.nonce.clone());

    // remove
    c.remove_server(proto::RemoveServerRequest {
        service: String::new(),
        server_id: "a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let u = s.update().await;
    assert_eq!(v(&u), last + 1);
    assert_eq!(u.removals, vec!["a".to_string()]);
    assert_eq!(
        u.removal_reasons.get("a").map(String::as_str),
        Some("removed")
    );
    nonces.push(u.nonce.clone());

    // nothing else
    s.silent_for(Duration::from_millis(200)).await;
    let unique: std::collections::HashSet<_> = nonces.iter().collect();
    assert_eq!(unique.len(), nonces.len(), "nonces must be unique");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn resume_from_known_version() {
    let server = start().await;
    let mut c = registry(&server).await;
    c.add_server(add("", "a", "10.0.0.1:80", 1)).await.unwrap();
    let at = c
        .add_server(add("", "b", "10.0.0.2:80", 1))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    c.add_server(add("", "c", "10.0.0.3:80", 1)).await.unwrap();
    c.remove_server(proto::RemoveServerRequest {
        service: String::new(),
        server_id: "a".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Known (epoch, version): a delta from that version.
    let mut s = Session::open(&server, subscribe(&[("", Some(at))])).await;
    let u = s.update().await;
    assert!(!u.full, "{u:?}");
    assert_eq!(u.base, Some(at));
    assert_eq!(v(&u), at.version + 2);
    let ids: Vec<_> = u.upserts.iter().map(|s| s.server_id.as_str()).collect();
    assert_eq!(ids, ["c"]);
    assert_eq!(u.removals, vec!["a".to_string()]);
    // The reason survives the cache's history and the coalescing of three changes.
    assert_eq!(
        u.removal_reasons.get("a").map(String::as_str),
        Some("removed")
    );

    // Up to date already: an empty delta.
    let current = u.version.unwrap();
    let mut s2 = Session::open(&server, subscribe(&[("", Some(current))])).await;
    let u = s2.update().await;
    assert!(!u.full);
    assert_eq!(u.base, Some(current));
    assert_eq!(u.version, Some(current));
    assert!(u.upserts.is_empty() && u.removals.is_empty());

    // Wrong epoch: a full snapshot.
    let wrong = proto::Version {
        epoch: server.epoch().wrapping_add(1),
        version: at.version,
    };
    let mut s3 = Session::open(&server, subscribe(&[("", Some(wrong))])).await;
    let u = s3.update().await;
    assert!(u.full);
    assert!(u.base.is_none());
    assert_eq!(u.upserts.len(), 2);
    assert_eq!(u.version.unwrap().epoch, server.epoch());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn not_found_then_created_then_nack() {
    let server = start().await;
    let mut c = registry(&server).await;
    let mut s = Session::open(&server, subscribe(&[("later", None)])).await;
    match s.next().await {
        server_message::Kind::NotFound(nf) => {
            assert_eq!(nf.service, "later");
            assert_eq!(nf.version.unwrap().epoch, server.epoch());
            assert_eq!(nf.version.unwrap().version, 0);
        }
        other => panic!("expected ServiceNotFound, got {other:?}"),
    }
    c.add_server(add("later", "x", "10.0.0.1:80", 1))
        .await
        .unwrap();
    let u = s.update().await;
    assert!(u.full, "a created service arrives as a full snapshot");
    assert_eq!(u.service, "later");
    assert!(v(&u) > 0);
    assert_eq!(u.upserts.len(), 1);

    c.add_server(add("later", "y", "10.0.0.2:80", 1))
        .await
        .unwrap();
    let d = s.update().await;
    assert!(!d.full);
    s.send(client_message::Kind::Nack(proto::Nack {
        service: "later".into(),
        version: u.version,
        nonce: d.nonce.clone(),
        error_detail: "test".into(),
    }))
    .await;
    let f = s.update().await;
    assert!(f.full, "a Nack is answered with a full snapshot");
    assert_eq!(f.upserts.len(), 2);
    assert_eq!(f.version, d.version);
    assert_ne!(f.nonce, d.nonce);

    // Ack is accepted silently; Unsubscribe stops updates.
    s.send(client_message::Kind::Ack(proto::Ack {
        service: "later".into(),
        version: f.version,
        nonce: f.nonce.clone(),
    }))
    .await;
    s.send(client_message::Kind::Unsubscribe(proto::Unsubscribe {
        service: "later".into(),
    }))
    .await;
    // Round trip through a second subscription so the unsubscribe has been processed.
    s.send(client_message::Kind::Subscribe(proto::Subscribe {
        locality: None,
        client_id: String::new(),
        services: vec![proto::ServiceSubscription {
            service: "default".into(),
            known: None,
        }],
    }))
    .await;
    assert_eq!(s.update().await.service, "default");
    c.add_server(add("later", "z", "10.0.0.3:80", 1))
        .await
        .unwrap();
    s.silent_for(Duration::from_millis(200)).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn first_message_must_be_subscribe() {
    let server = start().await;
    let ack = proto::ClientMessage {
        kind: Some(client_message::Kind::Ack(proto::Ack::default())),
    };
    let mut s = Session::open(&server, ack).await;
    let e = tokio::time::timeout(WAIT, s.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("Subscribe"), "{}", e.message());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_subscribe_is_rejected() {
    let server = start().await;
    let mut s = Session::open(&server, subscribe(&[("bad name", None)])).await;
    let e = tokio::time::timeout(WAIT, s.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("service"), "{}", e.message());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn slow_session_does_not_block_writers_and_catches_up() {
    let server = start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        history_size: 4,
        session_queue: 1,
        ..Default::default()
    })
    .await;
    let mut c = registry(&server).await;
    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    s.update().await;
    // The session is not read while 300 writes go through.
    let mut last = 0;
    tokio::time::timeout(WAIT, async {
        for i in 0..300 {
            // ~7.5 KiB per record, so the HTTP/2 flow-control windows (2 MiB) fill up while a
            // merged catch-up (~2.3 MiB) stays under the client's 4 MiB message limit.
            let req = proto::AddServerRequest {
                metadata: (0..30)
                    .map(|k| (format!("k{k}"), "v".repeat(250)))
                    .collect(),
                ..add("", &format!("s{i}"), "10.0.0.1:80", 1)
            };
            let r = c.add_server(req).await.unwrap().into_inner();
            last = r.version.unwrap().version;
        }
    })
    .await
    .expect("writers were blocked by a slow session");
    // The session catches up: versions only grow, and it ends at the last version with
    // every backend (applying deltas / snapshots in order).
    let mut servers = std::collections::BTreeSet::new();
    let mut version = 1;
    let mut catchups = 0;
    while version < last {
        let u = s.update().await;
        if u.full || v(&u) > u.base.map_or(0, |b| b.version) + 1 {
            catchups += 1;
        }
        if u.full {
            servers = u.upserts.iter().map(|s| s.server_id.clone()).collect();
        } else {
            assert_eq!(u.base.unwrap().version, version, "delta on the wrong base");
            servers.extend(u.upserts.iter().map(|s| s.server_id.clone()));
        }
        assert!(v(&u) > version);
        version = v(&u);
    }
    assert_eq!(version, last);
    assert_eq!(servers.len(), 300);
    assert!(
        catchups > 0,
        "the session never lagged: the test did not exercise overflow"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_sends_going_away() {
    let server = start().await;
    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    s.update().await;
    let shutdown = tokio::spawn(server.shutdown());
    match s.next().await {
        server_message::Kind::GoingAway(g) => assert!(!g.reason.is_empty()),
        other => panic!("expected GoingAway, got {other:?}"),
    }
    // Then the stream ends.
    let end = tokio::time::timeout(WAIT, s.rx.message()).await.unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("shutdown hangs")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn restart_on_the_same_port_gets_a_new_epoch() {
    let server = start().await;
    let addr = server.grpc_addr();
    let epoch = server.epoch();
    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    s.update().await;
    server.shutdown().await.unwrap();
    let again = start_with(ServerConfig {
        listen: addr,
        metrics_listen: None,
        ..Default::default()
    })
    .await;
    assert_eq!(again.grpc_addr(), addr);
    assert_ne!(again.epoch(), epoch);
    let mut c = registry(&again).await;
    c.list_services(proto::ListServicesRequest {})
        .await
        .unwrap();
    again.shutdown().await.unwrap();
}

/// A quiet session gets a `Heartbeat` (with the cache's revision) once it has been silent for
/// `session_heartbeat`, and only then: updates reset the silence.
#[tokio::test]
async fn a_quiet_session_gets_heartbeats() {
    let mut cfg = dlb_server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        session_heartbeat: Duration::from_millis(300),
        ..Default::default()
    };
    cfg.services = vec![dlb_server::ServiceConfig::empty("default")];
    let server = start_with(cfg).await;
    // Taken before the session exists, so dlbd's update (and the silence after it) comes
    // after this instant however this test is scheduled: the heartbeat cannot arrive sooner
    // than one period after it.
    let opened = tokio::time::Instant::now();
    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    s.update().await;
    let msg = tokio::time::timeout(WAIT, s.rx.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let waited = opened.elapsed();
    match msg.kind {
        Some(server_message::Kind::Heartbeat(h)) => {
            assert_eq!(
                h.revision,
                server.cache().revision(),
                "heartbeat names the cache revision"
            )
        }
        other => panic!("expected a heartbeat, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(250),
        "a heartbeat came {waited:?} after an update, before the silence period"
    );
    // A bad period is refused at start.
    let bad = dlb_server::ServerConfig {
        session_heartbeat: Duration::from_millis(5),
        ..Default::default()
    };
    let err = dlb_server::spawn(bad).await.expect_err("5 ms accepted");
    assert!(err.to_string().contains("session_heartbeat"), "{err}");
    server.shutdown().await.unwrap();
}

/// With `max_session_age`, a session is sent `GoingAway` once it has lived its limit (within
/// ±10 %), then ends; a new session that names the version it holds gets a delta, not a
/// snapshot. Without it, sessions live on.
#[tokio::test]
async fn old_sessions_are_sent_away_and_resume_with_a_delta() {
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        max_session_age: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let server = start_with(cfg).await;
    let mut c = registry(&server).await;
    c.add_server(add("", "a", "127.0.0.1:9001", 1))
        .await
        .unwrap();
    // Taken before the session exists: its age on dlbd is never more than `opened.elapsed()`.
    let opened = tokio::time::Instant::now();
    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    let first = s.update().await;
    assert!(first.full);
    match s.next().await {
        server_message::Kind::GoingAway(g) => {
            assert_eq!(g.reason, dlb_server::api::discovery::MAX_AGE_REASON)
        }
        other => panic!("expected GoingAway, got {other:?}"),
    }
    // Not before 1 s − 10 % (a lower bound: never flaky); the upper bound only tells "about
    // a second" from "much later", generous for this VM's stalls.
    let lived = opened.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&lived),
        "sent away after {lived:?}, not after about 1 s"
    );
    let end = tokio::time::timeout(WAIT, s.rx.message()).await.unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");

    // A write meanwhile; the next session resumes from the version it holds.
    c.add_server(add("", "b", "127.0.0.1:9002", 1))
        .await
        .unwrap();
    let known = first.version;
    let mut again = Session::open(&server, subscribe(&[("", known)])).await;
    let u = again.update().await;
    assert!(!u.full, "resumed with a snapshot: {u:?}");
    assert_eq!(u.upserts.len(), 1, "{u:?}");
    assert_eq!(u.upserts[0].server_id, "b");

    // Out of range is refused at start, naming the field.
    let bad = ServerConfig {
        max_session_age: Some(Duration::from_millis(10)),
        ..Default::default()
    };
    let err = dlb_server::spawn(bad).await.expect_err("10 ms accepted");
    assert!(err.to_string().contains("max_session_age"), "{err}");
    server.shutdown().await.unwrap();
}
