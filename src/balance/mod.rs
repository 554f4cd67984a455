//! Balancing: immutable pickers, one per policy, and sticky sessions.
//!
//! A [`Picker`] is built off the request path from a list of [`BackendSpec`]s and a
//! [`PolicyConfig`], then shared behind an `Arc` and swapped atomically by its owner (the SDK's
//! per-service state, or `dlbd`'s server-side picker). After the build everything a pick reads is
//! immutable; only atomics change per pick (plus one short spin lock for exact least-connections).
//!
//! | policy | module | pick | build (n backends, W = Σ reduced weights, M = table) |
//! |---|---|---|---|
//! | [`Algorithm::RoundRobin`] | [`wrr`] | `O(1)`, a load and a store on a thread-owned cursor | `O(W log n)`, `W ≤ 2^20 + n` |
//! | [`Algorithm::LeastConnExact`] | [`least_conn`] | `O(log n)` under a spin lock | `O(n)` |
//! | [`Algorithm::LeastConnP2c`] | [`least_conn`] | `O(1)`, lock-free | `O(n)` |
//! | [`Algorithm::PeakEwma`] | [`ewma`] | `O(1)`, lock-free (a clock read, two `exp`) | `O(n)` |
//! | [`Algorithm::Maglev`] | [`maglev`] | `O(1)` (hash + one load) | `O(M log M)`, `100 n ≤ M < 200 n` |
//! | [`Algorithm::RingHash`] | [`ring`] | `O(log n)` | `O(P log P)`, `P ≈ 128 n` |
//! | sticky sessions | [`sticky`] | `O(log entries)` under a shard mutex, plus the pick | — |
//!
//! Measured at 10,000 backends with weights 1..=100 on 2 cores: about 2 ms to build least
//! connections, 47 ms round robin, 70 ms ring hash, 77 ms Maglev (see `BENCHMARKS.md`). The
//! owner builds on a background task and swaps the `Arc`; requests keep using the old picker
//! meanwhile. A picker supports at most [`MAX_BACKENDS`] backends (tables hold `u16` indices).
//!
//! **Eligibility.** Ineligible backends (unhealthy, ejected, draining) are never picked. Round
//! robin and least connections build over the eligible backends only; the hashing policies
//! build over *all* backends and resolve an ineligible owner to the next eligible candidate, so
//! a health flap moves only the keys of the flapping backend. A policy with a
//! [panic threshold](panic) is decided at build time from these flags: in `route_all` panic every
//! backend counts as eligible, in `fail` panic every pick fails with [`PickError::Panic`].
//!
//! **In-flight accounting.** Counts live in [`BackendLoad`], shared by `Arc` across picker
//! generations: [`Picker::rebuild`] carries each backend's load over by id, so a call that
//! started on an old picker is still counted (and released) correctly after a swap. A pick is
//! counted when the policy asks for it ([`PolicyConfig::track_in_flight`]) and always for the
//! least-connections, Peak-EWMA and bounded-load policies; the [`Pick`] guard ends the call on
//! drop.
//! [`BackendLoad`] also counts the outcomes of finished calls (for the SDK's load reports), so
//! they carry over the same way, and the latency estimate Peak-EWMA reads ([`ewma`]), fed by
//! [`BackendLoad::record_outcome`] and [`BackendLoad::observe_latency`]. A caller may count calls its own way where the policy does not
//! read the counts ([`Picker::pick_uncounted`]; the SDK counts per thread).
//!
//! **Owned picks.** A [`Pick`] borrows its picker. [`Pick::into_owned`] turns it into an
//! [`OwnedPick`] that holds the picker's `Arc` instead (`'static`: it can be held across
//! `.await` and picker swaps); [`Pick::into_owned_by`] holds any handle that dereferences to the
//! picker, such as a per-thread view of it, so that keeping the picker alive does not write a
//! reference count shared by every thread.
//!
//! **Bounded load** (CHWBL; Maglev and ring hash with [`PolicyConfig::bounded_load_factor`]
//! `= Some(c)`, `c ≥ 1`, 1.25 is a good default). Let `T` be the number of calls in flight from
//! this process through bounded pickers of this service, *including the one being picked*
//! (a counter shared across generations), and `W` the total weight of the eligible backends.
//! Backend `b` may hold at most `cap_b = max(1, ⌈c · T · w_b / W⌉)` local in-flight calls (with
//! equal weights: `⌈c · T / eligible⌉`). The pick walks the key's deterministic candidate order
//! (Maglev: the following table slots; ring: the following points clockwise) and takes the
//! first eligible backend whose in-flight count it can raise with a compare-and-swap
//! *increment-if-below-cap*, so the cap holds exactly even under concurrency. Since
//! `Σ cap_b ≥ T` exceeds the other calls in flight, some backend always has room; if a race
//! makes a whole walk fail, `T` is re-read and the walk retried (three times, then the key's
//! plain owner is taken). The cap uses local in-flight counts only, not the control-plane
//! baseline, so that one atomic carries both the check and the increment.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub mod ewma;
pub mod hash;
pub mod least_conn;
pub mod maglev;
pub mod panic;
pub mod ring;
pub mod sticky;
pub mod wrr;

pub use panic::{PanicConfig, PanicMode, PanicState};
pub use sticky::StickyTable;

/// Most backends a picker supports (65,535: tables store `u16` backend indices).
pub const MAX_BACKENDS: usize = u16::MAX as usize;
/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 10_000;

/// Input for one backend when building a picker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Unique id within the service.
    pub id: String,
    /// Where traffic goes, `host:port`.
    pub address: String,
    /// Relative share, 1..=10000.
    pub weight: u32,
    /// Stable hash key for consistent hashing; `None` means the id.
    pub hash_key: Option<String>,
    /// Whether the backend may receive new picks (healthy, not ejected, not draining).
    pub eligible: bool,
}

/// The balancing algorithm of a picker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Smooth weighted round robin.
    RoundRobin,
    /// Least connections, exact (weighted by `in_flight / weight`, ties rotated).
    LeastConnExact,
    /// Least connections by the power of two random choices.
    LeastConnP2c,
    /// Maglev consistent hashing.
    Maglev,
    /// Ring hash consistent hashing.
    RingHash,
    /// Peak-EWMA: P2C on latency estimate × (in-flight + 1) ([`ewma`]).
    PeakEwma,
}

/// How a picker balances.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyConfig {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Bounded-load factor `c` (≥ 1.0) for the hashing algorithms; `None` disables it.
    pub bounded_load_factor: Option<f64>,
    /// Whether every pick counts an in-flight call on its backend until the [`Pick`] is dropped.
    /// Least-connections and bounded-load pickers always count, whatever this says.
    pub track_in_flight: bool,
    /// Panic threshold and mode ([`panic`]); `None`: no panic mode.
    pub panic: Option<PanicConfig>,
    /// Decay time and default RTT of [`Algorithm::PeakEwma`] (ignored by the others).
    pub peak_ewma: ewma::EwmaConfig,
}

impl PolicyConfig {
    /// A configuration for `algorithm` with no bounded load and in-flight tracking on.
    pub fn new(algorithm: Algorithm) -> Self {
        Self {
            algorithm,
            bounded_load_factor: None,
            track_in_flight: true,
            panic: None,
            peak_ewma: ewma::EwmaConfig::default(),
        }
    }
}

/// Session-affinity mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StickyMode {
    /// A bound session whose backend is gone (removed or ineligible) fails to pick.
    Strict,
    /// A bound session whose backend is gone is rebound to the picker's choice for its key.
    Fallback,
}

/// Sticky-session table configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StickyConfig {
    /// Strict or fallback.
    pub mode: StickyMode,
    /// A binding not used for this long expires.
    pub ttl: Duration,
    /// Maximum number of bindings; the least recently used is evicted first.
    pub max_entries: usize,
}

/// Why a picker could not be built. Nothing is built when this is returned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BuildError {
    /// A backend has weight 0 or above the maximum.
    #[error("backend {id:?}: invalid weight {weight}, must be between 1 and 10000")]
    InvalidWeight {
        /// The backend.
        id: String,
        /// Its weight.
        weight: u32,
    },
    /// A backend id is empty.
    #[error("backend id must not be empty")]
    EmptyId,
    /// Two backends share an id.
    #[error("duplicate backend id {0:?}")]
    DuplicateId(String),
    /// The bounded-load factor is not a finite number ≥ 1.0.
    #[error("invalid bounded-load factor {0}: must be a finite number >= 1.0")]
    InvalidLoadFactor(f64),
    /// The input is larger than the picker supports.
    #[error("too many backends: {0}")]
    TooLarge(String),
}

/// Why a pick failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    /// The picker has no backends at all.
    #[error("no backends")]
    NoBackends,
    /// Every backend is unhealthy, ejected or draining.
    #[error("no eligible backend")]
    NoEligibleBackends,
    /// Strict sticky mode: the session's backend is gone.
    #[error("session is bound to backend {0:?}, which is unavailable")]
    StickyBackendUnavailable(String),
    /// The service is in panic with mode `fail` (too few eligible backends; see [`panic`]).
    #[error("panic: {eligible} of {total} backends eligible, below the panic threshold")]
    Panic {
        /// Eligible backends.
        eligible: usize,
        /// All backends.
        total: usize,
    },
}

/// In-flight accounting of one backend, and the outcomes of its finished calls; shared across
/// picker generations (carried over by backend id). Plain atomics: counting a call takes no
/// lock.
#[derive(Debug, Default)]
pub struct BackendLoad {
    in_flight: AtomicU64,
    baseline: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    latency_max_us: AtomicU64,
    /// Peak-EWMA's latency estimate (inert until a Peak-EWMA picker is built over the backend).
    ewma: ewma::EwmaState,
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
    fn try_acquire_below(&self, cap: u64) -> bool {
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
    id: Arc<str>,
    address: Arc<str>,
    weight: u32,
    hash_key: Arc<str>,
    eligible: bool,
    load: Arc<BackendLoad>,
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

/// The per-policy selection state of a picker.
#[derive(Debug)]
enum Strategy {
    /// No eligible backend: every pick fails.
    Empty,
    Wrr(wrr::Wrr),
    LcExact(least_conn::LeastConnExact),
    P2c(least_conn::P2c),
    Ewma(ewma::PeakEwma),
    Maglev(maglev::Maglev),
    Ring(ring::Ring),
}

/// Bounded-load parameters of a hashing picker.
#[derive(Debug, Clone, Copy)]
struct Bounded {
    factor: f64,
    /// Total weight of the eligible backends.
    eligible_weight: u64,
}

impl Bounded {
    /// `max(1, ⌈c · total · w / W⌉)`.
    #[inline]
    fn cap(&self, weight: u32, total: u64) -> u64 {
        let cap =
            (self.factor * total as f64 * f64::from(weight) / self.eligible_weight as f64).ceil();
        (cap as u64).max(1)
    }
}

/// An immutable picker for one service state. See the module docs.
#[derive(Debug)]
pub struct Picker {
    policy: PolicyConfig,
    backends: Box<[Backend]>,
    by_id: HashMap<Arc<str>, usize>,
    eligible: Box<[u32]>,
    /// Whether picks count an in-flight call.
    counts: bool,
    bounded: Option<Bounded>,
    /// Calls in flight through bounded pickers of this service; shared across generations.
    total: Arc<AtomicU64>,
    strategy: Strategy,
    /// The panic state decided at build time.
    panic: PanicState,
}

impl Picker {
    /// Builds a picker with fresh in-flight counters. Cost: see the module docs (`O(n)` to
    /// `O(M log M)`); call it off the request path.
    pub fn build(policy: &PolicyConfig, specs: &[BackendSpec]) -> Result<Self, BuildError> {
        Self::build_with(policy, specs, |_| None, Arc::default())
    }

    /// Builds a picker for a new state of the same service, carrying each surviving backend's
    /// in-flight accounting over by id (and the bounded-load total). Unchanged ids, addresses
    /// and hash keys share the previous picker's strings instead of being allocated again.
    pub fn rebuild(
        &self,
        policy: &PolicyConfig,
        specs: &[BackendSpec],
    ) -> Result<Self, BuildError> {
        Self::build_with(
            policy,
            specs,
            |id| self.by_id.get(id).map(|&i| &self.backends[i]),
            self.total.clone(),
        )
    }

    fn build_with<'p>(
        policy: &PolicyConfig,
        specs: &[BackendSpec],
        previous: impl Fn(&str) -> Option<&'p Backend>,
        total: Arc<AtomicU64>,
    ) -> Result<Self, BuildError> {
        if let Some(c) = policy.bounded_load_factor {
            if !(c.is_finite() && c >= 1.0) {
                return Err(BuildError::InvalidLoadFactor(c));
            }
        }
        if specs.len() > MAX_BACKENDS {
            return Err(BuildError::TooLarge(format!(
                "{} backends, at most {MAX_BACKENDS} are supported",
                specs.len()
            )));
        }
        let mut by_id = HashMap::with_capacity(specs.len());
        let mut backends = Vec::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            if s.id.is_empty() {
                return Err(BuildError::EmptyId);
            }
            if !(1..=MAX_WEIGHT).contains(&s.weight) {
                return Err(BuildError::InvalidWeight {
                    id: s.id.clone(),
                    weight: s.weight,
                });
            }
            let old = previous(&s.id);
            let reuse = |field: fn(&Backend) -> &Arc<str>, value: &str| -> Arc<str> {
                match old.map(field) {
                    Some(a) if **a == *value => a.clone(),
                    _ => value.into(),
                }
            };
            let id = reuse(|b| &b.id, &s.id);
            if by_id.insert(id.clone(), i).is_some() {
                return Err(BuildError::DuplicateId(s.id.clone()));
            }
            backends.push(Backend {
                hash_key: reuse(|b| &b.hash_key, s.hash_key.as_deref().unwrap_or(&s.id)),
                address: reuse(|b| &b.address, &s.address),
                weight: s.weight,
                eligible: s.eligible,
                load: old.map(|b| b.load.clone()).unwrap_or_default(),
                id,
            });
        }
        // Panic mode is decided here, once, from the backends' own eligibility. In `route_all`
        // panic every backend is treated as eligible by everything below (and by
        // `Backend::is_eligible`); in `fail` panic nothing is.
        let own_eligible = backends.iter().filter(|b| b.eligible).count();
        let panic = panic::evaluate(policy.panic.as_ref(), own_eligible, backends.len());
        if panic.active {
            let all = panic.mode == Some(PanicMode::RouteAll);
            for b in &mut backends {
                b.eligible = all;
            }
        }
        let eligible: Box<[u32]> = (0..backends.len() as u32)
            .filter(|&i| backends[i as usize].eligible)
            .collect();
        let eligible_weight: u64 = eligible
            .iter()
            .map(|&i| u64::from(backends[i as usize].weight))
            .sum();
        let hashing = matches!(policy.algorithm, Algorithm::Maglev | Algorithm::RingHash);
        let bounded = policy
            .bounded_load_factor
            .filter(|_| hashing)
            .map(|factor| Bounded {
                factor,
                eligible_weight: eligible_weight.max(1),
            });
        let counts = policy.track_in_flight
            || bounded.is_some()
            || matches!(
                policy.algorithm,
                Algorithm::LeastConnExact | Algorithm::LeastConnP2c | Algorithm::PeakEwma
            );
        let strategy = if eligible.is_empty() {
            Strategy::Empty
        } else {
            let lc_items = || -> Vec<(u32, u32, Arc<BackendLoad>)> {
                eligible
                    .iter()
                    .map(|&i| {
                        let b = &backends[i as usize];
                        (i, b.weight, b.load.clone())
                    })
                    .collect()
            };
            match policy.algorithm {
                Algorithm::RoundRobin => {
                    let items: Vec<(u16, u32)> = eligible
                        .iter()
                        .map(|&i| (i as u16, backends[i as usize].weight))
                        .collect();
                    Strategy::Wrr(wrr::Wrr::build(&items))
                }
                Algorithm::LeastConnExact => Strategy::LcExact(least_conn::LeastConnExact::build(
                    &lc_items(),
                    backends.len(),
                )),
                Algorithm::LeastConnP2c => Strategy::P2c(least_conn::P2c::build(&lc_items())),
                Algorithm::PeakEwma => Strategy::Ewma(ewma::PeakEwma::build(
                    &lc_items(),
                    policy.peak_ewma.decay,
                    policy.peak_ewma.default_rtt,
                )),
                Algorithm::Maglev | Algorithm::RingHash => {
                    let order = hash_order(&backends);
                    let keys: Vec<&str> = backends.iter().map(|b| b.hash_key()).collect();
                    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
                    let elig: Vec<bool> = backends.iter().map(|b| b.eligible).collect();
                    if policy.algorithm == Algorithm::Maglev {
                        Strategy::Maglev(maglev::Maglev::build(&order, &keys, &weights, &elig))
                    } else {
                        Strategy::Ring(ring::Ring::build(&order, &keys, &weights, &elig))
                    }
                }
            }
        };
        Ok(Self {
            policy: *policy,
            backends: backends.into(),
            by_id,
            eligible,
            counts,
            bounded,
            total,
            strategy,
            panic,
        })
    }

    /// Picks a backend for a request. `key` is the request key for the hashing algorithms (and is
    /// ignored by the others); `None` picks as if given a random key.
    ///
    /// Errors: [`PickError::NoBackends`] for an empty picker, [`PickError::NoEligibleBackends`]
    /// when every backend is ineligible.
    #[inline]
    pub fn pick(&self, key: Option<&[u8]>) -> Result<Pick<'_>, PickError> {
        self.pick_impl(key, self.counts)
    }

    /// Like [`Picker::pick`], but leaves counting the call to the caller when the policy does
    /// not read in-flight counts ([`Picker::needs_counts`] is false: round robin, and the
    /// hashing policies without bounded load). Pickers that need the counts count as
    /// [`Picker::pick`] does; [`Pick::is_counted`] tells which happened.
    #[inline]
    pub fn pick_uncounted(&self, key: Option<&[u8]>) -> Result<Pick<'_>, PickError> {
        self.pick_impl(key, false)
    }

    /// Whether picking reads the in-flight counts (least connections, Peak-EWMA, bounded load),
    /// so that every call must be counted in the backends' [`BackendLoad`].
    pub fn needs_counts(&self) -> bool {
        self.bounded.is_some()
            || matches!(
                self.policy.algorithm,
                Algorithm::LeastConnExact | Algorithm::LeastConnP2c | Algorithm::PeakEwma
            )
    }

    /// The pick; `count` says whether a policy that does not need counts counts the call.
    #[inline(always)]
    fn pick_impl(&self, key: Option<&[u8]>, count: bool) -> Result<Pick<'_>, PickError> {
        let index = match &self.strategy {
            Strategy::Empty => {
                return Err(if self.backends.is_empty() {
                    PickError::NoBackends
                } else if self.panic.active {
                    PickError::Panic {
                        eligible: self.panic.eligible,
                        total: self.panic.total,
                    }
                } else {
                    PickError::NoEligibleBackends
                });
            }
            Strategy::Wrr(w) => u32::from(w.next()),
            Strategy::P2c(p) => {
                // P2C always counts; it incremented the winner's count itself.
                return Ok(Pick {
                    picker: self,
                    index: p.pick(),
                    counted: true,
                });
            }
            Strategy::Ewma(e) => {
                // Peak-EWMA counts like P2C.
                return Ok(Pick {
                    picker: self,
                    index: e.pick(),
                    counted: true,
                });
            }
            Strategy::LcExact(lc) => {
                // The tree counted the call under its lock.
                return Ok(Pick {
                    picker: self,
                    index: lc.pick(),
                    counted: true,
                });
            }
            Strategy::Maglev(m) => {
                let h = key.map_or_else(hash::random_hash, hash::key_hash);
                match &self.bounded {
                    None => u32::from(m.lookup(h)),
                    Some(b) => return Ok(self.pick_bounded(b, m.table(), m.slot(h))),
                }
            }
            Strategy::Ring(r) => {
                let h = key.map_or_else(hash::random_hash, hash::key_hash);
                match &self.bounded {
                    None => u32::from(r.lookup(h)),
                    Some(b) => return Ok(self.pick_bounded(b, r.owners(), r.point(h))),
                }
            }
        };
        Ok(if count {
            self.acquire(index)
        } else {
            Pick {
                picker: self,
                index,
                counted: false,
            }
        })
    }

    /// The bounded-load walk (see the module docs): the first eligible backend in candidate
    /// order `owners[start..]` (wrapping) whose in-flight count is below its cap.
    fn pick_bounded(&self, b: &Bounded, owners: &[u16], start: usize) -> Pick<'_> {
        let mut total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let len = owners.len();
        for _ in 0..3 {
            let mut i = start;
            let mut last = u32::MAX;
            for _ in 0..len {
                let idx = u32::from(owners[i]);
                if idx != last {
                    last = idx;
                    let be = &self.backends[idx as usize];
                    if be.eligible && be.load.try_acquire_below(b.cap(be.weight, total)) {
                        return Pick {
                            picker: self,
                            index: idx,
                            counted: true,
                        };
                    }
                }
                i += 1;
                if i == len {
                    i = 0;
                }
            }
            total = self.total.load(Ordering::Relaxed);
        }
        // Unreachable in practice (see the module docs): take the first eligible candidate.
        let idx = (0..len)
            .map(|k| u32::from(owners[(start + k) % len]))
            .find(|&i| self.backends[i as usize].eligible)
            .unwrap_or(self.eligible[0]);
        self.backends[idx as usize]
            .load
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        Pick {
            picker: self,
            index: idx,
            counted: true,
        }
    }

    /// Counts one call on `index` when this picker counts calls.
    fn acquire(&self, index: u32) -> Pick<'_> {
        let counted = self.counts;
        if counted {
            let load = &self.backends[index as usize].load;
            match &self.strategy {
                Strategy::LcExact(lc) => lc.acquire(index, load),
                _ => {
                    load.in_flight.fetch_add(1, Ordering::Relaxed);
                }
            }
            if self.bounded.is_some() {
                self.total.fetch_add(1, Ordering::Relaxed);
            }
        }
        Pick {
            picker: self,
            index,
            counted,
        }
    }

    /// Ends one counted call on `index`.
    #[inline]
    fn release(&self, index: u32) {
        let load = &self.backends[index as usize].load;
        match &self.strategy {
            Strategy::LcExact(lc) => lc.release(index, load),
            _ => {
                load.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if self.bounded.is_some() {
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The panic state decided when this picker was built (see [`panic`]).
    pub fn panic_state(&self) -> PanicState {
        self.panic
    }

    /// The policy this picker was built with.
    pub fn policy(&self) -> &PolicyConfig {
        &self.policy
    }
    /// All backends, eligible or not, in input order.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }
    /// The backend with this id.
    pub fn get(&self, id: &str) -> Option<&Backend> {
        self.by_id.get(id).map(|&i| &self.backends[i])
    }
    /// The position in [`Picker::backends`] of the backend with this id.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }
    /// Number of eligible backends.
    pub fn eligible_count(&self) -> usize {
        self.eligible.len()
    }
    /// Like [`Picker::pick`], but the result owns a reference to the picker, so it can be held
    /// across `.await` points and outlive a picker swap (the SDK's call guard uses this).
    pub fn pick_owned(self: &Arc<Self>, key: Option<&[u8]>) -> Result<OwnedPick, PickError> {
        Ok(self.pick(key)?.into_owned(self))
    }

    /// Picks the backend with this id if it exists and is eligible (used by sticky sessions).
    /// The call is counted like any pick; bounded-load caps do not apply (affinity wins).
    pub fn pick_id(&self, id: &str) -> Option<Pick<'_>> {
        let &i = self.by_id.get(id)?;
        self.backends[i].eligible.then(|| self.acquire(i as u32))
    }

    /// Re-reads every backend's load into the exact least-connections tree (`O(n log n)`
    /// worst case). Call it after pushing baselines with [`BackendLoad::set_baseline`];
    /// without it the tree catches up within `n` picks (see [`least_conn`]). A no-op for the
    /// other policies, which read the atomics on every pick.
    pub fn refresh_loads(&self) {
        if let Strategy::LcExact(lc) = &self.strategy {
            lc.refresh();
        }
    }

    /// Approximate heap memory of this picker in bytes: backends (with their strings and load
    /// counters), the id index and the policy's tables.
    pub fn memory_bytes(&self) -> usize {
        let per_backend = std::mem::size_of::<Backend>() + std::mem::size_of::<BackendLoad>() + 16;
        let strings: usize = self
            .backends
            .iter()
            .map(|b| b.id.len() + b.address.len() + b.hash_key.len())
            .sum();
        let index = self.by_id.capacity() * (std::mem::size_of::<(Arc<str>, usize)>() + 1)
            + self.eligible.len() * 4;
        let tables = match &self.strategy {
            Strategy::Empty => 0,
            Strategy::Wrr(w) => w.heap_bytes(),
            Strategy::LcExact(lc) => lc.heap_bytes(),
            Strategy::P2c(p) => p.heap_bytes(),
            Strategy::Ewma(e) => e.heap_bytes(),
            Strategy::Maglev(m) => m.heap_bytes(),
            Strategy::Ring(r) => r.heap_bytes(),
        };
        self.backends.len() * per_backend + strings + index + tables
    }

    /// The round-robin schedule (backend indices, one period) for a round-robin picker.
    pub fn wrr_schedule(&self) -> Option<&[u16]> {
        match &self.strategy {
            Strategy::Wrr(w) => Some(w.schedule()),
            _ => None,
        }
    }
}

/// Backend indices in [hash order](hash): by `XXH3_64(hash key)`, then hash key, then id.
fn hash_order(backends: &[Backend]) -> Vec<u16> {
    let mut order: Vec<(u64, &str, &str, u16)> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            (
                hash::backend_hash(&b.hash_key),
                &*b.hash_key,
                &*b.id,
                i as u16,
            )
        })
        .collect();
    order.sort_unstable();
    order.into_iter().map(|x| x.3).collect()
}

/// The result of a pick: the backend, plus — when the picker counts in-flight calls — the
/// accounting of one call in flight, ended when this is dropped.
#[derive(Debug)]
pub struct Pick<'a> {
    picker: &'a Picker,
    index: u32,
    counted: bool,
}

impl<'a> Pick<'a> {
    /// The picked backend.
    pub fn backend(&self) -> &'a Backend {
        &self.picker.backends[self.index as usize]
    }
    /// Whether this pick counts as an in-flight call until dropped.
    pub fn is_counted(&self) -> bool {
        self.counted
    }
    /// The picked backend's position in [`Picker::backends`].
    pub fn index(&self) -> usize {
        self.index as usize
    }
}

impl Pick<'_> {
    /// Converts into an owned pick. `picker` must be the `Arc` this pick was made from.
    ///
    /// # Panics
    /// Panics if `picker` is not the picker this pick came from (a programming error).
    #[inline]
    pub fn into_owned(self, picker: &Arc<Picker>) -> OwnedPick {
        self.into_owned_by(picker.clone())
    }

    /// Converts into an owned pick that holds `owner` — any handle that dereferences to the
    /// picker this pick came from, such as a per-thread view of it — to end the call later.
    ///
    /// # Panics
    /// Panics if `owner` does not dereference to the picker this pick came from (a programming
    /// error).
    #[inline]
    pub fn into_owned_by<P: Deref<Target = Picker>>(self, owner: P) -> OwnedPick<P> {
        assert!(
            std::ptr::eq(self.picker, &*owner),
            "into_owned called with a different picker"
        );
        let owned = OwnedPick {
            picker: owner,
            index: self.index,
            counted: self.counted,
        };
        std::mem::forget(self);
        owned
    }
}

/// A [`Pick`] that owns its picker through `P` (by default the picker's `Arc`): `'static`, and
/// `Send` and `Sync` when `P` is. Dropping it ends the in-flight call it counts.
#[derive(Debug)]
pub struct OwnedPick<P: Deref<Target = Picker> = Arc<Picker>> {
    picker: P,
    index: u32,
    counted: bool,
}

impl<P: Deref<Target = Picker>> OwnedPick<P> {
    /// The picked backend.
    pub fn backend(&self) -> &Backend {
        &self.picker.backends[self.index as usize]
    }
    /// Whether this pick counts as an in-flight call until dropped.
    pub fn is_counted(&self) -> bool {
        self.counted
    }
    /// The picked backend's position in [`Picker::backends`].
    pub fn index(&self) -> usize {
        self.index as usize
    }
}

impl<P: Deref<Target = Picker>> Drop for OwnedPick<P> {
    #[inline]
    fn drop(&mut self) {
        if self.counted {
            self.picker.release(self.index);
        }
    }
}

impl Drop for Pick<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.counted {
            self.picker.release(self.index);
        }
    }
}
