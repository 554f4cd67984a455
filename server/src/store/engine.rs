//! The in-process store engine shared by [`MemoryStore`](super::MemoryStore) and
//! [`EmbeddedStore`](super::EmbeddedStore): it assigns revisions, installs what
//! [`plan`](super::plan) decides a batch does (the write semantics every store shares) and keeps
//! the watch history.
//!
//! State lives in RAM: per service its version, policy and a persistent map of records
//! ([`Servers`](super::Servers)), plus a bounded log of the last changes across all services for
//! [`Store::watch`](super::Store::watch): at most `log_capacity` changes and at most
//! `log_max_bytes` bytes of them ([`Change::approx_bytes`]; the newest change always stays), so
//! large writes cannot make the log hold more than its byte bound. An optional [`Persist`] makes each batch durable
//! *before* it is installed and published, so a crash never publishes what the disk lost.
//!
//! Sync primitives: `writer` (a `parking_lot::Mutex<()>`) serialises writers end to end (plan,
//! persist, install), so revisions are assigned in commit order without holding the state lock
//! during disk I/O; `state` (a `parking_lot::Mutex`) guards the maps and the log and is held only
//! for map operations and O(1) clones — readers never wait for a disk write. The newest
//! revision is broadcast on a `tokio::sync::watch` channel that watch streams await; it is
//! updated after the log, so a woken stream always finds its changes. No lock is held across an
//! `.await`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dlb::proto;
use futures::stream::{self, BoxStream, StreamExt};
use parking_lot::Mutex;
use tokio::sync::watch;

pub(crate) use super::plan::ServiceState;
use super::plan::{check_service_quota, plan};
use super::{Applied, Change, Mutation, ServiceSnapshot, StoreSnapshot, WatchEvent};
use crate::Error;

/// Most changes one [`WatchEvent::Changes`] carries.
const MAX_BATCH: usize = 1024;

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
    /// Sum of [`Change::approx_bytes`] over `log`.
    log_bytes: usize,
}

/// See the module docs.
pub(crate) struct Engine {
    epoch: u64,
    log_capacity: usize,
    /// Most bytes of changes in the log (set after construction: [`Engine::set_log_max_bytes`]).
    log_max_bytes: AtomicUsize,
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
            log_max_bytes: AtomicUsize::new(super::memory::DEFAULT_HISTORY_BYTES),
            writer: Mutex::new(()),
            state: Mutex::new(State {
                revision,
                compacted: revision,
                services,
                log: VecDeque::new(),
                log_bytes: 0,
            }),
            revision: watch::Sender::new(revision),
            persist,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bounds the change log to `bytes` bytes of changes (at least one change stays).
    pub fn set_log_max_bytes(&self, bytes: usize) {
        self.log_max_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The number of changes in the log and their bytes.
    pub fn log_size(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.log.len(), st.log_bytes)
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
        let _writer = self.writer.lock();
        let current = self.state.lock().services.get(service).cloned();
        let plan = plan(
            service,
            current.as_ref(),
            &mutations,
            expected_version,
            dlb::slow_start::now_ms(),
        )?;
        if current.is_none() && plan.change.is_some() {
            check_service_quota(self.state.lock().services.len())?;
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
            if plan.deleted {
                st.services.remove(service);
            } else {
                st.services.insert(service.to_owned(), state);
            }
            st.log_bytes += change.approx_bytes();
            st.log.push_back(Arc::new(change));
            let max_bytes = self.log_max_bytes.load(Ordering::Relaxed);
            while st.log.len() > 1 && (st.log.len() > self.log_capacity || st.log_bytes > max_bytes)
            {
                if let Some(old) = st.log.pop_front() {
                    st.compacted = old.version;
                    st.log_bytes = st.log_bytes.saturating_sub(old.approx_bytes());
                }
            }
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
