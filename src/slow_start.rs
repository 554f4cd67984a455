//! Slow start: the weight ramp of a newly eligible backend, shared by the SDK and `dlbd`.
//!
//! The control plane stamps `Server.ready_since_ms` (wall clock, Unix ms) when a backend becomes
//! eligible — on add, and on every ineligible → eligible transition (back from unhealthy,
//! ejected or draining) — and keeps it while eligibility does not change (see
//! [`stamp_ready_since`]). Every picker builder (the SDK's session task, `dlbd`'s builder task)
//! then derives the ramp locally from the records, so nothing is pushed while a backend ramps.
//!
//! **Ramp.** With window `T` and minimum `m` percent, a backend eligible for `e < T` ms gets the
//! factor `f = (m + (100 − m) · e / T) / 100`; at `e ≥ T` it is at full weight. To keep the ramp
//! visible when weights are small (two backends of weight 1), while anything ramps every
//! eligible weight is first multiplied by `k = clamp(⌊10000 / max weight⌋, 1, 100)` (proportions
//! unchanged); a ramping backend then gets `max(1, ⌈w · k · f⌉)`.
//!
//! **All new.** When every eligible backend is ramping (a fresh service, or all recovered at
//! once) none is held back: all get full weight, since slowing them all changes no share.
//!
//! **Tick.** The ramp is stepwise: the builder rebuilds its picker at [`next_tick`], i.e. every
//! `T / 10` (at least 100 ms) while something ramps, and exactly when the earliest ramp ends.
//! The weights therefore lag the exact ramp by at most one tick (10 % of the window).
//!
//! **Clocks.** `ready_since_ms` comes from `dlbd`'s clock and is compared with the local one;
//! a stamp in the future (skew) counts as "just became eligible", and one more than a window in
//! the future is ignored (no ramp), so skew can never hold a backend back for long.
//!
//! Cost: `O(n)` per build, only when the policy has slow start.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::balance::{BackendSpec, MAX_WEIGHT};
use crate::proto;
use crate::validation::ValidationError;

/// Default minimum percent at the start of a ramp.
pub const DEFAULT_MIN_PERCENT: u32 = 10;
/// Accepted window range, milliseconds.
pub const WINDOW_RANGE_MS: std::ops::RangeInclusive<u32> = 100..=3_600_000;
/// Shortest rebuild tick during a ramp.
pub const MIN_TICK: Duration = Duration::from_millis(100);

/// The slow-start configuration of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowStartConfig {
    /// Ramp length, milliseconds (> 0).
    pub window_ms: u64,
    /// Share at the start, percent (1..=100).
    pub min_percent: u32,
}

/// The configuration of a stored policy, if slow start is on.
pub fn config(policy: &proto::Policy) -> Option<SlowStartConfig> {
    let s = policy.slow_start?;
    (s.window_ms > 0).then(|| SlowStartConfig {
        window_ms: u64::from(s.window_ms),
        min_percent: if s.min_percent == 0 {
            DEFAULT_MIN_PERCENT
        } else {
            s.min_percent.min(100)
        },
    })
}

/// Checks `policy.slow_start`.
pub fn validate(policy: &proto::Policy) -> Result<(), ValidationError> {
    let Some(s) = policy.slow_start else {
        return Ok(());
    };
    if s.window_ms != 0 && !WINDOW_RANGE_MS.contains(&s.window_ms) {
        return Err(ValidationError::new(
            "policy.slow_start.window_ms",
            s.window_ms,
            "must be 0 (off) or between 100 and 3600000",
        ));
    }
    if s.min_percent > 100 {
        return Err(ValidationError::new(
            "policy.slow_start.min_percent",
            s.min_percent,
            "must be between 1 and 100; 0 means the default (10)",
        ));
    }
    Ok(())
}

/// The local wall clock, Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sets `new.ready_since_ms` from the record before the write (`old`, `None` for a new
/// backend) and whether each is eligible: `now_ms` when it becomes eligible, kept while it stays
/// eligible, 0 while ineligible. Call it after the derived fields are stamped.
pub fn stamp_ready_since(old: Option<&proto::Server>, new: &mut proto::Server, now_ms: u64) {
    let eligible = crate::sources::is_eligible(new);
    new.ready_since_ms = match old {
        _ if !eligible => 0,
        Some(o) if crate::sources::is_eligible(o) => o.ready_since_ms,
        _ => now_ms.max(1),
    };
}

/// How far into its ramp a backend is: `Some(elapsed ms)` while ramping, `None` when not.
fn elapsed(ready_since_ms: u64, now_ms: u64, cfg: &SlowStartConfig) -> Option<u64> {
    if ready_since_ms == 0 || ready_since_ms > now_ms.saturating_add(cfg.window_ms) {
        return None;
    }
    let e = now_ms.saturating_sub(ready_since_ms);
    (e < cfg.window_ms).then_some(e)
}

/// The ramp factor in millionths for a backend `e` ms into a window.
fn factor_ppm(e: u64, cfg: &SlowStartConfig) -> u64 {
    let m = u64::from(cfg.min_percent) * 10_000;
    m + (1_000_000 - m) * e / cfg.window_ms
}

/// Applies the ramp to picker inputs: `ready[i]` is the `ready_since_ms` of `specs[i]`. Returns
/// whether any weight was changed. See the module docs for the rule.
pub fn apply(specs: &mut [BackendSpec], ready: &[u64], now_ms: u64, cfg: &SlowStartConfig) -> bool {
    let ramping: Vec<Option<u64>> = specs
        .iter()
        .zip(ready)
        .map(|(s, &r)| s.eligible.then(|| elapsed(r, now_ms, cfg)).flatten())
        .collect();
    let eligible = specs.iter().filter(|s| s.eligible).count();
    let ramps = ramping.iter().filter(|r| r.is_some()).count();
    if ramps == 0 || ramps == eligible {
        return false;
    }
    let max = specs.iter().map(|s| s.weight).max().unwrap_or(1).max(1);
    let k = u64::from((MAX_WEIGHT / max).clamp(1, 100));
    for (s, r) in specs.iter_mut().zip(&ramping) {
        let full = u64::from(s.weight) * k;
        let w = match r {
            None => full,
            Some(e) => (full * factor_ppm(*e, cfg)).div_ceil(1_000_000).max(1),
        };
        s.weight = u32::try_from(w.min(u64::from(MAX_WEIGHT))).unwrap_or(MAX_WEIGHT);
    }
    true
}

/// When the builder should rebuild next for the ramp to progress: `None` when no eligible
/// backend is ramping (or all are: then none is held back, see the module docs), otherwise the
/// smaller of `T / 10` (at least [`MIN_TICK`]) and the time until the earliest ramp ends.
pub fn next_tick<'a>(
    policy: &proto::Policy,
    servers: impl IntoIterator<Item = &'a proto::Server>,
    now_ms: u64,
) -> Option<Duration> {
    let cfg = config(policy)?;
    let mut eligible = 0usize;
    let mut ramps = 0usize;
    let mut soonest = u64::MAX;
    for s in servers {
        if !crate::sources::is_eligible(s) {
            continue;
        }
        eligible += 1;
        if let Some(e) = elapsed(s.ready_since_ms, now_ms, &cfg) {
            ramps += 1;
            soonest = soonest.min(cfg.window_ms - e);
        }
    }
    if ramps == 0 {
        return None;
    }
    let tick = Duration::from_millis(cfg.window_ms / 10).max(MIN_TICK);
    if ramps == eligible {
        // All new: nothing is held back now, but a backend that joins later would be, and the
        // ramps end at `soonest` at the latest; a rebuild then is cheap and keeps this exact.
        return Some(Duration::from_millis(soonest));
    }
    Some(tick.min(Duration::from_millis(soonest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, weight: u32) -> BackendSpec {
        BackendSpec {
            id: id.into(),
            address: "127.0.0.1:1".into(),
            weight,
            hash_key: None,
            eligible: true,
        }
    }

    const CFG: SlowStartConfig = SlowStartConfig {
        window_ms: 1000,
        min_percent: 10,
    };

    #[test]
    fn a_new_backend_ramps_from_min_to_full() {
        let now = 1_000_000;
        let at = |since: u64| {
            let mut s = vec![spec("old", 1), spec("new", 1)];
            apply(&mut s, &[1, since], now, &CFG);
            (s[0].weight, s[1].weight)
        };
        assert_eq!(at(now), (100, 10));
        assert_eq!(at(now - 500), (100, 55));
        assert_eq!(at(now - 999), (100, 100));
        // Done: untouched weights.
        assert_eq!(at(now - 1000), (1, 1));
        // Not stamped (older records): no ramp.
        assert_eq!(at(0), (1, 1));
    }

    #[test]
    fn all_new_holds_none_back_and_ineligible_do_not_count() {
        let now = 10_000;
        let mut s = vec![spec("a", 3), spec("b", 5)];
        assert!(!apply(&mut s, &[now, now - 10], now, &CFG));
        assert_eq!((s[0].weight, s[1].weight), (3, 5));
        // An ineligible old backend does not make the others "not all new".
        let mut s = vec![spec("a", 3), spec("b", 5)];
        s[0].eligible = false;
        assert!(!apply(&mut s, &[1, now], now, &CFG));
    }

    #[test]
    fn large_weights_keep_their_proportions_and_stay_in_range() {
        let now = 5_000;
        let mut s = vec![spec("a", 10_000), spec("b", 10_000)];
        apply(&mut s, &[1, now], now, &CFG);
        assert_eq!((s[0].weight, s[1].weight), (10_000, 1_000));
        let mut s = vec![spec("a", 200), spec("b", 1)];
        apply(&mut s, &[1, now], now, &CFG);
        assert_eq!((s[0].weight, s[1].weight), (10_000, 5));
    }

    #[test]
    fn clock_skew_is_bounded() {
        let now = 5_000;
        let mut s = vec![spec("a", 1), spec("b", 1)];
        // Slightly in the future: at the start of the ramp.
        apply(&mut s, &[1, now + 200], now, &CFG);
        assert_eq!(s[1].weight, 10);
        // Far in the future: ignored.
        let mut s = vec![spec("a", 1), spec("b", 1)];
        assert!(!apply(&mut s, &[1, now + 5_000], now, &CFG));
    }

    fn server(id: &str, ready: u64, eligible: bool) -> proto::Server {
        proto::Server {
            server_id: id.into(),
            weight: 1,
            ready_since_ms: ready,
            health: if eligible {
                proto::HealthStatus::Healthy as i32
            } else {
                proto::HealthStatus::Unhealthy as i32
            },
            ..Default::default()
        }
    }

    #[test]
    fn ticks_follow_the_window() {
        let mut policy = crate::model::default_policy();
        assert_eq!(next_tick(&policy, &[server("a", 1, true)], 10), None);
        policy.slow_start = Some(proto::SlowStart {
            window_ms: 1000,
            min_percent: 0,
        });
        let now = 100_000;
        let old = server("a", 1, true);
        assert_eq!(next_tick(&policy, [&old], now), None);
        let new = server("b", now - 950, true);
        assert_eq!(
            next_tick(&policy, [&old, &new], now),
            Some(Duration::from_millis(50))
        );
        let new = server("b", now, true);
        assert_eq!(
            next_tick(&policy, [&old, &new], now),
            Some(Duration::from_millis(100))
        );
    }

    #[test]
    fn ready_since_is_stamped_on_becoming_eligible_only() {
        let up = server("a", 0, true);
        let down = server("a", 0, false);
        let mut n = up.clone();
        stamp_ready_since(None, &mut n, 42);
        assert_eq!(n.ready_since_ms, 42);
        let mut later = n.clone();
        stamp_ready_since(Some(&n), &mut later, 99);
        assert_eq!(later.ready_since_ms, 42);
        let mut d = down.clone();
        stamp_ready_since(Some(&later), &mut d, 100);
        assert_eq!(d.ready_since_ms, 0);
        let mut back = up.clone();
        stamp_ready_since(Some(&d), &mut back, 200);
        assert_eq!(back.ready_since_ms, 200);
    }

    #[test]
    fn validation_names_the_field() {
        let mut policy = crate::model::default_policy();
        policy.slow_start = Some(proto::SlowStart {
            window_ms: 50,
            min_percent: 0,
        });
        assert!(validate(&policy)
            .unwrap_err()
            .to_string()
            .contains("slow_start.window_ms"));
        policy.slow_start = Some(proto::SlowStart {
            window_ms: 500,
            min_percent: 101,
        });
        assert!(validate(&policy)
            .unwrap_err()
            .to_string()
            .contains("min_percent"));
    }
}
