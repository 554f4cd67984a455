//! Active health check benchmark: detection time and probe capacity.
//!
//! ```text
//! cargo run --release --example health_bench -- [--sessions 100] [--runs 5] [--capacity 10000] [--max-in-flight 4096]
//! ```
//!
//! **Detection.** One `dlbd` (its own tokio runtime) checks 10 HTTP backends (HTTP/1.1 check,
//! interval 100 ms, timeout 100 ms, rise 2, fall 2); `--sessions` SDK clients, each with its own
//! connection and Discovery session, follow the service. A backend is killed (its listener and
//! every open connection closed); the time reported is from the kill to the moment the *last*
//! session's local snapshot marks it ineligible (each session is watched by its own task on the
//! handle's version watch). Target: ≤ interval × fall + timeout + 50 ms = 350 ms. Repeated
//! `--runs` times with a different victim each time, the killed backend restarted in between.
//!
//! **Capacity.** The same `dlbd` checks `--capacity` backends (TCP and HTTP runs, 1 s interval,
//! 1 s timeout); the backends are 200 listeners on loopback (several backend ids per listener,
//! so the 4-tuples of a connection per probe do not exhaust the ephemeral ports), served by a
//! separate runtime; the checker's bound on probes in flight is `--max-in-flight`. Over a 10 s window after a warm-up it reports the probes per second, the
//! probes that failed or could not run (`unknown`: the bound on probes in flight was reached),
//! and the CPU the `dlbd` runtime's threads used (from `/proc/self/task/*/stat`), per probe.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dlb::proto;
use dlb_client::Client;
use dlb_server::{ServerConfig, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

struct Args {
    sessions: usize,
    runs: usize,
    capacity: usize,
    max_in_flight: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        sessions: 100,
        runs: 5,
        capacity: 10_000,
        max_in_flight: 4096,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || -> anyhow::Result<usize> {
            Ok(it
                .next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))?
                .parse()?)
        };
        match a.as_str() {
            "--sessions" => args.sessions = val()?,
            "--runs" => args.runs = val()?,
            "--capacity" => args.capacity = val()?,
            "--max-in-flight" => args.max_in_flight = val()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

/// A minimal HTTP/1.1 backend: answers `200 ok` to every request and closes. Returns its task;
/// aborting it closes the listener and every open connection.
fn http_backend(listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                r = listener.accept() => {
                    let Ok((mut s, _)) = r else { continue };
                    conns.spawn(async move {
                        let mut buf = [0u8; 1024];
                        // Read until the end of the request head (or give up).
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                            .await;
                    });
                }
                Some(_) = conns.join_next() => {}
            }
        }
    })
}

fn check(kind: proto::health_check::Kind, interval_ms: u32, timeout_ms: u32) -> proto::HealthCheck {
    proto::HealthCheck {
        kind: Some(kind),
        interval_ms,
        timeout_ms,
        healthy_threshold: 2,
        unhealthy_threshold: 2,
        ..Default::default()
    }
}

fn http() -> proto::health_check::Kind {
    proto::health_check::Kind::Http(proto::HttpHealthCheck::default())
}

fn config(services: Vec<ServiceConfig>, max_in_flight: usize) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        services,
        health_max_in_flight: max_in_flight,
        ..ServerConfig::default()
    }
}

/// User + system CPU of the threads named `name`, seconds.
fn thread_cpu(name: &str) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0u64;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() != name {
                continue;
            }
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // Fields after the parenthesised comm: state is field 3; utime 14, stime 15.
            if let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) {
                let f: Vec<&str> = rest.split(' ').collect();
                let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
                let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
                total += ut + st;
            }
        }
    }
    total as f64 / tick
}

async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

fn sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `f` on a dedicated multi-thread runtime whose threads are named `dlbd-rt`.
fn dlbd_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dlbd-rt")
        .enable_all()
        .build()
        .unwrap()
}

async fn detection(args: &Args, dlbd: &tokio::runtime::Handle) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    let mut tasks = Vec::new();
    let mut svc = ServiceConfig::empty("bench");
    for i in 0..10 {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        listeners.push(addr);
        tasks.push(http_backend(l));
        svc.backends.push(proto::Server {
            server_id: format!("b{i}"),
            address: addr.to_string(),
            weight: 1,
            ..Default::default()
        });
    }
    svc.policy.health_check = Some(check(http(), 100, 100));
    let cfg = config(vec![svc], 1024);
    let server = dlbd.spawn(dlb_server::spawn(cfg)).await??;
    let endpoint = format!("http://{}", server.grpc_addr());
    let mut handles = Vec::new();
    for _ in 0..args.sessions {
        let c = Client::connect([endpoint.clone()]).await?;
        let h = c.service("bench").await?;
        handles.push((c, h));
    }
    let eligible = |h: &dlb_client::ServiceHandle, id: &str| {
        h.backends().iter().any(|b| b.server_id == id && b.eligible)
    };
    let mut times = Vec::new();
    for run in 0..args.runs {
        let victim = run % 10;
        let id = format!("b{victim}");
        // Wait until every session has the victim eligible and probed healthy.
        let t = Instant::now();
        while !handles.iter().all(|(_, h)| eligible(h, &id))
            || server
                .health()
                .inspect("bench", &id)
                .await
                .is_none_or(|v| v.published != proto::Verdict::Healthy)
        {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "victim never healthy"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut watchers = Vec::new();
        for (_, h) in &handles {
            let h = h.clone();
            let id = id.clone();
            let mut rx = h.changed();
            watchers.push(tokio::spawn(async move {
                loop {
                    if !h.backends().iter().any(|b| b.server_id == id && b.eligible) {
                        return Instant::now();
                    }
                    if rx.changed().await.is_err() {
                        return Instant::now();
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..100))).await;
        let killed = Instant::now();
        tasks[victim].abort();
        let mut last = killed;
        for w in watchers {
            last = last.max(w.await?);
        }
        let ms = last.duration_since(killed).as_secs_f64() * 1e3;
        println!(
            "detection run {run}: {ms:.1} ms (last of {} sessions)",
            args.sessions
        );
        times.push(ms);
        // Restart the victim on the same port.
        let l = loop {
            match TcpListener::bind(listeners[victim]).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        tasks[victim] = http_backend(l);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "detection: median {:.1} ms, max {:.1} ms over {} runs; target <= 100 x 2 + 100 + 50 = 350 ms",
        times[times.len() / 2],
        times[times.len() - 1],
        times.len()
    );
    for (c, _) in &handles {
        c.close();
    }
    dlbd.spawn(server.shutdown()).await??;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

async fn capacity(
    n: usize,
    max_in_flight: usize,
    kind: proto::health_check::Kind,
    name: &str,
    dlbd: &tokio::runtime::Handle,
) -> anyhow::Result<()> {
    const LISTENERS: usize = 200;
    let mut tasks = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..LISTENERS {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(l.local_addr()?);
        tasks.push(http_backend(l));
    }
    let mut svc = ServiceConfig::empty("cap");
    for i in 0..n {
        svc.backends.push(proto::Server {
            server_id: format!("b{i}"),
            address: addrs[i % LISTENERS].to_string(),
            weight: 1,
            ..Default::default()
        });
    }
    svc.policy.health_check = Some(check(kind, 1_000, 1_000));
    let server = dlbd
        .spawn(dlb_server::spawn(config(vec![svc], max_in_flight)))
        .await??;
    let metrics = server.metrics_addr().unwrap();
    // Warm up: two intervals.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m0 = scrape(metrics).await;
    let cpu0 = thread_cpu("dlbd-rt");
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let m1 = scrape(metrics).await;
    let cpu1 = thread_cpu("dlbd-rt");
    let secs = t0.elapsed().as_secs_f64();
    let d = |p: &str| sum(&m1, p) - sum(&m0, p);
    let by = |result: &str| {
        let f = |m: &str| {
            m.lines()
                .filter(|l| {
                    l.starts_with("dlb_health_probes_total")
                        && l.contains(&format!("result=\"{result}\""))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        f(&m1) - f(&m0)
    };
    let (p, f, u) = (by("pass"), by("fail"), by("unknown"));
    let rate = (p + f) / secs;
    let cpu = cpu1 - cpu0;
    let rtt_sum = d("dlb_health_probe_rtt_seconds_sum");
    let rtt_count = d("dlb_health_probe_rtt_seconds_count");
    println!(
        "capacity {name}: {n} backends at 1 s: {rate:.0} probes/s ({p:.0} pass, {f:.0} fail, {u:.0} unknown in {secs:.1} s), \
         dlbd CPU {:.0}% of one core, {:.1} us CPU per probe, mean RTT {:.2} ms",
        cpu / secs * 100.0,
        cpu / (p + f).max(1.0) * 1e6,
        rtt_sum / rtt_count.max(1.0) * 1e3
    );
    dlbd.spawn(server.shutdown()).await??;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let dlbd = dlbd_runtime();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-rt")
        .enable_all()
        .build()?;
    rt.block_on(async {
        detection(&args, dlbd.handle()).await?;
        capacity(
            args.capacity,
            args.max_in_flight,
            proto::health_check::Kind::Tcp(proto::TcpHealthCheck::default()),
            "tcp",
            dlbd.handle(),
        )
        .await?;
        capacity(
            args.capacity,
            args.max_in_flight,
            http(),
            "http",
            dlbd.handle(),
        )
        .await?;
        anyhow::Ok(())
    })?;
    Ok(())
}
