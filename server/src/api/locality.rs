//! `GetLocalityPlan`: the locality plan of each client zone of a service, for `dlbctl locality
//! show` (computed by [`crate::locality`]; bounded at
//! [`MAX_LIST_BYTES`](dlb::model::MAX_LIST_BYTES): groups, then zones, as many as fit).

use dlb::locality::ZoneKey;
use dlb::{model, proto};

use crate::api::Shared;
use crate::locality::Sources;
use crate::Error;

fn locality(z: &ZoneKey) -> proto::Locality {
    proto::Locality {
        region: z.region.clone(),
        zone: z.zone.clone(),
        sub_zone: String::new(),
    }
}

/// Answers `GetLocalityPlan`. NOT_FOUND when the service does not exist.
pub(crate) fn get_locality_plan(
    shared: &Shared,
    req: proto::GetLocalityPlanRequest,
) -> Result<proto::GetLocalityPlanResponse, Error> {
    let service = model::resolve_service(&req.service)?.to_owned();
    let snap = shared
        .cache
        .get(&service)
        .ok_or_else(|| Error::ServiceNotFound(service.clone()))?;
    let sources = Sources {
        cache: shared.cache.clone(),
        loads: shared.loads.clone(),
        demand: shared.demand.clone(),
    };
    let (plans, demand_known) = sources.plans(&snap);
    let (_, published) = shared.demand.published(&service);
    let demand_of = |z: &ZoneKey| {
        published
            .iter()
            .find(|(d, _)| d.region == z.region && d.zone == z.zone)
            .map_or(0.0, |(_, s)| *s)
    };
    let groups = plans
        .groups
        .keys
        .iter()
        .zip(&plans.counts)
        .zip(&plans.panic)
        .map(|((k, &(eligible, total)), &panic)| proto::LocalityGroup {
            priority: k.priority,
            locality: k.zone.as_ref().map(locality),
            eligible,
            total,
            panic,
        });
    let zones = plans.plans.iter().map(|(z, p)| proto::ZonePlan {
        locality: Some(locality(z)),
        demand: demand_of(z),
        local_share: p.local,
        spill: p.spill.as_str().to_owned(),
        priority_load: p
            .priority_load
            .iter()
            .map(|&(priority, load)| proto::PriorityLoad { priority, load })
            .collect(),
        shares: p
            .shares
            .iter()
            .enumerate()
            .filter(|(_, s)| **s > 0.0)
            .map(|(g, &share)| proto::GroupShare {
                group: u32::try_from(g).unwrap_or(u32::MAX),
                share,
            })
            .collect(),
    });
    let mut r = proto::GetLocalityPlanResponse {
        service,
        version: Some(snap.version),
        demand_known,
        ..Default::default()
    };
    // Bounded in bytes: the groups that fit (with room kept for the zone counts), then the
    // zones that fit with them.
    let fixed = prost::Message::encoded_len(&r) + 16;
    let listed = crate::listing::first_that_fit(plans.groups.len(), groups, fixed);
    r.groups = listed.items;
    r.groups_total = listed.total;
    let mut truncated = listed.truncated;
    let listed = crate::listing::first_that_fit(
        plans.zones_total,
        zones,
        prost::Message::encoded_len(&r) + 16,
    );
    r.zones = listed.items;
    r.zones_total = listed.total;
    truncated |= listed.truncated;
    r.truncated = truncated;
    Ok(r)
}
