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
