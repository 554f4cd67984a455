//! State shared by the gRPC services: the store, the server-side pickers, the load tracker and
//! the metrics, plus the task that keeps pickers and gauges in step with the store.
//!
//! `Shared` is immutable after construction and shared by `Arc`; each part carries its own
//! synchronisation (see their modules). The shutdown flag is a `tokio::sync::watch` channel so
//! that every session can await it in a `select!`.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::loads::LoadTracker;
use crate::metrics::Metrics;
use crate::pickers::Pickers;
use crate::store::Store;
use crate::Error;

/// Resolves once a graceful shutdown has started (or the flag's sender is gone). The flag's
/// read guard is dropped inside, so callers' futures stay `Send`.
pub(crate) async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}

/// Shared by the Registry and Discovery services.
pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    pub pickers: Pickers,
    pub loads: LoadTracker,
    pub metrics: Arc<Metrics>,
    /// Becomes `true` when a graceful shutdown starts.
    pub shutdown: watch::Receiver<bool>,
    /// Capacity of each session's outbound channel.
    pub session_queue: usize,
    /// Source of session ids (for nonces and load accounting).
    pub next_session: AtomicU64,
}

impl Shared {
    /// Brings the picker and gauges of `service` up to the store's current state.
    pub async fn refresh(&self, service: &str) -> Result<(), Error> {
        if let Some(snapshot) = self.store.get_service(service.to_owned()).await? {
            if self.pickers.apply(&snapshot)? {
                self.metrics.service(&snapshot);
            }
        }
        Ok(())
    }

    /// Refreshes every service.
    pub async fn refresh_all(&self) -> Result<(), Error> {
        for snapshot in self.store.list_services().await? {
            if self.pickers.apply(&snapshot)? {
                self.metrics.service(&snapshot);
            }
        }
        Ok(())
    }

    /// Follows the store's change feed and refreshes pickers and gauges, so that writes made
    /// elsewhere (another replica, in a future shared store) reach `GetNextServer` too. Writes
    /// made through this server's Registry also refresh synchronously before they return.
    pub async fn follow_store(self: Arc<Self>) {
        let mut feed = self.store.watch();
        let mut shutdown = self.shutdown.clone();
        loop {
            let result = tokio::select! {
                r = feed.recv() => r,
                _ = crate::state::stopped(&mut shutdown) => return,
            };
            let refreshed = match result {
                // Writes through this server's Registry have already refreshed their picker
                // before replying: skip them without copying the snapshot out of the store.
                Ok(change)
                    if self
                        .pickers
                        .is_at(&change.service, change.epoch, change.version) =>
                {
                    Ok(())
                }
                Ok(change) => self.refresh(&change.service).await,
                Err(broadcast::error::RecvError::Lagged(_)) => self.refresh_all().await,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if let Err(e) = refreshed {
                tracing::error!(error = %e, "cannot refresh pickers");
            }
        }
    }
}
