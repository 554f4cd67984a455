//! Consistent hashing (Maglev and ring hash): disruption on remove / add / ineligible,
//! balance (max/mean), determinism and input-order independence, bounded load.
//!
//! The measured figures (1,000,000 keys) are printed; run `cargo test -p dlb --release --test
//! balance_hash -- --nocapture` to see them.
#![allow(clippy::unwrap_used)]

use dlb::balance::{Algorithm, BackendSpec, Pick, Picker, PolicyConfig};

fn spec(id: usize, weight: u32, eligible: bool) -> BackendSpec {
    BackendSpec {
        id: format!("backend-{id}"),
        address: format!("10.0.{}.{}:8080", id / 256, id % 256),
        weight,
        hash_key: None,
        eligible,
    }
}

fn specs(n: usize) -> Vec<BackendSpec> {
    (0..n).map(|i| spec(i, 1, true)).collect()
}

fn build(algorithm: Algorithm, specs: &[BackendSpec]) -> Picker {
    let mut policy = PolicyConfig::new(algorithm);
    policy.track_in_flight = false;
    Picker::build(&policy, specs).unwrap()
}

/// Number of keys for the distribution tests.
fn key_count() -> u64 {
    1_000_000
}

fn key(i: u64) -> [u8; 8] {
    i.to_le_bytes()
}

/// The backend index (in `p.backends()`) for each key.
fn mapping(p: &Picker, keys: u64) -> Vec<String> {
    (0..keys)
        .map(|i| p.pick(Some(&key(i))).unwrap().backend().id().to_owned())
        .collect()
}

const ALGOS: [Algorithm; 2] = [Algorithm::Maglev, Algorithm::RingHash];

#[test]
fn ineligible_backend_moves_only_its_keys() {
    let n = 100;
    let keys = key_count();
    for algo in ALGOS {
        let before = mapping(&build(algo, &specs(n)), keys);
        let mut s = specs(n);
        s[42].eligible = false;
        let after = mapping(&build(algo, &s), keys);
        let mut moved = 0u64;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(b, "backend-42", "{algo:?}: a key moved off {b} to {a}");
                moved += 1;
            }
            assert_ne!(a, "backend-42");
        }
        let on_42 = before.iter().filter(|b| *b == "backend-42").count() as u64;
        assert_eq!(moved, on_42);
        println!(
            "{algo:?} N={n}: backend made ineligible: moved {:.5} of {keys} keys (its share), no other key moved",
            moved as f64 / keys as f64
        );
    }
}

#[test]
fn removing_a_backend_moves_only_its_keys_ring() {
    let n = 100;
    let keys = key_count();
    let before = mapping(&build(Algorithm::RingHash, &specs(n)), keys);
    let mut s = specs(n);
    s.remove(42);
    let after = mapping(&build(Algorithm::RingHash, &s), keys);
    let mut moved = 0u64;
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            assert_eq!(b, "backend-42", "a key moved off {b}");
            moved += 1;
        }
    }
    println!(
        "RingHash N={n}: remove 1 backend: moved {:.5} of {keys} keys (ideal 1/N = {:.5}); keys on other backends moved: 0",
        moved as f64 / keys as f64,
        1.0 / n as f64
    );
}

#[test]
fn removing_a_backend_maglev_disruption() {
    // Maglev's table is rebuilt on removal: the removed backend's keys move, and (by the design
    // of Maglev) a small extra fraction of other keys too. Making a backend ineligible instead
    // moves exactly its keys (see `ineligible_backend_moves_only_its_keys`).
    let n = 100;
    let keys = key_count();
    let before = mapping(&build(Algorithm::Maglev, &specs(n)), keys);
    let mut s = specs(n);
    s.remove(42);
    let after = mapping(&build(Algorithm::Maglev, &s), keys);
    let (mut moved, mut moved_other) = (0u64, 0u64);
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            moved += 1;
            if b != "backend-42" {
                moved_other += 1;
            }
        }
    }
    let other = moved_other as f64 / keys as f64;
    println!(
        "Maglev N={n}: remove 1 backend: moved {:.5} of {keys} keys (ideal 1/N = {:.5}); keys moved between surviving backends: {other:.5}",
        moved as f64 / keys as f64,
        1.0 / n as f64,
    );
    assert!(moved as f64 / keys as f64 <= 1.5 / n as f64);
    assert!(other <= 0.005, "{other}");
}

#[test]
fn adding_a_backend_moves_at_most_one_and_a_half_shares() {
    let n = 100;
    let keys = key_count();
    for algo in ALGOS {
        let before = mapping(&build(algo, &specs(n)), keys);
        let after = mapping(&build(algo, &specs(n + 1)), keys);
        let mut moved = 0u64;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                moved += 1;
                if algo == Algorithm::RingHash {
                    assert_eq!(
                        a,
                        &format!("backend-{n}"),
                        "ring: a key moved to an old backend"
                    );
                }
            }
        }
        let frac = moved as f64 / keys as f64;
        let bound = 1.5 / (n + 1) as f64;
        println!(
            "{algo:?} N={n}: add 1 backend: moved {frac:.5} of {keys} keys (ideal 1/(N+1) = {:.5}, bound {bound:.5})",
            1.0 / (n + 1) as f64
        );
        assert!(frac <= bound, "{algo:?}: {frac} > {bound}");
    }
}

fn max_over_mean(p: &Picker, keys: u64) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for i in 0..keys {
        *counts
            .entry(p.pick(Some(&key(i))).unwrap().backend().id().to_owned())
            .or_insert(0u64) += 1;
    }
    let max = *counts.values().max().unwrap() as f64;
    max / (keys as f64 / p.eligible_count() as f64)
}

#[test]
fn maglev_max_over_mean() {
    let keys = key_count();
    let p = build(Algorithm::Maglev, &specs(100));
    let r = max_over_mean(&p, keys);
    println!("Maglev N=100: max/mean load over {keys} keys = {r:.4}");
    assert!(r <= 1.05, "{r}");
}

#[test]
fn ring_max_over_mean() {
    let keys = key_count();
    let p = build(Algorithm::RingHash, &specs(100));
    let r = max_over_mean(&p, keys);
    println!("RingHash N=100 (128 points per backend): max/mean load over {keys} keys = {r:.4}");
    assert!(r <= 1.5, "{r}");
}

#[test]
fn weights_are_honoured() {
    for algo in ALGOS {
        let s: Vec<_> = (0..10)
            .map(|i| spec(i, if i == 0 { 5 } else { 1 }, true))
            .collect();
        let p = build(algo, &s);
        let keys = 200_000u64;
        let on0 = (0..keys)
            .filter(|&i| p.pick(Some(&key(i))).unwrap().backend().id() == "backend-0")
            .count() as f64
            / keys as f64;
        // Expected share 5/14.
        assert!((on0 - 5.0 / 14.0).abs() < 0.03, "{algo:?}: {on0}");
    }
}

#[test]
fn independent_builds_and_shuffled_input_agree() {
    let keys = 100_000u64;
    for algo in ALGOS {
        let mut s: Vec<_> = (0..200)
            .map(|i| spec(i, 1 + i as u32 % 7, i % 13 != 0))
            .collect();
        s[5].hash_key = Some("stable-key-5".into());
        let a = build(algo, &s);
        fastrand::seed(7);
        fastrand::shuffle(&mut s);
        let b = build(algo, &s);
        let c = build(algo, &s);
        for i in 0..keys {
            let k = key(i);
            let x = a.pick(Some(&k)).unwrap().backend().id().to_owned();
            assert_eq!(x, b.pick(Some(&k)).unwrap().backend().id());
            assert_eq!(x, c.pick(Some(&k)).unwrap().backend().id());
        }
    }
}

#[test]
fn hash_key_not_address_decides() {
    for algo in ALGOS {
        let a = build(algo, &specs(20));
        let mut s = specs(20);
        for b in &mut s {
            b.address = format!("moved-{}", b.address);
        }
        // A backend that moved under a new id but keeps its hash key keeps its keys.
        s[3].id = "renamed".into();
        s[3].hash_key = Some("backend-3".into());
        let b = build(algo, &s);
        for i in 0..20_000u64 {
            let k = key(i);
            let x = a.pick(Some(&k)).unwrap().backend().id().to_owned();
            let y = b.pick(Some(&k)).unwrap().backend().id().to_owned();
            if x == "backend-3" {
                assert_eq!(y, "renamed");
            } else {
                assert_eq!(x, y);
            }
        }
    }
}

#[test]
fn none_key_picks_randomly_among_eligible() {
    for algo in ALGOS {
        let s: Vec<_> = (0..5).map(|i| spec(i, 1, i != 2)).collect();
        let p = build(algo, &s);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            let id = p.pick(None).unwrap().backend().id().to_owned();
            assert_ne!(id, "backend-2");
            seen.insert(id);
        }
        assert_eq!(seen.len(), 4);
    }
}

fn bounded(algo: Algorithm, factor: f64, s: &[BackendSpec]) -> Picker {
    let mut policy = PolicyConfig::new(algo);
    policy.bounded_load_factor = Some(factor);
    Picker::build(&policy, s).unwrap()
}

fn cap(factor: f64, total: u64, weight: u32, total_weight: u64) -> u64 {
    ((factor * total as f64 * f64::from(weight) / total_weight as f64).ceil() as u64).max(1)
}

#[test]
fn bounded_load_cap_holds_under_a_hot_key() {
    for algo in ALGOS {
        let s: Vec<_> = (0..10).map(|i| spec(i, 1, i != 9)).collect();
        let p = bounded(algo, 1.25, &s);
        let mut held: Vec<Pick<'_>> = Vec::new();
        for i in 0..2_000u64 {
            // Half the requests carry one hot key.
            let k = if i % 2 == 0 { 0 } else { fastrand::u64(1..) };
            held.push(p.pick(Some(&key(k))).unwrap());
            let total = held.len() as u64;
            for b in p.backends() {
                let c = cap(1.25, total, 1, 9);
                assert!(
                    b.load().in_flight() <= c,
                    "{algo:?}: {} holds {} > cap {c} at total {total}",
                    b.id(),
                    b.load().in_flight()
                );
            }
        }
        let max = p
            .backends()
            .iter()
            .map(|b| b.load().in_flight())
            .max()
            .unwrap();
        println!("{algo:?} bounded c=1.25, 9 eligible, 2000 held, 50% hot key: max in flight {max} (cap {})", cap(1.25, 2000, 1, 9));
        assert_eq!(p.get("backend-9").unwrap().load().in_flight(), 0);
        drop(held);
        assert!(p.backends().iter().all(|b| b.load().in_flight() == 0));
    }
}

#[test]
fn bounded_load_weighted_caps() {
    let s = vec![spec(0, 3, true), spec(1, 1, true), spec(2, 1, true)];
    let p = bounded(Algorithm::Maglev, 1.0, &s);
    let held: Vec<Pick<'_>> = (0..500).map(|_| p.pick(Some(b"hot")).unwrap()).collect();
    // c = 1: caps are exactly the weighted fair shares.
    assert_eq!(p.get("backend-0").unwrap().load().in_flight(), 300);
    assert_eq!(p.get("backend-1").unwrap().load().in_flight(), 100);
    assert_eq!(p.get("backend-2").unwrap().load().in_flight(), 100);
    drop(held);
}

#[test]
fn bounded_load_cap_holds_concurrently() {
    for algo in ALGOS {
        let s: Vec<_> = (0..8).map(|i| spec(i, 1, true)).collect();
        let p = bounded(algo, 1.25, &s);
        let per_thread = 1_000usize;
        std::thread::scope(|sc| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let p = &p;
                    sc.spawn(move || {
                        (0..per_thread)
                            .map(|i| {
                                let k = if i % 2 == 0 { 0 } else { fastrand::u64(1..) };
                                p.pick(Some(&key(k))).unwrap()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let held: Vec<Vec<Pick<'_>>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let total = (4 * per_thread) as u64;
            let c = cap(1.25, total, 1, 8);
            for b in p.backends() {
                assert!(
                    b.load().in_flight() <= c,
                    "{algo:?}: {} > {c}",
                    b.load().in_flight()
                );
            }
            drop(held);
        });
        assert!(p.backends().iter().all(|b| b.load().in_flight() == 0));
    }
}

#[test]
fn bounded_rebuild_carries_the_total() {
    let s: Vec<_> = (0..4).map(|i| spec(i, 1, true)).collect();
    let mut policy = PolicyConfig::new(Algorithm::Maglev);
    policy.bounded_load_factor = Some(1.0);
    let old = Picker::build(&policy, &s).unwrap();
    let held: Vec<Pick<'_>> = (0..40).map(|_| old.pick(Some(b"k")).unwrap()).collect();
    let new = old.rebuild(&policy, &s).unwrap();
    // 40 in flight already, 10 per backend: the next pick may go over only by the new average.
    let g = new.pick(Some(b"k")).unwrap();
    assert!(g.backend().load().in_flight() <= 11);
    drop(held);
    drop(g);
    assert!(new.backends().iter().all(|b| b.load().in_flight() == 0));
}

#[test]
fn maglev_add_disruption_by_size() {
    // Maglev moves a little more than the ideal share; the excess shrinks as M/N grows.
    let keys = key_count();
    for n in [10usize, 100, 1000, 3000] {
        if cfg!(debug_assertions) && n > 100 {
            continue;
        }
        let before = mapping(&build(Algorithm::Maglev, &specs(n)), keys);
        let after = mapping(&build(Algorithm::Maglev, &specs(n + 1)), keys);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let frac = moved as f64 / keys as f64;
        let m = dlb::balance::maglev::table_size(n + 1);
        println!(
            "Maglev N={n} (M={m}, M/N={}): add 1 backend: moved {frac:.5} = {:.2} x ideal 1/(N+1)",
            m / (n as u64 + 1),
            frac * (n + 1) as f64
        );
        // The bar (1.5 x the ideal share) holds up to N = 100; beyond, Maglev's table
        // is only ~100-200 slots per backend and the excess grows (reported, loosely bounded).
        let factor = if n <= 100 { 1.5 } else { 6.0 };
        assert!(frac <= factor / (n + 1) as f64, "N={n}: {frac}");
    }
}
