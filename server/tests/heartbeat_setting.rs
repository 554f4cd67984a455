//! The session heartbeat interval is a setting: YAML `heartbeat_ms` (100..=60,000, the error
//! names the field) and `dlbd --heartbeat-ms`, which a real `dlbd` then uses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dlb::proto::{self, client_message, server_message};
use dlb_server::ServerConfig;

#[test]
fn yaml_heartbeat_ms_sets_the_interval_within_bounds() {
    let c = ServerConfig::from_yaml_str("heartbeat_ms: 250\n").unwrap();
    assert_eq!(c.session_heartbeat, Duration::from_millis(250));
    let c = ServerConfig::from_yaml_str("history_size: 8\n").unwrap();
    assert_eq!(c.session_heartbeat, Duration::from_secs(5), "the default");
    for bad in ["heartbeat_ms: 50\n", "heartbeat_ms: 60001\n"] {
        let err = ServerConfig::from_yaml_str(bad).unwrap_err().to_string();
        assert!(err.contains("heartbeat_ms"), "{bad}: {err}");
    }
}

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn dlbd_heartbeat_ms_is_the_interval_a_quiet_session_gets() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dlbd"))
        .args([
            "--store",
            "memory",
            "--listen",
            "127.0.0.1:0",
            "--no-metrics",
        ])
        .args(["--heartbeat-ms", "200"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _guard = Guard(child);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let grpc = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("no ready line");
        if line.contains("dlbd listening") {
            break line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("grpc="))
                .expect("grpc= in the ready line")
                .to_owned();
        }
    };
    let mut d = proto::discovery_client::DiscoveryClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let (out, rx) = tokio::sync::mpsc::channel(4);
    out.send(proto::ClientMessage {
        kind: Some(client_message::Kind::Subscribe(proto::Subscribe {
            locality: None,
            client_id: "heartbeat-test".into(),
            services: vec![proto::ServiceSubscription {
                service: "default".into(),
                known: None,
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
    // Three heartbeats well before the default interval (5 s) could give one.
    let mut beats = 0;
    let within = tokio::time::Instant::now() + Duration::from_secs(4);
    while beats < 3 {
        let msg = tokio::time::timeout_at(within, inbound.message())
            .await
            .unwrap_or_else(|_| panic!("{beats} heartbeats within 4 s at --heartbeat-ms 200"))
            .unwrap()
            .unwrap();
        if let Some(server_message::Kind::Heartbeat(_)) = msg.kind {
            beats += 1;
        }
    }
    drop(out);
}
