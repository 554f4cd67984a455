//! The locality plan: from a service's groups, each backend's state, the demand per client zone
//! and the client's zone, the share of this client's traffic each group takes (Envoy's priority
//! load with overprovisioning, per-priority panic, zone-aware routing with a minimum cluster
//! size, plus load-aware capacity and a cross-zone budget). Pure; every formula is in
//! docs/locality.md.

use super::group::{Groups, ZoneKey};
use super::policy::LocalityConfig;
use crate::balance::PanicConfig;

/// How far a zone's demand share may exceed its capacity share before it spills (absolute, 2
/// points). Demand is measured from calls and pushed only when it moves by more than 1 %, so a
/// zone with capacity for a third of the calls and a third of the demand reads as 0.333 vs
/// 0.34 half the time: without a slack, it would spill a sliver of its calls back and forth
/// on noise. Within the slack a zone keeps all of its calls (it is then loaded at most ~6 %
/// over its share at a third of the demand).
pub const DEMAND_SLACK: f64 = 0.02;

/// One backend as the plan sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendState {
    /// Its group (index into [`Groups::keys`]).
    pub group: u16,
    /// Its weight.
    pub weight: u32,
    /// Whether it may take traffic by its own health (before any panic routing).
    pub eligible: bool,
    /// Its global in-flight calls (summed over every client by the control plane).
    pub in_flight: u64,
}

/// Why part of the client's traffic leaves its zone (the first reason, by priority).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Spill {
    /// Nothing leaves the zone.
    #[default]
    None,
    /// The client declared no zone: traffic is spread by capacity.
    NoClientZone,
    /// The policy turns zone-aware routing off: traffic is spread by capacity.
    ZoneAwareOff,
    /// The priority has fewer backends than `min_cluster_size`: spread by capacity.
    BelowMinClusterSize,
    /// No backend of the priority has a zone, or groups are per priority only (hashing algorithms).
    Unzoned,
    /// The priority is in panic: spread over all its backends by weight.
    Panic,
    /// The priority has no backend in the client's zone.
    NoLocalBackends,
    /// The client's zone has no eligible backend in the priority.
    LocalDown,
    /// The client's zone's capacity is below its share of the demand (health or saturation).
    LocalCapacity,
    /// As [`Spill::LocalCapacity`], but the cross-zone budget limits the spill.
    BudgetCapped,
}

impl Spill {
    /// The reason's name in metrics, JSON and `dlbctl` (`none`, `local_capacity`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Spill::None => "none",
            Spill::NoClientZone => "no_client_zone",
            Spill::ZoneAwareOff => "zone_aware_off",
            Spill::BelowMinClusterSize => "below_min_cluster_size",
            Spill::Unzoned => "unzoned",
            Spill::Panic => "panic",
            Spill::NoLocalBackends => "no_local_backends",
            Spill::LocalDown => "local_down",
            Spill::LocalCapacity => "local_capacity",
            Spill::BudgetCapped => "budget_capped",
        }
    }
}

/// The plan for one client zone.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Share of the client's traffic per group; sums to 1 unless nothing is eligible anywhere
    /// (then all 0). Non-zero only on groups with eligible backends or in panic.
    pub shares: Vec<f64>,
    /// Per group: its priority is in panic (route over all its backends).
    pub group_panic: Vec<bool>,
    /// Load of each priority present, in priority order.
    pub priority_load: Vec<(u32, f64)>,
    /// Share kept in the client's zone (0 without a client zone).
    pub local: f64,
    /// Why traffic leaves the zone.
    pub spill: Spill,
}

#[derive(Debug, Clone, Copy, Default)]
struct Stat {
    total: u64,
    eligible: u64,
    weight_all: f64,
    weight_eligible: f64,
    capacity: f64,
}

/// Computes the plan of a client in zone `client` (`None`: no zone). `demand` is the share of
/// the service's calls made from each zone (any scale; empty or all 0: equal over the zones with
/// backends). `panic` is the service's panic configuration (per-priority panic). O(backends +
/// groups × demand zones).
pub fn plan(
    cfg: &LocalityConfig,
    panic: Option<&PanicConfig>,
    groups: &Groups,
    backends: &[BackendState],
    demand: &[(ZoneKey, f64)],
    client: Option<&ZoneKey>,
) -> Plan {
    let n = groups.len();
    let mut stats = vec![Stat::default(); n];
    for b in backends {
        let Some(s) = stats.get_mut(usize::from(b.group)) else {
            continue;
        };
        let w = f64::from(b.weight);
        s.total += 1;
        s.weight_all += w;
        if b.eligible {
            s.eligible += 1;
            s.weight_eligible += w;
            s.capacity += match cfg.saturation {
                Some(sat) if w > 0.0 => w * (1.0 - b.in_flight as f64 / (sat * w)).max(0.0),
                _ => w,
            };
        }
    }
    // Priority ranges: groups of one priority are contiguous (keys are sorted).
    let mut ranges: Vec<(u32, usize, usize)> = Vec::new();
    for (g, k) in groups.keys.iter().enumerate() {
        match ranges.last_mut() {
            Some((p, _, end)) if *p == k.priority => *end = g + 1,
            _ => ranges.push((k.priority, g, g + 1)),
        }
    }
    let counts = |r: &(u32, usize, usize)| {
        stats[r.1..r.2]
            .iter()
            .fold((0u64, 0u64), |(t, e), s| (t + s.total, e + s.eligible))
    };
    let health: Vec<f64> = ranges
        .iter()
        .map(|r| match counts(r) {
            (0, _) => 0.0,
            (t, e) => (e as f64 / t as f64 * cfg.overprovisioning).min(1.0),
        })
        .collect();
    let sum_h: f64 = health.iter().sum();
    let mut remaining = 1.0f64;
    let loads: Vec<f64> = health
        .iter()
        .enumerate()
        .map(|(i, &h)| {
            if sum_h <= 0.0 {
                if i == 0 {
                    1.0
                } else {
                    0.0
                }
            } else if sum_h < 1.0 {
                h / sum_h
            } else {
                let l = h.min(remaining);
                remaining -= l;
                l
            }
        })
        .collect();
    let normalized_health = sum_h.min(1.0);
    let mut out = Plan {
        shares: vec![0.0; n],
        group_panic: vec![false; n],
        priority_load: ranges.iter().zip(&loads).map(|(r, &l)| (r.0, l)).collect(),
        local: 0.0,
        spill: Spill::None,
    };
    let mut first_reason = None;
    for (r, &load) in ranges.iter().zip(&loads) {
        let (total, eligible) = counts(r);
        let in_panic = panic.is_some_and(|c| {
            normalized_health < 1.0
                && total > 0
                && u128::from(eligible) * 100 < u128::from(c.threshold_percent) * u128::from(total)
        });
        out.group_panic[r.1..r.2].fill(in_panic);
        if load <= 0.0 {
            continue;
        }
        let reason = split(
            cfg,
            groups,
            &stats,
            (r.1, r.2),
            total,
            in_panic,
            demand,
            client,
            &mut out.shares[r.1..r.2],
        );
        for s in &mut out.shares[r.1..r.2] {
            *s *= load;
        }
        if reason != Spill::None && first_reason.is_none() {
            first_reason = Some(reason);
        }
    }
    if let Some(z) = client {
        out.local = groups
            .keys
            .iter()
            .zip(&out.shares)
            .filter(|(k, _)| k.zone.as_ref() == Some(z))
            .map(|(_, s)| s)
            .sum();
        if out.local < 1.0 - 1e-9 {
            out.spill = first_reason.unwrap_or_default();
        }
    } else {
        out.spill = Spill::NoClientZone;
    }
    out
}

/// Distributes one priority's traffic (fractions summing to 1, or all 0 when nothing can take
/// it) over its groups `range`, written to `frac`; returns why any of it leaves the client's
/// zone.
#[allow(clippy::too_many_arguments)]
fn split(
    cfg: &LocalityConfig,
    groups: &Groups,
    stats: &[Stat],
    range: (usize, usize),
    total: u64,
    in_panic: bool,
    demand: &[(ZoneKey, f64)],
    client: Option<&ZoneKey>,
    frac: &mut [f64],
) -> Spill {
    let keys = &groups.keys[range.0..range.1];
    let st = &stats[range.0..range.1];
    // Spread by the first non-zero measure: capacity, eligible weight, eligible count (all
    // weight, then count, in panic).
    let measures: [fn(&Stat) -> f64; 3] = if in_panic {
        [|s| s.weight_all, |s| s.total as f64, |_| 0.0]
    } else {
        [|s| s.capacity, |s| s.weight_eligible, |s| s.eligible as f64]
    };
    let spread = |frac: &mut [f64], skip: Option<usize>| -> bool {
        for m in measures {
            let sum: f64 = (0..st.len())
                .filter(|&i| Some(i) != skip)
                .map(|i| m(&st[i]))
                .sum();
            if sum > 0.0 {
                for i in 0..st.len() {
                    frac[i] = if Some(i) == skip {
                        0.0
                    } else {
                        m(&st[i]) / sum
                    };
                }
                return true;
            }
        }
        false
    };
    let local = client.and_then(|z| keys.iter().position(|k| k.zone.as_ref() == Some(z)));
    if in_panic {
        spread(frac, None);
        return Spill::Panic;
    }
    let reason = if client.is_none() {
        Spill::NoClientZone
    } else if keys.iter().all(|k| k.zone.is_none()) {
        Spill::Unzoned
    } else if local.is_none() {
        Spill::NoLocalBackends
    } else if !cfg.zone_aware {
        Spill::ZoneAwareOff
    } else if total < u64::from(cfg.min_cluster_size) {
        Spill::BelowMinClusterSize
    } else {
        Spill::None
    };
    let Some(l) = local else {
        spread(frac, None);
        return reason;
    };
    let mut reason = reason;
    if reason != Spill::None {
        spread(frac, None);
    } else if st[l].eligible == 0 {
        spread(frac, Some(l));
        return Spill::LocalDown;
    } else {
        // Zone-aware: upstream_pct vs local_pct (demand).
        let cap_sum: f64 = st.iter().map(|s| s.capacity).sum();
        let upstream = |i: usize| {
            if cap_sum > 0.0 {
                st[i].capacity / cap_sum
            } else {
                0.0
            }
        };
        let valid = |d: f64| if d.is_finite() && d > 0.0 { d } else { 0.0 };
        let demand_total: f64 = demand.iter().map(|(_, d)| valid(*d)).sum();
        let zones = keys.iter().filter(|k| k.zone.is_some()).count().max(1);
        let local_pct = |i: usize| match &keys[i].zone {
            None => 0.0,
            Some(z) if demand_total > 0.0 => {
                demand
                    .iter()
                    .filter(|(dz, _)| dz == z)
                    .map(|(_, d)| valid(*d))
                    .sum::<f64>()
                    / demand_total
            }
            Some(_) => 1.0 / zones as f64,
        };
        let (up_l, lp_l) = (upstream(l), local_pct(l));
        frac.fill(0.0);
        if up_l + DEMAND_SLACK >= lp_l {
            frac[l] = 1.0;
        } else {
            let keep = up_l / lp_l;
            frac[l] = keep;
            let residual = |i: usize| (upstream(i) - local_pct(i)).max(0.0);
            let res_sum: f64 = (0..st.len()).filter(|&i| i != l).map(residual).sum();
            if res_sum > 0.0 {
                for i in (0..st.len()).filter(|&i| i != l) {
                    frac[i] = (1.0 - keep) * residual(i) / res_sum;
                }
            } else {
                let mut others = vec![0.0; st.len()];
                if spread(&mut others, Some(l)) {
                    for i in (0..st.len()).filter(|&i| i != l) {
                        frac[i] = (1.0 - keep) * others[i];
                    }
                } else {
                    frac[l] = 1.0;
                }
            }
            reason = Spill::LocalCapacity;
        }
    }
    // Cross-zone budget: while the local zone is healthy enough, at most `b` leaves it.
    if let Some(b) = cfg.budget {
        let healthy = st[l].eligible as f64 / st[l].total.max(1) as f64;
        let spill = 1.0 - frac[l];
        if healthy >= cfg.budget_threshold && spill > b {
            let scale = b / spill;
            for (i, f) in frac.iter_mut().enumerate() {
                *f = if i == l { 1.0 - b } else { *f * scale };
            }
            reason = Spill::BudgetCapped;
        }
    }
    reason
}
