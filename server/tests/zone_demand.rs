//! Zone demand against a real server: sessions declare their zone in the first Subscribe, report
//! calls, and every session of the service (zoned or not) is pushed the per-zone shares in
//! `GlobalLoad.zone_demand`; a bad locality is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod demand_support;

use std::time::Duration;

use common::*;
use demand_support::{demand, report, subscribe_in};
use dlb::proto::{self, client_message, server_message};
use tonic::Code;

#[tokio::test]
async fn three_sessions_in_two_zones_get_the_demand_shares() {
    let server = start().await;
    let mut c = registry(&server).await;
    c.add_server(add("web", "b1", "10.0.0.1:80", 1))
        .await
        .unwrap();
    // One SDK without a zone: it receives the shares and counts in none.
    let mut none = Session::open(&server, subscribe_in(None)).await;
    none.update().await;
    let mut a1 = Session::open(&server, subscribe_in(Some(("eu", "a")))).await;
    a1.update().await;
    let mut a2 = Session::open(&server, subscribe_in(Some(("eu", "a")))).await;
    a2.update().await;
    let mut b1 = Session::open(&server, subscribe_in(Some(("eu", "b")))).await;
    b1.update().await;

    // Before any call: the followers, 2 in a and 1 in b.
    demand(&mut none, &[("a", 2.0 / 3.0), ("b", 1.0 / 3.0)]).await;
    demand(&mut b1, &[("a", 2.0 / 3.0), ("b", 1.0 / 3.0)]).await;

    // Calls: a 10 + 30, b 60 (the zoneless session's calls count nowhere).
    none.send(report(1000)).await;
    a1.send(report(10)).await;
    a2.send(report(30)).await;
    b1.send(report(60)).await;
    demand(&mut none, &[("a", 0.4), ("b", 0.6)]).await;
    demand(&mut a1, &[("a", 0.4), ("b", 0.6)]).await;

    // A move under 1 % is not pushed: b 61 of 101 is 0.604.
    b1.send(report(1)).await;
    none.silent_for(Duration::from_millis(500)).await;
    // A larger one is: b 81 of 121 = 0.669.
    b1.send(report(20)).await;
    demand(&mut none, &[("a", 40.0 / 121.0), ("b", 81.0 / 121.0)]).await;

    // A later Subscribe's locality changes nothing (only the first one counts).
    b1.send(client_message::Kind::Subscribe(proto::Subscribe {
        services: vec![proto::ServiceSubscription {
            service: "web".into(),
            known: None,
        }],
        locality: Some(proto::Locality {
            region: "eu".into(),
            zone: "c".into(),
            sub_zone: String::new(),
        }),
        ..Default::default()
    }))
    .await;
    // (b1 has GlobalLoads queued before the answer.)
    while !matches!(b1.next().await, server_message::Kind::Update(_)) {}
    none.silent_for(Duration::from_millis(500)).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_bad_locality_is_refused_naming_the_field() {
    let server = start().await;
    for (region, zone, field) in [("eu", "a b", "locality.zone"), ("", "a", "locality.region")] {
        let mut s = Session::open(&server, subscribe_in(Some((region, zone)))).await;
        let e = tokio::time::timeout(WAIT, s.rx.message())
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(field), "{}", e.message());
    }
    server.shutdown().await.unwrap();
}
