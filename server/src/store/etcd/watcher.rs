//! The etcd store's watch: an etcd watch on `<prefix>/svc/` from a revision, its events grouped
//! by revision into one [`Change`] each, a compacted start reported as
//! [`WatchEvent::Compacted`], any other end as an error item (the consumer re-syncs).

use std::sync::Arc;

use etcd_client::{WatchOptions, WatchStream};
use futures::stream::{self, BoxStream, StreamExt};

use super::keys::{corrupt, decode_meta, decode_server, revision, Entry};
use super::{etcd, Inner};
use crate::store::{Change, WatchEvent};
use crate::Error;

impl Inner {
    pub(super) async fn open_watch(&self, from: u64) -> Result<WatchStream, Error> {
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        self.watch
            .clone()
            .watch(self.keys.root(), Some(options))
            .await
            .map_err(etcd)
    }

    /// The changes in one watch response: its events grouped by revision, one [`Change`] per
    /// revision. O(events).
    pub(super) fn changes(&self, events: &[etcd_client::Event]) -> Result<Vec<Arc<Change>>, Error> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < events.len() {
            let rev = events[i].kv().map_or(0, |kv| kv.mod_revision());
            let len = events[i..]
                .iter()
                .take_while(|e| e.kv().map_or(0, |kv| kv.mod_revision()) == rev)
                .count()
                .max(1);
            out.push(Arc::new(self.change(rev, &events[i..i + len])?));
            i += len;
        }
        Ok(out)
    }

    /// The [`Change`] of the events of one revision.
    pub(super) fn change(&self, rev: i64, events: &[etcd_client::Event]) -> Result<Change, Error> {
        let mut service: Option<&str> = None;
        let mut meta = None;
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        let mut service_deleted = false;
        for e in events {
            let kv = e.kv().ok_or_else(|| {
                Error::Storage(format!("etcd: revision {rev}: event without key"))
            })?;
            let (s, entry) = self
                .keys
                .parse(kv.key())
                .ok_or_else(|| corrupt(kv.key(), "not a key of this layout"))?;
            if *service.get_or_insert(s) != s {
                return Err(Error::Storage(format!(
                    "etcd: revision {rev} writes two services ({:?} and {s:?})",
                    service.unwrap_or_default()
                )));
            }
            // A delete event's key has version 0; a put's is at least 1. (Not
            // `Event::event_type`, which panics on an unknown type.)
            let deleted = kv.version() == 0;
            match (entry, deleted) {
                (Entry::Meta, false) => meta = Some(decode_meta(kv.key(), kv.value())?),
                (Entry::Meta, true) => service_deleted = true,
                (Entry::Server(id), false) => {
                    upserts.push(decode_server(kv.key(), id, kv.value())?);
                }
                (Entry::Server(id), true) => removals.push(id.to_owned()),
            }
        }
        let service = service.unwrap_or_default().to_owned();
        if service_deleted {
            removals.sort();
            // RemoveService: the delete event carries no base (the cache accepts base 0).
            return Ok(Change {
                service,
                base: 0,
                version: revision(rev),
                upserts: Vec::new(),
                created: Vec::new(),
                removals,
                removal_reasons: Default::default(),
                policy: None,
                deleted: true,
            });
        }
        let (meta, policy) = meta.ok_or_else(|| {
            Error::Storage(format!(
                "etcd: revision {rev} of service {service:?} has no meta key"
            ))
        })?;
        upserts.sort_by(|a, b| a.server_id.cmp(&b.server_id));
        removals.sort();
        Ok(Change {
            service,
            base: meta.base,
            version: revision(rev),
            upserts,
            created: meta.created,
            removals,
            removal_reasons: meta.removal_reasons,
            policy: meta.policy_changed.then_some(policy),
            deleted: false,
        })
    }
}

/// Where a watch stream is.
enum Watching {
    Start(u64),
    Running(Box<WatchStream>),
    Done,
}

fn watch_failed(what: impl std::fmt::Display) -> Error {
    Error::Storage(format!("etcd watch: {what}; re-read and watch again"))
}

/// The [`Store::watch`](crate::store::Store::watch) stream of `inner` from `from_revision`.
pub(super) fn stream(
    inner: Arc<Inner>,
    from_revision: u64,
) -> BoxStream<'static, Result<WatchEvent, Error>> {
    stream::unfold(Watching::Start(from_revision.max(1)), move |state| {
        let inner = inner.clone();
        async move {
            let mut ws = match state {
                Watching::Done => return None,
                Watching::Start(from) => match inner.open_watch(from).await {
                    Ok(ws) => Box::new(ws),
                    Err(e) => return Some((Err(e), Watching::Done)),
                },
                Watching::Running(ws) => ws,
            };
            loop {
                let resp = match ws.message().await {
                    Ok(Some(resp)) => resp,
                    Ok(None) => {
                        return Some((Err(watch_failed("etcd ended the stream")), Watching::Done))
                    }
                    Err(e) => return Some((Err(watch_failed(e)), Watching::Done)),
                };
                if resp.compact_revision() > 0 {
                    let compacted = revision(resp.compact_revision() - 1);
                    return Some((Ok(WatchEvent::Compacted { compacted }), Watching::Done));
                }
                if resp.canceled() {
                    let why = format!("cancelled by etcd: {}", resp.cancel_reason());
                    return Some((Err(watch_failed(why)), Watching::Done));
                }
                match inner.changes(resp.events()) {
                    Ok(cs) if cs.is_empty() => {}
                    Ok(cs) => return Some((Ok(WatchEvent::Changes(cs)), Watching::Running(ws))),
                    Err(e) => return Some((Err(e), Watching::Done)),
                }
            }
        }
    })
    .boxed()
}
