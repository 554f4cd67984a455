//! Request and health metrics from the SDKs' load reports: what the outlier task and the picker
//! builders record, registered into the one Prometheus registry of the `metrics` module.
//!
//! Aggregated per service by default; per-backend request series only when per-backend metrics
//! are on (like `dlb_backend_in_flight`). Rates (requests/s, errors/s) are the counters' rates
//! (`rate(dlb_requests_total[1m])`); latency is a summary (a sum and a count, mean =
//! sum / count) plus the largest latency of the last report, since an SDK reports a mean and a
//! maximum per interval, not individual calls. In-flight is `dlb_in_flight` in the `metrics` module.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `dlb_requests_total` | counter | `service` |
//! | `dlb_request_errors_total` | counter | `service` |
//! | `dlb_request_latency_seconds_total` / `dlb_request_latency_measured_total` | counters | `service` (sum of latencies / calls measured: mean = ratio of their rates) |
//! | `dlb_request_latency_max_seconds` | gauge | `service` (largest in the last report) |
//! | `dlb_backend_requests_total`, `dlb_backend_request_errors_total` | counters | `service`, `server_id` (opt-in) |
//! | `dlb_outlier_ejections_total` | counter | `service` |
//! | `dlb_outlier_ejected` | gauge | `service` |
//! | `dlb_panic` | gauge | `service` (1 while in panic) |
//! | `dlb_panic_transitions_total` | counter | `service`, `to` (`panic`, `normal`) |
//! | `dlb_load_reports_dropped` | gauge | (reports the outlier task's full queue dropped, since start) |
//! | `dlb_load_forward_batches_total` | counter | `result`: `sent` (to the leader), `failed` (not sent), `received` (by the leader) — replicas on etcd only |

use dlb::proto;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The families. Cheap: every field is an `Arc` inside.
#[derive(Debug, Clone)]
pub struct HealthMetrics {
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    latency_sum: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    latency_count: Family<Labels, Counter>,
    latency_max: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    backend: Option<(Family<Labels, Counter>, Family<Labels, Counter>)>,
    ejections: Family<Labels, Counter>,
    ejected: Family<Labels, Gauge>,
    panic: Family<Labels, Gauge>,
    transitions: Family<Labels, Counter>,
    dropped: Gauge,
    forwards: Family<Labels, Counter>,
}

fn svc(service: &str) -> Labels {
    vec![("service".to_owned(), service.to_owned())]
}

impl HealthMetrics {
    /// Registers the families in `registry`; `per_backend` adds the per-backend request series.
    pub fn register(registry: &mut Registry, per_backend: bool) -> Self {
        let m = Self {
            requests: Family::default(),
            errors: Family::default(),
            latency_sum: Family::default(),
            latency_count: Family::default(),
            latency_max: Family::default(),
            backend: per_backend.then(|| (Family::default(), Family::default())),
            ejections: Family::default(),
            ejected: Family::default(),
            panic: Family::default(),
            transitions: Family::default(),
            dropped: Gauge::default(),
            forwards: Family::default(),
        };
        registry.register(
            "dlb_load_forward_batches",
            "Batches of load-report sums forwarded between replicas, by result (sent, failed, received)",
            m.forwards.clone(),
        );
        registry.register(
            "dlb_load_reports_dropped",
            "Load reports not analysed because the outlier task's queue was full (since start)",
            m.dropped.clone(),
        );
        registry.register(
            "dlb_requests",
            "Calls completed, from the SDKs' load reports",
            m.requests.clone(),
        );
        registry.register(
            "dlb_request_errors",
            "Calls failed, from the SDKs' load reports",
            m.errors.clone(),
        );
        registry.register(
            "dlb_request_latency_seconds",
            "Sum of call latencies in seconds, from the SDKs' load reports",
            m.latency_sum.clone(),
        );
        registry.register(
            "dlb_request_latency_measured",
            "Calls with a measured latency, from the SDKs' load reports",
            m.latency_count.clone(),
        );
        registry.register(
            "dlb_request_latency_max_seconds",
            "Largest call latency in the last load report",
            m.latency_max.clone(),
        );
        if let Some((r, e)) = &m.backend {
            registry.register(
                "dlb_backend_requests",
                "Calls completed per backend",
                r.clone(),
            );
            registry.register(
                "dlb_backend_request_errors",
                "Calls failed per backend",
                e.clone(),
            );
        }
        registry.register(
            "dlb_outlier_ejections",
            "Backends ejected by outlier detection",
            m.ejections.clone(),
        );
        registry.register(
            "dlb_outlier_ejected",
            "Backends ejected by outlier detection now",
            m.ejected.clone(),
        );
        registry.register(
            "dlb_panic",
            "1 while the service is in panic (too few eligible backends)",
            m.panic.clone(),
        );
        registry.register(
            "dlb_panic_transitions",
            "Panic entered (to=panic) and left (to=normal)",
            m.transitions.clone(),
        );
        m
    }

    /// Records one load report's outcomes.
    pub fn requests(&self, service: &str, loads: &[proto::BackendLoad]) {
        let labels = svc(service);
        let (mut ok, mut failed, mut n, mut sum, mut max) = (0u64, 0u64, 0u64, 0f64, 0f64);
        for l in loads {
            ok = ok.saturating_add(l.successes);
            failed = failed.saturating_add(l.failures);
            if let Some(lat) = &l.latency {
                if lat.mean_ms.is_finite() && lat.mean_ms >= 0.0 && lat.max_ms.is_finite() {
                    n = n.saturating_add(lat.count);
                    sum += lat.mean_ms * lat.count as f64 / 1000.0;
                    max = max.max(lat.max_ms / 1000.0);
                }
            }
            if let Some((r, e)) = &self.backend {
                let bl = vec![
                    ("service".to_owned(), service.to_owned()),
                    ("server_id".to_owned(), l.server_id.clone()),
                ];
                r.get_or_create(&bl)
                    .inc_by(l.successes.saturating_add(l.failures));
                e.get_or_create(&bl).inc_by(l.failures);
            }
        }
        self.requests
            .get_or_create(&labels)
            .inc_by(ok.saturating_add(failed));
        self.errors.get_or_create(&labels).inc_by(failed);
        if n > 0 {
            self.latency_count.get_or_create(&labels).inc_by(n);
            self.latency_sum.get_or_create(&labels).inc_by(sum);
            self.latency_max.get_or_create(&labels).set(max);
        }
    }

    /// Load reports dropped since start.
    pub fn dropped_reports(&self, n: u64) {
        self.dropped.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// One batch of load-report sums forwarded: `result` is `sent`, `failed` or `received` (see [`crate::reports::forward`]).
    pub fn forward(&self, result: &'static str) {
        self.forwards
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc();
    }

    /// One backend ejected.
    pub fn ejection(&self, service: &str) {
        self.ejections.get_or_create(&svc(service)).inc();
    }

    /// Backends ejected now.
    pub fn ejected(&self, service: &str, n: usize) {
        self.ejected
            .get_or_create(&svc(service))
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The service's panic state (a transition is counted when `changed`).
    pub fn panic(&self, service: &str, active: bool, changed: bool) {
        self.panic
            .get_or_create(&svc(service))
            .set(i64::from(active));
        if changed {
            self.transitions
                .get_or_create(&vec![
                    ("service".to_owned(), service.to_owned()),
                    (
                        "to".to_owned(),
                        if active { "panic" } else { "normal" }.to_owned(),
                    ),
                ])
                .inc();
        }
    }
}
