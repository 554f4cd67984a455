//! The scheduler: one task owns every checked backend's schedule, state machine and damper.
//!
//! [`Checker::run`] follows every service in the [cache](crate::cache). For a service whose
//! policy has a `health_check`, each backend becomes a *target*; its first probe is due at a
//! uniformly random offset within one interval (the **initial spread**: a restart or a new
//! configuration does not probe every backend at once), each next one after the interval its
//! state asks for — `down_interval` while unhealthy or held down, `fast_interval` while results
//! count towards a change (or nothing is known yet), `interval` otherwise — each drawn within
//! ± `jitter_percent`. Due times sit in one binary heap (O(log n) per probe); entries carry the
//! target's generation so a reconfigured or removed target's stale entries are skipped.
//!
//! A due probe needs a permit of a semaphore of `max_in_flight`; when none is free the probe
//! does not run and its result is **unknown** — counted in `dlb_health_probes_total{result=
//! "unknown"}`, never fed to the state machine, so an overloaded checker cannot make a backend
//! unhealthy. A probe runs in its own task under the check's timeout (a timeout is one failure)
//! and sends its outcome and RTT back on a channel; the target never has two probes in flight.
//!
//! Results feed the backend's [`Machine`]; transitions between healthy and unhealthy feed its
//! [`Damper`]. What the probe source should say is derived from both; **only when that verdict
//! changes** is a write queued for the [writer](super::writer) — never one write per probe. So
//! the effective state, the reason and the push come from the core (`dlb::sources`).
//!
//! **Shared among replicas.** Every replica keeps a target (state machine, published verdict)
//! for every checked backend, but only *probes* the ones it owns: the owner of `(service,
//! backend id)` is chosen by rendezvous hashing over the live replica ids
//! ([`crate::replicas::Members::owner`]), so each backend is probed by exactly one live replica.
//! A target this replica does not probe follows the verdict stored by its prober (its machine
//! restarts from it), so when the member set changes and a backend moves here, its first probe
//! (within one interval: the initial spread) continues from the stored state, and verdicts are
//! still written on transitions only. A single replica owns everything.
//!
//! When a service's health check is removed, its targets go and any probe verdict they left in
//! the store is cleared (set back to unset). A stored verdict (after a restart of `dlbd` on the
//! embedded store) is the machine's starting state.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dlb::health_check::{self, CheckSpec, ProbeKind};
use dlb::proto;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use super::flap::Damper;
use super::metrics::HealthMetrics;
use super::probe::{with_port, Outcome, ProbeTarget, Prober};
use super::state::{Health, Machine};
use super::writer::Write;
use crate::cache::{Cache, Waker};
use crate::replicas::{Members, Share};
use crate::Error;

mod commands;
mod probing;
mod share;

pub use commands::TargetView;
pub(crate) use commands::{Command, ReportReply};

/// A backend: (service, server id).
pub(crate) type Key = (Arc<str>, Arc<str>);

struct Target {
    address: String,
    spec: Arc<CheckSpec>,
    machine: Machine,
    damper: Damper,
    published: proto::Verdict,
    /// The hold-down number last written (0: not held down).
    published_hold: u32,
    gen: u64,
    in_flight: bool,
    last_detail: String,
    last_rtt: Option<Duration>,
    last_pass_rtt: Option<Duration>,
    /// Whether this replica probes the backend (it owns it among the live replicas).
    probed: bool,
    /// Probes this replica started on it.
    probes: u64,
}

fn health_of(v: proto::Verdict) -> Health {
    match v {
        proto::Verdict::Healthy => Health::Healthy,
        proto::Verdict::Unhealthy => Health::Unhealthy,
        proto::Verdict::Unset => Health::Unknown,
    }
}

fn damper(spec: &CheckSpec) -> Damper {
    Damper::new(
        spec.flap_threshold,
        spec.flap_window,
        spec.flap_hold_down,
        spec.flap_max_hold_down,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Probe,
    Release,
}

type Timer = Reverse<(Instant, u64, TimerKind, Key, u64)>;

/// One probe's result.
struct ProbeDone {
    key: Key,
    gen: u64,
    kind: &'static str,
    outcome: Outcome,
    rtt: Duration,
}

fn kind_name(k: &ProbeKind) -> &'static str {
    match k {
        ProbeKind::Http { .. } => "http",
        ProbeKind::Tcp { .. } => "tcp",
        ProbeKind::Grpc { .. } => "grpc",
    }
}

fn jitter(d: Duration, percent: u32) -> Duration {
    if percent == 0 {
        return d;
    }
    let f = 1.0 + (fastrand::f64() * 2.0 - 1.0) * f64::from(percent) / 100.0;
    d.mul_f64(f)
}

fn verdict_of(server: &proto::Server) -> proto::Verdict {
    server
        .sources
        .as_ref()
        .and_then(|s| s.probe.as_ref())
        .and_then(|p| proto::Verdict::try_from(p.verdict).ok())
        .unwrap_or(proto::Verdict::Unset)
}

/// The scheduler. See the module docs.
pub(crate) struct Checker {
    cache: Arc<Cache>,
    prober: Arc<dyn Prober>,
    permits: Arc<Semaphore>,
    metrics: HealthMetrics,
    writes: mpsc::UnboundedSender<Write>,
    targets: HashMap<Key, Target>,
    by_service: HashMap<Arc<str>, HashSet<Arc<str>>>,
    specs: HashMap<Arc<str>, Arc<CheckSpec>>,
    timers: BinaryHeap<Timer>,
    seq: u64,
    next_gen: u64,
    followed: HashSet<Arc<str>>,
    /// Changes when a service appears; `None` until the first scan of the service names.
    appeared: Option<tokio::sync::watch::Receiver<u64>>,
    waker: Arc<Waker>,
    results_tx: mpsc::UnboundedSender<ProbeDone>,
    /// The probes in flight (owned: aborted and awaited when the checker stops).
    probes: tokio::task::JoinSet<()>,
    results_rx: mpsc::UnboundedReceiver<ProbeDone>,
    /// This replica and the live member set: which backends it probes.
    share: Share,
    /// The member set the targets were last assigned with.
    members: Members,
    /// Whether the number of probed targets must be counted again.
    recount: bool,
}

impl Checker {
    /// A checker over `cache` running at most `max_in_flight` probes at once.
    pub(crate) fn new(
        cache: Arc<Cache>,
        prober: Arc<dyn Prober>,
        max_in_flight: usize,
        metrics: HealthMetrics,
        writes: mpsc::UnboundedSender<Write>,
        share: Share,
    ) -> Self {
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let waker = cache.waker();
        let members = share.members.borrow().clone();
        Self {
            cache,
            prober,
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
            metrics,
            writes,
            targets: HashMap::new(),
            by_service: HashMap::new(),
            specs: HashMap::new(),
            timers: BinaryHeap::new(),
            seq: 0,
            next_gen: 1,
            followed: HashSet::new(),
            appeared: None,
            waker,
            results_tx,
            probes: tokio::task::JoinSet::new(),
            results_rx,
            share,
            members,
            recount: true,
        }
    }

    /// Runs until `shutdown` resolves or every command sender is gone.
    pub(crate) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut appeared = self.cache.services_changed();
        let mut appeared_open = true;
        let mut members = self.share.members.clone();
        let mut members_open = true;
        tokio::pin!(shutdown);
        loop {
            appeared.borrow_and_update();
            self.catch_up();
            self.fire_due(Instant::now());
            let next = self
                .timers
                .peek()
                .map(|Reverse((t, ..))| *t)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(done) = self.results_rx.recv() => self.on_result(done),
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                _ = self.waker.notified() => {}
                r = appeared.changed(), if appeared_open => appeared_open = r.is_ok(),
                r = members.changed(), if members_open => {
                    members_open = r.is_ok();
                    let view = members.borrow_and_update().clone();
                    self.reassign(view);
                }
                _ = tokio::time::sleep_until(next) => {}
            }
        }
        for s in &self.followed {
            self.cache.unfollow_service(s, &self.waker);
        }
        self.probes.shutdown().await;
    }

    /// Follows services that appeared and reconciles every changed one.
    fn catch_up(&mut self) {
        // The list of services is scanned only when one appeared (not once per probe).
        let scan = match &mut self.appeared {
            None => {
                let mut rx = self.cache.services_changed();
                rx.borrow_and_update();
                self.appeared = Some(rx);
                true
            }
            Some(rx) => {
                let changed = rx.has_changed().unwrap_or(false);
                if changed {
                    rx.borrow_and_update();
                }
                changed
            }
        };
        if scan {
            for name in self.cache.service_names() {
                if self.followed.insert(name.clone()) {
                    self.cache.follow_service(&name, &self.waker);
                    self.reconcile(&name);
                }
            }
        }
        for name in self.waker.take_dirty() {
            self.reconcile(&name);
        }
        self.metrics.targets(self.targets.len());
        if std::mem::take(&mut self.recount) {
            self.metrics
                .probed(self.targets.values().filter(|t| t.probed).count());
        }
    }

    fn push_timer(&mut self, at: Instant, kind: TimerKind, key: Key, gen: u64) {
        self.seq += 1;
        self.timers.push(Reverse((at, self.seq, kind, key, gen)));
    }

    /// Brings the targets of `service` in line with its newest snapshot. O(backends).
    fn reconcile(&mut self, service: &Arc<str>) {
        let snap = self.cache.get(service);
        let spec = snap
            .as_ref()
            .and_then(|s| s.policy.health_check.as_ref())
            .and_then(|hc| health_check::resolve(hc).ok())
            .map(Arc::new);
        let old: HashSet<Arc<str>> = self.by_service.remove(service).unwrap_or_default();
        let Some(snap) = snap else {
            for id in old {
                self.targets.remove(&(service.clone(), id));
            }
            self.specs.remove(service);
            return;
        };
        let Some(spec) = spec else {
            for id in old {
                self.targets.remove(&(service.clone(), id));
            }
            self.specs.remove(service);
            // Clear any verdict probes left behind (a removed check, or a restart).
            for s in snap.servers.values() {
                if verdict_of(s) != proto::Verdict::Unset {
                    let _ = self.writes.send(Write {
                        service: service.clone(),
                        id: s.server_id.as_str().into(),
                        state: crate::health::sources::probe_state(proto::Verdict::Unset, ""),
                        done: None,
                    });
                }
            }
            return;
        };
        let spec_changed = self.specs.get(service).is_none_or(|s| **s != *spec);
        if spec_changed {
            self.specs.insert(service.clone(), spec.clone());
        }
        let now = Instant::now();
        let mut ids = HashSet::with_capacity(snap.servers.len());
        self.recount = true;
        for (id, server) in snap.servers.iter() {
            let key: Key = (service.clone(), id.clone());
            ids.insert(id.clone());
            let address = with_port(&server.address, spec.port);
            let gen = self.next_gen;
            let owned = self.owns(service, id);
            let reschedule = match self.targets.get_mut(&key) {
                Some(t) => {
                    if !owned {
                        // Another replica probes it: follow the verdict it stored.
                        let stored = verdict_of(server);
                        if stored != t.published {
                            t.published = stored;
                            t.machine = Machine::new(health_of(stored), spec.rise, spec.fall);
                        }
                    }
                    if t.address != address || spec_changed || t.probed != owned {
                        t.address = address;
                        if spec_changed {
                            t.machine.set_thresholds(spec.rise, spec.fall);
                            t.damper = damper(&spec);
                            t.spec = spec.clone();
                        }
                        t.probed = owned;
                        t.gen = gen;
                        t.in_flight = false;
                        true
                    } else {
                        false
                    }
                }
                None => {
                    let published = verdict_of(server);
                    let state = health_of(published);
                    self.targets.insert(
                        key.clone(),
                        Target {
                            address,
                            spec: spec.clone(),
                            machine: Machine::new(state, spec.rise, spec.fall),
                            damper: damper(&spec),
                            published,
                            published_hold: 0,
                            gen,
                            in_flight: false,
                            last_detail: String::new(),
                            last_rtt: None,
                            last_pass_rtt: None,
                            probed: owned,
                            probes: 0,
                        },
                    );
                    true
                }
            };
            if reschedule {
                // A new generation cancels the timers and results of the old one.
                self.next_gen += 1;
                if !owned {
                    continue;
                }
                // The initial spread: uniformly within one interval.
                let offset = spec.interval.mul_f64(fastrand::f64());
                self.push_timer(now + offset, TimerKind::Probe, key, gen);
            }
        }
        for id in old.difference(&ids) {
            self.targets.remove(&(service.clone(), id.clone()));
        }
        self.by_service.insert(service.clone(), ids);
    }

    /// Starts every probe that is due and handles due hold-down ends.
    fn fire_due(&mut self, now: Instant) {
        while let Some(Reverse((at, ..))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, _, kind, key, gen))) = self.timers.pop() else {
                break;
            };
            let Some(t) = self.targets.get(&key) else {
                continue;
            };
            if t.gen != gen {
                continue;
            }
            match kind {
                TimerKind::Release => self.on_release(&key, now),
                TimerKind::Probe => self.start_probe(key, now),
            }
        }
    }
}
