//! Sessions from clients that misbehave: a Nack storm is answered with at most one full
//! snapshot per cool-down, and a message that cannot be decoded ends the session with an error
//! status that says why (not OK).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use dlb::proto::{self, client_message, server_message};
use prost::Message;
use tonic::Code;

#[tokio::test]
async fn a_nack_storm_gets_one_full_snapshot_per_cooldown() {
    let server = start().await;
    let mut c = registry(&server).await;
    c.add_server(add("", "a", "10.0.0.1:80", 1)).await.unwrap();
    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    let first = s.update().await;
    assert!(first.full);
    let nack = |nonce: &str| {
        client_message::Kind::Nack(proto::Nack {
            service: String::new(),
            version: first.version,
            nonce: nonce.into(),
            error_detail: "cannot apply\nforged log line".into(),
        })
    };
    let t0 = Instant::now();
    for i in 0..50 {
        s.send(nack(&format!("n{i}"))).await;
    }
    // The first Nack is answered at once, the other 49 are owed one snapshot, not 49. However
    // slow this machine is (the 49 may even reach dlbd after the cool-down), Nack-triggered
    // snapshots leave dlbd at least one cool-down apart, all after t0: by any instant t, at
    // most 1 + ⌊(t − t0) / 1 s⌋ of them can have arrived. A snapshot storm breaks that bound.
    let cooldown = Duration::from_secs(1);
    let bound = |n: usize| {
        let allowed = 1 + t0.elapsed().as_millis() / cooldown.as_millis();
        assert!(
            n as u128 <= allowed,
            "{n} Nack-triggered snapshots within {:?}: a Nack storm was answered with a \
             snapshot storm",
            t0.elapsed()
        );
    };
    // Collect the answer and the owed snapshot, then listen 1.5 cool-downs more for extras.
    let mut fulls: Vec<Instant> = Vec::new();
    let mut quiet_until: Option<Instant> = None;
    loop {
        let deadline = quiet_until.unwrap_or(t0 + Duration::from_secs(60));
        match tokio::time::timeout_at(deadline.into(), s.rx.message()).await {
            Ok(m) => match m.unwrap().expect("stream ended").kind {
                Some(server_message::Kind::Update(u)) => {
                    assert!(u.full, "{u:?}");
                    fulls.push(Instant::now());
                    bound(fulls.len());
                    if fulls.len() == 2 {
                        quiet_until = Some(Instant::now() + cooldown.mul_f64(1.5));
                    }
                }
                Some(server_message::Kind::Heartbeat(_)) => {}
                other => panic!("unexpected {other:?}"),
            },
            Err(_) => {
                assert!(
                    quiet_until.is_some(),
                    "the owed snapshot never came: {fulls:?}"
                );
                break;
            }
        }
    }
    bound(fulls.len());
    // The owed snapshot came once the cool-down was over (a lower bound: never flaky).
    assert!(
        fulls[1] - t0 >= Duration::from_millis(950),
        "{:?}",
        fulls[1] - t0
    );
    // The session still works: a change arrives as a delta.
    c.add_server(add("", "b", "10.0.0.2:80", 1)).await.unwrap();
    let d = loop {
        let u = s.update().await;
        if !u.full {
            break u;
        }
        // A late owed snapshot (very slow machine): still within the bound.
        fulls.push(Instant::now());
        bound(fulls.len());
    };
    assert_eq!(d.upserts.len(), 1, "{d:?}");
    server.shutdown().await.unwrap();
}

/// Wire-compatible with `ClientMessage` (field 1 = Subscribe, length-delimited) but carrying
/// arbitrary bytes, to send what no well-behaved client would.
#[derive(Clone, PartialEq, prost::Message)]
struct RawClientMessage {
    #[prost(bytes = "vec", tag = "1")]
    subscribe: Vec<u8>,
}

#[tokio::test]
async fn garbage_after_subscribe_ends_with_an_error_status() {
    let server = start().await;
    let channel = channel(&server).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let valid = proto::Subscribe {
        locality: None,
        client_id: "raw".into(),
        services: vec![proto::ServiceSubscription::default()],
    }
    .encode_to_vec();
    // A Subscribe whose client_id (field 1) holds invalid UTF-8.
    let garbage = vec![0x0a, 0x03, 0xff, 0xfe, 0xfd];
    let messages = vec![
        RawClientMessage { subscribe: valid },
        RawClientMessage { subscribe: garbage },
    ];
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for m in messages {
        tx.send(m).await.unwrap();
    }
    let codec = tonic_prost::ProstCodec::<RawClientMessage, proto::ServerMessage>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/dlb.v1.Discovery/Session");
    let mut stream = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            path,
            codec,
        )
        .await
        .unwrap()
        .into_inner();
    // The valid Subscribe is answered...
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(first.kind, Some(server_message::Kind::Update(_))));
    // ... then the garbage ends the session with an error that says why.
    let end = tokio::time::timeout(WAIT, stream.message()).await.unwrap();
    let status = end.expect_err("the session ended with OK after garbage");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("undecodable"), "{status:?}");
    drop(tx);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn sessions_beyond_the_quota_are_refused_until_one_closes() {
    let server = start_with(dlb_server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        max_sessions: 2,
        ..Default::default()
    })
    .await;
    let mut a = Session::open(&server, subscribe(&[("", None)])).await;
    a.update().await;
    let mut b = Session::open(&server, subscribe(&[("", None)])).await;
    b.update().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(subscribe(&[("", None)])).await.unwrap();
    let refused = proto::discovery_client::DiscoveryClient::new(channel(&server).await)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("a third session was accepted");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("at most 2"), "{refused:?}");
    drop(a);
    // The slot comes back when a session ends.
    let mut again = None;
    for _ in 0..100 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(subscribe(&[("", None)])).await.unwrap();
        let r = proto::discovery_client::DiscoveryClient::new(channel(&server).await)
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        if let Ok(s) = r {
            again = Some((tx, s.into_inner()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_tx, mut stream) = again.expect("the closed session's slot never came back");
    assert!(stream.message().await.unwrap().is_some());
    drop(b);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn request_quotas_are_enforced() {
    let server = start().await;
    let mut c = registry(&server).await;
    c.add_server(add("", "a", "10.0.0.1:80", 1)).await.unwrap();
    // A 4 MiB key is refused (it used to be stored verbatim in the sticky table).
    let e = c
        .get_next_server(proto::GetNextServerRequest {
            service: String::new(),
            key: vec![b'k'; 4 << 20],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("key"), "{e:?}");
    assert!(e.message().len() <= 512);
    // Sticky bounds.
    for (ttl, max, field) in [
        (u32::MAX, 0, "sticky_ttl_seconds"),
        (0, u32::MAX, "sticky_max_entries"),
    ] {
        let e = c
            .set_policy(proto::SetPolicyRequest {
                policy: Some(proto::Policy {
                    algorithm: proto::Algorithm::RoundRobin as i32,
                    sticky_mode: proto::StickyMode::Fallback as i32,
                    sticky_ttl_seconds: ttl,
                    sticky_max_entries: max,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{e:?}");
    }
    // The number of services.
    for i in 0..dlb::model::MAX_SERVICES {
        let r = server
            .store()
            .apply(
                format!("s{i}"),
                vec![dlb_server::store::Mutation::SetPolicy(
                    dlb::model::default_policy(),
                )],
                Some(0),
            )
            .await;
        if let Err(e) = r {
            // `default` already counts.
            assert!(
                matches!(e, dlb_server::Error::ResourceExhausted(_)),
                "{e:?}"
            );
            assert_eq!(i, dlb::model::MAX_SERVICES - 1);
        }
    }
    let e = c
        .add_server(add("one-too-many", "a", "10.0.0.1:80", 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("10000"), "{e:?}");
    // Existing services still take writes.
    c.add_server(add("s1", "a", "10.0.0.1:80", 1))
        .await
        .unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_oversized_request_gets_resource_exhausted() {
    let server = start().await;
    let mut c = registry(&server).await.max_encoding_message_size(64 << 20);
    let e = c
        .add_server(proto::AddServerRequest {
            hash_key: "k".repeat(dlb::model::MAX_MESSAGE_BYTES + 1),
            ..add("", "a", "10.0.0.1:80", 1)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Nothing was created.
    let e = c
        .list_servers(proto::ListServersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(e.servers.is_empty());
    server.shutdown().await.unwrap();
}
