//! One followed service as the session task holds it ([`Entry`]): the backend records, policy
//! and version the control plane sent, and the picker built from them.
//!
//! Updates are *staged* ([`Entry::stage`]: validated, checked against the held version, applied
//! to the records) and *flushed* ([`Entry::flush`]: one picker built for the newest state and
//! published), so a burst of updates costs one build. The rule that protects a service from
//! being emptied by a control plane that lost its state (see the `session` module docs) is
//! decided per update, as if each had been published on its own.
//!
//! **Restart flooding.** A full snapshot from another epoch (a restarted control plane), or any
//! update while one is held, that would keep fewer than half of the eligible backends the
//! published snapshot routes to is held back: the SDK keeps routing on what it has (marked
//! stale) until the control plane's state covers at least half of them again (backends
//! re-registering) or for [`HOLD_GRACE`] (30 s), whichever comes first. Each hold is counted
//! (`ServiceStats::held_back`) and logged. An empty update is the extreme case.

// Wire messages are built with `..Default::default()` even when every field is named today: the
// API grows by adding fields, and this code must keep compiling when one is added.
#![allow(clippy::needless_update)]

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dlb::balance::{Picker, StickyTable, MAX_BACKENDS};
use dlb::locality::ZoneKey;
use dlb::model;
use dlb::proto;
use dlb::routing;

use crate::locality::LocalityStatus;
use crate::state::{ServiceState, Snapshot, Version};

/// Task-owned state of one service.
pub(super) struct Entry {
    pub(super) state: Arc<ServiceState>,
    /// The records as the control plane has them at `version`, by id.
    records: BTreeMap<String, proto::Server>,
    policy: Option<proto::Policy>,
    /// The version `records` corresponds to (what we resubscribe with).
    pub(super) version: Version,
    /// The last picker built (the published one unless an update is held back).
    picker: Option<Arc<Picker>>,
    /// The session-affinity table while the policy is sticky (kept across updates).
    sticky: Option<Arc<StickyTable>>,
    /// Whether the last load report sent for this service named any backend (an empty report
    /// is then needed once, to zero the server's view; after that empty reports are skipped).
    reported_load: bool,
    /// Whether staged updates changed the state since the last build (`flush` builds and
    /// publishes it).
    pub(super) dirty: bool,
    /// When the current hold began (an update is held back; see [`HOLD_GRACE`]).
    held_since: Option<tokio::time::Instant>,
    /// The in-flight counts of the other SDKs, as last pushed (`GlobalLoad`), by backend id.
    others: std::collections::HashMap<String, u64>,
    /// The demand share per client zone, as last pushed (`GlobalLoad.zone_demand`, checked by
    /// [`super::demand::sanitize`]); empty: not known.
    demand: Vec<(ZoneKey, f64)>,
    /// This SDK's zone (`ClientBuilder::locality`), for zone-aware routing.
    zone: Option<ZoneKey>,
    /// The grouping of `picker` when it is grouped by locality (re-planned on each push).
    layout: Option<routing::Layout>,
    /// Slow start: when the picker must be rebuilt for a ramp to progress (see
    /// `dlb::slow_start`); `None` when nothing ramps.
    pub(super) ramp_at: Option<tokio::time::Instant>,
    /// The circuit breakers built with `picker` (see [`crate::breaker`]).
    breakers: Option<Arc<crate::breaker::Breakers>>,
}

/// How long an update held back by the restart-flooding rule is held at most: after this the
/// SDK routes on what the control plane says even if it covers few of the backends it had.
pub(super) const HOLD_GRACE: Duration = Duration::from_secs(30);

impl Entry {
    /// A fresh entry of `state` for an SDK in `zone` (zone-aware routing; `None`: no zone
    /// preference).
    pub(super) fn new(state: Arc<ServiceState>, zone: Option<ZoneKey>) -> Self {
        Self {
            state,
            records: BTreeMap::new(),
            policy: None,
            version: Version::default(),
            picker: None,
            sticky: None,
            reported_load: false,
            dirty: false,
            held_since: None,
            others: std::collections::HashMap::new(),
            demand: Vec::new(),
            zone,
            layout: None,
            ramp_at: None,
            breakers: None,
        }
    }

    /// A slow-start tick: rebuilds the picker (same records, weights ramped at the current
    /// time) when `ramp_at` has passed.
    pub(super) fn ramp_tick(&mut self, now: tokio::time::Instant) {
        if self.ramp_at.is_some_and(|t| now >= t) {
            self.ramp_at = None;
            self.dirty = true;
            if let Err(e) = self.flush() {
                tracing::warn!(service = %self.state.name, error = %e, "slow-start rebuild failed");
            }
        }
    }

    /// The demand share per client zone last pushed for this service (empty: not known), as
    /// the locality plan reads it.
    #[cfg(test)]
    pub(super) fn zone_demand(&self) -> Vec<proto::ZoneDemand> {
        self.demand
            .iter()
            .map(|(z, share)| proto::ZoneDemand {
                locality: Some(z.to_proto()),
                share: *share,
            })
            .collect()
    }

    /// The other SDKs' in-flight counts per backend id last pushed (absent: 0).
    #[cfg(test)]
    pub(super) fn others_in_flight(&self) -> &std::collections::HashMap<String, u64> {
        &self.others
    }

    /// Applies a `GlobalLoad` push: every backend's baseline becomes the other SDKs' count
    /// (0 when left out), so least connections compares `own live count + others`; the zone
    /// demand replaces the one held.
    pub(super) fn global_load(&mut self, g: &proto::GlobalLoad) {
        self.demand = super::demand::sanitize(&g.zone_demand)
            .iter()
            .filter_map(|d| Some((ZoneKey::of(d.locality.as_ref())?, d.share)))
            .collect();
        self.others = g
            .backends
            .iter()
            .map(|b| {
                (
                    b.server_id.clone(),
                    b.in_flight.min(crate::global::MAX_OTHERS_IN_FLIGHT),
                )
            })
            .collect();
        if let Some(picker) = &self.picker {
            crate::global::apply_baselines(picker, &self.others);
            // Demand and load moved: re-plan the locality shares (no rebuild).
            if let (Some(layout), Some(policy)) = (self.layout.as_mut(), self.policy.as_ref()) {
                let client = routing::Client {
                    zone: self.zone.as_ref(),
                    demand: &self.demand,
                };
                let plan = routing::replan(picker, layout, policy, &client);
                *self.state.locality.lock() = Some(Arc::new(LocalityStatus::of(
                    self.zone.as_ref(),
                    &self.demand,
                    &layout.groups,
                    &plan,
                )));
            }
        }
    }

    pub(super) fn subscription(&self) -> proto::ServiceSubscription {
        proto::ServiceSubscription {
            service: self.state.name.clone(),
            known: (self.version.epoch != 0).then(|| self.version.into()),
            ..Default::default()
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

    /// Applies one update and publishes the result at once; `Err` carries the Nack detail
    /// (nothing changed then).
    #[cfg(test)]
    fn apply(&mut self, upd: &proto::ServiceUpdate) -> Result<(), String> {
        self.stage(upd)?;
        self.flush()
    }

    /// Whether `upd` would take this service back in time: an update of the epoch held whose
    /// version is older than the version held (a control plane behind the one this client came
    /// from). Such an update is refused — never applied, never nacked — and the session leaves
    /// for another endpoint. Returns `(held, offered)`.
    pub(super) fn regression(&self, upd: &proto::ServiceUpdate) -> Option<(Version, Version)> {
        let offered: Version = upd.version?.into();
        let held = self.version;
        (held.epoch != 0 && offered.epoch == held.epoch && offered.version < held.version)
            .then_some((held, offered))
    }

    /// Applies an update to the bookkeeping (records, policy, version) without building a
    /// picker: [`Entry::flush`] builds and publishes once however many updates were staged.
    /// `Err` carries the Nack detail (nothing changed then).
    ///
    /// An update that would empty the service suspiciously (see the module docs) is decided
    /// and held back at once, as if every earlier update had been published on its own: what
    /// was staged before it is published first.
    pub(super) fn stage(&mut self, upd: &proto::ServiceUpdate) -> Result<(), String> {
        let version: Version = upd
            .version
            .ok_or_else(|| "update without version".to_owned())?
            .into();
        let policy = if upd.full {
            upd.policy
                .clone()
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
            match (upd.policy.clone(), self.policy.clone()) {
                (Some(p), _) | (None, Some(p)) => p,
                (None, None) => return Err("delta without a policy to apply on".into()),
            }
        };
        model::validate_policy(&policy).map_err(|e| e.to_string())?;
        for s in &upd.upserts {
            model::validate_server(s).map_err(|e| e.to_string())?;
        }
        // What the published snapshot would be had every staged update been published: a
        // staged state is published fresh (not stale), with its records.
        let (stale, publishes_backends) = if self.dirty {
            (false, !self.records.is_empty())
        } else {
            (self.state.snapshot.load().stale, self.publishes_backends())
        };
        // An update from a control plane of another history (or while one is held) may come
        // from a restarted, still-empty store: it is judged against what is published.
        let candidate =
            publishes_backends && (stale || (upd.full && self.version.epoch != version.epoch));
        if candidate {
            self.flush()?;
        }
        // Apply to the records in place, keeping an undo log: an update the picker could not
        // hold must leave the held state untouched.
        let mut undo: Vec<(String, Option<proto::Server>)> = Vec::new();
        let previous_records = if upd.full {
            Some(std::mem::take(&mut self.records))
        } else {
            for id in &upd.removals {
                if let Some(old) = self.records.remove(id) {
                    undo.push((id.clone(), Some(old)));
                }
            }
            None
        };
        for s in &upd.upserts {
            let old = self.records.insert(s.server_id.clone(), s.clone());
            if previous_records.is_none() {
                undo.push((s.server_id.clone(), old));
            }
        }
        if self.records.len() > MAX_BACKENDS {
            let detail = format!(
                "{} backends, at most {MAX_BACKENDS} are supported",
                self.records.len()
            );
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
            return Err(detail);
        }

        let suspicious = candidate && self.floods() && !self.hold_expired();
        // Everything validated: commit.
        self.policy = Some(policy);
        self.version = version;
        let stats = &self.state.stats;
        if upd.full {
            stats.full_updates.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.delta_updates.fetch_add(1, Ordering::Relaxed);
        }
        if suspicious {
            stats.held_back.fetch_add(1, Ordering::Relaxed);
            if self.held_since.is_none() {
                self.held_since = Some(tokio::time::Instant::now());
            }
            tracing::warn!(service = %self.state.name, %version,
                "holding back an update that would remove most of the backends routed to; routing on the previous snapshot");
            self.mark_stale();
        } else {
            self.held_since = None;
            self.dirty = true;
        }
        Ok(())
    }

    /// Whether the staged records keep fewer than half of the eligible backends the published
    /// snapshot routes to (by id, still eligible): the restart-flooding rule. `O(n)`.
    fn floods(&self) -> bool {
        let snap = self.state.snapshot.load();
        let Some(picker) = snap.picker.as_ref() else {
            return false;
        };
        let mut routed = 0usize;
        let mut kept = 0usize;
        for b in picker.backends().iter().filter(|b| b.is_eligible()) {
            routed += 1;
            if self.records.get(b.id()).is_some_and(model::is_eligible) {
                kept += 1;
            }
        }
        kept * 2 < routed
    }

    fn hold_expired(&self) -> bool {
        self.held_since.is_some_and(|t| t.elapsed() >= HOLD_GRACE)
    }

    /// Publishes a held-back state once the hold has lasted [`HOLD_GRACE`] (the session calls
    /// it periodically). Returns whether it did.
    pub(super) fn release_expired_hold(&mut self) -> bool {
        if !self.hold_expired() || !self.state.snapshot.load().stale {
            return false;
        }
        tracing::warn!(service = %self.state.name, version = %self.version,
            "releasing a held-back update after the grace period");
        self.held_since = None;
        if self.policy.is_none() {
            return false;
        }
        self.dirty = true;
        self.flush().is_ok()
    }

    /// Builds the picker of the staged state (carrying in-flight counts over from the last
    /// picker) and publishes it; nothing to do when nothing was staged since the last build.
    ///
    /// A build that fails (not expected: `stage` validated every record and the size) leaves
    /// the published snapshot in place and forgets the staged state (records, policy and
    /// version), so the control plane resends it in full; `Err` carries the Nack detail.
    pub(super) fn flush(&mut self) -> Result<(), String> {
        if !self.dirty {
            return Ok(());
        }
        self.dirty = false;
        let Some(policy) = self.policy.clone() else {
            return Ok(());
        };
        let client = routing::Client {
            zone: self.zone.as_ref(),
            demand: &self.demand,
        };
        let built = routing::build_for(
            self.picker.as_deref(),
            &policy,
            self.records.values(),
            &client,
        );
        let picker = match built {
            Ok((p, layout)) => {
                self.layout = layout;
                Arc::new(p)
            }
            Err(e) => {
                tracing::error!(service = %self.state.name, error = %e,
                    "could not build a picker for a validated state; asking for a full snapshot");
                self.records.clear();
                self.policy = None;
                self.version = Version::default();
                return Err(e.to_string());
            }
        };
        self.state.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
        self.ramp_at =
            dlb::slow_start::next_tick(&policy, self.records.values(), dlb::slow_start::now_ms())
                .map(|d| tokio::time::Instant::now() + d);
        // Backends new to this picker start from the pushed global counts too.
        crate::global::apply_baselines(&picker, &self.others);
        // The plan again, now that the pushed in-flight counts are in (and for the status).
        *self.state.locality.lock() = self.layout.as_mut().map(|layout| {
            let client = routing::Client {
                zone: self.zone.as_ref(),
                demand: &self.demand,
            };
            let plan = routing::replan(&picker, layout, &policy, &client);
            Arc::new(LocalityStatus::of(
                self.zone.as_ref(),
                &self.demand,
                &layout.groups,
                &plan,
            ))
        });
        crate::global::panic_event(
            &self.state,
            self.picker.as_deref().map(|p| p.panic_state()),
            picker.panic_state(),
        );
        self.breakers = dlb::circuit::config(&policy).map(|cfg| {
            Arc::new(crate::breaker::Breakers::build(
                cfg,
                &picker,
                self.breakers.as_deref().zip(self.picker.as_deref()),
            ))
        });
        self.picker = Some(picker.clone());
        self.sticky = routing::carry_sticky(self.sticky.as_ref(), &policy);
        self.state.publish(Snapshot {
            version: self.version,
            picker: Some(picker),
            sticky: self.sticky.clone(),
            breakers: self.breakers.clone(),
            policy: Some(policy),
            not_found: false,
            stale: false,
        });
        Ok(())
    }

    /// The state to keep in the snapshot file: a full snapshot of the records at `version`,
    /// when the published state is fresh (neither held back nor itself restored from the file)
    /// and nothing is staged but unpublished.
    pub(super) fn saved_form(&self) -> Option<proto::ServiceUpdate> {
        let policy = self.policy.clone()?;
        if self.version.epoch == 0 || self.dirty || self.state.snapshot.load().stale {
            return None;
        }
        Some(proto::ServiceUpdate {
            service: self.state.name.clone(),
            version: Some(self.version.into()),
            full: true,
            policy: Some(policy),
            upserts: self.records.values().cloned().collect(),
            ..Default::default()
        })
    }

    /// Re-publishes the current snapshot with the stale flag set.
    pub(super) fn mark_stale(&self) {
        let old = self.state.snapshot.load();
        self.state.publish(Snapshot {
            version: old.version,
            picker: old.picker.clone(),
            sticky: old.sticky.clone(),
            breakers: old.breakers.clone(),
            policy: old.policy.clone(),
            not_found: false,
            stale: true,
        });
    }

    pub(super) fn not_found(&mut self, nf: &proto::ServiceNotFound) {
        // Decide on what would be published had every staged update been: publish it first.
        // (Should that fail, the state is forgotten below anyway.)
        let _ = self.flush();
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
        self.breakers = None;
        self.state.publish(Snapshot {
            version: Version { epoch, version: 0 },
            not_found: true,
            ..Snapshot::default()
        });
    }

    /// The load report due for this service, if any: `None` when there is no picker, or when
    /// there is nothing to report and the previous report was empty too.
    pub(super) fn load_report(&mut self, interval: Duration) -> Option<proto::LoadReport> {
        let snap = self.state.snapshot.load();
        let picker = snap.picker.clone()?;
        let breakers = snap.breakers.clone();
        drop(snap);
        let in_flight = crate::state::local::in_flight(&self.state, &picker);
        let mut backends = Vec::new();
        for (i, (b, in_flight)) in picker.backends().iter().zip(in_flight).enumerate() {
            let o = b.load().take_outcomes();
            let circuit = breakers
                .as_ref()
                .and_then(|br| br.state(i))
                .map(|s| s.to_proto());
            let tripped = circuit.is_some_and(|c| c != proto::CircuitState::Closed);
            if in_flight == 0 && o.successes == 0 && o.failures == 0 && !tripped {
                continue;
            }
            let latency = (o.latency_count > 0).then(|| proto::LatencySummary {
                count: o.latency_count,
                mean_ms: o.latency_sum_us as f64 / o.latency_count as f64 / 1000.0,
                max_ms: o.latency_max_us as f64 / 1000.0,
                ..Default::default()
            });
            backends.push(proto::BackendLoad {
                server_id: b.id().to_owned(),
                in_flight,
                successes: o.successes,
                failures: o.failures,
                latency,
                circuit: circuit.map_or(0, |c| c as i32),
                ..Default::default()
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
            ..Default::default()
        })
    }
}

/// Applies `update` (a full snapshot) to a fresh entry of `state`, carrying the in-flight and
/// outcome counters of the published picker over by backend id, and publishes it (or rejects
/// it with its Nack detail); no session is involved. See `Client::detached_service`.
pub(crate) fn apply_detached(
    state: &Arc<ServiceState>,
    update: &proto::ServiceUpdate,
) -> Result<(), String> {
    let mut entry = Entry::new(state.clone(), None);
    entry.picker = state.snapshot.load().picker.clone();
    entry.stage(update)?;
    entry.flush()
}

#[cfg(test)]
mod tests;
