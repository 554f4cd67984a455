//! The real `dlbd` binary: starts on ephemeral ports, logs its ready line, answers an RPC, and
//! exits 0 on SIGTERM; a bad config file makes it exit non-zero with the field in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use dlb::proto;

const WAIT: Duration = Duration::from_secs(20);

/// Kills the child if the test fails before it exits.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test]
async fn dlbd_starts_serves_and_stops_on_sigterm() {
    let child = Command::new(env!("CARGO_BIN_EXE_dlbd"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = Guard(Some(child));
    let stderr = guard.0.as_mut().unwrap().stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = loop {
        let line = rx.recv_timeout(WAIT).expect("no ready line");
        if line.contains("dlbd listening") {
            break line;
        }
    };
    let field = |name: &str| -> String {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {ready:?}"))
            .to_owned()
    };
    let grpc = field("grpc=");
    let metrics = field("metrics=");
    assert!(metrics.parse::<std::net::SocketAddr>().is_ok(), "{ready}");

    let mut c = tokio::time::timeout(
        WAIT,
        proto::registry_client::RegistryClient::connect(format!("http://{grpc}")),
    )
    .await
    .unwrap()
    .unwrap();
    let r = c
        .add_server(proto::AddServerRequest {
            server_id: "a".into(),
            address: "10.0.0.1:80".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.service, "default");

    let pid = guard.0.as_ref().unwrap().id().to_string();
    let t0 = std::time::Instant::now();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let mut child = guard.0.take().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("dlbd did not exit after SIGTERM");
        }
        // Not thread::sleep: the client connection lives on this runtime and must see the
        // server's GOAWAY to close, or dlbd waits out its grace period.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = t0.elapsed();
    assert!(code.success(), "dlbd exited with {code}");
    let log: Vec<String> = rx.try_iter().collect();
    assert!(
        !log.iter().any(|l| l.contains("grace period over")),
        "open connections were not closed gracefully (took {took:?}): {log:?}"
    );
}

#[test]
fn dlbd_rejects_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "services:\n  - name: web\n    backends:\n      - id: a\n        address: 10.0.0.1:80\n        weight: 0\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dlbd"))
        .args(["--config"])
        .arg(&path)
        .args(["--listen", "127.0.0.1:0", "--no-metrics"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(err.contains("services[0].backends[0].weight"), "{err}");
    assert!(err.contains("line 6"), "{err}");
}
