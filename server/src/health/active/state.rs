//! The per-backend health state machine: unknown → healthy / unhealthy through the thresholds.
//!
//! Pure data, no clock and no I/O; O(1) per result. The rules (also in `docs/health.md`):
//!
//! * Every result is a **pass** or a **failure**; an answer outside the expected statuses, a
//!   refused connection, a timeout and a wrong reply are all exactly one failure (no kind of
//!   failure bypasses `fall`, and none counts twice). A probe that could not run because the
//!   checker was overloaded is not a result at all ([`Machine::record`] is not called).
//! * `Unknown` (never checked): `rise` consecutive passes → `Healthy`; `fall` consecutive
//!   failures → `Unhealthy`. A result of the other kind restarts the count.
//! * `Healthy`: `fall` consecutive failures → `Unhealthy`; a pass resets the failure count.
//! * `Unhealthy`: `rise` consecutive passes → `Healthy`; a failure resets the pass count.
//! * `health_check_passed` / `health_check_failed` on a checked service each count as one pass
//!   or one failure, exactly like a probe result.

/// What the machine says about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not enough results yet (the backend stays eligible: the probe source is unset).
    Unknown,
    /// `rise` consecutive passes.
    Healthy,
    /// `fall` consecutive failures.
    Unhealthy,
}

/// One backend's state machine. See the module docs.
#[derive(Debug, Clone)]
pub struct Machine {
    state: Health,
    passes: u32,
    fails: u32,
    rise: u32,
    fall: u32,
}

impl Machine {
    /// A machine in `state` with the given thresholds (each at least 1).
    pub fn new(state: Health, rise: u32, fall: u32) -> Self {
        Self {
            state,
            passes: 0,
            fails: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    /// The current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// Consecutive passes and failures counted towards a change.
    pub fn counts(&self) -> (u32, u32) {
        (self.passes, self.fails)
    }

    /// Changes the thresholds (a new configuration); the counts are kept.
    pub fn set_thresholds(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
    }

    /// Whether some results count towards a change of state (the backend is "in transition":
    /// probed at the fast interval).
    pub fn changing(&self) -> bool {
        match self.state {
            Health::Unknown => true,
            Health::Healthy => self.fails > 0,
            Health::Unhealthy => self.passes > 0,
        }
    }

    /// Records one result; returns the new state when it changed.
    pub fn record(&mut self, passed: bool) -> Option<Health> {
        if passed {
            self.fails = 0;
            if self.state == Health::Healthy {
                return None;
            }
            self.passes = self.passes.saturating_add(1);
            if self.passes >= self.rise {
                self.passes = 0;
                self.state = Health::Healthy;
                return Some(Health::Healthy);
            }
        } else {
            self.passes = 0;
            if self.state == Health::Unhealthy {
                return None;
            }
            self.fails = self.fails.saturating_add(1);
            if self.fails >= self.fall {
                self.fails = 0;
                self.state = Health::Unhealthy;
                return Some(Health::Unhealthy);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_becomes_healthy_after_rise_passes() {
        let mut m = Machine::new(Health::Unknown, 2, 3);
        assert_eq!(m.record(true), None);
        assert_eq!(m.record(true), Some(Health::Healthy));
        assert!(!m.changing());
    }

    #[test]
    fn unknown_becomes_unhealthy_after_fall_failures() {
        let mut m = Machine::new(Health::Unknown, 2, 3);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), Some(Health::Unhealthy));
    }

    #[test]
    fn each_failure_counts_exactly_once() {
        // fall = 3: two failures never make a healthy backend unhealthy, whatever the kind of
        // failure; the third does.
        let mut m = Machine::new(Health::Healthy, 2, 3);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), None);
        assert!(m.changing());
        assert_eq!(m.state(), Health::Healthy);
        assert_eq!(m.record(false), Some(Health::Unhealthy));
    }

    #[test]
    fn a_pass_resets_the_failure_count_and_vice_versa() {
        let mut m = Machine::new(Health::Healthy, 2, 2);
        m.record(false);
        m.record(true);
        assert_eq!(m.record(false), None, "the count restarted");
        assert_eq!(m.record(false), Some(Health::Unhealthy));
        m.record(true);
        m.record(false);
        assert_eq!(m.record(true), None, "the pass count restarted");
        assert_eq!(m.record(true), Some(Health::Healthy));
    }

    #[test]
    fn thresholds_of_one_switch_at_once() {
        let mut m = Machine::new(Health::Unknown, 1, 1);
        assert_eq!(m.record(false), Some(Health::Unhealthy));
        assert_eq!(m.record(true), Some(Health::Healthy));
        assert_eq!(m.record(true), None);
    }
}
