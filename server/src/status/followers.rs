//! The clients following a service on this replica, with the version each acknowledged: DLB
//! SDK sessions (the [`AckBook`](crate::api::discovery::acks::AckBook) the drain barrier reads)
//! and xDS streams subscribed to the service's endpoints (EDS, by name or wildcard).
//!
//! **Lagging** means behind for longer than [`LAG_GRACE`], not merely behind at this instant: a
//! change reaches every client a few milliseconds after the cache, and a page that flagged
//! each of them in that window would cry wolf on every change. How long a client has been
//! behind is the shorter of
//!
//! * the time since the cache received the first change newer than the version the client
//!   acknowledged ([`Cache::behind_since`](crate::cache::Cache::behind_since)), and
//! * the time its oldest unacknowledged update has waited for its Ack (`waiting_since`; this
//!   bounds a client that joined after that change: it is behind only since it was sent one).
//!
//! When neither is known (no history, nothing waiting) the client is not called lagging.
//! An xDS client is in step, like the drain barrier counts it, when it acknowledged endpoints
//! built from the current version or with the same content (a change that alters nothing an
//! xDS client sees sends it nothing). O(sessions + streams) under their short locks.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::Status;
use crate::api::xds;
use crate::cache::Behind;

/// How long a client may be behind the service's version before it shows as lagging.
pub const LAG_GRACE: Duration = Duration::from_secs(2);

/// A client following a service.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Follower {
    /// `sdk` (a DLB session) or `xds`.
    pub kind: &'static str,
    /// `dlb`, `xds-sotw` or `xds-delta`.
    pub protocol: String,
    /// The session's or stream's id on this replica.
    pub stream: u64,
    /// The SDK's `client_id` or the xDS `node.id` (escaped, truncated).
    pub client_id: String,
    /// The peer's address.
    pub peer: String,
    /// The service version (store revision) it acknowledged last; 0: none yet (or an xDS
    /// version DLB cannot read).
    pub acked_version: u64,
    /// How long it has been behind the service's version, milliseconds (absent: in step, or
    /// not known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub behind_ms: Option<u64>,
    /// Behind for longer than [`LAG_GRACE`].
    pub lagging: bool,
}

/// How long a client that is behind has been (see the module docs); `None`: unknown.
fn behind_for(behind: Behind, waiting_since: Option<Instant>, now: Instant) -> Option<Duration> {
    let cache = match behind {
        Behind::No => return None,
        Behind::Since(t) | Behind::AtLeastSince(t) => Some(now.saturating_duration_since(t)),
        Behind::Unknown => None,
    };
    let waiting = waiting_since.map(|t| now.saturating_duration_since(t));
    match (cache, waiting) {
        (Some(c), Some(w)) => Some(c.min(w)),
        (c, w) => c.or(w),
    }
}

fn follower(
    kind: &'static str,
    protocol: String,
    stream: u64,
    client_id: &str,
    peer: &str,
    acked_version: u64,
    behind: Option<Duration>,
) -> Follower {
    Follower {
        kind,
        protocol,
        stream,
        client_id: client_id.to_owned(),
        peer: peer.to_owned(),
        acked_version,
        behind_ms: behind.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        lagging: behind.is_some_and(|d| d > LAG_GRACE),
    }
}

/// The clients on this replica following `service` (current version `version`): SDK
/// sessions by session id, then xDS streams by stream id.
pub fn followers(status: &Status, service: &str, version: u64) -> Vec<Follower> {
    let now = Instant::now();
    let cache = &status.shared.cache;
    let mut out: Vec<Follower> = status
        .shared
        .acks
        .followers(service)
        .into_iter()
        .map(|f| {
            let s = f.state;
            let behind = if s.acked >= version {
                None
            } else {
                behind_for(cache.behind_since(service, s.acked), s.waiting_since, now)
            };
            follower(
                "sdk",
                "dlb".to_owned(),
                f.session,
                &f.client_id,
                &f.peer,
                s.acked,
                behind,
            )
        })
        .collect();
    // The current endpoints of each client zone (per-node EDS), built (or taken from the
    // cache's memo) only when an xDS client of that zone follows the service and has not
    // acknowledged the current version.
    let mut current: std::collections::HashMap<
        Option<xds::assignment::Zone>,
        Option<xds::clients::Held>,
    > = std::collections::HashMap::new();
    for c in status.shared.xds_clients.list() {
        let Some(t) = c.types.get(xds::resources::ENDPOINTS) else {
            continue;
        };
        if !(t.wildcard || t.names.contains(service)) {
            continue;
        }
        let acked = c.endpoints_acked.get(service);
        let zone = xds::assignment::Zone::of(c.locality.as_ref());
        let in_step = acked.is_some_and(|a| {
            a.version >= version
                || current
                    .entry(zone.clone())
                    .or_insert_with(|| {
                        xds::built(
                            cache,
                            xds::resources::ENDPOINTS,
                            service,
                            zone.as_ref(),
                            None,
                        )
                        .map(|b| b.held())
                    })
                    .as_ref()
                    .is_some_and(|cur| cur.hash == a.hash)
        });
        let held = acked.map_or(0, |a| a.version);
        let behind = if in_step {
            None
        } else {
            behind_for(cache.behind_since(service, held), t.waiting_since, now)
        };
        out.push(follower(
            "xds",
            format!("xds-{}", c.protocol),
            c.stream,
            &c.node_id,
            &c.peer,
            held,
            behind,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lagging_needs_a_while_behind() {
        let now = Instant::now();
        tokio::time::advance(Duration::from_secs(10)).await;
        let now_later = Instant::now();
        let secs = |s| Some(Duration::from_secs(s));
        // In step: never behind.
        assert_eq!(behind_for(Behind::No, Some(now), now_later), None);
        // Behind since a change 10 s ago, nothing waiting: 10 s.
        assert_eq!(behind_for(Behind::Since(now), None, now_later), secs(10));
        // ...but it was sent an update just now (it joined late): only since then.
        assert_eq!(
            behind_for(Behind::Since(now), Some(now_later), now_later),
            secs(0)
        );
        // A change just now, an old unacknowledged update: behind since the change.
        assert_eq!(
            behind_for(Behind::Since(now_later), Some(now), now_later),
            secs(0)
        );
        assert_eq!(
            behind_for(Behind::AtLeastSince(now), Some(now), now_later),
            secs(10)
        );
        assert_eq!(behind_for(Behind::Unknown, Some(now), now_later), secs(10));
        assert_eq!(behind_for(Behind::Unknown, None, now_later), None);
        let f = |d| follower("sdk", "dlb".into(), 1, "c", "p", 1, d);
        assert!(!f(secs(2)).lagging, "the grace is inclusive");
        assert!(f(Some(Duration::from_millis(2001))).lagging);
        assert!(!f(None).lagging);
    }
}
