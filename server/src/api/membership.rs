//! The `dlb.v1.Membership` gRPC service — automatic discovery's front-end — and its metrics.
//!
//! * Leases ([`crate::membership::leases`]): `Register` creates or renews a lease-owned backend,
//!   `Deregister` ends it, `ListLeases` shows the remaining times.
//! * DNS ([`crate::membership::dns`]): `DeclareDns`, `RemoveDns`, `ListDns`.
//!
//! Ownership rule: a record has one owner (`Server.source`). `Register` on an id owned by
//! `AddServer`/config or by DNS is refused with `ALREADY_EXISTS` and changes nothing; `AddServer`
//! on a lease-owned id is refused with `ALREADY_EXISTS` as for any taken id. `Deregister` only
//! removes lease-owned records (`FAILED_PRECONDITION` otherwise). An operator's `RemoveServer`
//! may remove a lease-owned record; its next renewal registers it again. A re-register with a
//! different address (or weight, hash key, metadata, TTL, locality, priority) updates the record in place, one
//! write, keeping its health sources and drain flag; a renewal that changes nothing writes
//! nothing.
//!
//! Writes never overwrite a record another owner holds: a creation is an `Add` (atomic on the
//! id: it fails if the id was taken meanwhile, and the call re-reads), an update in place and a
//! `Deregister` are compare-and-set on the version read for the ownership check, retried. A pure
//! renewal touches the store only to read, so a burst of registrations on one service never makes
//! renewals retry.

use std::sync::Arc;
use std::time::Duration;

use dlb::model;
use dlb::proto::{self, membership_server::Membership};
use tonic::{Request, Response, Status};

use crate::api::Shared;
use crate::membership::dns::{self, DnsManager};
use crate::membership::leases::{self, LeaseKey, Leases};
use crate::store::Mutation;
use crate::Error;

/// Compare-and-set attempts of one `Register` (update in place) / `Deregister`.
const WRITE_ATTEMPTS: usize = 32;
/// How long a committed write waits for the cache before answering anyway.
const CACHE_WAIT: Duration = Duration::from_secs(1);

/// Whether a stored lease-owned record already says what a `Register` declares.
fn same_declaration(have: &proto::Server, want: &proto::Server) -> bool {
    have.address == want.address
        && have.weight == want.weight
        && have.hash_key == want.hash_key
        && have.metadata == want.metadata
        && have.lease_ttl_seconds == want.lease_ttl_seconds
        && have.locality == want.locality
        && have.priority == want.priority
}

/// The Membership service implementation.
pub struct MembershipService {
    shared: Arc<Shared>,
    leases: Arc<dyn Leases>,
    dns: DnsManager,
}

impl MembershipService {
    pub(crate) fn new(shared: Arc<Shared>, leases: Arc<dyn Leases>, dns: DnsManager) -> Self {
        Self {
            shared,
            leases,
            dns,
        }
    }

    fn done<T>(&self, method: &'static str, r: Result<T, Status>) -> Result<Response<T>, Status> {
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => {
                tracing::debug!(method, code = ?s.code(), message = s.message(), "rejected");
                s.code()
            }
        };
        self.shared.metrics.rpc(method, code);
        r.map(Response::new)
    }

    /// Drains lease-owned backend `server_id` and waits on the drain barrier (`Deregister`
    /// with `drain`: a backend asking for itself to go safely).
    async fn drain_self(
        &self,
        service: &str,
        server_id: &str,
        wait: crate::api::barrier::Wait,
    ) -> Result<proto::DrainBarrier, Status> {
        let Some(snap) = self.shared.store.get_service(service.to_owned()).await? else {
            return Err(Error::ServiceNotFound(service.to_owned()).into());
        };
        let Some(have) = snap.servers.get(server_id) else {
            return Err(Error::ServerNotFound {
                service: service.to_owned(),
                server_id: server_id.to_owned(),
            }
            .into());
        };
        if !leases::is_leased(have) {
            return Err(Status::failed_precondition(format!(
                "server_id {:?} in service {service:?} is not lease-owned; use drain_server",
                model::prefix(server_id, model::MAX_QUOTED)
            )));
        }
        let patch = crate::store::ServerPatch {
            draining: Some(true),
            ..Default::default()
        };
        let applied = self
            .shared
            .store
            .apply(
                service.to_owned(),
                vec![Mutation::Update(server_id.to_owned(), patch)],
                None,
            )
            .await?;
        self.wait_cache(applied.version.version).await;
        tracing::info!(
            service,
            server_id,
            "lease-owned backend draining before it deregisters"
        );
        Ok(crate::api::barrier::wait(
            &self.shared,
            service,
            server_id,
            applied.version.version,
            wait,
        )
        .await)
    }

    async fn wait_cache(&self, version: u64) {
        if !self
            .shared
            .cache
            .wait_for_revision(version, CACHE_WAIT)
            .await
        {
            tracing::warn!(version, "write committed; the cache has not caught up yet");
        }
    }

    async fn register(
        &self,
        req: proto::RegisterRequest,
    ) -> Result<proto::RegisterResponse, Status> {
        let service = model::resolve_service(&req.service)
            .map_err(Error::from)?
            .to_owned();
        let weight = if req.weight == 0 { 1 } else { req.weight };
        let checks = || -> Result<(), model::ValidationError> {
            model::validate_server_id(&req.server_id)?;
            model::validate_address(&req.address)?;
            model::validate_weight(weight)?;
            model::validate_hash_key(&req.hash_key)?;
            model::validate_metadata(&req.metadata)?;
            if let Some(l) = &req.locality {
                dlb::locality::validate_locality("locality", l)?;
            }
            dlb::locality::validate_priority("priority", req.priority)?;
            if !(leases::MIN_TTL_SECONDS..=leases::MAX_TTL_SECONDS).contains(&req.ttl_seconds) {
                return Err(model::ValidationError::new(
                    "ttl_seconds",
                    req.ttl_seconds,
                    format!(
                        "must be between {} and {} seconds",
                        leases::MIN_TTL_SECONDS,
                        leases::MAX_TTL_SECONDS
                    ),
                ));
            }
            Ok(())
        };
        checks().map_err(Error::from)?;
        let desired = proto::Server {
            server_id: req.server_id.clone(),
            address: req.address.clone(),
            weight,
            hash_key: req.hash_key.clone(),
            metadata: req.metadata.clone(),
            source: proto::BackendSource::Lease as i32,
            lease_ttl_seconds: req.ttl_seconds,
            locality: dlb::locality::normalize(req.locality.clone()),
            priority: req.priority,
            ..Default::default()
        };
        let key = LeaseKey {
            service: service.clone(),
            server_id: req.server_id.clone(),
        };
        let ttl = Duration::from_secs(u64::from(req.ttl_seconds));
        for _ in 0..WRITE_ATTEMPTS {
            let snap = self.shared.store.get_service(service.clone()).await?;
            let existing = snap
                .as_ref()
                .and_then(|s| s.servers.get(req.server_id.as_str()).cloned());
            if let Some(have) = &existing {
                if !leases::is_leased(have) {
                    let owner = if dns::is_dns(have) {
                        "DNS discovery"
                    } else {
                        "add_server (or the config file)"
                    };
                    return Err(Status::already_exists(format!(
                        "server_id {:?} in service {service:?} is owned by {owner}; a lease cannot \
                         take it over (register another id, or remove it first)",
                        model::prefix(&req.server_id, model::MAX_QUOTED)
                    )));
                }
            }
            // Renew before writing: an expiry in progress finishes first, so this write
            // re-creates what it removed (see `leases`).
            self.leases.keep(key.clone(), ttl).await?;
            let version = snap.as_ref().map_or(0, |s| s.version.version);
            // A pure renewal reads and writes nothing more (no store call, so a busy service's
            // writes cannot make it retry).
            if let Some(have) = existing.as_ref().filter(|h| same_declaration(h, &desired)) {
                return Ok(proto::RegisterResponse {
                    service,
                    server: Some((**have).clone()),
                    version: snap.map(|s| s.version),
                    created: false,
                });
            }
            // Creation needs no compare-and-set: `Add` fails if the id was taken meanwhile
            // (then the loop re-reads who owns it). An update in place must still find the
            // record lease-owned: compare-and-set on the version read.
            let (mutation, expected) = match &existing {
                None => (Mutation::Add(desired.clone()), None),
                Some(_) => (Mutation::Declare(desired.clone()), Some(version)),
            };
            match self
                .shared
                .store
                .apply(service.clone(), vec![mutation], expected)
                .await
            {
                Ok(applied) => {
                    let created = existing.is_none();
                    if applied.changed {
                        self.wait_cache(applied.version.version).await;
                    }
                    if created {
                        self.shared.metrics.membership.registrations.inc();
                        tracing::info!(%service, server_id = %req.server_id, address = %req.address, ttl_seconds = req.ttl_seconds, "backend registered with a lease");
                    } else if applied.changed {
                        tracing::info!(%service, server_id = %req.server_id, address = %req.address, "lease-owned backend updated by a re-register");
                    }
                    let server = applied.servers.into_iter().next();
                    return Ok(proto::RegisterResponse {
                        service,
                        server,
                        version: Some(applied.version),
                        created,
                    });
                }
                Err(Error::VersionMismatch { .. } | Error::AlreadyExists { .. }) => continue,
                Err(e) => {
                    if existing.is_none() {
                        // Nothing was created: the lease must not outlive the refusal.
                        let _ = self.leases.forget(key).await;
                    }
                    return Err(e.into());
                }
            }
        }
        Err(Status::aborted("the service kept changing; retry Register"))
    }

    async fn deregister(
        &self,
        req: proto::DeregisterRequest,
    ) -> Result<proto::DeregisterResponse, Status> {
        let service = model::resolve_service(&req.service)
            .map_err(Error::from)?
            .to_owned();
        model::validate_server_id(&req.server_id).map_err(Error::from)?;
        let wait = crate::api::barrier::Wait::parse(req.drain.as_ref(), false)?;
        let barrier = match wait {
            Some(wait) => Some(self.drain_self(&service, &req.server_id, wait).await?),
            None => None,
        };
        let key = LeaseKey {
            service: service.clone(),
            server_id: req.server_id.clone(),
        };
        for _ in 0..WRITE_ATTEMPTS {
            let Some(snap) = self.shared.store.get_service(service.clone()).await? else {
                return Err(Error::ServiceNotFound(service).into());
            };
            let Some(have) = snap.servers.get(req.server_id.as_str()) else {
                let _ = self.leases.forget(key).await;
                return Err(Error::ServerNotFound {
                    service,
                    server_id: req.server_id,
                }
                .into());
            };
            if !leases::is_leased(have) {
                return Err(Status::failed_precondition(format!(
                    "server_id {:?} in service {service:?} is not lease-owned; use remove_server",
                    model::prefix(&req.server_id, model::MAX_QUOTED)
                )));
            }
            match self
                .shared
                .store
                .apply(
                    service.clone(),
                    vec![Mutation::RemoveWithReason(
                        req.server_id.clone(),
                        "deregistered".into(),
                    )],
                    Some(snap.version.version),
                )
                .await
            {
                Ok(applied) => {
                    self.leases.forget(key).await?;
                    let mut version = applied.version.version;
                    if crate::membership::leases::abandoned(&snap, 1) {
                        version = crate::membership::leases::remove_abandoned(
                            &*self.shared.store,
                            &service,
                            version,
                        )
                        .await
                        .unwrap_or(version);
                    }
                    self.wait_cache(version).await;
                    tracing::info!(%service, server_id = %req.server_id, "backend deregistered");
                    return Ok(proto::DeregisterResponse {
                        service,
                        version: Some(applied.version),
                        barrier,
                    });
                }
                Err(Error::VersionMismatch { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Status::aborted(
            "the service kept changing; retry Deregister",
        ))
    }
}

#[tonic::async_trait]
impl Membership for MembershipService {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let r = MembershipService::register(self, request.into_inner()).await;
        self.done("Register", r)
    }

    async fn deregister(
        &self,
        request: Request<proto::DeregisterRequest>,
    ) -> Result<Response<proto::DeregisterResponse>, Status> {
        let r = MembershipService::deregister(self, request.into_inner()).await;
        self.done("Deregister", r)
    }

    async fn list_leases(
        &self,
        request: Request<proto::ListLeasesRequest>,
    ) -> Result<Response<proto::ListLeasesResponse>, Status> {
        let req = request.into_inner();
        let r = async {
            let service = model::resolve_service(&req.service)
                .map_err(Error::from)?
                .to_owned();
            let all = self.leases.list(service.clone()).await?;
            let total = all.len();
            let leases = all.into_iter().map(|l| proto::LeaseInfo {
                server_id: l.server_id,
                ttl_seconds: u32::try_from(l.ttl.as_secs()).unwrap_or(u32::MAX),
                remaining_ms: u64::try_from(l.remaining.as_millis()).unwrap_or(u64::MAX),
            });
            let mut r = proto::ListLeasesResponse {
                service,
                ..Default::default()
            };
            // Bounded in bytes: the first leases (by server_id) that fit, and how many exist.
            let listed =
                crate::listing::first_that_fit(total, leases, prost::Message::encoded_len(&r));
            r.leases = listed.items;
            r.truncated = listed.truncated;
            r.total = listed.total;
            Ok(r)
        }
        .await;
        self.done("ListLeases", r)
    }

    async fn declare_dns(
        &self,
        request: Request<proto::DeclareDnsRequest>,
    ) -> Result<Response<proto::DnsStatus>, Status> {
        let req = request.into_inner();
        let r = async {
            let service = model::resolve_service(&req.service).map_err(Error::from)?;
            let template = dns::Template {
                weight: if req.weight == 0 { 1 } else { req.weight },
                locality: req.locality,
                priority: req.priority,
            };
            let status = self.dns.declare(service, &req.target, template).await?;
            self.wait_cache(self.shared.store.snapshot().await?.revision)
                .await;
            Ok(status)
        }
        .await;
        self.done("DeclareDns", r)
    }

    async fn remove_dns(
        &self,
        request: Request<proto::RemoveDnsRequest>,
    ) -> Result<Response<proto::RemoveDnsResponse>, Status> {
        let req = request.into_inner();
        let r = async {
            let service = model::resolve_service(&req.service)
                .map_err(Error::from)?
                .to_owned();
            let version = self.dns.remove(&service).await?;
            self.wait_cache(version.version).await;
            Ok(proto::RemoveDnsResponse {
                service,
                version: Some(version),
            })
        }
        .await;
        self.done("RemoveDns", r)
    }

    async fn list_dns(
        &self,
        request: Request<proto::ListDnsRequest>,
    ) -> Result<Response<proto::ListDnsResponse>, Status> {
        let req = request.into_inner();
        let r = (|| {
            let only = if req.service.is_empty() {
                None
            } else {
                Some(model::resolve_service(&req.service).map_err(Error::from)?)
            };
            Ok(dns_listing(self.dns.list(only)))
        })();
        self.done("ListDns", r)
    }
}

/// The `ListDns` answer for `all` the followed names (ordered by service), bounded in bytes: the
/// first names that fit, and how many exist.
fn dns_listing(all: Vec<proto::DnsStatus>) -> proto::ListDnsResponse {
    let listed = crate::listing::first_that_fit(all.len(), all, 0);
    proto::ListDnsResponse {
        names: listed.items,
        truncated: listed.truncated,
        total: listed.total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest status a followed name can have: a 128-byte service, a 253-byte name, a
    /// 256-byte error, a locality of three 128-byte parts and every counter at its widest.
    fn status(i: usize) -> proto::DnsStatus {
        proto::DnsStatus {
            service: format!("{i:0>128}"),
            target: format!("{}:65535", "n".repeat(253)),
            weight: 10_000,
            backends: 65_535,
            resolved: u32::MAX,
            truncated: true,
            consecutive_failures: u32::MAX,
            last_error: "e".repeat(256),
            next_refresh_ms: u64::MAX,
            locality: Some(proto::Locality {
                region: "r".repeat(128),
                zone: "z".repeat(128),
                sub_zone: "s".repeat(128),
            }),
            priority: 7,
        }
    }

    #[test]
    fn list_dns_is_bounded_with_a_count() {
        // The service quota's worth of the largest statuses: ≈ 7 MB.
        let all: Vec<_> = (0..model::MAX_SERVICES).map(status).collect();
        let r = dns_listing(all.clone());
        assert!(r.truncated);
        assert_eq!(r.total as usize, model::MAX_SERVICES);
        assert!(!r.names.is_empty() && r.names.len() < all.len());
        assert_eq!(r.names, all[..r.names.len()], "the first ones, in order");
        assert!(prost::Message::encoded_len(&r) <= model::MAX_LIST_BYTES);
        // A listing that fits is whole.
        let r = dns_listing(all[..10].to_vec());
        assert!(!r.truncated);
        assert_eq!((r.names.len(), r.total), (10, 10));
    }
}
