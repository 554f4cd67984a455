//! The seam between per-node EDS and the locality plan: the inputs the xDS front-end has for
//! one service (its backend groups) and the share of one client's traffic each group gets.
//!
//! The formulas are those of `docs/locality.md` (Envoy's): priority load from each priority's
//! healthy fraction × the overprovisioning factor, then zone-aware routing within a priority
//! (local zone first, the smallest spill proportional to the other zones' residual capacity,
//! the cross-zone budget). The core's `dlb::locality::plan` is their reference; this module
//! applies them to what dlbd knows of a service (no client in-flight counts: capacity is the
//! eligible weight; demand per zone unknown: equal shares over the zones with backends).

use dlb::proto;

/// A backend's zone: (region, zone) of its locality (sub_zone is not routed on).
pub type Zone = (String, String);

/// One group of a service's backends: those of one priority and one zone (`None`: backends
/// without a locality, never a client's local zone).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupInput {
    /// The group's priority (0 = primary).
    pub priority: u32,
    /// The group's zone.
    pub zone: Option<Zone>,
    /// How many backends the group has.
    pub total: usize,
    /// How many of them are eligible (healthy, not draining).
    pub eligible: usize,
    /// The group's capacity: the sum of its eligible backends' weights.
    pub capacity: f64,
}

/// Envoy's default overprovisioning factor, percent.
const DEFAULT_OVERPROVISIONING: f64 = 140.0;
/// Envoy's default minimum cluster size for zone-aware routing.
const DEFAULT_MIN_CLUSTER_SIZE: usize = 6;
/// Default healthy threshold of the cross-zone budget, percent.
const DEFAULT_BUDGET_THRESHOLD: f64 = 50.0;

/// Per group (same order as `groups`), the share of the traffic of a client in zone `client`
/// (`None`: no zone) under `policy`. Shares are ≥ 0 and sum to 1 (when there is a group).
pub fn shares(
    groups: &[GroupInput],
    client: Option<&Zone>,
    policy: Option<&proto::LocalityPolicy>,
) -> Vec<f64> {
    let mut out = vec![0.0; groups.len()];
    if groups.is_empty() {
        return out;
    }
    let over = match policy.map_or(0, |p| p.overprovisioning_percent) {
        0 => DEFAULT_OVERPROVISIONING,
        p => f64::from(p),
    };
    let mut priorities: Vec<u32> = groups.iter().map(|g| g.priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    // Priority health h_P = min(100, eligible_P / total_P × overprovisioning), by counts.
    let health: Vec<f64> = priorities
        .iter()
        .map(|&p| {
            let (e, t) = groups
                .iter()
                .filter(|g| g.priority == p)
                .fold((0, 0), |(e, t), g| (e + g.eligible, t + g.total));
            if t == 0 {
                0.0
            } else {
                (e as f64 / t as f64 * over).min(100.0)
            }
        })
        .collect();
    let sum: f64 = health.iter().sum();
    let loads: Vec<f64> = if sum <= 0.0 {
        // Nothing eligible anywhere: everything to the first priority (panic).
        let mut l = vec![0.0; priorities.len()];
        l[0] = 1.0;
        l
    } else if sum < 100.0 {
        health.iter().map(|h| h / sum).collect()
    } else {
        let mut remaining = 100.0;
        health
            .iter()
            .map(|&h| {
                let l = h.min(remaining);
                remaining -= l;
                l / 100.0
            })
            .collect()
    };
    for (p, load) in priorities.iter().zip(loads) {
        if load <= 0.0 {
            continue;
        }
        let idx: Vec<usize> = (0..groups.len())
            .filter(|&i| groups[i].priority == *p)
            .collect();
        for (i, s) in within_priority(groups, &idx, client, policy) {
            out[i] = load * s;
        }
    }
    out
}

/// Shares within one priority (groups `idx` of `groups`), summing to 1.
fn within_priority(
    groups: &[GroupInput],
    idx: &[usize],
    client: Option<&Zone>,
    policy: Option<&proto::LocalityPolicy>,
) -> Vec<(usize, f64)> {
    let cap: f64 = idx.iter().map(|&i| groups[i].capacity).sum();
    let by_capacity = || -> Vec<(usize, f64)> {
        if cap > 0.0 {
            idx.iter().map(|&i| (i, groups[i].capacity / cap)).collect()
        } else {
            // Nothing eligible in this priority: over all its backends (it is in panic).
            let n: usize = idx.iter().map(|&i| groups[i].total).sum();
            idx.iter()
                .map(|&i| (i, groups[i].total as f64 / n.max(1) as f64))
                .collect()
        }
    };
    let zone_aware = policy.and_then(|p| p.zone_aware).unwrap_or(true);
    let min_size = match policy.map_or(0, |p| p.min_cluster_size) {
        0 => DEFAULT_MIN_CLUSTER_SIZE,
        n => n as usize,
    };
    let total: usize = idx.iter().map(|&i| groups[i].total).sum();
    let Some(client) = client else {
        return by_capacity();
    };
    let local = idx
        .iter()
        .copied()
        .find(|&i| groups[i].zone.as_ref() == Some(client));
    let (Some(local), true, true, true) = (local, zone_aware, total >= min_size, cap > 0.0) else {
        return by_capacity();
    };
    // Demand unknown: equal shares over the zones that have backends in this priority.
    let zones = idx.iter().filter(|&&i| groups[i].zone.is_some()).count();
    let local_pct = |i: usize| {
        if groups[i].zone.is_some() {
            1.0 / zones as f64
        } else {
            0.0
        }
    };
    let up = |i: usize| groups[i].capacity / cap;
    if up(local) >= local_pct(local) {
        return idx
            .iter()
            .map(|&i| (i, if i == local { 1.0 } else { 0.0 }))
            .collect();
    }
    let mut spill = 1.0 - up(local) / local_pct(local);
    if let Some(p) = policy.filter(|p| p.cross_zone_budget_percent > 0) {
        let threshold = match p.budget_healthy_threshold_percent {
            0 => DEFAULT_BUDGET_THRESHOLD,
            t => f64::from(t),
        };
        let g = &groups[local];
        let healthy = g.eligible as f64 / g.total.max(1) as f64 * 100.0;
        if healthy >= threshold {
            spill = spill.min(f64::from(p.cross_zone_budget_percent) / 100.0);
        }
    }
    let residual = |i: usize| (up(i) - local_pct(i)).max(0.0);
    let others: Vec<usize> = idx.iter().copied().filter(|&i| i != local).collect();
    let rsum: f64 = others.iter().map(|&i| residual(i)).sum();
    let csum: f64 = others.iter().map(|&i| up(i)).sum();
    if csum <= 0.0 {
        // Nowhere to spill to.
        return idx
            .iter()
            .map(|&i| (i, if i == local { 1.0 } else { 0.0 }))
            .collect();
    }
    idx.iter()
        .map(|&i| {
            let s = if i == local {
                1.0 - spill
            } else if rsum > 0.0 {
                spill * residual(i) / rsum
            } else {
                spill * up(i) / csum
            };
            (i, s)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(priority: u32, zone: &str, total: usize, eligible: usize) -> GroupInput {
        GroupInput {
            priority,
            zone: (!zone.is_empty()).then(|| ("r".to_owned(), zone.to_owned())),
            total,
            eligible,
            capacity: eligible as f64,
        }
    }

    fn zone(z: &str) -> Zone {
        ("r".into(), z.into())
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn local_zone_keeps_everything_while_it_covers_its_demand() {
        let groups = [g(0, "a", 4, 4), g(0, "b", 4, 4), g(0, "c", 4, 4)];
        let s = shares(&groups, Some(&zone("a")), None);
        assert!(close(&s, &[1.0, 0.0, 0.0]), "{s:?}");
        // No zone: by capacity.
        let s = shares(&groups, None, None);
        assert!(close(&s, &[1.0 / 3.0; 3]), "{s:?}");
    }

    #[test]
    fn half_the_local_zone_down_spills_by_residual_capacity() {
        let groups = [g(0, "a", 4, 2), g(0, "b", 4, 4), g(0, "c", 4, 4)];
        let s = shares(&groups, Some(&zone("a")), None);
        // up[a] = 0.2 < 1/3: keep 0.6, spill 0.4 split evenly (equal residuals).
        assert!(close(&s, &[0.6, 0.2, 0.2]), "{s:?}");
        // A 10 % budget caps the spill while a is at least 50 % healthy.
        let p = proto::LocalityPolicy {
            cross_zone_budget_percent: 10,
            ..Default::default()
        };
        let s = shares(&groups, Some(&zone("a")), Some(&p));
        assert!(close(&s, &[0.9, 0.05, 0.05]), "{s:?}");
    }

    #[test]
    fn priorities_follow_overprovisioning_and_normalise() {
        // P0 half healthy: h0 = 70, P1 takes 30.
        let groups = [g(0, "", 4, 2), g(1, "", 4, 4)];
        assert!(close(&shares(&groups, None, None), &[0.7, 0.3]));
        // P0 all healthy: nothing to P1.
        let groups = [g(0, "", 4, 4), g(1, "", 4, 4)];
        assert!(close(&shares(&groups, None, None), &[1.0, 0.0]));
        // Both at 25 %: h = 35 each, normalised to 50/50.
        let groups = [g(0, "", 4, 1), g(1, "", 4, 1)];
        assert!(close(&shares(&groups, None, None), &[0.5, 0.5]));
        // Nothing eligible: all to P0.
        let groups = [g(0, "", 4, 0), g(1, "", 4, 0)];
        assert!(close(&shares(&groups, None, None), &[1.0, 0.0]));
    }

    #[test]
    fn small_priorities_and_zone_aware_off_route_by_capacity() {
        let groups = [g(0, "a", 1, 1), g(0, "b", 2, 2)];
        let s = shares(&groups, Some(&zone("a")), None);
        assert!(close(&s, &[1.0 / 3.0, 2.0 / 3.0]), "{s:?}");
        let groups = [g(0, "a", 4, 4), g(0, "b", 4, 4)];
        let p = proto::LocalityPolicy {
            zone_aware: Some(false),
            ..Default::default()
        };
        let s = shares(&groups, Some(&zone("a")), Some(&p));
        assert!(close(&s, &[0.5, 0.5]), "{s:?}");
    }
}
