//! The health parts of a service's policy: outlier detection (passive ejection) and the panic
//! threshold — their validation, their defaults, and the conversion to the picker's
//! [`PanicConfig`]. Used by every entry point that accepts a policy (the Registry, the YAML
//! config, `dlbctl`) through `model::validate_policy`, and by the pickers of the SDK
//! and `dlbd` through `routing::policy_config`, so all agree.
//!
//! The max-ejection rule itself is [`max_ejected`]; `docs/outlier.md` documents all of it.

use std::time::Duration;

use crate::balance::{PanicConfig, PanicMode, PanicState};
use crate::proto;
use crate::validation::ValidationError;

/// Default consecutive failures that eject a backend.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Default minimum requests in a window for the failure-rate rule.
pub const DEFAULT_MIN_REQUESTS: u32 = 20;
/// Default failure-rate window (and return-check period), milliseconds.
pub const DEFAULT_INTERVAL_MS: u32 = 1_000;
/// Default base ejection time, milliseconds.
pub const DEFAULT_BASE_EJECTION_MS: u32 = 30_000;
/// Default cap on the ejection time, milliseconds.
pub const DEFAULT_MAX_EJECTION_MS: u32 = 300_000;
/// Default max ejection percent.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// Bounds of `interval_ms`.
pub const INTERVAL_MS_RANGE: std::ops::RangeInclusive<u32> = 100..=600_000;
/// Bounds of the ejection times, milliseconds (up to one day).
pub const EJECTION_MS_RANGE: std::ops::RangeInclusive<u32> = 100..=86_400_000;

/// Outlier detection with every default filled in (see `OutlierDetection` in the proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Failures in a row that eject; `None`: that rule is off.
    pub consecutive_failures: Option<u32>,
    /// Failure percent over a window that ejects; `None`: that rule is off.
    pub failure_rate_percent: Option<u32>,
    /// Minimum requests in a window for the failure-rate rule.
    pub min_requests: u32,
    /// Failure-rate window and return-check period.
    pub interval: Duration,
    /// Ejection time per time ejected.
    pub base_ejection: Duration,
    /// Cap on the ejection time.
    pub max_ejection: Duration,
    /// Max ejection percent, 0..=100.
    pub max_ejection_percent: u32,
}

/// The resolved outlier-detection configuration of a (validated) policy; `None` when it is off.
pub fn outlier_config(policy: &proto::Policy) -> Option<OutlierConfig> {
    let o = policy.outlier_detection.as_ref()?;
    let both_unset = o.consecutive_failures == 0 && o.failure_rate_percent == 0;
    let or = |v: u32, d: u32| if v == 0 { d } else { v };
    let base = or(o.base_ejection_ms, DEFAULT_BASE_EJECTION_MS);
    Some(OutlierConfig {
        consecutive_failures: if both_unset {
            Some(DEFAULT_CONSECUTIVE_FAILURES)
        } else {
            (o.consecutive_failures != 0).then_some(o.consecutive_failures)
        },
        failure_rate_percent: (o.failure_rate_percent != 0).then_some(o.failure_rate_percent),
        min_requests: or(o.min_requests, DEFAULT_MIN_REQUESTS),
        interval: Duration::from_millis(u64::from(or(o.interval_ms, DEFAULT_INTERVAL_MS))),
        base_ejection: Duration::from_millis(u64::from(base)),
        max_ejection: Duration::from_millis(u64::from(
            or(o.max_ejection_ms, DEFAULT_MAX_EJECTION_MS).max(base),
        )),
        max_ejection_percent: if o.max_ejection_percent == 0 {
            DEFAULT_MAX_EJECTION_PERCENT
        } else {
            o.max_ejection_percent
        },
    })
}

/// **The max-ejection rule.** With `total` backends and `percent` = max ejection percent, at
/// most this many backends of a service are ejected at once:
///
/// ```text
/// limit(n, p) = 0                                   if n ≤ 1 or p = 0
///             = min(n − 1, max(1, ⌊n × p / 100⌋))  otherwise
/// ```
///
/// An ejection is allowed exactly when `ejected + 1 ≤ limit(n, p)`, checked *before* ejecting
/// (so, unlike gRPC A50, it never overshoots). Consequences: the last backend is never ejected
/// (unlike Envoy at 67 % with 3 hosts, envoy#27066, or istio#20135); a service of 2..=9
/// backends can still eject one bad backend at the default 10 % (Envoy's
/// `100 × (ejected + 1) / n ≤ p` ejects nothing below 10 hosts); otherwise it is the plain floor
/// of the percentage. Integer arithmetic, O(1).
pub fn max_ejected(total: usize, percent: u32) -> usize {
    if total <= 1 || percent == 0 {
        return 0;
    }
    let floor = (total as u128 * u128::from(percent.min(100)) / 100) as usize;
    floor.max(1).min(total - 1)
}

/// The picker's panic configuration for a (validated) policy; `None` when panic is off.
pub fn panic_config(policy: &proto::Policy) -> Option<PanicConfig> {
    let p = policy.panic.as_ref()?;
    if p.threshold_percent == 0 {
        return None;
    }
    let mode = match proto::PanicMode::try_from(p.mode) {
        Ok(proto::PanicMode::Fail) => PanicMode::Fail,
        _ => PanicMode::RouteAll,
    };
    Some(PanicConfig {
        threshold_percent: p.threshold_percent.min(100),
        mode,
    })
}

/// The wire form of a picker's panic state.
pub fn panic_state_proto(state: &PanicState) -> proto::PanicState {
    proto::PanicState {
        active: state.active,
        eligible: u32::try_from(state.eligible).unwrap_or(u32::MAX),
        total: u32::try_from(state.total).unwrap_or(u32::MAX),
        mode: match state.mode {
            None => proto::PanicMode::Unspecified,
            Some(PanicMode::RouteAll) => proto::PanicMode::RouteAll,
            Some(PanicMode::Fail) => proto::PanicMode::Fail,
        } as i32,
    }
}

/// The panic state of a service state (its policy and stored records), computed exactly as a
/// picker built from them decides it. O(n).
pub fn panic_state<'a>(
    policy: &proto::Policy,
    servers: impl IntoIterator<Item = &'a proto::Server>,
) -> proto::PanicState {
    let (mut eligible, mut total) = (0usize, 0usize);
    for s in servers {
        total += 1;
        eligible += usize::from(crate::sources::is_eligible(s));
    }
    let config = panic_config(policy);
    panic_state_proto(&crate::balance::panic::evaluate(
        config.as_ref(),
        eligible,
        total,
    ))
}

/// The name of a panic mode as `dlbctl` and the YAML config spell it.
pub fn panic_mode_name(mode: i32) -> &'static str {
    match proto::PanicMode::try_from(mode) {
        Ok(proto::PanicMode::RouteAll) => "route_all",
        Ok(proto::PanicMode::Fail) => "fail",
        _ => "off",
    }
}

/// Parses a panic mode (`route_all` or `fail`).
pub fn parse_panic_mode(field: &str, value: &str) -> Result<proto::PanicMode, ValidationError> {
    match value {
        "route_all" | "route-all" => Ok(proto::PanicMode::RouteAll),
        "fail" => Ok(proto::PanicMode::Fail),
        _ => Err(ValidationError::new(
            field,
            value,
            "must be route_all or fail",
        )),
    }
}

fn check(ok: bool, field: &str, value: u32, reason: &str) -> Result<(), ValidationError> {
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(field, value, reason))
    }
}

/// Checks the outlier-detection and panic parts of a policy.
pub fn validate(policy: &proto::Policy) -> Result<(), ValidationError> {
    if let Some(o) = &policy.outlier_detection {
        let f = "policy.outlier_detection";
        check(
            o.failure_rate_percent <= 100,
            &format!("{f}.failure_rate_percent"),
            o.failure_rate_percent,
            "must be 0 (off) or 1..=100",
        )?;
        check(
            o.max_ejection_percent <= 100,
            &format!("{f}.max_ejection_percent"),
            o.max_ejection_percent,
            "must be 0 (the default, 10) or 1..=100",
        )?;
        check(
            o.interval_ms == 0 || INTERVAL_MS_RANGE.contains(&o.interval_ms),
            &format!("{f}.interval_ms"),
            o.interval_ms,
            "must be 0 (the default) or 100..=600000",
        )?;
        for (name, v) in [
            ("base_ejection_ms", o.base_ejection_ms),
            ("max_ejection_ms", o.max_ejection_ms),
        ] {
            check(
                v == 0 || EJECTION_MS_RANGE.contains(&v),
                &format!("{f}.{name}"),
                v,
                "must be 0 (the default) or 100..=86400000",
            )?;
        }
        let base = if o.base_ejection_ms == 0 {
            DEFAULT_BASE_EJECTION_MS
        } else {
            o.base_ejection_ms
        };
        check(
            o.max_ejection_ms == 0 || o.max_ejection_ms >= base,
            &format!("{f}.max_ejection_ms"),
            o.max_ejection_ms,
            "must be at least base_ejection_ms",
        )?;
    }
    if let Some(p) = &policy.panic {
        check(
            p.threshold_percent <= 100,
            "policy.panic.threshold_percent",
            p.threshold_percent,
            "must be 0 (off) or 1..=100",
        )?;
        let mode = proto::PanicMode::try_from(p.mode);
        if p.threshold_percent > 0
            && !matches!(
                mode,
                Ok(proto::PanicMode::RouteAll | proto::PanicMode::Fail)
            )
        {
            return Err(ValidationError::new(
                "policy.panic.mode",
                p.mode,
                "must be route_all or fail when threshold_percent is set",
            ));
        }
        if mode.is_err() {
            return Err(ValidationError::new(
                "policy.panic.mode",
                p.mode,
                "must be route_all or fail",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_ejection_rule_table() {
        // (n, p, limit)
        for (n, p, want) in [
            (0, 10, 0),
            (1, 10, 0),
            (1, 100, 0),
            (2, 10, 1),
            (3, 10, 1),
            (3, 50, 1),
            (3, 67, 2),
            (3, 100, 2),
            (7, 10, 1),
            (7, 50, 3),
            (10, 10, 1),
            (10, 50, 5),
            (20, 10, 2),
            (20, 50, 10),
            (20, 100, 19),
            (5, 0, 0),
        ] {
            assert_eq!(max_ejected(n, p), want, "n={n} p={p}");
        }
    }

    #[test]
    fn defaults_and_validation() {
        let mut policy = crate::model::default_policy();
        assert!(outlier_config(&policy).is_none());
        policy.outlier_detection = Some(proto::OutlierDetection::default());
        let c = outlier_config(&policy).expect("on");
        assert_eq!(c.consecutive_failures, Some(DEFAULT_CONSECUTIVE_FAILURES));
        assert_eq!(c.failure_rate_percent, None);
        assert_eq!(c.max_ejection_percent, 10);
        validate(&policy).expect("defaults are valid");
        policy.outlier_detection = Some(proto::OutlierDetection {
            max_ejection_percent: 101,
            ..Default::default()
        });
        let e = validate(&policy).expect_err("101 %");
        assert_eq!(e.field, "policy.outlier_detection.max_ejection_percent");
        policy.outlier_detection = None;
        policy.panic = Some(proto::PanicPolicy {
            threshold_percent: 50,
            mode: 0,
        });
        assert_eq!(
            validate(&policy).expect_err("no mode").field,
            "policy.panic.mode"
        );
    }
}
