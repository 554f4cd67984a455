//! Zone demand summed over the replicas (etcd): each replica's sessions report to it alone, so
//! every replica posts its own counts and reads everyone's.
//!
//! Every [`SHARE_EVERY`] the [`share`] task (one per replica, only where there are other
//! replicas) posts this replica's counts ([`DemandTracker::local_counts`]: per service and zone,
//! the calls in its 10 s window and its followers) on the board
//! ([`crate::replicas::board::Board::post_demand`]: on etcd `<prefix>/demand/<replica-id>`,
//! attached to its membership lease, so a gone replica's post goes with it) when they changed,
//! then reads every post, keeps those of the other live members, sums them and hands the sums to
//! the tracker ([`DemandTracker::set_remote`]), which publishes the shares that moved.
//!
//! Bounds: a post holds at most [`MAX_POST_BYTES`] encoded (services past it, in name order, are
//! left out and logged); a post that does not decode, or names more than [`super::MAX_ZONES`]
//! zones for a service, is skipped (that part). Cost: one small put (when the counts changed)
//! and one prefix read per replica per second.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::watch;

use super::window::{Counts, ZoneKey};
use super::{DemandTracker, ZoneCounts};
use crate::replicas::board::Board;
use crate::replicas::Members;

/// How often a replica posts its counts and reads the others'.
pub const SHARE_EVERY: Duration = Duration::from_secs(1);
/// Largest encoded post.
pub const MAX_POST_BYTES: usize = 256 * 1024;

/// One replica's counts, as posted.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Post {
    /// Per service, sorted by name.
    #[prost(message, repeated, tag = "1")]
    pub services: Vec<PostedService>,
}

/// One service's counts in a [`Post`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct PostedService {
    /// The service.
    #[prost(string, tag = "1")]
    pub service: String,
    /// Its zones.
    #[prost(message, repeated, tag = "2")]
    pub zones: Vec<PostedZone>,
}

/// One zone's counts in a [`PostedService`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct PostedZone {
    /// The region.
    #[prost(string, tag = "1")]
    pub region: String,
    /// The zone.
    #[prost(string, tag = "2")]
    pub zone: String,
    /// Calls in the replica's window.
    #[prost(uint64, tag = "3")]
    pub calls: u64,
    /// The replica's sessions of the zone following the service.
    #[prost(uint64, tag = "4")]
    pub followers: u64,
}

/// Encodes `counts` as a post of at most [`MAX_POST_BYTES`]; the second value is how many
/// services were left out.
pub fn encode(counts: Vec<(Arc<str>, ZoneCounts)>) -> (Vec<u8>, usize) {
    let mut post = Post::default();
    let mut size = 0usize;
    let mut left_out = 0;
    for (service, zones) in counts {
        let s = PostedService {
            service: service.to_string(),
            zones: zones
                .into_iter()
                .map(|(z, c)| PostedZone {
                    region: z.region,
                    zone: z.zone,
                    calls: c.calls,
                    followers: c.followers,
                })
                .collect(),
        };
        let n = s.encoded_len() + 1 + prost::length_delimiter_len(s.encoded_len());
        if size + n > MAX_POST_BYTES {
            left_out += 1;
            continue;
        }
        size += n;
        post.services.push(s);
    }
    (post.encode_to_vec(), left_out)
}

/// Sums the posts of `replicas` (undecodable ones skipped) per service and zone.
pub fn sum<'a>(posts: impl IntoIterator<Item = &'a [u8]>) -> HashMap<Arc<str>, ZoneCounts> {
    let mut sums: HashMap<Arc<str>, HashMap<ZoneKey, Counts>> = HashMap::new();
    for value in posts {
        let Ok(post) = Post::decode(value) else {
            tracing::debug!("zone demand: undecodable post skipped");
            continue;
        };
        for s in post.services {
            if s.zones.len() > super::MAX_ZONES || dlb::model::resolve_service(&s.service).is_err()
            {
                continue;
            }
            let zones = sums.entry(s.service.as_str().into()).or_default();
            for z in s.zones {
                if z.calls == 0 && z.followers == 0 {
                    continue;
                }
                let c = zones
                    .entry(ZoneKey {
                        region: z.region,
                        zone: z.zone,
                    })
                    .or_default();
                c.calls = c
                    .calls
                    .saturating_add(z.calls.min(super::MAX_REPORTED_CALLS * 10));
                c.followers = c.followers.saturating_add(z.followers);
            }
        }
    }
    sums.into_iter()
        .filter(|(_, z)| !z.is_empty())
        .map(|(s, z)| (s, z.into_iter().collect()))
        .collect()
}

/// Posts this replica's counts and reads the other live replicas' every [`SHARE_EVERY`] until
/// `stop` resolves (see the module docs).
pub async fn share(
    tracker: Arc<DemandTracker>,
    board: Arc<dyn Board>,
    me: Arc<str>,
    members: watch::Receiver<Members>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut every = tokio::time::interval(SHARE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut posted: Option<Vec<u8>> = None;
    let mut warned = false;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = &mut stop => return,
        }
        let (post, left_out) = encode(tracker.local_counts());
        if left_out > 0 && !warned {
            warned = true;
            tracing::warn!(left_out, "zone demand: services left out of this replica's post (over {MAX_POST_BYTES} bytes)");
        }
        if posted.as_ref() != Some(&post) {
            match board.post_demand(post.clone()).await {
                Ok(()) => posted = Some(post),
                Err(e) => {
                    tracing::debug!(error = %e, "zone demand: cannot post this replica's counts")
                }
            }
        }
        match board.demand().await {
            Ok(posts) => {
                let live = members.borrow().clone();
                let others = posts
                    .iter()
                    .filter(|(replica, _)| **replica != *me && live.contains(replica))
                    .map(|(_, v)| v.as_slice());
                tracker.set_remote(sum(others));
            }
            Err(e) => {
                tracing::debug!(error = %e, "zone demand: cannot read the other replicas' counts")
            }
        }
    }
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

    fn c(calls: u64, followers: u64) -> Counts {
        Counts { calls, followers }
    }

    #[test]
    fn posts_round_trip_sum_and_are_bounded() {
        let (a, _) = encode(vec![(
            "web".into(),
            vec![(z("a"), c(10, 1)), (z("b"), c(0, 2))],
        )]);
        let (b, _) = encode(vec![
            ("web".into(), vec![(z("a"), c(5, 1))]),
            ("api".into(), vec![(z("c"), c(0, 0))]),
        ]);
        let sums = sum([a.as_slice(), b.as_slice(), b"\xff\xff garbage".as_slice()]);
        let mut web = sums.get("web").cloned().expect("web");
        web.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(web, vec![(z("a"), c(15, 2)), (z("b"), c(0, 2))]);
        assert!(!sums.contains_key("api"), "nothing counted: left out");
        // A post never exceeds the bound.
        let many: Vec<_> = (0..20_000)
            .map(|i| {
                (
                    Arc::from(format!("service-{i:05}")),
                    vec![(z("a"), c(1, 1))],
                )
            })
            .collect();
        let (post, left_out) = encode(many);
        assert!(post.len() <= MAX_POST_BYTES, "{}", post.len());
        assert!(left_out > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn remote_counts_add_to_the_local_ones() {
        let t = DemandTracker::new(super::super::DemandMetrics::default());
        t.join(1, z("a"));
        t.follow(1, "web");
        assert_eq!(t.published("web").1.len(), 1);
        // Another replica has two sessions in b: followers a 1, b 2.
        t.set_remote(HashMap::from([(Arc::from("web"), vec![(z("b"), c(0, 2))])]));
        let shares = t.published("web").1;
        assert_eq!(shares.len(), 2);
        assert!((shares[1].1 - 2.0 / 3.0).abs() < 1e-9, "{shares:?}");
        // A service only the other replica's sessions follow is published too.
        t.set_remote(HashMap::from([(Arc::from("api"), vec![(z("c"), c(9, 1))])]));
        assert_eq!(&t.published("api").1[..], &[(z("c"), 1.0)]);
        assert_eq!(&t.published("web").1[..], &[(z("a"), 1.0)]);
        // The other replica gone: only the local part is left.
        t.set_remote(HashMap::new());
        assert!(t.published("api").1.is_empty());
        assert_eq!(t.local_counts().len(), 1);
    }
}
