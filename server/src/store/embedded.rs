//! The embedded durable [`Store`]: `dlbd`'s default. State survives `kill -9` and restarts with
//! the same epoch and versions, so SDKs resume with a delta and backends need no
//! re-registration.
//!
//! Storage is one [`redb`] database file (`<data dir>/dlbd.redb`; ACID, copy-on-write B-trees,
//! crash safe, an fsync per commit). Tables:
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | `"epoch"`, `"revision"` | `u64` |
//! | `services` | service name | 8-byte big-endian version, then the protobuf-encoded `Policy` |
//! | `backends` | (service, server id) | the protobuf-encoded `Server` record |
//!
//! Each batch is one write transaction (service record, touched backend records and the
//! revision), committed by the shared [engine](super::engine) before the batch becomes visible,
//! on a blocking thread (`spawn_blocking`) so the async workers never wait for the disk. Reads
//! are served from the engine's RAM copy, loaded and validated record by record at open: a record
//! that fails `dlb::model` validation refuses the open with an error naming it. The watch
//! history is kept in RAM: after a restart a watch from before the open reports `Compacted`.
//! redb locks the file, so a second `dlbd` on the same data dir fails to open it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dlb::{model, proto};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::engine::{Engine, Persist, ServiceState};
use super::memory::DEFAULT_HISTORY;
use super::{
    Applied, Change, Mutation, Servers, ServiceSnapshot, Store, StoreSnapshot, WatchEvent,
};
use crate::Error;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
const BACKENDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("backends");

/// The database file inside the data directory.
pub const DB_FILE: &str = "dlbd.redb";

fn storage(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Storage(format!("{}: {what}", path.display()))
}

/// A [`Store`] persisted in a redb file. See the module docs.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    engine: Arc<Engine>,
    path: PathBuf,
}

struct Disk {
    db: Database,
    path: PathBuf,
}

impl Persist for Disk {
    fn commit(&self, service: &str, state: &ServiceState, change: &Change) -> Result<(), Error> {
        let err = |e: &dyn std::fmt::Display| storage(&self.path, e);
        let txn = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| err(&e))?;
            meta.insert("revision", change.version)
                .map_err(|e| err(&e))?;
            let mut services = txn.open_table(SERVICES).map_err(|e| err(&e))?;
            services
                .insert(
                    service,
                    encode_service(state.version, &state.policy).as_slice(),
                )
                .map_err(|e| err(&e))?;
            let mut backends = txn.open_table(BACKENDS).map_err(|e| err(&e))?;
            for s in &change.upserts {
                backends
                    .insert(
                        (service, s.server_id.as_str()),
                        s.encode_to_vec().as_slice(),
                    )
                    .map_err(|e| err(&e))?;
            }
            for id in &change.removals {
                backends
                    .remove((service, id.as_str()))
                    .map_err(|e| err(&e))?;
            }
        }
        txn.commit().map_err(|e| err(&e))
    }
}

fn encode_service(version: u64, policy: &proto::Policy) -> Vec<u8> {
    let mut v = version.to_be_bytes().to_vec();
    policy.encode(&mut v).expect("a Vec grows as needed");
    v
}

fn decode_service(bytes: &[u8]) -> Option<(u64, proto::Policy)> {
    let (version, policy) = bytes.split_first_chunk::<8>()?;
    Some((
        u64::from_be_bytes(*version),
        proto::Policy::decode(policy).ok()?,
    ))
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, creating the directory if needed.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, Error> {
        Self::open_with_history(dir, DEFAULT_HISTORY)
    }

    /// Like [`EmbeddedStore::open`], remembering the last `history` changes for watches.
    pub fn open_with_history(dir: impl AsRef<Path>, history: usize) -> Result<Self, Error> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| storage(dir, e))?;
        let path = dir.join(DB_FILE);
        let db = Database::create(&path).map_err(|e| storage(&path, e))?;
        let (epoch, revision) = Self::init_meta(&db, &path)?;
        let services = Self::load(&db, &path)?;
        let disk = Disk {
            db,
            path: path.clone(),
        };
        let engine = Engine::new(epoch, revision, services, history, Some(Box::new(disk)));
        Ok(Self {
            engine: Arc::new(engine),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn init_meta(db: &Database, path: &Path) -> Result<(u64, u64), Error> {
        let err = |e: &dyn std::fmt::Display| storage(path, e);
        let txn = db.begin_write().map_err(|e| err(&e))?;
        let out = {
            let mut meta = txn.open_table(META).map_err(|e| err(&e))?;
            let epoch = meta.get("epoch").map_err(|e| err(&e))?.map(|g| g.value());
            let epoch = match epoch {
                Some(e) if e != 0 => e,
                _ => {
                    let e = fastrand::u64(1..);
                    meta.insert("epoch", e).map_err(|e| err(&e))?;
                    meta.insert("revision", 0).map_err(|e| err(&e))?;
                    e
                }
            };
            let revision = meta
                .get("revision")
                .map_err(|e| err(&e))?
                .map_or(0, |g| g.value());
            // Make sure every table exists so readers can open them.
            txn.open_table(SERVICES).map_err(|e| err(&e))?;
            txn.open_table(BACKENDS).map_err(|e| err(&e))?;
            (epoch, revision)
        };
        txn.commit().map_err(|e| err(&e))?;
        Ok(out)
    }

    fn load(db: &Database, path: &Path) -> Result<BTreeMap<String, ServiceState>, Error> {
        let err = |e: &dyn std::fmt::Display| storage(path, e);
        let txn = db.begin_read().map_err(|e| err(&e))?;
        let services_t = txn.open_table(SERVICES).map_err(|e| err(&e))?;
        let backends_t = txn.open_table(BACKENDS).map_err(|e| err(&e))?;
        let mut services = BTreeMap::new();
        for row in services_t.iter().map_err(|e| err(&e))? {
            let (k, v) = row.map_err(|e| err(&e))?;
            let name = k.value().to_owned();
            model::validate_id("service", &name)
                .map_err(|e| err(&format!("stored service {name:?}: {e}")))?;
            let (version, policy) = decode_service(v.value())
                .ok_or_else(|| err(&format!("service {name:?}: undecodable record")))?;
            model::validate_policy(&policy).map_err(|e| err(&format!("service {name:?}: {e}")))?;
            services.insert(name, (version, policy, Servers::new()));
        }
        for row in backends_t.iter().map_err(|e| err(&e))? {
            let (k, v) = row.map_err(|e| err(&e))?;
            let (service, id) = k.value();
            let record = proto::Server::decode(v.value())
                .map_err(|e| err(&format!("service {service:?} backend {id:?}: {e}")))?;
            model::validate_server(&record)
                .map_err(|e| err(&format!("service {service:?} backend {id:?}: {e}")))?;
            if record.server_id != id {
                return Err(err(&format!(
                    "service {service:?} backend {id:?}: record names {:?}",
                    record.server_id
                )));
            }
            let state = services
                .get_mut(service)
                .ok_or_else(|| err(&format!("backend {id:?} of unknown service {service:?}")))?;
            state.2.insert(id.into(), Arc::new(record));
        }
        Ok(services
            .into_iter()
            .map(|(name, (version, policy, servers))| {
                (name, ServiceState::new(version, policy, servers))
            })
            .collect())
    }
}

impl EmbeddedStore {
    /// Bounds the in-memory change log to `bytes` bytes (default
    /// [`DEFAULT_HISTORY_BYTES`](super::memory::DEFAULT_HISTORY_BYTES)).
    pub fn with_history_bytes(self, bytes: usize) -> Self {
        self.engine.set_log_max_bytes(bytes);
        self
    }
}

impl Store for EmbeddedStore {
    fn epoch(&self) -> u64 {
        self.engine.epoch()
    }

    fn apply(
        &self,
        service: String,
        mutations: Vec<Mutation>,
        expected_version: Option<u64>,
    ) -> BoxFuture<'_, Result<Applied, Error>> {
        let engine = self.engine.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || engine.apply(&service, mutations, expected_version))
                .await
                .map_err(|e| Error::Task(e.to_string()))?
        })
    }

    fn get_service(
        &self,
        service: String,
    ) -> BoxFuture<'_, Result<Option<ServiceSnapshot>, Error>> {
        Box::pin(async move { Ok(self.engine.get_service(&service)) })
    }

    fn snapshot(&self) -> BoxFuture<'_, Result<StoreSnapshot, Error>> {
        Box::pin(async move { Ok(self.engine.snapshot()) })
    }

    fn watch(&self, from_revision: u64) -> BoxStream<'static, Result<WatchEvent, Error>> {
        self.engine.watch(from_revision)
    }
}
