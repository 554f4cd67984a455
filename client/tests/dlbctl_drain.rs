//! `dlbctl drain --wait` and `dlbctl remove-server --wait` (the drain barrier, docs/drain.md):
//! exit 0 once every SDK following the service holds the drain, exit 6 naming a session that
//! never acknowledges when the deadline passes, exit 2 on bad flags.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use dlb::proto::discovery_client::DiscoveryClient;
use dlb::proto::{self, client_message, server_message, ClientMessage};
use dlb_client::Client;
use tokio_stream::wrappers::ReceiverStream;

/// A raw session following `web` that acknowledges its first update, then reads nothing more.
async fn silent_session(
    server: &dlb_server::RunningServer,
) -> (
    tokio::sync::mpsc::Sender<ClientMessage>,
    tonic::Streaming<dlb::proto::ServerMessage>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(ClientMessage {
        kind: Some(client_message::Kind::Subscribe(proto::Subscribe {
            locality: None,
            client_id: "silent".into(),
            services: vec![proto::ServiceSubscription {
                service: "web".into(),
                known: None,
            }],
        })),
    })
    .await
    .unwrap();
    let channel = tonic::transport::Channel::from_shared(endpoint(server))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stream = DiscoveryClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let update = loop {
        let m = within("first update", stream.message())
            .await
            .unwrap()
            .unwrap();
        if let Some(server_message::Kind::Update(u)) = m.kind {
            break u;
        }
    };
    tx.send(ClientMessage {
        kind: Some(client_message::Kind::Ack(proto::Ack {
            service: "web".into(),
            version: update.version,
            nonce: update.nonce,
        })),
    })
    .await
    .unwrap();
    (tx, stream)
}

#[tokio::test]
async fn drain_and_remove_wait_on_the_barrier_with_documented_exit_codes() {
    let server = dlb_server::spawn(config(vec![service_with("web", &["a", "b", "c"])]))
        .await
        .unwrap();
    let ep = endpoint(&server);
    let client = Client::builder([ep.clone()])
        .client_id("sdk-1")
        .connect()
        .await
        .unwrap();
    let h = client.service("web").await.unwrap();

    let out = dlbctl_ok(
        &ep,
        &[
            "--service",
            "web",
            "--json",
            "drain",
            "a",
            "--wait",
            "--timeout",
            "30s",
        ],
    )
    .await;
    // The moment dlbctl has the answer, the SDK holds the drain.
    let held = h.version().version;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["barrier"]["ended"], "confirmed", "{out}");
    assert_eq!(v["barrier"]["confirmed"], 1, "{out}");
    assert!(held >= v["barrier"]["version"].as_u64().unwrap(), "{out}");
    assert!(picked(&h, 30).iter().all(|id| id != "a"));

    // A session that never acknowledges: named, exit 6.
    let (_tx, _stream) = silent_session(&server).await;
    let out = run_dlbctl(
        &ep,
        &[
            "--service",
            "web",
            "drain",
            "b",
            "--wait",
            "--timeout",
            "500ms",
        ],
    )
    .await;
    assert_eq!(out.code, 6, "{} / {}", out.stdout, out.stderr);
    assert!(out.stdout.contains("barrier: deadline"), "{}", out.stdout);
    assert!(
        out.stdout.contains("not confirmed: sdk silent"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("drain barrier: deadline passed"),
        "{}",
        out.stderr
    );
    let out = run_dlbctl(
        &ep,
        &[
            "--service",
            "web",
            "remove-server",
            "c",
            "--wait",
            "--timeout",
            "300ms",
        ],
    )
    .await;
    assert_eq!(out.code, 6, "{} / {}", out.stdout, out.stderr);
    assert!(out.stdout.contains("removed c from web"), "{}", out.stdout);

    // Without --wait: no barrier, exit 0.
    let out = dlbctl_ok(&ep, &["--service", "web", "drain", "b"]).await;
    assert!(!out.contains("barrier"), "{out}");
    // Bad flags: usage errors (exit 2), nothing sent.
    for args in [
        &["--service", "web", "drain", "b", "--in-flight-zero"][..],
        &[
            "--service",
            "web",
            "drain",
            "b",
            "--wait",
            "--timeout",
            "2h",
        ][..],
        &["--service", "web", "remove-server", "b", "--timeout", "1s"][..],
    ] {
        let out = run_dlbctl(&ep, args).await;
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
    }
}

/// `dlbctl register` killed by SIGTERM while 20 SDKs pick: it drains, waits on the barrier,
/// deregisters and exits 0; from the moment it exits, no SDK picks the backend.
#[tokio::test]
async fn register_drains_and_waits_on_sigterm() {
    use std::process::Stdio;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncBufReadExt, BufReader};

    let server = dlb_server::spawn(config(vec![service_with("web", &["other"])]))
        .await
        .unwrap();
    let ep = endpoint(&server);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dlbctl"))
        .args(["--endpoint", &ep, "--service", "web", "register", "s1"])
        .args(["127.0.0.1:9100", "--ttl", "30", "--drain-timeout", "30s"])
        .env_remove("DLB_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within("registration", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(first.starts_with("registered s1"), "{first}");

    let mut sdks = Vec::new();
    for i in 0..20 {
        let client = Client::builder([ep.clone()])
            .client_id(format!("picker-{i}"))
            .connect()
            .await
            .unwrap();
        let h = client.service("web").await.unwrap();
        eventually("the SDK sees s1", || picked(&h, 4).contains("s1")).await;
        sdks.push((client, h));
    }
    // Every SDK picks continuously until the process has exited.
    let exited = Arc::new(AtomicBool::new(false));
    let mut pickers = Vec::new();
    for (_, h) in &sdks {
        let (h, exited) = (h.clone(), exited.clone());
        pickers.push(tokio::spawn(async move {
            let mut after_exit = 0u64;
            loop {
                let done = exited.load(Ordering::SeqCst);
                if let Ok(g) = h.get_next_server(None) {
                    if done && g.server_id() == "s1" {
                        after_exit += 1;
                    }
                }
                if done {
                    return after_exit;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }));
    }
    let pid = child.id().expect("running").to_string();
    let signalled = std::time::Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut rest = Vec::new();
    while let Some(line) = within("dlbctl output", lines.next_line()).await.unwrap() {
        rest.push(line);
    }
    let status = within("dlbctl to exit", child.wait()).await.unwrap();
    exited.store(true, Ordering::SeqCst);
    // Reported, not asserted (this VM stalls): SIGTERM to exit against the barrier's own wait.
    eprintln!(
        "dlbctl register: SIGTERM to exit {:?}; {}",
        signalled.elapsed(),
        rest.iter()
            .find(|l| l.starts_with("barrier:"))
            .map_or("", |l| l.as_str())
    );
    let out = rest.join("\n");
    assert!(status.success(), "{status}: {out}");
    for p in pickers {
        assert_eq!(p.await.unwrap(), 0, "a pick reached s1 after dlbctl exited");
    }
    for (_, h) in &sdks {
        assert!(picked(h, 20).iter().all(|id| id != "s1"));
    }
    let order: Vec<usize> = ["draining s1", "barrier: confirmed", "deregistered s1"]
        .iter()
        .map(|s| {
            out.find(s)
                .unwrap_or_else(|| panic!("{s:?} missing: {out}"))
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");
    assert!(out.contains("20 client(s) confirmed"), "{out}");
}
