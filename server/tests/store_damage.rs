//! A damaged embedded store is never a silent empty start, a panic or a rewrite: the real
//! `dlbd` binary on a data dir whose `dlbd.redb` is empty, truncated or has flipped bits (in the
//! header, in a table page, inside a backend record) exits non-zero with a message naming the
//! file, prints no panic, and leaves the file byte-identical (also across a second start). A
//! data dir that is a file, or a non-empty directory without a store, is refused likewise;
//! `--reset-store` moves the old file aside (never deletes it) and starts empty, and refuses a
//! file another `dlbd` has open. 40 seeded random flips never make `dlbd` panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dlb::proto;
use dlb_server::store::{EmbeddedStore, Mutation, Store};

/// How long a start may take before the test calls it hung (generous: the VM stalls).
const WAIT: Duration = Duration::from_secs(60);

/// A backend id whose bytes are easy to find inside the file.
const MARKER: &str = "record-marker-7f3a";

/// Writes a store with a few services and backends into `dir` and closes it.
async fn make_store(dir: &Path) {
    let st = EmbeddedStore::open(dir).unwrap();
    for s in 0..4 {
        for b in 0..20 {
            let id = if s == 1 && b == 7 {
                MARKER.to_owned()
            } else {
                format!("b{b}")
            };
            st.apply(
                format!("svc{s}"),
                vec![Mutation::Add(proto::Server {
                    server_id: id.clone(),
                    address: format!("{id}.internal:80"),
                    weight: 1 + b,
                    ..Default::default()
                })],
                None,
            )
            .await
            .unwrap();
        }
    }
}

/// What one `dlbd` start did: exit status (`None`: it started serving) and its stderr.
struct Outcome {
    code: Option<i32>,
    stderr: String,
}

/// Starts the real `dlbd` on `dir` with `extra` arguments; returns once it exits, or once it
/// logs its ready line (then it is stopped and `code` is `None`).
fn start(dir: &Path, extra: &[&str]) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dlbd"))
        .args(["--listen", "127.0.0.1:0", "--no-metrics", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut log = String::new();
    let code = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                let serving = line.contains("dlbd listening");
                log.push_str(&line);
                log.push('\n');
                if serving {
                    // It opened the store and serves: stop it.
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                assert!(
                    Instant::now() < deadline,
                    "dlbd neither served nor exited: {log}"
                );
            }
            // stderr closed: the process is exiting.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break child.wait().unwrap().code();
            }
        }
    };
    Outcome { code, stderr: log }
}

/// Asserts that `dlbd` refuses `dir` with a message naming `named` and containing `says`, prints
/// no panic, and leaves the store file as it was (twice: a failed start writes nothing).
fn assert_refused(dir: &Path, named: &Path, says: &str) {
    let file = dir.join("dlbd.redb");
    let before = std::fs::read(&file).ok();
    for attempt in 0..2 {
        let out = start(dir, &[]);
        assert_eq!(out.code, Some(1), "attempt {attempt}: {}", out.stderr);
        let named = named.display().to_string();
        assert!(out.stderr.contains(&named), "no {named} in: {}", out.stderr);
        assert!(out.stderr.contains(says), "no {says:?} in: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        assert!(!out.stderr.contains("listening"), "{}", out.stderr);
        assert!(
            std::fs::read(&file).ok() == before,
            "attempt {attempt}: the store file changed"
        );
    }
}

/// Every offset of `needle` in `haystack` (a record may have stale copies in freed pages).
fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    let found: Vec<usize> = haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert!(!found.is_empty(), "marker in the file");
    found
}

/// `bad` with 4 bytes flipped at each of `at`.
fn flipped(good: &[u8], at: &[usize]) -> Vec<u8> {
    let mut bad = good.to_vec();
    for &i in at {
        for b in &mut bad[i..i + 4] {
            *b ^= 0x5a;
        }
    }
    bad
}

#[tokio::test]
async fn a_zero_byte_store_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dlbd.redb"), b"").unwrap();
    assert_refused(dir.path(), &dir.path().join("dlbd.redb"), "empty (0 bytes)");
}

#[tokio::test]
async fn a_truncated_store_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path()).await;
    let file = dir.path().join("dlbd.redb");
    let good = std::fs::read(&file).unwrap();
    for keep in [100, 4096, good.len() / 2, good.len() - 4096] {
        std::fs::write(&file, &good[..keep]).unwrap();
        assert_refused(dir.path(), &file, "damaged");
    }
}

#[tokio::test]
async fn flipped_bits_are_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path()).await;
    let file = dir.path().join("dlbd.redb");
    let good = std::fs::read(&file).unwrap();
    // Inside a backend record (every copy of it, so the live one is hit).
    let record: Vec<usize> = find_all(&good, MARKER.as_bytes())
        .into_iter()
        .map(|i| i + 3)
        .collect();
    // The magic number, the header's commit slot, a table page, and the record.
    for at in [vec![0], vec![70], vec![4096 + 40], record] {
        std::fs::write(&file, flipped(&good, &at)).unwrap();
        assert_refused(dir.path(), &file, "damaged");
    }
}

#[tokio::test]
async fn a_data_dir_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::write(&data, b"not a directory").unwrap();
    let out = start(&data, &[]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "{}: the data directory exists but is not a directory",
            data.display()
        )),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read(&data).unwrap(), b"not a directory");
}

#[tokio::test]
async fn a_non_empty_dir_without_a_store_is_refused_and_reset_store_recovers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
    assert_refused(dir.path(), dir.path(), "has no dlbd.redb but is not empty");

    // A damaged store: --reset-store moves it aside, byte-identical, and starts empty.
    std::fs::remove_file(dir.path().join("notes.txt")).unwrap();
    make_store(dir.path()).await;
    let file = dir.path().join("dlbd.redb");
    let bad = flipped(&std::fs::read(&file).unwrap(), &[0]);
    std::fs::write(&file, &bad).unwrap();
    assert_refused(dir.path(), &file, "damaged");
    let out = start(dir.path(), &["--reset-store"]);
    assert_eq!(out.code, None, "it serves: {}", out.stderr);
    assert!(
        out.stderr.contains("moved the old store file aside"),
        "{}",
        out.stderr
    );
    let moved: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("dlbd.redb.reset-"))
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(std::fs::read(dir.path().join(&moved[0])).unwrap(), bad);
    // The new store is a good one: a plain start serves it.
    let out = start(dir.path(), &[]);
    assert_eq!(out.code, None, "it serves: {}", out.stderr);
}

/// 40 seeded random 4-byte flips anywhere in the file (the experiment, where 2 of 40
/// panicked inside redb and a failed start rewrote the header): each start either serves (the
/// flip hit unused space) or refuses with the file named and unchanged; none panics.
#[tokio::test]
async fn random_flips_never_panic_and_a_refusal_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path()).await;
    let file = dir.path().join("dlbd.redb");
    let good = std::fs::read(&file).unwrap();
    let mut rng = fastrand::Rng::with_seed(15);
    let mut refused = 0;
    for _ in 0..40 {
        let at = rng.usize(..good.len() - 4);
        let mut bad = good.clone();
        for b in &mut bad[at..at + 4] {
            *b ^= rng.u8(1..);
        }
        std::fs::write(&file, &bad).unwrap();
        let out = start(dir.path(), &[]);
        assert!(
            !out.stderr.contains("panicked"),
            "flip at {at}: {}",
            out.stderr
        );
        if out.code.is_some() {
            refused += 1;
            assert_eq!(out.code, Some(1), "flip at {at}: {}", out.stderr);
            assert!(
                out.stderr.contains(&file.display().to_string()),
                "{}",
                out.stderr
            );
            assert!(
                std::fs::read(&file).unwrap() == bad,
                "flip at {at}: the file changed"
            );
        }
    }
    assert!(
        refused > 0,
        "no flip hit live data: the experiment checks nothing"
    );
}

#[tokio::test]
async fn reset_store_refuses_a_store_another_dlbd_has_open() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path()).await;
    let mut running = Command::new(env!("CARGO_BIN_EXE_dlbd"))
        .args(["--listen", "127.0.0.1:0", "--no-metrics", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = running.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx.recv_timeout(WAIT).expect("the first dlbd serves");
        if line.contains("dlbd listening") {
            break;
        }
    }
    let before = std::fs::read(dir.path().join("dlbd.redb")).unwrap();
    let out = start(dir.path(), &["--reset-store"]);
    let _ = running.kill();
    let _ = running.wait();
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("in use by another process"),
        "{}",
        out.stderr
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["dlbd.redb"], "nothing moved");
    assert_eq!(std::fs::read(dir.path().join("dlbd.redb")).unwrap(), before);
}
