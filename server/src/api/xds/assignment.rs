//! Per-node EDS: the ClusterLoadAssignment of a service as a client of one zone receives it,
//! built once per (service version, client zone) and shared by every stream of that zone.
//!
//! **Layout.** Stock round robin ignores endpoint weights but honours *locality* weights
//! (`xds_wrr_locality`), so every backend is its own locality — its real `region` and `zone`,
//! with `sub_zone` naming the backend — whose weight carries the backend's share. For round
//! robin and least connections the shares are the locality plan's (`dlb::locality::plan`) for the
//! client's zone: the groups (priority, zone) the plan gives traffic are all in priority 0,
//! each backend weighted by its group's share × its part of the group's capacity (so priority
//! loads and zone spill are expressed as locality weights: stock clients implement neither
//! overprovisioning nor zone-aware routing); the groups with no share follow in lower
//! priorities, one per original priority in order, so a stock client still fails over natively
//! when everything planned dies before dlbd pushes the next assignment. For consistent hashing
//! (Maglev, ring hash → `RING_HASH`, which weighs by endpoint weight) zone-aware routing does
//! not apply: one locality per priority holds its backends, at that priority (renumbered
//! 0, 1, … as the protocol requires), and the client fails over natively.
//!
//! **Client zones.** A client's zone is `(region, zone)` of its `node.locality`. A zone no
//! backend of the service has is the zone-less client's (both route by capacity), so a service
//! keeps at most one assignment per backend zone + 1, however many clients and zones connect:
//! 1,000 clients in 10 zones cost 10 computations per change.
//!
//! **Live inputs.** The plan also reads the zone demand measured from the SDKs' reports and,
//! for a load-aware policy, the global in-flight counts ([`super::inputs`]): the same inputs an
//! SDK of the client's zone plans with. They are held here ([`Assignments::refresh`]) and a
//! zone's assignment is replaced when its plan moves, without a new snapshot.
//!
//! Health: an eligible backend is `HEALTHY`, a draining one `DRAINING`, an unhealthy one
//! `UNHEALTHY`; in overall panic every endpoint is `HEALTHY` (`route_all`) or `UNHEALTHY`
//! (`fail`), see [`resources::panic_health`]. Addresses must be IP literals (`ip:port`); a
//! backend whose address is a host name is left out, and logged.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use dlb::proto::{self, Algorithm};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;
use parking_lot::Mutex;

use super::inputs::{Inputs, LOAD_MOVE};
use super::resources::{lb_endpoint, panic_health, weight_of};
use super::{Built, ContentHash};
use crate::store::ServiceSnapshot;
use dlb::balance::{PanicConfig, PanicMode};
use dlb::locality::{BackendState, Groups, LocalityConfig, Plan};

/// Sum of the locality weights of the planned priority (priority 0): shares are expressed in
/// millionths.
const SCALE: f64 = 1_000_000.0;

/// A backend with a usable address.
#[derive(Debug)]
struct Member {
    server: Arc<proto::Server>,
    addr: SocketAddr,
    group: usize,
}

/// The per-zone assignments of one service snapshot (kept with it in the cache).
#[derive(Debug)]
pub struct Assignments {
    snap: Arc<ServiceSnapshot>,
    members: Vec<Member>,
    groups: Groups,
    /// Per member, as the plan sees it.
    backends: Vec<BackendState>,
    /// The same, every backend eligible (overall `route_all` panic).
    all_eligible: Vec<BackendState>,
    cfg: LocalityConfig,
    panic_cfg: Option<PanicConfig>,
    hashing: bool,
    /// The overall panic's health override ([`panic_health`]).
    panic: Option<core::HealthStatus>,
    /// Per group, whether its priority is in `route_all` panic (its endpoints are sent HEALTHY).
    group_route_all: Vec<bool>,
    /// Per group, the weight of all its backends and of its eligible ones.
    weights: Vec<f64>,
    capacity: Vec<f64>,
    /// Per member, its locality and endpoint encoded (made by the first [`Assignments::encoded`]).
    prefixes: OnceLock<Vec<Vec<u8>>>,
    /// The previous version's assignments, whose prefixes of unchanged backends the first
    /// [`Assignments::encoded`] carries over (then lets go).
    previous: Mutex<Option<Arc<Assignments>>>,
    /// The live inputs the assignments are planned with ([`Assignments::refresh`]).
    inputs: Mutex<Arc<Inputs>>,
    /// Per client zone key, its assignment and the group shares it was planned with.
    built: Mutex<HashMap<Option<Zone>, Planned>>,
}

/// One client zone's assignment.
#[derive(Debug, Clone)]
struct Planned {
    /// The plan's group shares behind it (empty for consistent hashing: no plan).
    shares: Vec<f64>,
    built: Arc<Built>,
}

/// A client's or backend's zone (region, zone of its locality).
pub type Zone = dlb::locality::ZoneKey;

impl Assignments {
    /// Groups the backends of `snap` (O(backends)); nothing is built yet. `previous`: the
    /// assignments of the version `snap` replaced, if any (their encoded backends are reused
    /// where the record did not change). `inputs`: the live plan inputs, else those of
    /// `previous`, else none (equal demand, no load) until [`Assignments::refresh`].
    pub fn new(
        snap: Arc<ServiceSnapshot>,
        previous: Option<Arc<Assignments>>,
        inputs: Option<Inputs>,
    ) -> Self {
        let inputs = inputs.map(Arc::new).unwrap_or_else(|| {
            previous
                .as_ref()
                .map(|p| p.inputs.lock().clone())
                .unwrap_or_default()
        });
        let hashing = matches!(
            snap.policy.algorithm(),
            Algorithm::Maglev | Algorithm::RingHash
        );
        let mut usable = Vec::with_capacity(snap.servers.len());
        for server in snap.servers.values() {
            let Ok(addr) = server.address.parse::<SocketAddr>() else {
                tracing::warn!(
                    service = %snap.name.escape_debug(),
                    server_id = %server.server_id.escape_debug(),
                    address = %server.address.escape_debug(),
                    "xds: backend address is not ip:port; left out of the ClusterLoadAssignment"
                );
                continue;
            };
            usable.push((server.clone(), addr));
        }
        let groups = dlb::locality::group(
            usable
                .iter()
                .map(|(s, _)| (s.priority, s.locality.as_ref())),
            !hashing,
        );
        let members: Vec<Member> = usable
            .into_iter()
            .zip(&groups.of_server)
            .map(|((server, addr), g)| Member {
                server,
                addr,
                group: usize::from(*g),
            })
            .collect();
        let backends: Vec<BackendState> = members
            .iter()
            .map(|m| BackendState {
                group: u16::try_from(m.group).unwrap_or(u16::MAX),
                weight: weight_of(&m.server),
                eligible: dlb::model::is_eligible(&m.server),
                in_flight: 0,
            })
            .collect();
        let all_eligible = backends
            .iter()
            .map(|b| BackendState {
                eligible: true,
                ..*b
            })
            .collect();
        let mut weights = vec![0.0; groups.len()];
        let mut capacity = vec![0.0; groups.len()];
        for (m, b) in members.iter().zip(&backends) {
            weights[m.group] += f64::from(b.weight);
            if b.eligible {
                capacity[m.group] += f64::from(b.weight);
            }
        }
        let cfg = dlb::locality::config(&snap.policy);
        let panic_cfg = dlb::health_policy::panic_config(&snap.policy);
        // Per-priority panic does not depend on the client's zone.
        let group_route_all = match panic_cfg {
            Some(p) if p.mode == PanicMode::RouteAll && !hashing => {
                dlb::locality::plan(&cfg, Some(&p), &groups, &backends, &[], None).group_panic
            }
            _ => vec![false; groups.len()],
        };
        Self {
            panic: panic_health(&snap),
            snap,
            members,
            groups,
            backends,
            all_eligible,
            cfg,
            panic_cfg,
            hashing,
            group_route_all,
            weights,
            capacity,
            prefixes: OnceLock::new(),
            previous: Mutex::new(previous),
            inputs: Mutex::new(inputs),
            built: Mutex::new(HashMap::new()),
        }
    }

    /// The assignment key of a client in `zone`: the zone when some backend is in it (and the
    /// service routes by zone), else `None` (the zone-less assignment).
    fn key(&self, zone: Option<&Zone>) -> Option<Zone> {
        let zone = zone?;
        self.groups
            .keys
            .iter()
            .any(|g| g.zone.as_ref() == Some(zone))
            .then(|| zone.clone())
    }

    /// The packed assignment for a client in `zone`, built the first time a client of its key
    /// asks (never under the lock) and shared afterwards (until [`Assignments::refresh`]
    /// replaces it).
    pub fn for_zone(&self, zone: Option<&Zone>) -> Arc<Built> {
        let key = self.key(zone);
        if let Some(p) = self.built.lock().get(&key) {
            return p.built.clone();
        }
        loop {
            let inputs = self.inputs.lock().clone();
            let planned = if self.hashing {
                self.packed(pack_any(self.layout(key.as_ref())), Vec::new())
            } else {
                self.build(self.plan(key.as_ref(), &inputs))
            };
            let mut built = self.built.lock();
            if let Some(p) = built.get(&key) {
                return p.built.clone();
            }
            // Planned with the inputs still current: kept. (Else `refresh` may already have
            // passed this key by: planned again with the new ones.)
            if Arc::ptr_eq(&inputs, &self.inputs.lock()) {
                let b = planned.built.clone();
                built.insert(key, planned);
                return b;
            }
        }
    }

    /// Plans with new live inputs: each built zone's assignment whose group shares moved
    /// (by more than [`LOAD_MOVE`] when only the load changed, at all when the demand did) is
    /// replaced. Returns how many were. Consistent hashing plans nothing: always 0.
    pub fn refresh(&self, inputs: Inputs) -> usize {
        let (inputs, threshold) = {
            let mut current = self.inputs.lock();
            if **current == inputs {
                return 0;
            }
            let threshold = if current.demand == inputs.demand {
                LOAD_MOVE
            } else {
                1e-9
            };
            *current = Arc::new(inputs);
            (current.clone(), threshold)
        };
        if self.hashing {
            return 0;
        }
        let held: Vec<(Option<Zone>, Vec<f64>)> = self
            .built
            .lock()
            .iter()
            .map(|(k, p)| (k.clone(), p.shares.clone()))
            .collect();
        let mut changed = 0;
        for (key, old) in held {
            let plan = self.plan(key.as_ref(), &inputs);
            let moved = old.len() != plan.shares.len()
                || old
                    .iter()
                    .zip(&plan.shares)
                    .any(|(a, b)| (a - b).abs() > threshold);
            if moved {
                let planned = self.build(plan);
                self.built.lock().insert(key, planned);
                changed += 1;
            }
        }
        changed
    }

    /// The assignment of `plan` (a client zone's), encoded and hashed.
    fn build(&self, plan: Plan) -> Planned {
        let any = Any {
            type_url: super::resources::ENDPOINTS.to_owned(),
            value: self.encoded(&plan),
        };
        self.packed(any, plan.shares)
    }

    /// `any` hashed, as a zone's assignment planned with `shares`.
    fn packed(&self, any: Any, shares: Vec<f64>) -> Planned {
        let mut h = ContentHash::default();
        h.write(&any.value);
        Planned {
            shares,
            built: Arc::new(Built {
                hash: h.hex(),
                any,
                version: self.snap.version.version,
            }),
        }
    }

    /// The plan of a client of zone `zone` with `inputs` (overall `route_all` panic: every
    /// backend counts as eligible).
    fn plan(&self, zone: Option<&Zone>, inputs: &Inputs) -> Plan {
        let base = if self.route_all() {
            &self.all_eligible
        } else {
            &self.backends
        };
        let loaded: Vec<BackendState>;
        let backends = if self.cfg.saturation.is_none() || inputs.in_flight.is_empty() {
            base
        } else {
            loaded = base
                .iter()
                .zip(&self.members)
                .map(|(b, m)| BackendState {
                    in_flight: inputs
                        .in_flight
                        .get(&m.server.server_id)
                        .copied()
                        .unwrap_or(0),
                    ..*b
                })
                .collect();
            &loaded
        };
        dlb::locality::plan(
            &self.cfg,
            self.panic_cfg.as_ref(),
            &self.groups,
            backends,
            &inputs.demand,
            zone,
        )
    }

    /// Whether the overall panic routes over every backend (`route_all`).
    fn route_all(&self) -> bool {
        self.panic == Some(core::HealthStatus::Healthy)
    }

    /// How many assignments were built (one per client zone key asked for).
    pub fn computed(&self) -> usize {
        self.built.lock().len()
    }

    /// The ClusterLoadAssignment for a client in `zone` (a key of [`Assignments::key`]), with
    /// the current inputs.
    pub fn layout(&self, zone: Option<&Zone>) -> endpoint::ClusterLoadAssignment {
        let endpoints = if self.hashing {
            self.by_priority(self.panic)
        } else {
            let inputs = self.inputs.lock().clone();
            self.planned(&self.plan(zone, &inputs))
        };
        endpoint::ClusterLoadAssignment {
            cluster_name: self.snap.name.clone(),
            endpoints,
            ..Default::default()
        }
    }

    /// Hashing: one locality per priority, priorities renumbered 0, 1, ….
    fn by_priority(&self, panic: Option<core::HealthStatus>) -> Vec<endpoint::LocalityLbEndpoints> {
        let mut by: BTreeMap<u32, Vec<endpoint::LbEndpoint>> = BTreeMap::new();
        for m in &self.members {
            by.entry(m.server.priority)
                .or_default()
                .push(lb_endpoint(&m.server, m.addr, panic));
        }
        by.into_iter()
            .enumerate()
            .map(|(level, (p, lb_endpoints))| endpoint::LocalityLbEndpoints {
                locality: Some(core::Locality {
                    region: "dlb".into(),
                    zone: self.snap.name.clone(),
                    sub_zone: if p == 0 {
                        String::new()
                    } else {
                        format!("priority-{p}")
                    },
                }),
                lb_endpoints,
                load_balancing_weight: Some(UInt32Value { value: 1 }),
                priority: u32::try_from(level).unwrap_or(u32::MAX),
                ..Default::default()
            })
            .collect()
    }

    /// Round robin and least connections: per member, its (priority, locality weight) by
    /// `plan` (a client zone's): the plan's groups in priority 0 weighted by their shares, the
    /// others in lower priorities (see the module docs). O(backends + groups × priorities).
    fn placement(&self, plan: &Plan) -> Vec<(u32, u32)> {
        // Overall `route_all` panic: every backend is routed to, as if eligible.
        let route_all = self.route_all();
        let shares = &plan.shares;
        let planned_any = shares.iter().any(|s| *s > 0.0);
        // The lower priorities: one per original priority that has a group without share.
        let mut rest: Vec<u32> = self
            .groups
            .keys
            .iter()
            .zip(shares)
            .filter(|(_, s)| **s <= 0.0)
            .map(|(g, _)| g.priority)
            .collect();
        rest.sort_unstable();
        rest.dedup();
        let first = u32::from(planned_any);
        self.members
            .iter()
            .map(|m| {
                let g = &self.groups.keys[m.group];
                let share = shares[m.group];
                let w = f64::from(weight_of(&m.server));
                if share > 0.0 {
                    // A planned group with no capacity is in panic: over all its backends.
                    let capacity = self.capacity[m.group];
                    let part = if route_all || plan.group_panic[m.group] || capacity <= 0.0 {
                        w / self.weights[m.group].max(1.0)
                    } else if dlb::model::is_eligible(&m.server) {
                        w / capacity
                    } else {
                        0.0
                    };
                    (0, (share * part * SCALE).round().clamp(1.0, SCALE) as u32)
                } else {
                    let level = rest.iter().position(|p| *p == g.priority).unwrap_or(0);
                    (
                        first + u32::try_from(level).unwrap_or(u32::MAX - 1),
                        weight_of(&m.server),
                    )
                }
            })
            .collect()
    }

    /// The planned layout as messages (what [`Assignments::encoded`] encodes).
    fn planned(&self, plan: &Plan) -> Vec<endpoint::LocalityLbEndpoints> {
        self.members
            .iter()
            .zip(self.placement(plan))
            .map(|(m, (priority, weight))| endpoint::LocalityLbEndpoints {
                locality: Some(self.locality(m)),
                lb_endpoints: vec![lb_endpoint(&m.server, m.addr, self.health_override(m))],
                load_balancing_weight: Some(UInt32Value { value: weight }),
                priority,
                ..Default::default()
            })
            .collect()
    }

    /// The health a member is sent with instead of its own: the overall panic's, else HEALTHY
    /// when its priority is in `route_all` panic (routed over all its backends).
    fn health_override(&self, m: &Member) -> Option<core::HealthStatus> {
        self.panic
            .or(self.group_route_all[m.group].then_some(core::HealthStatus::Healthy))
    }

    /// A member's locality: its group's region and zone, `sub_zone` its id.
    fn locality(&self, m: &Member) -> core::Locality {
        let (region, zone) = self.groups.keys[m.group]
            .zone
            .clone()
            .map(|z| (z.region, z.zone))
            .unwrap_or_default();
        core::Locality {
            region,
            zone,
            sub_zone: m.server.server_id.clone(),
        }
    }

    /// The encoded planned ClusterLoadAssignment of `plan` (a client zone's): the
    /// zone-independent part of each locality (its locality and endpoint, encoded once per
    /// snapshot) followed by its weight and priority. Decodes to [`Assignments::layout`]
    /// (tested), at a fraction of its cost.
    fn encoded(&self, plan: &Plan) -> Vec<u8> {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
        let prefixes = self.prefixes.get_or_init(|| {
            let previous = self.previous.lock().take();
            let mut carry = Carry::new(previous.as_deref(), self.hashing);
            self.members
                .iter()
                .map(|m| {
                    let health = self.health_override(m);
                    if let Some(b) = carry.find(m, health) {
                        return b;
                    }
                    let mut b = Vec::new();
                    prost::encoding::message::encode(1, &self.locality(m), &mut b);
                    let ep = lb_endpoint(&m.server, m.addr, health);
                    prost::encoding::message::encode(2, &ep, &mut b);
                    b
                })
                .collect()
        });
        let name = &self.snap.name;
        let mut out = Vec::with_capacity(
            name.len() + prefixes.iter().map(|p| p.len() + 24).sum::<usize>() + 8,
        );
        prost::encoding::string::encode(1, name, &mut out);
        for (prefix, (priority, weight)) in prefixes.iter().zip(self.placement(plan)) {
            // load_balancing_weight (3): UInt32Value { value (1) = weight }, weight ≥ 1.
            let wrapper = 1 + encoded_len_varint(u64::from(weight));
            let mut len = prefix.len() + 1 + encoded_len_varint(wrapper as u64) + wrapper;
            if priority != 0 {
                len += 1 + encoded_len_varint(u64::from(priority));
            }
            encode_key(2, WireType::LengthDelimited, &mut out);
            encode_varint(len as u64, &mut out);
            out.extend_from_slice(prefix);
            encode_key(3, WireType::LengthDelimited, &mut out);
            encode_varint(wrapper as u64, &mut out);
            encode_key(1, WireType::Varint, &mut out);
            encode_varint(u64::from(weight), &mut out);
            if priority != 0 {
                encode_key(5, WireType::Varint, &mut out);
                encode_varint(u64::from(priority), &mut out);
            }
        }
        out
    }
}

/// The encoded members of the previous version, walked alongside the new ones (both are in
/// server id order, the snapshot's).
struct Carry<'a> {
    previous: Option<(&'a Assignments, &'a [Vec<u8>])>,
    next: usize,
}

impl<'a> Carry<'a> {
    fn new(previous: Option<&'a Assignments>, hashing: bool) -> Self {
        // The grouping (and so each member's locality) depends on the algorithm kind.
        let previous = previous
            .filter(|p| p.hashing == hashing)
            .and_then(|p| Some((p, p.prefixes.get()?.as_slice())));
        Self { previous, next: 0 }
    }

    /// The previous encoding of `m` when its record is the very same (`Arc`) and it is sent
    /// with the same health override: its locality and endpoint bytes are then the same.
    fn find(&mut self, m: &Member, health: Option<core::HealthStatus>) -> Option<Vec<u8>> {
        let (p, prefixes) = self.previous?;
        while p
            .members
            .get(self.next)
            .is_some_and(|o| o.server.server_id < m.server.server_id)
        {
            self.next += 1;
        }
        let o = p.members.get(self.next)?;
        (Arc::ptr_eq(&o.server, &m.server) && p.health_override(o) == health)
            .then(|| prefixes.get(self.next).cloned())
            .flatten()
    }
}

#[cfg(test)]
#[path = "assignment_tests.rs"]
mod tests;
