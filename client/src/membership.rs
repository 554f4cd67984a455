//! Automatic discovery from the SDK: self-registration with a lease, and DNS declarations.
//!
//! [`Client::register`] registers this process's backend with a lease and returns a
//! [`Registration`]: a background task renews the lease every third of its TTL (so two renewals
//! may be lost before it expires); dropping the handle stops renewing and deregisters in the
//! background, [`Registration::deregister`] does the same and waits for it. If the process dies
//! without deregistering, `dlbd` removes the backend once the lease runs out.
//!
//! [`AdminClient`] gets the `dlb.v1.Membership` calls (`register`, `deregister`, `list_leases`,
//! `declare_dns`, `remove_dns`, `list_dns`), validated locally first like the Registry calls.

use std::collections::HashMap;
use std::time::Duration;

use dlb::model;
use dlb::proto;
use dlb::proto::membership_client::MembershipClient;
use tokio::sync::watch;

use crate::admin::AdminClient;
use crate::error::{Error, Result};
use crate::Client;

/// Shortest lease `dlbd` grants, seconds.
pub const MIN_TTL_SECONDS: u32 = 1;
/// Longest lease `dlbd` grants, seconds.
pub const MAX_TTL_SECONDS: u32 = 3600;

/// A backend to register with a lease. Build with [`Lease::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The backend's id.
    pub server_id: String,
    /// Its address, `host:port`.
    pub address: String,
    /// Weight (0 means 1).
    pub weight: u32,
    /// Optional stable hash key.
    pub hash_key: String,
    /// Labels.
    pub metadata: HashMap<String, String>,
    /// Time to live.
    pub ttl: Duration,
    /// Where the backend runs (`None`: no locality; docs/locality.md).
    pub locality: Option<proto::Locality>,
    /// Failover priority, 0..=7 (0 = primary).
    pub priority: u32,
}

impl Lease {
    /// A lease for `server_id` at `address`, weight 1, TTL 10 s.
    pub fn new(server_id: impl Into<String>, address: impl Into<String>) -> Self {
        Self {
            server_id: server_id.into(),
            address: address.into(),
            weight: 0,
            hash_key: String::new(),
            metadata: HashMap::new(),
            ttl: Duration::from_secs(10),
            locality: None,
            priority: 0,
        }
    }

    /// Sets where the backend runs (see [`crate::locality`] to build one).
    pub fn locality(mut self, locality: proto::Locality) -> Self {
        self.locality = Some(locality);
        self
    }

    /// Sets the failover priority (0 = primary, at most 7).
    pub fn priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the time to live (whole seconds, 1..=3600).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    fn ttl_seconds(&self) -> Result<u32> {
        let secs = self.ttl.as_secs();
        if self.ttl.subsec_nanos() != 0
            || !(u64::from(MIN_TTL_SECONDS)..=u64::from(MAX_TTL_SECONDS)).contains(&secs)
        {
            return Err(Error::InvalidArgument(format!(
                "invalid ttl_seconds {:?}: must be whole seconds between {MIN_TTL_SECONDS} and \
                 {MAX_TTL_SECONDS}",
                self.ttl
            )));
        }
        Ok(u32::try_from(secs).unwrap_or(MAX_TTL_SECONDS))
    }

    fn request(&self, service: &str) -> Result<proto::RegisterRequest> {
        let service = model::resolve_service(service)?.to_owned();
        model::validate_server_id(&self.server_id)?;
        model::validate_address(&self.address)?;
        model::validate_weight(if self.weight == 0 { 1 } else { self.weight })?;
        model::validate_hash_key(&self.hash_key)?;
        model::validate_metadata(&self.metadata)?;
        if let Some(l) = &self.locality {
            dlb::locality::validate_locality("locality", l)?;
        }
        dlb::locality::validate_priority("priority", self.priority)?;
        Ok(proto::RegisterRequest {
            service,
            server_id: self.server_id.clone(),
            address: self.address.clone(),
            weight: self.weight,
            hash_key: self.hash_key.clone(),
            metadata: self.metadata.clone(),
            ttl_seconds: self.ttl_seconds()?,
            locality: self.locality.clone(),
            priority: self.priority,
        })
    }
}

/// A DNS declaration for [`AdminClient::declare_dns_with`]: every backend discovered for the
/// name gets its weight, locality and priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDeclaration {
    /// `name:port`.
    pub target: String,
    /// Weight of every discovered backend (0 means 1).
    pub weight: u32,
    /// Their locality (`None`: no locality).
    pub locality: Option<proto::Locality>,
    /// Their failover priority, 0..=7.
    pub priority: u32,
}

impl DnsDeclaration {
    /// A declaration of `target` (`name:port`), weight 1, no locality, priority 0.
    pub fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            weight: 0,
            locality: None,
            priority: 0,
        }
    }

    /// Sets the weight of every discovered backend.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets their locality.
    pub fn locality(mut self, locality: proto::Locality) -> Self {
        self.locality = Some(locality);
        self
    }

    /// Sets their failover priority.
    pub fn priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }

    fn request(&self, service: &str) -> Result<proto::DeclareDnsRequest> {
        if let Some(l) = &self.locality {
            dlb::locality::validate_locality("locality", l)?;
        }
        dlb::locality::validate_priority("priority", self.priority)?;
        Ok(proto::DeclareDnsRequest {
            service: model::resolve_service(service)?.to_owned(),
            target: self.target.clone(),
            weight: self.weight,
            locality: self.locality.clone(),
            priority: self.priority,
        })
    }
}

type Membership = MembershipClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        crate::TokenInterceptor,
    >,
>;

fn membership(channel: tonic::transport::Channel, token: crate::TokenInterceptor) -> Membership {
    MembershipClient::with_interceptor(channel, token)
        .max_decoding_message_size(model::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(model::MAX_MESSAGE_BYTES)
}

impl AdminClient {
    /// `Membership.Register`: creates or renews the lease-owned backend `lease` in `service`.
    pub async fn register(&self, service: &str, lease: &Lease) -> Result<proto::RegisterResponse> {
        let req = lease.request(service)?;
        self.unary_with(membership, req, |mut c, req| async move {
            c.register(req).await
        })
        .await
    }

    /// `Membership.Deregister`: ends a lease and removes its backend.
    pub async fn deregister(
        &self,
        service: &str,
        server_id: &str,
    ) -> Result<proto::DeregisterResponse> {
        let req = proto::DeregisterRequest {
            service: model::resolve_service(service)?.to_owned(),
            server_id: server_id.to_owned(),
            drain: None,
        };
        model::validate_server_id(server_id)?;
        self.unary_with(membership, req, |mut c, req| async move {
            c.deregister(req).await
        })
        .await
    }

    /// `Membership.Deregister` with a drain: the backend asks for itself to go safely — drained,
    /// the drain barrier waited on (`docs/drain.md`), then removed with its lease. The call's
    /// deadline is the usual one plus the barrier's.
    pub async fn deregister_draining(
        &self,
        service: &str,
        server_id: &str,
        wait: proto::BarrierWait,
    ) -> Result<proto::DeregisterResponse> {
        crate::admin::validate_wait(&wait)?;
        let req = proto::DeregisterRequest {
            service: model::resolve_service(service)?.to_owned(),
            server_id: server_id.to_owned(),
            drain: Some(wait),
        };
        model::validate_server_id(server_id)?;
        self.waiting(&wait)
            .unary_with(membership, req, |mut c, req| async move {
                c.deregister(req).await
            })
            .await
    }

    /// `Membership.ListLeases`: the leases of `service` with their remaining time.
    pub async fn list_leases(&self, service: &str) -> Result<proto::ListLeasesResponse> {
        let req = proto::ListLeasesRequest {
            service: model::resolve_service(service)?.to_owned(),
        };
        self.unary_with(membership, req, |mut c, req| async move {
            c.list_leases(req).await
        })
        .await
    }

    /// `Membership.DeclareDns`: `service`'s DNS-owned backends follow `target` (`name:port`),
    /// each with `weight` (0 means 1), no locality, priority 0. See
    /// [`AdminClient::declare_dns_with`] for the other fields.
    pub async fn declare_dns(
        &self,
        service: &str,
        target: &str,
        weight: u32,
    ) -> Result<proto::DnsStatus> {
        self.declare_dns_with(service, &DnsDeclaration::new(target).weight(weight))
            .await
    }

    /// `Membership.DeclareDns` with every field of `declaration` (locality and priority are
    /// checked here first, as the server checks them). A re-declaration rewrites the
    /// service's DNS-owned backends in place.
    pub async fn declare_dns_with(
        &self,
        service: &str,
        declaration: &DnsDeclaration,
    ) -> Result<proto::DnsStatus> {
        let req = declaration.request(service)?;
        self.unary_with(membership, req, |mut c, req| async move {
            c.declare_dns(req).await
        })
        .await
    }

    /// `Membership.RemoveDns`: stops following `service`'s DNS name and removes its DNS-owned
    /// backends.
    pub async fn remove_dns(&self, service: &str) -> Result<proto::RemoveDnsResponse> {
        let req = proto::RemoveDnsRequest {
            service: model::resolve_service(service)?.to_owned(),
        };
        self.unary_with(membership, req, |mut c, req| async move {
            c.remove_dns(req).await
        })
        .await
    }

    /// `Membership.ListDns`: the followed DNS names (all services when `service` is empty).
    pub async fn list_dns(&self, service: &str) -> Result<proto::ListDnsResponse> {
        let req = proto::ListDnsRequest {
            service: service.to_owned(),
        };
        self.unary_with(membership, req, |mut c, req| async move {
            c.list_dns(req).await
        })
        .await
    }

    /// Registers `lease` in `service` and keeps it alive until the returned handle is dropped
    /// or [`Registration::deregister`]ed.
    pub async fn register_and_keep(&self, service: &str, lease: Lease) -> Result<Registration> {
        let first = self.register(service, &lease).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let admin = self.clone();
        let service = first.service.clone();
        let task = tokio::spawn(renew_loop(
            admin.clone(),
            service.clone(),
            lease.clone(),
            stop_rx,
        ));
        Ok(Registration {
            admin,
            service,
            server_id: lease.server_id,
            first,
            stop: stop_tx,
            task: Some(task),
        })
    }
}

impl Client {
    /// Registers a backend in `service` (empty: "default") with a lease that this client keeps
    /// alive (see [`Registration`]).
    pub async fn register(&self, service: &str, lease: Lease) -> Result<Registration> {
        self.inner.admin.register_and_keep(service, lease).await
    }
}

/// Renews every third of the TTL; after a failed renewal it retries sooner (every tenth), so
/// a short control-plane outage does not lose the lease.
async fn renew_loop(
    admin: AdminClient,
    service: String,
    lease: Lease,
    mut stop: watch::Receiver<bool>,
) {
    let every = lease.ttl / 3;
    let mut delay = every;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(delay) => {}
        }
        match admin.register(&service, &lease).await {
            Ok(_) => delay = every,
            Err(e) => {
                tracing::warn!(%service, server_id = %lease.server_id, error = %e, "lease renewal failed; retrying");
                delay = (lease.ttl / 10).max(Duration::from_millis(100));
            }
        }
    }
}

/// A registered backend whose lease this process keeps alive. Dropping it stops the renewals
/// and deregisters in the background (when a tokio runtime is still running).
#[derive(Debug)]
pub struct Registration {
    admin: AdminClient,
    service: String,
    server_id: String,
    first: proto::RegisterResponse,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Registration {
    /// The first `Register`'s answer (the backend as stored, the version).
    pub fn registered(&self) -> &proto::RegisterResponse {
        &self.first
    }

    /// The service, resolved.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The backend id.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// Stops renewing and deregisters, waiting for the answer.
    pub async fn deregister(mut self) -> Result<proto::DeregisterResponse> {
        self.stop.send_replace(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.admin.deregister(&self.service, &self.server_id).await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            task.abort();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let admin = self.admin.clone();
                let service = std::mem::take(&mut self.service);
                let id = std::mem::take(&mut self.server_id);
                rt.spawn(async move {
                    if let Err(e) = admin.deregister(&service, &id).await {
                        tracing::warn!(%service, server_id = %id, error = %e, "deregistration on drop failed; the lease will expire");
                    }
                });
            }
        }
    }
}
