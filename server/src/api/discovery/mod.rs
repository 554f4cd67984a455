//! The `dlb.v1.Discovery` gRPC service: one bidirectional session per SDK, a thin front-end over
//! the [snapshot cache](crate::cache).
//!
//! Each `Session` call spawns one task that owns all of the session's state (which services it
//! follows and the version each was last brought to) — no locks. The task `select!`s over
//! three inputs: the client's messages, its cache [`Waker`] (woken only when a service *it
//! follows* changes), and the shutdown signal.
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
//! * **Ack** is recorded per service (clamped to the version sent) in the [`acks::AckBook`]
//!   the drain barrier reads ([`crate::api::barrier`]); **Nack** is answered with a full snapshot; **Unsubscribe** stops
//!   updates; **LoadReport** replaces this session's in-flight counts for the service (see
//!   [`crate::reports::loads`]); they are removed when the session ends.
//! * **GlobalLoad**: the other sessions' in-flight counts and the service's zone demand, pushed
//!   at most every 100 ms and only when they moved ([`crate::reports::global_load`]); load-report
//!   outcomes go to the outlier task ([`crate::health::passive`]) and, for a session with a zone,
//!   to the zone demand ([`crate::reports::demand`]).
//! * **Locality**: the first Subscribe's `locality` is validated (`INVALID_ARGUMENT` naming
//!   `locality.zone` etc.) and gives the session's zone for the demand; later ones are ignored.
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
//!   entries of the names it follows, its ack record per followed service for the drain
//!   barrier) plus its outbound queue; all of it goes when it ends or unsubscribes.
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

pub mod acks;
mod catch_up;
mod messages;
mod session;

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
            acks: self
                .shared
                .acks
                .register(id, peer.map(|p| p.to_string()).unwrap_or_default()),
            shared: self.shared.clone(),
            tx,
            subs: HashMap::new(),
            sub_bytes: 0,
            nonce: 0,
            epoch: self.shared.cache.epoch(),
            waker: self.shared.cache.waker(),
            nacked: HashMap::new(),
            log: crate::log_limit::LogLimiter::default(),
            global: crate::reports::global_load::GlobalPush::new(
                &self.shared.loads,
                &self.shared.demand,
            ),
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
        self.shared.demand.remove_session(self.id);
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
    /// What the client acknowledged, per service, for the drain barrier ([`acks`]).
    acks: acks::AckEntry,
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
