//! Global in-flight accounting from SDK load reports.
//!
//! Each session reports, per service, how many calls it has in flight to each backend. The
//! tracker keeps every session's latest report and the per-backend sum across sessions; a
//! report replaces that session's previous report for the service (backends left out count as
//! 0), and closing a session removes its contribution. The sums feed the server-side pickers'
//! baselines (so `GetNextServer` least-connections sees the global view) and the per-service
//! in-flight gauge.
//!
//! Reported values are client input: each is clamped to [`MAX_REPORTED_IN_FLIGHT`] and every sum
//! saturates, so no report can overflow anything or pin a backend near 2^64.
//!
//! One `parking_lot::Mutex` guards both maps: an update touches both and must be atomic, and it
//! is O(backends in the report); it is never held across `.await`.

use std::collections::HashMap;

use dlb::proto;

/// Largest in-flight count one session may report for one backend; larger values are clamped.
/// Reports are client input: without a bound one client could pin a backend's baseline near
/// 2^64 (and sums could overflow).
pub const MAX_REPORTED_IN_FLIGHT: u64 = 1_000_000;
use parking_lot::Mutex;

#[derive(Debug, Default)]
struct Inner {
    /// session id → service → backend id → in flight.
    sessions: HashMap<u64, HashMap<String, HashMap<String, u64>>>,
    /// service → backend id → sum over sessions.
    totals: HashMap<String, HashMap<String, u64>>,
}

/// Per-session reports and per-backend sums. See the module docs.
#[derive(Debug, Default)]
pub struct LoadTracker {
    inner: Mutex<Inner>,
    /// Bumped on every change of any sum: sessions wait on it to push global loads
    /// ([`crate::reports::global_load`]).
    changed: tokio::sync::watch::Sender<u64>,
}

fn subtract(totals: &mut HashMap<String, u64>, old: &HashMap<String, u64>) {
    for (id, n) in old {
        if let Some(t) = totals.get_mut(id) {
            *t = t.saturating_sub(*n);
            if *t == 0 {
                totals.remove(id);
            }
        }
    }
}

impl LoadTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a session's report for `service`; returns the service's new per-backend sums.
    pub fn report(
        &self,
        session: u64,
        service: &str,
        backends: &[proto::BackendLoad],
    ) -> HashMap<String, u64> {
        let mut new: HashMap<String, u64> = HashMap::new();
        for b in backends {
            if b.in_flight > 0 {
                let n = new.entry(b.server_id.clone()).or_default();
                *n = n.saturating_add(b.in_flight).min(MAX_REPORTED_IN_FLIGHT);
            }
        }
        let mut inner = self.inner.lock();
        let Inner { sessions, totals } = &mut *inner;
        let per_service = sessions.entry(session).or_default();
        let totals = totals.entry(service.to_owned()).or_default();
        if let Some(old) = per_service.get(service) {
            subtract(totals, old);
        }
        for (id, n) in &new {
            let t = totals.entry(id.clone()).or_default();
            *t = t.saturating_add(*n);
        }
        per_service.insert(service.to_owned(), new);
        let out = totals.clone();
        drop(inner);
        self.bump();
        out
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A receiver that changes whenever any sum may have changed.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The per-backend sums of `service` without `session`'s own contribution: the load the
    /// other sessions put on each backend (backends with nothing in flight left out).
    pub fn others(&self, service: &str, session: u64) -> HashMap<String, u64> {
        let inner = self.inner.lock();
        let mut out = inner.totals.get(service).cloned().unwrap_or_default();
        if let Some(own) = inner.sessions.get(&session).and_then(|s| s.get(service)) {
            subtract(&mut out, own);
        }
        out
    }

    /// Removes a session's contribution to one service (it unsubscribed); returns the
    /// service's new sums, or `None` when the session had not reported on it.
    pub fn remove_service(&self, session: u64, service: &str) -> Option<HashMap<String, u64>> {
        let mut inner = self.inner.lock();
        let Inner { sessions, totals } = &mut *inner;
        let old = sessions.get_mut(&session)?.remove(service)?;
        let t = totals.entry(service.to_owned()).or_default();
        subtract(t, &old);
        let out = t.clone();
        drop(inner);
        self.bump();
        Some(out)
    }

    /// Removes a closed session's contribution; returns the new sums of every service it had
    /// reported on.
    pub fn remove_session(&self, session: u64) -> Vec<(String, HashMap<String, u64>)> {
        let mut inner = self.inner.lock();
        let Inner { sessions, totals } = &mut *inner;
        let Some(reports) = sessions.remove(&session) else {
            return Vec::new();
        };
        let out = reports
            .into_iter()
            .map(|(service, old)| {
                let t = totals.entry(service.clone()).or_default();
                subtract(t, &old);
                (service, t.clone())
            })
            .collect();
        drop(inner);
        self.bump();
        out
    }

    /// The per-backend sums of `service` (backends with nothing in flight left out).
    pub fn totals(&self, service: &str) -> HashMap<String, u64> {
        self.inner
            .lock()
            .totals
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    /// The sum of every backend's in-flight count in a service.
    pub fn service_total(&self, service: &str) -> u64 {
        self.inner
            .lock()
            .totals
            .get(service)
            .map_or(0, |t| t.values().fold(0u64, |a, n| a.saturating_add(*n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(id: &str, n: u64) -> proto::BackendLoad {
        proto::BackendLoad {
            server_id: id.into(),
            in_flight: n,
            ..Default::default()
        }
    }

    #[test]
    fn sums_replace_and_remove() {
        let t = LoadTracker::new();
        t.report(1, "s", &[load("a", 3), load("b", 1)]);
        let sums = t.report(2, "s", &[load("a", 2)]);
        assert_eq!(sums.get("a"), Some(&5));
        let sums = t.report(1, "s", &[load("b", 4)]);
        assert_eq!(sums.get("a"), Some(&2));
        assert_eq!(sums.get("b"), Some(&4));
        assert_eq!(t.service_total("s"), 6);
        let left = t.remove_session(2);
        assert_eq!(left[0].1.get("a"), None);
        assert_eq!(t.service_total("s"), 4);
    }

    #[test]
    fn others_exclude_the_session_itself_and_changes_are_signalled() {
        let t = LoadTracker::new();
        let mut rx = t.subscribe();
        t.report(1, "s", &[load("a", 3)]);
        t.report(2, "s", &[load("a", 2), load("b", 1)]);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert_eq!(t.others("s", 1).get("a"), Some(&2));
        assert_eq!(t.others("s", 1).get("b"), Some(&1));
        assert_eq!(t.others("s", 2).get("a"), Some(&3));
        assert_eq!(t.others("s", 2).get("b"), None);
        assert_eq!(t.others("s", 3).get("a"), Some(&5));
        t.remove_session(2);
        assert!(rx.has_changed().unwrap());
        assert!(t.others("s", 1).is_empty());
    }

    #[test]
    fn hostile_values_are_clamped_and_saturate() {
        let t = LoadTracker::new();
        // Duplicate entries for one backend, each u64::MAX: no overflow, clamped.
        let sums = t.report(1, "s", &[load("a", u64::MAX), load("a", u64::MAX)]);
        assert_eq!(sums.get("a"), Some(&MAX_REPORTED_IN_FLIGHT));
        let sums = t.report(2, "s", &[load("a", u64::MAX)]);
        assert_eq!(sums.get("a"), Some(&(2 * MAX_REPORTED_IN_FLIGHT)));
        assert_eq!(t.service_total("s"), 2 * MAX_REPORTED_IN_FLIGHT);
        // Unsubscribing removes that session's share of the service.
        let sums = t.remove_service(1, "s").expect("session 1 reported on s");
        assert_eq!(sums.get("a"), Some(&MAX_REPORTED_IN_FLIGHT));
        assert!(t.remove_service(1, "s").is_none());
        t.remove_session(2);
        assert_eq!(t.service_total("s"), 0);
    }
}
