//! SDK failover and the data plane outliving the control plane:
//!
//! * a client started with a snapshot file while no control plane is reachable routes on the
//!   saved state (stale, with its real age), then resumes from the saved versions with deltas
//!   once a control plane of the same store history comes back;
//! * a control plane that stays connected but stops talking (a stuck replica) is abandoned
//!   after the update deadline for the next endpoint, while picks go on.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use dlb_client::{Client, NewServer};
use dlb_server::StoreConfig;

#[tokio::test]
async fn a_client_starts_from_its_snapshot_file_then_resumes_with_deltas() {
    let data = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("routing.pb");
    let mut cfg = config(vec![]);
    cfg.store = StoreConfig::Embedded(data.path().to_path_buf());
    let first = dlb_server::spawn(cfg.clone()).await.unwrap();
    let addr = first.grpc_addr();

    // A client that follows "web" keeps its state in the file.
    let client = Client::builder([format!("http://{addr}")])
        .snapshot_file(&file)
        .connect()
        .await
        .unwrap();
    let web = within("web", client.service("web")).await.unwrap();
    web.add_server("a", "127.0.0.1:9001", 1).await.unwrap();
    let r = web
        .add_server_with(NewServer::new("b", "127.0.0.1:9002"))
        .await
        .unwrap();
    converge(&web, r.version).await;
    let saved_version = web.version();
    // The file is written at most once a second while the state changes, and once more when
    // the client closes.
    eventually("the snapshot file to be written", || file.exists()).await;
    client.close();
    drop(web);
    drop(client);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    within("shutdown", first.shutdown()).await.unwrap();

    // No control plane: the client starts anyway and routes on the file, stale.
    let client = Client::builder([format!("http://{addr}")])
        .snapshot_file(&file)
        .connect_timeout(Duration::from_millis(300))
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect()
        .await
        .expect("a client with a snapshot file starts without a control plane");
    assert!(!client.is_connected());
    let web = within("web from the file", client.service("web"))
        .await
        .unwrap();
    assert!(web.is_stale(), "state from the file must be marked stale");
    assert_eq!(web.version(), saved_version);
    assert!(web.last_update_age().unwrap() >= Duration::from_secs(1));
    assert_eq!(picked(&web, 20), set(&["a", "b"]));
    let call = web.get_next_server(None).unwrap();
    call.success();

    // The control plane comes back on the same store: the client resumes with a delta.
    cfg.listen = addr;
    let second = respawn(&cfg).await;
    eventually("the client to resume", || {
        client.is_connected() && !web.is_stale()
    })
    .await;
    let stats = web.stats();
    assert_eq!(stats.full_updates, 1, "only the file's snapshot: {stats:?}");
    assert!(
        stats.delta_updates >= 1,
        "resumed without a delta: {stats:?}"
    );
    let r = web.add_server("c", "127.0.0.1:9003", 1).await.unwrap();
    converge(&web, r.version).await;
    assert_eq!(picked(&web, 30), set(&["a", "b", "c"]));
    second.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_corrupt_snapshot_file_is_ignored() {
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("routing.pb");
    std::fs::write(&file, b"not a snapshot").unwrap();
    let server = spawn_server().await;
    let client = Client::builder([endpoint(&server)])
        .snapshot_file(&file)
        .connect()
        .await
        .unwrap();
    let web = within("web", client.service("web")).await.unwrap();
    assert!(!web.is_stale());
    // Without a control plane and with a corrupt file, a client fails to start as without one.
    let unreachable = Client::builder(["http://127.0.0.1:1"])
        .snapshot_file(files.path().join("missing.pb"))
        .connect_timeout(Duration::from_millis(200))
        .connect()
        .await;
    assert!(unreachable.is_err());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_silent_control_plane_is_abandoned_after_the_update_deadline() {
    // `stuck` is a proxy that, once frozen, keeps the connection open but forwards nothing
    // (a replica that is connected but stuck); `live` is a healthy second endpoint on the same store.
    let live = spawn_server().await;
    let stuck = Proxy::start(live.grpc_addr()).await;
    let client = Client::builder([format!("http://{}", stuck.addr), endpoint(&live)])
        .update_deadline(Duration::from_millis(800))
        .keepalive(Duration::from_secs(30), Duration::from_secs(30))
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    // Writes go straight to the live endpoint (the admin calls of `client` would try the stuck
    // one first and wait for their own timeout).
    let admin = Client::connect([endpoint(&live)]).await.unwrap();
    let add = |id: &'static str, port: u16| {
        let admin = admin.clone();
        async move {
            admin
                .admin()
                .add_server("web", NewServer::new(id, format!("127.0.0.1:{port}")))
                .await
                .unwrap()
        }
    };
    let web = within("web", client.service("web")).await.unwrap();
    let r = add("a", 9001).await;
    converge(&web, r.version).await;
    assert_eq!(client.current_endpoint(), format!("http://{}", stuck.addr));
    stuck.freeze();
    let r = add("b", 9002).await;
    // Picks go on during the gap; the client fails over and receives the write.
    assert_eq!(picked(&web, 10), set(&["a"]));
    converge(&web, r.version).await;
    assert!(client.update_deadline_expiries() >= 1);
    assert_eq!(client.current_endpoint(), endpoint(&live));
    assert_eq!(picked(&web, 20), set(&["a", "b"]));
    live.shutdown().await.unwrap();
}
