//! The status page's data, as the JSON API serves it and the HTML page renders it: an
//! [`Overview`] of the control plane and a [`ServiceView`] per service.
//!
//! Built on request from the handles in [`Status`](super::Status): the snapshot cache (backends,
//! effective state and reason, policy, panic), the active checker's views (probe state and
//! RTT), the load tracker (global in-flight), the reports' [`Rates`](crate::reports::rates),
//! the circuit tracker, the lease keeper (lease ages), the followers ([`super::followers`]:
//! SDK sessions and xDS clients with their acked versions), the drain barriers waiting
//! ([`super::barriers`]), the replica set and readiness.
//! Nothing here writes. Cost: O(services) for the overview, O(backends + followers) for a
//! service (O(the backends asked for) with `only`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use dlb::proto;
use serde::Serialize;

pub use super::barriers::BarrierView;
pub use super::followers::Follower;
use super::Status;

/// Everything on the overview.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// This replica: its id, whether it leads, readiness, the live replicas.
    pub replica: Replica,
    /// The store: kind, epoch and the revision the cache holds.
    pub store: StoreView,
    /// DLB sessions connected to this replica.
    pub sessions: usize,
    /// xDS (ADS) streams connected to this replica.
    pub xds_clients: usize,
    /// Drain barriers waiting on this replica now.
    pub barriers: usize,
    /// Every service, by name.
    pub services: Vec<ServiceSummary>,
}

/// This replica and its set.
#[derive(Debug, Clone, Serialize)]
pub struct Replica {
    /// This replica's id.
    pub id: String,
    /// Whether it is the leader.
    pub leader: bool,
    /// `ready`, `not_ready` or `going_away` (see [`crate::readiness`]).
    pub readiness: &'static str,
    /// The live replicas' ids.
    pub members: Vec<String>,
}

/// The store as this replica sees it.
#[derive(Debug, Clone, Serialize)]
pub struct StoreView {
    /// `memory`, `embedded` or `etcd`.
    pub kind: &'static str,
    /// The store's epoch, hex (as in xDS versions).
    pub epoch: String,
    /// The revision the snapshot cache holds.
    pub revision: u64,
}

/// Backend counts of a service by state.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// All backends.
    pub total: usize,
    /// Eligible for new picks.
    pub eligible: usize,
    /// Unhealthy by any source.
    pub unhealthy: usize,
    /// Draining (and not unhealthy).
    pub draining: usize,
}

/// One line of the overview.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceSummary {
    /// The service's name.
    pub name: String,
    /// The store revision of its last change.
    pub version: u64,
    /// The balancing algorithm (`ALGORITHM_ROUND_ROBIN`, ...).
    pub algorithm: &'static str,
    /// Backends by state.
    pub backends: Counts,
    /// Requests per second reported by the SDKs (last 10 s).
    pub requests_per_s: f64,
    /// Failed requests per second (last 10 s).
    pub errors_per_s: f64,
    /// Global in-flight calls (sum over every SDK's reports).
    pub in_flight: u64,
    /// Whether the service is in panic (too few eligible backends), and the configured mode.
    pub panic: Panic,
}

/// A service's panic state.
#[derive(Debug, Clone, Serialize)]
pub struct Panic {
    /// Whether the service is in panic now.
    pub active: bool,
    /// `off`, `route_all` or `fail`.
    pub mode: &'static str,
}

/// Everything on a service's page.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    /// The overview's line for it.
    #[serde(flatten)]
    pub summary: ServiceSummary,
    /// The policy's main choices.
    pub policy: PolicyView,
    /// Each backend, ordered by id.
    pub servers: Vec<BackendView>,
    /// The clients on this replica following the service (SDK sessions, xDS streams), with
    /// the version each acknowledged.
    pub followers: Vec<Follower>,
    /// The drain barriers waiting on this replica for one of its backends, oldest first.
    pub barriers: Vec<BarrierView>,
}

/// The policy fields an operator looks at first.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyView {
    /// The balancing algorithm.
    pub algorithm: &'static str,
    /// The panic threshold in percent (0: panic off).
    pub panic_threshold_percent: u32,
    /// Whether outlier detection is configured.
    pub outlier_detection: bool,
    /// Whether active health checks are configured.
    pub health_check: bool,
}

/// A backend's locality (Envoy's `core.Locality`); empty parts are left out.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LocalityView {
    /// The region.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub region: String,
    /// The zone.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub zone: String,
    /// The sub-zone.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sub_zone: String,
}

impl LocalityView {
    fn of(l: Option<&proto::Locality>) -> Option<Self> {
        let l = l?;
        if l.region.is_empty() && l.zone.is_empty() && l.sub_zone.is_empty() {
            return None;
        }
        Some(Self {
            region: l.region.clone(),
            zone: l.zone.clone(),
            sub_zone: l.sub_zone.clone(),
        })
    }

    /// `region/zone/sub_zone`, down to the last part set (a zone needs a region, a sub-zone
    /// a zone, so the parts are never ambiguous).
    fn display(&self) -> String {
        [&self.region, &self.zone, &self.sub_zone]
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// One backend.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackendView {
    /// Its id.
    pub id: String,
    /// `host:port`.
    pub address: String,
    /// Where it runs, `region/zone` (`/sub_zone` when set), when it has a locality.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Its locality field by field, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<LocalityView>,
    /// Its failover priority (0: primary).
    pub priority: u32,
    /// Every metadata label.
    pub metadata: BTreeMap<String, String>,
    /// The configured weight.
    pub weight: u32,
    /// The weight pickers use.
    pub effective_weight: u32,
    /// Whether it may receive new picks.
    pub eligible: bool,
    /// `healthy` or `unhealthy` (effective, from every source).
    pub health: &'static str,
    /// Whether it is draining.
    pub draining: bool,
    /// Why it is not eligible or what limits it (`probe: HTTP 503`, `outlier: …`, `draining`);
    /// empty when nothing does.
    pub reason: String,
    /// The active checker's state (`unknown`, `healthy`, `unhealthy`); absent when unchecked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<&'static str>,
    /// The last probe's round-trip time, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_rtt_us: Option<u64>,
    /// Global in-flight calls.
    pub in_flight: u64,
    /// Requests per second (last 10 s).
    pub requests_per_s: f64,
    /// Failed requests per second (last 10 s).
    pub errors_per_s: f64,
    /// Requests per second, one value per second, oldest first (empty: no reports lately).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requests_trend: Vec<u64>,
    /// Errors per second, likewise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors_trend: Vec<u64>,
    /// Sessions whose circuit breaker for it is open.
    pub circuit_open: u32,
    /// Sessions whose circuit breaker for it is half-open.
    pub circuit_half_open: u32,
    /// `api`, `lease` or `dns`.
    pub source: &'static str,
    /// The lease's TTL in seconds (lease-sourced backends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ttl_seconds: Option<u32>,
    /// Seconds since the lease was last renewed (TTL minus the time left), as of this answer;
    /// absent when not known (live updates leave it out: it changes every second).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_age_seconds: Option<u64>,
    /// The DNS name it was found under (dns-sourced backends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
}

fn algorithm(policy: &proto::Policy) -> &'static str {
    proto::Algorithm::try_from(policy.algorithm)
        .unwrap_or_default()
        .as_str_name()
}

fn counts(snap: &crate::store::ServiceSnapshot) -> Counts {
    let mut c = Counts::default();
    for s in snap.servers.values() {
        c.total += 1;
        if dlb::model::is_eligible(s) {
            c.eligible += 1;
        } else if s.health == proto::HealthStatus::Unhealthy as i32 {
            c.unhealthy += 1;
        } else {
            c.draining += 1;
        }
    }
    c
}

fn summary(status: &Status, snap: &crate::store::ServiceSnapshot) -> ServiceSummary {
    let rates = status.shared.reports.rates.service(&snap.name);
    let (requests_per_s, errors_per_s) = rates.values().fold((0.0, 0.0), |(r, e), b| {
        (r + b.requests_per_s, e + b.errors_per_s)
    });
    let panic = dlb::health_policy::panic_state(&snap.policy, snap.servers.values().map(|s| &**s));
    ServiceSummary {
        name: snap.name.clone(),
        version: snap.version.version,
        algorithm: algorithm(&snap.policy),
        backends: counts(snap),
        requests_per_s,
        errors_per_s,
        in_flight: status.shared.loads.service_total(&snap.name),
        panic: Panic {
            active: panic.active,
            mode: dlb::health_policy::panic_mode_name(panic.mode),
        },
    }
}

/// The overview, as of now.
pub fn overview(status: &Status) -> Overview {
    let cache = &status.shared.cache;
    let mut names = cache.service_names();
    names.sort();
    status
        .shared
        .reports
        .rates
        .prune(&|name| cache.get(name).is_some());
    let services = names
        .iter()
        .filter_map(|n| cache.get(n))
        .map(|snap| summary(status, &snap))
        .collect();
    Overview {
        replica: Replica {
            id: status.coordination.replica_id().to_string(),
            leader: status.coordination.is_leader(),
            readiness: match status.shared.readiness.state() {
                crate::readiness::State::Ready => "ready",
                crate::readiness::State::NotReady => "not_ready",
                crate::readiness::State::GoingAway => "going_away",
            },
            members: status
                .coordination
                .members()
                .borrow()
                .ids()
                .iter()
                .map(|id| id.to_string())
                .collect(),
        },
        store: StoreView {
            kind: status.store_kind,
            epoch: format!("{:x}", cache.epoch()),
            revision: cache.revision(),
        },
        sessions: status
            .shared
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed),
        xds_clients: status.xds_clients.len(),
        barriers: super::barriers::count(status),
        services,
    }
}

fn source(s: &proto::Server) -> &'static str {
    match proto::BackendSource::try_from(s.source) {
        Ok(proto::BackendSource::Lease) => "lease",
        Ok(proto::BackendSource::Dns) => "dns",
        _ => "api",
    }
}

/// Longest wait for the lease keeper's answer (on etcd a lease's time to live is one RPC);
/// past it the page shows TTLs without ages.
const LEASE_WAIT: Duration = Duration::from_millis(500);

/// Seconds since each lease of `service` was renewed, by backend id (empty when the keeper
/// does not answer in time).
async fn lease_ages(status: &Status, service: &str) -> HashMap<String, u64> {
    let list = tokio::time::timeout(LEASE_WAIT, status.leases.list(service.to_owned())).await;
    match list {
        Ok(Ok(leases)) => leases
            .into_iter()
            .map(|l| (l.server_id, l.ttl.saturating_sub(l.remaining).as_secs()))
            .collect(),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, service, "status page: leases not listed");
            HashMap::new()
        }
        Err(_) => HashMap::new(),
    }
}

/// A service's page, with lease ages; `None` when it does not exist.
pub async fn service(status: &Status, name: &str) -> Option<ServiceView> {
    service_with(status, name, true, None).await
}

/// A service's page; lease ages only when `with_leases` (the live updates leave them out: they
/// change every second, and on etcd each costs an RPC); only the backends among `only` when
/// given (a live update after a change: O(changed) rows instead of O(backends)). `None` when
/// the service does not exist.
pub async fn service_with(
    status: &Status,
    name: &str,
    with_leases: bool,
    only: Option<&BTreeSet<String>>,
) -> Option<ServiceView> {
    let snap = status.shared.cache.get(name)?;
    let leased = snap.servers.values().any(|s| source(s) == "lease");
    let ages = if with_leases && leased {
        lease_ages(status, name).await
    } else {
        HashMap::new()
    };
    let probes: BTreeMap<String, _> = status
        .shared
        .health
        .inspect_service(name)
        .await
        .into_iter()
        .collect();
    let in_flight = status.shared.loads.totals(name);
    let mut rates = status.shared.reports.rates.service(name);
    let circuits = status.shared.circuits.counts(name);
    let records: Vec<&Arc<proto::Server>> = match only {
        Some(ids) => ids
            .iter()
            .filter_map(|id| snap.servers.get(id.as_str()))
            .collect(),
        None => snap.servers.values().collect(),
    };
    let servers = records
        .into_iter()
        .map(|s| {
            let probe = probes.get(&s.server_id);
            let rates = rates.remove(&s.server_id).unwrap_or_default();
            let circuit = circuits.get(&s.server_id).copied().unwrap_or_default();
            let locality = LocalityView::of(s.locality.as_ref());
            BackendView {
                id: s.server_id.clone(),
                address: s.address.clone(),
                zone: locality.as_ref().map(LocalityView::display),
                locality,
                priority: s.priority,
                metadata: s
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                weight: s.weight,
                effective_weight: if s.effective_weight == 0 {
                    s.weight
                } else {
                    s.effective_weight
                },
                eligible: dlb::model::is_eligible(s),
                health: if s.health == proto::HealthStatus::Unhealthy as i32 {
                    "unhealthy"
                } else {
                    "healthy"
                },
                draining: s.draining,
                reason: s.reason.clone(),
                probe: probe.map(|p| match p.health {
                    crate::health::active::state::Health::Unknown => "unknown",
                    crate::health::active::state::Health::Healthy => "healthy",
                    crate::health::active::state::Health::Unhealthy => "unhealthy",
                }),
                probe_rtt_us: probe
                    .and_then(|p| p.last_rtt)
                    .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                in_flight: in_flight.get(&s.server_id).copied().unwrap_or(0),
                requests_per_s: rates.requests_per_s,
                errors_per_s: rates.errors_per_s,
                requests_trend: rates.requests,
                errors_trend: rates.errors,
                circuit_open: circuit.open,
                circuit_half_open: circuit.half_open,
                source: source(s),
                lease_ttl_seconds: (s.lease_ttl_seconds > 0).then_some(s.lease_ttl_seconds),
                lease_age_seconds: ages.get(&s.server_id).copied(),
                dns_name: (!s.dns_name.is_empty()).then(|| s.dns_name.clone()),
            }
        })
        .collect();
    let followers = super::followers::followers(status, name, snap.version.version);
    let policy = PolicyView {
        algorithm: algorithm(&snap.policy),
        panic_threshold_percent: snap
            .policy
            .panic
            .as_ref()
            .map_or(0, |p| p.threshold_percent),
        outlier_detection: snap.policy.outlier_detection.is_some(),
        health_check: snap.policy.health_check.is_some(),
    };
    Some(ServiceView {
        summary: summary(status, &snap),
        policy,
        servers,
        followers,
        barriers: super::barriers::of_service(status, name),
    })
}
