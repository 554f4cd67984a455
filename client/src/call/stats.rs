//! What the call path counts per service, for [`crate::Client::metrics`]: requests, errors by
//! class, retries, hedges, budget refusals, cancelled calls, and a latency histogram (aggregate;
//! per backend when asked). Atomics only on the call path, except the opt-in per-backend map
//! (one short lock per call).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// Upper bounds of the latency buckets, in seconds.
pub(crate) const BUCKETS: [f64; 16] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

/// Why a call (or an attempt) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The backend answered with a failure status (gRPC failure code, HTTP 5xx).
    Status,
    /// No connection could be opened.
    Connect,
    /// The connection failed during the call.
    Transport,
    /// The caller's deadline (`grpc-timeout`) passed.
    Deadline,
    /// No backend could be picked.
    NoBackend,
}

impl ErrorClass {
    /// Every class, in label order.
    pub const ALL: [ErrorClass; 5] = [
        ErrorClass::Status,
        ErrorClass::Connect,
        ErrorClass::Transport,
        ErrorClass::Deadline,
        ErrorClass::NoBackend,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            ErrorClass::Status => "status",
            ErrorClass::Connect => "connect",
            ErrorClass::Transport => "transport",
            ErrorClass::Deadline => "deadline",
            ErrorClass::NoBackend => "no_backend",
        }
    }
}

/// A latency histogram with fixed buckets ([`BUCKETS`]).
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts with their upper bounds, +Inf last).
    pub(crate) fn read(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
        let mut count = 0;
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            count += n;
            buckets.push((BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), n));
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

/// A snapshot of one service's call-path counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallCounts {
    /// Requests handed to the call path.
    pub requests: u64,
    /// Calls that ended as failures, by class (see [`ErrorClass::label`]).
    pub errors: Vec<(&'static str, u64)>,
    /// Retries sent.
    pub retries: u64,
    /// Hedges sent.
    pub hedges: u64,
    /// Retries or hedges refused by the budget.
    pub budget_exhausted: u64,
    /// Calls whose response was dropped before its outcome was known.
    pub cancelled: u64,
    /// Calls timed (the latency histogram's count).
    pub timed: u64,
}

/// The call-path counters of one service (shared by every [`super::Balance`] of it).
#[derive(Debug)]
pub struct CallStats {
    /// The latencies of recent calls (a decaying histogram), for the hedge delay's pN.
    pub(crate) recent: dlb::call::latency::LatencyTracker,
    pub(crate) requests: AtomicU64,
    errors: [AtomicU64; 5],
    pub(crate) retries: AtomicU64,
    pub(crate) hedges: AtomicU64,
    pub(crate) budget_exhausted: AtomicU64,
    cancelled: AtomicU64,
    pub(crate) latency: Histogram,
    /// Whether per-backend histograms are kept (set by a `Balance` that asks for them).
    pub(crate) per_backend: AtomicBool,
    /// Per-backend histograms, when `per_backend`. A `Mutex` because it is touched once per
    /// call only when enabled, and never across `.await`.
    pub(crate) backends: Mutex<HashMap<String, std::sync::Arc<Histogram>>>,
}

impl Default for CallStats {
    fn default() -> Self {
        Self {
            recent: dlb::call::latency::LatencyTracker::new(
                RECENT_PERIOD,
                super::policy::TokioClock::shared(),
            ),
            requests: AtomicU64::default(),
            errors: Default::default(),
            retries: AtomicU64::default(),
            hedges: AtomicU64::default(),
            budget_exhausted: AtomicU64::default(),
            cancelled: AtomicU64::default(),
            latency: Histogram::default(),
            per_backend: AtomicBool::default(),
            backends: Mutex::default(),
        }
    }
}

/// The hedge delay's percentile covers the calls of the last 10..20 s.
const RECENT_PERIOD: Duration = Duration::from_secs(10);

impl CallStats {
    /// One call ended after `latency`; `class` when it failed.
    pub(crate) fn record(&self, backend: &str, latency: Duration, class: Option<ErrorClass>) {
        self.latency.observe(latency);
        self.recent.record(latency);
        if let Some(c) = class {
            self.error(c);
        }
        if self.per_backend.load(Ordering::Relaxed) {
            let h = self
                .backends
                .lock()
                .entry(backend.to_owned())
                .or_default()
                .clone();
            h.observe(latency);
        }
    }

    /// A call failed with `class` (without a latency: it never got a response).
    pub(crate) fn error(&self, class: ErrorClass) {
        let i = ErrorClass::ALL
            .iter()
            .position(|c| *c == class)
            .unwrap_or(0);
        self.errors[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    /// The current counts.
    pub fn counts(&self) -> CallCounts {
        CallCounts {
            requests: self.requests.load(Ordering::Relaxed),
            errors: ErrorClass::ALL
                .iter()
                .zip(&self.errors)
                .map(|(c, n)| (c.label(), n.load(Ordering::Relaxed)))
                .collect(),
            retries: self.retries.load(Ordering::Relaxed),
            hedges: self.hedges.load(Ordering::Relaxed),
            budget_exhausted: self.budget_exhausted.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            timed: self.latency.read().1,
        }
    }
}

/// Encodes the call-path series of `services` (see the `metrics` module).
pub(crate) fn encode(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    services: &[(&str, &CallStats)],
) -> std::fmt::Result {
    use prometheus_client::encoding::EncodeMetric;
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::MetricType;

    let counts: Vec<(&str, CallCounts)> = services.iter().map(|(n, s)| (*n, s.counts())).collect();
    type Get = fn(&CallCounts) -> u64;
    let simple: [(&str, &str, Get); 5] = [
        (
            "dlb_sdk_call_requests",
            "Requests handed to the call path",
            |c| c.requests,
        ),
        (
            "dlb_sdk_call_retries",
            "Retries sent by the call path",
            |c| c.retries,
        ),
        (
            "dlb_sdk_call_hedges",
            "Hedged copies sent by the call path",
            |c| c.hedges,
        ),
        (
            "dlb_sdk_call_budget_exhausted",
            "Retries or hedges not sent because the retry budget was spent",
            |c| c.budget_exhausted,
        ),
        (
            "dlb_sdk_call_cancelled",
            "Calls whose response was dropped before their outcome was known",
            |c| c.cancelled,
        ),
    ];
    for (name, help, get) in simple {
        let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (service, c) in &counts {
            let labels = [("service", *service)];
            ConstCounter::new(get(c)).encode(m.encode_family(&labels)?)?;
        }
    }
    let mut m = encoder.encode_descriptor(
        "dlb_sdk_call_errors",
        "Failed attempts of the call path, by class",
        None,
        MetricType::Counter,
    )?;
    for (service, c) in &counts {
        for (class, n) in &c.errors {
            let labels = [("service", *service), ("class", *class)];
            ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
        }
    }
    let mut m = encoder.encode_descriptor(
        "dlb_sdk_call_latency_seconds",
        "Latency of calls through the call path (pick to end of response)",
        None,
        MetricType::Histogram,
    )?;
    for (service, s) in services {
        let (sum, count, buckets) = s.latency.read();
        let labels = [("service", *service)];
        m.encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                sum, count, &buckets, None,
            )?;
    }
    let mut m = encoder.encode_descriptor(
        "dlb_sdk_call_backend_latency_seconds",
        "Latency of calls per backend (only when per-backend latency is enabled)",
        None,
        MetricType::Histogram,
    )?;
    for (service, s) in services {
        let mut per: Vec<(String, std::sync::Arc<Histogram>)> = s
            .backends
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        per.sort_by(|a, b| a.0.cmp(&b.0));
        for (backend, h) in per {
            let (sum, count, buckets) = h.read();
            let labels = [("service", *service), ("backend", backend.as_str())];
            m.encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum, count, &buckets, None,
                )?;
        }
    }
    Ok(())
}
