//! The SDK's on-disk copy of its last good routing state (`ClientBuilder::snapshot_file`).
//!
//! * [`Saver`] is owned by the session task. After updates are applied it notes each followed
//!   service whose published state is fresh (not held back, not itself restored from the file)
//!   and newer than what was saved, and writes the whole file at most once per
//!   [`SAVE_EVERY`], off the async worker threads (`spawn_blocking`): encode, write a temporary
//!   file beside the target, `fsync`, rename over the target — a crash leaves the old file or
//!   the new one, never a torn one. A write failure is logged and retried at the next period.
//! * [`restore`] runs once when the client starts: it reads the file (at most
//!   [`MAX_FILE_BYTES`]), validates every service exactly as an update from the wire is
//!   validated, and publishes each one **stale**, with its age counted from when it was
//!   received. The session then resubscribes with those versions: a control plane of the same
//!   store history answers with deltas, and the first update applied makes a service fresh. A
//!   control plane of another history is judged by the restart-flooding rule like any other.
//!
//! The format is `dlb.v1.SdkSnapshotFile` (format 1), one full `ServiceUpdate` per service.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dlb::locality::ZoneKey;
use dlb::model;
use dlb::proto;
use prost::Message;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::entry::Entry;
use crate::state::ServiceState;

/// The file format this SDK writes and reads.
pub(crate) const FORMAT: u32 = 1;

/// Writes happen at most this often while the state changes.
pub(crate) const SAVE_EVERY: Duration = Duration::from_secs(1);

/// A larger file is not read (a bound on what a corrupt or foreign file can make the SDK
/// allocate): 64 services of the largest size `dlbd` accepts.
pub(crate) const MAX_FILE_BYTES: u64 = 64 * model::MAX_MESSAGE_BYTES as u64;

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the session task keeps to write the file.
pub(crate) struct Saver {
    path: PathBuf,
    /// Per service: the full snapshot last noted and when it was received (Unix ms).
    saved: HashMap<String, (proto::ServiceUpdate, u64)>,
    /// Something was noted since the last write.
    dirty: bool,
    last_write: Option<Instant>,
    writing: Option<JoinHandle<()>>,
}

impl Saver {
    /// A saver writing to `path`, starting from what was restored from it (so a service that
    /// is not followed again, or not yet answered, keeps its saved copy).
    pub(crate) fn new(path: PathBuf, restored: &[(proto::ServiceUpdate, u64)]) -> Self {
        Self {
            path,
            saved: restored
                .iter()
                .map(|(u, at)| (u.service.clone(), (u.clone(), *at)))
                .collect(),
            dirty: false,
            last_write: None,
            writing: None,
        }
    }

    /// Notes the fresh state of every entry that changed since it was last noted. `O(changed
    /// services × their backends)`.
    pub(crate) fn note(&mut self, entries: &HashMap<String, Entry>) {
        let now = unix_ms(SystemTime::now());
        for (name, entry) in entries {
            let Some(update) = entry.saved_form() else {
                continue;
            };
            let unchanged = self
                .saved
                .get(name)
                .is_some_and(|(old, _)| old.version == update.version);
            if !unchanged {
                self.saved.insert(name.clone(), (update, now));
                self.dirty = true;
            }
        }
    }

    /// When a write held back by [`SAVE_EVERY`] is due (`None`: nothing waits).
    pub(crate) fn due(&self) -> Option<Instant> {
        if !self.dirty {
            return None;
        }
        Some(
            self.last_write
                .map_or_else(Instant::now, |t| t + SAVE_EVERY),
        )
    }

    /// Starts a write if something changed, the last write finished and [`SAVE_EVERY`] has
    /// passed since it started.
    pub(crate) fn maybe_write(&mut self) {
        if !self.dirty {
            return;
        }
        if self.writing.as_ref().is_some_and(|w| !w.is_finished()) {
            return;
        }
        if self.last_write.is_some_and(|t| t.elapsed() < SAVE_EVERY) {
            return;
        }
        self.write();
    }

    /// Writes what is pending now, whatever the period, and waits for it (the client is
    /// closing: the newest state must not be lost).
    pub(crate) async fn flush(&mut self) {
        if let Some(w) = self.writing.take() {
            let _ = w.await;
        }
        if self.dirty {
            self.write();
            if let Some(w) = self.writing.take() {
                let _ = w.await;
            }
        }
    }

    fn write(&mut self) {
        self.dirty = false;
        self.last_write = Some(Instant::now());
        let mut names: Vec<&String> = self.saved.keys().collect();
        names.sort();
        let mut file = proto::SdkSnapshotFile {
            format: FORMAT,
            saved_unix_ms: unix_ms(SystemTime::now()),
            ..Default::default()
        };
        for name in names {
            if let Some((update, at)) = self.saved.get(name) {
                file.services.push(update.clone());
                file.received_unix_ms.push(*at);
            }
        }
        let path = self.path.clone();
        self.writing = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = write_atomically(&path, &file.encode_to_vec()) {
                tracing::warn!(path = %path.display(), error = %e,
                    "could not write the routing snapshot file");
            }
        }));
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // Make the rename itself durable where the platform allows syncing a directory.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Services restored from the file: their shared states (to register with the client) and the
/// session entries that hold them.
pub(crate) struct Restored {
    pub(crate) states: Vec<Arc<ServiceState>>,
    pub(super) entries: Vec<Entry>,
    /// What was read, as the [`Saver`] starts from it.
    pub(crate) saved: Vec<(proto::ServiceUpdate, u64)>,
}

impl Restored {
    /// Nothing restored.
    pub(crate) fn empty() -> Self {
        Self {
            states: Vec::new(),
            entries: Vec::new(),
            saved: Vec::new(),
        }
    }
}

/// Reads the file at `path` and publishes every valid service in it, stale. A missing file
/// restores nothing; an unreadable, oversized or corrupt file, or one of another format, is
/// logged and restores nothing; an invalid service inside a valid file is skipped (logged).
pub(crate) fn restore(path: &Path, zone: Option<&ZoneKey>) -> Restored {
    let mut out = Restored::empty();
    let bytes = match read_bounded(path) {
        Ok(Some(b)) => b,
        Ok(None) => return out,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "ignoring the routing snapshot file");
            return out;
        }
    };
    let file = match proto::SdkSnapshotFile::decode(bytes.as_slice()) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "ignoring a corrupt routing snapshot file");
            return out;
        }
    };
    if file.format != FORMAT {
        tracing::warn!(path = %path.display(), format = file.format,
            "ignoring a routing snapshot file of an unknown format");
        return out;
    }
    let now_ms = unix_ms(SystemTime::now());
    for (i, update) in file.services.into_iter().enumerate() {
        let received = file
            .received_unix_ms
            .get(i)
            .copied()
            .unwrap_or(file.saved_unix_ms);
        let name = match model::resolve_service(&update.service) {
            Ok(n) => n.to_owned(),
            Err(e) => {
                tracing::warn!(error = %e, "skipping a service of the routing snapshot file");
                continue;
            }
        };
        if !update.full || out.states.iter().any(|s| s.name == name) {
            tracing::warn!(service = %model::printable(&name, 64),
                "skipping a duplicate or partial service of the routing snapshot file");
            continue;
        }
        let state = Arc::new(ServiceState::new(name.clone()));
        let mut entry = Entry::new(state.clone(), zone.cloned());
        if let Err(e) = entry.stage(&update).and_then(|()| entry.flush()) {
            tracing::warn!(service = %model::printable(&name, 64), error = %e,
                "skipping an invalid service of the routing snapshot file");
            continue;
        }
        entry.mark_stale();
        let age = Duration::from_millis(now_ms.saturating_sub(received));
        *state.last_update.lock() = Instant::now().checked_sub(age).or(Some(Instant::now()));
        tracing::info!(service = %name, version = %entry.version, age = ?age,
            "routing on the snapshot file until a control plane answers");
        out.states.push(state);
        out.entries.push(entry);
        out.saved.push((update, received));
    }
    out
}

/// The file's bytes, `None` when it does not exist; an error when it cannot be read or is
/// larger than [`MAX_FILE_BYTES`].
fn read_bounded(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_FILE_BYTES} bytes"
        )));
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: &str) -> proto::Server {
        proto::Server {
            server_id: id.into(),
            address: "127.0.0.1:80".into(),
            weight: 1,
            health: proto::HealthStatus::Healthy as i32,
            ..Default::default()
        }
    }

    fn full(service: &str, version: u64, ids: &[&str]) -> proto::ServiceUpdate {
        proto::ServiceUpdate {
            service: service.into(),
            version: Some(proto::Version { epoch: 9, version }),
            nonce: "n".into(),
            full: true,
            policy: Some(model::default_policy()),
            upserts: ids.iter().map(|i| server(i)).collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn saved_state_restores_stale_with_its_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.pb");
        let mut entries = HashMap::new();
        for (name, ids) in [("web", &["a", "b"][..]), ("api", &["c"][..])] {
            let state = Arc::new(ServiceState::new(name.into()));
            let mut e = Entry::new(state, None);
            e.stage(&full(name, 7, ids)).unwrap();
            e.flush().unwrap();
            entries.insert(name.to_owned(), e);
        }
        let mut saver = Saver::new(path.clone(), &[]);
        saver.note(&entries);
        saver.maybe_write();
        saver.writing.take().unwrap().await.unwrap();

        let restored = restore(&path, None);
        let mut names: Vec<_> = restored.states.iter().map(|s| s.name.clone()).collect();
        names.sort();
        assert_eq!(names, ["api", "web"]);
        for state in &restored.states {
            let snap = state.snapshot.load();
            assert!(snap.stale, "a restored service must be marked stale");
            assert_eq!(snap.version.version, 7);
            assert_eq!(snap.version.epoch, 9);
        }
        let web = restored.states.iter().find(|s| s.name == "web").unwrap();
        let ids: Vec<_> = web
            .snapshot
            .load()
            .picker
            .as_ref()
            .unwrap()
            .backends()
            .iter()
            .map(|b| b.id().to_owned())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        // Resubscribing names the restored versions (so the control plane can send deltas).
        for e in &restored.entries {
            assert_eq!(e.subscription().known.unwrap().version, 7);
        }
    }

    #[tokio::test]
    async fn a_missing_corrupt_or_foreign_file_restores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.pb");
        assert!(restore(&path, None).states.is_empty());
        std::fs::write(&path, b"\xff\xff\xff garbage").unwrap();
        assert!(restore(&path, None).states.is_empty());
        let other = proto::SdkSnapshotFile {
            format: 2,
            services: vec![full("web", 1, &["a"])],
            ..Default::default()
        };
        std::fs::write(&path, other.encode_to_vec()).unwrap();
        assert!(restore(&path, None).states.is_empty());
        // An invalid service is skipped; a valid one beside it is kept.
        let mut bad = full("bad", 1, &["a"]);
        bad.upserts[0].address = "no port".into();
        let mixed = proto::SdkSnapshotFile {
            format: FORMAT,
            services: vec![bad, full("web", 1, &["a"])],
            ..Default::default()
        };
        std::fs::write(&path, mixed.encode_to_vec()).unwrap();
        let r = restore(&path, None);
        assert_eq!(r.states.len(), 1);
        assert_eq!(r.states[0].name, "web");
    }
}
