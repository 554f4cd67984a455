//! The drain barriers' board between replicas (`docs/drain.md`, "Several replicas"): a replica
//! waiting on a barrier posts a request, every other replica posts its own clients' answer to
//! it, and the waiting replica reads them. On etcd ([`EtcdBoard`], feature `etcd`) these are
//! keys attached to each replica's membership lease, so a replica's posts vanish with it:
//!
//! * `<prefix>/barriers/<barrier-id>` — the request: `VERSION\nSERVICE\nSERVER_ID`;
//! * `<prefix>/barrier-acks/<barrier-id>/<replica-id>` — a replica's answer: a protobuf
//!   `DrainBarrier` of its own clients (`confirmed`, `pending`, `stalled`, `in_flight`);
//! * `<prefix>/demand/<replica-id>` — a replica's zone-demand counts (`reports::demand::replicas`),
//!   posted every second when they changed and read by every replica.
//!
//! Why the store and not the load-report forwarding path: forwarding goes to the leader only,
//! once a second, while a barrier runs on whichever replica answered the call and needs every
//! replica's acknowledgements as they come. The board is read by polling (every
//! [`POLL`]) — a few small reads a second per replica, and a barrier is rare.

use std::time::Duration;

use futures::future::BoxFuture;

use crate::Error;

/// How often replicas look for requests, and a waiting replica for answers.
pub const POLL: Duration = Duration::from_millis(100);

/// A barrier request as posted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The barrier's id (unique: the posting replica's id and a counter).
    pub id: String,
    /// The version every client must acknowledge.
    pub version: u64,
    /// The service.
    pub service: String,
    /// The backend drained or removed.
    pub server_id: String,
}

impl Request {
    /// The posted value.
    pub fn encode(&self) -> Vec<u8> {
        format!("{}\n{}\n{}", self.version, self.service, self.server_id).into_bytes()
    }

    /// Reads a posted value; `None` when it is malformed.
    pub fn decode(id: &str, value: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(value).ok()?;
        let mut parts = s.split('\n');
        let version = parts.next()?.parse().ok()?;
        let service = parts.next()?.to_owned();
        let server_id = parts.next()?.to_owned();
        Some(Self {
            id: id.to_owned(),
            version,
            service,
            server_id,
        })
    }
}

/// The answers to one request: (replica id, answer).
pub type Answers = Vec<(String, Vec<u8>)>;

/// The board (see the module docs).
pub trait Board: Send + Sync + 'static {
    /// Posts a request (attached to this replica's membership).
    fn post(&self, request: &Request) -> BoxFuture<'_, Result<(), Error>>;
    /// Removes a request and every answer to it.
    fn withdraw(&self, id: &str) -> BoxFuture<'_, Result<(), Error>>;
    /// The requests posted now.
    fn requests(&self) -> BoxFuture<'_, Result<Vec<Request>, Error>>;
    /// Posts this replica's answer to request `id`.
    fn answer(&self, id: &str, answer: Vec<u8>) -> BoxFuture<'_, Result<(), Error>>;
    /// The answers to request `id`: (replica id, answer).
    fn answers(&self, id: &str) -> BoxFuture<'_, Result<Answers, Error>>;
    /// Posts this replica's zone-demand counts, replacing its previous post (attached to its
    /// membership).
    fn post_demand(&self, value: Vec<u8>) -> BoxFuture<'_, Result<(), Error>>;
    /// Every replica's zone-demand post: (replica id, value).
    fn demand(&self) -> BoxFuture<'_, Result<Answers, Error>>;
}

#[cfg(feature = "etcd")]
pub use etcd_board::EtcdBoard;

#[cfg(feature = "etcd")]
mod etcd_board {
    use std::sync::Arc;

    use etcd_client::{Client, DeleteOptions, GetOptions, PutOptions};
    use futures::future::BoxFuture;
    use parking_lot::Mutex;

    use super::{Board, Request};
    use crate::Error;

    /// The board in etcd (see the module docs).
    pub struct EtcdBoard {
        pub(in crate::replicas) client: Client,
        /// `<prefix>` without a trailing slash.
        pub(in crate::replicas) root: String,
        pub(in crate::replicas) me: Arc<str>,
        /// The membership lease (0: none yet).
        pub(in crate::replicas) lease: Arc<Mutex<i64>>,
    }

    fn err(e: &etcd_client::Error) -> Error {
        crate::etcd::etcd_error("etcd (drain barriers)", e, "")
    }

    impl EtcdBoard {
        fn requests_prefix(&self) -> String {
            format!("{}/barriers/", self.root)
        }
        fn answers_prefix(&self, id: &str) -> String {
            format!("{}/barrier-acks/{id}/", self.root)
        }
        /// Every key under `prefix`: the rest of its key and its value.
        async fn list(&self, prefix: String) -> Result<Vec<(String, Vec<u8>)>, Error> {
            let r = self
                .client
                .kv_client()
                .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| err(&e))?;
            Ok(r.kvs()
                .iter()
                .filter_map(|kv| {
                    let rest = kv.key_str().ok()?.strip_prefix(&prefix)?;
                    Some((rest.to_owned(), kv.value().to_vec()))
                })
                .collect())
        }
        /// Puts `key` under this replica's lease (it goes with the replica).
        async fn put_leased(&self, key: String, value: Vec<u8>) -> Result<(), Error> {
            let lease = self.lease()?;
            self.client
                .kv_client()
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
                .map_err(|e| err(&e))?;
            Ok(())
        }

        fn lease(&self) -> Result<i64, Error> {
            match *self.lease.lock() {
                0 => Err(Error::Storage(
                    "drain barrier: this replica has not joined the replica set".into(),
                )),
                l => Ok(l),
            }
        }
    }

    impl Board for EtcdBoard {
        fn post(&self, request: &Request) -> BoxFuture<'_, Result<(), Error>> {
            let key = format!("{}{}", self.requests_prefix(), request.id);
            let value = request.encode();
            Box::pin(self.put_leased(key, value))
        }

        fn withdraw(&self, id: &str) -> BoxFuture<'_, Result<(), Error>> {
            let key = format!("{}{id}", self.requests_prefix());
            let answers = self.answers_prefix(id);
            Box::pin(async move {
                let mut kv = self.client.kv_client();
                kv.delete(key, None).await.map_err(|e| err(&e))?;
                kv.delete(answers, Some(DeleteOptions::new().with_prefix()))
                    .await
                    .map_err(|e| err(&e))?;
                Ok(())
            })
        }

        fn requests(&self) -> BoxFuture<'_, Result<Vec<Request>, Error>> {
            Box::pin(async move {
                let listed = self.list(self.requests_prefix()).await?;
                Ok(listed
                    .into_iter()
                    .filter_map(|(id, value)| Request::decode(&id, &value))
                    .collect())
            })
        }

        fn answer(&self, id: &str, answer: Vec<u8>) -> BoxFuture<'_, Result<(), Error>> {
            let key = format!("{}{}", self.answers_prefix(id), self.me);
            Box::pin(self.put_leased(key, answer))
        }

        fn answers(&self, id: &str) -> BoxFuture<'_, Result<super::Answers, Error>> {
            let prefix = self.answers_prefix(id);
            Box::pin(async move { self.list(prefix).await })
        }

        fn post_demand(&self, value: Vec<u8>) -> BoxFuture<'_, Result<(), Error>> {
            let key = format!("{}/demand/{}", self.root, self.me);
            Box::pin(self.put_leased(key, value))
        }

        fn demand(&self) -> BoxFuture<'_, Result<super::Answers, Error>> {
            let prefix = format!("{}/demand/", self.root);
            Box::pin(async move { self.list(prefix).await })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r = Request {
            id: "r1-3".into(),
            version: 42,
            service: "web".into(),
            server_id: "a".into(),
        };
        assert_eq!(Request::decode("r1-3", &r.encode()), Some(r));
        assert_eq!(Request::decode("x", b"nope"), None);
    }
}
