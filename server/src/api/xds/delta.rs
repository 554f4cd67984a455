//! Incremental ADS (`DeltaAggregatedResources`).
//!
//! Per resource type the stream keeps the subscribed names (`*`, or a first LDS/CDS request
//! with no names, is a wildcard) and, per name, what the client holds: a resource version (the
//! content hash of the encoded resource, tagged) or "told it does not exist". A push sends only resources
//! whose content differs from what the client holds, and names that do not exist (any more) in
//! `removed_resources` — including subscribed names that never existed, so the client learns
//! at once that they are absent; they are sent when created. `initial_resource_versions` of a
//! reconnecting client are taken as what it holds (resume: only differences are sent). A
//! resource version is `HASH.EPOCH.REVISION` ([`super::tag`]); when those versions claim a
//! revision of this epoch the cache has not applied, the stream waits for it a bounded time,
//! else ends with `UNAVAILABLE` ([`super::stream::not_behind`]): never older resources than held.
//!
//! ACK/NACK: a request carrying the nonce of the last response is its ACK or (with
//! `error_detail`) its NACK; the acked version is that response's `system_version_info`.
//! Cost per wake-up: O(subscribed services × backends).
//!
//! A name that cannot name a DLB service is kept in the subscription (within the stream's
//! bounds, see the [module docs](super)) but never followed: it is sent in `removed_resources`
//! at once, like any resource that does not exist.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

use super::stream::{Core, Variant};
use super::{claim, clients, content, resources, ContentHash};

/// What a delta client holds of one resource type.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// Per name: `Some(version)`, or `None` when told it is absent.
    resources: BTreeMap<String, Option<String>>,
    /// The `system_version_info` of the last response.
    system_version: String,
}

/// Incremental ADS (see the module docs).
pub(crate) struct Delta;

impl Variant for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    type Held = Held;
    const NAMES: (&'static str, &'static str) = ("delta", "DeltaDiscoveryRequest");

    /// The newest revision of this epoch the versions a client says it holds claim.
    fn claimed(epoch: u64, req: &DeltaDiscoveryRequest) -> Option<u64> {
        req.initial_resource_versions
            .values()
            .filter_map(|v| claim(v, epoch))
            .max()
    }

    fn request(
        s: &mut Core<Self>,
        req: DeltaDiscoveryRequest,
    ) -> Result<Option<String>, tonic::Status> {
        let type_url = req.type_url;
        let first = s.begin(req.node.as_ref(), &type_url)?;
        if s.is_last_nonce(&type_url, &req.response_nonce) {
            let version = s
                .subs
                .get(&type_url)
                .map(|sub| sub.held.system_version.clone())
                .unwrap_or_default();
            let error = req.error_detail.as_ref().map(|e| e.message.as_str());
            s.answered(&type_url, &version, &req.response_nonce, error);
        }
        let sub = s.subs.entry(type_url.clone()).or_default();
        if first {
            for (name, mut version) in req.initial_resource_versions {
                if version.len() > super::MAX_CLIENT_VERSION {
                    version.clear();
                }
                sub.held.resources.insert(name, Some(version));
            }
            if req.resource_names_subscribe.is_empty()
                && matches!(type_url.as_str(), resources::LISTENER | resources::CLUSTER)
            {
                sub.wildcard = true;
            }
        }
        super::check_names(
            "DeltaDiscoveryRequest.resource_names_subscribe",
            sub.names.len() + req.resource_names_subscribe.len(),
        )?;
        super::check_names(
            "DeltaDiscoveryRequest.initial_resource_versions",
            sub.held.resources.len(),
        )?;
        let mut changed = first;
        for name in req.resource_names_subscribe {
            if name == "*" {
                changed |= !sub.wildcard;
                sub.wildcard = true;
            } else if sub.names.insert(name.clone()) {
                changed = true;
            } else {
                // A re-subscription asks for the resource again.
                sub.held.resources.remove(&name);
                changed = true;
            }
        }
        for name in req.resource_names_unsubscribe {
            if name == "*" {
                sub.wildcard = false;
            }
            sub.names.remove(&name);
            sub.held.resources.remove(&name);
            changed = true;
        }
        let (mut count, mut bytes) = (0, 0);
        for t in s.subs.values() {
            let held = &t.held.resources;
            count += t.names.len() + held.keys().filter(|n| !t.names.contains(*n)).count();
            bytes += t.names.iter().map(String::len).sum::<usize>()
                + held
                    .iter()
                    .map(|(n, v)| n.len() + v.as_ref().map_or(0, String::len))
                    .sum::<usize>();
        }
        super::check_stream(
            "DeltaDiscoveryRequest.resource_names_subscribe",
            count,
            bytes,
        )?;
        s.subscribed(&type_url);
        if !changed {
            return Ok(None);
        }
        s.refollow();
        Ok(Some(type_url))
    }

    /// What differs from what the client holds: resources whose content changed, names that do
    /// not exist (any more). `None` when nothing does.
    fn response(
        s: &mut Core<Self>,
        type_url: &str,
        _force: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let ctx = s.ctx.clone();
        let sub = s.subs.get_mut(type_url)?;
        let mut names = sub.names.clone();
        let held = &mut sub.held.resources;
        if sub.wildcard {
            names.extend(ctx.cache.service_names().iter().map(|s| s.to_string()));
            // Names the client holds that left the wildcard set are reported removed.
            names.extend(held.keys().cloned());
        }
        let mut out = Vec::new();
        let mut removed = Vec::new();
        for name in names {
            match ctx.built(type_url, &name) {
                Some(b) => {
                    // Held already when the content is the same (whatever revision it was
                    // tagged with then).
                    let holds = held
                        .get(&name)
                        .and_then(|v| v.as_deref())
                        .is_some_and(|v| content(v) == b.hash);
                    if !holds {
                        let version = b.tagged(ctx.cache.epoch());
                        held.insert(name.clone(), Some(version.clone()));
                        out.push(Resource {
                            name,
                            version,
                            resource: Some(b.any.clone()),
                            ..Default::default()
                        });
                    }
                }
                None => {
                    if held.get(&name) != Some(&None) {
                        if sub.wildcard && !sub.names.contains(&name) {
                            held.remove(&name);
                        } else {
                            held.insert(name.clone(), None);
                        }
                        removed.push(name);
                    }
                }
            }
        }
        if out.is_empty() && removed.is_empty() {
            return None;
        }
        let mut h = ContentHash::default();
        for (name, v) in held.iter() {
            h.write(name.as_bytes());
            h.write(v.as_deref().unwrap_or("").as_bytes());
        }
        let system_version = h.hex();
        sub.held.system_version = system_version.clone();
        if type_url == resources::ENDPOINTS {
            let epoch = ctx.cache.epoch();
            let held = held
                .iter()
                .filter_map(|(name, v)| {
                    let v = v.as_deref()?;
                    Some((
                        name.clone(),
                        clients::Held {
                            hash: content(v).to_owned(),
                            version: claim(v, epoch).unwrap_or(0),
                        },
                    ))
                })
                .collect();
            s.sent_endpoints(held);
        }
        let nonce = s.sent(type_url, &system_version);
        Some(DeltaDiscoveryResponse {
            system_version_info: system_version,
            resources: out,
            type_url: type_url.to_owned(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }
}
