//! Sticky sessions: a bounded table binding session keys to backend ids.
//!
//! INTERIM: unbounded map without TTL; the real table (TTL, LRU eviction) replaces it.

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;

use super::{Pick, PickError, Picker, StickyConfig, StickyMode};

/// Session key → backend id bindings. Lives across picker generations.
#[derive(Debug)]
pub struct StickyTable {
    config: StickyConfig,
    bindings: Mutex<HashMap<Vec<u8>, String>>,
}

impl StickyTable {
    /// An empty table.
    pub fn new(config: StickyConfig) -> Self {
        Self {
            config,
            bindings: Mutex::new(HashMap::new()),
        }
    }

    /// The table's configuration.
    pub fn config(&self) -> &StickyConfig {
        &self.config
    }

    /// Number of live bindings.
    pub fn len(&self) -> usize {
        self.bindings.lock().len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Picks for a session: its bound backend while eligible; otherwise per the mode.
    pub fn pick<'p>(
        &self,
        picker: &'p Picker,
        session: &[u8],
        now: Instant,
    ) -> Result<Pick<'p>, PickError> {
        let _ = now;
        let mut map = self.bindings.lock();
        if let Some(id) = map.get(session) {
            if let Some(p) = picker.pick_id(id) {
                return Ok(p);
            }
            if self.config.mode == StickyMode::Strict {
                return Err(PickError::StickyBackendUnavailable(id.clone()));
            }
        }
        let p = picker.pick(Some(session))?;
        map.insert(session.to_vec(), p.backend().id().to_owned());
        Ok(p)
    }
}
