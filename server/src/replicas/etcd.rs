//! Replica membership through etcd (feature `etcd`): each replica keeps a leased key
//! `<prefix>/replicas/<replica-id>` alive and follows the prefix to know the live member set.
//!
//! One task ([`EtcdCoordination::start`] spawns it) owns the lease and the view:
//!
//! * **Join**: grant a lease of `ttl` (default 3 s), put the key with it, read the prefix at
//!   revision R (the member set), watch it from R + 1. `start` returns only after this first
//!   join, so a replica starts its share of the work from a real view.
//! * **Renew** every `ttl / 3` on one keep-alive stream (etcd-client's `LeaseKeeper::keep_alive`
//!   sends a single keep-alive: the schedule is ours). A response with TTL 0 means etcd expired
//!   the lease (this replica was cut off longer than the TTL): join again with a new lease.
//! * **Watch**: a put adds a member, a delete (lease expiry, revoke) removes it. Any error —
//!   watch or keep-alive stream broken, etcd unreachable — is followed by a join again after a
//!   backoff (250 ms doubling to 2 s); the view is kept meanwhile, so work does not move
//!   because of a blip. A replica that stays cut off loses its key to the TTL and the others
//!   take its work over; it does not know it is not a member until it reaches etcd again.
//! * **Leave** ([`Coordination::leave`], graceful shutdown): revoke the lease, so the others
//!   see the key deleted at once.
//! * **Leader election**: after each join the replica campaigns — a txn
//!   `if create_revision(<prefix>/leader) == 0 then put(<prefix>/leader = id, lease) else get` —
//!   and watches the key. It leads when its put won, or when the key already holds its id on its
//!   current lease (a rejoin that kept the lease); the fence is the key's `create_revision`. When
//!   the key is deleted (the leader's lease expired or was revoked) every replica campaigns
//!   again; one txn wins. Any interruption (the same ones that make it rejoin) drops this
//!   replica's leadership at once; the rejoin's campaign takes it back if the key is still its
//!   own.
//!
//! * **Load reports** to the leader: [`super::forwarding`] (sending through this connection with
//!   the membership lease, and a second task receiving while this replica leads).
//!
//! * **Contact** ([`Coordination::contact`], for readiness): the lease part is held from a join
//!   until the lease is lost — expired, this replica's key deleted, a keep-alive not answered
//!   within the TTL (a stalled etcd member never answers, and its streams would only fail
//!   after the HTTP/2 keepalive), or a broken stream not rejoined within the TTL. A second task makes the **progress
//!   check**: a linearizable read (`count_only` get of this replica's key) every
//!   [`PROGRESS_EVERY`] with a [`PROGRESS_TIMEOUT`]; a failed or late read when the last
//!   successful one is [`PROGRESS_TIMEOUT`] old marks the replica out of contact at once, so it
//!   goes NOT_SERVING within `PROGRESS_EVERY + PROGRESS_TIMEOUT` (1.5 s) of losing its etcd
//!   member, and sends its sessions away `going_away_after` later.
//!
//! Sync: the member view and the contact are `tokio::sync::watch`es; the view is written only
//! by the membership task, the contact's `lease` by it and `reads` by the progress task.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use dlb::backoff::Backoff;
use etcd_client::{
    Client, Compare, CompareOp, GetOptions, LeaseClient, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::progress::{check_progress, set_contact};
pub use super::progress::{PROGRESS_EVERY, PROGRESS_TIMEOUT};
use super::Batch;
use super::{forwarding, Coordination, Members};
use crate::etcd::EtcdConfig;
use crate::Error;

/// Default membership lease TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

fn etcd(e: etcd_client::Error) -> Error {
    crate::etcd::etcd_error("etcd (replica membership)", &e, "")
}

/// Membership through etcd. See the module docs.
pub struct EtcdCoordination {
    id: Arc<str>,
    members: watch::Sender<Members>,
    /// `Some(fence)` while this replica leads (see [`Coordination::leadership`]).
    leader: watch::Sender<Option<i64>>,
    lease: LeaseClient,
    /// The lease this replica's key is attached to now (0: none). A `parking_lot::Mutex`
    /// around an `i64`, never held across an `.await`.
    lease_id: Arc<Mutex<i64>>,
    /// The membership task and the forwarded-loads receiver task.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// For forwarding load reports.
    client: Client,
    /// `<prefix>/loads/<replica-id>`.
    loads_key: String,
    /// Batches the other replicas forward, until taken.
    forwarded: Mutex<Option<mpsc::Receiver<Batch>>>,
    /// Whether this replica can prove it is in contact with etcd (see the module docs).
    contact: watch::Sender<super::Contact>,
    /// Drain barriers between replicas ([`super::board`]), on this connection and lease.
    board: Arc<super::board::EtcdBoard>,
}

impl std::fmt::Debug for EtcdCoordination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCoordination")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// What the task needs to (re)join.
struct Joiner {
    client: Client,
    id: Arc<str>,
    key: String,
    prefix: String,
    /// `<prefix>/leader`.
    leader_key: String,
    ttl: Duration,
}

/// A joined membership: the lease, its keep-alive stream and the watch of the prefix.
struct Joined {
    lease: i64,
    keeper: LeaseKeeper,
    acks: LeaseKeepAliveStream,
    watch: WatchStream,
    members: BTreeSet<Arc<str>>,
    /// The watch of the leader key.
    leader_watch: WatchStream,
    /// `Some(fence)` when this replica leads.
    fence: Option<i64>,
}

impl Joiner {
    /// Grants a lease (or keeps `lease` when it is still alive), puts the key, reads the
    /// members and watches the prefix.
    async fn join(&mut self, lease: i64) -> Result<Joined, Error> {
        let ttl_s = i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut leases = self.client.lease_client();
        let mut lease = lease;
        let mut keep = None;
        if lease != 0 {
            let (mut keeper, mut acks) = leases.keep_alive(lease).await.map_err(etcd)?;
            keeper.keep_alive().await.map_err(etcd)?;
            match acks.message().await.map_err(etcd)? {
                Some(r) if r.ttl() > 0 => keep = Some((keeper, acks)),
                _ => lease = 0,
            }
        }
        let (keeper, acks) = match keep {
            Some(k) => k,
            None => {
                lease = leases.grant(ttl_s, None).await.map_err(etcd)?.id();
                leases.keep_alive(lease).await.map_err(etcd)?
            }
        };
        let mut kv = self.client.kv_client();
        kv.put(
            self.key.clone(),
            self.id.as_bytes().to_vec(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(etcd)?;
        let resp = kv
            .get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd)?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let members = resp
            .kvs()
            .iter()
            .filter_map(|kv| self.member(kv.key()))
            .collect();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        let watch = self
            .client
            .watch_client()
            .watch(self.prefix.clone(), Some(options))
            .await
            .map_err(etcd)?;
        let (fence, rev) = self.campaign(lease).await?;
        let leader_watch = self
            .client
            .watch_client()
            .watch(
                self.leader_key.clone(),
                Some(WatchOptions::new().with_start_revision(rev + 1)),
            )
            .await
            .map_err(etcd)?;
        Ok(Joined {
            lease,
            keeper,
            acks,
            watch,
            members,
            leader_watch,
            fence,
        })
    }

    /// Creates the leader key with `lease` if it is absent. Returns this replica's fence
    /// (`Some(create_revision)` when it leads) and the revision the answer is from.
    async fn campaign(&self, lease: i64) -> Result<(Option<i64>, i64), Error> {
        let key = self.leader_key.clone();
        let resp = self
            .client
            .kv_client()
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key.clone(),
                        self.id.as_bytes().to_vec(),
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else([TxnOp::get(key, None)]),
            )
            .await
            .map_err(etcd)?;
        let rev = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            return Ok((Some(rev), rev));
        }
        let held = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        let fence = held
            .filter(|kv| kv.lease() == lease && kv.value() == self.id.as_bytes())
            .map(|kv| kv.create_revision());
        Ok((fence, rev))
    }

    /// The replica id a key under the prefix names.
    fn member(&self, key: &[u8]) -> Option<Arc<str>> {
        let id = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        super::validate_id(id).ok()?;
        Some(id.into())
    }
}

impl EtcdCoordination {
    /// Connects, joins the member set as `id` with a lease of `ttl`, and keeps it up until
    /// the shutdown starts (its tasks spawned through `shutdown`). Fails when etcd cannot be
    /// reached for the first join.
    pub async fn start(
        config: &EtcdConfig,
        id: &str,
        ttl: Duration,
        shutdown: &crate::shutdown::Shutdown,
    ) -> Result<Arc<Self>, Error> {
        super::validate_id(id)?;
        // Requests and pings bounded by the TTL: a replica cut off notices before its key expires.
        let timeout = config.timeout.min(ttl.max(Duration::from_secs(1)));
        let keep_alive = (Duration::from_secs(2), Duration::from_secs(2));
        let client = crate::etcd::connect(config, timeout, keep_alive)
            .await
            .map_err(etcd)?;
        let prefix = format!("{}/replicas/", config.prefix.trim_end_matches('/'));
        let id: Arc<str> = id.into();
        let mut joiner = Joiner {
            leader_key: format!("{}/leader", config.prefix.trim_end_matches('/')),
            key: format!("{prefix}{id}"),
            client: client.clone(),
            id: id.clone(),
            prefix,
            ttl,
        };
        let joined = joiner.join(0).await?;
        let lease_id = Arc::new(Mutex::new(joined.lease));
        let loads = forwarding::prefix(&config.prefix);
        let (forward_tx, forward_rx) = mpsc::channel(super::FORWARDED_QUEUE);
        let this = Arc::new(Self {
            id: id.clone(),
            members: watch::Sender::new(Members::new(joined.members.iter().cloned())),
            leader: watch::Sender::new(None),
            lease: client.lease_client(),
            lease_id: lease_id.clone(),
            tasks: Mutex::new(Vec::new()),
            client: client.clone(),
            loads_key: format!("{loads}{id}"),
            forwarded: Mutex::new(Some(forward_rx)),
            board: Arc::new(super::board::EtcdBoard {
                client: client.clone(),
                root: config.prefix.trim_end_matches('/').to_owned(),
                me: id.clone(),
                lease: lease_id.clone(),
            }),
            contact: watch::Sender::new(super::Contact {
                proven_at: Some(Instant::now()),
                ..super::Contact::OK
            }),
        });
        tracing::info!(replica = %id, lease = joined.lease, members = ?this.members.borrow().ids(), "joined the replica set");
        let members = this.members.clone();
        let leader = this.leader.clone();
        let stop = shutdown.clone();
        let progress_key = joiner.key.clone();
        let contact = this.contact.clone();
        let s = shutdown.clone();
        let task = shutdown.spawn(async move {
            tokio::select! {
                () = run(joiner, joined, members, leader, lease_id, contact) => {}
                _ = s.stopped() => {}
            }
        });
        let (contact, stop_progress) = (this.contact.clone(), stop.clone());
        let progress_client = client.clone();
        let progress = shutdown.spawn(async move {
            tokio::select! {
                () = check_progress(progress_client, progress_key, contact) => {}
                _ = stop_progress.stopped() => {}
            }
        });
        let receive = forwarding::receive(client, loads, id, this.leader.subscribe(), forward_tx);
        let receiver = shutdown.spawn(async move {
            tokio::select! {
                () = receive => {}
                _ = stop.stopped() => {}
            }
        });
        *this.tasks.lock() = vec![task, receiver, progress];
        Ok(this)
    }
}

/// Keeps the membership up (see the module docs). Never returns on its own.
async fn run(
    mut joiner: Joiner,
    joined: Joined,
    members: watch::Sender<Members>,
    leader: watch::Sender<Option<i64>>,
    lease_id: Arc<Mutex<i64>>,
    contact: watch::Sender<super::Contact>,
) {
    let mut joined = Some(joined);
    let mut lease = 0;
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    // When the membership was interrupted with the lease presumably still alive (a broken
    // stream, rejoined with the same lease): past the TTL without a rejoin it is lost.
    let mut interrupted_at: Option<Instant> = None;
    loop {
        let mut j = match joined.take() {
            Some(j) => j,
            None => match joiner.join(lease).await {
                Ok(j) => {
                    tracing::info!(replica = %joiner.id, lease = j.lease, "rejoined the replica set");
                    j
                }
                Err(e) => {
                    if interrupted_at.is_some_and(|t| t.elapsed() > joiner.ttl) {
                        set_contact(&contact, |c| c.lease = false);
                    }
                    tracing::warn!(error = %e, "replica membership: cannot reach etcd; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            },
        };
        backoff.reset();
        lease = j.lease;
        *lease_id.lock() = lease;
        set_contact(&contact, |c| c.lease = true);
        publish(&members, &j.members);
        lead(&leader, &joiner.id, j.fence);
        let why = follow(&joiner, &mut j, &members, &leader).await;
        // Whatever broke, this replica may no longer hold the leader key: stop leading now.
        lead(&leader, &joiner.id, None);
        tracing::warn!(replica = %joiner.id, reason = %why, "replica membership interrupted; rejoining");
        if why.lease_lost {
            // Not a member any more: it cannot prove it is current until it rejoins. (A broken
            // stream alone keeps the lease: a blip of one etcd member is no outage.)
            lease = 0;
            set_contact(&contact, |c| c.lease = false);
        }
        interrupted_at = Some(Instant::now());
        tokio::time::sleep(backoff.current()).await;
    }
}

/// Why [`follow`] stopped.
struct Interrupted {
    reason: String,
    lease_lost: bool,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

fn publish(members: &watch::Sender<Members>, set: &BTreeSet<Arc<str>>) {
    let view = Members::new(set.iter().cloned());
    members.send_if_modified(|m| {
        if *m == view {
            return false;
        }
        tracing::info!(members = ?view.ids(), "replica set changed");
        *m = view;
        true
    });
}

/// Publishes this replica's leadership, logging a change.
fn lead(leader: &watch::Sender<Option<i64>>, id: &str, fence: Option<i64>) {
    leader.send_if_modified(|f| {
        if *f == fence {
            return false;
        }
        match fence {
            Some(fence) => tracing::info!(replica = %id, fence, "this replica is the leader"),
            None if f.is_some() => {
                tracing::warn!(replica = %id, "this replica is no longer the leader")
            }
            None => {}
        }
        *f = fence;
        true
    });
}

/// Renews the lease and applies membership and leader-key events until something breaks.
async fn follow(
    joiner: &Joiner,
    j: &mut Joined,
    members: &watch::Sender<Members>,
    leader: &watch::Sender<Option<i64>>,
) -> Interrupted {
    let every = joiner.ttl / 3;
    let mut next = Instant::now() + every;
    // When a keep-alive was last answered: none within the TTL means the lease has expired (or
    // is about to) although no stream has failed yet (a stalled etcd member answers nothing).
    let mut answered = Instant::now();
    let broken = |reason: String| Interrupted {
        reason,
        lease_lost: false,
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                next = Instant::now() + every;
                if answered.elapsed() > joiner.ttl {
                    return Interrupted {
                        reason: format!("no keep-alive answered within the lease TTL ({:?})", joiner.ttl),
                        lease_lost: true,
                    };
                }
                if let Err(e) = j.keeper.keep_alive().await {
                    return broken(format!("keep-alive: {e}"));
                }
            }
            ack = j.acks.message() => match ack {
                Ok(Some(r)) if r.ttl() > 0 => answered = Instant::now(),
                Ok(Some(_)) => return Interrupted { reason: "the lease expired".into(), lease_lost: true },
                Ok(None) => return broken("keep-alive stream ended".into()),
                Err(e) => return broken(format!("keep-alive: {e}")),
            },
            resp = j.watch.message() => match resp {
                Ok(Some(resp)) => {
                    if resp.canceled() || resp.compact_revision() > 0 {
                        return broken(format!("watch cancelled: {}", resp.cancel_reason()));
                    }
                    let mut mine_deleted = false;
                    for e in resp.events() {
                        let Some(kv) = e.kv() else { continue };
                        let Some(id) = joiner.member(kv.key()) else { continue };
                        // A delete event's key has version 0.
                        if kv.version() == 0 {
                            mine_deleted |= id == joiner.id;
                            j.members.remove(&id);
                        } else {
                            j.members.insert(id);
                        }
                    }
                    publish(members, &j.members);
                    if mine_deleted {
                        return Interrupted { reason: "this replica's key was deleted".into(), lease_lost: true };
                    }
                }
                Ok(None) => return broken("watch ended".into()),
                Err(e) => return broken(format!("watch: {e}")),
            },
            resp = j.leader_watch.message() => match resp {
                Ok(Some(resp)) => {
                    if resp.canceled() || resp.compact_revision() > 0 {
                        return broken(format!("leader watch cancelled: {}", resp.cancel_reason()));
                    }
                    // A delete event's key has version 0: the leader is gone, campaign.
                    let vacant = resp
                        .events()
                        .iter()
                        .filter_map(|e| e.kv())
                        .next_back()
                        .is_some_and(|kv| kv.version() == 0);
                    if vacant {
                        lead(leader, &joiner.id, None);
                        match joiner.campaign(j.lease).await {
                            Ok((fence, _)) => {
                                j.fence = fence;
                                lead(leader, &joiner.id, fence);
                            }
                            Err(e) => return broken(format!("campaign: {e}")),
                        }
                    }
                }
                Ok(None) => return broken("leader watch ended".into()),
                Err(e) => return broken(format!("leader watch: {e}")),
            },
        }
    }
}

impl Coordination for EtcdCoordination {
    fn replica_id(&self) -> &Arc<str> {
        &self.id
    }

    fn members(&self) -> watch::Receiver<Members> {
        self.members.subscribe()
    }

    fn contact(&self) -> watch::Receiver<super::Contact> {
        self.contact.subscribe()
    }

    fn leadership(&self) -> watch::Receiver<Option<i64>> {
        self.leader.subscribe()
    }

    fn leave(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.leader.send_replace(None);
            for task in self.tasks.lock().drain(..) {
                task.abort();
            }
            let lease = std::mem::take(&mut *self.lease_id.lock());
            if lease == 0 {
                return;
            }
            let mut client = self.lease.clone();
            match tokio::time::timeout(Duration::from_secs(2), client.revoke(lease)).await {
                Ok(Ok(_)) => tracing::info!(replica = %self.id, "left the replica set"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "leaving the replica set failed; the lease will expire")
                }
                Err(_) => {
                    tracing::warn!("leaving the replica set timed out; the lease will expire")
                }
            }
        })
    }

    fn forward(&self, batch: Batch) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let lease = *self.lease_id.lock();
            forwarding::send(&self.client, self.loads_key.clone(), lease, &batch).await
        })
    }

    fn take_forwarded(&self) -> Option<mpsc::Receiver<Batch>> {
        self.forwarded.lock().take()
    }

    fn board(&self) -> Option<Arc<dyn super::board::Board>> {
        Some(self.board.clone())
    }
}
