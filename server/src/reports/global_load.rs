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

use std::collections::HashMap;
use std::time::Duration;

use dlb::proto;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::reports::loads::LoadTracker;

/// The least time between two pushes to one session.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// A session's global-load pushing state. See the module docs.
#[derive(Debug)]
pub struct GlobalPush {
    changed: watch::Receiver<u64>,
    /// The tracker generation of the last push.
    seen: u64,
    /// What was last sent per service (absent: nothing, i.e. all zero).
    sent: HashMap<String, HashMap<String, u64>>,
    last: Option<Instant>,
}

impl GlobalPush {
    /// A pusher following `loads`.
    pub fn new(loads: &LoadTracker) -> Self {
        Self {
            changed: loads.subscribe(),
            seen: 0,
            sent: HashMap::new(),
            last: None,
        }
    }

    /// Resolves when a push is due: a sum changed and [`MIN_INTERVAL`] has passed since the
    /// last push. Cancel-safe.
    pub async fn due(&mut self) {
        let seen = self.seen;
        if self.changed.wait_for(|g| *g != seen).await.is_err() {
            std::future::pending::<()>().await;
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
        session: u64,
        followed: impl Iterator<Item = &'a String>,
    ) -> Vec<proto::GlobalLoad> {
        self.seen = *self.changed.borrow_and_update();
        self.last = Some(Instant::now());
        let mut out = Vec::new();
        for service in followed {
            let others = loads.others(service, session);
            let before = self.sent.get(service);
            let same = match before {
                Some(b) => *b == others,
                None => others.is_empty(),
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
                zone_demand: Vec::new(),
            });
            self.sent.insert(service.clone(), others);
        }
        out
    }

    /// Forgets what was sent for a service the session stopped following.
    pub fn forget(&mut self, service: &str) {
        self.sent.remove(service);
    }
}
