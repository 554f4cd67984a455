//! dlbctl's locality and priority: the `--region --zone --sub-zone --priority` flags of
//! `add-server`, `update-server`, `register` and `dns declare`, the `policy set` flags of the
//! locality policy, and how a backend's locality is printed (`locality=region/zone[/sub_zone]`
//! and `prio=N` in text, `locality` / `priority` in JSON; docs/locality.md).

use clap::Args;
use dlb::proto;
use serde_json::{json, Value};

/// Where a backend runs and its failover priority.
#[derive(Debug, Args, Default)]
pub(crate) struct LocalityFlags {
    /// Region the backend runs in (e.g. eu-west-1).
    #[arg(long)]
    pub(crate) region: Option<String>,
    /// Zone within the region (needs --region). On update-server the flags replace the whole
    /// locality; `--region ''` clears it.
    #[arg(long)]
    pub(crate) zone: Option<String>,
    /// Sub-zone (rack, cell; shown, not routed on; needs --zone).
    #[arg(long)]
    pub(crate) sub_zone: Option<String>,
    /// Failover priority, 0..=7 (0 = primary).
    #[arg(long)]
    pub(crate) priority: Option<u32>,
}

impl LocalityFlags {
    /// The locality the flags give: `Some` when any of --region, --zone, --sub-zone is set.
    pub(crate) fn locality(&self) -> Option<proto::Locality> {
        if self.region.is_none() && self.zone.is_none() && self.sub_zone.is_none() {
            return None;
        }
        Some(proto::Locality {
            region: self.region.clone().unwrap_or_default(),
            zone: self.zone.clone().unwrap_or_default(),
            sub_zone: self.sub_zone.clone().unwrap_or_default(),
        })
    }
}

/// `dlbctl policy set` flags of the locality policy (0 means the default, as in the proto).
#[derive(Debug, Args)]
pub(crate) struct LocalityPolicyFlags {
    /// Priority failover's overprovisioning factor, percent (0 = default 140; 100..=1000).
    #[arg(long)]
    pub(crate) overprovisioning_percent: Option<u32>,
    /// Zone-aware routing within a priority: true or false (default true).
    #[arg(long)]
    pub(crate) zone_aware: Option<bool>,
    /// Zone-aware routing is off for a priority with fewer backends (0 = default 6).
    #[arg(long)]
    pub(crate) min_cluster_size: Option<u32>,
    /// At most this percent of a zone's requests leave it (0 = no budget; 1..=100).
    #[arg(long)]
    pub(crate) cross_zone_budget_percent: Option<u32>,
    /// Below this healthy percent the local zone is not held to the budget (0 = default 50).
    #[arg(long)]
    pub(crate) budget_healthy_threshold_percent: Option<u32>,
    /// Load-aware zone routing: in-flight calls per unit of weight at which a backend counts
    /// as saturated (0 = off).
    #[arg(long)]
    pub(crate) saturation_in_flight: Option<u32>,
    /// Remove the locality policy (every default).
    #[arg(long)]
    pub(crate) locality_defaults: bool,
}

impl LocalityPolicyFlags {
    /// Applies the flags that were given to `policy`.
    pub(crate) fn apply(&self, policy: &mut proto::Policy) {
        if self.locality_defaults {
            policy.locality = None;
        }
        let fields = [
            self.overprovisioning_percent,
            self.min_cluster_size,
            self.cross_zone_budget_percent,
            self.budget_healthy_threshold_percent,
            self.saturation_in_flight,
        ];
        if fields.iter().all(Option::is_none) && self.zone_aware.is_none() {
            return;
        }
        let l = policy.locality.get_or_insert_with(Default::default);
        let slots = [
            &mut l.overprovisioning_percent,
            &mut l.min_cluster_size,
            &mut l.cross_zone_budget_percent,
            &mut l.budget_healthy_threshold_percent,
            &mut l.saturation_in_flight,
        ];
        for (slot, value) in slots.into_iter().zip(fields) {
            if let Some(v) = value {
                *slot = v;
            }
        }
        if let Some(z) = self.zone_aware {
            l.zone_aware = Some(z);
        }
    }
}

/// `region/zone[/sub_zone]` (parts left out from the first empty one); `None` for no locality.
pub(crate) fn zone_text(l: Option<&proto::Locality>) -> Option<String> {
    let l = l.filter(|l| !l.region.is_empty())?;
    let mut out = l.region.clone();
    for part in [&l.zone, &l.sub_zone] {
        if part.is_empty() {
            break;
        }
        out.push('/');
        out.push_str(part);
    }
    Some(out)
}

/// What a backend's text line shows after its weight: ` locality=… prio=N` (each only when
/// set / non-zero).
pub(crate) fn text(l: Option<&proto::Locality>, priority: u32) -> String {
    let mut out = String::new();
    if let Some(z) = zone_text(l) {
        out.push_str(&format!(" locality={z}"));
    }
    if priority != 0 {
        out.push_str(&format!(" prio={priority}"));
    }
    out
}

/// A locality in JSON: `{region, zone, sub_zone}`, or null.
pub(crate) fn json(l: Option<&proto::Locality>) -> Value {
    match l {
        Some(l) => json!({"region": l.region, "zone": l.zone, "sub_zone": l.sub_zone}),
        None => Value::Null,
    }
}

/// The locality policy in policy text: `locality(overprovisioning=140% …)`, empty at every
/// default.
pub(crate) fn policy_text(p: &proto::Policy) -> String {
    let Some(l) = &p.locality else {
        return String::new();
    };
    format!(
        " locality(overprovisioning={}% zone_aware={} min_cluster_size={} budget={}% \
         budget_threshold={}% saturation_in_flight={})",
        l.overprovisioning_percent,
        l.zone_aware.unwrap_or(true),
        l.min_cluster_size,
        l.cross_zone_budget_percent,
        l.budget_healthy_threshold_percent,
        l.saturation_in_flight
    )
}

/// The locality policy in policy JSON (null when unset: every default).
pub(crate) fn policy_json(p: &proto::Policy) -> Value {
    match &p.locality {
        Some(l) => json!({
            "overprovisioning_percent": l.overprovisioning_percent,
            "zone_aware": l.zone_aware,
            "min_cluster_size": l.min_cluster_size,
            "cross_zone_budget_percent": l.cross_zone_budget_percent,
            "budget_healthy_threshold_percent": l.budget_healthy_threshold_percent,
            "saturation_in_flight": l.saturation_in_flight,
        }),
        None => Value::Null,
    }
}
