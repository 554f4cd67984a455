//! Least connections: exact (a tournament tree under a spin lock) and P2C (lock-free).
//!
//! # What it owns
//! The per-picker selection state over the eligible backends. The counts themselves live in
//! the shared [`BackendLoad`]s (`load() = local in-flight + control-plane baseline`), which
//! outlive picker generations; the RAII pick guard increments on pick and decrements on drop.
//! Weighted load is `load / weight`, compared exactly, without floats: by cross-multiplication
//! (P2C), or by an integer rank that orders exactly like it (the exact tree).
//!
//! # Exact (`LeastConnExact`)
//! A 4-ary tournament (winner) tree over the eligible backends, stored level by level with
//! each group of four siblings in one 64-byte cache line (16-byte nodes; ≈ `4n/3` nodes plus
//! padding). Each inner node is a copy of the best key of its four children, a key being
//! `(rank, seq << 16 | leaf)` compared as one 128-bit integer. The rank is the weighted load as
//! an integer that compares exactly like the cross-multiplication `load_a · w_b` vs
//! `load_b · w_a` (`⌊load · 2^32 / weight⌋`, computed with a precomputed reciprocal; see
//! `rank` for the proof; no floats); `seq` breaks ties to the least recently picked (the
//! initial sequence numbers are a random rotation of the leaves and every pick takes the next
//! value of a counter, so they are unique and break every tie; after `2^48` picks the leaves
//! are renumbered in order). The root is the answer. The tree sits behind one spin lock (the
//! tree and the counts must change together; a pick holds it for a few dozen nanoseconds;
//! acquiring is one atomic swap and releasing a plain store — see `SpinLock` for why spinning is
//! acceptable):
//! * pick: `O(log n)` — check the root's leaf (and one *sweeping* leaf per pick) against its
//!   atomic and repair it if it drifted, then increment the atomic and the leaf and walk up,
//!   carrying the winner in registers (one comparison per level on the dependency chain);
//! * release (guard drop): `O(log n)` worst case, usually less — decrement the atomic, re-read it
//!   into the leaf, walk up until a node no longer changes.
//!
//! **Drift.** Every change made through *this* picker updates the tree under its lock, so a
//! single generation is exact. Two things change the atomics behind its back: guards of an
//! *older* picker generation (they decrement the shared atomic and update the old tree) and
//! [`BackendLoad::set_baseline`]. The tree repairs itself: before answering, the root's leaf is
//! re-read (so a backend whose real load rose is never picked on stale data — the loop repeats
//! until the root agrees with its atomic), and one leaf per pick is swept round robin (so a
//! backend whose load *fell* is seen again within `n` picks). After a baseline push call
//! [`Picker::refresh_loads`](super::Picker::refresh_loads) (`O(n log n)` worst case) to
//! re-read every leaf at once.
//!
//! Build: `O(n)`.
//!
//! # P2C (`LeastConnP2c`)
//! Two distinct uniformly random eligible backends (one thread-local `fastrand` draw), the lower
//! `load/weight` wins (ties to the first draw, itself random) and its count is incremented.
//! `O(1)`, lock-free: two relaxed loads per candidate and one `fetch_add`. With a single
//! eligible backend it is picked. Build: `O(n)`.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::BackendLoad;

/// Sequence numbers take the high 48 bits of a tag, the leaf the low 16 bits. When the counter
/// reaches this, the leaves are renumbered in order (see [`LeastConnExact::renumber`]).
const SEQ_LIMIT: u64 = 1 << 48;

/// A node key of the tournament tree (in registers).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    /// `⌊load · 2^32 / weight⌋` (see [`rank`]).
    rank: u64,
    /// `seq << 16 | leaf`: sequence numbers are unique, so the tag orders by them.
    tag: u64,
}

/// Padding: loses to every real leaf (a real rank is below `2^64 - 1`) and is never walked from.
const PAD: Key = Key {
    rank: u64::MAX,
    tag: u64::MAX,
};

/// A load as stored in the tree.
#[inline]
fn clamp(load: u64) -> u32 {
    load.min(u64::from(u32::MAX)) as u32
}

/// The weighted load `load / weight` as an integer that compares *exactly*:
/// `⌊load · 2^32 / weight⌋`, with `load < 2^32` (saturated) and `1 ≤ weight < 2^16`.
///
/// Two distinct ratios `a/w` and `b/v` differ by `|a·v − b·w| / (w·v) ≥ 1 / (w·v) > 2^-32`, so
/// scaled by `2^32` they differ by more than 1 and their floors are ordered the same way (and
/// are different); equal ratios give equal floors. This is the cross-multiplied comparison,
/// paid once per leaf update instead of on every level of the walk.
///
/// `recip` is [`recip(weight)`](recip), which turns the division into a multiplication.
#[inline]
fn rank(load: u32, recip: u128) -> u64 {
    ((u128::from(load) * recip) >> 48) as u64
}

/// `⌈2^80 / weight⌉`, so that `⌊load · m / 2^48⌋ = ⌊load · 2^32 / weight⌋` for every
/// `load < 2^32`: with `m = 2^80 / weight + e`, `0 ≤ e < 1`, the product over `2^48` is
/// `load · 2^32 / weight` (whose fractional part is at most `1 − 1/weight`) plus
/// `load · e / 2^48 < 2^-16 < 1/weight`, which cannot carry it past the next integer.
#[inline]
fn recip(weight: u32) -> u128 {
    (1u128 << 80).div_ceil(u128::from(weight))
}

/// The current load (`BackendLoad::load`, inlined).
#[inline]
fn current(l: &BackendLoad) -> u64 {
    l.in_flight
        .load(Ordering::Relaxed)
        .saturating_add(l.baseline.load(Ordering::Relaxed))
}

impl Key {
    #[inline]
    fn leaf(self) -> usize {
        (self.tag & 0xffff) as usize
    }
    #[inline]
    fn seq(self) -> u64 {
        self.tag >> 16
    }

    /// Whether `self` should be picked before `o`: lower rank, then least recently picked.
    #[inline]
    fn better(self, o: Key) -> bool {
        ((u128::from(self.rank) << 64) | u128::from(self.tag))
            < ((u128::from(o.rank) << 64) | u128::from(o.tag))
    }

    /// The better of two keys.
    #[inline]
    fn best(self, o: Key) -> Key {
        if self.better(o) {
            self
        } else {
            o
        }
    }
}

/// A stored node. Atomics only so that the tree can sit behind [`SpinLock`] without `unsafe`
/// (`unsafe_code` is forbidden): every access is `Relaxed` and made with the lock held, so they
/// compile to plain loads and stores.
#[derive(Default)]
struct Node {
    rank: AtomicU64,
    tag: AtomicU64,
}

impl Node {
    #[inline]
    fn get(&self) -> Key {
        Key {
            rank: self.rank.load(Ordering::Relaxed),
            tag: self.tag.load(Ordering::Relaxed),
        }
    }
    #[inline]
    fn put(&self, k: Key) {
        self.rank.store(k.rank, Ordering::Relaxed);
        self.tag.store(k.tag, Ordering::Relaxed);
    }
}

/// Four sibling nodes: one cache line.
#[derive(Default)]
#[repr(align(64))]
struct Group([Node; 4]);

/// One eligible backend.
struct Leaf {
    load: Arc<BackendLoad>,
    /// [`recip`] of the weight, clamped to `1..=u16::MAX` (weights are at most 10,000).
    recip: u128,
    backend: u32,
    /// The load the tree holds for this leaf (under the lock).
    cached: AtomicU32,
}

/// The tree's counters.
#[repr(align(64))]
struct Cursor {
    next_seq: AtomicU64,
    sweep: AtomicUsize,
}

/// A test-and-test-and-set lock: acquiring is one `swap` (one atomic read-modify-write),
/// releasing is one plain `Release` store, where `parking_lot`'s mutex spends a
/// read-modify-write on each. Spinning is acceptable because the critical section is a
/// bounded `O(log n)` tree update over memory the lock owns plus a few relaxed loads and one
/// `fetch_add`/`fetch_sub` of the shared counts: it never blocks, allocates, or calls out (and
/// if it ever panicked, the guard would still release the lock). A waiter polls with
/// exponential backoff ([`MAX_BACKOFF`]), then, after [`SPIN_ROUNDS`] polls, yields its time
/// slice on every poll so that a preempted holder can finish.
///
/// It fills a cache line of its own, so that waiters polling it do not steal the lines the
/// holder works on.
#[derive(Default)]
#[repr(align(64))]
struct SpinLock(AtomicBool);

struct SpinGuard<'a>(&'a AtomicBool);

impl Drop for SpinGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl SpinLock {
    #[inline]
    fn lock(&self) -> SpinGuard<'_> {
        if self.0.swap(true, Ordering::Acquire) {
            self.lock_contended();
        }
        SpinGuard(&self.0)
    }

    #[cold]
    fn lock_contended(&self) {
        let mut backoff = 1u32;
        let mut rounds = 0u32;
        loop {
            while self.0.load(Ordering::Relaxed) {
                if rounds < SPIN_ROUNDS {
                    for _ in 0..backoff {
                        std::hint::spin_loop();
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    rounds += 1;
                } else {
                    std::thread::yield_now();
                }
            }
            if !self.0.swap(true, Ordering::Acquire) {
                return;
            }
        }
    }
}

/// Polls of a contended [`SpinLock`] before a waiter starts yielding: with the backoff below,
/// about 6,600 `spin_loop` hints (≈ 56 µs at the 8.5 ns one costs on the benchmark machine).
const SPIN_ROUNDS: u32 = 32;
/// Most `spin_loop` hints between two polls (≈ 2 µs). Polling less often keeps the lock, the
/// cursor and the tree's hot lines on one core for longer under saturation: two threads picking
/// in a loop on one picker took 147 ns per pick with at most 64 hints and 85 ns with 256.
const MAX_BACKOFF: u32 = 256;

/// Exact least-connections state of one picker.
pub(super) struct LeastConnExact {
    lock: SpinLock,
    /// A 4-ary tournament tree stored level by level (leaves first), each level padded to
    /// whole groups of four siblings. Guarded by `lock`.
    groups: Box<[Group]>,
    /// First group of each level; the last level holds the root alone.
    level_start: Box<[usize]>,
    /// Leaf → backend. `cached` is guarded by `lock`.
    leaves: Box<[Leaf]>,
    /// Backend index → leaf (`u32::MAX` when ineligible).
    leaf_of: Box<[u32]>,
    /// Guarded by `lock`; written on every pick, so on a cache line of its own.
    cursor: Cursor,
}

impl fmt::Debug for LeastConnExact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeastConnExact")
            .field("leaves", &self.leaves.len())
            .finish()
    }
}

impl LeastConnExact {
    /// Builds over `(backend index, weight, load)` of the eligible backends (non-empty);
    /// `n_backends` is the total number of backends. `O(n)`.
    pub(super) fn build(items: &[(u32, u32, Arc<BackendLoad>)], n_backends: usize) -> Self {
        let n = items.len().max(1);
        let rot = fastrand::u64(..n as u64);
        // Level sizes in nodes, leaves first, down to the root.
        let mut level_start = vec![0usize];
        let mut len = n;
        let mut total_groups = len.div_ceil(4);
        while len > 1 {
            len = len.div_ceil(4);
            level_start.push(total_groups);
            total_groups += len.div_ceil(4);
        }
        let groups: Box<[Group]> = (0..total_groups).map(|_| Group::default()).collect();
        for g in groups.iter() {
            for node in &g.0 {
                node.put(PAD);
            }
        }
        let mut leaf_of = vec![u32::MAX; n_backends];
        let leaves: Box<[Leaf]> = items
            .iter()
            .enumerate()
            .map(|(p, (b, w, load))| {
                leaf_of[*b as usize] = p as u32;
                let recip = recip((*w).clamp(1, u32::from(u16::MAX)));
                let cached = clamp(current(load));
                let seq = (p as u64 + rot) % n as u64;
                groups[p >> 2].0[p & 3].put(Key {
                    rank: rank(cached, recip),
                    tag: (seq << 16) | p as u64,
                });
                Leaf {
                    load: load.clone(),
                    recip,
                    backend: *b,
                    cached: AtomicU32::new(cached),
                }
            })
            .collect();
        let this = Self {
            lock: SpinLock::default(),
            groups,
            level_start: level_start.into(),
            leaves,
            leaf_of: leaf_of.into(),
            cursor: Cursor {
                next_seq: AtomicU64::new(n as u64),
                sweep: AtomicUsize::new(0),
            },
        };
        this.rebuild_inner();
        this
    }

    /// Recomputes every inner node from the leaves. `O(n)`.
    fn rebuild_inner(&self) {
        let mut len = self.leaves.len().max(1);
        for l in 0..self.level_start.len() - 1 {
            let (from, to) = (self.level_start[l], self.level_start[l + 1]);
            len = len.div_ceil(4);
            for i in 0..len {
                let g = &self.groups[from + i].0;
                let best = g[0]
                    .get()
                    .best(g[1].get())
                    .best(g[2].get().best(g[3].get()));
                self.groups[to + (i >> 2)].0[i & 3].put(best);
            }
        }
    }

    #[inline]
    fn leaf_key(&self, p: usize) -> Key {
        self.groups[p >> 2].0[p & 3].get()
    }

    #[inline]
    fn root(&self) -> Key {
        self.groups[self.groups.len() - 1].0[0].get()
    }

    /// The next sequence number (lock held).
    #[inline]
    fn take_seq(&self) -> u64 {
        let mut s = self.cursor.next_seq.load(Ordering::Relaxed);
        if s >= SEQ_LIMIT {
            s = self.renumber();
        }
        self.cursor.next_seq.store(s + 1, Ordering::Relaxed);
        s
    }

    /// Renumbers the leaves `0..n` in their current sequence order (which it preserves) and
    /// returns the next free number. `O(n log n)`, once every `2^48 − n` picks (lock held).
    #[cold]
    fn renumber(&self) -> u64 {
        let n = self.leaves.len();
        let mut order: Vec<(u64, usize)> = (0..n).map(|p| (self.leaf_key(p).seq(), p)).collect();
        order.sort_unstable();
        for (seq, &(_, p)) in order.iter().enumerate() {
            let node = &self.groups[p >> 2].0[p & 3];
            let k = node.get();
            node.put(Key {
                rank: k.rank,
                tag: ((seq as u64) << 16) | p as u64,
            });
        }
        self.rebuild_inner();
        n as u64
    }

    /// Sets leaf `p` to `load` with sequence number `seq` and walks up, stopping when a node is
    /// unchanged. The winner is carried in registers: each level reads only the three siblings
    /// (their best does not depend on the walk, so it overlaps with it) and compares once on
    /// the dependency chain, a 128-bit integer comparison.
    ///
    /// With `STOP = false` every level is written: for the pick of the root's leaf, whose old
    /// key is a copy in every node of its path, so no node can be unchanged.
    #[inline(always)]
    fn set<const STOP: bool>(&self, p: usize, load: u64, seq: u64) {
        let leaf = &self.leaves[p];
        let load = clamp(load);
        leaf.cached.store(load, Ordering::Relaxed);
        let mut cur = Key {
            rank: rank(load, leaf.recip),
            tag: (seq << 16) | p as u64,
        };
        let mut i = p;
        self.groups[i >> 2].0[i & 3].put(cur);
        for l in 0..self.level_start.len() - 1 {
            let g = &self.groups[self.level_start[l] + (i >> 2)].0;
            let lane = i & 3;
            let sib = g[lane ^ 1]
                .get()
                .best(g[lane ^ 2].get().best(g[lane ^ 3].get()));
            cur = cur.best(sib);
            i >>= 2;
            let dst = &self.groups[self.level_start[l + 1] + (i >> 2)].0[i & 3];
            if STOP && dst.get() == cur {
                break;
            }
            dst.put(cur);
        }
    }

    /// Re-reads leaf `p` if its load drifted (lock held). Whether it did.
    #[inline]
    fn repair(&self, p: usize) -> bool {
        let leaf = &self.leaves[p];
        let actual = current(&leaf.load);
        if leaf.cached.load(Ordering::Relaxed) == clamp(actual) {
            return false;
        }
        self.repair_cold(p, actual);
        true
    }

    #[cold]
    #[inline(never)]
    fn repair_cold(&self, p: usize, actual: u64) {
        let seq = self.leaf_key(p).seq();
        self.set::<true>(p, actual, seq);
    }

    /// Picks the least-loaded eligible backend and counts one call on it. Returns its index.
    #[inline]
    pub(super) fn pick(&self) -> u32 {
        let _g = self.lock.lock();
        let n = self.leaves.len();
        // Sweep one leaf.
        let s = self.cursor.sweep.load(Ordering::Relaxed);
        self.cursor
            .sweep
            .store(if s + 1 >= n { 0 } else { s + 1 }, Ordering::Relaxed);
        self.repair(s);
        // Make sure the winner's key is current (bounded: at most n repairs).
        let mut p = self.root().leaf();
        for _ in 0..n {
            if !self.repair(p) {
                break;
            }
            p = self.root().leaf();
        }
        let leaf = &self.leaves[p];
        let before = leaf.load.in_flight.fetch_add(1, Ordering::Relaxed);
        let seq = self.take_seq();
        self.set::<false>(
            p,
            (before + 1).saturating_add(leaf.load.baseline.load(Ordering::Relaxed)),
            seq,
        );
        leaf.backend
    }

    /// Counts one call on backend `index` (already chosen, e.g. by a sticky session).
    pub(super) fn acquire(&self, index: u32, load: &BackendLoad) {
        let leaf = self.leaf_of[index as usize];
        if leaf == u32::MAX {
            load.in_flight.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let _g = self.lock.lock();
        load.in_flight.fetch_add(1, Ordering::Relaxed);
        let seq = self.take_seq();
        self.set::<true>(leaf as usize, current(load), seq);
    }

    /// Ends one call on backend `index`.
    #[inline]
    pub(super) fn release(&self, index: u32, load: &BackendLoad) {
        let leaf = self.leaf_of[index as usize];
        if leaf == u32::MAX {
            load.in_flight.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let p = leaf as usize;
        let _g = self.lock.lock();
        load.in_flight.fetch_sub(1, Ordering::Relaxed);
        let seq = self.leaf_key(p).seq();
        self.set::<true>(p, current(load), seq);
    }

    /// Re-reads every leaf's load from its atomic. `O(n log n)` worst case.
    pub(super) fn refresh(&self) {
        let _g = self.lock.lock();
        for p in 0..self.leaves.len() {
            self.repair(p);
        }
    }

    /// Approximate heap bytes.
    pub(super) fn heap_bytes(&self) -> usize {
        self.groups.len() * std::mem::size_of::<Group>()
            + self.leaves.len() * std::mem::size_of::<Leaf>()
            + self.level_start.len() * 8
            + self.leaf_of.len() * 4
    }
}

/// P2C state of one picker: the eligible backends with their weight and load, packed.
pub(super) struct P2c {
    items: Box<[(Arc<BackendLoad>, u32, u32)]>,
}

impl fmt::Debug for P2c {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("P2c")
            .field("eligible", &self.items.len())
            .finish()
    }
}

impl P2c {
    /// Builds over `(backend index, weight, load)` of the eligible backends (non-empty). `O(n)`.
    pub(super) fn build(items: &[(u32, u32, Arc<BackendLoad>)]) -> Self {
        Self {
            items: items.iter().map(|(b, w, l)| (l.clone(), *w, *b)).collect(),
        }
    }

    /// Picks the better of two distinct random eligible backends and counts one call on it.
    /// Returns its index.
    #[inline]
    pub(super) fn pick(&self) -> u32 {
        let n = self.items.len();
        if n <= 1 {
            return self.items.first().map_or(0, |x| {
                x.0.in_flight.fetch_add(1, Ordering::Relaxed);
                x.2
            });
        }
        // One 64-bit draw gives both candidates (multiply-shift on each 32-bit half; the bias
        // is below n / 2^32).
        let r = fastrand::u64(..);
        let i = (((r & 0xffff_ffff) * n as u64) >> 32) as usize;
        let mut j = (((r >> 32) * (n as u64 - 1)) >> 32) as usize;
        if j >= i {
            j += 1;
        }
        let (a, b) = (&self.items[i], &self.items[j]);
        let la = u128::from(a.0.load()) * u128::from(b.1);
        let lb = u128::from(b.0.load()) * u128::from(a.1);
        let winner = if la <= lb { a } else { b };
        winner.0.in_flight.fetch_add(1, Ordering::Relaxed);
        winner.2
    }

    /// Approximate heap bytes.
    pub(super) fn heap_bytes(&self) -> usize {
        self.items.len() * std::mem::size_of::<(Arc<BackendLoad>, u32, u32)>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rank orders (and ties) exactly like the cross-multiplied comparison.
    #[test]
    fn rank_compares_like_cross_multiplication() {
        let mut rng = fastrand::Rng::with_seed(1);
        let loads = |rng: &mut fastrand::Rng| match rng.u8(..4) {
            0 => rng.u32(..16),
            1 => u32::MAX - rng.u32(..16),
            2 => rng.u32(..100_000),
            _ => rng.u32(..),
        };
        let weights = |rng: &mut fastrand::Rng| match rng.u8(..3) {
            0 => rng.u32(1..=16),
            1 => u32::from(u16::MAX) - rng.u32(..16),
            _ => rng.u32(1..=u32::from(u16::MAX)),
        };
        for _ in 0..1_000_000 {
            let (a, w) = (loads(&mut rng), weights(&mut rng));
            let (b, v) = if rng.bool() {
                // Equal or adjacent ratios: scale a/w.
                let k = rng.u32(1..=4);
                let (b, v) = (u64::from(a) * u64::from(k), u64::from(w) * u64::from(k));
                if b > u64::from(u32::MAX) || v > u64::from(u16::MAX) {
                    continue;
                }
                ((b as u32).saturating_add(rng.u32(..2)), v as u32)
            } else {
                (loads(&mut rng), weights(&mut rng))
            };
            let cross = (u128::from(a) * u128::from(v)).cmp(&(u128::from(b) * u128::from(w)));
            let (ra, rb) = (rank(a, recip(w)), rank(b, recip(v)));
            assert_eq!(ra, ((u64::from(a) << 32) / u64::from(w)), "{a}/{w}");
            assert_eq!(ra.cmp(&rb), cross, "{a}/{w} vs {b}/{v}");
        }
    }

    /// The multiplication by the reciprocal is the exact floor division, for every weight.
    #[test]
    fn reciprocal_divides_exactly() {
        let mut rng = fastrand::Rng::with_seed(2);
        for w in 1..=u32::from(u16::MAX) {
            let m = recip(w);
            let near = |k: u32| [k.wrapping_mul(w).wrapping_sub(1), k.wrapping_mul(w)];
            let mut loads = vec![0, 1, u32::MAX, u32::MAX - 1, w, w - 1, w + 1];
            loads.extend(near(u32::MAX / w));
            for _ in 0..8 {
                loads.push(rng.u32(..));
                loads.extend(near(rng.u32(..=u32::MAX / w)));
            }
            for l in loads {
                assert_eq!(rank(l, m), (u64::from(l) << 32) / u64::from(w), "{l}/{w}");
            }
        }
    }

    /// Larger trees (several levels, partial groups) against a brute-force minimum.
    #[test]
    fn picks_the_minimum_on_larger_trees() {
        let mut rng = fastrand::Rng::with_seed(3);
        for n in [1usize, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65, 257, 700] {
            let loads: Vec<Arc<BackendLoad>> = (0..n).map(|_| Arc::default()).collect();
            let weights: Vec<u32> = (0..n)
                .map(|_| {
                    if rng.bool() {
                        rng.u32(1..=4)
                    } else {
                        rng.u32(1..=10_000)
                    }
                })
                .collect();
            // Backend indices are spread over twice as many backends (half ineligible).
            let items: Vec<_> = (0..n)
                .map(|p| (2 * p as u32 + 1, weights[p], loads[p].clone()))
                .collect();
            let lc = LeastConnExact::build(&items, 2 * n + 1);
            let mut held = Vec::new();
            for step in 0..3_000 {
                match rng.u8(..10) {
                    0..=5 => {
                        let snap: Vec<u64> = loads.iter().map(|l| l.load()).collect();
                        let b = lc.pick();
                        let p = (b as usize - 1) / 2;
                        let minimal = (0..n).all(|q| {
                            u128::from(snap[p]) * u128::from(weights[q])
                                <= u128::from(snap[q]) * u128::from(weights[p])
                        });
                        assert!(minimal, "n = {n}, step {step}: picked {p}");
                        held.push(b);
                    }
                    6..=8 if !held.is_empty() => {
                        let b = held.swap_remove(rng.usize(..held.len()));
                        lc.release(b, &loads[(b as usize - 1) / 2]);
                    }
                    _ => {
                        loads[rng.usize(..n)].set_baseline(rng.u64(..5));
                        lc.refresh();
                    }
                }
            }
            for b in held {
                lc.release(b, &loads[(b as usize - 1) / 2]);
            }
            assert!(loads.iter().all(|l| l.in_flight() == 0));
        }
    }

    /// Sequence numbers are renumbered when they run out; ties keep rotating.
    #[test]
    fn renumbering_keeps_the_rotation() {
        let loads: Vec<Arc<BackendLoad>> = (0..7).map(|_| Arc::default()).collect();
        let items: Vec<_> = loads
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, 1 + i as u32 % 3, l.clone()))
            .collect();
        let lc = LeastConnExact::build(&items, 7);
        // Load everything evenly (weights 1, 2, 3: 6 calls per unit of weight).
        let held: Vec<u32> = (0..6 * (1 + 2 + 3 + 1 + 2 + 3 + 1))
            .map(|_| lc.pick())
            .collect();
        for (i, l) in loads.iter().enumerate() {
            assert_eq!(l.in_flight(), 6 * (1 + i as u64 % 3));
        }
        lc.cursor.next_seq.store(SEQ_LIMIT - 3, Ordering::Relaxed);
        for _ in 0..5 {
            let mut seen: Vec<u32> = (0..7)
                .map(|_| {
                    let b = lc.pick();
                    lc.release(b, &loads[b as usize]);
                    b
                })
                .collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), 7, "ties must rotate through every backend");
        }
        assert!(lc.cursor.next_seq.load(Ordering::Relaxed) < 100);
        for b in held {
            lc.release(b, &loads[b as usize]);
        }
        assert!(loads.iter().all(|l| l.in_flight() == 0));
    }
}
