//! The loop of one established session ([`serve`]): applies what the server sends in batches
//! ([`apply_batch`]: one picker build per service per batch), acks (coalesced) and nacks
//! (paced), forwards new subscriptions and sends the periodic load reports. The connection,
//! the rotation over endpoints and the backoff between sessions are the parent module's.

// Wire messages are built with `..Default::default()` even when every field is named today: the
// API grows by adding fields, and this code must keep compiling when one is added.
#![allow(clippy::needless_update)]

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dlb::locality::ZoneKey;
use dlb::proto;
use dlb::proto::client_message::Kind as ClientKind;
use dlb::proto::server_message::Kind as ServerKind;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::entry::Entry;
use super::persist::Saver;
use super::{client_msg, Command, Ended, Link, Routing, SessionConfig};

/// At most one Nack per service per this period (see `serve`).
const NACK_EVERY: Duration = Duration::from_secs(1);

/// Most messages applied together (one picker build per service for all of them).
pub(super) const MAX_BATCH: usize = 256;

/// The loop of an established session: applies what the server sends, acks it, forwards new
/// subscriptions, sends load reports. Generic over the inbound stream so tests can drive it
/// without a network.
///
/// Each time a message arrives, every further message that is already readable (up to
/// [`MAX_BATCH`]) is taken too, and the whole batch applied at once ([`apply_batch`]): each
/// service's picker is built once for the newest state, however many updates it got.
pub(super) async fn serve<S>(
    config: &SessionConfig,
    endpoint: &str,
    mut inbound: S,
    tx: &mpsc::Sender<proto::ClientMessage>,
    routing: &mut Routing,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    link: &Link,
) -> Ended
where
    S: Stream<Item = Result<proto::ServerMessage, tonic::Status>> + Unpin,
{
    let Routing { entries, saver } = routing;
    // A new session starts with no global loads: this control plane pushes the others' counts
    // only once they differ from nothing, so counts pushed by a previous one must not linger.
    for entry in entries.values_mut() {
        entry.global_load(&proto::GlobalLoad::default());
    }
    let mut report = tokio::time::interval(config.report_interval);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    report.tick().await;
    let mut last_report = Instant::now();
    // Acks waiting to be coalesced: the latest per service, sent when `ack_timer` fires.
    let mut pending_acks: HashMap<String, proto::Ack> = HashMap::new();
    let ack_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(ack_timer);
    // The session counts as established (the reconnect backoff resets) only once it has applied
    // an update: response headers alone prove nothing, and a session that fails right after them
    // must not retry every few milliseconds forever.
    let mut established = false;
    // Nack pacing: at most one Nack per service per NACK_EVERY; a later one waits for the next
    // load-report tick past the window (the newest replaces an older one), so a client and a
    // server that disagree about a snapshot cannot loop Nack -> full -> Nack tightly.
    let mut last_nack: HashMap<String, Instant> = HashMap::new();
    let mut deferred_nacks: HashMap<String, proto::Nack> = HashMap::new();
    // Slow start: the earliest picker rebuild a ramp asks for (see `Entry::ramp_tick`).
    let ramp_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(ramp_timer);
    // The update deadline: reset by every message from the server (the server sends a
    // `Heartbeat` when it has nothing else to say), so it expires only when the control plane
    // is dead or stuck although the connection (and its HTTP/2 keepalive) may look fine.
    let deadline = tokio::time::sleep(config.update_deadline);
    tokio::pin!(deadline);
    // A snapshot-file write held back by its period (see `persist`).
    let save_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(save_timer);

    loop {
        let next_ramp = entries.values().filter_map(|e| e.ramp_at).min();
        if let Some(at) = next_ramp {
            if ramp_timer.deadline() != at {
                ramp_timer.as_mut().reset(at);
            }
        }
        let save_due = saver.as_ref().and_then(Saver::due);
        if let Some(at) = save_due {
            if save_timer.deadline() != at {
                save_timer.as_mut().reset(at);
            }
        }
        tokio::select! {
            () = &mut save_timer, if save_due.is_some() => {
                if let Some(saver) = saver.as_mut() {
                    saver.maybe_write();
                }
            }
            () = &mut ramp_timer, if next_ramp.is_some() => {
                let now = Instant::now();
                for entry in entries.values_mut() {
                    entry.ramp_tick(now);
                }
            }
            () = &mut ack_timer, if !pending_acks.is_empty() => {
                for (_, ack) in pending_acks.drain() {
                    if tx.send(client_msg(ClientKind::Ack(ack))).await.is_err() {
                        return Ended::Failed { established };
                    }
                }
            }
            () = &mut deadline => {
                link.deadline_expiries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%endpoint, deadline = ?config.update_deadline,
                    "nothing from the control plane within the update deadline; failing over");
                return Ended::Failed { established };
            }
            msg = inbound.next() => {
                deadline.as_mut().reset(Instant::now() + config.update_deadline);
                let mut ended = None;
                let mut batch = Vec::new();
                match msg {
                    Some(Ok(m)) => batch.push(m),
                    Some(Err(status)) => {
                        tracing::debug!(%endpoint, %status, "session failed");
                        return Ended::Failed { established };
                    }
                    None => {
                        tracing::debug!(%endpoint, "session ended by the server");
                        return Ended::Failed { established };
                    }
                }
                // Take whatever else is readable now, without waiting.
                while batch.len() < MAX_BATCH {
                    match inbound.next().now_or_never() {
                        None => break,
                        Some(Some(Ok(m))) => batch.push(m),
                        Some(Some(Err(status))) => {
                            tracing::debug!(%endpoint, %status, "session failed");
                            // `established` is decided after the batch is applied.
                            ended = Some(Ended::Failed { established: false });
                            break;
                        }
                        Some(None) => {
                            tracing::debug!(%endpoint, "session ended by the server");
                            ended = Some(Ended::Failed { established: false });
                            break;
                        }
                    }
                }
                let applied = apply_batch(entries, batch, &mut pending_acks);
                established |= !applied.acks.is_empty();
                if let Some(saver) = saver.as_mut() {
                    if !applied.acks.is_empty() {
                        saver.note(entries);
                    }
                    saver.maybe_write();
                }
                if let Some(reason) = &applied.going_away {
                    tracing::info!(%endpoint, %reason, "control plane going away");
                    ended = Some(Ended::GoingAway);
                }
                if applied.regressed {
                    // Leave for another endpoint, with the backoff of a failure.
                    ended = Some(Ended::Behind);
                }
                // A service that applied an update again owes no deferred Nack.
                for svc in applied.acks.keys() {
                    deferred_nacks.remove(svc);
                }
                // Nacks at once (each supersedes its service's deferred Ack), then the Acks.
                for nack in applied.nacks {
                    let now = Instant::now();
                    if last_nack
                        .get(&nack.service)
                        .is_some_and(|t| now < *t + NACK_EVERY)
                    {
                        deferred_nacks.insert(nack.service.clone(), nack);
                        continue;
                    }
                    last_nack.insert(nack.service.clone(), now);
                    if tx.send(client_msg(ClientKind::Nack(nack))).await.is_err() {
                        return Ended::Failed { established };
                    }
                }
                for (service, ack) in applied.acks {
                    if config.ack_delay.is_zero() {
                        if tx.send(client_msg(ClientKind::Ack(ack))).await.is_err() {
                            return Ended::Failed { established };
                        }
                    } else {
                        if pending_acks.is_empty() {
                            ack_timer.as_mut().reset(Instant::now() + config.ack_delay);
                        }
                        pending_acks.insert(service, ack);
                    }
                }
                if let Some(ended) = ended {
                    return match ended {
                        Ended::Failed { .. } => Ended::Failed { established },
                        other => other,
                    };
                }
            }
            cmd = commands.recv() => match cmd {
                None => return Ended::Closed,
                Some(Command::Subscribe(state)) => {
                    let name = state.name.clone();
                    let entry = entries
                        .entry(name)
                        .or_insert_with(|| Entry::new(state, ZoneKey::of(config.locality.as_ref())));
                    let sub = proto::Subscribe {
                        client_id: config.client_id.clone(),
                        services: vec![entry.subscription()],
                        ..Default::default()
                    };
                    if tx.send(client_msg(ClientKind::Subscribe(sub))).await.is_err() {
                        return Ended::Failed { established };
                    }
                }
            },
            _ = report.tick() => {
                let now = Instant::now();
                let interval = now - last_report;
                last_report = now;
                let due: Vec<String> = deferred_nacks
                    .keys()
                    .filter(|svc| last_nack.get(*svc).is_none_or(|t| now >= *t + NACK_EVERY))
                    .cloned()
                    .collect();
                for svc in due {
                    if let Some(nack) = deferred_nacks.remove(&svc) {
                        last_nack.insert(svc, now);
                        if tx.send(client_msg(ClientKind::Nack(nack))).await.is_err() {
                            return Ended::Failed { established };
                        }
                    }
                }
                if let Some(saver) = saver.as_mut() {
                    // A write held back by its period goes out now; a released hold is noted.
                    saver.note(entries);
                    saver.maybe_write();
                }
                for entry in entries.values_mut() {
                    // A hold of the restart-flooding rule ends after its grace period.
                    entry.release_expired_hold();
                    if let Some(r) = entry.load_report(interval) {
                        if tx.send(client_msg(ClientKind::LoadReport(r))).await.is_err() {
                            return Ended::Failed { established };
                        }
                    }
                }
            }
        }
    }
}

/// What applying a batch of server messages calls for.
#[derive(Debug, Default)]
struct Applied {
    /// The latest Ack per service (to send now or defer).
    acks: HashMap<String, proto::Ack>,
    /// Nacks, in order, to send at once.
    nacks: Vec<proto::Nack>,
    /// The server said `GoingAway` (with this reason); messages after it were not applied.
    going_away: Option<String>,
    /// The server sent an update older than the version routed on (same epoch): it was
    /// refused, the messages after it were not applied, and the session leaves for another
    /// endpoint.
    regressed: bool,
}

/// Applies a batch of messages in order: updates are staged (validated and recorded; a Nack
/// for those that cannot apply), `ServiceNotFound` and held-back updates take effect at once,
/// and then each service that changed gets one picker built for its newest state and
/// published. A Nack removes the service's Ack, both from this batch and from
/// `pending_acks` (deferred from earlier batches).
fn apply_batch(
    entries: &mut HashMap<String, Entry>,
    batch: Vec<proto::ServerMessage>,
    pending_acks: &mut HashMap<String, proto::Ack>,
) -> Applied {
    let mut out = Applied::default();
    let mut dirty: Vec<String> = Vec::new();
    for msg in batch {
        match msg.kind {
            Some(ServerKind::Update(upd)) => {
                let Some(entry) = entries.get_mut(&upd.service) else {
                    tracing::debug!(service = %upd.service, "update for a service not subscribed");
                    continue;
                };
                if let Some((held, offered)) = entry.regression(&upd) {
                    // Never back in time: this control plane is behind the state routed on.
                    entry
                        .state
                        .stats
                        .regressions_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(service = %upd.service, %held, %offered,
                        "control plane sent an older version than the one routed on; refusing it and moving to another endpoint");
                    out.regressed = true;
                    break;
                }
                match entry.stage(&upd) {
                    Ok(()) => {
                        if entry.dirty && !dirty.contains(&upd.service) {
                            dirty.push(upd.service.clone());
                        }
                        out.acks.insert(
                            upd.service.clone(),
                            proto::Ack {
                                service: upd.service.clone(),
                                version: upd.version,
                                nonce: upd.nonce.clone(),
                                ..Default::default()
                            },
                        );
                    }
                    Err(detail) => {
                        tracing::info!(service = %upd.service, %detail, "nacking update");
                        out.nacks
                            .push(nack(entry, &upd.service, upd.nonce.clone(), detail));
                        out.acks.remove(&upd.service);
                        pending_acks.remove(&upd.service);
                    }
                }
            }
            Some(ServerKind::NotFound(nf)) => {
                if let Some(entry) = entries.get_mut(&nf.service) {
                    entry.not_found(&nf);
                }
            }
            Some(ServerKind::GoingAway(g)) => {
                out.going_away = Some(g.reason);
                break;
            }
            Some(ServerKind::GlobalLoad(g)) => {
                if let Some(entry) = entries.get_mut(&g.service) {
                    entry.global_load(&g);
                }
            }
            // Proof of life only: receiving it already reset the update deadline.
            Some(ServerKind::Heartbeat(_)) => {}
            None => {}
        }
    }
    for service in dirty {
        let Some(entry) = entries.get_mut(&service) else {
            continue;
        };
        if let Err(detail) = entry.flush() {
            // The staged updates are forgotten: nack the last one so the server resends.
            if let Some(ack) = out.acks.remove(&service) {
                out.nacks.push(nack(entry, &service, ack.nonce, detail));
            }
            pending_acks.remove(&service);
        }
    }
    out
}

/// A Nack of the update with `nonce`, naming the version `entry` holds.
fn nack(entry: &Entry, service: &str, nonce: String, detail: String) -> proto::Nack {
    entry.state.stats.nacks.fetch_add(1, Ordering::Relaxed);
    proto::Nack {
        service: service.to_owned(),
        version: (entry.version.epoch != 0).then(|| entry.version.into()),
        nonce,
        error_detail: detail,
        ..Default::default()
    }
}

/// The session loop driven without a network: scripted server messages in, client messages
/// out, on paused time.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use dlb::model;
    use tokio::task::JoinHandle;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    use super::*;
    use crate::state::ServiceState;

    const ACK_DELAY: Duration = Duration::from_millis(100);

    struct Harness {
        state: Arc<ServiceState>,
        out: mpsc::Receiver<proto::ClientMessage>,
        task: JoinHandle<Ended>,
        _inbound: mpsc::UnboundedSender<Result<proto::ServerMessage, tonic::Status>>,
        _commands: mpsc::UnboundedSender<Command>,
        link: Arc<Link>,
    }

    /// Runs `serve` for one service "s" with `burst` already readable on the stream.
    fn start(burst: Vec<proto::ServiceUpdate>) -> Harness {
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        for upd in burst {
            let msg = proto::ServerMessage {
                kind: Some(ServerKind::Update(upd)),
                ..Default::default()
            };
            in_tx.send(Ok(msg)).unwrap();
        }
        let (tx, out) = mpsc::channel(4096);
        let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel();
        let state = Arc::new(ServiceState::new("s".into()));
        let mut routing = Routing {
            entries: HashMap::from([("s".to_owned(), Entry::new(state.clone(), None))]),
            saver: None,
        };
        let config = SessionConfig {
            locality: None,
            client_id: "test".into(),
            report_interval: Duration::from_secs(1),
            ack_delay: ACK_DELAY,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            update_deadline: UPDATE_DEADLINE,
            token: Default::default(),
        };
        let link = Arc::new(Link::new("test"));
        let task_link = link.clone();
        let task = tokio::spawn(async move {
            let inbound = UnboundedReceiverStream::new(in_rx);
            serve(
                &config,
                "test",
                inbound,
                &tx,
                &mut routing,
                &mut cmd_rx,
                &task_link,
            )
            .await
        });
        Harness {
            state,
            out,
            task,
            _inbound: in_tx,
            _commands: cmd_tx,
            link,
        }
    }

    const UPDATE_DEADLINE: Duration = Duration::from_secs(15);

    fn heartbeat() -> proto::ServerMessage {
        proto::ServerMessage {
            kind: Some(ServerKind::Heartbeat(proto::Heartbeat { revision: 1 })),
            ..Default::default()
        }
    }

    /// A control plane that stops talking (no update, no heartbeat) is abandoned after the
    /// update deadline; heartbeats keep a quiet session alive however long it is quiet.
    #[tokio::test(start_paused = true)]
    async fn the_update_deadline_fails_over_unless_heartbeats_arrive() {
        let h = start(vec![full(1, vec![server("a", 1)])]);
        // Heartbeats every 10 s for a minute: the session stays up.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            h._inbound.send(Ok(heartbeat())).unwrap();
        }
        tokio::task::yield_now().await;
        assert!(
            !h.task.is_finished(),
            "a session with heartbeats was abandoned"
        );
        assert_eq!(h.link.deadline_expiries.load(Ordering::Relaxed), 0);
        // Then silence: it ends at the deadline, as an established session (fast reconnect).
        let silent = Instant::now();
        let ended = h.task.await.unwrap();
        assert!(matches!(ended, Ended::Failed { established: true }));
        let waited = silent.elapsed();
        assert!(
            waited >= UPDATE_DEADLINE - Duration::from_secs(1) && waited <= UPDATE_DEADLINE,
            "ended {waited:?} after the last heartbeat, not at the {UPDATE_DEADLINE:?} deadline"
        );
        assert_eq!(h.link.deadline_expiries.load(Ordering::Relaxed), 1);
        // The routing state is untouched: picks keep working on the last snapshot.
        assert_eq!(published(&h.state).len(), 1);
    }

    fn v(version: u64) -> Option<proto::Version> {
        Some(proto::Version { epoch: 7, version })
    }

    /// A session that fails right after its response headers must not reset the reconnect
    /// backoff (or it retries every few milliseconds forever); one that applied an update does.
    #[tokio::test(start_paused = true)]
    async fn established_means_an_update_was_applied() {
        let h = start(Vec::new());
        h._inbound
            .send(Err(tonic::Status::internal("fails at once")))
            .unwrap();
        assert!(
            matches!(h.task.await.unwrap(), Ended::Failed { established: false }),
            "a session that applied nothing counted as established"
        );
        let h = start(vec![full(1, vec![server("a", 1)])]);
        h._inbound
            .send(Err(tonic::Status::internal("fails later")))
            .unwrap();
        assert!(matches!(
            h.task.await.unwrap(),
            Ended::Failed { established: true }
        ));
    }

    /// A same-epoch update older than the version routed on (a control plane behind the one
    /// the client came from) is refused, counted, and the session leaves for another endpoint;
    /// another epoch's older version is a new history and applies as before.
    #[tokio::test(start_paused = true)]
    async fn an_older_update_of_the_same_epoch_is_refused_and_the_session_leaves() {
        let mut older = full(3, vec![server("old", 1)]);
        older.nonce = "older".into();
        let h = start(vec![
            full(5, vec![server("a", 1), server("b", 1)]),
            older,
            full(9, vec![server("never", 1)]),
        ]);
        assert!(matches!(h.task.await.unwrap(), Ended::Behind));
        let routed = h.state.snapshot.load().version;
        assert_eq!((routed.epoch, routed.version), (7, 5), "went back in time");
        assert_eq!(
            published(&h.state).keys().collect::<Vec<_>>(),
            ["a", "b"],
            "nothing after the refused update was applied"
        );
        let stats = h.state.stats.read();
        assert_eq!(stats.regressions_refused, 1);
        assert_eq!(stats.nacks, 0, "refused, not nacked");

        let mut other_epoch = full(3, vec![server("c", 1)]);
        other_epoch.version = Some(proto::Version {
            epoch: 8,
            version: 3,
        });
        let mut h = start(vec![full(5, vec![server("a", 1)]), other_epoch]);
        match next(&mut h).await {
            ClientKind::Ack(ack) => assert_eq!(ack.version.map(|v| v.epoch), Some(8)),
            other => panic!("expected an Ack, got {other:?}"),
        }
        assert_eq!(h.state.stats.read().regressions_refused, 0);
        assert!(!h.task.is_finished());
    }

    fn server(id: &str, weight: u32) -> proto::Server {
        proto::Server {
            server_id: id.into(),
            address: "127.0.0.1:80".into(),
            weight,
            health: proto::HealthStatus::Healthy as i32,
            ..Default::default()
        }
    }

    fn full(version: u64, servers: Vec<proto::Server>) -> proto::ServiceUpdate {
        proto::ServiceUpdate {
            service: "s".into(),
            version: v(version),
            nonce: format!("n{version}"),
            full: true,
            policy: Some(model::default_policy()),
            upserts: servers,
            ..Default::default()
        }
    }

    fn delta(
        base: u64,
        version: u64,
        upserts: Vec<proto::Server>,
        removals: Vec<String>,
    ) -> proto::ServiceUpdate {
        proto::ServiceUpdate {
            service: "s".into(),
            version: v(version),
            base: v(base),
            nonce: format!("n{version}"),
            upserts,
            removals,
            ..Default::default()
        }
    }

    async fn next(h: &mut Harness) -> ClientKind {
        let msg = tokio::time::timeout(Duration::from_secs(60), h.out.recv())
            .await
            .expect("a client message")
            .expect("the session is running");
        msg.kind.expect("a message kind")
    }

    /// The published backends as `id → weight`.
    fn published(state: &ServiceState) -> BTreeMap<String, u32> {
        let snap = state.snapshot.load();
        let picker = snap.picker.as_ref().expect("a picker");
        picker
            .backends()
            .iter()
            .map(|b| (b.id().to_owned(), b.weight()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_deltas_costs_one_rebuild_and_one_ack() {
        const N: u64 = 200;
        // A full snapshot of 100 backends, then N deltas: each changes one weight, and every
        // tenth also removes one backend and adds another.
        let mut expected: BTreeMap<String, u32> = (0..100).map(|i| (format!("b{i}"), 1)).collect();
        let mut burst = vec![full(
            1,
            expected.iter().map(|(id, w)| server(id, *w)).collect(),
        )];
        for k in 1..=N {
            let id = format!("b{}", k % 100);
            let weight = 2 + (k % 7) as u32;
            let mut upserts = vec![server(&id, weight)];
            let mut removals = Vec::new();
            expected.insert(id, weight);
            if k % 10 == 0 {
                let gone = format!("b{}", k / 10);
                expected.remove(&gone);
                removals.push(gone);
                let new = format!("x{k}");
                expected.insert(new.clone(), 1);
                upserts.push(server(&new, 1));
            }
            burst.push(delta(k, k + 1, upserts, removals));
        }
        let mut h = start(burst);
        let mut versions = h.state.version_tx.subscribe();
        tokio::time::timeout(
            Duration::from_secs(10),
            versions.wait_for(|x| x.version == N + 1),
        )
        .await
        .unwrap()
        .unwrap();
        let applied = Instant::now();

        let stats = h.state.stats.read();
        assert_eq!((stats.full_updates, stats.delta_updates), (1, N));
        assert_eq!(stats.nacks, 0);
        assert!(
            stats.rebuilds <= N / 20,
            "{} rebuilds for a burst of {} updates",
            stats.rebuilds,
            N + 1
        );
        // Newest state wins, exactly.
        assert_eq!(published(&h.state), expected);
        assert_eq!(h.state.snapshot.load().version.version, N + 1);

        // One Ack, naming the latest update, after the coalescing delay (paused time: exact).
        match next(&mut h).await {
            ClientKind::Ack(ack) => {
                assert_eq!(ack.version, v(N + 1));
                assert_eq!(ack.nonce, format!("n{}", N + 1));
            }
            other => panic!("expected an Ack, got {other:?}"),
        }
        assert_eq!(Instant::now() - applied, ACK_DELAY);
        // Nothing else: no more Acks, and no load report (no call was made).
        let more = tokio::time::timeout(Duration::from_secs(5), h.out.recv()).await;
        assert!(more.is_err(), "unexpected message {more:?}");
        h.task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_nack_in_a_burst_names_the_version_held_and_drops_the_deferred_ack() {
        let burst = vec![
            full(1, vec![server("a", 1), server("b", 1)]),
            delta(1, 2, vec![], vec!["a".into()]),
            // Its base is not what the client holds (v2): nacked.
            delta(3, 4, vec![server("c", 1)], vec![]),
            // The server answers a Nack with a full snapshot.
            full(5, vec![server("c", 3), server("d", 1)]),
        ];
        let mut h = start(burst);
        let start = Instant::now();
        match next(&mut h).await {
            ClientKind::Nack(nack) => {
                assert_eq!(nack.nonce, "n4");
                assert_eq!(nack.version, v(2), "the version held when the delta came");
            }
            other => panic!("expected a Nack first, got {other:?}"),
        }
        assert_eq!(Instant::now(), start, "a Nack is not deferred");
        match next(&mut h).await {
            ClientKind::Ack(ack) => assert_eq!(ack.version, v(5)),
            other => panic!("expected an Ack, got {other:?}"),
        }
        assert_eq!(Instant::now() - start, ACK_DELAY);
        let expected = BTreeMap::from([("c".to_owned(), 3), ("d".to_owned(), 1)]);
        assert_eq!(published(&h.state), expected);
        let stats = h.state.stats.read();
        assert_eq!((stats.nacks, stats.rebuilds), (1, 1));
        h.task.abort();
    }

    /// Updates that keep failing are nacked at most once a second per service: the rest wait
    /// (the newest replacing older ones) for the next load-report tick past the window.
    #[tokio::test(start_paused = true)]
    async fn nacks_of_one_service_are_paced() {
        let burst = vec![
            full(1, vec![server("a", 1)]),
            // Three deltas on bases the client does not hold: each would be nacked.
            delta(3, 4, vec![], vec![]),
            delta(5, 6, vec![], vec![]),
            delta(7, 8, vec![], vec![]),
        ];
        let mut h = start(burst);
        let start = Instant::now();
        match next(&mut h).await {
            ClientKind::Nack(nack) => assert_eq!(nack.nonce, "n4"),
            other => panic!("expected a Nack, got {other:?}"),
        }
        assert_eq!(Instant::now(), start);
        // The next message is the deferred (newest) Nack, one report tick after the window.
        loop {
            match next(&mut h).await {
                ClientKind::Nack(nack) => {
                    assert_eq!(nack.nonce, "n8", "the newest Nack replaces older ones");
                    assert!(
                        Instant::now() - start >= NACK_EVERY,
                        "{:?}",
                        Instant::now() - start
                    );
                    break;
                }
                ClientKind::Ack(_) | ClientKind::LoadReport(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(h.state.stats.read().nacks, 3);
        h.task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_update_held_back_inside_a_burst_is_decided_as_if_published_one_by_one() {
        let other_epoch = |version, servers| proto::ServiceUpdate {
            version: Some(proto::Version { epoch: 8, version }),
            ..full(version, servers)
        };
        let burst = vec![
            full(1, vec![server("a", 1)]),
            // Another store incarnation says "empty": held back, routing stays on {a}.
            other_epoch(1, vec![]),
            // That incarnation gets the routed backend back (and another): published.
            proto::ServiceUpdate {
                base: Some(proto::Version {
                    epoch: 8,
                    version: 1,
                }),
                version: Some(proto::Version {
                    epoch: 8,
                    version: 2,
                }),
                ..delta(1, 2, vec![server("a", 1), server("b", 1)], vec![])
            },
        ];
        let h = start(burst);
        let mut versions = h.state.version_tx.subscribe();
        tokio::time::timeout(
            Duration::from_secs(10),
            versions.wait_for(|x| x.epoch == 8 && x.version == 2),
        )
        .await
        .unwrap()
        .unwrap();
        let stats = h.state.stats.read();
        assert_eq!(stats.held_back, 1);
        // {a} was published before the held-back update (as it would have been on its own).
        assert_eq!(stats.rebuilds, 2);
        assert!(!h.state.snapshot.load().stale);
        assert_eq!(
            published(&h.state),
            BTreeMap::from([("a".to_owned(), 1), ("b".to_owned(), 1)])
        );
        h.task.abort();
    }
}
