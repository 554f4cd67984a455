//! The session task: one per [`crate::Client`], multiplexing every subscribed service over one
//! `Discovery.Session` stream.
//!
//! The task owns all mutable routing state (`Entry` per service: the backend records, the
//! policy, the held version) and is the only writer of each service's published snapshot. Loop:
//!
//! 1. connect to the current endpoint and send `Subscribe` with every service and the
//!    `(epoch, version)` it holds, so the server can answer with a delta instead of a snapshot;
//! 2. apply updates (full snapshot: replace; delta: check `base` == held version, else Nack so
//!    the server resends a full snapshot), rebuild the picker off the request path with
//!    `Picker::rebuild`, swap it in, then Ack — acks are coalesced for up to `ack_delay`
//!    (100 ms by default) and name the latest version applied, so a burst of updates costs one
//!    Ack; a Nack is sent at once and supersedes a deferred Ack; send a `LoadReport` per service
//!    every interval;
//! 3. when the stream ends, fails, or the server says `GoingAway`, mark the client disconnected
//!    (handles keep routing on their last snapshot), rotate to the next endpoint and reconnect
//!    after an exponential backoff with full jitter (after `GoingAway`: a jittered pause of at
//!    most the minimum backoff, so a fleet does not reconnect in lock-step).
//!
//! Protection against a control plane that lost its state: an update that would empty a
//! service's backend list is applied normally when it comes from the same store incarnation
//! (`epoch`) as the state held — removals are deliberate operator actions. A full snapshot with no
//! backends, or a `ServiceNotFound`, from a *different* epoch while the handle routes on a
//! non-empty snapshot is recorded (so later deltas apply and are acked) but not published: the
//! handle keeps routing on its previous snapshot, marked stale (`ServiceHandle::is_stale`,
//! counted in `ServiceStats::held_back`), until the service has backends again (while it is
//! stale, further empty states are held back too). Removals that empty a service through the
//! control plane the SDK already follows are deliberate and always applied.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dlb::balance::{Picker, StickyTable};
use dlb::model;
use dlb::proto;
use dlb::proto::client_message::Kind as ClientKind;
use dlb::proto::discovery_client::DiscoveryClient;
use dlb::proto::server_message::Kind as ServerKind;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::service::{OutcomeCounters, ServiceState, Snapshot, Version};

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
}

/// Connection state shared with the client.
#[derive(Debug)]
pub(crate) struct Link {
    /// Whether a session is established; a watch so `Client::connect` can wait for it.
    pub(crate) connected: watch::Sender<bool>,
    /// Sessions established so far.
    pub(crate) sessions: std::sync::atomic::AtomicU64,
    /// Index of the endpoint in use (or last tried).
    pub(crate) endpoint: std::sync::atomic::AtomicUsize,
}

impl Link {
    pub(crate) fn new() -> Self {
        Self {
            connected: watch::Sender::new(false),
            sessions: Default::default(),
            endpoint: Default::default(),
        }
    }
}

/// Task-owned state of one service.
struct Entry {
    state: Arc<ServiceState>,
    /// The records as the control plane has them at `version`, by id.
    records: BTreeMap<String, proto::Server>,
    policy: Option<proto::Policy>,
    /// The version `records` corresponds to (what we resubscribe with).
    version: Version,
    /// The last picker built (the published one unless an update is held back).
    picker: Option<Arc<Picker>>,
    /// The session-affinity table while the policy is sticky (kept across updates).
    sticky: Option<Arc<StickyTable>>,
    outcomes: Arc<HashMap<Arc<str>, Arc<OutcomeCounters>>>,
    /// Whether the last load report sent for this service named any backend (an empty report
    /// is then needed once, to zero the server's view; after that empty reports are skipped).
    reported_load: bool,
}

impl Entry {
    fn new(state: Arc<ServiceState>) -> Self {
        Self {
            state,
            records: BTreeMap::new(),
            policy: None,
            version: Version::default(),
            picker: None,
            sticky: None,
            outcomes: Arc::default(),
            reported_load: false,
        }
    }

    fn subscription(&self) -> proto::ServiceSubscription {
        proto::ServiceSubscription {
            service: self.state.name.clone(),
            known: (self.version.epoch != 0).then(|| self.version.into()),
        }
    }

    /// Whether the published snapshot routes to at least one backend.
    fn publishes_backends(&self) -> bool {
        self.state
            .snapshot
            .load()
            .picker
            .as_ref()
            .is_some_and(|p| !p.backends().is_empty())
    }

    /// Applies an update; `Err` carries the Nack detail (nothing changed then).
    fn apply(&mut self, upd: &proto::ServiceUpdate) -> Result<(), String> {
        let version: Version = upd
            .version
            .ok_or_else(|| "update without version".to_owned())?
            .into();
        let policy = if upd.full {
            upd.policy
                .ok_or_else(|| "full snapshot without policy".to_owned())?
        } else {
            let base: Version = upd
                .base
                .ok_or_else(|| "delta without base version".to_owned())?
                .into();
            if self.version.epoch == 0 || base != self.version {
                return Err(format!(
                    "delta applies on {base}, but the client holds {}",
                    self.version
                ));
            }
            match (upd.policy, self.policy) {
                (Some(p), _) | (None, Some(p)) => p,
                (None, None) => return Err("delta without a policy to apply on".into()),
            }
        };
        model::validate_policy(&policy).map_err(|e| e.to_string())?;
        for s in &upd.upserts {
            model::validate_server(s).map_err(|e| e.to_string())?;
        }
        // Apply to the records in place, keeping an undo log: a picker that fails to build
        // (not expected after validation) must leave the held state untouched.
        let mut undo: Vec<(String, Option<proto::Server>)> = Vec::new();
        let mut ids_changed = upd.full;
        let previous_records = if upd.full {
            Some(std::mem::take(&mut self.records))
        } else {
            for id in &upd.removals {
                if let Some(old) = self.records.remove(id) {
                    undo.push((id.clone(), Some(old)));
                    ids_changed = true;
                }
            }
            None
        };
        for s in &upd.upserts {
            let old = self.records.insert(s.server_id.clone(), s.clone());
            ids_changed |= old.is_none();
            if previous_records.is_none() {
                undo.push((s.server_id.clone(), old));
            }
        }

        let built = model::build_picker(self.picker.as_deref(), &policy, self.records.values());
        let picker = match built {
            Ok(p) => Arc::new(p),
            Err(e) => {
                if let Some(previous) = previous_records {
                    self.records = previous;
                } else {
                    for (id, old) in undo.into_iter().rev() {
                        match old {
                            Some(server) => self.records.insert(id, server),
                            None => self.records.remove(&id),
                        };
                    }
                }
                return Err(e.to_string());
            }
        };

        // Everything validated: commit.
        let previous_epoch = self.version.epoch;
        let stale = self.state.snapshot.load().stale;
        self.policy = Some(policy);
        self.version = version;
        let stats = &self.state.stats;
        if upd.full {
            stats.full_updates.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.delta_updates.fetch_add(1, Ordering::Relaxed);
        }
        let suspicious = self.records.is_empty()
            && self.publishes_backends()
            && (stale || (upd.full && previous_epoch != version.epoch));
        if suspicious {
            stats.held_back.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(service = %self.state.name, %version,
                "holding back an update that would empty the service; routing on the previous snapshot");
            self.mark_stale();
            return Ok(());
        }
        self.picker = Some(picker.clone());
        self.sticky = model::carry_sticky(self.sticky.as_ref(), &policy);
        // The outcome counters only change when the set of backend ids does.
        if ids_changed || self.outcomes.len() != picker.backends().len() {
            let mut outcomes = HashMap::with_capacity(picker.backends().len());
            for b in picker.backends() {
                let counters = self.outcomes.get(b.id()).cloned().unwrap_or_default();
                outcomes.insert(Arc::<str>::from(b.id()), counters);
            }
            self.outcomes = Arc::new(outcomes);
        }
        self.state.publish(Snapshot {
            version,
            picker: Some(picker),
            sticky: self.sticky.clone(),
            outcomes: self.outcomes.clone(),
            policy: Some(policy),
            not_found: false,
            stale: false,
        });
        Ok(())
    }

    /// Re-publishes the current snapshot with the stale flag set.
    fn mark_stale(&self) {
        let old = self.state.snapshot.load();
        self.state.publish(Snapshot {
            version: old.version,
            picker: old.picker.clone(),
            sticky: old.sticky.clone(),
            outcomes: old.outcomes.clone(),
            policy: old.policy,
            not_found: false,
            stale: true,
        });
    }

    fn not_found(&mut self, nf: &proto::ServiceNotFound) {
        self.state.stats.not_found.fetch_add(1, Ordering::Relaxed);
        let epoch = nf.version.map_or(0, |v| v.epoch);
        let stale = self.state.snapshot.load().stale;
        let suspicious = self.publishes_backends() && (stale || (self.version.epoch != epoch));
        self.records.clear();
        self.policy = None;
        self.version = Version::default();
        if suspicious {
            self.state.stats.held_back.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(service = %self.state.name,
                "control plane of another epoch says the service does not exist; routing on the previous snapshot");
            self.mark_stale();
            return;
        }
        self.picker = None;
        self.sticky = None;
        self.state.publish(Snapshot {
            version: Version { epoch, version: 0 },
            not_found: true,
            ..Snapshot::default()
        });
    }

    /// The load report due for this service, if any: `None` when there is no picker, or when
    /// there is nothing to report and the previous report was empty too.
    fn load_report(&mut self, interval: Duration) -> Option<proto::LoadReport> {
        let picker = self.state.snapshot.load().picker.clone()?;
        let mut backends = Vec::new();
        for b in picker.backends() {
            let in_flight = b.load().in_flight();
            let (successes, failures, latency) = match self.outcomes.get(b.id()) {
                Some(o) => {
                    let count = o.latency_count.swap(0, Ordering::Relaxed);
                    let sum = o.latency_sum_us.swap(0, Ordering::Relaxed);
                    let max = o.latency_max_us.swap(0, Ordering::Relaxed);
                    let latency = (count > 0).then(|| proto::LatencySummary {
                        count,
                        mean_ms: sum as f64 / count as f64 / 1000.0,
                        max_ms: max as f64 / 1000.0,
                    });
                    (
                        o.successes.swap(0, Ordering::Relaxed),
                        o.failures.swap(0, Ordering::Relaxed),
                        latency,
                    )
                }
                None => (0, 0, None),
            };
            if in_flight == 0 && successes == 0 && failures == 0 {
                continue;
            }
            backends.push(proto::BackendLoad {
                server_id: b.id().to_owned(),
                in_flight,
                successes,
                failures,
                latency,
            });
        }
        if backends.is_empty() && !self.reported_load {
            return None;
        }
        self.reported_load = !backends.is_empty();
        Some(proto::LoadReport {
            service: self.state.name.clone(),
            backends,
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// How one session ended.
enum Ended {
    /// The client was closed: stop.
    Closed,
    /// The server asked us to go away: reconnect now, elsewhere.
    GoingAway,
    /// Connecting or the stream failed. `established` says whether a session was up (then the
    /// backoff restarts from its minimum).
    Failed { established: bool },
}

/// Full-jitter exponential backoff: uniform in `[0, min(max, min × 2^attempt)]`.
pub(crate) fn backoff_delay(min: Duration, max: Duration, attempt: u32) -> Duration {
    let cap = min
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(max);
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// The session task. Runs until the client is closed (its command channel closes or `closed`
/// flips to true).
pub(crate) async fn run(
    config: SessionConfig,
    channels: Vec<(String, Channel)>,
    link: Arc<Link>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut closed: watch::Receiver<bool>,
) {
    let mut entries: HashMap<String, Entry> = HashMap::new();
    let mut attempt: u32 = 0;
    let mut idx = 0usize;
    loop {
        link.endpoint.store(idx, Ordering::Relaxed);
        let (endpoint, channel) = &channels[idx];
        let ended = tokio::select! {
            e = session_once(&config, endpoint, channel.clone(), &link, &mut entries, &mut commands) => e,
            _ = closed.wait_for(|c| *c) => Ended::Closed,
        };
        link.connected.send_replace(false);
        let delay = match ended {
            Ended::Closed => return,
            Ended::GoingAway => {
                attempt = 0;
                backoff_delay(Duration::ZERO, config.backoff_min, 0)
            }
            Ended::Failed { established } => {
                if established {
                    attempt = 0;
                }
                let d = backoff_delay(config.backoff_min, config.backoff_max, attempt);
                attempt = attempt.saturating_add(1);
                d
            }
        };
        idx = (idx + 1) % channels.len();
        // Sleep, but keep accepting subscriptions and notice a close.
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = closed.wait_for(|c| *c) => return,
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(Command::Subscribe(state)) => {
                        entries.entry(state.name.clone()).or_insert_with(|| Entry::new(state));
                    }
                },
            }
        }
    }
}

async fn session_once(
    config: &SessionConfig,
    endpoint: &str,
    channel: Channel,
    link: &Link,
    entries: &mut HashMap<String, Entry>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Ended {
    // Take in subscriptions that arrived meanwhile, so the first Subscribe names them.
    while let Ok(Command::Subscribe(state)) = commands.try_recv() {
        entries
            .entry(state.name.clone())
            .or_insert_with(|| Entry::new(state));
    }
    let (tx, rx) = mpsc::channel::<proto::ClientMessage>(1024);
    let subscribe = proto::Subscribe {
        client_id: config.client_id.clone(),
        services: entries.values().map(Entry::subscription).collect(),
    };
    if tx
        .send(client_msg(ClientKind::Subscribe(subscribe)))
        .await
        .is_err()
    {
        return Ended::Failed { established: false };
    }
    let mut client = DiscoveryClient::new(channel);
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
    let mut inbound = response.into_inner();
    link.sessions.fetch_add(1, Ordering::Relaxed);
    link.connected.send_replace(true);
    tracing::debug!(%endpoint, services = entries.len(), "session established");

    let mut report = tokio::time::interval(config.report_interval);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    report.tick().await;
    let mut last_report = Instant::now();
    // Acks waiting to be coalesced: the latest per service, sent when `ack_deadline` passes.
    let mut pending_acks: HashMap<String, proto::Ack> = HashMap::new();
    let ack_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(ack_timer);

    loop {
        tokio::select! {
            () = &mut ack_timer, if !pending_acks.is_empty() => {
                for (_, ack) in pending_acks.drain() {
                    if tx.send(client_msg(ClientKind::Ack(ack))).await.is_err() {
                        return Ended::Failed { established: true };
                    }
                }
            }
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        tracing::debug!(%endpoint, "session ended by the server");
                        return Ended::Failed { established: true };
                    }
                    Err(status) => {
                        tracing::debug!(%endpoint, %status, "session failed");
                        return Ended::Failed { established: true };
                    }
                };
                match msg.kind {
                    Some(ServerKind::Update(upd)) => {
                        let Some(entry) = entries.get_mut(&upd.service) else {
                            tracing::debug!(service = %upd.service, "update for a service not subscribed");
                            continue;
                        };
                        let reply = match entry.apply(&upd) {
                            Ok(()) => {
                                let ack = proto::Ack {
                                    service: upd.service.clone(),
                                    version: upd.version,
                                    nonce: upd.nonce.clone(),
                                };
                                if config.ack_delay.is_zero() {
                                    ClientKind::Ack(ack)
                                } else {
                                    if pending_acks.is_empty() {
                                        ack_timer
                                            .as_mut()
                                            .reset(tokio::time::Instant::now() + config.ack_delay);
                                    }
                                    pending_acks.insert(upd.service.clone(), ack);
                                    continue;
                                }
                            }
                            Err(detail) => {
                                // The Nack supersedes any deferred Ack of this service.
                                pending_acks.remove(&upd.service);
                                tracing::info!(service = %upd.service, %detail, "nacking update");
                                entry.state.stats.nacks.fetch_add(1, Ordering::Relaxed);
                                ClientKind::Nack(proto::Nack {
                                    service: upd.service.clone(),
                                    version: (entry.version.epoch != 0).then(|| entry.version.into()),
                                    nonce: upd.nonce.clone(),
                                    error_detail: detail,
                                })
                            }
                        };
                        if tx.send(client_msg(reply)).await.is_err() {
                            return Ended::Failed { established: true };
                        }
                    }
                    Some(ServerKind::NotFound(nf)) => {
                        if let Some(entry) = entries.get_mut(&nf.service) {
                            entry.not_found(&nf);
                        }
                    }
                    Some(ServerKind::GoingAway(g)) => {
                        tracing::info!(%endpoint, reason = %g.reason, "control plane going away");
                        return Ended::GoingAway;
                    }
                    None => {}
                }
            }
            cmd = commands.recv() => match cmd {
                None => return Ended::Closed,
                Some(Command::Subscribe(state)) => {
                    let name = state.name.clone();
                    let entry = entries.entry(name).or_insert_with(|| Entry::new(state));
                    let sub = proto::Subscribe {
                        client_id: config.client_id.clone(),
                        services: vec![entry.subscription()],
                    };
                    if tx.send(client_msg(ClientKind::Subscribe(sub))).await.is_err() {
                        return Ended::Failed { established: true };
                    }
                }
            },
            _ = report.tick() => {
                let now = Instant::now();
                let interval = now - last_report;
                last_report = now;
                for entry in entries.values_mut() {
                    if let Some(r) = entry.load_report(interval) {
                        if tx.send(client_msg(ClientKind::LoadReport(r))).await.is_err() {
                            return Ended::Failed { established: true };
                        }
                    }
                }
            }
        }
    }
}

fn client_msg(kind: ClientKind) -> proto::ClientMessage {
    proto::ClientMessage { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_full_jitter() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 0..40 {
            let d = backoff_delay(min, max, attempt);
            assert!(d <= max, "{d:?}");
            let cap = min.saturating_mul(1 << attempt.min(5)).min(max);
            assert!(d <= cap.max(min), "{attempt}: {d:?}");
        }
        assert_eq!(
            backoff_delay(Duration::ZERO, Duration::ZERO, 3),
            Duration::ZERO
        );
    }

    fn server(id: &str) -> proto::Server {
        proto::Server {
            server_id: id.into(),
            address: "127.0.0.1:80".into(),
            weight: 1,
            health: proto::HealthStatus::Healthy as i32,
            ..Default::default()
        }
    }

    fn full(epoch: u64, version: u64, ids: &[&str]) -> proto::ServiceUpdate {
        proto::ServiceUpdate {
            service: "s".into(),
            version: Some(proto::Version { epoch, version }),
            full: true,
            policy: Some(model::default_policy()),
            upserts: ids.iter().map(|i| server(i)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn deltas_need_the_right_base_and_emptying_is_guarded() {
        let mut e = Entry::new(Arc::new(ServiceState::new("s".into())));
        e.apply(&full(7, 1, &["a", "b"])).unwrap();
        assert_eq!(
            e.version,
            Version {
                epoch: 7,
                version: 1
            }
        );
        let mut d = proto::ServiceUpdate {
            service: "s".into(),
            version: Some(proto::Version {
                epoch: 7,
                version: 3,
            }),
            base: Some(proto::Version {
                epoch: 7,
                version: 2,
            }),
            removals: vec!["a".into()],
            ..Default::default()
        };
        assert!(e.apply(&d).is_err(), "wrong base must be nacked");
        d.base = Some(proto::Version {
            epoch: 7,
            version: 1,
        });
        e.apply(&d).unwrap();
        assert_eq!(e.records.len(), 1);
        // A full empty snapshot from another epoch is held back.
        e.apply(&full(8, 1, &[])).unwrap();
        let snap = e.state.snapshot.load();
        assert!(snap.stale);
        assert_eq!(snap.picker.as_ref().unwrap().backends().len(), 1);
        assert_eq!(
            e.version,
            Version {
                epoch: 8,
                version: 1
            }
        );
        // The service gets backends again: published.
        e.apply(&full(8, 2, &["c"])).unwrap();
        let snap = e.state.snapshot.load();
        assert!(!snap.stale);
        assert_eq!(snap.picker.as_ref().unwrap().backends()[0].id(), "c");
        // Same epoch removal to empty is applied.
        let d = proto::ServiceUpdate {
            service: "s".into(),
            version: Some(proto::Version {
                epoch: 8,
                version: 3,
            }),
            base: Some(proto::Version {
                epoch: 8,
                version: 2,
            }),
            removals: vec!["c".into()],
            ..Default::default()
        };
        e.apply(&d).unwrap();
        assert!(e
            .state
            .snapshot
            .load()
            .picker
            .as_ref()
            .unwrap()
            .backends()
            .is_empty());
        // Invalid record: nacked, nothing changes.
        let mut bad = full(8, 4, &["x"]);
        bad.upserts[0].weight = 0;
        assert!(e.apply(&bad).is_err());
        assert_eq!(e.version.version, 3);
    }

    fn not_found(epoch: u64) -> proto::ServiceNotFound {
        proto::ServiceNotFound {
            service: "s".into(),
            version: Some(proto::Version { epoch, version: 0 }),
            nonce: "n".into(),
        }
    }

    #[test]
    fn not_found_is_applied_unless_it_comes_from_another_epoch() {
        let mut e = Entry::new(Arc::new(ServiceState::new("s".into())));
        // Nothing held: applied.
        e.not_found(&not_found(7));
        assert!(e.state.snapshot.load().not_found);
        // A service that existed in the same epoch and was deleted: applied.
        e.apply(&full(7, 1, &["a"])).unwrap();
        e.not_found(&not_found(7));
        let snap = e.state.snapshot.load();
        assert!(snap.not_found && snap.picker.is_none());
        // From another epoch while routing on a non-empty snapshot: held back.
        e.apply(&full(7, 2, &["a"])).unwrap();
        e.not_found(&not_found(9));
        let snap = e.state.snapshot.load();
        assert!(!snap.not_found && snap.stale);
        assert_eq!(snap.picker.as_ref().unwrap().backends().len(), 1);
        assert_eq!(
            e.version,
            Version::default(),
            "resubscribes without a known version"
        );
        assert_eq!(e.state.stats.held_back.load(Ordering::Relaxed), 1);
    }
}
