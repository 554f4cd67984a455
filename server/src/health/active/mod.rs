//! Active health checks: probes run by `dlbd`, one state machine per backend, flap damping.
//!
//! Parts (data flows down):
//!
//! * [`probe`] — the HTTP/1.1, TCP and gRPC probes behind the [`probe::Prober`] seam;
//! * [`checker`] — the scheduler: one task owns every target's schedule (initial spread,
//!   interval / fast / down intervals, jitter), the bound on probes in flight (an overloaded
//!   checker reports *unknown*, never *unhealthy*), each backend's [`state::Machine`] and
//!   [`flap::Damper`];
//! * [`writer`] — the one task that writes probe verdicts to the store, on transitions only,
//!   batched per service; the core (`dlb::sources`) derives the effective state and reason and
//!   the cache pushes them;
//! * [`config`] — the YAML form of a health check; [`metrics`] — its Prometheus series.
//!
//! **Configuration** is the service policy's `health_check` (YAML, `SetPolicy`, `dlbctl health
//! set`); no `health_check` means no probes.
//!
//! **The seed calls.** On a service *without* a health check, `health_check_passed` /
//! `health_check_failed` set the admin source, as before (an operator's verdict, immediate). On a
//! service *with* one, each call is one result in the backend's state machine, exactly like one
//! probe result (it counts towards `rise` / `fall` and flap damping, and its transitions are
//! written to the probe source); the admin source is left alone. See `docs/health.md`.

pub mod checker;
pub mod config;
pub mod flap;
pub mod metrics;
pub mod probe;
pub mod state;
pub(crate) mod writer;

#[cfg(test)]
mod checker_tests;

use std::sync::Arc;

use dlb::{model, proto};
use tokio::sync::{mpsc, oneshot};

use crate::cache::Cache;
use crate::store::Store;
use crate::Error;

pub use checker::TargetView;
use checker::{Checker, Command, ReportReply};

/// Default bound on probes in flight.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// A handle to the running checker (cheap to clone).
#[derive(Debug, Clone)]
pub struct HealthHandle {
    commands: mpsc::Sender<Command>,
}

impl HealthHandle {
    /// Feeds a seed call (`health_check_passed` / `_failed`) to the checker. `Ok(None)`: the
    /// backend is not under active checks (the caller sets the admin source). `Ok(Some(v))`:
    /// recorded as one result; `v` is the version of the write it caused, if it caused one.
    pub(crate) async fn report(
        &self,
        service: &str,
        server_id: &str,
        passed: bool,
    ) -> Result<Option<Option<proto::Version>>, Error> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Report {
                service: service.to_owned(),
                server_id: server_id.to_owned(),
                passed,
                reply,
            })
            .await
            .map_err(|_| Error::Task("the health checker stopped".into()))?;
        match rx
            .await
            .map_err(|_| Error::Task("the health checker stopped".into()))?
        {
            ReportReply::NotChecked => Ok(None),
            ReportReply::Recorded(None) => Ok(Some(None)),
            ReportReply::Recorded(Some(write)) => {
                let v = write
                    .await
                    .map_err(|_| Error::Task("the health writer stopped".into()))??;
                Ok(Some(Some(v)))
            }
        }
    }

    /// The checker's view of every checked backend of `service`, ordered by id.
    pub async fn inspect_service(&self, service: &str) -> Vec<(String, TargetView)> {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .commands
            .send(Command::InspectService {
                service: service.to_owned(),
                reply,
            })
            .await;
        if sent.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// The checker's view of one backend, or `None` when it is not under active checks.
    pub async fn inspect(&self, service: &str, server_id: &str) -> Option<TargetView> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Inspect {
                service: model::resolve_service(service).ok()?.to_owned(),
                server_id: server_id.to_owned(),
                reply,
            })
            .await
            .ok()?;
        rx.await.ok().flatten()
    }
}

/// Starts the checker and its writer, both spawned through `shutdown`; both stop when the
/// shutdown starts (the writer, which holds the store, is awaited with the others).
pub(crate) fn start(
    cache: Arc<Cache>,
    store: Arc<dyn Store>,
    prober: Arc<dyn probe::Prober>,
    max_in_flight: usize,
    metrics: metrics::HealthMetrics,
    share: crate::replicas::Share,
    shutdown: &crate::shutdown::Shutdown,
) -> HealthHandle {
    let (commands, commands_rx) = mpsc::channel(1024);
    let (writes, writes_rx) = mpsc::unbounded_channel();
    let checker = Checker::new(cache, prober, max_in_flight, metrics, writes, share);
    let writer = shutdown.spawn(writer::run(store, writes_rx, shutdown.stopped_owned()));
    let stopped = shutdown.stopped_owned();
    shutdown.spawn(async move {
        checker.run(commands_rx, stopped).await;
        let _ = writer.await;
    });
    HealthHandle { commands }
}

/// Whether `service`'s policy, as cached now, has an active health check.
pub(crate) fn is_checked(cache: &Cache, service: &str) -> bool {
    cache
        .get(service)
        .is_some_and(|s| s.policy.health_check.is_some())
}
