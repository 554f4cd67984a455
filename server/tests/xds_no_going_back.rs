//! "Nobody goes back in time" on xDS against a real server: resource versions say how new a
//! state they are (`HASH.EPOCH.REVISION`), and a reconnecting client whose `version_info`
//! (SotW) or `initial_resource_versions` (delta) claim a revision this replica has not reached
//! gets `UNAVAILABLE` after the bounded wait — or the resources once the cache reaches it —
//! never older resources. Another epoch's versions are no claim.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use dlb_server::api::xds::resources::{ENDPOINTS, LISTENER};
use dlb_server::RunningServer;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

const WAIT: Duration = Duration::from_secs(30);

/// Adds a backend to `service`; returns the service's new version.
async fn add(server: &RunningServer, service: &str, id: &str) -> dlb::proto::Version {
    common::registry(server)
        .await
        .add_server(common::add(service, id, "127.0.0.1:1001", 1))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap()
}

/// A version string as `dlbd` tags it, claiming `revision` of `epoch`.
fn tagged(epoch: u64, revision: u64) -> String {
    format!("0123456789abcdef.{epoch:x}.{revision}")
}

async fn sotw(
    server: &RunningServer,
    first: DiscoveryRequest,
) -> (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>) {
    let mut client = AggregatedDiscoveryServiceClient::new(common::channel(server).await);
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("ADS stream")
        .into_inner();
    (tx, stream)
}

async fn delta(
    server: &RunningServer,
    first: DeltaDiscoveryRequest,
) -> (
    mpsc::Sender<DeltaDiscoveryRequest>,
    Streaming<DeltaDiscoveryResponse>,
) {
    let mut client = AggregatedDiscoveryServiceClient::new(common::channel(server).await);
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("delta ADS stream")
        .into_inner();
    (tx, stream)
}

async fn next<T>(rx: &mut Streaming<T>) -> Result<T, Status> {
    tokio::time::timeout(WAIT, rx.message())
        .await
        .expect("nothing within the timeout")
        .map(|m| m.expect("stream ended without a status"))
}

fn reconnect(version: String) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: ENDPOINTS.into(),
        resource_names: vec!["s".into()],
        version_info: version,
        ..Default::default()
    }
}

#[tokio::test]
async fn sotw_a_client_ahead_is_refused_or_answered_once_the_cache_reaches_it() {
    let server = common::start().await;
    let at = add(&server, "s", "a").await;
    // What this server sends is tagged with its epoch and the revision of the content.
    let (_tx, mut rx) = sotw(&server, reconnect(String::new())).await;
    let r = next(&mut rx).await.unwrap();
    assert!(
        r.version_info
            .ends_with(&format!(".{:x}.{}", at.epoch, at.version)),
        "{}",
        r.version_info
    );

    // Claims a revision never reached: UNAVAILABLE after the bounded wait, nothing sent.
    let started = tokio::time::Instant::now();
    let (_tx, mut rx) = sotw(&server, reconnect(tagged(at.epoch, at.version + 100))).await;
    match next(&mut rx).await {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(r) => panic!("a client ahead of the replica was sent {r:?}"),
    }
    assert!(started.elapsed() >= dlb_server::cache::AHEAD_WAIT);

    // Claims the next revision: answered once the cache has it, with that state.
    let (_tx, mut rx) = sotw(&server, reconnect(tagged(at.epoch, at.version + 1))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let w = add(&server, "s", "b").await;
    assert_eq!(w.version, at.version + 1);
    let r = next(&mut rx).await.unwrap();
    assert!(
        r.version_info.ends_with(&format!(".{}", w.version)),
        "{}",
        r.version_info
    );

    // Another epoch's version is no claim: answered at once.
    let (_tx, mut rx) = sotw(&server, reconnect(tagged(at.epoch + 1, 1_000_000))).await;
    assert_eq!(next(&mut rx).await.unwrap().resources.len(), 1);
    server.shutdown().await.unwrap();
}

fn delta_reconnect(held: HashMap<String, String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: LISTENER.into(),
        resource_names_subscribe: vec!["s".into(), "t".into()],
        initial_resource_versions: held,
        ..Default::default()
    }
}

#[tokio::test]
async fn delta_a_client_ahead_is_refused_or_answered_once_the_cache_reaches_it() {
    let server = common::start().await;
    add(&server, "s", "a").await;
    let at = add(&server, "t", "a").await;
    let (_tx, mut rx) = delta(&server, delta_reconnect(HashMap::new())).await;
    let r = next(&mut rx).await.unwrap();
    let held: HashMap<String, String> = r
        .resources
        .iter()
        .map(|x| (x.name.clone(), x.version.clone()))
        .collect();
    assert_eq!(held.len(), 2);

    // Holds t at a revision never reached: UNAVAILABLE, nothing sent.
    let mut ahead = held.clone();
    ahead.insert("t".into(), tagged(at.epoch, at.version + 100));
    let (_tx, mut rx) = delta(&server, delta_reconnect(ahead)).await;
    match next(&mut rx).await {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(r) => panic!("a client ahead of the replica was sent {r:?}"),
    }

    // Holds t at the next revision: answered once the cache has it; s (held as sent) is not
    // sent again.
    let mut next_rev = held.clone();
    next_rev.insert("t".into(), tagged(at.epoch, at.version + 1));
    let (_tx, mut rx) = delta(&server, delta_reconnect(next_rev)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let w = add(&server, "t", "b").await;
    assert_eq!(w.version, at.version + 1);
    let r = next(&mut rx).await.unwrap();
    let names: Vec<&str> = r.resources.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["t"], "{r:?}");
    assert!(r.resources[0].version.ends_with(&format!(".{}", w.version)));
    server.shutdown().await.unwrap();
}
