//! Sticky sessions: a bounded table binding session keys to backend ids.
//!
//! # What it owns
//! Session key → backend id bindings for one service. The table is independent of any picker
//! and outlives picker generations: a binding names a backend *id*, and every pick resolves it
//! in the picker it is given, so it survives rebuilds that add, remove or reweigh other
//! backends. This is real affinity, not consistent hashing: a binding stays put even when the
//! hash mapping of its key would change.
//!
//! # Semantics
//! * A session with a live binding whose backend exists and is eligible in the given picker
//!   gets that backend (the call is counted like any pick), and the binding's idle timer and LRU
//!   position are refreshed.
//! * Otherwise, in [`StickyMode::Strict`], the pick fails with
//!   [`PickError::StickyBackendUnavailable`] (the binding is kept, not refreshed: it expires
//!   after its TTL like any idle binding, and works again if its backend comes back). In
//!   [`StickyMode::Fallback`] the session is rebound to the picker's choice for the session
//!   key (the consistent-hash owner of the key for the hashing policies).
//! * A session without a live binding is bound to the picker's choice for its key.
//! * **TTL** — a binding not used for `ttl` (`now − last use ≥ ttl`) is expired: it is ignored
//!   and purged lazily (expired bindings at the LRU end of a shard are removed on every pick that
//!   touches the shard, amortised `O(1)`).
//! * **Size** — at most `max_entries` bindings; inserting into a full shard evicts its least
//!   recently used binding. Tables with `max_entries < 4096` use one shard, so eviction is
//!   exactly LRU; larger tables use 16 shards (by `XXH3_64` of the session key) with the
//!   capacity split between them, so eviction is LRU per shard.
//!
//! # Cost
//! One shard mutex (`parking_lot`) per pick, held across the underlying pick (never across an
//! `.await`): a hash-map lookup plus an `O(log entries)` LRU update (a `BTreeMap` keyed by a
//! per-shard use counter). Time is a parameter (`now: Instant`) so tests control it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{Pick, PickError, Picker, StickyConfig, StickyMode};

/// Tables at least this large are sharded.
const SHARD_THRESHOLD: usize = 4096;
/// Shards of a large table.
const SHARDS: usize = 16;

#[derive(Debug)]
struct Entry {
    id: Arc<str>,
    last_used: Instant,
    tick: u64,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<Box<[u8]>, Entry>,
    /// Use counter → session key; the first entry is the least recently used.
    lru: BTreeMap<u64, Box<[u8]>>,
    next_tick: u64,
    capacity: usize,
}

impl Shard {
    fn expired(e: &Entry, now: Instant, ttl: Duration) -> bool {
        now.saturating_duration_since(e.last_used) >= ttl
    }

    /// Removes expired bindings from the LRU end.
    fn purge(&mut self, now: Instant, ttl: Duration) {
        while let Some(entry) = self.lru.first_entry() {
            let expired = self
                .map
                .get(entry.get())
                .is_none_or(|e| Self::expired(e, now, ttl));
            if !expired {
                break;
            }
            let key = entry.remove();
            self.map.remove(&key);
        }
    }

    /// Marks `session` used now.
    fn touch(&mut self, session: &[u8], now: Instant) {
        let tick = self.next_tick;
        if let Some(e) = self.map.get_mut(session) {
            self.next_tick += 1;
            if let Some(key) = self.lru.remove(&e.tick) {
                self.lru.insert(tick, key);
            }
            e.tick = tick;
            e.last_used = now;
        }
    }

    /// Binds `session` to `id`, evicting the least recently used binding if full.
    fn bind(&mut self, session: &[u8], id: Arc<str>, now: Instant) {
        if let Some(old) = self.map.remove(session) {
            self.lru.remove(&old.tick);
        }
        if self.capacity == 0 {
            return;
        }
        while self.map.len() >= self.capacity {
            let Some((_, key)) = self.lru.pop_first() else {
                break;
            };
            self.map.remove(&key);
        }
        let tick = self.next_tick;
        self.next_tick += 1;
        let key: Box<[u8]> = session.into();
        self.lru.insert(tick, key.clone());
        self.map.insert(
            key,
            Entry {
                id,
                last_used: now,
                tick,
            },
        );
    }
}

/// Session key → backend id bindings with TTL and LRU eviction. Lives across picker
/// generations. See the module docs.
#[derive(Debug)]
pub struct StickyTable {
    config: StickyConfig,
    /// Independent shards, each behind its own mutex so sessions on different shards do not
    /// contend; a shard's map and LRU index must change together, hence a mutex, not atomics.
    shards: Box<[Mutex<Shard>]>,
}

impl StickyTable {
    /// An empty table.
    pub fn new(config: StickyConfig) -> Self {
        let count = if config.max_entries >= SHARD_THRESHOLD {
            SHARDS
        } else {
            1
        };
        let shards = (0..count)
            .map(|i| {
                let capacity =
                    config.max_entries / count + usize::from(i < config.max_entries % count);
                Mutex::new(Shard {
                    capacity,
                    ..Shard::default()
                })
            })
            .collect();
        Self { config, shards }
    }

    /// The table's configuration.
    pub fn config(&self) -> &StickyConfig {
        &self.config
    }

    /// Number of bindings held (expired ones count until they are purged lazily).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    /// Whether the table holds no binding.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The backend id `session` is bound to, if the binding is live at `now`.
    pub fn binding(&self, session: &[u8], now: Instant) -> Option<String> {
        let shard = self.shard(session).lock();
        shard
            .map
            .get(session)
            .filter(|e| !Shard::expired(e, now, self.config.ttl))
            .map(|e| e.id.to_string())
    }

    /// Removes the binding of `session`; whether there was one.
    pub fn remove(&self, session: &[u8]) -> bool {
        let mut shard = self.shard(session).lock();
        match shard.map.remove(session) {
            Some(e) => {
                shard.lru.remove(&e.tick);
                true
            }
            None => false,
        }
    }

    fn shard(&self, session: &[u8]) -> &Mutex<Shard> {
        let i = if self.shards.len() == 1 {
            0
        } else {
            super::hash::key_hash(session) as usize % self.shards.len()
        };
        &self.shards[i]
    }

    /// Picks for a session: its bound backend while eligible; otherwise per the mode (see the
    /// module docs). `now` is the current time.
    pub fn pick<'p>(
        &self,
        picker: &'p Picker,
        session: &[u8],
        now: Instant,
    ) -> Result<Pick<'p>, PickError> {
        let ttl = self.config.ttl;
        let mut shard = self.shard(session).lock();
        shard.purge(now, ttl);
        let bound = shard
            .map
            .get(session)
            .filter(|e| !Shard::expired(e, now, ttl))
            .map(|e| e.id.clone());
        if let Some(id) = bound {
            if let Some(p) = picker.pick_id(&id) {
                shard.touch(session, now);
                return Ok(p);
            }
            if self.config.mode == StickyMode::Strict {
                return Err(PickError::StickyBackendUnavailable(id.to_string()));
            }
        }
        let p = picker.pick(Some(session))?;
        let id: Arc<str> = p.backend().id.clone();
        shard.bind(session, id, now);
        Ok(p)
    }
}
