//! The retry budget (Linkerd/Finagle), per service and per SDK: retries and hedges may not
//! multiply the load on a failing service.
//!
//! **The rule.** Every original request [deposits](RetryBudget::deposit); every retry or hedge
//! must [withdraw](RetryBudget::try_withdraw) first, and is not sent when that fails. Over a
//! sliding window of length `w` (seconds), with `D` deposits and `R` withdrawals in it, a
//! withdrawal succeeds iff `R + 1 ≤ ⌊ratio × D + min_per_second × w⌋`. So retries stay within
//! `ratio` of the traffic plus a floor that lets a quiet service retry at all.
//!
//! **The window** slides in [`SLOTS`] steps: it is kept as `SLOTS` buckets of `w / SLOTS` each
//! (the current, partly elapsed one included), so a deposit counts for between `w × (1 − 1/SLOTS)`
//! and `w` after it was made. Running sums make every operation O(1): a call advances over at most
//! `SLOTS` expired buckets (a constant) under one small mutex held for a few dozen nanoseconds
//! (no allocation, no await; contention is one lock per request and per retry, the same order as
//! the request's own work).
//!
//! Time comes from an injected [`Clock`](super::clock::Clock), so tests are deterministic.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::clock::Clock;
use super::BudgetConfig;

/// Buckets the window is kept in.
pub const SLOTS: usize = 10;

/// Totals since the budget was created (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetStats {
    /// Original requests deposited.
    pub deposits: u64,
    /// Retries and hedges allowed.
    pub withdrawals: u64,
    /// Retries and hedges refused: the budget was exhausted.
    pub exhausted: u64,
}

#[derive(Debug)]
struct Window {
    /// `(deposits, withdrawals)` per bucket; bucket `k` of the absolute bucket index `i` is
    /// `i % SLOTS`.
    buckets: [(u64, u64); SLOTS],
    /// Absolute index (time / bucket width) of the newest bucket.
    head: u64,
    deposits: u64,
    withdrawals: u64,
    stats: BudgetStats,
}

impl Window {
    /// Expires the buckets older than the window ending at absolute bucket `idx`.
    fn advance(&mut self, idx: u64) {
        if idx <= self.head {
            return;
        }
        let steps = (idx - self.head).min(SLOTS as u64);
        for k in 1..=steps {
            let slot = ((self.head + k) % SLOTS as u64) as usize;
            let (d, r) = std::mem::take(&mut self.buckets[slot]);
            self.deposits -= d;
            self.withdrawals -= r;
        }
        self.head = idx;
    }
}

/// A retry budget; see the module docs. Shared by `Arc` among the calls of one service.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    /// `min_per_second × window`, in tokens.
    floor: f64,
    bucket_nanos: u64,
    clock: Arc<dyn Clock>,
    /// The window's buckets and sums. A mutex because a withdrawal must check and update the
    /// sums together; it is held for O(SLOTS) arithmetic at most, never across an await.
    window: Mutex<Window>,
}

impl RetryBudget {
    /// A budget with `config`, reading time from `clock`.
    pub fn new(config: &BudgetConfig, clock: Arc<dyn Clock>) -> Self {
        let window = config.window.max(Duration::from_millis(SLOTS as u64));
        let bucket_nanos = u64::try_from(window.as_nanos() / SLOTS as u128)
            .unwrap_or(u64::MAX)
            .max(1);
        let head = Self::index(clock.now(), bucket_nanos);
        Self {
            ratio: config.ratio,
            floor: f64::from(config.min_per_second) * window.as_secs_f64(),
            bucket_nanos,
            clock,
            window: Mutex::new(Window {
                buckets: [(0, 0); SLOTS],
                head,
                deposits: 0,
                withdrawals: 0,
                stats: BudgetStats::default(),
            }),
        }
    }

    fn index(now: Duration, bucket_nanos: u64) -> u64 {
        u64::try_from(now.as_nanos()).unwrap_or(u64::MAX) / bucket_nanos
    }

    fn slot(&self) -> (u64, usize) {
        let idx = Self::index(self.clock.now(), self.bucket_nanos);
        (idx, (idx % SLOTS as u64) as usize)
    }

    /// Records one original request.
    pub fn deposit(&self) {
        let (idx, slot) = self.slot();
        let mut w = self.window.lock();
        w.advance(idx);
        // A clock read before a concurrent advance may name an expired bucket: count it in the
        // newest one instead.
        let slot = if idx < w.head {
            (w.head % SLOTS as u64) as usize
        } else {
            slot
        };
        w.buckets[slot].0 += 1;
        w.deposits += 1;
        w.stats.deposits += 1;
    }

    /// Takes one token for a retry or hedge; `false` (and nothing taken) when the budget is
    /// exhausted.
    pub fn try_withdraw(&self) -> bool {
        let (idx, slot) = self.slot();
        let mut w = self.window.lock();
        w.advance(idx);
        let slot = if idx < w.head {
            (w.head % SLOTS as u64) as usize
        } else {
            slot
        };
        let allowed = (self.ratio * w.deposits as f64 + self.floor).floor();
        if (w.withdrawals + 1) as f64 > allowed {
            w.stats.exhausted += 1;
            return false;
        }
        w.buckets[slot].1 += 1;
        w.withdrawals += 1;
        w.stats.withdrawals += 1;
        true
    }

    /// Tokens available now.
    pub fn available(&self) -> u64 {
        let (idx, _) = self.slot();
        let mut w = self.window.lock();
        w.advance(idx);
        let allowed = (self.ratio * w.deposits as f64 + self.floor).floor();
        (allowed - w.withdrawals as f64).max(0.0) as u64
    }

    /// Totals since creation.
    pub fn stats(&self) -> BudgetStats {
        self.window.lock().stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::clock::ManualClock;

    fn budget(ratio: f64, min_per_second: u32, window_s: u64) -> (RetryBudget, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new());
        let cfg = BudgetConfig {
            ratio,
            min_per_second,
            window: Duration::from_secs(window_s),
        };
        (RetryBudget::new(&cfg, clock.clone()), clock)
    }

    fn drain(b: &RetryBudget) -> u64 {
        let mut n = 0;
        while b.try_withdraw() {
            n += 1;
            assert!(n < 1_000_000, "budget never ran out");
        }
        n
    }

    #[test]
    fn floor_only_without_traffic() {
        let (b, _) = budget(0.2, 10, 10);
        assert_eq!(b.available(), 100);
        assert_eq!(drain(&b), 100);
        assert_eq!(b.stats().exhausted, 1);
    }

    #[test]
    fn retries_stay_within_ratio_of_requests_plus_floor() {
        let (b, clock) = budget(0.2, 1, 10);
        for _ in 0..1000 {
            b.deposit();
        }
        // 0.2 × 1000 + 1 × 10.
        assert_eq!(drain(&b), 210);
        // Steady state: 100 requests a second, each failing and asking for a retry. Over any
        // 10 s the retries stay ≤ 0.2 × requests + 10.
        let mut granted = Vec::new();
        for _ in 0..60 {
            clock.advance(Duration::from_secs(1));
            let mut g = 0u64;
            for _ in 0..100 {
                b.deposit();
                if b.try_withdraw() {
                    g += 1;
                }
            }
            granted.push(g);
        }
        for w in granted.windows(10).skip(15) {
            let sum: u64 = w.iter().sum();
            assert!(sum <= 210, "{sum} retries in a 10 s window");
            assert!(sum >= 190, "{sum}: the budget refills as the window slides");
        }
    }

    #[test]
    fn deposits_expire_after_the_window() {
        let (b, clock) = budget(1.0, 0, 10);
        for _ in 0..50 {
            b.deposit();
        }
        assert_eq!(b.available(), 50);
        clock.advance(Duration::from_secs(9));
        assert_eq!(b.available(), 50, "still inside the window");
        clock.advance(Duration::from_secs(1));
        assert_eq!(b.available(), 0, "expired");
        // A long idle gap clears everything in one step.
        b.deposit();
        clock.advance(Duration::from_secs(3600));
        assert_eq!(b.available(), 0);
        assert_eq!(
            b.stats(),
            BudgetStats {
                deposits: 51,
                withdrawals: 0,
                exhausted: 0
            }
        );
    }

    #[test]
    fn withdrawals_free_up_as_they_expire() {
        let (b, clock) = budget(0.2, 1, 10);
        assert_eq!(drain(&b), 10);
        clock.advance(Duration::from_secs(5));
        assert!(!b.try_withdraw(), "the first 10 are still in the window");
        clock.advance(Duration::from_secs(5));
        assert_eq!(drain(&b), 10);
    }

    #[test]
    fn concurrent_use_never_exceeds_the_budget() {
        let (b, _) = budget(0.5, 0, 10);
        let b = Arc::new(b);
        let granted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        b.deposit();
                        if b.try_withdraw() {
                            granted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let g = granted.into_inner();
        assert!(g <= 2000, "{g}");
        assert_eq!(b.stats().withdrawals, g);
    }
}
