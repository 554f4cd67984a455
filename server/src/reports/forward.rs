//! Load reports on their way to the leader: the sum of this replica's sessions' call outcomes
//! since the last forward, per service and backend.
//!
//! With several replicas, outlier and adaptive-weight decisions are the leader's (see the parent
//! module), but SDKs report to whichever replica they are connected to. A replica that does not
//! lead adds each report's outcomes to its [`Outbox`] and, every [`FORWARD_EVERY`], hands the
//! sums to [`crate::replicas::Coordination::forward`] (on etcd: one put of
//! `<prefix>/loads/<replica>` per batch, attached to its membership lease; `docs/etcd.md`,
//! "Load reports"). The leader feeds every batch it receives to its detectors and latency
//! windows as if one SDK had reported it.
//!
//! Only what a decision uses is kept: services whose policy has outlier detection or adaptive
//! weights on, backends of the service (by the cache), and per backend the successes, the
//! failures and the latency count, sum and maximum — the sums of reports are a report, so the
//! leader needs no new rule. What is lost is the order of outcomes within one period (a
//! consecutive-failures streak broken by a success in the same second is broken either way).
//!
//! Bounds: at most [`MAX_ENTRIES`] backend entries are held (more are dropped and counted until
//! the next forward); a forward is split into batches of at most [`MAX_BATCH_BYTES`] encoded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dlb::proto;
use prost::Message;

pub use crate::replicas::Batch;

/// How often a replica that does not lead forwards its sums.
pub const FORWARD_EVERY: Duration = Duration::from_secs(1);
/// Backend entries held at most between two forwards.
pub const MAX_ENTRIES: usize = 200_000;
/// Largest encoded batch (etcd refuses requests over 1.5 MiB by default).
pub const MAX_BATCH_BYTES: usize = 512 * 1024;

/// One backend's sums since the last forward.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    successes: u64,
    failures: u64,
    latency_count: u64,
    /// Σ count × mean, milliseconds.
    latency_total_ms: f64,
    latency_max_ms: f64,
}

/// The sums waiting to be forwarded. See the module docs.
#[derive(Debug, Default)]
pub struct Outbox {
    services: HashMap<Arc<str>, HashMap<String, Sums>>,
    entries: usize,
    dropped: u64,
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one report's outcomes for the backends `known` says belong to `service`. Latency
    /// summaries that are not finite or are negative are left out (as the leader would).
    pub fn add(
        &mut self,
        service: &Arc<str>,
        loads: &[proto::BackendLoad],
        known: impl Fn(&str) -> bool,
    ) {
        let backends = self.services.entry(service.clone()).or_default();
        for l in loads {
            let latency = l
                .latency
                .as_ref()
                .filter(|s| s.count > 0 && s.mean_ms.is_finite() && s.mean_ms >= 0.0);
            if l.successes == 0 && l.failures == 0 && latency.is_none() {
                continue;
            }
            let sums = match backends.get_mut(&l.server_id) {
                Some(s) => s,
                None => {
                    if self.entries >= MAX_ENTRIES || !known(&l.server_id) {
                        self.dropped += u64::from(self.entries >= MAX_ENTRIES);
                        continue;
                    }
                    self.entries += 1;
                    backends.entry(l.server_id.clone()).or_default()
                }
            };
            sums.successes = sums.successes.saturating_add(l.successes);
            sums.failures = sums.failures.saturating_add(l.failures);
            if let Some(s) = latency {
                let mean = s.mean_ms.min(super::MAX_MEAN_MS);
                sums.latency_count = sums.latency_count.saturating_add(s.count);
                sums.latency_total_ms += s.count as f64 * mean;
                if s.max_ms.is_finite() {
                    sums.latency_max_ms = sums.latency_max_ms.max(s.max_ms.min(super::MAX_MEAN_MS));
                }
            }
        }
        if backends.is_empty() {
            self.services.remove(service);
        }
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Entries dropped because the outbox was full, since the last [`Outbox::take`].
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Empties the outbox into batches of load reports, each at most [`MAX_BATCH_BYTES`]
    /// encoded (one report may be split over several batches).
    pub fn take(&mut self) -> Vec<Vec<proto::LoadReport>> {
        let services = std::mem::take(&mut self.services);
        self.entries = 0;
        self.dropped = 0;
        // Room for the replica id field of the batch.
        let budget = MAX_BATCH_BYTES - crate::replicas::MAX_ID_LEN - 8;
        let mut batches = Vec::new();
        let mut batch: Vec<proto::LoadReport> = Vec::new();
        let mut size = 0usize;
        for (service, backends) in services {
            let mut report = proto::LoadReport {
                service: service.to_string(),
                ..Default::default()
            };
            let mut report_size = report.encoded_len();
            for (id, s) in backends {
                let load = to_load(id, s);
                // Tag, length prefix and the message.
                let n = load.encoded_len() + 1 + prost::length_delimiter_len(load.encoded_len());
                if size + report_size + n + 8 > budget && !report.backends.is_empty() {
                    batch.push(std::mem::replace(
                        &mut report,
                        proto::LoadReport {
                            service: service.to_string(),
                            ..Default::default()
                        },
                    ));
                    batches.push(std::mem::take(&mut batch));
                    size = 0;
                    report_size = report.encoded_len();
                }
                report.backends.push(load);
                report_size += n;
            }
            if size + report_size + 8 > budget && !batch.is_empty() {
                batches.push(std::mem::take(&mut batch));
                size = 0;
            }
            size += report_size + 8;
            batch.push(report);
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        batches
    }
}

fn to_load(id: String, s: Sums) -> proto::BackendLoad {
    let latency = (s.latency_count > 0).then(|| proto::LatencySummary {
        count: s.latency_count,
        mean_ms: s.latency_total_ms / s.latency_count as f64,
        max_ms: s.latency_max_ms,
    });
    proto::BackendLoad {
        server_id: id,
        successes: s.successes,
        failures: s.failures,
        latency,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(id: &str, ok: u64, failed: u64, latency: Option<(u64, f64)>) -> proto::BackendLoad {
        proto::BackendLoad {
            server_id: id.into(),
            successes: ok,
            failures: failed,
            latency: latency.map(|(count, mean_ms)| proto::LatencySummary {
                count,
                mean_ms,
                max_ms: mean_ms * 2.0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn reports_sum_per_backend_and_unknown_backends_are_left_out() {
        let mut out = Outbox::new();
        let web: Arc<str> = "web".into();
        let known = |id: &str| id != "ghost";
        out.add(
            &web,
            &[load("a", 3, 1, Some((4, 10.0))), load("ghost", 5, 5, None)],
            known,
        );
        out.add(
            &web,
            &[load("a", 1, 2, Some((4, 20.0))), load("b", 0, 0, None)],
            known,
        );
        assert!(!out.is_empty());
        let batches = out.take();
        assert!(out.is_empty());
        assert_eq!(batches.len(), 1);
        let reports = &batches[0];
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].service, "web");
        assert_eq!(reports[0].backends.len(), 1, "{reports:?}");
        let a = &reports[0].backends[0];
        assert_eq!((a.server_id.as_str(), a.successes, a.failures), ("a", 4, 3));
        let lat = a.latency.as_ref().expect("latency");
        assert_eq!(lat.count, 8);
        assert!((lat.mean_ms - 15.0).abs() < 1e-9, "{lat:?}");
        assert!((lat.max_ms - 40.0).abs() < 1e-9, "{lat:?}");
        assert!(out.take().is_empty());
    }

    #[test]
    fn bad_latencies_are_ignored_and_counts_saturate() {
        let mut out = Outbox::new();
        let s: Arc<str> = "s".into();
        out.add(&s, &[load("a", u64::MAX, 0, Some((1, f64::NAN)))], |_| true);
        out.add(&s, &[load("a", u64::MAX, 0, Some((1, -1.0)))], |_| true);
        let batches = out.take();
        let a = &batches[0][0].backends[0];
        assert_eq!(a.successes, u64::MAX);
        assert!(a.latency.is_none());
    }

    #[test]
    fn the_outbox_is_bounded_and_large_forwards_are_split() {
        let mut out = Outbox::new();
        let s: Arc<str> = "s".into();
        let loads: Vec<_> = (0..MAX_ENTRIES + 10)
            .map(|i| load(&format!("backend-{i:07}"), 1, 0, Some((1, 1.0))))
            .collect();
        out.add(&s, &loads, |_| true);
        assert_eq!(out.dropped(), 10);
        let batches = out.take();
        assert!(batches.len() > 1, "{} batches", batches.len());
        let mut total = 0;
        for b in &batches {
            let bytes = Batch {
                replica: "r".repeat(crate::replicas::MAX_ID_LEN),
                reports: b.clone(),
            }
            .encoded_len();
            assert!(bytes <= MAX_BATCH_BYTES, "{bytes} bytes");
            total += b.iter().map(|r| r.backends.len()).sum::<usize>();
        }
        assert_eq!(total, MAX_ENTRIES);
    }
}
