//! The shared state of one subscribed service and the per-thread views of it: what the
//! session task writes and the request path reads.
//!
//! * [`ServiceState`]: the published [`Snapshot`] (an `ArcSwap`), the version watch, the
//!   update counters ([`ServiceStats`]) and the registry of the threads' views;
//! * [`local`]: each thread's view of the snapshot, which the pick reads and counts its calls
//!   in, and [`local::in_flight`], which sums those counts (for load reports and
//!   `ServiceHandle::backends`).
//!
//! A leaf below both the handle (`service`: [`ServiceHandle`](crate::ServiceHandle) and the
//! pick) and the session task (`session`), so neither imports the other to reach the state
//! they share.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use dlb::balance::{Picker, StickyTable};
use dlb::proto;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

pub(crate) mod local;

use local::LocalView;

/// One state of one service: the store incarnation (`epoch`) and the per-service counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Version {
    /// Random identifier of the store incarnation; 0 means "no state".
    pub epoch: u64,
    /// Per-service counter, growing within an epoch.
    pub version: u64,
}

impl Version {
    /// Whether this version is `other` or a later one of the same epoch.
    pub fn reached(&self, other: &Version) -> bool {
        self.epoch == other.epoch && self.version >= other.version
    }
}

impl From<proto::Version> for Version {
    fn from(v: proto::Version) -> Self {
        Self {
            epoch: v.epoch,
            version: v.version,
        }
    }
}

impl From<Version> for proto::Version {
    fn from(v: Version) -> Self {
        Self {
            epoch: v.epoch,
            version: v.version,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{} (epoch {:x})", self.version, self.epoch)
    }
}

/// What a handle routes on. Immutable once published; replaced wholesale by the session task.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// The version the published picker was built from (may lag the session's bookkeeping
    /// version while a suspicious empty update is held back, see `stale`).
    pub(crate) version: Version,
    /// `None` until the first snapshot, and after an applied `ServiceNotFound`.
    pub(crate) picker: Option<Arc<Picker>>,
    /// The session-affinity table when the policy is sticky; lives across generations.
    pub(crate) sticky: Option<Arc<StickyTable>>,
    /// The policy the picker was built with.
    pub(crate) policy: Option<proto::Policy>,
    /// The circuit breakers of `picker`'s backends, when the policy has them.
    pub(crate) breakers: Option<Arc<crate::breaker::Breakers>>,
    /// The control plane said the service does not exist (and nothing is held).
    pub(crate) not_found: bool,
    /// Routing continues on an older snapshot because the control plane sent one that would
    /// have emptied the service from a different store incarnation (see the crate docs).
    pub(crate) stale: bool,
}

/// Counters describing how a handle's state was maintained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Full snapshots applied.
    pub full_updates: u64,
    /// Deltas applied.
    pub delta_updates: u64,
    /// Updates rejected (nacked), e.g. a delta whose base is not the held version.
    pub nacks: u64,
    /// `ServiceNotFound` answers received.
    pub not_found: u64,
    /// Updates that would have emptied the service from a new store incarnation and were held
    /// back (routing stayed on the previous snapshot).
    pub held_back: u64,
    /// Pickers built. Updates that arrive together are applied in one go and cost one build,
    /// so this grows slower than `full_updates + delta_updates` during bursts.
    pub rebuilds: u64,
    /// Times the service entered or left panic (see [`ServiceHandle::panic_state`](crate::ServiceHandle::panic_state)).
    pub panic_transitions: u64,
    /// Updates refused because they were older than the version routed on, in the same epoch
    /// (a control plane behind the one the client came from): the client left that control
    /// plane for another endpoint instead of going back in time.
    pub regressions_refused: u64,
}

#[derive(Debug, Default)]
pub(crate) struct StatsCounters {
    pub(crate) full_updates: AtomicU64,
    pub(crate) delta_updates: AtomicU64,
    pub(crate) nacks: AtomicU64,
    pub(crate) not_found: AtomicU64,
    pub(crate) held_back: AtomicU64,
    pub(crate) rebuilds: AtomicU64,
    pub(crate) panic_transitions: AtomicU64,
    pub(crate) regressions_refused: AtomicU64,
}

impl StatsCounters {
    /// The current values.
    pub(crate) fn read(&self) -> ServiceStats {
        ServiceStats {
            full_updates: self.full_updates.load(Ordering::Relaxed),
            delta_updates: self.delta_updates.load(Ordering::Relaxed),
            nacks: self.nacks.load(Ordering::Relaxed),
            not_found: self.not_found.load(Ordering::Relaxed),
            held_back: self.held_back.load(Ordering::Relaxed),
            rebuilds: self.rebuilds.load(Ordering::Relaxed),
            panic_transitions: self.panic_transitions.load(Ordering::Relaxed),
            regressions_refused: self.regressions_refused.load(Ordering::Relaxed),
        }
    }
}

/// Shared state of one subscribed service: written by the session task, read by handles.
#[derive(Debug)]
pub(crate) struct ServiceState {
    /// The service name (resolved: never empty).
    pub(crate) name: String,
    /// The published snapshot. `ArcSwap` because the request path must never block on the writer.
    pub(crate) snapshot: ArcSwap<Snapshot>,
    /// Notifies on every answer from the control plane (update or not-found); carries the
    /// published version.
    pub(crate) version_tx: watch::Sender<Version>,
    /// When the last update was applied; a `Mutex` because it is written once per update and
    /// read rarely (never on the pick path).
    pub(crate) last_update: Mutex<Option<Instant>>,
    /// Whether any answer (update or not-found) has arrived.
    pub(crate) answered: std::sync::atomic::AtomicBool,
    pub(crate) stats: StatsCounters,
    /// Grows after every publish, so a thread can tell with one load whether its view of the
    /// snapshot is current (see [`local`]).
    pub(crate) generation: AtomicU64,
    /// The per-thread views that count calls, to sum their counts: each is kept here while a
    /// thread picks through it or a call picked through it is in flight (see
    /// [`local`]). A `Mutex` because it is touched once per thread and generation (and
    /// by readers of in-flight counts), never on the pick path itself.
    pub(crate) views: Mutex<Vec<Arc<LocalView>>>,
    /// Time calls with tokio's clock instead of the TSC ([`crate::clock::CallClock`]); set once
    /// by the client when the service is created (an atomic because restored states are shared
    /// before the client sets it). Read with one relaxed load per pick.
    pub(crate) tokio_clock: std::sync::atomic::AtomicBool,
    /// The locality plan the session task applies (`None`: the picker is not grouped). Written
    /// at each rebuild and `GlobalLoad` push, read by [`crate::ServiceHandle::locality`] and
    /// the metrics; never on the pick path.
    pub(crate) locality: Mutex<Option<Arc<crate::locality::LocalityStatus>>>,
}

impl ServiceState {
    pub(crate) fn new(name: String) -> Self {
        Self {
            name,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            version_tx: watch::Sender::new(Version::default()),
            last_update: Mutex::new(None),
            answered: std::sync::atomic::AtomicBool::new(false),
            stats: StatsCounters::default(),
            generation: AtomicU64::new(0),
            views: Mutex::new(Vec::new()),
            tokio_clock: std::sync::atomic::AtomicBool::new(false),
            locality: Mutex::new(None),
        }
    }

    /// Publishes a snapshot and wakes version watchers.
    pub(crate) fn publish(&self, snapshot: Snapshot) {
        let version = snapshot.version;
        self.snapshot.store(Arc::new(snapshot));
        self.generation.fetch_add(1, Ordering::Release);
        *self.last_update.lock() = Some(Instant::now());
        self.answered.store(true, Ordering::Release);
        self.version_tx.send_replace(version);
    }
}
