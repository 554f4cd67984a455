//! Per-service routing state and the request-path API: [`ServiceHandle`] and [`CallGuard`].
//!
//! The session task (see [`crate::session`]) is the only writer of a service's state: it applies
//! each update from the control plane, builds the next [`Picker`] with [`Picker::rebuild`] (so
//! in-flight counts carry over by backend id) and publishes an immutable [`Snapshot`] through an
//! `ArcSwap`. The request path only loads that snapshot and picks: no lock, no await, O(1) for
//! every algorithm the picker offers (plus one `StickyTable` lookup when the policy is sticky).
//!
//! Call outcomes are counted in per-backend atomics ([`OutcomeCounters`]) that the session task
//! drains into periodic load reports.

use std::collections::HashMap;
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

/// Outcomes of calls to one backend since the last load report. Shared by `Arc` across snapshot
/// generations (carried over by backend id, like the picker's in-flight counts); plain atomics so
/// that completing a call takes no lock.
#[derive(Debug, Default)]
pub(crate) struct OutcomeCounters {
    pub(crate) successes: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) latency_count: AtomicU64,
    pub(crate) latency_sum_us: AtomicU64,
    pub(crate) latency_max_us: AtomicU64,
}

impl OutcomeCounters {
    fn record(&self, ok: bool, latency: Duration) {
        if ok {
            self.successes.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        self.latency_max_us.fetch_max(us, Ordering::Relaxed);
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
    /// Per-backend outcome counters, by id (shared with the next generation when the set of
    /// ids is unchanged).
    pub(crate) outcomes: Arc<HashMap<Arc<str>, Arc<OutcomeCounters>>>,
    /// The policy the picker was built with.
    pub(crate) policy: Option<proto::Policy>,
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
}

#[derive(Debug, Default)]
pub(crate) struct StatsCounters {
    pub(crate) full_updates: AtomicU64,
    pub(crate) delta_updates: AtomicU64,
    pub(crate) nacks: AtomicU64,
    pub(crate) not_found: AtomicU64,
    pub(crate) held_back: AtomicU64,
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
        }
    }

    /// Publishes a snapshot and wakes version watchers.
    pub(crate) fn publish(&self, snapshot: Snapshot) {
        let version = snapshot.version;
        self.snapshot.store(Arc::new(snapshot));
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
        let snap = self.state.snapshot.load();
        let Some(picker) = &snap.picker else {
            return Err(if snap.not_found {
                Error::ServiceNotFound(self.state.name.clone())
            } else {
                Error::Unavailable(format!(
                    "no snapshot of service {:?} received yet",
                    self.state.name
                ))
            });
        };
        let pick = match (&snap.sticky, key) {
            (Some(table), Some(key)) => table
                .pick(picker, key, Instant::now().into_std())
                .map(|p| p.into_owned(picker)),
            _ => picker.pick_owned(key),
        };
        let pick = pick.map_err(|reason| Error::NoBackend {
            service: self.state.name.clone(),
            reason,
        })?;
        let outcome = snap.outcomes.get(pick.backend().id()).cloned();
        Ok(CallGuard {
            pick,
            outcome,
            started: Instant::now(),
        })
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

    /// Counters of applied, rejected and held-back updates.
    pub fn stats(&self) -> ServiceStats {
        let s = &self.state.stats;
        ServiceStats {
            full_updates: s.full_updates.load(Ordering::Relaxed),
            delta_updates: s.delta_updates.load(Ordering::Relaxed),
            nacks: s.nacks.load(Ordering::Relaxed),
            not_found: s.not_found.load(Ordering::Relaxed),
            held_back: s.held_back.load(Ordering::Relaxed),
        }
    }

    /// The backends of the current snapshot, in server-id order.
    pub fn backends(&self) -> Vec<BackendInfo> {
        let snap = self.state.snapshot.load();
        snap.picker
            .as_ref()
            .map(|p| {
                p.backends()
                    .iter()
                    .map(|b| BackendInfo {
                        server_id: b.id().to_owned(),
                        address: b.address().to_owned(),
                        weight: b.weight(),
                        eligible: b.is_eligible(),
                        in_flight: b.load().in_flight(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The policy of the current snapshot (`None` before the first one).
    pub fn local_policy(&self) -> Option<proto::Policy> {
        self.state.snapshot.load().policy
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
    pick: OwnedPick,
    outcome: Option<Arc<OutcomeCounters>>,
    started: Instant,
}

impl CallGuard {
    /// The picked backend's id.
    pub fn server_id(&self) -> &str {
        self.pick.backend().id()
    }

    /// The picked backend's `host:port`.
    pub fn address(&self) -> &str {
        self.pick.backend().address()
    }

    /// The picked backend.
    pub fn backend(&self) -> &Backend {
        self.pick.backend()
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

    fn finish(self, ok: bool) {
        if let Some(o) = &self.outcome {
            o.record(ok, self.started.elapsed());
        }
        // Dropping `self` (and its OwnedPick) ends the in-flight count.
    }
}
