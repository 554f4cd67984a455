//! The `dlb.v1.Discovery` gRPC service: one bidirectional session per SDK, a thin front-end over
//! the [snapshot cache](crate::cache).
//!
//! Each `Session` call spawns one task that owns all of the session's state (which services it
//! follows and the version each was last brought to) — no locks. The task `select!`s over
//! three inputs: the client's messages, its cache [`Waker`] (woken only when a service *it
//! follows* changes), and the shutdown flag.
//!
//! * **First message** must be a `Subscribe`; anything else ends the stream with
//!   `INVALID_ARGUMENT`. For each service: a full snapshot, or a delta when the client's
//!   `known` (epoch, version) is still in the cache's history (an empty delta when it is
//!   current), or `ServiceNotFound` (then a full snapshot as soon as the service is created).
//! * **Never back in time**: a client whose `known` (same epoch) is newer than this replica's
//!   cache — it saw a newer state on another replica — is never sent the older state: the
//!   session waits up to [`AHEAD_WAIT`] for the cache to reach `known`, then answers from there,
//!   else ends with `UNAVAILABLE` so the SDK tries another replica. A `known` of another epoch
//!   (another store history) gets a full snapshot as before.
//! * **Deltas on the base the client holds**: a Subscribe naming a service the session already
//!   follows is answered from what the session last sent (the client holds it once it has read
//!   the stream, whatever `known` it wrote before reading), never from that Subscribe's `known`.
//! * **Updates**: when woken, the task asks the cache what each changed service needs from the
//!   version it last sent ([`Catchup`]): one delta, coalescing every change since (a session that
//!   was slow to read gets one merged delta, never a queue of stale ones), or a full snapshot
//!   when the history no longer reaches back. All catch-up logic is the cache's.
//! * **Backpressure**: writers never wait for sessions — a change only marks the service dirty
//!   in the session's waker. The outbound queue towards the HTTP/2 stream is a bounded `mpsc`
//!   channel (`session_queue`); a full queue blocks only this session's task.
//! * **Ack** is logged; **Nack** is answered with a full snapshot; **Unsubscribe** stops
//!   updates; **LoadReport** replaces this session's in-flight counts for the service (see
//!   [`crate::reports::loads`]); they are removed when the session ends.
//! * **GlobalLoad**: the other sessions' in-flight counts, pushed at most every 100 ms and only
//!   when they moved ([`crate::reports::global_load`]); load-report outcomes go to the outlier task
//!   ([`crate::health::passive`]).
//! * **Heartbeat**: a session that has sent nothing for `session_heartbeat` (5 s by default)
//!   sends a `Heartbeat` with the cache's revision, so an SDK can fail over from a control plane
//!   that is connected but no longer talking (its update deadline).
//! * **Maximum age** (`ServerConfig::max_session_age`, off by default): a session that has
//!   lived its limit (drawn within ±10 % of the setting) sends `GoingAway` and ends; the SDK
//!   resumes on its next endpoint with a delta. This spreads sessions back over the replicas
//!   after a failover piled them on the survivors.
//! * **Shutdown**: every session sends `GoingAway` and then ends its stream.
//! * **Bounds**: a session follows at most [`MAX_SUBSCRIPTIONS`] services holding at most
//!   [`MAX_SUBSCRIPTION_BYTES`] bytes of names, each a valid service name (`INVALID_ARGUMENT`
//!   naming `service` otherwise, `RESOURCE_EXHAUSTED` naming the limit past a bound). Names it
//!   follows that the store does not hold keep a cache entry only while followed. With every
//!   bound reached a session holds about 8 MB (its subscriptions, Nack cool-downs, the cache
//!   entries of the names it follows) plus its outbound queue; all of it goes when it ends or
//!   unsubscribes.
//! * **Readiness** ([`crate::readiness`]): a replica out of step with its store refuses new
//!   sessions with `UNAVAILABLE`, and past the going-away bound sends open ones `GoingAway`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dlb::model;
use dlb::proto::{self, client_message, server_message, ClientMessage, ServerMessage};
use dlb::wire::{discovery_server::Discovery, Outbound};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::Shared;

/// How long a session waits for room in its queue to hand over its last message (`GoingAway`
/// or the error status that ends it).
const GOING_AWAY_TIMEOUT: Duration = Duration::from_secs(1);
/// Why a session that reached its maximum age is sent away.
pub const MAX_AGE_REASON: &str = "session reached its maximum age (rebalancing)";

/// A session's age limit: `age` scaled by a factor drawn uniformly in [0.9, 1.1].
fn jittered(age: Duration) -> Duration {
    age.mul_f64(0.9 + 0.2 * fastrand::f64())
}
use crate::cache::{Catchup, Waker, AHEAD_WAIT};
use crate::store::Delta;

/// Most services one session may follow: a bound on what a client can make the server keep.
pub const MAX_SUBSCRIPTIONS: usize = 10_000;

/// Most bytes of service names one session may follow (the names themselves; each is a valid
/// service name, at most 128 bytes).
pub const MAX_SUBSCRIPTION_BYTES: usize = 1 << 20;

/// The Discovery service implementation.
pub struct DiscoveryService {
    shared: Arc<Shared>,
}

impl DiscoveryService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type SessionStream = ReceiverStream<Result<Outbound, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<ClientMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        if let Err(status) = self.shared.readiness.admit() {
            self.shared.metrics.rpc("Session", status.code());
            return Err(status);
        }
        let open = self.shared.sessions.fetch_add(1, Ordering::Relaxed);
        if open >= self.shared.max_sessions {
            self.shared.sessions.fetch_sub(1, Ordering::Relaxed);
            self.shared
                .metrics
                .rpc("Session", tonic::Code::ResourceExhausted);
            return Err(Status::resource_exhausted(format!(
                "dlbd serves at most {} sessions at once",
                self.shared.max_sessions
            )));
        }
        // From here the session's Cleanup gives the slot back, however it ends.
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(self.shared.session_queue.max(1));
        let id = self.shared.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.metrics.session_delta(1);
        let session = Session {
            // Gives back the session slot, the load-report contribution and the gauge on every
            // exit path, including a panic or the task being dropped before it ever ran.
            _cleanup: Cleanup {
                shared: self.shared.clone(),
                id,
            },
            id,
            shared: self.shared.clone(),
            tx,
            subs: HashMap::new(),
            sub_bytes: 0,
            nonce: 0,
            epoch: self.shared.cache.epoch(),
            waker: self.shared.cache.waker(),
            nacked: HashMap::new(),
            log: crate::log_limit::LogLimiter::default(),
            global: crate::reports::global_load::GlobalPush::new(&self.shared.loads),
            last_sent: tokio::time::Instant::now(),
        };
        tracing::debug!(session = id, ?peer, "session opened");
        self.shared.shutdown.spawn(session.run(inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// How long after a Nack-triggered full snapshot of a service another Nack of that service waits
/// before it gets one (a client that fails on the same snapshot cannot make a tight loop).
const NACK_COOLDOWN: Duration = Duration::from_secs(1);
/// Longest client string quoted in a log line.
const LOG_QUOTE: usize = 128;

/// The end of a session whose inbound stream failed: a message that cannot be decoded ends it
/// with a status that says why; a client that went away just ends it.
fn inbound_error(e: Status) -> End {
    match e.code() {
        tonic::Code::Internal if e.message().contains("decod") => {
            End::Status(Status::invalid_argument(format!(
                "undecodable client message: {}",
                model::prefix(e.message(), 200)
            )))
        }
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
            End::Status(Status::resource_exhausted(format!(
                "client message too large: {}",
                model::prefix(e.message(), 200)
            )))
        }
        _ => End::Done,
    }
}

/// Undoes what a session contributed to shared state when it ends, however it ends.
struct Cleanup {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.shared.sessions.fetch_sub(1, Ordering::Relaxed);
        for (service, totals) in self.shared.loads.remove_session(self.id) {
            self.shared.pickers.set_baselines(&service, &totals);
            self.shared.metrics.in_flight(&service, &totals);
        }
        for service in self.shared.circuits.remove_session(self.id) {
            self.shared
                .metrics
                .circuits
                .update(&service, &self.shared.circuits);
        }
        self.shared.metrics.session_delta(-1);
    }
}

/// What a session last sent for one followed service.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sub {
    /// The client was told the service does not exist.
    NotFound,
    /// The client was brought to this version.
    At(u64),
    /// The client nacked and is owed a full snapshot once the Nack cool-down has passed.
    Resend,
}

/// Why the session loop stopped.
enum End {
    /// The client closed its stream, or the server is shutting down.
    Done,
    /// The outbound stream is gone (the client went away).
    Gone,
    /// The session ends with this status (sent to the client).
    Status(Status),
}

struct Session {
    _cleanup: Cleanup,
    id: u64,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Result<Outbound, Status>>,
    subs: HashMap<String, Sub>,
    /// Bytes of the names in `subs` (bounded by [`MAX_SUBSCRIPTION_BYTES`]).
    sub_bytes: usize,
    nonce: u64,
    epoch: u64,
    /// Woken by the cache when a followed service changes.
    waker: Arc<Waker>,
    /// When each service last got a Nack-triggered full snapshot.
    nacked: HashMap<String, tokio::time::Instant>,
    /// Limits the warnings this client can trigger (Nacks); counts the rest.
    log: crate::log_limit::LogLimiter,
    /// Pushes the other sessions' in-flight counts ([`crate::reports::global_load`]).
    global: crate::reports::global_load::GlobalPush,
    /// When a message was last handed to the stream: a `Heartbeat` goes out once the session
    /// has been silent for `session_heartbeat`.
    last_sent: tokio::time::Instant,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<ClientMessage>) {
        let metrics = self.shared.metrics.clone();
        let end = self.main(&mut inbound).await;
        for service in self.subs.keys() {
            self.shared.cache.unfollow_service(service, &self.waker);
        }
        let code = match end {
            End::Done | End::Gone => tonic::Code::Ok,
            End::Status(status) => {
                let code = status.code();
                let _ = tokio::time::timeout(GOING_AWAY_TIMEOUT, self.tx.send(Err(status))).await;
                code
            }
        };
        metrics.rpc("Session", code);
        let suppressed = self.log.finish();
        if suppressed > 0 {
            tracing::warn!(
                session = self.id,
                suppressed,
                "session: {suppressed} similar messages suppressed"
            );
        }
        tracing::debug!(session = self.id, "session closed");
    }

    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        format!("{:x}-{:x}-{}", self.epoch, self.id, self.nonce)
    }

    /// Hands a message to the stream; `Err(End::Gone)` when the client is gone, `Err(End::Done)`
    /// when a shutdown started while the queue was full.
    ///
    /// A client that stops reading fills the bounded queue: the session then counts as lagging
    /// (`dlb_sessions_lagging`) and waits at most the stall deadline for room, after which it is
    /// cut (`dlb_sessions_stalled_total`). What it can pin meanwhile is bounded by the queue
    /// (`session_queue` messages, shared encodings included) plus the HTTP/2 stream's buffers.
    async fn send(&mut self, msg: Outbound) -> Result<(), End> {
        self.last_sent = tokio::time::Instant::now();
        let msg = match self.tx.try_send(Ok(msg)) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::Gone),
            Err(mpsc::error::TrySendError::Full(msg)) => msg,
        };
        let metrics = self.shared.metrics.clone();
        metrics.lagging(1);
        let shutdown = self.shared.shutdown.clone();
        let deadline = self.shared.stall_deadline;
        let r = tokio::select! {
            r = tokio::time::timeout(deadline, self.tx.send(msg)) => match r {
                Ok(r) => r.map_err(|_| End::Gone),
                Err(_) => {
                    metrics.stalled();
                    tracing::warn!(session = self.id, deadline = ?deadline, "session stalled: not read within the deadline; closing it");
                    Err(End::Status(Status::resource_exhausted(format!(
                        "session closed: it did not read for {deadline:?}"
                    ))))
                }
            },
            _ = shutdown.stopped() => Err(End::Done),
        };
        metrics.lagging(-1);
        r
    }

    async fn going_away(&mut self) {
        self.going_away_because("dlbd is shutting down").await;
    }

    async fn going_away_because(&mut self, reason: &str) {
        let msg = ServerMessage {
            kind: Some(server_message::Kind::GoingAway(proto::GoingAway {
                reason: reason.into(),
            })),
        };
        // Best effort: a client that does not read for a while does not get it.
        let _ = tokio::time::timeout(GOING_AWAY_TIMEOUT, self.tx.send(Ok(Outbound::Message(msg))))
            .await;
    }

    async fn main(&mut self, inbound: &mut Streaming<ClientMessage>) -> End {
        let shutdown = self.shared.shutdown.clone();
        let first = tokio::select! {
            m = inbound.message() => m,
            _ = shutdown.stopped() => {
                self.going_away().await;
                return End::Done;
            }
        };
        match first {
            Ok(Some(ClientMessage {
                kind: Some(client_message::Kind::Subscribe(sub)),
            })) => {
                tracing::info!(session = self.id, client_id = %model::printable(&sub.client_id, LOG_QUOTE), services = sub.services.len(), "session subscribed");
                if let Err(end) = self.subscribe(sub).await {
                    return end;
                }
            }
            Ok(Some(_)) => {
                return End::Status(Status::invalid_argument(
                    "the first message of a session must be a Subscribe",
                ))
            }
            Ok(None) => return End::Done,
            Err(e) => return inbound_error(e),
        }
        let mut readiness = self.shared.readiness.clone();
        let age_limit = self.shared.max_session_age.map(jittered);
        let aged = async move {
            match age_limit {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(aged);
        let heartbeat = tokio::time::sleep_until(self.last_sent + self.shared.session_heartbeat);
        tokio::pin!(heartbeat);
        loop {
            let due = self.last_sent + self.shared.session_heartbeat;
            if heartbeat.deadline() != due {
                heartbeat.as_mut().reset(due);
            }
            tokio::select! {
                biased;
                _ = shutdown.stopped() => {
                    self.going_away().await;
                    return End::Done;
                }
                () = readiness.going_away() => {
                    tracing::info!(session = self.id, "session sent away: {}", crate::readiness::NOT_SYNCED);
                    self.going_away_because(crate::readiness::NOT_SYNCED).await;
                    return End::Done;
                }
                () = &mut aged => {
                    tracing::debug!(session = self.id, "session sent away: {MAX_AGE_REASON}");
                    self.going_away_because(MAX_AGE_REASON).await;
                    return End::Done;
                }
                () = &mut heartbeat => {
                    let beat = proto::Heartbeat { revision: self.shared.cache.revision() };
                    if let Err(end) = self.send(Self::message(server_message::Kind::Heartbeat(beat))).await {
                        return end;
                    }
                }
                // Updates before client messages: a woken session does not poll its inbound
                // stream (cheaper per update); client messages wait at most one catch-up.
                _ = self.waker.notified() => {
                    if let Err(end) = self.on_wake().await {
                        return end;
                    }
                }
                () = self.global.due() => {
                    let msgs = self.global.collect(&self.shared.loads, self.id, self.subs.keys());
                    for g in msgs {
                        if let Err(end) = self.send(Self::message(server_message::Kind::GlobalLoad(g))).await {
                            return end;
                        }
                    }
                }
                m = inbound.message() => {
                    let r = match m {
                        Ok(Some(msg)) => self.on_client(msg).await,
                        Ok(None) => return End::Done,
                        Err(e) => return inbound_error(e),
                    };
                    if let Err(end) = r {
                        return end;
                    }
                }
            }
        }
    }

    /// Brings every followed service that changed up to date.
    async fn on_wake(&mut self) -> Result<(), End> {
        for service in self.waker.take_dirty() {
            let Some(&sub) = self.subs.get(&*service) else {
                continue;
            };
            match sub {
                Sub::At(v) => self.catch_up(&service, Some(v), false).await?,
                Sub::NotFound => self.catch_up(&service, None, false).await?,
                Sub::Resend => {
                    let now = tokio::time::Instant::now();
                    let cooling = self
                        .nacked
                        .get(&*service)
                        .is_some_and(|&last| now < last + NACK_COOLDOWN);
                    // A change during the cool-down waits for the timer, which wakes us.
                    if !cooling {
                        self.nacked.insert(service.to_string(), now);
                        self.catch_up(&service, None, true).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn subscribe(&mut self, sub: proto::Subscribe) -> Result<(), End> {
        for s in sub.services {
            let service = model::resolve_service(&s.service)
                .map_err(|e| End::Status(Status::invalid_argument(e.to_string())))?
                .to_owned();
            let new = !self.subs.contains_key(&service);
            if new && self.subs.len() >= MAX_SUBSCRIPTIONS {
                return Err(End::Status(Status::resource_exhausted(format!(
                    "Subscribe.services: a session may follow at most {MAX_SUBSCRIPTIONS} services"
                ))));
            }
            if new && self.sub_bytes + service.len() > MAX_SUBSCRIPTION_BYTES {
                return Err(End::Status(Status::resource_exhausted(format!(
                    "Subscribe.services: a session may follow at most {MAX_SUBSCRIPTION_BYTES} bytes of service names"
                ))));
            }
            let known = match self.subs.get(&service) {
                // Already followed: once the client has read what this session sent (messages
                // are ordered), it holds what the session last sent, whatever this Subscribe
                // (written before it read them) says. A delta goes only on that base.
                Some(&Sub::At(v)) => Some(v),
                Some(Sub::NotFound | Sub::Resend) => None,
                // A version of another history means nothing here.
                None => s
                    .known
                    .filter(|k| k.epoch == self.epoch && k.version != 0)
                    .map(|k| k.version),
            };
            if new {
                self.shared.cache.follow_service(&service, &self.waker);
                // Recorded at once, so the follow is undone however the session ends.
                self.sub_bytes += service.len();
                self.subs.insert(service.clone(), Sub::NotFound);
            }
            self.catch_up(&service, known, true).await?;
        }
        Ok(())
    }

    async fn on_client(&mut self, msg: ClientMessage) -> Result<(), End> {
        match msg.kind {
            Some(client_message::Kind::Subscribe(sub)) => self.subscribe(sub).await,
            Some(client_message::Kind::Ack(ack)) => {
                tracing::trace!(session = self.id, service = %model::printable(&ack.service, LOG_QUOTE), nonce = %model::printable(&ack.nonce, LOG_QUOTE), "ack");
                Ok(())
            }
            Some(client_message::Kind::Nack(nack)) => {
                let service = model::resolve_service(&nack.service)
                    .unwrap_or_default()
                    .to_owned();
                if let Some(suppressed) = self.log.check() {
                    tracing::warn!(
                        session = self.id,
                        service = %model::printable(&service, LOG_QUOTE),
                        nonce = %model::printable(&nack.nonce, LOG_QUOTE),
                        detail = %model::printable(&nack.error_detail, LOG_QUOTE),
                        suppressed,
                        "nack; sending a full snapshot"
                    );
                }
                if !self.subs.contains_key(&service) {
                    return Ok(());
                }
                let now = tokio::time::Instant::now();
                match self.nacked.get(&service) {
                    Some(&last) if now < last + NACK_COOLDOWN => {
                        // Owed a full snapshot when the cool-down ends; one timer per service.
                        if self.subs.insert(service.clone(), Sub::Resend) != Some(Sub::Resend) {
                            let waker = self.waker.clone();
                            let name: Arc<str> = service.as_str().into();
                            let shutdown = self.shared.shutdown.clone();
                            self.shared.shutdown.spawn(async move {
                                tokio::select! {
                                    () = tokio::time::sleep_until(last + NACK_COOLDOWN) => waker.wake(&name),
                                    () = shutdown.stopped() => {}
                                }
                            });
                        }
                    }
                    _ => {
                        self.nacked.insert(service.clone(), now);
                        self.catch_up(&service, None, true).await?;
                    }
                }
                Ok(())
            }
            Some(client_message::Kind::Unsubscribe(u)) => {
                if let Ok(service) = model::resolve_service(&u.service) {
                    if self.subs.remove(service).is_some() {
                        self.sub_bytes -= service.len();
                        self.shared.cache.unfollow_service(service, &self.waker);
                    }
                    self.nacked.remove(service);
                    self.global.forget(service);
                    // Metrics only for a service the session reported on: a series per name
                    // a client merely unsubscribed from would grow without bound.
                    if self.shared.circuits.remove_service(self.id, service) {
                        self.shared
                            .metrics
                            .circuits
                            .update(service, &self.shared.circuits);
                    }
                    if let Some(totals) = self.shared.loads.remove_service(self.id, service) {
                        self.shared.pickers.set_baselines(service, &totals);
                        self.shared.metrics.in_flight(service, &totals);
                    }
                }
                Ok(())
            }
            Some(client_message::Kind::LoadReport(mut report)) => {
                let Ok(service) = model::resolve_service(&report.service) else {
                    return Ok(());
                };
                // Only reports on followed services, about backends that exist, are kept: what a
                // client sends must not grow the server's state beyond the routing state itself.
                if !self.subs.contains_key(service) {
                    tracing::debug!(
                        session = self.id,
                        service,
                        "load report for a service not followed; ignored"
                    );
                    return Ok(());
                }
                if let Some(snap) = self.shared.cache.get(service) {
                    report
                        .backends
                        .retain(|b| snap.servers.contains_key(b.server_id.as_str()));
                    self.shared.reports.submit(service, &report.backends);
                    if self
                        .shared
                        .circuits
                        .report(self.id, service, &report.backends)
                    {
                        self.shared
                            .metrics
                            .circuits
                            .update(service, &self.shared.circuits);
                    }
                    let totals = self.shared.loads.report(self.id, service, &report.backends);
                    self.shared.pickers.set_baselines(service, &totals);
                    self.shared.metrics.in_flight(service, &totals);
                }
                Ok(())
            }
            None => {
                tracing::debug!(session = self.id, "empty client message ignored");
                Ok(())
            }
        }
    }

    fn message(kind: server_message::Kind) -> Outbound {
        Outbound::Message(ServerMessage { kind: Some(kind) })
    }

    fn version(&self, version: u64) -> proto::Version {
        proto::Version {
            epoch: self.epoch,
            version,
        }
    }

    /// The cache's answer for a client holding `known`, never older than `known`: when the
    /// cache is behind the client ([`Catchup::Ahead`]: the client saw a newer state on another
    /// replica), waits up to [`AHEAD_WAIT`] for the cache to reach it, else ends the session
    /// with `UNAVAILABLE` so the client tries another replica.
    async fn catch_up_not_older(
        &mut self,
        service: &str,
        known: Option<u64>,
    ) -> Result<Catchup, End> {
        let cache = self.shared.cache.clone();
        let (known, current) = match cache.catch_up(service, known) {
            Catchup::Ahead { known, current } => (known, current),
            other => return Ok(other),
        };
        tracing::debug!(
            session = self.id,
            service,
            known,
            current,
            "client holds a newer version than this replica; waiting for the cache"
        );
        if cache.wait_for_revision(known, AHEAD_WAIT).await {
            match cache.catch_up(service, Some(known)) {
                Catchup::Ahead { current, .. } => Err(self.behind(service, known, current)),
                other => Ok(other),
            }
        } else {
            let current = cache.get(service).map_or(0, |s| s.version.version);
            Err(self.behind(service, known, current))
        }
    }

    /// The end of a session whose client holds a newer version than this replica can serve.
    fn behind(&mut self, service: &str, known: u64, current: u64) -> End {
        if let Some(suppressed) = self.log.check() {
            tracing::warn!(
                session = self.id,
                service = %model::printable(service, LOG_QUOTE),
                known,
                current,
                suppressed,
                "client holds a newer version than this replica reached; refusing (UNAVAILABLE)"
            );
        }
        End::Status(Status::unavailable(format!(
            "this replica is behind: service {} is at version {current} here, the client holds {known}; try another replica",
            model::printable(service, LOG_QUOTE)
        )))
    }

    /// Sends whatever brings a client holding `known` up to date, and records it. `answer`:
    /// the client asked (Subscribe, Nack), so it gets a reply even when nothing changed.
    async fn catch_up(
        &mut self,
        service: &str,
        known: Option<u64>,
        answer: bool,
    ) -> Result<(), End> {
        let catchup = self.catch_up_not_older(service, known).await?;
        let epoch = self.epoch;
        // Updates carry a nonce derived from what they contain, so their encoding can be
        // shared by every session; `Current` and `NotFound` answers are per session.
        let encoded = |update: proto::ServiceUpdate| {
            Outbound::encode_shared(&ServerMessage {
                kind: Some(server_message::Kind::Update(update)),
            })
        };
        let mut at = None;
        let (out, sub) = match catchup {
            Catchup::Full {
                snapshot,
                encoded: memo,
            } => {
                let bytes = memo
                    .get_or_init(|| {
                        encoded(proto::ServiceUpdate {
                            service: service.to_owned(),
                            version: Some(snapshot.version),
                            base: None,
                            nonce: format!("{epoch:x}-f{}", snapshot.version.version),
                            full: true,
                            panic: Some(dlb::health_policy::panic_state(
                                &snapshot.policy,
                                snapshot.servers.values().map(|s| &**s),
                            )),
                            policy: Some(snapshot.policy.clone()),
                            upserts: snapshot.server_list(),
                            removals: Vec::new(),
                            removal_reasons: Default::default(),
                        })
                    })
                    .clone();
                (Outbound::Encoded(bytes), Sub::At(snapshot.version.version))
            }
            Catchup::Delta {
                base,
                version,
                changes,
                at: when,
                encoded: memo,
            } => {
                at = Some(when);
                let build = || {
                    // The panic state at `version`, when the cache's snapshot is still at it (the
                    // common case; otherwise the next delta carries it).
                    let panic = self
                        .shared
                        .cache
                        .get(service)
                        .filter(|s| s.version.version == version)
                        .map(|s| {
                            dlb::health_policy::panic_state(
                                &s.policy,
                                s.servers.values().map(|s| &**s),
                            )
                        });
                    let d = Delta::coalesce(base, changes.iter().map(|c| &**c));
                    encoded(proto::ServiceUpdate {
                        service: service.to_owned(),
                        version: Some(self.version(d.version)),
                        base: Some(self.version(d.base)),
                        nonce: format!("{epoch:x}-d{base}-{version}"),
                        full: false,
                        policy: d.policy,
                        upserts: d.upserts,
                        removals: d.removals,
                        removal_reasons: d.removal_reasons.into_iter().collect(),
                        panic,
                    })
                };
                let bytes = match memo {
                    Some(m) => m.get_or_init(build).clone(),
                    None => build(),
                };
                if bytes.len() > model::MAX_SNAPSHOT_BYTES {
                    // A coalesced delta (upserts plus removals) can outgrow the snapshot,
                    // which always fits: send that instead.
                    return Box::pin(self.catch_up(service, None, answer)).await;
                }
                (Outbound::Encoded(bytes), Sub::At(version))
            }
            // Not returned by `catch_up_not_older`; refused the same way if it were.
            Catchup::Ahead { known, current } => return Err(self.behind(service, known, current)),
            Catchup::Current => {
                let Some(v) = known.filter(|_| answer) else {
                    return Ok(());
                };
                // An empty delta confirms the client's version.
                (
                    Self::message(server_message::Kind::Update(proto::ServiceUpdate {
                        service: service.to_owned(),
                        version: Some(self.version(v)),
                        base: Some(self.version(v)),
                        nonce: self.next_nonce(),
                        full: false,
                        policy: None,
                        upserts: Vec::new(),
                        removals: Vec::new(),
                        removal_reasons: Default::default(),
                        panic: None,
                    })),
                    Sub::At(v),
                )
            }
            Catchup::NotFound => {
                if !answer && self.subs.get(service) == Some(&Sub::NotFound) {
                    return Ok(());
                }
                (
                    Self::message(server_message::Kind::NotFound(proto::ServiceNotFound {
                        service: service.to_owned(),
                        version: Some(proto::Version {
                            epoch: self.epoch,
                            version: 0,
                        }),
                        nonce: self.next_nonce(),
                    })),
                    Sub::NotFound,
                )
            }
        };
        self.send(out).await?;
        if let Some(at) = at {
            self.shared.metrics.push_latency(at.elapsed().as_secs_f64());
        }
        self.subs.insert(service.to_owned(), sub);
        Ok(())
    }
}
