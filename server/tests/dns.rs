//! DNS discovery against an in-process DNS server on 127.0.0.1 (UDP, built with hickory-proto
//! through `hickory_resolver::proto`) whose A/AAAA records the tests change, and which can
//! answer SERVFAIL or not answer at all: added and removed addresses reach an SDK-style session,
//! failures keep the last good set, bad declarations are refused, the quota truncates, and a
//! declaration survives a restart of the embedded store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod fake_dns;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use dlb::proto::{self, membership_client::MembershipClient};
use dlb_server::membership::dns::{DnsConfig, DnsDeclaration};
use dlb_server::{RunningServer, ServerConfig};
use fake_dns::{FakeDns, Mode};
use tonic::transport::Channel;

/// Upper bound of every wait (generous: this VM stalls for seconds).
const DEADLINE: Duration = Duration::from_secs(30);

fn dns_config(ns: SocketAddr, services: Vec<DnsDeclaration>) -> DnsConfig {
    DnsConfig {
        nameservers: vec![ns],
        services,
        min_refresh: Duration::from_millis(200),
        max_refresh: Duration::from_secs(1),
        retry_min: Duration::from_millis(200),
        retry_max: Duration::from_millis(400),
        timeout: Duration::from_millis(300),
        attempts: 1,
        ..DnsConfig::default()
    }
}

fn web(target: &str) -> DnsDeclaration {
    DnsDeclaration {
        service: "web".into(),
        target: target.into(),
        weight: 3,
        locality: None,
        priority: 0,
    }
}

async fn start_dns(dns: DnsConfig) -> RunningServer {
    start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        dns,
        ..Default::default()
    })
    .await
}

async fn membership(server: &RunningServer) -> MembershipClient<Channel> {
    MembershipClient::new(channel(server).await)
}

async fn ids(server: &RunningServer, service: &str) -> BTreeSet<String> {
    match server.store().get_service(service.into()).await.unwrap() {
        Some(s) => s.servers.keys().map(|k| k.to_string()).collect(),
        None => BTreeSet::new(),
    }
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

/// Polls (every 20 ms, at most [`DEADLINE`]) until the service's backend ids are `want`.
async fn wait_ids(server: &RunningServer, service: &str, want: &[&str]) {
    let want = set(want);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let have = ids(server, service).await;
        if have == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "service {service}: backends {have:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn dns_status(server: &RunningServer, service: &str) -> proto::DnsStatus {
    let r = membership(server)
        .await
        .list_dns(proto::ListDnsRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    r.names
        .into_iter()
        .next()
        .expect("the service follows a name")
}

/// Polls until the name's status satisfies `cond`.
async fn wait_status(
    server: &RunningServer,
    service: &str,
    what: &str,
    cond: impl Fn(&proto::DnsStatus) -> bool,
) -> proto::DnsStatus {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let s = dns_status(server, service).await;
        if cond(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn added_and_removed_addresses_reach_sessions() {
    let dns = FakeDns::start().await;
    dns.set("web.test", &["127.0.0.1", "127.0.0.2"]);
    let server = start_dns(dns_config(dns.addr, vec![web("web.test:8080")])).await;
    wait_ids(&server, "web", &["127.0.0.1-8080", "127.0.0.2-8080"]).await;

    let s = server
        .store()
        .get_service("web".into())
        .await
        .unwrap()
        .unwrap();
    let rec = s.servers.get("127.0.0.1-8080").unwrap();
    assert_eq!(rec.address, "127.0.0.1:8080");
    assert_eq!(rec.weight, 3);
    assert_eq!(rec.source, proto::BackendSource::Dns as i32);
    assert_eq!(rec.dns_name, "web.test:8080");

    // A session follows the service: the changes arrive as ordinary deltas.
    let mut session = Session::open(&server, subscribe(&[("web", None)])).await;
    let full = session.update().await;
    assert!(full.full);

    dns.set("web.test", &["127.0.0.2", "127.0.0.3", "::1"]);
    wait_ids(
        &server,
        "web",
        &["127.0.0.2-8080", "127.0.0.3-8080", "::1-8080"],
    )
    .await;
    let s = server
        .store()
        .get_service("web".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.servers.get("::1-8080").unwrap().address, "[::1]:8080");
    // Every change the session got is a delta, and together they add .3 and ::1 and remove .1.
    let mut added = BTreeSet::new();
    let mut removed = BTreeSet::new();
    while added.len() < 2 || removed.is_empty() {
        let u = session.update().await;
        assert!(!u.full, "expected deltas, got a full snapshot");
        added.extend(u.upserts.iter().map(|s| s.server_id.clone()));
        removed.extend(u.removals.iter().cloned());
    }
    assert_eq!(added, set(&["127.0.0.3-8080", "::1-8080"]));
    assert_eq!(removed, set(&["127.0.0.1-8080"]));

    // An unchanged answer writes nothing: the version stays while refreshes go on.
    let version = s.version;
    let queries = dns.queries();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while dns.queries() < queries + 6 {
        assert!(tokio::time::Instant::now() < deadline, "no refreshes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = server
        .store()
        .get_service("web".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.version, version, "a refresh with the same answer wrote");
}

#[tokio::test]
async fn servfail_and_timeouts_keep_the_last_good_set() {
    let dns = FakeDns::start().await;
    dns.set("web.test", &["127.0.0.1", "127.0.0.2"]);
    let server = start_dns(dns_config(dns.addr, vec![web("web.test:80")])).await;
    wait_ids(&server, "web", &["127.0.0.1-80", "127.0.0.2-80"]).await;
    let version = server
        .store()
        .get_service("web".into())
        .await
        .unwrap()
        .unwrap()
        .version;

    dns.mode(Mode::ServFail);
    let s = wait_status(&server, "web", "SERVFAIL not reported", |s| {
        s.consecutive_failures >= 2
    })
    .await;
    assert!(!s.last_error.is_empty());
    assert_eq!(s.backends, 2);
    assert_eq!(
        ids(&server, "web").await,
        set(&["127.0.0.1-80", "127.0.0.2-80"])
    );

    dns.mode(Mode::Silent);
    let before = dns_status(&server, "web").await.consecutive_failures;
    wait_status(&server, "web", "timeouts not reported", |s| {
        s.consecutive_failures >= before + 2
    })
    .await;
    assert_eq!(
        ids(&server, "web").await,
        set(&["127.0.0.1-80", "127.0.0.2-80"])
    );
    let now = server
        .store()
        .get_service("web".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.version, version, "a failed refresh wrote");

    // An empty answer (the name exists, no addresses) is a failure too: never empties.
    dns.mode(Mode::Answer);
    dns.set("web.test", &[]);
    let before = dns_status(&server, "web").await.consecutive_failures;
    wait_status(&server, "web", "empty answer not reported", |s| {
        s.consecutive_failures > before
    })
    .await;
    assert_eq!(
        ids(&server, "web").await,
        set(&["127.0.0.1-80", "127.0.0.2-80"])
    );

    // Recovery: the next good answer applies and clears the failure.
    dns.set("web.test", &["127.0.0.9"]);
    wait_ids(&server, "web", &["127.0.0.9-80"]).await;
    let s = wait_status(&server, "web", "failure not cleared", |s| {
        s.consecutive_failures == 0
    })
    .await;
    assert!(s.last_error.is_empty());
}

#[tokio::test]
async fn declare_dns_through_the_api_and_bad_input() {
    let dns = FakeDns::start().await;
    dns.set("api.test", &["10.1.0.1"]);
    let mut cfg = dns_config(dns.addr, Vec::new());
    cfg.max_backends = 3;
    let server = start_dns(cfg).await;
    let mut m = membership(&server).await;

    // A name that does not resolve: refused, nothing created.
    let err = m
        .declare_dns(proto::DeclareDnsRequest {
            locality: None,
            priority: 0,
            service: "ghost".into(),
            target: "nowhere.test:80".into(),
            weight: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("nowhere.test"), "{}", err.message());
    assert!(server
        .store()
        .get_service("ghost".into())
        .await
        .unwrap()
        .is_none());

    // Malformed targets and weights.
    for (target, weight) in [
        ("no-port", 1),
        ("a.test:0", 1),
        ("a.test:+80", 1),
        ("bad name:80", 1),
        ("a.test:80", 10_001),
    ] {
        let err = m
            .declare_dns(proto::DeclareDnsRequest {
                locality: None,
                priority: 0,
                service: "web".into(),
                target: target.into(),
                weight,
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{target}: {err:?}"
        );
    }

    // Declared through the API, next to an API-owned backend that DNS never touches.
    registry(&server)
        .await
        .add_server(add("web", "static", "10.9.9.9:80", 1))
        .await
        .unwrap();
    let st = m
        .declare_dns(proto::DeclareDnsRequest {
            locality: None,
            priority: 0,
            service: "web".into(),
            target: "api.test:80".into(),
            weight: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.backends, 1);
    assert_eq!(st.weight, 1);
    assert_eq!(ids(&server, "web").await, set(&["10.1.0.1-80", "static"]));

    // A DNS-owned id cannot be taken by a lease.
    let err = m
        .register(proto::RegisterRequest {
            service: "web".into(),
            server_id: "10.1.0.1-80".into(),
            address: "10.1.0.1:80".into(),
            ttl_seconds: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("DNS"), "{}", err.message());

    // More records than the quota: the lowest 3 addresses are kept, and the status says so.
    dns.set(
        "api.test",
        &["10.1.0.5", "10.1.0.4", "10.1.0.3", "10.1.0.2", "10.1.0.1"],
    );
    wait_ids(
        &server,
        "web",
        &["10.1.0.1-80", "10.1.0.2-80", "10.1.0.3-80", "static"],
    )
    .await;
    let st = wait_status(&server, "web", "truncation not reported", |s| s.truncated).await;
    assert_eq!((st.resolved, st.backends), (5, 3));

    // RemoveDns removes the DNS-owned backends only.
    m.remove_dns(proto::RemoveDnsRequest {
        service: "web".into(),
    })
    .await
    .unwrap();
    assert_eq!(ids(&server, "web").await, set(&["static"]));
    let r = m
        .list_dns(proto::ListDnsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(r.names.is_empty(), "{r:?}");
    let err = m
        .remove_dns(proto::RemoveDnsRequest {
            service: "web".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn unspecified_broadcast_and_multicast_answers_never_become_backends() {
    let dns = FakeDns::start().await;
    dns.set(
        "mixed.test",
        &[
            "0.0.0.0",
            "10.3.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::",
            "ff02::1",
        ],
    );
    dns.set("void.test", &["0.0.0.0", "255.255.255.255"]);
    let server = start_dns(dns_config(dns.addr, Vec::new())).await;
    let mut m = membership(&server).await;
    m.declare_dns(proto::DeclareDnsRequest {
        locality: None,
        priority: 0,
        service: "mixed".into(),
        target: "mixed.test:80".into(),
        weight: 1,
    })
    .await
    .unwrap();
    wait_ids(&server, "mixed", &["10.3.0.1-80"]).await;
    // Only unusable answers: a failed resolution, nothing created.
    let err = m
        .declare_dns(proto::DeclareDnsRequest {
            locality: None,
            priority: 0,
            service: "void".into(),
            target: "void.test:80".into(),
            weight: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("0.0.0.0 (unspecified)"),
        "{}",
        err.message()
    );
    assert!(ids(&server, "void").await.is_empty());
    // Refreshes keep skipping them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ids(&server, "mixed").await, set(&["10.3.0.1-80"]));
}

#[tokio::test]
async fn an_api_declaration_survives_a_restart_on_the_embedded_store() {
    let dns = FakeDns::start().await;
    dns.set("kept.test", &["10.2.0.1", "10.2.0.2"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        store: dlb_server::StoreConfig::Embedded(dir.path().to_owned()),
        dns: dns_config(dns.addr, Vec::new()),
        ..Default::default()
    };
    let server = start_with(cfg.clone()).await;
    membership(&server)
        .await
        .declare_dns(proto::DeclareDnsRequest {
            locality: None,
            priority: 0,
            service: "kept".into(),
            target: "kept.test:9000".into(),
            weight: 2,
        })
        .await
        .unwrap();
    server.shutdown().await.unwrap();

    // While dlbd is down the name changes; the restarted dlbd follows it again.
    dns.set("kept.test", &["10.2.0.2", "10.2.0.3"]);
    let server = start_with(cfg).await;
    let st = dns_status(&server, "kept").await;
    assert_eq!((st.target.as_str(), st.weight), ("kept.test:9000", 2));
    wait_ids(&server, "kept", &["10.2.0.2-9000", "10.2.0.3-9000"]).await;
}

#[test]
fn yaml_declares_dns_services_and_resolver_settings() {
    let cfg = ServerConfig::from_yaml_str(
        "dns:\n  nameservers: [\"127.0.0.1:5353\"]\n  min_refresh_seconds: 2\n  max_refresh_seconds: 60\n  max_backends: 10\nservices:\n  - name: web\n    dns: web.internal:8080\n    dns_weight: 5\n",
    )
    .unwrap();
    assert_eq!(cfg.dns.nameservers, ["127.0.0.1:5353".parse().unwrap()]);
    assert_eq!(cfg.dns.min_refresh, Duration::from_secs(2));
    assert_eq!(cfg.dns.max_refresh, Duration::from_secs(60));
    assert_eq!(cfg.dns.max_backends, 10);
    assert_eq!(
        cfg.dns.services,
        [DnsDeclaration {
            service: "web".into(),
            target: "web.internal:8080".into(),
            weight: 5,
            locality: None,
            priority: 0,
        }]
    );
    for (bad, field) in [
        (
            "services:\n  - name: web\n    dns: web.internal\n",
            "services[0].dns",
        ),
        (
            "services:\n  - name: web\n    dns: a:1\n    dns_weight: 0\n",
            "services[0].dns_weight",
        ),
        ("dns:\n  nameservers: [\"nope\"]\n", "dns.nameservers[0]"),
        ("dns:\n  max_backends: 0\n", "dns.max_backends"),
    ] {
        let err = ServerConfig::from_yaml_str(bad).unwrap_err().to_string();
        assert!(err.contains(field), "{bad:?}: {err}");
    }
}
