//! Panic mode: what a picker does when too few of a service's backends are eligible.
//!
//! A service configured with a panic threshold `t` percent (1..=100) and `n > 0` backends of
//! which `e` are eligible is **in panic** when `e × 100 < t × n` (integer arithmetic, exact; a
//! service with no backend never panics). In panic the picker either
//!
//! * [`PanicMode::RouteAll`]: treats every backend as eligible (Envoy's panic routing: better
//!   to spread load over backends believed bad than to crush the few believed good), or
//! * [`PanicMode::Fail`]: fails every pick fast with [`PickError::Panic`](super::PickError::Panic).
//!
//! The decision is made once, when the picker is built ([`Picker::build`](super::Picker::build)),
//! from the records it is built from. The SDK and `dlbd`'s `GetNextServer` build from the same
//! records with the same code, so every SDK and the control plane agree on it at every version.
//! [`evaluate`] is O(1); counting the eligible backends is part of the O(n) build.

/// What a panicking service does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PanicMode {
    /// Route across all backends, eligible or not.
    RouteAll,
    /// Fail every pick.
    Fail,
}

/// A service's panic configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PanicConfig {
    /// Threshold in percent, 1..=100: panic when fewer than this share of backends are eligible.
    pub threshold_percent: u32,
    /// What to do in panic.
    pub mode: PanicMode,
}

/// The panic state of one picker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PanicState {
    /// Whether the service is in panic.
    pub active: bool,
    /// Eligible backends (by their own health, before any panic routing).
    pub eligible: usize,
    /// All backends.
    pub total: usize,
    /// The configured mode, `None` when panic is off.
    pub mode: Option<PanicMode>,
}

/// Whether a service with `eligible` of `total` backends eligible is in panic under `config`:
/// `total > 0 && eligible × 100 < threshold × total`.
pub fn evaluate(config: Option<&PanicConfig>, eligible: usize, total: usize) -> PanicState {
    let active = config.is_some_and(|c| {
        total > 0 && (eligible as u128) * 100 < u128::from(c.threshold_percent) * total as u128
    });
    PanicState {
        active,
        eligible,
        total,
        mode: config.map(|c| c.mode),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(t: u32) -> PanicConfig {
        PanicConfig {
            threshold_percent: t,
            mode: PanicMode::Fail,
        }
    }

    #[test]
    fn pickers_route_all_or_fail_in_panic() {
        use crate::balance::{Algorithm, BackendSpec, PickError, Picker, PolicyConfig};
        let specs: Vec<BackendSpec> = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, id)| BackendSpec {
                id: (*id).into(),
                address: format!("10.0.0.{i}:80"),
                weight: 1,
                hash_key: None,
                eligible: i == 0,
            })
            .collect();
        for algorithm in [
            Algorithm::RoundRobin,
            Algorithm::LeastConnExact,
            Algorithm::LeastConnP2c,
            Algorithm::Maglev,
            Algorithm::RingHash,
        ] {
            let mut policy = PolicyConfig::new(algorithm);
            policy.panic = Some(PanicConfig {
                threshold_percent: 50,
                mode: PanicMode::RouteAll,
            });
            let p = Picker::build(&policy, &specs).expect("valid");
            assert!(p.panic_state().active);
            let mut seen = std::collections::BTreeSet::new();
            for i in 0..400u32 {
                let key = i.to_le_bytes();
                seen.insert(
                    p.pick(Some(&key))
                        .expect("route_all")
                        .backend()
                        .id()
                        .to_owned(),
                );
            }
            assert_eq!(seen.len(), 4, "{algorithm:?}");
            policy.panic = Some(PanicConfig {
                threshold_percent: 50,
                mode: PanicMode::Fail,
            });
            let p = Picker::build(&policy, &specs).expect("valid");
            assert_eq!(
                p.pick(None).expect_err("fail"),
                PickError::Panic {
                    eligible: 1,
                    total: 4
                }
            );
            // 25 % threshold: 1 of 4 is not below it; only the eligible backend is picked.
            policy.panic = Some(PanicConfig {
                threshold_percent: 25,
                mode: PanicMode::Fail,
            });
            let p = Picker::build(&policy, &specs).expect("valid");
            assert!(!p.panic_state().active);
            assert_eq!(p.pick(Some(b"k")).expect("eligible").backend().id(), "a");
        }
    }

    #[test]
    fn threshold_is_exact() {
        // 50 %: 5 of 10 is not panic, 4 of 10 is.
        assert!(!evaluate(Some(&cfg(50)), 5, 10).active);
        assert!(evaluate(Some(&cfg(50)), 4, 10).active);
        // 1 of 3 at 34 %: 100 < 102.
        assert!(evaluate(Some(&cfg(34)), 1, 3).active);
        assert!(!evaluate(Some(&cfg(33)), 1, 3).active);
        // 100 %: any ineligible backend panics.
        assert!(evaluate(Some(&cfg(100)), 9, 10).active);
        assert!(!evaluate(Some(&cfg(100)), 10, 10).active);
        // No backends, or no config: never.
        assert!(!evaluate(Some(&cfg(100)), 0, 0).active);
        assert!(!evaluate(None, 0, 10).active);
        assert_eq!(evaluate(None, 0, 10).mode, None);
    }
}
