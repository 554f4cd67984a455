//! Reads of the etcd store: key ranges page by page at one revision, a service's state (through
//! the replica's mirror, re-read only when the version moved), the service count, snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;

use dlb::model;
use etcd_client::{GetOptions, KeyValue};

use super::keys::{
    corrupt, decode_meta, decode_server, header_revision, prefix_end, revision, Entry,
};
use super::{etcd, is_compacted, Inner, PAGE};
use crate::store::plan::ServiceState;
use crate::store::{Servers, ServiceSnapshot, StoreSnapshot};
use crate::Error;

impl Inner {
    /// Every key starting with `prefix`, read page by page at `at` (0: the current revision),
    /// and the revision read at. O(keys) in `keys / PAGE` requests.
    pub(super) async fn range(
        &self,
        prefix: &str,
        at: i64,
    ) -> Result<(Vec<KeyValue>, i64), etcd_client::Error> {
        let end = prefix_end(prefix.as_bytes());
        let mut kv = self.kv.clone();
        let mut out = Vec::new();
        let mut start = prefix.as_bytes().to_vec();
        let mut at = at;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if at > 0 {
                options = options.with_revision(at);
            }
            let mut resp = kv.get(start.clone(), Some(options)).await?;
            if at == 0 {
                at = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last() else { break };
            start = last.key().to_vec();
            start.push(0);
            out.extend(kvs);
            if !more {
                break;
            }
        }
        Ok((out, at))
    }

    /// Like [`Inner::range`], starting over (a bounded number of times) when etcd compacts
    /// the revision between two pages.
    pub(super) async fn range_consistent(
        &self,
        prefix: &str,
        at: i64,
    ) -> Result<(Vec<KeyValue>, i64), Error> {
        let mut tries = 0;
        loop {
            match self.range(prefix, at).await {
                Ok(r) => return Ok(r),
                Err(e) if is_compacted(&e) && tries < 3 => tries += 1,
                Err(e) => return Err(etcd(e)),
            }
        }
    }

    /// Builds one service's state from its keys (`meta` and records), as read at one revision.
    pub(super) fn decode_service(
        &self,
        service: &str,
        kvs: &[KeyValue],
    ) -> Result<Option<ServiceState>, Error> {
        let mut meta = None;
        let mut servers = Servers::new();
        for kv in kvs {
            match self.keys.parse(kv.key()) {
                Some((s, Entry::Meta)) if s == service => {
                    let (_, policy) = decode_meta(kv.key(), kv.value())?;
                    meta = Some((revision(kv.mod_revision()), policy));
                }
                Some((s, Entry::Server(id))) if s == service => {
                    let record = decode_server(kv.key(), id, kv.value())?;
                    servers.insert(id.into(), Arc::new(record));
                }
                _ => return Err(corrupt(kv.key(), "not a key of this layout")),
            }
        }
        match meta {
            Some((version, policy)) => Ok(Some(ServiceState::new(version, policy, servers))),
            None if servers.is_empty() => Ok(None),
            None => Err(Error::Storage(format!(
                "etcd: service {service:?} has records but no meta key"
            ))),
        }
    }

    /// The current state of `service`: its `meta` key, then its records unless the mirror
    /// already holds that version.
    pub(super) async fn load(&self, service: &str) -> Result<Option<ServiceState>, Error> {
        let mut tries = 0;
        loop {
            let mut kv = self.kv.clone();
            let resp = kv.get(self.keys.meta(service), None).await.map_err(etcd)?;
            let at = header_revision(resp.header())?;
            let Some(meta) = resp.kvs().first() else {
                return Ok(None);
            };
            let version = revision(meta.mod_revision());
            if let Some(s) = self
                .mirror
                .lock()
                .get(service)
                .filter(|s| s.version == version)
            {
                return Ok(Some(s.clone()));
            }
            match self.range(&self.keys.service(service), at).await {
                Ok((kvs, _)) => {
                    let state = self.decode_service(service, &kvs)?;
                    if let Some(s) = &state {
                        self.remember(service, s);
                    }
                    return Ok(state);
                }
                Err(e) if is_compacted(&e) && tries < 3 => tries += 1,
                Err(e) => return Err(etcd(e)),
            }
        }
    }

    /// Keeps `state` in the mirror unless it already holds a newer version.
    pub(super) fn remember(&self, service: &str, state: &ServiceState) {
        let mut mirror = self.mirror.lock();
        match mirror.get(service) {
            Some(old) if old.version >= state.version => {}
            _ => {
                mirror.insert(service.to_owned(), state.clone());
            }
        }
    }

    /// The number of services and the `mod_revision` of the key that counts them.
    pub(super) async fn service_count(&self) -> Result<(usize, i64), Error> {
        let key = self.keys.services();
        let resp = self.kv.clone().get(key, None).await.map_err(etcd)?;
        let Some(kv) = resp.kvs().first() else {
            return Ok((0, 0));
        };
        let count = std::str::from_utf8(kv.value())
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| corrupt(kv.key(), "not a decimal count"))?;
        Ok((count, kv.mod_revision()))
    }

    pub(super) async fn get_service(
        &self,
        service: String,
    ) -> Result<Option<ServiceSnapshot>, Error> {
        model::validate_id("service", &service)?;
        Ok(self.load(&service).await?.map(|s| ServiceSnapshot {
            name: service,
            version: self.version(s.version),
            policy: s.policy,
            servers: s.servers,
        }))
    }

    pub(super) async fn snapshot(&self) -> Result<StoreSnapshot, Error> {
        let (kvs, at) = self.range_consistent(&self.keys.root(), 0).await?;
        let mut by_service: BTreeMap<String, Vec<KeyValue>> = BTreeMap::new();
        for kv in kvs {
            let service = self
                .keys
                .parse(kv.key())
                .map(|(s, _)| s.to_owned())
                .ok_or_else(|| corrupt(kv.key(), "not a key of this layout"))?;
            by_service.entry(service).or_default().push(kv);
        }
        let mut services = Vec::with_capacity(by_service.len());
        for (name, kvs) in by_service {
            if let Some(s) = self.decode_service(&name, &kvs)? {
                self.remember(&name, &s);
                services.push(ServiceSnapshot {
                    version: self.version(s.version),
                    policy: s.policy,
                    servers: s.servers,
                    name,
                });
            }
        }
        Ok(StoreSnapshot {
            epoch: self.epoch,
            revision: revision(at),
            services,
        })
    }
}
