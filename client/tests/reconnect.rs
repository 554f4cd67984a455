//! Reconnection: the SDK keeps routing on its snapshot while the control plane is gone, takes a
//! full snapshot from a restarted control plane (new epoch), and resumes with a delta when it
//! reconnects to a control plane that knows the version it holds.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use dlb_client::{AdminClient, Client, NewServer};

#[tokio::test]
async fn restarted_control_plane_sends_a_full_snapshot_and_routing_survives_the_gap() {
    let first = dlb_server::spawn(config(vec![service_with("web", &["a", "b"])]))
        .await
        .unwrap();
    let addr = first.grpc_addr();
    let client = Client::builder([format!("http://{addr}")])
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let web = within("web", client.service("web")).await.unwrap();
    assert_eq!(picked(&web, 10), set(&["a", "b"]));
    let before = web.version();
    assert_ne!(before.epoch, 0);

    within("shutdown", first.shutdown()).await.unwrap();
    eventually("the client to notice", || !client.is_connected()).await;
    // The data plane outlives the control plane.
    assert_eq!(picked(&web, 10), set(&["a", "b"]));
    assert!(!web.is_connected());
    assert_eq!(web.version(), before);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(web.last_update_age().unwrap() >= Duration::from_millis(50));

    // A new control plane on the same port, new epoch, a changed set that keeps half of the
    // backends routed to (a set keeping fewer would be held back: restart flooding).
    let mut cfg = config(vec![service_with("web", &["a", "c"])]);
    cfg.listen = addr;
    let second = respawn(&cfg).await;
    let mut changed = web.changed();
    within(
        "the new epoch",
        changed.wait_for(|v| v.epoch != before.epoch),
    )
    .await
    .unwrap();
    assert!(client.is_connected());
    assert_eq!(picked(&web, 20), set(&["a", "c"]));
    let stats = web.stats();
    assert_eq!(stats.full_updates, 2, "{stats:?}");
    assert!(client.sessions_established() >= 2);
    second.shutdown().await.unwrap();
}

#[tokio::test]
async fn reconnecting_with_a_known_version_resumes_with_a_delta() {
    let server = dlb_server::spawn(config(vec![service_with("web", &["a"])]))
        .await
        .unwrap();
    let proxy = Proxy::start(server.grpc_addr()).await;
    let client = Client::builder([format!("http://{}", proxy.addr)])
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let web = within("web", client.service("web")).await.unwrap();
    assert_eq!(picked(&web, 5), set(&["a"]));
    assert_eq!(web.stats().full_updates, 1);

    // Lose the session while the server stays up; change the service meanwhile.
    proxy.pause();
    eventually("the client to notice", || !client.is_connected()).await;
    let admin = AdminClient::new([endpoint(&server)]).unwrap();
    let r = admin
        .add_server("web", NewServer::new("b", "127.0.0.1:9100"))
        .await
        .unwrap();
    assert_eq!(picked(&web, 5), set(&["a"]), "still on the old snapshot");

    proxy.resume();
    converge(&web, r.version).await;
    assert_eq!(picked(&web, 10), set(&["a", "b"]));
    let stats = web.stats();
    assert_eq!(
        stats.full_updates, 1,
        "resumed without a full snapshot: {stats:?}"
    );
    assert!(stats.delta_updates >= 1, "{stats:?}");
    assert_eq!(stats.nacks, 0, "{stats:?}");
    assert!(client.sessions_established() >= 2);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn rotates_to_the_next_endpoint() {
    // The first endpoint has nothing listening.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let server = spawn_server().await;
    let client = Client::builder([format!("http://{dead}"), endpoint(&server)])
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    assert_eq!(client.current_endpoint(), endpoint(&server));
    // Admin calls skip the dead endpoint too.
    let r = client.add_server("a", "127.0.0.1:8001", 1).await.unwrap();
    let default = client.default_service().await.unwrap();
    converge(&default, r.version).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_empty_snapshot_from_a_restarted_control_plane_is_held_back() {
    let first = dlb_server::spawn(config(vec![service_with("web", &["a", "b"])]))
        .await
        .unwrap();
    let addr = first.grpc_addr();
    let client = Client::builder([format!("http://{addr}")])
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let web = within("web", client.service("web")).await.unwrap();
    assert_eq!(picked(&web, 10), set(&["a", "b"]));
    within("shutdown", first.shutdown()).await.unwrap();
    eventually("the client to notice", || !client.is_connected()).await;

    // The restarted control plane lost its state: "web" exists but is empty.
    let mut cfg = config(vec![service_with("web", &[])]);
    cfg.listen = addr;
    let second = respawn(&cfg).await;
    eventually("the empty snapshot to be held back", || {
        web.stats().held_back == 1
    })
    .await;
    assert!(web.is_stale());
    assert_eq!(
        picked(&web, 10),
        set(&["a", "b"]),
        "still routing on the old set"
    );

    // The first re-registered backend would take 100 % of the traffic: still held (the
    // restart-flooding rule: fewer than half of the routed backends are back).
    web.add_server("c", "127.0.0.1:9300", 1).await.unwrap();
    eventually("the update to be held back too", || {
        web.stats().held_back >= 2
    })
    .await;
    assert!(web.is_stale());
    assert_eq!(picked(&web, 10), set(&["a", "b"]));
    // Once half of them are back, routing follows the new control plane.
    let r = web.add_server("a", "127.0.0.1:9100", 1).await.unwrap();
    converge(&web, r.version).await;
    assert!(!web.is_stale());
    assert_eq!(picked(&web, 20), set(&["a", "c"]));
    // A deliberate removal through the same control plane empties it.
    web.remove_server("a").await.unwrap();
    let r = web.remove_server("c").await.unwrap();
    converge(&web, r.version).await;
    assert!(web.backends().is_empty());
    assert!(web.get_next_server(None).is_err());
    second.shutdown().await.unwrap();
}
