//! `dlbctl policy set` flags for adaptive weights (docs/adaptive.md), and how `policy get`
//! prints them. Setting any `--adaptive*` flag turns adaptive weights on (`--adaptive` alone
//! takes every default); `--adaptive-off` turns them off; 0 means "the default".

use clap::Args;
use dlb::proto;

/// The adaptive-weights flags of `dlbctl policy set`.
#[derive(Debug, Args)]
pub(crate) struct AdaptiveFlags {
    /// Turn adaptive weights on (slow backends get a lower weight).
    #[arg(long)]
    adaptive: bool,
    /// Turn adaptive weights off (every lowered weight is restored).
    #[arg(long, conflicts_with = "adaptive")]
    adaptive_off: bool,
    /// Slow when latency ≥ this × the service median (0 = default 2.0; 1.1..=100).
    #[arg(long)]
    adaptive_slow_ratio: Option<f64>,
    /// Calls a backend needs in a window for a latency sample (0 = default 20).
    #[arg(long)]
    adaptive_min_requests: Option<u32>,
    /// Decision window, milliseconds (0 = default 5000; 100..=600000).
    #[arg(long)]
    adaptive_window_ms: Option<u32>,
    /// Least share of its weight a slow backend keeps, percent (0 = default 10).
    #[arg(long)]
    adaptive_floor_percent: Option<u32>,
    /// Share regained per window when recovered, percentage points (0 = default 25).
    #[arg(long)]
    adaptive_recovery_step: Option<u32>,
    /// Latencies below this are never slow, milliseconds (0 = default 1).
    #[arg(long)]
    adaptive_min_latency_ms: Option<u32>,
}

impl AdaptiveFlags {
    /// Applies the flags that were given to `policy`.
    pub(crate) fn apply(&self, policy: &mut proto::Policy) {
        if self.adaptive_off {
            policy.adaptive_weights = None;
            return;
        }
        let fields = [
            self.adaptive_min_requests,
            self.adaptive_window_ms,
            self.adaptive_floor_percent,
            self.adaptive_recovery_step,
            self.adaptive_min_latency_ms,
        ];
        if !self.adaptive
            && self.adaptive_slow_ratio.is_none()
            && fields.iter().all(Option::is_none)
        {
            return;
        }
        let a = policy.adaptive_weights.get_or_insert_with(Default::default);
        a.enabled = true;
        if let Some(r) = self.adaptive_slow_ratio {
            a.slow_ratio = r;
        }
        let slots = [
            &mut a.min_requests,
            &mut a.window_ms,
            &mut a.floor_percent,
            &mut a.recovery_step_percent,
            &mut a.min_latency_ms,
        ];
        for (slot, value) in slots.into_iter().zip(fields) {
            if let Some(v) = value {
                *slot = v;
            }
        }
    }
}

/// A policy's adaptive weights, as text (0 = the default, see dlb.proto).
pub(crate) fn text(p: &proto::Policy) -> String {
    match p.adaptive_weights {
        Some(a) if a.enabled => format!(
            "adaptive=on(slow_ratio={} min_requests={} window_ms={} floor_percent={} recovery_step={} min_latency_ms={})",
            a.slow_ratio, a.min_requests, a.window_ms, a.floor_percent, a.recovery_step_percent,
            a.min_latency_ms
        ),
        _ => "adaptive=off".to_owned(),
    }
}
