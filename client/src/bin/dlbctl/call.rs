//! `dlbctl policy set` flags for the SDK call path (docs/sdk.md): retries, the retry budget,
//! hedging and the Peak-EWMA tuning, and how `policy get` prints them. Setting any `--retry*`
//! flag turns retries on (`--retry` alone takes every default), `--retry-off` turns them off;
//! likewise `--hedge*` / `--hedge-off`; 0 means "the default".

use clap::Args;
use dlb::proto;
use dlb_client::Error;

/// The call-path flags of `dlbctl policy set`.
#[derive(Debug, Args)]
pub(crate) struct CallFlags {
    /// Turn retries on (every unset field takes its default).
    #[arg(long)]
    retry: bool,
    /// Turn retries off.
    #[arg(long, conflicts_with = "retry")]
    retry_off: bool,
    /// Attempts per request, the first included (0 = default 3; 1..=10).
    #[arg(long)]
    retry_attempts: Option<u32>,
    /// gRPC codes retried after sending, comma-separated numbers (e.g. 14,8); "" clears.
    #[arg(long, value_delimiter = ',')]
    retry_grpc_codes: Option<Vec<String>>,
    /// HTTP statuses retried after sending, comma-separated (e.g. 502,503); "" clears.
    #[arg(long, value_delimiter = ',')]
    retry_http_statuses: Option<Vec<String>>,
    /// Backoff base, milliseconds (0 = default 25).
    #[arg(long)]
    retry_backoff_ms: Option<u32>,
    /// Backoff cap, milliseconds (0 = default 250).
    #[arg(long)]
    retry_backoff_max_ms: Option<u32>,
    /// Largest request body buffered for replay, bytes (0 = default 65536).
    #[arg(long)]
    retry_max_body: Option<u32>,
    /// Retry budget: retries and hedges per request over the window (0 = default 0.2).
    #[arg(long)]
    budget_ratio: Option<f64>,
    /// Retry budget: retries and hedges per second regardless of traffic (0 = default 10).
    #[arg(long)]
    budget_min_per_second: Option<u32>,
    /// Retry budget: sliding window, seconds (0 = default 10).
    #[arg(long)]
    budget_window_s: Option<u32>,
    /// Remove the explicit budget (the defaults apply).
    #[arg(long)]
    budget_default: bool,
    /// Turn hedging on (every unset field takes its default: p95 delay, 1 hedge).
    #[arg(long)]
    hedge: bool,
    /// Turn hedging off.
    #[arg(long, conflicts_with = "hedge")]
    hedge_off: bool,
    /// Fixed hedge delay, milliseconds (clears the percentile).
    #[arg(long, conflicts_with = "hedge_percentile")]
    hedge_delay_ms: Option<u32>,
    /// Hedge after this percentile of observed latency, 50..=99 (clears the fixed delay).
    #[arg(long)]
    hedge_percentile: Option<u32>,
    /// Extra copies per request (0 = default 1; 1..=3).
    #[arg(long)]
    hedge_max: Option<u32>,
    /// Peak-EWMA decay time, milliseconds (0 = default 10000).
    #[arg(long)]
    ewma_decay_ms: Option<u32>,
    /// Peak-EWMA estimate of a backend with no sample, microseconds (0 = default 30000).
    #[arg(long)]
    ewma_default_rtt_us: Option<u32>,
}

/// Parses a comma-separated list of numbers (an empty string clears the list).
fn numbers(flag: &str, values: &[String]) -> Result<Vec<u32>, Error> {
    values
        .iter()
        .filter(|v| !v.trim().is_empty())
        .map(|v| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| Error::InvalidArgument(format!("--{flag}: {v:?} is not a number")))
        })
        .collect()
}

impl CallFlags {
    /// Applies the flags that were given to `policy`.
    pub(crate) fn apply(&self, policy: &mut proto::Policy) -> Result<(), Error> {
        if self.retry_off {
            policy.retry = None;
        } else if self.retry
            || self.retry_attempts.is_some()
            || self.retry_grpc_codes.is_some()
            || self.retry_http_statuses.is_some()
            || self.retry_backoff_ms.is_some()
            || self.retry_backoff_max_ms.is_some()
            || self.retry_max_body.is_some()
        {
            let r = policy.retry.get_or_insert_with(Default::default);
            if let Some(v) = self.retry_attempts {
                r.max_attempts = v;
            }
            if let Some(v) = &self.retry_grpc_codes {
                r.retry_on_grpc_codes = numbers("retry-grpc-codes", v)?;
            }
            if let Some(v) = &self.retry_http_statuses {
                r.retry_on_http_statuses = numbers("retry-http-statuses", v)?;
            }
            if let Some(v) = self.retry_backoff_ms {
                r.backoff_base_ms = v;
            }
            if let Some(v) = self.retry_backoff_max_ms {
                r.backoff_max_ms = v;
            }
            if let Some(v) = self.retry_max_body {
                r.max_replay_body_bytes = v;
            }
        }
        if self.budget_default {
            policy.retry_budget = None;
        }
        if self.budget_ratio.is_some()
            || self.budget_min_per_second.is_some()
            || self.budget_window_s.is_some()
        {
            let b = policy.retry_budget.get_or_insert_with(Default::default);
            if let Some(v) = self.budget_ratio {
                b.ratio = v;
            }
            if let Some(v) = self.budget_min_per_second {
                b.min_per_second = v;
            }
            if let Some(v) = self.budget_window_s {
                b.window_seconds = v;
            }
        }
        if self.hedge_off {
            policy.hedge = None;
        } else if self.hedge
            || self.hedge_delay_ms.is_some()
            || self.hedge_percentile.is_some()
            || self.hedge_max.is_some()
        {
            let h = policy.hedge.get_or_insert_with(Default::default);
            if let Some(v) = self.hedge_delay_ms {
                h.delay_ms = v;
                h.delay_percentile = 0;
            }
            if let Some(v) = self.hedge_percentile {
                h.delay_percentile = v;
                h.delay_ms = 0;
            }
            if let Some(v) = self.hedge_max {
                h.max_hedges = v;
            }
        }
        if self.ewma_decay_ms.is_some() || self.ewma_default_rtt_us.is_some() {
            let e = policy.peak_ewma.get_or_insert_with(Default::default);
            if let Some(v) = self.ewma_decay_ms {
                e.decay_ms = v;
            }
            if let Some(v) = self.ewma_default_rtt_us {
                e.default_rtt_us = v;
            }
        }
        Ok(())
    }
}

fn list(v: &[u32]) -> String {
    if v.is_empty() {
        "-".to_owned()
    } else {
        v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
    }
}

/// A policy's call-path settings, as text, with the defaults filled in (see dlb.proto).
pub(crate) fn text(p: &proto::Policy) -> String {
    let c = dlb::call::call_config(p);
    let retry = match &c.retry {
        None => "retry=off".to_owned(),
        Some(r) => format!(
            "retry=on(attempts={} grpc_codes={} http_statuses={} backoff_ms={}..{} max_body={})",
            r.max_attempts,
            list(&r.retry_on_grpc_codes),
            list(
                &r.retry_on_http_statuses
                    .iter()
                    .map(|&s| u32::from(s))
                    .collect::<Vec<_>>()
            ),
            r.backoff_base.as_millis(),
            r.backoff_max.as_millis(),
            r.max_replay_body_bytes
        ),
    };
    let budget = format!(
        "budget(ratio={} min_per_second={} window_s={})",
        c.budget.ratio,
        c.budget.min_per_second,
        c.budget.window.as_secs()
    );
    let hedge = match &c.hedge {
        None => "hedge=off".to_owned(),
        Some(h) => {
            let delay = match h.delay {
                dlb::call::HedgeDelay::Fixed(d) => format!("delay_ms={}", d.as_millis()),
                dlb::call::HedgeDelay::Percentile(q) => format!("delay=p{q}"),
            };
            format!("hedge=on({delay} max_hedges={})", h.max_hedges)
        }
    };
    let e = dlb::call::ewma_config(p);
    let ewma = format!(
        "peak_ewma(decay_ms={} default_rtt_us={})",
        e.decay.as_millis(),
        e.default_rtt.as_micros()
    );
    format!("{retry} {budget} {hedge} {ewma}")
}
