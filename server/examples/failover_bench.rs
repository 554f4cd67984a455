//! Replica failover, propagation and write throughput through etcd (feature `etcd`), with real
//! processes: one etcd, three `dlbd --store etcd` replicas, SDK clients.
//!
//! ```text
//! cargo build --release -p dlb-server --features etcd --bin dlbd --example failover_bench
//! target/release/examples/failover_bench [KILLS] [CLIENTS] [SESSIONS] [WRITES]
//! ```
//!
//! 1. **Failover** (`KILLS`, default 20; `CLIENTS` SDKs, default 20, picking every millisecond,
//!    a write every 10 ms): each round `kill -9`s the replica that serves the most clients,
//!    measures for each of its clients the time from the kill to the client applying an update
//!    from another replica, counts failed picks, and restarts the victim.
//! 2. **Propagation** (`SESSIONS` SDKs, default 300, spread over the 3 replicas; `WRITES`
//!    writes, default 100, one at a time through replica 0): from the write's return to each
//!    SDK routing on it.
//! 3. **Write throughput** through etcd: sequential `AddServer` latency, and writes/s with 32
//!    in flight.
//!
//! `$ETCD_BIN` names etcd (default `etcd` on the PATH), `$DLBD_BIN` the dlbd binary (default
//! the one beside this example's directory).

#[path = "../tests/etcd_support/mod.rs"]
mod etcd_support;
#[path = "../tests/ha_support/mod.rs"]
mod ha_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlb_client::{AdminClient, NewServer};
use ha_support::*;

const SERVICE: &str = "web";

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let kills = arg(1, 20);
    let clients = arg(2, 20);
    let sessions = arg(3, 300);
    let writes = arg(4, 100);
    let etcd = etcd_support::Etcd::start().await;
    let mut replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&etcd.endpoint(), "127.0.0.1:0"))
        .collect();
    let urls: Vec<String> = replicas.iter().map(Replica::url).collect();
    seed(&urls[0], SERVICE, 5).await;

    // 1. Failover.
    let mut fleet = Fleet::start(clients, &urls, SERVICE, Duration::from_millis(1)).await;
    let mut writer = Writer::start(&urls, SERVICE, Duration::from_millis(10), 5);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut all = Vec::new();
    let mut worst = Vec::new();
    for round in 0..kills {
        let victim = (0..replicas.len())
            .max_by_key(|&r| fleet.on(&replicas[r].url()).len())
            .unwrap_or(0);
        let times = kill_and_measure(&fleet, &mut replicas[victim], Duration::from_secs(30)).await;
        let max = quantile(&times, 1.0);
        println!(
            "kill {round:>2}: replica {victim}, {:>2} clients, failover p50 {}, max {}",
            times.len(),
            ms(quantile(&times, 0.5)),
            ms(max)
        );
        all.extend(times);
        worst.push(max);
        replicas[victim].restart();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    writer.stop().await;
    fleet.stop().await;
    println!(
        "failover over {kills} kills ({} client failovers): p50 {}, p99 {}, max {}; per kill (last client) p50 {}, p99 {}; picks {}, failed {}",
        all.len(),
        ms(quantile(&all, 0.5)),
        ms(quantile(&all, 0.99)),
        ms(quantile(&all, 1.0)),
        ms(quantile(&worst, 0.5)),
        ms(quantile(&worst, 0.99)),
        fleet.picks.load(Ordering::Relaxed),
        fleet.failed.load(Ordering::Relaxed),
    );
    drop(fleet);

    // 2. Propagation to `sessions` SDKs over the three replicas.
    let mut many = Fleet::start(sessions, &urls, SERVICE, Duration::from_secs(3600)).await;
    let admin = AdminClient::new([urls[0].clone()])?;
    let mut lat = Vec::with_capacity(writes * sessions);
    let mut last = Vec::with_capacity(writes);
    for i in 0..writes {
        let r = admin
            .add_server(
                SERVICE,
                NewServer::new(format!("prop-{i}"), format!("127.0.0.1:{}", 30_000 + i)),
            )
            .await?;
        let done = Instant::now();
        let target: dlb_client::Version = r.version.unwrap_or_default().into();
        let waits = many.clients.iter().map(|(_, h)| {
            let h = h.clone();
            async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), h.wait_for_version(target)).await;
                done.elapsed()
            }
        });
        let got = futures::future::join_all(waits).await;
        last.push(got.iter().copied().max().unwrap_or_default());
        lat.extend(got);
    }
    many.stop().await;
    println!(
        "propagation through etcd, {sessions} SDK sessions on 3 replicas, {writes} writes: p50 {}, p99 {}, max {}; last session per write p50 {}, p99 {}",
        ms(quantile(&lat, 0.5)),
        ms(quantile(&lat, 0.99)),
        ms(quantile(&lat, 1.0)),
        ms(quantile(&last, 0.5)),
        ms(quantile(&last, 0.99)),
    );
    drop(many);

    // 3. Write throughput.
    let mut seq = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        admin
            .add_server(
                "tput",
                NewServer::new(format!("s-{i}"), format!("127.0.0.1:{}", 40_000 + i)),
            )
            .await?;
        seq.push(t.elapsed());
    }
    let admin = Arc::new(admin);
    let started = Instant::now();
    let total = 2_000usize;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers = (0..32).map(|_| {
        let (admin, next) = (admin.clone(), next.clone());
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                // One service per worker slot: concurrent writes to one service would retry
                // their compare-and-set; spread over 32 services they do not contend.
                let svc = format!("tput-{}", i % 32);
                let _ = admin
                    .add_server(
                        &svc,
                        NewServer::new(format!("c-{i}"), format!("127.0.0.1:{}", 1_000 + i)),
                    )
                    .await;
            }
        })
    });
    for w in futures::future::join_all(workers).await {
        w?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "writes through etcd: sequential AddServer p50 {}, p99 {}; 32 in flight over 32 services: {:.0} writes/s",
        ms(quantile(&seq, 0.5)),
        ms(quantile(&seq, 0.99)),
        total as f64 / secs
    );
    Ok(())
}
