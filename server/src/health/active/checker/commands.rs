//! The scheduler's commands: the seed calls' results and the inspection of its state.

use std::sync::Arc;
use std::time::Duration;

use dlb::proto;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Checker, Key, Target};
use crate::health::active::state::Health;
use crate::Error;

/// What the scheduler is asked by the rest of the server.
#[derive(Debug)]
pub(crate) enum Command {
    /// `health_check_passed` / `health_check_failed` on a backend: one result.
    Report {
        service: String,
        server_id: String,
        passed: bool,
        reply: oneshot::Sender<ReportReply>,
    },
    /// The checker's view of every checked backend of a service (`GetHealth`).
    InspectService {
        service: String,
        reply: oneshot::Sender<Vec<(String, TargetView)>>,
    },
    /// The checker's view of one backend (tests, `dlbctl`).
    Inspect {
        service: String,
        server_id: String,
        reply: oneshot::Sender<Option<TargetView>>,
    },
}

/// The answer to [`Command::Report`].
#[derive(Debug)]
pub(crate) enum ReportReply {
    /// The backend is not under active checks: the seed call sets the admin source.
    NotChecked,
    /// The result was recorded; when it changed the probe verdict, the write's outcome follows.
    Recorded(Option<oneshot::Receiver<Result<proto::Version, Error>>>),
}

/// What the checker holds about one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetView {
    /// The state machine's state.
    pub health: Health,
    /// Consecutive (passes, failures) counted towards a change.
    pub counts: (u32, u32),
    /// The verdict last written to the probe source.
    pub published: proto::Verdict,
    /// The last result's detail.
    pub last_detail: String,
    /// The last probe's round-trip time.
    pub last_rtt: Option<Duration>,
    /// The round-trip time of the last probe that passed (adaptive weights compare it).
    pub last_pass_rtt: Option<Duration>,
    /// Whether flap damping holds the backend down now.
    pub held_down: bool,
    /// Hold-downs in a row so far.
    pub hold_downs: u32,
    /// Whether this replica probes the backend (else another live replica does, and this view
    /// follows the verdict it stored).
    pub probed: bool,
    /// The replica that probes it, by the current member set.
    pub prober: String,
    /// Probes this replica started on it.
    pub probes: u64,
}

impl Target {
    fn view(&self, now: Instant, prober: String) -> TargetView {
        TargetView {
            probed: self.probed,
            prober,
            probes: self.probes,
            health: self.machine.state(),
            counts: self.machine.counts(),
            published: self.published,
            last_detail: self.last_detail.clone(),
            last_rtt: self.last_rtt,
            last_pass_rtt: self.last_pass_rtt,
            held_down: self.damper.held_until(now).is_some(),
            hold_downs: self.damper.repeats(),
        }
    }
}

impl Checker {
    pub(super) fn on_command(&mut self, cmd: Command) {
        // Commands follow writes the caller waited for: see the newest state first.
        self.catch_up();
        match cmd {
            Command::Report {
                service,
                server_id,
                passed,
                reply,
            } => {
                let key: Key = (service.as_str().into(), server_id.as_str().into());
                let r = if self.targets.contains_key(&key) {
                    let detail = if passed {
                        "health_check_passed"
                    } else {
                        "health_check_failed"
                    };
                    ReportReply::Recorded(self.record(
                        &key,
                        passed,
                        detail.to_owned(),
                        Instant::now(),
                    ))
                } else {
                    ReportReply::NotChecked
                };
                let _ = reply.send(r);
            }
            Command::InspectService { service, reply } => {
                let now = Instant::now();
                let service: Arc<str> = service.as_str().into();
                let mut ids: Vec<Arc<str>> = self
                    .by_service
                    .get(&service)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default();
                ids.sort();
                let views = ids
                    .into_iter()
                    .filter_map(|id| {
                        let t = self.targets.get(&(service.clone(), id.clone()))?;
                        let prober = self.prober(&service, &id);
                        Some((id.to_string(), t.view(now, prober)))
                    })
                    .collect();
                let _ = reply.send(views);
            }
            Command::Inspect {
                service,
                server_id,
                reply,
            } => {
                let key: Key = (service.as_str().into(), server_id.as_str().into());
                let now = Instant::now();
                let prober = self.prober(&key.0, &key.1);
                let view = self.targets.get(&key).map(|t| t.view(now, prober));
                let _ = reply.send(view);
            }
        }
    }
}
