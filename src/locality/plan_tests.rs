//! Tests of the locality plan: the issue's numbers, and properties (proptest).

use super::*;
use crate::balance::{PanicConfig, PanicMode};
use crate::proto;
use proptest::prelude::*;

fn loc(zone: &str) -> proto::Locality {
    proto::Locality {
        region: "r".into(),
        zone: zone.into(),
        sub_zone: String::new(),
    }
}

fn zk(zone: &str) -> ZoneKey {
    ZoneKey::from(&loc(zone))
}

/// Servers as (priority, zone, eligible, in_flight), weight 1.
fn setup(servers: &[(u32, &str, bool, u64)]) -> (Groups, Vec<BackendState>) {
    let locs: Vec<proto::Locality> = servers.iter().map(|s| loc(s.1)).collect();
    let g = group(servers.iter().zip(&locs).map(|(s, l)| (s.0, Some(l))), true);
    let b = servers
        .iter()
        .zip(&g.of_server)
        .map(|(s, &group)| BackendState {
            group,
            weight: 1,
            eligible: s.2,
            in_flight: s.3,
        })
        .collect();
    (g, b)
}

/// 3 zones × 4 backends; the first `down_a` of zone a are not eligible.
fn three_zones(down_a: usize) -> (Groups, Vec<BackendState>) {
    let mut s = Vec::new();
    for z in ["a", "b", "c"] {
        for i in 0..4 {
            s.push((0, z, !(z == "a" && i < down_a), 0));
        }
    }
    setup(&s)
}

fn share(p: &Plan, g: &Groups, prio: u32, zone: &str) -> f64 {
    g.keys
        .iter()
        .position(|k| k.priority == prio && k.zone.as_ref() == Some(&zk(zone)))
        .map_or(0.0, |i| p.shares[i])
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn equal_demand() -> Vec<(ZoneKey, f64)> {
    vec![(zk("a"), 1.0), (zk("b"), 1.0), (zk("c"), 1.0)]
}

#[test]
fn healthy_local_zone_keeps_everything() {
    let (g, b) = three_zones(0);
    let p = plan(
        &LocalityConfig::default(),
        None,
        &g,
        &b,
        &equal_demand(),
        Some(&zk("a")),
    );
    assert!(close(p.local, 1.0));
    assert_eq!(p.spill, Spill::None);
    assert_eq!(p.priority_load, vec![(0, 1.0)]);
}

#[test]
fn demand_noise_within_the_slack_keeps_everything_local() {
    let (g, b) = three_zones(0);
    let cfg = LocalityConfig::default();
    // Capacity 1/3; a's measured demand 0.35 (within 2 points): all local.
    let noisy = vec![(zk("a"), 0.35), (zk("b"), 0.33), (zk("c"), 0.32)];
    let p = plan(&cfg, None, &g, &b, &noisy, Some(&zk("a")));
    assert!(close(p.local, 1.0), "{p:?}");
    assert_eq!(p.spill, Spill::None);
    // 0.36 is past it: a keeps (1/3) / 0.36.
    let more = vec![(zk("a"), 0.36), (zk("b"), 0.32), (zk("c"), 0.32)];
    let p = plan(&cfg, None, &g, &b, &more, Some(&zk("a")));
    assert!(close(p.local, (1.0 / 3.0) / 0.36), "{p:?}");
    assert_eq!(p.spill, Spill::LocalCapacity);
}

#[test]
fn half_down_local_zone_spills_by_the_formula() {
    // upstream a = 2/10 < demand a = 1/3: keep 0.2 / (1/3) = 0.6; the 0.4 spilled splits by
    // residual capacity (0.4 − 1/3 for b and c alike): 0.2 each.
    let (g, b) = three_zones(2);
    for demand in [equal_demand(), vec![]] {
        let p = plan(
            &LocalityConfig::default(),
            None,
            &g,
            &b,
            &demand,
            Some(&zk("a")),
        );
        assert!(close(share(&p, &g, 0, "a"), 0.6), "{p:?}");
        assert!(close(share(&p, &g, 0, "b"), 0.2));
        assert!(close(share(&p, &g, 0, "c"), 0.2));
        assert_eq!(p.spill, Spill::LocalCapacity);
    }
}

#[test]
fn spill_goes_by_residual_capacity() {
    // a 2 of 4 up, b 4, c 8; equal demand. Capacity 2, 4, 8 of 14: a keeps (1/7)/(1/3) = 3/7;
    // b's residual 4/14 − 1/3 < 0, so c (residual 8/14 − 1/3) takes all the 4/7 spilled.
    let mut s = Vec::new();
    for (z, n, up) in [("a", 4, 2), ("b", 4, 4), ("c", 8, 8)] {
        for i in 0..n {
            s.push((0, z, i < up, 0));
        }
    }
    let (g, b) = setup(&s);
    let p = plan(
        &LocalityConfig::default(),
        None,
        &g,
        &b,
        &equal_demand(),
        Some(&zk("a")),
    );
    assert!(close(share(&p, &g, 0, "a"), 3.0 / 7.0), "{p:?}");
    assert!(close(share(&p, &g, 0, "b"), 0.0));
    assert!(close(share(&p, &g, 0, "c"), 4.0 / 7.0));
}

#[test]
fn local_zone_down_spreads_by_capacity() {
    let (g, b) = three_zones(4);
    let p = plan(
        &LocalityConfig::default(),
        None,
        &g,
        &b,
        &equal_demand(),
        Some(&zk("a")),
    );
    assert!(close(share(&p, &g, 0, "b"), 0.5));
    assert!(close(share(&p, &g, 0, "c"), 0.5));
    assert!(close(p.local, 0.0));
    assert_eq!(p.spill, Spill::LocalDown);
}

#[test]
fn budget_caps_spill_while_local_zone_is_healthy_enough() {
    let cfg = LocalityConfig {
        budget: Some(0.1),
        ..LocalityConfig::default()
    };
    let (g, b) = three_zones(2); // a at 50 %: at the threshold, the budget holds
    let p = plan(&cfg, None, &g, &b, &equal_demand(), Some(&zk("a")));
    assert!(close(p.local, 0.9), "{p:?}");
    assert!(close(share(&p, &g, 0, "b"), 0.05));
    assert_eq!(p.spill, Spill::BudgetCapped);
    let (g, b) = three_zones(3); // a at 25 %: below the threshold, no budget
    let p = plan(&cfg, None, &g, &b, &equal_demand(), Some(&zk("a")));
    assert!(p.local < 0.9);
    assert_eq!(p.spill, Spill::LocalCapacity);
}

fn priorities(p0_up: usize) -> (Groups, Vec<BackendState>) {
    let mut s = Vec::new();
    for i in 0..10 {
        s.push((0, "a", i < p0_up, 0));
    }
    for _ in 0..10 {
        s.push((1, "a", true, 0));
    }
    setup(&s)
}

#[test]
fn priority_failover_follows_envoy() {
    let cfg = LocalityConfig::default();
    let (g, b) = priorities(10);
    let p = plan(&cfg, None, &g, &b, &[], Some(&zk("a")));
    assert_eq!(p.priority_load, vec![(0, 1.0), (1, 0.0)]);
    assert!(close(share(&p, &g, 1, "a"), 0.0));
    let (g, b) = priorities(5); // 50 % × 1.4 = 70 %: P1 takes 30 %
    let p = plan(&cfg, None, &g, &b, &[], Some(&zk("a")));
    assert!(close(p.priority_load[0].1, 0.7));
    assert!(close(p.priority_load[1].1, 0.3));
    assert!(close(share(&p, &g, 1, "a"), 0.3));
    let (g, b) = priorities(0);
    let p = plan(&cfg, None, &g, &b, &[], Some(&zk("a")));
    assert_eq!(p.priority_load, vec![(0, 0.0), (1, 1.0)]);
    assert!(close(p.local, 1.0));
}

#[test]
fn normalised_loads_and_per_priority_panic() {
    // P0 2/10, P1 3/10 up: h = 0.28, 0.42; Σ = 0.7 < 1, loads 0.4 and 0.6.
    let mut s = Vec::new();
    for i in 0..10 {
        s.push((0, "a", i < 2, 0));
    }
    for i in 0..10 {
        s.push((1, "a", i < 3, 0));
    }
    let (g, b) = setup(&s);
    let panic = PanicConfig {
        threshold_percent: 25,
        mode: PanicMode::RouteAll,
    };
    let p = plan(&LocalityConfig::default(), Some(&panic), &g, &b, &[], None);
    assert!(close(p.priority_load[0].1, 0.4), "{p:?}");
    assert!(close(p.priority_load[1].1, 0.6));
    assert_eq!(p.group_panic, vec![true, false]); // 20 % < 25 %; 30 % is not
    assert_eq!(p.spill, Spill::NoClientZone);
    // Nothing eligible: all to P0 in panic, or nothing at all without panic.
    let (g, b) = setup(&[(0, "a", false, 0), (1, "a", false, 0)]);
    let p = plan(&LocalityConfig::default(), Some(&panic), &g, &b, &[], None);
    assert_eq!(p.shares, vec![1.0, 0.0]);
    let p = plan(&LocalityConfig::default(), None, &g, &b, &[], None);
    assert_eq!(p.shares, vec![0.0, 0.0]);
}

#[test]
fn saturated_zone_spills_with_every_backend_eligible() {
    let cfg = LocalityConfig {
        saturation: Some(10.0),
        ..LocalityConfig::default()
    };
    let mut s = Vec::new();
    for z in ["a", "b", "c"] {
        for _ in 0..4 {
            s.push((0, z, true, if z == "a" { 9 } else { 0 }));
        }
    }
    let (g, b) = setup(&s);
    let p = plan(&cfg, None, &g, &b, &equal_demand(), Some(&zk("a")));
    // capacity a = 4 × 0.1 = 0.4 of 8.4: keep (0.4/8.4) × 3.
    assert!(close(p.local, 0.4 / 8.4 * 3.0), "{p:?}");
    assert_eq!(p.spill, Spill::LocalCapacity);
    let p = plan(
        &LocalityConfig::default(),
        None,
        &g,
        &b,
        &equal_demand(),
        Some(&zk("a")),
    );
    assert!(close(p.local, 1.0));
}

#[test]
fn small_priorities_and_hashing_groups_are_not_zone_aware() {
    let (g, b) = setup(&[(0, "a", true, 0), (0, "b", true, 0)]);
    let p = plan(
        &LocalityConfig::default(),
        None,
        &g,
        &b,
        &[],
        Some(&zk("a")),
    );
    assert_eq!(p.spill, Spill::BelowMinClusterSize);
    assert!(close(p.local, 0.5));
    let locs = [loc("a"), loc("b")];
    let g = group(locs.iter().map(|l| (0, Some(l))), false);
    let p = plan(
        &LocalityConfig::default(),
        None,
        &g,
        &b,
        &[],
        Some(&zk("a")),
    );
    assert_eq!(p.spill, Spill::Unzoned);
    assert_eq!(p.shares, vec![1.0]);
}

/// Random single- or two-priority services over zones a..c (some without zone).
fn arb_service() -> impl Strategy<Value = Vec<(u32, u8, bool, u32, u64)>> {
    prop::collection::vec((0u32..2, 0u8..4, any::<bool>(), 1u32..5, 0u64..40), 1..24)
}

fn build(servers: &[(u32, u8, bool, u32, u64)]) -> (Groups, Vec<BackendState>) {
    let locs: Vec<Option<proto::Locality>> = servers
        .iter()
        .map(|s| (s.1 < 3).then(|| loc(["a", "b", "c"][usize::from(s.1)])))
        .collect();
    let g = group(
        servers.iter().zip(&locs).map(|(s, l)| (s.0, l.as_ref())),
        true,
    );
    let b = servers
        .iter()
        .zip(&g.of_server)
        .map(|(s, &group)| BackendState {
            group,
            weight: s.3,
            eligible: s.2,
            in_flight: s.4,
        })
        .collect();
    (g, b)
}

fn arb_cfg() -> impl Strategy<Value = LocalityConfig> {
    (
        100u32..300,
        any::<bool>(),
        1u32..8,
        0u32..40,
        1u32..100,
        0u32..10,
    )
        .prop_map(|(o, za, m, b, t, s)| LocalityConfig {
            overprovisioning: f64::from(o) / 100.0,
            zone_aware: za,
            min_cluster_size: m,
            budget: (b > 0).then(|| f64::from(b) / 100.0),
            budget_threshold: f64::from(t) / 100.0,
            saturation: (s > 0).then(|| f64::from(s)),
        })
}

proptest! {
    #[test]
    fn shares_are_a_distribution_on_eligible_groups(
        servers in arb_service(), cfg in arb_cfg(), panic in 0u32..60,
        demand in prop::collection::vec(0.0f64..5.0, 3),
    ) {
        let (g, b) = build(&servers);
        let panic = (panic > 0).then_some(PanicConfig { threshold_percent: panic, mode: PanicMode::RouteAll });
        let demand: Vec<_> = ["a", "b", "c"].iter().zip(&demand).map(|(z, d)| (zk(z), *d)).collect();
        for client in [None, Some(zk("a")), Some(zk("c"))] {
            let p = plan(&cfg, panic.as_ref(), &g, &b, &demand, client.as_ref());
            let sum: f64 = p.shares.iter().sum();
            let any_eligible = b.iter().any(|b| b.eligible);
            if any_eligible || panic.is_some() {
                prop_assert!((sum - 1.0).abs() < 1e-9, "{:?}", p);
            } else {
                prop_assert!(sum == 0.0);
            }
            for (i, s) in p.shares.iter().enumerate() {
                prop_assert!(*s >= 0.0);
                let eligible = b.iter().any(|b| usize::from(b.group) == i && b.eligible);
                prop_assert!(*s == 0.0 || eligible || p.group_panic[i], "{:?}", p);
            }
        }
    }

    #[test]
    fn budget_is_respected_in_a_healthy_local_zone(
        servers in arb_service(), cfg in arb_cfg(),
    ) {
        let servers: Vec<_> = servers.into_iter().map(|s| (0, s.1, s.2, s.3, s.4)).collect();
        let (g, b) = build(&servers);
        let Some(budget) = cfg.budget else { return Ok(()); };
        let p = plan(&cfg, None, &g, &b, &[], Some(&zk("a")));
        let local: Vec<_> = b.iter().filter(|b| g.keys[usize::from(b.group)].zone == Some(zk("a"))).collect();
        let healthy = local.iter().filter(|b| b.eligible).count() as f64 / local.len().max(1) as f64;
        if !local.is_empty() && healthy >= cfg.budget_threshold {
            prop_assert!(1.0 - p.local <= budget + 1e-9, "{:?}", p);
        }
    }

    #[test]
    fn more_eligible_never_lowers_local_share_or_primary_load(
        servers in arb_service(), cfg in arb_cfg(), pick in any::<prop::sample::Index>(),
    ) {
        // Local share: one priority (with several, a healthier primary can shift load away
        // from a priority that kept more of it local).
        let single: Vec<_> = servers.iter().map(|s| (0, s.1, s.2, s.3, s.4)).collect();
        let (g, mut b) = build(&single);
        let i = pick.index(b.len());
        if g.keys[usize::from(b[i].group)].zone == Some(zk("a")) && !b[i].eligible {
            let before = plan(&cfg, None, &g, &b, &[], Some(&zk("a"))).local;
            b[i].eligible = true;
            let after = plan(&cfg, None, &g, &b, &[], Some(&zk("a"))).local;
            prop_assert!(after >= before - 1e-9, "{} < {}", after, before);
        }
        let (g, mut b) = build(&servers);
        let i = pick.index(b.len());
        if g.keys[usize::from(b[i].group)].priority == 0 && !b[i].eligible {
            let before = plan(&cfg, None, &g, &b, &[], None).priority_load[0].1;
            b[i].eligible = true;
            let after = plan(&cfg, None, &g, &b, &[], None).priority_load[0].1;
            prop_assert!(after >= before - 1e-9);
        }
    }
}
