//! The SDK call path's per-service policy (issue 16): retries, the retry budget, hedging and the
//! Peak-EWMA tuning — their defaults, validation and resolved configuration — plus the
//! standalone, runtime-free pieces the call path is built from:
//!
//! * [`budget`] — the retry budget (Linkerd/Finagle): deposits per request, withdrawals per retry
//!   or hedge, over a sliding window; O(1), one tiny lock;
//! * [`latency`] — a decaying latency histogram for the hedge delay's pN; O(1) record, O(buckets)
//!   read;
//! * [`clock`] — the injectable monotonic time source both use, so their tests are deterministic.
//!
//! The wire form is `RetryPolicy`, `RetryBudget`, `HedgePolicy` and `PeakEwma` in `dlb.proto`
//! (every field documented there with its default and bounds); [`validate`] is called by
//! `model::validate_policy`, so every entry point (SetPolicy, the YAML config,
//! `dlbctl`) rejects the same values with the same message naming the field.

use std::time::Duration;

use crate::proto;
use crate::validation::ValidationError;

pub mod budget;
pub mod clock;
pub mod latency;

/// Defaults of the fields that are 0 (see `dlb.proto`).
pub mod defaults {
    /// `RetryPolicy.max_attempts`.
    pub const MAX_ATTEMPTS: u32 = 3;
    /// `RetryPolicy.backoff_base_ms`.
    pub const BACKOFF_BASE_MS: u32 = 25;
    /// `RetryPolicy.backoff_max_ms`.
    pub const BACKOFF_MAX_MS: u32 = 250;
    /// `RetryPolicy.max_replay_body_bytes`.
    pub const MAX_REPLAY_BODY_BYTES: u32 = 64 << 10;
    /// `RetryBudget.ratio`.
    pub const BUDGET_RATIO: f64 = 0.2;
    /// `RetryBudget.min_per_second`.
    pub const BUDGET_MIN_PER_SECOND: u32 = 10;
    /// `RetryBudget.window_seconds`.
    pub const BUDGET_WINDOW_SECONDS: u32 = 10;
    /// `HedgePolicy.delay_percentile` when `delay_ms` is 0.
    pub const HEDGE_PERCENTILE: u32 = 95;
    /// `HedgePolicy.max_hedges`.
    pub const MAX_HEDGES: u32 = 1;
    /// Calls observed before a percentile hedge delay is trusted (no hedge before).
    pub const HEDGE_MIN_SAMPLES: u64 = 20;
    /// `PeakEwma.decay_ms`.
    pub const EWMA_DECAY_MS: u32 = 10_000;
    /// `PeakEwma.default_rtt_us`.
    pub const EWMA_DEFAULT_RTT_US: u32 = 30_000;
}

/// Bounds of the fields (inclusive).
pub mod bounds {
    use std::ops::RangeInclusive;
    /// `RetryPolicy.max_attempts`.
    pub const MAX_ATTEMPTS: RangeInclusive<u32> = 1..=10;
    /// Each of `RetryPolicy.retry_on_grpc_codes`.
    pub const GRPC_CODE: RangeInclusive<u32> = 1..=16;
    /// Entries of `RetryPolicy.retry_on_grpc_codes`.
    pub const MAX_GRPC_CODES: usize = 16;
    /// Each of `RetryPolicy.retry_on_http_statuses`.
    pub const HTTP_STATUS: RangeInclusive<u32> = 400..=599;
    /// Entries of `RetryPolicy.retry_on_http_statuses`.
    pub const MAX_HTTP_STATUSES: usize = 32;
    /// `RetryPolicy.backoff_base_ms` and `backoff_max_ms`.
    pub const BACKOFF_MS: RangeInclusive<u32> = 1..=60_000;
    /// `RetryPolicy.max_replay_body_bytes`.
    pub const MAX_REPLAY_BODY_BYTES: u32 = 16 << 20;
    /// `RetryBudget.ratio`.
    pub const BUDGET_RATIO: RangeInclusive<f64> = 0.01..=10.0;
    /// `RetryBudget.min_per_second`.
    pub const BUDGET_MIN_PER_SECOND: u32 = 100_000;
    /// `RetryBudget.window_seconds`.
    pub const BUDGET_WINDOW_SECONDS: RangeInclusive<u32> = 1..=60;
    /// `HedgePolicy.delay_ms`.
    pub const HEDGE_DELAY_MS: RangeInclusive<u32> = 1..=60_000;
    /// `HedgePolicy.delay_percentile`.
    pub const HEDGE_PERCENTILE: RangeInclusive<u32> = 50..=99;
    /// `HedgePolicy.max_hedges`.
    pub const MAX_HEDGES: RangeInclusive<u32> = 1..=3;
    /// `PeakEwma.decay_ms`.
    pub const EWMA_DECAY_MS: RangeInclusive<u32> = 100..=600_000;
    /// `PeakEwma.default_rtt_us`.
    pub const EWMA_DEFAULT_RTT_US: RangeInclusive<u32> = 1..=60_000_000;
}

fn or(v: u32, default: u32) -> u32 {
    if v == 0 {
        default
    } else {
        v
    }
}

/// A service's retry settings, defaults applied (`Policy.retry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    /// Attempts per request, the first included (≥ 1).
    pub max_attempts: u32,
    /// gRPC codes retried even after the request was sent, sorted, deduplicated.
    pub retry_on_grpc_codes: Vec<u32>,
    /// HTTP statuses retried even after the request was sent, sorted, deduplicated.
    pub retry_on_http_statuses: Vec<u16>,
    /// Backoff base.
    pub backoff_base: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Largest request body buffered for replay.
    pub max_replay_body_bytes: usize,
}

impl RetryConfig {
    /// Whether a gRPC status code (as a number) is listed as retryable after sending.
    pub fn retries_grpc_code(&self, code: u32) -> bool {
        self.retry_on_grpc_codes.binary_search(&code).is_ok()
    }

    /// Whether an HTTP status is listed as retryable after sending.
    pub fn retries_http_status(&self, status: u16) -> bool {
        self.retry_on_http_statuses.binary_search(&status).is_ok()
    }

    /// The upper end of the jittered backoff before retry `n` (1-based):
    /// `min(max, base × 2^(n − 1))`. The call path waits a uniformly random time in
    /// `[0, backoff_ceiling(n)]` ("full jitter").
    pub fn backoff_ceiling(&self, n: u32) -> Duration {
        let shift = n.saturating_sub(1).min(30);
        self.backoff_base
            .saturating_mul(1u32 << shift)
            .min(self.backoff_max)
    }

    /// The jittered backoff before retry `n` (1-based), `unit` being a uniform draw in `[0, 1)`.
    pub fn backoff(&self, n: u32, unit: f64) -> Duration {
        self.backoff_ceiling(n).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// A service's retry budget, defaults applied (`Policy.retry_budget`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// Retries (and hedges) per original request, over the window.
    pub ratio: f64,
    /// Retries allowed per second regardless of traffic.
    pub min_per_second: u32,
    /// The sliding window.
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: defaults::BUDGET_RATIO,
            min_per_second: defaults::BUDGET_MIN_PER_SECOND,
            window: Duration::from_secs(u64::from(defaults::BUDGET_WINDOW_SECONDS)),
        }
    }
}

/// When a hedge is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HedgeDelay {
    /// After a fixed delay.
    Fixed(Duration),
    /// After the service's observed latency at this percentile (50..=99), once
    /// [`defaults::HEDGE_MIN_SAMPLES`] calls have been observed.
    Percentile(u32),
}

/// A service's hedging settings, defaults applied (`Policy.hedge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HedgeConfig {
    /// The hedge delay.
    pub delay: HedgeDelay,
    /// Extra copies per request, at most.
    pub max_hedges: u32,
}

/// Peak-EWMA tuning, defaults applied (`Policy.peak_ewma`); defined with the algorithm.
pub use crate::balance::ewma::EwmaConfig;

/// The call-path configuration of a (validated) policy: what the SDK's tower service reads.
#[derive(Debug, Clone, PartialEq)]
pub struct CallConfig {
    /// Retries; `None`: off.
    pub retry: Option<RetryConfig>,
    /// Hedging; `None`: off.
    pub hedge: Option<HedgeConfig>,
    /// The budget shared by retries and hedges (its defaults when the policy sets none).
    pub budget: BudgetConfig,
}

/// The retry settings of a stored policy, if it has any.
pub fn retry_config(policy: &proto::Policy) -> Option<RetryConfig> {
    let r = policy.retry.as_ref()?;
    let mut grpc = r.retry_on_grpc_codes.clone();
    grpc.sort_unstable();
    grpc.dedup();
    let mut http: Vec<u16> = r
        .retry_on_http_statuses
        .iter()
        .filter_map(|&s| u16::try_from(s).ok())
        .collect();
    http.sort_unstable();
    http.dedup();
    let base = or(r.backoff_base_ms, defaults::BACKOFF_BASE_MS);
    let max = or(r.backoff_max_ms, defaults::BACKOFF_MAX_MS).max(base);
    Some(RetryConfig {
        max_attempts: or(r.max_attempts, defaults::MAX_ATTEMPTS),
        retry_on_grpc_codes: grpc,
        retry_on_http_statuses: http,
        backoff_base: Duration::from_millis(u64::from(base)),
        backoff_max: Duration::from_millis(u64::from(max)),
        max_replay_body_bytes: or(r.max_replay_body_bytes, defaults::MAX_REPLAY_BODY_BYTES)
            as usize,
    })
}

/// The budget of a stored policy (its defaults when unset).
pub fn budget_config(policy: &proto::Policy) -> BudgetConfig {
    let Some(b) = policy.retry_budget else {
        return BudgetConfig::default();
    };
    BudgetConfig {
        ratio: if b.ratio == 0.0 {
            defaults::BUDGET_RATIO
        } else {
            b.ratio
        },
        min_per_second: or(b.min_per_second, defaults::BUDGET_MIN_PER_SECOND),
        window: Duration::from_secs(u64::from(or(
            b.window_seconds,
            defaults::BUDGET_WINDOW_SECONDS,
        ))),
    }
}

/// The hedging settings of a stored policy, if it has any.
pub fn hedge_config(policy: &proto::Policy) -> Option<HedgeConfig> {
    let h = policy.hedge?;
    let delay = if h.delay_ms != 0 {
        HedgeDelay::Fixed(Duration::from_millis(u64::from(h.delay_ms)))
    } else {
        HedgeDelay::Percentile(or(h.delay_percentile, defaults::HEDGE_PERCENTILE))
    };
    Some(HedgeConfig {
        delay,
        max_hedges: or(h.max_hedges, defaults::MAX_HEDGES),
    })
}

/// The Peak-EWMA tuning of a stored policy (its defaults when unset).
pub fn ewma_config(policy: &proto::Policy) -> EwmaConfig {
    let Some(e) = policy.peak_ewma else {
        return EwmaConfig::default();
    };
    EwmaConfig {
        decay: Duration::from_millis(u64::from(or(e.decay_ms, defaults::EWMA_DECAY_MS))),
        default_rtt: Duration::from_micros(u64::from(or(
            e.default_rtt_us,
            defaults::EWMA_DEFAULT_RTT_US,
        ))),
    }
}

/// The whole call-path configuration of a stored policy.
pub fn call_config(policy: &proto::Policy) -> CallConfig {
    CallConfig {
        retry: retry_config(policy),
        hedge: hedge_config(policy),
        budget: budget_config(policy),
    }
}

/// Checks `policy.retry`, `policy.retry_budget`, `policy.hedge` and `policy.peak_ewma` (see the
/// field docs in `dlb.proto`). Every error names the field.
pub fn validate(policy: &proto::Policy) -> Result<(), ValidationError> {
    if let Some(r) = &policy.retry {
        validate_retry(r)?;
    }
    if let Some(b) = &policy.retry_budget {
        let f = |name: &str| format!("policy.retry_budget.{name}");
        if b.ratio != 0.0 && !(b.ratio.is_finite() && bounds::BUDGET_RATIO.contains(&b.ratio)) {
            return Err(ValidationError::new(
                f("ratio"),
                b.ratio,
                "must be between 0.01 and 10.0; 0 means the default (0.2)",
            ));
        }
        if b.min_per_second > bounds::BUDGET_MIN_PER_SECOND {
            return Err(ValidationError::new(
                f("min_per_second"),
                b.min_per_second,
                "must be at most 100000; 0 means the default (10)",
            ));
        }
        if b.window_seconds != 0 && !bounds::BUDGET_WINDOW_SECONDS.contains(&b.window_seconds) {
            return Err(ValidationError::new(
                f("window_seconds"),
                b.window_seconds,
                "must be between 1 and 60; 0 means the default (10)",
            ));
        }
    }
    if let Some(h) = &policy.hedge {
        let f = |name: &str| format!("policy.hedge.{name}");
        if h.delay_ms != 0 && !bounds::HEDGE_DELAY_MS.contains(&h.delay_ms) {
            return Err(ValidationError::new(
                f("delay_ms"),
                h.delay_ms,
                "must be between 1 and 60000; 0 means the observed delay_percentile",
            ));
        }
        if h.delay_percentile != 0 {
            if h.delay_ms != 0 {
                return Err(ValidationError::new(
                    f("delay_percentile"),
                    h.delay_percentile,
                    "set either delay_ms or delay_percentile, not both",
                ));
            }
            if !bounds::HEDGE_PERCENTILE.contains(&h.delay_percentile) {
                return Err(ValidationError::new(
                    f("delay_percentile"),
                    h.delay_percentile,
                    "must be between 50 and 99; 0 means the default (95)",
                ));
            }
        }
        if h.max_hedges != 0 && !bounds::MAX_HEDGES.contains(&h.max_hedges) {
            return Err(ValidationError::new(
                f("max_hedges"),
                h.max_hedges,
                "must be between 1 and 3; 0 means the default (1)",
            ));
        }
    }
    if let Some(e) = &policy.peak_ewma {
        let f = |name: &str| format!("policy.peak_ewma.{name}");
        if e.decay_ms != 0 && !bounds::EWMA_DECAY_MS.contains(&e.decay_ms) {
            return Err(ValidationError::new(
                f("decay_ms"),
                e.decay_ms,
                "must be between 100 and 600000; 0 means the default (10000)",
            ));
        }
        if e.default_rtt_us != 0 && !bounds::EWMA_DEFAULT_RTT_US.contains(&e.default_rtt_us) {
            return Err(ValidationError::new(
                f("default_rtt_us"),
                e.default_rtt_us,
                "must be between 1 and 60000000; 0 means the default (30000)",
            ));
        }
    }
    Ok(())
}

fn validate_retry(r: &proto::RetryPolicy) -> Result<(), ValidationError> {
    let f = |name: &str| format!("policy.retry.{name}");
    if r.max_attempts != 0 && !bounds::MAX_ATTEMPTS.contains(&r.max_attempts) {
        return Err(ValidationError::new(
            f("max_attempts"),
            r.max_attempts,
            "must be between 1 and 10; 0 means the default (3)",
        ));
    }
    if r.retry_on_grpc_codes.len() > bounds::MAX_GRPC_CODES {
        return Err(ValidationError::new(
            f("retry_on_grpc_codes"),
            format!("{} entries", r.retry_on_grpc_codes.len()),
            "at most 16 entries",
        ));
    }
    if let Some(c) = r
        .retry_on_grpc_codes
        .iter()
        .find(|c| !bounds::GRPC_CODE.contains(c))
    {
        return Err(ValidationError::new(
            f("retry_on_grpc_codes"),
            c,
            "each must be a gRPC status code between 1 and 16",
        ));
    }
    if r.retry_on_http_statuses.len() > bounds::MAX_HTTP_STATUSES {
        return Err(ValidationError::new(
            f("retry_on_http_statuses"),
            format!("{} entries", r.retry_on_http_statuses.len()),
            "at most 32 entries",
        ));
    }
    if let Some(s) = r
        .retry_on_http_statuses
        .iter()
        .find(|s| !bounds::HTTP_STATUS.contains(s))
    {
        return Err(ValidationError::new(
            f("retry_on_http_statuses"),
            s,
            "each must be an HTTP status between 400 and 599",
        ));
    }
    if r.backoff_base_ms != 0 && !bounds::BACKOFF_MS.contains(&r.backoff_base_ms) {
        return Err(ValidationError::new(
            f("backoff_base_ms"),
            r.backoff_base_ms,
            "must be between 1 and 60000; 0 means the default (25)",
        ));
    }
    let base = or(r.backoff_base_ms, defaults::BACKOFF_BASE_MS);
    let max = or(r.backoff_max_ms, defaults::BACKOFF_MAX_MS);
    if max < base || max > *bounds::BACKOFF_MS.end() {
        return Err(ValidationError::new(
            f("backoff_max_ms"),
            r.backoff_max_ms,
            "must be at least backoff_base_ms and at most 60000; 0 means the default (250)",
        ));
    }
    if r.max_replay_body_bytes > bounds::MAX_REPLAY_BODY_BYTES {
        return Err(ValidationError::new(
            f("max_replay_body_bytes"),
            r.max_replay_body_bytes,
            "must be at most 16777216; 0 means the default (65536)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> proto::Policy {
        crate::model::default_policy()
    }

    #[test]
    fn defaults_apply_and_unset_means_off() {
        let mut p = policy();
        let c = call_config(&p);
        assert_eq!((c.retry, c.hedge), (None, None));
        assert_eq!(c.budget, BudgetConfig::default());
        assert_eq!(ewma_config(&p), EwmaConfig::default());
        assert_eq!(
            EwmaConfig::default(),
            EwmaConfig {
                decay: Duration::from_millis(u64::from(defaults::EWMA_DECAY_MS)),
                default_rtt: Duration::from_micros(u64::from(defaults::EWMA_DEFAULT_RTT_US)),
            }
        );
        p.retry = Some(proto::RetryPolicy {
            retry_on_grpc_codes: vec![14, 8, 14],
            retry_on_http_statuses: vec![503, 502],
            ..Default::default()
        });
        p.hedge = Some(proto::HedgePolicy::default());
        p.peak_ewma = Some(proto::PeakEwma {
            decay_ms: 500,
            default_rtt_us: 0,
        });
        validate(&p).expect("valid");
        let r = retry_config(&p).expect("on");
        assert_eq!(r.max_attempts, 3);
        assert_eq!(r.retry_on_grpc_codes, vec![8, 14]);
        assert!(r.retries_grpc_code(14) && !r.retries_grpc_code(2));
        assert!(r.retries_http_status(502) && !r.retries_http_status(500));
        assert_eq!(r.max_replay_body_bytes, 65_536);
        assert_eq!(r.backoff_ceiling(1), Duration::from_millis(25));
        assert_eq!(r.backoff_ceiling(3), Duration::from_millis(100));
        assert_eq!(r.backoff_ceiling(10), Duration::from_millis(250));
        assert_eq!(r.backoff(2, 0.5), Duration::from_millis(25));
        let h = hedge_config(&p).expect("on");
        assert_eq!(h.delay, HedgeDelay::Percentile(95));
        assert_eq!(h.max_hedges, 1);
        assert_eq!(ewma_config(&p).decay, Duration::from_millis(500));
        assert_eq!(ewma_config(&p).default_rtt, Duration::from_millis(30));
    }

    #[test]
    fn every_bound_names_its_field() {
        let cases: Vec<(&str, proto::Policy)> = vec![
            ("policy.retry.max_attempts", {
                let mut p = policy();
                p.retry = Some(proto::RetryPolicy {
                    max_attempts: 11,
                    ..Default::default()
                });
                p
            }),
            ("policy.retry.retry_on_grpc_codes", {
                let mut p = policy();
                p.retry = Some(proto::RetryPolicy {
                    retry_on_grpc_codes: vec![14, 0],
                    ..Default::default()
                });
                p
            }),
            ("policy.retry.retry_on_http_statuses", {
                let mut p = policy();
                p.retry = Some(proto::RetryPolicy {
                    retry_on_http_statuses: vec![200],
                    ..Default::default()
                });
                p
            }),
            ("policy.retry.backoff_max_ms", {
                let mut p = policy();
                p.retry = Some(proto::RetryPolicy {
                    backoff_base_ms: 500,
                    ..Default::default()
                });
                p
            }),
            ("policy.retry.max_replay_body_bytes", {
                let mut p = policy();
                p.retry = Some(proto::RetryPolicy {
                    max_replay_body_bytes: (16 << 20) + 1,
                    ..Default::default()
                });
                p
            }),
            ("policy.retry_budget.ratio", {
                let mut p = policy();
                p.retry_budget = Some(proto::RetryBudget {
                    ratio: f64::NAN,
                    ..Default::default()
                });
                p
            }),
            ("policy.retry_budget.window_seconds", {
                let mut p = policy();
                p.retry_budget = Some(proto::RetryBudget {
                    window_seconds: 61,
                    ..Default::default()
                });
                p
            }),
            ("policy.hedge.delay_percentile", {
                let mut p = policy();
                p.hedge = Some(proto::HedgePolicy {
                    delay_ms: 10,
                    delay_percentile: 90,
                    ..Default::default()
                });
                p
            }),
            ("policy.hedge.max_hedges", {
                let mut p = policy();
                p.hedge = Some(proto::HedgePolicy {
                    max_hedges: 4,
                    ..Default::default()
                });
                p
            }),
            ("policy.peak_ewma.decay_ms", {
                let mut p = policy();
                p.peak_ewma = Some(proto::PeakEwma {
                    decay_ms: 99,
                    ..Default::default()
                });
                p
            }),
        ];
        for (field, p) in cases {
            let e = crate::model::validate_policy(&p).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }
}
