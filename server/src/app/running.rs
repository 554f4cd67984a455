//! A running control plane ([`RunningServer`]): what it serves and how it stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::HEALTH_SERVICES;
use crate::api::xds;
use crate::api::Shared;
use crate::cache::Cache;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::{health, readiness, replicas, Error};

/// A running control plane. Dropping it starts a graceful shutdown in the background;
/// [`RunningServer::shutdown`] does the same and waits for it.
pub struct RunningServer {
    pub(super) grpc_addr: SocketAddr,
    pub(super) metrics_addr: Option<SocketAddr>,
    pub(super) epoch: u64,
    pub(super) store: Arc<dyn Store>,
    pub(super) health: tonic_health::server::HealthReporter,
    /// The signal every task awaits and the set of them (every task of this server is spawned
    /// through it and awaited by [`RunningServer::shutdown`]: several hold the store, and a
    /// restart in the same process must find the embedded store unlocked).
    pub(super) shutdown: Shutdown,
    pub(super) grace: Duration,
    /// The gRPC server, the metrics server and the readiness decision ([`readiness::run`]):
    /// tracked like every task, and also awaited one by one, in the order a shutdown needs.
    pub(super) grpc: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    pub(super) metrics: Option<JoinHandle<std::io::Result<()>>>,
    pub(super) ready_task: Option<JoinHandle<()>>,
    /// The replica set this replica is a member of.
    pub(super) coordination: Arc<dyn replicas::Coordination>,
    pub(super) shared: Arc<Shared>,
    pub(super) xds_clients: Arc<xds::XdsClients>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("grpc_addr", &self.grpc_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl RunningServer {
    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound metrics address, if metrics are enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The store's epoch (names its history: random per in-memory store, kept on disk by the
    /// embedded store).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The store (to read or write state in-process).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The snapshot cache every session reads from.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.shared.cache
    }

    /// The xDS clients connected now (ADS streams and their bookkeeping).
    pub fn xds_clients(&self) -> &Arc<xds::XdsClients> {
        &self.xds_clients
    }

    /// This replica's id among the replicas of its deployment.
    pub fn replica_id(&self) -> &str {
        self.coordination.replica_id()
    }

    /// Whether this replica is the leader now (runs lease expiry, DNS refreshes and outlier
    /// decisions). Always `true` on a single-node store.
    pub fn is_leader(&self) -> bool {
        self.coordination.is_leader()
    }

    /// This replica's leadership as it changes: `Some(fence)` while it leads (see
    /// [`replicas::Coordination::leadership`]).
    pub fn leadership(&self) -> watch::Receiver<Option<i64>> {
        self.coordination.leadership()
    }

    /// Backends this replica removed because their lease expired (`dlb_lease_expiries_total`;
    /// only the leader expires leases).
    pub fn lease_expiries(&self) -> u64 {
        self.shared.metrics.membership.expiries.get()
    }

    /// The live replicas as this one sees them.
    pub fn members(&self) -> replicas::Members {
        self.coordination.members().borrow().clone()
    }

    /// This replica's readiness (see [`readiness`]).
    pub fn readiness(&self) -> &readiness::Readiness {
        &self.shared.readiness
    }

    /// The active health checker (its view of each checked backend).
    pub fn health(&self) -> &health::HealthHandle {
        &self.shared.health
    }

    /// Server-side pickers built since start, all services together (builds are coalesced:
    /// a burst of writes costs a few builds, not one per write).
    pub fn picker_builds(&self) -> u64 {
        self.shared.pickers.builds()
    }

    /// Graceful shutdown: health turns NOT_SERVING, every session gets `GoingAway` and its
    /// stream ends, the replica leaves its set, the listeners close, open connections get up to
    /// the configured grace period to finish before they are aborted, and every task of the
    /// server has ended when this returns.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        for name in HEALTH_SERVICES.into_iter().chain([""]) {
            self.health
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        self.shutdown.start();
        // Out of the replica set at once: the others take over its health checks now.
        self.coordination.leave().await;
        // The readiness task stops at the flag; it never turns health back to SERVING after.
        if let Some(r) = self.ready_task.take() {
            let _ = r.await;
        }
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut result = Ok(());
        if let Some(mut grpc) = self.grpc.take() {
            match tokio::time::timeout_at(deadline, &mut grpc).await {
                Ok(Ok(r)) => result = r.map_err(Error::from),
                Ok(Err(e)) => result = Err(Error::Task(e.to_string())),
                Err(_) => {
                    tracing::warn!("grace period over; aborting open connections");
                    grpc.abort();
                    let _ = grpc.await;
                }
            }
        }
        if let Some(mut m) = self.metrics.take() {
            match tokio::time::timeout_at(deadline, &mut m).await {
                Ok(Ok(Err(e))) if result.is_ok() => result = Err(Error::Task(e.to_string())),
                Ok(_) => {}
                Err(_) => {
                    m.abort();
                    let _ = m.await;
                }
            }
        }
        // Every other task: the cache follower, the picker builders, health (checker, writer,
        // passive), leases, DNS, the replica set's tasks, sessions and their helpers.
        self.shutdown.wait().await;
        result
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown.start();
    }
}
