//! Global least connections: pushing to each session the in-flight counts of the *other*
//! sessions (`GlobalLoad`), so that the SDK's least-connections picker compares
//! `its own live count + everyone else's` per backend.
//!
//! Each session owns one [`GlobalPush`]. It waits on the [load tracker](crate::reports::loads)'s change
//! signal (idle sessions never wake on a timer); when a sum moved, it waits until at least
//! [`MIN_INTERVAL`] (100 ms) has passed since its previous push, then, for each service it
//! follows, computes the others' counts (`LoadTracker::others`: all sessions' sums minus this
//! session's own report) and sends a `GlobalLoad` only for services whose counts differ from
//! what it last sent. Cost per push: O(followed services + backends with load).
//!
//! The same message carries the service's zone demand ([`crate::reports::demand`]): the pusher
//! also wakes on the demand tracker's publications, and a `GlobalLoad` goes out for a service
//! when its in-flight counts or its published demand (by generation) differ from what the
//! session last sent. Each message carries both in full (the SDK replaces what it held).

use std::collections::HashMap;
use std::time::Duration;

use dlb::proto;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::reports::demand::DemandTracker;
use crate::reports::loads::LoadTracker;

/// The least time between two pushes to one session.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// A session's global-load pushing state. See the module docs.
#[derive(Debug)]
pub struct GlobalPush {
    changed: watch::Receiver<u64>,
    /// The tracker generation of the last push.
    seen: u64,
    /// The demand tracker's publications, and the value seen at the last push.
    demand_changed: watch::Receiver<u64>,
    demand_seen: u64,
    /// What was last sent per service (absent: nothing, i.e. all zero), with the generation of
    /// the demand shares sent (0: none).
    sent: HashMap<String, (HashMap<String, u64>, u64)>,
    last: Option<Instant>,
}

/// Resolves when `rx` changes; never when its sender is gone.
async fn changed(rx: &mut watch::Receiver<u64>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl GlobalPush {
    /// A pusher following `loads`.
    pub fn new(loads: &LoadTracker, demand: &DemandTracker) -> Self {
        Self {
            changed: loads.subscribe(),
            seen: 0,
            demand_changed: demand.subscribe(),
            demand_seen: 0,
            sent: HashMap::new(),
            last: None,
        }
    }

    /// Resolves when a push is due: a sum or a demand share changed and [`MIN_INTERVAL`] has
    /// passed since the last push. Cancel-safe.
    pub async fn due(&mut self) {
        while *self.changed.borrow() == self.seen
            && *self.demand_changed.borrow() == self.demand_seen
        {
            tokio::select! {
                () = changed(&mut self.changed) => {}
                () = changed(&mut self.demand_changed) => {}
            }
        }
        if let Some(last) = self.last {
            tokio::time::sleep_until(last + MIN_INTERVAL).await;
        }
    }

    /// The `GlobalLoad` messages to send now for the services in `followed`, recording them as
    /// sent. `session` is this session's id.
    pub fn collect<'a>(
        &mut self,
        loads: &LoadTracker,
        demand: &DemandTracker,
        session: u64,
        followed: impl Iterator<Item = &'a String>,
    ) -> Vec<proto::GlobalLoad> {
        self.seen = *self.changed.borrow_and_update();
        self.demand_seen = *self.demand_changed.borrow_and_update();
        self.last = Some(Instant::now());
        let mut out = Vec::new();
        for service in followed {
            let others = loads.others(service, session);
            let (generation, shares) = demand.published(service);
            let same = match self.sent.get(service) {
                Some((b, g)) => *b == others && *g == generation,
                None => others.is_empty() && generation == 0,
            };
            if same {
                continue;
            }
            let mut backends: Vec<proto::BackendInFlight> = others
                .iter()
                .map(|(id, n)| proto::BackendInFlight {
                    server_id: id.clone(),
                    in_flight: *n,
                })
                .collect();
            backends.sort_by(|a, b| a.server_id.cmp(&b.server_id));
            out.push(proto::GlobalLoad {
                service: service.clone(),
                backends,
                zone_demand: crate::reports::demand::to_proto(&shares),
            });
            self.sent.insert(service.clone(), (others, generation));
        }
        out
    }

    /// Forgets what was sent for a service the session stopped following.
    pub fn forget(&mut self, service: &str) {
        self.sent.remove(service);
    }
}
