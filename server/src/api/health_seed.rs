//! The seed calls on a checked service: `health_check_passed` / `health_check_failed` as one
//! result each in the backend's state machine (see the [module docs](super)).

use dlb::{model, proto};

use crate::api::Shared;
use crate::Error;

/// How long a seed call waits for the cache to show the write it caused.
const CACHE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Feeds the call to the checker when the backend is under active checks and answers with the
/// backend as stored afterwards; `Ok(None)` when it is not (the caller sets the admin source).
pub(crate) async fn report(
    shared: &Shared,
    req: &proto::HealthCheckRequest,
    passed: bool,
) -> Result<Option<proto::ServerResponse>, Error> {
    let service = model::resolve_service(&req.service)?.to_owned();
    model::validate_server_id(&req.server_id)?;
    if !crate::health::is_checked(&shared.cache, &service) {
        return Ok(None);
    }
    let Some(written) = shared
        .health
        .report(&service, &req.server_id, passed)
        .await?
    else {
        return Ok(None);
    };
    if let Some(v) = written {
        shared.cache.wait_for_revision(v.version, CACHE_WAIT).await;
    }
    let snap = shared
        .store
        .get_service(service.clone())
        .await?
        .ok_or_else(|| Error::ServiceNotFound(service.clone()))?;
    let server = snap
        .servers
        .get(req.server_id.as_str())
        .map(|s| (**s).clone())
        .ok_or_else(|| Error::Task(format!("backend {:?} vanished", req.server_id)))?;
    tracing::info!(service, server_id = %req.server_id, passed, "seed health result recorded");
    Ok(Some(proto::ServerResponse {
        service,
        server: Some(server),
        version: Some(snap.version),
    }))
}
