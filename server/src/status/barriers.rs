//! The drain barriers waiting on this replica, as the status page shows them: one
//! [`BarrierView`] per `DrainServer` / `RemoveServer` / `Deregister` call with a `wait` still in
//! progress (from [`crate::api::barrier::Active`]), with its latest check.

use serde::Serialize;
use tokio::time::Instant;

use super::Status;

/// One drain barrier in progress on this replica.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BarrierView {
    /// The backend drained or removed.
    pub server_id: String,
    /// The service version it was drained or removed at (what the clients must acknowledge).
    pub version: u64,
    /// `drain` or `removal`.
    pub kind: &'static str,
    /// Also waiting for the backend's in-flight calls to reach 0.
    pub in_flight_zero: bool,
    /// How long it has waited, ms.
    pub waited_ms: u64,
    /// The deadline it was given, ms.
    pub timeout_ms: u64,
    /// Time left before its deadline, ms (0: passing now).
    pub deadline_in_ms: u64,
    /// Checks made so far; 0: none yet (the counts below are then not known).
    pub checks: u64,
    /// Clients that acknowledged the version (or newer), at the latest check.
    pub confirmed: u32,
    /// Clients (and, with several replicas, replicas) not yet confirmed.
    pub pending_total: u32,
    /// Clients past the stall cut-off, no longer counted.
    pub stalled: u32,
    /// The backend's global in-flight calls (known when asked for or when no client is
    /// pending).
    pub in_flight: u64,
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The barriers in progress for `service`, oldest first. O(waits on this replica).
pub fn of_service(status: &Status, service: &str) -> Vec<BarrierView> {
    let now = Instant::now();
    status
        .shared
        .barriers
        .of_service(service)
        .into_iter()
        .map(|w| BarrierView {
            server_id: w.server_id,
            version: w.version,
            kind: if w.removal { "removal" } else { "drain" },
            in_flight_zero: w.in_flight_zero,
            waited_ms: ms(now.saturating_duration_since(w.started)),
            timeout_ms: ms(w.deadline.saturating_duration_since(w.started)),
            deadline_in_ms: ms(w.deadline.saturating_duration_since(now)),
            checks: w.progress.checks,
            confirmed: w.progress.confirmed,
            pending_total: w.progress.pending_total,
            stalled: w.progress.stalled,
            in_flight: w.progress.in_flight,
        })
        .collect()
}

/// How many barriers are waiting on this replica.
pub fn count(status: &Status) -> usize {
    status.shared.barriers.len()
}
