//! What one open status page costs `dlbd`: CPU of the process while a service changes
//! `rate` times a second (a backend's health flips), first without and then with `pages` open
//! event streams (`/api/events?service=…`, what an open page follows), `seconds` each. Prints
//! the CPU share of one core in each phase, the difference per page, and the events and bytes
//! the pages received.
//!
//! The writer (a gRPC client in this process) and the stream readers run in the process too:
//! both phases pay the writer, so the difference is the pages' cost (their readers' included,
//! an overstatement).
//!
//! ```text
//! cargo run --release -p dlb-server --example status_page_cost -- [backends] [rate] [seconds] [pages]
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlb::proto::{self, registry_client::RegistryClient};
use dlb_server::store::Mutation;
use dlb_server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// CPU time of this process (user + system), from `/proc/self/stat` (clock ticks of 10 ms).
fn cpu() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow::anyhow!("/proc/self/stat: no ')'"))?
        .1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

async fn changes(
    c: &mut RegistryClient<tonic::transport::Channel>,
    backends: usize,
    rate: u32,
    seconds: u64,
) -> anyhow::Result<u64> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut n = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        let req = proto::HealthCheckRequest {
            service: "s".into(),
            server_id: format!("b{}", (n / 2) as usize % backends),
        };
        if n.is_multiple_of(2) {
            c.health_check_failed(req).await?;
        } else {
            c.health_check_passed(req).await?;
        }
        n += 1;
    }
    Ok(n)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let backends: usize = args.next().map_or(Ok(100), |a| a.parse())?;
    let rate: u32 = args.next().map_or(Ok(10), |a| a.parse())?;
    let seconds: u64 = args.next().map_or(Ok(30), |a| a.parse())?;
    let pages: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let server = dlb_server::spawn(ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: Some("127.0.0.1:0".parse()?),
        ..Default::default()
    })
    .await?;
    let maddr = server
        .metrics_addr()
        .ok_or_else(|| anyhow::anyhow!("no metrics listener"))?;
    let mutations = (0..backends)
        .map(|i| {
            Mutation::Add(proto::Server {
                server_id: format!("b{i}"),
                address: format!("10.0.{}.{}:80", i / 256, i % 256),
                weight: 1,
                ..Default::default()
            })
        })
        .collect();
    server.store().apply("s".into(), mutations, None).await?;
    let mut c = RegistryClient::connect(format!("http://{}", server.grpc_addr())).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (c0, t0) = (cpu()?, Instant::now());
    let n = changes(&mut c, backends, rate, seconds).await?;
    let base = (cpu()? - c0).as_secs_f64() / t0.elapsed().as_secs_f64();
    println!(
        "no page:   {n} changes in {seconds} s, CPU {:.2} % of a core",
        base * 100.0
    );

    let (events, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut readers = Vec::new();
    for _ in 0..pages {
        let mut conn = tokio::net::TcpStream::connect(maddr).await?;
        conn.write_all(b"GET /api/events?service=s HTTP/1.1\r\nHost: bench\r\n\r\n")
            .await?;
        let (events, bytes) = (events.clone(), bytes.clone());
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(k) = conn.read(&mut buf).await {
                if k == 0 {
                    break;
                }
                bytes.fetch_add(k as u64, Ordering::Relaxed);
                let text = String::from_utf8_lossy(&buf[..k]);
                events.fetch_add(text.matches("event: ").count() as u64, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (e0, b0) = (
        events.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed),
    );
    let (c0, t0) = (cpu()?, Instant::now());
    let n = changes(&mut c, backends, rate, seconds).await?;
    let with = (cpu()? - c0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let (e, b) = (
        events.load(Ordering::Relaxed) - e0,
        bytes.load(Ordering::Relaxed) - b0,
    );
    println!(
        "{pages} page(s): {n} changes in {seconds} s, CPU {:.2} % of a core",
        with * 100.0
    );
    println!(
        "per open page: {:.2} % of a core; {} events ({:.1}/s), {:.0} bytes per event",
        (with - base) * 100.0 / pages as f64,
        e / pages as u64,
        e as f64 / pages as f64 / seconds as f64,
        b as f64 / e.max(1) as f64
    );
    for r in readers {
        r.abort();
    }
    server.shutdown().await?;
    Ok(())
}
