//! Groups inside a picker (locality: one group per priority, or per priority and zone): which
//! group each backend is in, one selection strategy per group, and the shares by which picks
//! are spread over the groups.
//!
//! The shares are set by the picker's owner at any time ([`Picker::set_shares`], computed by
//! `dlb::locality`), without a rebuild: they are cumulative thresholds over `u32` in relaxed
//! atomics. A pick draws 32 bits — for the hashing policies mixed from the key's hash so that a
//! key keeps its group while the thresholds around it hold, for the others the calling thread's
//! next point of an evenly spreading sequence ([`spread_draw`]) — and takes the first group
//! whose threshold is above the draw. When one group holds everything ([`Groups::single`]) no
//! draw is made. A drawn group with nothing to pick falls through to the next one that has.
//! A pick racing `set_shares` may see some thresholds old and some new: it still lands in a
//! valid group, and falls through as above.

use std::sync::atomic::{AtomicU32, Ordering};

use super::picker::{Bounded, Strategy};
use super::Picker;

/// `single` when no one group holds every pick.
const MIXED: u32 = u32::MAX;

/// The thresholds are counted in blocks of this many.
const LANES: usize = 4;

/// How the backends of a picker are grouped, given to [`Picker::build_grouped`].
#[derive(Debug, Clone, Copy)]
pub struct Grouping<'a> {
    /// The group of each backend, in the order of the specs (dense, `0..groups`).
    pub of_backend: &'a [u16],
    /// Per group: whether it is in panic on its own (the picker's panic mode applied to that group
    /// only: `route_all` routes over all its backends, `fail` makes it pick nothing). Its length
    /// is the number of groups.
    pub panic: &'a [bool],
}

/// One group of a grouped picker: what a pick that lands in it needs, side by side so that one
/// index (and one bounds check) reaches both.
#[derive(Debug)]
pub(super) struct Group {
    /// The selection strategy over the group's backends.
    pub(super) strategy: Strategy,
    /// Bounded-load parameters (hashing policies with a factor).
    pub(super) bounded: Option<Bounded>,
}

/// The groups of a grouped picker.
#[derive(Debug)]
pub(super) struct Groups {
    /// Per backend (global index): its group.
    pub(super) of_backend: Box<[u16]>,
    /// Per group: its strategy and bounded-load parameters.
    pub(super) groups: Box<[Group]>,
    /// Cumulative thresholds: group `g` takes draws `< thresholds[g]` not taken by a lower one.
    /// Padded with `u32::MAX` to a multiple of [`LANES`] entries, so that the pick counts them
    /// in whole blocks, without a remainder loop (a padding entry counts only for the draw
    /// `u32::MAX`, which the last group takes anyway).
    thresholds: Box<[AtomicU32]>,
    /// The group that holds every pick, or [`MIXED`].
    single: AtomicU32,
}

impl Groups {
    pub(super) fn new(of_backend: Box<[u16]>, groups: Box<[Group]>) -> Self {
        let n = groups.len();
        let groups = Self {
            of_backend,
            thresholds: (0..n.next_multiple_of(LANES))
                .map(|_| AtomicU32::new(u32::MAX))
                .collect(),
            groups,
            single: AtomicU32::new(MIXED),
        };
        // Until shares are set: everything to the first group that can pick.
        let first = groups.first_usable();
        let mut shares = vec![0.0; n];
        if n > 0 {
            shares[first] = 1.0;
        }
        groups.set_shares(&shares);
        groups
    }

    pub(super) fn len(&self) -> usize {
        self.groups.len()
    }

    /// The first group that can pick (0 when none can).
    fn first_usable(&self) -> usize {
        self.groups
            .iter()
            .position(|g| !matches!(g.strategy, Strategy::Empty))
            .unwrap_or(0)
    }

    /// Sets the shares (see the module docs). Negative, NaN and missing entries count as 0; the
    /// shares are normalised; all zero means "the first group that can pick".
    pub(super) fn set_shares(&self, shares: &[f64]) {
        let n = self.len();
        let clean = |g: usize| {
            shares
                .get(g)
                .copied()
                .filter(|s| s.is_finite() && *s > 0.0)
                .unwrap_or(0.0)
        };
        let total: f64 = (0..n).map(clean).sum();
        if total <= 0.0 {
            let first = self.first_usable();
            for (g, t) in self.thresholds.iter().enumerate() {
                t.store(if g >= first { u32::MAX } else { 0 }, Ordering::Relaxed);
            }
            self.single.store(first as u32, Ordering::Relaxed);
            return;
        }
        let mut cum = 0.0;
        let mut single = MIXED;
        let mut last_positive = 0;
        for g in 0..n {
            let s = clean(g);
            if s > 0.0 {
                last_positive = g;
                if s >= total {
                    single = g as u32;
                }
            }
            cum += s;
            let t = ((cum / total) * 4_294_967_296.0).min(u32::MAX as f64) as u32;
            self.thresholds[g].store(t, Ordering::Relaxed);
        }
        // Rounding must not leave a gap at the top: the last group with a share takes the rest.
        for t in &self.thresholds[last_positive..] {
            t.store(u32::MAX, Ordering::Relaxed);
        }
        // Resolved here, once, to a group that can pick, so the pick's fast path checks nothing.
        if single != MIXED {
            single = self.usable(single as usize).unwrap_or(single as usize) as u32;
        }
        self.single.store(single, Ordering::Relaxed);
    }

    /// The group that takes every pick when one does (already one that can pick, if any).
    #[inline(always)]
    pub(super) fn single(&self) -> Option<usize> {
        let single = self.single.load(Ordering::Relaxed);
        (single != MIXED).then_some(single as usize)
    }

    /// The current shares, recomputed from the thresholds.
    pub(super) fn shares(&self) -> Vec<f64> {
        const TOP: f64 = 4_294_967_296.0;
        let top = |t: u32| {
            if t == u32::MAX {
                1u64 << 32
            } else {
                u64::from(t)
            }
        };
        let mut prev = 0u64;
        self.thresholds[..self.len()]
            .iter()
            .map(|t| {
                let t = top(t.load(Ordering::Relaxed));
                let s = t.saturating_sub(prev) as f64 / TOP;
                prev = prev.max(t);
                s
            })
            .collect()
    }

    /// The group for the draw `r` by the thresholds (when the shares are mixed).
    #[inline(always)]
    pub(super) fn choose(&self, r: u32) -> usize {
        // The thresholds grow, so the first one above `r` is at the count of those at or below
        // it: counted without a branch (the group is random, so a search loop's exit
        // mispredicted on most spilled picks), in whole blocks of `LANES`.
        let below: usize = self
            .thresholds
            .chunks_exact(LANES)
            .map(|block| {
                block
                    .iter()
                    .map(|t| usize::from(r >= t.load(Ordering::Relaxed)))
                    .sum::<usize>()
            })
            .sum();
        below.min(self.len().saturating_sub(1))
    }

    /// `g` if it can pick, else the next group (wrapping) that can; `None` when none can.
    #[inline]
    pub(super) fn usable(&self, g: usize) -> Option<usize> {
        if !matches!(self.groups[g].strategy, Strategy::Empty) {
            return Some(g);
        }
        let n = self.len();
        (1..n)
            .map(|k| (g + k) % n)
            .find(|&h| !matches!(self.groups[h].strategy, Strategy::Empty))
    }
}

thread_local! {
    /// The calling thread's position in its sequence of group draws ([`spread_draw`]).
    static DRAWS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The group draw of a pick without a key: the calling thread's next point of the golden-ratio
/// (Weyl) sequence over `u32`. Consecutive draws of a thread spread evenly over the range, so
/// each group gets its share within a few picks (a random draw's error shrinks only as
/// 1/√picks), and the draw costs an add on a thread-local instead of a random number.
#[inline(always)]
pub(super) fn spread_draw() -> u32 {
    DRAWS.with(|d| {
        let v = d.get().wrapping_add(0x9E37_79B9);
        d.set(v);
        v
    })
}

/// 32 bits of a key's hash for the group draw, decorrelated from the bits the tables use
/// (the splitmix64 finaliser).
#[inline]
pub(super) fn group_bits(h: u64) -> u32 {
    let mut z = h ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 32) as u32
}

impl Picker {
    /// Sets how picks are spread over the groups of a grouped picker (one share per group, in
    /// group order; normalised; see the module docs of `groups`). Any thread, any time, off the
    /// request path; picks racing it stay valid. A no-op on an ungrouped picker.
    pub fn set_shares(&self, shares: &[f64]) {
        if let Some(g) = &self.groups {
            g.set_shares(shares);
        }
    }

    /// The shares picks are spread by, per group (`[1.0]` for an ungrouped picker).
    pub fn shares(&self) -> Vec<f64> {
        self.groups
            .as_ref()
            .map_or_else(|| vec![1.0], |g| g.shares())
    }

    /// Number of groups (1 for an ungrouped picker).
    pub fn group_count(&self) -> usize {
        self.groups.as_ref().map_or(1, |g| g.len())
    }

    /// The group of the backend at `index` (0 for an ungrouped picker).
    pub fn group_of(&self, index: usize) -> u16 {
        self.groups
            .as_ref()
            .and_then(|g| g.of_backend.get(index).copied())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(n: usize) -> Groups {
        let g = (0..n).map(|_| Group {
            strategy: Strategy::Empty,
            bounded: None,
        });
        Groups::new(Box::new([]), g.collect())
    }

    /// For every group count (padded or not), the draw at each threshold's edges lands in the
    /// group the module docs say, never in a padding entry; the shares read back unchanged.
    #[test]
    fn choose_takes_the_first_threshold_above_the_draw() {
        for n in 1..=9 {
            let g = groups(n);
            let shares: Vec<f64> = (1..=n).map(|k| k as f64).collect();
            g.set_shares(&shares);
            let total: f64 = shares.iter().sum();
            let back = g.shares();
            assert_eq!(back.len(), n);
            for (s, b) in shares.iter().zip(&back) {
                assert!((s / total - b).abs() < 1e-9, "{n}: {back:?}");
            }
            let t: Vec<u32> = g.thresholds[..n]
                .iter()
                .map(|t| t.load(Ordering::Relaxed))
                .collect();
            for k in 0..n {
                let lo = if k == 0 { 0 } else { t[k - 1] };
                assert_eq!(g.choose(lo), k, "{n} groups, draw {lo}");
                assert_eq!(g.choose(t[k].saturating_sub(1).max(lo)), k, "{n} groups");
            }
            assert_eq!(g.choose(u32::MAX), n - 1);
        }
    }
}
