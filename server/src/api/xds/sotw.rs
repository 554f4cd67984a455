//! State-of-the-world ADS (`StreamAggregatedResources`).
//!
//! Per resource type the stream keeps the subscribed names (a LDS/CDS request with no names is a
//! wildcard: every service) and the version of the last response. A request whose
//! `response_nonce` is the last one sent is an ACK (no `error_detail`) or a NACK; a request with
//! an older nonce is ignored, as the protocol says. Every response of a type carries every
//! subscribed resource of that type that exists: for LDS and CDS a missing name therefore means
//! "does not exist" (and appears in a later response when the service is created); EDS names
//! are simply not included until they exist.
//!
//! The version of a response is `HASH.EPOCH.REVISION` ([`super::tag`]): the content hash
//! ([`super::ContentHash`]) of its resources, and the newest service version among them. A client whose `version_info` claims a
//! revision of this epoch the cache has not applied is never answered with older resources
//! ([`super::stream::not_behind`]: a bounded wait, else `UNAVAILABLE`). Resources are built once per
//! service version and shared by every stream (see `Context::built`); a response whose content
//! (hash) is that of the last one sent is not sent again. A client reconnecting with the version it holds is answered
//! only when the state differs (resume). Cost per wake-up: O(subscribed services × backends).
//!
//! A name that cannot name a DLB service is kept in the subscription (within the stream's
//! bounds, see the [module docs](super)) but never followed nor included: to the client it is a
//! resource that does not exist.

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::stream::{Core, Variant};
use super::{claim, content, resources, Built, ContentHash, Context};

/// The resources of `type_url` for `names` (or every service with `wildcard`), in name order,
/// and the response's version: a hash of the type and each resource's name and hash.
pub(crate) fn resources_for(
    ctx: &Context,
    type_url: &str,
    names: &BTreeSet<String>,
    wildcard: bool,
) -> (Vec<(String, Arc<Built>)>, String) {
    let mut out = Vec::new();
    let mut newest = 0;
    let mut h = ContentHash::default();
    h.write(type_url.as_bytes());
    if resources::served(type_url) {
        let all: BTreeSet<String>;
        let names = if wildcard {
            all = ctx
                .cache
                .service_names()
                .iter()
                .map(|s| s.to_string())
                .collect();
            &all
        } else {
            names
        };
        for name in names {
            if let Some(b) = ctx.built(type_url, name) {
                h.write(name.as_bytes());
                h.write(b.hash.as_bytes());
                newest = newest.max(b.version);
                out.push((name.clone(), b));
            }
        }
    }
    (out, super::tag(&h.hex(), ctx.cache.epoch(), newest))
}

/// State-of-the-world ADS. Per type it keeps the version (content hash) of the last response
/// sent, or resumed.
pub(crate) struct Sotw;

impl Variant for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    type Held = Option<String>;
    const NAMES: (&'static str, &'static str) = ("sotw", "DiscoveryRequest");

    fn claimed(epoch: u64, req: &DiscoveryRequest) -> Option<u64> {
        claim(&req.version_info, epoch)
    }

    /// Handles one request; returns the type to answer when its subscription changed.
    fn request(s: &mut Core<Self>, req: DiscoveryRequest) -> Result<Option<String>, tonic::Status> {
        let type_url = req.type_url;
        let first = s.begin(req.node.as_ref(), &type_url)?;
        if !req.response_nonce.is_empty() {
            if !s.is_last_nonce(&type_url, &req.response_nonce) {
                // A stale nonce: the client has not seen our newest response yet.
                return Ok(None);
            }
            let error = req.error_detail.as_ref().map(|e| e.message.as_str());
            s.answered(&type_url, &req.version_info, &req.response_nonce, error);
        }
        super::check_names("DiscoveryRequest.resource_names", req.resource_names.len())?;
        let names: BTreeSet<String> = req.resource_names.into_iter().collect();
        let (mut count, mut bytes) = (names.len(), names.iter().map(String::len).sum::<usize>());
        for (t, other) in &s.subs {
            if *t != type_url {
                count += other.names.len();
                bytes += other.names.iter().map(String::len).sum::<usize>();
            }
        }
        super::check_stream("DiscoveryRequest.resource_names", count, bytes)?;
        let ctx = s.ctx.clone();
        let sub = s.subs.entry(type_url.clone()).or_default();
        let wildcard = (first || sub.wildcard)
            && names.is_empty()
            && matches!(type_url.as_str(), resources::LISTENER | resources::CLUSTER);
        let wildcard = wildcard || names.contains("*");
        let changed = first || names != sub.names || wildcard != sub.wildcard;
        if !changed {
            return Ok(None);
        }
        sub.names = names;
        sub.wildcard = wildcard;
        let mut resumed = None;
        let mut resumed_held = None;
        if first && !req.version_info.is_empty() && req.response_nonce.is_empty() {
            // A reconnecting client says what it holds: resume from there.
            let (built, version) = resources_for(&ctx, &type_url, &sub.names, sub.wildcard);
            if content(&version) == content(&req.version_info) {
                if type_url == resources::ENDPOINTS {
                    resumed_held = Some(built.iter().map(|(n, b)| (n.clone(), b.held())).collect());
                }
                sub.held = Some(version.clone());
                resumed = Some(version);
            }
        }
        if let Some(version) = &resumed {
            s.client_type(&type_url, |t| t.acked_version = version.clone());
            if let Some(held) = resumed_held {
                // It holds exactly what would be sent now: acknowledged.
                s.resumed_endpoints(held);
            }
        }
        s.subscribed(&type_url);
        s.refollow();
        // A resumed type whose state matches is pushed only when it changes.
        Ok(resumed.is_none().then_some(type_url))
    }

    /// The type's resources if they differ from the last response (or `force`).
    fn response(s: &mut Core<Self>, type_url: &str, force: bool) -> Option<DiscoveryResponse> {
        let sub = s.subs.get(type_url)?;
        let (resources, version) = resources_for(&s.ctx, type_url, &sub.names, sub.wildcard);
        // Same content: nothing to send (a newer revision alone changes nothing for the client).
        if !force && sub.held.as_deref().map(content) == Some(content(&version)) {
            return None;
        }
        if let Some(sub) = s.subs.get_mut(type_url) {
            sub.held = Some(version.clone());
        }
        if type_url == resources::ENDPOINTS {
            s.sent_endpoints(
                resources
                    .iter()
                    .map(|(n, b)| (n.clone(), b.held()))
                    .collect(),
            );
        }
        let nonce = s.sent(type_url, &version);
        Some(DiscoveryResponse {
            version_info: version,
            resources: resources.iter().map(|(_, b)| b.any.clone()).collect(),
            type_url: type_url.to_owned(),
            nonce,
            ..Default::default()
        })
    }
}
