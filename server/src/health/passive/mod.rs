//! Passive health: outlier detection from the SDKs' load reports, and the request metrics.
//!
//! Every Discovery session hands the call outcomes of each load report it accepts to one task,
//! [`run`], through a bounded channel ([`Reports::submit`]: never blocks a session; a report
//! that does not fit is dropped and counted). That task **owns all detector state** (one
//! [`detector::Detector`] per service with outlier detection on), so the outcomes of every SDK
//! are summed in one place and decisions never split. Ejections and returns reach the store
//! only as outlier-slot updates (`health::sources::ejected` and `returned`), so the
//! effective state, the reason and the push to every SDK come from the core
//! ([`dlb::sources`]): outlier `UNHEALTHY` takes precedence over the probe source, so a passing
//! active check never reinstates an ejected backend early.
//!
//! The task also feeds the request metrics ([`crate::health::passive::metrics`]) from every report, and
//! every 100 ms runs each detector's clock (returns, failure-rate windows, decay). The
//! max-ejection rule is [`dlb::health_policy::max_ejected`]; `docs/outlier.md` has the rules.
//!
//! **Leader only.** With several replicas the decisions are the leader's
//! ([`crate::replicas::Coordination::leadership`]): every replica feeds its request metrics
//! from its own sessions' reports, but only the leader keeps detectors and latency windows and
//! writes ejections and shares, through its fenced store view (`Context::leader_store`). On
//! becoming leader the task adopts the ejections the store holds (as at start); on losing it,
//! it drops all decision state at once, and any write still in flight is refused by the fence.
//! The leader decides on the reports its own sessions send and on the sums every other replica
//! forwards ([`forward`]): a replica that does not lead adds its sessions' outcomes to an
//! [`forward::Outbox`] (services with outlier detection or adaptive weights on only) and sends
//! the sums every [`forward::FORWARD_EVERY`] through
//! [`crate::replicas::Coordination::forward`], off this task (one send in flight at a time);
//! the leader treats each forwarded report as one more SDK's (`docs/etcd.md`, "Load reports").
//! On becoming leader the replica decides on what its outbox still holds.
//!
//! It also owns **adaptive weights** ([`latency`]): per service with `adaptive_weights` on, a
//! latency window summed over every report; when a window closes, the pure decision
//! [`dlb::adaptive::decide`] (with probe RTTs from the checker where active checks run) gives
//! the shares that change, written to each backend's latency source (`docs/adaptive.md`).

pub mod detector;
pub mod latency;
pub mod metrics;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dlb::adaptive::{self, Decision};
use dlb::health_policy::{outlier_config, OutlierConfig};
use dlb::proto;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cache::Cache;
use crate::health::sources;
use crate::health::HealthHandle;
use crate::replicas::Coordination;
use crate::reports::Reports;
use crate::reports::{forward, Report};
use crate::store::Store;
use detector::{Action, Detector};

/// How often the detectors' clocks run.
pub const TICK: Duration = Duration::from_millis(100);

/// What the passive-health task works with.
pub(crate) struct Context {
    /// The snapshot cache: which backends each service has, and its policy.
    pub cache: Arc<Cache>,
    /// The store as the leader writes it (fenced by the leader key on etcd).
    pub leader_store: Arc<dyn Store>,
    /// The active checker (probe RTTs for adaptive weights, probe verdicts for stale ejections).
    pub health: HealthHandle,
    /// The request, outlier and panic metrics.
    pub metrics: metrics::HealthMetrics,
    /// The sessions' side of the report hand-off (its queue accounting).
    pub reports: Arc<Reports>,
    /// Given when a graceful shutdown starts; the forwarding sends are spawned through it.
    pub shutdown: crate::shutdown::Shutdown,
}

/// Per service: the detector and the configuration it runs with.
struct Service {
    detector: Detector,
    config: OutlierConfig,
}

/// What the leader decides with: per service, the detector and the latency window.
#[derive(Default)]
struct Decisions {
    services: HashMap<Arc<str>, Service>,
    windows: HashMap<Arc<str>, latency::Window>,
}

/// The detector task. See the module docs.
pub(crate) async fn run(
    ctx: Arc<Context>,
    mut rx: mpsc::Receiver<Report>,
    coordination: Arc<dyn Coordination>,
) {
    let mut leadership = coordination.leadership();
    let mut forwarded = coordination.take_forwarded();
    let mut d = Decisions::default();
    let mut outbox = forward::Outbox::new();
    let mut sending: Option<tokio::task::JoinHandle<()>> = None;
    let mut next_forward = Instant::now() + forward::FORWARD_EVERY;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shutdown = ctx.shutdown.clone();
    let mut leading: Option<i64> = None;
    let mut follow_leadership = true;
    leadership.mark_changed();
    loop {
        tokio::select! {
            changed = leadership.changed(), if follow_leadership => {
                if changed.is_err() {
                    follow_leadership = false;
                    continue;
                }
                let now = *leadership.borrow_and_update();
                if now == leading {
                    continue;
                }
                d = Decisions::default();
                leading = now;
                if leading.is_some() {
                    take_over(&ctx, &mut d).await;
                    // What this replica had not forwarded yet is decided on here.
                    for reports in outbox.take() {
                        for r in reports {
                            decide(&ctx, &mut d, &r.service.into(), &r.backends).await;
                        }
                    }
                } else {
                    tracing::info!("outlier decisions stopped: this replica is no longer the leader");
                }
            }
            r = rx.recv() => {
                let Some((service, loads)) = r else { break };
                ctx.reports.taken(loads.len());
                ctx.metrics.requests(&service, &loads);
                if leading.is_some() {
                    decide(&ctx, &mut d, &service, &loads).await;
                } else if let Some(snap) = ctx.cache.get(&service).filter(|s| {
                    outlier_config(&s.policy).is_some() || adaptive::config(&s.policy).is_some()
                }) {
                    outbox.add(&service, &loads, |id| snap.servers.contains_key(id));
                }
            }
            batch = next_forwarded(&mut forwarded) => {
                let Some(batch) = batch else {
                    forwarded = None;
                    continue;
                };
                if leading.is_none() {
                    continue;
                }
                ctx.metrics.forward("received");
                for r in batch.reports {
                    decide(&ctx, &mut d, &r.service.into(), &r.backends).await;
                }
            }
            _ = tick.tick() => {
                ctx.metrics.dropped_reports(ctx.reports.dropped());
                if leading.is_none() {
                    let now = Instant::now();
                    if now >= next_forward {
                        next_forward = now + forward::FORWARD_EVERY;
                        send_outbox(&ctx, &coordination, &mut outbox, &mut sending);
                    }
                    continue;
                }
                let names: Vec<Arc<str>> = d.services.keys().cloned().collect();
                for name in names {
                    let actions = on_tick(&ctx, &mut d.services, &name);
                    write(&ctx, &name, actions).await;
                }
                for name in ctx.cache.service_names() {
                    let clears = adaptive_sync(&ctx, &mut d.windows, &name, false);
                    write_latency(&ctx, &name, clears).await;
                    let decisions = close_window(&ctx, &mut d.windows, &name).await;
                    write_latency(&ctx, &name, decisions).await;
                }
            }
            _ = shutdown.stopped() => break,
        }
    }
    // The send holds the shared state (the store among it): it ends with this task.
    if let Some(task) = sending {
        task.abort();
        let _ = task.await;
    }
}

/// The next forwarded batch; never resolves without a receiver.
async fn next_forwarded(rx: &mut Option<mpsc::Receiver<forward::Batch>>) -> Option<forward::Batch> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The leader's step for one report (an SDK's, or another replica's sums): detector, then the
/// latency window.
async fn decide(
    ctx: &Context,
    d: &mut Decisions,
    service: &Arc<str>,
    loads: &[proto::BackendLoad],
) {
    let actions = on_report(ctx, &mut d.services, service, loads);
    write(ctx, service, actions).await;
    if let Some(w) = d.windows.get_mut(service) {
        if let Some(snap) = ctx.cache.get(service) {
            w.add(loads, |id| snap.servers.contains_key(id));
        }
    }
}

/// Sends what the outbox holds to the leader, off the task, unless the previous send is still
/// on its way (then the sums wait for the next period).
fn send_outbox(
    ctx: &Arc<Context>,
    coordination: &Arc<dyn Coordination>,
    outbox: &mut forward::Outbox,
    sending: &mut Option<tokio::task::JoinHandle<()>>,
) {
    if outbox.is_empty() || sending.as_ref().is_some_and(|t| !t.is_finished()) {
        return;
    }
    if outbox.dropped() > 0 {
        tracing::warn!(
            dropped = outbox.dropped(),
            max = forward::MAX_ENTRIES,
            "load-report sums dropped: the outbox was full"
        );
    }
    let batches = outbox.take();
    let replica = coordination.replica_id().to_string();
    let (coordination, ctx, tasks) = (coordination.clone(), ctx.clone(), ctx.shutdown.clone());
    *sending = Some(tasks.spawn(async move {
        for reports in batches {
            let batch = forward::Batch {
                replica: replica.clone(),
                reports,
            };
            match coordination.forward(batch).await {
                Ok(()) => ctx.metrics.forward("sent"),
                Err(e) => {
                    tracing::debug!(error = %e, "forwarding load reports to the leader failed");
                    ctx.metrics.forward("failed");
                }
            }
        }
    }));
}

/// On becoming leader (at start on a single node): take over the ejections the store holds
/// (detection on), or return them (detection off: nobody would ever return them otherwise).
async fn take_over(ctx: &Context, d: &mut Decisions) {
    for name in ctx.cache.service_names() {
        let (_, mut actions) = sync(ctx, &mut d.services, &name);
        if !d.services.contains_key(&name) {
            actions.extend(stale_ejections(ctx, &name));
        }
        write(ctx, &name, actions).await;
        let clears = adaptive_sync(ctx, &mut d.windows, &name, true);
        write_latency(ctx, &name, clears).await;
    }
}

/// Brings a service's detector in line with its snapshot: created (adopting stored ejections)
/// when detection is on, reconfigured when the policy changed, dropped when it is off (then
/// its ejected backends return). Returns the backend count.
fn sync(
    ctx: &Context,
    services: &mut HashMap<Arc<str>, Service>,
    name: &Arc<str>,
) -> (Option<usize>, Vec<Action>) {
    let now = Instant::now();
    let snap = ctx.cache.get(name);
    let config = snap.as_ref().and_then(|s| outlier_config(&s.policy));
    let (Some(snap), Some(config)) = (snap, config) else {
        // Off (or the service is gone): every backend it ejected returns.
        let mut out = Vec::new();
        if let Some(svc) = services.remove(name) {
            if let Some(snap) = ctx.cache.get(name) {
                for id in snap.servers.keys() {
                    if svc.detector.is_ejected(id) {
                        out.push(Action::Return { id: id.to_string() });
                    }
                }
            }
        }
        return (None, out);
    };
    let svc = services.entry(name.clone()).or_insert_with(|| {
        let mut detector = Detector::new(now);
        for (id, s) in &snap.servers {
            let ejected = s
                .sources
                .as_ref()
                .and_then(|x| x.outlier.as_ref())
                .is_some_and(|o| o.verdict == proto::Verdict::Unhealthy as i32);
            if ejected {
                detector.adopt(id, &config, now);
            }
        }
        Service { detector, config }
    });
    svc.config = config;
    let ids: HashSet<&str> = snap.servers.keys().map(|k| &**k).collect();
    svc.detector.retain(&ids);
    (Some(snap.servers.len()), Vec::new())
}

/// Keeps a latency window for every service with adaptive weights on. Returns the shares to
/// clear: every stored one of a service whose adaptive weights went off (or, with `startup`,
/// were off with shares left in the store), so nobody keeps a lowered weight nobody updates.
fn adaptive_sync(
    ctx: &Context,
    windows: &mut HashMap<Arc<str>, latency::Window>,
    name: &Arc<str>,
    startup: bool,
) -> Vec<Decision> {
    let snap = ctx.cache.get(name);
    let on = snap
        .as_ref()
        .is_some_and(|s| adaptive::config(&s.policy).is_some());
    if on {
        windows
            .entry(name.clone())
            .or_insert_with(|| latency::Window::new(Instant::now()));
        return Vec::new();
    }
    let was_on = windows.remove(name).is_some();
    let Some(snap) = snap.filter(|_| was_on || startup) else {
        return Vec::new();
    };
    snap.servers
        .iter()
        .filter(|(_, s)| s.sources.as_ref().is_some_and(|x| x.latency.is_some()))
        .map(|(id, _)| Decision {
            id: id.to_string(),
            percent: 100,
            detail: "adaptive weights off".to_owned(),
        })
        .collect()
}

/// Closes a service's latency window when it is due and decides (see [`latency`]).
async fn close_window(
    ctx: &Context,
    windows: &mut HashMap<Arc<str>, latency::Window>,
    name: &Arc<str>,
) -> Vec<Decision> {
    let Some(snap) = ctx.cache.get(name) else {
        return Vec::new();
    };
    let Some(cfg) = adaptive::config(&snap.policy) else {
        return Vec::new();
    };
    let now = Instant::now();
    let Some(window) = windows.get_mut(name) else {
        return Vec::new();
    };
    if !window.due(now, cfg.window) {
        return Vec::new();
    }
    let mut requests = window.take(cfg.min_requests, now);
    // Probe RTTs of backends whose checker says healthy (the last passing probe's).
    let mut probes: HashMap<String, f64> = HashMap::new();
    if snap.policy.health_check.is_some() {
        for (id, view) in ctx.health.inspect_service(name).await {
            if view.health != crate::health::active::state::Health::Healthy {
                continue;
            }
            if let Some(rtt) = view.last_pass_rtt {
                probes.insert(id, rtt.as_secs_f64() * 1e3);
            }
        }
    }
    let samples: Vec<adaptive::Sample> = snap
        .servers
        .iter()
        .map(|(id, s)| adaptive::Sample {
            id: id.to_string(),
            eligible: dlb::model::is_eligible(s),
            percent: adaptive::weight_percent(s),
            request_ms: requests.remove(&**id),
            probe_ms: probes.remove(&**id),
        })
        .collect();
    adaptive::decide(&cfg, &samples)
}

/// Writes latency shares, one store write each (a backend removed meanwhile fails alone).
async fn write_latency(ctx: &Context, service: &str, decisions: Vec<Decision>) {
    for d in decisions {
        tracing::info!(service, server_id = %d.id, percent = d.percent, detail = %d.detail,
            "adaptive weight");
        let m = vec![sources::latency(&d)];
        if let Err(e) = ctx.leader_store.apply(service.to_owned(), m, None).await {
            tracing::debug!(service, server_id = %d.id, error = %e, "latency write failed");
        }
    }
}

/// Returns for backends stored as ejected in a service without outlier detection.
fn stale_ejections(ctx: &Context, name: &str) -> Vec<Action> {
    let Some(snap) = ctx.cache.get(name) else {
        return Vec::new();
    };
    snap.servers
        .iter()
        .filter(|(_, s)| {
            s.sources
                .as_ref()
                .and_then(|x| x.outlier.as_ref())
                .is_some_and(|o| o.verdict == proto::Verdict::Unhealthy as i32)
        })
        .map(|(id, _)| Action::Return { id: id.to_string() })
        .collect()
}

fn on_report(
    ctx: &Context,
    services: &mut HashMap<Arc<str>, Service>,
    name: &Arc<str>,
    loads: &[proto::BackendLoad],
) -> Vec<Action> {
    let (total, mut out) = sync(ctx, services, name);
    if let (Some(total), Some(svc)) = (total, services.get_mut(name)) {
        out.extend(
            svc.detector
                .report(&svc.config, total, loads, Instant::now()),
        );
    }
    out
}

fn on_tick(
    ctx: &Context,
    services: &mut HashMap<Arc<str>, Service>,
    name: &Arc<str>,
) -> Vec<Action> {
    let (total, mut out) = sync(ctx, services, name);
    if let (Some(total), Some(svc)) = (total, services.get_mut(name)) {
        out.extend(svc.detector.tick(&svc.config, total, Instant::now()));
        ctx.metrics.ejected(name, svc.detector.ejected());
    }
    out
}

/// Writes the actions, one store write each (a backend removed meanwhile fails alone).
async fn write(ctx: &Context, service: &str, actions: Vec<Action>) {
    for action in actions {
        let (id, m) = match action {
            Action::Eject { id, detail, .. } => {
                tracing::warn!(service, server_id = %id, %detail, "outlier ejected");
                ctx.metrics.ejection(service);
                let m = sources::ejected(&id, &detail);
                (id, m)
            }
            Action::Return { id } => {
                tracing::info!(service, server_id = %id, "outlier returned");
                let m = sources::returned(&id);
                (id, m)
            }
        };
        if let Err(e) = ctx
            .leader_store
            .apply(service.to_owned(), vec![m], None)
            .await
        {
            tracing::debug!(service, server_id = %id, error = %e, "outlier write failed");
        }
    }
}
