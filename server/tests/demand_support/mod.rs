//! Zone demand helpers shared by `zone_demand.rs` and `etcd_demand.rs`: a Subscribe declaring a
//! zone, a load report of `calls`, and reading pushes until a given zone demand arrives.
#![allow(dead_code)]

use dlb::proto::{self, client_message, server_message};

use crate::common::{Session, WAIT};

/// The first Subscribe (to `web`) of a session in `zone` (region, zone), sub-zone `rack-1`.
pub fn subscribe_in(zone: Option<(&str, &str)>) -> proto::ClientMessage {
    let mut msg = crate::common::subscribe(&[("web", None)]);
    if let Some(client_message::Kind::Subscribe(s)) = &mut msg.kind {
        s.locality = zone.map(|(region, zone)| proto::Locality {
            region: region.into(),
            zone: zone.into(),
            sub_zone: "rack-1".into(),
        });
    }
    msg
}

pub fn report(calls: u64) -> client_message::Kind {
    client_message::Kind::LoadReport(proto::LoadReport {
        service: "web".into(),
        backends: vec![proto::BackendLoad {
            server_id: "b1".into(),
            successes: calls - calls / 10,
            failures: calls / 10,
            ..Default::default()
        }],
        interval_ms: 1000,
    })
}

/// Reads until a `GlobalLoad` whose zone demand is `want` ((zone, share), in order) arrives;
/// returns how many `GlobalLoad`s came before it.
pub async fn demand(s: &mut Session, want: &[(&str, f64)]) -> usize {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(WAIT, async {
        loop {
            if let server_message::Kind::GlobalLoad(g) = s.next().await {
                let got: Vec<(String, f64)> = g
                    .zone_demand
                    .iter()
                    .map(|d| {
                        let l = d.locality.clone().unwrap_or_default();
                        assert_eq!((l.region.as_str(), l.sub_zone.as_str()), ("eu", ""));
                        (l.zone, d.share)
                    })
                    .collect();
                let sum: f64 = got.iter().map(|(_, x)| x).sum();
                assert!((sum - 1.0).abs() < 1e-9, "shares sum to {sum}: {got:?}");
                if got.len() == want.len()
                    && got
                        .iter()
                        .zip(want)
                        .all(|((z, x), (wz, wx))| z == wz && (x - wx).abs() < 1e-9)
                {
                    return seen.len();
                }
                seen.push(got);
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no GlobalLoad with {want:?}; saw {seen:?}"))
}
