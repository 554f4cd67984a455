//! Readiness: whether this replica may serve routing state, derived from whether its snapshot
//! cache is in step with the store and whether the replica can prove it is current.
//!
//! One task ([`run`]) owns the decision. Its inputs are [`Cache::synced`] (the follower's
//! "I am in step" flag, see [`crate::cache`]) and the coordination's [`Contact`] (on etcd: the
//! membership lease is held and the periodic linearizable read succeeds, see
//! [`crate::replicas`]); its outputs are a `watch` of [`State`] read by the front-ends, the
//! standard gRPC health statuses of `""` and `dlb.v1.Discovery`, and the gauges `dlb_ready` and
//! `dlb_cache_revision`.
//!
//! | input | state | effect |
//! |---|---|---|
//! | never loaded | [`State::NotReady`] | (not reachable in practice: `spawn` loads before it listens) |
//! | in step and in contact | [`State::Ready`] | health SERVING, sessions and xDS streams accepted |
//! | out of step for < `grace` | [`State::Ready`] | a compaction re-read or a reconnect to another etcd member is not an outage |
//! | out of step for ≥ `grace`, or out of contact | [`State::NotReady`] | health NOT_SERVING; new `Discovery.Session` calls and xDS streams get `UNAVAILABLE` ([`NOT_SYNCED`]) |
//! | `going_away_after` later | [`State::GoingAway`] | as NotReady, and every open session is sent `GoingAway` (xDS streams end with `UNAVAILABLE`) so clients fail over to a synced replica |
//!
//! Out of contact has no grace of its own: the progress check's timeout is it. With the
//! defaults (check every 0.5 s, 1 s timeout, `going_away_after` 1 s) a replica cut off from
//! its etcd member is NOT_SERVING within 1.5 s and sends its sessions away within 2.5 s (the
//! cache's own watch would only notice after the HTTP/2 keepalive, ≈ 15 s). The transition's
//! log line says how long the replica had been unable to prove it is current
//! (`unproven_ms`: since the last successful check).
//!
//! Back in step and in contact, the replica is [`State::Ready`] at once (no restart). Memory
//! and embedded stores never fall out of step, so they are ready from the start. O(1) per
//! change; the task sleeps until the next threshold.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cache::Cache;
use crate::replicas::Contact;

/// The status message of a call refused because the replica is not in step with its store.
pub const NOT_SYNCED: &str = "replica not synced with its store";
/// Default for [`crate::ServerConfig::ready_grace`].
pub const DEFAULT_GRACE: Duration = Duration::from_secs(1);
/// Default for [`crate::ServerConfig::going_away_after`].
pub const DEFAULT_GOING_AWAY_AFTER: Duration = Duration::from_secs(1);

/// The replica's readiness (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// In step with the store (or out of step for less than the grace): serving.
    Ready,
    /// Out of step for longer than the grace: refusing new sessions.
    NotReady,
    /// Out of step for longer than the grace plus the going-away bound: open sessions are sent
    /// away too.
    GoingAway,
}

/// A read handle on the readiness decision; cheap to clone.
#[derive(Debug, Clone)]
pub struct Readiness {
    rx: watch::Receiver<State>,
}

impl Readiness {
    /// A handle that is always ready (front-ends built outside [`crate::spawn`]).
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(State::Ready);
        // Keep the value forever: a closed channel still reads its last value.
        drop(tx);
        Self { rx }
    }

    /// The current state.
    pub fn state(&self) -> State {
        *self.rx.borrow()
    }

    /// Whether new sessions may be served.
    pub fn is_ready(&self) -> bool {
        self.state() == State::Ready
    }

    /// `Err(UNAVAILABLE)` unless ready: the check a new stream passes first.
    pub fn admit(&self) -> Result<(), tonic::Status> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(tonic::Status::unavailable(NOT_SYNCED))
        }
    }

    /// Resolves once open sessions must go away ([`State::GoingAway`]); never when the
    /// decision's task is gone without getting there.
    pub async fn going_away(&mut self) {
        if self.rx.wait_for(|s| *s == State::GoingAway).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// `dlb_ready` and `dlb_cache_revision`.
#[derive(Debug, Default, Clone)]
pub struct ReadinessMetrics {
    /// 1 while [`State::Ready`], else 0.
    pub ready: Gauge,
    /// The newest store revision the cache applied.
    pub revision: Gauge,
}

impl ReadinessMetrics {
    /// The gauges, registered in `registry`.
    pub fn registered(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dlb_ready",
            "1 while this replica serves (its cache is in step with the store), else 0",
            m.ready.clone(),
        );
        registry.register(
            "dlb_cache_revision",
            "The newest store revision applied by this replica's snapshot cache",
            m.revision.clone(),
        );
        m
    }
}

/// The thresholds of the decision.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// How long the follower may be out of step before the replica is not ready.
    pub grace: Duration,
    /// How much longer before open sessions are sent away.
    pub going_away_after: Duration,
}

/// The decision at `now` and when it changes next without new input. Pure.
/// `unsynced_since`: since when the cache is out of step; `uncontacted_since`: since when the
/// replica is out of contact (no grace: the progress check's timeout is it).
fn decide(
    ever_synced: bool,
    unsynced_since: Option<Instant>,
    uncontacted_since: Option<Instant>,
    now: Instant,
    t: Timing,
) -> (State, Option<Instant>) {
    if !ever_synced {
        return (State::NotReady, None);
    }
    let unready_at = match (unsynced_since.map(|s| s + t.grace), uncontacted_since) {
        (None, None) => return (State::Ready, None),
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
    };
    let away_at = unready_at + t.going_away_after;
    if now < unready_at {
        (State::Ready, Some(unready_at))
    } else if now < away_at {
        (State::NotReady, Some(away_at))
    } else {
        (State::GoingAway, None)
    }
}

/// A new decision channel starting at `initial` ([`run`] takes it over).
pub(crate) fn channel(initial: State) -> (watch::Sender<State>, Readiness) {
    let (tx, rx) = watch::channel(initial);
    (tx, Readiness { rx })
}

/// The names the health service reports readiness under.
const HEALTH_NAMES: [&str; 2] = ["", "dlb.v1.Discovery"];

/// Owns the decision until the shutdown starts (see the module docs).
pub(crate) async fn run(
    cache: Arc<Cache>,
    mut contact: watch::Receiver<Contact>,
    timing: Timing,
    tx: watch::Sender<State>,
    health: tonic_health::server::HealthReporter,
    metrics: ReadinessMetrics,
    shutdown: crate::shutdown::Shutdown,
) {
    let mut synced = cache.synced();
    let mut revisions = cache.revisions();
    let mut ever_synced = false;
    let mut unsynced_since: Option<Instant> = None;
    let mut published: Option<State> = None;
    seen(
        *synced.borrow_and_update(),
        &mut ever_synced,
        &mut unsynced_since,
    );
    let mut uncontacted_since: Option<Instant> = None;
    // A coordination without contact to lose hands over a closed channel: read once, then
    // no more changes.
    let mut contact_open = true;
    touched(contact.borrow_and_update().ok(), &mut uncontacted_since);
    loop {
        metrics.revision.set(gauge(*revisions.borrow_and_update()));
        let (state, next) = decide(
            ever_synced,
            unsynced_since,
            uncontacted_since,
            Instant::now(),
            timing,
        );
        if published != Some(state) {
            if shutdown.is_started() {
                return;
            }
            let was_ready = published == Some(State::Ready);
            let ready = state == State::Ready;
            if published.is_none() || was_ready != ready {
                let status = if ready {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                for name in HEALTH_NAMES {
                    health.set_service_status(name, status).await;
                }
                metrics.ready.set(i64::from(ready));
            }
            match state {
                State::Ready if published.is_some() => {
                    tracing::info!("replica in step with its store again: serving")
                }
                State::Ready => {}
                State::NotReady => tracing::warn!(
                    grace_ms = timing.grace.as_millis() as u64,
                    in_step = unsynced_since.is_none(),
                    in_contact = uncontacted_since.is_none(),
                    unproven_ms = unproven_ms(&contact),
                    "replica out of step with its store: NOT_SERVING, refusing new sessions"
                ),
                State::GoingAway => tracing::warn!(
                    unproven_ms = unproven_ms(&contact),
                    "replica still out of step with its store: sending sessions away"
                ),
            }
            tx.send_replace(state);
            published = Some(state);
        }
        tokio::select! {
            biased;
            _ = shutdown.stopped() => return,
            r = synced.changed() => {
                if r.is_err() {
                    return;
                }
                seen(*synced.borrow_and_update(), &mut ever_synced, &mut unsynced_since);
            }
            r = revisions.changed() => {
                if r.is_err() {
                    return;
                }
            }
            r = contact.changed(), if contact_open => {
                if r.is_err() {
                    contact_open = false;
                } else {
                    touched(contact.borrow_and_update().ok(), &mut uncontacted_since);
                }
            }
            _ = sleep_until(next) => {}
        }
    }
}

/// Records one reading of the follower's flag.
fn seen(synced: bool, ever: &mut bool, since: &mut Option<Instant>) {
    if synced {
        *ever = true;
        *since = None;
    } else if since.is_none() {
        *since = Some(Instant::now());
    }
}

/// Records one reading of the contact.
fn touched(ok: bool, since: &mut Option<Instant>) {
    if ok {
        *since = None;
    } else if since.is_none() {
        *since = Some(Instant::now());
    }
}

/// Milliseconds since the replica last proved it is current (`None`: it makes no checks).
fn unproven_ms(contact: &watch::Receiver<Contact>) -> Option<u64> {
    let at = contact.borrow().proven_at?;
    Some(u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX))
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        grace: Duration::from_secs(1),
        going_away_after: Duration::from_secs(5),
    };

    #[test]
    fn decision_follows_the_thresholds() {
        let t0 = Instant::now();
        assert_eq!(decide(false, None, None, t0, T), (State::NotReady, None));
        assert_eq!(decide(true, None, None, t0, T), (State::Ready, None));
        let s = Some(t0);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(
            decide(true, s, None, at(999), T),
            (State::Ready, Some(at(1000)))
        );
        assert_eq!(
            decide(true, s, None, at(1000), T),
            (State::NotReady, Some(at(6000)))
        );
        assert_eq!(decide(true, s, None, at(6000), T), (State::GoingAway, None));
        // Out of contact: no grace (the progress check's timeout is it).
        assert_eq!(
            decide(true, None, s, at(0), T),
            (State::NotReady, Some(at(5000)))
        );
        assert_eq!(decide(true, None, s, at(5000), T), (State::GoingAway, None));
        // Both: the earlier threshold.
        assert_eq!(
            decide(true, s, Some(at(500)), at(500), T),
            (State::NotReady, Some(at(5500)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_out_of_contact_is_not_ready_at_once_and_sends_sessions_away() {
        let cache = Arc::new(Cache::new(1, 8));
        cache.set_synced(true);
        let (contact_tx, contact) = watch::channel(Contact::OK);
        let (tx, readiness) = channel(State::Ready);
        let (health, _svc) = tonic_health::server::health_reporter();
        let stop = crate::shutdown::Shutdown::new();
        let t = Timing {
            grace: Duration::from_secs(1),
            going_away_after: DEFAULT_GOING_AWAY_AFTER,
        };
        tokio::spawn(run(
            cache,
            contact,
            t,
            tx,
            health,
            ReadinessMetrics::default(),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(readiness.is_ready());
        // The progress check failed: NOT_SERVING without waiting for the cache's grace.
        let lost = Instant::now();
        contact_tx.send_modify(|c| c.reads = false);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(readiness.state(), State::NotReady);
        let mut away = readiness.clone();
        away.going_away().await;
        let took = lost.elapsed();
        assert!(
            took >= DEFAULT_GOING_AWAY_AFTER
                && took <= DEFAULT_GOING_AWAY_AFTER + Duration::from_millis(20),
            "sent away {took:?} after the contact was lost"
        );
        // The lease lost too, then both back: ready again.
        contact_tx.send_modify(|c| c.lease = false);
        contact_tx.send_modify(|c| c.reads = true);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            readiness.state(),
            State::GoingAway,
            "the lease is still lost"
        );
        contact_tx.send_modify(|c| c.lease = true);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(readiness.is_ready());
        stop.start();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cache_out_of_step_turns_not_ready_then_sends_sessions_away() {
        use crate::store::{MemoryStore, Store};
        let store = Arc::new(MemoryStore::default());
        let cache = Arc::new(Cache::new(store.epoch(), 8));
        let (tx, readiness) = channel(State::NotReady);
        let (health, _svc) = tonic_health::server::health_reporter();
        let stop = crate::shutdown::Shutdown::new();
        tokio::spawn(run(
            cache.clone(),
            watch::channel(Contact::OK).1,
            T,
            tx,
            health,
            ReadinessMetrics::default(),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(readiness.state(), State::NotReady, "not loaded yet");
        cache.set_synced(true);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(readiness.is_ready());
        cache.set_synced(false);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(readiness.is_ready(), "within the grace");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(readiness.state(), State::NotReady);
        assert_eq!(
            readiness.admit().map_err(|s| s.code()),
            Err(tonic::Code::Unavailable)
        );
        let mut away = readiness.clone();
        tokio::time::timeout(Duration::from_secs(6), away.going_away())
            .await
            .expect("sent away after grace + going_away_after");
        cache.set_synced(true);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(readiness.is_ready(), "back in step: ready again");
        stop.start();
    }
}
