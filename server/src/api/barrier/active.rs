//! The drain barriers waiting on this replica now ([`Active`], held in
//! [`Shared::barriers`](crate::api::Shared)), for the status page: each wait registers itself
//! when it starts, records the result of each check, and is removed when it ends — also when
//! the RPC is cancelled (the caller went away and the future was dropped): the registration is a
//! [`Registration`] guard whose `Drop` removes it.
//!
//! Bounded by the number of concurrent `DrainServer` / `RemoveServer` / `Deregister` RPCs with
//! a `wait` (one entry each; the gRPC server's concurrency limits bound those). Every operation
//! takes one short lock, never across an `.await`; listing a service's waits is O(waits).

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::time::Instant;

use super::Wait;

/// What the latest check of a wait found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Checks made so far (0: none yet, the other fields are not known).
    pub checks: u64,
    /// Clients that acknowledged the version (or newer).
    pub confirmed: u32,
    /// Clients (and replicas) not yet confirmed, listed or not.
    pub pending_total: u32,
    /// Clients past the stall cut-off (no longer counted).
    pub stalled: u32,
    /// The backend's global in-flight calls.
    pub in_flight: u64,
}

/// One wait in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub service: String,
    pub server_id: String,
    /// The version the backend was drained or removed at.
    pub version: u64,
    /// The backend is being removed (else drained).
    pub removal: bool,
    /// Also waiting for the backend's in-flight count to reach 0.
    pub in_flight_zero: bool,
    pub started: Instant,
    pub deadline: Instant,
    pub progress: Progress,
}

/// The waits in progress on this replica, by registration id (start order).
#[derive(Debug, Default)]
pub(crate) struct Active {
    entries: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    next: u64,
    waits: BTreeMap<u64, Entry>,
}

impl Active {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a wait starting now; it stays listed until the guard is dropped.
    pub fn register(
        &self,
        service: &str,
        server_id: &str,
        version: u64,
        wait: Wait,
    ) -> Registration<'_> {
        let started = Instant::now();
        let entry = Entry {
            service: service.to_owned(),
            server_id: server_id.to_owned(),
            version,
            removal: wait.removal,
            in_flight_zero: wait.in_flight_zero,
            started,
            deadline: started + wait.timeout,
            progress: Progress::default(),
        };
        let mut e = self.lock();
        e.next += 1;
        let id = e.next;
        e.waits.insert(id, entry);
        Registration { active: self, id }
    }

    /// The waits in progress for `service`, oldest first.
    pub fn of_service(&self, service: &str) -> Vec<Entry> {
        self.lock()
            .waits
            .values()
            .filter(|w| w.service == service)
            .cloned()
            .collect()
    }

    /// How many waits are in progress.
    pub fn len(&self) -> usize {
        self.lock().waits.len()
    }
}

/// A registered wait: [`Registration::progress`] records each check; dropping it removes the
/// entry.
#[derive(Debug)]
pub(crate) struct Registration<'a> {
    active: &'a Active,
    id: u64,
}

impl Registration<'_> {
    /// Records the latest check.
    pub fn progress(&self, confirmed: u32, pending_total: u32, stalled: u32, in_flight: u64) {
        if let Some(w) = self.active.lock().waits.get_mut(&self.id) {
            let p = &mut w.progress;
            *p = Progress {
                checks: p.checks + 1,
                confirmed,
                pending_total,
                stalled,
                in_flight,
            };
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.active.lock().waits.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_wait_is_listed_until_its_guard_drops() {
        let active = Active::default();
        let wait = Wait {
            in_flight_zero: false,
            removal: true,
            timeout: Duration::from_secs(5),
        };
        let r = active.register("svc", "a", 7, wait);
        let _other = active.register("other", "b", 3, wait);
        assert_eq!(active.len(), 2);
        r.progress(1, 2, 0, 4);
        let listed = active.of_service("svc");
        assert_eq!(listed.len(), 1);
        let w = &listed[0];
        assert_eq!((w.server_id.as_str(), w.version, w.removal), ("a", 7, true));
        assert_eq!(w.progress.checks, 1);
        assert_eq!((w.progress.pending_total, w.progress.in_flight), (2, 4));
        drop(r);
        assert!(active.of_service("svc").is_empty());
        assert_eq!(active.len(), 1);
    }
}
