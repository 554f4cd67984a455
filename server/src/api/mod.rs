//! The gRPC front-ends: what `dlbd` answers on its port, each a thin translation between the
//! wire and the subsystems below.
//!
//! * [`registry`] — `dlb.v1.Registry` (admin writes and reads, the seed calls, `GetNextServer`);
//! * [`discovery`] — `dlb.v1.Discovery`, the SDK sessions over the snapshot cache;
//! * [`membership`] — `dlb.v1.Membership`, leases and DNS declarations;
//! * `health` / `health_seed` — `GetHealth` and the seed calls' health results;
//! * `locality` — `GetLocalityPlan` (the plans of [`crate::locality`]);
//! * [`xds`] — standard xDS (ADS, SotW and Delta) and CSDS for stock gRPC clients;
//! * [`barrier`] — the drain barrier `DrainServer` / `RemoveServer` wait on;
//! * [`auth`] — bearer tokens (who may write, who may read); [`status_layer`] — oversize
//!   answers as `RESOURCE_EXHAUSTED`; [`reflection`] — server reflection.
//!
//! `Shared` is what the Registry, Discovery and Membership services share: the store, the
//! snapshot cache, the server-side pickers, the load tracker and the metrics. It is immutable
//! after construction and shared by `Arc`; each part carries its own synchronisation.

pub mod auth;
pub mod barrier;
pub mod discovery;
pub(crate) mod health;
pub(crate) mod health_seed;
pub(crate) mod locality;
pub mod membership;
pub mod reflection;
pub mod registry;
pub mod status_layer;
pub mod xds;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::pickers::Pickers;
use crate::reports::loads::LoadTracker;
use crate::store::Store;

/// Shared by the Registry and Discovery services.
pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    /// The store as the leader's singleton jobs write it: fenced by the leader key on etcd
    /// (writes refused unless this replica leads), `store` itself on one node.
    pub leader_store: Arc<dyn Store>,
    pub cache: Arc<Cache>,
    pub pickers: Arc<Pickers>,
    pub loads: Arc<LoadTracker>,
    /// Zone demand per service, from the zoned sessions ([`crate::reports::demand`]).
    pub demand: Arc<crate::reports::demand::DemandTracker>,
    pub metrics: Arc<Metrics>,
    /// Given when a graceful shutdown starts; every session task is spawned through it.
    pub shutdown: crate::shutdown::Shutdown,
    /// Capacity of each session's outbound channel.
    pub session_queue: usize,
    /// How long a session may stay unable to hand over a message before it is cut.
    pub stall_deadline: std::time::Duration,
    /// Longest a session stays silent before it sends a `Heartbeat`.
    pub session_heartbeat: std::time::Duration,
    /// Longest a session lives before it is sent `GoingAway` (±10 %; `None`: no limit).
    pub max_session_age: Option<std::time::Duration>,
    /// Source of session ids (for nonces and load accounting).
    pub next_session: AtomicU64,
    /// Sessions open now, and the most allowed.
    pub sessions: AtomicUsize,
    pub max_sessions: usize,
    /// The active health checker.
    pub health: crate::health::HealthHandle,
    /// Load-report outcomes on their way to the outlier task ([`crate::health::passive`]).
    pub reports: Arc<crate::reports::Reports>,
    /// The SDKs' reported circuit-breaker states ([`crate::reports::circuits`]).
    pub circuits: crate::reports::circuits::CircuitTracker,
    /// Whether this replica serves sessions ([`crate::readiness`]).
    pub readiness: crate::readiness::Readiness,
    /// What each DLB session acknowledged ([`discovery::acks`]), for the drain barrier.
    pub acks: Arc<discovery::acks::AckBook>,
    /// Every xDS stream's bookkeeping (acks included), for the drain barrier.
    pub xds_clients: Arc<xds::XdsClients>,
    /// This replica's id (named in a barrier's answer).
    pub replica_id: Arc<str>,
    /// Where drain barriers meet the other replicas (`None`: no other replicas).
    pub board: Option<Arc<dyn crate::replicas::board::Board>>,
    /// The drain barriers waiting on this replica now (the status page lists them).
    pub barriers: barrier::Active,
    /// The live replicas (a barrier waits for each one's answer).
    pub members: tokio::sync::watch::Receiver<crate::replicas::Members>,
}
