//! Building a service's picker from its stored state: the one conversion from wire records and
//! policy ([`crate::proto`]) to the balancing types ([`crate::balance`]) that `dlbd` and the SDK
//! share, so both pick from identical pickers. It applies what the records carry beyond id,
//! address and weight: eligibility ([`crate::sources`]), latency shares ([`crate::adaptive`]),
//! slow start ([`crate::slow_start`]), the panic and Peak-EWMA settings of the policy, locality
//! (groups by priority and zone, with shares from [`crate::locality::plan`]), and sticky-session
//! tables.

use std::sync::Arc;
use std::time::Duration;

use crate::balance::{
    Algorithm, BackendSpec, BuildError, Grouping, Picker, PolicyConfig, StickyConfig, StickyMode,
    StickyTable,
};
use crate::locality::{BackendState, Groups, Plan, ZoneKey};
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

/// Who picks, as far as locality is concerned: the client's zone and the demand on the service
/// per client zone (pushed by `dlbd` in `GlobalLoad.zone_demand`). [`Client::NONE`]: no zone
/// (priority failover only, no zone preference), as for `dlbd`'s own picker.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// The client's (region, zone).
    pub zone: Option<&'a ZoneKey>,
    /// Demand share per client zone; empty: every zone with backends counts equally.
    pub demand: &'a [(ZoneKey, f64)],
}

impl Client<'_> {
    /// No zone, no demand.
    pub const NONE: Client<'static> = Client {
        zone: None,
        demand: &[],
    };
}

/// What a grouped picker was built from, kept by its owner to re-plan it ([`replan`]) when the
/// demand or the in-flight counts change: the groups and each backend's own eligibility (the
/// picker's may be overridden by per-group panic).
#[derive(Debug, Clone)]
pub struct Layout {
    /// The groups (priority, zone) and each backend's group, in the picker's backend order.
    pub groups: Groups,
    /// Per backend, in the picker's order: group, weight and own eligibility (`in_flight` is
    /// filled in at each plan).
    states: Vec<BackendState>,
}

/// Builds the picker for a service state (`policy` and its stored `servers`), off the request
/// path, with no client zone: [`build_for`] with [`Client::NONE`] (priority failover applies,
/// zone preference does not). Used by `dlbd`'s own picker.
pub fn build_picker<'a>(
    previous: Option<&Picker>,
    policy: &proto::Policy,
    servers: impl IntoIterator<Item = &'a proto::Server>,
) -> Result<Picker, BuildError> {
    build_for(previous, policy, servers, &Client::NONE).map(|(p, _)| p)
}

/// Builds the picker for a service state as seen by `client`, off the request path. With the
/// `previous` picker of the same service it rebuilds, so in-flight accounting and unchanged
/// strings carry over by id. Used by `dlbd` and the SDK alike. Backends with a latency share get
/// it with precision ([`crate::adaptive::apply`]). With slow start in the policy, ramping
/// backends get their ramped weight at the local wall clock's now (see [`crate::slow_start`];
/// rebuild again at [`crate::slow_start::next_tick`]).
///
/// **Locality** (docs/locality.md). When some backend has a priority above 0, or the client has
/// a zone, zone-aware routing is on and some backend has a zone (and the algorithm is not a
/// hashing one), the picker is grouped by priority (and zone): the plan
/// ([`crate::locality::plan`]) decides each group's panic and share, and the returned
/// [`Layout`] lets the owner re-plan with [`replan`] as demand and load move. Otherwise the
/// picker is ungrouped, exactly as without locality, and the layout is `None`.
pub fn build_for<'a>(
    previous: Option<&Picker>,
    policy: &proto::Policy,
    servers: impl IntoIterator<Item = &'a proto::Server>,
    client: &Client<'_>,
) -> Result<(Picker, Option<Layout>), BuildError> {
    let servers: Vec<&proto::Server> = servers.into_iter().collect();
    let mut specs: Vec<BackendSpec> = servers.iter().map(|s| backend_spec(s)).collect();
    crate::adaptive::apply(&mut specs, &servers);
    if let Some(ramp) = crate::slow_start::config(policy) {
        let ready: Vec<u64> = servers.iter().map(|s| s.ready_since_ms).collect();
        crate::slow_start::apply(&mut specs, &ready, crate::slow_start::now_ms(), &ramp);
    }
    let config = policy_config(policy);
    let locality = crate::locality::config(policy);
    let hashing = matches!(config.algorithm, Algorithm::Maglev | Algorithm::RingHash);
    let by_zone = client.zone.is_some()
        && locality.zone_aware
        && !hashing
        && servers
            .iter()
            .any(|s| ZoneKey::of(s.locality.as_ref()).is_some());
    if !by_zone && servers.iter().all(|s| s.priority == 0) {
        let picker = match previous {
            Some(old) => old.rebuild(&config, &specs),
            None => Picker::build(&config, &specs),
        }?;
        return Ok((picker, None));
    }
    let groups = crate::locality::group(
        servers.iter().map(|s| (s.priority, s.locality.as_ref())),
        by_zone,
    );
    let states: Vec<BackendState> = specs
        .iter()
        .zip(&groups.of_server)
        .map(|(spec, &group)| BackendState {
            group,
            weight: spec.weight,
            eligible: spec.eligible,
            in_flight: previous
                .and_then(|p| p.get(&spec.id))
                .map_or(0, |b| b.load().load()),
        })
        .collect();
    let layout = Layout { groups, states };
    let plan = plan_of(&layout, &locality, policy, client);
    let grouping = Grouping {
        of_backend: &layout.groups.of_server,
        panic: &plan.group_panic,
    };
    let picker = match previous {
        Some(old) => old.rebuild_grouped(&config, &specs, &grouping),
        None => Picker::build_grouped(&config, &specs, &grouping),
    }?;
    picker.set_shares(&plan.shares);
    Ok((picker, Some(layout)))
}

/// Re-plans a grouped picker built by [`build_for`] with its `layout`: reads every backend's
/// in-flight count (own and pushed) from the picker, computes the plan for `client` and sets
/// the picker's shares. Cheap (`O(backends + groups × zones)`), no rebuild; call it when the
/// demand or the global load changes. Returns the plan (for metrics and `dlbctl`).
pub fn replan(
    picker: &Picker,
    layout: &mut Layout,
    policy: &proto::Policy,
    client: &Client<'_>,
) -> Plan {
    for (state, backend) in layout.states.iter_mut().zip(picker.backends()) {
        state.in_flight = backend.load().load();
    }
    let plan = plan_of(layout, &crate::locality::config(policy), policy, client);
    picker.set_shares(&plan.shares);
    plan
}

fn plan_of(
    layout: &Layout,
    locality: &crate::locality::LocalityConfig,
    policy: &proto::Policy,
    client: &Client<'_>,
) -> Plan {
    crate::locality::plan(
        locality,
        crate::health_policy::panic_config(policy).as_ref(),
        &layout.groups,
        &layout.states,
        client.demand,
        client.zone,
    )
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
