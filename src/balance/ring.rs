//! Ring hash (consistent hashing on a ring of virtual nodes), `O(log n)` per pick.
//!
//! # What it owns
//! The sorted ring of one picker: point hashes, the backend owning each point, the owner
//! resolved past ineligible backends, and a prefix index over the ring.
//!
//! # Algorithm
//! * **Virtual nodes.** The ring size target is `T = clamp(128 · n, 1024, 2^21)` over *all*
//!   backends `n` (Envoy-like minimum and maximum ring sizes), and backend `b` gets
//!   `max(1, round(T · w_b / Σw))` points: 128 per backend when weights are equal, scaled by
//!   weight otherwise. Point `r` of a backend with hash key `k` sits at
//!   [`hash::ring_point`]`(k, r)`; the address never enters the hash,
//!   so a backend that moves keeps its keys. Points are sorted by `(hash, hash order of the
//!   backend)`, so the ring is a pure function of the set of `(hash key, weight)`.
//! * **Lookup.** The first point clockwise at or after `key_hash(key)`, wrapping to the first
//!   point. A prefix index over the top bits of the hash (about 4 points per bucket) narrows the
//!   binary search to a bucket: `O(log n)` worst case, a handful of comparisons in practice.
//! * **Ineligible backends** keep their points; `resolved[i]` is the owner of the first point at
//!   or after `i` whose owner is eligible (precomputed, `O(P)`), so only the keys of an
//!   ineligible backend move, each to the next eligible point clockwise.
//! * **Bounded load** walks the points clockwise from the key's point (the same deterministic
//!   candidate order) and takes the first eligible backend under its cap.
//!
//! Build: `O(P log P)` for `P ≤ T + n` points. Memory: 12 bytes per point plus 4 bytes per
//! prefix bucket (≈ 1.6 KB per backend at 128 points per backend).

use std::fmt;

use super::hash;

/// Virtual nodes per backend at equal weights.
pub const POINTS_PER_BACKEND: u64 = 128;
/// Smallest ring.
pub const MIN_RING: u64 = 1024;
/// Largest ring target.
pub const MAX_RING: u64 = 1 << 21;

/// The ring of one picker.
pub(super) struct Ring {
    hashes: Box<[u64]>,
    owners: Box<[u16]>,
    resolved: Box<[u16]>,
    prefix: Box<[u32]>,
    shift: u32,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("points", &self.hashes.len())
            .finish()
    }
}

impl Ring {
    /// Builds the ring. `order` lists backend indices in hash order; `keys[i]`, `weights[i]`,
    /// `eligible[i]` describe backend `i`. At least one backend.
    pub(super) fn build(order: &[u16], keys: &[&str], weights: &[u32], eligible: &[bool]) -> Self {
        // Sized and weighted over the backends in `order` (a group holds a subset).
        let n = order.len() as u64;
        let target = (POINTS_PER_BACKEND * n).clamp(MIN_RING, MAX_RING);
        let total_w: u64 = order
            .iter()
            .map(|&b| u64::from(weights[b as usize]))
            .sum::<u64>()
            .max(1);
        let mut points: Vec<(u64, u32)> = Vec::with_capacity(target as usize + order.len());
        let mut buf = Vec::new();
        for (rank, &b) in order.iter().enumerate() {
            let w = u64::from(weights[b as usize]);
            let count = ((target * w + total_w / 2) / total_w).max(1);
            for r in 0..count {
                points.push((
                    hash::ring_point(keys[b as usize], r as u32, &mut buf),
                    rank as u32,
                ));
            }
        }
        points.sort_unstable();
        let hashes: Box<[u64]> = points.iter().map(|p| p.0).collect();
        let owners: Box<[u16]> = points.iter().map(|p| order[p.1 as usize]).collect();
        let resolved = super::maglev::resolve(&owners, eligible);
        let p = hashes.len().max(1);
        let bits = (usize::BITS - 1 - p.leading_zeros())
            .saturating_sub(2)
            .clamp(1, 20);
        let shift = 64 - bits;
        let buckets = 1usize << bits;
        let mut prefix = vec![0u32; buckets + 1];
        let mut i = 0usize;
        for (t, slot) in prefix.iter_mut().enumerate() {
            while i < hashes.len() && ((hashes[i] >> shift) as usize) < t {
                i += 1;
            }
            *slot = i as u32;
        }
        Self {
            hashes,
            owners,
            resolved,
            prefix: prefix.into(),
            shift,
        }
    }

    /// The index of the first point at or after `h`, wrapping.
    #[inline]
    pub(super) fn point(&self, h: u64) -> usize {
        let t = (h >> self.shift) as usize;
        let lo = self.prefix[t] as usize;
        let hi = self.prefix[t + 1] as usize;
        let i = lo + self.hashes[lo..hi].partition_point(|&x| x < h);
        if i >= self.hashes.len() {
            0
        } else {
            i
        }
    }

    /// The eligible backend for a key hash.
    #[inline]
    pub(super) fn lookup(&self, h: u64) -> u16 {
        self.resolved[self.point(h)]
    }

    /// Owners of the points in ring order (eligible or not): the bounded-load candidate order.
    #[inline]
    pub(super) fn owners(&self) -> &[u16] {
        &self.owners
    }

    /// Approximate heap bytes.
    pub(super) fn heap_bytes(&self) -> usize {
        self.hashes.len() * 12 + self.prefix.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_matches_linear_scan() {
        let keys = ["a", "b", "c", "d"];
        let r = Ring::build(&[0, 1, 2, 3], &keys, &[1, 1, 1, 1], &[true; 4]);
        for _ in 0..10_000 {
            let h = fastrand::u64(..);
            let expect = r.hashes.iter().position(|&x| x >= h).unwrap_or(0);
            assert_eq!(r.point(h), expect);
        }
        assert_eq!(
            r.point(u64::MAX),
            r.hashes.iter().position(|&x| x == u64::MAX).unwrap_or(0)
        );
        assert_eq!(r.point(0), 0);
    }
}
