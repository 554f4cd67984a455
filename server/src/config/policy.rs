//! Every `policy:` form of the YAML configuration (under `services[i].policy`), and its
//! conversion into the wire policy (`dlb::proto::Policy`). Field names are the proto's; a field
//! left out is 0, which means its default (`dlb.proto`). The whole form:
//!
//! ```yaml
//! policy:
//!   algorithm: maglev        # round_robin, least_conn_exact, least_conn_p2c, ring_hash, peak_ewma
//!   bounded_load_factor: 1.25
//!   sticky: none             # or strict, fallback
//!   sticky_ttl_seconds: 0
//!   sticky_max_entries: 0
//!   health_check: { ... }    # active probes: its YAML is `health::config`'s (docs/health.md)
//!   # Outlier detection and panic (docs/outlier.md):
//!   outlier_detection: { consecutive_failures: 5, failure_rate_percent: 50, min_requests: 20,
//!                        interval_ms: 1000, base_ejection_ms: 30000, max_ejection_ms: 300000,
//!                        max_ejection_percent: 10 }
//!   panic: { threshold_percent: 50, mode: route_all }   # or fail
//!   # Slow start and the SDK's circuit breaker (docs/sdk-health.md):
//!   slow_start: { window_ms: 30000, min_percent: 10 }
//!   circuit_breaker: { consecutive_failures: 5, failure_rate_percent: 50, min_requests: 20,
//!                      window_ms: 10000, base_cooldown_ms: 1000, max_cooldown_ms: 60000,
//!                      half_open_max_calls: 1, max_concurrent_calls: 100 }
//!   # Adaptive weights (docs/adaptive.md; also accepted as `adaptive_weights`; `enabled`
//!   # defaults to true when the block is present):
//!   adaptive: { enabled: true, slow_ratio: 2.0, min_requests: 20, window_ms: 5000,
//!               floor_percent: 10, recovery_step_percent: 25, min_latency_ms: 1 }
//!   # The call path (docs/sdk.md; `retry: {}` turns retries on with every default):
//!   peak_ewma: { decay_ms: 10000, default_rtt_us: 30000 }
//!   retry: { max_attempts: 3, retry_on_grpc_codes: [14], retry_on_http_statuses: [503],
//!            backoff_base_ms: 25, backoff_max_ms: 250, max_replay_body_bytes: 65536 }
//!   retry_budget: { ratio: 0.2, min_per_second: 10, window_seconds: 10 }
//!   hedge: { delay_percentile: 95, max_hedges: 1 }      # or { delay_ms: 50 }
//!   # Locality: priority failover, zone-aware routing, cross-zone budget (docs/locality.md):
//!   locality: { overprovisioning_percent: 140, zone_aware: true, min_cluster_size: 6,
//!               cross_zone_budget_percent: 10, budget_healthy_threshold_percent: 50,
//!               saturation_in_flight: 0 }
//! ```
//!
//! Validation is [`dlb::model::validate_policy`], as for every other entry point; an error
//! names the field as written in the YAML (`policy.adaptive.slow_ratio`, `policy.sticky`).

use dlb::model::{self, ValidationError};
use dlb::proto;
use serde::Deserialize;

/// `services[i].policy` in the YAML.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    algorithm: Option<String>,
    bounded_load_factor: Option<f64>,
    sticky: Option<String>,
    sticky_ttl_seconds: Option<u32>,
    sticky_max_entries: Option<u32>,
    outlier_detection: Option<RawOutlier>,
    panic: Option<RawPanic>,
    health_check: Option<crate::health::active::config::RawHealthCheck>,
    slow_start: Option<RawSlowStart>,
    circuit_breaker: Option<RawCircuitBreaker>,
    #[serde(alias = "adaptive_weights")]
    adaptive: Option<RawAdaptive>,
    retry: Option<RawRetry>,
    retry_budget: Option<RawBudget>,
    hedge: Option<RawHedge>,
    peak_ewma: Option<RawPeakEwma>,
    locality: Option<RawLocalityPolicy>,
}

/// The validated wire policy of a service's YAML `policy:` (the default policy without one).
/// An error comes with the path of the field as written in the YAML, relative to the service
/// (`policy.adaptive.slow_ratio`).
pub(super) fn to_policy(
    raw: Option<&RawPolicy>,
) -> Result<proto::Policy, (String, ValidationError)> {
    let mut policy = model::default_policy();
    if let Some(p) = raw {
        if let Some(a) = &p.algorithm {
            policy.algorithm = model::parse_algorithm("algorithm", a)
                .map_err(|e| ("policy.algorithm".to_owned(), e))?
                as i32;
        }
        if let Some(c) = p.bounded_load_factor {
            policy.bounded_load_factor = c;
        }
        if let Some(m) = &p.sticky {
            policy.sticky_mode = model::parse_sticky_mode("sticky", m)
                .map_err(|e| ("policy.sticky".to_owned(), e))?
                as i32;
        }
        policy.sticky_ttl_seconds = p.sticky_ttl_seconds.unwrap_or(0);
        policy.sticky_max_entries = p.sticky_max_entries.unwrap_or(0);
        if let Some(h) = &p.health_check {
            policy.health_check = Some(h.to_proto().map_err(|e| {
                let field = e
                    .field
                    .strip_prefix("policy.")
                    .unwrap_or(&e.field)
                    .to_owned();
                (format!("policy.{field}"), e)
            })?);
        }
        apply_outlier_and_panic(p, &mut policy).map_err(|e| (e.field.clone(), e))?;
        apply_slow_start_and_breaker(p, &mut policy);
        apply_adaptive(p, &mut policy);
        apply_call(p, &mut policy);
    }
    model::validate_policy(&policy).map_err(|e| {
        let field = e.field.strip_prefix("policy.").unwrap_or(&e.field);
        let field = if field == "sticky_mode" {
            "sticky".to_owned()
        } else {
            adaptive_yaml_field(&crate::health::active::config::yaml_field(field))
        };
        (format!("policy.{field}"), e)
    })?;
    Ok(policy)
}

// Outlier detection and panic (docs/outlier.md).

/// `policy.outlier_detection` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    consecutive_failures: Option<u32>,
    failure_rate_percent: Option<u32>,
    min_requests: Option<u32>,
    interval_ms: Option<u32>,
    base_ejection_ms: Option<u32>,
    max_ejection_ms: Option<u32>,
    max_ejection_percent: Option<u32>,
}

/// `policy.panic` in the YAML.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPanic {
    threshold_percent: u32,
    mode: String,
}

/// Sets the policy's outlier detection and panic settings from the YAML ones.
fn apply_outlier_and_panic(
    p: &RawPolicy,
    policy: &mut proto::Policy,
) -> Result<(), ValidationError> {
    policy.outlier_detection = p
        .outlier_detection
        .as_ref()
        .map(|o| proto::OutlierDetection {
            consecutive_failures: o.consecutive_failures.unwrap_or(0),
            failure_rate_percent: o.failure_rate_percent.unwrap_or(0),
            min_requests: o.min_requests.unwrap_or(0),
            interval_ms: o.interval_ms.unwrap_or(0),
            base_ejection_ms: o.base_ejection_ms.unwrap_or(0),
            max_ejection_ms: o.max_ejection_ms.unwrap_or(0),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(0),
        });
    policy.panic = match &p.panic {
        None => None,
        Some(p) => Some(proto::PanicPolicy {
            threshold_percent: p.threshold_percent,
            mode: dlb::health_policy::parse_panic_mode("policy.panic.mode", &p.mode)? as i32,
        }),
    };
    Ok(())
}

// Slow start and the SDK's circuit breaker (docs/sdk-health.md).

/// `policy.slow_start` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlowStart {
    window_ms: u32,
    min_percent: Option<u32>,
}

/// `policy.circuit_breaker` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCircuitBreaker {
    consecutive_failures: Option<u32>,
    failure_rate_percent: Option<u32>,
    min_requests: Option<u32>,
    window_ms: Option<u32>,
    base_cooldown_ms: Option<u32>,
    max_cooldown_ms: Option<u32>,
    half_open_max_calls: Option<u32>,
    max_concurrent_calls: Option<u32>,
}

/// Sets the policy's slow start and circuit breaker from the YAML ones.
fn apply_slow_start_and_breaker(p: &RawPolicy, policy: &mut proto::Policy) {
    policy.slow_start = p.slow_start.as_ref().map(|s| proto::SlowStart {
        window_ms: s.window_ms,
        min_percent: s.min_percent.unwrap_or(0),
    });
    policy.circuit_breaker = p.circuit_breaker.as_ref().map(|b| proto::CircuitBreaker {
        consecutive_failures: b.consecutive_failures.unwrap_or(0),
        failure_rate_percent: b.failure_rate_percent.unwrap_or(0),
        min_requests: b.min_requests.unwrap_or(0),
        window_ms: b.window_ms.unwrap_or(0),
        base_cooldown_ms: b.base_cooldown_ms.unwrap_or(0),
        max_cooldown_ms: b.max_cooldown_ms.unwrap_or(0),
        half_open_max_calls: b.half_open_max_calls.unwrap_or(0),
        max_concurrent_calls: b.max_concurrent_calls.unwrap_or(0),
    });
}

// Adaptive weights (docs/adaptive.md).

/// `policy.adaptive` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdaptive {
    enabled: Option<bool>,
    slow_ratio: Option<f64>,
    min_requests: Option<u32>,
    window_ms: Option<u32>,
    floor_percent: Option<u32>,
    recovery_step_percent: Option<u32>,
    min_latency_ms: Option<u32>,
}

/// Sets the policy's adaptive weights from the YAML ones.
fn apply_adaptive(p: &RawPolicy, policy: &mut proto::Policy) {
    policy.adaptive_weights = p.adaptive.as_ref().map(|a| proto::AdaptiveWeights {
        enabled: a.enabled.unwrap_or(true),
        slow_ratio: a.slow_ratio.unwrap_or(0.0),
        min_requests: a.min_requests.unwrap_or(0),
        window_ms: a.window_ms.unwrap_or(0),
        floor_percent: a.floor_percent.unwrap_or(0),
        recovery_step_percent: a.recovery_step_percent.unwrap_or(0),
        min_latency_ms: a.min_latency_ms.unwrap_or(0),
    });
}

/// The YAML spelling of a policy field named by validation (`adaptive_weights.x` →
/// `adaptive.x`).
fn adaptive_yaml_field(field: &str) -> String {
    match field.strip_prefix("adaptive_weights.") {
        Some(rest) => format!("adaptive.{rest}"),
        None => field.to_owned(),
    }
}

// The call path: retries, the retry budget, hedging, Peak-EWMA (docs/sdk.md).

/// `policy.retry` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    #[serde(default)]
    retry_on_grpc_codes: Vec<u32>,
    #[serde(default)]
    retry_on_http_statuses: Vec<u32>,
    backoff_base_ms: Option<u32>,
    backoff_max_ms: Option<u32>,
    max_replay_body_bytes: Option<u32>,
}

/// `policy.retry_budget` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    ratio: Option<f64>,
    min_per_second: Option<u32>,
    window_seconds: Option<u32>,
}

/// `policy.hedge` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHedge {
    delay_ms: Option<u32>,
    delay_percentile: Option<u32>,
    max_hedges: Option<u32>,
}

/// `policy.peak_ewma` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeakEwma {
    decay_ms: Option<u32>,
    default_rtt_us: Option<u32>,
}

/// `policy.locality` in the YAML (`proto::LocalityPolicy`; 0 or left out: the default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocalityPolicy {
    overprovisioning_percent: Option<u32>,
    zone_aware: Option<bool>,
    min_cluster_size: Option<u32>,
    cross_zone_budget_percent: Option<u32>,
    budget_healthy_threshold_percent: Option<u32>,
    saturation_in_flight: Option<u32>,
}

/// Sets the policy's call-path fields from the YAML ones.
fn apply_call(p: &RawPolicy, policy: &mut proto::Policy) {
    policy.retry = p.retry.as_ref().map(|r| proto::RetryPolicy {
        max_attempts: r.max_attempts.unwrap_or(0),
        retry_on_grpc_codes: r.retry_on_grpc_codes.clone(),
        retry_on_http_statuses: r.retry_on_http_statuses.clone(),
        backoff_base_ms: r.backoff_base_ms.unwrap_or(0),
        backoff_max_ms: r.backoff_max_ms.unwrap_or(0),
        max_replay_body_bytes: r.max_replay_body_bytes.unwrap_or(0),
    });
    policy.retry_budget = p.retry_budget.as_ref().map(|b| proto::RetryBudget {
        ratio: b.ratio.unwrap_or(0.0),
        min_per_second: b.min_per_second.unwrap_or(0),
        window_seconds: b.window_seconds.unwrap_or(0),
    });
    policy.hedge = p.hedge.as_ref().map(|h| proto::HedgePolicy {
        delay_ms: h.delay_ms.unwrap_or(0),
        delay_percentile: h.delay_percentile.unwrap_or(0),
        max_hedges: h.max_hedges.unwrap_or(0),
    });
    policy.peak_ewma = p.peak_ewma.as_ref().map(|e| proto::PeakEwma {
        decay_ms: e.decay_ms.unwrap_or(0),
        default_rtt_us: e.default_rtt_us.unwrap_or(0),
    });
    policy.locality = p.locality.as_ref().map(|l| proto::LocalityPolicy {
        overprovisioning_percent: l.overprovisioning_percent.unwrap_or(0),
        zone_aware: l.zone_aware,
        min_cluster_size: l.min_cluster_size.unwrap_or(0),
        cross_zone_budget_percent: l.cross_zone_budget_percent.unwrap_or(0),
        budget_healthy_threshold_percent: l.budget_healthy_threshold_percent.unwrap_or(0),
        saturation_in_flight: l.saturation_in_flight.unwrap_or(0),
    });
}

#[cfg(test)]
mod tests {
    use crate::ServerConfig;
    use dlb::proto;

    #[test]
    fn yaml_outlier_and_panic_settings() {
        let cfg = ServerConfig::from_yaml_str(
            "services:
  - name: web
    policy:
      outlier_detection: { consecutive_failures: 3, max_ejection_percent: 50 }
      panic: { threshold_percent: 40, mode: fail }
",
        )
        .expect("valid");
        let web = cfg.services.iter().find(|s| s.name == "web").expect("web");
        let p = &web.policy;
        let o = p.outlier_detection.expect("on");
        assert_eq!((o.consecutive_failures, o.max_ejection_percent), (3, 50));
        let panic = p.panic.expect("set");
        assert_eq!(panic.threshold_percent, 40);
        assert_eq!(panic.mode, proto::PanicMode::Fail as i32);

        let bad = ServerConfig::from_yaml_str(
            "services:
  - name: web
    policy:
      panic: { threshold_percent: 40, mode: sometimes }
",
        )
        .expect_err("bad mode");
        assert!(bad.to_string().contains("panic.mode"), "{bad}");
        let bad = ServerConfig::from_yaml_str(
            "services:
  - name: web
    policy:
      outlier_detection: { max_ejection_percent: 150 }
",
        )
        .expect_err("bad percent");
        assert!(bad.to_string().contains("max_ejection_percent"), "{bad}");
    }

    #[test]
    fn yaml_slow_start_and_circuit_breaker() {
        let cfg = ServerConfig::from_yaml_str(
            "services:
  - name: web
    policy:
      slow_start: { window_ms: 30000 }
      circuit_breaker: { consecutive_failures: 3, max_concurrent_calls: 100 }
",
        )
        .expect("valid");
        let web = cfg.services.iter().find(|s| s.name == "web").expect("web");
        let s = web.policy.slow_start.expect("on");
        assert_eq!((s.window_ms, s.min_percent), (30_000, 0));
        let b = web.policy.circuit_breaker.expect("on");
        assert_eq!((b.consecutive_failures, b.max_concurrent_calls), (3, 100));

        let bad = ServerConfig::from_yaml_str(
            "services:
  - name: web
    policy:
      slow_start: { window_ms: 10 }
",
        )
        .expect_err("bad window");
        assert!(bad.to_string().contains("slow_start.window_ms"), "{bad}");
        let bad = ServerConfig::from_yaml_str(
            "services:
  - name: web
    policy:
      circuit_breaker: { base_cooldown_ms: 5000, max_cooldown_ms: 100 }
",
        )
        .expect_err("bad cap");
        assert!(bad.to_string().contains("max_cooldown_ms"), "{bad}");
    }

    #[test]
    fn yaml_adaptive() {
        let cfg = ServerConfig::from_yaml_str(
            "services:
  - name: web
    policy:
      adaptive: { slow_ratio: 3.0, floor_percent: 20, window_ms: 1000 }
",
        )
        .expect("valid");
        let web = cfg.services.iter().find(|s| s.name == "web").expect("web");
        let a = web.policy.adaptive_weights.expect("set");
        assert!(a.enabled);
        assert_eq!(
            (a.slow_ratio, a.floor_percent, a.window_ms),
            (3.0, 20, 1000)
        );
        let c = dlb::adaptive::config(&web.policy).expect("on");
        assert_eq!(c.recovery_step_percent, 25);

        let bad = ServerConfig::from_yaml_str(
            "services:
  - name: web
    policy:
      adaptive: { slow_ratio: 0.5 }
",
        )
        .expect_err("bad ratio");
        assert!(
            bad.to_string().contains("policy.adaptive.slow_ratio"),
            "{bad}"
        );
        let bad = ServerConfig::from_yaml_str(
            "services:
  - name: web
    policy:
      adaptive: { floor: 5 }
",
        )
        .expect_err("unknown field");
        assert!(bad.to_string().contains("floor"), "{bad}");
    }

    #[test]
    fn yaml_call_policy() {
        let cfg = ServerConfig::from_yaml_str(
            "services:
  - name: web
    policy:
      algorithm: peak_ewma
      peak_ewma: { decay_ms: 5000 }
      retry: { retry_on_grpc_codes: [14, 8], retry_on_http_statuses: [503] }
      retry_budget: { ratio: 0.5 }
      hedge: { delay_ms: 40 }
  - name: plain
",
        )
        .expect("valid");
        let web = cfg.services.iter().find(|s| s.name == "web").expect("web");
        assert_eq!(web.policy.algorithm, proto::Algorithm::PeakEwma as i32);
        assert_eq!(web.policy.peak_ewma.expect("set").decay_ms, 5000);
        let r = web.policy.retry.as_ref().expect("on");
        assert_eq!(r.retry_on_grpc_codes, vec![14, 8]);
        assert_eq!(r.max_attempts, 0, "0: the default");
        assert_eq!(web.policy.retry_budget.expect("set").ratio, 0.5);
        assert_eq!(web.policy.hedge.expect("on").delay_ms, 40);
        let plain = cfg
            .services
            .iter()
            .find(|s| s.name == "plain")
            .expect("plain");
        assert!(plain.policy.retry.is_none() && plain.policy.hedge.is_none());

        for (yaml, field) in [
            ("retry: { max_attempts: 11 }", "policy.retry.max_attempts"),
            ("retry: { retry_on_grpc_codes: [0] }", "retry_on_grpc_codes"),
            (
                "retry_budget: { window_seconds: 100 }",
                "retry_budget.window_seconds",
            ),
            (
                "hedge: { delay_ms: 5, delay_percentile: 90 }",
                "hedge.delay_percentile",
            ),
            ("peak_ewma: { decay_ms: 1 }", "peak_ewma.decay_ms"),
            ("retry: { attempts: 2 }", "attempts"),
        ] {
            let text = format!("services:\n  - name: web\n    policy:\n      {yaml}\n");
            let bad = ServerConfig::from_yaml_str(&text).expect_err(yaml);
            assert!(bad.to_string().contains(field), "{yaml}: {bad}");
        }
    }
}
