//! What only a split table needs (reduced weight sum `W > 2^20`; see the module docs of
//! `wrr`): the [`Split`] slot descriptor and its pick, Walker's alias packing of the quotas into
//! slots, the golden-ratio phase step, and the placement of the split slots in the schedule so
//! that no backend can be picked twice in a row.

use super::schedule::gcd;

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

/// The phase step for modulus `m ≥ 2`: coprime to `m`, near `m·(√5 − 1)/2`; of the first 64
/// such candidates (alternating above and below), the one whose continued fraction `g/m` has the
/// smallest sum of partial quotients (which bounds the discrepancy, see [`Table::run_error_bound`](super::Table::run_error_bound)),
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
pub(super) fn partial_quotients(g: u64, m: u64) -> (u64, u64) {
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
pub(super) struct AliasPacking {
    /// Whole bins of each backend.
    pub(super) whole: Vec<u64>,
    /// Split bins, in creation order: `(primary, alias, primary's share)`.
    pairs: Vec<(usize, usize, u64)>,
    /// Each backend's split bin as primary (at most one).
    pub(super) own: Vec<Option<usize>>,
}

impl AliasPacking {
    pub(super) fn new(w: &[u64], total: u64, len: u64) -> Self {
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
    pub(super) fn splits(&self, total: u64, step: u64) -> Vec<Split> {
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
pub(super) const NO_SPLIT: u32 = u32::MAX;

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
pub(super) fn place_splits(slots: &mut [u32], own: &[Option<usize>], descs: &[Split]) -> Vec<u32> {
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
