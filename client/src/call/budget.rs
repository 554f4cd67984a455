//! The retry budget of one [`super::Balance`] (Finagle/Linkerd semantics): over a sliding
//! window, retries and hedges ≤ `ratio` × requests + `min_per_second` × window seconds.
//!
//! The window is ten slots of a tenth of it each; `deposit` and `try_withdraw` are O(1) under a
//! short lock (never held across `.await`). Time is tokio's, so tests run on paused time.

use parking_lot::Mutex;
use tokio::time::{Duration, Instant};

use super::config::BudgetConfig;

const SLOTS: usize = 10;

#[derive(Debug)]
struct Window {
    /// (requests, withdrawals) per slot.
    slots: [(u64, u64); SLOTS],
    /// Index of the slot that `slot_start` starts.
    head: usize,
    slot_start: Instant,
}

/// A retry budget (see the module docs).
#[derive(Debug)]
pub(crate) struct Budget {
    cfg: BudgetConfig,
    slot_len: Duration,
    window: Mutex<Window>,
}

impl Budget {
    pub(crate) fn new(cfg: BudgetConfig) -> Self {
        let window = cfg.window.max(Duration::from_millis(10));
        Self {
            cfg,
            slot_len: window / SLOTS as u32,
            window: Mutex::new(Window {
                slots: [(0, 0); SLOTS],
                head: 0,
                slot_start: Instant::now(),
            }),
        }
    }

    fn advance(&self, w: &mut Window) {
        let now = Instant::now();
        let mut steps = 0;
        while now.duration_since(w.slot_start) >= self.slot_len && steps <= SLOTS {
            w.head = (w.head + 1) % SLOTS;
            w.slots[w.head] = (0, 0);
            w.slot_start += self.slot_len;
            steps += 1;
        }
        if steps > SLOTS {
            w.slot_start = now;
        }
    }

    /// One original request.
    pub(crate) fn deposit(&self) {
        let mut w = self.window.lock();
        self.advance(&mut w);
        let h = w.head;
        w.slots[h].0 += 1;
    }

    /// Takes one token for a retry or a hedge; false when the budget is spent.
    pub(crate) fn try_withdraw(&self) -> bool {
        let mut w = self.window.lock();
        self.advance(&mut w);
        let (requests, spent) = w
            .slots
            .iter()
            .fold((0u64, 0u64), |(r, s), (a, b)| (r + a, s + b));
        let floor = f64::from(self.cfg.min_per_second) * self.cfg.window.as_secs_f64();
        let allowed = self.cfg.ratio.max(0.0) * requests as f64 + floor;
        if (spent as f64) + 1.0 > allowed {
            return false;
        }
        let h = w.head;
        w.slots[h].1 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_stay_within_ratio_plus_floor_and_the_window_slides() {
        let b = Budget::new(BudgetConfig {
            ratio: 0.1,
            min_per_second: 1,
            window: Duration::from_secs(10),
        });
        for _ in 0..100 {
            b.deposit();
        }
        // 0.1 × 100 + 1 × 10 = 20 tokens.
        let granted = (0..50).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 20);
        tokio::time::advance(Duration::from_secs(11)).await;
        // Everything left the window: only the floor remains.
        let granted = (0..50).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 10);
    }
}
