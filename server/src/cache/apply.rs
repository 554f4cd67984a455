//! The cache's write side: [`Cache::load`] (a whole store snapshot, at start and after a
//! re-read) and [`Cache::apply`] (committed changes in revision order), which keep each
//! service's snapshot, its size and its bounded history (count and bytes, see the
//! [module docs](super)) and wake the service's watchers. A service that leaves the store and
//! has no watcher loses its entry.

use std::sync::Arc;

use dlb::proto;
use tokio::time::Instant;

use super::{Cache, Entry, Memo, Slot, MIN_HISTORY_BYTES};
use crate::store::{Change, ServiceSnapshot, StoreSnapshot};

/// About how many bytes one backend record costs in a snapshot or a change (its encoding plus
/// the map node and `Arc` around it).
fn record_bytes(s: &proto::Server) -> usize {
    use prost::Message as _;
    s.encoded_len() + 64
}

impl Cache {
    /// Replaces the whole state with a store snapshot (at start, and after a compaction or a
    /// store error). Services whose version changed lose their history and wake their watchers.
    pub fn load(&self, snapshot: StoreSnapshot) {
        let mut appeared = false;
        let mut present: Vec<Arc<str>> = Vec::new();
        for s in snapshot.services {
            let name = s.name.clone();
            self.with_slot(&name, |slot, st| {
                present.push(slot.name.clone());
                let same = st
                    .snapshot
                    .as_ref()
                    .is_some_and(|cur| cur.version == s.version);
                if same {
                    return;
                }
                appeared |= st.snapshot.is_none();
                st.clear_history();
                st.snapshot_bytes = s.servers.values().map(|r| record_bytes(r)).sum();
                st.snapshot = Some(Arc::new(s));
                st.full = Memo::default();
                st.retire_derived(false);
                slot.wake_all(st);
            });
        }
        // Services that no longer exist in the store (their entries go unless followed).
        let present: std::collections::HashSet<Arc<str>> = present.into_iter().collect();
        let slots: Vec<Arc<Slot>> = self.slots.read().values().cloned().collect();
        for slot in slots {
            if present.contains(&slot.name) {
                continue;
            }
            let unused = {
                let mut st = slot.state.lock();
                if st.snapshot.take().is_some() {
                    st.clear_history();
                    st.retire_derived(true);
                    st.snapshot_bytes = 0;
                    slot.wake_all(&st);
                }
                st.unused()
            };
            if unused {
                self.release(&slot.name);
            }
        }
        self.revision.send_replace(snapshot.revision);
        if appeared {
            self.services.send_modify(|n| *n += 1);
        }
    }

    /// Applies committed changes in revision order. Returns `false` when a change does not
    /// follow the cached version of its service (the caller must re-read the store).
    pub fn apply(&self, changes: &[Arc<Change>]) -> bool {
        let now = Instant::now();
        let mut appeared = false;
        let mut gone = false;
        let mut consistent = true;
        let mut i = 0;
        while i < changes.len() {
            // Consecutive changes of one service are applied under one lock and one new Arc.
            let name = &changes[i].service;
            let mut j = i + 1;
            while j < changes.len() && &changes[j].service == name {
                j += 1;
            }
            let history = self.history;
            let epoch = self.epoch;
            let removed = self.with_slot(name, |slot, st| {
                let mut snap = match &st.snapshot {
                    Some(s) => (**s).clone(),
                    None => ServiceSnapshot {
                        name: name.clone(),
                        version: proto::Version { epoch, version: 0 },
                        policy: dlb::model::default_policy(),
                        servers: Default::default(),
                    },
                };
                appeared |= st.snapshot.is_none();
                let mut bytes = st.snapshot_bytes;
                let mut removed = false;
                for c in &changes[i..j] {
                    if removed {
                        // Created again after a removal in this batch.
                        removed = false;
                        snap.servers = Default::default();
                        snap.policy = dlb::model::default_policy();
                        snap.version.version = 0;
                        bytes = 0;
                        st.clear_history();
                        appeared = true;
                    }
                    if c.base != snap.version.version && !(c.deleted && c.base == 0) {
                        tracing::error!(
                            service = %name,
                            base = c.base,
                            cached = snap.version.version,
                            "cache out of step with the store; re-reading"
                        );
                        consistent = false;
                        break;
                    }
                    if c.deleted {
                        // The service is gone: its followers are told it does not exist.
                        removed = true;
                        snap.version.version = c.version;
                        continue;
                    }
                    for id in &c.removals {
                        if let Some(old) = snap.servers.remove(id.as_str()) {
                            bytes = bytes.saturating_sub(record_bytes(&old));
                        }
                    }
                    for s in &c.upserts {
                        bytes += record_bytes(s);
                        if let Some(old) = snap
                            .servers
                            .insert(s.server_id.as_str().into(), Arc::new(s.clone()))
                        {
                            bytes = bytes.saturating_sub(record_bytes(&old));
                        }
                    }
                    if let Some(p) = &c.policy {
                        snap.policy = p.clone();
                    }
                    snap.version.version = c.version;
                    st.history_bytes += c.approx_bytes();
                    st.history.push_back(Arc::new(Entry {
                        change: c.clone(),
                        at: now,
                        encoded: Memo::default(),
                    }));
                    // Bounded in count and in bytes; the newest change always stays.
                    let max_bytes = bytes.max(MIN_HISTORY_BYTES);
                    while st.history.len() > 1
                        && (st.history.len() > history || st.history_bytes > max_bytes)
                    {
                        if let Some(old) = st.history.pop_front() {
                            st.history_bytes =
                                st.history_bytes.saturating_sub(old.change.approx_bytes());
                        }
                    }
                }
                if removed {
                    st.snapshot = None;
                    st.snapshot_bytes = 0;
                    st.clear_history();
                } else {
                    st.snapshot_bytes = bytes;
                    st.snapshot = Some(Arc::new(snap));
                }
                st.full = Memo::default();
                st.retire_derived(removed);
                slot.wake_all(st);
                removed.then(|| st.unused())
            });
            if let Some(unused) = removed {
                gone = true;
                if unused {
                    self.release(name);
                }
            }
            if !consistent {
                return false;
            }
            i = j;
        }
        if let Some(last) = changes.last() {
            self.revision.send_replace(last.version);
        }
        if appeared || gone {
            self.services.send_modify(|n| *n += 1);
        }
        true
    }
}
