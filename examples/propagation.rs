//! Propagation benchmark: how long after a write does *every* SDK route on it?
//!
//! ```text
//! cargo run --release --example propagation -- --sessions 1000 --changes 200 [--interval-ms 5]
//! ```
//!
//! One in-process `dlbd`, N SDK clients (each with its own connection and Discovery session),
//! all subscribed to one service of 10 backends (smooth weighted round robin). A steady stream of
//! M changes (the weight of one backend, cycling through 1..=`--max-weight`, default 10; spaced
//! `--interval-ms` apart, default 5) goes through the Registry API. For each change the
//! latency is the time from the RPC's return to the moment the last of the N sessions has applied
//! it (observed through each handle's version watch by a task that waits on every handle in turn,
//! so it includes that task's wake-up). Reports p50/p99/max and the process RSS (`VmRSS`/`VmHWM` from
//! `/proc/self/status`) — dlbd and all SDKs share this process. Bounded: exits by itself.
#![allow(clippy::unwrap_used)]

#[path = "support/sessions.rs"]
mod sessions;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dlb_client::{AdminClient, NewServer, ServerUpdate, Version};

const SERVICE: &str = "bench";
const BACKENDS: usize = 10;

struct Args {
    sessions: usize,
    changes: usize,
    interval: Duration,
    max_weight: u32,
    dump: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        sessions: 1000,
        changes: 200,
        interval: Duration::from_millis(5),
        max_weight: 10,
        dump: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--sessions" => args.sessions = value()?.parse()?,
            "--changes" => args.changes = value()?.parse()?,
            "--interval-ms" => args.interval = Duration::from_millis(value()?.parse()?),
            "--max-weight" => args.max_weight = value()?.parse()?,
            "--dump" => args.dump = true,
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: --sessions N --changes M [--interval-ms T] [--max-weight W] [--dump]"
            ),
        }
    }
    anyhow::ensure!(args.sessions > 0 && args.changes > 0, "N and M must be > 0");
    anyhow::ensure!(
        (2..=10_000).contains(&args.max_weight),
        "--max-weight must be in 2..=10000"
    );
    Ok(args)
}

fn proc_status(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .map(|l| l[field.len()..].trim().to_owned())
        })
        .unwrap_or_else(|| "n/a".into())
}

/// User + system CPU time of this process so far (from `/proc/self/stat`, in clock ticks of
/// 10 ms on Linux).
fn cpu_time() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which is in parentheses and may contain spaces).
            let rest = s.rsplit_once(')')?.1.to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let server = dlb_server::spawn(dlb_server::ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        ..Default::default()
    })
    .await?;
    let endpoint = format!("http://{}", server.grpc_addr());
    let admin = AdminClient::new([endpoint.as_str()])?;
    for i in 0..BACKENDS {
        admin
            .add_server(
                SERVICE,
                NewServer::new(format!("b{i}"), format!("10.0.0.{}:80", i + 1)),
            )
            .await?;
    }

    // N clients, each with its own connection and session, connected 50 at a time.
    let started = Instant::now();
    let (clients, handles) = sessions::connect(&endpoint, SERVICE, args.sessions).await?;
    println!(
        "{} sessions connected and subscribed in {:.2?}",
        handles.len(),
        started.elapsed()
    );

    let base = handles[0].version();
    anyhow::ensure!(
        handles.iter().all(|h| h.version() == base),
        "sessions disagree on the starting version"
    );
    let handles = Arc::new(handles);

    // The stream of changes. After each RPC returns, one checker task walks every handle and
    // waits (through the handle's version watch) until it routes on that version: when the walk
    // ends, every session has applied the change. A handle already there costs no wake-up, so
    // the measurement adds one task per change instead of one per session.
    let cpu_before = cpu_time();
    let wall_before = Instant::now();
    let mut checkers = tokio::task::JoinSet::new();
    let mut last = Version::default();
    for i in 0..args.changes {
        // Backend i % 10 gets its k-th new weight: 2, 3, …, W, 1, 2, … (never a no-op).
        let k = (i / BACKENDS) as u32;
        let mut update = ServerUpdate::new(format!("b{}", i % BACKENDS));
        update.weight = Some(1 + (k + 1) % args.max_weight);
        let r = admin.update_server(SERVICE, update).await?;
        let returned = Instant::now();
        last = r.version.unwrap_or_default().into();
        anyhow::ensure!(
            last.version == base.version + i as u64 + 1,
            "unexpected version {last} after change {i}"
        );
        let handles = handles.clone();
        checkers.spawn(async move {
            for h in handles.iter() {
                h.wait_for_version(last).await?;
            }
            Ok::<_, dlb_client::Error>((i, returned.elapsed()))
        });
        tokio::time::sleep(args.interval).await;
    }
    let mut latencies = vec![Duration::ZERO; args.changes];
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = checkers.join_next().await {
            let (i, latency) = r??;
            latencies[i] = latency;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    anyhow::ensure!(
        matches!(waited, Ok(Ok(()))),
        "not every session reached the last version {last} within 60 s: {waited:?}"
    );

    let cpu = cpu_time().saturating_sub(cpu_before);
    let wall = wall_before.elapsed();
    if args.dump {
        let series: Vec<_> = latencies.iter().map(|d| d.as_micros()).collect();
        println!("per-change latency, µs, in order: {series:?}");
    }
    latencies.sort();
    let full: u64 = handles.iter().map(|h| h.stats().full_updates).sum();
    let deltas: u64 = handles.iter().map(|h| h.stats().delta_updates).sum();
    let nacks: u64 = handles.iter().map(|h| h.stats().nacks).sum();
    println!(
        "propagation to ALL {} sessions, {} changes every {:?}: p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        args.sessions,
        args.changes,
        args.interval,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies[latencies.len() - 1],
    );
    println!("updates applied: {full} full, {deltas} deltas, {nacks} nacks");
    println!(
        "CPU during the change phase: {cpu:.2?} over {wall:.2?} wall ({:.1} µs per session-update, \
         dlbd + SDKs + checkers; the machine has {} cores)",
        cpu.as_secs_f64() * 1e6 / (args.sessions * args.changes) as f64,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "process RSS (dlbd + {} SDK clients in one process): VmRSS {}, VmHWM {}",
        args.sessions,
        proc_status("VmRSS:"),
        proc_status("VmHWM:")
    );

    for c in &clients {
        c.close();
    }
    drop(handles);
    drop(clients);
    server.shutdown().await?;
    Ok(())
}
