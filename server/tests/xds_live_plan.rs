//! Per-node EDS with live inputs, against a real `dlbd` on loopback: the zone demand and the
//! global in-flight counts reported by SDK sessions re-plan the ClusterLoadAssignment a raw ADS
//! client of a zone holds — with no store change (the revision in its version stays) — as an
//! SDK of that zone would plan.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
mod demand_support;

use std::collections::BTreeMap;
use std::time::Duration;

use common::Session;
use demand_support::subscribe_in;
use dlb::proto::{self, client_message};
use dlb_server::api::xds::resources::ENDPOINTS;
use dlb_server::RunningServer;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Message;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);

/// Service `web`: 3 backends in eu/a (a0..a2) and 3 in eu/b (b3..b5), with `locality`.
async fn service(server: &RunningServer, locality: Option<proto::LocalityPolicy>) {
    let mut reg = common::registry(server).await;
    if locality.is_some() {
        reg.set_policy(proto::SetPolicyRequest {
            service: "web".into(),
            policy: Some(proto::Policy {
                locality,
                ..dlb::model::default_policy()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for (i, zone) in ["a", "a", "a", "b", "b", "b"].into_iter().enumerate() {
        reg.add_server(proto::AddServerRequest {
            locality: Some(proto::Locality {
                region: "eu".into(),
                zone: zone.into(),
                sub_zone: String::new(),
            }),
            ..common::add(
                "web",
                &format!("{zone}{i}"),
                &format!("127.0.0.1:{}", 2000 + i),
                1,
            )
        })
        .await
        .unwrap();
    }
}

/// A state-of-the-world ADS stream of a client in eu/`zone` subscribed to EDS `web`.
struct Ads {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

impl Ads {
    async fn open(server: &RunningServer, zone: &str) -> Ads {
        let (tx, rx) = common::sotw(
            server,
            DiscoveryRequest {
                node: Some(Node {
                    id: format!("grpc-in-{zone}"),
                    locality: Some(Locality {
                        region: "eu".into(),
                        zone: zone.into(),
                        sub_zone: String::new(),
                    }),
                    ..Default::default()
                }),
                type_url: ENDPOINTS.into(),
                resource_names: vec!["web".into()],
                ..Default::default()
            },
        )
        .await;
        Ads { tx, rx }
    }

    /// The next response, acknowledged: its version and per-zone share of priority 0.
    async fn next(&mut self) -> (String, BTreeMap<char, f64>) {
        let r = tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("a response within the timeout")
            .unwrap()
            .unwrap();
        self.tx
            .send(DiscoveryRequest {
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                type_url: ENDPOINTS.into(),
                resource_names: vec!["web".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        let cla = ClusterLoadAssignment::decode(&r.resources[0].value[..]).unwrap();
        let mut shares = BTreeMap::new();
        let mut total = 0.0;
        for l in cla.endpoints.iter().filter(|l| l.priority == 0) {
            let w = f64::from(l.load_balancing_weight.map_or(0, |w| w.value));
            let id = &l.locality.as_ref().unwrap().sub_zone;
            *shares.entry(id.chars().next().unwrap()).or_insert(0.0) += w;
            total += w;
        }
        shares.values_mut().for_each(|s| *s /= total);
        (r.version_info, shares)
    }

    /// Reads responses until one whose share of zone a passes `ok`; returns its version and
    /// that share.
    async fn until(&mut self, what: &str, ok: impl Fn(f64) -> bool) -> (String, f64) {
        let mut seen = Vec::new();
        loop {
            let (version, shares) = tokio::time::timeout(WAIT, self.next())
                .await
                .unwrap_or_else(|_| panic!("{what}: never; saw {seen:?}"));
            let a = shares.get(&'a').copied().unwrap_or(0.0);
            if ok(a) {
                return (version, a);
            }
            seen.push(a);
        }
    }
}

/// The store revision in an xDS version (`HASH.EPOCH.REVISION`).
fn revision(version: &str) -> &str {
    version.rsplit('.').next().unwrap()
}

fn load(backends: &[(&str, u64, u64)]) -> client_message::Kind {
    client_message::Kind::LoadReport(proto::LoadReport {
        service: "web".into(),
        backends: backends
            .iter()
            .map(|(id, in_flight, calls)| proto::BackendLoad {
                server_id: (*id).into(),
                in_flight: *in_flight,
                successes: *calls,
                ..Default::default()
            })
            .collect(),
        interval_ms: 1000,
    })
}

#[tokio::test]
async fn sdk_zone_demand_replans_the_xds_clients_zone() {
    let server = common::start().await;
    service(&server, None).await;
    let mut ads = Ads::open(&server, "a").await;
    let (v0, shares) = ads.next().await;
    assert_eq!(shares.get(&'a'), Some(&1.0), "healthy, equal demand: home");

    // SDKs in a and b: a makes 90 % of the calls on half the capacity.
    let mut sa = Session::open(&server, subscribe_in(Some(("eu", "a")))).await;
    sa.update().await;
    let mut sb = Session::open(&server, subscribe_in(Some(("eu", "b")))).await;
    sb.update().await;
    sa.send(load(&[("a0", 0, 90)])).await;
    sb.send(load(&[("b3", 0, 10)])).await;

    // a keeps about (1/2) / 0.9 ≈ 56 % (the demand slack moves it by a point or two).
    let (v1, local) = ads.until("a spills", |a| a < 0.9).await;
    assert!((0.5..0.6).contains(&local), "a keeps {local}");
    assert_eq!(revision(&v1), revision(&v0), "no store change: {v0} → {v1}");
    assert_ne!(v1, v0);
    drop((sa, sb));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn global_in_flight_spills_an_xds_clients_zone_before_any_ejection() {
    let server = common::start().await;
    service(
        &server,
        Some(proto::LocalityPolicy {
            saturation_in_flight: 10,
            ..Default::default()
        }),
    )
    .await;
    let mut ads = Ads::open(&server, "a").await;
    let (v0, shares) = ads.next().await;
    assert_eq!(shares.get(&'a'), Some(&1.0));

    // One SDK in each zone (equal demand); a's backends at 9 of 10 in flight.
    let mut sa = Session::open(&server, subscribe_in(Some(("eu", "a")))).await;
    sa.update().await;
    let mut sb = Session::open(&server, subscribe_in(Some(("eu", "b")))).await;
    sb.update().await;
    sa.send(load(&[("a0", 9, 0), ("a1", 9, 0), ("a2", 9, 0)]))
        .await;
    // a's capacity 0.3 of 3.3: it keeps (0.3 / 3.3) / 0.5 ≈ 18 %.
    let (v1, local) = ads.until("a spills on load", |a| a < 0.5).await;
    assert!((0.1..0.3).contains(&local), "a keeps {local}");
    assert_eq!(revision(&v1), revision(&v0), "no store change");

    // Drained: back home.
    sa.send(load(&[("a0", 0, 0), ("a1", 0, 0), ("a2", 0, 0)]))
        .await;
    ads.until("a back home", |a| a == 1.0).await;
    drop((sa, sb));
    server.shutdown().await.unwrap();
}
