//! Locality end to end in the core: stored records with zones and priorities → `routing::build_for`
//! → picks counted per zone and priority. The issue's scenarios: a client in zone a stays in a
//! while a is healthy, spills by the documented formula when 2 of a's 4 fail, spreads over b and c
//! when a is down, never exceeds a 10 % budget; priority failover at 50 % health with factor 1.4
//! spills 30 %; load-aware spill before any ejection, through `replan`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use dlb::locality::ZoneKey;
use dlb::proto;
use dlb::routing::{self, Client};

fn server(id: &str, zone: &str, priority: u32, healthy: bool) -> proto::Server {
    proto::Server {
        server_id: id.into(),
        address: format!("10.0.0.1:{}", 1000 + id.len()),
        weight: 1,
        locality: Some(proto::Locality {
            region: "r".into(),
            zone: zone.into(),
            sub_zone: String::new(),
        }),
        priority,
        health: if healthy {
            proto::HealthStatus::Healthy as i32
        } else {
            proto::HealthStatus::Unhealthy as i32
        },
        ..Default::default()
    }
}

/// 3 zones × 4 backends (`a0..a3`, `b0..`, `c0..`), priority 0; `down` are unhealthy.
fn three_zones(down: &[&str]) -> Vec<proto::Server> {
    let mut out = Vec::new();
    for z in ["a", "b", "c"] {
        for i in 0..4 {
            let id = format!("{z}{i}");
            out.push(server(&id, z, 0, !down.contains(&id.as_str())));
        }
    }
    out
}

fn zone(z: &str) -> ZoneKey {
    ZoneKey {
        region: "r".into(),
        zone: z.into(),
    }
}

fn policy(f: impl FnOnce(&mut proto::LocalityPolicy)) -> proto::Policy {
    let mut l = proto::LocalityPolicy::default();
    f(&mut l);
    proto::Policy {
        locality: Some(l),
        ..dlb::model::default_policy()
    }
}

/// Picks `n` times; counts per first letter of the backend id (the zone, or `p`/`s`).
fn count(p: &dlb::balance::Picker, n: usize) -> HashMap<char, u64> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let pick = p.pick(None).unwrap();
        *m.entry(pick.backend().id().chars().next().unwrap())
            .or_insert(0) += 1;
    }
    m
}

fn within_4_sigma(observed: u64, n: u64, p: f64) -> bool {
    let mean = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    (observed as f64 - mean).abs() <= 4.0 * sigma + 1.0
}

const N: usize = 100_000;

#[test]
fn a_client_in_zone_a_stays_in_a_and_spills_by_the_formula() {
    fastrand::seed(11);
    let a = zone("a");
    let client = Client {
        zone: Some(&a),
        demand: &[],
    };
    let pol = policy(|_| {});
    let (p, layout) = routing::build_for(None, &pol, &three_zones(&[]), &client).unwrap();
    assert!(layout.is_some());
    assert_eq!(
        count(&p, N).get(&'a'),
        Some(&(N as u64)),
        "healthy a keeps all"
    );

    // 2 of a's 4 down, equal demand: a's capacity share 2/10 = 0.2 < its demand 1/3, so a keeps
    // 0.2 / (1/3) = 0.6 and the rest goes to b and c by residual capacity (0.2 each).
    let (p, _) = routing::build_for(Some(&p), &pol, &three_zones(&["a0", "a1"]), &client).unwrap();
    let c = count(&p, N);
    for (z, share) in [('a', 0.6), ('b', 0.2), ('c', 0.2)] {
        let got = c.get(&z).copied().unwrap_or(0);
        assert!(
            within_4_sigma(got, N as u64, share),
            "{z}: {got} of {N}, want {share}"
        );
    }

    // All of a down: b and c by capacity.
    let (p, _) = routing::build_for(
        Some(&p),
        &pol,
        &three_zones(&["a0", "a1", "a2", "a3"]),
        &client,
    )
    .unwrap();
    let c = count(&p, N);
    assert_eq!(c.get(&'a'), None);
    let b = c.get(&'b').copied().unwrap_or(0);
    assert!(within_4_sigma(b, N as u64, 0.5), "{c:?}");

    // A 10 % budget while a is at 50 % health (the default threshold): at most 10 % leave.
    let budget = policy(|l| l.cross_zone_budget_percent = 10);
    let (p, _) = routing::build_for(None, &budget, &three_zones(&["a0", "a1"]), &client).unwrap();
    let c = count(&p, N);
    let out = N as u64 - c.get(&'a').copied().unwrap_or(0);
    assert!(within_4_sigma(out, N as u64, 0.1), "{c:?}");
}

#[test]
fn priorities_fail_over_with_overprovisioning() {
    fastrand::seed(12);
    let servers = |p0_down: usize| -> Vec<proto::Server> {
        let mut v: Vec<proto::Server> = (0..4)
            .map(|i| server(&format!("p{i}"), "a", 0, i >= p0_down))
            .collect();
        v.extend((0..4).map(|i| server(&format!("s{i}"), "b", 1, true)));
        v
    };
    let pol = policy(|_| {});
    // No client zone: priority failover only (as dlbd's own picker).
    let p = routing::build_picker(None, &pol, &servers(0)).unwrap();
    assert_eq!(
        count(&p, N).get(&'s'),
        None,
        "healthy primary: nothing to priority 1"
    );
    // Half the primary: min(1, 0.5 × 1.4) = 0.7 stays, 0.3 spills.
    let p = routing::build_picker(Some(&p), &pol, &servers(2)).unwrap();
    let c = count(&p, N);
    let s = c.get(&'s').copied().unwrap_or(0);
    assert!(within_4_sigma(s, N as u64, 0.3), "{c:?}");
    // Primary gone: everything to priority 1; back: everything returns.
    let p = routing::build_picker(Some(&p), &pol, &servers(4)).unwrap();
    assert_eq!(count(&p, N).get(&'s'), Some(&(N as u64)));
    let p = routing::build_picker(Some(&p), &pol, &servers(0)).unwrap();
    assert_eq!(count(&p, N).get(&'s'), None);
}

#[test]
fn saturation_spills_before_any_ejection() {
    fastrand::seed(13);
    let a = zone("a");
    let client = Client {
        zone: Some(&a),
        demand: &[],
    };
    let pol = policy(|l| l.saturation_in_flight = 10);
    let (p, layout) = routing::build_for(None, &pol, &three_zones(&[]), &client).unwrap();
    let mut layout = layout.unwrap();
    assert_eq!(count(&p, 10_000).get(&'a'), Some(&10_000));
    // The other SDKs fill a's backends to 8 of their 10 (global in-flight pushed as baselines):
    // every backend still eligible, a's capacity share drops below its demand, a spills.
    for b in p.backends() {
        if b.id().starts_with('a') {
            b.load().set_baseline(8);
        }
    }
    let plan = routing::replan(&p, &mut layout, &pol, &client);
    assert!(plan.local < 1.0, "{plan:?}");
    let c = count(&p, N);
    let kept = c.get(&'a').copied().unwrap_or(0);
    assert!(
        within_4_sigma(kept, N as u64, plan.local),
        "{c:?} vs {plan:?}"
    );
    assert!(p.backends().iter().all(|b| b.is_eligible()));
}
