//! Measures control-plane convergence: the time from sending a Registry write to every one of
//! N open Discovery sessions having received the resulting update.
//!
//! ```text
//! cargo run --release -p dlb-server --example convergence -- [sessions] [writes]
//! ```

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
    let server = dlb_server::spawn(ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        ..Default::default()
    })
    .await?;
    let url = format!("http://{}", server.grpc_addr());
    let channel = tonic::transport::Channel::from_shared(url)?
        .connect()
        .await?;

    // Each session task reports (version, when received) for every delta.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let mut keep = Vec::new();
    for _ in 0..sessions {
        let (tx, rx) = mpsc::channel(16);
        tx.send(ClientMessage {
            kind: Some(client_message::Kind::Subscribe(proto::Subscribe {
                client_id: "convergence".into(),
                services: vec![proto::ServiceSubscription::default()],
            })),
        })
        .await?;
        let mut stream = DiscoveryClient::new(channel.clone())
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
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut registry = RegistryClient::new(channel);
    let mut latencies = Vec::with_capacity(writes);
    for i in 0..writes {
        let start = Instant::now();
        let r = registry
            .add_server(proto::AddServerRequest {
                server_id: format!("s{i}"),
                address: "10.0.0.1:80".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let version = r.version.context("no version")?.version;
        let mut got = 0;
        let mut last = start;
        while got < sessions {
            let (v, at) = seen_rx.recv().await.context("sessions ended")?;
            if v == version {
                got += 1;
                last = last.max(at);
            }
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
    drop(keep);
    server.shutdown().await?;
    Ok(())
}
