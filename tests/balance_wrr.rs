//! Smooth weighted round robin: exact proportions over every window of one period, smoothness
//! (no light backend twice in a row, cyclically), eligibility, threads; and, for weight sums above
//! 2^20 (split tables), the definition of exactness stated in `src/balance/wrr/mod.rs`: exact over
//! every `L·W` picks, within `B` of exact over every run of whole periods, hence within
//! [`TOLERANCE`] (0.1 % relative) over every run of `Kᵢ` periods.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use dlb::balance::wrr::{Split, Table, MAX_SCHEDULE, SPLIT};
use dlb::balance::{Algorithm, BackendSpec, Picker, PolicyConfig, MAX_BACKENDS};
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

// ---------------------------------------------------------------------------------------------
// Split tables (reduced Σw > 2^20).
// ---------------------------------------------------------------------------------------------

/// The relative tolerance on a backend's share over a run of `Kᵢ` whole periods.
const TOLERANCE: f64 = 0.001;

/// `Σ_{k<n} ⌊(a·k + b) / m⌋`, in `O(log m)`.
fn floor_sum(mut n: u128, mut m: u128, mut a: u128, mut b: u128) -> u128 {
    let mut sum = 0;
    loop {
        if n == 0 {
            return sum;
        }
        if a >= m {
            sum += n * (n - 1) / 2 * (a / m);
            a %= m;
        }
        if b >= m {
            sum += n * (b / m);
            b %= m;
        }
        let y = a * n + b;
        if y < m {
            return sum;
        }
        (n, b) = (y / m, y % m);
        (m, a) = (a, m);
    }
}

/// A split table and what a cursor walking it picks.
struct Model {
    table: Table,
    /// Reduced weights and their sum `W`.
    w: Vec<u64>,
    total: u64,
    /// Whole slots of each backend.
    whole: Vec<u64>,
    /// Split slots that can give each backend.
    in_splits: Vec<u64>,
}

impl Model {
    fn new(weights: &[u32]) -> Self {
        let g = weights.iter().fold(0u32, |a, &b| gcd(a, b));
        let w: Vec<u64> = weights.iter().map(|&x| u64::from(x / g)).collect();
        let total = w.iter().sum();
        let table = Table::build(weights);
        let mut whole = vec![0u64; w.len()];
        for &e in table.schedule().iter().filter(|&&e| e != SPLIT) {
            whole[usize::from(e)] += 1;
        }
        let mut in_splits = vec![0u64; w.len()];
        for s in table.splits() {
            in_splits[usize::from(s.primary)] += 1;
            in_splits[usize::from(s.alias)] += 1;
        }
        Self {
            table,
            w,
            total,
            whole,
            in_splits,
        }
    }

    fn len(&self) -> u64 {
        self.table.len() as u64
    }

    /// Picks of each backend over `k` whole periods whose first has phase `v0`, computed
    /// in closed form: a split slot gives its primary in the periods whose phase `v` has
    /// `(v + offset) mod W < share`, and the phases are `v0 + j·g (mod W)`.
    fn counts(&self, k: u64, v0: u64) -> Vec<u64> {
        let (m, g) = (
            u128::from(self.table.modulus()),
            u128::from(self.table.step()),
        );
        let mut c: Vec<u64> = self.whole.iter().map(|&x| x * k).collect();
        for s in self.table.splits() {
            let b = u128::from(v0 + u64::from(s.offset));
            let a = u128::from(s.share);
            // [x mod m ≥ a] = ⌊(x + m − a)/m⌋ − ⌊x/m⌋.
            let alias =
                (floor_sum(k.into(), m, g, b + m - a) - floor_sum(k.into(), m, g, b)) as u64;
            c[usize::from(s.primary)] += k - alias;
            c[usize::from(s.alias)] += alias;
        }
        c
    }

    /// The same, by walking the periods (validates `counts`).
    fn counts_by_walking(&self, k: u64, v0: u32) -> Vec<u64> {
        let mut c: Vec<u64> = self.whole.iter().map(|&x| x * k).collect();
        let mut v = v0;
        for _ in 0..k {
            for s in self.table.splits() {
                c[usize::from(s.pick(v, self.table.modulus()))] += 1;
            }
            v = self.table.next_phase(v);
        }
        c
    }

    /// `|count − k·L·wᵢ/W| · W`, exactly.
    fn error_w(&self, i: usize, count: u64, k: u64) -> u128 {
        let got = u128::from(count) * u128::from(self.total);
        let want = u128::from(k) * u128::from(self.len()) * u128::from(self.w[i]);
        got.abs_diff(want)
    }

    /// The run length `Kᵢ` (periods) after which backend `i`'s share is within 0.1 %:
    /// `⌈1000 · B · W / (L · wᵢ)⌉`.
    fn run_for(&self, i: usize) -> u64 {
        (1000 * self.table.run_error_bound() * self.total).div_ceil(self.len() * self.w[i])
    }

    /// The split-table claims of `src/balance/wrr/mod.rs`, for one weight set.
    fn check(&self, seed: u64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (n, l, total) = (self.w.len(), self.len(), self.total);
        let (t, bound) = (&self.table, self.table.run_error_bound());
        assert!(total > MAX_SCHEDULE, "not a split table: W = {total}");
        assert_eq!(l, MAX_SCHEDULE);
        assert_eq!(u64::from(t.modulus()), total);
        assert!(t.splits().len() <= n);
        assert!(bound > 0 && bound <= 200, "B = {bound}");
        // Exact accounting: whole slots × W + split shares = L · wᵢ.
        let mut owed: Vec<u64> = self.whole.iter().map(|&x| x * total).collect();
        for s in t.splits() {
            owed[usize::from(s.primary)] += u64::from(s.share);
            owed[usize::from(s.alias)] += total - u64::from(s.share);
        }
        for (i, (&o, &w)) in owed.iter().zip(&self.w).enumerate() {
            assert_eq!(o, l * w, "backend {i}: accounting");
        }
        // Smoothness: no two adjacent slots (cyclically) can give the same backend. Every
        // backend is light in a split table (wᵢ ≤ 10,000 < 2^19 < W/2).
        assert!(self.w.iter().all(|&x| 2 * x <= total));
        let members = self.members();
        for j in 0..members.len() {
            let (a, b) = members[j];
            let (c, d) = members[(j + 1) % members.len()];
            assert!(
                a != c && a != d && b != c && b != d,
                "slots {j} and {}: {:?} then {:?}",
                j + 1,
                (a, b),
                (c, d)
            );
        }
        // A split slot gives its primary exactly on the phases `(v + offset) mod W < share`
        // (checked at the edges of both arcs), as the closed form below assumes.
        for s in t.splits() {
            let m = t.modulus();
            let phase = |u: u32| (u + m - s.offset) % m;
            assert_eq!(s.pick(phase(0), m), s.primary);
            assert_eq!(s.pick(phase(s.share - 1), m), s.primary);
            assert_eq!(s.pick(phase(s.share), m), s.alias);
            assert_eq!(s.pick(phase(m - 1), m), s.alias);
        }
        // The phase steps by g modulo W (checked at the wrap).
        let (m, g) = (t.modulus(), t.step());
        assert_eq!(gcd(g, m), 1);
        assert_eq!(t.next_phase(m - g - 1), m - 1);
        assert_eq!(t.next_phase(m - g), 0);
        assert_eq!(t.next_phase(m - 1), g - 1);
        // The closed form agrees with walking the periods.
        for k in [1, 2, 5] {
            let v0 = rng.u32(..t.modulus());
            assert_eq!(self.counts(k, v0.into()), self.counts_by_walking(k, v0));
        }
        // Exact over every L·W picks (W whole periods, any first phase).
        let c = self.counts(total, rng.u64(..total));
        for (i, (&c, &w)) in c.iter().zip(&self.w).enumerate() {
            assert_eq!(c, l * w, "backend {i}: not exact over W periods");
        }
        // Within B of exact over every run of K whole periods.
        let mut ks = vec![1, 2, 3, 10, 89, 1000, total - 1, total + 7];
        ks.extend((0..6).map(|_| rng.u64(1..total)));
        for &k in &ks {
            let c = self.counts(k, rng.u64(..total));
            for (i, &c) in c.iter().enumerate() {
                assert!(
                    self.error_w(i, c, k) <= u128::from(bound) * u128::from(total),
                    "backend {i} (w {}): {c} picks in {k} periods, B = {bound}",
                    self.w[i],
                );
            }
        }
        // Within 0.1 % over a run of Kᵢ periods: the lightest, the heaviest and a few others.
        let lightest = (0..n).min_by_key(|&i| self.w[i]).unwrap();
        let heaviest = (0..n).max_by_key(|&i| self.w[i]).unwrap();
        let mut sample = vec![lightest, heaviest];
        sample.extend((0..3).map(|_| rng.usize(..n)));
        for i in sample {
            let k = self.run_for(i);
            let c = self.counts(k, rng.u64(..total));
            let expect = (k * l) as f64 * self.w[i] as f64 / total as f64;
            let rel = (c[i] as f64 - expect).abs() / expect;
            assert!(
                rel <= TOLERANCE,
                "backend {i} (w {} of W {total}): {} picks in {k} periods, expected {expect:.1}: {rel:e}",
                self.w[i],
                c[i]
            );
        }
    }

    /// The backends each slot can give (twice the same for a whole slot).
    fn members(&self) -> Vec<(u16, u16)> {
        let mut splits = self.table.splits().iter();
        self.table
            .schedule()
            .iter()
            .map(|&e| {
                if e == SPLIT {
                    let s: &Split = splits.next().unwrap();
                    (s.primary, s.alias)
                } else {
                    (e, e)
                }
            })
            .collect()
    }
}

/// The tracker's case: 200 backends of weight 10,000 and a weight-1 canary (the old scaling
/// gave the canary 1.9× its share).
#[test]
fn canary_beside_heavy_backends_gets_its_share() {
    let mut weights = vec![10_000u32; 200];
    weights.push(1);
    let m = Model::new(&weights);
    m.check(1);
    // The figures the module docs quote.
    assert_eq!(m.table.run_error_bound(), 66);
    assert_eq!(m.run_for(200), 125_886);
    // Over the canary's run Kᵢ, its share is within 0.1 %, from any first phase.
    let k = m.run_for(200);
    for v0 in [0, 1, 999_999, 2_000_000] {
        let c = m.counts(k, v0);
        let expect = (k * m.len()) as f64 / 2_000_001.0;
        assert!((c[200] as f64 / expect - 1.0).abs() <= TOLERANCE);
    }
}

/// Every weight 1..=10,000 once: W = 50,005,000, the weight-1 backend is owed 1/47.7 of a slot.
#[test]
fn every_weight_from_1_to_10000() {
    let m = Model::new(&(1..=10_000).collect::<Vec<u32>>());
    m.check(2);
    assert_eq!(m.table.run_error_bound(), 78);
}

/// The most backends, the largest sum: 65,534 × 10,000 + 1 (share of the canary ≈ 1.5e-9).
#[test]
fn most_backends_and_the_largest_sum() {
    let mut weights = vec![10_000u32; MAX_BACKENDS - 1];
    weights.push(1);
    let m = Model::new(&weights);
    m.check(3);
    assert_eq!(m.table.run_error_bound(), 98);
    assert_eq!(m.run_for(MAX_BACKENDS - 1), 61_248_131);
}

/// The picker walks the table: its schedule is the table's, and one thread's picks over two
/// whole periods from its random start are within `B + sᵢ` of exact (`sᵢ`: split slots that
/// can give backend `i`; the start need not be slot 0), never the same backend twice in a row.
#[test]
fn picker_walks_the_split_table() {
    let mut weights = vec![10_000u32; 200];
    weights.extend([1, 3, 7, 9_999]);
    let m = Model::new(&weights);
    let p = rr(&weights);
    assert_eq!(p.wrr_schedule().unwrap(), m.table.schedule());
    let k = 2;
    let picks = picks_of(&p, (k * m.len()) as usize);
    let mut counts = vec![0u64; weights.len()];
    for &i in &picks {
        counts[i] += 1;
    }
    let bound = m.table.run_error_bound();
    for (i, (&c, &s)) in counts.iter().zip(&m.in_splits).enumerate() {
        let allowed = u128::from(bound + s) * u128::from(m.total);
        assert!(m.error_w(i, c, k) <= allowed, "backend {i}: {c} picks");
    }
    assert!(picks.windows(2).all(|w| w[0] != w[1]));
}

/// Ineligible backends never appear in a split table (indices are mapped to the picker's).
#[test]
fn split_tables_skip_ineligible_backends() {
    let specs: Vec<_> = (0..400)
        .map(|i| spec(i, 1 + (i as u32 * 7919) % 10_000, i % 3 != 0))
        .collect();
    let p = Picker::build(&PolicyConfig::new(Algorithm::RoundRobin), &specs).unwrap();
    assert!(p.wrr_schedule().unwrap().contains(&SPLIT));
    for _ in 0..300_000 {
        let id = p.pick(None).unwrap().backend().id().to_owned();
        let i: usize = id[1..].parse().unwrap();
        assert_ne!(i % 3, 0, "picked ineligible {id}");
    }
}

fn large_weights() -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![
        // Random weights, enough of them for Σw > 2^20.
        prop::collection::vec(1u32..=10_000, 400..=3_000),
        // A block of heavy backends and a few light ones (canaries).
        (
            105usize..=2_000,
            9_000u32..=10_000,
            prop::collection::vec(1u32..=20, 1..=5)
        )
            .prop_map(|(n, heavy, light)| {
                let mut w = vec![heavy; n];
                w.extend(light);
                w
            }),
        // Weights spread over the whole range, many backends.
        (3_000usize..=20_000, any::<u64>()).prop_map(|(n, seed)| {
            let mut rng = fastrand::Rng::with_seed(seed);
            (0..n).map(|_| rng.u32(1..=10_000)).collect()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(if cfg!(debug_assertions) { 4 } else { 24 }))]

    #[test]
    fn split_tables_are_exact_within_the_stated_bounds(weights in large_weights(), seed in any::<u64>()) {
        let g = weights.iter().fold(0u32, |a, &b| gcd(a, b));
        let total: u64 = weights.iter().map(|&w| u64::from(w / g)).sum();
        prop_assume!(total > MAX_SCHEDULE);
        Model::new(&weights).check(seed);
    }
}
