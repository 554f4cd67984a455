//! A runnable demo of health checking end to end, on loopback, in one process (about 20 s):
//!
//! ```text
//! cargo run --example demo_cluster
//! ```
//!
//! * four real HTTP backends (axum: `GET /work` answers after ~2 ms, `GET /healthz` answers
//!   `ok`);
//! * an in-process `dlbd` whose service `web` has an HTTP active health check (`/healthz`,
//!   every 200 ms, rise 2, fall 2) and outlier detection (3 failures in a row, ejected 3 s);
//! * three SDK clients, each sending real HTTP requests (`GET /work`, one connection per request)
//!   to the backend its local picker chose, and reporting each outcome through the `CallGuard`
//!   (`success()` on a 200, `failure()` otherwise).
//!
//! At 4 s backend `b3` is killed (its listener closed); at 11 s it is restarted on the same
//! port. Every second the demo prints the share of requests each backend served, the request
//! rate and the failures; whenever `dlbd`'s view of a backend changes (eligibility or reason,
//! from `ListServers`) it prints an event line. It ends at 17 s and exits 0.
//!
//! What to look for: a few failed requests right after the kill, `b3` ejected by outlier
//! detection and marked `probe: …` by the health check within a few hundred milliseconds, its
//! share at 0 %, and after the restart the probe passing twice and `b3` back at its 25 %.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlb::proto;
use dlb_client::{Client, ServiceHandle};
use dlb_server::{ServerConfig, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SERVICE: &str = "web";
const BACKENDS: usize = 4;
const SDKS: usize = 3;
/// Concurrent request loops per SDK.
const LOOPS: usize = 2;
const KILL_AT: u64 = 4;
const RESTART_AT: u64 = 11;
const END_AT: u64 = 17;
/// The killed backend (index into the backends).
const VICTIM: usize = 2;

/// Starts one HTTP backend on `listener`; aborting the task closes the listener (the demo's
/// client opens one connection per request, so nothing outlives it).
fn backend(listener: TcpListener, name: String) -> JoinHandle<()> {
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/work",
            axum::routing::get(move || {
                let name = name.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    format!("served by {name}")
                }
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

/// One real HTTP/1.1 request: `GET /work` on a new connection, bounded by a 1 s timeout.
/// `Ok(status)`, or `Err` when the connection failed.
async fn get_work(addr: &str) -> std::io::Result<u16> {
    let io = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET /work HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::with_capacity(256);
        s.read_to_end(&mut buf).await?;
        // "HTTP/1.1 200 OK" → 200.
        let status = std::str::from_utf8(&buf)
            .ok()
            .and_then(|t| t.split_whitespace().nth(1))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| std::io::Error::other("malformed response"))?;
        Ok(status)
    };
    tokio::time::timeout(Duration::from_secs(1), io)
        .await
        .map_err(|_| std::io::Error::other("timeout"))?
}

/// Per backend: requests served (200) and failed, since the last table row.
struct Counters {
    ok: Vec<AtomicU64>,
    failed: Vec<AtomicU64>,
}

fn traffic(
    h: ServiceHandle,
    index: Arc<BTreeMap<String, usize>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let Ok(call) = h.get_next_server(None) else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let i = index.get(call.server_id()).copied();
            let addr = call.address().to_owned();
            match get_work(&addr).await {
                Ok(200) => {
                    call.success();
                    if let Some(i) = i {
                        counters.ok[i].fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {
                    call.failure();
                    if let Some(i) = i {
                        counters.failed[i].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

fn service(addrs: &[SocketAddr]) -> ServiceConfig {
    let mut svc = ServiceConfig::empty(SERVICE);
    for (i, a) in addrs.iter().enumerate() {
        svc.backends.push(proto::Server {
            server_id: format!("b{}", i + 1),
            address: a.to_string(),
            weight: 1,
            ..Default::default()
        });
    }
    svc.policy.health_check = Some(proto::HealthCheck {
        kind: Some(proto::health_check::Kind::Http(proto::HttpHealthCheck {
            path: "/healthz".into(),
            ..Default::default()
        })),
        interval_ms: 200,
        timeout_ms: 200,
        healthy_threshold: 2,
        unhealthy_threshold: 2,
        ..Default::default()
    });
    svc.policy.outlier_detection = Some(proto::OutlierDetection {
        consecutive_failures: 3,
        base_ejection_ms: 3_000,
        max_ejection_percent: 50,
        ..Default::default()
    });
    svc
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Backends.
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..BACKENDS {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(l.local_addr()?);
        tasks.push(backend(l, format!("b{}", i + 1)));
    }
    // The control plane.
    let server = dlb_server::spawn(ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        services: vec![service(&addrs)],
        ..ServerConfig::default()
    })
    .await?;
    let endpoint = format!("http://{}", server.grpc_addr());
    println!("dlbd on {endpoint}; service {SERVICE}: HTTP check /healthz every 200 ms (rise 2, fall 2), outlier ejection after 3 failures in a row");
    for (i, a) in addrs.iter().enumerate() {
        println!("  b{} http://{a}", i + 1);
    }

    // SDK clients and their traffic.
    let index: Arc<BTreeMap<String, usize>> =
        Arc::new((0..BACKENDS).map(|i| (format!("b{}", i + 1), i)).collect());
    let counters = Arc::new(Counters {
        ok: (0..BACKENDS).map(|_| AtomicU64::new(0)).collect(),
        failed: (0..BACKENDS).map(|_| AtomicU64::new(0)).collect(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    let mut loops = Vec::new();
    for _ in 0..SDKS {
        let c = Client::builder([endpoint.as_str()])
            .report_interval(Duration::from_millis(100))
            .connect()
            .await?;
        let h = c.service(SERVICE).await?;
        for _ in 0..LOOPS {
            loops.push(traffic(
                h.clone(),
                index.clone(),
                counters.clone(),
                stop.clone(),
            ));
        }
        clients.push(c);
    }
    println!("{SDKS} SDK clients x {LOOPS} request loops: GET /work on the picked backend, outcome reported through the CallGuard\n");
    let names: Vec<String> = (1..=BACKENDS).map(|i| format!("b{i}")).collect();
    println!(
        "  time | {} | req/s | failed",
        names
            .iter()
            .map(|n| format!("{n:>5}"))
            .collect::<Vec<_>>()
            .join(" ")
    );

    let start = Instant::now();
    let admin = clients[0].admin().clone();
    let mut seen: BTreeMap<String, (bool, String)> = BTreeMap::new();
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let mut next_row = 1u64;
    let (mut killed, mut restarted) = (false, false);
    let stamp = |start: Instant| format!("{:5.1}s", start.elapsed().as_secs_f64());
    loop {
        poll.tick().await;
        let t = start.elapsed();
        if !killed && t >= Duration::from_secs(KILL_AT) {
            killed = true;
            tasks[VICTIM].abort();
            println!(
                "{} ! b{} killed (listener closed)",
                stamp(start),
                VICTIM + 1
            );
        }
        if !restarted && t >= Duration::from_secs(RESTART_AT) {
            restarted = true;
            let l = loop {
                match TcpListener::bind(addrs[VICTIM]).await {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            tasks[VICTIM] = backend(l, format!("b{}", VICTIM + 1));
            println!(
                "{} ! b{} restarted on {}",
                stamp(start),
                VICTIM + 1,
                addrs[VICTIM]
            );
        }
        // Events: dlbd's view of each backend (eligibility, reason).
        if let Ok(list) = admin.list_servers(SERVICE).await {
            for s in list.servers {
                let now = (dlb::model::is_eligible(&s), s.reason.clone());
                if seen.get(&s.server_id) != Some(&now) {
                    if seen.contains_key(&s.server_id) {
                        let what = if now.0 { "eligible" } else { "NOT eligible" };
                        let why = if now.1.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", now.1)
                        };
                        println!("{} ! dlbd: {} {what}{why}", stamp(start), s.server_id);
                    }
                    seen.insert(s.server_id.clone(), now);
                }
            }
        }
        // One table row per second.
        if t >= Duration::from_secs(next_row) {
            next_row += 1;
            let ok: Vec<u64> = counters
                .ok
                .iter()
                .map(|c| c.swap(0, Ordering::Relaxed))
                .collect();
            let failed: u64 = counters
                .failed
                .iter()
                .map(|c| c.swap(0, Ordering::Relaxed))
                .sum();
            let total: u64 = ok.iter().sum::<u64>() + failed;
            let cells = ok
                .iter()
                .map(|n| format!("{:>4}%", (n * 100).checked_div(total).unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(" ");
            println!("{:>5}s | {cells} | {total:>5} | {failed:>6}", next_row - 1);
        }
        if t >= Duration::from_secs(END_AT) {
            break;
        }
    }

    stop.store(true, Ordering::Relaxed);
    for l in loops {
        let _ = l.await;
    }
    let stats = clients[0].service(SERVICE).await?.stats();
    println!(
        "\ndone: b{} was detected, taken out of rotation and brought back; SDK 1 rebuilt its picker {} times",
        VICTIM + 1,
        stats.rebuilds
    );
    for c in &clients {
        c.close();
    }
    server.shutdown().await?;
    for t in tasks {
        t.abort();
    }
    Ok(())
}
