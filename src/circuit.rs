//! The SDK's per-backend circuit breaker: configuration and the pure state machine.
//!
//! State is local to each SDK (one [`Breaker`] per backend per process); only its state is
//! reported to the control plane (`BackendLoad.circuit`). The machine is pure: every method takes
//! the current time, so it is tested with an injected clock.
//!
//! * **closed → open** after `consecutive_failures` failures in a row, or when the current
//!   failure-rate window (tumbling, `window` long, started by the first call after the previous
//!   one ended) has `calls ≥ min_requests` and `failures × 100 ≥ failure_rate_percent × calls`.
//! * **open → half-open** once the cool-down has passed, decided lazily by the next pick that
//!   looks at the backend ([`Breaker::try_acquire`]). Cool-down = `base × 2^(trips − 1)`,
//!   capped at `max_cooldown`, where `trips` counts openings since the breaker last stayed
//!   closed for a whole `max_cooldown` (so repeated trips grow the cool-down, and it decays).
//! * **half-open** lets at most `half_open_max_calls` trial calls be in flight; a successful
//!   trial closes the breaker, a failed one opens it again (with the next, longer, cool-down).
//!   A trial dropped without an outcome frees its slot.
//!
//! Every method is O(1).

use std::time::{Duration, Instant};

use crate::proto;
use crate::validation::ValidationError;

/// Defaults of the [`proto::CircuitBreaker`] fields that are 0.
pub mod defaults {
    /// Consecutive failures that open the circuit.
    pub const CONSECUTIVE_FAILURES: u32 = 5;
    /// Minimum calls for the failure-rate rule.
    pub const MIN_REQUESTS: u32 = 20;
    /// Failure-rate window, ms.
    pub const WINDOW_MS: u32 = 10_000;
    /// Base cool-down, ms.
    pub const BASE_COOLDOWN_MS: u32 = 1_000;
    /// Cool-down cap, ms.
    pub const MAX_COOLDOWN_MS: u32 = 60_000;
    /// Trial calls while half-open.
    pub const HALF_OPEN_MAX_CALLS: u32 = 1;
}

/// A service's breaker configuration, defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitConfig {
    /// Failures in a row that open the circuit.
    pub consecutive_failures: u32,
    /// Failure-rate threshold, percent; 0: rule off.
    pub failure_rate_percent: u32,
    /// Minimum calls in a window for the failure-rate rule.
    pub min_requests: u32,
    /// Failure-rate window.
    pub window: Duration,
    /// First cool-down.
    pub base_cooldown: Duration,
    /// Cool-down cap.
    pub max_cooldown: Duration,
    /// Concurrent trial calls while half-open.
    pub half_open_max_calls: u32,
    /// Calls in flight per service per SDK; 0: no cap.
    pub max_concurrent_calls: u32,
}

fn or(v: u32, default: u32) -> u32 {
    if v == 0 {
        default
    } else {
        v
    }
}

/// The breaker configuration of a stored policy, if it has one.
pub fn config(policy: &proto::Policy) -> Option<CircuitConfig> {
    let c = policy.circuit_breaker?;
    let ms = |v| Duration::from_millis(u64::from(v));
    Some(CircuitConfig {
        consecutive_failures: or(c.consecutive_failures, defaults::CONSECUTIVE_FAILURES),
        failure_rate_percent: c.failure_rate_percent,
        min_requests: or(c.min_requests, defaults::MIN_REQUESTS),
        window: ms(or(c.window_ms, defaults::WINDOW_MS)),
        base_cooldown: ms(or(c.base_cooldown_ms, defaults::BASE_COOLDOWN_MS)),
        max_cooldown: ms(or(c.max_cooldown_ms, defaults::MAX_COOLDOWN_MS)),
        half_open_max_calls: or(c.half_open_max_calls, defaults::HALF_OPEN_MAX_CALLS),
        max_concurrent_calls: c.max_concurrent_calls,
    })
}

/// Checks `policy.circuit_breaker` (see the field docs in `dlb.proto` for the ranges).
pub fn validate(policy: &proto::Policy) -> Result<(), ValidationError> {
    let Some(c) = policy.circuit_breaker else {
        return Ok(());
    };
    let f = |name: &str| format!("policy.circuit_breaker.{name}");
    if c.failure_rate_percent > 100 {
        return Err(ValidationError::new(
            f("failure_rate_percent"),
            c.failure_rate_percent,
            "must be 0 (off) or between 1 and 100",
        ));
    }
    if c.window_ms != 0 && !(100..=600_000).contains(&c.window_ms) {
        return Err(ValidationError::new(
            f("window_ms"),
            c.window_ms,
            "must be between 100 and 600000; 0 means the default (10000)",
        ));
    }
    let base = or(c.base_cooldown_ms, defaults::BASE_COOLDOWN_MS);
    let max = or(c.max_cooldown_ms, defaults::MAX_COOLDOWN_MS);
    if !(10..=3_600_000).contains(&base) {
        return Err(ValidationError::new(
            f("base_cooldown_ms"),
            c.base_cooldown_ms,
            "must be between 10 and 3600000; 0 means the default (1000)",
        ));
    }
    if max < base || max > 3_600_000 {
        return Err(ValidationError::new(
            f("max_cooldown_ms"),
            c.max_cooldown_ms,
            "must be at least base_cooldown_ms and at most 3600000; 0 means the default (60000)",
        ));
    }
    if c.half_open_max_calls > 1000 {
        return Err(ValidationError::new(
            f("half_open_max_calls"),
            c.half_open_max_calls,
            "must be at most 1000; 0 means the default (1)",
        ));
    }
    Ok(())
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls flow.
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// Trial calls go through.
    HalfOpen,
}

impl State {
    /// The wire value.
    pub fn to_proto(self) -> proto::CircuitState {
        match self {
            State::Closed => proto::CircuitState::Closed,
            State::Open => proto::CircuitState::Open,
            State::HalfOpen => proto::CircuitState::HalfOpen,
        }
    }
}

/// What [`Breaker::try_acquire`] grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A normal call (closed).
    Call,
    /// A half-open trial call: report its outcome with `trial = true`.
    Trial,
    /// Refused (open, or half-open with every trial slot taken).
    Refused,
}

/// One backend's breaker. See the module docs.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    consecutive: u32,
    window_start: Option<Instant>,
    calls: u32,
    failures: u32,
    trips: u32,
    open_until: Option<Instant>,
    closed_since: Option<Instant>,
    trials: u32,
}

impl Default for Breaker {
    fn default() -> Self {
        Self::new()
    }
}

impl Breaker {
    /// A closed breaker.
    pub fn new() -> Self {
        Self {
            state: State::Closed,
            consecutive: 0,
            window_start: None,
            calls: 0,
            failures: 0,
            trips: 0,
            open_until: None,
            closed_since: None,
            trials: 0,
        }
    }

    /// The state (an open breaker whose cool-down ended still says `Open` until a pick asks).
    pub fn state(&self) -> State {
        self.state
    }

    /// Openings counted for the cool-down.
    pub fn trips(&self) -> u32 {
        self.trips
    }

    /// The cool-down for the `trips`-th opening.
    pub fn cooldown(cfg: &CircuitConfig, trips: u32) -> Duration {
        let shift = trips.saturating_sub(1).min(31);
        cfg.base_cooldown
            .saturating_mul(1u32 << shift)
            .min(cfg.max_cooldown)
    }

    /// Asks to send a call to the backend now.
    pub fn try_acquire(&mut self, cfg: &CircuitConfig, now: Instant) -> Admit {
        match self.state {
            State::Closed => Admit::Call,
            State::Open => {
                if self.open_until.is_some_and(|t| now >= t) {
                    self.state = State::HalfOpen;
                    self.trials = 1;
                    Admit::Trial
                } else {
                    Admit::Refused
                }
            }
            State::HalfOpen => {
                if self.trials < cfg.half_open_max_calls {
                    self.trials += 1;
                    Admit::Trial
                } else {
                    Admit::Refused
                }
            }
        }
    }

    /// A trial call ended without an outcome: frees its slot.
    pub fn release_trial(&mut self) {
        self.trials = self.trials.saturating_sub(1);
    }

    /// Records a call's outcome; `trial` says whether [`Breaker::try_acquire`] granted it as a
    /// trial. Returns whether the state changed.
    pub fn record(&mut self, cfg: &CircuitConfig, ok: bool, trial: bool, now: Instant) -> bool {
        let before = self.state;
        match self.state {
            State::HalfOpen if trial => {
                self.release_trial();
                if ok {
                    self.close(now);
                } else {
                    self.open(cfg, now);
                }
            }
            // Outcomes of calls started before the circuit opened, or non-trial calls.
            State::Open | State::HalfOpen => {}
            State::Closed => {
                if self
                    .window_start
                    .is_none_or(|s| now.saturating_duration_since(s) >= cfg.window)
                {
                    self.window_start = Some(now);
                    self.calls = 0;
                    self.failures = 0;
                }
                self.calls = self.calls.saturating_add(1);
                if ok {
                    self.consecutive = 0;
                } else {
                    self.consecutive = self.consecutive.saturating_add(1);
                    self.failures = self.failures.saturating_add(1);
                }
                let by_streak = self.consecutive >= cfg.consecutive_failures;
                let by_rate = cfg.failure_rate_percent > 0
                    && self.calls >= cfg.min_requests
                    && u64::from(self.failures) * 100
                        >= u64::from(cfg.failure_rate_percent) * u64::from(self.calls);
                if by_streak || by_rate {
                    // A breaker that stayed closed for a whole max cool-down starts over.
                    if self
                        .closed_since
                        .is_some_and(|c| now.saturating_duration_since(c) >= cfg.max_cooldown)
                    {
                        self.trips = 0;
                    }
                    self.open(cfg, now);
                }
            }
        }
        self.state != before
    }

    fn open(&mut self, cfg: &CircuitConfig, now: Instant) {
        self.trips = self.trips.saturating_add(1);
        self.state = State::Open;
        self.open_until = Some(now + Self::cooldown(cfg, self.trips));
        self.trials = 0;
    }

    fn close(&mut self, now: Instant) {
        self.state = State::Closed;
        self.consecutive = 0;
        self.window_start = None;
        self.calls = 0;
        self.failures = 0;
        self.open_until = None;
        self.closed_since = Some(now);
        self.trials = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CircuitConfig {
        CircuitConfig {
            consecutive_failures: 3,
            failure_rate_percent: 0,
            min_requests: 10,
            window: Duration::from_secs(10),
            base_cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(5),
            half_open_max_calls: 2,
            max_concurrent_calls: 0,
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn opens_after_n_failures_then_half_open_then_closes() {
        let c = cfg();
        let t0 = Instant::now();
        let mut b = Breaker::new();
        assert!(!b.record(&c, false, false, t0));
        assert!(!b.record(&c, true, false, t0)); // a success resets the streak
        b.record(&c, false, false, t0);
        b.record(&c, false, false, t0);
        assert!(b.record(&c, false, false, t0));
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.try_acquire(&c, t0 + S / 2), Admit::Refused);
        // Cool-down over: two trials, the third refused.
        assert_eq!(b.try_acquire(&c, t0 + S), Admit::Trial);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.try_acquire(&c, t0 + S), Admit::Trial);
        assert_eq!(b.try_acquire(&c, t0 + S), Admit::Refused);
        b.release_trial();
        assert_eq!(b.try_acquire(&c, t0 + S), Admit::Trial);
        assert!(b.record(&c, true, true, t0 + S));
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.try_acquire(&c, t0 + S), Admit::Call);
    }

    #[test]
    fn cooldown_grows_on_repeated_trips_capped_and_decays() {
        let c = cfg();
        let t0 = Instant::now();
        let mut b = Breaker::new();
        for _ in 0..3 {
            b.record(&c, false, false, t0);
        }
        assert_eq!(b.trips(), 1);
        // Failed trials: 1 s, then 2 s, 4 s, 5 s (cap).
        let mut now = t0;
        for want in [2u64, 4, 5, 5] {
            now += Breaker::cooldown(&c, b.trips());
            assert_eq!(
                b.try_acquire(&c, now - Duration::from_millis(1)),
                Admit::Refused
            );
            assert_eq!(b.try_acquire(&c, now), Admit::Trial);
            b.record(&c, false, true, now);
            assert_eq!(Breaker::cooldown(&c, b.trips()), Duration::from_secs(want));
        }
        // Close, stay closed for a max cool-down: the next trip starts at the base again.
        now += Breaker::cooldown(&c, b.trips());
        assert_eq!(b.try_acquire(&c, now), Admit::Trial);
        b.record(&c, true, true, now);
        now += c.max_cooldown;
        for _ in 0..3 {
            b.record(&c, false, false, now);
        }
        assert_eq!(b.trips(), 1);
    }

    #[test]
    fn failure_rate_over_a_window() {
        let c = CircuitConfig {
            consecutive_failures: 1000,
            failure_rate_percent: 50,
            ..cfg()
        };
        let t0 = Instant::now();
        let mut b = Breaker::new();
        // 9 calls, 5 failures: below min_requests.
        for i in 0..9 {
            b.record(&c, i % 2 == 1, false, t0);
        }
        assert_eq!(b.state(), State::Closed);
        // A new window forgets them.
        for i in 0..9 {
            b.record(&c, i % 2 == 1, false, t0 + c.window);
        }
        assert_eq!(b.state(), State::Closed);
        // The 10th call: 5 of 10 failed, ≥ 50 %.
        b.record(&c, true, false, t0 + c.window);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn late_outcomes_do_not_move_an_open_breaker() {
        let c = cfg();
        let t0 = Instant::now();
        let mut b = Breaker::new();
        for _ in 0..3 {
            b.record(&c, false, false, t0);
        }
        assert!(!b.record(&c, true, false, t0));
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn config_defaults_and_validation() {
        let mut p = crate::model::default_policy();
        assert!(config(&p).is_none());
        p.circuit_breaker = Some(proto::CircuitBreaker::default());
        let c = config(&p).unwrap();
        assert_eq!(c.consecutive_failures, 5);
        assert_eq!(c.base_cooldown, Duration::from_secs(1));
        assert!(validate(&p).is_ok());
        p.circuit_breaker = Some(proto::CircuitBreaker {
            base_cooldown_ms: 5_000,
            max_cooldown_ms: 1_000,
            ..Default::default()
        });
        assert!(validate(&p)
            .unwrap_err()
            .to_string()
            .contains("max_cooldown_ms"));
    }
}
