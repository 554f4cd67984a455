//! Building a [`Picker`]: checking the [`BackendSpec`]s, carrying each surviving backend's load
//! and strings over from the previous picker, deciding panic mode, and building the policy's
//! table over the eligible backends (or, for the hashing policies, over all of them in
//! [hash order](super::hash)).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::groups::{Group, Grouping, Groups};
use super::picker::{Bounded, Strategy};
use super::{
    ewma, hash, least_conn, maglev, panic, ring, wrr, Algorithm, Backend, BackendLoad, BackendSpec,
    BuildError, PanicMode, Picker, PolicyConfig, MAX_BACKENDS, MAX_WEIGHT,
};

impl Picker {
    /// Builds a picker with fresh in-flight counters. Cost: see the module docs (`O(n)` to
    /// `O(M log M)`); call it off the request path.
    pub fn build(policy: &PolicyConfig, specs: &[BackendSpec]) -> Result<Self, BuildError> {
        Self::build_with(policy, specs, None, |_| None, Arc::default())
    }

    /// Builds a grouped picker (locality: see `groups.rs`): one selection strategy per group of
    /// `grouping`, picks spread over the groups by [`Picker::set_shares`] (until then, all to the
    /// first group that can pick). Errors as [`Picker::build`], and
    /// [`BuildError::InvalidGrouping`] when `grouping` does not fit `specs`.
    pub fn build_grouped(
        policy: &PolicyConfig,
        specs: &[BackendSpec],
        grouping: &Grouping<'_>,
    ) -> Result<Self, BuildError> {
        Self::build_with(policy, specs, Some(grouping), |_| None, Arc::default())
    }

    /// [`Picker::rebuild`] for a grouped picker: in-flight accounting carries over by id, also
    /// for a backend that moved to another group (or from an ungrouped picker).
    pub fn rebuild_grouped(
        &self,
        policy: &PolicyConfig,
        specs: &[BackendSpec],
        grouping: &Grouping<'_>,
    ) -> Result<Self, BuildError> {
        Self::build_with(
            policy,
            specs,
            Some(grouping),
            |id| self.by_id.get(id).map(|&i| &self.backends[i]),
            self.total.clone(),
        )
    }

    /// Builds a picker for a new state of the same service, carrying each surviving backend's
    /// in-flight accounting over by id (and the bounded-load total). Unchanged ids, addresses
    /// and hash keys share the previous picker's strings instead of being allocated again.
    pub fn rebuild(
        &self,
        policy: &PolicyConfig,
        specs: &[BackendSpec],
    ) -> Result<Self, BuildError> {
        Self::build_with(
            policy,
            specs,
            None,
            |id| self.by_id.get(id).map(|&i| &self.backends[i]),
            self.total.clone(),
        )
    }

    fn build_with<'p>(
        policy: &PolicyConfig,
        specs: &[BackendSpec],
        grouping: Option<&Grouping<'_>>,
        previous: impl Fn(&str) -> Option<&'p Backend>,
        total: Arc<AtomicU64>,
    ) -> Result<Self, BuildError> {
        if let Some(c) = policy.bounded_load_factor {
            if !(c.is_finite() && c >= 1.0) {
                return Err(BuildError::InvalidLoadFactor(c));
            }
        }
        if specs.len() > MAX_BACKENDS {
            return Err(BuildError::TooLarge(format!(
                "{} backends, at most {MAX_BACKENDS} are supported",
                specs.len()
            )));
        }
        if let Some(g) = grouping {
            check_grouping(g, specs.len())?;
        }
        let mut by_id = HashMap::with_capacity(specs.len());
        let mut backends = Vec::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            if s.id.is_empty() {
                return Err(BuildError::EmptyId);
            }
            if !(1..=MAX_WEIGHT).contains(&s.weight) {
                return Err(BuildError::InvalidWeight {
                    id: s.id.clone(),
                    weight: s.weight,
                });
            }
            let old = previous(&s.id);
            let reuse = |field: fn(&Backend) -> &Arc<str>, value: &str| -> Arc<str> {
                match old.map(field) {
                    Some(a) if **a == *value => a.clone(),
                    _ => value.into(),
                }
            };
            let id = reuse(|b| &b.id, &s.id);
            if by_id.insert(id.clone(), i).is_some() {
                return Err(BuildError::DuplicateId(s.id.clone()));
            }
            backends.push(Backend {
                hash_key: reuse(|b| &b.hash_key, s.hash_key.as_deref().unwrap_or(&s.id)),
                address: reuse(|b| &b.address, &s.address),
                weight: s.weight,
                eligible: s.eligible,
                load: old.map(|b| b.load.clone()).unwrap_or_default(),
                id,
            });
        }
        // Panic mode is decided here, once, from the backends' own eligibility. In `route_all`
        // panic every backend is treated as eligible by everything below (and by
        // `Backend::is_eligible`); in `fail` panic nothing is.
        let own_eligible = backends.iter().filter(|b| b.eligible).count();
        let panic = panic::evaluate(policy.panic.as_ref(), own_eligible, backends.len());
        if panic.active {
            let all = panic.mode == Some(PanicMode::RouteAll);
            for b in &mut backends {
                b.eligible = all;
            }
        }
        // Per-group panic (only when the picker as a whole is not in panic): `route_all` makes
        // every backend of the group eligible, `fail` none.
        if let (Some(g), false) = (grouping, panic.active) {
            let all = policy.panic.map(|p| p.mode) == Some(PanicMode::RouteAll);
            for (b, &group) in backends.iter_mut().zip(g.of_backend) {
                if g.panic[group as usize] {
                    b.eligible = all;
                }
            }
        }
        let eligible: Box<[u32]> = (0..backends.len() as u32)
            .filter(|&i| backends[i as usize].eligible)
            .collect();
        let hashing = matches!(policy.algorithm, Algorithm::Maglev | Algorithm::RingHash);
        let bounded_over = |members: &[u32]| {
            let weight: u64 = members
                .iter()
                .filter(|&&i| backends[i as usize].eligible)
                .map(|&i| u64::from(backends[i as usize].weight))
                .sum();
            policy
                .bounded_load_factor
                .filter(|_| hashing)
                .map(|factor| Bounded {
                    factor,
                    eligible_weight: weight.max(1),
                })
        };
        let counts = policy.track_in_flight
            || (hashing && policy.bounded_load_factor.is_some())
            || matches!(
                policy.algorithm,
                Algorithm::LeastConnExact | Algorithm::LeastConnP2c | Algorithm::PeakEwma
            );
        let (strategy, bounded, groups) = match grouping {
            None => {
                let all: Vec<u32> = (0..backends.len() as u32).collect();
                (strategy(policy, &backends, &all), bounded_over(&all), None)
            }
            Some(g) => {
                let n = g.panic.len();
                let mut members: Vec<Vec<u32>> = vec![Vec::new(); n];
                for (i, &group) in g.of_backend.iter().enumerate() {
                    members[group as usize].push(i as u32);
                }
                let per_group: Box<[Group]> = members
                    .iter()
                    .map(|m| Group {
                        strategy: strategy(policy, &backends, m),
                        bounded: bounded_over(m),
                    })
                    .collect();
                // The picker-wide flag says "bounded policy" (the total is counted); caps are
                // the groups'.
                let all: Vec<u32> = (0..backends.len() as u32).collect();
                (
                    Strategy::Empty,
                    bounded_over(&all),
                    Some(Box::new(Groups::new(g.of_backend.into(), per_group))),
                )
            }
        };
        Ok(Self {
            policy: *policy,
            backends: backends.into(),
            by_id,
            eligible,
            counts,
            bounded,
            total,
            strategy,
            groups,
            panic,
        })
    }
}

/// Checks that a grouping fits `n` specs: one group per spec, each below the number of groups,
/// at most `u16::MAX` groups.
fn check_grouping(g: &Grouping<'_>, n: usize) -> Result<(), BuildError> {
    if g.of_backend.len() != n {
        return Err(BuildError::InvalidGrouping(format!(
            "{} group indices for {n} backends",
            g.of_backend.len()
        )));
    }
    if g.panic.is_empty() && n > 0 || g.panic.len() > usize::from(u16::MAX) {
        return Err(BuildError::InvalidGrouping(format!(
            "{} groups",
            g.panic.len()
        )));
    }
    if let Some(&bad) = g
        .of_backend
        .iter()
        .find(|&&x| usize::from(x) >= g.panic.len())
    {
        return Err(BuildError::InvalidGrouping(format!(
            "group {bad} of {} groups",
            g.panic.len()
        )));
    }
    Ok(())
}

/// The selection strategy over `members` (backend indices; the eligible ones are picked).
fn strategy(policy: &PolicyConfig, backends: &[Backend], members: &[u32]) -> Strategy {
    let eligible: Vec<u32> = members
        .iter()
        .copied()
        .filter(|&i| backends[i as usize].eligible)
        .collect();
    if eligible.is_empty() {
        return Strategy::Empty;
    }
    let lc_items = || -> Vec<(u32, u32, Arc<BackendLoad>)> {
        eligible
            .iter()
            .map(|&i| {
                let b = &backends[i as usize];
                (i, b.weight, b.load.clone())
            })
            .collect()
    };
    match policy.algorithm {
        Algorithm::RoundRobin => {
            let items: Vec<(u16, u32)> = eligible
                .iter()
                .map(|&i| (i as u16, backends[i as usize].weight))
                .collect();
            Strategy::Wrr(wrr::Wrr::build(&items))
        }
        Algorithm::LeastConnExact => Strategy::LcExact(least_conn::LeastConnExact::build(
            &lc_items(),
            backends.len(),
        )),
        Algorithm::LeastConnP2c => Strategy::P2c(least_conn::P2c::build(&lc_items())),
        Algorithm::PeakEwma => Strategy::Ewma(ewma::PeakEwma::build(
            &lc_items(),
            policy.peak_ewma.decay,
            policy.peak_ewma.default_rtt,
        )),
        Algorithm::Maglev | Algorithm::RingHash => {
            let order = hash_order(backends, members);
            let keys: Vec<&str> = backends.iter().map(|b| b.hash_key()).collect();
            let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
            let elig: Vec<bool> = backends.iter().map(|b| b.eligible).collect();
            if policy.algorithm == Algorithm::Maglev {
                Strategy::Maglev(maglev::Maglev::build(&order, &keys, &weights, &elig))
            } else {
                Strategy::Ring(ring::Ring::build(&order, &keys, &weights, &elig))
            }
        }
    }
}

/// The `members` (backend indices) in [hash order](hash): by `XXH3_64(hash key)`, then hash
/// key, then id.
fn hash_order(backends: &[Backend], members: &[u32]) -> Vec<u16> {
    let mut order: Vec<(u64, &str, &str, u16)> = members
        .iter()
        .map(|&i| {
            let i = i as usize;
            let b = &backends[i];
            (
                hash::backend_hash(&b.hash_key),
                &*b.hash_key,
                &*b.id,
                i as u16,
            )
        })
        .collect();
    order.sort_unstable();
    order.into_iter().map(|x| x.3).collect()
}
