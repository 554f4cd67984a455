//! The real `dlbd` binary: starts on ephemeral ports, logs its ready line, answers an RPC, and
//! exits 0 on SIGTERM; a bad config file makes it exit non-zero with the field in the message;
//! killed with `kill -9` on the embedded store and restarted on the same data dir, it serves the
//! same epoch, versions and backends, and a session that resumes gets a delta. `--store etcd`:
//! with the `etcd` feature a second `dlbd` on the same etcd serves what the first one wrote;
//! without it `dlbd` refuses the store with an error naming the feature.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(feature = "etcd")]
mod etcd_support;

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
    let (mut guard, ready, rx) = start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--store",
            "memory",
        ],
        None,
    );
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
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-metrics",
            "--store",
            "memory",
        ])
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

/// Runs `dlbd --config <config> --store memory` to its exit; returns whether it succeeded and
/// its stderr.
fn run_with_config(config: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dlbd"))
        .arg("--config")
        .arg(config)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-metrics",
            "--store",
            "memory",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn dlbd_bounds_the_config_file_before_parsing_it() {
    // An endless file is read up to 16 MiB, not until the OOM killer.
    #[cfg(unix)]
    {
        let (ok, err) = run_with_config(std::path::Path::new("/dev/zero"));
        assert!(!ok);
        assert!(
            err.contains("/dev/zero: the file is larger than 16 MiB"),
            "{err}"
        );
    }
    // Aliases inside the schema: one backend (with 20 metadata entries), a list of 1,000 of
    // it, that list in 500 services: 22 million nodes once expanded from 35 KB of YAML. Refused
    // before anything is built from it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.yaml");
    let meta: Vec<String> = (0..20).map(|i| format!("k{i}: v")).collect();
    let mut yaml = format!(
        "services:\n  - name: s0\n    backends: &l [&b {{id: a, address: \"h:1\", metadata: {{{}}}}}, {}]\n",
        meta.join(", "),
        vec!["*b"; 999].join(", ")
    );
    for i in 1..500 {
        yaml.push_str(&format!("  - name: s{i}\n    backends: *l\n"));
    }
    std::fs::write(&path, yaml).unwrap();
    let (ok, err) = run_with_config(&path);
    assert!(!ok);
    assert!(
        err.contains("YAML nodes once its aliases are expanded"),
        "{err}"
    );
    assert!(err.contains("line "), "{err}");
}

/// Starts `dlbd` with `args` (and `--data-dir`), waits for its ready line; returns the guard,
/// the ready line and the rest of its log. Its stderr is drained for its whole life (a closed
/// pipe would fail dlbd's logging).
fn start(
    args: &[&str],
    data_dir: Option<&std::path::Path>,
) -> (Guard, String, mpsc::Receiver<String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dlbd"));
    cmd.args(args);
    if let Some(d) = data_dir {
        cmd.arg("--data-dir").arg(d);
    }
    let child = cmd
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
            let _ = tx.send(line);
        }
    });
    let ready = loop {
        let line = rx.recv_timeout(WAIT).expect("no ready line");
        if line.contains("dlbd listening") {
            break line;
        }
    };
    (guard, ready, rx)
}

/// Starts `dlbd` on the embedded store in `data_dir`, listening on `listen`; returns the guard
/// and the gRPC address from its ready line.
fn start_embedded(data_dir: &std::path::Path, listen: &str) -> (Guard, String) {
    let (guard, ready, _log) = start(&["--listen", listen, "--no-metrics"], Some(data_dir));
    let grpc = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .expect("grpc= in the ready line")
        .to_owned();
    (guard, grpc)
}

async fn list(grpc: &str) -> proto::ListServersResponse {
    let mut c = proto::registry_client::RegistryClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    c.list_servers(proto::ListServersRequest {
        service: "web".into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Opens a raw session following `web` with `known`, returns its first update.
async fn first_update(grpc: &str, known: Option<proto::Version>) -> proto::ServiceUpdate {
    use proto::{client_message, server_message};
    let mut d = proto::discovery_client::DiscoveryClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(proto::ClientMessage {
        kind: Some(client_message::Kind::Subscribe(proto::Subscribe {
            locality: None,
            client_id: "kill9-test".into(),
            services: vec![proto::ServiceSubscription {
                service: "web".into(),
                known,
            }],
        })),
    })
    .await
    .unwrap();
    let mut inbound = d
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let msg = tokio::time::timeout(WAIT, inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop(tx);
    match msg.kind {
        Some(server_message::Kind::Update(u)) => u,
        other => panic!("expected an update, got {other:?}"),
    }
}

#[tokio::test]
async fn kill_9_on_the_embedded_store_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut guard, grpc) = start_embedded(dir.path(), "127.0.0.1:0");
    let mut c = proto::registry_client::RegistryClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        c.add_server(proto::AddServerRequest {
            service: "web".into(),
            server_id: (*id).into(),
            address: format!("10.0.0.{}:80", i + 1),
            weight: u32::try_from(i + 1).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    c.health_check_failed(proto::HealthCheckRequest {
        service: "web".into(),
        server_id: "b".into(),
    })
    .await
    .unwrap();
    let before = list(&grpc).await;
    let held = first_update(&grpc, None).await;
    assert!(held.full);
    assert_eq!(held.version, before.version);
    drop(c);

    // kill -9: no shutdown path runs.
    let mut child = guard.0.take().unwrap();
    let status = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap();

    // Restart on the same data dir and the same port.
    let (_guard, grpc2) = start_embedded(dir.path(), &grpc);
    assert_eq!(grpc2, grpc);
    let after = list(&grpc).await;
    assert_eq!(
        after, before,
        "ListServers differs after kill -9 and restart"
    );
    // A session holding the version from before the crash resumes with a delta, not a full
    // snapshot.
    let resumed = first_update(&grpc, held.version).await;
    assert!(!resumed.full, "resumed with a full snapshot: {resumed:?}");
    assert_eq!(resumed.base, held.version);
    assert_eq!(resumed.version, held.version);
    assert!(resumed.upserts.is_empty() && resumed.removals.is_empty());
}

#[cfg(not(feature = "etcd"))]
#[test]
fn dlbd_without_the_etcd_feature_refuses_store_etcd() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dlbd"))
        .args(["--listen", "127.0.0.1:0", "--no-metrics", "--store", "etcd"])
        .args(["--etcd-endpoints", "127.0.0.1:1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a dlbd that waits for a store it can never reach must fail the test, not hang it.
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > WAIT {
            let _ = child.kill();
            panic!("dlbd without the etcd feature kept running with --store etcd");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(err.contains("--features etcd"), "{err}");
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn dlbd_on_etcd_serves_what_another_dlbd_wrote() {
    let etcd = etcd_support::Etcd::start().await;
    let endpoint = etcd.endpoint();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--no-metrics",
        "--store",
        "etcd",
        "--etcd-endpoints",
        endpoint.as_str(),
        "--etcd-prefix",
        "/dlbd-test",
    ];
    let grpc_of = |ready: &str| {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .expect("grpc= in the ready line")
            .to_owned()
    };
    let (first, ready, _log) = start(&args, None);
    assert!(ready.contains("etcd:"), "{ready}");
    let grpc = grpc_of(&ready);
    let mut c = proto::registry_client::RegistryClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    c.add_server(proto::AddServerRequest {
        service: "web".into(),
        server_id: "a".into(),
        address: "10.0.0.1:80".into(),
        weight: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let before = list(&grpc).await;
    drop(c);
    drop(first);
    let (_second, ready, _log) = start(&args, None);
    let after = list(&grpc_of(&ready)).await;
    assert_eq!(after.version, before.version, "same epoch and version");
    assert_eq!(after.servers, before.servers);
}

/// `dlbd --etcd-ca/--etcd-cert/--etcd-key` reaches an etcd that serves TLS only and requires a
/// client certificate.
#[cfg(feature = "etcd")]
#[tokio::test]
async fn dlbd_reaches_etcd_over_tls_with_a_client_certificate() {
    let tls = std::sync::Arc::new(etcd_support::TestTls::new());
    let etcd = etcd_support::Etcd::start_tls(tls.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let ca = write("ca.pem", &tls.ca_pem);
    let cert = write("client.pem", &tls.client.0);
    let key = write("client-key.pem", &tls.client.1);
    let endpoint = etcd.endpoint();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--no-metrics",
        "--store",
        "etcd",
        "--etcd-endpoints",
        endpoint.as_str(),
        "--etcd-prefix",
        "/dlbd-tls",
        "--etcd-ca",
        ca.as_str(),
        "--etcd-cert",
        cert.as_str(),
        "--etcd-key",
        key.as_str(),
    ];
    let (_dlbd, ready, _log) = start(&args, None);
    assert!(ready.contains("etcd:"), "{ready}");
}
