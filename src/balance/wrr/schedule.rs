//! The schedule both kinds of round-robin table are built from: weights divided by their gcd
//! ([`reduce_weights`]), and the smooth cyclic Sainte-Laguë order over them
//! ([`smooth_schedule`]; see the module docs of `wrr` for its rules).

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;

/// Greatest common divisor (`gcd(0, b) = b`).
pub(super) fn gcd(mut a: u64, mut b: u64) -> u64 {
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
