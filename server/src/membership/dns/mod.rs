//! DNS discovery: a service declared with `dns: name:port` has its DNS-owned backends kept equal
//! to the name's A/AAAA records.
//!
//! One task per followed name ([`DnsManager`] starts, replaces and stops them) resolves it with
//! `hickory-resolver` against the configured name servers (or the system's `resolv.conf`) and
//! reconciles the service: a backend per address, id `<ip>-<port>` (e.g. `10.0.0.7-8080`,
//! `2001:db8::7-8080`), address `ip:port` / `[ip]:port`, the declared weight, `source = DNS` and
//! `dns_name = name:port`, and the declaration's locality and priority ([`Template`]). Additions and removals are one ordinary store write (compare-and-set
//! on the version just read, retried), pushed like any change; a refresh that finds the same set
//! writes nothing. Only DNS-owned records are touched: an address whose id is taken by an API or
//! lease record is skipped (and logged). Answers that can never be a backend's address — the
//! unspecified address (`0.0.0.0`, `::`), IPv4 broadcast and multicast — are skipped, logged
//! and counted (`dlb_dns_skipped_addresses_total{reason}`); only such answers is a failed
//! resolution. A target's port is digits only (`name:+80` is refused).
//!
//! **Timing.** The next refresh comes after the smallest TTL of the answer, clamped to
//! [`DnsConfig::min_refresh`]..=[`DnsConfig::max_refresh`] (defaults 5 s ..= 300 s). After a
//! failure it comes sooner: [`DnsConfig::retry_min`] doubling per consecutive failure up to
//! [`DnsConfig::retry_max`] (defaults 1 s ..= 30 s). The resolver's own cache is cleared before
//! each lookup, so each refresh asks the name servers.
//!
//! **Failure keeps the last good set.** A timeout, SERVFAIL, NXDOMAIN, an answer with no
//! addresses or a refused store write changes nothing: the service is never emptied by DNS. The
//! failure is counted (`dlb_dns_refreshes_total{result="error"}`), shown as
//! `dlb_dns_consecutive_failures{service}` and in [`Status`] (`dlbctl dns list`).
//!
//! **Quota.** A name that resolves to more than [`DnsConfig::max_backends`] addresses (default
//! 256) keeps the lowest ones in address order (deterministic, so every refresh and every
//! replica picks the same subset), logs a warning and reports `truncated` in its status.
//!
//! **Durability.** A declaration through the API is resolved once before anything is written
//! (a name that does not resolve is refused), so a declared service always has DNS-owned records
//! carrying `dns_name`: at start, [`DnsManager::start`] follows every name found on them, plus
//! the ones in the config file (the config wins for its services).
//!
//! **Leader only.** With several replicas, refreshes run on the leader alone
//! ([`crate::replicas::Coordination::leadership`]): every replica keeps its table of followed
//! names (so `ListDns` answers anywhere and a new leader starts at once), but a name's task
//! resolves and writes only while its replica leads, through the leader's fenced store view
//! (a deposed leader cannot write); a replica that loses leadership abandons a refresh in
//! progress at once. `DeclareDns` and `RemoveDns` are API writes and run on the replica that
//! receives them; the leader picks up names declared elsewhere (and drops names removed
//! elsewhere) by re-scanning its cache every [`RESCAN`] while it leads. Single-node stores are
//! always the leader.
//!
//! Sync: the table of followed names is a `parking_lot::Mutex<HashMap>` touched for O(1) map
//! operations only; each name's status is a `Mutex` written by its task after each refresh and
//! read by `ListDns`. No lock is held across an `.await`.

mod config;
mod refresh;
mod resolve;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dlb::{model, proto};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

pub use config::{backend_id, DnsConfig, DnsDeclaration, Target, Template};

use crate::membership::MembershipMetrics;
use crate::shutdown::Shutdown;
use crate::store::{Mutation, Store, StoreSnapshot};
use crate::Error;
use refresh::{reconcile, refresh_loop};
use resolve::{build_resolver, resolve, Resolved};

/// Compare-and-set attempts of one reconcile before it counts as a failure.
const RECONCILE_ATTEMPTS: usize = 32;
/// How often the leader re-scans its cache for names declared or removed through other
/// replicas.
pub const RESCAN: Duration = Duration::from_secs(2);

/// Whether a stored record is owned by DNS discovery.
pub fn is_dns(server: &proto::Server) -> bool {
    server.source == proto::BackendSource::Dns as i32
}

/// What the last refresh of one name found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    /// DNS-owned backends after the last successful refresh.
    pub backends: usize,
    /// Addresses the last successful resolution returned.
    pub resolved: usize,
    /// Whether they were more than the quota.
    pub truncated: bool,
    /// Failed refreshes since the last success.
    pub consecutive_failures: u32,
    /// The last failure; empty after a success.
    pub last_error: String,
    /// When the next refresh is due.
    pub next_refresh: Option<Instant>,
}

struct Followed {
    target: Target,
    template: Template,
    status: Arc<Mutex<Status>>,
    task: tokio::task::JoinHandle<()>,
}

struct Inner {
    store: Arc<dyn Store>,
    /// The leader's fenced view of the store: refreshes write through it.
    fenced: Arc<dyn Store>,
    /// `Some(fence)` while this replica leads.
    leadership: watch::Receiver<Option<i64>>,
    metrics: MembershipMetrics,
    config: DnsConfig,
    shutdown: Shutdown,
    /// Followed names by service.
    followed: Mutex<HashMap<String, Followed>>,
}

/// Follows DNS names (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct DnsManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DnsManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsManager")
            .field("followed", &self.inner.followed.lock().len())
            .finish_non_exhaustive()
    }
}

impl DnsManager {
    /// Starts following every name declared in `config` and every name found on DNS-owned
    /// records of `initial` (for services the config does not declare).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        store: Arc<dyn Store>,
        fenced: Arc<dyn Store>,
        leadership: watch::Receiver<Option<i64>>,
        metrics: MembershipMetrics,
        config: DnsConfig,
        initial: &StoreSnapshot,
        shutdown: Shutdown,
    ) -> Self {
        let mut declared: BTreeMap<String, (String, Template)> = BTreeMap::new();
        for svc in &initial.services {
            if let Some(s) = svc.servers.values().find(|s| is_dns(s)) {
                declared.insert(svc.name.clone(), (s.dns_name.clone(), Template::of(s)));
            }
        }
        for d in &config.services {
            declared.insert(d.service.clone(), (d.target.clone(), d.template()));
        }
        let manager = Self {
            inner: Arc::new(Inner {
                store,
                fenced,
                leadership,
                metrics,
                config,
                shutdown,
                followed: Mutex::new(HashMap::new()),
            }),
        };
        for (service, (target, template)) in declared {
            match Target::parse(&target) {
                Ok(t) => manager.follow(service, t, template, Status::default(), Duration::ZERO),
                Err(e) => {
                    tracing::warn!(%service, error = %e, "stored DNS name is invalid; not followed")
                }
            }
        }
        manager
    }

    /// Starts (or replaces) the task following `target` for `service`, first refresh after
    /// `first`.
    fn follow(
        &self,
        service: String,
        target: Target,
        template: Template,
        status: Status,
        first: Duration,
    ) {
        let status = Arc::new(Mutex::new(status));
        let task = self.inner.shutdown.spawn(refresh_loop(
            self.inner.clone(),
            service.clone(),
            target.clone(),
            template.clone(),
            status.clone(),
            first,
        ));
        let old = self.inner.followed.lock().insert(
            service,
            Followed {
                target,
                template,
                status,
                task,
            },
        );
        if let Some(old) = old {
            old.task.abort();
        }
    }

    /// Stops the task of `service`, if any; returns what it followed.
    fn unfollow(&self, service: &str) -> Option<(Target, Template)> {
        let f = self.inner.followed.lock().remove(service)?;
        f.task.abort();
        Some((f.target, f.template))
    }

    /// With several replicas: while this replica leads, every [`RESCAN`] follows the names found
    /// on DNS-owned records in `cache` that it does not follow yet (declared through another
    /// replica), and stops following names not declared in the config file whose service has
    /// had no DNS-owned record in two scans in a row (removed through another replica; two, so
    /// a declaration this replica has just written but its cache not yet applied is kept).
    /// O(backends) per scan, on the leader only. Ends at shutdown.
    pub fn rescan_while_leading(&self, cache: Arc<crate::cache::Cache>) {
        let manager = self.clone();
        let shutdown = self.inner.shutdown.clone();
        self.inner.shutdown.spawn(async move {
            let mut suspects = std::collections::HashSet::new();
            let mut tick = tokio::time::interval(RESCAN);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.stopped() => return,
                    _ = tick.tick() => {}
                }
                if manager.inner.leadership.borrow().is_some() {
                    manager.rescan(&cache, &mut suspects);
                }
            }
        });
    }

    fn rescan(
        &self,
        cache: &crate::cache::Cache,
        suspects: &mut std::collections::HashSet<String>,
    ) {
        let configured = |service: &str| {
            self.inner
                .config
                .services
                .iter()
                .any(|d| d.service == service)
        };
        let mut found: HashMap<String, (String, Template)> = HashMap::new();
        for name in cache.service_names() {
            let Some(snap) = cache.get(&name) else {
                continue;
            };
            if let Some(s) = snap.servers.values().find(|s| is_dns(s)) {
                found.insert(name.to_string(), (s.dns_name.clone(), Template::of(s)));
            }
        }
        let followed: HashMap<String, (String, Template)> = self
            .inner
            .followed
            .lock()
            .iter()
            .map(|(s, f)| (s.clone(), (f.target.to_text(), f.template.clone())))
            .collect();
        let missing: std::collections::HashSet<String> = followed
            .keys()
            .filter(|s| !found.contains_key(*s) && !configured(s))
            .cloned()
            .collect();
        for service in missing.intersection(suspects) {
            tracing::info!(%service, "DNS name removed through another replica; no longer followed");
            self.unfollow(service);
            self.inner.metrics.dns_forget(service);
        }
        *suspects = missing;
        for (service, (target, template)) in found {
            // Followed already (a name, weight, locality or priority redeclared elsewhere is
            // followed anew); the config file wins for its services.
            if followed.get(&service) == Some(&(target.clone(), template.clone()))
                || configured(&service)
            {
                continue;
            }
            match Target::parse(&target) {
                Ok(t) => {
                    tracing::info!(%service, target = %target, "following a DNS name declared through another replica");
                    self.follow(service, t, template, Status::default(), Duration::ZERO);
                }
                Err(e) => {
                    tracing::warn!(%service, error = %e, "stored DNS name is invalid; not followed")
                }
            }
        }
    }

    /// Waits for every name's task to end (they end when the shutdown starts), so
    /// that nothing holds the store after a graceful shutdown.
    pub async fn join(&self) {
        let tasks: Vec<_> = self
            .inner
            .followed
            .lock()
            .drain()
            .map(|(_, f)| f.task)
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    /// `DeclareDns`: checks the declaration (INVALID_ARGUMENT naming the field), resolves
    /// `target` once (a name that does not resolve is refused with FAILED_PRECONDITION and
    /// changes nothing), writes the backends with `template`'s weight, locality and priority
    /// (a re-declaration rewrites existing ones in place), then follows it.
    pub async fn declare(
        &self,
        service: &str,
        target: &str,
        template: Template,
    ) -> Result<proto::DnsStatus, tonic::Status> {
        let target = Target::parse(target).map_err(Error::from)?;
        model::validate_weight(template.weight).map_err(Error::from)?;
        if let Some(l) = &template.locality {
            dlb::locality::validate_locality("locality", l).map_err(Error::from)?;
        }
        dlb::locality::validate_priority("priority", template.priority).map_err(Error::from)?;
        let template = Template {
            locality: dlb::locality::normalize(template.locality),
            ..template
        };
        let resolver = build_resolver(&self.inner.config).map_err(tonic::Status::internal)?;
        let resolved = resolve(&resolver, &target).await.map_err(|e| {
            tonic::Status::failed_precondition(format!(
                "DNS name {:?} does not resolve: {e}; nothing was changed",
                target.name
            ))
        })?;
        // The old task (another name, or the same) stops before this write, so it cannot
        // write an older set after it.
        let previous = self.unfollow(service);
        let store = self.inner.store.clone();
        let status =
            match reconcile(&self.inner, &*store, service, &target, &template, &resolved).await {
                Ok(s) => s,
                Err(e) => {
                    // Nothing was written: keep following what was declared before, if anything.
                    if let Some((t, w)) = previous {
                        self.follow(service.to_owned(), t, w, Status::default(), Duration::ZERO);
                    }
                    return Err(e.into());
                }
            };
        self.inner.metrics.dns_refresh(service, true);
        let delay = self.refresh_delay(&resolved);
        let status = Status {
            next_refresh: Some(Instant::now() + delay),
            ..status
        };
        let reply = to_proto(service, &target, &template, &status);
        tracing::info!(service, target = %target.to_text(), backends = status.backends, "DNS name declared");
        self.follow(service.to_owned(), target, template, status, delay);
        Ok(reply)
    }

    /// `RemoveDns`: stops following and removes the service's DNS-owned backends. NOT_FOUND
    /// when the service follows no name and has no DNS-owned backend.
    pub async fn remove(&self, service: &str) -> Result<proto::Version, tonic::Status> {
        let followed = self.unfollow(service).is_some();
        self.inner.metrics.dns_forget(service);
        for _ in 0..RECONCILE_ATTEMPTS {
            let Some(snap) = self.inner.store.get_service(service.to_owned()).await? else {
                return Err(Error::ServiceNotFound(service.to_owned()).into());
            };
            let removals: Vec<Mutation> = snap
                .servers
                .values()
                .filter(|s| is_dns(s))
                .map(|s| {
                    Mutation::RemoveWithReason(
                        s.server_id.clone(),
                        "dns: no longer followed".into(),
                    )
                })
                .collect();
            if removals.is_empty() {
                if followed {
                    return Ok(snap.version);
                }
                return Err(tonic::Status::not_found(format!(
                    "service {service:?} follows no DNS name"
                )));
            }
            match self
                .inner
                .store
                .apply(service.to_owned(), removals, Some(snap.version.version))
                .await
            {
                Ok(a) => return Ok(a.version),
                Err(Error::VersionMismatch { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(tonic::Status::aborted(
            "the service kept changing; retry RemoveDns",
        ))
    }

    /// `ListDns`: the followed names (of `service` only, when given), ordered by service.
    pub fn list(&self, service: Option<&str>) -> Vec<proto::DnsStatus> {
        let followed = self.inner.followed.lock();
        let mut out: Vec<proto::DnsStatus> = followed
            .iter()
            .filter(|(s, _)| service.is_none_or(|want| want == s.as_str()))
            .map(|(s, f)| to_proto(s, &f.target, &f.template, &f.status.lock()))
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }

    fn refresh_delay(&self, resolved: &Resolved) -> Duration {
        resolved
            .ttl
            .clamp(self.inner.config.min_refresh, self.inner.config.max_refresh)
    }
}

fn to_proto(service: &str, target: &Target, template: &Template, s: &Status) -> proto::DnsStatus {
    proto::DnsStatus {
        service: service.to_owned(),
        target: target.to_text(),
        weight: template.weight,
        backends: u32::try_from(s.backends).unwrap_or(u32::MAX),
        resolved: u32::try_from(s.resolved).unwrap_or(u32::MAX),
        truncated: s.truncated,
        consecutive_failures: s.consecutive_failures,
        last_error: s.last_error.clone(),
        next_refresh_ms: s.next_refresh.map_or(0, |t| {
            u64::try_from(t.saturating_duration_since(Instant::now()).as_millis())
                .unwrap_or(u64::MAX)
        }),
        locality: template.locality.clone(),
        priority: template.priority,
    }
}
