//! Smooth weighted round robin: a precomputed periodic schedule walked by striped atomic cursors.
//!
//! # What it owns
//! The schedule of one picker (backend indices, one entry per unit of weight of every eligible
//! backend) and the cursors that walk it.
//!
//! # Algorithm
//! * **Weights.** Eligible weights are divided by their gcd. If their sum `W` still exceeds
//!   [`MAX_SCHEDULE`] (2^20), every weight is scaled to `max(1, ⌊w · 2^20 / W⌋)`; proportions
//!   are then exact for the *scaled* weights (the error is below one part in `2^20 / W·w`, and
//!   the table holds at most 2^20 + n entries).
//! * **Schedule** (build time, `O(W log n)` time, `O(W + n)` memory). Positions are filled one by
//!   one in Sainte-Laguë order — the backend with the smallest `(placed + ½) / w` next (ties to
//!   the lower input index), which spreads each backend evenly — with two overrides that make
//!   the schedule *smooth cyclically*: a *light* backend (`w ≤ W − w`) is never placed right
//!   after itself, and when a light backend's remaining count would no longer fit in the
//!   non-adjacent slots left (taking the previous entry and the wrap-around to the first entry
//!   into account: `2·remaining > slots left − [it is the first entry]`) it is placed now. At
//!   most one backend can be critical at a time, so the result is a cyclic sequence of period
//!   `W` in which every backend appears exactly `w` times and no light backend is ever adjacent
//!   to itself (plain EDF and nginx's SWRR both break this at the period boundary, e.g. for
//!   weights {3,1,1,1}). The property is checked by proptests in `tests/balance_wrr.rs`.
//! * **Pick** (`O(1)`, lock-free, wait-free for the first 16 threads). The picker has
//!   [`STRIPES`] cursors, each on its own 128-byte cache line (the adjacent-line prefetcher
//!   works in pairs) and starting at its own random offset. On its first pick a thread claims
//!   one of the [`EXCLUSIVE_STRIPES`] stripe indices process-wide (a bit in a global mask,
//!   released by a thread-local destructor when the thread exits); while it owns the index, no
//!   other thread writes that cursor in any picker, so it advances it with a plain relaxed load
//!   and store — no read-modify-write on the hot path. Threads beyond the sixteenth share the
//!   [`SHARED_STRIPES`] remaining cursors (assigned round robin) and advance them with a
//!   compare-and-swap. Cursors wrap at `W` by comparison (no division). A single thread
//!   therefore walks exactly the schedule; several threads each walk it from their own offset,
//!   so the proportions hold over time across threads too.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Maximum schedule length before weights are scaled down (entries).
pub const MAX_SCHEDULE: u64 = 1 << 20;

/// Cursor stripes a thread can own exclusively (per process; the same index in every picker).
pub const EXCLUSIVE_STRIPES: usize = 16;
/// Cursor stripes shared (with a CAS) by the threads beyond the first sixteen.
pub const SHARED_STRIPES: usize = 4;
/// Number of cursor stripes per picker.
pub const STRIPES: usize = EXCLUSIVE_STRIPES + SHARED_STRIPES;

/// One cursor on its own pair of cache lines (the adjacent-line prefetcher works in pairs).
/// Atomic because ownership of a stripe index moves between threads over time, and shared
/// stripes are advanced concurrently.
#[repr(align(128))]
struct Stripe(AtomicU32);

/// The round-robin state of one picker.
pub(super) struct Wrr {
    schedule: Box<[u16]>,
    stripes: Box<[Stripe]>,
}

impl fmt::Debug for Wrr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wrr")
            .field("schedule_len", &self.schedule.len())
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
    /// Builds the schedule over `(backend index, weight)` of the eligible backends (non-empty).
    pub(super) fn build(items: &[(u16, u32)]) -> Self {
        let weights = reduce_weights(&items.iter().map(|&(_, w)| w).collect::<Vec<_>>());
        let order = smooth_schedule(&weights);
        let schedule: Box<[u16]> = order.iter().map(|&i| items[i as usize].0).collect();
        let len = schedule.len().max(1) as u32;
        let stripes = (0..STRIPES)
            .map(|_| Stripe(AtomicU32::new(fastrand::u32(..len))))
            .collect();
        Self { schedule, stripes }
    }

    /// The next backend index for the calling thread.
    #[inline]
    pub(super) fn next(&self) -> u16 {
        let len = self.schedule.len() as u32;
        let (stripe, exclusive) = stripe();
        let cursor = &self.stripes[stripe].0;
        let mut cur = cursor.load(Ordering::Relaxed);
        if exclusive {
            // Only this thread writes this cursor: a plain load and store suffice.
            let next = if cur + 1 >= len { 0 } else { cur + 1 };
            cursor.store(next, Ordering::Relaxed);
            return self.schedule[cur as usize];
        }
        loop {
            let next = if cur + 1 >= len { 0 } else { cur + 1 };
            match cursor.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return self.schedule[cur as usize],
                Err(actual) => cur = actual,
            }
        }
    }

    /// The schedule (backend indices), for tests and diagnostics.
    pub(super) fn schedule(&self) -> &[u16] {
        &self.schedule
    }

    /// Approximate heap bytes.
    pub(super) fn heap_bytes(&self) -> usize {
        self.schedule.len() * 2 + self.stripes.len() * std::mem::size_of::<Stripe>()
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Divides weights by their gcd and scales them down to a sum ≤ [`MAX_SCHEDULE`] (+ n for the
/// `max(1, ·)` floor). Input weights are ≥ 1.
pub fn reduce_weights(weights: &[u32]) -> Vec<u64> {
    let g = weights
        .iter()
        .fold(0u64, |g, &w| gcd(g, u64::from(w)))
        .max(1);
    let mut w: Vec<u64> = weights.iter().map(|&w| u64::from(w) / g).collect();
    let total: u64 = w.iter().sum();
    if total > MAX_SCHEDULE {
        for x in &mut w {
            *x = (*x * MAX_SCHEDULE / total).max(1);
        }
        let g = w.iter().fold(0u64, |g, &x| gcd(g, x)).max(1);
        for x in &mut w {
            *x /= g;
        }
    }
    w
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
    fn reduce_scales_large_sums() {
        let w = vec![10_000u32; 200];
        assert_eq!(reduce_weights(&w), vec![1u64; 200]);
        let w: Vec<u32> = (1..=10_000).collect();
        let r = reduce_weights(&w);
        assert!(r.iter().sum::<u64>() <= MAX_SCHEDULE + w.len() as u64);
    }
}
