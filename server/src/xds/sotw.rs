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
//! The version of a response is `HASH.EPOCH.REVISION` ([`super::tag`]): the FNV hash of its
//! resources, and the newest service version among them. A client whose `version_info` claims a
//! revision of this epoch the cache has not applied is never answered with older resources
//! ([`super::not_behind`]: a bounded wait, else `UNAVAILABLE`). Resources are built once per
//! service version and shared by every stream (see `Context::built`); a response whose content
//! (hash) is that of the last one sent is not sent again. A client reconnecting with the version it holds is answered
//! only when the state differs (resume). Cost per wake-up: O(subscribed services × backends).
//!
//! A name that cannot name a DLB service is kept in the subscription (within the stream's
//! bounds, see the [module docs](super)) but never followed nor included: to the client it is a
//! resource that does not exist.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::clients::Registration;
use super::{
    claim, content, not_behind, record_nack, record_node, resources, Built, Context, Fnv, Followed,
};

type Tx = mpsc::Sender<Result<DiscoveryResponse, tonic::Status>>;

/// One resource type on this stream.
#[derive(Debug, Default)]
struct Sub {
    names: BTreeSet<String>,
    wildcard: bool,
    /// Version (content hash) of the last response sent, or resumed.
    version: Option<String>,
    nonce: String,
}

/// The resources of `type_url` for `names` (or every service with `wildcard`), in name order,
/// and the response's version: a hash of the type and each resource's name and hash.
pub(crate) fn resources_for(
    ctx: &Context,
    type_url: &str,
    names: &BTreeSet<String>,
    wildcard: bool,
) -> (Vec<Arc<Built>>, String) {
    let mut out = Vec::new();
    let mut newest = 0;
    let mut h = Fnv::default();
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
                out.push(b);
            }
        }
    }
    (out, super::tag(&h.hex(), ctx.cache.epoch(), newest))
}

struct Stream {
    ctx: Arc<Context>,
    reg: Registration,
    subs: HashMap<String, Sub>,
    followed: Followed,
    next_nonce: u64,
    tx: Tx,
    /// Limits the log lines this client can trigger (NACKs).
    log: crate::log_limit::LogLimiter,
}

impl Stream {
    /// Follows exactly the services some type subscribes to (all of them for a wildcard).
    fn refollow(&mut self) {
        self.followed
            .update(self.subs.values().map(|s| (&s.names, s.wildcard)));
    }

    fn wildcard(&self) -> bool {
        self.subs.values().any(|s| s.wildcard)
    }

    /// Handles one request; returns whether the type's subscription changed (push it).
    fn request(&mut self, req: DiscoveryRequest) -> Result<Option<String>, tonic::Status> {
        record_node(&self.reg.state, req.node.as_ref());
        let type_url = req.type_url;
        let first = !self.subs.contains_key(&type_url);
        super::check_type(
            "DiscoveryRequest.type_url",
            &type_url,
            first,
            self.subs.len(),
        )?;
        let sub = self.subs.entry(type_url.clone()).or_default();
        if !req.response_nonce.is_empty() {
            if req.response_nonce != sub.nonce {
                // A stale nonce: the client has not seen our newest response yet.
                return Ok(None);
            }
            if let Some(err) = &req.error_detail {
                record_nack(
                    &self.ctx,
                    &self.reg.state,
                    &mut self.log,
                    &type_url,
                    &req.version_info,
                    &req.response_nonce,
                    &err.message,
                );
            } else {
                let mut st = self.reg.state.lock();
                let t = st.types.entry(type_url.clone()).or_default();
                t.acked_version = super::clients::escaped(&req.version_info, 128);
                t.acked_nonce = req.response_nonce.clone();
            }
        }
        super::check_names("DiscoveryRequest.resource_names", req.resource_names.len())?;
        let names: BTreeSet<String> = req.resource_names.into_iter().collect();
        let (mut count, mut bytes) = (names.len(), names.iter().map(String::len).sum::<usize>());
        for (t, other) in &self.subs {
            if *t != type_url {
                count += other.names.len();
                bytes += other.names.iter().map(String::len).sum::<usize>();
            }
        }
        super::check_stream("DiscoveryRequest.resource_names", count, bytes)?;
        let sub = self.subs.entry(type_url.clone()).or_default();
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
        if first && !req.version_info.is_empty() && req.response_nonce.is_empty() {
            // A reconnecting client says what it holds: resume from there.
            let (_, version) = resources_for(&self.ctx, &type_url, &sub.names, sub.wildcard);
            if content(&version) == content(&req.version_info) {
                sub.version = Some(version.clone());
                let mut st = self.reg.state.lock();
                let t = st.types.entry(type_url.clone()).or_default();
                t.acked_version = version;
            }
        }
        {
            let (names, wildcard) = (sub.names.clone(), sub.wildcard);
            let mut st = self.reg.state.lock();
            let t = st.types.entry(type_url.clone()).or_default();
            t.names = names;
            t.wildcard = wildcard;
        }
        self.refollow();
        // A resumed type whose state matches is pushed only when it changes.
        let resumed = self
            .subs
            .get(&type_url)
            .is_some_and(|s| first && s.version.is_some());
        Ok((!resumed).then_some(type_url))
    }

    /// Sends the type's resources if they differ from the last response.
    async fn push(&mut self, type_url: &str, force: bool) -> bool {
        let Some(sub) = self.subs.get(type_url) else {
            return true;
        };
        let (resources, version) = resources_for(&self.ctx, type_url, &sub.names, sub.wildcard);
        // Same content: nothing to send (a newer revision alone changes nothing for the client).
        if !force && sub.version.as_deref().map(content) == Some(content(&version)) {
            return true;
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        if let Some(sub) = self.subs.get_mut(type_url) {
            sub.version = Some(version.clone());
            sub.nonce = nonce.clone();
        }
        {
            let mut st = self.reg.state.lock();
            let t = st.types.entry(type_url.to_owned()).or_default();
            t.sent_version = version.clone();
            t.sent_nonce = nonce.clone();
            t.responses += 1;
        }
        self.ctx.metrics.xds().response(type_url);
        let response = DiscoveryResponse {
            version_info: version,
            resources: resources.iter().map(|b| b.any.clone()).collect(),
            type_url: type_url.to_owned(),
            nonce,
            ..Default::default()
        };
        self.tx.send(Ok(response)).await.is_ok()
    }
}

/// Serves one SotW stream until the client ends it, it fails, or the server shuts down.
pub(crate) async fn run(
    ctx: Arc<Context>,
    peer: String,
    mut requests: tonic::Streaming<DiscoveryRequest>,
    tx: Tx,
) {
    ctx.metrics.xds().streams(1);
    let reg = ctx.clients.register("sotw", peer);
    let followed = Followed::new(ctx.cache.clone());
    let waker = followed.waker().clone();
    let mut services = ctx.cache.services_changed();
    let mut shutdown = ctx.shutdown.clone();
    let mut readiness = ctx.readiness.clone();
    let mut s = Stream {
        ctx: ctx.clone(),
        reg,
        subs: HashMap::new(),
        followed,
        next_nonce: 0,
        tx,
        log: crate::log_limit::LogLimiter::default(),
    };
    loop {
        // (type, force): a (re)subscription always gets an answer; a wake-up only a change.
        let mut pending: Vec<(String, bool)> = Vec::new();
        tokio::select! {
            req = requests.next() => match req {
                Some(Ok(req)) => match not_behind(&ctx, claim(&req.version_info, ctx.cache.epoch()))
                    .await
                    .and_then(|()| s.request(req))
                {
                    Ok(Some(t)) => pending.push((t, true)),
                    Ok(None) => {}
                    Err(status) => {
                        let _ = s.tx.send(Err(status)).await;
                        break;
                    }
                },
                Some(Err(status)) => {
                    tracing::debug!(code = ?status.code(), "xds: stream failed");
                    if let Some(status) = super::request_error("DiscoveryRequest", &status) {
                        let _ = s.tx.send(Err(status)).await;
                    }
                    break;
                }
                None => break,
            },
            _ = waker.notified() => {
                waker.take_dirty();
                pending.extend(s.subs.keys().map(|k| (k.clone(), false)));
            }
            r = services.changed(), if s.wildcard() => {
                if r.is_err() { break; }
                s.refollow();
                pending.extend(
                    s.subs.iter().filter(|(_, v)| v.wildcard).map(|(k, _)| (k.clone(), false)),
                );
            }
            _ = crate::shutdown::stopped(&mut shutdown) => {
                let _ = s.tx.send(Err(tonic::Status::unavailable("dlbd is shutting down"))).await;
                break;
            }
            () = readiness.going_away() => {
                let status = tonic::Status::unavailable(crate::readiness::NOT_SYNCED);
                let _ = s.tx.send(Err(status)).await;
                break;
            }
        }
        let mut ok = true;
        for (t, force) in pending {
            ok &= s.push(&t, force).await;
        }
        if !ok {
            break;
        }
    }
    super::finish_log(&s.reg.state, &mut s.log);
    drop(s);
    ctx.metrics.xds().streams(-1);
}
