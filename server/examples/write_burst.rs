//! A write burst against one large service: `changes` UpdateServer calls back to back on a
//! service of `backends` Maglev backends. Prints the RPC latency percentiles (no RPC builds a
//! picker) and how many server-side picker builds the burst cost until the picker reached the
//! last version (builds coalesce: each build starts from the newest snapshot).
//!
//! ```text
//! cargo run --release -p dlb-server --example write_burst -- [backends] [changes]
//! ```

use std::time::{Duration, Instant};

use anyhow::Context;
use dlb::proto::{self, registry_client::RegistryClient};
use dlb_server::store::Mutation;
use dlb_server::ServerConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let backends: usize = args.next().map_or(Ok(10_000), |a| a.parse())?;
    let changes: usize = args.next().map_or(Ok(1_000), |a| a.parse())?;
    let server = dlb_server::spawn(ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        ..Default::default()
    })
    .await?;
    let mut mutations = vec![Mutation::SetPolicy(proto::Policy {
        algorithm: proto::Algorithm::Maglev as i32,
        ..Default::default()
    })];
    mutations.extend((0..backends).map(|i| {
        Mutation::Add(proto::Server {
            server_id: format!("b{i}"),
            address: format!("10.{}.{}.{}:80", i / 65_536, (i / 256) % 256, i % 256),
            weight: 1,
            ..Default::default()
        })
    }));
    let created = server.store().apply("big".into(), mutations, None).await?;
    let mut c = RegistryClient::connect(format!("http://{}", server.grpc_addr())).await?;
    wait_for_picker(&mut c, created.version.version).await?;

    let builds_before = server.picker_builds();
    let mut latencies = Vec::with_capacity(changes);
    let mut last = 0;
    let t0 = Instant::now();
    for i in 0..changes {
        let start = Instant::now();
        let r = c
            .update_server(proto::UpdateServerRequest {
                service: "big".into(),
                server_id: format!("b{}", i % backends),
                weight: Some(2 + (i % 7) as u32),
                ..Default::default()
            })
            .await?
            .into_inner();
        latencies.push(start.elapsed());
        last = r.version.context("no version")?.version;
    }
    let burst = t0.elapsed();
    let caught_up = wait_for_picker(&mut c, last).await?;
    let builds = server.picker_builds() - builds_before;
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    println!(
        "{backends} maglev backends, {changes} UpdateServer back to back in {burst:?}: \
         RPC p50 {:?} p99 {:?} max {:?}; picker caught up {caught_up:?} after the last write \
         with {builds} builds",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    server.shutdown().await?;
    Ok(())
}

/// Polls GetNextServer until it answers from `version`; returns how long that took.
async fn wait_for_picker(
    c: &mut RegistryClient<tonic::transport::Channel>,
    version: u64,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    loop {
        let r = c
            .get_next_server(proto::GetNextServerRequest {
                service: "big".into(),
                key: b"key".to_vec(),
            })
            .await;
        if let Ok(r) = r {
            if r.into_inner().version.map_or(0, |v| v.version) >= version {
                return Ok(t0.elapsed());
            }
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "picker never caught up"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
