//! Per-thread views of a service's published snapshot: the request path's fast lane.
//!
//! Picking straight from the shared snapshot writes shared memory on every call: the debt slot
//! of `ArcSwap::load`, a reference count that keeps the picked backend alive for the `'static`
//! [`CallGuard`](crate::CallGuard), and the backend's in-flight count. When several threads pick
//! from one service those cache lines move between cores on every pick, and a second thread
//! adds little throughput. So each thread keeps, per service, a [`LocalView`]: the picker it
//! picks from plus its own in-flight counter for each backend of that picker. A pick reads
//! shared memory (the service's generation number, the picker's tables) but writes only its
//! own thread's: the counter of the picked backend. That counter is the reference count of
//! the view's [`CallSlot`] for the backend, which the guard holds: the slot keeps the picker
//! alive for the `'static` guard, so starting a call is one atomic add and ending it one
//! atomic subtract (an `Arc` of the view plus a separate counter cost two of each).
//!
//! * **Freshness.** `ServiceState::generation` grows after every publish; a thread whose view is
//!   older builds a view of the new snapshot on its next pick (`O(n)`: a zeroed counter array).
//! * **Which policies.** Only pickers that do not read in-flight counts are counted here (round
//!   robin, and Maglev and ring hash without bounded load: [`Picker::needs_counts`] is false).
//!   Least connections and bounded load count in the backends' shared
//!   [`BackendLoad`](dlb::balance::BackendLoad) (the pick reads those counts anyway), and so do
//!   sticky-session picks; their guards still keep the picker alive through the view
//!   ([`ViewRef`]), not through the picker's shared `Arc`. A view's counters are atomic because
//!   a guard may end on another thread (then that one decrement crosses cores).
//! * **Reading.** Every view registers with its service; [`in_flight`] adds, per backend of the
//!   current picker, the shared count and each registered view's count for the same id (views
//!   of older generations included: a call that started before a swap stays counted until its
//!   guard ends it). `O(views · n)`, for load reports and `ServiceHandle::backends`.
//! * **Retention.** A thread's view keeps its picker alive until the thread picks from a newer
//!   snapshot of that service or exits. The service's registry keeps a superseded view while
//!   a call picked through it is in flight, and drops it at the next refresh or read of the
//!   counts after its last call ended (a call's slot alone keeps the picker alive when the
//!   service is gone).

use std::cell::RefCell;
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};

use dlb::balance::{Backend, Picker, StickyTable};

use super::ServiceState;

/// One thread's view of one published snapshot that has a picker.
pub(crate) struct LocalView {
    pub(crate) picker: Arc<Picker>,
    pub(crate) sticky: Option<Arc<StickyTable>>,
    /// The circuit breakers of `picker`'s backends, when the policy has them.
    pub(crate) breakers: Option<Arc<crate::breaker::Breakers>>,
    /// Per backend index of `picker`: the slot that counts the calls picked through this view
    /// (made on the backend's first pick); empty when the picker counts calls itself
    /// ([`Picker::needs_counts`]).
    slots: Box<[OnceLock<Arc<CallSlot>>]>,
}

impl fmt::Debug for LocalView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalView")
            .field("backends", &self.picker.backends().len())
            .field("counts", &!self.slots.is_empty())
            .finish_non_exhaustive()
    }
}

impl LocalView {
    /// Whether calls picked through this view are counted in it (rather than by the picker).
    #[inline]
    pub(crate) fn counts_locally(&self) -> bool {
        !self.slots.is_empty()
    }

    /// Starts counting one call on `index`; `None` if the index is not one of this view's (then
    /// nothing was counted).
    #[inline]
    pub(crate) fn start_call(&self, index: usize) -> Option<LocalCall> {
        let cell = self.slots.get(index)?;
        let slot = match cell.get() {
            Some(slot) => slot,
            None => self.make_slot(cell, index),
        };
        Some(LocalCall { slot: slot.clone() })
    }

    /// The slot of backend `index`, made on its first pick through this view.
    #[cold]
    #[inline(never)]
    fn make_slot<'a>(&self, cell: &'a OnceLock<Arc<CallSlot>>, index: usize) -> &'a Arc<CallSlot> {
        cell.get_or_init(|| {
            Arc::new(CallSlot {
                picker: self.picker.clone(),
                index: index as u32,
            })
        })
    }

    /// Calls in flight picked through this view on backend `index`.
    fn in_flight(&self, index: usize) -> u64 {
        self.slots
            .get(index)
            .and_then(OnceLock::get)
            // The view holds one reference; every other one is a call's.
            .map_or(0, |s| (Arc::strong_count(s) - 1) as u64)
    }

    /// Whether a call picked through this view is still in flight.
    fn busy(&self) -> bool {
        (0..self.slots.len()).any(|i| self.in_flight(i) > 0)
    }
}

/// A view as the owner of an [`dlb::balance::OwnedPick`]: dereferences to the view's picker.
#[derive(Debug, Clone)]
pub(crate) struct ViewRef(pub(crate) Arc<LocalView>);

impl Deref for ViewRef {
    type Target = Picker;
    fn deref(&self) -> &Picker {
        &self.0.picker
    }
}

/// One backend of one view, as its calls hold it: the calls in flight on it are its reference
/// count (less the view's own reference), so starting and ending a call is one atomic add each,
/// and the slot keeps the picker, hence the backend, alive for a `'static` guard.
#[derive(Debug)]
pub(crate) struct CallSlot {
    picker: Arc<Picker>,
    index: u32,
}

/// One call counted in a [`LocalView`]; ends the count when dropped (on any thread).
#[derive(Debug)]
pub(crate) struct LocalCall {
    slot: Arc<CallSlot>,
}

impl LocalCall {
    /// The picked backend.
    #[inline]
    pub(crate) fn backend(&self) -> &Backend {
        // `index` was checked against the slots, which are as many as the backends.
        &self.slot.picker.backends()[self.slot.index as usize]
    }

    /// The picked backend's position in the view's picker.
    #[inline]
    pub(crate) fn index(&self) -> usize {
        self.slot.index as usize
    }
}

/// One service in a thread's cache.
struct Cached {
    /// The service; a `Weak` so the cache neither keeps it alive nor mistakes a new service at
    /// a reused address for it (the allocation lives as long as this `Weak`).
    state: Weak<ServiceState>,
    /// The generation `view` was built from.
    generation: u64,
    /// `None` when that snapshot had no picker.
    view: Option<Arc<LocalView>>,
}

thread_local! {
    /// This thread's views, one per service it picked from (a handful: a linear scan).
    static VIEWS: RefCell<Vec<Cached>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's view of `state`'s latest snapshot, building the view first when a
/// newer snapshot was published since the thread's last pick. `f` gets `None` when the snapshot
/// has no picker. Runs `unavailable` instead when the thread's cache is unavailable (the thread
/// is exiting, or a re-entrant call). One return value, no `Option` around it, so that the
/// pick path builds its result in place.
#[inline(always)]
pub(crate) fn with_view<R>(
    state: &Arc<ServiceState>,
    f: impl FnOnce(Option<&Arc<LocalView>>) -> R,
    unavailable: impl FnOnce() -> R,
) -> R {
    let generation = state.generation.load(Ordering::Acquire);
    let mut f = Some(f);
    let r = VIEWS.try_with(|cache| {
        let mut cache = cache.try_borrow_mut().ok()?;
        let me = Arc::as_ptr(state);
        let i = match cache.iter().position(|c| c.state.as_ptr() == me) {
            Some(i) if cache[i].generation == generation => i,
            _ => refresh(&mut cache, state, generation),
        };
        let f = f.take()?;
        Some(f(cache[i].view.as_ref()))
    });
    match r {
        Ok(Some(r)) => r,
        _ => unavailable(),
    }
}

/// Puts a view of the snapshot `state` publishes now (labelled `generation`, read before it)
/// into the thread's `cache`, registers it with `state`, and returns its position. Also drops
/// the cache's entries of services that no longer exist, so their pickers are freed.
#[cold]
fn refresh(cache: &mut Vec<Cached>, state: &Arc<ServiceState>, generation: u64) -> usize {
    let snapshot = state.snapshot.load_full();
    let view = snapshot.picker.as_ref().map(|picker| {
        let slots = if picker.needs_counts() {
            Box::default()
        } else {
            picker.backends().iter().map(|_| OnceLock::new()).collect()
        };
        let view = Arc::new(LocalView {
            picker: picker.clone(),
            sticky: snapshot.sticky.clone(),
            breakers: snapshot.breakers.clone(),
            slots,
        });
        if view.counts_locally() {
            let mut views = state.views.lock();
            prune(&mut views);
            views.push(view.clone());
        }
        view
    });
    let entry = Cached {
        state: Arc::downgrade(state),
        generation,
        view,
    };
    let me = Arc::as_ptr(state);
    cache.retain(|c| c.state.strong_count() > 0);
    match cache.iter().position(|c| c.state.as_ptr() == me) {
        Some(i) => {
            cache[i] = entry;
            i
        }
        None => {
            cache.push(entry);
            cache.len() - 1
        }
    }
}

/// Drops from a service's registry the views that no thread picks through any more (only the
/// registry holds them) and that have no call in flight.
fn prune(views: &mut Vec<Arc<LocalView>>) {
    views.retain(|v| Arc::strong_count(v) > 1 || v.busy());
}

/// Calls in flight from this process on each backend of `picker` (by index): the count in the
/// backend's shared load plus, for the same backend id, the count in every live view of
/// `state` (whatever picker generation it was built from). `O(views · n)`.
pub(crate) fn in_flight(state: &ServiceState, picker: &Arc<Picker>) -> Vec<u64> {
    let mut out: Vec<u64> = picker
        .backends()
        .iter()
        .map(|b| b.load().in_flight())
        .collect();
    let views: Vec<Arc<LocalView>> = {
        let mut views = state.views.lock();
        prune(&mut views);
        views.clone()
    };
    for view in views {
        let same = Arc::ptr_eq(&view.picker, picker);
        for i in 0..view.slots.len() {
            let n = view.in_flight(i);
            if n == 0 {
                continue;
            }
            let at = if same {
                Some(i)
            } else {
                picker.position(view.picker.backends()[i].id())
            };
            if let Some(slot) = at.and_then(|j| out.get_mut(j)) {
                *slot = slot.saturating_add(n);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use dlb::proto;

    use crate::{Client, ServiceHandle};

    fn snapshot(version: u64, algorithm: proto::Algorithm, ids: &[&str]) -> proto::ServiceUpdate {
        proto::ServiceUpdate {
            service: "s".into(),
            version: Some(proto::Version { epoch: 1, version }),
            full: true,
            policy: Some(proto::Policy {
                algorithm: algorithm as i32,
                ..Default::default()
            }),
            upserts: ids
                .iter()
                .map(|id| proto::Server {
                    server_id: (*id).into(),
                    address: "127.0.0.1:80".into(),
                    weight: 1,
                    health: proto::HealthStatus::Healthy as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    async fn offline() -> Client {
        let client = Client::builder(["http://127.0.0.1:9"])
            .wait_connected(false)
            .connect()
            .await
            .unwrap();
        client.close();
        client
    }

    fn in_flight(h: &ServiceHandle, id: &str) -> u64 {
        h.backends()
            .into_iter()
            .find(|b| b.server_id == id)
            .map_or(0, |b| b.in_flight)
    }

    fn live_views(h: &ServiceHandle) -> usize {
        let mut views = h.state.views.lock();
        super::prune(&mut views);
        views.len()
    }

    #[tokio::test]
    async fn per_thread_counts_are_summed_across_threads_and_generations() {
        let client = offline().await;
        let rr = proto::Algorithm::RoundRobin;
        let h = client.detached_service(&snapshot(1, rr, &["a"])).unwrap();
        // Round robin counts in the picking thread's view, not in the shared load.
        let g1 = h.get_next_server(None).unwrap();
        let g2 = h.get_next_server(None).unwrap();
        assert!(matches!(g1.call, crate::service::Held::Local(_)));
        let picker = h.state.snapshot.load().picker.clone().unwrap();
        assert_eq!(picker.backends()[0].load().in_flight(), 0);
        // Another thread picks through its own view.
        let h2 = h.clone();
        let g3 = std::thread::spawn(move || h2.get_next_server(None).unwrap())
            .join()
            .unwrap();
        assert_eq!(live_views(&h), 2);
        assert_eq!(in_flight(&h, "a"), 3);

        // A new generation (another backend added): the calls stay counted on "a".
        crate::session::apply_detached(&h.state, &snapshot(2, rr, &["a", "b"])).unwrap();
        assert_eq!(in_flight(&h, "a"), 3);
        assert_eq!(in_flight(&h, "b"), 0);
        let g4 = h.get_next_server(None).unwrap();
        assert_eq!(in_flight(&h, "a") + in_flight(&h, "b"), 4);

        // Guards end anywhere: on another thread, by outcome, by drop.
        std::thread::spawn(move || drop(g3)).join().unwrap();
        g1.success();
        assert_eq!(in_flight(&h, "a") + in_flight(&h, "b"), 2);
        drop(g2);
        drop(g4);
        assert!(h.backends().iter().all(|b| b.in_flight == 0));
        // Views of the first generation are gone: the other thread exited, and this thread
        // moved on to the second generation.
        assert_eq!(live_views(&h), 1);
        // The outcome was recorded in the backend's shared load.
        let picker = h.state.snapshot.load().picker.clone().unwrap();
        let a = picker.get("a").unwrap();
        assert_eq!(a.load().take_outcomes().successes, 1);
    }

    #[tokio::test]
    async fn alternate_services_and_swaps_pick_from_each_current_snapshot() {
        let client = offline().await;
        let rr = proto::Algorithm::RoundRobin;
        let maglev = proto::Algorithm::Maglev;
        let mut other = snapshot(1, maglev, &["x", "y"]);
        other.service = "t".into();
        let s = client.detached_service(&snapshot(1, rr, &["a"])).unwrap();
        let t = client.detached_service(&other).unwrap();
        // Alternate picks on one thread: each goes through its own service's view.
        let mut guards = Vec::new();
        for _ in 0..3 {
            let g = s.get_next_server(None).unwrap();
            assert_eq!(g.server_id(), "a");
            guards.push(g);
            let g = t.get_next_server(Some(b"k")).unwrap();
            assert!(matches!(g.call, crate::service::Held::Local(_)));
            assert!(["x", "y"].contains(&g.server_id()));
            guards.push(g);
        }
        assert_eq!(in_flight(&s, "a"), 3);
        assert_eq!(in_flight(&t, "x") + in_flight(&t, "y"), 3);
        // A swap of one service between two picks: its next picks are from the new snapshot
        // (round robin over both backends), the other service's view is untouched.
        crate::session::apply_detached(&s.state, &snapshot(2, rr, &["a", "b"])).unwrap();
        let mut ids = Vec::new();
        for _ in 0..2 {
            let g = s.get_next_server(None).unwrap();
            ids.push(g.server_id().to_owned());
            guards.push(g);
            let g = t.get_next_server(Some(b"k")).unwrap();
            assert!(["x", "y"].contains(&g.server_id()));
            guards.push(g);
        }
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(in_flight(&s, "a"), 4);
        assert_eq!(in_flight(&s, "b"), 1);
        assert_eq!(in_flight(&t, "x") + in_flight(&t, "y"), 5);
        drop(guards);
        assert!(s.backends().iter().all(|b| b.in_flight == 0));
        assert!(t.backends().iter().all(|b| b.in_flight == 0));
        // A service with no backend: the error (from the slow path), between two good picks.
        let mut none = snapshot(1, rr, &[]);
        none.service = "u".into();
        let u = client.detached_service(&none).unwrap();
        let g = s.get_next_server(None).unwrap();
        assert!(matches!(
            u.get_next_server(None),
            Err(crate::Error::NoBackend { .. })
        ));
        drop(g);
        assert!(s.get_next_server(None).is_ok());
        // A policy the picker counts (after a swap) is counted in the shared load.
        let p2c = proto::Algorithm::LeastConnP2c;
        crate::session::apply_detached(&s.state, &snapshot(3, p2c, &["a", "b"])).unwrap();
        let g = s.get_next_server(None).unwrap();
        assert!(matches!(g.call, crate::service::Held::Viewed(_)));
        assert_eq!(in_flight(&s, "a") + in_flight(&s, "b"), 1);
        drop(g);
        assert!(s.backends().iter().all(|b| b.in_flight == 0));
    }

    #[tokio::test]
    async fn policies_that_read_counts_count_in_the_shared_load() {
        let client = offline().await;
        let p2c = proto::Algorithm::LeastConnP2c;
        let h = client.detached_service(&snapshot(1, p2c, &["a"])).unwrap();
        let g = h.get_next_server(None).unwrap();
        assert!(matches!(g.call, crate::service::Held::Viewed(_)));
        let picker = h.state.snapshot.load().picker.clone().unwrap();
        assert_eq!(picker.backends()[0].load().in_flight(), 1);
        assert_eq!(in_flight(&h, "a"), 1);
        assert_eq!(live_views(&h), 0, "no per-thread counters to register");
        // Released in the picker's load after a swap too.
        crate::session::apply_detached(&h.state, &snapshot(2, p2c, &["a", "b"])).unwrap();
        drop(g);
        assert_eq!(picker.backends()[0].load().in_flight(), 0);
    }
}
