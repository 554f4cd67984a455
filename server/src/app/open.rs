//! Opening a deployment before anything is served: the store and the replica set
//! ([`Opened`]), the configured services applied to the store ([`apply_config`]), and the lease
//! keeper ([`start_leases`]).

use std::sync::Arc;
use std::time::Duration;

use crate::config::{EtcdConfig, ServerConfig, StoreConfig};
use crate::membership::{self, leases};
use crate::shutdown::Shutdown;
use crate::store::{self, EmbeddedStore, MemoryStore, Mutation, Store};
use crate::{replicas, Error};

/// The store and the replica set of a deployment.
pub(super) struct Opened {
    pub store: Arc<dyn Store>,
    pub coordination: Arc<dyn replicas::Coordination>,
    /// What the leader's singleton jobs write through (fenced on etcd, `store` on one node).
    pub leader_store: Arc<dyn Store>,
    /// Self-registration leases kept in etcd (`None`: the in-process [`leases::LeaseManager`]).
    #[cfg(feature = "etcd")]
    pub etcd_leases: Option<leases::etcd::EtcdLeases>,
}

impl Opened {
    /// A replica alone on `store`.
    pub fn single(store: Arc<dyn Store>, id: &str) -> Self {
        Self {
            leader_store: store.clone(),
            store,
            coordination: Arc::new(replicas::Single::new(id)),
            #[cfg(feature = "etcd")]
            etcd_leases: None,
        }
    }

    /// Opens the configured store ([`ServerConfig::store`]: in memory, a new random epoch, the
    /// embedded store in a data directory, or etcd with its replica set, whose tasks are spawned
    /// through `shutdown`) as replica `id`.
    pub async fn open(config: &ServerConfig, id: &str, shutdown: &Shutdown) -> Result<Self, Error> {
        Ok(match &config.store {
            StoreConfig::Memory => {
                let store = MemoryStore::new(config.store_history)
                    .with_history_bytes(config.store_history_bytes);
                Self::single(Arc::new(store), id)
            }
            StoreConfig::Embedded(dir) => {
                let dir = dir.clone();
                let history = config.store_history;
                let store = tokio::task::spawn_blocking(move || {
                    EmbeddedStore::open_with_history(dir, history)
                })
                .await
                .map_err(|e| Error::Task(e.to_string()))??;
                let store = store.with_history_bytes(config.store_history_bytes);
                Self::single(Arc::new(store), id)
            }
            StoreConfig::Etcd(etcd) => open_etcd(etcd, id, config.replica_ttl, shutdown).await?,
        })
    }
}

#[cfg(feature = "etcd")]
async fn open_etcd(
    config: &EtcdConfig,
    id: &str,
    ttl: Duration,
    shutdown: &Shutdown,
) -> Result<Opened, Error> {
    let store = store::EtcdStore::connect(config).await?;
    let members = replicas::etcd::EtcdCoordination::start(config, id, ttl, shutdown).await?;
    let leases = leases::etcd::EtcdLeases::connect(config).await?;
    let leader_store = Arc::new(store.fenced(replicas::Coordination::leadership(&*members)));
    Ok(Opened {
        store: Arc::new(store),
        coordination: members,
        leader_store,
        etcd_leases: Some(leases),
    })
}

#[cfg(not(feature = "etcd"))]
async fn open_etcd(_: &EtcdConfig, _: &str, _: Duration, _: &Shutdown) -> Result<Opened, Error> {
    // A configuration error, not a storage one: no retry can make this build talk to etcd, and
    // callers (dlbd among them) retry storage errors of an etcd store.
    Err(Error::Invalid(dlb::model::ValidationError::new(
        "store",
        "etcd",
        "this build has no etcd store: rebuild dlb-server (dlbd) with `--features etcd`",
    )))
}

/// Applies the configured services to the store as declarative writes. A service that lists a
/// policy or backends gets the file's policy and each listed backend's configuration (address,
/// weight, hash key, metadata) — a no-op when the store already matches; backends registered
/// through the API and runtime state (drain, health sources) are kept. A service listed with
/// nothing to declare (like the implicit `default`) is only created when missing.
pub(super) async fn apply_config(config: &ServerConfig, store: &dyn Store) -> Result<(), Error> {
    for svc in &config.services {
        let declares = !svc.backends.is_empty() || svc.policy != dlb::model::default_policy();
        if !declares {
            let create = vec![Mutation::SetPolicy(svc.policy.clone())];
            match store.apply(svc.name.clone(), create, Some(0)).await {
                Ok(_) | Err(Error::VersionMismatch { .. }) => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        let mut mutations = vec![Mutation::SetPolicy(svc.policy.clone())];
        mutations.extend(svc.backends.iter().cloned().map(Mutation::Declare));
        let applied = store.apply(svc.name.clone(), mutations, None).await?;
        if applied.changed {
            tracing::info!(service = %svc.name, version = applied.version.version, "configuration applied");
        }
    }
    Ok(())
}

/// Starts the lease keeper, spawned through `shutdown`: leases in etcd with expiry on the
/// leader, or the in-process [`leases::LeaseManager`].
pub(super) fn start_leases(
    opened: &Opened,
    metrics: &membership::MembershipMetrics,
    initial: &store::StoreSnapshot,
    shutdown: &Shutdown,
) -> Arc<dyn leases::Leases> {
    #[cfg(feature = "etcd")]
    if let Some(etcd) = &opened.etcd_leases {
        leases::etcd::start_expiry(
            etcd.clone(),
            opened.leader_store.clone(),
            metrics.clone(),
            opened.coordination.leadership(),
            shutdown,
        );
        return Arc::new(etcd.clone());
    }
    let (manager, _task) =
        leases::LeaseManager::start(opened.store.clone(), metrics.clone(), initial, shutdown);
    Arc::new(manager)
}
