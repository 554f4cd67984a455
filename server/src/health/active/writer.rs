//! The writer: the only place probe verdicts reach the store.
//!
//! It takes every queued [`Write`] available at once, keeps the last one per backend, and
//! applies one batch of probe-slot updates ([`sources::probe`]) per service (a whole
//! rack going down is a few store commits, not thousands). Writes are applied in queue order by
//! this one task, so two verdicts of one backend never land out of order. When a batch fails
//! (a backend was removed meanwhile: `NOT_FOUND` fails the whole atomic batch), each write is
//! retried alone and the ones whose backend is gone are dropped.

use std::collections::BTreeMap;
use std::sync::Arc;

use dlb::proto;
use tokio::sync::{mpsc, oneshot};

use crate::health::sources;
use crate::store::{Mutation, Store};
use crate::Error;

/// A new probe verdict for one backend.
#[derive(Debug)]
pub(crate) struct Write {
    pub service: Arc<str>,
    pub id: Arc<str>,
    pub state: proto::SourceState,
    /// Told the outcome (the service's version after the write).
    pub done: Option<oneshot::Sender<Result<proto::Version, Error>>>,
}

fn reply(
    dones: Vec<oneshot::Sender<Result<proto::Version, Error>>>,
    r: &Result<proto::Version, Error>,
) {
    for d in dones {
        let _ = d.send(match r {
            Ok(v) => Ok(*v),
            Err(e) => Err(Error::Task(e.to_string())),
        });
    }
}

/// Applies queued writes until the queue closes or `shutdown` resolves.
pub(crate) async fn run(
    store: Arc<dyn Store>,
    mut queue: mpsc::UnboundedReceiver<Write>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut buf = Vec::new();
    loop {
        let n = tokio::select! {
            n = queue.recv_many(&mut buf, 4096) => n,
            _ = &mut shutdown => break,
        };
        if n == 0 {
            break;
        }
        // service -> id -> (last state, everyone waiting)
        type Pending = (
            proto::SourceState,
            Vec<oneshot::Sender<Result<proto::Version, Error>>>,
        );
        let mut by_service: BTreeMap<Arc<str>, BTreeMap<Arc<str>, Pending>> = BTreeMap::new();
        for w in buf.drain(..) {
            let e = by_service
                .entry(w.service)
                .or_default()
                .entry(w.id)
                .or_insert_with(|| (w.state.clone(), Vec::new()));
            e.0 = w.state;
            e.1.extend(w.done);
        }
        for (service, writes) in by_service {
            let batch: Vec<Mutation> = writes
                .iter()
                .map(|(id, (s, _))| sources::probe(id, s))
                .collect();
            match store.apply(service.to_string(), batch, None).await {
                Ok(applied) => {
                    let r = Ok(applied.version);
                    for (_, (_, dones)) in writes {
                        reply(dones, &r);
                    }
                }
                Err(_) => {
                    for (id, (state, dones)) in writes {
                        let r = store
                            .apply(service.to_string(), vec![sources::probe(&id, &state)], None)
                            .await
                            .map(|a| a.version);
                        if let Err(e) = &r {
                            tracing::debug!(service = %service, server_id = %id, error = %e, "probe verdict not written");
                        }
                        reply(dones, &r);
                    }
                }
            }
        }
    }
}
