//! The in-process store engine shared by [`MemoryStore`](super::MemoryStore) and
//! [`EmbeddedStore`](super::EmbeddedStore): the one implementation of the write semantics
//! (batches, compare-and-set, no-ops, validation) and of the watch history.
//!
//! State lives in RAM: per service its version, policy and a persistent map of records
//! ([`Servers`]), plus a bounded log of the last `log_capacity` changes across all services for
//! [`Store::watch`](super::Store::watch). An optional [`Persist`] makes each batch durable
//! *before* it is installed and published, so a crash never publishes what the disk lost.
//!
//! Sync primitives: `writer` (a `parking_lot::Mutex<()>`) serialises writers end to end (plan,
//! persist, install), so revisions are assigned in commit order without holding the state lock
//! during disk I/O; `state` (a `parking_lot::Mutex`) guards the maps and the log and is held only
//! for map operations and O(1) clones — readers never wait for a disk write. The newest
//! revision is broadcast on a `tokio::sync::watch` channel that watch streams await; it is
//! updated after the log, so a woken stream always finds its changes. No lock is held across an
//! `.await`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use dlb::{model, proto, sources};
use futures::stream::{self, BoxStream, StreamExt};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::{
    Applied, Change, Mutation, ServerPatch, Servers, ServiceSnapshot, StoreSnapshot, WatchEvent,
};
use crate::Error;

/// Most changes one [`WatchEvent::Changes`] carries.
const MAX_BATCH: usize = 1024;

/// The state of one service.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServiceState {
    /// Revision of the last change.
    pub version: u64,
    /// The policy.
    pub policy: proto::Policy,
    /// The records.
    pub servers: Servers,
    /// What the records add to an encoded full snapshot (`dlb::model::snapshot_bytes`, summed),
    /// kept up to date on every write so the size limit costs O(changed records).
    pub bytes: usize,
}

impl ServiceState {
    /// A state holding `servers`, with its size computed (O(n)).
    pub fn new(version: u64, policy: proto::Policy, servers: Servers) -> Self {
        let bytes = servers.values().map(|s| model::snapshot_bytes(s)).sum();
        Self {
            version,
            policy,
            servers,
            bytes,
        }
    }
}

/// Makes committed batches durable.
pub(crate) trait Persist: Send + Sync + 'static {
    /// Stores the batch `change` (revision `change.version`) whose result is `state`. Called
    /// with writers serialised, before the batch is visible; an error aborts the batch.
    fn commit(&self, service: &str, state: &ServiceState, change: &Change) -> Result<(), Error>;
}

struct State {
    revision: u64,
    /// Every change with a revision ≤ this may be missing from `log`.
    compacted: u64,
    services: BTreeMap<String, ServiceState>,
    log: VecDeque<Arc<Change>>,
}

/// See the module docs.
pub(crate) struct Engine {
    epoch: u64,
    log_capacity: usize,
    writer: Mutex<()>,
    state: Mutex<State>,
    revision: watch::Sender<u64>,
    persist: Option<Box<dyn Persist>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("epoch", &self.epoch)
            .field("revision", &*self.revision.borrow())
            .field("durable", &self.persist.is_some())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine at `revision` holding `services`, remembering no change before it.
    pub fn new(
        epoch: u64,
        revision: u64,
        services: BTreeMap<String, ServiceState>,
        log_capacity: usize,
        persist: Option<Box<dyn Persist>>,
    ) -> Self {
        Self {
            epoch,
            log_capacity: log_capacity.max(1),
            writer: Mutex::new(()),
            state: Mutex::new(State {
                revision,
                compacted: revision,
                services,
                log: VecDeque::new(),
            }),
            revision: watch::Sender::new(revision),
            persist,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn version(&self, version: u64) -> proto::Version {
        proto::Version {
            epoch: self.epoch,
            version,
        }
    }

    /// Applies a batch. Blocking when the engine persists (call it off the async workers).
    pub fn apply(
        &self,
        service: &str,
        mutations: Vec<Mutation>,
        expected_version: Option<u64>,
    ) -> Result<Applied, Error> {
        model::validate_id("service", service)?;
        let _writer = self.writer.lock();
        let current = self.state.lock().services.get(service).cloned();
        let current_version = current.as_ref().map_or(0, |s| s.version);
        if let Some(expected) = expected_version {
            if expected != current_version {
                return Err(Error::VersionMismatch {
                    service: service.to_owned(),
                    expected,
                    current: current_version,
                });
            }
        }
        let plan = plan(
            service,
            current.as_ref(),
            &mutations,
            dlb::slow_start::now_ms(),
        )?;
        if current.is_none() && plan.change.is_some() {
            let services = self.state.lock().services.len();
            if services >= model::MAX_SERVICES {
                return Err(Error::ResourceExhausted(format!(
                    "the store holds {services} services; at most {} are allowed",
                    model::MAX_SERVICES
                )));
            }
        }
        let Some(mut change) = plan.change else {
            let state = current.unwrap_or(plan.state);
            return Ok(Applied {
                version: self.version(state.version),
                changed: false,
                policy: state.policy,
                servers: plan.named,
            });
        };
        let revision = self.state.lock().revision + 1;
        change.version = revision;
        let mut state = plan.state;
        state.version = revision;
        if let Some(p) = &self.persist {
            p.commit(service, &state, &change)?;
        }
        let policy = state.policy.clone();
        {
            let mut st = self.state.lock();
            st.revision = revision;
            st.services.insert(service.to_owned(), state);
            if st.log.len() >= self.log_capacity {
                if let Some(old) = st.log.pop_front() {
                    st.compacted = old.version;
                }
            }
            st.log.push_back(Arc::new(change));
        }
        self.revision.send_replace(revision);
        Ok(Applied {
            version: self.version(revision),
            changed: true,
            policy,
            servers: plan.named,
        })
    }

    pub fn get_service(&self, service: &str) -> Option<ServiceSnapshot> {
        let st = self.state.lock();
        st.services
            .get(service)
            .map(|s| self.snapshot_of(service, s))
    }

    fn snapshot_of(&self, name: &str, s: &ServiceState) -> ServiceSnapshot {
        ServiceSnapshot {
            name: name.to_owned(),
            version: self.version(s.version),
            policy: s.policy.clone(),
            servers: s.servers.clone(),
        }
    }

    pub fn snapshot(&self) -> StoreSnapshot {
        let st = self.state.lock();
        StoreSnapshot {
            epoch: self.epoch,
            revision: st.revision,
            services: st
                .services
                .iter()
                .map(|(name, s)| self.snapshot_of(name, s))
                .collect(),
        }
    }

    /// Changes from `next` on that are in the log, or `Compacted`.
    fn read_log(&self, next: u64) -> Option<WatchEvent> {
        let st = self.state.lock();
        if next <= st.compacted {
            return Some(WatchEvent::Compacted {
                compacted: st.compacted,
            });
        }
        if next > st.revision {
            return None;
        }
        // Revisions in the log are consecutive: the change at `next` is at a computable index.
        let first = st.log.front()?.version;
        let skip = usize::try_from(next.saturating_sub(first)).unwrap_or(usize::MAX);
        let batch: Vec<Arc<Change>> = st.log.iter().skip(skip).take(MAX_BATCH).cloned().collect();
        (!batch.is_empty()).then_some(WatchEvent::Changes(batch))
    }

    pub fn watch(
        self: &Arc<Self>,
        from_revision: u64,
    ) -> BoxStream<'static, Result<WatchEvent, Error>> {
        let engine = self.clone();
        let rx = self.revision.subscribe();
        let start = from_revision.max(1);
        stream::unfold(
            (engine, rx, start, false),
            |(engine, mut rx, next, done)| async move {
                if done {
                    return None;
                }
                loop {
                    // Mark the current revision seen *before* reading the log, so a commit
                    // after the read always wakes us.
                    rx.borrow_and_update();
                    match engine.read_log(next) {
                        Some(WatchEvent::Changes(batch)) => {
                            let after = batch.last().map_or(next, |c| c.version + 1);
                            return Some((
                                Ok(WatchEvent::Changes(batch)),
                                (engine, rx, after, false),
                            ));
                        }
                        Some(compacted) => return Some((Ok(compacted), (engine, rx, next, true))),
                        None => {
                            if rx.changed().await.is_err() {
                                return None;
                            }
                        }
                    }
                }
            },
        )
        .boxed()
    }
}

/// What a batch does to one service.
struct Plan {
    /// The service after the batch (version not yet assigned).
    state: ServiceState,
    /// The change, `None` for a no-op.
    change: Option<Change>,
    /// The records the mutations named, after the batch.
    named: Vec<proto::Server>,
}

/// The sources of a new backend: the operator registered it, so admin says healthy (the seed's
/// "a new backend is healthy"; `health_check_passed` on it is a no-op); probe and outlier have
/// not spoken.
fn new_sources() -> proto::HealthSources {
    proto::HealthSources {
        admin: proto::Verdict::Healthy as i32,
        probe: None,
        outlier: None,
        latency: None,
    }
}

/// Stamps derived fields (and `ready_since_ms` from the record it replaces, `old`, at `now_ms`)
/// and validates a record about to be stored.
fn finish(
    mut server: proto::Server,
    old: Option<&proto::Server>,
    now_ms: u64,
) -> Result<proto::Server, Error> {
    sources::stamp(&mut server);
    dlb::slow_start::stamp_ready_since(old, &mut server, now_ms);
    model::validate_server(&server)?;
    Ok(server)
}

fn patch_record(
    old: &proto::Server,
    patch: &ServerPatch,
    now_ms: u64,
) -> Result<proto::Server, Error> {
    let mut new = old.clone();
    if let Some(w) = patch.weight {
        new.weight = w;
    }
    if let Some(d) = patch.draining {
        new.draining = d;
    }
    if let Some(a) = &patch.address {
        new.address.clone_from(a);
    }
    if let Some(h) = &patch.hash_key {
        new.hash_key.clone_from(h);
    }
    if let Some(m) = &patch.metadata {
        new.metadata.clone_from(m);
    }
    let sources = new.sources.get_or_insert_with(Default::default);
    if let Some(v) = patch.admin {
        sources.admin = v as i32;
    }
    if let Some(p) = &patch.probe {
        sources.probe = Some(p.clone());
    }
    if let Some(o) = &patch.outlier {
        sources.outlier = Some(o.clone());
    }
    if let Some(l) = &patch.latency {
        // Full weight (100, or 0) clears the source: nothing limits the backend.
        sources.latency = (1..100).contains(&l.weight_percent).then(|| l.clone());
    }
    finish(new, Some(old), now_ms)
}

/// Computes the effect of `mutations` on `current` at wall-clock `now_ms` (pure; O(mutations ×
/// log n)).
fn plan(
    service: &str,
    current: Option<&ServiceState>,
    mutations: &[Mutation],
    now_ms: u64,
) -> Result<Plan, Error> {
    let mut state = current
        .cloned()
        .unwrap_or_else(|| ServiceState::new(0, model::default_policy(), Servers::new()));
    let exists = current.is_some();
    let mut created_service = false;
    let mut touched: BTreeSet<Arc<str>> = BTreeSet::new();
    let mut named: Vec<Arc<str>> = Vec::new();
    // The reason of each id's latest removal in this batch, when it had one.
    let mut reasons: BTreeMap<Arc<str>, String> = BTreeMap::new();
    let not_found = || Error::ServiceNotFound(service.to_owned());
    let server_not_found = |id: &str| Error::ServerNotFound {
        service: service.to_owned(),
        server_id: id.to_owned(),
    };
    for m in mutations {
        match m {
            Mutation::Add(server) => {
                let id: Arc<str> = server.server_id.as_str().into();
                if state.servers.contains_key(&id) {
                    return Err(Error::AlreadyExists {
                        service: service.to_owned(),
                        server_id: server.server_id.clone(),
                    });
                }
                let record = finish(
                    proto::Server {
                        health: 0,
                        reason: String::new(),
                        effective_weight: 0,
                        sources: Some(new_sources()),
                        ..server.clone()
                    },
                    None,
                    now_ms,
                )?;
                state.servers.insert(id.clone(), Arc::new(record));
                created_service |= !exists;
                touched.insert(id.clone());
                named.push(id);
            }
            Mutation::Declare(server) => {
                let id: Arc<str> = server.server_id.as_str().into();
                let record = match state.servers.get(&id) {
                    Some(old) => finish(
                        proto::Server {
                            address: server.address.clone(),
                            weight: server.weight,
                            hash_key: server.hash_key.clone(),
                            metadata: server.metadata.clone(),
                            // Ownership is declared too: a lease or DNS record declared by the
                            // config file becomes API-owned, a re-register updates its TTL.
                            source: server.source,
                            lease_ttl_seconds: server.lease_ttl_seconds,
                            dns_name: server.dns_name.clone(),
                            ..(**old).clone()
                        },
                        Some(old),
                        now_ms,
                    )?,
                    None => finish(
                        proto::Server {
                            health: 0,
                            reason: String::new(),
                            effective_weight: 0,
                            sources: Some(new_sources()),
                            ..server.clone()
                        },
                        None,
                        now_ms,
                    )?,
                };
                state.servers.insert(id.clone(), Arc::new(record));
                created_service |= !exists;
                touched.insert(id.clone());
                named.push(id);
            }
            Mutation::Remove(id) | Mutation::RemoveWithReason(id, _) => {
                if !exists && !created_service {
                    return Err(not_found());
                }
                let id: Arc<str> = id.as_str().into();
                if state.servers.remove(&id).is_none() {
                    return Err(server_not_found(&id));
                }
                match m {
                    Mutation::RemoveWithReason(_, reason) => {
                        reasons.insert(id.clone(), reason.clone())
                    }
                    _ => reasons.remove(&id),
                };
                touched.insert(id);
            }
            Mutation::Update(id, patch) => {
                if !exists && !created_service {
                    return Err(not_found());
                }
                let id: Arc<str> = id.as_str().into();
                let old = state
                    .servers
                    .get(&id)
                    .ok_or_else(|| server_not_found(&id))?;
                let new = patch_record(old, patch, now_ms)?;
                state.servers.insert(id.clone(), Arc::new(new));
                touched.insert(id.clone());
                named.push(id);
            }
            Mutation::SetPolicy(policy) => {
                let mut policy = policy.clone();
                if policy.algorithm == proto::Algorithm::Unspecified as i32 {
                    policy.algorithm = state.policy.algorithm;
                }
                model::validate_policy(&policy)?;
                state.policy = policy;
                created_service |= !exists;
            }
        }
    }
    let named: Vec<proto::Server> = named
        .iter()
        .filter_map(|id| state.servers.get(id).map(|s| (**s).clone()))
        .collect();
    let empty = Servers::new();
    let before = current.map_or(&empty, |c| &c.servers);
    // Quotas, in O(touched records): the backend count and the encoded snapshot size.
    if state.servers.len() > model::MAX_BACKENDS_PER_SERVICE && state.servers.len() > before.len() {
        return Err(Error::ResourceExhausted(format!(
            "service {service:?} would have {} backends; at most {} are allowed",
            state.servers.len(),
            model::MAX_BACKENDS_PER_SERVICE
        )));
    }
    let mut bytes = current.map_or(0, |c| c.bytes);
    for id in &touched {
        if let Some(old) = before.get(id) {
            bytes = bytes.saturating_sub(model::snapshot_bytes(old));
        }
        if let Some(new) = state.servers.get(id) {
            bytes = bytes.saturating_add(model::snapshot_bytes(new));
        }
    }
    state.bytes = bytes;
    if bytes > model::MAX_SNAPSHOT_BYTES && bytes > current.map_or(0, |c| c.bytes) {
        return Err(Error::ResourceExhausted(format!(
            "service {service:?} would encode to {bytes} bytes; a service's snapshot may take at \
             most {} bytes (the message limit)",
            model::MAX_SNAPSHOT_BYTES
        )));
    }
    let mut upserts = Vec::new();
    let mut created = Vec::new();
    let mut removals = Vec::new();
    let mut removal_reasons = BTreeMap::new();
    for id in &touched {
        match (before.get(id), state.servers.get(id)) {
            (Some(a), Some(b)) if a == b => {}
            (old, Some(b)) => {
                if old.is_none() {
                    created.push(id.to_string());
                }
                upserts.push((**b).clone());
            }
            (Some(_), None) => {
                if let Some(r) = reasons.remove(id) {
                    removal_reasons.insert(id.to_string(), r);
                }
                removals.push(id.to_string());
            }
            (None, None) => {}
        }
    }
    let policy_changed = match current {
        None => created_service,
        Some(c) => c.policy != state.policy,
    };
    let change = (created_service || policy_changed || !upserts.is_empty() || !removals.is_empty())
        .then(|| Change {
            service: service.to_owned(),
            base: current.map_or(0, |c| c.version),
            version: 0,
            upserts,
            created,
            removals,
            removal_reasons,
            policy: policy_changed.then_some(state.policy.clone()),
        });
    Ok(Plan {
        state,
        change,
        named,
    })
}
