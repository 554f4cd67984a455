//! Incremental ADS (`DeltaAggregatedResources`).
//!
//! Per resource type the stream keeps the subscribed names (`*`, or a first LDS/CDS request
//! with no names, is a wildcard) and, per name, what the client holds: a resource version (the
//! FNV hash of the encoded resource, tagged) or "told it does not exist". A push sends only resources
//! whose content differs from what the client holds, and names that do not exist (any more) in
//! `removed_resources` — including subscribed names that never existed, so the client learns
//! at once that they are absent; they are sent when created. `initial_resource_versions` of a
//! reconnecting client are taken as what it holds (resume: only differences are sent). A
//! resource version is `HASH.EPOCH.REVISION` ([`super::tag`]); when those versions claim a
//! revision of this epoch the cache has not applied, the stream waits for it a bounded time,
//! else ends with `UNAVAILABLE` ([`super::not_behind`]): never older resources than held.
//!
//! ACK/NACK: a request carrying the nonce of the last response is its ACK or (with
//! `error_detail`) its NACK; the acked version is that response's `system_version_info`.
//! Cost per wake-up: O(subscribed services × backends).
//!
//! A name that cannot name a DLB service is kept in the subscription (within the stream's
//! bounds, see the [module docs](super)) but never followed: it is sent in `removed_resources`
//! at once, like any resource that does not exist.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::clients::Registration;
use super::{
    claim, content, not_behind, record_nack, record_node, resources, Context, Fnv, Followed,
};

type Tx = mpsc::Sender<Result<DeltaDiscoveryResponse, tonic::Status>>;

/// One resource type on this stream.
#[derive(Debug, Default)]
struct Sub {
    names: BTreeSet<String>,
    wildcard: bool,
    /// What the client holds per name: `Some(version)`, or `None` when told it is absent.
    held: BTreeMap<String, Option<String>>,
    nonce: String,
    system_version: String,
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

    fn request(&mut self, req: DeltaDiscoveryRequest) -> Result<Option<String>, tonic::Status> {
        record_node(&self.reg.state, req.node.as_ref());
        let type_url = req.type_url;
        let first = !self.subs.contains_key(&type_url);
        super::check_type(
            "DeltaDiscoveryRequest.type_url",
            &type_url,
            first,
            self.subs.len(),
        )?;
        let sub = self.subs.entry(type_url.clone()).or_default();
        if !req.response_nonce.is_empty() && req.response_nonce == sub.nonce {
            if let Some(err) = &req.error_detail {
                let (version, nonce) = (sub.system_version.clone(), req.response_nonce.clone());
                record_nack(
                    &self.ctx,
                    &self.reg.state,
                    &mut self.log,
                    &type_url,
                    &version,
                    &nonce,
                    &err.message,
                );
            } else {
                let mut st = self.reg.state.lock();
                let t = st.types.entry(type_url.clone()).or_default();
                t.acked_version = sub.system_version.clone();
                t.acked_nonce = req.response_nonce.clone();
            }
        }
        if first {
            for (name, mut version) in req.initial_resource_versions {
                if version.len() > super::MAX_CLIENT_VERSION {
                    version.clear();
                }
                sub.held.insert(name, Some(version));
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
            sub.held.len(),
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
                sub.held.remove(&name);
                changed = true;
            }
        }
        for name in req.resource_names_unsubscribe {
            if name == "*" {
                sub.wildcard = false;
            }
            sub.names.remove(&name);
            sub.held.remove(&name);
            changed = true;
        }
        let (mut count, mut bytes) = (0, 0);
        for s in self.subs.values() {
            count += s.names.len() + s.held.keys().filter(|n| !s.names.contains(*n)).count();
            bytes += s.names.iter().map(String::len).sum::<usize>()
                + s.held
                    .iter()
                    .map(|(n, v)| n.len() + v.as_ref().map_or(0, String::len))
                    .sum::<usize>();
        }
        super::check_stream(
            "DeltaDiscoveryRequest.resource_names_subscribe",
            count,
            bytes,
        )?;
        let Some(sub) = self.subs.get(&type_url) else {
            return Ok(None);
        };
        {
            let (names, wildcard) = (sub.names.clone(), sub.wildcard);
            let mut st = self.reg.state.lock();
            let t = st.types.entry(type_url.clone()).or_default();
            t.names = names;
            t.wildcard = wildcard;
        }
        if !changed {
            return Ok(None);
        }
        self.refollow();
        Ok(Some(type_url))
    }

    async fn push(&mut self, type_url: &str) -> bool {
        let ctx = self.ctx.clone();
        let Some(sub) = self.subs.get_mut(type_url) else {
            return true;
        };
        let mut names = sub.names.clone();
        if sub.wildcard {
            names.extend(ctx.cache.service_names().iter().map(|s| s.to_string()));
            // Names the client holds that left the wildcard set are reported removed.
            names.extend(sub.held.keys().cloned());
        }
        let mut out = Vec::new();
        let mut removed = Vec::new();
        for name in names {
            match ctx.built(type_url, &name) {
                Some(b) => {
                    // Held already when the content is the same (whatever revision it was
                    // tagged with then).
                    let held = sub
                        .held
                        .get(&name)
                        .and_then(|v| v.as_deref())
                        .is_some_and(|v| content(v) == b.hash);
                    if !held {
                        let version = b.tagged(ctx.cache.epoch());
                        sub.held.insert(name.clone(), Some(version.clone()));
                        out.push(Resource {
                            name,
                            version,
                            resource: Some(b.any.clone()),
                            ..Default::default()
                        });
                    }
                }
                None => {
                    if sub.held.get(&name) != Some(&None) {
                        if sub.wildcard && !sub.names.contains(&name) {
                            sub.held.remove(&name);
                        } else {
                            sub.held.insert(name.clone(), None);
                        }
                        removed.push(name);
                    }
                }
            }
        }
        if out.is_empty() && removed.is_empty() {
            return true;
        }
        let mut h = Fnv::default();
        for (name, v) in &sub.held {
            h.write(name.as_bytes());
            h.write(v.as_deref().unwrap_or("").as_bytes());
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        sub.nonce = nonce.clone();
        sub.system_version = h.hex();
        {
            let mut st = self.reg.state.lock();
            let t = st.types.entry(type_url.to_owned()).or_default();
            t.sent_version = sub.system_version.clone();
            t.sent_nonce = nonce.clone();
            t.responses += 1;
        }
        let response = DeltaDiscoveryResponse {
            system_version_info: sub.system_version.clone(),
            resources: out,
            type_url: type_url.to_owned(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        ctx.metrics.xds().response(type_url);
        self.tx.send(Ok(response)).await.is_ok()
    }
}

/// The newest revision of this epoch the versions a client says it holds claim.
fn claimed(ctx: &Context, req: &DeltaDiscoveryRequest) -> Option<u64> {
    let epoch = ctx.cache.epoch();
    req.initial_resource_versions
        .values()
        .filter_map(|v| claim(v, epoch))
        .max()
}

/// Serves one delta stream until the client ends it, it fails, or the server shuts down.
pub(crate) async fn run(
    ctx: Arc<Context>,
    peer: String,
    mut requests: tonic::Streaming<DeltaDiscoveryRequest>,
    tx: Tx,
) {
    ctx.metrics.xds().streams(1);
    let reg = ctx.clients.register("delta", peer);
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
        let mut pending: Vec<String> = Vec::new();
        tokio::select! {
            req = requests.next() => match req {
                Some(Ok(req)) => match not_behind(&ctx, claimed(&ctx, &req)).await.and_then(|()| s.request(req)) {
                    Ok(Some(t)) => pending.push(t),
                    Ok(None) => {}
                    Err(status) => {
                        let _ = s.tx.send(Err(status)).await;
                        break;
                    }
                },
                Some(Err(status)) => {
                    tracing::debug!(code = ?status.code(), "xds: delta stream failed");
                    if let Some(status) = super::request_error("DeltaDiscoveryRequest", &status) {
                        let _ = s.tx.send(Err(status)).await;
                    }
                    break;
                }
                None => break,
            },
            _ = waker.notified() => {
                waker.take_dirty();
                pending.extend(s.subs.keys().cloned());
            }
            r = services.changed(), if s.wildcard() => {
                if r.is_err() { break; }
                s.refollow();
                pending.extend(s.subs.iter().filter(|(_, v)| v.wildcard).map(|(k, _)| k.clone()));
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
        for t in pending {
            ok &= s.push(&t).await;
        }
        if !ok {
            break;
        }
    }
    super::finish_log(&s.reg.state, &mut s.log);
    drop(s);
    ctx.metrics.xds().streams(-1);
}
