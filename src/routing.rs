//! Building a service's picker from its stored state: the one conversion from wire records and
//! policy ([`crate::proto`]) to the balancing types ([`crate::balance`]) that `dlbd` and the SDK
//! share, so both pick from identical pickers. It applies what the records carry beyond id,
//! address and weight: eligibility ([`crate::sources`]), latency shares ([`crate::adaptive`]),
//! slow start ([`crate::slow_start`]), the panic and Peak-EWMA settings of the policy, and
//! sticky-session tables.

use std::sync::Arc;
use std::time::Duration;

use crate::balance::{
    Algorithm, BackendSpec, BuildError, Picker, PolicyConfig, StickyConfig, StickyMode, StickyTable,
};
use crate::proto;
use crate::sources::is_eligible;

/// Default sticky-session idle TTL.
pub const DEFAULT_STICKY_TTL: Duration = Duration::from_secs(3600);
/// Default maximum number of sticky-session bindings.
pub const DEFAULT_STICKY_MAX_ENTRIES: usize = 100_000;

/// Converts a stored backend to the picker's input.
pub fn backend_spec(server: &proto::Server) -> BackendSpec {
    BackendSpec {
        id: server.server_id.clone(),
        address: server.address.clone(),
        weight: crate::sources::picker_weight(server),
        hash_key: (!server.hash_key.is_empty()).then(|| server.hash_key.clone()),
        eligible: is_eligible(server),
    }
}

/// Converts a stored (validated) policy to the picker's configuration.
pub fn policy_config(policy: &proto::Policy) -> PolicyConfig {
    let algorithm = match proto::Algorithm::try_from(policy.algorithm) {
        Ok(proto::Algorithm::LeastConnExact) => Algorithm::LeastConnExact,
        Ok(proto::Algorithm::LeastConnP2c) => Algorithm::LeastConnP2c,
        Ok(proto::Algorithm::Maglev) => Algorithm::Maglev,
        Ok(proto::Algorithm::RingHash) => Algorithm::RingHash,
        Ok(proto::Algorithm::PeakEwma) => Algorithm::PeakEwma,
        _ => Algorithm::RoundRobin,
    };
    PolicyConfig {
        algorithm,
        bounded_load_factor: (policy.bounded_load_factor != 0.0)
            .then_some(policy.bounded_load_factor),
        track_in_flight: true,
        panic: crate::health_policy::panic_config(policy),
        peak_ewma: crate::call::ewma_config(policy),
    }
}

/// The sticky-session configuration of a stored policy, if stickiness is on.
pub fn sticky_config(policy: &proto::Policy) -> Option<StickyConfig> {
    let mode = match proto::StickyMode::try_from(policy.sticky_mode) {
        Ok(proto::StickyMode::Strict) => StickyMode::Strict,
        Ok(proto::StickyMode::Fallback) => StickyMode::Fallback,
        _ => return None,
    };
    Some(StickyConfig {
        mode,
        ttl: if policy.sticky_ttl_seconds == 0 {
            DEFAULT_STICKY_TTL
        } else {
            Duration::from_secs(u64::from(policy.sticky_ttl_seconds))
        },
        max_entries: if policy.sticky_max_entries == 0 {
            DEFAULT_STICKY_MAX_ENTRIES
        } else {
            policy.sticky_max_entries as usize
        },
    })
}

/// Builds the picker for a service state (`policy` and its stored `servers`), off the request
/// path. With the `previous` picker of the same service it rebuilds, so in-flight accounting and
/// unchanged strings carry over by id. Used by `dlbd` and the SDK alike. Backends with a latency
/// share get it with precision ([`crate::adaptive::apply`]). With slow start in the
/// policy, ramping backends get their ramped weight at the local wall clock's now (see
/// [`crate::slow_start`]; rebuild again at [`crate::slow_start::next_tick`]).
pub fn build_picker<'a>(
    previous: Option<&Picker>,
    policy: &proto::Policy,
    servers: impl IntoIterator<Item = &'a proto::Server>,
) -> Result<Picker, BuildError> {
    let servers: Vec<&proto::Server> = servers.into_iter().collect();
    let mut specs: Vec<BackendSpec> = servers.iter().map(|s| backend_spec(s)).collect();
    crate::adaptive::apply(&mut specs, &servers);
    if let Some(ramp) = crate::slow_start::config(policy) {
        let ready: Vec<u64> = servers.iter().map(|s| s.ready_since_ms).collect();
        crate::slow_start::apply(&mut specs, &ready, crate::slow_start::now_ms(), &ramp);
    }
    let config = policy_config(policy);
    match previous {
        Some(old) => old.rebuild(&config, &specs),
        None => Picker::build(&config, &specs),
    }
}

/// The sticky-session table for `policy`: the `previous` table when its configuration is
/// unchanged (bindings survive unrelated updates), a new one when it changed, none when the
/// policy is not sticky.
pub fn carry_sticky(
    previous: Option<&Arc<StickyTable>>,
    policy: &proto::Policy,
) -> Option<Arc<StickyTable>> {
    let config = sticky_config(policy)?;
    Some(match previous {
        Some(table) if *table.config() == config => table.clone(),
        _ => Arc::new(StickyTable::new(config)),
    })
}
