//! The request-path API of one subscribed service: [`ServiceHandle`] (picks, version watch,
//! staleness, and the admin calls on that service) and [`CallGuard`] (one call in flight).
//! The pick itself (`ServiceHandle::get_next_server` and what it dispatches to) is in
//! [`pick`]; the state a handle reads and the threads' views of it are in [`crate::state`].
//!
//! The session task is the only writer of a service's state: it applies updates from the
//! control plane, builds the next [`Picker`](dlb::balance::Picker) with
//! [`Picker::rebuild`](dlb::balance::Picker::rebuild) (so in-flight counts
//! carry over by backend id; one build for a burst of updates) and publishes an immutable
//! [`Snapshot`](crate::state::Snapshot) through an `ArcSwap`. The request path picks from that
//! snapshot: no lock, no await, O(1) for every algorithm the picker offers (plus one
//! `StickyTable` lookup when the policy is sticky).
//!
//! What a pick writes: each thread picks through its own view of the snapshot (see
//! [`crate::state::local`]) and its [`CallGuard`] keeps that view's picker, not the shared
//! snapshot, alive. So round robin and the hashing policies without bounded load write only
//! memory of the picking thread (the view's in-flight counter for the picked backend, which is
//! also what keeps the picker alive for the guard). The
//! policies that read in-flight counts to pick (least connections, bounded load) also write
//! what they read: the backends' shared counts (and bounded load's total, and exact least
//! connections' tree).
//!
//! Call outcomes are counted in the backend's [`dlb::balance::BackendLoad`] (atomics carried
//! across picker generations by backend id), which the session task drains into periodic load
//! reports.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dlb::balance::{Backend, OwnedPick};
use dlb::proto;
use tokio::sync::watch;

use crate::admin::{NewServer, ServerUpdate};
use crate::error::{Error, Result};
use crate::state::local::{self, LocalCall, ViewRef};
use crate::state::{ServiceState, ServiceStats, Version};
use crate::Client;

mod pick;

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

    /// The locality plan this client applies to the service: its zone, the pushed zone demand,
    /// each group's share, the share kept in-zone and why calls leave it (docs/locality.md).
    /// `None` while the service's picker is not grouped (no backend above priority 0, and no
    /// client zone or no zoned backend or a hashing algorithm).
    pub fn locality(&self) -> Option<crate::LocalityStatus> {
        self.state.locality.lock().as_deref().cloned()
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
