//! Per-client xDS bookkeeping: who is connected, what each stream subscribed to per resource
//! type, the last version and nonce sent and acknowledged, and the last NACK; per service, the
//! endpoints (EDS) the client acknowledged, which the drain barrier reads
//! ([`crate::api::barrier`]; every acknowledgement bumps [`XdsClients::subscribe`]).
//!
//! Each ADS stream owns one [`ClientState`] behind a `parking_lot::Mutex` (written by its own
//! task on every request and response, read by `dlbctl xds-clients`; held for O(resource names)
//! work, never across an `.await`). The registry [`XdsClients`] maps stream ids to them; a
//! stream removes itself when it ends ([`Registration`]'s `Drop`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;

/// Longest NACK message kept and logged (bytes, cut on a character boundary).
pub const MAX_NACK_DETAIL: usize = 512;

/// A NACK as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// The version the client still holds (what it last accepted).
    pub version: String,
    /// The nonce of the response it rejected.
    pub nonce: String,
    /// The client's error message, escaped and truncated.
    pub message: String,
    /// When it arrived.
    pub at: SystemTime,
}

/// One service's endpoints (ClusterLoadAssignment) as a client holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// The resource's content hash.
    pub hash: String,
    /// The service version it was built from (0: unknown, e.g. an unreadable client version).
    pub version: u64,
}

/// One resource type on one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeState {
    /// The names subscribed to (empty with `wildcard`: every resource).
    pub names: BTreeSet<String>,
    /// A wildcard subscription (SotW LDS/CDS with no names).
    pub wildcard: bool,
    /// Version and nonce of the last response sent.
    pub sent_version: String,
    /// The nonce of the last response sent.
    pub sent_nonce: String,
    /// The last version the client acknowledged (empty: none yet).
    pub acked_version: String,
    /// The nonce of that acknowledged response.
    pub acked_nonce: String,
    /// Responses sent and NACKs received for this type.
    pub responses: u64,
    /// NACKs received for this type.
    pub nacks: u64,
    /// The last NACK, if any.
    pub last_nack: Option<Nack>,
    /// Since when a response of this type has waited for its acknowledgement (`None`: none).
    pub waiting_since: Option<tokio::time::Instant>,
}

/// One connected xDS client (one ADS stream).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientState {
    /// The stream's id (unique in this process).
    pub stream: u64,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    /// The peer's socket address, if known.
    pub peer: String,
    /// `node.id` from the first request (escaped, truncated).
    pub node_id: String,
    /// `node.user_agent_name` and version (escaped, truncated).
    pub user_agent: String,
    /// Per resource type URL.
    pub types: BTreeMap<String, TypeState>,
    /// Per service: the endpoints of the last EDS response sent.
    pub endpoints_sent: BTreeMap<String, Held>,
    /// Per service: the endpoints of the last EDS response acknowledged.
    pub endpoints_acked: BTreeMap<String, Held>,
}

/// Every connected xDS client.
#[derive(Debug)]
pub struct XdsClients {
    next: AtomicU64,
    clients: Mutex<HashMap<u64, Arc<Mutex<ClientState>>>>,
    /// Bumped on every acknowledgement and when a stream ends.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for XdsClients {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(0),
            clients: Mutex::new(HashMap::new()),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// A stream's entry in [`XdsClients`]; removes it when dropped.
#[derive(Debug)]
pub struct Registration {
    owner: Arc<XdsClients>,
    /// The stream's state.
    pub state: Arc<Mutex<ClientState>>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.owner.clients.lock().remove(&self.id);
        self.owner.bump();
    }
}

impl Registration {
    /// Tells waiting barriers that this stream's acknowledgements changed.
    pub fn bump(&self) {
        self.owner.bump();
    }
}

impl XdsClients {
    /// Registers a new stream.
    pub fn register(self: &Arc<Self>, protocol: &'static str, peer: String) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let state = Arc::new(Mutex::new(ClientState {
            stream: id,
            protocol,
            peer,
            ..Default::default()
        }));
        self.clients.lock().insert(id, state.clone());
        Registration {
            owner: self.clone(),
            state,
            id,
        }
    }

    /// Copies of every client's state, ordered by stream id.
    pub fn list(&self) -> Vec<ClientState> {
        let states: Vec<Arc<Mutex<ClientState>>> = self.clients.lock().values().cloned().collect();
        let mut out: Vec<ClientState> = states.iter().map(|s| s.lock().clone()).collect();
        out.sort_by_key(|c| c.stream);
        out
    }

    /// A receiver that changes whenever some stream's acknowledgements may have changed.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Runs `f` on every stream's state in turn (each under its own lock, briefly).
    pub fn for_each(&self, mut f: impl FnMut(&ClientState)) {
        let states: Vec<Arc<Mutex<ClientState>>> = self.clients.lock().values().cloned().collect();
        for s in states {
            f(&s.lock());
        }
    }

    /// Number of connected streams.
    pub fn len(&self) -> usize {
        self.clients.lock().len()
    }

    /// Whether no stream is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `s` escaped for logs (control characters and quotes), cut to at most `max` bytes.
pub fn escaped(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let e: String = c.escape_debug().collect();
        if out.len() + e.len() > max {
            out.push('…');
            break;
        }
        out.push_str(&e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_truncates() {
        assert_eq!(escaped("a\nb\"", 100), "a\\nb\\\"");
        let long = "x".repeat(1000);
        assert!(escaped(&long, 10).len() <= 10 + '…'.len_utf8());
    }

    #[test]
    fn registrations_leave_when_dropped() {
        let clients = Arc::new(XdsClients::default());
        let a = clients.register("sotw", "p".into());
        let b = clients.register("delta", "q".into());
        assert_eq!(clients.len(), 2);
        drop(a);
        let left = clients.list();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].protocol, "delta");
        drop(b);
        assert!(clients.is_empty());
    }
}
