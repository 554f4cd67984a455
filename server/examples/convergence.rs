//! Measures control-plane convergence: the time from a Registry write's *return* to every one
//! of N open Discovery sessions (raw sessions that only decode) having received the resulting
//! update, plus `dlbd`'s memory per session.
//!
//! ```text
//! cargo run --release -p dlb-server --example convergence -- [sessions] [writes] [connections]
//! # against a real dlbd process, reporting its RSS per session:
//! cargo build --release -p dlb-server --bins --examples
//! target/release/examples/convergence 10000 200 100 target/release/dlbd
//! ```
//!
//! Sessions are spread over `connections` HTTP/2 connections (default: one per 100 sessions).

use std::time::{Duration, Instant};

use anyhow::Context;
use dlb::proto::{
    self, client_message, discovery_client::DiscoveryClient, registry_client::RegistryClient,
    server_message, ClientMessage,
};
use dlb_server::ServerConfig;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let sessions: usize = args.next().map_or(Ok(100), |a| a.parse())?;
    let writes: usize = args.next().map_or(Ok(1000), |a| a.parse())?;
    let connections: usize = args
        .next()
        .map_or(Ok(sessions.div_ceil(100).max(1)), |a| a.parse())?;
    let dlbd = args.next();
    // Either a real dlbd process (its RSS is measured) or an in-process server.
    let (server, mut child, addr) = match &dlbd {
        Some(path) => {
            let (child, addr) = external::start(path)?;
            (None, Some(child), addr)
        }
        None => {
            let s = dlb_server::spawn(ServerConfig {
                listen: "127.0.0.1:0".parse()?,
                metrics_listen: None,
                ..Default::default()
            })
            .await?;
            let addr = s.grpc_addr().to_string();
            (Some(s), None, addr)
        }
    };
    let rss_before = child.as_ref().and_then(|c| external::rss_kib(c.id()));
    let url = format!("http://{addr}");
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(
            tonic::transport::Channel::from_shared(url.clone())?
                .connect()
                .await?,
        );
    }
    let channel = channels[0].clone();

    // Each session task reports (version, when received) for every delta.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let mut keep = Vec::new();
    for n in 0..sessions {
        let (tx, rx) = mpsc::channel(16);
        tx.send(ClientMessage {
            kind: Some(client_message::Kind::Subscribe(proto::Subscribe {
                locality: None,
                client_id: "convergence".into(),
                services: vec![proto::ServiceSubscription::default()],
            })),
        })
        .await?;
        let mut stream = DiscoveryClient::new(channels[n % channels.len()].clone())
            .session(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let seen = seen_tx.clone();
        keep.push(tx);
        tokio::spawn(async move {
            while let Ok(Some(m)) = stream.message().await {
                if let Some(server_message::Kind::Update(u)) = m.kind {
                    if !u.full {
                        let _ = seen.send((u.version.map_or(0, |v| v.version), Instant::now()));
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = child.as_ref().and_then(|c| external::rss_kib(c.id()));

    let mut registry = RegistryClient::new(channel);
    let mut latencies = Vec::with_capacity(writes);
    for i in 0..writes {
        let r = registry
            .add_server(proto::AddServerRequest {
                server_id: format!("s{i}"),
                address: "10.0.0.1:80".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        // From the write's return.
        let start = Instant::now();
        let version = r.version.context("no version")?.version;
        let mut got = 0;
        let mut last = start;
        while got < sessions {
            let (v, at) = seen_rx.recv().await.context("sessions ended")?;
            if v == version {
                got += 1;
                last = last.max(at);
            }
            // The next write starts only once every session has this version, so no session
            // coalesces it away.
        }
        latencies.push(last - start);
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    println!(
        "{sessions} sessions, {writes} writes: write→all sessions p50 {:?} p90 {:?} p99 {:?} max {:?}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        println!(
            "dlbd RSS: {before} KiB idle, {after} KiB with {sessions} sessions: {:.1} KiB per session",
            (after.saturating_sub(before)) as f64 / sessions as f64
        );
    }
    drop(keep);
    if let Some(s) = server {
        s.shutdown().await?;
    }
    if let Some(c) = child.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(())
}

/// A real `dlbd` process on the in-memory store.
mod external {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};

    use anyhow::Context;

    pub fn start(path: &str) -> anyhow::Result<(Child, String)> {
        let mut child = Command::new(path)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--no-metrics",
                "--store",
                "memory",
            ])
            .env("RUST_LOG", "warn,dlbd=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {path}"))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines.next().context("dlbd exited")??;
            if let Some(a) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("grpc="))
            {
                break a.to_owned();
            }
        };
        // Keep draining its stderr.
        std::thread::spawn(move || for _ in lines {});
        Ok((child, addr))
    }

    /// Resident set size of a process, KiB.
    pub fn rss_kib(pid: u32) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}
