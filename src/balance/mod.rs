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
//!
//! **Files.** This file: the inputs and errors every picker shares ([`BackendSpec`],
//! [`PolicyConfig`], [`Algorithm`], [`StickyConfig`], [`BuildError`], [`PickError`]).
//! `picker.rs`: [`Picker`] and its request path (the pick, bounded load, accounting);
//! `build.rs`: building and rebuilding it; `load.rs`: [`Backend`] and its shared
//! [`BackendLoad`]; `pick.rs`: the guards [`Pick`] and [`OwnedPick`]. One module per policy.

use std::time::Duration;

mod build;
mod groups;
mod load;
mod pick;
mod picker;

pub mod ewma;
pub mod hash;
pub mod least_conn;
pub mod maglev;
pub mod panic;
pub mod ring;
pub mod sticky;
pub mod wrr;

pub use groups::Grouping;
pub use load::{Backend, BackendLoad, Outcomes};
pub use panic::{PanicConfig, PanicMode, PanicState};
pub use pick::{OwnedPick, Pick};
pub use picker::Picker;
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
    /// A grouping does not fit the backends it groups (a programming error of the caller).
    #[error("invalid grouping: {0}")]
    InvalidGrouping(String),
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
