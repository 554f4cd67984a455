//! `GetHealth`: the checker's live view of a service's checked backends, for `dlbctl health
//! show` (at most [`MAX_LIST_BYTES`](model::MAX_LIST_BYTES) of them, with a count).

use dlb::{model, proto};

use crate::api::Shared;
use crate::health::active::state::Health;
use crate::Error;

/// Answers `GetHealth`. NOT_FOUND when the service does not exist.
pub(crate) async fn get_health(
    shared: &Shared,
    req: proto::GetHealthRequest,
) -> Result<proto::GetHealthResponse, Error> {
    let service = model::resolve_service(&req.service)?.to_owned();
    if shared.cache.get(&service).is_none() {
        return Err(Error::ServiceNotFound(service));
    }
    let all = shared.health.inspect_service(&service).await;
    let total = all.len();
    let backends = all.into_iter().map(|(id, v)| proto::BackendHealth {
        server_id: id,
        state: match v.health {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
        .to_owned(),
        consecutive_passes: v.counts.0,
        consecutive_failures: v.counts.1,
        published: v.published as i32,
        last_detail: v.last_detail,
        last_rtt_us: v.last_rtt.map_or(0, |d| {
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
        }),
        held_down: v.held_down,
        hold_downs: v.hold_downs,
        prober: v.prober,
        probed_here: v.probed,
    });
    let mut r = proto::GetHealthResponse {
        service,
        ..Default::default()
    };
    // Bounded in bytes: the first backends that fit, and how many there are.
    let listed = crate::listing::first_that_fit(total, backends, prost::Message::encoded_len(&r));
    r.backends = listed.items;
    r.truncated = listed.truncated;
    r.total = listed.total;
    Ok(r)
}
