//! Zone demand: per service, the share of its calls made by SDK clients of each zone, computed
//! here and pushed to every session in `GlobalLoad.zone_demand`, so every SDK of a zone plans
//! its zone-aware routing on the same numbers (`docs/locality.md`).
//!
//! * **Who is where.** A session's zone is the (region, zone) of its first Subscribe's
//!   `locality` ([`DemandTracker::join`]); a session without one is counted nowhere (it still
//!   receives the shares).
//! * **Demand** of a zone on a service = the calls (successes + failures) its sessions reported
//!   on the service over the last 10 s ([`window::Window`]); before any call is counted, the
//!   number of its sessions that follow the service. Shares sum to 1 ([`window::shares`]).
//! * **Published** shares change only when a share moved by more than [`MOVE_THRESHOLD`] (1 %)
//!   or the zone set changed; each publication has a new generation, and the change signal
//!   ([`DemandTracker::subscribe`]) wakes the sessions, which push at most every 100 ms
//!   ([`crate::reports::global_load`]). The window also slides with no report at all: the
//!   [`run`] task re-evaluates every service each [`TICK`].
//! * **Bounds.** At most [`MAX_ZONES`] zones per service: a session of a further zone is not
//!   counted (its calls and follow are dropped and counted in
//!   `dlb_zone_demand_zones_dropped_total`; it still receives the shares of the others). A
//!   service is tracked only while a zoned session follows it or its window holds calls; a zone
//!   only while it has followers or calls in the window, so what gone sessions left expires
//!   within 10 s. One report adds at most [`MAX_REPORTED_CALLS`] calls.
//! * **Several replicas** ([`replicas`], etcd): every second each replica posts its own
//!   sessions' counts per (service, zone) — calls in its window, followers — and reads the
//!   others'; a zone's demand is the sum over the live replicas, so every replica publishes the
//!   same shares (within a second). Past [`MAX_ZONES`] zones after summing, the smallest are
//!   left out.
//!
//! One `parking_lot::Mutex` guards the maps; it is held for O(zones × 10) per change, never
//! across `.await`.

pub mod replicas;
pub mod window;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use dlb::proto;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;

pub use window::ZoneKey;
use window::{Counts, Window};

/// Most client zones tracked per service (see the module docs for the rest).
pub const MAX_ZONES: usize = 64;
/// A published share is replaced when a share moves by more than this (absolute).
pub const MOVE_THRESHOLD: f64 = 0.01;
/// How often [`run`] lets every window slide.
pub const TICK: Duration = Duration::from_secs(1);
/// Most calls one load report adds (a report is client input).
pub const MAX_REPORTED_CALLS: u64 = 1_000_000_000;

/// Ids at or above this are for xDS streams (`XDS_IDS | stream id`), so that a front-end other
/// than the Discovery sessions (whose ids count up from 1) can count its clients' zones as
/// followers ([`DemandTracker::join`], [`DemandTracker::follow`]) without colliding.
pub const XDS_IDS: u64 = 1 << 63;

/// One service's counts per zone.
pub type ZoneCounts = Vec<(ZoneKey, Counts)>;

/// Shares as published: sorted by zone, summing to 1 (empty: not known).
pub type Shares = Arc<[(ZoneKey, f64)]>;

type Labels = Vec<(String, String)>;

/// A zoned session: its zone and the services it is counted as following.
#[derive(Debug)]
struct Member {
    zone: ZoneKey,
    services: HashSet<Arc<str>>,
}

#[derive(Debug, Default)]
struct Zone {
    followers: u64,
    window: Window,
}

#[derive(Debug)]
struct Service {
    /// This replica's sessions' zones.
    zones: HashMap<ZoneKey, Zone>,
    /// What was last published, and its generation.
    generation: u64,
    published: Shares,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<u64, Member>,
    services: HashMap<Arc<str>, Service>,
    /// The other replicas' counts, summed, per service ([`replicas`]).
    remote: HashMap<Arc<str>, ZoneCounts>,
    /// The generation of the next publication (0 means "nothing published").
    next_generation: u64,
}

/// Zone demand per service. See the module docs.
#[derive(Debug)]
pub struct DemandTracker {
    inner: Mutex<Inner>,
    /// Bumped on every publication: sessions wait on it to push.
    changed: watch::Sender<u64>,
    /// Second 0 of the windows.
    start: Instant,
    metrics: DemandMetrics,
}

impl Service {
    fn new() -> Self {
        Self {
            zones: HashMap::new(),
            generation: 0,
            published: Arc::from([]),
        }
    }
}

impl DemandTracker {
    /// An empty tracker exporting to `metrics`.
    pub fn new(metrics: DemandMetrics) -> Self {
        Self {
            inner: Mutex::new(Inner {
                next_generation: 1,
                ..Default::default()
            }),
            changed: watch::Sender::new(0),
            start: Instant::now(),
            metrics,
        }
    }

    fn now(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.start)
            .as_secs()
    }

    /// A receiver that changes whenever some service's published shares changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Records the zone of a session (its first Subscribe's locality).
    pub fn join(&self, session: u64, zone: ZoneKey) {
        self.inner.lock().sessions.insert(
            session,
            Member {
                zone,
                services: HashSet::new(),
            },
        );
    }

    /// A zoned session follows `service`: its zone's followers count one more (no-op for a
    /// session without a zone, or one already counted).
    pub fn follow(&self, session: u64, service: &str) {
        let now = self.now();
        let mut inner = self.inner.lock();
        let Inner {
            sessions, services, ..
        } = &mut *inner;
        let Some(member) = sessions.get_mut(&session) else {
            return;
        };
        if member.services.contains(service) {
            return;
        }
        let entry = services.entry(service.into()).or_insert_with(Service::new);
        if !entry.zones.contains_key(&member.zone) && entry.zones.len() >= MAX_ZONES {
            self.metrics.dropped.inc();
            return;
        }
        entry
            .zones
            .entry(member.zone.clone())
            .or_default()
            .followers += 1;
        member.services.insert(service.into());
        let changed = self.refresh(&mut inner, service, now);
        drop(inner);
        self.bump(changed);
    }

    /// A session stopped following `service`.
    pub fn unfollow(&self, session: u64, service: &str) {
        let now = self.now();
        let mut inner = self.inner.lock();
        let Some(member) = inner.sessions.get_mut(&session) else {
            return;
        };
        if !member.services.remove(service) {
            return;
        }
        let zone = member.zone.clone();
        Self::leave(&mut inner, service, &zone);
        let changed = self.refresh(&mut inner, service, now);
        drop(inner);
        self.bump(changed);
    }

    /// A session ended: its follows are undone (the calls it made stay in the window).
    pub fn remove_session(&self, session: u64) {
        let now = self.now();
        let mut inner = self.inner.lock();
        let Some(member) = inner.sessions.remove(&session) else {
            return;
        };
        let mut changed = false;
        for service in &member.services {
            Self::leave(&mut inner, service, &member.zone);
            changed |= self.refresh(&mut inner, service, now);
        }
        drop(inner);
        self.bump(changed);
    }

    fn leave(inner: &mut Inner, service: &str, zone: &ZoneKey) {
        if let Some(z) = inner
            .services
            .get_mut(service)
            .and_then(|s| s.zones.get_mut(zone))
        {
            z.followers = z.followers.saturating_sub(1);
        }
    }

    /// Adds the calls of a session's load report on `service` (successes + failures of the
    /// backends it names) to its zone's window. No-op for a session without a zone or not
    /// counted as following the service.
    pub fn report(&self, session: u64, service: &str, backends: &[proto::BackendLoad]) {
        let calls = backends
            .iter()
            .fold(0u64, |a, b| {
                a.saturating_add(b.successes).saturating_add(b.failures)
            })
            .min(MAX_REPORTED_CALLS);
        if calls == 0 {
            return;
        }
        let now = self.now();
        let mut inner = self.inner.lock();
        let Inner {
            sessions, services, ..
        } = &mut *inner;
        let Some(member) = sessions.get(&session) else {
            return;
        };
        if !member.services.contains(service) {
            return;
        }
        let Some(zone) = services
            .get_mut(service)
            .and_then(|s| s.zones.get_mut(&member.zone))
        else {
            return;
        };
        zone.window.add(now, calls);
        let changed = self.refresh(&mut inner, service, now);
        drop(inner);
        self.bump(changed);
    }

    /// Lets every window slide to now and publishes what moved (called every [`TICK`]).
    pub fn tick(&self) {
        let now = self.now();
        let mut inner = self.inner.lock();
        self.refresh_all(&mut inner, now);
    }

    /// Replaces the other replicas' counts (summed per service and zone) and publishes what
    /// moved.
    pub fn set_remote(&self, remote: HashMap<Arc<str>, ZoneCounts>) {
        let now = self.now();
        let mut inner = self.inner.lock();
        let gone: Vec<Arc<str>> = inner
            .remote
            .keys()
            .filter(|s| !remote.contains_key(*s))
            .cloned()
            .collect();
        for service in remote.keys().chain(&gone) {
            if !inner.services.contains_key(service) {
                inner.services.insert(service.clone(), Service::new());
            }
        }
        inner.remote = remote;
        self.refresh_all(&mut inner, now);
    }

    /// This replica's own counts per service and zone (calls in the window, followers), for
    /// the other replicas.
    pub fn local_counts(&self) -> Vec<(Arc<str>, ZoneCounts)> {
        let now = self.now();
        let mut inner = self.inner.lock();
        let mut out: Vec<(Arc<str>, ZoneCounts)> = inner
            .services
            .iter_mut()
            .filter(|(_, s)| !s.zones.is_empty())
            .map(|(name, s)| {
                let mut zones: Vec<(ZoneKey, Counts)> = s
                    .zones
                    .iter_mut()
                    .map(|(z, c)| {
                        (
                            z.clone(),
                            Counts {
                                calls: c.window.total(now),
                                followers: c.followers,
                            },
                        )
                    })
                    .filter(|(_, c)| c.calls > 0 || c.followers > 0)
                    .collect();
                zones.sort_by(|a, b| a.0.cmp(&b.0));
                (name.clone(), zones)
            })
            .filter(|(_, zones)| !zones.is_empty())
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn refresh_all(&self, inner: &mut Inner, now: u64) {
        let names: Vec<Arc<str>> = inner.services.keys().cloned().collect();
        let mut changed = false;
        for service in names {
            changed |= self.refresh(inner, &service, now);
        }
        self.bump(changed);
    }

    /// The published shares of `service` and their generation (0 and empty when none).
    pub fn published(&self, service: &str) -> (u64, Shares) {
        self.inner
            .lock()
            .services
            .get(service)
            .map_or((0, Arc::from([])), |s| (s.generation, s.published.clone()))
    }

    /// Client zones tracked for `service` (for tests and bounds checks).
    pub fn zones(&self, service: &str) -> usize {
        self.inner
            .lock()
            .services
            .get(service)
            .map_or(0, |s| s.zones.len())
    }

    fn bump(&self, changed: bool) {
        if changed {
            self.changed.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Recomputes a service's shares at `now`, prunes what expired, publishes when they moved;
    /// returns whether a publication happened.
    fn refresh(&self, inner: &mut Inner, service: &str, now: u64) -> bool {
        let Some(s) = inner.services.get_mut(service) else {
            return false;
        };
        let mut counts: HashMap<ZoneKey, Counts> = HashMap::with_capacity(s.zones.len());
        s.zones.retain(|zone, z| {
            let c = Counts {
                calls: z.window.total(now),
                followers: z.followers,
            };
            let keep = c.calls > 0 || c.followers > 0;
            if keep {
                counts.insert(zone.clone(), c);
            }
            keep
        });
        let remote = inner.remote.get(service).map_or(&[][..], |r| &r[..]);
        for (zone, c) in remote {
            let sum = counts.entry(zone.clone()).or_default();
            sum.calls = sum.calls.saturating_add(c.calls);
            sum.followers = sum.followers.saturating_add(c.followers);
        }
        let mut counts: Vec<(ZoneKey, Counts)> = counts.into_iter().collect();
        if counts.len() > MAX_ZONES {
            // The largest zones (calls, then followers) are kept.
            counts.sort_by(|a, b| {
                (b.1.calls, b.1.followers, &a.0).cmp(&(a.1.calls, a.1.followers, &b.0))
            });
            counts.truncate(MAX_ZONES);
        }
        let new = window::shares(counts.iter().map(|(z, c)| (z, *c)));
        if new.is_empty() && s.zones.is_empty() && remote.is_empty() {
            let old = inner.services.remove(service).map(|s| s.published);
            let had = old.as_ref().is_some_and(|o| !o.is_empty());
            if let Some(old) = old {
                self.metrics.publish(service, &old, &[]);
            }
            return had;
        }
        if s.generation != 0 && !window::moved(&s.published, &new, MOVE_THRESHOLD) {
            return false;
        }
        self.metrics.publish(service, &s.published, &new);
        s.published = new.into();
        s.generation = inner.next_generation;
        inner.next_generation += 1;
        true
    }
}

/// The shares as `GlobalLoad.zone_demand`.
pub fn to_proto(shares: &[(ZoneKey, f64)]) -> Vec<proto::ZoneDemand> {
    shares
        .iter()
        .map(|(z, share)| proto::ZoneDemand {
            locality: Some(z.to_proto()),
            share: *share,
        })
        .collect()
}

/// Lets the windows slide every [`TICK`] until `stop` resolves.
pub async fn run(tracker: Arc<DemandTracker>, stop: impl std::future::Future<Output = ()>) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = every.tick() => tracker.tick(),
            () = &mut stop => return,
        }
    }
}

/// `dlb_zone_demand_share{service, zone}` (the published share, zone as `region/zone`) and
/// `dlb_zone_demand_zones_dropped_total` (follows of a zone past [`MAX_ZONES`]).
#[derive(Debug, Clone, Default)]
pub struct DemandMetrics {
    share: Family<Labels, Gauge<f64, AtomicU64>>,
    dropped: Counter,
}

impl DemandMetrics {
    /// Registers the series in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dlb_zone_demand_share",
            "Share of a service's calls made by SDK clients of each zone (region/zone), as pushed in GlobalLoad",
            m.share.clone(),
        );
        registry.register(
            "dlb_zone_demand_zones_dropped",
            "Follows not counted in zone demand because the service already had 64 client zones",
            m.dropped.clone(),
        );
        m
    }

    fn publish(&self, service: &str, old: &[(ZoneKey, f64)], new: &[(ZoneKey, f64)]) {
        let labels = |z: &ZoneKey| {
            vec![
                ("service".to_owned(), service.to_owned()),
                ("zone".to_owned(), z.label()),
            ]
        };
        for (z, _) in old {
            if !new.iter().any(|(n, _)| n == z) {
                self.share.remove(&labels(z));
            }
        }
        for (z, share) in new {
            self.share.get_or_create(&labels(z)).set(*share);
        }
    }
}

#[cfg(test)]
mod tests;
