//! Prometheus metrics of one [`crate::Client`], for the application to export beside its own:
//! whether the session is up, and per followed service the age of the snapshot it routes on, the
//! version, staleness, the update counters and the backends by eligibility.
//!
//! [`ClientMetrics`] is a `prometheus_client` [`Collector`]: it holds no state and reads the
//! client when scraped (`O(services + backends)`, never on the pick path). It holds the client
//! weakly, so registering it does not keep a closed client alive; a dropped client exports
//! nothing. [`ClientMetrics::encode_text`] gives the same series in the text format for an
//! application without a `prometheus_client` registry of its own.
//!
//! | series | type | labels |
//! |---|---|---|
//! | `dlb_sdk_connected` | gauge | — (1 while a session with the control plane is up) |
//! | `dlb_sdk_sessions_total` | counter | — (sessions established) |
//! | `dlb_sdk_update_deadline_expiries_total` | counter | — (sessions abandoned as silent) |
//! | `dlb_sdk_last_update_age_seconds` | gauge | `service` (since the last update was applied; absent before the first) |
//! | `dlb_sdk_stale` | gauge | `service` (1 while routing on a held-back or file snapshot) |
//! | `dlb_sdk_version` | gauge | `service` |
//! | `dlb_sdk_updates_total` | counter | `service`, `kind` (`full`, `delta`) |
//! | `dlb_sdk_nacks_total`, `dlb_sdk_held_back_total`, `dlb_sdk_rebuilds_total` | counter | `service` |
//! | `dlb_sdk_regressions_refused_total` | counter | `service` (same-epoch updates older than the version routed on, refused; the client moved to another endpoint) |
//! | `dlb_sdk_backends` | gauge | `service`, `eligible` (`true`, `false`) |
//! | `dlb_sdk_locality_local_share` | gauge | `service` (share of the calls the locality plan keeps in the client's zone; only for a client with a zone and a grouped service) |
//! | `dlb_sdk_locality_spill` | gauge | `service`, `reason` (1 for why calls leave the zone: `none`, `local_capacity`, `budget_capped`, `local_down`, …; grouped services) |
//! | `dlb_sdk_call_requests_total`, `dlb_sdk_call_retries_total`, `dlb_sdk_call_hedges_total`, `dlb_sdk_call_budget_exhausted_total`, `dlb_sdk_call_cancelled_total` | counter | `service` (the call path, [`crate::call`]) |
//! | `dlb_sdk_call_errors_total` | counter | `service`, `class` (`status`, `connect`, `transport`, `deadline`, `no_backend`) |
//! | `dlb_sdk_call_latency_seconds` | histogram | `service` |
//! | `dlb_sdk_call_backend_latency_seconds` | histogram | `service`, `backend` (opt-in: `CallOptions::per_backend_latency`) |

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::state::ServiceState;

/// The metrics of one client (see the module docs). From [`crate::Client::metrics`].
#[derive(Debug, Clone)]
pub struct ClientMetrics {
    pub(crate) inner: Weak<crate::Inner>,
}

impl ClientMetrics {
    /// The series in the Prometheus text format (what a `/metrics` endpoint serves), appended to
    /// `out` without the final `# EOF` line, so it can follow the application's own series.
    pub fn encode_text(&self, out: &mut String) -> std::fmt::Result {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self.clone()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode_registry(&mut text, &registry)?;
        out.push_str(&text);
        Ok(())
    }
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue + std::fmt::Debug + Send + Sync>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> std::fmt::Result {
    let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(m)
}

impl Collector for ClientMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let link = &inner.link;
        gauge(
            &mut encoder,
            "dlb_sdk_connected",
            "1 while the client's session with the control plane is up",
            i64::from(*link.connected.borrow()),
        )?;
        let m = encoder.encode_descriptor(
            "dlb_sdk_sessions",
            "Sessions with the control plane established",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(link.sessions.load(Ordering::Relaxed)).encode(m)?;
        let m = encoder.encode_descriptor(
            "dlb_sdk_update_deadline_expiries",
            "Sessions abandoned because nothing arrived within the update deadline",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(link.deadline_expiries.load(Ordering::Relaxed)).encode(m)?;

        let mut services: Vec<Arc<ServiceState>> =
            inner.services.lock().values().cloned().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let mut calls: Vec<(String, Arc<crate::call::CallStats>)> = inner
            .calls
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        calls.sort_by(|a, b| a.0.cmp(&b.0));
        drop(inner);

        let mut m = encoder.encode_descriptor(
            "dlb_sdk_last_update_age_seconds",
            "Time since the last update of the service was applied (grows while no control plane answers)",
            None,
            MetricType::Gauge,
        )?;
        for s in &services {
            if let Some(at) = *s.last_update.lock() {
                let labels = [("service", s.name.as_str())];
                ConstGauge::new(at.elapsed().as_secs_f64()).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "dlb_sdk_stale",
            "1 while the service routes on a snapshot held back or restored from the snapshot file",
            None,
            MetricType::Gauge,
        )?;
        for s in &services {
            let labels = [("service", s.name.as_str())];
            let stale = i64::from(s.snapshot.load().stale);
            ConstGauge::new(stale).encode(m.encode_family(&labels)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "dlb_sdk_version",
            "The service version the client routes on (0 before the first snapshot)",
            None,
            MetricType::Gauge,
        )?;
        for s in &services {
            let labels = [("service", s.name.as_str())];
            ConstGauge::new(s.snapshot.load().version.version).encode(m.encode_family(&labels)?)?;
        }
        let stats: Vec<_> = services
            .iter()
            .map(|s| (s.name.as_str(), s.stats.read()))
            .collect();
        let mut m = encoder.encode_descriptor(
            "dlb_sdk_updates",
            "Updates applied, by kind (full snapshot or delta)",
            None,
            MetricType::Counter,
        )?;
        for (name, st) in &stats {
            for (kind, n) in [("full", st.full_updates), ("delta", st.delta_updates)] {
                let labels = [("service", *name), ("kind", kind)];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        type Pick = fn(&crate::ServiceStats) -> u64;
        let counters: [(&str, &str, Pick); 4] = [
            ("dlb_sdk_nacks", "Updates rejected (nacked)", |s| s.nacks),
            (
                "dlb_sdk_held_back",
                "Updates that would have emptied the service from a new store history, held back",
                |s| s.held_back,
            ),
            ("dlb_sdk_rebuilds", "Pickers built", |s| s.rebuilds),
            (
                "dlb_sdk_regressions_refused",
                "Updates older than the version routed on (same epoch), refused; the client moved to another endpoint",
                |s| s.regressions_refused,
            ),
        ];
        for (name, help, pick) in counters {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (service, st) in &stats {
                let labels = [("service", *service)];
                ConstCounter::new(pick(st)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "dlb_sdk_backends",
            "Backends of the snapshot the service routes on, by eligibility",
            None,
            MetricType::Gauge,
        )?;
        for s in &services {
            let snap = s.snapshot.load();
            let Some(picker) = &snap.picker else { continue };
            let eligible = picker.backends().iter().filter(|b| b.is_eligible()).count();
            let total = picker.backends().len();
            for (flag, n) in [("true", eligible), ("false", total - eligible)] {
                let labels = [("service", s.name.as_str()), ("eligible", flag)];
                ConstGauge::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        let plans: Vec<(&str, Arc<crate::LocalityStatus>)> = services
            .iter()
            .filter_map(|s| Some((s.name.as_str(), s.locality.lock().clone()?)))
            .collect();
        let mut m = encoder.encode_descriptor(
            "dlb_sdk_locality_local_share",
            "Share of the service's calls the locality plan keeps in this client's zone",
            None,
            MetricType::Gauge,
        )?;
        for (name, p) in plans.iter().filter(|(_, p)| p.zone.is_some()) {
            let labels = [("service", *name)];
            ConstGauge::new(p.local).encode(m.encode_family(&labels)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "dlb_sdk_locality_spill",
            "1 for the reason calls leave this client's zone (none: they do not)",
            None,
            MetricType::Gauge,
        )?;
        for (name, p) in &plans {
            let labels = [("service", *name), ("reason", p.spill)];
            ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
        }
        let calls: Vec<(&str, &crate::call::CallStats)> =
            calls.iter().map(|(n, s)| (n.as_str(), &**s)).collect();
        crate::call::encode_stats(&mut encoder, &calls)
    }
}
