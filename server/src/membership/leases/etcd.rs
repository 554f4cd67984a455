//! Self-registration leases on etcd (feature `etcd`): each DLB lease is an etcd lease, so any
//! replica can renew it and the leader expires it.
//!
//! * **Register** ([`Leases::keep`] through [`EtcdLeases`]): read
//!   `<prefix>/leases/<service>/<server_id>` (its value is the etcd lease id, decimal). If it
//!   names a live lease of the same TTL, send one keep-alive for it: that is the renewal, the
//!   same on every replica. Otherwise (first registration, the lease expired, the TTL changed)
//!   grant an etcd lease of the TTL and put the key attached to it. The record itself is written
//!   by the caller afterwards, as on one node ([`crate::membership`]): the key exists before the
//!   record does.
//! * **Deregister** ([`Leases::forget`]): delete the key and revoke its lease (the caller has
//!   removed the record first).
//! * **Expiry** ([`start_expiry`]): on the leader only. When it becomes leader it reads the
//!   store's snapshot, then every key under `<prefix>/leases/` at revision R: a lease-owned
//!   record without a key lost its lease (while no leader was watching, or before this
//!   version of DLB) and is removed with the reason [`super::EXPIRED_REASON`]. Then it watches
//!   the prefix from R + 1: a deleted key (etcd expired the lease, or a `Deregister`) whose key
//!   is still absent when re-read removes the record if it is still lease-owned — through the
//!   leader's fenced store view, so a deposed leader cannot remove anything. Losing leadership
//!   stops the task at once; any error restarts it (with the reconcile) after 500 ms.
//!   Reading the snapshot before the keys matters: a record in the snapshot had its key put
//!   before it, so a missing key really is a lost lease.
//! * **Timing.** etcd expires a lease TTL after its last keep-alive (etcd's lease checks run
//!   every 500 ms, so up to ≈ 0.5 s later); the leader's watch sees the delete at once and
//!   removes the record in one more write.
//!
//! Costs: a renewal is one range read and one keep-alive (no revision, no push to SDKs: etcd
//! keep-alives are not writes); a first registration is one grant and one put (one revision
//! under `<prefix>/leases/`, which the routing watch on `<prefix>/svc/` does not see).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions, WatchOptions};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::watch;

use super::{is_leased, LeaseKey, LeaseState, Leases};
use crate::etcd::EtcdConfig;
use crate::membership::MembershipMetrics;
use crate::store::Store;
use crate::Error;

/// How long the expiry task waits before it starts again after an error.
const RESTART: Duration = Duration::from_millis(500);

fn etcd(e: etcd_client::Error) -> Error {
    crate::etcd::etcd_error("etcd (leases)", &e, "")
}

/// The lease keeper on etcd (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct EtcdLeases {
    client: Client,
    /// `<prefix>/leases/`.
    prefix: String,
}

impl std::fmt::Debug for EtcdLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLeases")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdLeases {
    /// Connects to etcd (its own connection).
    pub async fn connect(config: &EtcdConfig) -> Result<Self, Error> {
        let client = crate::etcd::connect(config, config.timeout, crate::etcd::KEEP_ALIVE)
            .await
            .map_err(etcd)?;
        Ok(Self {
            client,
            prefix: format!("{}/leases/", config.prefix.trim_end_matches('/')),
        })
    }

    fn key(&self, key: &LeaseKey) -> String {
        format!("{}{}/{}", self.prefix, key.service, key.server_id)
    }

    /// The lease key's `(service, server_id)`.
    fn parse<'a>(&self, key: &'a [u8]) -> Option<(&'a str, &'a str)> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        rest.split_once('/')
    }

    /// The etcd lease id a key's value names.
    fn lease_id(value: &[u8]) -> Option<i64> {
        std::str::from_utf8(value).ok()?.parse().ok()
    }

    /// One keep-alive for `lease`; its TTL as etcd reset it (0: the lease is gone).
    async fn keep_alive(&self, lease: i64) -> Result<i64, Error> {
        let (mut keeper, mut acks) = self
            .client
            .lease_client()
            .keep_alive(lease)
            .await
            .map_err(etcd)?;
        keeper.keep_alive().await.map_err(etcd)?;
        Ok(acks.message().await.map_err(etcd)?.map_or(0, |r| r.ttl()))
    }

    async fn keep_inner(&self, key: LeaseKey, ttl: Duration) -> Result<(), Error> {
        let ttl_s = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let k = self.key(&key);
        let mut kv = self.client.kv_client();
        let resp = kv.get(k.clone(), None).await.map_err(etcd)?;
        let held = resp.kvs().first().and_then(|kv| Self::lease_id(kv.value()));
        if let Some(lease) = held {
            if self.keep_alive(lease).await? == ttl_s {
                return Ok(());
            }
        }
        let lease = self
            .client
            .lease_client()
            .grant(ttl_s, None)
            .await
            .map_err(etcd)?
            .id();
        kv.put(
            k,
            lease.to_string(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(etcd)?;
        if let Some(old) = held.filter(|old| *old != lease) {
            // A lease of another TTL: nothing is attached to it any more.
            let _ = self.client.lease_client().revoke(old).await;
        }
        Ok(())
    }

    async fn forget_inner(&self, key: LeaseKey) -> Result<(), Error> {
        let k = self.key(&key);
        let mut kv = self.client.kv_client();
        let resp = kv
            .delete(k, Some(etcd_client::DeleteOptions::new().with_prev_key()))
            .await
            .map_err(etcd)?;
        for prev in resp.prev_kvs() {
            if let Some(lease) = Self::lease_id(prev.value()) {
                // Best effort: the key is gone already; a lease left behind expires alone.
                let _ = self.client.lease_client().revoke(lease).await;
            }
        }
        Ok(())
    }

    async fn list_inner(&self, service: String) -> Result<Vec<LeaseState>, Error> {
        let prefix = format!("{}{service}/", self.prefix);
        let resp = self
            .client
            .kv_client()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd)?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let (Some((_, id)), Some(lease)) = (self.parse(kv.key()), Self::lease_id(kv.value()))
            else {
                continue;
            };
            let ttl = self
                .client
                .lease_client()
                .time_to_live(lease, None)
                .await
                .map_err(etcd)?;
            if ttl.ttl() <= 0 {
                continue;
            }
            out.push(LeaseState {
                server_id: id.to_owned(),
                ttl: Duration::from_secs(u64::try_from(ttl.granted_ttl()).unwrap_or(0)),
                remaining: Duration::from_secs(u64::try_from(ttl.ttl()).unwrap_or(0)),
            });
        }
        out.sort_by(|a, b| a.server_id.cmp(&b.server_id));
        Ok(out)
    }

    /// Whether the lease key of `(service, server_id)` exists now.
    async fn exists(&self, service: &str, server_id: &str) -> Result<bool, Error> {
        let k = format!("{}{service}/{server_id}", self.prefix);
        let resp = self
            .client
            .kv_client()
            .get(k, Some(GetOptions::new().with_count_only()))
            .await
            .map_err(etcd)?;
        Ok(resp.count() > 0)
    }
}

impl Leases for EtcdLeases {
    fn keep(&self, key: LeaseKey, ttl: Duration) -> BoxFuture<'_, Result<(), Error>> {
        self.keep_inner(key, ttl).boxed()
    }

    fn forget(&self, key: LeaseKey) -> BoxFuture<'_, Result<(), Error>> {
        self.forget_inner(key).boxed()
    }

    fn list(&self, service: String) -> BoxFuture<'_, Result<Vec<LeaseState>, Error>> {
        self.list_inner(service).boxed()
    }
}

/// Starts the expiry task: it runs while `leadership` says this replica leads, writes through
/// `fenced` (the leader's fenced store view) and ends when `shutdown` turns true.
pub fn start_expiry(
    leases: EtcdLeases,
    fenced: Arc<dyn Store>,
    metrics: MembershipMetrics,
    mut leadership: watch::Receiver<Option<i64>>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let fence = tokio::select! {
                f = crate::replicas::until_leader(&mut leadership) => f,
                _ = crate::shutdown::stopped(&mut shutdown) => return,
            };
            let Some(fence) = fence else { return };
            let mut lost = leadership.clone();
            tokio::select! {
                e = lead(&leases, &*fenced, &metrics) => {
                    tracing::warn!(error = %e, "lease expiry (leader) interrupted; restarting");
                    tokio::time::sleep(RESTART).await;
                }
                () = crate::replicas::until_not_leader(&mut lost, fence) => {
                    tracing::info!("lease expiry stopped: this replica is no longer the leader");
                }
                _ = crate::shutdown::stopped(&mut shutdown) => return,
            }
        }
    })
}

/// Reconciles, then expires on deleted keys until an error (see the module docs).
async fn lead(leases: &EtcdLeases, store: &dyn Store, metrics: &MembershipMetrics) -> Error {
    match lead_inner(leases, store, metrics).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn lead_inner(
    leases: &EtcdLeases,
    store: &dyn Store,
    metrics: &MembershipMetrics,
) -> Result<std::convert::Infallible, Error> {
    // The records first, then the keys (see the module docs).
    let snapshot = store.snapshot().await?;
    let resp = leases
        .client
        .kv_client()
        .get(leases.prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(etcd)?;
    let rev = resp.header().map_or(0, |h| h.revision());
    let live: HashSet<(&str, &str)> = resp
        .kvs()
        .iter()
        .filter_map(|kv| leases.parse(kv.key()))
        .collect();
    let mut orphans: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for svc in &snapshot.services {
        for s in svc.servers.values().filter(|s| is_leased(s)) {
            if !live.contains(&(svc.name.as_str(), s.server_id.as_str())) {
                orphans
                    .entry(svc.name.clone())
                    .or_default()
                    .push(s.server_id.clone());
            }
        }
    }
    let leased = live.len();
    tracing::info!(
        leases = leased,
        lost = orphans.values().map(Vec::len).sum::<usize>(),
        "lease expiry running on this replica (the leader)"
    );
    metrics
        .leases
        .set(i64::try_from(leased).unwrap_or(i64::MAX));
    for (service, ids) in orphans {
        if !super::expire(store, metrics, &service, &ids).await {
            return Err(Error::Storage(format!(
                "lease expiry: removing lost leases of {service:?} failed"
            )));
        }
    }
    let mut watch = leases
        .client
        .watch_client()
        .watch(
            leases.prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await
        .map_err(etcd)?;
    loop {
        let Some(resp) = watch.message().await.map_err(etcd)? else {
            return Err(Error::Storage("lease watch ended".into()));
        };
        if resp.canceled() || resp.compact_revision() > 0 {
            return Err(Error::Storage(format!(
                "lease watch cancelled: {}",
                resp.cancel_reason()
            )));
        }
        let mut deleted: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in resp.events() {
            let Some(kv) = e.kv() else { continue };
            let Some((service, id)) = leases.parse(kv.key()) else {
                continue;
            };
            // A delete event's key has version 0. (Not `Event::event_type`, which panics on a
            // type it does not know.)
            if kv.version() == 0 {
                deleted
                    .entry(service.to_owned())
                    .or_default()
                    .push(id.to_owned());
            }
        }
        for (service, ids) in deleted {
            let mut gone = Vec::with_capacity(ids.len());
            for id in ids {
                // Registered again meanwhile: the lease is alive.
                if !leases.exists(&service, &id).await? {
                    gone.push(id);
                }
            }
            if !gone.is_empty() && !super::expire(store, metrics, &service, &gone).await {
                return Err(Error::Storage(format!(
                    "lease expiry: removing expired leases of {service:?} failed"
                )));
            }
        }
    }
}
