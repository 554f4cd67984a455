//! The checker's share of the probing among live replicas: which backends this replica owns
//! by rendezvous hashing over the member set, and the reassignment when the set changes.

use std::sync::Arc;

use super::Checker;
use crate::replicas::Members;

impl Checker {
    /// Whether this replica probes `(service, id)` under the current member set.
    pub(super) fn owns(&self, service: &str, id: &str) -> bool {
        self.members
            .owner(service, id)
            .is_some_and(|o| *o == self.share.me)
    }

    /// The replica that probes `(service, id)` under the current member set.
    pub(crate) fn prober(&self, service: &str, id: &str) -> String {
        self.members
            .owner(service, id)
            .map(|o| o.to_string())
            .unwrap_or_default()
    }

    /// The member set changed: every checked service is reconciled (backends move in and out
    /// of this replica's share). O(checked backends × members).
    pub(super) fn reassign(&mut self, members: Members) {
        if members == self.members {
            return;
        }
        tracing::info!(replica = %self.share.me, members = ?members.ids(), "health checks reassigned among replicas");
        self.members = members;
        let services: Vec<Arc<str>> = self.by_service.keys().cloned().collect();
        for s in services {
            self.reconcile(&s);
        }
        self.recount = true;
    }
}
