//! Since when a client holding some version of a service has been behind: the time this cache
//! received the first change newer than that version ([`Cache::behind_since`]). The status page
//! reads it to tell a client that lags (behind for a while) from one that is merely in the
//! middle of a normal propagation (behind for milliseconds).
//!
//! Read from the service's bounded history (O(log history) under the slot's lock); when the
//! history no longer reaches back that far, the answer is a lower bound.

use tokio::time::Instant;

use super::Cache;

/// How long a holder of some version has been behind the service's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behind {
    /// It holds the current version (or a newer one), or the service does not exist.
    No,
    /// Behind since exactly this instant (the first newer change arrived then).
    Since(Instant),
    /// Behind since this instant or earlier (the history starts after the held version).
    AtLeastSince(Instant),
    /// Behind, since an unknown time (no history: e.g. the cache was just loaded).
    Unknown,
}

impl Cache {
    /// Since when a holder of version `held` of `service` has been behind (see [`Behind`]).
    pub fn behind_since(&self, service: &str, held: u64) -> Behind {
        let Some(slot) = self.slots.read().get(service).cloned() else {
            return Behind::No;
        };
        let st = slot.state.lock();
        let Some(snap) = &st.snapshot else {
            return Behind::No;
        };
        if held >= snap.version.version {
            return Behind::No;
        }
        let idx = st.history.partition_point(|e| e.change.version <= held);
        match st.history.get(idx) {
            Some(first) if first.change.base <= held => Behind::Since(first.at),
            Some(first) => Behind::AtLeastSince(first.at),
            None => Behind::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use dlb::proto;

    use super::*;
    use crate::store::{MemoryStore, Mutation, Store};

    fn server(id: &str) -> proto::Server {
        proto::Server {
            server_id: id.into(),
            address: "10.0.0.1:80".into(),
            weight: 1,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn behind_since_the_first_newer_change() {
        let store = Arc::new(MemoryStore::default());
        let cache = Arc::new(Cache::new(store.epoch(), 2));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let s: Arc<dyn Store> = store.clone();
        tokio::spawn(cache.clone().follow(s, None, async move {
            let _ = rx.await;
        }));
        let mut versions = Vec::new();
        for id in ["a", "b", "c"] {
            let c = store
                .apply("s".into(), vec![Mutation::Add(server(id))], None)
                .await
                .expect("add");
            let v = c.version.version;
            assert!(cache.wait_for_revision(v, Duration::from_secs(5)).await);
            versions.push((v, Instant::now()));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let [(v1, _), (v2, t2), (v3, t3)] = versions[..] else {
            panic!("three versions")
        };
        assert_eq!(cache.behind_since("s", v3), Behind::No);
        assert_eq!(cache.behind_since("nope", 0), Behind::No);
        assert_eq!(cache.behind_since("s", v2), Behind::Since(t3));
        assert_eq!(cache.behind_since("s", v1), Behind::Since(t2));
        // History of 2: the change that made v1 is gone.
        assert_eq!(cache.behind_since("s", 0), Behind::AtLeastSince(t2));
        drop(tx);
    }
}
