//! A control plane on the embedded durable store restarts (same data dir, same port): the SDK
//! keeps routing through the gap and resumes with a delta — the epoch and versions survived, so
//! no full snapshot and no re-registration are needed.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use dlb_client::{Client, NewServer};
use dlb_server::StoreConfig;

#[tokio::test]
async fn restart_on_the_embedded_store_resumes_with_a_delta() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(vec![]);
    cfg.store = StoreConfig::Embedded(dir.path().to_path_buf());
    let first = dlb_server::spawn(cfg.clone()).await.unwrap();
    let addr = first.grpc_addr();
    let epoch = first.epoch();
    let client = Client::builder([format!("http://{addr}")])
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let web = within("web", client.service("web")).await.unwrap();
    web.add_server("a", "127.0.0.1:9001", 1).await.unwrap();
    let r = web.add_server("b", "127.0.0.1:9002", 1).await.unwrap();
    converge(&web, r.version).await;
    assert_eq!(picked(&web, 10), set(&["a", "b"]));
    let before = web.version();
    let stats = web.stats();

    within("shutdown", first.shutdown()).await.unwrap();
    eventually("the client to notice", || !client.is_connected()).await;
    assert_eq!(
        picked(&web, 10),
        set(&["a", "b"]),
        "routing stopped in the gap"
    );

    cfg.listen = addr;
    let second = respawn(&cfg).await;
    assert_eq!(second.epoch(), epoch, "the durable store kept its epoch");
    eventually("the client to reconnect", || {
        client.is_connected() && web.stats().delta_updates > stats.delta_updates
    })
    .await;
    let after = web.stats();
    assert_eq!(
        after.full_updates, stats.full_updates,
        "resumed with a full snapshot: {after:?}"
    );
    assert_eq!(web.version(), before);
    // The restarted control plane carries on from the same versions.
    let r = web
        .add_server_with(NewServer::new("c", "127.0.0.1:9003"))
        .await
        .unwrap();
    assert!(r.version.unwrap().version > before.version);
    converge(&web, r.version).await;
    assert_eq!(picked(&web, 30), set(&["a", "b", "c"]));
    second.shutdown().await.unwrap();
}
