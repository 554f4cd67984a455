//! The YAML form of a service's adaptive weights (`policy.adaptive`, also accepted as
//! `policy.adaptive_weights`), and its conversion into the wire policy. Field names are the
//! proto's; a field left out is 0, which means its default (docs/adaptive.md):
//!
//! ```yaml
//! policy:
//!   adaptive: { enabled: true, slow_ratio: 2.0, min_requests: 20, window_ms: 5000,
//!               floor_percent: 10, recovery_step_percent: 25, min_latency_ms: 1 }
//! ```
//!
//! `enabled` defaults to `true` when the block is present. Validation is
//! [`dlb::model::validate_policy`], as for every other entry point; an error names the field as
//! written in the YAML (`policy.adaptive.slow_ratio`).

use dlb::proto;
use serde::Deserialize;

/// `policy.adaptive` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdaptive {
    enabled: Option<bool>,
    slow_ratio: Option<f64>,
    min_requests: Option<u32>,
    window_ms: Option<u32>,
    floor_percent: Option<u32>,
    recovery_step_percent: Option<u32>,
    min_latency_ms: Option<u32>,
}

/// Sets the policy's adaptive weights from the YAML ones.
pub(crate) fn apply(raw: Option<&RawAdaptive>, policy: &mut proto::Policy) {
    policy.adaptive_weights = raw.map(|a| proto::AdaptiveWeights {
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
pub(crate) fn yaml_field(field: &str) -> String {
    match field.strip_prefix("adaptive_weights.") {
        Some(rest) => format!("adaptive.{rest}"),
        None => field.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use crate::ServerConfig;

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
}
