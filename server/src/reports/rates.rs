//! Request and error rates per backend from the SDKs' load reports, for the status page.
//!
//! Each backend keeps a ring of [`SECONDS`] one-second buckets (requests, errors) on tokio
//! time, written by [`Rates::record`] on every accepted load report and read by
//! [`Rates::service`]. A rate is the sum of the last [`RATE_WINDOW`] complete-or-current
//! seconds divided by that window; the trend is the whole ring, oldest first.
//!
//! Bounds: backend ids come from clients, so at most [`MAX_ENTRIES`] (service, backend) pairs
//! are kept (a report about more is not recorded for the new ones); pairs silent for the whole
//! ring are dropped by [`Rates::prune`] (the status module calls it with the services that
//! exist). One `parking_lot::Mutex` guards the map, held for O(report) work, never across an
//! `.await`.

use std::collections::HashMap;

use dlb::proto;
use parking_lot::Mutex;
use tokio::time::Instant;

/// Seconds of history per backend (the sparkline's width).
pub const SECONDS: usize = 120;
/// Seconds a rate is averaged over.
pub const RATE_WINDOW: u64 = 10;
/// Most (service, backend) pairs tracked.
pub const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone)]
struct Ring {
    /// The second (since [`Rates`] was made) the newest bucket is for.
    newest: u64,
    requests: [u64; SECONDS],
    errors: [u64; SECONDS],
}

impl Ring {
    fn new(now: u64) -> Self {
        Self {
            newest: now,
            requests: [0; SECONDS],
            errors: [0; SECONDS],
        }
    }

    /// Moves the ring forward to second `now`, zeroing the buckets it passes.
    fn advance(&mut self, now: u64) {
        if now <= self.newest {
            return;
        }
        let steps = (now - self.newest).min(SECONDS as u64);
        for i in 1..=steps {
            let slot = ((self.newest + i) % SECONDS as u64) as usize;
            self.requests[slot] = 0;
            self.errors[slot] = 0;
        }
        self.newest = now;
    }

    /// Buckets oldest first, as of second `now`.
    fn series(&self, now: u64) -> (Vec<u64>, Vec<u64>) {
        let mut r = self.clone();
        r.advance(now);
        let start = r.newest + 1;
        let at = |i: usize| ((start + i as u64) % SECONDS as u64) as usize;
        (
            (0..SECONDS).map(|i| r.requests[at(i)]).collect(),
            (0..SECONDS).map(|i| r.errors[at(i)]).collect(),
        )
    }
}

/// One backend's rates and trend.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackendRates {
    /// Requests per second over the last [`RATE_WINDOW`] seconds.
    pub requests_per_s: f64,
    /// Failed requests per second over the same window.
    pub errors_per_s: f64,
    /// Requests per one-second bucket, oldest first ([`SECONDS`] of them).
    pub requests: Vec<u64>,
    /// Errors per one-second bucket, oldest first.
    pub errors: Vec<u64>,
}

/// Per (service, backend) request rings. See the module docs.
#[derive(Debug)]
pub struct Rates {
    start: Instant,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    services: HashMap<String, HashMap<String, Ring>>,
    entries: usize,
}

impl Default for Rates {
    fn default() -> Self {
        Self::new()
    }
}

impl Rates {
    /// Empty rates, their clock starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn now(&self) -> u64 {
        Instant::now().duration_since(self.start).as_secs()
    }

    /// Adds a report's outcomes to the current second. O(backends in the report).
    pub fn record(&self, service: &str, loads: &[proto::BackendLoad]) {
        let now = self.now();
        let mut inner = self.inner.lock();
        let Inner { services, entries } = &mut *inner;
        if !services.contains_key(service) && *entries >= MAX_ENTRIES {
            return;
        }
        let rings = services.entry(service.to_owned()).or_default();
        for l in loads {
            let ring = match rings.get_mut(&l.server_id) {
                Some(r) => r,
                None if *entries < MAX_ENTRIES => {
                    *entries += 1;
                    rings
                        .entry(l.server_id.clone())
                        .or_insert_with(|| Ring::new(now))
                }
                None => continue,
            };
            ring.advance(now);
            let slot = (now % SECONDS as u64) as usize;
            let total = l.successes.saturating_add(l.failures);
            ring.requests[slot] = ring.requests[slot].saturating_add(total);
            ring.errors[slot] = ring.errors[slot].saturating_add(l.failures);
        }
    }

    /// The rates of every backend of `service` that reported in the last [`SECONDS`].
    pub fn service(&self, service: &str) -> HashMap<String, BackendRates> {
        let now = self.now();
        let inner = self.inner.lock();
        let Some(rings) = inner.services.get(service) else {
            return HashMap::new();
        };
        rings
            .iter()
            .map(|(id, ring)| {
                let (requests, errors) = ring.series(now);
                let window = |v: &[u64]| {
                    v[SECONDS - RATE_WINDOW as usize..].iter().sum::<u64>() as f64
                        / RATE_WINDOW as f64
                };
                let rates = BackendRates {
                    requests_per_s: window(&requests),
                    errors_per_s: window(&errors),
                    requests,
                    errors,
                };
                (id.clone(), rates)
            })
            .collect()
    }

    /// Drops services not in `keep` and backends silent for the whole ring.
    pub fn prune(&self, keep: &dyn Fn(&str) -> bool) {
        let now = self.now();
        let mut inner = self.inner.lock();
        let Inner { services, entries } = &mut *inner;
        services.retain(|name, rings| {
            if keep(name) {
                rings.retain(|_, r| now.saturating_sub(r.newest) < SECONDS as u64);
            } else {
                rings.clear();
            }
            !rings.is_empty()
        });
        *entries = services.values().map(HashMap::len).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn load(id: &str, ok: u64, failed: u64) -> proto::BackendLoad {
        proto::BackendLoad {
            server_id: id.into(),
            successes: ok,
            failures: failed,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rates_average_the_window_and_age_out() {
        let rates = Rates::new();
        for _ in 0..RATE_WINDOW {
            rates.record("s", &[load("a", 90, 10)]);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let r = &rates.service("s")["a"];
        assert_eq!(r.requests.len(), SECONDS);
        // The current second is empty; the nine before it held 100 each.
        assert!((r.requests_per_s - 90.0).abs() < 1e-9, "{r:?}");
        assert!((r.errors_per_s - 9.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.requests[SECONDS - 2], 100);
        tokio::time::advance(Duration::from_secs(SECONDS as u64)).await;
        let r = &rates.service("s")["a"];
        assert_eq!(r.requests_per_s, 0.0);
        assert!(r.requests.iter().all(|&n| n == 0));
        rates.prune(&|_| true);
        assert!(rates.service("s").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn entries_are_bounded_and_pruned_with_their_service() {
        let rates = Rates::new();
        let many: Vec<_> = (0..MAX_ENTRIES + 5)
            .map(|i| load(&format!("b{i}"), 1, 0))
            .collect();
        rates.record("s", &many);
        assert_eq!(rates.service("s").len(), MAX_ENTRIES);
        rates.record("t", &[load("x", 1, 0)]);
        assert!(rates.service("t").is_empty());
        rates.prune(&|name| name != "s");
        rates.record("t", &[load("x", 1, 0)]);
        assert_eq!(rates.service("t").len(), 1);
    }
}
