//! The write semantics every store shares: what a batch of [`Mutation`]s does to one service.
//!
//! [`plan`] is pure: given a service's current state, the batch, the expected version (if any)
//! and the wall clock, it returns the service's next state, the [`Change`] to publish (or none
//! for a no-op) and the records the batch named — or the error that refuses the batch
//! (validation, `NOT_FOUND`, `ALREADY_EXISTS`, a stale compare-and-set, a quota). The in-process
//! [engine](super::engine) and the etcd store (feature `etcd`) both call it, so validation, the
//! stamping of derived fields, no-op detection and the size and backend-count limits are written
//! once. Assigning the revision and committing are the caller's business.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use dlb::{model, proto, sources};

use super::{Change, Mutation, ServerPatch, Servers};
use crate::Error;

/// The state of one service.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServiceState {
    /// Revision of the last change (0 for a service that does not exist yet).
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

/// What a batch does to one service.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The service after the batch (version not yet assigned).
    pub state: ServiceState,
    /// The change, `None` for a no-op.
    pub change: Option<Change>,
    /// The records the mutations named, after the batch.
    pub named: Vec<proto::Server>,
    /// The batch removes the service ([`Mutation::RemoveService`]): drop it, do not store
    /// `state`.
    pub deleted: bool,
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
    server.locality = dlb::locality::normalize(server.locality.take());
    dlb::slow_start::stamp_ready_since(old, &mut server, now_ms);
    model::validate_server(&server)?;
    Ok(server)
}

/// The record of a backend new to the service (added or declared): its derived fields are
/// reset and its sources are those of a new backend.
fn new_record(server: &proto::Server, now_ms: u64) -> Result<proto::Server, Error> {
    let record = proto::Server {
        health: 0,
        reason: String::new(),
        effective_weight: 0,
        sources: Some(new_sources()),
        ..server.clone()
    };
    finish(record, None, now_ms)
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
    if let Some(l) = &patch.locality {
        new.locality.clone_from(l);
    }
    if let Some(p) = patch.priority {
        new.priority = p;
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

/// Refuses the creation of a service when the store already holds `services` of them
/// ([`model::MAX_SERVICES`]). Call it when `current` was `None` and the plan has a change.
pub(crate) fn check_service_quota(services: usize) -> Result<(), Error> {
    if services >= model::MAX_SERVICES {
        return Err(Error::ResourceExhausted(format!(
            "the store holds {services} services; at most {} are allowed",
            model::MAX_SERVICES
        )));
    }
    Ok(())
}

/// Computes the effect of `mutations` on `current` (the service's state, `None` if it does not
/// exist) at wall-clock `now_ms`: checks the service name and the compare-and-set on
/// `expected_version` (0: must not exist), then plans the batch. Pure; O(mutations × log n).
pub(crate) fn plan(
    service: &str,
    current: Option<&ServiceState>,
    mutations: &[Mutation],
    expected_version: Option<u64>,
    now_ms: u64,
) -> Result<Plan, Error> {
    model::validate_id("service", service)?;
    let current_version = current.map_or(0, |s| s.version);
    if let Some(expected) = expected_version {
        if expected != current_version {
            return Err(Error::VersionMismatch {
                service: service.to_owned(),
                expected,
                current: current_version,
            });
        }
    }
    if let Some(force) = mutations.iter().find_map(|m| match m {
        Mutation::RemoveService { force } => Some(*force),
        _ => None,
    }) {
        return plan_removal(service, current, mutations.len(), force);
    }
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
                let record = new_record(server, now_ms)?;
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
                            locality: server.locality.clone(),
                            priority: server.priority,
                            ..(**old).clone()
                        },
                        Some(old),
                        now_ms,
                    )?,
                    None => new_record(server, now_ms)?,
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
            Mutation::RemoveService { .. } => {
                return Err(Error::Task("RemoveService is planned apart".into()));
            }
            Mutation::SetPolicy(policy) => {
                state.policy = model::validate_policy_write(policy, Some(state.policy.algorithm))?;
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
            deleted: false,
        });
    Ok(Plan {
        state,
        change,
        named,
        deleted: false,
    })
}

/// The plan of a batch holding a [`Mutation::RemoveService`] (alone, `batch_len` 1).
fn plan_removal(
    service: &str,
    current: Option<&ServiceState>,
    batch_len: usize,
    force: bool,
) -> Result<Plan, Error> {
    if batch_len != 1 {
        return Err(Error::Invalid(model::ValidationError::new(
            "mutations",
            batch_len,
            "a service removal must be the only mutation of its batch",
        )));
    }
    let current = current.ok_or_else(|| Error::ServiceNotFound(service.to_owned()))?;
    if !force && !current.servers.is_empty() {
        return Err(Error::ServiceNotEmpty {
            service: service.to_owned(),
            backends: current.servers.len(),
        });
    }
    Ok(Plan {
        state: ServiceState::new(0, model::default_policy(), Servers::new()),
        change: Some(Change {
            service: service.to_owned(),
            base: current.version,
            version: 0,
            upserts: Vec::new(),
            created: Vec::new(),
            removals: current.servers.keys().map(|id| id.to_string()).collect(),
            removal_reasons: BTreeMap::new(),
            policy: None,
            deleted: true,
        }),
        named: Vec::new(),
        deleted: true,
    })
}
