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
//! that fails `dlb::model` validation refuses the open with an error naming it. How a damaged or
//! unexpected file is refused without a byte of it changing, and recovered from, is
//! [`embedded_open`](super::embedded_open)'s. The watch history is kept in RAM: after a restart a
//! watch from before the open reports `Compacted`. redb locks the file, so a second `dlbd` on the
//! same data dir fails to open it (after retrying for 2 s, so a restart does not race the
//! previous handle's close).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dlb::{model, proto};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::embedded_open::{
    contained, create_new, damaged, is_in_use, locate, open_real, open_scratch, storage, Located,
};
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

/// How long an open retries a store file that another handle holds before refusing it.
const IN_USE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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
        contained(&self.path, || self.write(service, state, change))
    }
}

impl Disk {
    fn write(&self, service: &str, state: &ServiceState, change: &Change) -> Result<(), Error> {
        let err = |e: &dyn std::fmt::Display| storage(&self.path, e);
        let txn = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| err(&e))?;
            meta.insert("revision", change.version)
                .map_err(|e| err(&e))?;
            let mut services = txn.open_table(SERVICES).map_err(|e| err(&e))?;
            if change.deleted {
                services.remove(service).map_err(|e| err(&e))?;
            } else {
                services
                    .insert(
                        service,
                        encode_service(state.version, &state.policy).as_slice(),
                    )
                    .map_err(|e| err(&e))?;
            }
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
    /// Opens the store in `dir`: a new store if `dir` is missing or empty (created if needed),
    /// else the store file there, once checked. A damaged file is an error naming it and is
    /// left byte-identical (see [`embedded_open`](super::embedded_open)).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, Error> {
        Self::open_with_history(dir, DEFAULT_HISTORY)
    }

    /// Like [`EmbeddedStore::open`], remembering the last `history` changes for watches.
    pub fn open_with_history(dir: impl AsRef<Path>, history: usize) -> Result<Self, Error> {
        // A file another handle holds (a previous dlbd, or a restarted server in this process,
        // still closing) is tried again for a short while: a lock conflict wrote nothing.
        let deadline = std::time::Instant::now() + IN_USE_WAIT;
        loop {
            match Self::open_once(dir.as_ref(), history) {
                Err(e) if is_in_use(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    fn open_once(dir: &Path, history: usize) -> Result<Self, Error> {
        let (db, path, loaded) = match locate(dir)? {
            Located::New(path) => {
                let db = contained(&path, || create_new(&path))?;
                (db, path, Loaded::default())
            }
            Located::Existing(path) => {
                // First through a scratch copy of every write, so a damaged file is not touched.
                contained(&path, || {
                    let db = open_scratch(&path)?;
                    read_state(&db, &path, false)
                })?;
                let (db, loaded) = contained(&path, || {
                    let db = open_real(&path)?;
                    let loaded = read_state(&db, &path, true)?;
                    Ok((db, loaded))
                })?;
                (db, path, loaded)
            }
        };
        let (epoch, revision) = match loaded.epoch {
            Some(epoch) => (epoch, loaded.revision),
            None => (initialize(&db, &path)?, 0),
        };
        let disk = Disk {
            db,
            path: path.clone(),
        };
        let engine = Engine::new(
            epoch,
            revision,
            loaded.services,
            history,
            Some(Box::new(disk)),
        );
        Ok(Self {
            engine: Arc::new(engine),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a store file holds.
#[derive(Default)]
struct Loaded {
    /// `None`: a file redb created but no epoch was ever committed to (and no record).
    epoch: Option<u64>,
    revision: u64,
    services: BTreeMap<String, ServiceState>,
}

/// Gives a new store file its epoch (revision 0) and its tables; returns the epoch.
pub(super) fn initialize(db: &Database, path: &Path) -> Result<u64, Error> {
    let err = |e: &dyn std::fmt::Display| storage(path, e);
    let epoch = fastrand::u64(1..);
    let txn = db.begin_write().map_err(|e| err(&e))?;
    {
        let mut meta = txn.open_table(META).map_err(|e| err(&e))?;
        meta.insert("epoch", epoch).map_err(|e| err(&e))?;
        meta.insert("revision", 0).map_err(|e| err(&e))?;
        txn.open_table(SERVICES).map_err(|e| err(&e))?;
        txn.open_table(BACKENDS).map_err(|e| err(&e))?;
    }
    txn.commit().map_err(|e| err(&e))?;
    Ok(epoch)
}

/// Reads and validates every record of the file (read only). A missing table reads as empty;
/// records without an epoch, a service newer than the revision, or any record that does not
/// decode (or, for backends, validate) are errors naming the file. A policy that decodes but
/// fails a validation rule added since it was stored is kept, with a warning (`warn`).
fn read_state(db: &impl ReadableDatabase, path: &Path, warn: bool) -> Result<Loaded, Error> {
    let err = |e: &dyn std::fmt::Display| damaged(path, e);
    let txn = db.begin_read().map_err(|e| err(&e))?;
    let mut out = Loaded::default();
    match txn.open_table(META) {
        Ok(meta) => {
            out.epoch = meta.get("epoch").map_err(|e| err(&e))?.map(|g| g.value());
            out.revision = meta
                .get("revision")
                .map_err(|e| err(&e))?
                .map_or(0, |g| g.value());
        }
        Err(TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(err(&e)),
    }
    if out.epoch == Some(0) {
        return Err(err(&"the epoch is 0"));
    }
    let mut services = BTreeMap::new();
    match txn.open_table(SERVICES) {
        Ok(t) => {
            for row in t.iter().map_err(|e| err(&e))? {
                let (k, v) = row.map_err(|e| err(&e))?;
                let name = k.value().to_owned();
                model::validate_id("service", &name)
                    .map_err(|e| err(&format!("stored service {name:?}: {e}")))?;
                let (version, policy) = decode_service(v.value())
                    .ok_or_else(|| err(&format!("service {name:?}: undecodable record")))?;
                if let Err(e) = model::validate_policy(&policy) {
                    // A rule added since the policy was stored: not damage. Kept as stored;
                    // the next SetPolicy (or the config file) replaces it.
                    if warn {
                        tracing::warn!(
                            file = %path.display(),
                            service = %name,
                            error = %e,
                            "a stored policy fails a validation rule added since; kept as stored"
                        );
                    }
                }
                if version > out.revision {
                    return Err(err(&format!(
                        "service {name:?}: version {version} is past the store's revision {}",
                        out.revision
                    )));
                }
                services.insert(name, (version, policy, Servers::new()));
            }
        }
        Err(TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(err(&e)),
    }
    match txn.open_table(BACKENDS) {
        Ok(t) => {
            for row in t.iter().map_err(|e| err(&e))? {
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
                let state = services.get_mut(service).ok_or_else(|| {
                    err(&format!("backend {id:?} of unknown service {service:?}"))
                })?;
                state.2.insert(id.into(), Arc::new(record));
            }
        }
        Err(TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(err(&e)),
    }
    if out.epoch.is_none() && !services.is_empty() {
        return Err(err(&"records but no epoch"));
    }
    out.services = services
        .into_iter()
        .map(|(name, (version, policy, servers))| {
            (name, ServiceState::new(version, policy, servers))
        })
        .collect();
    Ok(out)
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
