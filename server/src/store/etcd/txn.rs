//! Writes of the etcd store: a planned batch as one txn that compares the service's `meta`
//! key (and, creating or deleting a service, the `services` count; for the leader, the fence),
//! retried on the new state when it loses to another writer; then compaction if configured.

use std::sync::atomic::Ordering;

use dlb::model;
use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp};
use prost::Message;

use super::keys::{header_revision, revision, Meta};
use super::{etcd, Inner, MAX_ATTEMPTS};
use crate::store::plan::{check_service_quota, plan};
use crate::store::{Applied, Mutation};
use crate::Error;

impl Inner {
    pub(super) async fn apply(
        &self,
        service: String,
        mutations: Vec<Mutation>,
        expected_version: Option<u64>,
        fence: Option<(&str, i64)>,
    ) -> Result<Applied, Error> {
        // Before the name becomes part of a key.
        model::validate_id("service", &service)?;
        let meta_key = self.keys.meta(&service);
        for _ in 0..MAX_ATTEMPTS {
            let current = self.load(&service).await?;
            let plan = plan(
                &service,
                current.as_ref(),
                &mutations,
                expected_version,
                dlb::slow_start::now_ms(),
            )?;
            let Some(mut change) = plan.change else {
                let state = current.unwrap_or(plan.state);
                return Ok(Applied {
                    version: self.version(state.version),
                    changed: false,
                    policy: state.policy,
                    servers: plan.named,
                });
            };
            let base = i64::try_from(change.base).unwrap_or(i64::MAX);
            let mut compares = vec![Compare::mod_revision(
                meta_key.clone(),
                CompareOp::Equal,
                base,
            )];
            if let Some((key, revision)) = fence {
                compares.push(Compare::create_revision(key, CompareOp::Equal, revision));
            }
            let mut ops = Vec::with_capacity(change.upserts.len() + change.removals.len() + 2);
            if plan.deleted {
                // The meta key's delete event tells watchers the service is gone.
                let (count, count_revision) = self.service_count().await?;
                compares.push(Compare::mod_revision(
                    self.keys.services(),
                    CompareOp::Equal,
                    count_revision,
                ));
                ops.push(TxnOp::put(
                    self.keys.services(),
                    count.saturating_sub(1).to_string(),
                    None,
                ));
                ops.push(TxnOp::delete(meta_key.clone(), None));
                for id in &change.removals {
                    ops.push(TxnOp::delete(self.keys.server(&service, id), None));
                }
                let resp = self
                    .kv
                    .clone()
                    .txn(Txn::new().when(compares).and_then(ops))
                    .await
                    .map_err(etcd)?;
                if !resp.succeeded() {
                    if let Some((key, revision)) = fence {
                        self.check_fence(key, revision).await?;
                    }
                    continue;
                }
                let committed = header_revision(resp.header())?;
                self.mirror.lock().remove(&service);
                self.compact_after(committed).await;
                return Ok(Applied {
                    version: self.version(revision(committed)),
                    changed: true,
                    policy: plan.state.policy,
                    servers: Vec::new(),
                });
            }
            if current.is_none() {
                let (count, count_revision) = self.service_count().await?;
                check_service_quota(count)?;
                compares.push(Compare::mod_revision(
                    self.keys.services(),
                    CompareOp::Equal,
                    count_revision,
                ));
                ops.push(TxnOp::put(
                    self.keys.services(),
                    (count + 1).to_string(),
                    None,
                ));
            }
            let meta = Meta {
                policy: Some(plan.state.policy.clone()),
                base: change.base,
                policy_changed: change.policy.is_some(),
                created: change.created.clone(),
                removal_reasons: change.removal_reasons.clone(),
            };
            ops.push(TxnOp::put(meta_key.clone(), meta.encode_to_vec(), None));
            for s in &change.upserts {
                let key = self.keys.server(&service, &s.server_id);
                ops.push(TxnOp::put(key, s.encode_to_vec(), None));
            }
            for id in &change.removals {
                ops.push(TxnOp::delete(self.keys.server(&service, id), None));
            }
            let resp = self
                .kv
                .clone()
                .txn(Txn::new().when(compares).and_then(ops))
                .await
                .map_err(etcd)?;
            if !resp.succeeded() {
                if let Some((key, revision)) = fence {
                    self.check_fence(key, revision).await?;
                }
                // Another writer got there first: re-read and re-plan.
                continue;
            }
            let committed = header_revision(resp.header())?;
            let version = revision(committed);
            change.version = version;
            let mut state = plan.state;
            state.version = version;
            self.remember(&service, &state);
            self.compact_after(committed).await;
            return Ok(Applied {
                version: self.version(version),
                changed: true,
                policy: state.policy,
                servers: plan.named,
            });
        }
        Err(Error::Storage(format!(
            "etcd: service {service:?}: gave up after {MAX_ATTEMPTS} writes lost to concurrent \
             writers"
        )))
    }

    /// `Ok` while the leader key still has `create_revision == revision`.
    pub(super) async fn check_fence(&self, key: &str, revision: i64) -> Result<(), Error> {
        let resp = self.kv.clone().get(key, None).await.map_err(etcd)?;
        let now = resp.kvs().first().map_or(0, KeyValue::create_revision);
        if now == revision {
            return Ok(());
        }
        Err(Error::Storage(format!(
            "etcd: this replica is no longer the leader (fence {revision}, leader key created at \
             {now}); singleton write refused"
        )))
    }

    /// With a history limit, compacts etcd so that the last `history` revisions stay.
    pub(super) async fn compact_after(&self, committed: i64) {
        let Some(history) = self.history else { return };
        let keep = i64::try_from(history).unwrap_or(i64::MAX);
        let target = committed.saturating_sub(keep) + 1;
        if target <= 1 || self.compacted.fetch_max(target, Ordering::Relaxed) >= target {
            return;
        }
        if let Err(e) = self.kv.clone().compact(target, None).await {
            // Another replica compacted further already, or etcd is busy: the next write
            // tries again.
            tracing::debug!(target, error = %e, "etcd compaction");
        }
    }
}
