//! The YAML form of a service's call-path policy (under `policy:`): retries, the retry budget,
//! hedging and the Peak-EWMA tuning, and their conversion into the wire policy. Field names are
//! the proto's; a field left out is 0, which means its default (`dlb.proto`, docs/sdk.md):
//!
//! ```yaml
//! policy:
//!   algorithm: peak_ewma
//!   peak_ewma: { decay_ms: 10000, default_rtt_us: 30000 }
//!   retry: { max_attempts: 3, retry_on_grpc_codes: [14], retry_on_http_statuses: [503],
//!            backoff_base_ms: 25, backoff_max_ms: 250, max_replay_body_bytes: 65536 }
//!   retry_budget: { ratio: 0.2, min_per_second: 10, window_seconds: 10 }
//!   hedge: { delay_percentile: 95, max_hedges: 1 }      # or { delay_ms: 50 }
//! ```
//!
//! `retry: {}` turns retries on with every default. Validation is
//! [`dlb::model::validate_policy`], as for every other entry point.

use dlb::proto;
use serde::Deserialize;

/// `policy.retry` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
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
pub(crate) struct RawBudget {
    ratio: Option<f64>,
    min_per_second: Option<u32>,
    window_seconds: Option<u32>,
}

/// `policy.hedge` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHedge {
    delay_ms: Option<u32>,
    delay_percentile: Option<u32>,
    max_hedges: Option<u32>,
}

/// `policy.peak_ewma` in the YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPeakEwma {
    decay_ms: Option<u32>,
    default_rtt_us: Option<u32>,
}

/// The call-path parts of a YAML `policy:`.
#[derive(Debug, Default)]
pub(crate) struct RawCall<'a> {
    pub(crate) retry: Option<&'a RawRetry>,
    pub(crate) retry_budget: Option<&'a RawBudget>,
    pub(crate) hedge: Option<&'a RawHedge>,
    pub(crate) peak_ewma: Option<&'a RawPeakEwma>,
}

/// Sets the policy's call-path fields from the YAML ones.
pub(crate) fn apply(raw: RawCall<'_>, policy: &mut proto::Policy) {
    policy.retry = raw.retry.map(|r| proto::RetryPolicy {
        max_attempts: r.max_attempts.unwrap_or(0),
        retry_on_grpc_codes: r.retry_on_grpc_codes.clone(),
        retry_on_http_statuses: r.retry_on_http_statuses.clone(),
        backoff_base_ms: r.backoff_base_ms.unwrap_or(0),
        backoff_max_ms: r.backoff_max_ms.unwrap_or(0),
        max_replay_body_bytes: r.max_replay_body_bytes.unwrap_or(0),
    });
    policy.retry_budget = raw.retry_budget.map(|b| proto::RetryBudget {
        ratio: b.ratio.unwrap_or(0.0),
        min_per_second: b.min_per_second.unwrap_or(0),
        window_seconds: b.window_seconds.unwrap_or(0),
    });
    policy.hedge = raw.hedge.map(|h| proto::HedgePolicy {
        delay_ms: h.delay_ms.unwrap_or(0),
        delay_percentile: h.delay_percentile.unwrap_or(0),
        max_hedges: h.max_hedges.unwrap_or(0),
    });
    policy.peak_ewma = raw.peak_ewma.map(|e| proto::PeakEwma {
        decay_ms: e.decay_ms.unwrap_or(0),
        default_rtt_us: e.default_rtt_us.unwrap_or(0),
    });
}

#[cfg(test)]
mod tests {
    use crate::ServerConfig;
    use dlb::proto;

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
