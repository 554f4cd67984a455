//! The session task: one per [`crate::Client`], multiplexing every subscribed service over one
//! `Discovery.Session` stream.
//!
//! The task owns all mutable routing state ([`entry::Entry`] per service: the backend records,
//! the policy, the held version) and is the only writer of each service's published snapshot.
//! Loop:
//!
//! 1. connect to the next endpoint of the rotation ([`targets`]) and send `Subscribe` with
//!    every service and the `(epoch, version)` it holds, so the server can answer with a delta
//!    instead of a snapshot;
//! 2. apply updates (full snapshot: replace; delta: check `base` == held version, else Nack so
//!    the server resends a full snapshot) in batches: when a message arrives, every further one
//!    already readable (up to [`serve::MAX_BATCH`]) is applied with it to the records, and then each
//!    service that changed gets one picker, built off the request path with `Picker::rebuild`
//!    for its newest state and swapped in — a burst of N updates costs one build, not N (counted
//!    in `ServiceStats::rebuilds`); then Ack — acks are coalesced for up to `ack_delay` (100 ms
//!    by default) and name the latest version applied, so a burst of updates costs one Ack; a
//!    Nack is sent at once and supersedes a deferred Ack; send a `LoadReport` per service every
//!    interval (timers are tokio's, so all of this runs on paused time in tests);
//! 3. when the stream ends, fails, the server says `GoingAway`, or nothing at all (not even a
//!    `Heartbeat`) arrives within the update deadline (15 s by default), mark the client disconnected
//!    (handles keep routing on their last snapshot), rotate to the next endpoint and reconnect
//!    after an exponential backoff with full jitter (after `GoingAway`: to an endpoint drawn at
//!    random among the others, after a jittered pause of at most the minimum backoff, so a fleet
//!    does not reconnect in lock-step nor pile onto one replica).
//!
//! Endpoints and names ([`targets`]): the rotation goes over the endpoints in the order given;
//! a `dns:///host:port` endpoint stands for every address of the name (shuffled once per
//! answer), each its own connection. Names are resolved again whenever the rotation has tried
//! every entry once, after an established session ended and after `GoingAway`; a failed lookup
//! keeps the previous answer. When nothing is left to try (no static endpoint and no name with
//! an address yet), the task backs off as after a failed connection and tries again.
//!
//! Never back in time: an update of the epoch held but *older* than the version routed on (a
//! control plane replica behind the one this client came from) is refused — not applied, not
//! nacked — counted (`ServiceStats::regressions_refused`, `dlb_sdk_regressions_refused_total`)
//! and the session leaves for another endpoint (as after `GoingAway`, but with the growing
//! backoff of a failure, so a replica that keeps doing it is not retried in a tight loop). (`dlbd` itself refuses such
//! a client with `UNAVAILABLE` rather than send it an older state; this is the SDK's own guard.)
//!
//! Protection against a control plane that lost its state (restart flooding): a full snapshot
//! from a *different* epoch than the state held — a restarted control plane — that would keep
//! fewer than half of the eligible backends the handle routes to, or a `ServiceNotFound` from a
//! different epoch, is recorded (so later deltas apply and are acked) but not published: the
//! handle keeps routing on its previous snapshot, marked stale (`ServiceHandle::is_stale`,
//! counted in `ServiceStats::held_back`, logged). While it is stale every update is judged the
//! same way, so routing follows the new control plane as soon as its state covers at least half
//! of the backends routed to (backends re-registering), or after `entry::HOLD_GRACE` (30 s,
//! checked on every load-report tick), whichever comes first. Without this, the first backend to
//! re-register with a restarted in-memory control plane took 100 % of every SDK's traffic.
//! Changes within the same epoch — removals included — are deliberate and always applied.

// Wire messages are built with `..Default::default()` even when every field is named today: the
// API grows by adding fields, and this code must keep compiling when one is added.
#![allow(clippy::needless_update)]

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dlb::backoff::{Backoff, Jitter};
use dlb::locality::ZoneKey;
use dlb::proto;
use dlb::proto::client_message::Kind as ClientKind;
use dlb::proto::discovery_client::DiscoveryClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::state::ServiceState;

mod demand;
mod entry;
mod persist;
mod serve;
pub(crate) mod targets;

pub(crate) use entry::apply_detached;
use entry::Entry;
use persist::Saver;
pub(crate) use persist::{restore, Restored};
use serve::serve;
use targets::Targets;

/// Requests from [`crate::Client`] to its session task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Follow one more service.
    Subscribe(Arc<ServiceState>),
}

/// Settings of the session loop.
#[derive(Debug, Clone)]
pub(crate) struct SessionConfig {
    pub(crate) client_id: String,
    pub(crate) report_interval: Duration,
    /// How long an Ack may wait to be coalesced with later ones (zero: ack at once).
    pub(crate) ack_delay: Duration,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) connect_timeout: Duration,
    /// An established session that receives nothing (not even a `Heartbeat`) for this long is
    /// declared dead and the client fails over to the next endpoint.
    pub(crate) update_deadline: Duration,
    /// Bearer token for the session.
    pub(crate) token: crate::channel::TokenInterceptor,
    /// Where this client runs (sent in the first `Subscribe`; `None`: no zone).
    pub(crate) locality: Option<proto::Locality>,
}

/// Connection state shared with the client.
#[derive(Debug)]
pub(crate) struct Link {
    /// Whether a session is established; a watch so `Client::connect` can wait for it.
    pub(crate) connected: watch::Sender<bool>,
    /// Sessions established so far.
    pub(crate) sessions: std::sync::atomic::AtomicU64,
    /// The endpoint in use (or tried last): as configured for a static endpoint, the resolved
    /// `http(s)://ip:port` for a name. A mutex held only to swap or clone the `Arc`.
    pub(crate) endpoint: parking_lot::Mutex<Arc<str>>,
    /// Sessions abandoned because nothing arrived within the update deadline.
    pub(crate) deadline_expiries: std::sync::atomic::AtomicU64,
}

impl Link {
    /// A disconnected link whose endpoint reads `first` until one is tried.
    pub(crate) fn new(first: &str) -> Self {
        Self {
            connected: watch::Sender::new(false),
            sessions: Default::default(),
            endpoint: parking_lot::Mutex::new(first.into()),
            deadline_expiries: Default::default(),
        }
    }
}

/// The routing state the session task owns across sessions: every followed service, and the
/// snapshot file's writer when there is one.
struct Routing {
    entries: HashMap<String, Entry>,
    saver: Option<Saver>,
}

/// How one session ended.
enum Ended {
    /// The client was closed: stop.
    Closed,
    /// The server asked us to go away: reconnect now, elsewhere.
    GoingAway,
    /// The server sent an update older than the version routed on (same epoch): reconnect
    /// elsewhere, after the growing backoff of a failure (a replica that keeps doing it is not
    /// retried in a tight loop).
    Behind,
    /// Connecting or the stream failed. `established` says whether a session was up (then the
    /// backoff restarts from its minimum).
    Failed { established: bool },
}

/// The session task. Runs until the client is closed (its command channel closes or `closed`
/// flips to true).
pub(crate) async fn run(
    config: SessionConfig,
    mut targets: Targets,
    link: Arc<Link>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut closed: watch::Receiver<bool>,
    restored: Restored,
    snapshot_file: Option<std::path::PathBuf>,
) {
    let zone = ZoneKey::of(config.locality.as_ref());
    let mut routing = Routing {
        saver: snapshot_file.map(|path| Saver::new(path, &restored.saved)),
        entries: restored
            .entries
            .into_iter()
            .map(|e| (e.state.name.clone(), e))
            .collect(),
    };
    // Full jitter: uniform in `[0, min(max, min × 2^failures)]`.
    let mut backoff =
        Backoff::new(config.backoff_min, config.backoff_max).with_jitter(Jitter::Full);
    'sessions: loop {
        let next = tokio::select! {
            next = targets.next() => next,
            _ = closed.wait_for(|c| *c) => break 'sessions,
        };
        let ended = match next {
            Some((endpoint, channel)) => {
                *link.endpoint.lock() = endpoint.clone();
                tokio::select! {
                    e = session_once(&config, &endpoint, channel, &link, &mut routing, &mut commands) => e,
                    _ = closed.wait_for(|c| *c) => Ended::Closed,
                }
            }
            None => {
                tracing::debug!("no control-plane address to try yet; backing off");
                Ended::Failed { established: false }
            }
        };
        link.connected.send_replace(false);
        let delay = match ended {
            Ended::Closed => break 'sessions,
            Ended::GoingAway => {
                backoff.reset();
                targets.go_elsewhere();
                // A pause drawn in `[0, backoff_min]` (full jitter on the schedule's first step),
                // so a fleet told to go away does not come back in one burst; the schedule
                // itself stays at its start.
                let pause = backoff.next_delay();
                backoff.reset();
                pause
            }
            Ended::Behind => {
                targets.go_elsewhere();
                backoff.next_delay()
            }
            Ended::Failed { established } => {
                if established {
                    backoff.reset();
                    targets.restart();
                }
                backoff.next_delay()
            }
        };
        // Sleep, but keep accepting subscriptions and notice a close.
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = closed.wait_for(|c| *c) => break 'sessions,
                cmd = commands.recv() => match cmd {
                    None => break 'sessions,
                    Some(Command::Subscribe(state)) => {
                        routing.entries.entry(state.name.clone()).or_insert_with(|| Entry::new(state, zone.clone()));
                    }
                },
            }
        }
    }
    // Closing: the newest state goes to the snapshot file before the task ends.
    if let Some(saver) = routing.saver.as_mut() {
        saver.note(&routing.entries);
        saver.flush().await;
    }
}

async fn session_once(
    config: &SessionConfig,
    endpoint: &str,
    channel: Channel,
    link: &Link,
    routing: &mut Routing,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Ended {
    let entries = &mut routing.entries;
    // Take in subscriptions that arrived meanwhile, so the first Subscribe names them.
    while let Ok(Command::Subscribe(state)) = commands.try_recv() {
        entries
            .entry(state.name.clone())
            .or_insert_with(|| Entry::new(state, ZoneKey::of(config.locality.as_ref())));
    }
    let (tx, rx) = mpsc::channel::<proto::ClientMessage>(1024);
    let subscribe = proto::Subscribe {
        client_id: config.client_id.clone(),
        services: entries.values().map(Entry::subscription).collect(),
        locality: config.locality.clone(),
    };
    if tx
        .send(client_msg(ClientKind::Subscribe(subscribe)))
        .await
        .is_err()
    {
        return Ended::Failed { established: false };
    }
    // dlbd's explicit message limit: the largest service it accepts fits in one update.
    let mut client = DiscoveryClient::with_interceptor(channel, config.token.clone())
        .max_decoding_message_size(dlb::model::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(dlb::model::MAX_MESSAGE_BYTES);
    let response = match tokio::time::timeout(
        config.connect_timeout,
        client.session(ReceiverStream::new(rx)),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(status)) => {
            tracing::debug!(%endpoint, %status, "session failed to start");
            return Ended::Failed { established: false };
        }
        Err(_) => {
            tracing::debug!(%endpoint, "session start timed out");
            return Ended::Failed { established: false };
        }
    };
    let inbound = response.into_inner();
    link.sessions.fetch_add(1, Ordering::Relaxed);
    link.connected.send_replace(true);
    tracing::debug!(%endpoint, services = entries.len(), "session established");
    serve(config, endpoint, inbound, &tx, routing, commands, link).await
}

fn client_msg(kind: ClientKind) -> proto::ClientMessage {
    proto::ClientMessage {
        kind: Some(kind),
        ..Default::default()
    }
}
