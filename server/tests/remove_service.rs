//! `RemoveService` on a real server, and services created by self-registration going with
//! their last lease: a non-empty service is refused naming the count unless forced, a missing
//! one is NOT_FOUND; the removal takes the policy (health check included) and the cache entry,
//! sessions and xDS streams following it are told it does not exist, it frees its quota place
//! and the name can be used again. A lease-created service goes when its last lease expires or
//! is deregistered; a configured one (policy set) stays.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use dlb::proto::{self, membership_client::MembershipClient, server_message};
use dlb_server::api::xds::resources::CLUSTER;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(15);

fn remove(service: &str, force: bool) -> proto::RemoveServiceRequest {
    proto::RemoveServiceRequest {
        service: service.into(),
        force,
        ..Default::default()
    }
}

#[tokio::test]
async fn remove_service_refuses_non_empty_and_tells_followers() {
    let server = start().await;
    let mut reg = registry(&server).await;
    let err = reg
        .remove_service(remove("nosuch", false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    for id in ["a", "b"] {
        reg.add_server(add("web", id, "127.0.0.1:1001", 1))
            .await
            .unwrap();
    }
    let mut hc_policy = dlb::model::default_policy();
    hc_policy.health_check = Some(proto::HealthCheck {
        kind: Some(proto::health_check::Kind::Tcp(Default::default())),
        ..Default::default()
    });
    reg.set_policy(proto::SetPolicyRequest {
        service: "web".into(),
        policy: Some(hc_policy),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut session = Session::open(&server, subscribe(&[("web", None)])).await;
    assert_eq!(session.update().await.upserts.len(), 2);
    // An xDS client following the cluster.
    let mut ads = AggregatedDiscoveryServiceClient::new(channel(&server).await);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut stream = ads
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DiscoveryRequest {
        type_url: CLUSTER.into(),
        resource_names: vec!["web".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let first = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.resources.len(), 1);
    tx.send(DiscoveryRequest {
        type_url: CLUSTER.into(),
        resource_names: vec!["web".into()],
        version_info: first.version_info.clone(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Not empty: refused, naming the count; nothing changes.
    let err = reg.remove_service(remove("web", false)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("2 backend"), "{err:?}");
    assert!(server
        .store()
        .get_service("web".into())
        .await
        .unwrap()
        .is_some());

    // Forced: gone, with its backends, policy and health check.
    let r = reg
        .remove_service(remove("web", true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.service.as_str(), r.removed_servers), ("web", 2));
    assert!(server
        .store()
        .get_service("web".into())
        .await
        .unwrap()
        .is_none());
    let err = reg
        .get_policy(proto::GetPolicyRequest {
            service: "web".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = reg
        .get_next_server(proto::GetNextServerRequest {
            service: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let services = reg
        .list_services(proto::ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .services;
    assert!(services.iter().all(|s| s.service != "web"), "{services:?}");
    // The session is told it does not exist; the xDS stream gets a response without it.
    match session.next().await {
        server_message::Kind::NotFound(nf) => assert_eq!(nf.service, "web"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    let after = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("no xDS response after the removal")
        .unwrap()
        .unwrap();
    assert!(after.resources.is_empty(), "{after:?}");

    // The name can be used again, from scratch (the default policy: no health check).
    reg.add_server(add("web", "c", "127.0.0.1:1002", 1))
        .await
        .unwrap();
    let u = session.update().await;
    assert!(u.full);
    assert_eq!(u.upserts.len(), 1);
    let p = reg
        .get_policy(proto::GetPolicyRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(p.policy.unwrap().health_check.is_none());
    drop(tx);
    server.shutdown().await.unwrap();
}

async fn eventually_gone(server: &dlb_server::RunningServer, service: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while server
        .store()
        .get_service(service.into())
        .await
        .unwrap()
        .is_some()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service} stayed after its last lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lease(service: &str, id: &str, ttl: u32) -> proto::RegisterRequest {
    proto::RegisterRequest {
        service: service.into(),
        server_id: id.into(),
        address: "10.0.0.1:80".into(),
        ttl_seconds: ttl,
        ..Default::default()
    }
}

#[tokio::test]
async fn lease_created_services_go_with_their_last_lease() {
    let server = start().await;
    let mut m = MembershipClient::new(channel(&server).await);
    let mut reg = registry(&server).await;
    // Expiry: created by a lease, gone when it expires.
    m.register(lease("auto", "a1", 1)).await.unwrap();
    assert!(server
        .store()
        .get_service("auto".into())
        .await
        .unwrap()
        .is_some());
    eventually_gone(&server, "auto").await;

    // Deregistration of the last lease: gone at once.
    m.register(lease("dereg", "d1", 60)).await.unwrap();
    m.register(lease("dereg", "d2", 60)).await.unwrap();
    m.deregister(proto::DeregisterRequest {
        service: "dereg".into(),
        server_id: "d1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        server
            .store()
            .get_service("dereg".into())
            .await
            .unwrap()
            .is_some(),
        "removed while a lease remained"
    );
    m.deregister(proto::DeregisterRequest {
        service: "dereg".into(),
        server_id: "d2".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(server
        .store()
        .get_service("dereg".into())
        .await
        .unwrap()
        .is_none());

    // Configured by an operator (policy set): it stays, empty.
    m.register(lease("kept", "k1", 1)).await.unwrap();
    let mut policy = dlb::model::default_policy();
    policy.algorithm = proto::Algorithm::Maglev as i32;
    reg.set_policy(proto::SetPolicyRequest {
        service: "kept".into(),
        policy: Some(policy),
        ..Default::default()
    })
    .await
    .unwrap();
    // An API-owned backend next to a lease keeps it too.
    m.register(lease("mixed", "m1", 1)).await.unwrap();
    reg.add_server(add("mixed", "api", "127.0.0.1:1003", 1))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let kept = server.store().get_service("kept".into()).await.unwrap();
        let mixed = server.store().get_service("mixed".into()).await.unwrap();
        let kept = kept.expect("a configured service was removed");
        let mixed = mixed.expect("a service with an API backend was removed");
        if kept.servers.is_empty() && mixed.servers.len() == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "leases did not expire"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await.unwrap();
}
