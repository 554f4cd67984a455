//! What each DLB session has acknowledged, per service: the ack state the drain barrier
//! ([`crate::api::barrier`]) reads.
//!
//! Each session owns one [`SessionAcks`] entry behind a `parking_lot::Mutex` (written by its own
//! task when it sends an update and when the client acks one; read by a barrier; held for O(1)
//! work, never across an `.await`). The registry [`AckBook`] maps session ids to them; a session
//! leaves when it ends ([`AckEntry`]'s `Drop`). Every change bumps one `watch` counter, so a
//! waiting barrier re-checks at once instead of polling.
//!
//! Bounded by the session's own bounds: one small record per followed service.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

/// One followed service on one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Followed {
    /// The newest version sent to the client.
    pub sent: u64,
    /// The newest version the client acknowledged (never above `sent`).
    pub acked: u64,
    /// Since when a sent version has waited for its acknowledgement (`None`: none waits).
    pub waiting_since: Option<Instant>,
}

/// One session's ack state.
#[derive(Debug, Default)]
pub struct SessionAcks {
    /// The SDK's `Subscribe.client_id` (escaped, truncated).
    pub client_id: String,
    /// The peer's address, if known.
    pub peer: String,
    /// Per followed service that exists (a service the client was told does not exist is
    /// absent: it routes nothing there).
    pub services: HashMap<String, Followed>,
}

/// Every session's ack state on this replica.
#[derive(Debug)]
pub struct AckBook {
    sessions: Mutex<HashMap<u64, Arc<Mutex<SessionAcks>>>>,
    changed: watch::Sender<u64>,
}

impl Default for AckBook {
    fn default() -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
        }
    }
}

/// A follower of a service, as a barrier sees it.
#[derive(Debug, Clone)]
pub struct Follower {
    /// The session's id on this replica.
    pub session: u64,
    /// Its client id and peer.
    pub client_id: String,
    /// The peer's address.
    pub peer: String,
    /// Its state for the service.
    pub state: Followed,
}

impl AckBook {
    /// Registers session `id`.
    pub fn register(self: &Arc<Self>, id: u64, peer: String) -> AckEntry {
        let state = Arc::new(Mutex::new(SessionAcks {
            peer,
            ..Default::default()
        }));
        self.sessions.lock().insert(id, state.clone());
        AckEntry {
            book: self.clone(),
            state,
            id,
        }
    }

    /// A receiver that changes whenever some session's ack state may have changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Runs `f` on each session following `service` (client id, peer, state), each under its
    /// own lock, briefly, in no particular order: O(sessions), nothing copied.
    pub fn for_each_follower(&self, service: &str, mut f: impl FnMut(&str, &str, Followed)) {
        let sessions: Vec<Arc<Mutex<SessionAcks>>> =
            self.sessions.lock().values().cloned().collect();
        for s in sessions {
            let s = s.lock();
            if let Some(state) = s.services.get(service) {
                f(&s.client_id, &s.peer, *state);
            }
        }
    }

    /// The sessions following `service`, ordered by session id.
    pub fn followers(&self, service: &str) -> Vec<Follower> {
        let sessions: Vec<(u64, Arc<Mutex<SessionAcks>>)> = self
            .sessions
            .lock()
            .iter()
            .map(|(id, s)| (*id, s.clone()))
            .collect();
        let mut out: Vec<Follower> = sessions
            .into_iter()
            .filter_map(|(session, s)| {
                let s = s.lock();
                let state = *s.services.get(service)?;
                Some(Follower {
                    session,
                    client_id: s.client_id.clone(),
                    peer: s.peer.clone(),
                    state,
                })
            })
            .collect();
        out.sort_by_key(|f| f.session);
        out
    }
}

/// A session's entry in the [`AckBook`]; removes it when dropped.
#[derive(Debug)]
pub struct AckEntry {
    book: Arc<AckBook>,
    state: Arc<Mutex<SessionAcks>>,
    id: u64,
}

impl Drop for AckEntry {
    fn drop(&mut self) {
        self.book.sessions.lock().remove(&self.id);
        self.book.bump();
    }
}

impl AckEntry {
    /// Records the client's id (from its Subscribe).
    pub fn client_id(&self, id: String) {
        self.state.lock().client_id = id;
    }

    /// Version `version` of `service` is being sent to the client.
    pub fn sent(&self, service: &str, version: u64) {
        {
            let mut s = self.state.lock();
            let f = s.services.entry(service.to_owned()).or_default();
            f.sent = f.sent.max(version);
            if f.acked < f.sent && f.waiting_since.is_none() {
                f.waiting_since = Some(Instant::now());
            }
        }
        self.book.bump();
    }

    /// The client acknowledged `version` of `service` (clamped to what was sent: a client
    /// cannot claim a version it was never given).
    pub fn acked(&self, service: &str, version: u64) {
        {
            let mut s = self.state.lock();
            let Some(f) = s.services.get_mut(service) else {
                return;
            };
            f.acked = f.acked.max(version.min(f.sent));
            if f.acked >= f.sent {
                f.waiting_since = None;
            }
        }
        self.book.bump();
    }

    /// The client no longer follows `service` (unsubscribed, or told it does not exist).
    pub fn forget(&self, service: &str) {
        if self.state.lock().services.remove(service).is_some() {
            self.book.bump();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn acks_are_clamped_and_entries_leave() {
        let book = Arc::new(AckBook::default());
        let a = book.register(1, "p".into());
        a.sent("s", 5);
        assert!(book.followers("s")[0].state.waiting_since.is_some());
        a.acked("s", 9);
        let f = book.followers("s")[0].state;
        assert_eq!((f.sent, f.acked, f.waiting_since), (5, 5, None));
        a.acked("other", 3);
        assert!(book.followers("other").is_empty());
        drop(a);
        assert!(book.followers("s").is_empty());
    }
}
