//! State shared by the gRPC services: the store, the snapshot cache, the server-side pickers,
//! the load tracker and the metrics.
//!
//! `Shared` is immutable after construction and shared by `Arc`; each part carries its own
//! synchronisation (see their modules). The background tasks that keep the cache in step with
//! the store ([`crate::cache::Cache::follow`]) and the pickers in step with the cache
//! ([`crate::pickers::run_builders`]) are started by [`crate::spawn_with_store`]. The shutdown
//! flag is a `tokio::sync::watch` channel so that every task can await it in a `select!`.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use tokio::sync::watch;

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
    pub pickers: Pickers,
    pub loads: LoadTracker,
    pub metrics: Arc<Metrics>,
    /// Becomes `true` when a graceful shutdown starts.
    pub shutdown: watch::Receiver<bool>,
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
    pub reports: crate::reports::Reports,
    /// The SDKs' reported circuit-breaker states ([`crate::reports::circuits`]).
    pub circuits: crate::reports::circuits::CircuitTracker,
    /// Whether this replica serves sessions ([`crate::readiness`]).
    pub readiness: crate::readiness::Readiness,
}

impl Shared {
    /// The request, outlier and panic metrics.
    pub(crate) fn health_metrics(&self) -> &crate::health::passive::metrics::HealthMetrics {
        &self.metrics.passive
    }
}
