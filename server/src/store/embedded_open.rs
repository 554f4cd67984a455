//! Opening the embedded store's file so that nothing on disk is lost silently: a damaged file
//! is an error that names it, says what is wrong and leaves the file byte-identical.
//!
//! * **Where.** A data directory that does not exist, or exists and is empty, gets a new store;
//!   a path that is not a directory, a directory holding other files but no `dlbd.redb`, and a
//!   store file that is empty (0 bytes) or not a regular file are refused ([`locate`]).
//! * **Check before writing.** redb may write while it opens a file (it repairs a file that was
//!   not shut down cleanly and commits the repair; a damaged header gets rewritten). So an
//!   existing file is first opened through a [`ScratchBackend`], which keeps every write in RAM,
//!   with redb's integrity check on (every page's checksum is verified) and every record read and
//!   validated. Only a file that passes is opened for real, by the same steps.
//! * **Panics.** redb may panic on a file damaged in ways its checks do not see (an unchecked
//!   UTF-8 decode, a slice index). Every call into redb at open runs under [`contained`], which
//!   catches the panic where it happens and turns it into the error above (the default panic
//!   message and backtrace are not printed for it).
//! * **Recovery** is the operator's explicit choice: restore a backup of `dlbd.redb`, or
//!   [`reset`] (`dlbd --reset-store`), which moves the file aside under a timestamped name and
//!   starts an empty store; nothing is ever deleted.

use std::cell::{Cell, RefCell};
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Builder, Database, DatabaseError, StorageError};

use super::embedded::DB_FILE;
use super::scratch::ScratchBackend;
use crate::Error;

pub(super) fn storage(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Storage(format!("{}: {what}", path.display()))
}

/// What the open found in the data directory.
pub(super) enum Located {
    /// No store file, in a new or empty directory: create one here.
    New(PathBuf),
    /// A non-empty store file: check it, then open it.
    Existing(PathBuf),
}

/// Checks `dir` (creating it if missing) and says whether it holds a store. See the module docs.
pub(super) fn locate(dir: &Path) -> Result<Located, Error> {
    let path = dir.join(DB_FILE);
    match fs::metadata(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            fs::create_dir_all(dir)
                .map_err(|e| storage(dir, format!("cannot create the data directory: {e}")))?;
            return Ok(Located::New(path));
        }
        Err(e) => return Err(storage(dir, format!("cannot use the data directory: {e}"))),
        Ok(m) if !m.is_dir() => {
            return Err(storage(
                dir,
                "the data directory exists but is not a directory (a file?); point --data-dir \
                 at a directory",
            ))
        }
        Ok(_) => {}
    }
    match fs::metadata(&path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let mut entries = fs::read_dir(dir)
                .map_err(|e| storage(dir, format!("cannot list the data directory: {e}")))?;
            match entries.next() {
                None => Ok(Located::New(path)),
                Some(entry) => {
                    let name = entry.map_or_else(
                        |e| e.to_string(),
                        |e| e.file_name().to_string_lossy().into_owned(),
                    );
                    Err(storage(
                        dir,
                        format!(
                            "the data directory has no {DB_FILE} but is not empty (it holds \
                             {name:?}); a new store starts only in a new or empty directory \
                             (restore {DB_FILE} there, or use `dlbd --reset-store` to start \
                             empty)"
                        ),
                    ))
                }
            }
        }
        Err(e) => Err(storage(&path, format!("cannot read the store file: {e}"))),
        Ok(m) if !m.is_file() => Err(storage(&path, "the store file is not a regular file")),
        Ok(m) if m.len() == 0 => Err(storage(
            &path,
            "the store file is empty (0 bytes), not a DLB store: it was truncated or never \
             written; left unchanged",
        )),
        Ok(_) => Ok(Located::Existing(path)),
    }
}

/// A redb open error as an error naming `path`: "in use" for a file another process holds,
/// "damaged" for everything that says the file is not a good database.
pub(super) fn open_error(path: &Path, e: DatabaseError) -> Error {
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => storage(
            path,
            format!(
                "the store file is in use by another process (another dlbd on this data dir?): {e}"
            ),
        ),
        DatabaseError::Storage(StorageError::Io(io))
            if matches!(io.kind(), ErrorKind::PermissionDenied | ErrorKind::NotFound) =>
        {
            storage(path, format!("cannot read the store file: {io}"))
        }
        other => damaged(path, other),
    }
}

/// Whether `e` is [`open_error`]'s "in use by another process".
pub(super) fn is_in_use(e: &Error) -> bool {
    matches!(e, Error::Storage(m) if m.contains(IN_USE))
}

const IN_USE: &str = "the store file is in use by another process";

/// "The store file is damaged": `what` says how.
pub(super) fn damaged(path: &Path, what: impl std::fmt::Display) -> Error {
    storage(
        path,
        format!("the store file is damaged or not a DLB store ({what}); left unchanged"),
    )
}

/// Opens the existing file at `path` with every write kept in RAM (the file is not written),
/// verifying every page's checksum.
pub(super) fn open_scratch(path: &Path) -> Result<Database, Error> {
    // Read and write access, as redb's own open: the byte-range locks it takes are the real
    // file's. Nothing is ever written through this handle.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| storage(path, format!("cannot open the store file: {e}")))?;
    let backend = ScratchBackend::new(file)
        .map_err(|e| storage(path, format!("cannot read the store file: {e}")))?;
    Builder::new()
        .set_check_integrity_on_open(true)
        .create_with_backend(backend)
        .map_err(|e| open_error(path, e))
}

/// Opens the existing file at `path` for real (once [`open_scratch`] and the reads it allowed
/// passed), by the same steps.
pub(super) fn open_real(path: &Path) -> Result<Database, Error> {
    Builder::new()
        .set_check_integrity_on_open(true)
        .open(path)
        .map_err(|e| open_error(path, e))
}

/// Creates a new database file at `path`, which must not exist.
pub(super) fn create_new(path: &Path) -> Result<Database, Error> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| storage(path, format!("cannot create the store file: {e}")))?;
    Database::create(path).map_err(|e| open_error(path, e))
}

thread_local! {
    /// Set while this thread runs [`contained`]: its panics are reported, not printed.
    static CONTAINING: Cell<bool> = const { Cell::new(false) };
    /// The last contained panic's message and location.
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// Wraps the process's panic hook (once): a panic on a thread inside [`contained`] is recorded
/// for its error instead of printed; every other panic goes to the previous hook.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CONTAINING.with(Cell::get) {
                let at = info
                    .location()
                    .map(|l| format!(" (at {}:{})", l.file(), l.line()))
                    .unwrap_or_default();
                let text = format!("{}{at}", payload_text(info.payload()));
                CAUGHT.with(|c| *c.borrow_mut() = Some(text));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `f` (calls into redb on the file at `path`), turning a panic inside it into a
/// "damaged" error naming the file.
pub(super) fn contained<T>(path: &Path, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    install_hook();
    let was = CONTAINING.with(|c| c.replace(true));
    let out = catch_unwind(AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(was));
    out.unwrap_or_else(|payload| {
        let what = CAUGHT
            .with(|c| c.borrow_mut().take())
            .unwrap_or_else(|| payload_text(&*payload));
        Err(damaged(
            path,
            format!("the storage library panicked reading it: {what}"),
        ))
    })
}

/// `dlbd --reset-store`: moves `dir`'s store file aside to `dlbd.redb.reset-<UTC time>` (never
/// deleting anything) and creates a new, empty store file in its place. Returns where the old
/// file went (`None`: there was none). Refuses a file another process has open.
pub fn reset(dir: &Path) -> Result<Option<PathBuf>, Error> {
    if let Ok(m) = fs::metadata(dir) {
        if !m.is_dir() {
            return Err(storage(
                dir,
                "the data directory exists but is not a directory",
            ));
        }
    }
    fs::create_dir_all(dir)
        .map_err(|e| storage(dir, format!("cannot create the data directory: {e}")))?;
    let path = dir.join(DB_FILE);
    let moved = match fs::symlink_metadata(&path) {
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(storage(&path, e)),
        Ok(_) => {
            // A file in use stays where it is: moving it would leave its owner writing to a
            // file no restart would find.
            match contained(&path, || open_scratch(&path)) {
                Err(e) if is_in_use(&e) => return Err(e),
                _ => {}
            }
            let stamp = utc_stamp(SystemTime::now());
            let mut aside = dir.join(format!("{DB_FILE}.reset-{stamp}"));
            let mut n = 1;
            while fs::symlink_metadata(&aside).is_ok() {
                aside = dir.join(format!("{DB_FILE}.reset-{stamp}-{n}"));
                n += 1;
            }
            fs::rename(&path, &aside)
                .map_err(|e| storage(&path, format!("cannot move the store file aside: {e}")))?;
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
            Some(aside)
        }
    };
    let db = contained(&path, || create_new(&path))?;
    super::embedded::initialize(&db, &path)?;
    Ok(moved)
}

/// `YYYYMMDDTHHMMSSZ` (UTC) for `t`.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_are_utc_calendar_times() {
        let at = |s| utc_stamp(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "19700101T000000Z");
        assert_eq!(at(951_782_400), "20000229T000000Z");
        assert_eq!(at(1_796_531_045), "20261206T042405Z");
    }

    #[test]
    fn a_panic_inside_is_an_error_naming_the_file() {
        let r: Result<(), Error> = contained(Path::new("/d/dlbd.redb"), || {
            let v: Vec<u8> = Vec::new();
            let i = v.len() + 3;
            Err(storage(Path::new("x"), v[i]))
        });
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains("/d/dlbd.redb: the store file is damaged"),
            "{msg}"
        );
        assert!(msg.contains("index out of bounds"), "{msg}");
    }
}
