//! The [`Table`] of a round-robin picker: building it — the exact table of one period, or the
//! split table of [`MAX_SCHEDULE`] slots (whose parts are in `split.rs`) — and reading the
//! backend a slot gives at a phase, which the cursors in `mod.rs` call on every pick.

use std::fmt;

use super::schedule::{reduce_weights, smooth_schedule};
use super::split::{partial_quotients, phase_step, place_splits, AliasPacking, Split, NO_SPLIT};
use super::{MAX_SCHEDULE, SPLIT};

/// The immutable part of a round-robin picker: the slots and how a cursor walks them (see the
/// module docs). Public for tests and diagnostics; a picker holds one with backend indices.
pub struct Table {
    /// One entry per slot: a backend (input index) or [`SPLIT`].
    pub(super) schedule: Box<[u16]>,
    /// The split slots, in slot order.
    pub(super) splits: Box<[Split]>,
    /// Bit `s % 64` of word `s / 64`: slot `s` is split.
    pub(super) split_bits: Box<[u64]>,
    /// Split slots before word `k` of `split_bits`.
    pub(super) split_rank: Box<[u32]>,
    /// `W` for a split table, 1 for an exact one (whose phase stays 0).
    pub(super) modulus: u32,
    /// The phase step `g` (0 for an exact table).
    pub(super) step: u32,
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
    /// With more than [`MAX_BACKENDS`](crate::balance::MAX_BACKENDS) weights (pickers reject those first).
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
    pub(super) fn remap(&mut self, f: impl Fn(u16) -> u16) {
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
    pub(super) fn at(&self, cursor: u64) -> u16 {
        self.pick_at(cursor as u32 as usize, (cursor >> 32) as u32)
    }

    /// The packed cursor after `cursor`.
    #[inline]
    pub(super) fn advance(&self, cursor: u64) -> u64 {
        if (cursor as u32 as usize) + 1 < self.schedule.len() {
            cursor + 1
        } else {
            u64::from(self.next_phase((cursor >> 32) as u32)) << 32
        }
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.schedule.len() * 2
            + self.splits.len() * std::mem::size_of::<Split>()
            + self.split_bits.len() * 8
            + self.split_rank.len() * 4
    }
}
