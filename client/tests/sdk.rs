//! The seed API end to end through the SDK against a real `dlbd`: every write converges in the
//! local picker, picks are local, errors map to the right variants.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use dlb::proto;
use dlb_client::{Client, Error, ServerUpdate};

async fn client_for(server: &dlb_server::RunningServer) -> Client {
    within(
        "connect",
        Client::builder([endpoint(server)])
            .report_interval(Duration::from_millis(50))
            .connect(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn seed_api_on_the_default_service_converges_locally() {
    let server = spawn_server().await;
    let client = client_for(&server).await;
    assert!(client.is_connected());
    let default = within("default service", client.default_service())
        .await
        .unwrap();
    assert!(matches!(
        default.get_next_server(None),
        Err(Error::NoBackend { .. })
    ));

    // add_server
    let r = client.add_server("a", "127.0.0.1:8001", 1).await.unwrap();
    converge(&default, r.version).await;
    assert_eq!(picked(&default, 10), set(&["a"]));
    client.add_server("b", "127.0.0.1:8002", 2).await.unwrap();
    let r = client.add_server("c", "127.0.0.1:8003", 3).await.unwrap();
    converge(&default, r.version).await;
    assert_eq!(picked(&default, 60), set(&["a", "b", "c"]));
    assert_eq!(default.version(), r.version.unwrap().into());

    // health_check_failed / passed
    let r = client.health_check_failed("b").await.unwrap();
    assert_eq!(
        r.server.unwrap().health,
        proto::HealthStatus::Unhealthy as i32
    );
    converge(&default, r.version).await;
    assert_eq!(picked(&default, 60), set(&["a", "c"]));
    let b = default
        .backends()
        .into_iter()
        .find(|b| b.server_id == "b")
        .unwrap();
    assert!(!b.eligible);
    let r = client.health_check_passed("b").await.unwrap();
    converge(&default, r.version).await;
    assert_eq!(picked(&default, 60), set(&["a", "b", "c"]));

    // remove_server
    let r = client.remove_server("c").await.unwrap();
    converge(&default, r.version).await;
    assert_eq!(picked(&default, 60), set(&["a", "b"]));
    assert_eq!(default.backends().len(), 2);

    // get_next_server: local on the default service, and server-side.
    let g = client.get_next_server(None).await.unwrap();
    assert!(["a", "b"].contains(&g.server_id()));
    g.success();
    let remote = client.get_next_server_remote(None).await.unwrap();
    assert!(["a", "b"].contains(&remote.server.unwrap().server_id.as_str()));

    // update_server: drain a
    let mut u = ServerUpdate::new("a");
    u.draining = Some(true);
    let r = client.update_server(u).await.unwrap();
    converge(&default, r.version).await;
    assert_eq!(picked(&default, 20), set(&["b"]));
    let list = client.list_servers().await.unwrap();
    assert_eq!(list.servers.len(), 2);
    assert!(list
        .servers
        .iter()
        .any(|s| s.server_id == "a" && s.draining));

    // Errors map to their variants.
    assert!(matches!(
        client.add_server("b", "127.0.0.1:8002", 1).await,
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        client.remove_server("nope").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        client.health_check_failed("nope").await,
        Err(Error::NotFound(_))
    ));
    let e = client
        .add_server("a b", "127.0.0.1:1", 1)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
    assert!(e.to_string().contains("server_id"), "{e}");
    let e = client.add_server("x", "127.0.0.1:1", 0).await.unwrap_err();
    assert!(e.to_string().contains("weight"), "{e}");

    // All health failed => no backend.
    let mut u = ServerUpdate::new("a");
    u.draining = Some(false);
    client.update_server(u).await.unwrap();
    client.health_check_failed("a").await.unwrap();
    let r = client.health_check_failed("b").await.unwrap();
    converge(&default, r.version).await;
    assert!(matches!(
        default.get_next_server(None),
        Err(Error::NoBackend { .. })
    ));
    assert!(default.last_update_age().unwrap() < Duration::from_secs(5));
    assert_eq!(default.stats().nacks, 0);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn named_services_policies_and_stickiness() {
    let server = spawn_server().await;
    let client = client_for(&server).await;

    // A service that does not exist yet: the handle says so on pick.
    let web = within("web", client.service("web")).await.unwrap();
    assert!(matches!(
        web.get_next_server(None),
        Err(Error::ServiceNotFound(_))
    ));
    // Creating it (AddServer creates the service) reaches the subscribed handle.
    let r = web.add_server("w1", "10.0.0.1:80", 1).await.unwrap();
    converge(&web, r.version).await;
    assert_eq!(picked(&web, 5), set(&["w1"]));
    web.add_server("w2", "10.0.0.2:80", 1).await.unwrap();
    let r = web.add_server("w3", "10.0.0.3:80", 1).await.unwrap();
    converge(&web, r.version).await;

    // Consistent hashing: the same key maps to the same backend.
    let mut p = web.get_policy().await.unwrap();
    assert_eq!(p.algorithm, proto::Algorithm::RoundRobin as i32);
    p.algorithm = proto::Algorithm::Maglev as i32;
    let r = web.set_policy(p.clone()).await.unwrap();
    converge(&web, r.version).await;
    assert_eq!(
        web.local_policy().unwrap().algorithm,
        proto::Algorithm::Maglev as i32
    );
    let first = web.get_next_server(Some(b"user-1")).unwrap();
    let first_id = first.server_id().to_owned();
    drop(first);
    for _ in 0..20 {
        assert_eq!(
            web.get_next_server(Some(b"user-1")).unwrap().server_id(),
            first_id
        );
    }

    // Strict stickiness: a session stays on its backend, and fails when it is gone.
    p.algorithm = proto::Algorithm::RoundRobin as i32;
    p.sticky_mode = proto::StickyMode::Strict as i32;
    let r = web.set_policy(p.clone()).await.unwrap();
    converge(&web, r.version).await;
    let bound = web
        .get_next_server(Some(b"session-9"))
        .unwrap()
        .server_id()
        .to_owned();
    for _ in 0..10 {
        assert_eq!(
            web.get_next_server(Some(b"session-9")).unwrap().server_id(),
            bound
        );
    }
    let r = web.health_check_failed(&bound).await.unwrap();
    converge(&web, r.version).await;
    match web.get_next_server(Some(b"session-9")) {
        Err(Error::NoBackend { reason, .. }) => {
            assert!(reason.to_string().contains(&bound), "{reason}")
        }
        other => panic!("expected a strict sticky failure, got {other:?}"),
    }
    // Invalid policy is refused locally, naming the field.
    p.bounded_load_factor = 0.5;
    let e = web.set_policy(p).await.unwrap_err();
    assert!(e.to_string().contains("bounded_load_factor"), "{e}");

    // The server-side pick answers for a named service too.
    let remote = web.get_next_server_remote(None).await.unwrap();
    assert!(remote.server.is_some());

    // The same handle is shared by a second subscription.
    let again = client.service("web").await.unwrap();
    assert_eq!(again.version(), web.version());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn call_guards_count_in_flight_across_picker_swaps() {
    let server = spawn_server().await;
    let client = client_for(&server).await;
    let default = client.default_service().await.unwrap();
    let r = client.add_server("a", "127.0.0.1:8001", 1).await.unwrap();
    converge(&default, r.version).await;
    let g1 = default.get_next_server(None).unwrap();
    let g2 = default.get_next_server(None).unwrap();
    assert_eq!(default.backends()[0].in_flight, 2);
    // A new picker generation carries the in-flight count over.
    let r = client.add_server("b", "127.0.0.1:8002", 1).await.unwrap();
    converge(&default, r.version).await;
    let a = |h: &dlb_client::ServiceHandle| {
        h.backends()
            .into_iter()
            .find(|b| b.server_id == "a")
            .unwrap()
            .in_flight
    };
    assert_eq!(a(&default), 2);
    // Guards are 'static + Send: finish one on another task.
    tokio::spawn(async move { g1.failure() }).await.unwrap();
    assert_eq!(a(&default), 1);
    drop(g2);
    assert_eq!(a(&default), 0);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn connect_fails_fast_without_a_control_plane() {
    // A port with nothing listening.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let r = within(
        "connect failure",
        Client::builder([format!("http://{addr}")])
            .connect_timeout(Duration::from_millis(300))
            .connect(),
    )
    .await;
    assert!(matches!(r, Err(Error::Unavailable(_))), "{r:?}");
    let r = Client::connect(["http://[bad"]).await;
    assert!(matches!(r, Err(Error::InvalidEndpoint { .. })), "{r:?}");
}
