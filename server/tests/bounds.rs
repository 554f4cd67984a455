//! What a read client can make `dlbd` keep is bounded and released (issue 15 item 1): names
//! that are not service names never reach the cache (and do not end an xDS stream), names
//! nobody holds leave the cache with their last follower, and subscriptions are bounded in
//! count and bytes on both front-ends.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use dlb::proto::{client_message, server_message};
use dlb_server::api::xds::resources::{CLUSTER, ENDPOINTS};
use dlb_server::RunningServer;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(20);

async fn sotw(
    server: &RunningServer,
) -> (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>) {
    let (tx, rx) = mpsc::channel(16);
    let stream = AggregatedDiscoveryServiceClient::new(common::channel(server).await)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("ADS stream")
        .into_inner();
    (tx, stream)
}

fn request(type_url: &str, names: Vec<String>) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names,
        ..Default::default()
    }
}

async fn recv<T>(rx: &mut Streaming<T>) -> Result<T, tonic::Status> {
    tokio::time::timeout(WAIT, rx.message())
        .await
        .expect("no response in time")
        .and_then(|m| m.ok_or_else(|| tonic::Status::unknown("stream ended")))
}

/// Polls until the cache holds `n` entries.
async fn entries_become(server: &RunningServer, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.cache().entries() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "cache entries: {} (expected {n})",
            server.cache().entries()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn bad_xds_names_are_absent_and_do_not_end_the_stream() {
    let server = common::start().await;
    common::registry(&server)
        .await
        .add_server(common::add("web", "w1", "127.0.0.1:9001", 1))
        .await
        .unwrap();
    let base = server.cache().entries();
    let (tx, mut rx) = sotw(&server).await;
    let long = "x".repeat(dlb::model::MAX_ID_LEN + 1);
    let names = vec![
        "web".to_owned(),
        long.clone(),
        "bad name/with\u{0}chars".to_owned(),
        "xdstp://authority/envoy.config.cluster.v3.Cluster/web".to_owned(),
        "ghost".to_owned(),
    ];
    tx.send(request(CLUSTER, names.clone())).await.unwrap();
    let r = recv(&mut rx).await.expect("a response, not an error");
    assert_eq!(r.resources.len(), 1, "only the service that exists");
    // Only the valid names are followed: "ghost" has an entry while followed, the bad ones never.
    entries_become(&server, base + 1).await;
    // The stream is still alive: an ACK with a change of names is answered.
    tx.send(DiscoveryRequest {
        version_info: r.version_info.clone(),
        response_nonce: r.nonce.clone(),
        ..request(CLUSTER, vec!["web".into(), long])
    })
    .await
    .unwrap();
    let r2 = recv(&mut rx).await.expect("still served");
    assert_eq!(r2.resources.len(), 1);
    entries_become(&server, base).await;

    // Delta: a bad name is reported removed at once; the stream goes on.
    let (dtx, drx) = mpsc::channel(16);
    let mut drx: Streaming<DeltaDiscoveryResponse> =
        AggregatedDiscoveryServiceClient::new(common::channel(&server).await)
            .delta_aggregated_resources(ReceiverStream::new(drx))
            .await
            .unwrap()
            .into_inner();
    dtx.send(DeltaDiscoveryRequest {
        type_url: ENDPOINTS.into(),
        resource_names_subscribe: vec!["web".into(), "bad/name".into(), "ghost-2".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let d = recv(&mut drx).await.expect("a delta response");
    assert_eq!(d.resources.len(), 1);
    let mut removed = d.removed_resources.clone();
    removed.sort();
    assert_eq!(removed, vec!["bad/name".to_owned(), "ghost-2".to_owned()]);
    entries_become(&server, base + 1).await;
    drop(dtx);
    drop(drx);
    drop(tx);
    drop(rx);
    // Every entry for a name nobody holds is gone with its streams; the real one stays.
    entries_become(&server, base).await;
    assert!(server.cache().get("web").is_some());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_xds_stream_is_bounded_in_bytes_of_names() {
    let server = common::start().await;
    let (tx, mut rx) = sotw(&server).await;
    // 5,000 names (within the per-type count) of 250 bytes: 1.25 MB of names.
    let names: Vec<String> = (0..5_000).map(|i| format!("{i:0>250}")).collect();
    tx.send(request(ENDPOINTS, names)).await.unwrap();
    let err = loop {
        match recv(&mut rx).await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("DiscoveryRequest.resource_names")
            && err.message().contains("bytes"),
        "{err:?}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_session_releases_the_names_it_followed_and_is_bounded_in_bytes() {
    let server = common::start().await;
    let base = server.cache().entries();
    let ghosts: Vec<String> = (0..500).map(|i| format!("ghost-{i}")).collect();
    let subs: Vec<(&str, Option<dlb::proto::Version>)> =
        ghosts.iter().map(|g| (g.as_str(), None)).collect();
    let mut s = common::Session::open(&server, common::subscribe(&subs)).await;
    for _ in 0..ghosts.len() {
        assert!(matches!(s.next().await, server_message::Kind::NotFound(_)));
    }
    entries_become(&server, base + 500).await;
    // Unsubscribing releases at once; closing releases the rest.
    for g in &ghosts[..100] {
        s.send(client_message::Kind::Unsubscribe(dlb::proto::Unsubscribe {
            service: g.clone(),
        }))
        .await;
    }
    entries_become(&server, base + 400).await;
    drop(s);
    entries_become(&server, base).await;

    // 9,000 names of 128 bytes (within the count bound): 1.15 MB of names.
    let long: Vec<String> = (0..9_000).map(|i| format!("{i:0>128}")).collect();
    let subs: Vec<(&str, Option<dlb::proto::Version>)> =
        long.iter().map(|g| (g.as_str(), None)).collect();
    let mut s = common::Session::open(&server, common::subscribe(&subs)).await;
    // One deadline for the whole wait (heartbeats keep arriving).
    let err = tokio::time::timeout(WAIT, async {
        loop {
            match s.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("ended without a status"),
                Err(e) => break e,
            }
        }
    })
    .await
    .expect("no RESOURCE_EXHAUSTED within the deadline");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("bytes of service names"), "{err:?}");
    drop(s);
    entries_become(&server, base).await;

    // A name that is not a service name is refused naming the field.
    let mut s = common::Session::open(&server, common::subscribe(&[("bad/name", None)])).await;
    let err = tokio::time::timeout(WAIT, s.rx.message())
        .await
        .unwrap()
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("service"), "{err:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn xds_clients_listing_is_truncated_with_a_count_instead_of_failing() {
    let server = common::start().await;
    // 45 streams × 16 types × 100 names of 250 bytes: ≈ 18 MB of names, over the 16 MB message.
    const STREAMS: usize = 45;
    let mut open = Vec::new();
    for s in 0..STREAMS {
        let (tx, rx) = sotw(&server).await;
        for t in 0..dlb_server::api::xds::MAX_TYPES {
            let names = (0..100).map(|i| format!("{s}-{t}-{i:0>240}")).collect();
            tx.send(request(&format!("type.googleapis.com/x.T{t}"), names))
                .await
                .unwrap();
        }
        open.push((tx, rx));
    }
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        let all = server.xds_clients().list();
        let done = all.len() == STREAMS
            && all.iter().all(|c| {
                c.types.len() == dlb_server::api::xds::MAX_TYPES
                    && c.types.values().all(|t| t.names.len() == 100)
            });
        if done {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "streams not set up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = dlb::proto::xds_status_client::XdsStatusClient::new(common::channel(&server).await)
        .max_decoding_message_size(dlb::model::MAX_MESSAGE_BYTES)
        .list_xds_clients(dlb::proto::ListXdsClientsRequest {})
        .await
        .expect("listed, not OUT_OF_RANGE")
        .into_inner();
    assert!(r.truncated);
    assert_eq!(r.total as usize, STREAMS);
    assert!(!r.clients.is_empty() && r.clients.len() < STREAMS);
    assert!(prost::Message::encoded_len(&r) <= dlb_server::api::xds::status::MAX_LIST_BYTES);
    drop(open);
    server.shutdown().await.unwrap();
}
