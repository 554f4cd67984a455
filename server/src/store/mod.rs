//! Routing state: the [`Store`] contract and the types it exchanges.
//!
//! The store owns the versioned state of every service — its policy and one record per backend —
//! and is the single source of truth that writes go to. The contract, which the memory, embedded
//! and etcd (feature `etcd`) stores all honour and which `tests/store_contract.rs` checks against
//! each:
//!
//! * **Revisions.** The store has one strictly increasing `revision`. Every write that changes a
//!   service commits exactly one [`Change`] at the next revision, and the service's **version**
//!   becomes that revision: versions strictly increase per service but are not consecutive.
//! * **Epoch.** [`Store::epoch`] names the store's history: versions of another epoch mean
//!   nothing here. The memory store draws a random epoch per process; the embedded store keeps
//!   its epoch on disk, so a restarted `dlbd` serves the same versions.
//! * **Atomic batches.** [`Store::apply`] applies a list of [`Mutation`]s to one service all or
//!   nothing, with an optional compare-and-set on the service's version; a stale
//!   `expected_version` fails with [`Error::VersionMismatch`] (`FAILED_PRECONDITION`) naming the
//!   current version. A batch that changes nothing (a no-op) commits nothing and keeps the
//!   version. A rejected batch changes nothing.
//! * **Validated records.** Every record is validated by `dlb::model` before commit, and its
//!   derived fields (effective health, reason) are stamped by `dlb::sources`, so every entry
//!   point is covered, not only the gRPC one.
//! * **Watch.** [`Store::watch`] yields committed changes from a revision on, in revision order,
//!   and can resume from any revision the store still remembers. When the history no longer
//!   reaches back it says so ([`WatchEvent::Compacted`]): the consumer re-reads a
//!   [`Store::snapshot`] at revision R and watches from R + 1.
//!
//! Backend records and the policy are separate records (one etcd key each), and the
//! in-process stores keep each service's backends in a persistent map ([`Servers`]) so a snapshot
//! is an O(1) clone however large the service.
//!
//! The trait is async and object safe (methods return [`BoxFuture`] / [`BoxStream`]) because the
//! etcd implementation talks to the network; the in-process stores do their work under a short
//! lock and never hold it across an `.await`.

pub mod embedded;
pub mod embedded_open;
mod engine;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod memory;
mod plan;
mod scratch;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use dlb::proto;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

pub use embedded::EmbeddedStore;
#[cfg(feature = "etcd")]
pub use etcd::{EtcdStore, FencedStore};
pub use memory::MemoryStore;

use crate::Error;

/// A service's backends by id: a persistent ordered map, so cloning a snapshot is O(1) and a
/// write copies O(log n) nodes.
pub type Servers = imbl::OrdMap<Arc<str>, Arc<proto::Server>>;

/// The state of one service at one version.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSnapshot {
    /// Service name.
    pub name: String,
    /// The state's version: the store's epoch and the revision of the service's last change.
    pub version: proto::Version,
    /// The service's policy.
    pub policy: proto::Policy,
    /// Backends, ordered by `server_id`.
    pub servers: Servers,
}

impl ServiceSnapshot {
    /// Number of backends eligible for traffic (healthy and not draining).
    pub fn eligible(&self) -> usize {
        self.servers
            .values()
            .filter(|s| dlb::model::is_eligible(s))
            .count()
    }

    /// The backends as plain records, ordered by id (O(n) copy).
    pub fn server_list(&self) -> Vec<proto::Server> {
        self.servers.values().map(|s| (**s).clone()).collect()
    }
}

/// All services at one revision.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSnapshot {
    /// The store's epoch.
    pub epoch: u64,
    /// The revision the snapshot was read at: watch from `revision + 1` to follow it.
    pub revision: u64,
    /// Every service, ordered by name.
    pub services: Vec<ServiceSnapshot>,
}

/// One committed write of one service: the difference between versions `base` and `version`.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Service name.
    pub service: String,
    /// The service's version before the write (0 when the write created the service).
    pub base: u64,
    /// The revision of this write, which is the service's version after it.
    pub version: u64,
    /// Backends added or changed, as whole records, ordered by id.
    pub upserts: Vec<proto::Server>,
    /// Ids among `upserts` that did not exist at `base`.
    pub created: Vec<String>,
    /// Ids of removed backends, ordered.
    pub removals: Vec<String>,
    /// Why backends were removed, by id: only ids among `removals` that were removed with a
    /// reason ([`Mutation::RemoveWithReason`], e.g. `lease expired`).
    pub removal_reasons: BTreeMap<String, String>,
    /// The new policy, when the write changed it (always set when the write created the service).
    pub policy: Option<proto::Policy>,
    /// The write removed the service ([`Mutation::RemoveService`]): `removals` lists the
    /// backends it still had, and the service does not exist after it. `base` may be 0 when
    /// the store cannot tell (etcd: the deleted key carries none).
    pub deleted: bool,
}

impl Change {
    /// Fixed per-change overhead counted by [`Change::approx_bytes`] (the struct, its `Arc`,
    /// vector and map headers).
    pub const OVERHEAD: usize = 256;

    /// About how many bytes of memory this change holds: its records as encoded, the ids and
    /// reasons, plus [`Change::OVERHEAD`]. What the store's change log and the cache's
    /// per-service history count against their byte bounds. O(records).
    pub fn approx_bytes(&self) -> usize {
        use prost::Message as _;
        let ids = |v: &[String]| v.iter().map(|s| s.len() + 24).sum::<usize>();
        Self::OVERHEAD
            + self.service.len()
            + self
                .upserts
                .iter()
                .map(|s| s.encoded_len() + 64)
                .sum::<usize>()
            + ids(&self.created)
            + ids(&self.removals)
            + self
                .removal_reasons
                .iter()
                .map(|(k, v)| k.len() + v.len() + 64)
                .sum::<usize>()
            + self.policy.as_ref().map_or(0, |p| p.encoded_len())
    }
}

/// What [`Store::watch`] yields.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// Committed changes, in revision order, each revision exactly once.
    Changes(Vec<Arc<Change>>),
    /// The history no longer reaches back to the requested revision: every change up to and
    /// including `compacted` may be missing. The stream ends after this event; re-read a
    /// snapshot and watch from its revision + 1.
    Compacted {
        /// The newest revision that is no longer remembered.
        compacted: u64,
    },
}

/// A coalesced delta between two versions of a service.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// The version the client holds.
    pub base: u64,
    /// The version after applying the delta.
    pub version: u64,
    /// Backends added or changed, as whole records, ordered by id.
    pub upserts: Vec<proto::Server>,
    /// Removed backend ids, ordered.
    pub removals: Vec<String>,
    /// Why backends were removed, by id: for ids among `removals`, the reason of the change
    /// that removed them last (absent when that removal had none).
    pub removal_reasons: BTreeMap<String, String>,
    /// The policy, when it changed between `base` and `version`.
    pub policy: Option<proto::Policy>,
}

impl Delta {
    /// Coalesces consecutive changes of one service (`changes[i].version ==
    /// changes[i+1].base`) into one delta from `base`. A backend created and removed within the
    /// range is left out entirely; a removed backend keeps the reason of its last removal.
    /// O(total records in `changes`).
    pub fn coalesce<'a>(base: u64, changes: impl IntoIterator<Item = &'a Change>) -> Self {
        // id -> (existed at base, latest record or None if removed)
        let mut touched: HashMap<&str, (bool, Option<&proto::Server>)> = HashMap::new();
        // id -> the reason of its latest removal, if that removal had one.
        let mut reasons: HashMap<&str, &str> = HashMap::new();
        let mut policy = None;
        let mut version = base;
        for c in changes {
            version = c.version;
            if c.policy.is_some() {
                policy = c.policy.clone();
            }
            for s in &c.upserts {
                let created = c.created.iter().any(|id| id == &s.server_id);
                touched
                    .entry(&s.server_id)
                    .and_modify(|e| e.1 = Some(s))
                    .or_insert((!created, Some(s)));
            }
            for id in &c.removals {
                touched
                    .entry(id)
                    .and_modify(|e| e.1 = None)
                    .or_insert((true, None));
                match c.removal_reasons.get(id) {
                    Some(r) => reasons.insert(id, r),
                    None => reasons.remove(id.as_str()),
                };
            }
        }
        let mut upserts: Vec<proto::Server> = Vec::new();
        let mut removals: Vec<String> = Vec::new();
        let mut removal_reasons = BTreeMap::new();
        for (id, (existed, last)) in touched {
            match last {
                Some(s) => upserts.push(s.clone()),
                None if existed => {
                    if let Some(r) = reasons.get(id) {
                        removal_reasons.insert(id.to_owned(), (*r).to_owned());
                    }
                    removals.push(id.to_owned());
                }
                None => {}
            }
        }
        upserts.sort_by(|a, b| a.server_id.cmp(&b.server_id));
        removals.sort();
        Self {
            base,
            version,
            upserts,
            removals,
            removal_reasons,
            policy,
        }
    }
}

/// Fields of a backend that an update may change; `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerPatch {
    /// New weight.
    pub weight: Option<u32>,
    /// New drain flag.
    pub draining: Option<bool>,
    /// New address.
    pub address: Option<String>,
    /// New hash key (empty resets to "use server_id").
    pub hash_key: Option<String>,
    /// New labels, replacing the old ones.
    pub metadata: Option<HashMap<String, String>>,
    /// New locality, replacing the old one (`Some(None)` or an all-empty one clears it).
    pub locality: Option<Option<proto::Locality>>,
    /// New failover priority.
    pub priority: Option<u32>,
    /// New verdict of the admin health source (`health_check_passed` / `_failed`).
    pub admin: Option<proto::Verdict>,
    /// New state of the active-probe health source.
    pub probe: Option<proto::SourceState>,
    /// New state of the outlier-detection health source.
    pub outlier: Option<proto::SourceState>,
    /// New state of the latency source (adaptive weights); a share of 100 (or 0) clears it.
    pub latency: Option<proto::LatencyState>,
}

/// One step of an atomic write to one service.
#[derive(Debug, Clone, PartialEq)]
pub enum Mutation {
    /// Registers a backend (`ALREADY_EXISTS` if the id is taken). Creates the service with the
    /// default policy if it does not exist. Its admin source starts `HEALTHY`, probe and outlier
    /// unset (eligible).
    Add(proto::Server),
    /// Declares a backend's configuration — address, weight, hash key, metadata, locality,
    /// priority, and its
    /// ownership (source, lease TTL, DNS name) — as a config file, a lease or DNS discovery
    /// does: creates the backend, or sets those fields and keeps its runtime state (drain flag,
    /// health sources). Creates the service if needed.
    Declare(proto::Server),
    /// Removes a backend (`NOT_FOUND` if unknown).
    Remove(String),
    /// Removes a backend like [`Mutation::Remove`], recording why (`lease expired`, …): the
    /// reason travels with the change ([`Change::removal_reasons`]) to every watcher.
    RemoveWithReason(String, String),
    /// Changes fields of a backend (`NOT_FOUND` if unknown).
    Update(String, ServerPatch),
    /// Sets the policy, creating the service if needed. `ALGORITHM_UNSPECIFIED` keeps the
    /// current algorithm (the default one for a new service).
    SetPolicy(proto::Policy),
    /// Removes the service itself — its policy (and so its health check) and, with `force`, its
    /// backends. Must be the only mutation of its batch. `NOT_FOUND` if the service does not
    /// exist; `FAILED_PRECONDITION` naming the count when it still has backends and `force` is
    /// not set. The removal frees its place in the service quota.
    RemoveService {
        /// Remove it even when it still has backends.
        force: bool,
    },
}

/// The outcome of an [`Store::apply`].
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The service's version after the batch (unchanged for a no-op).
    pub version: proto::Version,
    /// Whether the batch changed anything (a new revision was committed).
    pub changed: bool,
    /// The service's policy after the batch.
    pub policy: proto::Policy,
    /// The records the batch named, as stored after it, in mutation order (removed ones and
    /// policy steps omitted).
    pub servers: Vec<proto::Server>,
}

/// Versioned routing state. See the module docs for the contract.
///
/// Service names passed in are already resolved (never empty); records are validated again by
/// the implementation before anything is committed.
pub trait Store: Send + Sync + 'static {
    /// The identifier of this store's history (non-zero).
    fn epoch(&self) -> u64;

    /// Applies `mutations` to `service` atomically. With `expected_version`, applies only if the
    /// service's current version equals it (0: the service must not exist yet).
    fn apply(
        &self,
        service: String,
        mutations: Vec<Mutation>,
        expected_version: Option<u64>,
    ) -> BoxFuture<'_, Result<Applied, Error>>;

    /// The current state of a service, or `None` if it does not exist.
    fn get_service(&self, service: String)
        -> BoxFuture<'_, Result<Option<ServiceSnapshot>, Error>>;

    /// Every service at one revision.
    fn snapshot(&self) -> BoxFuture<'_, Result<StoreSnapshot, Error>>;

    /// Committed changes with revision ≥ `from_revision`, in revision order, as they happen.
    /// Ends after a [`WatchEvent::Compacted`], or with an error item if the store fails.
    fn watch(&self, from_revision: u64) -> BoxStream<'static, Result<WatchEvent, Error>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: &str) -> proto::Server {
        proto::Server {
            server_id: id.into(),
            address: "10.0.0.1:80".into(),
            weight: 1,
            ..Default::default()
        }
    }

    fn change(
        base: u64,
        version: u64,
        upserts: &[&str],
        created: &[&str],
        removals: &[&str],
    ) -> Change {
        Change {
            service: "s".into(),
            base,
            version,
            upserts: upserts.iter().map(|i| server(i)).collect(),
            created: created.iter().map(|s| s.to_string()).collect(),
            removals: removals.iter().map(|s| s.to_string()).collect(),
            removal_reasons: BTreeMap::new(),
            policy: None,
            deleted: false,
        }
    }

    #[test]
    fn coalesce_drops_created_then_removed() {
        let cs = [
            change(3, 7, &["a"], &["a"], &[]),
            change(7, 9, &["b"], &[], &[]),
            change(9, 14, &[], &[], &["a", "c"]),
        ];
        let d = Delta::coalesce(3, &cs);
        assert_eq!(d.base, 3);
        assert_eq!(d.version, 14);
        assert_eq!(d.upserts.len(), 1);
        assert_eq!(d.upserts[0].server_id, "b");
        assert_eq!(d.removals, vec!["c".to_string()]);
    }

    fn because(mut c: Change, id: &str, reason: &str) -> Change {
        c.removal_reasons.insert(id.into(), reason.into());
        c
    }

    #[test]
    fn coalesce_keeps_the_reason_of_the_last_removal() {
        let cs = [
            because(change(3, 4, &[], &[], &["a", "b"]), "a", "lease expired"),
            change(4, 5, &["a", "b"], &["a", "b"], &[]),
            because(change(5, 6, &[], &[], &["a", "b"]), "a", "removed"),
            change(6, 7, &["c"], &["c"], &[]),
            because(change(7, 8, &[], &[], &["d"]), "d", "lease expired"),
            change(8, 9, &["d"], &["d"], &[]),
        ];
        let d = Delta::coalesce(3, &cs);
        assert_eq!(d.removals, vec!["a".to_string(), "b".to_string()]);
        // `a`: its last removal's reason; `b`: its last removal had none; `d` came back.
        assert_eq!(
            d.removal_reasons,
            BTreeMap::from([("a".to_string(), "removed".to_string())])
        );
    }
}
