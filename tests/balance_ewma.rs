//! Peak-EWMA: a slow backend gets a small share, in-flight counts multiply the cost, weights
//! divide it, the estimate survives rebuilds, an idle estimate relaxes back to the default,
//! and the estimate is fed by the outcomes the SDK records.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use dlb::balance::{Algorithm, BackendSpec, Picker, PolicyConfig};
use dlb::call::EwmaConfig;

fn spec(id: usize, weight: u32) -> BackendSpec {
    BackendSpec {
        id: format!("b{id}"),
        address: format!("10.0.0.{id}:80"),
        weight,
        hash_key: None,
        eligible: true,
    }
}

fn config(decay: Duration) -> PolicyConfig {
    let mut c = PolicyConfig::new(Algorithm::PeakEwma);
    c.peak_ewma = EwmaConfig {
        decay,
        default_rtt: Duration::from_millis(5),
    };
    c
}

/// Feeds `n` samples of `latency` to backend `i`.
fn feed(p: &Picker, i: usize, latency: Duration, n: usize) {
    for _ in 0..n {
        p.backends()[i].load().record_outcome(true, latency);
    }
}

/// Shares over `n` picks with 8 calls kept in flight (each pick ends the oldest call), as a
/// closed loop of 8 callers would.
fn shares(p: &Picker, n: usize) -> Vec<usize> {
    let mut counts = vec![0; p.backends().len()];
    let mut in_flight = std::collections::VecDeque::new();
    for _ in 0..n {
        if in_flight.len() == 8 {
            in_flight.pop_front();
        }
        let pick = p.pick(None).unwrap();
        counts[pick.index()] += 1;
        in_flight.push_back(pick);
    }
    counts
}

#[test]
fn a_slow_backend_gets_a_small_share() {
    fastrand::seed(7);
    let specs: Vec<_> = (0..4).map(|i| spec(i, 1)).collect();
    let p = Picker::build(&config(Duration::from_secs(60)), &specs).unwrap();
    for i in 0..4 {
        feed(&p, i, Duration::from_millis(1), 5);
    }
    // Backend 0 answers 20× slower.
    feed(&p, 0, Duration::from_millis(20), 1);
    let s = shares(&p, 8_000);
    // P2C: with its rivals idle, the slow backend never wins a comparison.
    assert!(s[0] <= 8_000 / 100, "slow backend got {s:?}");
    for &c in &s[1..] {
        assert!(
            (2_300..=3_000).contains(&c),
            "fast backends share evenly: {s:?}"
        );
    }
    // A round robin picker over the same backends would give it a quarter.
    let rr = Picker::build(&PolicyConfig::new(Algorithm::RoundRobin), &specs).unwrap();
    assert_eq!(shares(&rr, 8_000)[0], 2_000);
}

#[test]
fn in_flight_calls_multiply_the_cost() {
    // Two backends (P2C always compares both): fast 1 ms, slow 10.5 ms. Holding every pick,
    // the fast one takes calls while (k + 1) × 1 < 10.5, i.e. its first 10; the 11th goes to
    // the slow one.
    let p = Picker::build(&config(Duration::from_secs(60)), &[spec(0, 1), spec(1, 1)]).unwrap();
    feed(&p, 0, Duration::from_millis(1), 1);
    feed(&p, 1, Duration::from_micros(10_500), 1);
    let mut held = Vec::new();
    for _ in 0..10 {
        let pick = p.pick(None).unwrap();
        assert_eq!(pick.index(), 0);
        held.push(pick);
    }
    let next = p.pick(None).unwrap();
    assert_eq!(next.index(), 1, "the fast backend now costs 11 > 10.5");
    assert_eq!(p.backends()[0].load().in_flight(), 10);
    assert_eq!(p.backends()[1].load().in_flight(), 1);
    // Releasing the calls gives the fast backend its traffic back.
    drop(held);
    drop(next);
    assert_eq!(p.backends()[0].load().in_flight(), 0);
    assert_eq!(p.pick(None).unwrap().index(), 0);
}

#[test]
fn equal_backends_balance_in_flight_and_weights_divide_the_cost() {
    fastrand::seed(3);
    let p = Picker::build(
        &config(Duration::from_secs(60)),
        &[spec(0, 1), spec(1, 1), spec(2, 2)],
    )
    .unwrap();
    // No samples: every backend reads the default RTT; cost = default × (k + 1) / weight.
    let held: Vec<_> = (0..400).map(|_| p.pick(None).unwrap()).collect();
    let k: Vec<u64> = p.backends().iter().map(|b| b.load().in_flight()).collect();
    assert_eq!(k.iter().sum::<u64>(), 400);
    assert!(
        k[2] > k[0] + k[0] / 2 && k[2] > k[1] + k[1] / 2,
        "weight 2 takes about twice: {k:?}"
    );
    assert!(k[0].abs_diff(k[1]) <= 40, "{k:?}");
    drop(held);
}

#[test]
fn the_estimate_survives_a_rebuild() {
    fastrand::seed(11);
    let specs: Vec<_> = (0..3).map(|i| spec(i, 1)).collect();
    let p = Picker::build(&config(Duration::from_secs(60)), &specs).unwrap();
    feed(&p, 0, Duration::from_millis(1), 1);
    feed(&p, 1, Duration::from_millis(1), 1);
    feed(&p, 2, Duration::from_millis(50), 1);
    let mut more = specs.clone();
    more.push(spec(3, 1));
    let q = p.rebuild(&config(Duration::from_secs(60)), &more).unwrap();
    let s = shares(&q, 3_000);
    assert!(
        s[2] <= 30,
        "the slow backend stays slow after a rebuild: {s:?}"
    );
    let est = q.backends()[2]
        .load()
        .latency_estimate(&q.policy().peak_ewma);
    assert!(est >= Duration::from_millis(49), "{est:?}");
    // The new backend reads the default RTT (5 ms), above the 1 ms ones: it gets less.
    assert!(s[3] < s[0] && s[3] < s[1], "{s:?}");
}

#[test]
fn an_idle_slow_backend_is_tried_again_after_a_few_tau() {
    fastrand::seed(5);
    let specs: Vec<_> = (0..3).map(|i| spec(i, 1)).collect();
    // τ = 2 ms: after 100 ms (50 τ) without a sample the estimate is back at the default.
    let p = Picker::build(&config(Duration::from_millis(2)), &specs).unwrap();
    feed(&p, 0, Duration::from_secs(1), 1);
    let est = p.backends()[0]
        .load()
        .latency_estimate(&p.policy().peak_ewma);
    assert!(est > Duration::from_millis(100), "{est:?}");
    std::thread::sleep(Duration::from_millis(100));
    let est = p.backends()[0]
        .load()
        .latency_estimate(&p.policy().peak_ewma);
    assert!(
        est < Duration::from_micros(5_100),
        "relaxed to the default: {est:?}"
    );
    // All three read the default now: shares are even again.
    let s = shares(&p, 3_000);
    assert!(s.iter().all(|&c| c >= 800), "{s:?}");
}

#[test]
fn other_policies_ignore_latency_samples() {
    let p = Picker::build(&PolicyConfig::new(Algorithm::LeastConnP2c), &[spec(0, 1)]).unwrap();
    feed(&p, 0, Duration::from_secs(5), 3);
    let est = p.backends()[0]
        .load()
        .latency_estimate(&EwmaConfig::default());
    assert_eq!(est, EwmaConfig::default().default_rtt);
}
