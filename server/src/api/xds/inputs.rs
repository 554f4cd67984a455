//! The live inputs of per-node EDS ([`super::assignment`]): the zone demand measured from the
//! SDKs' reports ([`crate::reports::demand`]) and the global in-flight counts
//! ([`crate::reports::loads`]) — what an SDK of the same zone plans with (docs/locality.md).
//!
//! They change without a store change, so they are not part of a snapshot: each service's
//! [`Assignments`] holds the inputs its per-zone assignments were planned with, and [`run`]
//! hands it fresh ones on every demand publication and every [`TICK`]
//! ([`Assignments::refresh`]). A zone's assignment is replaced — and the service's followers
//! woken ([`Cache::wake_followers`]) — only when its plan moved: on new demand, when any group's
//! share changed; on load alone, when one moved by more than [`LOAD_MOVE`], measured from the
//! shares the assignment the clients hold was made with (so slow drift still gets through
//! while noise does not push a new assignment to every client each tick).
//!
//! Cost per pass: O(services) lookups; per service that has per-node assignments, its inputs
//! (for a load-aware policy a copy of its in-flight counts, O(backends)); when they changed, one
//! plan per built client zone (O(backends) each) and, where the plan moved, one encoding of the
//! zone's assignment (backends' encodings are shared within the snapshot).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::assignment::Assignments;
use super::XdsMetrics;
use crate::cache::Cache;
use crate::reports::demand::{DemandTracker, Shares};
use crate::reports::loads::LoadTracker;
use crate::store::ServiceSnapshot;

/// How often [`run`] refreshes the inputs when no demand publication wakes it (load-aware
/// capacity follows the in-flight counts within this).
pub const TICK: Duration = Duration::from_millis(500);

/// On a change of load alone, a zone's assignment is replaced when one of its group shares
/// moved by more than this (absolute) since the assignment was made.
pub const LOAD_MOVE: f64 = 0.01;

/// What a service's per-node plans are computed from, besides its snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    /// Generation of the published zone demand (0: none published).
    pub demand_generation: u64,
    /// The published zone demand (empty: unknown, equal over the zones with backends).
    pub demand: Shares,
    /// Global in-flight calls per backend id; empty unless the service's locality policy is
    /// load-aware (`saturation_in_flight`).
    pub in_flight: Arc<HashMap<String, u64>>,
}

/// Where the inputs come from: the trackers of this replica.
#[derive(Debug, Clone)]
pub struct PlanSources {
    /// Zone demand (published shares, summed over the replicas).
    pub demand: Arc<DemandTracker>,
    /// Global in-flight counts.
    pub loads: Arc<LoadTracker>,
}

impl PlanSources {
    /// The current inputs of `snap`'s service.
    pub fn inputs(&self, snap: &ServiceSnapshot) -> Inputs {
        let (demand_generation, demand) = self.demand.published(&snap.name);
        let in_flight = if dlb::locality::config(&snap.policy).saturation.is_some() {
            Arc::new(self.loads.totals(&snap.name))
        } else {
            Arc::default()
        };
        Inputs {
            demand_generation,
            demand,
            in_flight,
        }
    }
}

/// Hands every service's per-node assignments fresh inputs ([`Assignments::refresh`]) and
/// wakes the followers of those whose assignments changed. Returns how many zone assignments
/// were re-planned.
pub fn refresh_all(cache: &Cache, sources: &PlanSources) -> u64 {
    let mut changed = 0;
    for name in cache.service_names() {
        let Some((snap, derived)) = cache.derived_if_made(&name) else {
            continue;
        };
        let Some(assignments) = derived.peek::<Assignments>(super::ENDPOINTS_INDEX) else {
            continue;
        };
        let n = assignments.refresh(sources.inputs(&snap));
        if n > 0 {
            cache.wake_followers(&name);
            changed += n as u64;
        }
    }
    changed
}

/// Refreshes the inputs (see the module docs) on every demand publication and every [`TICK`]
/// until `stop` resolves, counting the re-planned assignments in `metrics`.
pub async fn run(
    cache: Arc<Cache>,
    sources: PlanSources,
    metrics: XdsMetrics,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut demand = sources.demand.subscribe();
    let mut demand_open = true;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => {}
            r = demand.changed(), if demand_open => demand_open = r.is_ok(),
        }
        metrics.replanned(refresh_all(&cache, &sources));
    }
}
