//! Leases: backends that registered themselves stay only while they keep their lease alive.
//!
//! A lease-owned backend is an ordinary store record with `source = LEASE` and its
//! `lease_ttl_seconds` (so it survives a `dlbd` restart on the durable store). What is **not** in
//! the store is the lease's deadline: renewals would otherwise cost a revision each (and a push to
//! every SDK). Deadlines live in RAM, owned by one task, the [`LeaseManager`]:
//!
//! * **Renewal** ([`Leases::keep`]) moves the deadline to `now + ttl`. It writes nothing.
//! * **Expiry**: the task sleeps until the earliest deadline; the leases past it are removed from
//!   the store in one write per service (`Mutation::RemoveWithReason`s with the reason
//!   [`EXPIRED_REASON`], compare-and-set on the version just read, only records still
//!   lease-owned), each logged and counted in `dlb_lease_expiries_total`. The write is pushed
//!   like any other change, the reason with it: a DLB session's delta names it in
//!   `ServiceUpdate.removal_reasons`. Expiry is exact to the timer: a backend is gone within
//!   TTL (+ the time one store write takes) after its last renewal.
//! * **Restart**: at start every lease-owned record of the store gets a fresh deadline of its
//!   TTL from now ([`LeaseManager::start`]), so a restart never expires everybody at once, and a
//!   backend that died with the old `dlbd` still goes away one TTL later.
//!
//! Ordering that keeps a renewal from racing an expiry: a `Register` first calls
//! [`Leases::keep`] (the task handles it between expiries, never during one) and only then
//! writes the record. An expiry that started before the renewal has removed the record by the
//! time the renewal's write runs, which re-creates it; an expiry after it sees a later deadline.
//!
//! The seam for the HA store: handlers talk to `dyn` [`Leases`], three operations an etcd lease
//! (grant/keep-alive, revoke, time-to-live) maps onto one to one. With several replicas on
//! etcd (feature `etcd`) that is what happens: [`etcd::EtcdLeases`] maps each DLB lease onto an
//! etcd lease, so a renewal through any replica keeps it, and only the leader expires
//! ([`etcd`] module docs). This module's [`LeaseManager`] is the single-node keeper (memory
//! and embedded stores): renewals there write nothing.
//!
//! Bounds: TTL [`MIN_TTL_SECONDS`]..=[`MAX_TTL_SECONDS`]; leases ≤ lease-owned records (plus
//! the few whose first write failed, which expire harmlessly). The task keeps a map by key and
//! an ordered set by deadline: renew and expire are O(log n).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use dlb::proto;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::membership::MembershipMetrics;
use crate::shutdown::Shutdown;
use crate::store::{Mutation, Store, StoreSnapshot};
use crate::Error;

#[cfg(feature = "etcd")]
pub mod etcd;

/// Shortest lease a backend may ask for, seconds.
pub const MIN_TTL_SECONDS: u32 = 1;
/// Longest lease a backend may ask for, seconds (one hour: a dead backend is routed to at most
/// this long before health checks or the lease catch it).
pub const MAX_TTL_SECONDS: u32 = 3600;
/// How many compare-and-set attempts an expiry makes before it retries later.
const EXPIRE_ATTEMPTS: usize = 32;
/// The removal reason of a backend whose lease expired, as watchers receive it.
pub const EXPIRED_REASON: &str = "lease expired";
/// When an expiry's store write fails, it is retried this much later.
const EXPIRE_RETRY: Duration = Duration::from_secs(1);

/// Identifies a lease: the backend it keeps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    /// The service.
    pub service: String,
    /// The backend id.
    pub server_id: String,
}

/// One lease as reported by [`Leases::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// The backend id.
    pub server_id: String,
    /// Its time to live.
    pub ttl: Duration,
    /// Time left before it expires unless renewed.
    pub remaining: Duration,
}

/// The lease keeper behind the Membership front-end (see the module docs).
pub trait Leases: Send + Sync + 'static {
    /// Starts or renews the lease on `key`: it expires `ttl` from now unless renewed again.
    fn keep(&self, key: LeaseKey, ttl: Duration) -> BoxFuture<'_, Result<(), Error>>;
    /// Ends the lease on `key` without touching the store (the caller removes the record).
    fn forget(&self, key: LeaseKey) -> BoxFuture<'_, Result<(), Error>>;
    /// The leases of `service`, ordered by backend id.
    fn list(&self, service: String) -> BoxFuture<'_, Result<Vec<LeaseState>, Error>>;
}

/// Whether a stored record is owned by a lease.
pub fn is_leased(server: &proto::Server) -> bool {
    server.source == proto::BackendSource::Lease as i32
}

/// A TTL from the store, clamped into the bounds (a record written by an older version or by
/// hand still gets a sane deadline).
fn stored_ttl(seconds: u32) -> Duration {
    Duration::from_secs(u64::from(seconds.clamp(MIN_TTL_SECONDS, MAX_TTL_SECONDS)))
}

enum Command {
    Keep(LeaseKey, Duration, oneshot::Sender<()>),
    Forget(LeaseKey, oneshot::Sender<()>),
    List(String, oneshot::Sender<Vec<LeaseState>>),
}

/// The handle to the task that owns every lease deadline. Cheap to share.
#[derive(Debug, Clone)]
pub struct LeaseManager {
    tx: mpsc::Sender<Command>,
}

impl LeaseManager {
    /// Starts the task: every lease-owned record of `initial` gets a deadline of its TTL from
    /// now. The task, spawned through `shutdown`, ends when the shutdown starts.
    pub fn start(
        store: Arc<dyn Store>,
        metrics: MembershipMetrics,
        initial: &StoreSnapshot,
        shutdown: &Shutdown,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let now = Instant::now();
        let mut table = Table::default();
        for svc in &initial.services {
            for s in svc.servers.values().filter(|s| is_leased(s)) {
                let key = LeaseKey {
                    service: svc.name.clone(),
                    server_id: s.server_id.clone(),
                };
                let ttl = stored_ttl(s.lease_ttl_seconds);
                table.set(key, now + ttl, ttl);
            }
        }
        if !table.by_key.is_empty() {
            tracing::info!(
                leases = table.by_key.len(),
                "leases restored from the store; each gets a fresh deadline of its TTL"
            );
        }
        metrics.leases.set(table.by_key.len() as i64);
        let (tx, rx) = mpsc::channel(1024);
        let task = shutdown.spawn(run(store, metrics, table, rx, shutdown.clone()));
        (Self { tx }, task)
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| Error::Task("the lease manager has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Task("the lease manager has stopped".into()))
    }
}

impl Leases for LeaseManager {
    fn keep(&self, key: LeaseKey, ttl: Duration) -> BoxFuture<'_, Result<(), Error>> {
        self.call(move |tx| Command::Keep(key, ttl, tx)).boxed()
    }

    fn forget(&self, key: LeaseKey) -> BoxFuture<'_, Result<(), Error>> {
        self.call(move |tx| Command::Forget(key, tx)).boxed()
    }

    fn list(&self, service: String) -> BoxFuture<'_, Result<Vec<LeaseState>, Error>> {
        self.call(move |tx| Command::List(service, tx)).boxed()
    }
}

/// Deadlines by key, and keys by deadline.
#[derive(Default)]
struct Table {
    by_key: HashMap<LeaseKey, (Instant, Duration)>,
    by_deadline: BTreeSet<(Instant, LeaseKey)>,
}

impl Table {
    fn set(&mut self, key: LeaseKey, deadline: Instant, ttl: Duration) {
        if let Some((old, _)) = self.by_key.insert(key.clone(), (deadline, ttl)) {
            self.by_deadline.remove(&(old, key.clone()));
        }
        self.by_deadline.insert((deadline, key));
    }

    fn remove(&mut self, key: &LeaseKey) {
        if let Some((old, _)) = self.by_key.remove(key) {
            self.by_deadline.remove(&(old, key.clone()));
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(d, _)| *d)
    }

    /// Removes and returns the first lease whose deadline is ≤ `now`.
    fn pop_due(&mut self, now: Instant) -> Option<(LeaseKey, Duration)> {
        let (deadline, _) = self.by_deadline.first()?;
        if *deadline > now {
            return None;
        }
        let (_, key) = self.by_deadline.pop_first()?;
        let (_, ttl) = self.by_key.remove(&key)?;
        Some((key, ttl))
    }
}

async fn run(
    store: Arc<dyn Store>,
    metrics: MembershipMetrics,
    mut table: Table,
    mut rx: mpsc::Receiver<Command>,
    shutdown: Shutdown,
) {
    loop {
        let next = table.next_deadline();
        tokio::select! {
            biased;
            _ = shutdown.stopped() => return,
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Command::Keep(key, ttl, reply)) => {
                    table.set(key, Instant::now() + ttl, ttl);
                    let _ = reply.send(());
                }
                Some(Command::Forget(key, reply)) => {
                    table.remove(&key);
                    let _ = reply.send(());
                }
                Some(Command::List(service, reply)) => {
                    let now = Instant::now();
                    let mut out: Vec<LeaseState> = table
                        .by_key
                        .iter()
                        .filter(|(k, _)| k.service == service)
                        .map(|(k, (deadline, ttl))| LeaseState {
                            server_id: k.server_id.clone(),
                            ttl: *ttl,
                            remaining: deadline.saturating_duration_since(now),
                        })
                        .collect();
                    out.sort_by(|a, b| a.server_id.cmp(&b.server_id));
                    let _ = reply.send(out);
                }
            },
            _ = sleep_until(next) => {
                // Everything due, one write per service.
                let now = Instant::now();
                let mut due: BTreeMap<String, Vec<(String, Duration)>> = BTreeMap::new();
                while let Some((key, ttl)) = table.pop_due(now) {
                    due.entry(key.service).or_default().push((key.server_id, ttl));
                }
                for (service, expired) in due {
                    let ids: Vec<String> = expired.iter().map(|(id, _)| id.clone()).collect();
                    if !expire(&*store, &metrics, &service, &ids).await {
                        let retry = Instant::now() + EXPIRE_RETRY;
                        for (server_id, ttl) in expired {
                            let key = LeaseKey { service: service.clone(), server_id };
                            table.set(key, retry, ttl);
                        }
                    }
                }
            }
        }
        metrics.leases.set(table.by_key.len() as i64);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Removes the expired leases' records of `service` that are still lease-owned, in one write.
/// `false`: the store write failed and the expiries must be retried.
pub(crate) async fn expire(
    store: &dyn Store,
    metrics: &MembershipMetrics,
    service: &str,
    expired: &[String],
) -> bool {
    for _ in 0..EXPIRE_ATTEMPTS {
        let snapshot = match store.get_service(service.to_owned()).await {
            Ok(Some(s)) => s,
            Ok(None) => return true,
            Err(e) => {
                tracing::warn!(%service, error = %e, "lease expiry: cannot read the service; retrying");
                return false;
            }
        };
        let gone: Vec<&proto::Server> = expired
            .iter()
            .filter_map(|id| {
                let record = snapshot.servers.get(id.as_str())?;
                is_leased(record).then_some(&**record)
            })
            .collect();
        if gone.is_empty() {
            return true;
        }
        let removals = gone
            .iter()
            .map(|s| Mutation::RemoveWithReason(s.server_id.clone(), EXPIRED_REASON.into()))
            .collect();
        match store
            .apply(service.to_owned(), removals, Some(snapshot.version.version))
            .await
        {
            Ok(applied) => {
                for record in &gone {
                    tracing::info!(
                        %service,
                        server_id = %record.server_id,
                        address = %record.address,
                        ttl_seconds = record.lease_ttl_seconds,
                        version = applied.version.version,
                        reason = EXPIRED_REASON,
                        "backend removed: lease expired"
                    );
                }
                metrics.expiries.inc_by(gone.len() as u64);
                if abandoned(&snapshot, gone.len()) {
                    let _ = remove_abandoned(store, service, applied.version.version).await;
                }
                return true;
            }
            Err(Error::VersionMismatch { .. }) => continue,
            Err(e) => {
                tracing::warn!(%service, error = %e, "lease expiry: the removal failed; retrying");
                return false;
            }
        }
    }
    false
}

/// Whether removing `removed` lease-owned backends from `before` leaves a service nothing else
/// holds: no backend left, and its policy still the default one (nobody ran `SetPolicy`,
/// `dlbctl policy set` / `health set`, or gave it a YAML `policy:`). Such a service was created
/// by self-registration and goes with its last lease (docs/discovery.md); any other stays.
pub(crate) fn abandoned(before: &crate::store::ServiceSnapshot, removed: usize) -> bool {
    before.servers.len() == removed && before.policy == dlb::model::default_policy()
}

/// Removes a service its last lease left ([`abandoned`]), with a compare-and-set on `version`
/// (the removal's version): a backend or a policy written meanwhile keeps it. Best effort: a
/// failure leaves an empty service, as before. Returns the removal's revision.
pub(crate) async fn remove_abandoned(
    store: &dyn Store,
    service: &str,
    version: u64,
) -> Option<u64> {
    match store
        .apply(
            service.to_owned(),
            vec![Mutation::RemoveService { force: false }],
            Some(version),
        )
        .await
    {
        Ok(applied) => {
            tracing::info!(
                %service,
                version = applied.version.version,
                "service removed with its last lease"
            );
            Some(applied.version.version)
        }
        Err(e) => {
            tracing::debug!(%service, error = %e, "service kept after its last lease");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> LeaseKey {
        LeaseKey {
            service: "s".into(),
            server_id: id.into(),
        }
    }

    #[test]
    fn table_orders_by_deadline_and_renewal_moves_it() {
        let now = Instant::now();
        let ttl = Duration::from_secs(1);
        let mut t = Table::default();
        t.set(key("a"), now + Duration::from_secs(1), ttl);
        t.set(key("b"), now + Duration::from_secs(2), ttl);
        t.set(key("a"), now + Duration::from_secs(3), ttl);
        assert_eq!(t.by_deadline.len(), 2);
        assert_eq!(t.next_deadline(), Some(now + Duration::from_secs(2)));
        assert!(t.pop_due(now + Duration::from_millis(1500)).is_none());
        assert_eq!(
            t.pop_due(now + Duration::from_secs(2)).map(|k| k.0),
            Some(key("b"))
        );
        t.remove(&key("a"));
        assert!(t.next_deadline().is_none());
        assert!(t.by_key.is_empty());
    }

    #[test]
    fn stored_ttls_are_clamped() {
        assert_eq!(stored_ttl(0), Duration::from_secs(1));
        assert_eq!(stored_ttl(u32::MAX), Duration::from_secs(3600));
    }
}
