//! Server-side pickers: what `GetNextServer` answers from, and the builder tasks that own them.
//!
//! For every service the control plane keeps one immutable [`dlb::balance::Picker`] — the very
//! code the SDK runs — behind an `ArcSwapOption`, so a pick is a lock-free load plus the
//! picker's own O(1) work. **One builder task per service** ([`run_builders`]) owns that
//! service's picker: it follows the service in the [cache](crate::cache), and each time it is
//! woken it builds from the *newest* snapshot (a burst of changes during a build costs one more
//! build, not one per change), on a blocking thread (`spawn_blocking`: a Maglev table at 10,000
//! backends takes tens of milliseconds), and swaps the result in with
//! [`Picker::rebuild`](dlb::balance::Picker::rebuild) semantics (in-flight accounting carried
//! over by backend id). RPC handlers never build. A [`StickyTable`] lives next to the picker
//! while the policy is sticky and survives rebuilds as long as the sticky configuration does not
//! change.
//!
//! Sync primitives: the map of services is a `parking_lot::RwLock` (read on every pick, written
//! only when a service first appears); each service's picker is an `ArcSwapOption` (readers
//! never block) and the version it was built from is published on a `tokio::sync::watch`
//! channel, which `GetNextServer` awaits (bounded) for read-your-writes. Only the service's
//! builder task writes either. No lock is held across `.await`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use dlb::balance::{Picker, StickyTable};
use dlb::proto;
use dlb::routing;
use parking_lot::RwLock;
use tokio::sync::watch;

use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::reports::loads::LoadTracker;
use crate::store::ServiceSnapshot;
use crate::Error;

/// The picking state of one service at one version.
#[derive(Debug)]
pub struct ServicePicker {
    /// The version this state was built from.
    pub version: proto::Version,
    /// The snapshot it was built from (records answer picks).
    pub snapshot: Arc<ServiceSnapshot>,
    /// The picker.
    pub picker: Arc<Picker>,
    /// The sticky-session table, when the policy is sticky.
    pub sticky: Option<Arc<StickyTable>>,
}

#[derive(Debug)]
struct Entry {
    current: ArcSwapOption<ServicePicker>,
    /// The version `current` was built from (0: none yet).
    built: watch::Sender<u64>,
}

/// One [`ServicePicker`] per service. See the module docs.
#[derive(Debug, Default)]
pub struct Pickers {
    services: RwLock<HashMap<String, Arc<Entry>>>,
    builds: AtomicU64,
}

impl Pickers {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&self, service: &str) -> Arc<Entry> {
        if let Some(e) = self.services.read().get(service) {
            return e.clone();
        }
        self.services
            .write()
            .entry(service.to_owned())
            .or_insert_with(|| {
                Arc::new(Entry {
                    current: ArcSwapOption::empty(),
                    built: watch::Sender::new(0),
                })
            })
            .clone()
    }

    /// The current state of a service.
    pub fn get(&self, service: &str) -> Option<Arc<ServicePicker>> {
        self.services.read().get(service)?.current.load_full()
    }

    /// Drops a removed service's picker: `GetNextServer` answers NOT_FOUND until it exists
    /// again. Only the service's builder calls it.
    fn clear(&self, service: &str) {
        if let Some(e) = self.services.read().get(service) {
            e.current.store(None);
        }
    }

    /// Pickers built since start (all services).
    pub fn builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    /// Waits (at most `limit`) until the service's picker is built from `version` or newer;
    /// returns whether it is.
    pub async fn wait_built(&self, service: &str, version: u64, limit: Duration) -> bool {
        let mut rx = self.entry(service).built.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|v| *v >= version))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Builds and installs the picker for `snapshot` unless the installed one is as new (or
    /// `ramp` asks for a rebuild of the same version: a slow-start tick). Blocking (run it off
    /// the async workers). Only the service's builder calls it.
    fn install(&self, snapshot: Arc<ServiceSnapshot>, ramp: bool) -> Result<bool, Error> {
        let entry = self.entry(&snapshot.name);
        let current = entry.current.load_full();
        if let Some(cur) = &current {
            if cur.version == snapshot.version && !ramp {
                return Ok(false);
            }
        }
        let built = routing::build_picker(
            current.as_ref().map(|c| &*c.picker),
            &snapshot.policy,
            snapshot.servers.values().map(|s| &**s),
        )
        .map_err(|source| Error::Picker {
            service: snapshot.name.clone(),
            source,
        })?;
        let sticky = routing::carry_sticky(
            current.as_ref().and_then(|c| c.sticky.as_ref()),
            &snapshot.policy,
        );
        let version = snapshot.version;
        entry.current.store(Some(Arc::new(ServicePicker {
            version,
            snapshot,
            picker: Arc::new(built),
            sticky,
        })));
        entry.built.send_replace(version.version);
        self.builds.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Picks a backend of `service` for a request with `key` (empty = no key). The pick is not
    /// counted as an in-flight call: the caller of `GetNextServer` does not report completion.
    pub fn pick(
        &self,
        service: &str,
        key: &[u8],
    ) -> Result<(proto::Server, proto::Version), Error> {
        let state = self
            .get(service)
            .ok_or_else(|| Error::ServiceNotFound(service.to_owned()))?;
        let key = (!key.is_empty()).then_some(key);
        let unavailable = |source| Error::Unavailable {
            service: service.to_owned(),
            source,
        };
        let id = match (&state.sticky, key) {
            (Some(table), Some(k)) => {
                let pick = table
                    .pick(&state.picker, k, Instant::now())
                    .map_err(unavailable)?;
                pick.backend().id().to_owned()
            }
            _ => {
                let pick = state.picker.pick(key).map_err(unavailable)?;
                pick.backend().id().to_owned()
            }
        };
        let server = state
            .snapshot
            .servers
            .get(id.as_str())
            .map(|s| (**s).clone())
            .ok_or_else(|| Error::Task(format!("picked unknown backend {id:?}")))?;
        Ok((server, state.version))
    }

    /// Sets the load other clients put on each backend of `service` (the sum of the in-flight
    /// counts reported by SDK sessions); backends not in `totals` get 0.
    pub fn set_baselines(&self, service: &str, totals: &HashMap<String, u64>) {
        if let Some(state) = self.get(service) {
            for b in state.picker.backends() {
                b.load()
                    .set_baseline(totals.get(b.id()).copied().unwrap_or(0));
            }
            // Exact least-connections keeps a tree over the loads: re-read them all now
            // rather than letting the tree converge over the next n picks.
            state.picker.refresh_loads();
        }
    }
}

/// What the builder tasks work with.
pub(crate) struct Builders {
    /// The snapshots pickers are built from.
    pub cache: Arc<Cache>,
    /// Where the built pickers go.
    pub pickers: Arc<Pickers>,
    /// The reported global in-flight counts a new picker starts from.
    pub loads: Arc<LoadTracker>,
    /// Per-service gauges and the panic metrics.
    pub metrics: Arc<Metrics>,
    /// Given when a graceful shutdown starts.
    pub shutdown: crate::shutdown::Shutdown,
}

/// Starts one builder task per service, now and whenever a service appears, until shutdown.
pub(crate) async fn run_builders(b: Arc<Builders>) {
    let mut appeared = b.cache.services_changed();
    let shutdown = b.shutdown.clone();
    let mut started: HashSet<Arc<str>> = HashSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        appeared.borrow_and_update();
        for name in b.cache.service_names() {
            if started.insert(name.clone()) {
                tasks.spawn(builder(b.clone(), name));
            }
        }
        tokio::select! {
            r = appeared.changed() => if r.is_err() { break },
            _ = shutdown.stopped() => break,
        }
    }
    tasks.shutdown().await;
}

/// The owner of one service's picker. See the module docs.
async fn builder(b: Arc<Builders>, service: Arc<str>) {
    let waker = b.cache.waker();
    b.cache.follow_service(&service, &waker);
    let shutdown = b.shutdown.clone();
    // Whether the service was in panic at the last build (entering and leaving are logged and
    // counted here, once per dlbd; every SDK decides the same from the same records).
    let mut in_panic = false;
    // Slow start: while a backend ramps, rebuild the same version at the next tick (the ramp
    // is computed from the records and the clock, see `dlb::slow_start`).
    let mut ramp_tick: Option<std::time::Duration>;
    let mut ramp = false;
    loop {
        waker.take_dirty();
        if let Some(snapshot) = b.cache.get(&service) {
            let s = b.clone();
            let snap = snapshot.clone();
            ramp_tick = dlb::slow_start::next_tick(
                &snapshot.policy,
                snapshot.servers.values().map(|s| &**s),
                dlb::slow_start::now_ms(),
            );
            let force = std::mem::take(&mut ramp);
            match tokio::task::spawn_blocking(move || s.pickers.install(snap, force)).await {
                Ok(Ok(true)) => {
                    // A new picker starts from the reported global in-flight counts.
                    let totals = b.loads.totals(&service);
                    b.pickers.set_baselines(&service, &totals);
                    b.metrics.service(&snapshot);
                    if let Some(state) = b.pickers.get(&service) {
                        let panic = state.picker.panic_state();
                        let changed = panic.active != in_panic;
                        if changed && panic.active {
                            tracing::warn!(service = %service, eligible = panic.eligible, total = panic.total, mode = ?panic.mode, "service entered panic");
                        } else if changed {
                            tracing::info!(service = %service, eligible = panic.eligible, total = panic.total, "service left panic");
                        }
                        in_panic = panic.active;
                        b.metrics.passive.panic(&service, panic.active, changed);
                    }
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::error!(service = %service, error = %e, "cannot build picker")
                }
                Err(e) => tracing::error!(service = %service, error = %e, "picker build failed"),
            }
        } else {
            // Removed (RemoveService, or its last lease went): nothing to pick from.
            b.pickers.clear(&service);
            ramp_tick = None;
        }
        let tick = ramp_tick.unwrap_or(std::time::Duration::MAX);
        tokio::select! {
            _ = waker.notified() => {}
            _ = tokio::time::sleep(tick), if ramp_tick.is_some() => ramp = true,
            _ = shutdown.stopped() => break,
        }
    }
    b.cache.unfollow_service(&service, &waker);
}
