//! The drain barrier: after a backend is drained (or removed) at version V of its service, wait
//! until every client following the service on this replica has acknowledged V or newer — a
//! version in which the backend takes no new calls — and, optionally, until the backend's
//! global in-flight count (summed from the SDKs' load reports) is 0, or until a deadline.
//!
//! * **Who counts**: every DLB session following the service
//!   ([`crate::api::discovery::acks`]: confirmed once its Ack names V or newer) and every xDS
//!   stream subscribed to the service's endpoints (EDS, by name or wildcard;
//!   [`xds::clients`]: confirmed once it acknowledged endpoints built from V or newer, or
//!   endpoints with the same content as the current ones — a drain that changes nothing an xDS
//!   client sees sends it nothing).
//! * **Stalled clients** do not block: a client whose update has waited for its Ack longer
//!   than the session stall cut-off (`stall_deadline`) no longer counts, and the answer lists
//!   it under `stalled`.
//! * **No polling on the common path**: the wait re-checks whenever an Ack arrives (the
//!   [`crate::api::discovery::acks::AckBook`] and [`xds::XdsClients`] counters) or a load
//!   report moves the in-flight sums; a 100 ms tick catches stall cut-offs passing. Each check is
//!   O(sessions + streams) under short per-client locks, never across an `.await`.
//! * **Several replicas** (etcd): the waiting replica posts the request on the
//!   [board](crate::replicas::board); every other replica answers with its own clients' check
//!   ([`answer_requests`], polling the board every 100 ms), and the wait counts every live
//!   member's answer: a member that has not answered yet is pending (kind `replica`). The
//!   in-flight count is the sum of every replica's own.
//! * **Seen on the status page**: each wait in progress is listed in [`Active`] (`active`)
//!   with its latest check, and leaves it when it ends or its RPC is cancelled.

mod active;

pub(crate) use active::Active;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use dlb::model::ValidationError;
use dlb::proto;
use tokio::time::Instant;

use crate::api::{xds, Shared};
use crate::Error;

/// The deadline when a request leaves `timeout_ms` at 0.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest deadline a request may ask for.
pub const MAX_TIMEOUT_MS: u32 = 3_600_000;
/// Most clients listed in `pending` and in `stalled`.
pub const MAX_LISTED: usize = 100;
/// How often a waiting barrier re-checks without an Ack (stall cut-offs passing).
const TICK: Duration = Duration::from_millis(100);

/// A checked `BarrierWait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wait {
    /// Also wait for the backend's global in-flight count to reach 0.
    pub in_flight_zero: bool,
    /// The deadline, from the start of the wait.
    pub timeout: Duration,
    /// The backend is being removed (else drained).
    pub removal: bool,
}

impl Wait {
    /// Checks a request's wait option; `removal`: the backend is being removed (its in-flight
    /// calls are then no longer reported, so `in_flight_zero` is refused).
    pub fn parse(wait: Option<&proto::BarrierWait>, removal: bool) -> Result<Option<Self>, Error> {
        let Some(w) = wait else { return Ok(None) };
        if w.timeout_ms > MAX_TIMEOUT_MS {
            return Err(ValidationError::new(
                "wait.timeout_ms",
                w.timeout_ms,
                format!("at most {MAX_TIMEOUT_MS} (1 h)"),
            )
            .into());
        }
        if removal && w.in_flight_zero {
            return Err(ValidationError::new(
                "wait.in_flight_zero",
                true,
                "a removed backend's calls are no longer reported: drain it with DrainServer first",
            )
            .into());
        }
        let timeout = match w.timeout_ms {
            0 => DEFAULT_TIMEOUT,
            ms => Duration::from_millis(ms.into()),
        };
        Ok(Some(Self {
            in_flight_zero: w.in_flight_zero,
            timeout,
            removal,
        }))
    }
}

/// Source of barrier ids on this replica.
static NEXT_BARRIER: AtomicU64 = AtomicU64::new(0);

/// One check of the barrier.
#[derive(Debug, Default)]
struct Check {
    confirmed: u32,
    pending: Vec<proto::BarrierClient>,
    /// Pending clients other replicas counted but did not list.
    pending_unlisted: u32,
    stalled: Vec<proto::BarrierClient>,
    in_flight: u64,
}

/// Waits on the barrier for backend `server_id` of `service`, drained or removed at `version`.
pub(crate) async fn wait(
    shared: &Shared,
    service: &str,
    server_id: &str,
    version: u64,
    wait: Wait,
) -> proto::DrainBarrier {
    // Listed on the status page until this call ends or is dropped.
    let registration = shared.barriers.register(service, server_id, version, wait);
    let start = Instant::now();
    let deadline = start + wait.timeout;
    let mut acks = shared.acks.subscribe();
    let mut xds_acks = shared.xds_clients.subscribe();
    let mut loads = shared.loads.subscribe();
    let mut stopped = false;
    let posted = post(shared, service, server_id, version).await;
    let (check, ended) = loop {
        // Marked seen before the check: a change during it wakes the next wait.
        acks.borrow_and_update();
        xds_acks.borrow_and_update();
        loads.borrow_and_update();
        let mut check = check(shared, service, server_id, version, wait.in_flight_zero);
        if let Some((board, id)) = &posted {
            merge_answers(shared, &**board, id, version, &mut check).await;
        }
        registration.progress(
            check.confirmed,
            pending_total(&check),
            u32::try_from(check.stalled.len()).unwrap_or(u32::MAX),
            check.in_flight,
        );
        if check.pending.is_empty() && (!wait.in_flight_zero || check.in_flight == 0) {
            let ended = if wait.in_flight_zero {
                proto::BarrierEnd::InFlightZero
            } else {
                proto::BarrierEnd::Confirmed
            };
            break (check, ended);
        }
        if stopped || Instant::now() >= deadline {
            break (check, proto::BarrierEnd::Deadline);
        }
        let tick = Instant::now() + TICK;
        tokio::select! {
            _ = acks.changed() => {}
            _ = xds_acks.changed() => {}
            _ = loads.changed() => {}
            () = tokio::time::sleep_until(tick.min(deadline)) => {}
            // A shutting-down replica answers with what it knows now.
            () = shared.shutdown.stopped() => stopped = true,
        }
    };
    let waited = start.elapsed();
    drop(registration);
    if let Some((board, id)) = &posted {
        if let Err(e) = board.withdraw(id).await {
            tracing::warn!(error = %e, "drain barrier: could not withdraw the request; it goes with this replica's lease");
        }
    }
    let label = match ended {
        proto::BarrierEnd::Confirmed => "confirmed",
        proto::BarrierEnd::InFlightZero => "in_flight_zero",
        _ => "deadline",
    };
    shared.metrics.barrier(label, waited.as_secs_f64());
    let pending_total = pending_total(&check);
    let mut pending = check.pending;
    let order = |c: &proto::BarrierClient| (c.replica.clone(), c.kind.clone(), c.id.clone());
    pending.sort_by_key(order);
    pending.truncate(MAX_LISTED);
    let mut stalled = check.stalled;
    stalled.truncate(MAX_LISTED);
    if ended == proto::BarrierEnd::Deadline {
        tracing::warn!(
            service,
            server_id,
            version,
            pending = pending_total,
            "drain barrier: deadline passed before every client confirmed"
        );
    } else {
        tracing::info!(service, server_id, version, waited = ?waited, ended = label, "drain barrier passed");
    }
    proto::DrainBarrier {
        ended: ended as i32,
        version,
        confirmed: check.confirmed,
        pending,
        pending_total,
        stalled,
        in_flight: check.in_flight,
        waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
    }
}

/// Every pending client of a check, listed or not.
fn pending_total(check: &Check) -> u32 {
    u32::try_from(check.pending.len())
        .unwrap_or(u32::MAX)
        .saturating_add(check.pending_unlisted)
}

/// Posts the barrier on the board, when there are other replicas; the board and the id.
async fn post(
    shared: &Shared,
    service: &str,
    server_id: &str,
    version: u64,
) -> Option<(Arc<dyn crate::replicas::board::Board>, String)> {
    let board = shared.board.clone()?;
    let n = NEXT_BARRIER.fetch_add(1, Ordering::Relaxed) + 1;
    let request = crate::replicas::board::Request {
        id: format!("{n}@{}", shared.replica_id),
        version,
        service: service.to_owned(),
        server_id: server_id.to_owned(),
    };
    if let Err(e) = board.post(&request).await {
        // The other replicas cannot answer: each stays pending (named) until the deadline.
        tracing::warn!(error = %e, "drain barrier: could not post the request to the other replicas");
    }
    Some((board, request.id))
}

/// Adds the other live replicas' answers to `check`; a replica without an answer for
/// `version` is pending.
async fn merge_answers(
    shared: &Shared,
    board: &dyn crate::replicas::board::Board,
    id: &str,
    version: u64,
    check: &mut Check,
) {
    let answers: HashMap<String, Vec<u8>> = match board.answers(id).await {
        Ok(a) => a.into_iter().collect(),
        Err(e) => {
            tracing::debug!(error = %e, "drain barrier: could not read the other replicas' answers");
            HashMap::new()
        }
    };
    let members = shared.members.borrow().clone();
    for m in members.ids() {
        if **m == *shared.replica_id {
            continue;
        }
        let answer = answers
            .get(&**m)
            .and_then(|a| proto::DrainBarrier::decode(a.as_slice()).ok())
            .filter(|a| a.version == version);
        match answer {
            Some(a) => {
                check.confirmed = check.confirmed.saturating_add(a.confirmed);
                let unlisted = a
                    .pending_total
                    .saturating_sub(u32::try_from(a.pending.len()).unwrap_or(u32::MAX));
                check.pending_unlisted = check.pending_unlisted.saturating_add(unlisted);
                check.pending.extend(a.pending);
                check.stalled.extend(a.stalled);
                check.in_flight = check.in_flight.saturating_add(a.in_flight);
            }
            None => check.pending.push(proto::BarrierClient {
                kind: "replica".into(),
                id: m.to_string(),
                replica: m.to_string(),
                acked_version: 0,
                peer: String::new(),
            }),
        }
    }
}

/// Answers the other replicas' barrier requests with this replica's own clients, until the
/// task is dropped: polls the board every [`crate::replicas::board::POLL`], and posts an answer
/// when it changed (its own requests are answered by the waiting call itself).
pub(crate) async fn answer_requests(
    shared: Arc<Shared>,
    board: Arc<dyn crate::replicas::board::Board>,
) {
    let mine = format!("@{}", shared.replica_id);
    let mut last: HashMap<String, Vec<u8>> = HashMap::new();
    let mut acks = shared.acks.subscribe();
    let mut xds_acks = shared.xds_clients.subscribe();
    let mut loads = shared.loads.subscribe();
    loop {
        match board.requests().await {
            Ok(requests) => {
                last.retain(|id, _| requests.iter().any(|r| &r.id == id));
                for r in requests.iter().filter(|r| !r.id.ends_with(&mine)) {
                    let c = check(&shared, &r.service, &r.server_id, r.version, true);
                    let answer = local_answer(c, r.version).encode_to_vec();
                    if last.get(&r.id) == Some(&answer) {
                        continue;
                    }
                    match board.answer(&r.id, answer.clone()).await {
                        Ok(()) => {
                            last.insert(r.id.clone(), answer);
                        }
                        Err(e) => tracing::debug!(error = %e, "drain barrier: answer not posted"),
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "drain barrier: requests not read"),
        }
        // While a request is open, local changes answer at once; otherwise the next poll.
        let poll = tokio::time::sleep(crate::replicas::board::POLL);
        if last.is_empty() {
            poll.await;
        } else {
            tokio::select! {
                _ = acks.changed() => {}
                _ = xds_acks.changed() => {}
                _ = loads.changed() => {}
                () = poll => {}
            }
        }
    }
}

/// This replica's answer to a request for `version`.
fn local_answer(c: Check, version: u64) -> proto::DrainBarrier {
    let pending_total = u32::try_from(c.pending.len()).unwrap_or(u32::MAX);
    let mut pending = c.pending;
    pending.truncate(MAX_LISTED);
    let mut stalled = c.stalled;
    stalled.truncate(MAX_LISTED);
    proto::DrainBarrier {
        ended: proto::BarrierEnd::Unspecified as i32,
        version,
        confirmed: c.confirmed,
        pending,
        pending_total,
        stalled,
        in_flight: c.in_flight,
        waited_ms: 0,
    }
}

/// Who has confirmed `version` of `service` now.
fn check(
    shared: &Shared,
    service: &str,
    server_id: &str,
    version: u64,
    in_flight_zero: bool,
) -> Check {
    let now = Instant::now();
    let stall = shared.stall_deadline;
    let stalled_since = |since: Option<Instant>| since.is_some_and(|t| now >= t + stall);
    let mut out = Check::default();
    let replica = shared.replica_id.to_string();
    shared
        .acks
        .for_each_follower(service, |client_id, peer, state| {
            if state.acked >= version {
                out.confirmed += 1;
                return;
            }
            let client = proto::BarrierClient {
                kind: "sdk".into(),
                id: client_id.to_owned(),
                replica: replica.clone(),
                acked_version: state.acked,
                peer: peer.to_owned(),
            };
            if stalled_since(state.waiting_since) {
                out.stalled.push(client);
            } else {
                out.pending.push(client);
            }
        });
    shared.xds_clients.for_each(|c| {
        // The assignment this client's zone receives (per-node EDS; cached per zone).
        let zone = xds::assignment::Zone::of(c.locality.as_ref());
        let current = xds::built(
            &shared.cache,
            xds::resources::ENDPOINTS,
            service,
            zone.as_ref(),
            None,
        )
        .map(|b| b.held());
        let Some(t) = c.types.get(xds::resources::ENDPOINTS) else {
            return;
        };
        if !(t.wildcard || t.names.contains(service)) {
            return;
        }
        let acked = c.endpoints_acked.get(service);
        let confirmed = acked.is_some_and(|a| {
            a.version >= version || current.as_ref().is_some_and(|cur| cur.hash == a.hash)
        });
        let client = || proto::BarrierClient {
            kind: "xds".into(),
            id: c.node_id.clone(),
            replica: replica.clone(),
            acked_version: acked.map_or(0, |a| a.version),
            peer: c.peer.clone(),
        };
        if confirmed {
            out.confirmed += 1;
        } else if stalled_since(t.waiting_since) {
            out.stalled.push(client());
        } else {
            out.pending.push(client());
        }
    });
    if in_flight_zero || out.pending.is_empty() {
        out.in_flight = shared
            .loads
            .totals(service)
            .get(server_id)
            .copied()
            .unwrap_or(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_options_are_checked() {
        assert_eq!(Wait::parse(None, false).ok(), Some(None));
        let w = |in_flight_zero, timeout_ms| proto::BarrierWait {
            in_flight_zero,
            timeout_ms,
        };
        let parsed = Wait::parse(Some(&w(true, 0)), false).ok().flatten();
        assert_eq!(
            parsed,
            Some(Wait {
                in_flight_zero: true,
                timeout: DEFAULT_TIMEOUT,
                removal: false,
            })
        );
        let e = Wait::parse(Some(&w(false, MAX_TIMEOUT_MS + 1)), false)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("wait.timeout_ms")));
        let e = Wait::parse(Some(&w(true, 10)), true)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("wait.in_flight_zero")));
    }
}
