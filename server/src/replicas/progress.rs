//! The contact a replica on etcd publishes for readiness ([`Contact`], see
//! [`super::etcd`]'s module docs): the **progress check** — a linearizable read with a short
//! timeout, every [`PROGRESS_EVERY`] — and the one function through which the check and the
//! membership task (the lease part) publish, logging each change of the decision.

use std::time::Duration;

use etcd_client::{Client, GetOptions};
use tokio::sync::watch;
use tokio::time::Instant;

use super::Contact;

/// How often the progress check reads etcd (linearizably).
pub const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How long a progress-check read may take before the replica counts as out of contact.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(1);

/// Publishes one part of the contact, logging a change; wakes readers only on a change of the
/// decision (`proven_at` alone is recorded silently).
pub(super) fn set_contact(contact: &watch::Sender<Contact>, f: impl FnOnce(&mut Contact)) {
    contact.send_if_modified(|c| {
        let before = *c;
        f(c);
        let changed = (before.lease, before.reads) != (c.lease, c.reads);
        if changed {
            if c.ok() {
                tracing::info!(
                    lease = c.lease,
                    reads = c.reads,
                    "in contact with etcd again"
                );
            } else {
                tracing::warn!(
                    lease = c.lease,
                    reads = c.reads,
                    unproven_ms = c.proven_at.map(|t| t.elapsed().as_millis() as u64),
                    "cannot prove this replica is current (etcd progress check or membership lease failed)"
                );
            }
        }
        changed
    });
}

/// The progress check (see the module docs): a linearizable read every [`PROGRESS_EVERY`],
/// each bounded by [`PROGRESS_TIMEOUT`]. Never returns on its own.
pub(super) async fn check_progress(client: Client, key: String, contact: watch::Sender<Contact>) {
    let mut kv = client.kv_client();
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = Instant::now();
        let read = kv.get(key.as_str(), Some(GetOptions::new().with_count_only()));
        let ok = matches!(
            tokio::time::timeout(PROGRESS_TIMEOUT, read).await,
            Ok(Ok(_))
        );
        set_contact(&contact, |c| {
            if ok {
                c.reads = true;
                c.proven_at = Some(started);
            } else if c.proven_at.is_none_or(|p| p.elapsed() >= PROGRESS_TIMEOUT) {
                // A read that failed fast (e.g. a member just killed, the next read goes to
                // another) within a second of the last proof is no outage; a late one is.
                c.reads = false;
            }
        });
    }
}
