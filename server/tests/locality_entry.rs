//! Locality and priority through the entry points other than `AddServer`/`UpdateServer`, on a
//! real server: `Membership.Register` (stored, a re-register with a new locality updates the
//! record, bad input is INVALID_ARGUMENT naming the field and changes nothing), `DeclareDns`
//! (every discovered backend gets the declaration's locality and priority, `ListDns` shows them,
//! a re-declaration rewrites the backends) and the YAML configuration.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod fake_dns;

use std::time::Duration;

use common::*;
use dlb::proto::{self, membership_client::MembershipClient};
use dlb_server::membership::dns::DnsConfig;
use dlb_server::{RunningServer, ServerConfig};
use fake_dns::FakeDns;
use tonic::transport::Channel;

/// Upper bound of every wait (generous: this VM stalls for seconds).
const DEADLINE: Duration = Duration::from_secs(30);

fn loc(region: &str, zone: &str, sub_zone: &str) -> proto::Locality {
    proto::Locality {
        region: region.into(),
        zone: zone.into(),
        sub_zone: sub_zone.into(),
    }
}

async fn membership(server: &RunningServer) -> MembershipClient<Channel> {
    MembershipClient::new(channel(server).await)
}

async fn record(server: &RunningServer, service: &str, id: &str) -> Option<proto::Server> {
    let snap = server.store().get_service(service.into()).await.unwrap()?;
    snap.servers.get(id).map(|s| (**s).clone())
}

fn reg(locality: Option<proto::Locality>, priority: u32) -> proto::RegisterRequest {
    proto::RegisterRequest {
        service: "web".into(),
        server_id: "w1".into(),
        address: "10.0.0.1:80".into(),
        ttl_seconds: 30,
        locality,
        priority,
        ..Default::default()
    }
}

#[tokio::test]
async fn register_stores_locality_and_priority_and_refuses_bad_ones() {
    let server = start().await;
    let mut m = membership(&server).await;

    // Bad input first: nothing is created.
    for (req, field) in [
        (reg(Some(loc("eu", "a b", "")), 0), "locality.zone"),
        (reg(Some(loc("", "eu-a", "")), 0), "locality.region"),
        (reg(Some(loc("eu", "", "r1")), 0), "locality.zone"),
        (reg(None, 8), "priority"),
    ] {
        let err = m.register(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    assert!(record(&server, "web", "w1").await.is_none());

    let r = m
        .register(reg(Some(loc("eu", "eu-a", "r1")), 1))
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    let s = r.server.unwrap();
    assert_eq!((s.locality, s.priority), (Some(loc("eu", "eu-a", "r1")), 1));
    let stored = record(&server, "web", "w1").await.unwrap();
    assert_eq!(stored.locality, Some(loc("eu", "eu-a", "r1")));

    // A renewal with the same declaration writes nothing.
    let again = m
        .register(reg(Some(loc("eu", "eu-a", "r1")), 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.version, r.version);

    // A re-register in another zone and priority updates the record in place.
    let moved = m
        .register(reg(Some(loc("eu", "eu-b", "")), 0))
        .await
        .unwrap()
        .into_inner();
    assert!(!moved.created);
    assert!(moved.version.unwrap().version > r.version.unwrap().version);
    let stored = record(&server, "web", "w1").await.unwrap();
    assert_eq!(
        (stored.locality, stored.priority),
        (Some(loc("eu", "eu-b", "")), 0)
    );

    // A bad re-register changes nothing; an empty locality clears it.
    let err = m.register(reg(None, 9)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("priority"), "{}", err.message());
    assert_eq!(
        record(&server, "web", "w1").await.unwrap().locality,
        Some(loc("eu", "eu-b", ""))
    );
    m.register(reg(Some(loc("", "", "")), 0)).await.unwrap();
    assert_eq!(record(&server, "web", "w1").await.unwrap().locality, None);
}

fn declare(locality: Option<proto::Locality>, priority: u32) -> proto::DeclareDnsRequest {
    proto::DeclareDnsRequest {
        service: "web".into(),
        target: "web.test:80".into(),
        weight: 2,
        locality,
        priority,
    }
}

/// Polls until every DNS-owned backend of `web` (there are `n`) has `locality` and `priority`.
async fn wait_backends(
    server: &RunningServer,
    n: usize,
    locality: Option<proto::Locality>,
    priority: u32,
) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let snap = server.store().get_service("web".into()).await.unwrap();
        let have: Vec<_> = snap
            .iter()
            .flat_map(|s| s.servers.values())
            .map(|s| (s.locality.clone(), s.priority))
            .collect();
        if have.len() == n && have.iter().all(|h| *h == (locality.clone(), priority)) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "backends {have:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn declare_dns_gives_every_backend_the_locality_and_priority() {
    let dns = FakeDns::start().await;
    dns.set("web.test", &["10.1.0.1", "10.1.0.2"]);
    let server = start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        dns: DnsConfig {
            nameservers: vec![dns.addr],
            min_refresh: Duration::from_millis(200),
            max_refresh: Duration::from_secs(1),
            timeout: Duration::from_millis(300),
            attempts: 1,
            ..DnsConfig::default()
        },
        ..Default::default()
    })
    .await;
    let mut m = membership(&server).await;

    for (req, field) in [
        (declare(Some(loc("eu", "a b", "")), 0), "locality.zone"),
        (declare(Some(loc("", "eu-a", "")), 0), "locality.region"),
        (declare(None, 8), "priority"),
    ] {
        let err = m.declare_dns(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    assert!(server
        .store()
        .get_service("web".into())
        .await
        .unwrap()
        .is_none());

    let st = m
        .declare_dns(declare(Some(loc("eu", "eu-a", "r1")), 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (st.locality.clone(), st.priority, st.backends),
        (Some(loc("eu", "eu-a", "r1")), 1, 2)
    );
    wait_backends(&server, 2, Some(loc("eu", "eu-a", "r1")), 1).await;
    // A backend discovered later gets them too.
    dns.set("web.test", &["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
    wait_backends(&server, 3, Some(loc("eu", "eu-a", "r1")), 1).await;

    // A re-declaration with a new locality rewrites the backends in place; ListDns shows it.
    m.declare_dns(declare(Some(loc("eu", "eu-b", "")), 2))
        .await
        .unwrap();
    wait_backends(&server, 3, Some(loc("eu", "eu-b", "")), 2).await;
    let listed = m
        .list_dns(proto::ListDnsRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (listed.names[0].locality.clone(), listed.names[0].priority),
        (Some(loc("eu", "eu-b", "")), 2)
    );
    // Refreshes keep them (the followed name carries the new template, not the old one).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_backends(&server, 3, Some(loc("eu", "eu-b", "")), 2).await;
}

#[tokio::test]
async fn yaml_backends_carry_locality_and_priority() {
    let mut cfg = ServerConfig::from_yaml_str(
        "services:
  - name: web
    policy:
      locality: { cross_zone_budget_percent: 10 }
    backends:
      - id: a
        address: 10.0.0.1:80
        locality: { region: eu, zone: eu-a }
        priority: 1
",
    )
    .unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.metrics_listen = None;
    let server = start_with(cfg).await;
    let a = record(&server, "web", "a").await.unwrap();
    assert_eq!((a.locality, a.priority), (Some(loc("eu", "eu-a", "")), 1));
}
