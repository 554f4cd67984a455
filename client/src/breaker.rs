//! The SDK's circuit breakers: one [`dlb::circuit::Breaker`] per backend of a service, and the
//! service's concurrent-call cap, as the pick path sees them.
//!
//! [`Breakers`] is built by the session task next to each picker (policy `circuit_breaker`;
//! none when it is unset, and then the pick path pays one `Option` check). Slots are carried
//! over by backend id across picker generations, like in-flight counts, so a rebuild does not
//! reset a breaker. A trip does **not** rebuild the picker: each slot has a `blocked` flag
//! (an atomic the pick reads: one relaxed load for a closed breaker); a pick that lands on a
//! blocked backend asks its breaker (a short `parking_lot` mutex) and, if refused, retries the
//! picker up to [`RETRIES`] times (unkeyed picks), then walks the backends from the refused one
//! onward to the next eligible one whose breaker admits a call. The cap is one shared atomic per
//! service: a pick over it fails with [`crate::Error::ResourceExhausted`].
//!
//! Outcomes are recorded by [`Ticket`] (held by the `CallGuard`): success/failure go to the
//! breaker; a half-open trial dropped without an outcome frees its slot; the cap's permit is
//! returned on drop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dlb::balance::Picker;
use dlb::circuit::{Admit, Breaker, CircuitConfig, State};
use parking_lot::Mutex;

/// Picker retries of an unkeyed pick that landed on a refused backend, before the walk.
pub(crate) const RETRIES: usize = 3;

/// One backend's breaker.
#[derive(Debug)]
pub(crate) struct Slot {
    /// Whether the breaker is not closed (the pick path's fast check).
    blocked: AtomicBool,
    breaker: Mutex<Breaker>,
    cfg: CircuitConfig,
    /// The service's trip counter (shared by its slots).
    trips: Arc<AtomicU64>,
}

impl Slot {
    fn new(cfg: CircuitConfig, trips: Arc<AtomicU64>) -> Self {
        Self {
            blocked: AtomicBool::new(false),
            breaker: Mutex::new(Breaker::new()),
            cfg,
            trips,
        }
    }

    /// Asks to send a call now.
    #[inline]
    pub(crate) fn admit(&self, now: impl FnOnce() -> Instant) -> Admit {
        if !self.blocked.load(Ordering::Relaxed) {
            return Admit::Call;
        }
        self.breaker.lock().try_acquire(&self.cfg, now())
    }

    /// Frees a trial slot that [`Slot::admit`] granted but that was not used.
    pub(crate) fn admit_released(&self) {
        self.breaker.lock().release_trial();
    }

    /// The breaker's state.
    pub(crate) fn state(&self) -> State {
        self.breaker.lock().state()
    }

    fn record(&self, ok: bool, trial: bool) {
        let mut b = self.breaker.lock();
        let before = b.state();
        if b.record(&self.cfg, ok, trial, crate::breaker::now()) {
            let state = b.state();
            self.blocked
                .store(state != State::Closed, Ordering::Relaxed);
            if state == State::Open && before == State::Closed {
                self.trips.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The clock breakers run on (tokio's, so tests can pause it).
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The breakers of one picker generation, by backend index.
#[derive(Debug)]
pub(crate) struct Breakers {
    pub(crate) cfg: CircuitConfig,
    slots: Box<[Arc<Slot>]>,
    /// Calls in flight through capped picks of this service (shared across generations).
    in_flight: Arc<AtomicU64>,
    /// Closed → open transitions (shared across generations).
    pub(crate) trips: Arc<AtomicU64>,
}

impl Breakers {
    /// Breakers for `picker`, carrying the slots of `previous` (built for `previous_picker`)
    /// over by backend id while the configuration is unchanged.
    pub(crate) fn build(
        cfg: CircuitConfig,
        picker: &Picker,
        previous: Option<(&Breakers, &Picker)>,
    ) -> Self {
        let previous = previous.filter(|(b, _)| b.cfg == cfg);
        let in_flight = previous.map_or_else(Arc::default, |(b, _)| b.in_flight.clone());
        let trips = previous.map_or_else(Arc::default, |(b, _)| b.trips.clone());
        let slots = picker
            .backends()
            .iter()
            .map(|be| {
                previous
                    .and_then(|(b, p)| p.position(be.id()).and_then(|i| b.slots.get(i)))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Slot::new(cfg, trips.clone())))
            })
            .collect();
        Self {
            cfg,
            slots,
            in_flight,
            trips,
        }
    }

    /// The slot of backend `index`.
    pub(crate) fn slot(&self, index: usize) -> Option<&Arc<Slot>> {
        self.slots.get(index)
    }

    /// The state of backend `index`'s breaker.
    pub(crate) fn state(&self, index: usize) -> Option<State> {
        self.slots.get(index).map(|s| s.state())
    }

    /// Takes a permit of the concurrent-call cap; `None` when the cap is reached (nothing
    /// taken). Always succeeds without a cap (an empty permit).
    pub(crate) fn permit(&self) -> Option<Option<Permit>> {
        let cap = u64::from(self.cfg.max_concurrent_calls);
        if cap == 0 {
            return Some(None);
        }
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= cap {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Some(Permit(self.in_flight.clone())))
    }
}

/// One call counted against the service's concurrent-call cap, returned on drop (on every
/// path: a pick that fails after taking it gives it back too).
#[derive(Debug)]
pub(crate) struct Permit(Arc<AtomicU64>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A call's claim on its backend's breaker (and on the service's cap).
#[derive(Debug)]
pub(crate) struct Ticket {
    pub(crate) slot: Arc<Slot>,
    pub(crate) trial: bool,
    /// Dropped with the ticket (after the breaker bookkeeping).
    pub(crate) _permit: Option<Permit>,
    pub(crate) done: bool,
}

impl Ticket {
    /// Records the call's outcome.
    pub(crate) fn record(&mut self, ok: bool) {
        self.done = true;
        self.slot.record(ok, self.trial);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.trial && !self.done {
            self.slot.breaker.lock().release_trial();
        }
    }
}
