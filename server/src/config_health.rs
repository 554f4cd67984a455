//! The YAML form of a service's outlier-detection and panic settings (under `policy:`), and
//! their conversion into the wire policy. Field names are the proto's; a field left out takes
//! its default (docs/outlier.md):
//!
//! ```yaml
//! policy:
//!   outlier_detection: { consecutive_failures: 5, failure_rate_percent: 50, min_requests: 20,
//!                        interval_ms: 1000, base_ejection_ms: 30000, max_ejection_ms: 300000,
//!                        max_ejection_percent: 10 }
//!   panic: { threshold_percent: 50, mode: route_all }   # or fail
//! ```
//!
//! Validation is [`dlb::model::validate_policy`], as for every other entry point.

use dlb::model::ValidationError;
use dlb::proto;
use serde::Deserialize;

/// `policy.outlier_detection` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutlier {
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
pub(crate) struct RawPanic {
    threshold_percent: u32,
    mode: String,
}

/// Sets the policy's outlier detection and panic settings from the YAML ones.
pub(crate) fn apply(
    outlier: Option<&RawOutlier>,
    panic: Option<&RawPanic>,
    policy: &mut proto::Policy,
) -> Result<(), ValidationError> {
    policy.outlier_detection = outlier.map(|o| proto::OutlierDetection {
        consecutive_failures: o.consecutive_failures.unwrap_or(0),
        failure_rate_percent: o.failure_rate_percent.unwrap_or(0),
        min_requests: o.min_requests.unwrap_or(0),
        interval_ms: o.interval_ms.unwrap_or(0),
        base_ejection_ms: o.base_ejection_ms.unwrap_or(0),
        max_ejection_ms: o.max_ejection_ms.unwrap_or(0),
        max_ejection_percent: o.max_ejection_percent.unwrap_or(0),
    });
    policy.panic = match panic {
        None => None,
        Some(p) => Some(proto::PanicPolicy {
            threshold_percent: p.threshold_percent,
            mode: dlb::health_policy::parse_panic_mode("policy.panic.mode", &p.mode)? as i32,
        }),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::ServerConfig;

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
        assert_eq!(panic.mode, dlb::proto::PanicMode::Fail as i32);

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
}
