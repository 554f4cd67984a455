//! Measures xDS fan-out: N state-of-the-world ADS streams (each subscribed to Listener, Cluster
//! and ClusterLoadAssignment `s`, as a stock gRPC client is, and ACKing every response) receiving
//! one backend change; the latency from the Registry write's *return* to each stream receiving
//! the new ClusterLoadAssignment.
//!
//! ```text
//! cargo run --release -p dlb-server --example xds_fanout -- [streams] [rounds] [connections]
//! ```
//!
//! Defaults: 1,000 streams, 20 rounds (one change each, the next once every stream has the
//! previous), one HTTP/2 connection per 100 streams; `s` has 10 backends.

use std::time::{Duration, Instant};

use dlb::proto::{self, registry_client::RegistryClient};
use dlb_server::api::xds::resources::{CLUSTER, ENDPOINTS, LISTENER};
use dlb_server::ServerConfig;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn request(type_url: &str, version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: vec!["s".into()],
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let streams: usize = args.next().map_or(Ok(1000), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(20), |a| a.parse())?;
    let connections: usize = args
        .next()
        .map_or(Ok(streams.div_ceil(100).max(1)), |a| a.parse())?;

    let server = dlb_server::spawn(ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        ..Default::default()
    })
    .await?;
    let url = format!("http://{}", server.grpc_addr());
    let mut registry = RegistryClient::connect(url.clone()).await?;
    for i in 0..10 {
        registry
            .add_server(proto::AddServerRequest {
                service: "s".into(),
                server_id: format!("b{i}"),
                address: format!("127.0.0.1:{}", 20_000 + i),
                weight: 1,
                ..Default::default()
            })
            .await?;
    }
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(
            tonic::transport::Channel::from_shared(url.clone())?
                .connect()
                .await?,
        );
    }

    // Each stream reports the arrival time of every EDS response after its first.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Instant>();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let mut keep = Vec::new();
    for n in 0..streams {
        let (tx, rx) = mpsc::channel(8);
        let mut first = request(LISTENER, "", "");
        first.node = Some(Node {
            id: format!("fanout-{n}"),
            ..Default::default()
        });
        tx.send(first).await?;
        tx.send(request(CLUSTER, "", "")).await?;
        tx.send(request(ENDPOINTS, "", "")).await?;
        let mut stream =
            AggregatedDiscoveryServiceClient::new(channels[n % channels.len()].clone())
                .stream_aggregated_resources(ReceiverStream::new(rx))
                .await?
                .into_inner();
        let (seen, ready, acks) = (seen_tx.clone(), ready_tx.clone(), tx.clone());
        keep.push(tx);
        tokio::spawn(async move {
            let mut eds = 0usize;
            while let Ok(Some(r)) = stream.message().await {
                let now = Instant::now();
                if r.type_url == ENDPOINTS {
                    eds += 1;
                    if eds == 1 {
                        let _ = ready.send(());
                    } else {
                        let _ = seen.send(now);
                    }
                }
                let _ = acks
                    .send(request(&r.type_url, &r.version_info, &r.nonce))
                    .await;
            }
        });
    }
    for _ in 0..streams {
        ready_rx.recv().await;
    }
    eprintln!("{streams} ADS streams over {connections} connections subscribed");

    let mut all = Vec::with_capacity(streams * rounds);
    let mut lasts = Vec::with_capacity(rounds);
    let cpu_before = cpu_seconds();
    let wall = Instant::now();
    for round in 0..rounds {
        registry
            .update_server(proto::UpdateServerRequest {
                service: "s".into(),
                server_id: "b0".into(),
                weight: Some(2 + (round as u32 % 2)),
                ..Default::default()
            })
            .await?;
        let t0 = Instant::now();
        let mut last = Duration::ZERO;
        for _ in 0..streams {
            let at = tokio::time::timeout(Duration::from_secs(60), seen_rx.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("a stream ended"))?;
            let d = at.saturating_duration_since(t0);
            last = last.max(d);
            all.push(d);
        }
        lasts.push(last);
    }
    let elapsed = wall.elapsed();
    let cpu = cpu_seconds().zip(cpu_before).map(|(a, b)| a - b);
    all.sort();
    lasts.sort();
    println!(
        "xds_fanout: {streams} streams, {rounds} changes: per stream p50 {:?} p99 {:?} max {:?}; \
         last stream per change p50 {:?} p99 {:?}",
        pct(&all, 0.50),
        pct(&all, 0.99),
        all.last().copied().unwrap_or_default(),
        pct(&lasts, 0.50),
        pct(&lasts, 0.99),
    );
    if let Some(cpu) = cpu {
        println!(
            "process CPU {:.2} s over {:.2} s wall: {:.1} µs per stream-update (both ends)",
            cpu,
            elapsed.as_secs_f64(),
            cpu * 1e6 / (streams * rounds) as f64
        );
    }
    drop(keep);
    server.shutdown().await?;
    Ok(())
}

/// This process's user + system CPU time, from /proc (Linux only).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
