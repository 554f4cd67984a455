//! Replica coordination: who the live `dlbd` replicas of one deployment are, and how work is
//! split among them.
//!
//! The seam is [`Coordination`]: this replica's id and a live, sorted view of the member set
//! ([`Members`]). Two implementations:
//!
//! * [`Single`] — the only replica (memory and embedded stores, and any build without the
//!   `etcd` feature): the member set is this replica, forever.
//! * `etcd::EtcdCoordination` (feature `etcd`) — each replica keeps a leased key
//!   `<prefix>/replicas/<replica-id>` alive and watches the prefix (`docs/etcd.md`, "Replicas").
//!
//! **Leadership.** Singleton jobs (lease expiry, DNS discovery, outlier and adaptive-weight
//! decisions) run on one replica at a time, the leader ([`Coordination::leadership`]). `Single`
//! is always the leader; on etcd the leader holds the key `<prefix>/leader`, attached to its
//! membership lease. The leadership value carries the **fence**: the `create_revision` of the
//! leader key this replica won with; every singleton write compares it in its etcd txn
//! ([`crate::store::EtcdStore`]'s fenced writes), so a replica that lost the key without knowing
//! it yet cannot write.
//!
//! **Load reports to the leader.** SDKs report call outcomes to whichever replica they are
//! connected to, but outlier and adaptive-weight decisions are the leader's: a replica that does
//! not lead forwards the sums of its sessions' reports ([`Coordination::forward`], see
//! `reports::forward`); the leader receives everyone's
//! ([`Coordination::take_forwarded`]). On etcd a batch is a put of `<prefix>/loads/<replica-id>`
//! (attached to the membership lease), and the leader watches `<prefix>/loads/` while it leads.
//!
//! **Drain barriers** count the clients of every replica: a waiting replica posts a request on
//! the [`board`] (etcd keys) and the others answer with their own clients' acknowledgements.
//!
//! Work that must be done by exactly one live replica per item (active health checks, one per
//! backend) is assigned by [rendezvous hashing](Members::owner) over the member set: every
//! replica computes the same owner from the same view, and when a member joins or leaves only
//! the items it owned (or now owns) move — O(members) per item, no coordination traffic.

pub mod board;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "etcd")]
mod forwarding;
#[cfg(feature = "etcd")]
mod progress;

use std::sync::Arc;

use futures::future::BoxFuture;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};

use dlb::model::ValidationError;

use crate::Error;

/// Forwarded batches the leader buffers at most before it drops the newest (and counts them).
pub const FORWARDED_QUEUE: usize = 256;

/// Longest replica id accepted.
pub const MAX_ID_LEN: usize = 128;

/// One batch of load-report sums a replica forwards to the leader
/// (`reports::forward::Outbox` builds them), as the value of `<prefix>/loads/<replica>` on etcd.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Batch {
    /// The replica that forwarded it.
    #[prost(string, tag = "1")]
    pub replica: String,
    /// The sums, one report per service (a service may span several batches).
    #[prost(message, repeated, tag = "2")]
    pub reports: Vec<dlb::proto::LoadReport>,
}

/// The live replicas as this replica sees them: ids, sorted, without duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Members {
    ids: Arc<[Arc<str>]>,
}

impl Members {
    /// A member set of these ids (sorted and deduplicated here).
    pub fn new(ids: impl IntoIterator<Item = Arc<str>>) -> Self {
        let mut v: Vec<Arc<str>> = ids.into_iter().collect();
        v.sort();
        v.dedup();
        Self { ids: v.into() }
    }

    /// The ids, sorted.
    pub fn ids(&self) -> &[Arc<str>] {
        &self.ids
    }

    /// Whether `id` is a member.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.binary_search_by(|m| (**m).cmp(id)).is_ok()
    }

    /// The member that owns `(service, backend)`: the one with the highest
    /// [`score`]`(member, service, backend)` (rendezvous / highest-random-weight hashing).
    /// `None` when there are no members. O(members).
    pub fn owner(&self, service: &str, backend: &str) -> Option<&Arc<str>> {
        self.ids
            .iter()
            .max_by_key(|m| (score(m, service, backend), Arc::clone(m)))
    }
}

/// The rendezvous score of `member` for `(service, backend)`: FNV-1a 64 over the three
/// strings (each followed by a 0xff separator, a byte no valid id or name contains), finished
/// with the splitmix64 mixer. Stable across builds and platforms, so replicas of different
/// versions agree on owners.
pub fn score(member: &str, service: &str, backend: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [member, service, backend] {
        for b in part.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Checks a replica id: 1..=[`MAX_ID_LEN`] characters of `[A-Za-z0-9._:-]` (it is an etcd key
/// segment and a metric label value).
pub fn validate_id(id: &str) -> Result<(), ValidationError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "replica_id",
            format!("{:?}", dlb::model::prefix(id, 64)),
            format!("must be 1..={MAX_ID_LEN} characters of [A-Za-z0-9._:-]"),
        ))
    }
}

/// A default replica id: `<hostname>-<pid>-<4 random hex digits>` (characters outside the
/// allowed set become `-`).
pub fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "dlbd".to_owned());
    let host: String = host
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
}

/// Whether this replica can prove it is in contact with the shared store, published by the
/// coordination for readiness (the `readiness` module): a replica that cannot prove it is
/// current must stop serving, whatever its cache's watch says (a watch on a stalled etcd member
/// only errors after the HTTP/2 keepalive, ≈ 15 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contact {
    /// The membership lease is held: joined, and its last keep-alive was answered within the
    /// TTL.
    pub lease: bool,
    /// The last progress check (a linearizable read with a short timeout) succeeded.
    pub reads: bool,
    /// When a progress check last succeeded (`None`: no check yet, or none is made). Not part
    /// of the published decision: changing it alone wakes nobody.
    pub proven_at: Option<tokio::time::Instant>,
}

impl Contact {
    /// In contact, nothing checked (a coordination with nothing to lose contact with).
    pub const OK: Contact = Contact {
        lease: true,
        reads: true,
        proven_at: None,
    };

    /// Whether the replica may serve as far as contact goes.
    pub fn ok(&self) -> bool {
        self.lease && self.reads
    }
}

/// Who the live replicas are (see the module docs).
pub trait Coordination: Send + Sync + 'static {
    /// This replica's id.
    fn replica_id(&self) -> &Arc<str>;
    /// The live member set, updated as replicas join and leave.
    fn members(&self) -> watch::Receiver<Members>;
    /// Whether this replica leads, and its fence: `Some(create_revision of the leader key)`
    /// while it does (`Some(0)` for [`Single`]), `None` otherwise. Updated at once when
    /// leadership is won or lost (or may have been lost: any break of the connection to etcd).
    fn leadership(&self) -> watch::Receiver<Option<i64>>;
    /// Whether this replica is the leader now.
    fn is_leader(&self) -> bool {
        self.leadership().borrow().is_some()
    }
    /// Leaves the member set now (graceful shutdown: the others take over at once instead of
    /// after the membership TTL). Best effort.
    fn leave(&self) -> BoxFuture<'_, ()>;
    /// Sends a batch of this replica's load-report sums to the leader. Fails (changing
    /// nothing) when the batch cannot be delivered, e.g. etcd is unreachable.
    fn forward(&self, batch: Batch) -> BoxFuture<'_, Result<(), Error>>;
    /// The batches the other replicas forward, delivered while this replica leads (a batch
    /// sent while it does not is never delivered to it). The receiver can be taken once;
    /// `None` afterwards, and where there are no other replicas ([`Single`]).
    fn take_forwarded(&self) -> Option<mpsc::Receiver<Batch>>;
    /// Whether this replica can prove it is in contact with the shared store ([`Contact`]).
    /// By default always (a closed channel reading [`Contact::OK`]): [`Single`] has no one to
    /// lose contact with.
    fn contact(&self) -> watch::Receiver<Contact> {
        watch::channel(Contact::OK).1
    }
    /// Where drain barriers meet the other replicas' acknowledgements ([`board`]); `None`
    /// where there are no other replicas ([`Single`]).
    fn board(&self) -> Option<Arc<dyn board::Board>> {
        None
    }
}

/// The only replica: the member set is this replica.
#[derive(Debug)]
pub struct Single {
    id: Arc<str>,
    members: watch::Sender<Members>,
    leader: watch::Sender<Option<i64>>,
}

impl Single {
    /// The only replica, named `id`.
    pub fn new(id: &str) -> Self {
        let id: Arc<str> = id.into();
        Self {
            members: watch::Sender::new(Members::new([id.clone()])),
            leader: watch::Sender::new(Some(0)),
            id,
        }
    }
}

impl Coordination for Single {
    fn replica_id(&self) -> &Arc<str> {
        &self.id
    }

    fn members(&self) -> watch::Receiver<Members> {
        self.members.subscribe()
    }

    fn leadership(&self) -> watch::Receiver<Option<i64>> {
        self.leader.subscribe()
    }

    fn leave(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Nobody to forward to: the only replica leads and decides on its own reports.
    fn forward(&self, _: Batch) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    fn take_forwarded(&self) -> Option<mpsc::Receiver<Batch>> {
        None
    }
}

/// Waits until `leadership` says this replica leads; returns its fence. `None`: the sender is
/// gone (shutdown).
pub async fn until_leader(leadership: &mut watch::Receiver<Option<i64>>) -> Option<i64> {
    let fence = *leadership.wait_for(Option::is_some).await.ok()?;
    fence
}

/// Waits until `leadership` no longer says this replica leads with `fence` (lost, or won
/// again with another fence). Never returns while it does.
pub async fn until_not_leader(leadership: &mut watch::Receiver<Option<i64>>, fence: i64) {
    if leadership.wait_for(|f| *f != Some(fence)).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// `dlb_replica_leader` and `dlb_replica_members`: which replica leads and how many each one
/// sees, for operators (a split view shows as replicas disagreeing on the count; no leader, or
/// two, as the sum of `dlb_replica_leader` over the replicas).
#[derive(Debug, Default, Clone)]
pub struct ReplicaMetrics {
    /// 1 while this replica leads, else 0.
    pub leader: Gauge,
    /// The live replicas this replica sees, itself included.
    pub members: Gauge,
}

impl ReplicaMetrics {
    /// The gauges, registered in `registry`.
    pub fn registered(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dlb_replica_leader",
            "1 while this replica is the leader (runs lease expiry, DNS refreshes, outlier and adaptive decisions), else 0",
            m.leader.clone(),
        );
        registry.register(
            "dlb_replica_members",
            "Live dlbd replicas of this deployment as this replica sees them, itself included",
            m.members.clone(),
        );
        m
    }

    /// Keeps the gauges in step with `coordination` until the shutdown starts (or its views end).
    pub async fn follow(
        self,
        coordination: &dyn Coordination,
        shutdown: crate::shutdown::Shutdown,
    ) {
        let mut members = coordination.members();
        let mut leadership = coordination.leadership();
        loop {
            let n = members.borrow_and_update().ids().len();
            self.members.set(i64::try_from(n).unwrap_or(i64::MAX));
            self.leader
                .set(i64::from(leadership.borrow_and_update().is_some()));
            tokio::select! {
                r = members.changed() => if r.is_err() { return },
                r = leadership.changed() => if r.is_err() { return },
                _ = shutdown.stopped() => return,
            }
        }
    }
}

/// This replica's share of per-backend work: its id and the live member set.
#[derive(Debug, Clone)]
pub struct Share {
    /// This replica.
    pub me: Arc<str>,
    /// The live members.
    pub members: watch::Receiver<Members>,
}

impl Share {
    /// The share of a replica that is alone.
    pub fn alone() -> Self {
        let single = Single::new("dlbd");
        Self {
            me: single.id.clone(),
            members: single.members(),
        }
    }

    /// The share of `coordination`'s replica.
    pub fn of(coordination: &dyn Coordination) -> Self {
        Self {
            me: coordination.replica_id().clone(),
            members: coordination.members(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Arc<str>> {
        (0..n).map(|i| format!("replica-{i}").into()).collect()
    }

    #[test]
    fn each_backend_has_one_owner_and_a_departure_moves_only_its_own() {
        let three = Members::new(ids(3));
        let two = Members::new(ids(3).into_iter().filter(|m| &**m != "replica-1"));
        let mut counts = [0usize; 3];
        for b in 0..3000 {
            let backend = format!("b{b}");
            let o3 = three.owner("svc", &backend).expect("an owner");
            let o2 = two.owner("svc", &backend).expect("an owner");
            let i: usize = o3["replica-".len()..].parse().expect("index");
            counts[i] += 1;
            if &**o3 != "replica-1" {
                assert_eq!(o3, o2, "{backend} moved though its owner stayed");
            }
        }
        // Roughly even: each within 25 % of a third.
        for c in counts {
            assert!((750..=1250).contains(&c), "{counts:?}");
        }
        assert!(Members::default().owner("s", "b").is_none());
    }

    #[test]
    fn ids_are_checked_and_defaults_are_valid() {
        assert!(validate_id("host-1.example:7").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("a/b").is_err());
        assert!(validate_id(&"x".repeat(MAX_ID_LEN + 1)).is_err());
        validate_id(&default_id()).expect("the default id is valid");
        let m = Members::new(["b".into(), "a".into(), "b".into()]);
        assert_eq!(m.ids().len(), 2);
        assert!(m.contains("a") && !m.contains("c"));
    }
}
