//! Flap damping: a backend whose health changes too often is held out for a growing hold-down.
//!
//! The rule (also in `docs/health.md`): every healthy ↔ unhealthy transition of the state
//! machine is recorded with its time. When more than `threshold` transitions fall within the
//! last `window`, the backend is **held down**: its probe source says UNHEALTHY with the detail
//! `flapping …` for the hold-down, whatever the probes say (they keep running and the state
//! machine keeps following them). The n-th hold-down in a row lasts
//! `min(hold_down × 2^(n-1), max_hold_down)`; the count `n` restarts once the backend has gone
//! `max_hold_down` without being held down. A hold-down clears the recorded transitions; when it
//! ends, the backend is at once held again (one step longer) if it flapped past the threshold
//! during the hold-down.
//!
//! Pure: the caller passes the time in (tokio's `Instant`, so tests run on paused time).
//! O(threshold) memory and O(1) amortised per transition.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The damper of one backend. See the module docs.
#[derive(Debug, Clone)]
pub struct Damper {
    threshold: u32,
    window: Duration,
    hold_down: Duration,
    max_hold_down: Duration,
    transitions: VecDeque<Instant>,
    held_until: Option<Instant>,
    /// Hold-downs in a row (the next one lasts `hold_down × 2^repeats`).
    repeats: u32,
    last_hold_end: Option<Instant>,
}

impl Damper {
    /// A damper; `threshold` 0 disables damping.
    pub fn new(
        threshold: u32,
        window: Duration,
        hold_down: Duration,
        max_hold_down: Duration,
    ) -> Self {
        Self {
            threshold,
            window,
            hold_down,
            max_hold_down: max_hold_down.max(hold_down),
            transitions: VecDeque::new(),
            held_until: None,
            repeats: 0,
            last_hold_end: None,
        }
    }

    /// When the current hold-down ends, if the backend is held down at `now`.
    pub fn held_until(&self, now: Instant) -> Option<Instant> {
        self.held_until.filter(|t| *t > now)
    }

    /// Number of the current (or last) hold-down in a row, from 1.
    pub fn repeats(&self) -> u32 {
        self.repeats
    }

    fn prune(&mut self, now: Instant) {
        while let Some(t) = self.transitions.front() {
            if now.saturating_duration_since(*t) > self.window {
                self.transitions.pop_front();
            } else {
                break;
            }
        }
    }

    fn maybe_hold(&mut self, now: Instant) -> Option<Duration> {
        if self.threshold == 0 || self.held_until(now).is_some() {
            return None;
        }
        self.prune(now);
        if self.transitions.len() <= self.threshold as usize {
            return None;
        }
        if let Some(end) = self.last_hold_end {
            if now.saturating_duration_since(end) >= self.max_hold_down {
                self.repeats = 0;
            }
        }
        let factor = 1u32.checked_shl(self.repeats.min(31)).unwrap_or(u32::MAX);
        let hold = self
            .hold_down
            .checked_mul(factor)
            .unwrap_or(self.max_hold_down)
            .min(self.max_hold_down);
        self.repeats = self.repeats.saturating_add(1);
        self.transitions.clear();
        let until = now + hold;
        self.held_until = Some(until);
        self.last_hold_end = Some(until);
        Some(hold)
    }

    /// Records a healthy ↔ unhealthy transition at `now`; returns the hold-down it starts, if
    /// any.
    pub fn on_transition(&mut self, now: Instant) -> Option<Duration> {
        if self.threshold == 0 {
            return None;
        }
        self.transitions.push_back(now);
        // Bounded memory: more than threshold + 1 entries never change a decision.
        while self.transitions.len() > self.threshold as usize + 1 {
            self.transitions.pop_front();
        }
        self.maybe_hold(now)
    }

    /// Called when a hold-down's end is reached: returns a new (longer) hold-down when the
    /// backend kept flapping past the threshold meanwhile.
    pub fn on_hold_end(&mut self, now: Instant) -> Option<Duration> {
        self.maybe_hold(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn more_than_k_transitions_in_the_window_hold_down_and_the_hold_grows() {
        let mut d = Damper::new(3, 60 * S, 10 * S, 35 * S);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(d.on_transition(t0 + i * S), None, "{i}: at most K");
        }
        assert_eq!(
            d.on_transition(t0 + 3 * S),
            Some(10 * S),
            "K + 1 within the window"
        );
        assert_eq!(d.held_until(t0 + 5 * S), Some(t0 + 13 * S));
        assert_eq!(d.held_until(t0 + 13 * S), None, "over");
        // Flapping again: 20 s, then 35 s (capped), not 40.
        let t1 = t0 + 20 * S;
        for i in 0..4 {
            let h = d.on_transition(t1 + i * S);
            assert_eq!(h, (i == 3).then_some(20 * S));
        }
        let t2 = t1 + 30 * S;
        for i in 0..4 {
            let h = d.on_transition(t2 + i * S);
            assert_eq!(h, (i == 3).then_some(35 * S));
        }
        assert_eq!(d.repeats(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn transitions_outside_the_window_do_not_count() {
        let mut d = Damper::new(2, 10 * S, 5 * S, 50 * S);
        let t0 = Instant::now();
        for i in 0..10u32 {
            assert_eq!(d.on_transition(t0 + i * 6 * S), None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn flapping_during_a_hold_down_extends_it_at_its_end() {
        let mut d = Damper::new(1, 60 * S, 10 * S, 100 * S);
        let t0 = Instant::now();
        d.on_transition(t0);
        assert_eq!(d.on_transition(t0 + S), Some(10 * S));
        assert_eq!(d.on_transition(t0 + 2 * S), None, "already held");
        d.on_transition(t0 + 3 * S);
        assert_eq!(d.on_hold_end(t0 + 11 * S), Some(20 * S));
        assert_eq!(d.on_hold_end(t0 + 31 * S), None, "quiet meanwhile");
    }

    #[tokio::test(start_paused = true)]
    async fn the_repeat_count_restarts_after_a_quiet_max_hold_down() {
        let mut d = Damper::new(1, 60 * S, 10 * S, 40 * S);
        let t0 = Instant::now();
        d.on_transition(t0);
        assert_eq!(d.on_transition(t0), Some(10 * S));
        let later = t0 + 10 * S + 40 * S;
        d.on_transition(later);
        assert_eq!(
            d.on_transition(later),
            Some(10 * S),
            "back to the first step"
        );
    }

    #[test]
    fn threshold_zero_disables() {
        let mut d = Damper::new(0, S, S, S);
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(d.on_transition(now), None);
        }
    }
}
