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
//! | `<prefix>/svc/<service>/meta` | [`Meta`]: the policy and what a watcher needs to rebuild the [`Change`] |
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
//!   [`plan`]'s, shared with the in-process stores.
//! * **Epoch.** Read from `<prefix>/epoch`, which the first store to connect creates with a
//!   random non-zero value: every replica on one etcd and prefix reports the same epoch.
//! * **Watch.** An etcd watch on `<prefix>/svc/` from the requested revision; etcd delivers the
//!   events of one revision together, and they become one [`Change`]. A watch etcd cancels
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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use dlb::{model, proto};
use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, KvClient, Txn, TxnOp, WatchClient, WatchOptions,
    WatchStream,
};
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::watch;

use super::plan::{check_service_quota, plan, ServiceState};
use super::{
    Applied, Change, Mutation, Servers, ServiceSnapshot, Store, StoreSnapshot, WatchEvent,
};
use crate::etcd::EtcdConfig;
use crate::Error;

/// Keys read per range request (a snapshot reads page by page at one revision).
const PAGE: i64 = 1024;
/// How often a write that loses its compare to other writers re-reads and retries.
const MAX_ATTEMPTS: usize = 64;
/// Largest response accepted from etcd: a page of records or a watch response (etcd batches
/// many revisions into one), each service being at most `MAX_SNAPSHOT_BYTES`.
const MAX_DECODE: usize = 4 * model::MAX_MESSAGE_BYTES;
/// Largest request sent: one batch is at most one service's snapshot, plus its `meta`.
const MAX_ENCODE: usize = 2 * model::MAX_MESSAGE_BYTES;

/// The value of `<prefix>/svc/<service>/meta`: the service's policy, and the parts of the
/// revision's [`Change`] that its record keys do not say.
#[derive(Clone, PartialEq, prost::Message)]
struct Meta {
    /// The service's policy after the write.
    #[prost(message, optional, tag = "1")]
    policy: Option<proto::Policy>,
    /// The service's version before the write (0: the write created it).
    #[prost(uint64, tag = "2")]
    base: u64,
    /// Whether the write set the policy (or created the service).
    #[prost(bool, tag = "3")]
    policy_changed: bool,
    /// Ids among the written records that did not exist before.
    #[prost(string, repeated, tag = "4")]
    created: Vec<String>,
    /// Why removed records were removed, by id.
    #[prost(btree_map = "string, string", tag = "5")]
    removal_reasons: BTreeMap<String, String>,
}

/// What a key under `<prefix>/svc/` names.
enum Entry<'a> {
    Meta,
    Server(&'a str),
}

/// The key layout under one prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn epoch(&self) -> String {
        format!("{}/epoch", self.prefix)
    }
    fn services(&self) -> String {
        format!("{}/services", self.prefix)
    }
    fn root(&self) -> String {
        format!("{}/svc/", self.prefix)
    }
    fn service(&self, service: &str) -> String {
        format!("{}/svc/{service}/", self.prefix)
    }
    fn meta(&self, service: &str) -> String {
        format!("{}/svc/{service}/meta", self.prefix)
    }
    fn server(&self, service: &str, id: &str) -> String {
        format!("{}/svc/{service}/srv/{id}", self.prefix)
    }

    /// The service and entry a key under [`Keys::root`] names (service names and ids have no
    /// `/`, so the split is unambiguous).
    fn parse<'a>(&self, key: &'a [u8]) -> Option<(&'a str, Entry<'a>)> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/svc/")?;
        let (service, entry) = rest.split_once('/')?;
        let entry = match entry {
            "meta" => Entry::Meta,
            e => Entry::Server(e.strip_prefix("srv/")?),
        };
        Some((service, entry))
    }
}

/// The end of the range of keys starting with `prefix` (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

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

fn corrupt(key: &[u8], what: impl std::fmt::Display) -> Error {
    Error::Storage(format!(
        "etcd key {:?}: {what}",
        dlb::model::prefix(&String::from_utf8_lossy(key), 256)
    ))
}

/// An etcd revision as a version (etcd revisions are never negative).
fn revision(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

/// The revision a response was served at.
fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64, Error> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| Error::Storage("etcd: a response without a header".into()))
}

/// Decodes a stored record and checks it against its key.
fn decode_server(key: &[u8], id: &str, value: &[u8]) -> Result<proto::Server, Error> {
    let record = proto::Server::decode(value).map_err(|e| corrupt(key, e))?;
    if record.server_id != id {
        return Err(corrupt(key, format!("record names {:?}", record.server_id)));
    }
    model::validate_server(&record).map_err(|e| corrupt(key, e))?;
    Ok(record)
}

fn decode_meta(key: &[u8], value: &[u8]) -> Result<(Meta, proto::Policy), Error> {
    let meta = Meta::decode(value).map_err(|e| corrupt(key, e))?;
    let policy = meta
        .policy
        .clone()
        .ok_or_else(|| corrupt(key, "no policy"))?;
    model::validate_policy(&policy).map_err(|e| corrupt(key, e))?;
    Ok((meta, policy))
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

    /// Every key starting with `prefix`, read page by page at `at` (0: the current revision),
    /// and the revision read at. O(keys) in `keys / PAGE` requests.
    async fn range(
        &self,
        prefix: &str,
        at: i64,
    ) -> Result<(Vec<KeyValue>, i64), etcd_client::Error> {
        let end = prefix_end(prefix.as_bytes());
        let mut kv = self.kv.clone();
        let mut out = Vec::new();
        let mut start = prefix.as_bytes().to_vec();
        let mut at = at;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if at > 0 {
                options = options.with_revision(at);
            }
            let mut resp = kv.get(start.clone(), Some(options)).await?;
            if at == 0 {
                at = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last() else { break };
            start = last.key().to_vec();
            start.push(0);
            out.extend(kvs);
            if !more {
                break;
            }
        }
        Ok((out, at))
    }

    /// Like [`Inner::range`], starting over (a bounded number of times) when etcd compacts
    /// the revision between two pages.
    async fn range_consistent(&self, prefix: &str, at: i64) -> Result<(Vec<KeyValue>, i64), Error> {
        let mut tries = 0;
        loop {
            match self.range(prefix, at).await {
                Ok(r) => return Ok(r),
                Err(e) if is_compacted(&e) && tries < 3 => tries += 1,
                Err(e) => return Err(etcd(e)),
            }
        }
    }

    /// Builds one service's state from its keys (`meta` and records), as read at one revision.
    fn decode_service(
        &self,
        service: &str,
        kvs: &[KeyValue],
    ) -> Result<Option<ServiceState>, Error> {
        let mut meta = None;
        let mut servers = Servers::new();
        for kv in kvs {
            match self.keys.parse(kv.key()) {
                Some((s, Entry::Meta)) if s == service => {
                    let (_, policy) = decode_meta(kv.key(), kv.value())?;
                    meta = Some((revision(kv.mod_revision()), policy));
                }
                Some((s, Entry::Server(id))) if s == service => {
                    let record = decode_server(kv.key(), id, kv.value())?;
                    servers.insert(id.into(), Arc::new(record));
                }
                _ => return Err(corrupt(kv.key(), "not a key of this layout")),
            }
        }
        match meta {
            Some((version, policy)) => Ok(Some(ServiceState::new(version, policy, servers))),
            None if servers.is_empty() => Ok(None),
            None => Err(Error::Storage(format!(
                "etcd: service {service:?} has records but no meta key"
            ))),
        }
    }

    /// The current state of `service`: its `meta` key, then its records unless the mirror
    /// already holds that version.
    async fn load(&self, service: &str) -> Result<Option<ServiceState>, Error> {
        let mut tries = 0;
        loop {
            let mut kv = self.kv.clone();
            let resp = kv.get(self.keys.meta(service), None).await.map_err(etcd)?;
            let at = header_revision(resp.header())?;
            let Some(meta) = resp.kvs().first() else {
                return Ok(None);
            };
            let version = revision(meta.mod_revision());
            if let Some(s) = self
                .mirror
                .lock()
                .get(service)
                .filter(|s| s.version == version)
            {
                return Ok(Some(s.clone()));
            }
            match self.range(&self.keys.service(service), at).await {
                Ok((kvs, _)) => {
                    let state = self.decode_service(service, &kvs)?;
                    if let Some(s) = &state {
                        self.remember(service, s);
                    }
                    return Ok(state);
                }
                Err(e) if is_compacted(&e) && tries < 3 => tries += 1,
                Err(e) => return Err(etcd(e)),
            }
        }
    }

    /// Keeps `state` in the mirror unless it already holds a newer version.
    fn remember(&self, service: &str, state: &ServiceState) {
        let mut mirror = self.mirror.lock();
        match mirror.get(service) {
            Some(old) if old.version >= state.version => {}
            _ => {
                mirror.insert(service.to_owned(), state.clone());
            }
        }
    }

    /// The number of services and the `mod_revision` of the key that counts them.
    async fn service_count(&self) -> Result<(usize, i64), Error> {
        let key = self.keys.services();
        let resp = self.kv.clone().get(key, None).await.map_err(etcd)?;
        let Some(kv) = resp.kvs().first() else {
            return Ok((0, 0));
        };
        let count = std::str::from_utf8(kv.value())
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| corrupt(kv.key(), "not a decimal count"))?;
        Ok((count, kv.mod_revision()))
    }

    async fn apply(
        &self,
        service: String,
        mutations: Vec<Mutation>,
        expected_version: Option<u64>,
        fence: Option<(&str, i64)>,
    ) -> Result<Applied, Error> {
        // Before the name becomes part of a key.
        model::validate_id("service", &service)?;
        let meta_key = self.keys.meta(&service);
        for _ in 0..MAX_ATTEMPTS {
            let current = self.load(&service).await?;
            let plan = plan(
                &service,
                current.as_ref(),
                &mutations,
                expected_version,
                dlb::slow_start::now_ms(),
            )?;
            let Some(mut change) = plan.change else {
                let state = current.unwrap_or(plan.state);
                return Ok(Applied {
                    version: self.version(state.version),
                    changed: false,
                    policy: state.policy,
                    servers: plan.named,
                });
            };
            let base = i64::try_from(change.base).unwrap_or(i64::MAX);
            let mut compares = vec![Compare::mod_revision(
                meta_key.clone(),
                CompareOp::Equal,
                base,
            )];
            if let Some((key, revision)) = fence {
                compares.push(Compare::create_revision(key, CompareOp::Equal, revision));
            }
            let mut ops = Vec::with_capacity(change.upserts.len() + change.removals.len() + 2);
            if plan.deleted {
                // The meta key's delete event tells watchers the service is gone.
                let (count, count_revision) = self.service_count().await?;
                compares.push(Compare::mod_revision(
                    self.keys.services(),
                    CompareOp::Equal,
                    count_revision,
                ));
                ops.push(TxnOp::put(
                    self.keys.services(),
                    count.saturating_sub(1).to_string(),
                    None,
                ));
                ops.push(TxnOp::delete(meta_key.clone(), None));
                for id in &change.removals {
                    ops.push(TxnOp::delete(self.keys.server(&service, id), None));
                }
                let resp = self
                    .kv
                    .clone()
                    .txn(Txn::new().when(compares).and_then(ops))
                    .await
                    .map_err(etcd)?;
                if !resp.succeeded() {
                    if let Some((key, revision)) = fence {
                        self.check_fence(key, revision).await?;
                    }
                    continue;
                }
                let committed = header_revision(resp.header())?;
                self.mirror.lock().remove(&service);
                self.compact_after(committed).await;
                return Ok(Applied {
                    version: self.version(revision(committed)),
                    changed: true,
                    policy: plan.state.policy,
                    servers: Vec::new(),
                });
            }
            if current.is_none() {
                let (count, count_revision) = self.service_count().await?;
                check_service_quota(count)?;
                compares.push(Compare::mod_revision(
                    self.keys.services(),
                    CompareOp::Equal,
                    count_revision,
                ));
                ops.push(TxnOp::put(
                    self.keys.services(),
                    (count + 1).to_string(),
                    None,
                ));
            }
            let meta = Meta {
                policy: Some(plan.state.policy.clone()),
                base: change.base,
                policy_changed: change.policy.is_some(),
                created: change.created.clone(),
                removal_reasons: change.removal_reasons.clone(),
            };
            ops.push(TxnOp::put(meta_key.clone(), meta.encode_to_vec(), None));
            for s in &change.upserts {
                let key = self.keys.server(&service, &s.server_id);
                ops.push(TxnOp::put(key, s.encode_to_vec(), None));
            }
            for id in &change.removals {
                ops.push(TxnOp::delete(self.keys.server(&service, id), None));
            }
            let resp = self
                .kv
                .clone()
                .txn(Txn::new().when(compares).and_then(ops))
                .await
                .map_err(etcd)?;
            if !resp.succeeded() {
                if let Some((key, revision)) = fence {
                    self.check_fence(key, revision).await?;
                }
                // Another writer got there first: re-read and re-plan.
                continue;
            }
            let committed = header_revision(resp.header())?;
            let version = revision(committed);
            change.version = version;
            let mut state = plan.state;
            state.version = version;
            self.remember(&service, &state);
            self.compact_after(committed).await;
            return Ok(Applied {
                version: self.version(version),
                changed: true,
                policy: state.policy,
                servers: plan.named,
            });
        }
        Err(Error::Storage(format!(
            "etcd: service {service:?}: gave up after {MAX_ATTEMPTS} writes lost to concurrent \
             writers"
        )))
    }

    /// `Ok` while the leader key still has `create_revision == revision`.
    async fn check_fence(&self, key: &str, revision: i64) -> Result<(), Error> {
        let resp = self.kv.clone().get(key, None).await.map_err(etcd)?;
        let now = resp.kvs().first().map_or(0, KeyValue::create_revision);
        if now == revision {
            return Ok(());
        }
        Err(Error::Storage(format!(
            "etcd: this replica is no longer the leader (fence {revision}, leader key created at \
             {now}); singleton write refused"
        )))
    }

    /// With a history limit, compacts etcd so that the last `history` revisions stay.
    async fn compact_after(&self, committed: i64) {
        let Some(history) = self.history else { return };
        let keep = i64::try_from(history).unwrap_or(i64::MAX);
        let target = committed.saturating_sub(keep) + 1;
        if target <= 1 || self.compacted.fetch_max(target, Ordering::Relaxed) >= target {
            return;
        }
        if let Err(e) = self.kv.clone().compact(target, None).await {
            // Another replica compacted further already, or etcd is busy: the next write
            // tries again.
            tracing::debug!(target, error = %e, "etcd compaction");
        }
    }

    async fn get_service(&self, service: String) -> Result<Option<ServiceSnapshot>, Error> {
        model::validate_id("service", &service)?;
        Ok(self.load(&service).await?.map(|s| ServiceSnapshot {
            name: service,
            version: self.version(s.version),
            policy: s.policy,
            servers: s.servers,
        }))
    }

    async fn snapshot(&self) -> Result<StoreSnapshot, Error> {
        let (kvs, at) = self.range_consistent(&self.keys.root(), 0).await?;
        let mut by_service: BTreeMap<String, Vec<KeyValue>> = BTreeMap::new();
        for kv in kvs {
            let service = self
                .keys
                .parse(kv.key())
                .map(|(s, _)| s.to_owned())
                .ok_or_else(|| corrupt(kv.key(), "not a key of this layout"))?;
            by_service.entry(service).or_default().push(kv);
        }
        let mut services = Vec::with_capacity(by_service.len());
        for (name, kvs) in by_service {
            if let Some(s) = self.decode_service(&name, &kvs)? {
                self.remember(&name, &s);
                services.push(ServiceSnapshot {
                    version: self.version(s.version),
                    policy: s.policy,
                    servers: s.servers,
                    name,
                });
            }
        }
        Ok(StoreSnapshot {
            epoch: self.epoch,
            revision: revision(at),
            services,
        })
    }

    async fn open_watch(&self, from: u64) -> Result<WatchStream, Error> {
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        self.watch
            .clone()
            .watch(self.keys.root(), Some(options))
            .await
            .map_err(etcd)
    }

    /// The changes in one watch response: its events grouped by revision, one [`Change`] per
    /// revision. O(events).
    fn changes(&self, events: &[etcd_client::Event]) -> Result<Vec<Arc<Change>>, Error> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < events.len() {
            let rev = events[i].kv().map_or(0, |kv| kv.mod_revision());
            let len = events[i..]
                .iter()
                .take_while(|e| e.kv().map_or(0, |kv| kv.mod_revision()) == rev)
                .count()
                .max(1);
            out.push(Arc::new(self.change(rev, &events[i..i + len])?));
            i += len;
        }
        Ok(out)
    }

    /// The [`Change`] of the events of one revision.
    fn change(&self, rev: i64, events: &[etcd_client::Event]) -> Result<Change, Error> {
        let mut service: Option<&str> = None;
        let mut meta = None;
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        let mut service_deleted = false;
        for e in events {
            let kv = e.kv().ok_or_else(|| {
                Error::Storage(format!("etcd: revision {rev}: event without key"))
            })?;
            let (s, entry) = self
                .keys
                .parse(kv.key())
                .ok_or_else(|| corrupt(kv.key(), "not a key of this layout"))?;
            if *service.get_or_insert(s) != s {
                return Err(Error::Storage(format!(
                    "etcd: revision {rev} writes two services ({:?} and {s:?})",
                    service.unwrap_or_default()
                )));
            }
            // A delete event's key has version 0; a put's is at least 1. (Not
            // `Event::event_type`, which panics on an unknown type.)
            let deleted = kv.version() == 0;
            match (entry, deleted) {
                (Entry::Meta, false) => meta = Some(decode_meta(kv.key(), kv.value())?),
                (Entry::Meta, true) => service_deleted = true,
                (Entry::Server(id), false) => {
                    upserts.push(decode_server(kv.key(), id, kv.value())?);
                }
                (Entry::Server(id), true) => removals.push(id.to_owned()),
            }
        }
        let service = service.unwrap_or_default().to_owned();
        if service_deleted {
            removals.sort();
            // RemoveService: the delete event carries no base (the cache accepts base 0).
            return Ok(Change {
                service,
                base: 0,
                version: revision(rev),
                upserts: Vec::new(),
                created: Vec::new(),
                removals,
                removal_reasons: Default::default(),
                policy: None,
                deleted: true,
            });
        }
        let (meta, policy) = meta.ok_or_else(|| {
            Error::Storage(format!(
                "etcd: revision {rev} of service {service:?} has no meta key"
            ))
        })?;
        upserts.sort_by(|a, b| a.server_id.cmp(&b.server_id));
        removals.sort();
        Ok(Change {
            service,
            base: meta.base,
            version: revision(rev),
            upserts,
            created: meta.created,
            removals,
            removal_reasons: meta.removal_reasons,
            policy: meta.policy_changed.then_some(policy),
            deleted: false,
        })
    }
}

/// Where a watch stream is.
enum Watching {
    Start(u64),
    Running(Box<WatchStream>),
    Done,
}

fn watch_failed(what: impl std::fmt::Display) -> Error {
    Error::Storage(format!("etcd watch: {what}; re-read and watch again"))
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
        let inner = self.inner.clone();
        stream::unfold(Watching::Start(from_revision.max(1)), move |state| {
            let inner = inner.clone();
            async move {
                let mut ws = match state {
                    Watching::Done => return None,
                    Watching::Start(from) => match inner.open_watch(from).await {
                        Ok(ws) => Box::new(ws),
                        Err(e) => return Some((Err(e), Watching::Done)),
                    },
                    Watching::Running(ws) => ws,
                };
                loop {
                    let resp = match ws.message().await {
                        Ok(Some(resp)) => resp,
                        Ok(None) => {
                            return Some((
                                Err(watch_failed("etcd ended the stream")),
                                Watching::Done,
                            ))
                        }
                        Err(e) => return Some((Err(watch_failed(e)), Watching::Done)),
                    };
                    if resp.compact_revision() > 0 {
                        let compacted = revision(resp.compact_revision() - 1);
                        return Some((Ok(WatchEvent::Compacted { compacted }), Watching::Done));
                    }
                    if resp.canceled() {
                        let why = format!("cancelled by etcd: {}", resp.cancel_reason());
                        return Some((Err(watch_failed(why)), Watching::Done));
                    }
                    match inner.changes(resp.events()) {
                        Ok(cs) if cs.is_empty() => {}
                        Ok(cs) => {
                            return Some((Ok(WatchEvent::Changes(cs)), Watching::Running(ws)))
                        }
                        Err(e) => return Some((Err(e), Watching::Done)),
                    }
                }
            }
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/dlb/svc/"), b"/dlb/svc0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn keys_parse_back() {
        let k = Keys {
            prefix: "/dlb".into(),
        };
        assert!(matches!(
            k.parse(k.meta("s").as_bytes()),
            Some(("s", Entry::Meta))
        ));
        assert!(matches!(
            k.parse(k.server("s", "a.b:1").as_bytes()),
            Some(("s", Entry::Server("a.b:1")))
        ));
        assert!(k.parse(b"/dlb/svc/s/other").is_none());
        assert!(k.parse(b"/other/svc/s/meta").is_none());
        assert!(k.parse(k.epoch().as_bytes()).is_none());
    }
}
