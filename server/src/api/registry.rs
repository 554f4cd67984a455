//! The `dlb.v1.Registry` gRPC service: admin reads and writes of routing state.
//!
//! Every handler validates its request with `dlb::model` (so a malformed call is rejected with
//! `INVALID_ARGUMENT` naming the field before anything changes; a backend's fields with
//! `model::validate_backend` / `validate_update`, the functions the store's plan and the client
//! call too), performs one atomic
//! [`Store::apply`](crate::store::Store::apply) (with the request's `expected_version` as a
//! compare-and-set), waits until the snapshot cache has the new revision (so the caller's next
//! session read sees it), and counts itself in `dlb_rpcs_total`. Handlers never build pickers:
//! `GetNextServer` waits at most 1 s (as long as a write waits for the cache) for the service's
//! builder task to reach the cached version, then answers from the newest picker. The handlers hold no locks of their own.

use std::sync::Arc;
use std::time::Duration;

use dlb::model;
use dlb::proto::{self, registry_server::Registry};
use tonic::{Request, Response, Status};

use crate::api::{barrier, Shared};
use crate::health::sources;
use crate::store::{Applied, Mutation, ServerPatch};
use crate::Error;

/// How long a committed write waits for the cache to apply it before answering anyway.
const CACHE_WAIT: Duration = Duration::from_secs(1);
/// Most bytes of services in one `ListServices` answer (the rest are counted in `total`).
pub const MAX_LIST_BYTES: usize = model::MAX_LIST_BYTES;
/// How long `GetNextServer` waits for the picker to reach the cached version: as long as a write waits for the cache: a caller that just wrote reads its write, and the
/// bound only matters when a build is slow (a million-backend service) or failing.
const PICKER_WAIT: Duration = CACHE_WAIT;

/// The Registry service implementation.
pub struct RegistryService {
    shared: Arc<Shared>,
}

impl RegistryService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn done<T>(&self, method: &'static str, r: Result<T, Error>) -> Result<Response<T>, Status> {
        let r = r.map(Response::new).map_err(Status::from);
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => {
                tracing::debug!(method, code = ?s.code(), message = s.message(), "rejected");
                s.code()
            }
        };
        self.shared.metrics.rpc(method, code);
        r
    }

    /// Applies a batch to one service; once it is committed, waits (briefly, never for a
    /// picker build) until the cache has it, so the caller's next read or session sees it.
    async fn apply(
        &self,
        service: &str,
        mutations: Vec<Mutation>,
        expected_version: Option<u64>,
    ) -> Result<Applied, Error> {
        let applied = self
            .shared
            .store
            .apply(service.to_owned(), mutations, expected_version)
            .await?;
        if applied.changed {
            let caught_up = self
                .shared
                .cache
                .wait_for_revision(applied.version.version, CACHE_WAIT)
                .await;
            if !caught_up {
                tracing::warn!(
                    service,
                    version = applied.version.version,
                    "write committed; the cache has not caught up yet"
                );
            }
        }
        Ok(applied)
    }

    fn server_response(service: String, applied: Applied) -> Result<proto::ServerResponse, Error> {
        let server = applied
            .servers
            .into_iter()
            .next()
            .ok_or_else(|| Error::Task("the store returned no record".into()))?;
        Ok(proto::ServerResponse {
            service,
            server: Some(server),
            version: Some(applied.version),
        })
    }

    async fn add(&self, req: proto::AddServerRequest) -> Result<proto::ServerResponse, Error> {
        let service = model::resolve_service(&req.service)?.to_owned();
        let server = proto::Server {
            server_id: req.server_id,
            address: req.address,
            // 0 (unset on the wire) is the default weight.
            weight: req.weight.max(1),
            hash_key: req.hash_key,
            metadata: req.metadata,
            locality: dlb::locality::normalize(req.locality),
            priority: req.priority,
            ..Default::default()
        };
        model::validate_backend(&server)?;
        let applied = self
            .apply(&service, vec![Mutation::Add(server)], req.expected_version)
            .await?;
        let r = Self::server_response(service, applied)?;
        if let Some(s) = &r.server {
            tracing::info!(service = %r.service, server_id = %s.server_id, address = %s.address, version = r.version.map_or(0, |v| v.version), "server added");
        }
        Ok(r)
    }

    async fn remove(
        &self,
        req: proto::RemoveServerRequest,
    ) -> Result<proto::RemoveServerResponse, Error> {
        let service = model::resolve_service(&req.service)?.to_owned();
        model::validate_server_id(&req.server_id)?;
        let wait = barrier::Wait::parse(req.wait.as_ref(), true)?;
        let applied = self
            .apply(
                &service,
                vec![Mutation::RemoveWithReason(
                    req.server_id.clone(),
                    "removed".into(),
                )],
                req.expected_version,
            )
            .await?;
        tracing::info!(service, server_id = %req.server_id, version = applied.version.version, "server removed");
        let barrier = match wait {
            Some(wait) => Some(
                barrier::wait(
                    &self.shared,
                    &service,
                    &req.server_id,
                    applied.version.version,
                    wait,
                )
                .await,
            ),
            None => None,
        };
        Ok(proto::RemoveServerResponse {
            service,
            version: Some(applied.version),
            barrier,
        })
    }

    async fn drain(
        &self,
        req: proto::DrainServerRequest,
    ) -> Result<proto::DrainServerResponse, Error> {
        let wait = barrier::Wait::parse(req.wait.as_ref(), false)?;
        let patch = ServerPatch {
            draining: Some(true),
            ..Default::default()
        };
        let update = |id: &str| Mutation::Update(id.to_owned(), patch);
        let r = self
            .patch(&req.service, &req.server_id, update, req.expected_version)
            .await?;
        let version = r.version.map_or(0, |v| v.version);
        let barrier = match wait {
            Some(wait) => {
                Some(barrier::wait(&self.shared, &r.service, &req.server_id, version, wait).await)
            }
            None => None,
        };
        Ok(proto::DrainServerResponse {
            service: r.service,
            server: r.server,
            version: r.version,
            barrier,
        })
    }

    /// Applies one update of backend `server_id` (`update` builds it from the checked id).
    async fn patch(
        &self,
        service: &str,
        server_id: &str,
        update: impl FnOnce(&str) -> Mutation,
        expected_version: Option<u64>,
    ) -> Result<proto::ServerResponse, Error> {
        let service = model::resolve_service(service)?.to_owned();
        model::validate_server_id(server_id)?;
        let applied = self
            .apply(&service, vec![update(server_id)], expected_version)
            .await?;
        if applied.changed {
            tracing::info!(
                service,
                server_id,
                version = applied.version.version,
                "server updated"
            );
        }
        Self::server_response(service, applied)
    }

    async fn update(
        &self,
        req: proto::UpdateServerRequest,
    ) -> Result<proto::ServerResponse, Error> {
        model::resolve_service(&req.service)?;
        model::validate_update(&req)?;
        let patch = ServerPatch {
            weight: req.weight,
            draining: req.draining,
            address: req.address,
            hash_key: req.hash_key,
            metadata: req.replace_metadata.then_some(req.metadata),
            locality: req.locality.map(Some),
            priority: req.priority,
            ..Default::default()
        };
        let update = |id: &str| Mutation::Update(id.to_owned(), patch);
        self.patch(&req.service, &req.server_id, update, req.expected_version)
            .await
    }

    async fn health(
        &self,
        req: proto::HealthCheckRequest,
        verdict: proto::Verdict,
    ) -> Result<proto::ServerResponse, Error> {
        // On a service with active checks the call is one result in the state machine.
        if let Some(r) =
            crate::api::health_seed::report(&self.shared, &req, verdict == proto::Verdict::Healthy)
                .await?
        {
            return Ok(r);
        }
        let admin = |id: &str| sources::admin(id, verdict);
        self.patch(&req.service, &req.server_id, admin, None).await
    }

    async fn list_servers(
        &self,
        req: proto::ListServersRequest,
    ) -> Result<proto::ListServersResponse, Error> {
        let service = model::resolve_service(&req.service)?.to_owned();
        let snap = self
            .shared
            .store
            .get_service(service.clone())
            .await?
            .ok_or_else(|| Error::ServiceNotFound(service.clone()))?;
        let panic =
            dlb::health_policy::panic_state(&snap.policy, snap.servers.values().map(|s| &**s));
        let reports = self.shared.circuits.reports(&service);
        let mut r = proto::ListServersResponse {
            service,
            version: Some(snap.version),
            policy: Some(snap.policy.clone()),
            servers: snap.server_list(),
            panic: Some(panic),
            circuits: Vec::new(),
            circuits_total: 0,
        };
        // The backends always fit (a service's snapshot does); circuit reports as far as the
        // listing budget and the message's room allow, the rest counted in `circuits_total`.
        let room = (model::MAX_MESSAGE_BYTES - (16 << 10))
            .saturating_sub(prost::Message::encoded_len(&r))
            .min(model::MAX_LIST_BYTES);
        let listed = crate::listing::first_within(reports.len(), reports, room);
        r.circuits = listed.items;
        r.circuits_total = listed.total;
        Ok(r)
    }

    async fn next(
        &self,
        req: proto::GetNextServerRequest,
    ) -> Result<proto::GetNextServerResponse, Error> {
        let service = model::resolve_service(&req.service)?.to_owned();
        model::validate_key(&req.key)?;
        // Read-your-writes, bounded: wait for the builder to reach the version the cache holds
        // now, but never longer than PICKER_WAIT (then answer from the newest picker).
        match self.shared.cache.get(&service) {
            Some(snap) => {
                let want = snap.version.version;
                self.shared
                    .pickers
                    .wait_built(&service, want, PICKER_WAIT)
                    .await;
            }
            // The cache, which every write waits for, does not hold the service: removed (or
            // never created). A picker the builder has not dropped yet must not answer for it.
            None => return Err(Error::ServiceNotFound(service)),
        }
        let (server, version) = self.shared.pickers.pick(&service, &req.key)?;
        Ok(proto::GetNextServerResponse {
            service,
            server: Some(server),
            version: Some(version),
        })
    }

    async fn get_policy(
        &self,
        req: proto::GetPolicyRequest,
    ) -> Result<proto::PolicyResponse, Error> {
        let service = model::resolve_service(&req.service)?.to_owned();
        let snap = self
            .shared
            .store
            .get_service(service.clone())
            .await?
            .ok_or_else(|| Error::ServiceNotFound(service.clone()))?;
        Ok(proto::PolicyResponse {
            service,
            policy: Some(snap.policy),
            version: Some(snap.version),
        })
    }

    async fn set_policy(
        &self,
        req: proto::SetPolicyRequest,
    ) -> Result<proto::PolicyResponse, Error> {
        let service = model::resolve_service(&req.service)?.to_owned();
        let policy = req
            .policy
            .ok_or_else(|| model::ValidationError::new("policy", "<unset>", "must be set"))?;
        if policy.algorithm != proto::Algorithm::Unspecified as i32 {
            model::validate_policy(&policy)?;
        }
        let w = self
            .apply(
                &service,
                vec![Mutation::SetPolicy(policy)],
                req.expected_version,
            )
            .await?;
        if w.changed {
            tracing::info!(
                service,
                algorithm = model::algorithm_name(w.policy.algorithm),
                version = w.version.version,
                "policy set"
            );
        }
        Ok(proto::PolicyResponse {
            service,
            policy: Some(w.policy),
            version: Some(w.version),
        })
    }

    async fn remove_service(
        &self,
        req: proto::RemoveServiceRequest,
    ) -> Result<proto::RemoveServiceResponse, Error> {
        let service = model::resolve_service(&req.service)?.to_owned();
        let before = self
            .shared
            .store
            .get_service(service.clone())
            .await?
            .map_or(0, |s| s.servers.len());
        let applied = self
            .apply(
                &service,
                vec![Mutation::RemoveService { force: req.force }],
                req.expected_version,
            )
            .await?;
        tracing::info!(
            service,
            force = req.force,
            version = applied.version.version,
            "service removed"
        );
        Ok(proto::RemoveServiceResponse {
            service,
            version: Some(applied.version),
            removed_servers: if req.force {
                u32::try_from(before).unwrap_or(u32::MAX)
            } else {
                0
            },
        })
    }

    async fn list_services(&self) -> Result<proto::ListServicesResponse, Error> {
        let services = self.shared.store.snapshot().await?.services;
        let total = services.len();
        // Bounded in bytes: the first services (by name) that fit, and how many exist.
        let summaries = services.into_iter().map(|s| proto::ServiceSummary {
            panic: Some(dlb::health_policy::panic_state(
                &s.policy,
                s.servers.values().map(|s| &**s),
            )),
            servers: u32::try_from(s.servers.len()).unwrap_or(u32::MAX),
            eligible: u32::try_from(s.eligible()).unwrap_or(u32::MAX),
            service: s.name,
            version: Some(s.version),
            policy: Some(s.policy),
        });
        let listed = crate::listing::first_that_fit(total, summaries, 0);
        Ok(proto::ListServicesResponse {
            services: listed.items,
            truncated: listed.truncated,
            total: listed.total,
        })
    }
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn add_server(
        &self,
        request: Request<proto::AddServerRequest>,
    ) -> Result<Response<proto::ServerResponse>, Status> {
        let r = self.add(request.into_inner()).await;
        self.done("AddServer", r)
    }

    async fn remove_server(
        &self,
        request: Request<proto::RemoveServerRequest>,
    ) -> Result<Response<proto::RemoveServerResponse>, Status> {
        let r = self.remove(request.into_inner()).await;
        self.done("RemoveServer", r)
    }

    async fn drain_server(
        &self,
        request: Request<proto::DrainServerRequest>,
    ) -> Result<Response<proto::DrainServerResponse>, Status> {
        let r = self.drain(request.into_inner()).await;
        self.done("DrainServer", r)
    }

    async fn update_server(
        &self,
        request: Request<proto::UpdateServerRequest>,
    ) -> Result<Response<proto::ServerResponse>, Status> {
        let r = self.update(request.into_inner()).await;
        self.done("UpdateServer", r)
    }

    async fn list_servers(
        &self,
        request: Request<proto::ListServersRequest>,
    ) -> Result<Response<proto::ListServersResponse>, Status> {
        let r = self.list_servers(request.into_inner()).await;
        self.done("ListServers", r)
    }

    async fn health_check_passed(
        &self,
        request: Request<proto::HealthCheckRequest>,
    ) -> Result<Response<proto::ServerResponse>, Status> {
        let r = self
            .health(request.into_inner(), proto::Verdict::Healthy)
            .await;
        self.done("HealthCheckPassed", r)
    }

    async fn health_check_failed(
        &self,
        request: Request<proto::HealthCheckRequest>,
    ) -> Result<Response<proto::ServerResponse>, Status> {
        let r = self
            .health(request.into_inner(), proto::Verdict::Unhealthy)
            .await;
        self.done("HealthCheckFailed", r)
    }

    async fn get_next_server(
        &self,
        request: Request<proto::GetNextServerRequest>,
    ) -> Result<Response<proto::GetNextServerResponse>, Status> {
        let r = self.next(request.into_inner()).await;
        self.done("GetNextServer", r)
    }

    async fn get_policy(
        &self,
        request: Request<proto::GetPolicyRequest>,
    ) -> Result<Response<proto::PolicyResponse>, Status> {
        let r = self.get_policy(request.into_inner()).await;
        self.done("GetPolicy", r)
    }

    async fn set_policy(
        &self,
        request: Request<proto::SetPolicyRequest>,
    ) -> Result<Response<proto::PolicyResponse>, Status> {
        let r = self.set_policy(request.into_inner()).await;
        self.done("SetPolicy", r)
    }

    async fn remove_service(
        &self,
        request: Request<proto::RemoveServiceRequest>,
    ) -> Result<Response<proto::RemoveServiceResponse>, Status> {
        let r = self.remove_service(request.into_inner()).await;
        self.done("RemoveService", r)
    }

    async fn list_services(
        &self,
        _request: Request<proto::ListServicesRequest>,
    ) -> Result<Response<proto::ListServicesResponse>, Status> {
        let r = self.list_services().await;
        self.done("ListServices", r)
    }

    async fn get_health(
        &self,
        request: Request<proto::GetHealthRequest>,
    ) -> Result<Response<proto::GetHealthResponse>, Status> {
        let r = crate::api::health::get_health(&self.shared, request.into_inner()).await;
        self.done("GetHealth", r)
    }
}
