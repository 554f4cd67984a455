//! The service's locality policy: validation of `Policy.locality` ([`validate_locality_policy`])
//! and its conversion, defaults applied, to the [`LocalityConfig`] the plan reads ([`config`]).

use crate::proto;
use crate::validation::ValidationError;

/// Defaults of the [`proto::LocalityPolicy`] fields that are 0 or unset.
pub mod defaults {
    /// Overprovisioning factor, percent (Envoy's 1.4).
    pub const OVERPROVISIONING_PERCENT: u32 = 140;
    /// Zone-aware routing is on unless the policy turns it off.
    pub const ZONE_AWARE: bool = true;
    /// Smallest priority (in backends) zone-aware routing applies to (Envoy's min_cluster_size).
    pub const MIN_CLUSTER_SIZE: u32 = 6;
    /// Healthy percent of the local zone below which the cross-zone budget does not hold.
    pub const BUDGET_HEALTHY_THRESHOLD_PERCENT: u32 = 50;
}

/// Largest accepted `overprovisioning_percent`.
pub const MAX_OVERPROVISIONING_PERCENT: u32 = 1000;
/// Largest accepted `min_cluster_size`.
pub const MAX_MIN_CLUSTER_SIZE: u32 = 10_000;

/// A service's locality policy with every default applied (the plan's input).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalityConfig {
    /// Overprovisioning factor of priority failover (1.0..=10.0; default 1.4).
    pub overprovisioning: f64,
    /// Whether zone-aware routing applies within a priority.
    pub zone_aware: bool,
    /// Zone-aware routing is off for a priority with fewer backends than this.
    pub min_cluster_size: u32,
    /// Cross-zone budget: the largest fraction (0..=1] of a zone's traffic that leaves it while
    /// the zone is at least `budget_threshold` healthy. `None`: no budget.
    pub budget: Option<f64>,
    /// Eligible fraction of the local zone's backends at or above which the budget holds.
    pub budget_threshold: f64,
    /// Load-aware capacity: global in-flight calls per unit of weight at which a backend counts
    /// as saturated. `None`: capacity is the eligible weight.
    pub saturation: Option<f64>,
}

impl Default for LocalityConfig {
    fn default() -> Self {
        Self {
            overprovisioning: f64::from(defaults::OVERPROVISIONING_PERCENT) / 100.0,
            zone_aware: defaults::ZONE_AWARE,
            min_cluster_size: defaults::MIN_CLUSTER_SIZE,
            budget: None,
            budget_threshold: f64::from(defaults::BUDGET_HEALTHY_THRESHOLD_PERCENT) / 100.0,
            saturation: None,
        }
    }
}

/// Checks `policy.locality` (ranges in the field docs of `LocalityPolicy` in `dlb.proto`).
/// Errors name the field (`policy.locality.min_cluster_size`).
pub fn validate_locality_policy(policy: &proto::Policy) -> Result<(), ValidationError> {
    let Some(l) = &policy.locality else {
        return Ok(());
    };
    let f = |name: &str| format!("policy.locality.{name}");
    let o = l.overprovisioning_percent;
    if o != 0 && !(100..=MAX_OVERPROVISIONING_PERCENT).contains(&o) {
        return Err(ValidationError::new(
            f("overprovisioning_percent"),
            o,
            format!("must be 0 (default 140) or between 100 and {MAX_OVERPROVISIONING_PERCENT}"),
        ));
    }
    if l.min_cluster_size > MAX_MIN_CLUSTER_SIZE {
        return Err(ValidationError::new(
            f("min_cluster_size"),
            l.min_cluster_size,
            format!("must be 0 (default 6) or between 1 and {MAX_MIN_CLUSTER_SIZE}"),
        ));
    }
    if l.cross_zone_budget_percent > 100 {
        return Err(ValidationError::new(
            f("cross_zone_budget_percent"),
            l.cross_zone_budget_percent,
            "must be 0 (no budget) or between 1 and 100",
        ));
    }
    if l.budget_healthy_threshold_percent > 100 {
        return Err(ValidationError::new(
            f("budget_healthy_threshold_percent"),
            l.budget_healthy_threshold_percent,
            "must be 0 (default 50) or between 1 and 100",
        ));
    }
    Ok(())
}

/// The [`LocalityConfig`] of a (validated) policy, defaults applied. Out-of-range values (a
/// policy that skipped validation) are clamped into range.
pub fn config(policy: &proto::Policy) -> LocalityConfig {
    let d = LocalityConfig::default();
    let Some(l) = &policy.locality else {
        return d;
    };
    let or = |v: u32, default: u32| if v == 0 { default } else { v };
    let overprovisioning = or(
        l.overprovisioning_percent,
        defaults::OVERPROVISIONING_PERCENT,
    )
    .clamp(100, MAX_OVERPROVISIONING_PERCENT);
    let budget = l.cross_zone_budget_percent.min(100);
    let threshold = or(
        l.budget_healthy_threshold_percent,
        defaults::BUDGET_HEALTHY_THRESHOLD_PERCENT,
    )
    .min(100);
    LocalityConfig {
        overprovisioning: f64::from(overprovisioning) / 100.0,
        zone_aware: l.zone_aware.unwrap_or(defaults::ZONE_AWARE),
        min_cluster_size: or(l.min_cluster_size, defaults::MIN_CLUSTER_SIZE)
            .min(MAX_MIN_CLUSTER_SIZE),
        budget: (budget > 0).then(|| f64::from(budget) / 100.0),
        budget_threshold: f64::from(threshold) / 100.0,
        saturation: (l.saturation_in_flight > 0).then(|| f64::from(l.saturation_in_flight)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(l: proto::LocalityPolicy) -> proto::Policy {
        proto::Policy {
            locality: Some(l),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_apply_to_unset_and_zero_fields() {
        let d = LocalityConfig {
            overprovisioning: 1.4,
            zone_aware: true,
            min_cluster_size: 6,
            budget: None,
            budget_threshold: 0.5,
            saturation: None,
        };
        assert_eq!(config(&proto::Policy::default()), d);
        assert_eq!(config(&policy(proto::LocalityPolicy::default())), d);
        assert!(validate_locality_policy(&policy(proto::LocalityPolicy::default())).is_ok());
    }

    #[test]
    fn set_fields_convert() {
        let p = policy(proto::LocalityPolicy {
            overprovisioning_percent: 200,
            zone_aware: Some(false),
            min_cluster_size: 1,
            cross_zone_budget_percent: 10,
            budget_healthy_threshold_percent: 75,
            saturation_in_flight: 8,
        });
        assert!(validate_locality_policy(&p).is_ok());
        assert_eq!(
            config(&p),
            LocalityConfig {
                overprovisioning: 2.0,
                zone_aware: false,
                min_cluster_size: 1,
                budget: Some(0.1),
                budget_threshold: 0.75,
                saturation: Some(8.0),
            }
        );
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let cases = [
            (
                proto::LocalityPolicy {
                    overprovisioning_percent: 99,
                    ..Default::default()
                },
                "policy.locality.overprovisioning_percent",
            ),
            (
                proto::LocalityPolicy {
                    overprovisioning_percent: 1001,
                    ..Default::default()
                },
                "policy.locality.overprovisioning_percent",
            ),
            (
                proto::LocalityPolicy {
                    min_cluster_size: 10_001,
                    ..Default::default()
                },
                "policy.locality.min_cluster_size",
            ),
            (
                proto::LocalityPolicy {
                    cross_zone_budget_percent: 101,
                    ..Default::default()
                },
                "policy.locality.cross_zone_budget_percent",
            ),
            (
                proto::LocalityPolicy {
                    budget_healthy_threshold_percent: 101,
                    ..Default::default()
                },
                "policy.locality.budget_healthy_threshold_percent",
            ),
        ];
        for (l, field) in cases {
            let e = validate_locality_policy(&policy(l)).unwrap_err();
            assert_eq!(e.field, field);
        }
        let mut p = policy(proto::LocalityPolicy {
            cross_zone_budget_percent: 101,
            ..Default::default()
        });
        p.algorithm = proto::Algorithm::RoundRobin as i32;
        let e = crate::model::validate_policy(&p).unwrap_err();
        assert_eq!(e.field, "policy.locality.cross_zone_budget_percent");
        for ok in [100, 1000] {
            let p = policy(proto::LocalityPolicy {
                overprovisioning_percent: ok,
                min_cluster_size: 10_000,
                cross_zone_budget_percent: 100,
                budget_healthy_threshold_percent: 100,
                ..Default::default()
            });
            assert!(validate_locality_policy(&p).is_ok());
        }
    }
}
