//! Capped exponential backoff: the one schedule every retry loop of DLB waits by.
//!
//! A [`Backoff`] is plain state, no timer: [`Backoff::next_delay`] gives the wait before the next
//! attempt and doubles it, up to a cap; [`Backoff::reset`] after a success starts again from
//! the minimum. The caller sleeps (on tokio's clock, in a `select!` with its own stop signal),
//! so loops that back off still run on paused time in tests. Users: the server's store
//! follower, etcd links and replica membership, `dlbd`'s store retry at start and DNS refresh
//! after failed lookups; the SDK's reconnects.
//!
//! Optional [`Jitter`] spreads the waits of many callers that failed together (a fleet of SDKs
//! losing one control plane, links to one etcd member). Doubling saturates, so no count of
//! failures overflows; each step is O(1).

use std::time::Duration;

/// How [`Backoff::next_delay`] randomizes the delay it returns (the schedule is unchanged).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    /// The delay as scheduled.
    None,
    /// Uniform in `[d × (1 − r), d × (1 + r)]` for the scheduled delay `d`; `r` is clamped to
    /// `[0, 1]` (0.2: ± 20 %).
    Relative(f64),
    /// "Full jitter": uniform in `[0, d]`.
    Full,
}

/// Capped exponential backoff: `min`, `2 × min`, `4 × min`, … up to `max`, with optional
/// [`Jitter`]. See the module docs.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// Starts at `min` and doubles up to `max`, without jitter. A `min` above `max` is taken
    /// as `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.min(max);
        Self {
            min,
            max,
            current: min,
            jitter: Jitter::None,
        }
    }

    /// The same schedule, with `jitter` applied to each delay that
    /// [`next_delay`](Self::next_delay) returns.
    #[must_use]
    pub fn with_jitter(self, jitter: Jitter) -> Self {
        Self { jitter, ..self }
    }

    /// The delay to wait before the next attempt (jittered); the following one doubles, up to
    /// the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        match self.jitter {
            Jitter::None => d,
            Jitter::Relative(r) => {
                let r = if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) };
                let factor = 1.0 - r + 2.0 * r * fastrand::f64();
                Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(self.max)
            }
            Jitter::Full => {
                let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
                Duration::from_nanos(fastrand::u64(0..=nanos))
            }
        }
    }

    /// The delay [`next_delay`](Self::next_delay) would schedule, before jitter, without advancing.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// Starts again from the minimum (after a success).
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::new(50 * MS, 1000 * MS);
        let got: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        let want = [50, 100, 200, 400, 800, 1000, 1000, 1000].map(|m| m * MS);
        assert_eq!(got, want);
    }

    #[test]
    fn reset_starts_again_from_the_minimum() {
        let mut b = Backoff::new(250 * MS, 2000 * MS);
        for _ in 0..5 {
            b.next_delay();
        }
        assert_eq!(b.current(), 2000 * MS);
        b.reset();
        assert_eq!(b.current(), 250 * MS);
        assert_eq!((b.next_delay(), b.next_delay()), (250 * MS, 500 * MS));
    }

    #[test]
    fn current_does_not_advance() {
        let b = Backoff::new(500 * MS, 10_000 * MS);
        assert_eq!((b.current(), b.current()), (500 * MS, 500 * MS));
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..10_000 {
            b.next_delay();
        }
        assert_eq!(b.next_delay(), Duration::MAX);
        let mut full =
            Backoff::new(Duration::from_secs(1), Duration::MAX).with_jitter(Jitter::Full);
        let mut relative =
            Backoff::new(Duration::from_secs(1), Duration::MAX).with_jitter(Jitter::Relative(0.2));
        for _ in 0..10_000 {
            full.next_delay();
            relative.next_delay();
        }
        assert!(relative.next_delay() <= Duration::MAX);
    }

    #[test]
    fn min_above_max_is_the_max_and_zero_stays_zero() {
        let mut b = Backoff::new(Duration::from_secs(3), Duration::from_secs(2));
        assert_eq!((b.next_delay(), b.next_delay()), (2000 * MS, 2000 * MS));
        let mut z = Backoff::new(Duration::ZERO, Duration::ZERO).with_jitter(Jitter::Full);
        assert_eq!(
            (z.next_delay(), z.next_delay()),
            (Duration::ZERO, Duration::ZERO)
        );
    }

    #[test]
    fn relative_jitter_stays_within_its_bounds() {
        fastrand::seed(17);
        let mut b = Backoff::new(50 * MS, 1000 * MS).with_jitter(Jitter::Relative(0.2));
        let (mut lowest, mut highest) = (f64::MAX, 0.0_f64);
        for _ in 0..2_000 {
            let scheduled = b.current();
            let d = b.next_delay();
            let ratio = d.as_secs_f64() / scheduled.as_secs_f64();
            assert!((0.8..=1.2).contains(&ratio), "{scheduled:?} gave {d:?}");
            lowest = lowest.min(ratio);
            highest = highest.max(ratio);
            b.reset();
        }
        // Spread over the whole range, not stuck at the schedule.
        assert!(lowest < 0.85 && highest > 1.15, "{lowest} ..= {highest}");
    }

    #[test]
    fn full_jitter_stays_within_the_schedule() {
        fastrand::seed(17);
        let mut b = Backoff::new(100 * MS, 2000 * MS).with_jitter(Jitter::Full);
        let mut below_half = false;
        for _ in 0..40 {
            let scheduled = b.current();
            let d = b.next_delay();
            assert!(d <= scheduled, "{scheduled:?} gave {d:?}");
            below_half |= d < scheduled / 2;
        }
        assert!(below_half, "full jitter never drew a short wait");
        // The schedule under the jitter still doubles and caps.
        assert_eq!(b.current(), 2000 * MS);
    }
}
