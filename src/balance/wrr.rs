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

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

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

/// A slot shared by two backends: `primary` in `share` of every `W` consecutive visits, `alias`
/// in the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// The backend picked when `(phase + offset) mod W < share`.
    pub primary: u16,
    /// The backend picked otherwise.
    pub alias: u16,
    /// The primary's part, in `1..W`.
    pub share: u32,
    /// Rotates the phase so that the alias's arcs of all its split slots lie end to end.
    pub offset: u32,
}

impl Split {
    /// The backend this slot gives at `phase` (`< modulus`) of a table with modulus `modulus`.
    #[inline]
    pub fn pick(&self, phase: u32, modulus: u32) -> u16 {
        // Both terms are below W < 2^30: no overflow.
        let mut u = phase + self.offset;
        if u >= modulus {
            u -= modulus;
        }
        if u < self.share {
            self.primary
        } else {
            self.alias
        }
    }
}

/// The immutable part of a round-robin picker: the slots and how a cursor walks them (see the
/// module docs). Public for tests and diagnostics; a picker holds one with backend indices.
pub struct Table {
    /// One entry per slot: a backend (input index) or [`SPLIT`].
    schedule: Box<[u16]>,
    /// The split slots, in slot order.
    splits: Box<[Split]>,
    /// Bit `s % 64` of word `s / 64`: slot `s` is split.
    split_bits: Box<[u64]>,
    /// Split slots before word `k` of `split_bits`.
    split_rank: Box<[u32]>,
    /// `W` for a split table, 1 for an exact one (whose phase stays 0).
    modulus: u32,
    /// The phase step `g` (0 for an exact table).
    step: u32,
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("len", &self.schedule.len())
            .field("splits", &self.splits.len())
            .field("modulus", &self.modulus)
            .field("step", &self.step)
            .finish()
    }
}

impl Table {
    /// Builds the table for `weights` (indices into `weights`; a weight of 0 counts as 1).
    ///
    /// # Panics
    /// With more than [`MAX_BACKENDS`](super::MAX_BACKENDS) weights (pickers reject those first).
    pub fn build(weights: &[u32]) -> Self {
        assert!(
            weights.len() <= usize::from(SPLIT),
            "at most {SPLIT} weights, got {}",
            weights.len()
        );
        let weights: Vec<u32> = weights.iter().map(|&w| w.max(1)).collect();
        let w = reduce_weights(&weights);
        let total: u64 = w.iter().sum();
        if total <= MAX_SCHEDULE {
            return Self {
                schedule: smooth_schedule(&w).iter().map(|&i| i as u16).collect(),
                splits: Box::default(),
                split_bits: Box::default(),
                split_rank: Box::default(),
                modulus: 1,
                step: 0,
            };
        }
        Self::build_split(&w, total)
    }

    /// The split table of `L = MAX_SCHEDULE` slots for reduced weights summing to `total > L`.
    fn build_split(w: &[u64], total: u64) -> Self {
        let len = MAX_SCHEDULE as usize;
        let packing = AliasPacking::new(w, total, len as u64);
        let step = phase_step(total);
        let descs = packing.splits(total, step);
        // Order the slots: Sainte-Laguë over the slot counts (a split slot counts for its
        // primary), then place each split slot (see `place_splits`).
        let present: Vec<usize> = (0..w.len())
            .filter(|&i| packing.whole[i] > 0 || packing.own[i].is_some())
            .collect();
        let counts: Vec<u64> = present
            .iter()
            .map(|&i| packing.whole[i] + u64::from(packing.own[i].is_some()))
            .collect();
        let mut slots: Vec<u32> = smooth_schedule(&counts)
            .iter()
            .map(|&k| present[k as usize] as u32)
            .collect();
        let split_of = place_splits(&mut slots, &packing.own, &descs);
        let mut schedule = Vec::with_capacity(len);
        let mut splits = Vec::with_capacity(descs.len());
        let mut split_bits = vec![0u64; len.div_ceil(64)];
        for (slot, (&b, &d)) in slots.iter().zip(&split_of).enumerate() {
            if d == NO_SPLIT {
                schedule.push(b as u16);
            } else {
                schedule.push(SPLIT);
                splits.push(descs[d as usize]);
                split_bits[slot / 64] |= 1 << (slot % 64);
            }
        }
        let mut rank = 0u32;
        let split_rank = split_bits
            .iter()
            .map(|b| {
                let r = rank;
                rank += b.count_ones();
                r
            })
            .collect();
        Self {
            schedule: schedule.into(),
            splits: splits.into(),
            split_bits: split_bits.into(),
            split_rank,
            modulus: total as u32,
            step: step as u32,
        }
    }

    /// Maps every backend index through `f`.
    fn remap(&mut self, f: impl Fn(u16) -> u16) {
        for e in self.schedule.iter_mut().filter(|e| **e != SPLIT) {
            *e = f(*e);
        }
        for s in self.splits.iter_mut() {
            s.primary = f(s.primary);
            s.alias = f(s.alias);
        }
    }

    /// Slots per period: `W` for an exact table, `2^20` for a split one.
    pub fn len(&self) -> usize {
        self.schedule.len()
    }

    /// Whether the table has no slot (no weights).
    pub fn is_empty(&self) -> bool {
        self.schedule.is_empty()
    }

    /// The slots: backend indices, [`SPLIT`] for a split slot.
    pub fn schedule(&self) -> &[u16] {
        &self.schedule
    }

    /// The split slots, in slot order.
    pub fn splits(&self) -> &[Split] {
        &self.splits
    }

    /// The phase modulus: `W` for a split table, 1 for an exact one.
    pub fn modulus(&self) -> u32 {
        self.modulus
    }

    /// The phase step `g` (coprime to the modulus; 0 for an exact table).
    pub fn step(&self) -> u32 {
        self.step
    }

    /// The bound `B` on `|countᵢ − K·L·wᵢ/W|` over every run of `K` whole periods (module docs):
    /// twice the sum of the partial quotients of `g/W` for a split table, 0 for an exact one.
    pub fn run_error_bound(&self) -> u64 {
        if self.modulus == 1 {
            return 0;
        }
        2 * partial_quotients(u64::from(self.step), u64::from(self.modulus)).1
    }

    /// The backend picked at `slot` (`< len`) in a period of phase `phase` (`< modulus`).
    #[inline]
    pub fn pick_at(&self, slot: usize, phase: u32) -> u16 {
        let e = self.schedule[slot];
        if e != SPLIT {
            e
        } else {
            self.split_at(slot, phase)
        }
    }

    /// The phase of the period after one of phase `phase`.
    #[inline]
    pub fn next_phase(&self, phase: u32) -> u32 {
        // Both terms are below W < 2^30: no overflow.
        let v = phase + self.step;
        if v >= self.modulus {
            v - self.modulus
        } else {
            v
        }
    }

    #[inline(never)]
    fn split_at(&self, slot: usize, phase: u32) -> u16 {
        let (word, bit) = (slot / 64, slot % 64);
        let below = self.split_bits[word] & ((1u64 << bit) - 1);
        let index = self.split_rank[word] as usize + below.count_ones() as usize;
        self.splits[index].pick(phase, self.modulus)
    }

    /// The pick at a packed cursor `phase << 32 | slot`.
    #[inline]
    fn at(&self, cursor: u64) -> u16 {
        self.pick_at(cursor as u32 as usize, (cursor >> 32) as u32)
    }

    /// The packed cursor after `cursor`.
    #[inline]
    fn advance(&self, cursor: u64) -> u64 {
        if (cursor as u32 as usize) + 1 < self.schedule.len() {
            cursor + 1
        } else {
            u64::from(self.next_phase((cursor >> 32) as u32)) << 32
        }
    }

    fn heap_bytes(&self) -> usize {
        self.schedule.len() * 2
            + self.splits.len() * std::mem::size_of::<Split>()
            + self.split_bits.len() * 8
            + self.split_rank.len() * 4
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Divides weights by their gcd. Input weights are ≥ 1.
pub fn reduce_weights(weights: &[u32]) -> Vec<u64> {
    let g = weights
        .iter()
        .fold(0u64, |g, &w| gcd(g, u64::from(w)))
        .max(1);
    weights.iter().map(|&w| u64::from(w) / g).collect()
}

/// The phase step for modulus `m ≥ 2`: coprime to `m`, near `m·(√5 − 1)/2`; of the first 64
/// such candidates (alternating above and below), the one whose continued fraction `g/m` has the
/// smallest sum of partial quotients (which bounds the discrepancy, see [`Table::run_error_bound`]),
/// then the smallest largest one.
pub fn phase_step(m: u64) -> u64 {
    let centre = (m as f64 * 0.618_033_988_749_895) as u64;
    let mut best: Option<((u64, u64), u64)> = None;
    let mut found = 0;
    for d in 0..m {
        let g = if d % 2 == 0 {
            centre + d / 2
        } else {
            match centre.checked_sub(d / 2 + 1) {
                Some(g) => g,
                None => continue,
            }
        };
        if g == 0 || g >= m || gcd(g, m) != 1 {
            continue;
        }
        let (max, sum) = partial_quotients(g, m);
        let score = (sum, max);
        if best.is_none_or(|(s, _)| score < s) {
            best = Some((score, g));
        }
        found += 1;
        if found == 64 {
            break;
        }
    }
    best.map_or(1, |(_, g)| g)
}

/// `(largest, sum)` of the partial quotients of `g/m`.
fn partial_quotients(g: u64, m: u64) -> (u64, u64) {
    let (mut x, mut y) = (m, g);
    let (mut max, mut sum) = (0, 0);
    while y != 0 {
        let a = x / y;
        max = max.max(a);
        sum += a;
        (x, y) = (y, x % y);
    }
    (max, sum)
}

/// Walker's alias method, generalised to `L ≥ n` bins: the quotas `L·wᵢ` packed into `L` bins of
/// capacity `W`, each bin whole or split between two backends. `O(n)` steps.
struct AliasPacking {
    /// Whole bins of each backend.
    whole: Vec<u64>,
    /// Split bins, in creation order: `(primary, alias, primary's share)`.
    pairs: Vec<(usize, usize, u64)>,
    /// Each backend's split bin as primary (at most one).
    own: Vec<Option<usize>>,
}

impl AliasPacking {
    fn new(w: &[u64], total: u64, len: u64) -> Self {
        let n = w.len();
        // Invariant: the backends with quota left are no more than the bins left, and the
        // quotas left sum to W × bins left — so while a backend is small (0 < left < W),
        // another is large (left ≥ W). Taking all of a large backend's whole bins at once, when
        // no backend is small, keeps the invariant.
        let mut left: Vec<u64> = w.iter().map(|&x| x * len).collect();
        let mut small: Vec<usize> = (0..n).rev().filter(|&i| left[i] < total).collect();
        let mut large: Vec<usize> = (0..n).rev().filter(|&i| left[i] >= total).collect();
        let mut whole = vec![0u64; n];
        let mut pairs = Vec::new();
        let mut own = vec![None; n];
        loop {
            if let Some(s) = small.pop() {
                let Some(g) = large.pop() else {
                    unreachable!("alias packing: a small quota with no large one")
                };
                let a = left[s];
                left[s] = 0;
                left[g] -= total - a;
                own[s] = Some(pairs.len());
                pairs.push((s, g, a));
                if left[g] >= total {
                    large.push(g);
                } else if left[g] > 0 {
                    small.push(g);
                }
            } else if let Some(g) = large.pop() {
                whole[g] += left[g] / total;
                left[g] %= total;
                if left[g] > 0 {
                    small.push(g);
                }
            } else {
                break;
            }
        }
        Self { whole, pairs, own }
    }

    /// The split descriptors (indexed like `pairs`), with offsets such that each backend's
    /// split picks in one period form a single arc of phases: its alias arcs are laid end to
    /// end, starting where its own primary arc ends. A backend's alias splits were all made
    /// before its own split, so walking the pairs backwards fixes its primary arc first.
    fn splits(&self, total: u64, step: u64) -> Vec<Split> {
        // Next free phase of each backend's alias tiling (roots: spread out by the step).
        let mut tile: Vec<u64> = (0..self.own.len() as u64)
            .map(|i| i * step % total)
            .collect();
        let mut out = vec![
            Split {
                primary: 0,
                alias: 0,
                share: 0,
                offset: 0,
            };
            self.pairs.len()
        ];
        for (d, &(p, q, a)) in self.pairs.iter().enumerate().rev() {
            // Alias arc [tile, tile + W − a), primary arc [tile + W − a, tile + W).
            let start = (tile[q] + total - a) % total;
            tile[q] = start;
            tile[p] = (start + a) % total;
            out[d] = Split {
                primary: p as u16,
                alias: q as u16,
                share: a as u32,
                offset: ((total - start) % total) as u32,
            };
        }
        out
    }
}

/// `place_splits` marker: a whole slot.
const NO_SPLIT: u32 = u32::MAX;

/// How far (slots) `place_splits` looks for a whole slot to trade places with. 512 was too
/// short for dense sets (about 110 backends of equal weight near 9,500): a split slot ended next
/// to a whole slot of its alias. The search only runs for splits whose own occurrences all
/// clash, so the larger radius costs build time only there.
const REPAIR_RADIUS: usize = 1 << 16;

/// Chooses the slot of each split (index into `descs`) among its primary's slots of the
/// Sainte-Laguë order `slots` (backend per slot), so that no two adjacent slots (cyclically) can
/// give the same backend: the primary's occurrence nearest its middle one whose neighbours are
/// clear of both backends of the split, else a trade of places with a whole slot of another
/// backend within [`REPAIR_RADIUS`] that leaves both places clear, else the middle occurrence
/// (a clash then remains: never seen in the property tests since the radius is 65,536).
/// Returns the split index of every slot ([`NO_SPLIT`] for whole slots) and updates `slots`
/// for the trades. `O(L + n · REPAIR_RADIUS)`.
fn place_splits(slots: &mut [u32], own: &[Option<usize>], descs: &[Split]) -> Vec<u32> {
    let len = slots.len();
    let mut split_of = vec![NO_SPLIT; len];
    let mut occurrences: Vec<Vec<usize>> = vec![Vec::new(); descs.len()];
    for (slot, &b) in slots.iter().enumerate() {
        if let Some(d) = own[b as usize] {
            occurrences[d].push(slot);
        }
    }
    // Whether a neighbour of slot `s` can give backend `x` or `y`.
    let clash = |slots: &[u32], split_of: &[u32], s: usize, x: u32, y: u32| -> bool {
        [(s + len - 1) % len, (s + 1) % len].iter().any(|&nb| {
            let (a, b) = match split_of[nb] {
                NO_SPLIT => (slots[nb], slots[nb]),
                d => (
                    u32::from(descs[d as usize].primary),
                    u32::from(descs[d as usize].alias),
                ),
            };
            a == x || a == y || b == x || b == y
        })
    };
    for d in 0..descs.len() {
        let (p, q) = (u32::from(descs[d].primary), u32::from(descs[d].alias));
        let occ = &occurrences[d];
        let mid = occ.len() / 2;
        let nearest = (0..occ.len()).filter_map(|k| {
            if k % 2 == 0 {
                occ.get(mid + k / 2)
            } else {
                mid.checked_sub(k / 2 + 1).map(|i| &occ[i])
            }
        });
        if let Some(s) = nearest
            .copied()
            .find(|&s| !clash(slots, &split_of, s, p, q))
        {
            split_of[s] = d as u32;
            continue;
        }
        let s = occ[mid];
        split_of[s] = d as u32;
        let trade = (2..=REPAIR_RADIUS.min(len / 2))
            .flat_map(|k| [(s + k) % len, (s + len - k) % len])
            .find(|&t| {
                let r = slots[t];
                split_of[t] == NO_SPLIT
                    && r != p
                    && r != q
                    && !clash(slots, &split_of, t, p, q)
                    && !clash(slots, &split_of, s, r, r)
            });
        if let Some(t) = trade {
            let r = slots[t];
            slots.swap(s, t);
            split_of[t] = d as u32;
            split_of[s] = NO_SPLIT;
            // r's whole slot moved from t to s: keep its occurrences current.
            if let Some(dr) = own[r as usize] {
                if let Some(o) = occurrences[dr].iter_mut().find(|o| **o == t) {
                    *o = s;
                }
            }
        }
    }
    split_of
}

/// Sainte-Laguë priority entry: smaller `(2·placed + 1) / w` first, then lower index.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Prio {
    num: u64,
    w: u64,
    i: u32,
}

impl Ord for Prio {
    fn cmp(&self, o: &Self) -> CmpOrdering {
        // BinaryHeap is a max-heap: the "greatest" is the one to place next.
        (u128::from(o.num) * u128::from(self.w))
            .cmp(&(u128::from(self.num) * u128::from(o.w)))
            .then_with(|| o.i.cmp(&self.i))
    }
}

impl PartialOrd for Prio {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}

/// Generates the smooth cyclic schedule for `weights` (all ≥ 1): a sequence of `Σw` indices into
/// `weights` in which index `i` appears exactly `weights[i]` times and no light index
/// (`w ≤ Σw − w`) is cyclically adjacent to itself. `O(Σw · log n)`.
pub fn smooth_schedule(weights: &[u64]) -> Vec<u32> {
    let n = weights.len();
    let total: u64 = weights.iter().sum();
    let mut placed = vec![0u64; n];
    let light: Vec<bool> = weights.iter().map(|&w| w <= total - w).collect();
    let mut prio: BinaryHeap<Prio> = (0..n)
        .map(|i| Prio {
            num: 1,
            w: weights[i],
            i: i as u32,
        })
        .collect();
    // Remaining counts of light backends, max first (lazy deletion: stale when it disagrees).
    // A light backend can only become critical once `2 · remaining ≥ slots left`, and its
    // remaining count never exceeds its weight, so the heap is only built (and the check only
    // made) for the last `2 · max light weight` positions.
    let max_light = (0..n)
        .filter(|&i| light[i])
        .map(|i| weights[i])
        .max()
        .unwrap_or(0);
    let mut remaining: BinaryHeap<(u64, u32)> = BinaryHeap::new();
    let mut checking = false;
    let mut out: Vec<u32> = Vec::with_capacity(total as usize);
    let mut prev: Option<usize> = None;
    let mut first: Option<usize> = None;
    let mut held: Vec<(u64, u32)> = Vec::with_capacity(2);
    for pos in 0..total {
        let slots = total - pos;
        // 1. A critical light backend must be placed now.
        let mut choice = None;
        held.clear();
        if !checking && slots <= 2 * max_light + 1 {
            checking = true;
            remaining.extend(
                (0..n)
                    .filter(|&i| light[i] && placed[i] < weights[i])
                    .map(|i| (weights[i] - placed[i], i as u32)),
            );
        }
        while checking && held.len() < 2 {
            let Some(top) = remaining.pop() else { break };
            let i = top.1 as usize;
            if weights[i] - placed[i] != top.0 {
                continue; // stale
            }
            held.push(top);
        }
        for &(r, i) in &held {
            let i = i as usize;
            if prev == Some(i) {
                continue;
            }
            let avail = slots - u64::from(first == Some(i));
            if 2 * r > avail {
                choice = Some(i);
                break;
            }
        }
        remaining.extend(held.iter().copied());
        // 2. Otherwise the Sainte-Laguë order, skipping a light backend equal to the previous.
        let i = match choice {
            Some(i) => i,
            None => {
                let mut skipped = None;
                let mut pick = None;
                while let Some(top) = prio.pop() {
                    let i = top.i as usize;
                    if top.num != 2 * placed[i] + 1 {
                        continue; // stale (placed by an override)
                    }
                    if prev == Some(i) && light[i] && skipped.is_none() {
                        skipped = Some(top);
                        continue;
                    }
                    pick = Some(i);
                    break;
                }
                match (pick, skipped) {
                    (Some(i), s) => {
                        if let Some(s) = s {
                            prio.push(s);
                        }
                        i
                    }
                    // Only the previous backend is left (cannot happen for a light one).
                    (None, Some(s)) => s.i as usize,
                    (None, None) => break,
                }
            }
        };
        placed[i] += 1;
        out.push(i as u32);
        if placed[i] < weights[i] {
            prio.push(Prio {
                num: 2 * placed[i] + 1,
                w: weights[i],
                i: i as u32,
            });
            if light[i] && checking {
                remaining.push((weights[i] - placed[i], i as u32));
            }
        }
        prev = Some(i);
        if first.is_none() {
            first = Some(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
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
