//! Adaptive weights, the control plane's side: one service's latency window, summed over every
//! SDK's load reports, and the step that closes it into a decision.
//!
//! The outlier task ([`super::run`]) owns one [`Window`] per service whose policy has
//! `adaptive_weights` on. Each load report adds its backends' `LatencySummary` (count, mean)
//! to the window ([`Window::add`]); every `window_ms` the task closes the window
//! ([`Window::take`]: per backend, the count-weighted mean when the calls reached
//! `min_requests`), adds the probe RTTs where active checks run, and hands the samples to the
//! pure decision [`dlb::adaptive::decide`]. Only the shares that change are written, as
//! latency-slot updates (`health::sources::latency`), so the effective
//! weight, the reason and the push to every SDK come from the core ([`dlb::sources`]).
//!
//! Reported values are client input: a latency that is not finite or is negative is ignored, a
//! mean is capped at [`MAX_MEAN_MS`], counts saturate, and only backends of the service are
//! kept (the window holds at most one entry per backend). O(backends in the report) per add.

use std::collections::HashMap;

use dlb::proto;
use tokio::time::Instant;

pub use crate::reports::MAX_MEAN_MS;

/// One service's current window. See the module docs.
#[derive(Debug)]
pub struct Window {
    start: Instant,
    /// Backend id → (calls measured, Σ count × mean ms).
    sums: HashMap<String, (u64, f64)>,
}

impl Window {
    /// An empty window starting `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            start: now,
            sums: HashMap::new(),
        }
    }

    /// Adds one report's latencies for the backends `known` says belong to the service.
    pub fn add(&mut self, loads: &[proto::BackendLoad], known: impl Fn(&str) -> bool) {
        for l in loads {
            let Some(lat) = &l.latency else { continue };
            if lat.count == 0 || !lat.mean_ms.is_finite() || lat.mean_ms < 0.0 {
                continue;
            }
            if !self.sums.contains_key(&l.server_id) && !known(&l.server_id) {
                continue;
            }
            let e = self.sums.entry(l.server_id.clone()).or_default();
            e.0 = e.0.saturating_add(lat.count);
            e.1 += lat.count as f64 * lat.mean_ms.min(MAX_MEAN_MS);
        }
    }

    /// Whether the window has lasted `length` at `now`.
    pub fn due(&self, now: Instant, length: std::time::Duration) -> bool {
        now.saturating_duration_since(self.start) >= length
    }

    /// Closes the window: each backend's mean latency, for those with at least `min_requests`
    /// calls measured; the next window starts `now`.
    pub fn take(&mut self, min_requests: u64, now: Instant) -> HashMap<String, f64> {
        self.start = now;
        self.sums
            .drain()
            .filter(|(_, (n, _))| *n >= min_requests.max(1))
            .map(|(id, (n, sum))| (id, sum / n as f64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn load(id: &str, count: u64, mean_ms: f64) -> proto::BackendLoad {
        proto::BackendLoad {
            server_id: id.into(),
            successes: count,
            latency: Some(proto::LatencySummary {
                count,
                mean_ms,
                max_ms: mean_ms,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn reports_of_several_sdks_add_up_count_weighted() {
        let now = Instant::now();
        let mut w = Window::new(now);
        let known = |id: &str| id != "stranger";
        // Two SDKs: 10 calls at 10 ms and 30 calls at 2 ms → mean 4 ms over 40 calls.
        w.add(&[load("a", 10, 10.0), load("b", 5, 50.0)], known);
        w.add(&[load("a", 30, 2.0), load("stranger", 100, 1.0)], known);
        // Hostile values are ignored.
        w.add(
            &[
                load("a", 5, f64::NAN),
                load("a", 5, -1.0),
                load("a", 5, f64::INFINITY),
            ],
            known,
        );
        assert!(!w.due(now, Duration::from_secs(1)));
        assert!(w.due(now + Duration::from_secs(1), Duration::from_secs(1)));
        let m = w.take(20, now);
        assert_eq!(
            m.len(),
            1,
            "b is under min_requests, stranger is not a backend"
        );
        assert!((m["a"] - 4.0).abs() < 1e-9);
        // The next window starts empty.
        assert!(w.take(1, now).is_empty());
    }
}
