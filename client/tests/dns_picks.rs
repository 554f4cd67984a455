//! DNS discovery seen from the SDK: a service that follows a DNS name served by an in-process
//! DNS server; addresses added to and removed from the name appear in and leave the SDK's
//! picks, and a SERVFAIL keeps the SDK routing on the last good set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../server/tests/fake_dns/mod.rs"]
mod fake_dns;

use std::time::Duration;

use common::*;
use dlb_client::Client;
use dlb_server::membership::dns::{DnsConfig, DnsDeclaration};
use dlb_server::ServerConfig;
use fake_dns::{FakeDns, Mode};

#[tokio::test]
async fn dns_addresses_join_and_leave_the_sdk_picks() {
    let dns = FakeDns::start().await;
    dns.set("web.test", &["127.0.0.1", "127.0.0.2"]);
    let mut cfg = config(ServerConfig::default().services);
    cfg.dns = DnsConfig {
        nameservers: vec![dns.addr],
        services: vec![DnsDeclaration {
            service: "web".into(),
            target: "web.test:8080".into(),
            weight: 1,
            locality: None,
            priority: 0,
        }],
        min_refresh: Duration::from_millis(200),
        max_refresh: Duration::from_secs(1),
        retry_min: Duration::from_millis(200),
        retry_max: Duration::from_millis(400),
        timeout: Duration::from_millis(300),
        attempts: 1,
        ..DnsConfig::default()
    };
    let server = dlb_server::spawn(cfg).await.unwrap();
    let sdk = Client::connect([endpoint(&server)]).await.unwrap();
    let web = sdk.service("web").await.unwrap();
    eventually("the resolved addresses in the picks", || {
        picked(&web, 8) == set(&["127.0.0.1-8080", "127.0.0.2-8080"])
    })
    .await;

    dns.set("web.test", &["127.0.0.2", "127.0.0.3"]);
    eventually("the new address in, the old one out", || {
        picked(&web, 8) == set(&["127.0.0.2-8080", "127.0.0.3-8080"])
    })
    .await;
    let g = web.get_next_server(None).unwrap();
    assert!(g.address().ends_with(":8080"), "{}", g.address());
    drop(g);

    // SERVFAIL: refreshes fail, the SDK keeps routing on the last good set.
    dns.mode(Mode::ServFail);
    let admin = sdk.admin();
    eventually_async(|| async {
        admin
            .list_dns("web")
            .await
            .unwrap()
            .names
            .first()
            .is_some_and(|d| d.consecutive_failures >= 2)
    })
    .await;
    assert_eq!(picked(&web, 8), set(&["127.0.0.2-8080", "127.0.0.3-8080"]));
}

/// Polls an async condition every 20 ms, at most [`DEADLINE`].
async fn eventually_async<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    within("the DNS failures to be reported", async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
