//! Routing state: the [`Store`] trait and the types it exchanges.
//!
//! The store owns the versioned state of every service (policy + backends) and is the single
//! source of truth that the Registry writes and the Discovery sessions read. Its contract:
//!
//! * every write that changes a service bumps that service's version by exactly one and publishes
//!   one [`Change`] on the change feed ([`Store::watch`]), in version order;
//! * a write that changes nothing (a no-op) neither bumps nor publishes;
//! * a rejected write changes nothing;
//! * every stored record passes `dlb::model` validation (the store re-validates the final record,
//!   so every entry point is covered, not only the gRPC one);
//! * per service, a bounded history of recent changes lets a client that holds `(epoch, version)`
//!   resume with a delta ([`Store::changes_since`]); an unknown epoch or a version older than the
//!   history yields a full snapshot.
//!
//! **Async or sync trait?** The trait is *async* and object safe: every method that may touch
//! the network in a future etcd implementation returns a [`BoxFuture`]. The in-memory
//! implementation ([`MemoryStore`]) does its work synchronously under a short `parking_lot`
//! lock inside the future and never holds the lock across an `.await`. The change feed is a
//! `tokio::sync::broadcast` channel: writers never wait for readers, and a reader that falls
//! more than the channel's capacity behind gets `Lagged` and resynchronises from
//! [`Store::changes_since`].

pub mod memory;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use dlb::proto;
use futures::future::BoxFuture;
use tokio::sync::broadcast;

pub use memory::MemoryStore;

use crate::Error;

/// The current state of one service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSnapshot {
    /// Service name.
    pub name: String,
    /// The state's version (epoch of the store, per-service counter).
    pub version: proto::Version,
    /// The service's policy.
    pub policy: proto::Policy,
    /// Backends, ordered by `server_id`.
    pub servers: Vec<proto::Server>,
}

impl ServiceSnapshot {
    /// Number of backends eligible for traffic (healthy and not draining).
    pub fn eligible(&self) -> usize {
        self.servers
            .iter()
            .filter(|s| dlb::model::is_eligible(s))
            .count()
    }
}

/// One committed write of one service: the difference between `base` and `version`.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Service name.
    pub service: String,
    /// Store epoch.
    pub epoch: u64,
    /// Version before the write (0 when the write created the service).
    pub base: u64,
    /// Version after the write (`base + 1`).
    pub version: u64,
    /// Backends added or changed, as whole records.
    pub upserts: Vec<proto::Server>,
    /// Ids among `upserts` that did not exist at `base`.
    pub created: Vec<String>,
    /// Ids of removed backends.
    pub removals: Vec<String>,
    /// The new policy, when the write changed it (always set when the write created the service).
    pub policy: Option<proto::Policy>,
    /// When the write was committed (for the push-latency histogram).
    pub at: Instant,
}

/// What a client holding some version of a service must receive to be up to date.
#[derive(Debug, Clone, PartialEq)]
pub enum Catchup {
    /// Replace everything with this snapshot.
    Full(ServiceSnapshot),
    /// Apply this delta (possibly empty when the client is already current). Several store
    /// versions may be coalesced into one delta.
    Delta(Delta),
    /// The service does not exist.
    NotFound {
        /// The store's epoch.
        epoch: u64,
    },
}

/// A coalesced delta between two versions of a service.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// Service name.
    pub service: String,
    /// Store epoch.
    pub epoch: u64,
    /// The version the client holds.
    pub base: u64,
    /// The version after applying the delta.
    pub version: u64,
    /// Backends added or changed, as whole records, ordered by id.
    pub upserts: Vec<proto::Server>,
    /// Removed backend ids, ordered.
    pub removals: Vec<String>,
    /// The policy, when it changed between `base` and `version`.
    pub policy: Option<proto::Policy>,
    /// Commit time of the newest change included (None for an empty delta).
    pub at: Option<Instant>,
}

impl Delta {
    /// Coalesces consecutive changes (`changes[i].version == changes[i+1].base`) into one
    /// delta from `base`. A backend created and removed within the range is left out entirely.
    pub fn coalesce(service: &str, epoch: u64, base: u64, changes: &[Arc<Change>]) -> Self {
        // id -> (existed at base, latest record or None if removed)
        let mut touched: HashMap<&str, (bool, Option<&proto::Server>)> = HashMap::new();
        let mut policy = None;
        let mut version = base;
        let mut at = None;
        for c in changes {
            version = c.version;
            at = Some(c.at);
            if c.policy.is_some() {
                policy = c.policy;
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
            }
        }
        let mut upserts: Vec<proto::Server> = Vec::new();
        let mut removals: Vec<String> = Vec::new();
        for (id, (existed, last)) in touched {
            match last {
                Some(s) => upserts.push(s.clone()),
                None if existed => removals.push(id.to_owned()),
                None => {}
            }
        }
        upserts.sort_by(|a, b| a.server_id.cmp(&b.server_id));
        removals.sort();
        Self {
            service: service.to_owned(),
            epoch,
            base,
            version,
            upserts,
            removals,
            policy,
            at,
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
    /// New health.
    pub health: Option<proto::HealthStatus>,
}

/// The result of a write to one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerWrite {
    /// The backend as stored after the write.
    pub server: proto::Server,
    /// The service version after the write (unchanged for a no-op).
    pub version: proto::Version,
    /// Whether the write changed anything.
    pub changed: bool,
}

/// The result of a policy write.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyWrite {
    /// The policy as stored.
    pub policy: proto::Policy,
    /// The service version after the write.
    pub version: proto::Version,
    /// Whether the write changed anything.
    pub changed: bool,
}

/// Versioned routing state. See the module docs for the contract.
///
/// Service names passed in are already resolved (never empty); records are validated again by
/// the implementation before anything is committed.
pub trait Store: Send + Sync + 'static {
    /// The random, non-zero identifier of this store incarnation.
    fn epoch(&self) -> u64;

    /// Subscribes to the change feed. Changes of one service arrive in version order. A
    /// receiver that lags gets `RecvError::Lagged` and must resynchronise with
    /// [`Store::changes_since`].
    fn watch(&self) -> broadcast::Receiver<Arc<Change>>;

    /// Creates a service with a policy and backends (used to load the configuration).
    /// `ALREADY_EXISTS`-style error if it exists.
    fn create_service(
        &self,
        service: String,
        policy: proto::Policy,
        servers: Vec<proto::Server>,
    ) -> BoxFuture<'_, Result<proto::Version, Error>>;

    /// Adds a backend, creating the service (with the default policy) if needed.
    fn add_server(
        &self,
        service: String,
        server: proto::Server,
    ) -> BoxFuture<'_, Result<ServerWrite, Error>>;

    /// Removes a backend; returns the version after the removal.
    fn remove_server(
        &self,
        service: String,
        server_id: String,
    ) -> BoxFuture<'_, Result<proto::Version, Error>>;

    /// Changes fields of a backend.
    fn update_server(
        &self,
        service: String,
        server_id: String,
        patch: ServerPatch,
    ) -> BoxFuture<'_, Result<ServerWrite, Error>>;

    /// Sets a service's policy, creating the service if needed. `ALGORITHM_UNSPECIFIED` keeps
    /// the current algorithm (the default one for a new service).
    fn set_policy(
        &self,
        service: String,
        policy: proto::Policy,
    ) -> BoxFuture<'_, Result<PolicyWrite, Error>>;

    /// The current state of a service, or `None` if it does not exist.
    fn get_service(&self, service: String)
        -> BoxFuture<'_, Result<Option<ServiceSnapshot>, Error>>;

    /// The current state of every service, ordered by name.
    fn list_services(&self) -> BoxFuture<'_, Result<Vec<ServiceSnapshot>, Error>>;

    /// What a client holding `known` (epoch, version; `None` for nothing) must receive.
    fn changes_since(
        &self,
        service: String,
        known: Option<proto::Version>,
    ) -> BoxFuture<'_, Result<Catchup, Error>>;
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

    fn change(base: u64, upserts: &[&str], created: &[&str], removals: &[&str]) -> Arc<Change> {
        Arc::new(Change {
            service: "s".into(),
            epoch: 7,
            base,
            version: base + 1,
            upserts: upserts.iter().map(|i| server(i)).collect(),
            created: created.iter().map(|s| s.to_string()).collect(),
            removals: removals.iter().map(|s| s.to_string()).collect(),
            policy: None,
            at: Instant::now(),
        })
    }

    #[test]
    fn coalesce_drops_created_then_removed() {
        let cs = [
            change(3, &["a"], &["a"], &[]),
            change(4, &["b"], &[], &[]),
            change(5, &[], &[], &["a", "c"]),
        ];
        let d = Delta::coalesce("s", 7, 3, &cs);
        assert_eq!(d.base, 3);
        assert_eq!(d.version, 6);
        assert_eq!(d.upserts.len(), 1);
        assert_eq!(d.upserts[0].server_id, "b");
        assert_eq!(d.removals, vec!["c".to_string()]);
    }
}
