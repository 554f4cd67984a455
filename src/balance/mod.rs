//! Balancing: immutable pickers, one per policy, and sticky sessions.
//!
//! A [`Picker`] is built off the request path from a list of [`BackendSpec`]s and a
//! [`PolicyConfig`], then shared behind an `Arc` and swapped atomically by its owner (the SDK's
//! per-service state, or `dlbd`'s server-side picker). [`Picker::pick`] only reads immutable data
//! and touches atomics; it never takes a lock for the round-robin, P2C and hashing policies.
//!
//! In-flight counts live in [`BackendLoad`], shared by `Arc` across picker generations:
//! [`Picker::rebuild`] carries each backend's load over by id, so a call that started on an old
//! picker is still counted (and released) correctly after a swap.
//!
//! INTERIM: the algorithm internals below are a placeholder (plain round robin for every policy)
//! so that the server and SDK can be built against this API; `wrr`, `least_conn`, `maglev`,
//! `ring` and `sticky` replace them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub mod sticky;

pub use sticky::StickyTable;

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
}

impl PolicyConfig {
    /// A configuration for `algorithm` with no bounded load and in-flight tracking on.
    pub fn new(algorithm: Algorithm) -> Self {
        Self {
            algorithm,
            bounded_load_factor: None,
            track_in_flight: true,
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
}

/// In-flight accounting of one backend, shared across picker generations.
#[derive(Debug, Default)]
pub struct BackendLoad {
    in_flight: AtomicU64,
    baseline: AtomicU64,
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
    /// The backend's shared in-flight accounting.
    pub fn load(&self) -> &Arc<BackendLoad> {
        &self.load
    }
}

/// An immutable picker for one service state. See the module docs.
#[derive(Debug)]
pub struct Picker {
    policy: PolicyConfig,
    backends: Box<[Backend]>,
    by_id: HashMap<Arc<str>, usize>,
    eligible: Box<[u32]>,
    cursor: AtomicUsize,
}

impl Picker {
    /// Builds a picker with fresh in-flight counters.
    pub fn build(policy: &PolicyConfig, specs: &[BackendSpec]) -> Result<Self, BuildError> {
        Self::build_with(policy, specs, |_| None)
    }

    /// Builds a picker for a new state of the same service, carrying each surviving backend's
    /// in-flight accounting over by id.
    pub fn rebuild(&self, policy: &PolicyConfig, specs: &[BackendSpec]) -> Result<Self, BuildError> {
        Self::build_with(policy, specs, |id| {
            self.by_id.get(id).map(|&i| self.backends[i].load.clone())
        })
    }

    fn build_with(
        policy: &PolicyConfig,
        specs: &[BackendSpec],
        load_of: impl Fn(&str) -> Option<Arc<BackendLoad>>,
    ) -> Result<Self, BuildError> {
        if let Some(c) = policy.bounded_load_factor {
            if !(c.is_finite() && c >= 1.0) {
                return Err(BuildError::InvalidLoadFactor(c));
            }
        }
        let mut by_id = HashMap::with_capacity(specs.len());
        let mut backends = Vec::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            if s.id.is_empty() {
                return Err(BuildError::EmptyId);
            }
            if !(1..=10_000).contains(&s.weight) {
                return Err(BuildError::InvalidWeight {
                    id: s.id.clone(),
                    weight: s.weight,
                });
            }
            let id: Arc<str> = s.id.as_str().into();
            if by_id.insert(id.clone(), i).is_some() {
                return Err(BuildError::DuplicateId(s.id.clone()));
            }
            backends.push(Backend {
                hash_key: s.hash_key.as_deref().unwrap_or(&s.id).into(),
                address: s.address.as_str().into(),
                weight: s.weight,
                eligible: s.eligible,
                load: load_of(&s.id).unwrap_or_default(),
                id,
            });
        }
        let eligible = (0..backends.len() as u32)
            .filter(|&i| backends[i as usize].eligible)
            .collect();
        Ok(Self {
            policy: *policy,
            backends: backends.into(),
            by_id,
            eligible,
            cursor: AtomicUsize::new(fastrand::usize(..usize::MAX / 2)),
        })
    }

    /// Picks a backend for a request. `key` is the request key for the hashing algorithms (and is
    /// ignored by the others); `None` picks as if given a random key.
    pub fn pick(&self, key: Option<&[u8]>) -> Result<Pick<'_>, PickError> {
        let _ = key;
        if self.backends.is_empty() {
            return Err(PickError::NoBackends);
        }
        if self.eligible.is_empty() {
            return Err(PickError::NoEligibleBackends);
        }
        let n = self.cursor.fetch_add(1, Ordering::Relaxed);
        let index = self.eligible[n % self.eligible.len()];
        Ok(self.acquire(index))
    }

    fn acquire(&self, index: u32) -> Pick<'_> {
        let backend = &self.backends[index as usize];
        let counted = self.policy.track_in_flight;
        if counted {
            backend.load.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        Pick {
            picker: self,
            index,
            counted,
        }
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
    pub fn pick_id(&self, id: &str) -> Option<Pick<'_>> {
        let &i = self.by_id.get(id)?;
        self.backends[i].eligible.then(|| self.acquire(i as u32))
    }
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
}

impl Pick<'_> {
    /// Converts into an owned pick. `picker` must be the `Arc` this pick was made from.
    ///
    /// # Panics
    /// Panics if `picker` is not the picker this pick came from (a programming error).
    pub fn into_owned(self, picker: &Arc<Picker>) -> OwnedPick {
        assert!(
            std::ptr::eq(self.picker, Arc::as_ptr(picker)),
            "into_owned called with a different picker"
        );
        let owned = OwnedPick {
            picker: picker.clone(),
            index: self.index,
            counted: self.counted,
        };
        std::mem::forget(self);
        owned
    }
}

/// A [`Pick`] that owns its picker: `'static`, `Send` and `Sync`. Dropping it ends the in-flight
/// call it counts.
#[derive(Debug)]
pub struct OwnedPick {
    picker: Arc<Picker>,
    index: u32,
    counted: bool,
}

impl OwnedPick {
    /// The picked backend.
    pub fn backend(&self) -> &Backend {
        &self.picker.backends[self.index as usize]
    }
}

impl Drop for OwnedPick {
    fn drop(&mut self) {
        if self.counted {
            self.backend().load.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Pick<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.backend().load.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
