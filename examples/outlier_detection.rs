//! Passive detection benchmark: from a backend starting to fail to the last of N SDK sessions
//! no longer picking it.
//!
//! ```text
//! cargo run --release --example outlier_detection -- [--sdks 100] [--rate 100] [--report-ms 1000] [--trials 5]
//! ```
//!
//! One in-process `dlbd` with one service of 10 backends (round robin, outlier detection: 5
//! consecutive failures, max ejection 50 %, base ejection 10 minutes so nothing returns during
//! the run), and N SDK clients (each with its own connection and Discovery session, load
//! reports every `--report-ms`, the SDK default is 1,000 ms). Every SDK sends `--rate` calls per
//! second (picks from its own snapshot; a call to the failing backend fails, every other call
//! succeeds). In trial k backend `b0k` starts failing at T0; for each SDK a watcher task records
//! the moment its published snapshot no longer has the backend eligible (after that the SDK
//! cannot pick it). Detection time = that moment for the last SDK − T0. Also printed: the last
//! call any SDK actually sent to the failing backend (quantised by the call rate: with 10
//! backends each SDK calls it every 10 / rate seconds). Bounded: exits by itself.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlb_client::{AdminClient, Client, NewServer, ServiceHandle};

const SERVICE: &str = "bench";
const BACKENDS: usize = 10;

struct Args {
    sdks: usize,
    rate: u64,
    report: Duration,
    trials: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        sdks: 100,
        rate: 100,
        report: Duration::from_millis(1000),
        trials: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--sdks" => args.sdks = value()?.parse()?,
            "--rate" => args.rate = value()?.parse()?,
            "--report-ms" => args.report = Duration::from_millis(value()?.parse()?),
            "--trials" => args.trials = value()?.parse()?,
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: [--sdks N] [--rate R] [--report-ms T] [--trials K]"
            ),
        }
    }
    anyhow::ensure!(
        args.sdks > 0 && args.rate > 0,
        "--sdks and --rate must be > 0"
    );
    anyhow::ensure!((1..=5).contains(&args.trials), "--trials must be 1..=5");
    Ok(args)
}

/// Whether `id` is eligible in the handle's published snapshot.
fn eligible(h: &ServiceHandle, id: &str) -> bool {
    h.backends().iter().any(|b| b.server_id == id && b.eligible)
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
                NewServer::new(format!("b{i:02}"), format!("10.0.0.{}:80", i + 1)),
            )
            .await?;
    }
    let mut policy = admin.get_policy(SERVICE).await?.policy.unwrap_or_default();
    policy.outlier_detection = Some(dlb::proto::OutlierDetection {
        consecutive_failures: 5,
        max_ejection_percent: 50,
        base_ejection_ms: 600_000,
        max_ejection_ms: 600_000,
        ..Default::default()
    });
    admin.set_policy(SERVICE, policy).await?;

    let mut clients = Vec::with_capacity(args.sdks);
    let mut handles = Vec::with_capacity(args.sdks);
    for _ in 0..args.sdks {
        let c = Client::builder([endpoint.as_str()])
            .report_interval(args.report)
            .connect()
            .await?;
        handles.push(c.service(SERVICE).await?);
        clients.push(c);
    }
    // The failing backend's id (empty: none yet) and T0, shared with the traffic tasks.
    let failing = Arc::new(std::sync::RwLock::new(String::new()));
    let epoch = Instant::now();
    let last_bad_call_us = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut traffic = Vec::new();
    for h in &handles {
        let (h, failing, last, stop) = (
            h.clone(),
            failing.clone(),
            last_bad_call_us.clone(),
            stop.clone(),
        );
        let period = Duration::from_micros(1_000_000 / args.rate);
        traffic.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if let Ok(call) = h.get_next_server(None) {
                    let bad = *failing.read().unwrap() == call.server_id();
                    if bad {
                        let at = epoch.elapsed().as_micros() as u64;
                        last.fetch_max(at, Ordering::Relaxed);
                        call.failure();
                    } else {
                        call.success();
                    }
                }
            }
        }));
    }
    tokio::time::sleep(args.report * 2).await;
    println!(
        "{} SDKs, {} calls/s each, load reports every {:?}, 10 backends, 5 consecutive failures eject",
        args.sdks, args.rate, args.report
    );
    let mut results = Vec::new();
    for trial in 0..args.trials {
        let id = format!("b{trial:02}");
        // One watcher per SDK: when does its snapshot stop routing to `id`?
        let mut watchers = Vec::new();
        for h in &handles {
            let h = h.clone();
            let id = id.clone();
            watchers.push(tokio::spawn(async move {
                let mut rx = h.changed();
                while eligible(&h, &id) {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
                Instant::now()
            }));
        }
        last_bad_call_us.store(0, Ordering::Relaxed);
        let t0 = Instant::now();
        *failing.write().unwrap() = id.clone();
        let mut last = t0;
        for w in watchers {
            let at = tokio::time::timeout(Duration::from_secs(30), w).await??;
            last = last.max(at);
        }
        let detection = last - t0;
        // Let stragglers finish, then read the last failing call.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let last_call = Duration::from_micros(last_bad_call_us.load(Ordering::Relaxed))
            .saturating_sub(t0 - epoch);
        println!(
            "trial {trial}: {id} fails at T0; last SDK stops routing to it at T0 + {:.1} ms; last call sent to it at T0 + {:.1} ms",
            detection.as_secs_f64() * 1e3,
            last_call.as_secs_f64() * 1e3
        );
        results.push(detection);
        *failing.write().unwrap() = String::new();
    }
    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        let _ = t.await;
    }
    results.sort();
    println!(
        "detection time over {} trials: min {:.1} ms, median {:.1} ms, max {:.1} ms (target <= 1000 ms)",
        results.len(),
        results[0].as_secs_f64() * 1e3,
        results[results.len() / 2].as_secs_f64() * 1e3,
        results[results.len() - 1].as_secs_f64() * 1e3
    );
    for c in &clients {
        c.close();
    }
    server.shutdown().await?;
    Ok(())
}
