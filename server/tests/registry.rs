//! Registry RPCs end to end against a real server on 127.0.0.1:0: the seed calls, health, weight
//! defaulting, policies, and a table of malformed requests that must be rejected with the right
//! code, a message naming the field, and no change to the state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use dlb::proto;
use tonic::Code;

#[tokio::test]
async fn seed_rpcs_end_to_end() {
    let server = start().await;
    let mut c = registry(&server).await;

    // Empty default service: UNAVAILABLE, not NOT_FOUND.
    let e = c
        .get_next_server(proto::GetNextServerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    let r = c
        .add_server(add("", "a", "10.0.0.1:80", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.service, "default");
    let a = r.server.unwrap();
    assert_eq!(a.weight, 1, "weight 0 means unset and defaults to 1");
    assert_eq!(a.health, proto::HealthStatus::Healthy as i32);
    let v1 = r.version.unwrap();
    assert_eq!(v1.epoch, server.epoch());
    c.add_server(add("", "b", "10.0.0.2:80", 3)).await.unwrap();

    // Both are picked.
    let mut seen = HashSet::new();
    for _ in 0..20 {
        let r = c
            .get_next_server(proto::GetNextServerRequest::default())
            .await
            .unwrap()
            .into_inner();
        seen.insert(r.server.unwrap().server_id);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // b fails its health check: never picked.
    let r = c
        .health_check_failed(hc("", "b"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.server.unwrap().health,
        proto::HealthStatus::Unhealthy as i32
    );
    for _ in 0..20 {
        let r = c
            .get_next_server(proto::GetNextServerRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.server.unwrap().server_id, "a");
    }
    // a fails too: UNAVAILABLE.
    c.health_check_failed(hc("", "a")).await.unwrap();
    let e = c
        .get_next_server(proto::GetNextServerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    // b passes again: it is back.
    c.health_check_passed(hc("", "b")).await.unwrap();
    let r = c
        .get_next_server(proto::GetNextServerRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.server.unwrap().server_id, "b");

    // Passing an already healthy backend is a no-op: same version.
    let before = c
        .health_check_passed(hc("", "b"))
        .await
        .unwrap()
        .into_inner();
    let again = c
        .health_check_passed(hc("", "b"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.version, again.version);

    // Remove b: only a remains, and it is unhealthy.
    let r = c
        .remove_server(proto::RemoveServerRequest {
            service: String::new(),
            server_id: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.version.unwrap().version > before.version.unwrap().version);
    let list = c
        .list_servers(proto::ListServersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = list.servers.iter().map(|s| s.server_id.as_str()).collect();
    assert_eq!(ids, ["a"]);
    let e = c
        .get_next_server(proto::GetNextServerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn services_policies_and_updates() {
    let server = start().await;
    let mut c = registry(&server).await;
    // AddServer creates a service.
    c.add_server(add("web", "w1", "web-1.internal:8080", 2))
        .await
        .unwrap();
    let e = c
        .get_policy(proto::GetPolicyRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("nope"), "{}", e.message());

    let p = c
        .set_policy(proto::SetPolicyRequest {
            service: "web".into(),
            policy: Some(proto::Policy {
                algorithm: proto::Algorithm::Maglev as i32,
                bounded_load_factor: 1.25,
                sticky_mode: proto::StickyMode::Fallback as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.policy.unwrap().algorithm, proto::Algorithm::Maglev as i32);
    // Unspecified algorithm keeps the current one.
    let p2 = c
        .set_policy(proto::SetPolicyRequest {
            service: "web".into(),
            policy: Some(proto::Policy {
                bounded_load_factor: 2.0,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        p2.policy.unwrap().algorithm,
        proto::Algorithm::Maglev as i32
    );
    assert_eq!(p2.version.unwrap().version, p.version.unwrap().version + 1);

    // Sticky + key: the same key maps to the same backend.
    c.add_server(add("web", "w2", "web-2.internal:8080", 2))
        .await
        .unwrap();
    let pick = |key: &'static [u8]| proto::GetNextServerRequest {
        service: "web".into(),
        key: key.to_vec(),
    };
    let first = c
        .get_next_server(pick(b"user-1"))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..5 {
        let again = c
            .get_next_server(pick(b"user-1"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again.server, first.server);
    }

    // UpdateServer: drain w1, change weight and metadata of w2.
    let r = c
        .update_server(proto::UpdateServerRequest {
            service: "web".into(),
            server_id: "w2".into(),
            weight: Some(7),
            replace_metadata: true,
            metadata: HashMap::from([("zone".to_string(), "b".to_string())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let w2 = r.server.unwrap();
    assert_eq!(w2.weight, 7);
    assert_eq!(w2.metadata.get("zone").map(String::as_str), Some("b"));
    c.update_server(proto::UpdateServerRequest {
        service: "web".into(),
        server_id: "w1".into(),
        draining: Some(true),
        ..Default::default()
    })
    .await
    .unwrap();
    for _ in 0..10 {
        let r = c.get_next_server(pick(b"")).await.unwrap().into_inner();
        assert_eq!(r.server.unwrap().server_id, "w2");
    }

    let services = c
        .list_services(proto::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .services;
    let names: Vec<_> = services.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(names, ["default", "web"]);
    assert_eq!(services[1].servers, 2);
    assert_eq!(services[1].eligible, 1);
    server.shutdown().await.unwrap();
}

/// One malformed call: what it is, and the expected code and field named in the message.
/// (A test table: the policy variant is large since the call-path fields, and that is fine.)
#[allow(clippy::large_enum_variant)]
enum Bad {
    Add(proto::AddServerRequest),
    Remove(proto::RemoveServerRequest),
    Update(proto::UpdateServerRequest),
    Passed(proto::HealthCheckRequest),
    Failed(proto::HealthCheckRequest),
    Policy(proto::SetPolicyRequest),
    List(proto::ListServersRequest),
    Next(proto::GetNextServerRequest),
}

fn policy(algorithm: i32, c: f64, sticky: i32) -> proto::SetPolicyRequest {
    proto::SetPolicyRequest {
        service: String::new(),
        policy: Some(proto::Policy {
            algorithm,
            bounded_load_factor: c,
            sticky_mode: sticky,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn malformed_requests_are_rejected_and_change_nothing() {
    let server = start().await;
    let mut c = registry(&server).await;
    c.add_server(add("", "a", "10.0.0.1:80", 1)).await.unwrap();
    c.add_server(add("web", "w", "10.0.0.2:80", 1))
        .await
        .unwrap();
    let snapshot = |mut c: proto::registry_client::RegistryClient<tonic::transport::Channel>| async move {
        let mut out = Vec::new();
        for s in ["default", "web"] {
            let l = c
                .list_servers(proto::ListServersRequest { service: s.into() })
                .await
                .unwrap()
                .into_inner();
            out.push(l);
        }
        out.push(proto::ListServersResponse {
            servers: Vec::new(),
            ..Default::default()
        });
        let services = c
            .list_services(proto::ListServicesRequest {})
            .await
            .unwrap()
            .into_inner();
        (out, services)
    };
    let before = snapshot(c.clone()).await;

    let long = "x".repeat(129);
    let mut too_many = HashMap::new();
    for i in 0..65 {
        too_many.insert(format!("k{i}"), "v".to_string());
    }
    let inv = Code::InvalidArgument;
    let cases: Vec<(&str, Bad, Code, &str)> = vec![
        (
            "id with space",
            Bad::Add(add("", "a b", "10.0.0.9:80", 1)),
            inv,
            "server_id",
        ),
        (
            "empty id",
            Bad::Add(add("", "", "10.0.0.9:80", 1)),
            inv,
            "server_id",
        ),
        (
            "id too long",
            Bad::Add(add("", &long, "10.0.0.9:80", 1)),
            inv,
            "server_id",
        ),
        (
            "id with slash",
            Bad::Add(add("", "a/b", "10.0.0.9:80", 1)),
            inv,
            "server_id",
        ),
        (
            "no port",
            Bad::Add(add("", "n", "10.0.0.9", 1)),
            inv,
            "address",
        ),
        (
            "port 0",
            Bad::Add(add("", "n", "10.0.0.9:0", 1)),
            inv,
            "address",
        ),
        (
            "port too big",
            Bad::Add(add("", "n", "10.0.0.9:65536", 1)),
            inv,
            "address",
        ),
        (
            "bad ipv4",
            Bad::Add(add("", "n", "300.0.0.1:80", 1)),
            inv,
            "address",
        ),
        (
            "unbracketed ipv6",
            Bad::Add(add("", "n", "::1:80", 1)),
            inv,
            "address",
        ),
        (
            "empty address",
            Bad::Add(add("", "n", "", 1)),
            inv,
            "address",
        ),
        (
            "bad host",
            Bad::Add(add("", "n", "bad_host:80", 1)),
            inv,
            "address",
        ),
        (
            "weight too big",
            Bad::Add(add("", "n", "10.0.0.9:80", 10_001)),
            inv,
            "weight",
        ),
        (
            "bad service name",
            Bad::Add(add("we b", "n", "10.0.0.9:80", 1)),
            inv,
            "service",
        ),
        (
            "service too long",
            Bad::Add(add(&long, "n", "10.0.0.9:80", 1)),
            inv,
            "service",
        ),
        (
            "bad hash key",
            Bad::Add(proto::AddServerRequest {
                hash_key: "h k".into(),
                ..add("", "n", "10.0.0.9:80", 1)
            }),
            inv,
            "hash_key",
        ),
        (
            "empty metadata key",
            Bad::Add(proto::AddServerRequest {
                metadata: HashMap::from([(String::new(), "v".to_string())]),
                ..add("", "n", "10.0.0.9:80", 1)
            }),
            inv,
            "metadata",
        ),
        (
            "metadata value too long",
            Bad::Add(proto::AddServerRequest {
                metadata: HashMap::from([("k".to_string(), "v".repeat(257))]),
                ..add("", "n", "10.0.0.9:80", 1)
            }),
            inv,
            "metadata",
        ),
        (
            "too many metadata entries",
            Bad::Add(proto::AddServerRequest {
                metadata: too_many,
                ..add("", "n", "10.0.0.9:80", 1)
            }),
            inv,
            "metadata",
        ),
        (
            "duplicate id",
            Bad::Add(add("", "a", "10.0.0.9:80", 1)),
            Code::AlreadyExists,
            "server_id",
        ),
        (
            "remove unknown",
            Bad::Remove(proto::RemoveServerRequest {
                service: String::new(),
                server_id: "ghost".into(),
                ..Default::default()
            }),
            Code::NotFound,
            "ghost",
        ),
        (
            "remove from unknown service",
            Bad::Remove(proto::RemoveServerRequest {
                service: "nosvc".into(),
                server_id: "a".into(),
                ..Default::default()
            }),
            Code::NotFound,
            "nosvc",
        ),
        (
            "remove bad id",
            Bad::Remove(proto::RemoveServerRequest {
                service: String::new(),
                server_id: "a b".into(),
                ..Default::default()
            }),
            inv,
            "server_id",
        ),
        (
            "update unknown",
            Bad::Update(proto::UpdateServerRequest {
                server_id: "ghost".into(),
                weight: Some(2),
                ..Default::default()
            }),
            Code::NotFound,
            "ghost",
        ),
        (
            "update weight 0",
            Bad::Update(proto::UpdateServerRequest {
                server_id: "a".into(),
                weight: Some(0),
                ..Default::default()
            }),
            inv,
            "weight",
        ),
        (
            "update bad address",
            Bad::Update(proto::UpdateServerRequest {
                server_id: "a".into(),
                address: Some("nope".into()),
                ..Default::default()
            }),
            inv,
            "address",
        ),
        (
            "passed unknown",
            Bad::Passed(hc("", "ghost")),
            Code::NotFound,
            "ghost",
        ),
        (
            "failed unknown",
            Bad::Failed(hc("", "ghost")),
            Code::NotFound,
            "ghost",
        ),
        (
            "failed unknown service",
            Bad::Failed(hc("nosvc", "a")),
            Code::NotFound,
            "nosvc",
        ),
        ("failed bad id", Bad::Failed(hc("", "")), inv, "server_id"),
        (
            "bad algorithm",
            Bad::Policy(policy(99, 0.0, 0)),
            inv,
            "policy.algorithm",
        ),
        (
            "load factor below 1",
            Bad::Policy(policy(proto::Algorithm::Maglev as i32, 0.5, 0)),
            inv,
            "policy.bounded_load_factor",
        ),
        (
            "load factor on round robin",
            Bad::Policy(policy(proto::Algorithm::RoundRobin as i32, 1.5, 0)),
            inv,
            "policy.bounded_load_factor",
        ),
        (
            "load factor NaN",
            Bad::Policy(policy(proto::Algorithm::RingHash as i32, f64::NAN, 0)),
            inv,
            "policy.bounded_load_factor",
        ),
        (
            "bad sticky mode",
            Bad::Policy(policy(proto::Algorithm::RoundRobin as i32, 0.0, 7)),
            inv,
            "policy.sticky_mode",
        ),
        (
            "policy unset",
            Bad::Policy(proto::SetPolicyRequest {
                service: String::new(),
                policy: None,
                ..Default::default()
            }),
            inv,
            "policy",
        ),
        (
            "list unknown service",
            Bad::List(proto::ListServersRequest {
                service: "nosvc".into(),
            }),
            Code::NotFound,
            "nosvc",
        ),
        (
            "pick unknown service",
            Bad::Next(proto::GetNextServerRequest {
                service: "nosvc".into(),
                key: Vec::new(),
            }),
            Code::NotFound,
            "nosvc",
        ),
        // Hostile sizes: the message quotes a short prefix and stays small.
        (
            "9 KB server id",
            Bad::Add(add("", &"i".repeat(9_000), "10.0.0.9:80", 1)),
            inv,
            "server_id",
        ),
        (
            "9 KB address",
            Bad::Add(add("", "big", &format!("{}:80", "h".repeat(9_000)), 1)),
            inv,
            "address",
        ),
        (
            "9 KB metadata key",
            Bad::Add(proto::AddServerRequest {
                metadata: [("k".repeat(9_000), "v".to_string())].into_iter().collect(),
                ..add("", "big", "10.0.0.9:80", 1)
            }),
            inv,
            "metadata",
        ),
        (
            "remove a 9 KB id",
            Bad::Remove(proto::RemoveServerRequest {
                server_id: "r".repeat(9_000),
                ..Default::default()
            }),
            inv,
            "server_id",
        ),
        (
            "4 MiB pick key",
            Bad::Next(proto::GetNextServerRequest {
                service: String::new(),
                key: vec![7; 4 << 20],
            }),
            inv,
            "key",
        ),
        (
            "sticky TTL over 7 days",
            Bad::Policy(proto::SetPolicyRequest {
                policy: Some(proto::Policy {
                    algorithm: proto::Algorithm::RoundRobin as i32,
                    sticky_mode: proto::StickyMode::Strict as i32,
                    sticky_ttl_seconds: 604_801,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            inv,
            "sticky_ttl_seconds",
        ),
        (
            "stale expected_version",
            Bad::Update(proto::UpdateServerRequest {
                server_id: "a".into(),
                weight: Some(9),
                expected_version: Some(1),
                ..Default::default()
            }),
            Code::FailedPrecondition,
            "expected",
        ),
        (
            "expected_version 0 on an existing service",
            Bad::Add(proto::AddServerRequest {
                expected_version: Some(0),
                ..add("", "new", "10.0.0.9:80", 1)
            }),
            Code::FailedPrecondition,
            "expected",
        ),
    ];
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for (name, call, code, field) in cases {
        let status = match call {
            Bad::Add(r) => c.add_server(r).await.map(|_| ()),
            Bad::Remove(r) => c.remove_server(r).await.map(|_| ()),
            Bad::Update(r) => c.update_server(r).await.map(|_| ()),
            Bad::Passed(r) => c.health_check_passed(r).await.map(|_| ()),
            Bad::Failed(r) => c.health_check_failed(r).await.map(|_| ()),
            Bad::Policy(r) => c.set_policy(r).await.map(|_| ()),
            Bad::List(r) => c.list_servers(r).await.map(|_| ()),
            Bad::Next(r) => c.get_next_server(r).await.map(|_| ()),
        }
        .expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(
            status.message().len() <= 512,
            "{name}: a {}-byte message",
            status.message().len()
        );
        assert!(
            status.message().contains(field),
            "{name}: message {:?} does not name {field:?}",
            status.message()
        );
    }
    let after = snapshot(c.clone()).await;
    assert_eq!(before, after, "a rejected call changed the state");
    server.shutdown().await.unwrap();
}
