//! The cache's follower: keeps the [`Cache`] in step with the store and says whether it is.
//!
//! [`Cache::follow`] reads a snapshot at revision R, watches from R + 1 and applies each
//! committed change; on [`WatchEvent::Compacted`], a store error or a watch that ends it
//! re-reads (with a capped backoff on errors: 50 ms doubling to 5 s). It publishes
//! [`Cache::synced`]: `true` once a load succeeded and while the watch that follows it runs,
//! `false` from the moment the watch fails until a re-read succeeds (e.g. while etcd is
//! unreachable). The replica's readiness (the `readiness` module) is derived from it.

use std::sync::Arc;
use std::time::Duration;

use dlb::backoff::Backoff;
use futures::StreamExt;

use super::Cache;
use crate::store::{Store, WatchEvent};

/// First backoff after a store error; doubled per error up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between two attempts to read a failing store.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Cache {
    /// Publishes whether the cache is in step (the follower's; and `spawn`'s after its load).
    pub(crate) fn set_synced(&self, synced: bool) {
        self.synced.send_if_modified(|s| {
            let changed = *s != synced;
            *s = synced;
            changed
        });
    }

    /// Keeps the cache in step with `store` until `stop` resolves: snapshot, watch, apply;
    /// re-read on compaction or error (with a capped backoff on errors). `loaded`: the revision
    /// of a snapshot the caller already [`load`](Cache::load)ed, so the first watch starts right
    /// after it instead of reading the store again.
    pub async fn follow(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        loaded: Option<u64>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        let mut resume = loaded;
        loop {
            if let Some(r) = resume.take() {
                self.set_synced(true);
                let go_on = self
                    .watch_from(&*store, r + 1, &mut backoff, &mut stop)
                    .await;
                if !go_on {
                    return;
                }
                continue;
            }
            let snapshot = tokio::select! {
                s = store.snapshot() => s,
                _ = &mut stop => return,
            };
            let snapshot = match snapshot {
                Ok(s) => s,
                Err(e) => {
                    self.set_synced(false);
                    tracing::error!(error = %e, "cache: cannot read the store; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = &mut stop => return,
                    }
                    continue;
                }
            };
            let from = snapshot.revision + 1;
            self.load(snapshot);
            self.set_synced(true);
            if !self
                .watch_from(&*store, from, &mut backoff, &mut stop)
                .await
            {
                return;
            }
        }
    }

    /// Applies the store's changes from `from` until a re-read is needed (`true`, and the
    /// cache is marked out of step) or `stop` resolves (`false`).
    async fn watch_from(
        &self,
        store: &dyn Store,
        from: u64,
        backoff: &mut Backoff,
        stop: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> bool {
        let mut events = store.watch(from);
        loop {
            let ev = tokio::select! {
                e = events.next() => e,
                _ = &mut *stop => return false,
            };
            match ev {
                Some(Ok(WatchEvent::Changes(batch))) => {
                    backoff.reset();
                    if !self.apply(&batch) {
                        self.set_synced(false);
                        return true;
                    }
                }
                Some(Ok(WatchEvent::Compacted { compacted })) => {
                    tracing::warn!(compacted, "cache: store history compacted; re-reading");
                    self.set_synced(false);
                    return true;
                }
                Some(Err(e)) => {
                    self.set_synced(false);
                    tracing::error!(error = %e, "cache: store watch failed; re-reading");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = &mut *stop => return false,
                    }
                    return true;
                }
                None => {
                    self.set_synced(false);
                    tracing::warn!("cache: store watch ended; re-reading");
                    return true;
                }
            }
        }
    }
}
