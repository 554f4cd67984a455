//! Adaptive weights: a backend much slower than its service's median gets a lower share of its
//! weight, decided by the control plane and stored in the backend's **latency** source
//! ([`proto::HealthSources::latency`]), so every SDK (and `dlbd`'s own picker) agrees.
//!
//! This module owns the pure parts, shared by `dlbd` and the SDK:
//!
//! * the policy's settings ([`config`], [`validate`]; `Policy.adaptive_weights`);
//! * **the decision** ([`decide`]): from one window's per-backend latency samples and each
//!   backend's current share, which shares change. `dlbd`'s decider task
//!   (`server/src/outlier/latency.rs`) sums the samples over every SDK's load reports and the
//!   probes, and writes the changes;
//! * the share of a stored record ([`weight_percent`]) and its application to picker inputs
//!   ([`apply`]), with enough precision that a 10 % share is visible between weight-1 backends.
//!
//! **The rule** (also in the proto and `docs/adaptive.md`): per signal (request latency, probe
//! RTT) with samples from ≥ 2 eligible backends, the service median `M` is the lower median of
//! the samples; a backend's ratio `r` is the largest `sample / M` over its signals (a sample
//! under `min_latency_ms` counts as `r = 1`). Slow (`r ≥ slow_ratio`): share =
//! `min(current, max(floor, ⌊100 / r⌋))`, or one recovery step up if that target is above the
//! current share. Recovered (`r ≤ 0.75 × slow_ratio`): one step (`recovery_step_percent`) up,
//! to at most 100 (full weight: the source is cleared). In between, or without a sample:
//! unchanged. So: the slowest minority is degraded, a service where all backends are equally
//! slow is not (the median is slow too), a single backend is never degraded, and the band
//! between `0.75 × slow_ratio` and `slow_ratio` keeps a share from oscillating.
//!
//! Cost: [`decide`] is O(n log n) per window (two sorts); [`apply`] is O(n) per picker build
//! and only does anything while some backend is degraded.

use std::time::Duration;

use crate::balance::{BackendSpec, MAX_WEIGHT};
use crate::proto;
use crate::validation::ValidationError;

/// Default slow ratio (latency ≥ 2 × the median).
pub const DEFAULT_SLOW_RATIO: f64 = 2.0;
/// Bounds of the slow ratio.
pub const SLOW_RATIO_RANGE: std::ops::RangeInclusive<f64> = 1.1..=100.0;
/// Default calls a backend needs in a window for a request sample.
pub const DEFAULT_MIN_REQUESTS: u32 = 20;
/// Largest `min_requests`.
pub const MAX_MIN_REQUESTS: u32 = 1_000_000;
/// Default window, milliseconds.
pub const DEFAULT_WINDOW_MS: u32 = 5_000;
/// Bounds of the window, milliseconds.
pub const WINDOW_RANGE_MS: std::ops::RangeInclusive<u32> = 100..=600_000;
/// Default floor, percent of the weight.
pub const DEFAULT_FLOOR_PERCENT: u32 = 10;
/// Default recovery step, percentage points per window.
pub const DEFAULT_RECOVERY_STEP_PERCENT: u32 = 25;
/// Default latency under which nothing is slow, milliseconds.
pub const DEFAULT_MIN_LATENCY_MS: u32 = 1;
/// Largest `min_latency_ms`.
pub const MAX_MIN_LATENCY_MS: u32 = 60_000;
/// A degraded backend recovers a step only when its ratio is at most this × `slow_ratio`.
pub const HYSTERESIS: f64 = 0.75;

/// Adaptive weights with every default filled in (see `AdaptiveWeights` in the proto).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    /// Slow when latency ≥ this × the median.
    pub slow_ratio: f64,
    /// Calls needed in a window for a request sample.
    pub min_requests: u64,
    /// Decision window.
    pub window: Duration,
    /// Least share a slow backend keeps, percent (1..=100).
    pub floor_percent: u32,
    /// Share regained per window when recovered, percentage points (1..=100).
    pub recovery_step_percent: u32,
    /// Latencies below this (milliseconds) are never slow.
    pub min_latency_ms: f64,
}

/// The resolved configuration of a (validated) policy; `None` when adaptive weights are off.
pub fn config(policy: &proto::Policy) -> Option<AdaptiveConfig> {
    let a = policy.adaptive_weights.as_ref()?;
    if !a.enabled {
        return None;
    }
    let or = |v: u32, d: u32| if v == 0 { d } else { v };
    Some(AdaptiveConfig {
        slow_ratio: if a.slow_ratio == 0.0 {
            DEFAULT_SLOW_RATIO
        } else {
            a.slow_ratio
        },
        min_requests: u64::from(or(a.min_requests, DEFAULT_MIN_REQUESTS)),
        window: Duration::from_millis(u64::from(or(a.window_ms, DEFAULT_WINDOW_MS))),
        floor_percent: or(a.floor_percent, DEFAULT_FLOOR_PERCENT).min(100),
        recovery_step_percent: or(a.recovery_step_percent, DEFAULT_RECOVERY_STEP_PERCENT).min(100),
        min_latency_ms: f64::from(or(a.min_latency_ms, DEFAULT_MIN_LATENCY_MS)),
    })
}

/// Checks `policy.adaptive_weights` (also when it is disabled: a stored policy is valid as a
/// whole). Every error names the field.
pub fn validate(policy: &proto::Policy) -> Result<(), ValidationError> {
    let Some(a) = &policy.adaptive_weights else {
        return Ok(());
    };
    let f = |name: &str| format!("policy.adaptive_weights.{name}");
    let r = a.slow_ratio;
    if r != 0.0 && !(r.is_finite() && SLOW_RATIO_RANGE.contains(&r)) {
        return Err(ValidationError::new(
            f("slow_ratio"),
            r,
            "must be between 1.1 and 100; 0 means the default (2.0)",
        ));
    }
    if a.min_requests > MAX_MIN_REQUESTS {
        return Err(ValidationError::new(
            f("min_requests"),
            a.min_requests,
            format!("must be at most {MAX_MIN_REQUESTS}; 0 means the default (20)"),
        ));
    }
    if a.window_ms != 0 && !WINDOW_RANGE_MS.contains(&a.window_ms) {
        return Err(ValidationError::new(
            f("window_ms"),
            a.window_ms,
            "must be between 100 and 600000; 0 means the default (5000)",
        ));
    }
    if a.floor_percent > 100 {
        return Err(ValidationError::new(
            f("floor_percent"),
            a.floor_percent,
            "must be between 1 and 100; 0 means the default (10)",
        ));
    }
    if a.recovery_step_percent > 100 {
        return Err(ValidationError::new(
            f("recovery_step_percent"),
            a.recovery_step_percent,
            "must be between 1 and 100; 0 means the default (25)",
        ));
    }
    if a.min_latency_ms > MAX_MIN_LATENCY_MS {
        return Err(ValidationError::new(
            f("min_latency_ms"),
            a.min_latency_ms,
            format!("must be at most {MAX_MIN_LATENCY_MS}; 0 means the default (1)"),
        ));
    }
    Ok(())
}

/// The share of its configured weight a stored record gets from its latency source, percent:
/// 100 when the source is unset (or says 0 or 100), else 1..=99.
pub fn weight_percent(server: &proto::Server) -> u32 {
    server
        .sources
        .as_ref()
        .and_then(|s| s.latency.as_ref())
        .map(|l| l.weight_percent)
        .filter(|p| (1..100).contains(p))
        .unwrap_or(100)
}

/// `max(1, ⌈weight × percent / 100⌉)`: a share of a weight, never 0.
pub fn scaled(weight: u32, percent: u32) -> u32 {
    let w = (u64::from(weight) * u64::from(percent.min(100))).div_ceil(100);
    u32::try_from(w).unwrap_or(u32::MAX).max(1)
}

/// Applies the latency shares to picker inputs: `servers[i]` is the record of `specs[i]`.
/// While any eligible backend is degraded, every weight is first multiplied by
/// `k = clamp(⌊10000 / max weight⌋, 1, 100)` (proportions unchanged) and a degraded backend
/// gets `max(1, ⌈weight × k × percent / 100⌉)`, so a 10 % share shows between weight-1
/// backends. Returns whether anything changed. O(n).
pub fn apply(specs: &mut [BackendSpec], servers: &[&proto::Server]) -> bool {
    let degraded = specs
        .iter()
        .zip(servers)
        .any(|(s, r)| s.eligible && weight_percent(r) < 100);
    if !degraded {
        return false;
    }
    let max = servers.iter().map(|r| r.weight).max().unwrap_or(1).max(1);
    let k = (MAX_WEIGHT / max).clamp(1, 100);
    for (s, r) in specs.iter_mut().zip(servers) {
        let full = r.weight.max(1).saturating_mul(k).min(MAX_WEIGHT);
        s.weight = scaled(full, weight_percent(r));
    }
    true
}

/// One backend's input to [`decide`] for one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The backend.
    pub id: String,
    /// Whether it may take traffic (ineligible backends are left out of the medians and keep
    /// their share).
    pub eligible: bool,
    /// Its current share, percent (100: full).
    pub percent: u32,
    /// Mean request latency over the window, milliseconds, when the calls reached
    /// `min_requests`.
    pub request_ms: Option<f64>,
    /// Its last passing probe's RTT, milliseconds, where active checks run.
    pub probe_ms: Option<f64>,
}

/// A share that changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The backend.
    pub id: String,
    /// Its new share, percent (100: full weight, the source is cleared).
    pub percent: u32,
    /// The latency source's detail, e.g. `mean 84 ms vs service median 9 ms (weight 10 %)`.
    pub detail: String,
}

/// The lower median (the ⌈n/2⌉-th smallest) of at least 2 values; `None` below 2.
pub fn lower_median(mut values: Vec<f64>) -> Option<f64> {
    if values.len() < 2 {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[(values.len() - 1) / 2])
}

/// Formats milliseconds for a detail: one decimal below 10 ms, whole above.
fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

/// **The decision of one window.** Returns the backends whose share changes (in input order).
/// See the module docs for the rule. O(n log n).
pub fn decide(cfg: &AdaptiveConfig, samples: &[Sample]) -> Vec<Decision> {
    let median = |pick: fn(&Sample) -> Option<f64>| {
        lower_median(
            samples
                .iter()
                .filter(|s| s.eligible)
                .filter_map(pick)
                .collect(),
        )
    };
    if samples.iter().filter(|s| s.eligible).count() < 2 {
        // Nothing to compare with, and a lone backend's share changes no proportion.
        return samples
            .iter()
            .filter(|s| s.eligible && s.percent < 100)
            .map(|s| Decision {
                id: s.id.clone(),
                percent: 100,
                detail: "only backend eligible".to_owned(),
            })
            .collect();
    }
    let m_req = median(|s| s.request_ms);
    let m_probe = median(|s| s.probe_ms);
    let mut out = Vec::new();
    for s in samples.iter().filter(|s| s.eligible) {
        // (ratio, what, value, median) of the signal with the largest ratio.
        let mut worst: Option<(f64, &str, f64, f64)> = None;
        for (what, v, m) in [
            ("mean", s.request_ms, m_req),
            ("probe rtt", s.probe_ms, m_probe),
        ] {
            let (Some(v), Some(m)) = (v, m) else { continue };
            let r = if v < cfg.min_latency_ms {
                1.0
            } else {
                v / m.max(1e-3)
            };
            if worst.is_none_or(|w| r > w.0) {
                worst = Some((r, what, v, m));
            }
        }
        let Some((r, what, v, m)) = worst else {
            continue;
        };
        let current = s.percent.clamp(1, 100);
        let step_up = (current + cfg.recovery_step_percent).min(100);
        let (new, recovering) = if r >= cfg.slow_ratio {
            let target = ((100.0 / r).floor() as u32).clamp(cfg.floor_percent.max(1), 100);
            if target <= current {
                (target, false)
            } else {
                (step_up.min(target), true)
            }
        } else if r <= HYSTERESIS * cfg.slow_ratio {
            (step_up, true)
        } else {
            (current, false)
        };
        if new == current {
            continue;
        }
        let detail = format!(
            "{}{what} {} vs service median {} (weight {new} %)",
            if recovering { "recovering: " } else { "" },
            ms(v),
            ms(m),
        );
        out.push(Decision {
            id: s.id.clone(),
            percent: new,
            detail,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdaptiveConfig {
        AdaptiveConfig {
            slow_ratio: 2.0,
            min_requests: 20,
            window: Duration::from_secs(1),
            floor_percent: 10,
            recovery_step_percent: 25,
            min_latency_ms: 1.0,
        }
    }

    fn s(id: &str, percent: u32, request_ms: Option<f64>) -> Sample {
        Sample {
            id: id.into(),
            eligible: true,
            percent,
            request_ms,
            probe_ms: None,
        }
    }

    fn ids(d: &[Decision]) -> Vec<(&str, u32)> {
        d.iter().map(|d| (d.id.as_str(), d.percent)).collect()
    }

    #[test]
    fn lower_median_of_odd_even_and_tiny_sets() {
        assert_eq!(lower_median(vec![]), None);
        assert_eq!(lower_median(vec![5.0]), None);
        assert_eq!(lower_median(vec![80.0, 10.0]), Some(10.0));
        assert_eq!(lower_median(vec![9.0, 84.0, 10.0]), Some(10.0));
        assert_eq!(lower_median(vec![4.0, 3.0, 2.0, 1.0]), Some(2.0));
    }

    #[test]
    fn a_slow_backend_drops_to_100_over_ratio_with_the_floor() {
        // 84 ms vs a median of 9 ms: ratio 9.33 → ⌊100 / 9.33⌋ = 10 %.
        let d = decide(
            &cfg(),
            &[
                s("a", 100, Some(9.0)),
                s("b", 100, Some(84.0)),
                s("c", 100, Some(9.0)),
            ],
        );
        assert_eq!(ids(&d), [("b", 10)]);
        assert_eq!(
            d[0].detail,
            "mean 84 ms vs service median 9.0 ms (weight 10 %)"
        );
        // 4× slower: 25 %. 50× slower: the floor (10 %), never below.
        let d = decide(
            &cfg(),
            &[
                s("a", 100, Some(10.0)),
                s("b", 100, Some(40.0)),
                s("c", 100, Some(10.0)),
            ],
        );
        assert_eq!(ids(&d), [("b", 25)]);
        let d = decide(
            &cfg(),
            &[
                s("a", 100, Some(10.0)),
                s("b", 100, Some(500.0)),
                s("c", 100, Some(10.0)),
            ],
        );
        assert_eq!(ids(&d), [("b", 10)]);
        let mut high_floor = cfg();
        high_floor.floor_percent = 40;
        let d = decide(
            &high_floor,
            &[
                s("a", 100, Some(10.0)),
                s("b", 100, Some(500.0)),
                s("c", 100, Some(10.0)),
            ],
        );
        assert_eq!(ids(&d), [("b", 40)]);
    }

    #[test]
    fn just_under_the_ratio_is_not_slow() {
        let d = decide(
            &cfg(),
            &[
                s("a", 100, Some(10.0)),
                s("b", 100, Some(19.9)),
                s("c", 100, Some(10.0)),
            ],
        );
        assert!(d.is_empty());
    }

    #[test]
    fn hysteresis_holds_then_recovery_is_stepwise() {
        let c = cfg();
        // Degraded to 25 %; now at 1.8× (between 0.75 × 2 = 1.5 and 2): held.
        let d = decide(
            &c,
            &[
                s("a", 100, Some(10.0)),
                s("b", 25, Some(18.0)),
                s("c", 100, Some(10.0)),
            ],
        );
        assert!(d.is_empty());
        // At 1.5×: recovered, one step of 25 points per window up to 100.
        let mut p = 25;
        let mut steps = Vec::new();
        while p < 100 {
            let d = decide(
                &c,
                &[
                    s("a", 100, Some(10.0)),
                    s("b", p, Some(15.0)),
                    s("c", 100, Some(10.0)),
                ],
            );
            assert_eq!(d.len(), 1);
            assert!(
                d[0].detail.starts_with("recovering: mean 15 ms"),
                "{}",
                d[0].detail
            );
            p = d[0].percent;
            steps.push(p);
        }
        assert_eq!(steps, [50, 75, 100]);
        // Still slow but less so (4× → target 25) from 10 %: one step up, not a jump.
        let d = decide(
            &c,
            &[
                s("a", 100, Some(10.0)),
                s("b", 10, Some(40.0)),
                s("c", 100, Some(10.0)),
            ],
        );
        assert_eq!(ids(&d), [("b", 25)]);
        let d = decide(
            &c,
            &[
                s("a", 100, Some(10.0)),
                s("b", 10, Some(30.0)),
                s("c", 100, Some(10.0)),
            ],
        );
        assert_eq!(ids(&d), [("b", 33)]);
        // Slower than before: down at once.
        let d = decide(
            &c,
            &[
                s("a", 100, Some(10.0)),
                s("b", 50, Some(40.0)),
                s("c", 100, Some(10.0)),
            ],
        );
        assert_eq!(ids(&d), [("b", 25)]);
    }

    #[test]
    fn no_sample_means_no_change_and_min_latency_is_never_slow() {
        // b has too few requests (no sample): held at 25 %.
        let d = decide(
            &cfg(),
            &[
                s("a", 100, Some(10.0)),
                s("b", 25, None),
                s("c", 100, Some(10.0)),
            ],
        );
        assert!(d.is_empty());
        // 0.9 ms vs 0.1 ms is 9× but under min_latency_ms (1 ms): ratio 1, nothing slow.
        let d = decide(
            &cfg(),
            &[
                s("a", 100, Some(0.1)),
                s("b", 100, Some(0.9)),
                s("c", 100, Some(0.1)),
            ],
        );
        assert!(d.is_empty());
    }

    #[test]
    fn a_service_where_all_are_slow_is_not_degraded() {
        let d = decide(
            &cfg(),
            &[
                s("a", 100, Some(300.0)),
                s("b", 100, Some(320.0)),
                s("c", 100, Some(290.0)),
            ],
        );
        assert!(d.is_empty());
        // A 3-backend service with 2 slow: the median is slow, so nothing is degraded (the
        // fast one is not "slow", and the slow ones are the norm).
        let d = decide(
            &cfg(),
            &[
                s("a", 100, Some(10.0)),
                s("b", 100, Some(100.0)),
                s("c", 100, Some(100.0)),
            ],
        );
        assert!(d.is_empty());
        // Half slow in a 4-backend service: the lower median is fast, the slow half degrades.
        let d = decide(
            &cfg(),
            &[
                s("a", 100, Some(10.0)),
                s("b", 100, Some(100.0)),
                s("c", 100, Some(100.0)),
                s("d", 100, Some(10.0)),
            ],
        );
        assert_eq!(ids(&d), [("b", 10), ("c", 10)]);
    }

    #[test]
    fn one_and_two_backend_services() {
        // One backend: no median, never degraded.
        assert!(decide(&cfg(), &[s("a", 100, Some(500.0))]).is_empty());
        // One backend that was degraded (the other was removed or went down): back to full.
        let d = decide(&cfg(), &[s("a", 25, Some(500.0))]);
        assert_eq!(ids(&d), [("a", 100)]);
        // Two: the faster is the reference; the slower keeps at least the floor.
        let d = decide(&cfg(), &[s("a", 100, Some(10.0)), s("b", 100, Some(80.0))]);
        assert_eq!(ids(&d), [("b", 12)]);
        // Two equally slow: nothing.
        assert!(decide(&cfg(), &[s("a", 100, Some(80.0)), s("b", 100, Some(81.0))]).is_empty());
    }

    #[test]
    fn ineligible_backends_are_out_of_the_median_and_probe_rtt_counts() {
        let mut down = s("x", 100, Some(1.0));
        down.eligible = false;
        // Without x the median of (10, 10, 40) is 10; x (1 ms, ineligible) does not lower it.
        let d = decide(
            &cfg(),
            &[
                down.clone(),
                s("a", 100, Some(10.0)),
                s("b", 100, Some(40.0)),
                s("c", 100, Some(10.0)),
            ],
        );
        assert_eq!(ids(&d), [("b", 25)]);
        // Probe RTT alone (no request samples): 20 ms vs 2 ms → 10 %.
        let p = |id: &str, ms: f64| Sample {
            probe_ms: Some(ms),
            ..s(id, 100, None)
        };
        let d = decide(&cfg(), &[p("a", 2.0), p("b", 20.0), p("c", 2.0)]);
        assert_eq!(ids(&d), [("b", 10)]);
        assert!(d[0]
            .detail
            .starts_with("probe rtt 20 ms vs service median 2.0 ms"));
    }

    #[test]
    fn shares_reach_pickers_with_precision() {
        let rec = |id: &str, w: u32, pct: u32| proto::Server {
            server_id: id.into(),
            weight: w,
            sources: Some(proto::HealthSources {
                latency: (pct != 100).then(|| proto::LatencyState {
                    weight_percent: pct,
                    detail: String::new(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = |id: &str, w: u32| BackendSpec {
            id: id.into(),
            address: "127.0.0.1:1".into(),
            weight: w,
            hash_key: None,
            eligible: true,
        };
        let recs = [rec("a", 1, 100), rec("b", 1, 10), rec("c", 1, 100)];
        let refs: Vec<&proto::Server> = recs.iter().collect();
        let mut specs = vec![spec("a", 1), spec("b", 1), spec("c", 1)];
        assert!(apply(&mut specs, &refs));
        let w: Vec<u32> = specs.iter().map(|s| s.weight).collect();
        assert_eq!(w, [100, 10, 100]);
        // Nothing degraded: untouched.
        let recs = [rec("a", 3, 100), rec("b", 1, 100)];
        let refs: Vec<&proto::Server> = recs.iter().collect();
        let mut specs = vec![spec("a", 3), spec("b", 1)];
        assert!(!apply(&mut specs, &refs));
        assert_eq!(specs[0].weight, 3);
        assert_eq!(scaled(1, 10), 1);
        assert_eq!(scaled(10_000, 1), 100);
        assert_eq!(weight_percent(&rec("x", 1, 0)), 100);
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = crate::model::default_policy();
        let ok = proto::AdaptiveWeights {
            enabled: true,
            ..Default::default()
        };
        p.adaptive_weights = Some(ok);
        assert!(validate(&p).is_ok());
        let c = config(&p).expect("on");
        assert_eq!(c.floor_percent, 10);
        assert_eq!(c.window, Duration::from_secs(5));
        for (bad, field) in [
            (
                proto::AdaptiveWeights {
                    slow_ratio: 1.0,
                    ..ok
                },
                "slow_ratio",
            ),
            (
                proto::AdaptiveWeights {
                    slow_ratio: f64::NAN,
                    ..ok
                },
                "slow_ratio",
            ),
            (
                proto::AdaptiveWeights {
                    window_ms: 50,
                    ..ok
                },
                "window_ms",
            ),
            (
                proto::AdaptiveWeights {
                    floor_percent: 101,
                    ..ok
                },
                "floor_percent",
            ),
            (
                proto::AdaptiveWeights {
                    recovery_step_percent: 200,
                    ..ok
                },
                "recovery_step_percent",
            ),
            (
                proto::AdaptiveWeights {
                    min_requests: 2_000_000,
                    ..ok
                },
                "min_requests",
            ),
            (
                proto::AdaptiveWeights {
                    min_latency_ms: 70_000,
                    ..ok
                },
                "min_latency_ms",
            ),
        ] {
            p.adaptive_weights = Some(bad);
            let e = validate(&p).expect_err(field);
            assert_eq!(e.field, format!("policy.adaptive_weights.{field}"));
        }
        p.adaptive_weights = Some(proto::AdaptiveWeights {
            enabled: false,
            ..ok
        });
        assert!(config(&p).is_none());
    }
}
