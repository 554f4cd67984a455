//! Rate limits for log lines a client can trigger (a NACK, a bad message): one client must not
//! be able to fill the log. Each stream or session owns one [`LogLimiter`]; no lock, no task.
//!
//! The rule: per window of [`LogLimiter::WINDOW`], the first [`LogLimiter::BURST`] lines are
//! logged and the rest only counted. The first line logged after a window with suppressed lines
//! carries their count (`suppressed = N`), and [`LogLimiter::finish`] reports what is still
//! counted when the stream ends, so every suppressed line is accounted for in one line per
//! window at most. Cost per call: O(1). Tokio time, so tests run on paused time.

use std::time::Duration;

use tokio::time::Instant;

/// Counts and limits the log lines of one client (see the module docs).
#[derive(Debug, Clone)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    /// Start of the current window (`None`: nothing logged yet).
    start: Option<Instant>,
    /// Lines logged in the current window.
    logged: u32,
    /// Lines suppressed since the last line logged.
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(Self::BURST, Self::WINDOW)
    }
}

impl LogLimiter {
    /// Lines logged per window by default.
    pub const BURST: u32 = 5;
    /// The default window.
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// At most `burst` lines (at least 1) per `window`.
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst: burst.max(1),
            window,
            start: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether to log the line now: `Some(n)` — log it, with `n` lines suppressed since the last
    /// one logged (say so when `n > 0`); `None` — suppressed (counted).
    pub fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.start.is_none_or(|s| now >= s + self.window) {
            self.start = Some(now);
            self.logged = 0;
        }
        if self.logged < self.burst {
            self.logged += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }

    /// Lines suppressed and not reported yet (reset): call when the client goes away and log
    /// "N similar messages suppressed" when it is not 0.
    pub fn finish(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_per_window_then_one_count() {
        let mut l = LogLimiter::new(3, Duration::from_secs(10));
        let first: Vec<_> = (0..5000).map(|_| l.check()).collect();
        assert_eq!(&first[..3], &[Some(0), Some(0), Some(0)]);
        assert!(first[3..].iter().all(Option::is_none));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(l.check(), None, "still the same window");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(l.check(), Some(4998), "the next window reports the count");
        assert_eq!(l.check(), Some(0));
        assert_eq!(l.check(), Some(0));
        assert_eq!(l.check(), None);
        assert_eq!(l.finish(), 1);
        assert_eq!(l.finish(), 0);
    }
}
