//! The request path's pick: [`ServiceHandle::get_next_server`] and the picks it dispatches to.
//!
//! The common pick (a policy counted in the thread's view, no breaker, no sticky key) is inline
//! and returns only the small [`Held`] out of the thread-local lookup of the view, so that the
//! [`CallGuard`] is built once, in the caller's return slot; every other pick (breakers, a
//! policy the picker counts, a sticky key, no picker, a failed pick) runs out of line within
//! the same lookup (see `BENCHMARKS.md`, "The common SDK pick built in place").

use std::sync::atomic::Ordering;
use std::sync::Arc;

use dlb::balance::PickError;
use tokio::time::Instant;

use super::{CallGuard, Held, ServiceHandle};
use crate::error::{Error, Result};
use crate::state::local::{self, LocalView, ViewRef};

impl ServiceHandle {
    /// Picks a backend locally, in O(1), from the latest snapshot.
    ///
    /// `key` is the request key for consistent hashing; when the service's policy is sticky it is
    /// the session key (a `None` key is then picked without affinity). The returned guard counts
    /// one in-flight call until it is consumed by [`CallGuard::success`] / [`CallGuard::failure`]
    /// or dropped.
    ///
    /// Errors: [`Error::ServiceNotFound`] if the control plane said the service does not exist,
    /// [`Error::Unavailable`] before the first snapshot, [`Error::NoBackend`] when nothing is
    /// eligible (or a strict sticky session's backend is gone).
    pub fn get_next_server(&self, key: Option<&[u8]>) -> Result<CallGuard> {
        let clock = self.call_clock();
        // The common pick returns only the small `Held` out of the thread-local lookup, and the
        // guard is built here, in the caller's slot: a `Result<CallGuard>` passed out of the
        // closure was copied word by word several times (about 60 instructions per pick).
        // Every other pick writes its result into `other` (one lookup of the view either way).
        let mut other = None;
        let fast = local::with_view(
            &self.state,
            |view| self.pick_fast(view, key, clock, &mut other),
            || None,
        );
        if let Some(call) = fast {
            return Ok(CallGuard {
                call,
                started: crate::clock::Start::now(clock),
                ticket: None,
            });
        }
        match other {
            Some(result) => result,
            // No thread-local cache (thread exit): pick from the shared snapshot (no breakers).
            None => self.pick_shared(key, clock),
        }
    }

    /// The common pick through this thread's view: a policy counted in the view, no breaker, no
    /// sticky key. Every other pick ([`Self::pick_other`]: no picker, breakers, a policy the
    /// picker counts, a sticky key, a failed pick) puts its result in `other` and returns
    /// `None`.
    #[inline(always)]
    fn pick_fast(
        &self,
        view: Option<&Arc<LocalView>>,
        key: Option<&[u8]>,
        clock: crate::clock::CallClock,
        other: &mut Option<Result<CallGuard>>,
    ) -> Option<Held> {
        let fast = view.filter(|v| {
            v.breakers.is_none() && v.counts_locally() && (v.sticky.is_none() || key.is_none())
        });
        let Some(view) = fast else {
            *other = Some(self.pick_other(view, key, clock));
            return None;
        };
        let pick = match view.picker.pick_uncounted(key) {
            Ok(pick) => pick,
            Err(reason) => {
                *other = Some(Err(self.no_backend(reason)));
                return None;
            }
        };
        if !pick.is_counted() {
            if let Some(call) = view.start_call(pick.index()) {
                return Some(Held::Local(call));
            }
        }
        Some(Held::Viewed(pick.into_owned_by(ViewRef(view.clone()))))
    }

    /// Every pick through this thread's view but [`Self::pick_fast`]'s.
    #[cold]
    #[inline(never)]
    fn pick_other(
        &self,
        view: Option<&Arc<LocalView>>,
        key: Option<&[u8]>,
        clock: crate::clock::CallClock,
    ) -> Result<CallGuard> {
        let Some(view) = view else {
            return Err(self.no_picker());
        };
        match &view.breakers {
            None => Ok(CallGuard {
                call: self.pick_in(view, key)?,
                started: crate::clock::Start::now(clock),
                ticket: None,
            }),
            Some(b) => self.pick_guarded(view, b, key, clock),
        }
    }

    /// The clock this service's calls are timed with.
    pub(crate) fn call_clock(&self) -> crate::clock::CallClock {
        if self.state.tokio_clock.load(Ordering::Relaxed) {
            crate::clock::CallClock::Tokio
        } else {
            crate::clock::CallClock::Tsc
        }
    }

    /// A pick under the service's circuit breakers and concurrent-call cap (see
    /// [`crate::breaker`]).
    #[cold]
    fn pick_guarded(
        &self,
        view: &Arc<LocalView>,
        breakers: &crate::breaker::Breakers,
        key: Option<&[u8]>,
        clock: crate::clock::CallClock,
    ) -> Result<CallGuard> {
        use dlb::circuit::Admit;
        let Some(permit) = breakers.permit() else {
            return Err(Error::ResourceExhausted(format!(
                "service {:?} has {} calls in flight from this client (circuit_breaker.max_concurrent_calls)",
                self.state.name, breakers.cfg.max_concurrent_calls
            )));
        };
        let ticket = |index: usize, admit: Admit, permit| {
            breakers.slot(index).map(|slot| crate::breaker::Ticket {
                slot: slot.clone(),
                trial: admit == Admit::Trial,
                _permit: permit,
                done: false,
            })
        };
        let mut refused = None;
        for _ in 0..=(if key.is_none() {
            crate::breaker::RETRIES
        } else {
            0
        }) {
            let held = self.pick_in(view, key)?;
            let i = held.index();
            let admit = breakers
                .slot(i)
                .map_or(Admit::Call, |s| s.admit(crate::breaker::now));
            if admit != Admit::Refused {
                return Ok(CallGuard {
                    call: held,
                    started: crate::clock::Start::now(clock),
                    ticket: ticket(i, admit, permit),
                });
            }
            refused = Some(i);
        }
        // Walk on from the refused backend to the next eligible one that admits a call.
        let n = view.picker.backends().len();
        let start = refused.unwrap_or(0);
        for off in 1..n {
            let j = (start + off) % n;
            let b = &view.picker.backends()[j];
            if !b.is_eligible() {
                continue;
            }
            let Some(slot) = breakers.slot(j) else {
                continue;
            };
            let admit = slot.admit(crate::breaker::now);
            if admit == Admit::Refused {
                continue;
            }
            if let Some(pick) = view.picker.pick_id(b.id()) {
                let held = Held::Viewed(pick.into_owned_by(ViewRef(view.clone())));
                return Ok(CallGuard {
                    call: held,
                    started: crate::clock::Start::now(clock),
                    ticket: ticket(j, admit, permit),
                });
            }
            if admit == Admit::Trial {
                slot.admit_released();
            }
        }
        Err(Error::NoBackend {
            service: self.state.name.clone(),
            reason: PickError::NoEligibleBackends,
        })
    }

    /// A pick through this thread's view. The common case (a policy that does not read
    /// in-flight counts, no sticky key) is inline; the others are [`Self::pick_in_other`].
    #[inline(always)]
    fn pick_in(&self, view: &Arc<LocalView>, key: Option<&[u8]>) -> Result<Held> {
        if !view.counts_locally() || (view.sticky.is_some() && key.is_some()) {
            return self.pick_in_other(view, key);
        }
        let pick = match view.picker.pick_uncounted(key) {
            Ok(pick) => pick,
            Err(reason) => return Err(self.no_backend(reason)),
        };
        if !pick.is_counted() {
            if let Some(call) = view.start_call(pick.index()) {
                return Ok(Held::Local(call));
            }
        }
        Ok(Held::Viewed(pick.into_owned_by(ViewRef(view.clone()))))
    }

    /// A pick through this thread's view that the picker counts, or a sticky one.
    #[inline(never)]
    fn pick_in_other(&self, view: &Arc<LocalView>, key: Option<&[u8]>) -> Result<Held> {
        let picker = &view.picker;
        let owner = || ViewRef(view.clone());
        if let (Some(table), Some(key)) = (&view.sticky, key) {
            let pick = table.pick(picker, key, Instant::now().into_std());
            return Ok(Held::Viewed(self.picked(pick)?.into_owned_by(owner())));
        }
        Ok(Held::Viewed(
            self.picked(picker.pick(key))?.into_owned_by(owner()),
        ))
    }

    /// A pick from the shared snapshot, counted in the backends' shared loads.
    #[cold]
    #[inline(never)]
    fn pick_shared(&self, key: Option<&[u8]>, clock: crate::clock::CallClock) -> Result<CallGuard> {
        let snap = self.state.snapshot.load();
        let Some(picker) = &snap.picker else {
            return Err(self.no_picker());
        };
        let pick = match (&snap.sticky, key) {
            (Some(table), Some(key)) => table.pick(picker, key, Instant::now().into_std()),
            _ => picker.pick(key),
        };
        let owned = self.picked(pick)?.into_owned(picker);
        Ok(CallGuard {
            call: Held::Shared(owned),
            started: crate::clock::Start::now(clock),
            ticket: None,
        })
    }

    fn picked<T>(&self, pick: std::result::Result<T, PickError>) -> Result<T> {
        pick.map_err(|reason| self.no_backend(reason))
    }

    /// The error of a pick that found no backend.
    #[cold]
    #[inline(never)]
    fn no_backend(&self, reason: PickError) -> Error {
        Error::NoBackend {
            service: self.state.name.clone(),
            reason,
        }
    }

    /// The error of a pick while the published snapshot has no picker.
    #[cold]
    pub(crate) fn no_picker(&self) -> Error {
        if self.state.snapshot.load().not_found {
            Error::ServiceNotFound(self.state.name.clone())
        } else {
            Error::Unavailable(format!(
                "no snapshot of service {:?} received yet",
                self.state.name
            ))
        }
    }
}
