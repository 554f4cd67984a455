//! A decaying latency histogram: the hedge delay's "observed pN" (issue 16 item 4).
//!
//! **Buckets.** Log-linear, like HDR histograms with 3 significant bits: latencies in
//! microseconds; 0..8 µs get one bucket each, and each power of two above is split into 8 equal
//! buckets, up to 2^26 µs (≈ 67 s; larger values land in the last bucket). [`BUCKETS`] = 192.
//! A percentile is reported as the *upper* end of its bucket, so it is at most 12.5 % above the
//! true value and never below it (a hedge never fires earlier than the true pN).
//!
//! **Decay.** Two generations of buckets: samples go to the current one; every `period` the
//! older one is cleared and becomes current. A read sums both, so it covers the last `period`
//! to `2 × period` of calls: old latencies fade within two periods.
//!
//! **Cost.** [`LatencyTracker::record`]: O(1) (a leading-zero count, then one increment under a
//! small mutex, shared with the rotation). [`LatencyTracker::percentile`]: O([`BUCKETS`]) — a
//! scan of 2 × 192 counters, well under a microsecond; callers that read per request may cache
//! it. Time comes from an injected [`Clock`](super::clock::Clock).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::clock::Clock;

/// Sub-buckets per power of two (3 bits).
const SUB: u32 = 8;
/// Largest power of two covered: values ≥ 2^26 µs go to the last bucket.
const MAX_EXP: u32 = 26;
/// Number of buckets.
pub const BUCKETS: usize = (SUB + (MAX_EXP - 3) * SUB) as usize;

/// The bucket of a latency in microseconds.
#[inline]
fn bucket(us: u64) -> usize {
    if us < u64::from(SUB) {
        return us as usize;
    }
    let e = 63 - us.leading_zeros();
    if e >= MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = ((us >> (e - 3)) & u64::from(SUB - 1)) as u32;
    (SUB + (e - 3) * SUB + sub) as usize
}

/// The largest latency (µs) that falls in bucket `i`.
fn upper(i: usize) -> u64 {
    let i = i as u32;
    if i < SUB {
        return u64::from(i);
    }
    let e = (i - SUB) / SUB + 3;
    let sub = (i - SUB) % SUB;
    let lower = u64::from(SUB + sub) << (e - 3);
    lower + (1u64 << (e - 3)) - 1
}

#[derive(Debug)]
struct Generations {
    counts: [[u64; BUCKETS]; 2],
    totals: [u64; 2],
    /// Which generation is current.
    current: usize,
    /// Index (time / period) of the current generation.
    epoch: u64,
}

/// A decaying latency histogram; see the module docs. Shared by `Arc` among a service's calls.
#[derive(Debug)]
pub struct LatencyTracker {
    period_nanos: u64,
    clock: Arc<dyn Clock>,
    /// Both generations. A mutex so a rotation and the samples around it stay consistent; held
    /// for one increment (record) or one scan (percentile), never across an await.
    gens: Mutex<Box<Generations>>,
}

impl LatencyTracker {
    /// A tracker whose generations last `period` (reads cover `period`..`2 × period`).
    pub fn new(period: Duration, clock: Arc<dyn Clock>) -> Self {
        let period_nanos = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX).max(1);
        let epoch = Self::epoch_at(clock.now(), period_nanos);
        Self {
            period_nanos,
            clock,
            gens: Mutex::new(Box::new(Generations {
                counts: [[0; BUCKETS]; 2],
                totals: [0; 2],
                current: 0,
                epoch,
            })),
        }
    }

    fn epoch_at(now: Duration, period_nanos: u64) -> u64 {
        u64::try_from(now.as_nanos()).unwrap_or(u64::MAX) / period_nanos
    }

    fn rotate(&self, g: &mut Generations) {
        let epoch = Self::epoch_at(self.clock.now(), self.period_nanos);
        if epoch <= g.epoch {
            return;
        }
        if epoch - g.epoch >= 2 {
            // Both generations are too old.
            g.counts = [[0; BUCKETS]; 2];
            g.totals = [0; 2];
        } else {
            let old = 1 - g.current;
            g.counts[old] = [0; BUCKETS];
            g.totals[old] = 0;
            g.current = old;
        }
        g.epoch = epoch;
    }

    /// Records one call's latency.
    pub fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let b = bucket(us);
        let mut g = self.gens.lock();
        self.rotate(&mut g);
        let c = g.current;
        g.counts[c][b] += 1;
        g.totals[c] += 1;
    }

    /// Calls recorded in the last `period`..`2 × period`.
    pub fn count(&self) -> u64 {
        let mut g = self.gens.lock();
        self.rotate(&mut g);
        g.totals[0] + g.totals[1]
    }

    /// The latency at percentile `p` (0 < p ≤ 100) of the recent calls — the smallest bucket
    /// upper bound at or below which at least `p` % of them fall — or `None` when fewer than
    /// `min_samples` (and at least one) calls were recorded.
    pub fn percentile(&self, p: f64, min_samples: u64) -> Option<Duration> {
        let mut g = self.gens.lock();
        self.rotate(&mut g);
        let total = g.totals[0] + g.totals[1];
        if total == 0 || total < min_samples {
            return None;
        }
        let p = if p.is_finite() {
            p.clamp(0.0, 100.0)
        } else {
            100.0
        };
        // The rank of the sample at percentile p (1-based, nearest-rank method).
        let rank = ((p / 100.0 * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for i in 0..BUCKETS {
            seen += g.counts[0][i] + g.counts[1][i];
            if seen >= rank {
                return Some(Duration::from_micros(upper(i)));
            }
        }
        Some(Duration::from_micros(upper(BUCKETS - 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::clock::ManualClock;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for us in [
            0u64,
            1,
            7,
            8,
            9,
            15,
            16,
            17,
            100,
            1000,
            12_345,
            1 << 20,
            (1 << 26) - 1,
        ] {
            let b = bucket(us);
            assert!(b >= last, "{us}");
            last = b;
            assert!(upper(b) >= us, "{us} above its bucket's upper end");
            let lower = if b == 0 { 0 } else { upper(b - 1) + 1 };
            assert!(lower <= us, "{us} below its bucket");
            // At most 12.5 % above.
            assert!(upper(b) as f64 <= us as f64 * 1.125 + 1.0, "{us}");
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        assert_eq!(upper(BUCKETS - 1), (1 << 26) - 1);
    }

    #[test]
    fn percentiles_of_a_known_mix() {
        let clock = Arc::new(ManualClock::new());
        let t = LatencyTracker::new(Duration::from_secs(10), clock);
        assert_eq!(t.percentile(95.0, 1), None);
        // 90 fast calls at 1 ms, 10 slow at 100 ms.
        for _ in 0..90 {
            t.record(Duration::from_millis(1));
        }
        for _ in 0..10 {
            t.record(Duration::from_millis(100));
        }
        assert_eq!(t.percentile(50.0, 200), None, "too few samples");
        let p50 = t.percentile(50.0, 20).expect("enough");
        assert!(p50 >= Duration::from_millis(1) && p50 < Duration::from_micros(1125));
        let p90 = t.percentile(90.0, 20).expect("enough");
        assert!(p90 < Duration::from_micros(1125), "{p90:?}");
        let p95 = t.percentile(95.0, 20).expect("enough");
        assert!(p95 >= Duration::from_millis(100) && p95 <= Duration::from_micros(112_500));
    }

    #[test]
    fn old_samples_decay_within_two_periods() {
        let clock = Arc::new(ManualClock::new());
        let t = LatencyTracker::new(Duration::from_secs(1), clock.clone());
        for _ in 0..100 {
            t.record(Duration::from_millis(1));
        }
        clock.advance(Duration::from_millis(1500));
        for _ in 0..100 {
            t.record(Duration::from_millis(100));
        }
        // Both generations are read: half fast, half slow.
        assert_eq!(t.count(), 200);
        assert!(t.percentile(50.0, 1).expect("some") < Duration::from_millis(2));
        clock.advance(Duration::from_secs(1));
        // The fast generation was cleared: only the slow calls remain.
        assert_eq!(t.count(), 100);
        assert!(t.percentile(50.0, 1).expect("some") >= Duration::from_millis(100));
        clock.advance(Duration::from_secs(5));
        assert_eq!(t.count(), 0);
        assert_eq!(t.percentile(99.0, 1), None);
    }
}
