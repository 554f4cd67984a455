//! The in-memory [`Store`]: the embedded default of a single `dlbd`.
//!
//! All services live in one `parking_lot::Mutex<HashMap<..>>`. A mutex (not an `RwLock`) because
//! every operation is short (a map lookup plus at most one record clone per touched backend, or
//! one snapshot clone) and writes must be totally ordered with their publication on the change
//! feed: the [`Change`] is sent on the `broadcast` channel *while the lock is held*, so the feed
//! order is exactly the commit order. `broadcast::Sender::send` never blocks or awaits, and the
//! lock is never held across an `.await` (no method awaits anything).
//!
//! History: per service, the last `history_size` changes are kept in a `VecDeque`
//! (O(1) push/pop); [`Store::changes_since`] coalesces the suffix a client is missing in
//! O(changes × touched backends).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use dlb::model;
use dlb::proto;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use super::{
    Catchup, Change, Delta, PolicyWrite, ServerPatch, ServerWrite, ServiceSnapshot, Store,
};
use crate::Error;

/// Default number of changes kept per service for delta resumption.
pub const DEFAULT_HISTORY: usize = 1024;
/// Default capacity of the change feed (changes a watcher may fall behind before it lags).
pub const DEFAULT_FEED_CAPACITY: usize = 4096;

#[derive(Debug)]
struct ServiceEntry {
    version: u64,
    policy: proto::Policy,
    servers: BTreeMap<String, proto::Server>,
    history: VecDeque<Arc<Change>>,
}

impl ServiceEntry {
    fn snapshot(&self, name: &str, epoch: u64) -> ServiceSnapshot {
        ServiceSnapshot {
            name: name.to_owned(),
            version: proto::Version {
                epoch,
                version: self.version,
            },
            policy: self.policy,
            servers: self.servers.values().cloned().collect(),
        }
    }
}

/// An in-memory [`Store`] with a random epoch. See the module docs.
#[derive(Debug)]
pub struct MemoryStore {
    epoch: u64,
    history_size: usize,
    /// All services. See the module docs for why a plain mutex.
    services: Mutex<HashMap<String, ServiceEntry>>,
    /// The change feed; sent to while `services` is locked so that feed order = commit order.
    feed: broadcast::Sender<Arc<Change>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(DEFAULT_HISTORY, DEFAULT_FEED_CAPACITY)
    }
}

impl MemoryStore {
    /// An empty store keeping `history_size` changes per service, whose change feed holds
    /// `feed_capacity` changes per lagging watcher. The epoch is random and non-zero.
    pub fn new(history_size: usize, feed_capacity: usize) -> Self {
        let (feed, _) = broadcast::channel(feed_capacity.max(1));
        Self {
            epoch: fastrand::u64(1..),
            history_size: history_size.max(1),
            services: Mutex::new(HashMap::new()),
            feed,
        }
    }

    fn version(&self, version: u64) -> proto::Version {
        proto::Version {
            epoch: self.epoch,
            version,
        }
    }

    /// Records and publishes a change on `entry` (called with the lock held).
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &self,
        name: &str,
        entry: &mut ServiceEntry,
        upserts: Vec<proto::Server>,
        created: Vec<String>,
        removals: Vec<String>,
        policy: Option<proto::Policy>,
    ) -> u64 {
        let base = entry.version;
        entry.version += 1;
        let change = Arc::new(Change {
            service: name.to_owned(),
            epoch: self.epoch,
            base,
            version: entry.version,
            upserts,
            created,
            removals,
            policy,
            at: Instant::now(),
        });
        if entry.history.len() >= self.history_size {
            entry.history.pop_front();
        }
        entry.history.push_back(change.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.feed.send(change);
        entry.version
    }

    fn new_entry(policy: proto::Policy) -> ServiceEntry {
        ServiceEntry {
            version: 0,
            policy,
            servers: BTreeMap::new(),
            history: VecDeque::new(),
        }
    }

    fn create_service_sync(
        &self,
        service: &str,
        policy: proto::Policy,
        servers: Vec<proto::Server>,
    ) -> Result<proto::Version, Error> {
        model::validate_id("service", service)?;
        model::validate_policy(&policy)?;
        let mut map = BTreeMap::new();
        for s in servers {
            model::validate_server(&s)?;
            if map.contains_key(&s.server_id) {
                return Err(Error::AlreadyExists {
                    service: service.to_owned(),
                    server_id: s.server_id,
                });
            }
            map.insert(s.server_id.clone(), s);
        }
        let mut services = self.services.lock();
        if services.contains_key(service) {
            return Err(Error::ServiceExists(service.to_owned()));
        }
        let mut entry = Self::new_entry(policy);
        let created: Vec<String> = map.keys().cloned().collect();
        let upserts: Vec<proto::Server> = map.values().cloned().collect();
        entry.servers = map;
        let v = self.commit(
            service,
            &mut entry,
            upserts,
            created,
            Vec::new(),
            Some(policy),
        );
        services.insert(service.to_owned(), entry);
        Ok(self.version(v))
    }

    fn add_server_sync(&self, service: &str, server: proto::Server) -> Result<ServerWrite, Error> {
        model::validate_id("service", service)?;
        model::validate_server(&server)?;
        let mut services = self.services.lock();
        let is_new = !services.contains_key(service);
        if let Some(entry) = services.get(service) {
            if entry.servers.contains_key(&server.server_id) {
                return Err(Error::AlreadyExists {
                    service: service.to_owned(),
                    server_id: server.server_id,
                });
            }
        }
        let entry = services
            .entry(service.to_owned())
            .or_insert_with(|| Self::new_entry(model::default_policy()));
        entry
            .servers
            .insert(server.server_id.clone(), server.clone());
        let policy = is_new.then_some(entry.policy);
        let v = self.commit(
            service,
            entry,
            vec![server.clone()],
            vec![server.server_id.clone()],
            Vec::new(),
            policy,
        );
        Ok(ServerWrite {
            server,
            version: self.version(v),
            changed: true,
        })
    }

    fn remove_server_sync(&self, service: &str, server_id: &str) -> Result<proto::Version, Error> {
        let mut services = self.services.lock();
        let entry = services
            .get_mut(service)
            .ok_or_else(|| Error::ServiceNotFound(service.to_owned()))?;
        if entry.servers.remove(server_id).is_none() {
            return Err(Error::ServerNotFound {
                service: service.to_owned(),
                server_id: server_id.to_owned(),
            });
        }
        let v = self.commit(
            service,
            entry,
            Vec::new(),
            Vec::new(),
            vec![server_id.to_owned()],
            None,
        );
        Ok(self.version(v))
    }

    fn update_server_sync(
        &self,
        service: &str,
        server_id: &str,
        patch: ServerPatch,
    ) -> Result<ServerWrite, Error> {
        let mut services = self.services.lock();
        let entry = services
            .get_mut(service)
            .ok_or_else(|| Error::ServiceNotFound(service.to_owned()))?;
        let old = entry
            .servers
            .get(server_id)
            .ok_or_else(|| Error::ServerNotFound {
                service: service.to_owned(),
                server_id: server_id.to_owned(),
            })?;
        let mut new = old.clone();
        if let Some(w) = patch.weight {
            new.weight = w;
        }
        if let Some(d) = patch.draining {
            new.draining = d;
        }
        if let Some(a) = patch.address {
            new.address = a;
        }
        if let Some(h) = patch.hash_key {
            new.hash_key = h;
        }
        if let Some(m) = patch.metadata {
            new.metadata = m;
        }
        if let Some(h) = patch.health {
            new.health = h as i32;
        }
        model::validate_server(&new)?;
        if &new == old {
            return Ok(ServerWrite {
                server: new,
                version: self.version(entry.version),
                changed: false,
            });
        }
        entry.servers.insert(server_id.to_owned(), new.clone());
        let v = self.commit(
            service,
            entry,
            vec![new.clone()],
            Vec::new(),
            Vec::new(),
            None,
        );
        Ok(ServerWrite {
            server: new,
            version: self.version(v),
            changed: true,
        })
    }

    fn set_policy_sync(
        &self,
        service: &str,
        mut policy: proto::Policy,
    ) -> Result<PolicyWrite, Error> {
        model::validate_id("service", service)?;
        let mut services = self.services.lock();
        let current = services
            .get(service)
            .map_or_else(model::default_policy, |e| e.policy);
        if policy.algorithm == proto::Algorithm::Unspecified as i32 {
            policy.algorithm = current.algorithm;
        }
        model::validate_policy(&policy)?;
        let is_new = !services.contains_key(service);
        let entry = services
            .entry(service.to_owned())
            .or_insert_with(|| Self::new_entry(policy));
        if !is_new && entry.policy == policy {
            return Ok(PolicyWrite {
                policy,
                version: self.version(entry.version),
                changed: false,
            });
        }
        entry.policy = policy;
        let v = self.commit(
            service,
            entry,
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Some(policy),
        );
        Ok(PolicyWrite {
            policy,
            version: self.version(v),
            changed: true,
        })
    }

    fn changes_since_sync(&self, service: &str, known: Option<proto::Version>) -> Catchup {
        let services = self.services.lock();
        let Some(entry) = services.get(service) else {
            return Catchup::NotFound { epoch: self.epoch };
        };
        let full = || Catchup::Full(entry.snapshot(service, self.epoch));
        let Some(known) = known else {
            return full();
        };
        if known.epoch != self.epoch || known.version == 0 || known.version > entry.version {
            return full();
        }
        if known.version == entry.version {
            return Catchup::Delta(Delta {
                service: service.to_owned(),
                epoch: self.epoch,
                base: known.version,
                version: known.version,
                upserts: Vec::new(),
                removals: Vec::new(),
                policy: None,
                at: None,
            });
        }
        match entry.history.front() {
            Some(first) if first.base <= known.version => {
                let skip = (known.version - first.base) as usize;
                let missing: Vec<Arc<Change>> = entry.history.iter().skip(skip).cloned().collect();
                Catchup::Delta(Delta::coalesce(
                    service,
                    self.epoch,
                    known.version,
                    &missing,
                ))
            }
            _ => full(),
        }
    }
}

impl Store for MemoryStore {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn watch(&self) -> broadcast::Receiver<Arc<Change>> {
        self.feed.subscribe()
    }

    fn create_service(
        &self,
        service: String,
        policy: proto::Policy,
        servers: Vec<proto::Server>,
    ) -> BoxFuture<'_, Result<proto::Version, Error>> {
        Box::pin(async move { self.create_service_sync(&service, policy, servers) })
    }

    fn add_server(
        &self,
        service: String,
        server: proto::Server,
    ) -> BoxFuture<'_, Result<ServerWrite, Error>> {
        Box::pin(async move { self.add_server_sync(&service, server) })
    }

    fn remove_server(
        &self,
        service: String,
        server_id: String,
    ) -> BoxFuture<'_, Result<proto::Version, Error>> {
        Box::pin(async move { self.remove_server_sync(&service, &server_id) })
    }

    fn update_server(
        &self,
        service: String,
        server_id: String,
        patch: ServerPatch,
    ) -> BoxFuture<'_, Result<ServerWrite, Error>> {
        Box::pin(async move { self.update_server_sync(&service, &server_id, patch) })
    }

    fn set_policy(
        &self,
        service: String,
        policy: proto::Policy,
    ) -> BoxFuture<'_, Result<PolicyWrite, Error>> {
        Box::pin(async move { self.set_policy_sync(&service, policy) })
    }

    fn get_service(
        &self,
        service: String,
    ) -> BoxFuture<'_, Result<Option<ServiceSnapshot>, Error>> {
        Box::pin(async move {
            Ok(self
                .services
                .lock()
                .get(&service)
                .map(|e| e.snapshot(&service, self.epoch)))
        })
    }

    fn list_services(&self) -> BoxFuture<'_, Result<Vec<ServiceSnapshot>, Error>> {
        Box::pin(async move {
            let services = self.services.lock();
            let mut all: Vec<ServiceSnapshot> = services
                .iter()
                .map(|(n, e)| e.snapshot(n, self.epoch))
                .collect();
            drop(services);
            all.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(all)
        })
    }

    fn changes_since(
        &self,
        service: String,
        known: Option<proto::Version>,
    ) -> BoxFuture<'_, Result<Catchup, Error>> {
        Box::pin(async move { Ok(self.changes_since_sync(&service, known)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: &str) -> proto::Server {
        proto::Server {
            server_id: id.into(),
            address: "10.0.0.1:80".into(),
            weight: 1,
            health: proto::HealthStatus::Healthy as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn versions_history_and_noops() {
        let store = MemoryStore::new(2, 16);
        assert_ne!(store.epoch(), 0);
        let mut feed = store.watch();
        let w = store.add_server("s".into(), server("a")).await.unwrap();
        assert_eq!(w.version.version, 1);
        let c = feed.recv().await.unwrap();
        assert_eq!((c.base, c.version), (0, 1));
        assert!(c.policy.is_some());
        // no-op: already healthy
        let patch = ServerPatch {
            health: Some(proto::HealthStatus::Healthy),
            ..Default::default()
        };
        let w = store
            .update_server("s".into(), "a".into(), patch)
            .await
            .unwrap();
        assert!(!w.changed);
        assert_eq!(w.version.version, 1);
        assert!(feed.try_recv().is_err());
        store.add_server("s".into(), server("b")).await.unwrap();
        store.add_server("s".into(), server("c")).await.unwrap();
        store.remove_server("s".into(), "a".into()).await.unwrap();
        let known = |v| {
            Some(proto::Version {
                epoch: store.epoch(),
                version: v,
            })
        };
        match store.changes_since("s".into(), known(2)).await.unwrap() {
            Catchup::Delta(d) => {
                assert_eq!((d.base, d.version), (2, 4));
                assert_eq!(d.upserts.len(), 1);
                assert_eq!(d.removals, vec!["a".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        // too old for a history of 2
        assert!(matches!(
            store.changes_since("s".into(), known(1)).await.unwrap(),
            Catchup::Full(_)
        ));
        let wrong = Some(proto::Version {
            epoch: store.epoch() ^ 1,
            version: 3,
        });
        assert!(matches!(
            store.changes_since("s".into(), wrong).await.unwrap(),
            Catchup::Full(_)
        ));
        assert!(matches!(
            store.changes_since("nope".into(), None).await.unwrap(),
            Catchup::NotFound { .. }
        ));
        // rejected writes change nothing
        assert!(store.add_server("s".into(), server("b")).await.is_err());
        let mut bad = server("x");
        bad.weight = 0;
        assert!(store.add_server("s".into(), bad).await.is_err());
        let snap = store.get_service("s".into()).await.unwrap().unwrap();
        assert_eq!(snap.version.version, 4);
        assert_eq!(snap.servers.len(), 2);
    }
}
