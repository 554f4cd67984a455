//! The SDKs' circuit-breaker states, as their load reports say (`BackendLoad.circuit`).
//!
//! Breakers live in the SDKs and decide only for them (see `dlb::circuit`); the control plane
//! only keeps what each session last reported, to show it: `ListServers` answers how many SDK
//! sessions hold each backend's circuit open or half-open (`dlbctl list`), and the gauge
//! `dlb_sdk_circuits{service, state}` counts (session, backend) pairs per state. A session's
//! report for a service replaces its previous one (a backend left out, or reported closed, is
//! closed); an unsubscribe or the end of the session removes its part. Only non-closed states are
//! kept, for backends that exist (the discovery front-end filters reports), so the state is
//! bounded by sessions × backends.
//!
//! One `parking_lot::Mutex` guards the map; it is held for O(backends in the report), never
//! across `.await`.

use std::collections::HashMap;

use dlb::proto;
use parking_lot::Mutex;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;
/// service → backend id → state, for one session.
type SessionStates = HashMap<String, HashMap<String, proto::CircuitState>>;

/// Per-session non-closed circuit states. See the module docs.
#[derive(Debug, Default)]
pub struct CircuitTracker {
    /// session id → service → backend id → state (OPEN or HALF_OPEN only).
    inner: Mutex<HashMap<u64, SessionStates>>,
}

/// How many sessions report a backend's circuit open and half-open.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CircuitCounts {
    /// Sessions whose breaker for the backend is open.
    pub open: u32,
    /// Sessions whose breaker for the backend is half-open.
    pub half_open: u32,
}

impl CircuitTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a session's report for `service` (replacing its previous one); returns whether
    /// that changed anything (the gauges need an update only then).
    pub fn report(&self, session: u64, service: &str, backends: &[proto::BackendLoad]) -> bool {
        let states: HashMap<String, proto::CircuitState> = backends
            .iter()
            .filter_map(|b| {
                let s = proto::CircuitState::try_from(b.circuit).ok()?;
                matches!(s, proto::CircuitState::Open | proto::CircuitState::HalfOpen)
                    .then(|| (b.server_id.clone(), s))
            })
            .collect();
        let mut inner = self.inner.lock();
        let services = inner.entry(session).or_default();
        let changed = if states.is_empty() {
            services.remove(service).is_some()
        } else {
            services.insert(service.to_owned(), states.clone()) != Some(states)
        };
        if services.is_empty() {
            inner.remove(&session);
        }
        changed
    }

    /// Forgets a session's part for one service; returns whether it had one (only then do the
    /// service's circuit metrics change).
    pub fn remove_service(&self, session: u64, service: &str) -> bool {
        let mut inner = self.inner.lock();
        let mut removed = false;
        if let Some(services) = inner.get_mut(&session) {
            removed = services.remove(service).is_some();
            if services.is_empty() {
                inner.remove(&session);
            }
        }
        removed
    }

    /// Forgets a session; returns the services it had reported on.
    pub fn remove_session(&self, session: u64) -> Vec<String> {
        self.inner
            .lock()
            .remove(&session)
            .map(|s| s.into_keys().collect())
            .unwrap_or_default()
    }

    /// Per backend of `service`: the sessions reporting it open or half-open.
    pub fn counts(&self, service: &str) -> HashMap<String, CircuitCounts> {
        let mut out: HashMap<String, CircuitCounts> = HashMap::new();
        for services in self.inner.lock().values() {
            for (id, state) in services.get(service).into_iter().flatten() {
                let c = out.entry(id.clone()).or_default();
                match state {
                    proto::CircuitState::Open => c.open += 1,
                    _ => c.half_open += 1,
                }
            }
        }
        out
    }

    /// The wire form of [`CircuitTracker::counts`], ordered by backend id.
    pub fn reports(&self, service: &str) -> Vec<proto::CircuitReport> {
        let mut v: Vec<proto::CircuitReport> = self
            .counts(service)
            .into_iter()
            .map(|(server_id, c)| proto::CircuitReport {
                server_id,
                open_sessions: c.open,
                half_open_sessions: c.half_open,
            })
            .collect();
        v.sort_by(|a, b| a.server_id.cmp(&b.server_id));
        v
    }
}

/// The `dlb_sdk_circuits` gauge family.
#[derive(Debug, Clone, Default)]
pub struct CircuitMetrics {
    circuits: Family<Labels, Gauge>,
}

impl CircuitMetrics {
    /// Registers the family in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dlb_sdk_circuits",
            "(SDK session, backend) pairs whose circuit breaker is open or half_open, from the load reports",
            m.circuits.clone(),
        );
        m
    }

    /// Sets the service's gauges from the tracker.
    pub fn update(&self, service: &str, tracker: &CircuitTracker) {
        let counts = tracker.counts(service);
        let open: u32 = counts.values().map(|c| c.open).sum();
        let half: u32 = counts.values().map(|c| c.half_open).sum();
        for (state, n) in [("open", open), ("half_open", half)] {
            self.circuits
                .get_or_create(&vec![
                    ("service".to_owned(), service.to_owned()),
                    ("state".to_owned(), state.to_owned()),
                ])
                .set(i64::from(n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(id: &str, s: proto::CircuitState) -> proto::BackendLoad {
        proto::BackendLoad {
            server_id: id.into(),
            circuit: s as i32,
            ..Default::default()
        }
    }

    #[test]
    fn reports_replace_and_sessions_leave() {
        let t = CircuitTracker::new();
        t.report(1, "s", &[load("a", proto::CircuitState::Open)]);
        t.report(2, "s", &[load("a", proto::CircuitState::HalfOpen)]);
        t.report(2, "s", &[load("b", proto::CircuitState::Closed)]);
        let c = t.counts("s");
        assert_eq!(
            c.get("a"),
            Some(&CircuitCounts {
                open: 1,
                half_open: 0
            })
        );
        assert!(!c.contains_key("b"));
        assert_eq!(t.remove_session(1), vec!["s".to_owned()]);
        assert!(t.counts("s").is_empty());
        t.report(3, "s", &[load("a", proto::CircuitState::Open)]);
        assert!(t.remove_service(3, "s"));
        assert!(t.reports("s").is_empty());
    }
}
