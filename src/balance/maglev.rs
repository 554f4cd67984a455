//! Maglev consistent hashing: a prime-sized lookup table, `O(1)` per pick.
//!
//! # What it owns
//! The lookup table of one picker: `M` slots, each naming a backend, plus a second table that
//! already resolves ineligible backends, so the common lookup is one hash and one load.
//!
//! # Algorithm (Maglev, Eisenbud et al., NSDI 2016; weighted, with a race fill)
//! * **Size.** `M` is the first prime of the ladder `P_k = smallest prime > 2^k` (`k ≥ 16`:
//!   65537, 131101, 262147, 524309, 1048583, …) with `M ≥ 100 · n` over *all* backends `n`,
//!   eligible or not. Quantising `M` matters: a size that followed `n` exactly (`nextprime(100 n)`)
//!   would remap almost every key whenever a backend is added; with the ladder, `M` only changes
//!   when `n` crosses `2^k / 100`.
//! * **Permutations.** Backend `b` with hash key `k` prefers slots `offset, offset + skip, …
//!   (mod M)` with `(offset, skip)` from [`hash::maglev_permutation`](super::hash). The backend
//!   address never enters the hash.
//! * **Fill.** Each backend has a capacity: its weighted share `⌊M · w_b / Σw⌋`, plus one slot
//!   for each of the first `M − Σ⌊·⌋` backends in [hash order](super::hash) (so all shares are
//!   exact to one slot: Maglev's balance). Backends then *race* along their preference lists:
//!   backend `b` probes its `k`-th preference at virtual time `k / w_b`, takes it if free, and
//!   stops at capacity. Time advances in rounds of `1 / w_min`; within a round, backends go in
//!   hash order, each making the probes due by the end of the round. Classic Maglev instead lets every backend
//!   skip to its next free preference in turn; the race fill keeps Maglev's exact balance but
//!   moves fewer keys when a backend is added (measured, N = 100: 1.26 × the ideal `1/(N+1)`
//!   against 1.58 × for the classic fill; see `BENCHMARKS.md`). Build: `O(M log M)` expected
//!   probes plus `O(n)` per round; the measured time at `n = 10,000` is in `BENCHMARKS.md`. The table is a pure
//!   function of the set of `(hash key, weight)`, so two independently built pickers agree on
//!   every key whatever the input order.
//! * **Ineligible backends** keep their slots. `resolved[s]` is the backend of the first slot at
//!   or after `s` (cyclically) whose backend is eligible, computed at build time (`O(M)`), so a
//!   key whose slot belongs to an ineligible backend goes to the next eligible slot and *no other
//!   key moves*.
//! * **Lookup.** `slot = reduce(key_hash(key), M)` ([`hash::reduce`]), answer
//!   `resolved[slot]`. `O(1)`.
//! * **Bounded load** walks the slots `s, s+1, …` (the same deterministic candidate order) and
//!   takes the first eligible backend under its cap (see the `balance` module docs).
//!
//! Memory: `2 · 2 · M` bytes (u16 indices): 400–800 bytes per backend for large `n`
//! (≥ 262 KB per picker).

use std::fmt;

use super::hash;

/// Smallest table size.
pub const MIN_TABLE: u64 = 65_537;
/// Minimum slots per backend (the table is the first ladder prime at or above this times `n`).
pub const SLOTS_PER_BACKEND: u64 = 100;

/// The Maglev table of one picker.
pub(super) struct Maglev {
    m: u64,
    table: Box<[u16]>,
    resolved: Box<[u16]>,
}

impl fmt::Debug for Maglev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev").field("m", &self.m).finish()
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The table size for `n` backends: the first prime of the ladder `smallest prime > 2^k`,
/// `k ≥ 16`, that is at least `max(65537, 100 · n)`.
pub fn table_size(n: usize) -> u64 {
    let want = (SLOTS_PER_BACKEND * n as u64).max(MIN_TABLE);
    let mut base = MIN_TABLE - 1;
    loop {
        let mut m = base + 1;
        while !is_prime(m) {
            m += 1;
        }
        if m >= want {
            return m;
        }
        base *= 2;
    }
}

impl Maglev {
    /// Builds the table. `order` lists backend indices in hash order; `keys[i]`, `weights[i]`,
    /// `eligible[i]` describe backend `i`; backends not in `order` are not in the table. At least
    /// one backend.
    pub(super) fn build(order: &[u16], keys: &[&str], weights: &[u32], eligible: &[bool]) -> Self {
        // Sized for the backends in `order` (a group of a grouped picker holds a subset).
        let m = table_size(order.len());
        // Per backend (by rank in `order`): current preferred slot and skip.
        let mut cur = Vec::with_capacity(order.len());
        let mut skip = Vec::with_capacity(order.len());
        for &b in order {
            let (o, s) = hash::maglev_permutation(keys[b as usize], m);
            cur.push(o);
            skip.push(s);
        }
        let mut table = vec![EMPTY; m as usize];
        fill(&mut table, m, order, weights, &mut cur, &skip);
        debug_assert!(!table.contains(&EMPTY));
        let table: Box<[u16]> = table
            .iter()
            .map(|&r| order[(r as usize).min(order.len() - 1)])
            .collect();
        let resolved = resolve(&table, eligible);
        Self { m, table, resolved }
    }

    /// The slot of a key hash.
    #[inline]
    pub(super) fn slot(&self, h: u64) -> usize {
        hash::reduce(h, self.m) as usize
    }

    /// The eligible backend for a key hash. `O(1)`.
    #[inline]
    pub(super) fn lookup(&self, h: u64) -> u16 {
        self.resolved[self.slot(h)]
    }

    /// The raw table (backend per slot, eligible or not): the candidate order for bounded load.
    #[inline]
    pub(super) fn table(&self) -> &[u16] {
        &self.table
    }

    /// Approximate heap bytes.
    pub(super) fn heap_bytes(&self) -> usize {
        (self.table.len() + self.resolved.len()) * 2
    }
}

/// An empty slot during the fill.
const EMPTY: u16 = u16::MAX;

/// The capacity-bounded race fill (see the module docs). `table` starts all [`EMPTY`] and ends
/// holding hash ranks. `O(M log M)` expected probes plus `O(rounds · n)` bookkeeping.
fn fill(table: &mut [u16], m: u64, order: &[u16], weights: &[u32], cur: &mut [u64], skip: &[u64]) {
    let w: Vec<u64> = order
        .iter()
        .map(|&b| u64::from(weights[b as usize]))
        .collect();
    let total: u64 = w.iter().sum::<u64>().max(1);
    let w_min = w.iter().copied().min().unwrap_or(1).max(1);
    // Capacities: the weighted share, rounded down; the remainder goes one slot each to the
    // first backends in hash order.
    let mut cap: Vec<u64> = w.iter().map(|&x| m * x / total).collect();
    let rem = m - cap.iter().sum::<u64>();
    for c in cap.iter_mut().take(rem as usize) {
        *c += 1;
    }
    let mut probes = vec![0u64; order.len()];
    let mut held = vec![0u64; order.len()];
    let mut active: Vec<usize> = (0..order.len()).filter(|&r| cap[r] > 0).collect();
    let mut filled = 0u64;
    let mut round = 0u64;
    while filled < m && !active.is_empty() {
        round += 1;
        active.retain(|&r| {
            // Probes due by the end of this round: ⌊round · w / w_min⌋.
            let due = round * w[r] / w_min;
            while probes[r] < due && held[r] < cap[r] {
                let c = cur[r];
                cur[r] = if c + skip[r] >= m {
                    c + skip[r] - m
                } else {
                    c + skip[r]
                };
                probes[r] += 1;
                if table[c as usize] == EMPTY {
                    table[c as usize] = r as u16;
                    held[r] += 1;
                    filled += 1;
                }
            }
            held[r] < cap[r]
        });
    }
}

/// `resolved[s]` = owner of the first position at or after `s` (cyclically) whose owner is
/// eligible; `owners` itself when none is. `O(len)`.
pub(super) fn resolve(owners: &[u16], eligible: &[bool]) -> Box<[u16]> {
    let len = owners.len();
    let mut resolved: Box<[u16]> = owners.into();
    let Some(first_ok) = (0..len).find(|&i| eligible[owners[i] as usize]) else {
        return resolved;
    };
    // Walking backwards, positions after the last eligible one wrap to the first eligible one.
    let mut next = owners[first_ok];
    for i in (0..len).rev() {
        if eligible[owners[i] as usize] {
            next = owners[i];
        }
        resolved[i] = next;
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_prime() {
        assert_eq!(table_size(1), 65_537);
        let m = table_size(10_000);
        assert!(m >= 1_000_000 && is_prime(m));
    }

    #[test]
    fn resolve_wraps() {
        let owners = [0u16, 1, 1, 2, 1];
        let eligible = [true, false, true];
        assert_eq!(&*resolve(&owners, &eligible), &[0, 2, 2, 2, 0]);
    }

    #[test]
    fn weights_are_honoured() {
        let keys = ["a", "b", "c"];
        let weights = [1, 2, 3];
        let m = Maglev::build(&[0, 1, 2], &keys, &weights, &[true; 3]);
        let count = |b| m.table().iter().filter(|&&x| x == b).count() as f64;
        let total = m.table().len() as f64;
        assert!((count(0) / total - 1.0 / 6.0).abs() < 0.01);
        assert!((count(2) / total - 0.5).abs() < 0.01);
    }
}
