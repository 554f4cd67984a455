//! Per-backend state inside a picker: [`Backend`] (id, address, weight, hash key, eligibility)
//! and its [`BackendLoad`] — the in-flight count, the control plane's baseline, the outcomes of
//! finished calls ([`Outcomes`]) and Peak-EWMA's latency estimate — shared by `Arc` across picker
//! generations and carried over by id on a rebuild.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::ewma;

/// In-flight accounting of one backend, and the outcomes of its finished calls; shared across
/// picker generations (carried over by backend id). Plain atomics: counting a call takes no
/// lock.
#[derive(Debug, Default)]
pub struct BackendLoad {
    pub(super) in_flight: AtomicU64,
    pub(super) baseline: AtomicU64,
    pub(super) successes: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) latency_count: AtomicU64,
    pub(super) latency_sum_us: AtomicU64,
    pub(super) latency_max_us: AtomicU64,
    /// Peak-EWMA's latency estimate (inert until a Peak-EWMA picker is built over the backend).
    pub(super) ewma: ewma::EwmaState,
}

/// Outcomes of the calls to one backend that finished since they were last taken (see
/// [`BackendLoad::take_outcomes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Calls that succeeded.
    pub successes: u64,
    /// Calls that failed.
    pub failures: u64,
    /// Calls with a recorded latency.
    pub latency_count: u64,
    /// Sum of their latencies, in microseconds (saturating).
    pub latency_sum_us: u64,
    /// The largest latency, in microseconds.
    pub latency_max_us: u64,
}

impl BackendLoad {
    /// Calls in flight from this process.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The load other clients put on this backend, as last pushed by the control plane.
    pub fn baseline(&self) -> u64 {
        self.baseline.load(Ordering::Relaxed)
    }

    /// Sets the load other clients put on this backend.
    pub fn set_baseline(&self, value: u64) {
        self.baseline.store(value, Ordering::Relaxed);
    }

    /// Local in-flight plus baseline: the count least-connections and bounded load compare.
    pub fn load(&self) -> u64 {
        self.in_flight().saturating_add(self.baseline())
    }

    /// Records the outcome of one finished call and its latency.
    pub fn record_outcome(&self, ok: bool, latency: Duration) {
        if ok {
            self.successes.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        // Saturating: a sum that would overflow stays at the maximum until taken.
        let _ = self
            .latency_sum_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_add(us))
            });
        self.latency_max_us.fetch_max(us, Ordering::Relaxed);
        self.ewma.observe_at(latency, ewma::now_nanos());
    }

    /// Feeds one latency sample to Peak-EWMA's estimate only, recording no outcome: for an
    /// attempt that ended without an answer worth classifying (e.g. the losing copy of a hedged
    /// request, cancelled after `latency`), whose slowness must still count. A no-op unless a
    /// Peak-EWMA picker was built over this backend.
    pub fn observe_latency(&self, latency: Duration) {
        self.ewma.observe_at(latency, ewma::now_nanos());
    }

    /// Peak-EWMA's current latency estimate of this backend, given the policy's decay time and
    /// default RTT (see [`ewma`]): the default before any sample.
    pub fn latency_estimate(&self, config: &ewma::EwmaConfig) -> Duration {
        let ns = self.ewma.read_at(
            ewma::now_nanos(),
            config.decay.as_nanos() as f64,
            config.default_rtt.as_nanos() as f64,
        );
        Duration::from_nanos(ns.max(0.0) as u64)
    }

    /// The outcomes recorded since the last call, resetting them to zero. Each counter is
    /// swapped on its own, so a call recorded concurrently may be split across two reports,
    /// but is never lost or counted twice.
    pub fn take_outcomes(&self) -> Outcomes {
        Outcomes {
            successes: self.successes.swap(0, Ordering::Relaxed),
            failures: self.failures.swap(0, Ordering::Relaxed),
            latency_count: self.latency_count.swap(0, Ordering::Relaxed),
            latency_sum_us: self.latency_sum_us.swap(0, Ordering::Relaxed),
            latency_max_us: self.latency_max_us.swap(0, Ordering::Relaxed),
        }
    }

    /// Increments the local in-flight count if it is below `cap`; whether it did.
    #[inline]
    pub(super) fn try_acquire_below(&self, cap: u64) -> bool {
        self.in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v < cap).then_some(v + 1)
            })
            .is_ok()
    }
}

/// One backend inside a picker.
#[derive(Debug)]
pub struct Backend {
    pub(super) id: Arc<str>,
    pub(super) address: Arc<str>,
    pub(super) weight: u32,
    pub(super) hash_key: Arc<str>,
    pub(super) eligible: bool,
    pub(super) load: Arc<BackendLoad>,
}

impl Backend {
    /// Unique id within the service.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }
    /// Relative share.
    pub fn weight(&self) -> u32 {
        self.weight
    }
    /// The key consistent hashing uses (the id unless the backend names one).
    pub fn hash_key(&self) -> &str {
        &self.hash_key
    }
    /// Whether the backend may receive new picks.
    pub fn is_eligible(&self) -> bool {
        self.eligible
    }
    /// The backend's shared in-flight and outcome accounting.
    pub fn load(&self) -> &Arc<BackendLoad> {
        &self.load
    }
}
