//! Server-side pickers: what `GetNextServer` answers from.
//!
//! For every service the control plane keeps one immutable [`dlb::balance::Picker`] — the very
//! code the SDK runs — behind an [`ArcSwap`], so a pick is a lock-free load plus the picker's own
//! O(1) work. On every change the picker is rebuilt off the pick path with
//! [`Picker::rebuild`](dlb::balance::Picker::rebuild) (in-flight accounting carried over by
//! backend id) and swapped in. A [`StickyTable`] lives next to it while the policy is sticky and
//! survives rebuilds as long as the sticky configuration does not change.
//!
//! Sync primitives: the map of services is a `parking_lot::RwLock` (read on every pick, written
//! only when a service first appears); each service's state is an `ArcSwap` (readers never
//! block); rebuilds are serialised by one `parking_lot::Mutex<()>` so that two concurrent
//! refreshes cannot swap an older version over a newer one. No lock is held across `.await`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use dlb::balance::{Picker, StickyTable};
use dlb::model;
use dlb::proto;
use parking_lot::{Mutex, RwLock};

use crate::store::ServiceSnapshot;
use crate::Error;

/// The picking state of one service at one version.
#[derive(Debug)]
pub struct ServicePicker {
    /// The version this state was built from.
    pub version: proto::Version,
    /// The policy.
    pub policy: proto::Policy,
    /// The picker.
    pub picker: Arc<Picker>,
    /// Stored records by id (a pick answers with the whole record).
    pub servers: HashMap<String, proto::Server>,
    /// The sticky-session table, when the policy is sticky.
    pub sticky: Option<Arc<StickyTable>>,
}

/// One [`ServicePicker`] per service. See the module docs.
#[derive(Debug, Default)]
pub struct Pickers {
    services: RwLock<HashMap<String, Arc<ArcSwap<ServicePicker>>>>,
    /// Serialises rebuilds (compare version, rebuild, swap).
    rebuild: Mutex<()>,
}

impl Pickers {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current state of a service.
    pub fn get(&self, service: &str) -> Option<Arc<ServicePicker>> {
        self.services.read().get(service).map(|s| s.load_full())
    }

    /// Whether the service's picker is already at `(epoch, version)` or newer.
    pub fn is_at(&self, service: &str, epoch: u64, version: u64) -> bool {
        self.get(service)
            .is_some_and(|s| s.version.epoch == epoch && s.version.version >= version)
    }

    /// Brings a service's picker up to `snapshot` unless it is already at that version or newer.
    /// Returns whether it swapped in a new picker.
    pub fn apply(&self, snapshot: &ServiceSnapshot) -> Result<bool, Error> {
        let _guard = self.rebuild.lock();
        let slot = self.services.read().get(&snapshot.name).cloned();
        let current = slot.as_ref().map(|s| s.load_full());
        if let Some(cur) = &current {
            if cur.version.epoch == snapshot.version.epoch
                && cur.version.version >= snapshot.version.version
            {
                return Ok(false);
            }
        }
        let built = model::build_picker(
            current.as_ref().map(|c| &*c.picker),
            &snapshot.policy,
            &snapshot.servers,
        )
        .map_err(|source| Error::Picker {
            service: snapshot.name.clone(),
            source,
        })?;
        let sticky = model::carry_sticky(
            current.as_ref().and_then(|c| c.sticky.as_ref()),
            &snapshot.policy,
        );
        let state = Arc::new(ServicePicker {
            version: snapshot.version,
            policy: snapshot.policy,
            picker: Arc::new(built),
            servers: snapshot
                .servers
                .iter()
                .map(|s| (s.server_id.clone(), s.clone()))
                .collect(),
            sticky,
        });
        match slot {
            Some(slot) => slot.store(state),
            None => {
                self.services
                    .write()
                    .insert(snapshot.name.clone(), Arc::new(ArcSwap::new(state)));
            }
        }
        Ok(true)
    }

    /// Picks a backend of `service` for a request with `key` (empty = no key). The pick is not
    /// counted as an in-flight call: the caller of `GetNextServer` does not report completion.
    pub fn pick(
        &self,
        service: &str,
        key: &[u8],
    ) -> Result<(proto::Server, proto::Version), Error> {
        let state = self
            .get(service)
            .ok_or_else(|| Error::ServiceNotFound(service.to_owned()))?;
        let key = (!key.is_empty()).then_some(key);
        let unavailable = |source| Error::Unavailable {
            service: service.to_owned(),
            source,
        };
        let id = match (&state.sticky, key) {
            (Some(table), Some(k)) => {
                let pick = table
                    .pick(&state.picker, k, Instant::now())
                    .map_err(unavailable)?;
                pick.backend().id().to_owned()
            }
            _ => {
                let pick = state.picker.pick(key).map_err(unavailable)?;
                pick.backend().id().to_owned()
            }
        };
        let server = state
            .servers
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::Task(format!("picked unknown backend {id:?}")))?;
        Ok((server, state.version))
    }

    /// Sets the load other clients put on each backend of `service` (the sum of the in-flight
    /// counts reported by SDK sessions); backends not in `totals` get 0.
    pub fn set_baselines(&self, service: &str, totals: &HashMap<String, u64>) {
        if let Some(state) = self.get(service) {
            for b in state.picker.backends() {
                b.load()
                    .set_baseline(totals.get(b.id()).copied().unwrap_or(0));
            }
            // Exact least-connections keeps a tree over the loads: re-read them all now
            // rather than letting the tree converge over the next n picks.
            state.picker.refresh_loads();
        }
    }
}
