//! One probe's life in the checker: started under the in-flight bound, its outcome run through
//! the backend's state machine and flap damper, and transitions published to the writer.

use super::*;

impl Checker {
    pub(super) fn start_probe(&mut self, key: Key, now: Instant) {
        let Some(t) = self.targets.get_mut(&key) else {
            return;
        };
        if t.in_flight || !t.probed {
            return;
        }
        let kind = kind_name(&t.spec.kind);
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Overloaded: unknown, not a failure. Try again after the interval.
                self.metrics.probe(kind, "unknown");
                let delay = jitter(t.spec.interval, t.spec.jitter_percent);
                let gen = t.gen;
                self.push_timer(now + delay, TimerKind::Probe, key, gen);
                return;
            }
        };
        t.in_flight = true;
        t.probes += 1;
        let target = ProbeTarget {
            address: t.address.clone(),
            spec: t.spec.clone(),
        };
        let gen = t.gen;
        let timeout = t.spec.timeout;
        let prober = self.prober.clone();
        let tx = self.results_tx.clone();
        self.metrics.in_flight(1);
        // Ended probes are reaped here, so the set holds at most the probes in flight.
        while self.probes.try_join_next().is_some() {}
        self.probes.spawn(async move {
            let start = Instant::now();
            let outcome = match tokio::time::timeout(timeout, prober.probe(target)).await {
                Ok(o) => o,
                Err(_) => Outcome::Fail(format!("timeout after {} ms", timeout.as_millis())),
            };
            let rtt = start.elapsed();
            drop(permit);
            let _ = tx.send(ProbeDone {
                key,
                gen,
                kind,
                outcome,
                rtt,
            });
        });
    }

    pub(super) fn on_result(&mut self, done: ProbeDone) {
        self.metrics.in_flight(-1);
        let passed = matches!(done.outcome, Outcome::Pass(_));
        self.metrics
            .probe(done.kind, if passed { "pass" } else { "fail" });
        self.metrics.rtt(done.rtt.as_secs_f64());
        let now = Instant::now();
        let Some(t) = self.targets.get_mut(&done.key) else {
            return;
        };
        if t.gen != done.gen {
            return;
        }
        t.in_flight = false;
        t.last_rtt = Some(done.rtt);
        if passed {
            t.last_pass_rtt = Some(done.rtt);
        }
        let detail = match done.outcome {
            Outcome::Pass(d) => format!("{d}, rtt {:.1} ms", done.rtt.as_secs_f64() * 1e3),
            Outcome::Fail(d) => d,
        };
        self.record(&done.key, passed, detail, now);
        if let Some(t) = self.targets.get(&done.key) {
            let base = if t.damper.held_until(now).is_some()
                || (t.machine.state() == Health::Unhealthy && !t.machine.changing())
            {
                t.spec.down_interval
            } else if t.machine.changing() {
                t.spec.fast_interval
            } else {
                t.spec.interval
            };
            let delay = jitter(base, t.spec.jitter_percent);
            let gen = t.gen;
            self.push_timer(now + delay, TimerKind::Probe, done.key, gen);
        }
    }

    /// Feeds one result to a target; returns the write it caused, if any.
    pub(super) fn record(
        &mut self,
        key: &Key,
        passed: bool,
        detail: String,
        now: Instant,
    ) -> Option<oneshot::Receiver<Result<proto::Version, Error>>> {
        let t = self.targets.get_mut(key)?;
        t.last_detail = detail;
        let before = t.machine.state();
        if t.machine.record(passed).is_some() && before != Health::Unknown {
            if let Some(hold) = t.damper.on_transition(now) {
                let gen = t.gen;
                let repeats = t.damper.repeats();
                self.metrics.hold_down();
                tracing::warn!(service = %key.0, server_id = %key.1, hold_down_s = hold.as_secs_f64(), repeats, "backend flapping: held down");
                self.push_timer(now + hold, TimerKind::Release, key.clone(), gen);
            }
        }
        self.publish(key, now)
    }

    pub(super) fn on_release(&mut self, key: &Key, now: Instant) {
        let Some(t) = self.targets.get_mut(key) else {
            return;
        };
        if let Some(hold) = t.damper.on_hold_end(now) {
            let gen = t.gen;
            self.metrics.hold_down();
            tracing::warn!(service = %key.0, server_id = %key.1, hold_down_s = hold.as_secs_f64(), "backend still flapping: held down again");
            self.push_timer(now + hold, TimerKind::Release, key.clone(), gen);
        }
        self.publish(key, now);
    }

    /// Queues a write when the verdict the probe source should hold changed.
    pub(super) fn publish(
        &mut self,
        key: &Key,
        now: Instant,
    ) -> Option<oneshot::Receiver<Result<proto::Version, Error>>> {
        let t = self.targets.get_mut(key)?;
        let held = t.damper.held_until(now);
        let hold_no = if held.is_some() {
            t.damper.repeats()
        } else {
            0
        };
        let (verdict, detail) = if let Some(until) = held {
            (
                proto::Verdict::Unhealthy,
                format!(
                    "flapping: held down for {} s (hold-down #{})",
                    until.saturating_duration_since(now).as_secs_f64().ceil(),
                    t.damper.repeats()
                ),
            )
        } else {
            match t.machine.state() {
                Health::Unknown => (proto::Verdict::Unset, String::new()),
                Health::Healthy => (proto::Verdict::Healthy, t.last_detail.clone()),
                Health::Unhealthy => (proto::Verdict::Unhealthy, t.last_detail.clone()),
            }
        };
        if verdict == t.published && hold_no == t.published_hold {
            return None;
        }
        let changed = verdict != t.published;
        t.published = verdict;
        t.published_hold = hold_no;
        let state = crate::health::sources::probe_state(verdict, &detail);
        match verdict {
            _ if !changed => {}
            proto::Verdict::Healthy => self.metrics.transition("healthy"),
            proto::Verdict::Unhealthy => self.metrics.transition("unhealthy"),
            proto::Verdict::Unset => {}
        }
        tracing::info!(service = %key.0, server_id = %key.1, verdict = verdict.as_str_name(), detail = %state.detail, "probe verdict changed");
        let (tx, rx) = oneshot::channel();
        let _ = self.writes.send(Write {
            service: key.0.clone(),
            id: key.1.clone(),
            state,
            done: Some(tx),
        });
        Some(rx)
    }
}
