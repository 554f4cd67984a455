//! Locality observability on the control plane: the plan `dlbd` computes for each client zone
//! of a service (`GetLocalityPlan`, `dlbctl locality show`) and its locality metrics, both from
//! the same inputs an SDK of that zone plans with (docs/locality.md, "Operating it"):
//!
//! * the service's cached records and policy (eligibility as `dlbd`'s own picker sees it,
//!   latency shares, slow start: [`dlb::routing::plan_zones`]);
//! * the global in-flight counts summed from the SDKs' load reports
//!   ([`crate::reports::loads`]), for load-aware capacity;
//! * the zone demand pushed to the SDKs ([`crate::reports::demand`]).
//!
//! **Metrics**, computed at scrape time by [`LocalityCollector`] (nothing is kept between
//! scrapes, so a zone or service that goes away leaves no stale series):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `dlb_locality_local_share` | gauge | `service`, `client_zone` (`region/zone`): share the plan keeps in the zone |
//! | `dlb_locality_spill` | gauge | `service`, `client_zone`, `reason` (`Spill::as_str`): 1 for the current reason |
//!
//! Bounds: at most [`MAX_ZONES`] client zones per service (the demand tracker's own cap) and
//! the first [`MAX_METRIC_SERVICES`] services by name per scrape; only services whose backends
//! have a zone or a priority above 0 are exported (others have no locality to observe).

use std::sync::{Arc, OnceLock};

use dlb::locality::ZoneKey;
use dlb::routing::ZonePlans;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::cache::Cache;
use crate::reports::demand::DemandTracker;
use crate::reports::loads::LoadTracker;
use crate::store::ServiceSnapshot;

/// Most client zones planned per service (as many as the demand tracker tracks).
pub const MAX_ZONES: usize = crate::reports::demand::MAX_ZONES;
/// Most services the metrics scan per scrape (the first by name).
pub const MAX_METRIC_SERVICES: usize = 1_000;

/// What the plans are computed from.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    pub cache: Arc<Cache>,
    pub loads: Arc<LoadTracker>,
    pub demand: Arc<DemandTracker>,
}

impl Sources {
    /// The plans of `snap`'s client zones, and whether zone demand is known.
    pub fn plans(&self, snap: &ServiceSnapshot) -> (ZonePlans, bool) {
        let (_, published) = self.demand.published(&snap.name);
        let demand: Vec<(ZoneKey, f64)> = published
            .iter()
            .map(|(z, share)| {
                (
                    ZoneKey {
                        region: z.region.clone(),
                        zone: z.zone.clone(),
                    },
                    *share,
                )
            })
            .collect();
        let locality = dlb::locality::config(&snap.policy);
        let totals = if locality.saturation.is_some() {
            self.loads.totals(&snap.name)
        } else {
            Default::default()
        };
        let plans = dlb::routing::plan_zones(
            &snap.policy,
            snap.servers.values().map(|s| &**s),
            |id| totals.get(id).copied().unwrap_or(0),
            &demand,
            MAX_ZONES,
        );
        (plans, !demand.is_empty())
    }
}

/// Whether a service has any locality to observe: a backend with a zone or a priority above 0.
fn has_locality(snap: &ServiceSnapshot) -> bool {
    snap.servers
        .values()
        .any(|s| s.priority > 0 || ZoneKey::of(s.locality.as_ref()).is_some())
}

/// The scrape-time collector of the locality metrics (module docs). Registered before the
/// sources exist; it exports nothing until [`LocalityCollector::set`] gives them.
#[derive(Debug, Clone, Default)]
pub struct LocalityCollector {
    sources: Arc<OnceLock<Sources>>,
}

impl LocalityCollector {
    /// Registers the collector in `registry`; keep the handle to give it its sources.
    pub fn register(registry: &mut Registry) -> Self {
        let c = Self::default();
        registry.register_collector(Box::new(c.clone()));
        c
    }

    /// Gives the collector what it computes the plans from (once; later calls are ignored).
    pub(crate) fn set(&self, sources: Sources) {
        let _ = self.sources.set(sources);
    }
}

type Labels = Vec<(String, String)>;

impl Collector for LocalityCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(sources) = self.sources.get() else {
            return Ok(());
        };
        let mut names = sources.cache.service_names();
        names.sort();
        let mut local: Vec<(Labels, f64)> = Vec::new();
        let mut spill: Vec<(Labels, i64)> = Vec::new();
        for name in names.iter().take(MAX_METRIC_SERVICES) {
            let Some(snap) = sources.cache.get(name) else {
                continue;
            };
            if !has_locality(&snap) {
                continue;
            }
            let (plans, _) = sources.plans(&snap);
            for (zone, plan) in &plans.plans {
                let labels = vec![
                    ("service".to_owned(), snap.name.clone()),
                    ("client_zone".to_owned(), zone.to_string()),
                ];
                let mut with_reason = labels.clone();
                with_reason.push(("reason".to_owned(), plan.spill.as_str().to_owned()));
                local.push((labels, plan.local));
                spill.push((with_reason, 1));
            }
        }
        let mut family = encoder.encode_descriptor(
            "dlb_locality_local_share",
            "Share of a client zone's traffic the locality plan keeps in the zone",
            None,
            MetricType::Gauge,
        )?;
        for (labels, v) in &local {
            ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "dlb_locality_spill",
            "Why a client zone's traffic leaves the zone: 1 for the plan's current reason",
            None,
            MetricType::Gauge,
        )?;
        for (labels, v) in &spill {
            ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}
