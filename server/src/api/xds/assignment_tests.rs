//! Unit tests of [`super`]: the per-zone layouts and their cache.
use super::*;
use prost::Message;

/// `(id, zone, priority, eligible)` backends, weight 1, region "r".
fn snap(backends: &[(&str, &str, u32, bool)], algorithm: Algorithm) -> Arc<ServiceSnapshot> {
    let mut servers = crate::store::Servers::new();
    for (i, (id, zone, priority, eligible)) in backends.iter().enumerate() {
        let mut s = proto::Server {
            server_id: (*id).into(),
            address: format!("127.0.0.1:{}", 1000 + i),
            weight: 1,
            priority: *priority,
            locality: (!zone.is_empty()).then(|| proto::Locality {
                region: "r".into(),
                zone: (*zone).into(),
                sub_zone: String::new(),
            }),
            ..Default::default()
        };
        if !eligible {
            s.set_health(proto::HealthStatus::Unhealthy);
        }
        servers.insert((*id).into(), Arc::new(s));
    }
    Arc::new(ServiceSnapshot {
        name: "s".into(),
        version: proto::Version {
            epoch: 1,
            version: 3,
        },
        policy: proto::Policy {
            algorithm: algorithm as i32,
            ..dlb::model::default_policy()
        },
        servers,
    })
}

/// The encoded assignment of a client in `z` with the current inputs.
fn encoded(a: &Assignments, z: Option<&Zone>) -> Vec<u8> {
    let inputs = a.inputs.lock().clone();
    a.encoded(&a.plan(z, &inputs))
}

fn zone(z: &str) -> Zone {
    Zone {
        region: "r".into(),
        zone: z.into(),
    }
}

/// Per backend id (sub_zone): (priority, locality weight).
fn layout(a: &Assignments, z: Option<&Zone>) -> BTreeMap<String, (u32, u32)> {
    a.layout(z)
        .endpoints
        .into_iter()
        .map(|l| {
            let id = l.locality.map(|l| l.sub_zone).unwrap_or_default();
            (
                id,
                (l.priority, l.load_balancing_weight.map_or(0, |w| w.value)),
            )
        })
        .collect()
}

fn three_zones(a_down: usize) -> Vec<(String, String, u32, bool)> {
    let mut v = Vec::new();
    for z in ["a", "b", "c"] {
        for i in 0..4 {
            v.push((
                format!("{z}{i}"),
                z.to_owned(),
                0,
                !(z == "a" && i < a_down),
            ));
        }
    }
    v
}

fn as_refs(v: &[(String, String, u32, bool)]) -> Vec<(&str, &str, u32, bool)> {
    v.iter()
        .map(|(i, z, p, e)| (i.as_str(), z.as_str(), *p, *e))
        .collect()
}

#[test]
fn local_zone_first_and_other_zones_in_a_lower_priority() {
    let backends = three_zones(0);
    let a = Assignments::new(snap(&as_refs(&backends), Algorithm::RoundRobin), None, None);
    let l = layout(&a, Some(&zone("a")));
    for (id, (p, w)) in &l {
        if id.starts_with('a') {
            assert_eq!((*p, *w), (0, 250_000), "{id}");
        } else {
            assert_eq!((*p, *w), (1, 1), "{id}");
        }
    }
    // Without a zone (or in a zone no backend is in): every backend in priority 0, equal.
    let none = layout(&a, None);
    assert!(
        none.values().all(|&(p, w)| p == 0 && w == 83_333),
        "{none:?}"
    );
    assert!(a.key(Some(&zone("elsewhere"))).is_none());
}

#[test]
fn half_the_local_zone_down_spills_by_the_formula() {
    let backends = three_zones(2);
    let a = Assignments::new(snap(&as_refs(&backends), Algorithm::RoundRobin), None, None);
    let l = layout(&a, Some(&zone("a")));
    // Keep 0.6 over a's 2 eligible backends; 0.2 to each of b and c (4 backends each).
    assert_eq!(l["a2"], (0, 300_000));
    assert_eq!(l["a0"], (0, 1), "an unhealthy backend keeps weight 1");
    assert_eq!(l["b0"], (0, 50_000));
    assert_eq!(l["c3"], (0, 50_000));
}

#[test]
fn priorities_are_contiguous_and_overprovisioning_becomes_weights() {
    // P0: 4 backends, 2 eligible (h = 70); P1 gets 30 %; P3 (nothing in P2) gets none.
    let a = Assignments::new(
        snap(
            &[
                ("p0a", "", 0, true),
                ("p0b", "", 0, true),
                ("p0c", "", 0, false),
                ("p0d", "", 0, false),
                ("p1a", "", 1, true),
                ("p3a", "", 3, true),
            ],
            Algorithm::RoundRobin,
        ),
        None,
        None,
    );
    let l = layout(&a, None);
    assert_eq!(l["p0a"], (0, 350_000));
    assert_eq!(l["p1a"], (0, 300_000));
    assert_eq!(l["p3a"], (1, 1));
    // Every P0 backend healthy: P1 and P3 become priorities 1 and 2.
    let a = Assignments::new(
        snap(
            &[
                ("p0a", "", 0, true),
                ("p1a", "", 1, true),
                ("p3a", "", 3, true),
            ],
            Algorithm::RoundRobin,
        ),
        None,
        None,
    );
    let l = layout(&a, None);
    assert_eq!(l["p0a"], (0, 1_000_000));
    assert_eq!(l["p1a"], (1, 1));
    assert_eq!(l["p3a"], (2, 1));
}

#[test]
fn hashing_keeps_one_locality_per_priority() {
    let a = Assignments::new(
        snap(
            &[
                ("x", "a", 0, true),
                ("y", "b", 0, true),
                ("z", "a", 2, true),
            ],
            Algorithm::Maglev,
        ),
        None,
        None,
    );
    let cla = a.layout(None);
    assert_eq!(cla.endpoints.len(), 2);
    assert_eq!(cla.endpoints[0].lb_endpoints.len(), 2);
    assert_eq!(
        cla.endpoints.iter().map(|l| l.priority).collect::<Vec<_>>(),
        vec![0, 1]
    );
    // No zone routing: every client gets the one assignment.
    assert!(a.key(Some(&zone("a"))).is_none());
}

#[test]
fn the_fast_encoding_decodes_to_the_layout() {
    let mut backends = three_zones(2);
    backends.push(("p1".into(), String::new(), 2, true));
    backends.push(("big".into(), "b".into(), 0, true));
    let a = Assignments::new(snap(&as_refs(&backends), Algorithm::RoundRobin), None, None);
    for z in [None, Some(zone("a")), Some(zone("b"))] {
        let bytes = encoded(&a, z.as_ref());
        let decoded = endpoint::ClusterLoadAssignment::decode(&bytes[..]).expect("decodes");
        assert_eq!(decoded, a.layout(z.as_ref()), "{z:?}");
    }
    assert!(a
        .layout(Some(&zone("a")))
        .endpoints
        .iter()
        .any(|l| l.priority > 0));
}

#[test]
fn one_computation_per_zone_however_many_clients() {
    let mut backends = Vec::new();
    for z in 0..10 {
        for i in 0..10 {
            backends.push((format!("z{z}-{i}"), format!("z{z}"), 0, true));
        }
    }
    let a = Assignments::new(snap(&as_refs(&backends), Algorithm::RoundRobin), None, None);
    let zones: Vec<Zone> = (0..10).map(|z| zone(&format!("z{z}"))).collect();
    let mut first = Vec::new();
    for c in 0..1000 {
        let b = a.for_zone(Some(&zones[c % 10]));
        if c < 10 {
            first.push(b);
        } else {
            assert!(Arc::ptr_eq(&b, &first[c % 10]), "client {c} rebuilt");
        }
    }
    assert_eq!(a.computed(), 10);
    // Zone-less and unknown zones share one more.
    a.for_zone(None);
    a.for_zone(Some(&zone("nowhere")));
    assert_eq!(a.computed(), 11);
    assert_ne!(first[0].hash, first[1].hash);
}

#[test]
fn a_priority_in_route_all_panic_is_sent_healthy_over_all_its_backends() {
    // P0: 1 of 10 eligible (10 %); P1: 3 of 5 (60 %). Health 0.14 + 0.84 < 1, so a priority
    // below the 20 % threshold (P0) is in panic; overall 4 of 15 (27 %) is not.
    let mut backends: Vec<(String, String, u32, bool)> = (0..10)
        .map(|i| (format!("p0-{i}"), String::new(), 0, i == 0))
        .collect();
    backends.extend((0..5).map(|i| (format!("p1-{i}"), String::new(), 1, i < 3)));
    let mut s = (*snap(&as_refs(&backends), Algorithm::RoundRobin)).clone();
    s.policy.panic = Some(proto::PanicPolicy {
        threshold_percent: 20,
        mode: proto::PanicMode::RouteAll as i32,
    });
    let a = Assignments::new(Arc::new(s.clone()), None, None);
    let health = |a: &Assignments, id: &str| {
        a.layout(None)
            .endpoints
            .iter()
            .find(|l| l.locality.as_ref().is_some_and(|l| l.sub_zone == id))
            .map(|l| l.lb_endpoints[0].health_status)
    };
    let healthy = Some(core::HealthStatus::Healthy as i32);
    let unhealthy = Some(core::HealthStatus::Unhealthy as i32);
    assert_eq!(health(&a, "p0-5"), healthy, "P0 in panic: all HEALTHY");
    assert_eq!(health(&a, "p1-4"), unhealthy, "P1 not in panic");
    let l = layout(&a, None);
    // Loads normalised: P0 0.14 / 0.98 over its 10 backends, P1 0.84 / 0.98 over 3.
    assert_eq!(l["p0-5"], (0, 14_286), "{l:?}");
    assert_eq!(l["p1-0"], (0, 285_714), "{l:?}");
    assert_eq!(l["p1-4"], (0, 1), "{l:?}");
    // Without a panic threshold: P0's unhealthy backends stay unhealthy, weight 1.
    s.policy.panic = None;
    let a = Assignments::new(Arc::new(s), None, None);
    assert_eq!(health(&a, "p0-5"), unhealthy);
    let l = layout(&a, None);
    assert_eq!(l["p0-5"], (0, 1), "{l:?}");
    assert_eq!(l["p0-0"], (0, 142_857), "{l:?}");
}

/// The next version's encoding carries the unchanged backends' bytes over from the previous
/// assignments, and still decodes to its own layout: a changed record (new `Arc`), a health
/// override that changed with the same record (priority 0 enters `route_all` panic), and a
/// switch to a hashing algorithm (other grouping) are each encoded anew.
#[test]
fn the_next_version_carries_unchanged_backends_over() {
    let check = |a: &Assignments| {
        for z in [None, Some(zone("a")), Some(zone("b"))] {
            let bytes = encoded(a, z.as_ref());
            let decoded = endpoint::ClusterLoadAssignment::decode(&bytes[..]).expect("decodes");
            assert_eq!(decoded, a.layout(z.as_ref()), "{z:?}");
        }
    };
    let mut backends = three_zones(0);
    backends.push(("p1".into(), String::new(), 1, true));
    let first = snap(&as_refs(&backends), Algorithm::RoundRobin);
    let a1 = Arc::new(Assignments::new(first.clone(), None, None));
    check(&a1);

    // One backend's health flips (a new record); the others are the same Arcs.
    let mut s = (*first).clone();
    let mut changed = (*s.servers["a0"]).clone();
    changed.set_health(proto::HealthStatus::Unhealthy);
    s.servers.insert("a0".into(), Arc::new(changed));
    s.version.version += 1;
    let second = Arc::new(s);
    let a2 = Arc::new(Assignments::new(second.clone(), Some(a1.clone()), None));
    check(&a2);
    let fresh = Assignments::new(second.clone(), None, None);
    assert_eq!(encoded(&a2, None), encoded(&fresh, None));
    assert!(a2.previous.lock().is_none(), "let go once carried");
    let carried = |a: &Assignments, b: &Assignments, id: &str| {
        let i = a.members.iter().position(|m| m.server.server_id == id);
        let p = |x: &Assignments| x.prefixes.get().expect("encoded")[i.expect("member")].clone();
        p(a) == p(b)
    };
    assert!(carried(&a1, &a2, "b1"));
    assert!(
        !carried(&a1, &a2, "a0"),
        "the changed record is encoded anew"
    );

    // Same records, but priority 0 enters route_all panic: its endpoints are sent HEALTHY.
    let mut s = (*second).clone();
    s.policy.panic = Some(proto::PanicPolicy {
        threshold_percent: 99,
        mode: proto::PanicMode::RouteAll as i32,
    });
    let third = Arc::new(s);
    let a3 = Assignments::new(third.clone(), Some(a2.clone()), None);
    check(&a3);
    assert_eq!(
        encoded(&a3, None),
        encoded(&Assignments::new(third.clone(), None, None), None)
    );

    // A hashing algorithm groups by priority only: nothing is carried.
    let mut s = (*third).clone();
    s.policy.algorithm = Algorithm::RingHash as i32;
    s.policy.panic = None;
    let a4 = Assignments::new(Arc::new(s.clone()), Some(a2), None);
    let fresh = Assignments::new(Arc::new(s), None, None);
    assert_eq!(a4.layout(None), fresh.layout(None));
}

/// Live inputs: `demand` per zone of "r", `in_flight` per backend id.
fn inputs(generation: u64, demand: &[(&str, f64)], in_flight: &[(&str, u64)]) -> Inputs {
    Inputs {
        demand_generation: generation,
        demand: demand.iter().map(|(z, d)| (zone(z), *d)).collect(),
        in_flight: Arc::new(
            in_flight
                .iter()
                .map(|(id, n)| ((*id).to_owned(), *n))
                .collect(),
        ),
    }
}

/// Share of the planned locality weight (priority 0) on the backends of zone `z`.
fn zone_share(a: &Assignments, client: &str, z: &str) -> f64 {
    let l = layout(a, Some(&zone(client)));
    let total: u32 = l.values().filter(|(p, _)| *p == 0).map(|(_, w)| w).sum();
    let in_z: u32 = l
        .iter()
        .filter(|(id, (p, _))| *p == 0 && id.starts_with(z))
        .map(|(_, (_, w))| w)
        .sum();
    f64::from(in_z) / f64::from(total)
}

#[test]
fn demand_replans_a_zone_without_a_new_version() {
    let a = Assignments::new(
        snap(&as_refs(&three_zones(0)), Algorithm::RoundRobin),
        None,
        None,
    );
    let (in_a, in_b) = (a.for_zone(Some(&zone("a"))), a.for_zone(Some(&zone("b"))));
    assert_eq!(zone_share(&a, "a", "a"), 1.0, "equal demand: a stays home");
    // a makes 60 % of the calls on a third of the capacity: it keeps about 1/3 ÷ 0.6.
    let d = inputs(1, &[("a", 0.6), ("b", 0.2), ("c", 0.2)], &[]);
    assert_eq!(a.refresh(d.clone()), 1, "a's plan moved, b's did not");
    let now_a = a.for_zone(Some(&zone("a")));
    assert_ne!(now_a.hash, in_a.hash, "a's clients get a new assignment");
    assert_eq!(now_a.version, in_a.version, "of the same store version");
    let local = zone_share(&a, "a", "a");
    assert!((0.5..0.6).contains(&local), "a keeps {local}");
    let decoded = endpoint::ClusterLoadAssignment::decode(&now_a.any.value[..]).expect("decodes");
    assert_eq!(decoded, a.layout(Some(&zone("a"))));
    // b's demand fits its capacity: its assignment is the very same.
    assert!(Arc::ptr_eq(&a.for_zone(Some(&zone("b"))), &in_b));
    // The same inputs again: nothing to do.
    assert_eq!(a.refresh(d), 0);
    // A zone asked for later is planned with the current inputs.
    let fresh = a.for_zone(Some(&zone("c")));
    assert_eq!(
        endpoint::ClusterLoadAssignment::decode(&fresh.any.value[..]).expect("decodes"),
        a.layout(Some(&zone("c")))
    );
    // The next version starts from these inputs.
    let next = Assignments::new(
        snap(&as_refs(&three_zones(0)), Algorithm::RoundRobin),
        Some(Arc::new(a)),
        None,
    );
    assert!((0.5..0.6).contains(&zone_share(&next, "a", "a")));
}

#[test]
fn load_replans_only_when_a_share_moves_past_the_threshold() {
    let mut s = (*snap(&as_refs(&three_zones(0)), Algorithm::RoundRobin)).clone();
    s.policy.locality = Some(proto::LocalityPolicy {
        saturation_in_flight: 1000,
        ..Default::default()
    });
    let a = Assignments::new(Arc::new(s), None, None);
    let before = a.for_zone(Some(&zone("a")));
    // Per backend of a: its calls in flight (saturation 1,000).
    let busy = |n: [u64; 4]| {
        let v: Vec<(String, u64)> = (0..4).map(|i| (format!("a{i}"), n[i])).collect();
        let refs: Vec<(&str, u64)> = v.iter().map(|(id, n)| (id.as_str(), *n)).collect();
        inputs(0, &[], &refs)
    };
    // At 90 %: a's capacity falls to a tenth, it spills before any ejection.
    assert_eq!(a.refresh(busy([900; 4])), 1);
    let spilled = a.for_zone(Some(&zone("a")));
    assert_ne!(spilled.hash, before.hash);
    let local = zone_share(&a, "a", "a");
    assert!((0.1..0.2).contains(&local), "a keeps {local}");
    // One more call on one backend moves a's share by about 0.0004: not pushed.
    assert_eq!(
        a.refresh(busy([901, 900, 900, 900])),
        0,
        "noise is not pushed"
    );
    assert!(Arc::ptr_eq(&a.for_zone(Some(&zone("a"))), &spilled));
    // Drift adds up against what the clients hold: 10 more calls on each, twice.
    let moved = [910, 920].into_iter().any(|n| a.refresh(busy([n; 4])) == 1);
    assert!(moved, "a drift past 1 % is pushed");
    // Drained: back home.
    assert_eq!(a.refresh(busy([0; 4])), 1);
    assert_eq!(zone_share(&a, "a", "a"), 1.0);
}

#[test]
fn consistent_hashing_ignores_live_inputs() {
    let a = Assignments::new(
        snap(&as_refs(&three_zones(0)), Algorithm::RingHash),
        None,
        None,
    );
    let before = a.for_zone(Some(&zone("a")));
    assert_eq!(a.refresh(inputs(1, &[("a", 0.9), ("b", 0.1)], &[])), 0);
    assert!(Arc::ptr_eq(&a.for_zone(Some(&zone("a"))), &before));
}

#[test]
fn eds_has_the_index_the_refresher_peeks() {
    assert_eq!(
        super::super::SERVED[super::super::ENDPOINTS_INDEX],
        super::super::resources::ENDPOINTS
    );
}
