//! Prometheus metrics of the health checker, registered in the server's registry by
//! the server's `Metrics`. Aggregated (no per-backend series):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `dlb_health_probes_total` | counter | `kind` (http, tcp, grpc), `result` (pass, fail, unknown) |
//! | `dlb_health_probe_rtt_seconds` | histogram | | (every probe that ran, pass or fail) |
//! | `dlb_health_probes_in_flight` | gauge | |
//! | `dlb_health_transitions_total` | counter | `to` (healthy, unhealthy) |
//! | `dlb_health_flap_hold_downs_total` | counter | | (hold-downs started by flap damping) |
//! | `dlb_health_targets` | gauge | | (backends under active checks, by any replica) |
//! | `dlb_health_backends_probed` | gauge | | (of those, the ones this replica probes) |
//!
//! `unknown` counts probes that could not run because the checker was at its bound of probes in
//! flight: they are never failures.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// The checker's metrics (cheap clones of shared atomics).
#[derive(Debug, Clone)]
pub struct HealthMetrics {
    probes: Family<Labels, Counter>,
    rtt: Histogram,
    in_flight: Gauge,
    transitions: Family<Labels, Counter>,
    hold_downs: Counter,
    targets: Gauge,
    probed: Gauge,
}

impl Default for HealthMetrics {
    fn default() -> Self {
        Self {
            probes: Family::default(),
            // 50 µs … ~1.6 s
            rtt: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            in_flight: Gauge::default(),
            transitions: Family::default(),
            hold_downs: Counter::default(),
            targets: Gauge::default(),
            probed: Gauge::default(),
        }
    }
}

impl HealthMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dlb_health_probes",
            "Active health probes by kind and result (unknown: not run, the checker was overloaded)",
            m.probes.clone(),
        );
        registry.register(
            "dlb_health_probe_rtt_seconds",
            "Round-trip time of active health probes that ran",
            m.rtt.clone(),
        );
        registry.register(
            "dlb_health_probes_in_flight",
            "Active health probes running now",
            m.in_flight.clone(),
        );
        registry.register(
            "dlb_health_transitions",
            "Probe-source state transitions written to the store, by new state",
            m.transitions.clone(),
        );
        registry.register(
            "dlb_health_flap_hold_downs",
            "Hold-downs started by flap damping",
            m.hold_downs.clone(),
        );
        registry.register(
            "dlb_health_targets",
            "Backends under active health checks",
            m.targets.clone(),
        );
        registry.register(
            "dlb_health_backends_probed",
            "Backends under active health checks that this replica probes (its share)",
            m.probed.clone(),
        );
        m
    }

    /// Counts one probe.
    pub fn probe(&self, kind: &'static str, result: &'static str) {
        self.probes
            .get_or_create(&vec![("kind", kind), ("result", result)])
            .inc();
    }

    /// Records a probe's round-trip time.
    pub fn rtt(&self, seconds: f64) {
        self.rtt.observe(seconds);
    }

    /// Adds `delta` to the probes in flight.
    pub fn in_flight(&self, delta: i64) {
        self.in_flight.inc_by(delta);
    }

    /// Counts a transition.
    pub fn transition(&self, to: &'static str) {
        self.transitions.get_or_create(&vec![("to", to)]).inc();
    }

    /// Counts a hold-down.
    pub fn hold_down(&self) {
        self.hold_downs.inc();
    }

    /// Sets the number of checked backends.
    pub fn targets(&self, n: usize) {
        self.targets.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

impl HealthMetrics {
    /// Sets the number of checked backends this replica probes.
    pub fn probed(&self, n: usize) {
        self.probed.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
