//! The one ADS stream core that state-of-the-world ([`super::sotw`]) and incremental
//! ([`super::delta`]) streams share. It owns a stream's state — per resource type the subscribed
//! names, whether it is a wildcard and the nonce of the last response ([`Sub`]); the services the
//! stream follows in the cache with its one [`Waker`] ([`Followed`]); the stream's
//! `dlbctl xds-clients` bookkeeping ([`Registration`]) and its NACK log limiter — and the one
//! select loop ([`run`]) over the client's requests, the cache's changes of followed services,
//! new services (for wildcards), shutdown and readiness going away.
//!
//! A wire variant ([`Variant`]) says only what differs: how a request changes the subscription
//! (and how it acknowledges a response) and how a response is built from what the client holds.
//!
//! Every request first waits, bounded, for the cache to reach what the client claims to hold
//! ([`not_behind`]). A (re)subscription is always answered (SotW) or answered with what differs
//! (Delta); a wake-up pushes each affected type only when its content changed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{node::UserAgentVersionType, Node};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::assignment::Zone;
use super::clients::{self, Registration, TypeState};
use super::{resources, valid_name, Context};
use crate::cache::{Cache, Waker};
use crate::log_limit::LogLimiter;

/// What differs between the two wire variants of ADS: everything else is [`run`]'s.
pub(crate) trait Variant: Sized + Send + 'static {
    /// The request message.
    type Request: Send + 'static;
    /// The response message.
    type Response: Send + 'static;
    /// What the stream keeps per type about what the client holds.
    type Held: Default + Send;
    /// `sotw` or `delta` (listed by `dlbctl xds-clients`), and the request message's name
    /// (in error messages).
    const NAMES: (&'static str, &'static str);

    /// The newest revision of store epoch `epoch` the request says the client holds.
    fn claimed(epoch: u64, req: &Self::Request) -> Option<u64>;

    /// Applies one request to the stream; the type to answer, if any.
    fn request(s: &mut Core<Self>, req: Self::Request) -> Result<Option<String>, tonic::Status>;

    /// The response of `type_url` to send now, if any; `force`: the type was (re)subscribed,
    /// not merely woken.
    fn response(s: &mut Core<Self>, type_url: &str, force: bool) -> Option<Self::Response>;
}

/// One resource type on a stream.
#[derive(Debug, Default)]
pub(crate) struct Sub<H> {
    /// The names subscribed to.
    pub names: BTreeSet<String>,
    /// Every service (LDS/CDS with no names, or `*`).
    pub wildcard: bool,
    /// The nonce of the last response sent.
    pub nonce: String,
    /// What the client holds (the variant's).
    pub held: H,
}

/// One ADS stream's state (see the module docs).
pub(crate) struct Core<V: Variant> {
    /// What every stream shares.
    pub ctx: Arc<Context>,
    /// Per resource type URL.
    pub subs: HashMap<String, Sub<V::Held>>,
    reg: Registration,
    followed: Followed,
    next_nonce: u64,
    /// Limits the log lines this client can trigger (NACKs).
    log: LogLimiter,
    /// The client's zone (`node.locality` of its first request): chooses its EDS assignment.
    pub zone: Option<Zone>,
}

impl<V: Variant> Core<V> {
    /// Starts applying a request of `type_url`: records the node of the stream's first request
    /// and checks the type. Returns whether the stream had not used the type yet; its [`Sub`]
    /// exists from now on.
    pub fn begin(&mut self, node: Option<&Node>, type_url: &str) -> Result<bool, tonic::Status> {
        self.record_node(node);
        let first = !self.subs.contains_key(type_url);
        super::check_type(V::NAMES.1, type_url, first, self.subs.len())?;
        self.subs.entry(type_url.to_owned()).or_default();
        Ok(first)
    }

    /// Whether `nonce` is that of the last response of `type_url` (an empty one never is).
    pub fn is_last_nonce(&self, type_url: &str, nonce: &str) -> bool {
        !nonce.is_empty() && self.subs.get(type_url).is_some_and(|s| s.nonce == nonce)
    }

    /// The client answered the last response of `type_url` (nonce `nonce`): an ACK of
    /// `version`, or with `error` a NACK (`version` is then the one it keeps).
    pub fn answered(&mut self, type_url: &str, version: &str, nonce: &str, error: Option<&str>) {
        match error {
            Some(detail) => self.record_nack(type_url, version, nonce, detail),
            None => {
                self.client_type(type_url, |t| {
                    t.acked_version = clients::escaped(version, 128);
                    t.acked_nonce = nonce.to_owned();
                    t.waiting_since = None;
                });
                if type_url == resources::ENDPOINTS {
                    let mut st = self.reg.state.lock();
                    st.endpoints_acked = st.endpoints_sent.clone();
                    drop(st);
                    self.reg.bump();
                }
            }
        }
    }

    /// An EDS response holding `held` (per service) is about to be sent.
    pub fn sent_endpoints(&mut self, held: std::collections::BTreeMap<String, clients::Held>) {
        self.reg.state.lock().endpoints_sent = held;
    }

    /// A resumed EDS subscription already holds `held`: it counts as acknowledged.
    pub fn resumed_endpoints(&mut self, held: std::collections::BTreeMap<String, clients::Held>) {
        let mut st = self.reg.state.lock();
        st.endpoints_sent = held.clone();
        st.endpoints_acked = held;
        drop(st);
        self.reg.bump();
    }

    /// Shows the subscription of `type_url` in the bookkeeping.
    pub fn subscribed(&self, type_url: &str) {
        if let Some(sub) = self.subs.get(type_url) {
            let (names, wildcard) = (sub.names.clone(), sub.wildcard);
            self.client_type(type_url, |t| {
                t.names = names;
                t.wildcard = wildcard;
            });
        }
    }

    /// Runs `f` on the bookkeeping of `type_url` (under its lock: keep it short).
    pub fn client_type(&self, type_url: &str, f: impl FnOnce(&mut TypeState)) {
        f(self
            .reg
            .state
            .lock()
            .types
            .entry(type_url.to_owned())
            .or_default());
    }

    /// Follows exactly the services some type subscribes to (all of them for a wildcard).
    pub fn refollow(&mut self) {
        self.followed
            .update(self.subs.values().map(|s| (&s.names, s.wildcard)));
    }

    /// Whether some type is a wildcard (then new services matter).
    fn wildcard(&self) -> bool {
        self.subs.values().any(|s| s.wildcard)
    }

    /// A response of `type_url` at `version` is sent: takes the next nonce (returned) and
    /// records it in the type, the bookkeeping and the metrics.
    pub fn sent(&mut self, type_url: &str, version: &str) -> String {
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        if let Some(sub) = self.subs.get_mut(type_url) {
            sub.nonce = nonce.clone();
        }
        self.client_type(type_url, |t| {
            t.sent_version = version.to_owned();
            t.sent_nonce = nonce.clone();
            t.responses += 1;
            if t.waiting_since.is_none() {
                t.waiting_since = Some(tokio::time::Instant::now());
            }
        });
        self.ctx.metrics.response(type_url);
        nonce
    }

    /// Records the node of a stream's first request (escaped, truncated) and the client's
    /// zone.
    fn record_node(&mut self, node: Option<&Node>) {
        let Some(node) = node else { return };
        let mut st = self.reg.state.lock();
        if !st.node_id.is_empty() || !st.user_agent.is_empty() || st.locality.is_some() {
            return;
        }
        if let Some(l) = &node.locality {
            // A part longer than any backend's (128 bytes) can match none: dropped.
            let part = |v: &str| {
                if v.len() > 128 {
                    String::new()
                } else {
                    v.to_owned()
                }
            };
            let locality = dlb::proto::Locality {
                region: part(&l.region),
                zone: part(&l.zone),
                sub_zone: part(&l.sub_zone),
            };
            self.zone = Zone::of(Some(&locality));
            st.locality = dlb::locality::normalize(Some(locality));
        }
        st.node_id = clients::escaped(&node.id, 256);
        let version = match &node.user_agent_version_type {
            Some(UserAgentVersionType::UserAgentVersion(v)) => v.as_str(),
            _ => "",
        };
        let agent = format!("{} {}", node.user_agent_name, version);
        st.user_agent = clients::escaped(agent.trim(), 256);
    }

    /// Records a NACK: bookkeeping, an escaped warning, the metric.
    fn record_nack(&mut self, type_url: &str, version: &str, nonce: &str, detail: &str) {
        let message = clients::escaped(detail, clients::MAX_NACK_DETAIL);
        let node = {
            let mut st = self.reg.state.lock();
            let t = st.types.entry(type_url.to_owned()).or_default();
            t.nacks += 1;
            t.last_nack = Some(clients::Nack {
                version: clients::escaped(version, 128),
                nonce: clients::escaped(nonce, 128),
                message: message.clone(),
                at: std::time::SystemTime::now(),
            });
            st.node_id.clone()
        };
        self.ctx.metrics.nack(type_url);
        // Rate-limited per stream: a client NACKing in a loop costs a few lines per window.
        let Some(suppressed) = self.log.check() else {
            return;
        };
        tracing::warn!(
            node = %node,
            r#type = resources::short_name(type_url),
            nonce = %clients::escaped(nonce, 128),
            error = %message,
            suppressed,
            "xds: client rejected a response (NACK)"
        );
    }

    /// Logs the NACK lines that were suppressed and not reported yet, as the stream ends.
    fn finish_log(&mut self) {
        let suppressed = self.log.finish();
        if suppressed > 0 {
            let node = self.reg.state.lock().node_id.clone();
            tracing::warn!(node = %node, suppressed, "xds: {suppressed} similar messages suppressed");
        }
    }
}

/// Serves one ADS stream of variant `V` until the client ends it, it fails, or the server
/// shuts down (or the replica's readiness says go away).
pub(crate) async fn run<V: Variant>(
    ctx: Arc<Context>,
    peer: String,
    mut requests: tonic::Streaming<V::Request>,
    tx: mpsc::Sender<Result<V::Response, tonic::Status>>,
) {
    ctx.metrics.streams(1);
    let followed = Followed::new(ctx.cache.clone());
    let waker = followed.waker().clone();
    let mut s = Core::<V> {
        ctx: ctx.clone(),
        subs: HashMap::new(),
        reg: ctx.clients.register(V::NAMES.0, peer),
        followed,
        next_nonce: 0,
        log: LogLimiter::default(),
        zone: None,
    };
    let mut services = ctx.cache.services_changed();
    let shutdown = ctx.shutdown.clone();
    let mut readiness = ctx.readiness.clone();
    loop {
        // (type, force): a (re)subscription always gets an answer; a wake-up only a change.
        let mut pending: Vec<(String, bool)> = Vec::new();
        // `Some(end)`: the stream ends, with `end` sent first when there is one.
        let ended: Option<Option<tonic::Status>> = tokio::select! {
            req = requests.next() => match req {
                Some(Ok(req)) => match not_behind(&ctx, V::claimed(ctx.cache.epoch(), &req))
                    .await
                    .and_then(|()| V::request(&mut s, req))
                {
                    Ok(t) => {
                        pending.extend(t.map(|t| (t, true)));
                        None
                    }
                    Err(status) => Some(Some(status)),
                },
                Some(Err(status)) => {
                    tracing::debug!(protocol = V::NAMES.0, code = ?status.code(), "xds: stream failed");
                    Some(request_error(V::NAMES.1, &status))
                }
                None => Some(None),
            },
            _ = waker.notified() => {
                waker.take_dirty();
                pending.extend(s.subs.keys().map(|k| (k.clone(), false)));
                None
            }
            r = services.changed(), if s.wildcard() => match r {
                Err(_) => Some(None),
                Ok(()) => {
                    s.refollow();
                    pending.extend(
                        s.subs.iter().filter(|(_, v)| v.wildcard).map(|(k, _)| (k.clone(), false)),
                    );
                    None
                }
            },
            _ = shutdown.stopped() => {
                Some(Some(tonic::Status::unavailable("dlbd is shutting down")))
            }
            () = readiness.going_away() => {
                Some(Some(tonic::Status::unavailable(crate::readiness::NOT_SYNCED)))
            }
        };
        if let Some(end) = ended {
            if let Some(status) = end {
                let _ = tx.send(Err(status)).await;
            }
            break;
        }
        let mut ok = true;
        for (t, force) in pending {
            if let Some(response) = V::response(&mut s, &t, force) {
                ok &= tx.send(Ok(response)).await.is_ok();
            }
        }
        if !ok {
            break;
        }
    }
    s.finish_log();
    drop(s);
    ctx.metrics.streams(-1);
}

/// Never back in time: when a client claims (by the versions it holds, same epoch) a revision
/// this replica's cache has not applied, waits up to [`crate::cache::AHEAD_WAIT`] for it;
/// `Err(UNAVAILABLE)` if it does not get there (the client should try another replica).
pub(crate) async fn not_behind(ctx: &Context, claimed: Option<u64>) -> Result<(), tonic::Status> {
    let Some(rev) = claimed else { return Ok(()) };
    if ctx.cache.revision() >= rev
        || ctx
            .cache
            .wait_for_revision(rev, crate::cache::AHEAD_WAIT)
            .await
    {
        return Ok(());
    }
    Err(tonic::Status::unavailable(format!(
        "this replica is behind: the client holds revision {rev}, this replica reached {}; try another replica",
        ctx.cache.revision()
    )))
}

/// The status that ends a stream whose request stream failed: a request that cannot be decoded
/// is `INVALID_ARGUMENT` (tonic reports it as INTERNAL, which would blame the server), one too
/// large `RESOURCE_EXHAUSTED`; `None` when the client just went away.
fn request_error(what: &str, e: &tonic::Status) -> Option<tonic::Status> {
    let msg = clients::escaped(e.message(), 200);
    match e.code() {
        tonic::Code::Internal => Some(tonic::Status::invalid_argument(format!(
            "undecodable {what}: {msg}"
        ))),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => Some(
            tonic::Status::resource_exhausted(format!("{what} too large: {msg}")),
        ),
        _ => None,
    }
}

/// The services one ADS stream follows in the cache, all with the stream's one [`Waker`]:
/// exactly those some resource type subscribes to (every service for a wildcard). Unfollows
/// them all when dropped, however the stream ends.
struct Followed {
    cache: Arc<Cache>,
    waker: Arc<Waker>,
    names: BTreeSet<String>,
}

impl Followed {
    /// Follows nothing yet.
    fn new(cache: Arc<Cache>) -> Self {
        let waker = cache.waker();
        Self {
            cache,
            waker,
            names: BTreeSet::new(),
        }
    }

    /// The stream's waker (notified when a followed service changes).
    fn waker(&self) -> &Arc<Waker> {
        &self.waker
    }

    /// Follows exactly the services that `subs` (each type's names and whether it is a
    /// wildcard) ask for; names that cannot name a service ([`valid_name`]) are not followed.
    /// O(followed + wanted).
    fn update<'a>(&mut self, subs: impl IntoIterator<Item = (&'a BTreeSet<String>, bool)>) {
        let mut want = BTreeSet::new();
        let mut wildcard = false;
        for (names, w) in subs {
            want.extend(names.iter().filter(|n| valid_name(n)).cloned());
            wildcard |= w;
        }
        if wildcard {
            want.extend(self.cache.service_names().iter().map(|s| s.to_string()));
        }
        for gone in self.names.difference(&want) {
            self.cache.unfollow_service(gone, &self.waker);
        }
        for new in want.difference(&self.names) {
            self.cache.follow_service(new, &self.waker);
        }
        self.names = want;
    }
}

impl Drop for Followed {
    fn drop(&mut self) {
        for name in &self.names {
            self.cache.unfollow_service(name, &self.waker);
        }
    }
}
