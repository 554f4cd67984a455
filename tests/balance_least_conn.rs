//! Least connections, exact and P2C: minimal weighted load at pick time, guards restore the
//! counts, concurrency, rebuild carry-over, baselines.
#![allow(clippy::unwrap_used)]

use dlb::balance::{Algorithm, BackendSpec, Pick, Picker, PolicyConfig};
use proptest::prelude::*;

fn spec(id: usize, weight: u32, eligible: bool) -> BackendSpec {
    BackendSpec {
        id: format!("b{id}"),
        address: format!("10.0.0.{id}:80"),
        weight,
        hash_key: None,
        eligible,
    }
}

fn build(algorithm: Algorithm, specs: &[BackendSpec]) -> Picker {
    Picker::build(&PolicyConfig::new(algorithm), specs).unwrap()
}

/// Whether backend `b` has minimal `load / weight` among the eligible backends.
fn is_minimal(picker: &Picker, id: &str, loads: &[(String, u64, u32, bool)]) -> bool {
    let _ = picker;
    let (_, l, w, _) = loads.iter().find(|x| x.0 == id).unwrap();
    loads
        .iter()
        .filter(|x| x.3)
        .all(|(_, lo, wo, _)| u128::from(*l) * u128::from(*wo) <= u128::from(*lo) * u128::from(*w))
}

fn snapshot(picker: &Picker) -> Vec<(String, u64, u32, bool)> {
    picker
        .backends()
        .iter()
        .map(|b| {
            (
                b.id().to_owned(),
                b.load().load(),
                b.weight(),
                b.is_eligible(),
            )
        })
        .collect()
}

fn all_zero(picker: &Picker) -> bool {
    picker.backends().iter().all(|b| b.load().in_flight() == 0)
}

#[test]
fn ties_rotate_through_every_backend() {
    let specs: Vec<_> = (0..7).map(|i| spec(i, 1, true)).collect();
    let p = build(Algorithm::LeastConnExact, &specs);
    for _ in 0..5 {
        let mut seen: Vec<String> = (0..7)
            .map(|_| p.pick(None).unwrap().backend().id().to_owned())
            .collect();
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen.len(),
            7,
            "7 picks with nothing in flight must visit all 7"
        );
    }
}

#[test]
fn weighted_exact_fills_in_proportion() {
    let specs = vec![spec(0, 1, true), spec(1, 3, true), spec(2, 2, false)];
    let p = build(Algorithm::LeastConnExact, &specs);
    let guards: Vec<Pick<'_>> = (0..400).map(|_| p.pick(None).unwrap()).collect();
    assert_eq!(p.get("b0").unwrap().load().in_flight(), 100);
    assert_eq!(p.get("b1").unwrap().load().in_flight(), 300);
    assert_eq!(p.get("b2").unwrap().load().in_flight(), 0);
    drop(guards);
    assert!(all_zero(&p));
}

#[test]
fn baseline_is_seen_without_refresh() {
    let specs: Vec<_> = (0..50).map(|i| spec(i, 1, true)).collect();
    let p = build(Algorithm::LeastConnExact, &specs);
    for b in p.backends().iter().filter(|b| b.id() != "b17") {
        b.load().set_baseline(10);
    }
    // Every stale leaf that reaches the root is repaired before answering.
    for _ in 0..10 {
        let g = p.pick(None).unwrap();
        assert_eq!(g.backend().id(), "b17");
        drop(g);
    }
    // Lowered baselines are seen after a refresh (or within n picks by the sweep).
    for b in p.backends() {
        b.load().set_baseline(0);
    }
    p.get("b17").unwrap().load().set_baseline(5);
    p.refresh_loads();
    for _ in 0..49 {
        let g = p.pick(None).unwrap();
        assert_ne!(g.backend().id(), "b17");
    }
}

#[test]
fn rebuild_carries_loads_and_old_guards_release_them() {
    let specs: Vec<_> = (0..4).map(|i| spec(i, 1, true)).collect();
    let old = build(Algorithm::LeastConnExact, &specs);
    let held: Vec<Pick<'_>> = (0..8).map(|_| old.pick(None).unwrap()).collect();
    let mut specs2 = specs.clone();
    specs2.push(spec(4, 1, true));
    let new = old
        .rebuild(&PolicyConfig::new(Algorithm::LeastConnExact), &specs2)
        .unwrap();
    for i in 0..4 {
        assert_eq!(new.get(&format!("b{i}")).unwrap().load().in_flight(), 2);
        assert!(std::sync::Arc::ptr_eq(
            new.get(&format!("b{i}")).unwrap().load(),
            old.get(&format!("b{i}")).unwrap().load()
        ));
    }
    // The new backend is empty: the next two picks go there.
    let a = new.pick(None).unwrap();
    let b = new.pick(None).unwrap();
    assert_eq!(a.backend().id(), "b4");
    assert_eq!(b.backend().id(), "b4");
    // Old guards drop: the shared counts fall; the new tree catches up.
    drop(held);
    assert_eq!(new.get("b0").unwrap().load().in_flight(), 0);
    new.refresh_loads();
    let snap = snapshot(&new);
    let c = new.pick(None).unwrap();
    assert!(is_minimal(&new, c.backend().id(), &snap));
    assert_ne!(c.backend().id(), "b4");
    drop((a, b, c));
    assert!(all_zero(&new));
}

#[test]
fn concurrent_picks_leave_all_counts_at_zero() {
    for algorithm in [
        Algorithm::LeastConnExact,
        Algorithm::LeastConnP2c,
        Algorithm::RoundRobin,
        Algorithm::Maglev,
        Algorithm::RingHash,
    ] {
        let specs: Vec<_> = (0..16).map(|i| spec(i, 1 + i as u32 % 4, i != 3)).collect();
        let mut policy = PolicyConfig::new(algorithm);
        if algorithm == Algorithm::Maglev {
            policy.bounded_load_factor = Some(1.25);
        }
        let p = Picker::build(&policy, &specs).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let p = &p;
                s.spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..2_000u32 {
                        let key = (i * 7 + t).to_le_bytes();
                        held.push(p.pick(Some(&key)).unwrap());
                        if i % 3 == 0 {
                            held.swap_remove(fastrand::usize(..held.len()));
                        }
                        if held.len() > 50 {
                            held.clear();
                        }
                    }
                });
            }
        });
        assert!(all_zero(&p), "{algorithm:?}");
        assert_eq!(p.get("b3").unwrap().load().in_flight(), 0);
    }
}

#[test]
fn p2c_prefers_the_less_loaded_and_skips_ineligible() {
    let specs = vec![spec(0, 1, true), spec(1, 1, true), spec(2, 1, false)];
    let p = build(Algorithm::LeastConnP2c, &specs);
    p.get("b0").unwrap().load().set_baseline(1_000);
    for _ in 0..200 {
        // With two eligible backends both are always drawn: the lighter one wins.
        let g = p.pick(None).unwrap();
        assert_eq!(g.backend().id(), "b1");
    }
    let specs = vec![spec(0, 1, true), spec(1, 1, false)];
    let p = build(Algorithm::LeastConnP2c, &specs);
    for _ in 0..20 {
        assert_eq!(p.pick(None).unwrap().backend().id(), "b0");
    }
}

#[test]
fn p2c_weighted_compare() {
    // b0 has 10 in flight at weight 10 (ratio 1); b1 has 2 at weight 1 (ratio 2): b0 wins.
    let specs = vec![spec(0, 10, true), spec(1, 1, true)];
    let p = build(Algorithm::LeastConnP2c, &specs);
    p.get("b0").unwrap().load().set_baseline(10);
    p.get("b1").unwrap().load().set_baseline(2);
    assert_eq!(p.pick(None).unwrap().backend().id(), "b0");
}

#[derive(Debug, Clone)]
enum Op {
    Pick,
    Drop(usize),
    Baseline(usize, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Pick),
        2 => any::<usize>().prop_map(Op::Drop),
        1 => (any::<usize>(), 0u64..20).prop_map(|(i, v)| Op::Baseline(i, v)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(if cfg!(debug_assertions) { 64 } else { 256 }))]

    #[test]
    fn exact_picks_minimal_weighted_load(
        weights in prop::collection::vec((1u32..=20, prop::bool::weighted(0.85)), 1..=24),
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let specs: Vec<_> = weights.iter().enumerate().map(|(i, &(w, e))| spec(i, w, e)).collect();
        let p = build(Algorithm::LeastConnExact, &specs);
        let mut held: Vec<Pick<'_>> = Vec::new();
        for op in ops {
            match op {
                Op::Pick => {
                    let snap = snapshot(&p);
                    match p.pick(None) {
                        Ok(g) => {
                            prop_assert!(is_minimal(&p, g.backend().id(), &snap));
                            prop_assert!(g.backend().is_eligible());
                            held.push(g);
                        }
                        Err(e) => {
                            prop_assert_eq!(p.eligible_count(), 0);
                            prop_assert_eq!(e, dlb::balance::PickError::NoEligibleBackends);
                        }
                    }
                }
                Op::Drop(i) if !held.is_empty() => {
                    let n = held.len();
                    held.swap_remove(i % n);
                }
                Op::Drop(_) => {}
                Op::Baseline(i, v) => {
                    p.backends()[i % specs.len()].load().set_baseline(v);
                    p.refresh_loads();
                }
            }
        }
        drop(held);
        prop_assert!(all_zero(&p));
    }
}
