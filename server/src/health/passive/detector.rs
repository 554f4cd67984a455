//! The outlier detector of one service: pure state, fed with summed call outcomes and the clock.
//!
//! Per backend it keeps the failure streak, the current failure-rate window, how many times it
//! was ejected and, while ejected, until when. It decides nothing about storage: [`Detector::report`]
//! and [`Detector::tick`] return the [`Action`]s (eject, return) for the owner task to write.
//!
//! **Rules** (configuration: [`OutlierConfig`]):
//!
//! * *consecutive failures*: failures are added to the streak; a report that contains any success
//!   for the backend resets the streak first (outcomes inside one report are not ordered, so this
//!   is "consecutive at report granularity", summed over every SDK). Streak ≥ `k` → candidate.
//! * *failure rate*: per `interval` window, when requests ≥ `min_requests` and
//!   `failures × 100 ≥ rate × requests` → candidate.
//! * a candidate is ejected only when the [max-ejection rule](dlb::health_policy::max_ejected)
//!   allows one more (`ejected + 1 ≤ limit(n, p)`); otherwise it stays a candidate (its streak is
//!   kept) and is ejected at a later tick as soon as room appears.
//! * ejection time = `base × times ejected`, capped at `max`; after it the backend returns
//!   (its streak and window start over). `times ejected` decays by one for every `base` the
//!   backend spends back in service without being ejected.
//!
//! Outcomes reported for an ejected backend (calls that started before the ejection) are ignored.
//! Every operation is O(backends in the input); time is passed in (tokio's `Instant`, so the owner task
//! runs on paused time in tests), and the unit tests step a manual clock.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use dlb::health_policy::{max_ejected, OutlierConfig};
use dlb::proto;
use tokio::time::Instant;

/// What the owner must write for one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Set the outlier source UNHEALTHY.
    Eject {
        /// The backend.
        id: String,
        /// For how long.
        duration: Duration,
        /// Why (for the backend's `reason`).
        detail: String,
    },
    /// Set the outlier source back (HEALTHY).
    Return {
        /// The backend.
        id: String,
    },
}

#[derive(Debug, Clone)]
struct Backend {
    streak: u64,
    window_ok: u64,
    window_failed: u64,
    /// Why it is a candidate for ejection, if it is one.
    candidate: Option<String>,
    times_ejected: u32,
    ejected_until: Option<Instant>,
    /// Last ejection, return or decay step (decay counts from here).
    last_change: Instant,
}

impl Backend {
    fn new(now: Instant) -> Self {
        Self {
            streak: 0,
            window_ok: 0,
            window_failed: 0,
            candidate: None,
            times_ejected: 0,
            ejected_until: None,
            last_change: now,
        }
    }
}

/// The detector state of one service. See the module docs.
#[derive(Debug)]
pub struct Detector {
    /// By id, ordered, so that candidates are ejected in a deterministic order.
    backends: BTreeMap<String, Backend>,
    window_start: Instant,
}

impl Detector {
    /// A detector with no history, whose first window starts `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            backends: BTreeMap::new(),
            window_start: now,
        }
    }

    /// Backends ejected now.
    pub fn ejected(&self) -> usize {
        self.backends
            .values()
            .filter(|b| b.ejected_until.is_some())
            .count()
    }

    /// Whether `id` is ejected.
    pub fn is_ejected(&self, id: &str) -> bool {
        self.backends
            .get(id)
            .is_some_and(|b| b.ejected_until.is_some())
    }

    /// Takes over a backend the store says is ejected (a restarted `dlbd`): ejected once, for
    /// one base ejection time from `now`.
    pub fn adopt(&mut self, id: &str, config: &OutlierConfig, now: Instant) {
        let b = self
            .backends
            .entry(id.to_owned())
            .or_insert_with(|| Backend::new(now));
        if b.ejected_until.is_none() {
            b.times_ejected = b.times_ejected.max(1);
            b.ejected_until = Some(now + config.base_ejection);
            b.last_change = now;
        }
    }

    /// Forgets backends that are no longer in the service.
    pub fn retain(&mut self, ids: &HashSet<&str>) {
        self.backends.retain(|id, _| ids.contains(id.as_str()));
    }

    /// Adds one report's outcomes (already summed or from one SDK: they add up) and returns the
    /// ejections they cause. `total` is the number of backends of the service.
    pub fn report(
        &mut self,
        config: &OutlierConfig,
        total: usize,
        loads: &[proto::BackendLoad],
        now: Instant,
    ) -> Vec<Action> {
        for l in loads {
            if l.successes == 0 && l.failures == 0 {
                continue;
            }
            let b = self
                .backends
                .entry(l.server_id.clone())
                .or_insert_with(|| Backend::new(now));
            if b.ejected_until.is_some() {
                continue;
            }
            if l.successes > 0 {
                b.streak = 0;
                if b.candidate
                    .as_deref()
                    .is_some_and(|c| c.contains("in a row"))
                {
                    b.candidate = None;
                }
            }
            b.streak = b.streak.saturating_add(l.failures);
            b.window_ok = b.window_ok.saturating_add(l.successes);
            b.window_failed = b.window_failed.saturating_add(l.failures);
            if let Some(k) = config.consecutive_failures {
                if b.streak >= u64::from(k) && b.candidate.is_none() {
                    b.candidate = Some(format!("{} failures in a row", b.streak));
                }
            }
        }
        self.eject_candidates(config, total, now)
    }

    /// Advances time: returns backends whose ejection ended, closes the failure-rate window when
    /// `interval` has passed, decays ejection counts, and ejects candidates there is room for.
    pub fn tick(&mut self, config: &OutlierConfig, total: usize, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for (id, b) in &mut self.backends {
            if b.ejected_until.is_some_and(|t| now >= t) {
                b.ejected_until = None;
                b.streak = 0;
                b.window_ok = 0;
                b.window_failed = 0;
                b.candidate = None;
                b.last_change = now;
                out.push(Action::Return { id: id.clone() });
            } else if b.ejected_until.is_none()
                && b.times_ejected > 0
                && now.saturating_duration_since(b.last_change) >= config.base_ejection
            {
                b.times_ejected -= 1;
                b.last_change = now;
            }
        }
        if now.saturating_duration_since(self.window_start) >= config.interval {
            self.window_start = now;
            for b in self.backends.values_mut() {
                let requests = b.window_ok.saturating_add(b.window_failed);
                if let Some(rate) = config.failure_rate_percent {
                    if b.ejected_until.is_none()
                        && b.candidate.is_none()
                        && requests >= u64::from(config.min_requests)
                        && u128::from(b.window_failed) * 100
                            >= u128::from(rate) * u128::from(requests)
                    {
                        b.candidate = Some(format!(
                            "{} of {} requests failed in {} ms",
                            b.window_failed,
                            requests,
                            config.interval.as_millis()
                        ));
                    }
                }
                b.window_ok = 0;
                b.window_failed = 0;
            }
        }
        out.extend(self.eject_candidates(config, total, now));
        out
    }

    fn eject_candidates(
        &mut self,
        config: &OutlierConfig,
        total: usize,
        now: Instant,
    ) -> Vec<Action> {
        let limit = max_ejected(total, config.max_ejection_percent);
        let mut ejected = self.ejected();
        let mut out = Vec::new();
        for (id, b) in &mut self.backends {
            if ejected >= limit {
                break;
            }
            let Some(why) = b.candidate.take() else {
                continue;
            };
            b.times_ejected = b.times_ejected.saturating_add(1);
            let duration = config
                .base_ejection
                .saturating_mul(b.times_ejected)
                .min(config.max_ejection);
            b.ejected_until = Some(now + duration);
            b.streak = 0;
            b.window_ok = 0;
            b.window_failed = 0;
            b.last_change = now;
            ejected += 1;
            out.push(Action::Eject {
                id: id.clone(),
                duration,
                detail: format!(
                    "{why}; ejected for {} ms (time {})",
                    duration.as_millis(),
                    b.times_ejected
                ),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manual clock: the detector takes time as input, so tests step it explicitly.
    struct Clock(Instant);
    impl Clock {
        fn new() -> Self {
            Self(Instant::now())
        }
        fn now(&self) -> Instant {
            self.0
        }
        fn advance(&mut self, d: Duration) {
            self.0 += d;
        }
    }

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: Some(5),
            failure_rate_percent: Some(50),
            min_requests: 10,
            interval: Duration::from_secs(1),
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejection_percent: 50,
        }
    }

    fn load(id: &str, ok: u64, failed: u64) -> proto::BackendLoad {
        proto::BackendLoad {
            server_id: id.into(),
            successes: ok,
            failures: failed,
            ..Default::default()
        }
    }

    fn ejected_ids(actions: &[Action]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Eject { id, .. } => Some(id.as_str()),
                Action::Return { .. } => None,
            })
            .collect()
    }

    #[test]
    fn streak_ejects_and_ejection_time_grows_then_caps_and_decays() {
        let mut clock = Clock::new();
        let c = config();
        let mut d = Detector::new(clock.now());
        // 4 failures, then a report with a success resets: no ejection.
        assert!(d.report(&c, 4, &[load("a", 0, 4)], clock.now()).is_empty());
        assert!(d.report(&c, 4, &[load("a", 1, 2)], clock.now()).is_empty());
        // 2 + 3 = 5 in a row: ejected for 10 s.
        let a = d.report(&c, 4, &[load("a", 0, 3)], clock.now());
        assert!(
            matches!(&a[..], [Action::Eject { id, duration, .. }] if id == "a" && *duration == Duration::from_secs(10))
        );
        clock.advance(Duration::from_millis(9_999));
        assert!(d.tick(&c, 4, clock.now()).is_empty());
        clock.advance(Duration::from_millis(1));
        assert_eq!(
            d.tick(&c, 4, clock.now()),
            vec![Action::Return { id: "a".into() }]
        );
        // Fails again at once: 20 s, then capped at 25 s.
        let a = d.report(&c, 4, &[load("a", 0, 5)], clock.now());
        assert!(
            matches!(&a[..], [Action::Eject { duration, .. }] if *duration == Duration::from_secs(20))
        );
        clock.advance(Duration::from_secs(20));
        d.tick(&c, 4, clock.now());
        let a = d.report(&c, 4, &[load("a", 0, 5)], clock.now());
        assert!(
            matches!(&a[..], [Action::Eject { duration, .. }] if *duration == Duration::from_secs(25))
        );
        clock.advance(Duration::from_secs(25));
        d.tick(&c, 4, clock.now());
        // Three base times of good behaviour decay the count from 3 to 0: back to 10 s.
        for _ in 0..3 {
            clock.advance(Duration::from_secs(10));
            d.tick(&c, 4, clock.now());
        }
        let a = d.report(&c, 4, &[load("a", 0, 5)], clock.now());
        assert!(
            matches!(&a[..], [Action::Eject { duration, .. }] if *duration == Duration::from_secs(10))
        );
    }

    #[test]
    fn failure_rate_needs_the_minimum_volume() {
        let mut clock = Clock::new();
        let c = config();
        let mut d = Detector::new(clock.now());
        // 6 of 9 failed but alternating (no streak of 5): below min_requests 10.
        for _ in 0..3 {
            d.report(&c, 4, &[load("a", 1, 2)], clock.now());
        }
        clock.advance(Duration::from_secs(1));
        assert!(d.tick(&c, 4, clock.now()).is_empty());
        // 6 of 10: 60 % over the minimum volume (longest streak 3).
        for _ in 0..4 {
            d.report(&c, 4, &[load("a", 1, 1)], clock.now());
        }
        d.report(&c, 4, &[load("a", 0, 2)], clock.now());
        clock.advance(Duration::from_secs(1));
        assert_eq!(ejected_ids(&d.tick(&c, 4, clock.now())), ["a"]);
    }

    #[test]
    fn the_max_ejection_rule_is_exact_and_waiting_candidates_get_room_later() {
        let mut clock = Clock::new();
        let c = config();
        for n in [1usize, 2, 3, 7, 10, 20] {
            let mut d = Detector::new(clock.now());
            let loads: Vec<_> = (0..n).map(|i| load(&format!("b{i:02}"), 0, 5)).collect();
            let a = d.report(&c, n, &loads, clock.now());
            assert_eq!(a.len(), max_ejected(n, 50), "n = {n}");
            assert_eq!(d.ejected(), max_ejected(n, 50));
        }
        // 2 backends, both failing: one ejected; when it returns, the other takes its place.
        let mut d = Detector::new(clock.now());
        let a = d.report(&c, 2, &[load("a", 0, 5), load("b", 0, 5)], clock.now());
        assert_eq!(ejected_ids(&a), ["a"]);
        clock.advance(Duration::from_secs(10));
        let a = d.tick(&c, 2, clock.now());
        assert_eq!(a[0], Action::Return { id: "a".into() });
        assert_eq!(ejected_ids(&a), ["b"]);
    }
}
