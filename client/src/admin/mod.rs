//! Admin calls: the `Registry` RPCs, validated locally first.
//!
//! [`AdminClient`] wraps the generated `RegistryClient` over one lazily connected channel per
//! control-plane endpoint. Every call validates its input with [`dlb::model`] (a backend with
//! [`model::validate_backend`] / [`model::validate_update`], the functions the server calls) before anything goes
//! on the wire (so a malformed request fails with the same message the server would give, without a
//! round trip), then tries the current endpoint and, when that one is unreachable
//! (`UNAVAILABLE`), the next ones in list order. `dlbctl`, [`crate::Client`] and
//! [`crate::ServiceHandle`] all go through it. A `dns:///host:port` endpoint is one entry here:
//! its channel resolves the name at each connection with the client's resolver (the system's
//! unless `ClientBuilder::resolver` set another) and tries each address in turn
//! (`crate::channel`, which also owns the transport options re-exported here:
//! [`ChannelOptions`], [`ClientTls`], [`TokenInterceptor`], [`make_endpoint`]).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dlb::model;
use dlb::proto;
use dlb::proto::registry_client::RegistryClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::channel::admin_channel;
pub use crate::channel::{make_endpoint, ChannelOptions, ClientTls, TokenInterceptor};
use crate::error::{Error, Result};

mod records;
pub use records::{NewServer, ServerUpdate};

/// Validates a policy as sent by `SetPolicy`: like [`model::validate_policy`], except that
/// `ALGORITHM_UNSPECIFIED` ("keep the current algorithm") is accepted
/// ([`model::validate_policy_write`], the check the server's store applies, without the stored
/// algorithm: the server checks the combination).
pub fn validate_policy_request(policy: &proto::Policy) -> Result<()> {
    model::validate_policy_write(policy, None)?;
    Ok(())
}

/// The drain barrier's deadline when a request leaves `timeout_ms` at 0 (as `dlbd`).
pub const DEFAULT_BARRIER_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest drain-barrier deadline `dlbd` accepts, in milliseconds (1 h).
pub const MAX_BARRIER_TIMEOUT_MS: u32 = 3_600_000;

/// Checks a drain barrier's wait option as `dlbd` does.
pub fn validate_wait(wait: &proto::BarrierWait) -> Result<()> {
    if wait.timeout_ms > MAX_BARRIER_TIMEOUT_MS {
        return Err(model::ValidationError::new(
            "wait.timeout_ms",
            wait.timeout_ms,
            format!("at most {MAX_BARRIER_TIMEOUT_MS} (1 h)"),
        )
        .into());
    }
    Ok(())
}

/// Client of the `Registry` RPCs over one or more control-plane endpoints. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// One lazily connected channel per endpoint, in the order given.
    channels: Arc<[(String, Channel)]>,
    /// Index of the endpoint that answered last; shared by clones so they stick to it.
    current: Arc<AtomicUsize>,
    /// Deadline of each call.
    request_timeout: Duration,
    /// Bearer token sent with every call.
    token: TokenInterceptor,
}

impl AdminClient {
    /// Builds a client over `endpoints` (`http://host:port`, `host:port` or `dns:///host:port`)
    /// with default options.
    /// Connections are made on first use.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Result<Self> {
        Self::with_options(endpoints, &ChannelOptions::default())
    }

    /// Like [`AdminClient::new`] with explicit transport options.
    pub fn with_options(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        opts: &ChannelOptions,
    ) -> Result<Self> {
        let mut channels = Vec::new();
        let system: Arc<dyn crate::Resolve> = Arc::new(crate::SystemResolver);
        for raw in endpoints {
            let raw = raw.into();
            let channel = admin_channel(&raw, opts, &system)?;
            channels.push((raw, channel));
        }
        Self::from_channels(channels, opts)
    }

    pub(crate) fn from_channels(
        channels: Vec<(String, Channel)>,
        opts: &ChannelOptions,
    ) -> Result<Self> {
        if channels.is_empty() {
            return Err(Error::InvalidEndpoint {
                endpoint: String::new(),
                reason: "at least one endpoint is required".into(),
            });
        }
        Ok(Self {
            channels: channels.into(),
            current: Arc::new(AtomicUsize::new(0)),
            request_timeout: opts.request_timeout,
            token: opts.token.clone(),
        })
    }

    /// Sends `token` as `authorization: Bearer <token>` with every call (`dlbd
    /// --admin-token-file` / `--read-token-file`).
    pub fn with_token(mut self, token: &str) -> Result<Self> {
        self.token = TokenInterceptor::new(Some(token))?;
        Ok(self)
    }

    /// The endpoints, in the order given.
    pub fn endpoints(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().map(|(e, _)| e.as_str())
    }

    async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(RegistryClient<InterceptedService<Channel, TokenInterceptor>>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_with(
            |channel, token| {
                // The same explicit limit as dlbd's: a ListServers of the largest service fits.
                RegistryClient::with_interceptor(channel, token)
                    .max_decoding_message_size(model::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(model::MAX_MESSAGE_BYTES)
            },
            f,
        )
        .await
    }

    /// A unary Registry call: `f` sends `req` (cloned for each attempt: a failover sends it
    /// again) on a client of the current endpoint (see [`Admin::call`]).
    async fn unary<Req, T, F, Fut>(&self, req: Req, f: F) -> Result<T>
    where
        Req: Clone,
        F: Fn(RegistryClient<InterceptedService<Channel, TokenInterceptor>>, Req) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call(|c| f(c, req.clone())).await
    }

    /// Like [`Admin::unary`], on a client of any service built by `make` (see
    /// [`Admin::call_with`]).
    pub(crate) async fn unary_with<C, Req, T, M, F, Fut>(
        &self,
        make: M,
        req: Req,
        f: F,
    ) -> Result<T>
    where
        Req: Clone,
        M: Fn(Channel, TokenInterceptor) -> C,
        F: Fn(C, Req) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_with(make, |c| f(c, req.clone())).await
    }

    /// Runs `f` on a client of any service built by `make` over the current endpoint, with the
    /// deadline and the failover to the next endpoints on `UNAVAILABLE`.
    pub(crate) async fn call_with<C, T, M, F, Fut>(&self, make: M, f: F) -> Result<T>
    where
        M: Fn(Channel, TokenInterceptor) -> C,
        F: Fn(C) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.channels.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let client = make(self.channels[idx].1.clone(), self.token.clone());
            let result = match tokio::time::timeout(self.request_timeout, f(client)).await {
                Ok(r) => r,
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer from {} within {:?}",
                    self.channels[idx].0, self.request_timeout
                ))),
            };
            match result {
                Ok(resp) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(resp.into_inner());
                }
                Err(status) if status.code() == tonic::Code::Unavailable && i + 1 < n => {
                    last = Some(status);
                }
                Err(status) => return Err(status.into()),
            }
        }
        Err(last.map_or(Error::Unavailable("no endpoint".into()), Error::from))
    }

    /// `AddServer`: registers a backend in `service` (empty = "default").
    pub async fn add_server(
        &self,
        service: &str,
        server: NewServer,
    ) -> Result<proto::ServerResponse> {
        let service = model::resolve_service(service)?.to_owned();
        let record = server.record();
        model::validate_backend(&record)?;
        let req = proto::AddServerRequest {
            service,
            server_id: record.server_id,
            address: record.address,
            weight: record.weight,
            hash_key: record.hash_key,
            metadata: record.metadata,
            locality: record.locality,
            priority: record.priority,
            ..Default::default()
        };
        self.unary(req, |mut c, req| async move { c.add_server(req).await })
            .await
    }

    /// `RemoveServer`: deregisters a backend.
    pub async fn remove_server(
        &self,
        service: &str,
        server_id: &str,
    ) -> Result<proto::RemoveServerResponse> {
        let req = proto::RemoveServerRequest {
            service: model::resolve_service(service)?.to_owned(),
            server_id: checked_id(server_id)?,
            ..Default::default()
        };
        self.unary(req, |mut c, req| async move { c.remove_server(req).await })
            .await
    }

    /// `RemoveServer` with a drain barrier: deregisters a backend, then waits until every client
    /// following the service has acknowledged a version without it, or `wait`'s deadline
    /// (`docs/drain.md`). The call's own deadline is the usual one plus the barrier's.
    pub async fn remove_server_waiting(
        &self,
        service: &str,
        server_id: &str,
        wait: proto::BarrierWait,
    ) -> Result<proto::RemoveServerResponse> {
        let req = proto::RemoveServerRequest {
            service: model::resolve_service(service)?.to_owned(),
            server_id: checked_id(server_id)?,
            wait: Some(wait),
            ..Default::default()
        };
        self.waiting(&wait)
            .unary(req, |mut c, req| async move { c.remove_server(req).await })
            .await
    }

    /// `DrainServer`: marks a backend draining (no new calls) and, with `wait`, waits on the
    /// drain barrier (`docs/drain.md`): until every client following the service has
    /// acknowledged the drain (and, with `in_flight_zero`, the backend's global in-flight count
    /// is 0), or the deadline. Idempotent: retried on the next endpoint when one is unavailable.
    pub async fn drain_server(
        &self,
        service: &str,
        server_id: &str,
        wait: Option<proto::BarrierWait>,
    ) -> Result<proto::DrainServerResponse> {
        if let Some(w) = &wait {
            validate_wait(w)?;
        }
        let req = proto::DrainServerRequest {
            service: model::resolve_service(service)?.to_owned(),
            server_id: checked_id(server_id)?,
            wait,
            ..Default::default()
        };
        let this = match &wait {
            Some(w) => self.waiting(w),
            None => self.clone(),
        };
        this.unary(req, |mut c, req| async move { c.drain_server(req).await })
            .await
    }

    /// This client with room in each call's deadline for the barrier's.
    pub(crate) fn waiting(&self, wait: &proto::BarrierWait) -> Self {
        let barrier = match wait.timeout_ms {
            0 => DEFAULT_BARRIER_TIMEOUT,
            ms => Duration::from_millis(ms.into()),
        };
        Self {
            request_timeout: self.request_timeout + barrier,
            ..self.clone()
        }
    }

    /// `RemoveService`: removes a service (its policy and health check). A service that still
    /// has backends is refused (`FailedPrecondition` naming the count) unless `force`, which
    /// removes them with it; a missing one is `NotFound`.
    pub async fn remove_service(
        &self,
        service: &str,
        force: bool,
    ) -> Result<proto::RemoveServiceResponse> {
        let req = proto::RemoveServiceRequest {
            service: model::resolve_service(service)?.to_owned(),
            force,
            ..Default::default()
        };
        self.unary(req, |mut c, req| async move { c.remove_service(req).await })
            .await
    }

    /// `UpdateServer`: changes the set fields of a backend.
    pub async fn update_server(
        &self,
        service: &str,
        update: ServerUpdate,
    ) -> Result<proto::ServerResponse> {
        let service = model::resolve_service(service)?.to_owned();
        let req = update.request(service);
        model::validate_update(&req)?;
        self.unary(req, |mut c, req| async move { c.update_server(req).await })
            .await
    }

    /// `ListServers`: the service's backends, version and policy.
    pub async fn list_servers(&self, service: &str) -> Result<proto::ListServersResponse> {
        let req = proto::ListServersRequest {
            service: model::resolve_service(service)?.to_owned(),
        };
        self.unary(req, |mut c, req| async move { c.list_servers(req).await })
            .await
    }

    /// `HealthCheckPassed`: marks a backend healthy.
    pub async fn health_check_passed(
        &self,
        service: &str,
        server_id: &str,
    ) -> Result<proto::ServerResponse> {
        let req = health_request(service, server_id)?;
        self.unary(
            req,
            |mut c, req| async move { c.health_check_passed(req).await },
        )
        .await
    }

    /// `HealthCheckFailed`: marks a backend unhealthy.
    pub async fn health_check_failed(
        &self,
        service: &str,
        server_id: &str,
    ) -> Result<proto::ServerResponse> {
        let req = health_request(service, server_id)?;
        self.unary(
            req,
            |mut c, req| async move { c.health_check_failed(req).await },
        )
        .await
    }

    /// `GetNextServer`: a server-side pick (for callers without a local picker).
    pub async fn get_next_server(
        &self,
        service: &str,
        key: Option<&[u8]>,
    ) -> Result<proto::GetNextServerResponse> {
        let req = proto::GetNextServerRequest {
            service: model::resolve_service(service)?.to_owned(),
            key: key.map(<[u8]>::to_vec).unwrap_or_default(),
        };
        self.unary(
            req,
            |mut c, req| async move { c.get_next_server(req).await },
        )
        .await
    }

    /// `GetPolicy`: the service's policy.
    pub async fn get_policy(&self, service: &str) -> Result<proto::PolicyResponse> {
        let req = proto::GetPolicyRequest {
            service: model::resolve_service(service)?.to_owned(),
        };
        self.unary(req, |mut c, req| async move { c.get_policy(req).await })
            .await
    }

    /// `GetHealth`: the health checker's live view of the service's checked backends.
    pub async fn get_health(&self, service: &str) -> Result<proto::GetHealthResponse> {
        let req = proto::GetHealthRequest {
            service: model::resolve_service(service)?.to_owned(),
        };
        self.unary(req, |mut c, req| async move { c.get_health(req).await })
            .await
    }

    /// `GetLocalityPlan`: the locality plan `dlbd` computes for each client zone of the service
    /// (share kept in the zone, why the rest spills, each group's share; docs/locality.md).
    pub async fn get_locality_plan(&self, service: &str) -> Result<proto::GetLocalityPlanResponse> {
        let req = proto::GetLocalityPlanRequest {
            service: model::resolve_service(service)?.to_owned(),
        };
        self.unary(
            req,
            |mut c, req| async move { c.get_locality_plan(req).await },
        )
        .await
    }

    /// `SetPolicy`: replaces the service's policy (`ALGORITHM_UNSPECIFIED` keeps the algorithm).
    pub async fn set_policy(
        &self,
        service: &str,
        policy: proto::Policy,
    ) -> Result<proto::PolicyResponse> {
        self.set_policy_if(service, policy, None).await
    }

    /// `SetPolicy` with a compare-and-set: applies only if the service is at
    /// `expected_version` (0: it must not exist yet); otherwise `FailedPrecondition` naming the
    /// current version, and nothing changes.
    pub async fn set_policy_if(
        &self,
        service: &str,
        policy: proto::Policy,
        expected_version: Option<u64>,
    ) -> Result<proto::PolicyResponse> {
        let service = model::resolve_service(service)?.to_owned();
        validate_policy_request(&policy)?;
        let req = proto::SetPolicyRequest {
            service,
            policy: Some(policy),
            expected_version,
        };
        self.unary(req, |mut c, req| async move { c.set_policy(req).await })
            .await
    }

    /// `ListServices`: every service with its version and backend counts.
    pub async fn list_services(&self) -> Result<proto::ListServicesResponse> {
        self.call(|mut c| async move { c.list_services(proto::ListServicesRequest {}).await })
            .await
    }

    /// `XdsStatus.ListXdsClients`: the stock gRPC clients connected over standard xDS to the
    /// endpoint that answers (each replica lists its own streams).
    pub async fn list_xds_clients(&self) -> Result<proto::ListXdsClientsResponse> {
        self.call_with(
            |channel, token| {
                proto::xds_status_client::XdsStatusClient::with_interceptor(channel, token)
                    .max_decoding_message_size(model::MAX_MESSAGE_BYTES)
            },
            |mut c| async move { c.list_xds_clients(proto::ListXdsClientsRequest {}).await },
        )
        .await
    }
}

fn checked_id(server_id: &str) -> Result<String> {
    model::validate_server_id(server_id)?;
    Ok(server_id.to_owned())
}

fn health_request(service: &str, server_id: &str) -> Result<proto::HealthCheckRequest> {
    Ok(proto::HealthCheckRequest {
        service: model::resolve_service(service)?.to_owned(),
        server_id: checked_id(server_id)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_before_sending() {
        assert!(NewServer::new("a b", "127.0.0.1:1").validate().is_err());
        assert!(NewServer::new("a", "127.0.0.1:0").validate().is_err());
        assert!(NewServer::new("a", "127.0.0.1:1")
            .weight(0)
            .validate()
            .is_err());
        assert!(NewServer::new("a", "127.0.0.1:1").validate().is_ok());
        let mut u = ServerUpdate::new("a");
        u.weight = Some(10_001);
        assert!(u.validate().is_err());
        let p = proto::Policy {
            bounded_load_factor: 0.5,
            ..Default::default()
        };
        assert!(validate_policy_request(&p).is_err());
        assert!(validate_policy_request(&proto::Policy::default()).is_ok());
    }
}
