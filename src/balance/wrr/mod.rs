//! Smooth weighted round robin: a bounded schedule walked by striped atomic cursors, exact in its
//! shares for every weight set the API accepts.
//!
//! # What it owns
//! The [`Table`] of one picker (at most [`MAX_SCHEDULE`] slots of backend indices, plus the split
//! slots described below) and the cursors that walk it.
//!
//! # Algorithm
//! Eligible weights are divided by their gcd; `W` is the sum of the reduced weights and `n` the
//! number of eligible backends (`W ≤ 65,535 × 10,000 < 2^30`).
//!
//! * **Exact table (`W ≤ 2^20`).** The table is one period of `W` slots (`O(W log n)` time,
//!   `O(W + n)` memory). Slots are filled one by one in Sainte-Laguë order — the backend with
//!   the smallest `(placed + ½) / w` next (ties to the lower input index), which spreads each
//!   backend evenly — with two overrides that make the schedule *smooth cyclically*: a *light*
//!   backend (`w ≤ W − w`) is never placed right after itself, and when a light backend's
//!   remaining count would no longer fit in the non-adjacent slots left (taking the previous
//!   entry and the wrap-around to the first entry into account: `2·remaining > slots left − [it
//!   is the first entry]`) it is placed now. At most one backend can be critical at a time, so the
//!   result is a cyclic sequence of period `W` in which every backend appears exactly `w` times
//!   and no light backend is ever adjacent to itself (plain EDF and nginx's SWRR both break this
//!   at the period boundary, e.g. for weights {3,1,1,1}).
//! * **Split table (`W > 2^20`).** A full period would be too long (`W` reaches 655,350,000), so
//!   the table has `L = 2^20` slots and backend `i` is owed `L·wᵢ/W` of them — a fraction. A
//!   slot is *whole* (one backend) or *split* between a *primary* and an *alias* in the
//!   proportion `a : W − a` (`0 < a < W`). The slots come from packing the quotas `L·wᵢ` into `L`
//!   bins of capacity `W` with Walker's alias method (Vose's worklists; when no quota is small, a
//!   large one takes all its whole bins at once), so a backend is the primary of at most one
//!   split slot and there are at most `n` of them. The slots are ordered by the Sainte-Laguë
//!   schedule above over the per-backend slot counts (a split slot counts for its primary); each
//!   split slot then takes the occurrence of its primary nearest the middle one whose neighbours
//!   can give neither of its two backends, or trades places with a nearby whole slot so that
//!   none can. `O(L log n + n log W)` time, `O(L + n)` memory: at most 2^20 `u16` slots, a
//!   split bitmap with ranks (192 KiB) and 12 bytes per split slot.
//!
//!   A cursor carries a *phase* `v ∈ [0, W)` besides its slot. Each time it wraps to slot 0,
//!   `v ← (v + g) mod W`, with the step `g` coprime to `W` and close to `W·(√5 − 1)/2`: a
//!   Kronecker (golden-ratio) sequence, so the phases of any `W` consecutive periods are `0..W`,
//!   each once, in a low-discrepancy order. Of 64 such candidates the builder takes the one
//!   whose continued fraction `g/W = [0; a₁, a₂, …]` has the smallest `S = Σ aⱼ`. A split slot
//!   gives its primary when `(v + offset) mod W < a` and its alias otherwise — over any `W`
//!   consecutive periods exactly `a` and `W − a` times. The offsets lay each backend's alias arcs
//!   end to end, starting where its own primary arc ends, so backend `i` is picked
//!   `Cᵢ + [v ∈ Uᵢ]` times in a period of phase `v`, for a constant `Cᵢ` and one arc `Uᵢ` of
//!   phases.
//!
//! # Exactness (the definitions `tests/balance_wrr.rs` checks)
//! For one cursor — one thread's stream of picks from one picker:
//! * *Exact table:* every window of `W` consecutive picks contains backend `i` exactly `wᵢ`
//!   times, and a light backend is never picked twice in a row.
//! * *Split table:* every window of `L·W` consecutive picks contains backend `i` exactly `L·wᵢ`
//!   times: its share is exactly `wᵢ/W`. Over shorter runs, call a *run* `K ≥ 1` whole periods
//!   (`K·L` consecutive picks starting at slot 0). In every run,
//!   `|countᵢ − K·L·wᵢ/W| ≤ B = 2·S` ([`Table::run_error_bound`]): `countᵢ − K·Cᵢ` counts the
//!   phases of `K` consecutive periods that fall in the arc `Uᵢ`; split the `K` periods into
//!   Ostrowski blocks of `q_j` periods (`q_j` the denominators of the convergents of `g/W`; at
//!   most `a_{j+1}` blocks of each, so at most `S` blocks), and in each block the count is
//!   within 2 of proportional by the Denjoy–Koksma inequality (the indicator of an arc has
//!   variation 2). Hence backend `i`'s share is within **0.1 % (relative)** of `wᵢ/W` over
//!   every run of at least `Kᵢ = ⌈1000·B·W / (L·wᵢ)⌉` periods. A window of `K·L` picks that
//!   starts mid-period may differ by one more pick per split slot that can give `i`.
//!   Examples: 200 backends of weight 10,000 and a weight-1 canary have `B = 66`, and the
//!   canary's `Kᵢ` is 125,886 periods (1.3·10¹¹ picks); every weight 1..=10,000 has `B = 78`;
//!   65,534 backends of weight 10,000 and a weight-1 one have `B = 98`, and the last one's share,
//!   1.5·10⁻⁹, is within 0.1 % after 6.1·10⁷ periods (6.4·10¹³ picks; no run shorter than about
//!   10¹² picks could even measure it to 0.1 %). Over 200,000 random `W` in `(2^20, 6.6·10⁸)`,
//!   `B` ranged from 62 to 108. The bound is loose: over sampled runs of these
//!   three sets (and random ones) the largest error measured was under 6 picks.
//! * *Smoothness (split table):* every backend is light (`wᵢ ≤ 10,000 < W/2`), and no two
//!   adjacent slots, cyclically, can give the same backend (checked on every table the tests
//!   build), so no backend is picked twice in a row whatever the phase.
//!
//! # Pick
//! `O(1)`, lock-free, wait-free for the first 16 threads. The picker has [`STRIPES`] cursors (a
//! packed `(phase, slot)` in one `AtomicU64`), each on its own 128-byte cache line (the
//! adjacent-line prefetcher works in pairs) and starting at its own random slot and phase. On
//! its first pick a thread claims one of the [`EXCLUSIVE_STRIPES`] stripe indices process-wide
//! (a bit in a global mask, released by a thread-local destructor when the thread exits); while
//! it owns the index, no other thread writes that cursor in any picker, so it advances it with a
//! plain relaxed load and store — no read-modify-write on the hot path. Threads beyond the
//! sixteenth share the [`SHARED_STRIPES`] remaining cursors (assigned round robin) and advance
//! them with a compare-and-swap. A pick reads one `u16` slot; only a split slot ([`SPLIT`])
//! costs more: a rank in a bitmap (one `popcnt`) to find its [`Split`], an add and two
//! compares. The phase moves only when the cursor wraps (an add and a compare). A single thread
//! therefore walks exactly the schedule; several threads each walk it from their own offset,
//! so the proportions hold over time across threads too.
//!
//! # Files
//! This file: the constants, and the cursors and their pick (`Wrr::next`). `table.rs`: the
//! [`Table`] — building it and reading a slot. `split.rs`: what only split tables need (the
//! [`Split`] descriptor, alias packing, the phase step, placing the split slots).
//! `schedule.rs`: the weight reduction and the smooth Sainte-Laguë schedule both kinds use.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

mod schedule;
mod split;
mod table;

pub use schedule::{reduce_weights, smooth_schedule};
pub use split::{phase_step, Split};
pub use table::Table;

/// Longest table (slots): sets with a larger reduced weight sum get a split table of this length.
pub const MAX_SCHEDULE: u64 = 1 << 20;

/// A schedule entry that is a split slot (never a backend index: those are below
/// [`MAX_BACKENDS`](super::MAX_BACKENDS) = `u16::MAX`).
pub const SPLIT: u16 = u16::MAX;

/// Cursor stripes a thread can own exclusively (per process; the same index in every picker).
pub const EXCLUSIVE_STRIPES: usize = 16;
/// Cursor stripes shared (with a CAS) by the threads beyond the first sixteen.
pub const SHARED_STRIPES: usize = 4;
/// Number of cursor stripes per picker.
pub const STRIPES: usize = EXCLUSIVE_STRIPES + SHARED_STRIPES;

/// One cursor, `phase << 32 | slot`, on its own pair of cache lines (the adjacent-line prefetcher
/// works in pairs). Atomic because ownership of a stripe index moves between threads over time,
/// and shared stripes are advanced concurrently; one word so that slot and phase move together.
#[repr(align(128))]
struct Stripe(AtomicU64);

/// The round-robin state of one picker.
pub(super) struct Wrr {
    table: Table,
    stripes: Box<[Stripe]>,
}

impl fmt::Debug for Wrr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wrr")
            .field("schedule_len", &self.table.schedule.len())
            .field("splits", &self.table.splits.len())
            .finish()
    }
}
/// Bit `i` set: exclusive stripe `i` is owned by a live thread.
static CLAIMED: AtomicU32 = AtomicU32::new(0);
/// Round-robin assignment of the shared stripes.
static NEXT_SHARED: AtomicUsize = AtomicUsize::new(0);

/// A thread's stripe: exclusive (owned until the thread exits) or shared.
struct StripeSlot {
    index: usize,
    exclusive: bool,
}

impl StripeSlot {
    fn claim() -> Self {
        let mut cur = CLAIMED.load(Ordering::Relaxed);
        loop {
            let free = !cur & ((1u32 << EXCLUSIVE_STRIPES) - 1);
            if free == 0 {
                let i = NEXT_SHARED.fetch_add(1, Ordering::Relaxed) % SHARED_STRIPES;
                return Self {
                    index: EXCLUSIVE_STRIPES + i,
                    exclusive: false,
                };
            }
            let bit = free.trailing_zeros() as usize;
            match CLAIMED.compare_exchange_weak(
                cur,
                cur | (1 << bit),
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Self {
                        index: bit,
                        exclusive: true,
                    }
                }
                Err(actual) => cur = actual,
            }
        }
    }
}

impl Drop for StripeSlot {
    fn drop(&mut self) {
        if self.exclusive {
            CLAIMED.fetch_and(!(1u32 << self.index), Ordering::Release);
        }
    }
}

thread_local! {
    static STRIPE: StripeSlot = StripeSlot::claim();
}

/// The calling thread's `(stripe, exclusive)`.
#[inline]
fn stripe() -> (usize, bool) {
    STRIPE
        .try_with(|s| (s.index, s.exclusive))
        .unwrap_or((EXCLUSIVE_STRIPES, false))
}

impl Wrr {
    /// Builds the table over `(backend index, weight)` of the eligible backends (non-empty).
    pub(super) fn build(items: &[(u16, u32)]) -> Self {
        let weights: Vec<u32> = items.iter().map(|&(_, w)| w).collect();
        let mut table = Table::build(&weights);
        table.remap(|i| items[usize::from(i)].0);
        let len = table.schedule.len().max(1) as u32;
        let stripes = (0..STRIPES)
            .map(|_| {
                let phase = u64::from(fastrand::u32(..table.modulus));
                Stripe(AtomicU64::new(
                    phase << 32 | u64::from(fastrand::u32(..len)),
                ))
            })
            .collect();
        Self { table, stripes }
    }

    /// The next backend index for the calling thread.
    #[inline]
    pub(super) fn next(&self) -> u16 {
        let (stripe, exclusive) = stripe();
        let cursor = &self.stripes[stripe].0;
        let mut cur = cursor.load(Ordering::Relaxed);
        if exclusive {
            // Only this thread writes this cursor: a plain load and store suffice.
            cursor.store(self.table.advance(cur), Ordering::Relaxed);
            return self.table.at(cur);
        }
        loop {
            let next = self.table.advance(cur);
            match cursor.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return self.table.at(cur),
                Err(actual) => cur = actual,
            }
        }
    }

    /// The schedule (backend indices, [`SPLIT`] for split slots), for tests and diagnostics.
    pub(super) fn schedule(&self) -> &[u16] {
        &self.table.schedule
    }

    /// Approximate heap bytes.
    pub(super) fn heap_bytes(&self) -> usize {
        self.table.heap_bytes() + self.stripes.len() * std::mem::size_of::<Stripe>()
    }
}

#[cfg(test)]
mod tests {
    use super::schedule::gcd;
    use super::*;

    fn check(weights: &[u64]) {
        let s = smooth_schedule(weights);
        let total: u64 = weights.iter().sum();
        assert_eq!(s.len() as u64, total);
        for (i, &w) in weights.iter().enumerate() {
            assert_eq!(s.iter().filter(|&&x| x as usize == i).count() as u64, w);
            if w <= total - w && s.len() > 1 {
                for k in 0..s.len() {
                    let a = s[k];
                    let b = s[(k + 1) % s.len()];
                    assert!(
                        !(a as usize == i && b as usize == i),
                        "{weights:?} -> {s:?} at {k}"
                    );
                }
            }
        }
    }

    #[test]
    fn three_one_one_one() {
        check(&[3, 1, 1, 1]);
        let s = smooth_schedule(&[3, 1, 1, 1]);
        assert_eq!(s.len(), 6);
    }

    #[test]
    fn small_cases() {
        check(&[1]);
        check(&[5]);
        check(&[1, 1]);
        check(&[2, 1, 1]);
        check(&[5, 1]);
        check(&[3, 3]);
        check(&[4, 3, 1]);
        check(&[7, 5, 3, 1, 1]);
    }

    #[test]
    fn reduce_divides_by_the_gcd_only() {
        assert_eq!(reduce_weights(&[10_000; 200]), vec![1u64; 200]);
        assert_eq!(reduce_weights(&[6, 4, 10]), vec![3, 2, 5]);
        let w: Vec<u32> = (1..=10_000).collect();
        assert_eq!(reduce_weights(&w).iter().sum::<u64>(), 50_005_000);
    }

    #[test]
    fn phase_step_is_coprime_and_golden() {
        for m in [2u64, 3, 7, 1 << 20 | 1, 2_000_001, 50_005_000, 655_350_001] {
            let g = phase_step(m);
            assert_eq!(gcd(g, m), 1, "{m}");
            assert!(g > 0 && g < m);
            if m > 1000 {
                assert!((g as f64 / m as f64 - 0.618).abs() < 0.01, "{m}: {g}");
            }
        }
    }

    /// A split table: exact per-slot accounting, and the picker's cursor walks exactly
    /// `pick_at` over three periods (across two phase steps).
    #[test]
    fn cursor_walks_the_split_table() {
        let mut weights = vec![10_000u32; 200];
        weights.push(1);
        let items: Vec<(u16, u32)> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (i as u16, w))
            .collect();
        let wrr = Wrr::build(&items);
        let t = &wrr.table;
        assert_eq!(t.len() as u64, MAX_SCHEDULE);
        assert_eq!(t.modulus(), 2_000_001);
        assert!(!t.splits().is_empty() && t.splits().len() <= weights.len());
        assert_eq!(
            t.schedule().iter().filter(|&&e| e == SPLIT).count(),
            t.splits().len()
        );
        // Whole slots · W + split shares = L · w, for every backend.
        let m = u64::from(t.modulus());
        let mut owed = vec![0u64; weights.len()];
        for &e in t.schedule().iter().filter(|&&e| e != SPLIT) {
            owed[usize::from(e)] += m;
        }
        for s in t.splits() {
            owed[usize::from(s.primary)] += u64::from(s.share);
            owed[usize::from(s.alias)] += m - u64::from(s.share);
        }
        for (i, &w) in weights.iter().enumerate() {
            assert_eq!(owed[i], MAX_SCHEDULE * u64::from(w), "backend {i}");
        }
        // Every stripe at slot 0, phase 5: the stream is pick_at over the phases 5, 5+g, ...
        for s in wrr.stripes.iter() {
            s.0.store(5 << 32, Ordering::Relaxed);
        }
        let mut phase = 5;
        for _ in 0..3 {
            for slot in 0..t.len() {
                assert_eq!(wrr.next(), t.pick_at(slot, phase));
            }
            phase = t.next_phase(phase);
        }
    }

    #[test]
    fn exact_tables_keep_the_phase_at_zero() {
        let t = Table::build(&[3, 1, 1, 1]);
        assert_eq!((t.len(), t.modulus(), t.step()), (6, 1, 0));
        assert_eq!(t.next_phase(0), 0);
        assert!(t.splits().is_empty());
    }
}
