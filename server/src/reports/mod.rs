//! Load reports in: what the SDKs' load reports feed, before any decision is made on them.
//!
//! * [`Reports`] — the bounded hand-off of each accepted report's call outcomes from the
//!   Discovery sessions to the passive-health task (`health::passive`); never blocks a
//!   session, drops and counts what does not fit;
//! * [`loads`] — in-flight sums per backend from every session's reports;
//! * [`global_load`] — least-connections picks with every SDK's in-flight counts;
//! * [`circuits`] — the SDKs' reported circuit-breaker states;
//! * [`demand`] — the share of each service's calls made by clients of each zone;
//! * [`forward`] — the sums a replica that does not lead forwards to the leader;
//! * [`rates`] — request and error rates per backend over the last minutes (the status page).

pub mod circuits;
pub mod demand;
pub mod forward;
pub mod global_load;
pub mod loads;
pub mod rates;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dlb::proto;
use tokio::sync::mpsc;

/// Largest mean latency a report may contribute, milliseconds (one hour).
pub const MAX_MEAN_MS: f64 = 3_600_000.0;

/// Reports queued for the detector task at most; more are dropped (and counted).
pub const QUEUE: usize = 65_536;
/// Backend entries queued for the detector task at most, over all queued reports (a report is
/// client input: this bounds the memory a burst of huge reports can pin, about 100 bytes each).
pub const MAX_QUEUED_LOADS: usize = 1_000_000;
/// One accepted load report: the service and its backends' loads.
pub type Report = (Arc<str>, Vec<proto::BackendLoad>);

/// The sending side, held by the sessions.
#[derive(Debug)]
pub struct Reports {
    tx: mpsc::Sender<Report>,
    dropped: AtomicU64,
    /// Backend entries in queued reports (see [`MAX_QUEUED_LOADS`]).
    queued: std::sync::atomic::AtomicUsize,
    /// Request and error rates per backend, from every submitted report (the status page).
    pub rates: rates::Rates,
}

impl Reports {
    /// A channel pair: the handle for sessions and the receiver for the passive-health task.
    pub fn new() -> (Self, mpsc::Receiver<Report>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                tx,
                dropped: AtomicU64::new(0),
                queued: Default::default(),
                rates: rates::Rates::new(),
            },
            rx,
        )
    }

    /// Queues a report's outcomes (only the backends with any); never waits.
    pub fn submit(&self, service: &str, loads: &[proto::BackendLoad]) {
        let loads: Vec<proto::BackendLoad> = loads
            .iter()
            .filter(|l| l.successes > 0 || l.failures > 0)
            .cloned()
            .collect();
        if loads.is_empty() {
            return;
        }
        self.rates.record(service, &loads);
        let n = loads.len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > MAX_QUEUED_LOADS {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.tx.try_send((service.into(), loads)).is_err() {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The task took a report of `n` backend entries off the queue.
    pub(crate) fn taken(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
    }

    /// Reports dropped because the task's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
