//! Per-service routing state and the request-path API: [`ServiceHandle`] and [`CallGuard`].
//! The pick itself (`ServiceHandle::get_next_server` and what it dispatches to) is in
//! [`crate::pick`].
//!
//! The session task (see [`crate::session`]) is the only writer of a service's state: it applies
//! updates from the control plane, builds the next [`Picker`] with [`Picker::rebuild`] (so
//! in-flight counts carry over by backend id; one build for a burst of updates) and publishes an
//! immutable [`Snapshot`] through an `ArcSwap`. The request path picks from that snapshot: no
//! lock, no await, O(1) for every algorithm the picker offers (plus one `StickyTable` lookup
//! when the policy is sticky).
//!
//! What a pick writes: each thread picks through its own view of the snapshot (see
//! [`crate::local`]) and its [`CallGuard`] keeps that view's picker, not the shared snapshot,
//! alive. So round robin and the hashing policies without bounded load write only memory of
//! the picking thread (the view's in-flight counter for the picked backend, which is also what
//! keeps the picker alive for the guard). The
//! policies that read in-flight counts to pick (least connections, bounded load) also write
//! what they read: the backends' shared counts (and bounded load's total, and exact least
//! connections' tree).
//!
//! Call outcomes are counted in the backend's [`dlb::balance::BackendLoad`] (atomics carried
//! across picker generations by backend id), which the session task drains into periodic load
//! reports.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use dlb::balance::{Backend, OwnedPick, Picker, StickyTable};
use dlb::proto;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::admin::{NewServer, ServerUpdate};
use crate::error::{Error, Result};
use crate::local::{self, LocalCall, LocalView, ViewRef};
use crate::Client;

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
    /// Times the service entered or left panic (see [`ServiceHandle::panic_state`]).
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
    /// snapshot is current (see [`crate::local`]).
    pub(crate) generation: AtomicU64,
    /// The per-thread views that count calls, to sum their counts: each is kept here while a
    /// thread picks through it or a call picked through it is in flight (see
    /// [`crate::local`]). A `Mutex` because it is touched once per thread and generation (and
    /// by readers of in-flight counts), never on the pick path itself.
    pub(crate) views: Mutex<Vec<Arc<LocalView>>>,
    /// Time calls with tokio's clock instead of the TSC ([`crate::clock::CallClock`]); set once
    /// by the client when the service is created (an atomic because restored states are shared
    /// before the client sets it). Read with one relaxed load per pick.
    pub(crate) tokio_clock: std::sync::atomic::AtomicBool,
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

/// A local view of one backend, from the handle's current snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// Backend id.
    pub server_id: String,
    /// `host:port`.
    pub address: String,
    /// Weight.
    pub weight: u32,
    /// Whether it receives new picks (healthy and not draining).
    pub eligible: bool,
    /// Calls in flight from this process.
    pub in_flight: u64,
    /// Calls in flight from the other SDKs, as last pushed by the control plane (global least
    /// connections).
    pub others_in_flight: u64,
}

/// A subscription to one service: picks locally from the latest snapshot, and offers the admin
/// calls on that service. Cheap to clone; the subscription lives as long as the client.
#[derive(Debug, Clone)]
pub struct ServiceHandle {
    pub(crate) state: Arc<ServiceState>,
    pub(crate) client: Client,
}

impl ServiceHandle {
    /// The service name.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// This SDK's circuit-breaker state per backend (empty when the policy has no breaker).
    pub fn circuit_states(&self) -> Vec<(String, dlb::circuit::State)> {
        let snap = self.state.snapshot.load();
        let (Some(picker), Some(b)) = (&snap.picker, &snap.breakers) else {
            return Vec::new();
        };
        picker
            .backends()
            .iter()
            .enumerate()
            .filter_map(|(i, be)| Some((be.id().to_owned(), b.state(i)?)))
            .collect()
    }

    /// Closed → open transitions of this service's breakers in this SDK.
    pub fn circuit_trips(&self) -> u64 {
        self.state
            .snapshot
            .load()
            .breakers
            .as_ref()
            .map_or(0, |b| b.trips.load(Ordering::Relaxed))
    }

    /// The version the handle currently routes on (`epoch` 0 before the first snapshot).
    pub fn version(&self) -> Version {
        self.state.snapshot.load().version
    }

    /// A watch receiver that changes every time the control plane answers for this service
    /// (an applied update or a not-found); its value is the published version.
    pub fn changed(&self) -> watch::Receiver<Version> {
        self.state.version_tx.subscribe()
    }

    /// Waits until the handle routes on `target` or a later version of the same epoch, and
    /// returns the version reached. Never times out by itself: wrap it in
    /// `tokio::time::timeout`.
    pub async fn wait_for_version(&self, target: Version) -> Result<Version> {
        let mut rx = self.state.version_tx.subscribe();
        let v = rx
            .wait_for(|v| v.reached(&target))
            .await
            .map_err(|_| Error::Closed)?;
        Ok(*v)
    }

    /// Whether the client's session with the control plane is up.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// Time since the last update was applied (`None` before the first one). Grows while the
    /// control plane is unreachable: the handle keeps routing on its last snapshot.
    pub fn last_update_age(&self) -> Option<Duration> {
        self.state.last_update.lock().map(|t| t.elapsed())
    }

    /// Whether routing continues on an older snapshot because a suspicious emptying update was
    /// held back.
    pub fn is_stale(&self) -> bool {
        self.state.snapshot.load().stale
    }

    /// Counters of applied, rejected and held-back updates, and of picker builds.
    pub fn stats(&self) -> ServiceStats {
        self.state.stats.read()
    }

    /// The backends of the current snapshot, in server-id order.
    pub fn backends(&self) -> Vec<BackendInfo> {
        let snap = self.state.snapshot.load();
        let Some(picker) = &snap.picker else {
            return Vec::new();
        };
        let in_flight = local::in_flight(&self.state, picker);
        picker
            .backends()
            .iter()
            .zip(in_flight)
            .map(|(b, in_flight)| BackendInfo {
                server_id: b.id().to_owned(),
                address: b.address().to_owned(),
                weight: b.weight(),
                eligible: b.is_eligible(),
                in_flight,
                others_in_flight: b.load().baseline(),
            })
            .collect()
    }

    /// The panic state of the current snapshot (`None` before the first one): decided by the
    /// picker from the records, identically in every SDK and in `dlbd`.
    pub fn panic_state(&self) -> Option<dlb::balance::PanicState> {
        self.state
            .snapshot
            .load()
            .picker
            .as_ref()
            .map(|p| p.panic_state())
    }

    /// The policy of the current snapshot (`None` before the first one).
    pub fn local_policy(&self) -> Option<proto::Policy> {
        self.state.snapshot.load().policy.clone()
    }

    /// The call-path settings of the current snapshot's policy, defaults applied: retries,
    /// hedging and the retry budget ([`dlb::call::call_config`]; `None` before the first
    /// snapshot). Every SDK reads the same policy from the control plane.
    pub fn call_config(&self) -> Option<dlb::call::CallConfig> {
        self.state
            .snapshot
            .load()
            .policy
            .as_ref()
            .map(dlb::call::call_config)
    }

    /// `AddServer` on this service.
    pub async fn add_server(
        &self,
        server_id: &str,
        address: &str,
        weight: u32,
    ) -> Result<proto::ServerResponse> {
        self.add_server_with(NewServer::new(server_id, address).weight(weight))
            .await
    }

    /// `AddServer` on this service with every field.
    pub async fn add_server_with(&self, server: NewServer) -> Result<proto::ServerResponse> {
        self.client.admin().add_server(self.name(), server).await
    }

    /// `RemoveServer` on this service.
    pub async fn remove_server(&self, server_id: &str) -> Result<proto::RemoveServerResponse> {
        self.client
            .admin()
            .remove_server(self.name(), server_id)
            .await
    }

    /// `UpdateServer` on this service.
    pub async fn update_server(&self, update: ServerUpdate) -> Result<proto::ServerResponse> {
        self.client.admin().update_server(self.name(), update).await
    }

    /// `HealthCheckPassed` on this service.
    pub async fn health_check_passed(&self, server_id: &str) -> Result<proto::ServerResponse> {
        self.client
            .admin()
            .health_check_passed(self.name(), server_id)
            .await
    }

    /// `HealthCheckFailed` on this service.
    pub async fn health_check_failed(&self, server_id: &str) -> Result<proto::ServerResponse> {
        self.client
            .admin()
            .health_check_failed(self.name(), server_id)
            .await
    }

    /// `ListServers` on this service (the control plane's view; see [`ServiceHandle::backends`]
    /// for the local one).
    pub async fn list_servers(&self) -> Result<proto::ListServersResponse> {
        self.client.admin().list_servers(self.name()).await
    }

    /// `GetPolicy` on this service.
    pub async fn get_policy(&self) -> Result<proto::Policy> {
        let r = self.client.admin().get_policy(self.name()).await?;
        Ok(r.policy.unwrap_or_default())
    }

    /// `SetPolicy` on this service.
    pub async fn set_policy(&self, policy: proto::Policy) -> Result<proto::PolicyResponse> {
        self.client.admin().set_policy(self.name(), policy).await
    }

    /// `GetNextServer` on this service: a server-side pick (one round trip; prefer
    /// [`ServiceHandle::get_next_server`]).
    pub async fn get_next_server_remote(
        &self,
        key: Option<&[u8]>,
    ) -> Result<proto::GetNextServerResponse> {
        self.client.admin().get_next_server(self.name(), key).await
    }
}

/// One call in flight to a picked backend. `'static` and `Send`: hold it across `.await`.
///
/// Consume it with [`CallGuard::success`] or [`CallGuard::failure`] to record the outcome and
/// latency for the next load report. Dropping it without either ends the in-flight call and
/// records **neither** outcome (a cancelled call says nothing about the backend's health).
#[derive(Debug)]
pub struct CallGuard {
    pub(crate) call: Held,
    /// When the call started, on the service's call clock ([`crate::clock`]).
    pub(crate) started: crate::clock::Start,
    /// The circuit-breaker claim, when the policy has breakers (dropped after `call`).
    pub(crate) ticket: Option<crate::breaker::Ticket>,
}

/// How a [`CallGuard`] counts its call and keeps its backend alive (the count ends when this
/// is dropped).
#[derive(Debug)]
pub(crate) enum Held {
    /// Counted in the picking thread's view, which it holds.
    Local(LocalCall),
    /// Counted by the picker (in the backend's shared load); holds the picking thread's view.
    Viewed(OwnedPick<ViewRef>),
    /// Counted by the picker; holds the picker's shared `Arc` (picks made without a view).
    Shared(OwnedPick),
}

impl Held {
    /// The picked backend's position in the picker it was picked from.
    #[inline]
    pub(crate) fn index(&self) -> usize {
        match self {
            Held::Local(call) => call.index(),
            Held::Viewed(pick) => pick.index(),
            Held::Shared(pick) => pick.index(),
        }
    }

    #[inline]
    fn backend(&self) -> &Backend {
        match self {
            Held::Local(call) => call.backend(),
            Held::Viewed(pick) => pick.backend(),
            Held::Shared(pick) => pick.backend(),
        }
    }
}

impl CallGuard {
    /// A guard over a pick made from the shared snapshot (no circuit-breaker claim), timed
    /// with `clock`.
    pub(crate) fn from_shared(pick: OwnedPick, clock: crate::clock::CallClock) -> Self {
        Self {
            call: Held::Shared(pick),
            started: crate::clock::Start::now(clock),
            ticket: None,
        }
    }

    /// The picked backend's id.
    #[inline]
    pub fn server_id(&self) -> &str {
        self.backend().id()
    }

    /// The picked backend's `host:port`.
    #[inline]
    pub fn address(&self) -> &str {
        self.backend().address()
    }

    /// The picked backend.
    #[inline]
    pub fn backend(&self) -> &Backend {
        self.call.backend()
    }

    /// Time since the pick.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Ends the call as a success, recording its latency.
    pub fn success(self) {
        self.finish(true);
    }

    /// Ends the call as a failure, recording its latency.
    pub fn failure(self) {
        self.finish(false);
    }

    fn finish(mut self, ok: bool) {
        if let Some(t) = &mut self.ticket {
            t.record(ok);
        }
        self.backend()
            .load()
            .record_outcome(ok, self.started.elapsed());
        // Dropping `self` (and what it holds) ends the in-flight count.
    }
}
