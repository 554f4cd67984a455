//! dlbctl's locality and priority: the `--region --zone --sub-zone --priority` flags of
//! `add-server`, `update-server`, `register` and `dns declare`, the `policy set` flags of the
//! locality policy, and how a backend's locality is printed (`locality=region/zone[/sub_zone]`
//! and `prio=N` in text, `locality` / `priority` in JSON; docs/locality.md), and `locality
//! show`, the plan dlbd computes for each client zone (`GetLocalityPlan`).

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
    if p.locality.is_none() {
        return String::new();
    }
    // The effective values (a 0 in the record means "the default").
    let c = dlb::locality::config(p);
    let pct = |f: f64| (f * 100.0).round();
    format!(
        " locality(overprovisioning={}% zone_aware={} min_cluster_size={} budget={} \
         budget_threshold={}% saturation_in_flight={})",
        pct(c.overprovisioning),
        c.zone_aware,
        c.min_cluster_size,
        c.budget
            .map_or_else(|| "off".to_owned(), |b| format!("{}%", pct(b))),
        pct(c.budget_threshold),
        c.saturation
            .map_or_else(|| "off".to_owned(), |s| format!("{s}")),
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

/// `dlbctl locality` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum LocalityCommand {
    /// Print the locality plan dlbd computes for each client zone of SERVICE (default: the
    /// --service): its demand, the share kept in the zone, why the rest spills, the load of
    /// each priority and each group's (priority, zone) share with its eligible/total backends.
    /// NOT_FOUND (exit 3) if the service does not exist.
    Show {
        /// The service (default: --service).
        service: Option<String>,
    },
}

/// Runs `dlbctl locality …` (`service` is the --service, used when none is given).
pub(crate) async fn run(
    admin: &dlb_client::AdminClient,
    service: &str,
    cmd: LocalityCommand,
    json_out: bool,
) -> Result<(), dlb_client::Error> {
    let LocalityCommand::Show { service: named } = cmd;
    let service = match &named {
        Some(s) => dlb::model::resolve_service(s)?,
        None => service,
    };
    let r = admin.get_locality_plan(service).await?;
    if json_out {
        println!("{}", plan_json(&r));
    } else {
        print!("{}", plan_text(&r));
    }
    Ok(())
}

/// A group's zone as text: `region/zone`, or `-` for no zone.
fn group_zone(g: Option<&proto::LocalityGroup>) -> String {
    g.and_then(|g| zone_text(g.locality.as_ref()))
        .unwrap_or_else(|| "-".to_owned())
}

/// The plan in JSON: groups once, and per client zone its groups with their shares.
fn plan_json(r: &proto::GetLocalityPlanResponse) -> Value {
    let group = |i: u32, share: Option<f64>| {
        let g = r.groups.get(i as usize);
        let mut v = json!({
            "group": i,
            "priority": g.map(|g| g.priority),
            "zone": g.and_then(|g| zone_text(g.locality.as_ref())),
            "eligible": g.map(|g| g.eligible),
            "total": g.map(|g| g.total),
            "panic": g.map(|g| g.panic),
        });
        if let (Some(s), Some(o)) = (share, v.as_object_mut()) {
            o.insert("share".into(), json!(s));
        }
        v
    };
    let groups: Vec<Value> = (0..r.groups.len())
        .map(|i| group(u32::try_from(i).unwrap_or(u32::MAX), None))
        .collect();
    let zones: Vec<Value> = r
        .zones
        .iter()
        .map(|z| {
            json!({
                "zone": zone_text(z.locality.as_ref()),
                "demand": z.demand,
                "local_share": z.local_share,
                "spill": z.spill,
                "priority_load": z.priority_load.iter()
                    .map(|p| json!({"priority": p.priority, "load": p.load}))
                    .collect::<Vec<_>>(),
                "groups": z.shares.iter()
                    .map(|s| group(s.group, Some(s.share)))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "service": r.service,
        "version": crate::print::version_json(r.version),
        "demand_known": r.demand_known,
        "groups": groups,
        "zones": zones,
        "truncated": r.truncated,
        "zones_total": r.zones_total,
        "groups_total": r.groups_total,
    })
}

/// The plan as text: a header, then per client zone a line and one line per group it sends
/// traffic to.
fn plan_text(r: &proto::GetLocalityPlanResponse) -> String {
    let pct = |x: f64| format!("{:.1}%", x * 100.0);
    let mut out = format!(
        "service {} {} demand={}\n",
        r.service,
        crate::print::version_text(r.version),
        if r.demand_known {
            "reported"
        } else {
            "unknown (equal over the zones with backends)"
        }
    );
    if r.zones.is_empty() {
        out.push_str("  no client zone (no backend has a zone and no zone demand)\n");
    }
    for z in &r.zones {
        let loads: Vec<String> = z
            .priority_load
            .iter()
            .map(|p| format!("p{}={}", p.priority, pct(p.load)))
            .collect();
        out.push_str(&format!(
            "zone {}: demand={} local={} spill={} priorities {}\n",
            zone_text(z.locality.as_ref()).unwrap_or_else(|| "-".to_owned()),
            if r.demand_known {
                pct(z.demand)
            } else {
                "-".to_owned()
            },
            pct(z.local_share),
            z.spill,
            loads.join(" ")
        ));
        for s in &z.shares {
            let g = r.groups.get(s.group as usize);
            out.push_str(&format!(
                "  p{} {:<24} {:>6}  {}/{} eligible{}\n",
                g.map_or(0, |g| g.priority),
                group_zone(g),
                pct(s.share),
                g.map_or(0, |g| g.eligible),
                g.map_or(0, |g| g.total),
                if g.is_some_and(|g| g.panic) {
                    " (panic)"
                } else {
                    ""
                }
            ));
        }
    }
    if r.truncated {
        out.push_str(&format!(
            "{}\n",
            crate::print::more_not_shown(r.zones_total, r.zones.len())
        ));
    }
    out
}
