//! Load-report sums between replicas on etcd (feature `etcd`; the design is in
//! `reports::forward` and `docs/etcd.md`, "Load reports").
//!
//! * **Send**: a replica that does not lead puts each batch, protobuf-encoded
//!   ([`Batch`]), at `<prefix>/loads/<replica-id>`, attached to its membership lease, so the key
//!   disappears with the replica. Every put is one etcd revision; the key only ever holds the
//!   latest batch.
//! * **Receive**: while this replica leads, one task watches `<prefix>/loads/` from the current
//!   revision and delivers every put of another replica, in revision order, to a bounded
//!   channel ([`super::FORWARDED_QUEUE`]; when the outlier task falls behind, newer batches are
//!   dropped and logged). A batch put before this replica became leader is not delivered (its
//!   sender had a leader then); a watch that breaks is opened again from the current revision,
//!   so what was put meanwhile is lost. Both only cost samples of traffic, never a wrong
//!   decision. A value that does not decode is logged and skipped.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions, WatchOptions};
use prost::Message;
use tokio::sync::{mpsc, watch};

use super::Batch;
use crate::Error;

/// Pause before the watch is opened again after an error.
const RETRY: Duration = Duration::from_millis(500);

/// The key prefix of the batches: `<prefix>/loads/`.
pub(super) fn prefix(root: &str) -> String {
    format!("{}/loads/", root.trim_end_matches('/'))
}

/// Puts `batch` at `key` with the membership `lease` (0: this replica has no lease yet).
pub(super) async fn send(
    client: &Client,
    key: String,
    lease: i64,
    batch: &Batch,
) -> Result<(), Error> {
    if lease == 0 {
        return Err(Error::Storage(
            "load reports not forwarded: this replica has not joined the replica set".into(),
        ));
    }
    client
        .kv_client()
        .put(
            key,
            batch.encode_to_vec(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(|e| crate::etcd::etcd_error("etcd (load reports to the leader)", &e, ""))?;
    Ok(())
}

/// Delivers the other replicas' batches to `tx` while `leadership` says this replica leads.
/// Returns when `tx` is closed or `leadership` ends.
pub(super) async fn receive(
    client: Client,
    prefix: String,
    me: Arc<str>,
    mut leadership: watch::Receiver<Option<i64>>,
    tx: mpsc::Sender<Batch>,
) {
    loop {
        let Some(fence) = super::until_leader(&mut leadership).await else {
            return;
        };
        let options = WatchOptions::new().with_prefix();
        let mut stream = match client
            .watch_client()
            .watch(prefix.clone(), Some(options))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch forwarded load reports; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        tracing::debug!("receiving forwarded load reports");
        loop {
            tokio::select! {
                () = super::until_not_leader(&mut leadership, fence) => break,
                msg = stream.message() => {
                    let resp = match msg {
                        Ok(Some(resp)) if !resp.canceled() => resp,
                        Ok(Some(resp)) => {
                            tracing::warn!(reason = %resp.cancel_reason(), "forwarded load reports: watch cancelled; watching again");
                            tokio::time::sleep(RETRY).await;
                            break;
                        }
                        Ok(None) => {
                            tokio::time::sleep(RETRY).await;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "forwarded load reports: watch failed; watching again");
                            tokio::time::sleep(RETRY).await;
                            break;
                        }
                    };
                    for e in resp.events() {
                        // A delete (lease expiry) has version 0: nothing to deliver.
                        let Some(kv) = e.kv().filter(|kv| kv.version() > 0) else {
                            continue;
                        };
                        let batch = match Batch::decode(kv.value()) {
                            Ok(b) => b,
                            Err(err) => {
                                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %err,
                                    "forwarded load reports: undecodable batch skipped");
                                continue;
                            }
                        };
                        if *batch.replica == *me {
                            continue;
                        }
                        match tx.try_send(batch) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(b)) => {
                                tracing::warn!(from = %b.replica, "forwarded load reports: queue full, batch dropped");
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                        }
                    }
                }
            }
        }
    }
}
