//! Least connections: exact (a tournament tree under a mutex) and P2C (lock-free).
//!
//! # What it owns
//! The per-picker selection state over the eligible backends. The counts themselves live in
//! the shared [`BackendLoad`]s (`load() = local in-flight + control-plane baseline`), which
//! outlive picker generations; the RAII pick guard increments on pick and decrements on drop.
//! Weighted load is `load / weight`, always compared by cross-multiplication in 128 bits (no
//! floats).
//!
//! # Exact (`LeastConnExact`)
//! A tournament (winner) tree over the eligible backends: `2n` nodes of 16 bytes, leaf `p` at
//! `n + p`, each inner node a copy of the better of its two children's keys `(load,
//! last-picked sequence, weight, leaf)`. "Better" = lower `load/weight`, then least recently
//! picked (so ties rotate; the initial sequence numbers are a random rotation of the leaves and
//! every pick takes the next value of a counter, so they are unique and break every tie). The
//! root is the answer. The tree sits behind one `parking_lot` mutex (the tree and the counts
//! must change together; a pick holds it for a few dozen nanoseconds):
//! * pick: `O(log n)` — check the root's leaf (and one *sweeping* leaf per pick) against its
//!   atomic and repair it if it drifted, then increment the atomic and the leaf and walk up;
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
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;

use super::BackendLoad;

/// A leaf key of the tournament tree.
#[derive(Clone, Copy, PartialEq, Eq)]
/// 16 bytes, so a tree walk touches as few cache lines as possible: loads saturate at
/// `u32::MAX`, weights (≤ 10,000) and leaves (< 65,536) fit in `u16`.
struct Key {
    seq: u64,
    load: u32,
    weight: u16,
    leaf: u16,
}

/// A load as stored in the tree.
#[inline]
fn clamp(load: u64) -> u32 {
    load.min(u64::from(u32::MAX)) as u32
}

impl Key {
    /// Whether `self` should be picked before `o`.
    #[inline]
    fn better(&self, o: &Key) -> bool {
        // Sequence numbers are unique per leaf (initial rotation, then a counter), so they break
        // every tie. Non-short-circuit operators keep this branch-free: the outcome is
        // unpredictable and a mispredict costs more than the multiplications.
        let a = u64::from(self.load) * u64::from(o.weight);
        let b = u64::from(o.load) * u64::from(self.weight);
        (a < b) | ((a == b) & (self.seq < o.seq))
    }
}

struct Tree {
    /// `nodes[1]` is the root; leaves at `n..2n`. `nodes[0]` is unused.
    nodes: Box<[Key]>,
    next_seq: u64,
    sweep: usize,
}

impl Tree {
    #[inline]
    fn n(&self) -> usize {
        self.nodes.len() / 2
    }

    /// Sets leaf `p`'s key and walks up, stopping when a node is unchanged.
    #[inline]
    fn set(&mut self, p: usize, load: u64, seq: u64) {
        let n = self.n();
        let mut k = n + p;
        self.nodes[k].load = clamp(load);
        self.nodes[k].seq = seq;
        k >>= 1;
        while k >= 1 {
            let (l, r) = (self.nodes[2 * k], self.nodes[2 * k + 1]);
            let best = if l.better(&r) { l } else { r };
            if self.nodes[k] == best {
                break;
            }
            self.nodes[k] = best;
            k >>= 1;
        }
    }
}

/// Exact least-connections state of one picker.
pub(super) struct LeastConnExact {
    tree: Mutex<Tree>,
    /// Leaf → backend index.
    backend_of: Box<[u32]>,
    /// Leaf → shared load.
    loads: Box<[Arc<BackendLoad>]>,
    /// Backend index → leaf (`u32::MAX` when ineligible).
    leaf_of: Box<[u32]>,
}

impl fmt::Debug for LeastConnExact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeastConnExact")
            .field("leaves", &self.loads.len())
            .finish()
    }
}

impl LeastConnExact {
    /// Builds over `(backend index, weight, load)` of the eligible backends (non-empty);
    /// `n_backends` is the total number of backends. `O(n)`.
    pub(super) fn build(items: &[(u32, u32, Arc<BackendLoad>)], n_backends: usize) -> Self {
        let n = items.len().max(1);
        let rot = fastrand::u64(..n as u64);
        let mut nodes = vec![
            Key {
                load: u32::MAX,
                seq: u64::MAX,
                weight: 1,
                leaf: u16::MAX,
            };
            2 * n
        ];
        let mut leaf_of = vec![u32::MAX; n_backends];
        for (p, (b, w, load)) in items.iter().enumerate() {
            nodes[n + p] = Key {
                load: clamp(load.load()),
                seq: (p as u64 + rot) % n as u64,
                weight: (*w).min(u32::from(u16::MAX)) as u16,
                leaf: p as u16,
            };
            leaf_of[*b as usize] = p as u32;
        }
        for k in (1..n).rev() {
            let (l, r) = (nodes[2 * k], nodes[2 * k + 1]);
            nodes[k] = if l.better(&r) { l } else { r };
        }
        Self {
            tree: Mutex::new(Tree {
                nodes: nodes.into(),
                next_seq: n as u64,
                sweep: 0,
            }),
            backend_of: items.iter().map(|(b, _, _)| *b).collect(),
            loads: items.iter().map(|(_, _, l)| l.clone()).collect(),
            leaf_of: leaf_of.into(),
        }
    }

    /// Picks the least-loaded eligible backend and counts one call on it. Returns its index.
    #[inline]
    pub(super) fn pick(&self) -> u32 {
        let mut t = self.tree.lock();
        let n = self.loads.len();
        // Sweep one leaf.
        let s = t.sweep;
        t.sweep = if s + 1 >= n { 0 } else { s + 1 };
        let leaf_base = t.n();
        let actual = self.loads[s].load();
        if t.nodes[leaf_base + s].load != clamp(actual) {
            let seq = t.nodes[leaf_base + s].seq;
            t.set(s, actual, seq);
        }
        // Make sure the winner's key is current (bounded: at most n repairs).
        let mut p = t.nodes[1].leaf as usize;
        for _ in 0..n {
            let actual = self.loads[p].load();
            let leaf = t.nodes[leaf_base + p];
            if leaf.load == clamp(actual) {
                break;
            }
            t.set(p, actual, leaf.seq);
            p = t.nodes[1].leaf as usize;
        }
        let load = &self.loads[p];
        let before = load.in_flight.fetch_add(1, Ordering::Relaxed);
        let seq = t.next_seq;
        t.next_seq += 1;
        t.set(p, (before + 1).saturating_add(load.baseline()), seq);
        self.backend_of[p]
    }

    /// Counts one call on backend `index` (already chosen, e.g. by a sticky session).
    pub(super) fn acquire(&self, index: u32, load: &BackendLoad) {
        let leaf = self.leaf_of[index as usize];
        if leaf == u32::MAX {
            load.in_flight.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut t = self.tree.lock();
        load.in_flight.fetch_add(1, Ordering::Relaxed);
        let seq = t.next_seq;
        t.next_seq += 1;
        t.set(leaf as usize, load.load(), seq);
    }

    /// Ends one call on backend `index`.
    #[inline]
    pub(super) fn release(&self, index: u32, load: &BackendLoad) {
        let leaf = self.leaf_of[index as usize];
        if leaf == u32::MAX {
            load.in_flight.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let mut t = self.tree.lock();
        load.in_flight.fetch_sub(1, Ordering::Relaxed);
        let base = t.n();
        let seq = t.nodes[base + leaf as usize].seq;
        t.set(leaf as usize, load.load(), seq);
    }

    /// Re-reads every leaf's load from its atomic. `O(n log n)` worst case.
    pub(super) fn refresh(&self) {
        let mut t = self.tree.lock();
        let base = t.n();
        for p in 0..self.loads.len() {
            let actual = self.loads[p].load();
            let leaf = t.nodes[base + p];
            if leaf.load != clamp(actual) {
                t.set(p, actual, leaf.seq);
            }
        }
    }

    /// Approximate heap bytes.
    pub(super) fn heap_bytes(&self) -> usize {
        self.loads.len() * (2 * std::mem::size_of::<Key>() + 4 + 8) + self.leaf_of.len() * 4
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
