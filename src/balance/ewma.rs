//! Peak-EWMA (Finagle's `PeakEwma`, Linkerd's and tower's `PeakEwma`): latency-aware power of
//! two choices.
//!
//! # What it owns
//! The per-picker selection state over the eligible backends, and the rule that updates a
//! backend's latency estimate. The estimate itself lives in the backend's shared
//! [`BackendLoad`] (next to its in-flight count), so it survives picker rebuilds by backend id.
//!
//! # The estimate
//! Per backend, an estimate `E` of its latency in nanoseconds and the time `t₀` of its last
//! update, with τ the policy's decay time:
//! * **a sample** `r` at time `t` (the latency of a finished call, reported by the SDK's call
//!   guard): with `w = exp(−(t − t₀)/τ)`, `E ← r` if `r > E` (**peak** sensitivity: a slow
//!   answer counts at once), else `E ← E·w + r·(1 − w)` (a fast answer pulls the estimate down
//!   at the speed of τ). `t₀ ← t`. The first sample sets `E ← r`.
//! * **read** at time `t`: `D + (E − D)·exp(−(t − t₀)/τ)`, where `D` is the policy's default RTT.
//!   A backend with no sample (new, or never picked by this process) reads `D`. A backend not
//!   heard from relaxes towards `D` with time constant τ, so a backend that was slow once is
//!   tried again after a few τ instead of being starved for ever; a `dlbd` picker, which sees no
//!   latencies, reads `D` everywhere and so behaves as least connections P2C.
//!
//! # The pick
//! Two distinct uniformly random eligible backends (one `fastrand` draw); the cost of each is
//! `read(now) × (load + 1) / weight`, `load` being its calls in flight (local plus the
//! control-plane baseline, as for least connections); the lower cost wins (ties to the first
//! draw, itself random) and its in-flight count is incremented. With one eligible backend it is
//! picked.
//!
//! # Bounds and complexity
//! Pick: `O(1)`, lock-free — one monotonic clock read, per candidate three relaxed loads and one
//! `exp`, one `fetch_add`. Sample: `O(1)` — one `exp` and a compare-and-swap loop on the
//! estimate (concurrent samples of one backend may interleave: each is applied to some recent
//! estimate, none is lost, and `t₀` is the latest writer's). Build: `O(n)`. A backend with
//! estimate `E` and `k` calls in flight is preferred over one with `E'`, `k'` iff
//! `E·(k+1)·w' < E'·(k'+1)·w`: a backend 20× slower than the others gets a new call only when
//! both draws land on it, or when its rivals carry 20× its in-flight count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::BackendLoad;

/// Peak-EWMA tuning (`Policy.peak_ewma`, defaults applied by `dlb::call::ewma_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EwmaConfig {
    /// τ, the decay time of the latency estimate.
    pub decay: Duration,
    /// The estimate of a backend with no sample yet.
    pub default_rtt: Duration,
}

impl Default for EwmaConfig {
    /// τ = 10 s, default RTT 30 ms (`dlb::call::defaults::EWMA_DECAY_MS`, `EWMA_DEFAULT_RTT_US`).
    fn default() -> Self {
        Self {
            decay: Duration::from_millis(10_000),
            default_rtt: Duration::from_micros(30_000),
        }
    }
}

/// The process-wide monotonic origin of Peak-EWMA timestamps.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Nanoseconds since the process-wide origin (monotonic). Never 0, so 0 can mean "never".
#[inline]
pub fn now_nanos() -> u64 {
    u64::try_from(origin().elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Peak-EWMA state of one backend, inside its [`BackendLoad`]. All atomics.
#[derive(Debug, Default)]
pub(super) struct EwmaState {
    /// The estimate `E` in nanoseconds, as `f64` bits; 0 bits: no sample yet.
    estimate: AtomicU64,
    /// `t₀`, [`now_nanos`] of the last sample.
    stamp: AtomicU64,
    /// τ in nanoseconds, set by the Peak-EWMA pickers that hold this backend; 0: no Peak-EWMA
    /// picker was built over it, so samples are not recorded (no cost for other policies).
    tau: AtomicU64,
}

impl EwmaState {
    /// Applies a latency sample taken at `now` (see the module docs).
    pub(super) fn observe_at(&self, rtt: Duration, now: u64) {
        let tau = self.tau.load(Ordering::Relaxed);
        if tau == 0 {
            return;
        }
        let r = rtt.as_nanos() as f64;
        let dt = now.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        let w = (-dt / tau as f64).exp();
        let _ = self
            .estimate
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let e = f64::from_bits(bits);
                let next = if bits == 0 || r > e {
                    r
                } else {
                    e * w + r * (1.0 - w)
                };
                // A 0 ns sample is stored as the smallest positive value, so 0 keeps meaning
                // "no sample".
                Some(next.max(f64::MIN_POSITIVE).to_bits())
            });
        self.stamp.fetch_max(now, Ordering::Relaxed);
    }

    /// The estimate read at `now`, in nanoseconds (see the module docs).
    #[inline]
    pub(super) fn read_at(&self, now: u64, tau: f64, default: f64) -> f64 {
        let bits = self.estimate.load(Ordering::Relaxed);
        if bits == 0 {
            return default;
        }
        let e = f64::from_bits(bits);
        let dt = now.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        default + (e - default) * (-dt / tau).exp()
    }

    /// Turns recording on with decay time `tau` (nanoseconds).
    pub(super) fn enable(&self, tau: u64) {
        self.tau.store(tau.max(1), Ordering::Relaxed);
    }
}

/// Peak-EWMA state of one picker: the eligible backends with their weight and load, and τ.
pub(super) struct PeakEwma {
    items: Box<[(Arc<BackendLoad>, u32, u32)]>,
    tau_ns: f64,
    default_ns: f64,
}

impl std::fmt::Debug for PeakEwma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeakEwma")
            .field("eligible", &self.items.len())
            .field("tau_ns", &self.tau_ns)
            .field("default_ns", &self.default_ns)
            .finish()
    }
}

impl PeakEwma {
    /// Builds over `(backend index, weight, load)` of the eligible backends (non-empty), and
    /// turns sample recording on in their loads. `O(n)`.
    pub(super) fn build(
        items: &[(u32, u32, Arc<BackendLoad>)],
        decay: Duration,
        default_rtt: Duration,
    ) -> Self {
        let tau = u64::try_from(decay.as_nanos()).unwrap_or(u64::MAX).max(1);
        for (_, _, l) in items {
            l.ewma.enable(tau);
        }
        Self {
            items: items.iter().map(|(b, w, l)| (l.clone(), *w, *b)).collect(),
            tau_ns: tau as f64,
            default_ns: (default_rtt.as_nanos() as f64).max(1.0),
        }
    }

    /// The cost of `item` at `now`: `read(now) × (load + 1) / weight`.
    #[inline]
    fn cost(&self, item: &(Arc<BackendLoad>, u32, u32), now: u64) -> f64 {
        let e = item.0.ewma.read_at(now, self.tau_ns, self.default_ns);
        e * (item.0.load() as f64 + 1.0) / f64::from(item.1)
    }

    /// Picks the cheaper of two distinct random eligible backends at `now` and counts one call
    /// on it. Returns its index.
    #[inline]
    pub(super) fn pick_at(&self, now: u64) -> u32 {
        let n = self.items.len();
        if n <= 1 {
            return self.items.first().map_or(0, |x| {
                x.0.in_flight.fetch_add(1, Ordering::Relaxed);
                x.2
            });
        }
        let r = fastrand::u64(..);
        let i = (((r & 0xffff_ffff) * n as u64) >> 32) as usize;
        let mut j = (((r >> 32) * (n as u64 - 1)) >> 32) as usize;
        if j >= i {
            j += 1;
        }
        let (a, b) = (&self.items[i], &self.items[j]);
        let winner = if self.cost(a, now) <= self.cost(b, now) {
            a
        } else {
            b
        };
        winner.0.in_flight.fetch_add(1, Ordering::Relaxed);
        winner.2
    }

    /// Picks at the current time.
    #[inline]
    pub(super) fn pick(&self) -> u32 {
        self.pick_at(now_nanos())
    }

    /// Approximate heap bytes.
    pub(super) fn heap_bytes(&self) -> usize {
        self.items.len() * std::mem::size_of::<(Arc<BackendLoad>, u32, u32)>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn state(tau_ms: u64) -> EwmaState {
        let s = EwmaState::default();
        s.enable(tau_ms * MS);
        s
    }

    #[test]
    fn peaks_replace_and_lows_decay_with_tau() {
        let s = state(1000);
        let (tau, d) = (1000.0 * MS as f64, 30.0 * MS as f64);
        assert_eq!(s.read_at(1, tau, d), d, "no sample: the default");
        s.observe_at(Duration::from_millis(10), 1);
        assert!((s.read_at(1, tau, d) - 10.0 * MS as f64).abs() < 1.0);
        // A peak replaces the estimate at once.
        s.observe_at(Duration::from_millis(100), 2);
        assert!((s.read_at(2, tau, d) - 100.0 * MS as f64).abs() < 1e3);
        // A low sample one τ later moves it by 1 − 1/e.
        s.observe_at(Duration::from_millis(10), 2 + 1000 * MS);
        let expect = 100.0 * (-1f64).exp() + 10.0 * (1.0 - (-1f64).exp());
        let got = s.read_at(2 + 1000 * MS, tau, d) / MS as f64;
        assert!((got - expect).abs() < 0.01, "{got} vs {expect}");
        // A low sample right after barely moves it.
        s.observe_at(Duration::from_millis(1), 2 + 1000 * MS + 1000);
        let got2 = s.read_at(2 + 1000 * MS + 1000, tau, d) / MS as f64;
        assert!((got2 - expect).abs() < 0.01, "{got2}");
    }

    #[test]
    fn an_idle_estimate_relaxes_towards_the_default() {
        let s = state(1000);
        let (tau, d) = (1000.0 * MS as f64, 30.0 * MS as f64);
        s.observe_at(Duration::from_secs(2), 1);
        let at = |t_ms: u64| s.read_at(1 + t_ms * MS, tau, d) / MS as f64;
        assert!((at(0) - 2000.0).abs() < 1e-6);
        let one_tau = 30.0 + (2000.0 - 30.0) * (-1f64).exp();
        assert!((at(1000) - one_tau).abs() < 1e-6);
        assert!((at(10_000) - 30.0).abs() < 0.1, "{}", at(10_000));
    }

    #[test]
    fn samples_are_ignored_until_a_peak_ewma_picker_enables_them() {
        let s = EwmaState::default();
        s.observe_at(Duration::from_millis(5), 1);
        assert_eq!(s.read_at(1, 1e9, 7.0), 7.0);
    }
}
