//! The YAML form of a service's slow start and SDK circuit breaker (under `policy:`), and their
//! conversion into the wire policy. Field names are the proto's; a field left out is 0, which
//! means its default (docs/sdk-health.md):
//!
//! ```yaml
//! policy:
//!   slow_start: { window_ms: 30000, min_percent: 10 }
//!   circuit_breaker: { consecutive_failures: 5, failure_rate_percent: 50, min_requests: 20,
//!                      window_ms: 10000, base_cooldown_ms: 1000, max_cooldown_ms: 60000,
//!                      half_open_max_calls: 1, max_concurrent_calls: 100 }
//! ```
//!
//! Validation is [`dlb::model::validate_policy`], as for every other entry point.

use dlb::proto;
use serde::Deserialize;

/// `policy.slow_start` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSlowStart {
    window_ms: u32,
    min_percent: Option<u32>,
}

/// `policy.circuit_breaker` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCircuitBreaker {
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
pub(crate) fn apply(
    slow: Option<&RawSlowStart>,
    breaker: Option<&RawCircuitBreaker>,
    policy: &mut proto::Policy,
) {
    policy.slow_start = slow.map(|s| proto::SlowStart {
        window_ms: s.window_ms,
        min_percent: s.min_percent.unwrap_or(0),
    });
    policy.circuit_breaker = breaker.map(|b| proto::CircuitBreaker {
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

#[cfg(test)]
mod tests {
    use crate::ServerConfig;

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
}
