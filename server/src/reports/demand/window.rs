//! The pure parts of zone demand: the sliding window of calls one client zone made on a
//! service, and the shares computed from every zone's calls and followers.
//!
//! A [`Window`] holds [`BUCKETS`] one-second buckets: a report's calls go into the bucket of the
//! second it arrived in; the window's total is the sum of the buckets of the last [`BUCKETS`]
//! seconds (older buckets are zeroed as time moves on). O(1) to add, O(BUCKETS) to read.

use std::time::Duration;

/// One-second buckets in a window.
pub const BUCKETS: usize = 10;
/// The span of a window: demand is the calls of the last 10 s.
pub const WINDOW: Duration = Duration::from_secs(BUCKETS as u64);

/// A client zone: the (region, zone) of a locality (`sub_zone` is not routed on). A locality
/// with a region and no zone is the zone `(region, "")`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ZoneKey {
    /// The region.
    pub region: String,
    /// The zone within the region (may be empty).
    pub zone: String,
}

impl ZoneKey {
    /// The zone of a (normalised) locality; `None` when it has none.
    pub fn of(locality: Option<&dlb::proto::Locality>) -> Option<Self> {
        let l = locality.filter(|l| !(l.region.is_empty() && l.zone.is_empty()))?;
        Some(Self {
            region: l.region.clone(),
            zone: l.zone.clone(),
        })
    }

    /// The wire form (`sub_zone` empty).
    pub fn to_proto(&self) -> dlb::proto::Locality {
        dlb::proto::Locality {
            region: self.region.clone(),
            zone: self.zone.clone(),
            sub_zone: String::new(),
        }
    }

    /// The metric label: `region/zone`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.region, self.zone)
    }
}

/// Calls per second over the last [`BUCKETS`] seconds. See the module docs.
#[derive(Debug, Default, Clone)]
pub struct Window {
    buckets: [u64; BUCKETS],
    /// The second (since the tracker started) the newest bucket covers.
    head: u64,
}

impl Window {
    /// Moves the window to `now` (seconds): buckets older than the window are zeroed.
    fn advance(&mut self, now: u64) {
        if now <= self.head {
            return;
        }
        let steps = now - self.head;
        if steps >= BUCKETS as u64 {
            self.buckets = [0; BUCKETS];
        } else {
            for s in 1..=steps {
                self.buckets[((self.head + s) % BUCKETS as u64) as usize] = 0;
            }
        }
        self.head = now;
    }

    /// Adds `calls` made at second `now` (saturating).
    pub fn add(&mut self, now: u64, calls: u64) {
        self.advance(now);
        let b = &mut self.buckets[(now % BUCKETS as u64) as usize];
        *b = b.saturating_add(calls);
    }

    /// The calls of the last [`BUCKETS`] seconds as of `now` (saturating).
    pub fn total(&mut self, now: u64) -> u64 {
        self.advance(now);
        self.buckets.iter().fold(0u64, |a, n| a.saturating_add(*n))
    }
}

/// One zone's inputs: calls in the window and sessions of the zone following the service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Calls (successes + failures) in the window.
    pub calls: u64,
    /// Sessions of the zone that follow the service.
    pub followers: u64,
}

/// The demand share per zone, sorted by zone: each zone's calls over all calls; before any call
/// is counted (all zero), each zone's followers over all followers. Zones with neither calls
/// nor followers are left out; the shares of the zones listed sum to 1 (empty when nothing is
/// known).
pub fn shares<'a>(zones: impl IntoIterator<Item = (&'a ZoneKey, Counts)>) -> Vec<(ZoneKey, f64)> {
    let mut zones: Vec<(&ZoneKey, Counts)> = zones
        .into_iter()
        .filter(|(_, c)| c.calls > 0 || c.followers > 0)
        .collect();
    zones.sort_by(|a, b| a.0.cmp(b.0));
    let calls: f64 = zones.iter().map(|(_, c)| c.calls as f64).sum();
    let followers: f64 = zones.iter().map(|(_, c)| c.followers as f64).sum();
    let (of, total): (fn(&Counts) -> u64, f64) = if calls > 0.0 {
        (|c| c.calls, calls)
    } else {
        (|c| c.followers, followers)
    };
    if total <= 0.0 {
        return Vec::new();
    }
    zones
        .into_iter()
        .map(|(z, c)| (z.clone(), of(&c) as f64 / total))
        .collect()
}

/// Whether `new` must be pushed to replace `old`: the zone set changed, or a share moved by
/// more than `threshold` (absolute, e.g. 0.01 for 1 %).
pub fn moved(old: &[(ZoneKey, f64)], new: &[(ZoneKey, f64)], threshold: f64) -> bool {
    old.len() != new.len()
        || old
            .iter()
            .zip(new)
            .any(|((za, a), (zb, b))| za != zb || (a - b).abs() > threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn z(name: &str) -> ZoneKey {
        ZoneKey {
            region: "eu".into(),
            zone: name.into(),
        }
    }

    #[test]
    fn the_window_keeps_the_last_ten_seconds() {
        let mut w = Window::default();
        w.add(0, 5);
        w.add(3, 7);
        assert_eq!(w.total(3), 12);
        assert_eq!(w.total(9), 12);
        // Second 0 leaves the window at second 10, second 3 at 13.
        assert_eq!(w.total(10), 7);
        w.add(12, 1);
        assert_eq!(w.total(12), 8);
        assert_eq!(w.total(13), 1);
        assert_eq!(w.total(22), 0);
        // A long gap clears everything at once; the same bucket index is reused correctly.
        w.add(100, 4);
        w.add(110, 6);
        assert_eq!(w.total(110), 6);
        w.add(111, u64::MAX);
        assert_eq!(w.total(111), u64::MAX);
        // Reading in the past changes nothing.
        assert_eq!(w.total(50), u64::MAX);
    }

    #[test]
    fn shares_from_calls_else_followers() {
        let (a, b, c) = (z("a"), z("b"), z("c"));
        let counts = |ca, fa, cb, fb| {
            vec![
                (
                    &a,
                    Counts {
                        calls: ca,
                        followers: fa,
                    },
                ),
                (
                    &b,
                    Counts {
                        calls: cb,
                        followers: fb,
                    },
                ),
                (&c, Counts::default()),
            ]
        };
        // Before any call: followers (2 in a, 1 in b); c has neither and is left out.
        let s = shares(counts(0, 2, 0, 1));
        assert_eq!(s.len(), 2);
        assert!((s[0].1 - 2.0 / 3.0).abs() < 1e-12 && s[0].0 == a, "{s:?}");
        assert!((s[1].1 - 1.0 / 3.0).abs() < 1e-12 && s[1].0 == b, "{s:?}");
        // Calls win over followers: a zone with followers and no calls has share 0.
        let s = shares(counts(0, 2, 30, 1));
        assert_eq!(s, vec![(a.clone(), 0.0), (b.clone(), 1.0)]);
        let s = shares(counts(10, 1, 30, 1));
        assert_eq!(s, vec![(a.clone(), 0.25), (b.clone(), 0.75)]);
        assert!((s.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);
        // Huge counts still sum to 1.
        let s = shares(counts(u64::MAX, 0, u64::MAX, 0));
        assert_eq!(s, vec![(a.clone(), 0.5), (b.clone(), 0.5)]);
        assert!(shares(counts(0, 0, 0, 0)).is_empty());
    }

    #[test]
    fn only_moves_past_the_threshold_or_new_zones_count() {
        let (a, b) = (z("a"), z("b"));
        let old = vec![(a.clone(), 0.5), (b.clone(), 0.5)];
        assert!(!moved(
            &old,
            &[(a.clone(), 0.505), (b.clone(), 0.495)],
            0.01
        ));
        assert!(moved(&old, &[(a.clone(), 0.52), (b.clone(), 0.48)], 0.01));
        assert!(moved(&old, &[(a.clone(), 1.0)], 0.01));
        assert!(moved(&old, &[(a.clone(), 0.5), (z("c"), 0.5)], 0.01));
        assert!(moved(&[], &[(a, 1.0)], 0.01));
    }

    #[test]
    fn zone_keys() {
        assert_eq!(ZoneKey::of(None), None);
        assert_eq!(ZoneKey::of(Some(&Default::default())), None);
        let l = dlb::proto::Locality {
            region: "eu".into(),
            zone: "a".into(),
            sub_zone: "rack".into(),
        };
        let k = ZoneKey::of(Some(&l)).expect("a zone");
        assert_eq!(k, z("a"));
        assert_eq!(k.to_proto().sub_zone, "");
        assert_eq!(k.label(), "eu/a");
    }
}
