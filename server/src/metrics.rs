//! Prometheus metrics and the `/metrics` HTTP endpoint.
//!
//! All series are aggregated per service or per method; there are no per-backend series, so
//! cardinality stays bounded by (services × a few labels). The metric objects are atomics inside
//! `prometheus-client` families (which use their own short internal `RwLock`); nothing here is
//! held across `.await`. The HTTP endpoint is a small axum router on its own listener.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `dlb_sessions_connected` | gauge | |
//! | `dlb_rpcs_total` | counter | `method`, `code` |
//! | `dlb_backends` | gauge | `service`, `health` (healthy, unhealthy, draining) |
//! | `dlb_push_latency_seconds` | histogram | |
//! | `dlb_service_version` | gauge | `service` |
//! | `dlb_in_flight` | gauge | `service` (sum of in-flight calls reported by SDKs) |
//! | `dlb_sessions_lagging` | gauge | | (sessions whose outbound queue is full: not reading) |
//! | `dlb_sessions_stalled_total` | counter | | (sessions cut for not reading past the deadline) |
//! | `dlb_zone_demand_share` / `dlb_zone_demand_zones_dropped_total` | gauge / counter | `service`, `zone` / — (see [`crate::reports::demand`]) |
//! | `dlb_backend_in_flight` | gauge | `service`, `server_id` — only with per-backend metrics on |
//! | `dlb_xds_streams` / `dlb_xds_nacks_total` | gauge / counter | — / `type` (registered by the xDS front-end: `api::xds::XdsMetrics`) |
//! | `dlb_ready` / `dlb_cache_revision` | gauge | | (see [`crate::readiness`]) |
//!
//! Per-backend series are opt-in ([`Metrics::with_per_backend`]): their exported ids per service
//! are remembered in a `parking_lot::Mutex<HashMap<..>>` so that series of backends that no
//! longer report are removed rather than left stale.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use parking_lot::Mutex;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::store::ServiceSnapshot;

type Labels = Vec<(String, String)>;

/// The per-backend gauge family and, per service, the backend ids it currently exports.
type PerBackend = (
    Family<Labels, Gauge>,
    Mutex<HashMap<String, HashSet<String>>>,
);

/// The control plane's metrics. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sessions: Gauge,
    rpcs: Family<Labels, Counter>,
    backends: Family<Labels, Gauge>,
    push_latency: Histogram,
    versions: Family<Labels, Gauge>,
    in_flight: Family<Labels, Gauge>,
    lagging: Gauge,
    stalled: Counter,
    /// Drain barriers by what ended them, their duration, and those that hit their deadline.
    barrier_waits: Family<Labels, Counter>,
    barrier_seconds: Histogram,
    barrier_timeouts: Counter,
    /// Per-backend in-flight gauges, when enabled, and the ids exported per service.
    per_backend: Option<PerBackend>,
    /// Request, outlier and panic metrics (see [`crate::health::passive::metrics`]).
    pub passive: crate::health::passive::metrics::HealthMetrics,
    /// The health checker's series (see [`crate::health::active::metrics`]).
    pub health: crate::health::active::metrics::HealthMetrics,
    /// Automatic discovery: leases and DNS (see [`crate::membership::MembershipMetrics`]).
    pub membership: crate::membership::MembershipMetrics,
    /// The SDKs' circuit-breaker states (see [`crate::reports::circuits`]).
    pub circuits: crate::reports::circuits::CircuitMetrics,
    /// Zone demand shares (see [`crate::reports::demand`]).
    pub demand: crate::reports::demand::DemandMetrics,
    /// `dlb_ready` and `dlb_cache_revision` (see [`crate::readiness`]).
    pub readiness: crate::readiness::ReadinessMetrics,
    /// `dlb_replica_leader` and `dlb_replica_members` (see [`crate::replicas`]).
    pub replicas: crate::replicas::ReplicaMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry, without per-backend series.
    pub fn new() -> Self {
        Self::with_per_backend(false)
    }

    /// Like [`Metrics::new`]; `per_backend` also exports `dlb_backend_in_flight` per backend.
    pub fn with_per_backend(per_backend: bool) -> Self {
        let mut registry = Registry::default();
        let sessions = Gauge::default();
        let rpcs = Family::<Labels, Counter>::default();
        let backends = Family::<Labels, Gauge>::default();
        // 50 µs … ~1.6 s
        let push_latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        let versions = Family::<Labels, Gauge>::default();
        let in_flight = Family::<Labels, Gauge>::default();
        let lagging = Gauge::default();
        registry.register(
            "dlb_sessions_lagging",
            "Sessions whose outbound queue is full (the client is not reading)",
            lagging.clone(),
        );
        let stalled = Counter::default();
        registry.register(
            "dlb_sessions_stalled",
            "Sessions cut because they did not read for longer than the stall deadline",
            stalled.clone(),
        );
        registry.register(
            "dlb_sessions_connected",
            "Discovery sessions currently connected",
            sessions.clone(),
        );
        registry.register(
            "dlb_rpcs",
            "gRPC calls by method and status code",
            rpcs.clone(),
        );
        registry.register(
            "dlb_backends",
            "Backends per service by health (healthy, unhealthy, draining)",
            backends.clone(),
        );
        registry.register(
            "dlb_push_latency_seconds",
            "Time from a store write to the update being handed to a session's stream",
            push_latency.clone(),
        );
        registry.register(
            "dlb_service_version",
            "Current version of each service",
            versions.clone(),
        );
        registry.register(
            "dlb_in_flight",
            "Calls in flight per service, summed over the load reports of all SDK sessions",
            in_flight.clone(),
        );
        let barrier_waits = Family::<Labels, Counter>::default();
        registry.register(
            "dlb_drain_barrier_waits",
            "Drain barriers waited on, by what ended them (confirmed, in_flight_zero, deadline)",
            barrier_waits.clone(),
        );
        // 1 ms … ~65 s
        let barrier_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register(
            "dlb_drain_barrier_seconds",
            "How long drain barriers waited",
            barrier_seconds.clone(),
        );
        let barrier_timeouts = Counter::default();
        registry.register(
            "dlb_drain_barrier_timeouts",
            "Drain barriers that reached their deadline before every client confirmed",
            barrier_timeouts.clone(),
        );
        let passive =
            crate::health::passive::metrics::HealthMetrics::register(&mut registry, per_backend);
        let circuits = crate::reports::circuits::CircuitMetrics::register(&mut registry);
        let demand = crate::reports::demand::DemandMetrics::register(&mut registry);
        let per_backend = per_backend.then(|| {
            let family = Family::<Labels, Gauge>::default();
            registry.register(
                "dlb_backend_in_flight",
                "Calls in flight per backend, summed over the load reports of all SDK sessions",
                family.clone(),
            );
            (family, Mutex::new(HashMap::new()))
        });
        let membership = crate::membership::MembershipMetrics::registered(&mut registry);
        let health = crate::health::active::metrics::HealthMetrics::register(&mut registry);
        let readiness = crate::readiness::ReadinessMetrics::registered(&mut registry);
        let replicas = crate::replicas::ReplicaMetrics::registered(&mut registry);
        Self {
            readiness,
            replicas,
            passive,
            circuits,
            demand,
            health,
            membership,
            lagging,
            stalled,
            barrier_waits,
            barrier_seconds,
            barrier_timeouts,
            per_backend,
            registry,
            sessions,
            rpcs,
            backends,
            push_latency,
            versions,
            in_flight,
        }
    }

    /// Registers a subsystem's own metrics in the one registry (before the aggregate is
    /// shared): the subsystem keeps the handles `register` returns.
    pub fn register_part<T>(&mut self, register: impl FnOnce(&mut Registry) -> T) -> T {
        register(&mut self.registry)
    }

    /// A session connected (+1) or closed (-1).
    pub fn session_delta(&self, delta: i64) {
        self.sessions.inc_by(delta);
    }

    /// Counts one finished RPC.
    pub fn rpc(&self, method: &str, code: tonic::Code) {
        self.rpcs
            .get_or_create(&vec![
                ("method".to_owned(), method.to_owned()),
                ("code".to_owned(), format!("{code:?}")),
            ])
            .inc();
    }

    /// A drain barrier ended (`ended`: `confirmed`, `in_flight_zero` or `deadline`) after
    /// `seconds`.
    pub fn barrier(&self, ended: &str, seconds: f64) {
        self.barrier_waits
            .get_or_create(&vec![("ended".to_owned(), ended.to_owned())])
            .inc();
        self.barrier_seconds.observe(seconds);
        if ended == "deadline" {
            self.barrier_timeouts.inc();
        }
    }

    /// A session's outbound queue became full (`+1`) or drained again (`-1`).
    pub fn lagging(&self, delta: i64) {
        self.lagging.inc_by(delta);
    }

    /// Counts one session cut for stalling.
    pub fn stalled(&self) {
        self.stalled.inc();
    }

    /// Records one push latency.
    pub fn push_latency(&self, seconds: f64) {
        self.push_latency.observe(seconds);
    }

    /// Updates the per-service gauges from a snapshot.
    pub fn service(&self, snapshot: &ServiceSnapshot) {
        let (mut healthy, mut unhealthy, mut draining) = (0i64, 0i64, 0i64);
        for s in snapshot.servers.values() {
            if s.draining {
                draining += 1;
            } else if s.health == dlb::proto::HealthStatus::Unhealthy as i32 {
                unhealthy += 1;
            } else {
                healthy += 1;
            }
        }
        for (health, n) in [
            ("healthy", healthy),
            ("unhealthy", unhealthy),
            ("draining", draining),
        ] {
            self.backends
                .get_or_create(&vec![
                    ("service".to_owned(), snapshot.name.clone()),
                    ("health".to_owned(), health.to_owned()),
                ])
                .set(n);
        }
        self.versions
            .get_or_create(&vec![("service".to_owned(), snapshot.name.clone())])
            .set(i64::try_from(snapshot.version.version).unwrap_or(i64::MAX));
    }

    /// Sets the reported in-flight counts of a service from its per-backend sums.
    pub fn in_flight(&self, service: &str, totals: &HashMap<String, u64>) {
        let total = totals.values().fold(0u64, |a, n| a.saturating_add(*n));
        self.in_flight
            .get_or_create(&vec![("service".to_owned(), service.to_owned())])
            .set(i64::try_from(total).unwrap_or(i64::MAX));
        if let Some((family, exported)) = &self.per_backend {
            let labels = |id: &str| {
                vec![
                    ("service".to_owned(), service.to_owned()),
                    ("server_id".to_owned(), id.to_owned()),
                ]
            };
            let mut exported = exported.lock();
            let ids = exported.entry(service.to_owned()).or_default();
            for id in ids.iter().filter(|id| !totals.contains_key(*id)) {
                family.remove(&labels(id));
            }
            ids.retain(|id| totals.contains_key(id));
            for (id, n) in totals {
                family
                    .get_or_create(&labels(id))
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
                ids.insert(id.clone());
            }
        }
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The `/metrics` router.
pub fn router(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                match metrics.render() {
                    Ok(body) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        }),
    )
}
