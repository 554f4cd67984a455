//! The snapshot cache: one protocol-neutral view of every service, shared by every front-end.
//!
//! The cache follows the store ([`Cache::follow`]): it reads a snapshot at revision R, watches
//! from R + 1, applies each committed [`Change`] to its copy of the service, and on
//! [`WatchEvent::Compacted`] (or a store error) re-reads and starts again. Per service it keeps
//!
//! * the latest [`ServiceSnapshot`] (an `Arc`, replaced on change; an O(1) clone of the store's
//!   persistent map plus O(log n) per changed record),
//! * a bounded history of the last `history` changes, from which [`Cache::catch_up`] coalesces
//!   the delta a client holding some version needs (or answers with the full snapshot when the
//!   history no longer reaches back). It is bounded in bytes too: at most
//!   max([`MIN_HISTORY_BYTES`], the snapshot's own size) ([`Change::approx_bytes`]) — a delta
//!   that reaches further back would cost more than the full snapshot it replaces — so all
//!   histories together hold at most about the routing state itself plus 64 KiB per service,
//! * a memo per snapshot and per change where a front-end keeps its encoding of that update,
//!   so each update is encoded once and the bytes are shared by every session that sends it,
//!   and per snapshot the values other front-ends derive from it ([`Derived`]: the xDS
//!   resources), built once and shared by every stream that sends them,
//! * its watchers: [`Waker`]s of the sessions and builders that follow *this* service. A change
//!   wakes only them, and a woken watcher reads the newest state — so a burst of changes costs a
//!   slow watcher one coalesced catch-up, never a queue of stale deltas.
//!
//! **Entries come and go.** A slot exists while the store holds the service *or* someone
//! follows it (a session may follow a name that does not exist yet, to be told when it is
//! created). When the last follower of a name the store does not hold leaves
//! ([`Cache::unfollow_service`]), or a service without followers leaves the store, its slot is
//! dropped: a client asking for ever-new names cannot grow the cache beyond what it follows at
//! that moment (which each front-end bounds), and nothing stays after it is gone.
//!
//! [`follow`] holds the follower and publishes whether it is in step with the store
//! ([`Cache::synced`]).
//!
//! Catch-up logic (full vs delta, lagging watchers, compaction) lives only here: the DLB session
//! (`api::discovery`) and the xDS front-end are thin translations of [`Catchup`].
//!
//! Sync primitives: the map of slots is a `parking_lot::RwLock` (written only when a service
//! first appears, a watcher registers for an unknown one, or a slot is dropped; the lock order
//! is map, then slot); each slot's state is a
//! `parking_lot::Mutex` held for O(changed records) work, never across an `.await`. Wakers are
//! a dirty set plus a `tokio::sync::Notify` (a wake while the watcher is busy leaves one permit).

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

mod apply;
mod follow;
mod since;

pub use since::Behind;

use crate::store::{Change, ServiceSnapshot};

/// Default number of changes kept per service for delta catch-up.
pub const DEFAULT_HISTORY: usize = 1024;

/// How long a front-end waits for the cache to reach a version a client says it holds
/// ([`Catchup::Ahead`]) before it refuses the client with `UNAVAILABLE`.
pub const AHEAD_WAIT: Duration = Duration::from_secs(2);

/// Bytes of history ([`Change::approx_bytes`]) a service may always keep, however small its
/// snapshot; beyond it, at most as many bytes as the snapshot itself.
pub const MIN_HISTORY_BYTES: usize = 64 << 10;

/// A front-end's encoding of one update, computed by the first session that sends it and
/// shared by every other (see [`dlb::wire`]).
pub type Memo = Arc<OnceLock<Bytes>>;

/// How many values front-ends may derive from one snapshot ([`Derived`]).
pub const DERIVED: usize = 4;

/// Values derived from one snapshot by front-ends other than the DLB session (whose encoding is
/// [`Memo`]) — the xDS front-end's resources, one per type — each made once, by the first
/// stream that needs it, and shared by every other; they go with the snapshot
/// ([`Cache::get_derived`]). A front-end owns its indexes (below [`DERIVED`]).
///
/// The values of the snapshot this one replaced stay reachable ([`Derived::previous`]) until a
/// front-end lets them go ([`Derived::drop_previous`]) or the next snapshot comes: one
/// generation deep, so a front-end can carry over what did not change (per-node EDS re-encodes
/// only the backends whose records changed).
#[derive(Debug, Default)]
pub struct Derived {
    values: [OnceLock<Option<Arc<dyn Any + Send + Sync>>>; DERIVED],
    previous: Mutex<Option<Arc<Derived>>>,
}

impl Derived {
    /// The values of a new snapshot, after those of the one it replaced (`previous`).
    fn after(previous: Option<Arc<Derived>>) -> Self {
        if let Some(p) = &previous {
            // One generation deep: the previous one lets go of its own previous.
            p.previous.lock().take();
        }
        Self {
            values: Default::default(),
            previous: Mutex::new(previous),
        }
    }

    /// The value at `index` of the snapshot this one replaced, if it was made (and is a `T`).
    pub fn previous<T: Any + Send + Sync>(&self, index: usize) -> Option<Arc<T>> {
        let p = self.previous.lock().clone()?;
        let value = p.values.get(index)?.get()?.clone()?;
        value.downcast().ok()
    }

    /// The value at `index` if it was made (and is a `T`); never makes it.
    pub fn peek<T: Any + Send + Sync>(&self, index: usize) -> Option<Arc<T>> {
        let value = self.values.get(index)?.get()?.clone()?;
        value.downcast().ok()
    }

    /// Lets go of the previous snapshot's values.
    pub fn drop_previous(&self) {
        self.previous.lock().take();
    }

    /// The value at `index`, made by `make` the first time (a `None` from `make` is kept too);
    /// `None` for an index past [`DERIVED`] or a value of another type than `T`.
    pub fn get_or_init<T: Any + Send + Sync>(
        &self,
        index: usize,
        make: impl FnOnce() -> Option<T>,
    ) -> Option<Arc<T>> {
        let cell = self.values.get(index)?;
        let value = cell
            .get_or_init(|| make().map(|v| Arc::new(v) as Arc<dyn Any + Send + Sync>))
            .clone()?;
        value.downcast().ok()
    }
}

/// What a watcher holding some version of a service must receive to be up to date.
#[derive(Debug, Clone)]
pub enum Catchup {
    /// Replace everything with this snapshot.
    Full {
        /// The snapshot.
        snapshot: Arc<ServiceSnapshot>,
        /// The shared encoding of this snapshot as a full update.
        encoded: Memo,
    },
    /// Apply the changes from `base` to `version` (coalesce them with [`Delta::coalesce`](crate::store::Delta::coalesce)).
    Delta {
        /// The version the watcher holds.
        base: u64,
        /// The version after the delta.
        version: u64,
        /// The changes, consecutive, oldest first.
        changes: Vec<Arc<Change>>,
        /// When the cache received the newest change included (for the push-latency metric).
        at: Instant,
        /// The shared encoding, when the delta is exactly one change (the common case: a
        /// watcher that keeps up); `None` for a coalesced delta.
        encoded: Option<Memo>,
    },
    /// The watcher is already at the current version.
    Current,
    /// The watcher says it holds a version newer than this cache's (same epoch): the cache is
    /// behind the store the client last saw. Never answered with the older state: the front-end
    /// waits for the cache ([`Cache::wait_for_revision`] of `known`, at most
    /// [`AHEAD_WAIT`]) and asks again, else refuses with `UNAVAILABLE` so the client tries
    /// another replica.
    Ahead {
        /// The version the watcher holds.
        known: u64,
        /// The cache's version of the service.
        current: u64,
    },
    /// The service does not exist.
    NotFound,
}

/// One change in a service's history.
#[derive(Debug)]
struct Entry {
    change: Arc<Change>,
    at: Instant,
    encoded: Memo,
}

/// A watcher's wake-up handle: the services that changed since it last looked, and a
/// notification. Register it with [`Cache::follow_service`].
#[derive(Debug)]
pub struct Waker {
    id: u64,
    dirty: Mutex<Vec<Arc<str>>>,
    notify: Notify,
    wakeups: AtomicU64,
}

impl Waker {
    /// Marks `service` dirty and wakes the watcher (the cache calls it on every change of a
    /// followed service; a front-end may call it to schedule its own catch-up).
    pub fn wake(&self, service: &Arc<str>) {
        {
            let mut dirty = self.dirty.lock();
            if dirty.iter().any(|s| s == service) {
                return;
            }
            dirty.push(service.clone());
        }
        self.wakeups.fetch_add(1, Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// Waits until some followed service changed.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// The services that changed since the last call (each once).
    pub fn take_dirty(&self) -> Vec<Arc<str>> {
        std::mem::take(&mut *self.dirty.lock())
    }

    /// How many times this watcher was woken (a service became dirty).
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }

    /// The watcher's id.
    pub fn id(&self) -> u64 {
        self.id
    }
}

#[derive(Debug, Default)]
struct SlotState {
    snapshot: Option<Arc<ServiceSnapshot>>,
    /// About the bytes of `snapshot`'s records ([`record_bytes`]), kept up to date by `apply`.
    snapshot_bytes: usize,
    /// The shared encoding of `snapshot` as a full update (replaced with the snapshot).
    full: Memo,
    /// What front-ends derived from `snapshot` (made on first use, dropped with the snapshot).
    derived: Option<Arc<Derived>>,
    /// What front-ends derived from the snapshot `snapshot` replaced, handed to the next
    /// [`Derived`] made ([`Derived::previous`]).
    retired: Option<Arc<Derived>>,
    history: VecDeque<Arc<Entry>>,
    /// Sum of [`Change::approx_bytes`] over `history`.
    history_bytes: usize,
    watchers: HashMap<u64, Arc<Waker>>,
    /// The slot was removed from the map (no snapshot, no watcher): whoever still holds it
    /// must look the name up again.
    dropped: bool,
}

impl SlotState {
    /// A new snapshot replaces the one `derived` was made from (or the service goes: `gone`).
    fn retire_derived(&mut self, gone: bool) {
        if gone {
            self.derived = None;
            self.retired = None;
        } else if let Some(d) = self.derived.take() {
            self.retired = Some(d);
        }
    }

    /// Forgets the history.
    fn clear_history(&mut self) {
        self.history.clear();
        self.history_bytes = 0;
    }

    /// Whether nothing keeps this slot: the store does not hold the service, nobody follows it.
    fn unused(&self) -> bool {
        self.snapshot.is_none() && self.watchers.is_empty()
    }
}

#[derive(Debug)]
struct Slot {
    name: Arc<str>,
    state: Mutex<SlotState>,
}

impl Slot {
    fn wake_all(&self, st: &SlotState) {
        for w in st.watchers.values() {
            w.wake(&self.name);
        }
    }
}

/// The cache. See the module docs.
#[derive(Debug)]
pub struct Cache {
    epoch: u64,
    history: usize,
    slots: RwLock<HashMap<Arc<str>, Arc<Slot>>>,
    /// The newest store revision applied.
    revision: watch::Sender<u64>,
    /// Bumped whenever a service appears (for the builder manager).
    services: watch::Sender<u64>,
    /// Whether the follower is in step with the store (see [`follow`]): `true` while it
    /// watches after a successful load, `false` before the first load and while it re-reads.
    synced: watch::Sender<bool>,
    next_waker: AtomicU64,
}

impl Cache {
    /// An empty cache for a store of `epoch`, keeping `history` changes per service.
    pub fn new(epoch: u64, history: usize) -> Self {
        Self {
            epoch,
            history: history.max(1),
            slots: RwLock::new(HashMap::new()),
            revision: watch::Sender::new(0),
            services: watch::Sender::new(0),
            synced: watch::Sender::new(false),
            next_waker: AtomicU64::new(1),
        }
    }

    /// The store epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The newest store revision applied.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Waits until the cache has applied `revision` (or `limit` passes); returns whether it has.
    pub async fn wait_for_revision(&self, revision: u64, limit: Duration) -> bool {
        let mut rx = self.revision.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// A receiver of the newest store revision applied (it changes with every change).
    pub fn revisions(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// A receiver of whether the follower is in step with the store ([`Cache::follow`]):
    /// `false` until the first load and whenever the store's watch failed and the cache is
    /// re-reading (the readiness of a replica is derived from it: the `readiness` module).
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// A receiver that changes whenever a new service appears.
    pub fn services_changed(&self) -> watch::Receiver<u64> {
        self.services.subscribe()
    }

    /// Names of the services that exist.
    pub fn service_names(&self) -> Vec<Arc<str>> {
        self.slots
            .read()
            .values()
            .filter(|s| s.state.lock().snapshot.is_some())
            .map(|s| s.name.clone())
            .collect()
    }

    /// The newest snapshot of a service.
    pub fn get(&self, service: &str) -> Option<Arc<ServiceSnapshot>> {
        let slot = self.slots.read().get(service).cloned()?;
        let snap = slot.state.lock().snapshot.clone();
        snap
    }

    /// The newest snapshot of a service, with what front-ends derived from it ([`Derived`]).
    pub fn get_derived(&self, service: &str) -> Option<(Arc<ServiceSnapshot>, Arc<Derived>)> {
        let slot = self.slots.read().get(service).cloned()?;
        let mut st = slot.state.lock();
        let snap = st.snapshot.clone()?;
        if st.derived.is_none() {
            let retired = st.retired.take();
            st.derived = Some(Arc::new(Derived::after(retired)));
        }
        let derived = st.derived.clone()?;
        Some((snap, derived))
    }

    /// Like [`Cache::get_derived`], but only when a front-end already derived something from
    /// the newest snapshot (never makes the [`Derived`] values).
    pub fn derived_if_made(&self, service: &str) -> Option<(Arc<ServiceSnapshot>, Arc<Derived>)> {
        let slot = self.slots.read().get(service).cloned()?;
        let st = slot.state.lock();
        Some((st.snapshot.clone()?, st.derived.clone()?))
    }

    /// A new watcher handle (not yet following anything).
    pub fn waker(&self) -> Arc<Waker> {
        Arc::new(Waker {
            id: self.next_waker.fetch_add(1, Ordering::Relaxed),
            dirty: Mutex::new(Vec::new()),
            notify: Notify::new(),
            wakeups: AtomicU64::new(0),
        })
    }

    /// Number of entries (services the store holds plus names only followed): what a client
    /// following names can make the cache keep.
    pub fn entries(&self) -> usize {
        self.slots.read().len()
    }

    /// Runs `f` on the slot of `service` (created if missing) under its lock, never on a slot
    /// that was dropped from the map meanwhile.
    fn with_slot<R>(&self, service: &str, f: impl FnOnce(&Slot, &mut SlotState) -> R) -> R {
        loop {
            let slot = self.slot(service);
            let mut st = slot.state.lock();
            if st.dropped {
                continue;
            }
            return f(&slot, &mut st);
        }
    }

    /// Drops the slot of `service` if nothing keeps it (see [`SlotState::unused`]).
    fn release(&self, service: &str) {
        let mut slots = self.slots.write();
        let Some(slot) = slots.get(service).cloned() else {
            return;
        };
        let mut st = slot.state.lock();
        if st.unused() {
            st.dropped = true;
            slots.remove(service);
        }
    }

    fn slot(&self, service: &str) -> Arc<Slot> {
        if let Some(s) = self.slots.read().get(service) {
            return s.clone();
        }
        self.slots
            .write()
            .entry(service.into())
            .or_insert_with(|| {
                Arc::new(Slot {
                    name: service.into(),
                    state: Mutex::new(SlotState::default()),
                })
            })
            .clone()
    }

    /// Wakes `waker` whenever `service` changes (whether or not it exists yet). A name the
    /// store does not hold keeps an entry only while someone follows it: front-ends validate
    /// names ([`dlb::model::validate_id`]) and bound how many each client follows.
    pub fn follow_service(&self, service: &str, waker: &Arc<Waker>) {
        self.with_slot(service, |_, st| {
            st.watchers.insert(waker.id, waker.clone());
        });
    }

    /// Wakes every follower of `service` without a change of its snapshot: for a front-end
    /// whose derived value changed from inputs outside the store (per-node EDS re-planned on
    /// new zone demand or load). A follower that finds nothing new sends nothing.
    pub fn wake_followers(&self, service: &str) {
        let slot = self.slots.read().get(service).cloned();
        if let Some(slot) = slot {
            let st = slot.state.lock();
            slot.wake_all(&st);
        }
    }

    /// Stops waking `waker` for `service`; the last follower of a name the store does not hold
    /// drops its entry.
    pub fn unfollow_service(&self, service: &str, waker: &Waker) {
        let slot = self.slots.read().get(service).cloned();
        if let Some(slot) = slot {
            let unused = {
                let mut st = slot.state.lock();
                st.watchers.remove(&waker.id);
                st.unused()
            };
            if unused {
                self.release(service);
            }
        }
    }

    /// What a watcher holding `known` (a version of this cache's epoch; `None` for nothing)
    /// must receive. O(changes since `known` × records touched) for a delta. A `known` newer
    /// than the cache's version is [`Catchup::Ahead`], never an older snapshot; a `known`
    /// the service does not reach (the client saw it at a revision this cache has not applied)
    /// is `Ahead` too when the service does not exist here yet.
    pub fn catch_up(&self, service: &str, known: Option<u64>) -> Catchup {
        // Not here, but the client saw it at a revision this cache has not applied yet.
        let missing = || match known {
            Some(k) if k > self.revision() => Catchup::Ahead {
                known: k,
                current: 0,
            },
            _ => Catchup::NotFound,
        };
        let Some(slot) = self.slots.read().get(service).cloned() else {
            return missing();
        };
        let st = slot.state.lock();
        let Some(snap) = &st.snapshot else {
            drop(st);
            return missing();
        };
        let current = snap.version.version;
        let full = || Catchup::Full {
            snapshot: snap.clone(),
            encoded: st.full.clone(),
        };
        let Some(known) = known.filter(|&k| k != 0) else {
            return full();
        };
        if known == current {
            return Catchup::Current;
        }
        if known > current {
            // Never send a client a state older than the one it holds (same epoch).
            return Catchup::Ahead { known, current };
        }
        // The first change newer than `known` must start exactly at `known`.
        let idx = st.history.partition_point(|e| e.change.version <= known);
        match st.history.get(idx) {
            Some(first) if first.change.base == known => {
                let changes: Vec<Arc<Change>> =
                    st.history.range(idx..).map(|e| e.change.clone()).collect();
                let last = st.history.back().unwrap_or(first);
                Catchup::Delta {
                    base: known,
                    version: current,
                    encoded: (changes.len() == 1).then(|| first.encoded.clone()),
                    changes,
                    at: last.at,
                }
            }
            _ => full(),
        }
    }
}

#[cfg(test)]
impl Cache {
    /// The number of changes and their bytes in a service's history.
    fn history_size(&self, service: &str) -> (usize, usize) {
        let slot = self.slots.read().get(service).cloned();
        slot.map_or((0, 0), |s| {
            let st = s.state.lock();
            (st.history.len(), st.history_bytes)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Delta, MemoryStore, Mutation, Store, WatchEvent};
    use dlb::proto;

    fn server(id: &str) -> proto::Server {
        proto::Server {
            server_id: id.into(),
            address: "10.0.0.1:80".into(),
            weight: 1,
            ..Default::default()
        }
    }

    async fn started(
        history: usize,
    ) -> (
        Arc<MemoryStore>,
        Arc<Cache>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let store = Arc::new(MemoryStore::default());
        let cache = Arc::new(Cache::new(store.epoch(), history));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let s: Arc<dyn Store> = store.clone();
        tokio::spawn(cache.clone().follow(s, None, async move {
            let _ = rx.await;
        }));
        (store, cache, tx)
    }

    async fn add(store: &MemoryStore, cache: &Cache, service: &str, id: &str) -> u64 {
        let a = store
            .apply(service.into(), vec![Mutation::Add(server(id))], None)
            .await
            .expect("add");
        assert!(
            cache
                .wait_for_revision(a.version.version, Duration::from_secs(5))
                .await
        );
        a.version.version
    }

    #[tokio::test]
    async fn a_watcher_of_a_is_not_woken_by_b() {
        let (store, cache, _stop) = started(16).await;
        let wa = cache.waker();
        let wb = cache.waker();
        cache.follow_service("a", &wa);
        cache.follow_service("b", &wb);
        for i in 0..20 {
            add(&store, &cache, "b", &format!("b{i}")).await;
        }
        assert_eq!(wa.wakeups(), 0, "a's watcher was woken by writes to b");
        assert!(wa.take_dirty().is_empty());
        assert!(wb.wakeups() >= 1);
        assert_eq!(wb.take_dirty(), vec![Arc::<str>::from("b")]);
        add(&store, &cache, "a", "a0").await;
        assert_eq!(wa.wakeups(), 1);
        cache.unfollow_service("a", &wa);
        add(&store, &cache, "a", "a1").await;
        assert_eq!(wa.wakeups(), 1, "an unfollowed watcher was woken");
        // A front-end's own wake-up (no new snapshot) reaches only the service's followers.
        wb.take_dirty();
        let before = wb.wakeups();
        cache.wake_followers("b");
        cache.wake_followers("a");
        assert_eq!(wb.wakeups(), before + 1);
        assert_eq!(wb.take_dirty(), vec![Arc::<str>::from("b")]);
        assert_eq!(wa.wakeups(), 1);
    }

    #[tokio::test]
    async fn derived_values_are_made_once_per_snapshot_and_go_with_it() {
        let (store, cache, _stop) = started(16).await;
        add(&store, &cache, "s", "a").await;
        let made = AtomicU64::new(0);
        let make = |v: u32| {
            made.fetch_add(1, Ordering::Relaxed);
            Some(v)
        };
        assert!(cache.derived_if_made("s").is_none(), "nothing derived yet");
        let (snap, d) = cache.get_derived("s").expect("exists");
        let first = d.get_or_init(0, || make(1)).expect("made");
        let (_, peeked) = cache.derived_if_made("s").expect("made now");
        assert_eq!(peeked.peek::<u32>(0).as_deref(), Some(&1));
        assert!(peeked.peek::<u32>(1).is_none(), "never made");
        let (again, d) = cache.get_derived("s").expect("exists");
        assert!(Arc::ptr_eq(&snap, &again));
        let second = d.get_or_init(0, || make(2)).expect("kept");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(made.load(Ordering::Relaxed), 1);
        // Another type at the same index, or an index past the end: nothing.
        assert!(d.get_or_init(0, || Some("x")).is_none());
        assert!(d.get_or_init(DERIVED, || make(3)).is_none());
        // A new snapshot starts empty, with the previous one's values reachable.
        add(&store, &cache, "s", "b").await;
        assert!(
            cache.derived_if_made("s").is_none(),
            "the new snapshot has none"
        );
        let (_, d) = cache.get_derived("s").expect("exists");
        assert_eq!(d.previous::<u32>(0).as_deref(), Some(&1));
        assert!(d.previous::<&str>(0).is_none(), "another type");
        assert_eq!(d.get_or_init(0, || make(4)).as_deref(), Some(&4));
        // One generation deep: the next snapshot's previous is this one, which let go of its own.
        add(&store, &cache, "s", "c").await;
        let (_, d3) = cache.get_derived("s").expect("exists");
        assert_eq!(d3.previous::<u32>(0).as_deref(), Some(&4));
        assert!(d.previous::<u32>(0).is_none());
        d3.drop_previous();
        assert!(d3.previous::<u32>(0).is_none());
        assert!(cache.get_derived("nope").is_none());
    }

    #[tokio::test]
    async fn an_entry_for_a_name_nobody_holds_goes_with_its_last_follower() {
        let (store, cache, _stop) = started(16).await;
        add(&store, &cache, "real", "r0").await;
        let base = cache.entries();
        let (w1, w2) = (cache.waker(), cache.waker());
        for i in 0..100 {
            cache.follow_service(&format!("ghost-{i}"), &w1);
        }
        cache.follow_service("ghost-0", &w2);
        cache.follow_service("real", &w1);
        assert_eq!(cache.entries(), base + 100);
        for i in 0..100 {
            cache.unfollow_service(&format!("ghost-{i}"), &w1);
        }
        // ghost-0 is still followed by w2; the real service stays whoever follows it.
        assert_eq!(cache.entries(), base + 1);
        cache.unfollow_service("ghost-0", &w2);
        cache.unfollow_service("real", &w1);
        assert_eq!(cache.entries(), base);
        assert!(cache.get("real").is_some());
        // A follower of a name that is created later still hears of it, and the entry stays.
        cache.follow_service("later", &w2);
        add(&store, &cache, "later", "l0").await;
        assert_eq!(w2.take_dirty(), vec![Arc::<str>::from("later")]);
        cache.unfollow_service("later", &w2);
        assert!(cache.get("later").is_some());
        assert_eq!(cache.entries(), base + 1);
    }

    #[tokio::test]
    async fn per_service_history_is_bounded_in_bytes() {
        let (store, cache, _stop) = started(1024).await;
        let big = |i: usize| {
            let mut s = server("b");
            s.metadata = (0..32)
                .map(|k| (format!("k{k}"), format!("{i:0>200}")))
                .collect();
            s
        };
        let first = add(&store, &cache, "s", "a").await;
        let mut last = 0;
        for i in 0..100 {
            last = store
                .apply("s".into(), vec![Mutation::Declare(big(i))], None)
                .await
                .expect("write")
                .version
                .version;
        }
        assert!(cache.wait_for_revision(last, Duration::from_secs(5)).await);
        let (len, bytes) = cache.history_size("s");
        // About 7 KB per change: 100 changes would be 700 KB; the snapshot is one record.
        assert!(len < 20, "{len} changes kept");
        assert!(
            bytes <= MIN_HISTORY_BYTES + (16 << 10),
            "{bytes} bytes kept"
        );
        assert!(matches!(
            cache.catch_up("s", Some(first)),
            Catchup::Full { .. }
        ));
    }

    #[tokio::test]
    async fn catch_up_coalesces_and_falls_back_to_full() {
        let (store, cache, _stop) = started(4).await;
        let v1 = add(&store, &cache, "s", "a").await;
        // Another service's write in between: versions are revisions, not +1.
        add(&store, &cache, "t", "x").await;
        let v2 = add(&store, &cache, "s", "b").await;
        assert!(v2 > v1 + 1);
        match cache.catch_up("s", Some(v1)) {
            Catchup::Delta { changes, .. } => {
                let delta = Delta::coalesce(v1, changes.iter().map(|c| &**c));
                assert_eq!((delta.base, delta.version), (v1, v2));
                assert_eq!(delta.upserts.len(), 1);
                assert_eq!(delta.upserts[0].server_id, "b");
            }
            other => panic!("expected a delta, got {other:?}"),
        }
        assert!(matches!(cache.catch_up("s", Some(v2)), Catchup::Current));
        // A version that never existed for this service (another service's revision).
        assert!(matches!(
            cache.catch_up("s", Some(v1 + 1)),
            Catchup::Full { .. }
        ));
        assert!(matches!(cache.catch_up("s", None), Catchup::Full { .. }));
        assert!(matches!(cache.catch_up("nope", None), Catchup::NotFound));
        // A client ahead of the cache (it saw a newer state elsewhere) is never answered
        // with the older snapshot.
        assert!(matches!(
            cache.catch_up("s", Some(v2 + 10)),
            Catchup::Ahead { known, current } if known == v2 + 10 && current == v2
        ));
        assert!(matches!(
            cache.catch_up("nope", Some(cache.revision() + 1)),
            Catchup::Ahead { current: 0, .. }
        ));
        // A service gone at a revision the cache has applied: not found.
        assert!(matches!(
            cache.catch_up("nope", Some(v1)),
            Catchup::NotFound
        ));
        // Past the history (4 changes): full.
        for i in 0..6 {
            add(&store, &cache, "s", &format!("c{i}")).await;
        }
        assert!(matches!(
            cache.catch_up("s", Some(v2)),
            Catchup::Full { .. }
        ));
    }

    #[tokio::test]
    async fn follows_through_compaction() {
        use futures::StreamExt;
        // A store that remembers 2 changes.
        let store = Arc::new(MemoryStore::new(2));
        let cache = Arc::new(Cache::new(store.epoch(), 16));
        let s: Arc<dyn Store> = store.clone();
        let follow = |from: Option<u64>| {
            let (stop, rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(cache.clone().follow(s.clone(), from, async move {
                let _ = rx.await;
            }));
            (stop, task)
        };
        // Live: b0..b2 are replayed from the watch, one change each.
        let (stop, task) = follow(None);
        let first = add(&store, &cache, "s", "b0").await;
        add(&store, &cache, "s", "b1").await;
        let held = add(&store, &cache, "s", "b2").await;
        assert!(matches!(
            cache.catch_up("s", Some(first)),
            Catchup::Delta { changes, .. } if changes.len() == 2
        ));
        // The cache stops reading (as while its etcd link is down) and a burst larger than the
        // store's history is written: b0 removed, b3..b9 added.
        stop.send(()).expect("follower running");
        task.await.expect("follower ended");
        let mut last = store
            .apply("s".into(), vec![Mutation::Remove("b0".into())], None)
            .await
            .expect("remove")
            .version
            .version;
        for i in 3..10 {
            last = store
                .apply(
                    "s".into(),
                    vec![Mutation::Add(server(&format!("b{i}")))],
                    None,
                )
                .await
                .expect("add")
                .version
                .version;
        }
        // The changes after what the cache holds are gone from the store: a real compaction.
        match store.watch(held + 1).next().await {
            Some(Ok(WatchEvent::Compacted { compacted })) => assert!(compacted > held),
            other => panic!("expected Compacted, got {other:?}"),
        }
        assert_eq!(cache.get("s").expect("exists").servers.len(), 3);
        // The follower resumes right after what the cache holds: compacted, so it re-reads.
        let (_stop, _task) = follow(Some(held));
        assert!(
            cache.wait_for_revision(last, Duration::from_secs(30)).await,
            "the cache never caught up after the compaction"
        );
        let snap = cache.get("s").expect("exists");
        let mut ids: Vec<&str> = snap.servers.keys().map(|k| &**k).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9"]);
        assert_eq!(snap.version.version, last);
        // And it watches again: the next writes are replayed as changes, not re-read.
        let y = add(&store, &cache, "s", "y").await;
        let z = add(&store, &cache, "s", "z").await;
        match cache.catch_up("s", Some(last)) {
            Catchup::Delta { changes, .. } => {
                let versions: Vec<u64> = changes.iter().map(|c| c.version).collect();
                assert_eq!(versions, [y, z]);
            }
            other => panic!("expected a delta after the re-read, got {other:?}"),
        }
        assert_eq!(cache.get("s").expect("exists").servers.len(), 11);
    }
}
