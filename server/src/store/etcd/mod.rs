//! The etcd [`Store`] (feature `etcd`): routing state kept in an etcd cluster, so several
//! `dlbd` replicas serve one versioned state and a replica holds nothing that matters.
//!
//! This module owns the mapping of the store contract onto etcd (`docs/etcd.md` has the
//! operator's view):
//!
//! | key | value |
//! |---|---|
//! | `<prefix>/epoch` | the epoch, decimal; created once by a create-if-absent txn |
//! | `<prefix>/services` | how many services exist, decimal (the services quota) |
//! | `<prefix>/svc/<service>/meta` | `Meta` (`keys.rs`): the policy and what a watcher needs to rebuild the [`Change`](super::Change) |
//! | `<prefix>/svc/<service>/srv/<server_id>` | the protobuf-encoded `proto::Server` record |
//!
//! * **Versions are etcd revisions.** Every [`Store::apply`] that changes something is one etcd
//!   txn, hence one revision; it always rewrites the service's `meta` key, so the service's
//!   version is that key's `mod_revision`.
//! * **Writes compare.** The txn compares the `meta` key's `mod_revision` with the version the
//!   batch was planned on (0: the service must not exist) — and, when it creates a service, the
//!   `services` key's too. A txn that loses to another writer (another replica) re-reads and
//!   re-plans: a batch without `expected_version` is retried on the new state (so `Add` of an id
//!   another replica just added fails with `ALREADY_EXISTS`), one with a stale
//!   `expected_version` fails with [`Error::VersionMismatch`]. The semantics of a batch are
//!   `plan`'s, shared with the in-process stores.
//! * **Epoch.** Read from `<prefix>/epoch`, which the first store to connect creates with a
//!   random non-zero value: every replica on one etcd and prefix reports the same epoch.
//! * **Watch.** An etcd watch on `<prefix>/svc/` from the requested revision; etcd delivers the
//!   events of one revision together, and they become one [`Change`](super::Change). A watch etcd cancels
//!   because its start was compacted ends with [`WatchEvent::Compacted`] (the newest missing
//!   revision is etcd's `compact_revision - 1`); a broken connection or any other cancel ends it
//!   with an error item, and the consumer re-syncs.
//! * **Reads.** [`Store::snapshot`] reads every key under `<prefix>/svc/` page by page at the
//!   revision of the first page, so it is one consistent revision however large. A replica
//!   keeps a mirror of the services it has read (`mirror`), keyed by version: a read fetches
//!   the `meta` key and re-reads the records only when the version moved.
//!
//! * **Fenced writes** ([`EtcdStore::fenced`], [`FencedStore`]): the leader's singleton jobs
//!   (lease expiry, DNS, outlier decisions) write through a view that adds
//!   `create_revision(<prefix>/leader) == fence` to every txn, where the fence is the revision
//!   the replica won leadership at. A replica that lost the leader key (its lease expired while
//!   it was cut off, say) cannot write even if it has not noticed yet: etcd refuses the txn.
//!
//! Sync primitives: the etcd clients are cheap clones of one channel (no lock); `mirror` is a
//! `parking_lot::Mutex` held only for a map lookup or insert and O(1) clones, never across an
//! `.await`.
//!
//! Files: this one (the store, its connection and the `Store` impls), `keys.rs` (the key
//! layout, `Meta` and decoding), `read.rs` (ranges, the mirror, snapshots),
//! `txn.rs` (a batch as one compare-and-set txn, fencing, compaction), `watcher.rs` (an etcd
//! watch as [`WatchEvent`]s).

mod keys;
mod read;
mod txn;
mod watcher;

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use dlb::{model, proto};
use etcd_client::{Compare, CompareOp, KvClient, Txn, TxnOp, WatchClient};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::plan::ServiceState;
use super::{Applied, Mutation, ServiceSnapshot, Store, StoreSnapshot, WatchEvent};
use crate::etcd::EtcdConfig;
use crate::Error;
use keys::{corrupt, Keys};

/// Keys read per range request (a snapshot reads page by page at one revision).
const PAGE: i64 = 1024;
/// How often a write that loses its compare to other writers re-reads and retries.
const MAX_ATTEMPTS: usize = 64;
/// Largest response accepted from etcd: a page of records or a watch response (etcd batches
/// many revisions into one), each service being at most `MAX_SNAPSHOT_BYTES`.
const MAX_DECODE: usize = 4 * model::MAX_MESSAGE_BYTES;
/// Largest request sent: one batch is at most one service's snapshot, plus its `meta`.
const MAX_ENCODE: usize = 2 * model::MAX_MESSAGE_BYTES;

fn etcd(e: etcd_client::Error) -> Error {
    let hint = match &e {
        etcd_client::Error::GRpcStatus(s) if s.message().contains("too many operations") => {
            " (raise etcd's --max-txn-ops: one batch is one txn)"
        }
        etcd_client::Error::GRpcStatus(s) if s.message().contains("request is too large") => {
            " (raise etcd's --max-request-bytes: one batch is one txn)"
        }
        _ => "",
    };
    crate::etcd::etcd_error("etcd", &e, hint)
}

fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("compacted"))
}

/// A [`Store`] in etcd. Cloning is cheap and shares the connection. See the module docs.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    kv: KvClient,
    watch: WatchClient,
    keys: Keys,
    epoch: u64,
    /// Revisions to keep when this store compacts etcd after its writes (`None`: never).
    history: Option<u64>,
    /// The highest revision this store asked etcd to compact at.
    compacted: AtomicI64,
    /// Services as last read or written by this replica, by name; an entry is used only while
    /// its version is the `meta` key's `mod_revision`.
    mirror: Mutex<HashMap<String, ServiceState>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.inner.keys.prefix)
            .field("epoch", &self.inner.epoch)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd and reads (or, first of all replicas, creates) the epoch. Fails when no
    /// endpoint answers within the connect timeout.
    pub async fn connect(config: &EtcdConfig) -> Result<Self, Error> {
        if config.endpoints.is_empty() {
            return Err(Error::Storage("etcd: no endpoints given".into()));
        }
        let client = crate::etcd::connect(config, config.timeout, crate::etcd::KEEP_ALIVE)
            .await
            .map_err(etcd)?;
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_DECODE)
            .max_encoding_message_size(MAX_ENCODE);
        let watch = client.watch_client().max_decoding_message_size(MAX_DECODE);
        let keys = Keys {
            prefix: config.prefix.trim_end_matches('/').to_owned(),
        };
        let epoch = Self::init_epoch(kv.clone(), &keys).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                kv,
                watch,
                keys,
                epoch,
                history: config.history,
                compacted: AtomicI64::new(0),
                mirror: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The key prefix (without a trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.inner.keys.prefix
    }

    async fn init_epoch(mut kv: KvClient, keys: &Keys) -> Result<u64, Error> {
        let key = keys.epoch();
        let mine = fastrand::u64(1..);
        let created = kv
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), mine.to_string(), None)]),
            )
            .await
            .map_err(etcd)?;
        if created.succeeded() {
            return Ok(mine);
        }
        let resp = kv.get(key.clone(), None).await.map_err(etcd)?;
        let kv = resp
            .kvs()
            .first()
            .ok_or_else(|| corrupt(key.as_bytes(), "vanished after it was created"))?;
        std::str::from_utf8(kv.value())
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|e| *e != 0)
            .ok_or_else(|| corrupt(kv.key(), "not a non-zero decimal epoch"))
    }
}

impl Inner {
    fn version(&self, version: u64) -> proto::Version {
        proto::Version {
            epoch: self.epoch,
            version,
        }
    }
}

impl EtcdStore {
    /// A view of this store whose writes are fenced by the leader key `<prefix>/leader`: each
    /// write compares the key's `create_revision` with the fence `leadership` holds, and is
    /// refused (a storage error) while `leadership` is `None` or once the key changed. Reads
    /// and watches are this store's.
    pub fn fenced(&self, leadership: watch::Receiver<Option<i64>>) -> FencedStore {
        FencedStore {
            store: self.clone(),
            key: format!("{}/leader", self.inner.keys.prefix),
            leadership,
        }
    }
}

/// The leader's view of an [`EtcdStore`]: writes fenced by the leader key (see
/// [`EtcdStore::fenced`]).
#[derive(Debug)]
pub struct FencedStore {
    store: EtcdStore,
    key: String,
    leadership: watch::Receiver<Option<i64>>,
}

impl Store for FencedStore {
    fn epoch(&self) -> u64 {
        self.store.epoch()
    }

    fn apply(
        &self,
        service: String,
        mutations: Vec<Mutation>,
        expected_version: Option<u64>,
    ) -> BoxFuture<'_, Result<Applied, Error>> {
        let fence = *self.leadership.borrow();
        Box::pin(async move {
            let Some(fence) = fence else {
                return Err(Error::Storage(
                    "this replica is not the leader; singleton write refused".into(),
                ));
            };
            self.store
                .inner
                .apply(
                    service,
                    mutations,
                    expected_version,
                    Some((&self.key, fence)),
                )
                .await
        })
    }

    fn get_service(
        &self,
        service: String,
    ) -> BoxFuture<'_, Result<Option<ServiceSnapshot>, Error>> {
        self.store.get_service(service)
    }

    fn snapshot(&self) -> BoxFuture<'_, Result<StoreSnapshot, Error>> {
        self.store.snapshot()
    }

    fn watch(&self, from_revision: u64) -> BoxStream<'static, Result<WatchEvent, Error>> {
        self.store.watch(from_revision)
    }
}

impl Store for EtcdStore {
    fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    fn apply(
        &self,
        service: String,
        mutations: Vec<Mutation>,
        expected_version: Option<u64>,
    ) -> BoxFuture<'_, Result<Applied, Error>> {
        Box::pin(self.inner.apply(service, mutations, expected_version, None))
    }

    fn get_service(
        &self,
        service: String,
    ) -> BoxFuture<'_, Result<Option<ServiceSnapshot>, Error>> {
        Box::pin(self.inner.get_service(service))
    }

    fn snapshot(&self) -> BoxFuture<'_, Result<StoreSnapshot, Error>> {
        Box::pin(self.inner.snapshot())
    }

    fn watch(&self, from_revision: u64) -> BoxStream<'static, Result<WatchEvent, Error>> {
        watcher::stream(self.inner.clone(), from_revision)
    }
}
