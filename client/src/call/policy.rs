//! The retry, hedging and budget settings that apply to a call: the service's policy
//! (`Policy.retry`, `retry_budget`, `hedge`, resolved by [`dlb::call::call_config`], so every SDK
//! agrees), each overridden by the [`super::CallOptions`] field when set there.
//!
//! Resolved once per snapshot generation (one atomic load per call otherwise) and swapped with
//! `ArcSwap`. The retry budget ([`dlb::call::budget::RetryBudget`]) is kept across generations
//! while its settings do not change, so a policy push does not refill it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use dlb::call::budget::RetryBudget;
use dlb::call::clock::Clock;
use dlb::call::{BudgetConfig, HedgeConfig, RetryConfig};

use super::CallOptions;
use crate::state::ServiceState;

/// The core's clock on tokio time, so the budget and the latency tracker follow paused time in
/// tests.
#[derive(Debug)]
pub(crate) struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    pub(crate) fn shared() -> Arc<dyn Clock> {
        Arc::new(Self {
            origin: tokio::time::Instant::now(),
        })
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// What applies to calls made on one snapshot generation.
#[derive(Debug)]
pub(crate) struct Resolved {
    generation: u64,
    pub(crate) retry: Option<RetryConfig>,
    pub(crate) hedge: Option<HedgeConfig>,
    budget_cfg: BudgetConfig,
    pub(crate) budget: Arc<RetryBudget>,
    /// Bodies up to this many bytes are buffered for replay (when anything replays).
    pub(crate) replay_limit: usize,
}

impl Resolved {
    /// Whether request bodies should be buffered for replay.
    pub(crate) fn replays(&self) -> bool {
        self.retry.as_ref().is_some_and(|r| r.max_attempts > 1) || self.hedge.is_some()
    }
}

/// The settings of one [`super::Balance`], following its service's policy.
#[derive(Debug)]
pub(crate) struct Policies {
    current: ArcSwap<Resolved>,
    clock: Arc<dyn Clock>,
}

impl Policies {
    pub(crate) fn new(state: &ServiceState, opts: &CallOptions) -> Self {
        let clock = TokioClock::shared();
        let r = build(state, opts, None, &clock);
        Self {
            current: ArcSwap::from_pointee(r),
            clock,
        }
    }

    /// The settings for a call now.
    pub(crate) fn get(&self, state: &ServiceState, opts: &CallOptions) -> Arc<Resolved> {
        let cur = self.current.load_full();
        if cur.generation == state.generation.load(Ordering::Acquire) {
            return cur;
        }
        let next = Arc::new(build(state, opts, Some(&cur), &self.clock));
        self.current.store(next.clone());
        next
    }
}

fn build(
    state: &ServiceState,
    opts: &CallOptions,
    prev: Option<&Resolved>,
    clock: &Arc<dyn Clock>,
) -> Resolved {
    let generation = state.generation.load(Ordering::Acquire);
    let cfg = state
        .snapshot
        .load()
        .policy
        .as_ref()
        .map(dlb::call::call_config)
        .unwrap_or(dlb::call::CallConfig {
            retry: None,
            hedge: None,
            budget: BudgetConfig::default(),
        });
    let retry = opts.retry.clone().or(cfg.retry);
    let hedge = opts.hedge.or(cfg.hedge);
    let budget_cfg = opts.budget.unwrap_or(cfg.budget);
    let budget = match prev {
        Some(p) if p.budget_cfg == budget_cfg => p.budget.clone(),
        _ => Arc::new(RetryBudget::new(&budget_cfg, clock.clone())),
    };
    let replay_limit = opts.buffer_limit.unwrap_or_else(|| {
        retry
            .as_ref()
            .map_or(dlb::call::defaults::MAX_REPLAY_BODY_BYTES as usize, |r| {
                r.max_replay_body_bytes
            })
    });
    Resolved {
        generation,
        retry,
        hedge,
        budget_cfg,
        budget,
        replay_limit,
    }
}
