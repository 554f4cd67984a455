//! The [`Picker`] type and its request path: the pick for each policy (including the
//! bounded-load walk), the in-flight accounting a [`Pick`] starts and ends, and the read-only
//! accessors. Building a picker is in `build.rs`, the pick guards in `pick.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::groups::{group_bits, spread_draw, Groups};
use super::{
    ewma, hash, least_conn, maglev, ring, wrr, Algorithm, Backend, BackendLoad, OwnedPick,
    PanicState, Pick, PickError, PolicyConfig,
};

/// The per-policy selection state of a picker.
#[derive(Debug)]
pub(super) enum Strategy {
    /// No eligible backend: every pick fails.
    Empty,
    Wrr(wrr::Wrr),
    LcExact(least_conn::LeastConnExact),
    P2c(least_conn::P2c),
    Ewma(ewma::PeakEwma),
    Maglev(maglev::Maglev),
    Ring(ring::Ring),
}

/// Bounded-load parameters of a hashing picker.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounded {
    pub(super) factor: f64,
    /// Total weight of the eligible backends.
    pub(super) eligible_weight: u64,
}

impl Bounded {
    /// `max(1, ⌈c · total · w / W⌉)`.
    #[inline]
    fn cap(&self, weight: u32, total: u64) -> u64 {
        let cap =
            (self.factor * total as f64 * f64::from(weight) / self.eligible_weight as f64).ceil();
        (cap as u64).max(1)
    }
}

/// An immutable picker for one service state. See the module docs.
#[derive(Debug)]
pub struct Picker {
    pub(super) policy: PolicyConfig,
    pub(super) backends: Box<[Backend]>,
    pub(super) by_id: HashMap<Arc<str>, usize>,
    pub(super) eligible: Box<[u32]>,
    /// Whether picks count an in-flight call.
    pub(super) counts: bool,
    pub(super) bounded: Option<Bounded>,
    /// Calls in flight through bounded pickers of this service; shared across generations.
    pub(super) total: Arc<AtomicU64>,
    /// The selection strategy of an ungrouped picker (`Empty` when grouped).
    pub(super) strategy: Strategy,
    /// The groups of a grouped picker (locality; see `groups.rs`), `None` when ungrouped.
    pub(super) groups: Option<Box<Groups>>,
    /// The panic state decided at build time.
    pub(super) panic: PanicState,
}

impl Picker {
    /// Picks a backend for a request. `key` is the request key for the hashing algorithms (and is
    /// ignored by the others); `None` picks as if given a random key.
    ///
    /// Errors: [`PickError::NoBackends`] for an empty picker, [`PickError::NoEligibleBackends`]
    /// when every backend is ineligible.
    #[inline]
    pub fn pick(&self, key: Option<&[u8]>) -> Result<Pick<'_>, PickError> {
        self.pick_impl(key, self.counts)
    }

    /// Like [`Picker::pick`], but leaves counting the call to the caller when the policy does
    /// not read in-flight counts ([`Picker::needs_counts`] is false: round robin, and the
    /// hashing policies without bounded load). Pickers that need the counts count as
    /// [`Picker::pick`] does; [`Pick::is_counted`] tells which happened.
    #[inline]
    pub fn pick_uncounted(&self, key: Option<&[u8]>) -> Result<Pick<'_>, PickError> {
        self.pick_impl(key, false)
    }

    /// Whether picking reads the in-flight counts (least connections, Peak-EWMA, bounded load),
    /// so that every call must be counted in the backends' [`BackendLoad`].
    pub fn needs_counts(&self) -> bool {
        self.bounded.is_some()
            || matches!(
                self.policy.algorithm,
                Algorithm::LeastConnExact | Algorithm::LeastConnP2c | Algorithm::PeakEwma
            )
    }

    /// The pick; `count` says whether a policy that does not need counts counts the call.
    ///
    /// Grouped: the group that takes every pick when there is one (the healthy in-zone case: no
    /// draw, resolved by `set_shares`), else a draw by the shares; then the one
    /// pick within the group's strategy.
    #[inline(always)]
    fn pick_impl(&self, key: Option<&[u8]>, count: bool) -> Result<Pick<'_>, PickError> {
        let Some(groups) = &self.groups else {
            return self.pick_in(&self.strategy, self.bounded.as_ref(), key, None, count);
        };
        let (g, h) = match groups.single() {
            Some(g) => (g, None),
            None => self.draw_group(groups, key),
        };
        let group = &groups.groups[g];
        self.pick_in(&group.strategy, group.bounded.as_ref(), key, h, count)
    }

    /// The group of a pick by the shares, when they are mixed (see `groups.rs`), and the key's
    /// hash when the policy hashes (the draw is mixed from it; the pick reuses it).
    #[inline(always)]
    fn draw_group(&self, groups: &Groups, key: Option<&[u8]>) -> (usize, Option<u64>) {
        let hashing = matches!(
            self.policy.algorithm,
            Algorithm::Maglev | Algorithm::RingHash
        );
        let (g, h) = if hashing {
            let h = key.map_or_else(hash::random_hash, hash::key_hash);
            (groups.choose(group_bits(h)), Some(h))
        } else {
            (groups.choose(spread_draw()), None)
        };
        (groups.usable(g).unwrap_or(g), h)
    }

    /// The pick with one strategy; `h` is the key's hash when the caller computed it already.
    #[inline(always)]
    fn pick_in<'p>(
        &'p self,
        strategy: &'p Strategy,
        bounded: Option<&Bounded>,
        key: Option<&[u8]>,
        h: Option<u64>,
        count: bool,
    ) -> Result<Pick<'p>, PickError> {
        let key_hash = || h.unwrap_or_else(|| key.map_or_else(hash::random_hash, hash::key_hash));
        let index = match strategy {
            Strategy::Empty => {
                return Err(if self.backends.is_empty() {
                    PickError::NoBackends
                } else if self.panic.active {
                    PickError::Panic {
                        eligible: self.panic.eligible,
                        total: self.panic.total,
                    }
                } else {
                    PickError::NoEligibleBackends
                });
            }
            Strategy::Wrr(w) => u32::from(w.next()),
            Strategy::P2c(p) => {
                // P2C always counts; it incremented the winner's count itself.
                return Ok(Pick {
                    picker: self,
                    index: p.pick(),
                    counted: true,
                });
            }
            Strategy::Ewma(e) => {
                // Peak-EWMA counts like P2C.
                return Ok(Pick {
                    picker: self,
                    index: e.pick(),
                    counted: true,
                });
            }
            Strategy::LcExact(lc) => {
                // The tree counted the call under its lock.
                return Ok(Pick {
                    picker: self,
                    index: lc.pick(),
                    counted: true,
                });
            }
            Strategy::Maglev(m) => {
                let h = key_hash();
                match bounded {
                    None => u32::from(m.lookup(h)),
                    Some(b) => return Ok(self.counted(self.pick_bounded(b, m.table(), m.slot(h)))),
                }
            }
            Strategy::Ring(r) => {
                let h = key_hash();
                match bounded {
                    None => u32::from(r.lookup(h)),
                    Some(b) => {
                        return Ok(self.counted(self.pick_bounded(b, r.owners(), r.point(h))))
                    }
                }
            }
        };
        // `counted` as a plain bool (not a `Pick` from `acquire`), so that the result is built
        // in registers on every path (merging a returned `Pick` made LLVM build it in memory,
        // a store-forwarding stall on every pick).
        let counted = count && self.count_call(index);
        Ok(Pick {
            picker: self,
            index,
            counted,
        })
    }

    /// The strategy the backend at `index` is picked by (its group's when grouped).
    #[inline]
    fn strategy_of(&self, index: u32) -> &Strategy {
        match &self.groups {
            None => &self.strategy,
            Some(g) => &g.groups[usize::from(g.of_backend[index as usize])].strategy,
        }
    }

    /// A pick of `index` whose call is already counted.
    #[inline(always)]
    fn counted(&self, index: u32) -> Pick<'_> {
        Pick {
            picker: self,
            index,
            counted: true,
        }
    }

    /// The bounded-load walk (see the module docs): the first eligible backend in candidate
    /// order `owners[start..]` (wrapping) whose in-flight count is below its cap, its call
    /// counted. Returns the index only, so the caller builds the `Pick` in registers (a `Pick`
    /// returned through memory was read back with a store-forwarding stall).
    fn pick_bounded(&self, b: &Bounded, owners: &[u16], start: usize) -> u32 {
        let mut total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let len = owners.len();
        for _ in 0..3 {
            let mut i = start;
            let mut last = u32::MAX;
            for _ in 0..len {
                let idx = u32::from(owners[i]);
                if idx != last {
                    last = idx;
                    let be = &self.backends[idx as usize];
                    if be.eligible && be.load.try_acquire_below(b.cap(be.weight, total)) {
                        return idx;
                    }
                }
                i += 1;
                if i == len {
                    i = 0;
                }
            }
            total = self.total.load(Ordering::Relaxed);
        }
        // Unreachable in practice (see the module docs): take the first eligible candidate.
        let idx = (0..len)
            .map(|k| u32::from(owners[(start + k) % len]))
            .find(|&i| self.backends[i as usize].eligible)
            .unwrap_or(self.eligible[0]);
        self.backends[idx as usize]
            .load
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        idx
    }

    /// Counts one call on `index` when this picker counts calls.
    fn acquire(&self, index: u32) -> Pick<'_> {
        Pick {
            picker: self,
            index,
            counted: self.count_call(index),
        }
    }

    /// Counts one call on `index` when this picker counts calls; whether it did.
    fn count_call(&self, index: u32) -> bool {
        if !self.counts {
            return false;
        }
        let load = &self.backends[index as usize].load;
        match self.strategy_of(index) {
            Strategy::LcExact(lc) => lc.acquire(index, load),
            _ => {
                load.in_flight.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.bounded.is_some() {
            self.total.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Ends one counted call on `index`.
    #[inline]
    pub(super) fn release(&self, index: u32) {
        let load = &self.backends[index as usize].load;
        match self.strategy_of(index) {
            Strategy::LcExact(lc) => lc.release(index, load),
            _ => {
                load.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if self.bounded.is_some() {
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The panic state decided when this picker was built (see [`panic`]).
    pub fn panic_state(&self) -> PanicState {
        self.panic
    }

    /// The policy this picker was built with.
    pub fn policy(&self) -> &PolicyConfig {
        &self.policy
    }
    /// All backends, eligible or not, in input order.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }
    /// The backend with this id.
    pub fn get(&self, id: &str) -> Option<&Backend> {
        self.by_id.get(id).map(|&i| &self.backends[i])
    }
    /// The position in [`Picker::backends`] of the backend with this id.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }
    /// Number of eligible backends.
    pub fn eligible_count(&self) -> usize {
        self.eligible.len()
    }
    /// Like [`Picker::pick`], but the result owns a reference to the picker, so it can be held
    /// across `.await` points and outlive a picker swap (the SDK's call guard uses this).
    pub fn pick_owned(self: &Arc<Self>, key: Option<&[u8]>) -> Result<OwnedPick, PickError> {
        Ok(self.pick(key)?.into_owned(self))
    }

    /// Picks the backend with this id if it exists and is eligible (used by sticky sessions).
    /// The call is counted like any pick; bounded-load caps do not apply (affinity wins).
    pub fn pick_id(&self, id: &str) -> Option<Pick<'_>> {
        let &i = self.by_id.get(id)?;
        self.backends[i].eligible.then(|| self.acquire(i as u32))
    }

    /// Re-reads every backend's load into the exact least-connections tree (`O(n log n)`
    /// worst case). Call it after pushing baselines with [`BackendLoad::set_baseline`];
    /// without it the tree catches up within `n` picks (see [`least_conn`]). A no-op for the
    /// other policies, which read the atomics on every pick.
    pub fn refresh_loads(&self) {
        for s in self.strategies() {
            if let Strategy::LcExact(lc) = s {
                lc.refresh();
            }
        }
    }

    /// Every selection strategy: the one of an ungrouped picker, or each group's.
    fn strategies(&self) -> impl Iterator<Item = &Strategy> {
        let grouped = self.groups.as_deref().map_or(&[][..], |g| &g.groups[..]);
        let ungrouped = self.groups.is_none().then_some(&self.strategy);
        ungrouped
            .into_iter()
            .chain(grouped.iter().map(|g| &g.strategy))
    }

    /// Approximate heap memory of this picker in bytes: backends (with their strings and load
    /// counters), the id index and the policy's tables.
    pub fn memory_bytes(&self) -> usize {
        let per_backend = std::mem::size_of::<Backend>() + std::mem::size_of::<BackendLoad>() + 16;
        let strings: usize = self
            .backends
            .iter()
            .map(|b| b.id.len() + b.address.len() + b.hash_key.len())
            .sum();
        let index = self.by_id.capacity() * (std::mem::size_of::<(Arc<str>, usize)>() + 1)
            + self.eligible.len() * 4;
        let tables: usize = self
            .strategies()
            .map(|s| match s {
                Strategy::Empty => 0,
                Strategy::Wrr(w) => w.heap_bytes(),
                Strategy::LcExact(lc) => lc.heap_bytes(),
                Strategy::P2c(p) => p.heap_bytes(),
                Strategy::Ewma(e) => e.heap_bytes(),
                Strategy::Maglev(m) => m.heap_bytes(),
                Strategy::Ring(r) => r.heap_bytes(),
            })
            .sum::<usize>()
            + self
                .groups
                .as_ref()
                .map_or(0, |g| g.of_backend.len() * 2 + g.len() * 24);
        self.backends.len() * per_backend + strings + index + tables
    }

    /// The round-robin schedule (backend indices, one period) for an ungrouped round-robin
    /// picker.
    pub fn wrr_schedule(&self) -> Option<&[u16]> {
        match &self.strategy {
            Strategy::Wrr(w) => Some(w.schedule()),
            _ => None,
        }
    }
}
