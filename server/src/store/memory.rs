//! The in-memory [`Store`]: nothing survives the process. Used by tests, benchmarks and
//! `dlbd --store memory`.
//!
//! A thin wrapper over the shared [engine](super::engine) with no persistence: writes run
//! inline (they only touch RAM under a short lock). The epoch is random per instance, so a
//! restarted process starts a new history and every SDK gets a full snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use super::engine::Engine;
use super::{Applied, Mutation, ServiceSnapshot, Store, StoreSnapshot, WatchEvent};
use crate::Error;

/// Default number of changes (across all services) a store remembers for [`Store::watch`].
pub const DEFAULT_HISTORY: usize = 16_384;

/// Default bound on the bytes of those changes ([`Change::approx_bytes`](super::Change::approx_bytes)):
/// 64 MiB. A watcher further behind than the log reaches re-reads a snapshot.
pub const DEFAULT_HISTORY_BYTES: usize = 64 << 20;

/// An in-memory [`Store`] with a random epoch. See the module docs.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    engine: Arc<Engine>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(DEFAULT_HISTORY)
    }
}

impl MemoryStore {
    /// An empty store remembering the last `history` changes for watches. The epoch is random
    /// and non-zero.
    pub fn new(history: usize) -> Self {
        Self {
            engine: Arc::new(Engine::new(
                fastrand::u64(1..),
                0,
                BTreeMap::new(),
                history,
                None,
            )),
        }
    }
}

impl MemoryStore {
    /// Bounds the change log to `bytes` bytes (default [`DEFAULT_HISTORY_BYTES`]).
    pub fn with_history_bytes(self, bytes: usize) -> Self {
        self.engine.set_log_max_bytes(bytes);
        self
    }

    /// The number of changes the log holds and their bytes.
    pub fn history_size(&self) -> (usize, usize) {
        self.engine.log_size()
    }
}

impl Store for MemoryStore {
    fn epoch(&self) -> u64 {
        self.engine.epoch()
    }

    fn apply(
        &self,
        service: String,
        mutations: Vec<Mutation>,
        expected_version: Option<u64>,
    ) -> BoxFuture<'_, Result<Applied, Error>> {
        Box::pin(async move { self.engine.apply(&service, mutations, expected_version) })
    }

    fn get_service(
        &self,
        service: String,
    ) -> BoxFuture<'_, Result<Option<ServiceSnapshot>, Error>> {
        Box::pin(async move { Ok(self.engine.get_service(&service)) })
    }

    fn snapshot(&self) -> BoxFuture<'_, Result<StoreSnapshot, Error>> {
        Box::pin(async move { Ok(self.engine.snapshot()) })
    }

    fn watch(&self, from_revision: u64) -> BoxStream<'static, Result<WatchEvent, Error>> {
        self.engine.watch(from_revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlb::proto;

    fn big(i: usize) -> proto::Server {
        proto::Server {
            server_id: format!("b{}", i % 50),
            address: "10.0.0.1:80".into(),
            weight: 1,
            metadata: (0..32)
                .map(|k| (format!("k{k}"), format!("{i:0>250}")))
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_change_log_is_bounded_in_bytes() {
        // ~9 KB per change: 2,000 changes would be ~18 MB; the log keeps 1 MiB of them.
        let store = MemoryStore::new(DEFAULT_HISTORY).with_history_bytes(1 << 20);
        for i in 0..2_000 {
            store
                .apply("s".into(), vec![Mutation::Declare(big(i))], None)
                .await
                .expect("write");
        }
        let (len, bytes) = store.history_size();
        assert!(bytes <= 1 << 20, "{bytes} bytes in the log");
        assert!((50..2_000).contains(&len), "{len} changes in the log");
        // A watcher from the start is told the log no longer reaches back.
        let mut w = store.watch(1);
        match futures::StreamExt::next(&mut w).await {
            Some(Ok(WatchEvent::Compacted { compacted })) => {
                assert!(compacted >= 2_000 - len as u64)
            }
            other => panic!("expected Compacted, got {:?}", other.map(|e| e.is_ok())),
        }
        // The default bound applies to a store built without one.
        let store = MemoryStore::default();
        for i in 0..2_000 {
            store
                .apply("s".into(), vec![Mutation::Declare(big(i))], None)
                .await
                .expect("write");
        }
        assert_eq!(store.history_size().0, 2_000, "64 MiB holds these 18 MB");
    }
}
