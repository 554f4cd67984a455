//! Leases at scale: `leases` backends register with a lease over gRPC, renew it `rounds` times
//! (concurrently, `concurrency` calls in flight), then stop. Prints the Register latency of
//! creations and of renewals, how many store revisions the renewals cost (none expected), and
//! how long after the last deadline the last expired backend was gone.
//!
//! ```text
//! cargo run --release -p dlb-server --example lease_bench -- [leases] [rounds] [concurrency] [store: memory|embedded]
//! ```

use std::time::{Duration, Instant};

use dlb::proto::{self, membership_client::MembershipClient};
use dlb_server::{ServerConfig, StoreConfig};
use futures::stream::{self, StreamExt};
use tonic::transport::Channel;

const TTL: u32 = 3;

fn request(i: usize) -> proto::RegisterRequest {
    proto::RegisterRequest {
        service: "bench".into(),
        server_id: format!("b{i}"),
        address: format!("10.{}.{}.{}:80", i / 65_536, (i / 256) % 256, i % 256),
        ttl_seconds: TTL,
        ..Default::default()
    }
}

async fn round(
    c: &MembershipClient<Channel>,
    leases: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Duration>> {
    let results: Vec<anyhow::Result<Duration>> = stream::iter(0..leases)
        .map(|i| {
            let mut c = c.clone();
            async move {
                let t = Instant::now();
                c.register(request(i)).await?;
                Ok(t.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let leases: usize = args.next().map_or(Ok(1_000), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let concurrency: usize = args.next().map_or(Ok(32), |a| a.parse())?;
    let embedded = args.next().is_some_and(|s| s == "embedded");
    let dir = tempfile_dir()?;
    let server = dlb_server::spawn(ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        store: if embedded {
            StoreConfig::Embedded(dir.clone())
        } else {
            StoreConfig::Memory
        },
        ..Default::default()
    })
    .await?;
    let c = MembershipClient::connect(format!("http://{}", server.grpc_addr())).await?;

    let t0 = Instant::now();
    let mut create = round(&c, leases, concurrency).await?;
    let created_in = t0.elapsed();
    let rev_before = server.store().snapshot().await?.revision;
    let mut renew = Vec::new();
    let t1 = Instant::now();
    for _ in 0..rounds {
        renew.extend(round(&c, leases, concurrency).await?);
    }
    let renewed_in = t1.elapsed();
    let last_renewal = Instant::now();
    let rev_after = server.store().snapshot().await?.revision;

    // No more renewals: every lease expires TTL after its last renewal.
    loop {
        let left = server
            .store()
            .get_service("bench".into())
            .await?
            // The service goes with its last lease (docs/discovery.md).
            .map_or(0, |s| s.servers.len());
        if left == 0 {
            break;
        }
        anyhow::ensure!(
            last_renewal.elapsed() < Duration::from_secs(u64::from(TTL) + 60),
            "{left} leases never expired"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let gone_after = last_renewal.elapsed();
    let rev_expired = server.store().snapshot().await?.revision;
    println!(
        "{leases} leases ({} store), {concurrency} in flight: create {:.0}/s (p50 {:?} p99 {:?}); \
         {rounds} renewal rounds {:.0}/s (p50 {:?} p99 {:?}), store revisions during renewals: {}; \
         all expired {:?} after the last renewal (TTL {TTL} s, the last renewal round took \
         {:?}), {} removal writes (the service's own removal included)",
        if embedded { "embedded" } else { "memory" },
        leases as f64 / created_in.as_secs_f64(),
        pct(&mut create, 0.5),
        pct(&mut create, 0.99),
        (leases * rounds) as f64 / renewed_in.as_secs_f64(),
        pct(&mut renew, 0.5),
        pct(&mut renew, 0.99),
        rev_after - rev_before,
        gone_after,
        renewed_in / u32::try_from(rounds.max(1))?,
        rev_expired - rev_after,
    );
    server.shutdown().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A fresh directory for the embedded store.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "dlb-lease-bench-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
