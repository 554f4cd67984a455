//! Smooth weighted round robin: exact proportions over every window of one period, smoothness
//! (no light backend twice in a row, cyclically), eligibility, threads.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use dlb::balance::{Algorithm, BackendSpec, Picker, PolicyConfig};
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

fn rr(weights: &[u32]) -> Picker {
    let specs: Vec<_> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| spec(i, w, true))
        .collect();
    Picker::build(&PolicyConfig::new(Algorithm::RoundRobin), &specs).unwrap()
}

/// Checks the claims on a stream of picks (backend indices) of a single thread.
fn check_stream(weights: &[u32], picks: &[usize]) {
    let total: u32 = weights.iter().sum();
    let w = total as usize;
    assert!(picks.len() >= 2 * w);
    // Exact proportions over every window of Σw consecutive picks.
    let mut counts = vec![0u32; weights.len()];
    for &p in &picks[..w] {
        counts[p] += 1;
    }
    assert_eq!(counts, weights, "first window");
    for k in w..picks.len() {
        counts[picks[k]] += 1;
        counts[picks[k - w]] -= 1;
        assert_eq!(counts, weights, "window ending at {k}");
    }
    // Smoothness: a backend is picked twice in a row only if it outweighs all others together.
    for pair in picks.windows(2) {
        if pair[0] == pair[1] {
            let wi = weights[pair[0]];
            assert!(
                wi > total - wi,
                "backend {} (weight {wi} of {total}) picked twice in a row: {weights:?}",
                pair[0]
            );
        }
    }
}

fn picks_of(picker: &Picker, count: usize) -> Vec<usize> {
    let index: HashMap<&str, usize> = picker
        .backends()
        .iter()
        .enumerate()
        .map(|(i, b)| (b.id(), i))
        .collect();
    (0..count)
        .map(|_| index[picker.pick(None).unwrap().backend().id()])
        .collect()
}

#[test]
fn three_one_one_one_is_smooth_across_the_period_boundary() {
    let weights = [3, 1, 1, 1];
    let p = rr(&weights);
    let picks = picks_of(&p, 6 * 20);
    check_stream(&weights, &picks);
}

#[test]
fn one_heavy_backend() {
    for weights in [vec![10, 1, 1], vec![5, 1], vec![7], vec![100, 3, 2, 1]] {
        let total: u32 = weights.iter().sum();
        let p = rr(&weights);
        let picks = picks_of(&p, 3 * total as usize);
        check_stream(&weights, &picks);
    }
}

#[test]
fn ineligible_backends_are_skipped() {
    let specs = vec![spec(0, 3, true), spec(1, 5, false), spec(2, 1, true)];
    let p = Picker::build(&PolicyConfig::new(Algorithm::RoundRobin), &specs).unwrap();
    for _ in 0..100 {
        assert_ne!(p.pick(None).unwrap().backend().id(), "b1");
    }
    assert_eq!(p.eligible_count(), 2);
}

#[test]
fn tracking_follows_the_policy() {
    let specs = vec![spec(0, 1, true)];
    let mut policy = PolicyConfig::new(Algorithm::RoundRobin);
    policy.track_in_flight = false;
    let p = Picker::build(&policy, &specs).unwrap();
    let g = p.pick(None).unwrap();
    assert!(!g.is_counted());
    assert_eq!(g.backend().load().in_flight(), 0);
    drop(g);
    policy.track_in_flight = true;
    let p = Picker::build(&policy, &specs).unwrap();
    let g = p.pick(None).unwrap();
    assert!(g.is_counted());
    assert_eq!(g.backend().load().in_flight(), 1);
    drop(g);
    assert_eq!(p.backends()[0].load().in_flight(), 0);
}

#[test]
fn proportions_are_exact_across_threads() {
    let weights = [5u32, 3, 2, 1, 1];
    let total: u32 = weights.iter().sum();
    let p = rr(&weights);
    let rounds = 50;
    let counts: Vec<Vec<usize>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| picks_of(&p, rounds * total as usize)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut sum = vec![0usize; weights.len()];
    for picks in &counts {
        // Each thread walks its own stripe: exactly the schedule.
        check_stream(&weights, picks);
        for &i in picks {
            sum[i] += 1;
        }
    }
    for (i, &w) in weights.iter().enumerate() {
        assert_eq!(sum[i], 4 * rounds * w as usize);
    }
}

#[test]
fn proportions_are_exact_with_more_threads_than_stripes() {
    // 24 threads: 16 own a stripe, the others share the CAS stripes; every thread makes a
    // whole number of periods, so the totals are exact.
    let weights = [4u32, 2, 1];
    let total: usize = 7;
    let p = rr(&weights);
    let rounds = 30;
    let sum = std::thread::scope(|s| {
        let handles: Vec<_> = (0..24)
            .map(|_| s.spawn(|| picks_of(&p, rounds * total)))
            .collect();
        let mut sum = vec![0usize; weights.len()];
        for h in handles {
            for i in h.join().unwrap() {
                sum[i] += 1;
            }
        }
        sum
    });
    for (i, &w) in weights.iter().enumerate() {
        assert_eq!(sum[i], 24 * rounds * w as usize);
    }
}

#[test]
fn large_weight_sums_are_scaled_proportionally() {
    // Σw = 2,500,000 > 2^20: weights are scaled; proportions stay within 0.1%.
    let weights: Vec<u32> = (0..500).map(|i| 1 + (i * 37 % 10_000)).collect();
    let p = rr(&weights);
    let schedule = p.wrr_schedule().unwrap();
    let total_w: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    assert!(schedule.len() <= (1 << 20) + weights.len());
    let mut counts = vec![0u64; weights.len()];
    for &i in schedule {
        counts[i as usize] += 1;
    }
    for (i, &w) in weights.iter().enumerate() {
        let expect = f64::from(w) / total_w as f64;
        let got = counts[i] as f64 / schedule.len() as f64;
        assert!(
            (got - expect).abs() <= expect * 0.001 + 1e-6,
            "{i}: {got} vs {expect}"
        );
    }
}

#[test]
fn pickers_start_at_random_offsets() {
    let weights: Vec<u32> = (1..=20).collect();
    let firsts: std::collections::HashSet<String> = (0..20)
        .map(|_| rr(&weights).pick(None).unwrap().backend().id().to_owned())
        .collect();
    assert!(
        firsts.len() > 1,
        "20 pickers all started at the same backend"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(if cfg!(debug_assertions) { 128 } else { 512 }))]

    #[test]
    fn exact_and_smooth(weights in prop::collection::vec(1u32..=12, 1..=10)) {
        let total: u32 = weights.iter().sum();
        let p = rr(&weights);
        let picks = picks_of(&p, 2 * total as usize + 7);
        check_stream(&weights, &picks);
    }

    #[test]
    fn exact_and_smooth_with_a_heavy_one(
        mut weights in prop::collection::vec(1u32..=6, 1..=6),
        heavy in 1u32..=60,
    ) {
        weights.push(heavy);
        let total: u32 = weights.iter().sum();
        let p = rr(&weights);
        let picks = picks_of(&p, 2 * total as usize + 3);
        check_stream(&weights, &picks);
    }

    #[test]
    fn schedule_is_exact_and_cyclically_smooth(weights in prop::collection::vec(1u32..=40, 1..=40)) {
        // Directly on the schedule, so the check covers the wrap-around of the whole period.
        let p = rr(&weights);
        let s = p.wrr_schedule().unwrap();
        let g = weights.iter().fold(0u32, |a, &b| gcd(a, b));
        let reduced: Vec<u32> = weights.iter().map(|&w| w / g).collect();
        let total: u32 = reduced.iter().sum();
        prop_assert_eq!(s.len() as u32, total);
        let mut counts = vec![0u32; weights.len()];
        for &i in s {
            counts[i as usize] += 1;
        }
        prop_assert_eq!(&counts, &reduced);
        for k in 0..s.len() {
            let (a, b) = (s[k], s[(k + 1) % s.len()]);
            if a == b && s.len() > 1 {
                let w = reduced[a as usize];
                prop_assert!(w > total - w, "{:?}: {:?}", weights, s);
            }
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
