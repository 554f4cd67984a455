//! The call path, measured (issue 16). Bounded runtime; prints a table.
//!
//! ```text
//! cargo bench -p dlb-client --bench call_path            # both parts
//! CALLS=20000 CONCURRENCY=32 DECAY_MS=10000 FAST_MS=1 cargo bench -p dlb-client --bench call_path
//! PART=overhead cargo bench -p dlb-client --bench call_path   # only the overhead part
//! PART=overhead TRANSPORT=dlb valgrind --tool=callgrind target/release/deps/call_path-* --bench
//! #   (TRANSPORT=plain|dlb: only that transport's calls after the warm-up, for instruction counts)
//! ```
//!
//! 1. **Tail latency under one slow backend**: 8 tonic backends on loopback (the gRPC health
//!    service), each answering after FAST_MS (default 1 ms), one 20× slower; a closed loop of
//!    CONCURRENCY callers making CALLS calls in all, through: DLB round robin, DLB least connections (P2C), DLB
//!    Peak-EWMA, tonic `Channel::balance_list`, tower `p2c::Balance` over `PeakEwmaDiscover`
//!    (both Peak-EWMAs with decay DECAY_MS, default 10 s). Each backend counts the calls it
//!    answers, so every row also shows the share the slow backend received.
//! 2. **Overhead**: one backend answering at once; sequential calls through a plain tonic
//!    `Channel` and through the DLB transport, interleaved rounds: p50 and throughput.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlb::proto;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

struct Svc {
    delay: Duration,
    /// Calls this backend answered (the slow backend's share is printed per client).
    served: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl Health for Svc {
    async fn check(
        &self,
        _req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.served.fetch_add(1, Ordering::Relaxed);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(Response::new(HealthCheckResponse { status: 1 }))
    }
    type WatchStream = futures::stream::Empty<Result<HealthCheckResponse, Status>>;
    async fn watch(
        &self,
        _req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

async fn backend(delay: Duration, served: Arc<AtomicU64>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let incoming = tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(HealthServer::new(Svc { delay, served }))
            .serve_with_incoming(incoming)
            .await;
    });
    addr
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Run {
    name: &'static str,
    /// Share of the calls the slow backend answered (filled in by `tail`).
    slow_share: f64,
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// A closed loop of `concurrency` callers, `calls` calls in all, on clones of `client`.
async fn closed_loop<T>(
    name: &'static str,
    client: HealthClient<T>,
    calls: usize,
    concurrency: usize,
) -> Run
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Future: Send,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut c = client.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < calls {
                let t = Instant::now();
                c.check(HealthCheckRequest::default()).await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(calls);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = start.elapsed();
    all.sort();
    Run {
        name,
        slow_share: 0.0,
        p50: pct(&all, 0.5),
        p99: pct(&all, 0.99),
        per_sec: all.len() as f64 / wall.as_secs_f64(),
    }
}

async fn dlbd(
    services: Vec<dlb_server::ServiceConfig>,
) -> (dlb_server::RunningServer, dlb_client::Client) {
    let server = dlb_server::spawn(dlb_server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        services,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = dlb_client::Client::connect([format!("http://{}", server.grpc_addr())])
        .await
        .unwrap();
    (server, client)
}

fn service(
    name: &str,
    addrs: &[SocketAddr],
    algorithm: proto::Algorithm,
) -> dlb_server::ServiceConfig {
    let mut s = dlb_server::ServiceConfig::empty(name);
    s.backends = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| proto::Server {
            server_id: format!("b{i}"),
            address: a.to_string(),
            weight: 1,
            health: proto::HealthStatus::Healthy as i32,
            ..Default::default()
        })
        .collect();
    s.policy.algorithm = algorithm as i32;
    s
}

/// Counts at the backends: all calls, and the slow backend's.
struct Counts {
    all: Vec<Arc<AtomicU64>>,
}

impl Counts {
    fn snapshot(&self) -> (u64, u64) {
        let total = self.all.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        (total, self.all[7].load(Ordering::Relaxed))
    }
}

/// Runs `fut` and fills in the slow backend's share of the calls it made.
async fn counted(counts: &Counts, fut: impl std::future::Future<Output = Run>) -> Run {
    let (t0, s0) = counts.snapshot();
    let mut run = fut.await;
    let (t1, s1) = counts.snapshot();
    run.slow_share = (s1 - s0) as f64 / (t1 - t0).max(1) as f64;
    run
}

async fn tail(calls: usize, concurrency: usize, decay: Duration, fast: Duration) {
    let counts = Counts {
        all: (0..8).map(|_| Arc::new(AtomicU64::new(0))).collect(),
    };
    let mut addrs = Vec::new();
    for (i, served) in counts.all.iter().enumerate() {
        let d = if i == 7 { fast * 20 } else { fast };
        addrs.push(backend(d, served.clone()).await);
    }
    let mut ewma = service("ewma", &addrs, proto::Algorithm::PeakEwma);
    ewma.policy.peak_ewma = Some(proto::PeakEwma {
        decay_ms: u32::try_from(decay.as_millis()).unwrap(),
        default_rtt_us: 30_000,
    });
    let (_server, dlb) = dlbd(vec![
        service("rr", &addrs, proto::Algorithm::RoundRobin),
        service("lc", &addrs, proto::Algorithm::LeastConnP2c),
        ewma,
    ])
    .await;
    for s in ["rr", "lc", "ewma"] {
        dlb.service(s).await.unwrap();
    }
    let endpoints: Vec<Endpoint> = addrs
        .iter()
        .map(|a| Endpoint::from_shared(format!("http://{a}")).unwrap())
        .collect();
    let mut runs = Vec::new();
    // Warm every client (connections, EWMA estimates) with a short loop first.
    let warm = (calls / 10).max(100);
    let c = &counts;
    for round in 0..2 {
        let n = if round == 0 { warm } else { calls };
        let rr = counted(
            c,
            closed_loop(
                "DLB round robin",
                HealthClient::new(dlb.channel("rr").unwrap()),
                n,
                concurrency,
            ),
        )
        .await;
        let lc = counted(
            c,
            closed_loop(
                "DLB least conn (P2C)",
                HealthClient::new(dlb.channel("lc").unwrap()),
                n,
                concurrency,
            ),
        )
        .await;
        let ew = counted(
            c,
            closed_loop(
                "DLB Peak-EWMA",
                HealthClient::new(dlb.channel("ewma").unwrap()),
                n,
                concurrency,
            ),
        )
        .await;
        let bl = counted(
            c,
            closed_loop(
                "tonic balance_list",
                HealthClient::new(Channel::balance_list(endpoints.clone().into_iter())),
                n,
                concurrency,
            ),
        )
        .await;
        let services: Vec<Channel> = endpoints.iter().map(|e| e.connect_lazy()).collect();
        let discover = tower::load::PeakEwmaDiscover::new(
            tower::discover::ServiceList::new(services),
            Duration::from_millis(30),
            decay,
            tower::load::CompleteOnResponse::default(),
        );
        let p2c = tower::buffer::Buffer::new(tower::balance::p2c::Balance::new(discover), 1024);
        let tw = counted(
            c,
            closed_loop(
                "tower p2c + PeakEwma",
                HealthClient::new(p2c),
                n,
                concurrency,
            ),
        )
        .await;
        if round == 1 {
            runs = vec![rr, lc, ew, bl, tw];
        }
    }
    println!(
        "\n## Tail latency: 8 backends ({} ms), one at {} ms; {calls} calls, {concurrency} callers, \
         Peak-EWMA decay {} ms",
        fast.as_millis(),
        (fast * 20).as_millis(),
        decay.as_millis()
    );
    println!("| client | p50 | p99 | calls/s | slow backend's share |");
    println!("|---|---|---|---|---|");
    for r in runs {
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.0} | {:.2} % |",
            r.name,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.per_sec,
            r.slow_share * 100.0
        );
    }
}

async fn overhead(calls: usize) {
    let addr = backend(Duration::ZERO, Arc::new(AtomicU64::new(0))).await;
    let (_server, dlb) = dlbd(vec![service("one", &[addr], proto::Algorithm::RoundRobin)]).await;
    dlb.service("one").await.unwrap();
    let plain = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut plain = HealthClient::new(plain);
    let mut ours = HealthClient::new(dlb.channel("one").unwrap());
    // `TRANSPORT=plain` or `TRANSPORT=dlb` makes only that transport's calls after the warm-up
    // (for instruction counts under callgrind: the difference of two runs is the layer's cost).
    let only = std::env::var("TRANSPORT").unwrap_or_default();
    let (run_plain, run_ours) = (only != "dlb", only != "plain");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let (mut ta, mut tb) = (Duration::ZERO, Duration::ZERO);
    // Interleaved rounds of 500, after a warm-up of each.
    for _ in 0..200 {
        plain.check(HealthCheckRequest::default()).await.unwrap();
        ours.check(HealthCheckRequest::default()).await.unwrap();
    }
    for _ in 0..(calls / 500).max(1) {
        if run_plain {
            let s = Instant::now();
            for _ in 0..500 {
                let t = Instant::now();
                plain.check(HealthCheckRequest::default()).await.unwrap();
                a.push(t.elapsed());
            }
            ta += s.elapsed();
        }
        if run_ours {
            let s = Instant::now();
            for _ in 0..500 {
                let t = Instant::now();
                ours.check(HealthCheckRequest::default()).await.unwrap();
                b.push(t.elapsed());
            }
            tb += s.elapsed();
        }
    }
    if !(run_plain && run_ours) {
        println!("{} calls through {only} only", a.len() + b.len());
        return;
    }
    a.sort();
    b.sort();
    let (pa, pb) = (pct(&a, 0.5), pct(&b, 0.5));
    let (ra, rb) = (
        a.len() as f64 / ta.as_secs_f64(),
        b.len() as f64 / tb.as_secs_f64(),
    );
    println!(
        "\n## Overhead: one backend, sequential calls, {} each, interleaved",
        a.len()
    );
    println!("| transport | p50 | p99 | calls/s |");
    println!("|---|---|---|---|");
    println!(
        "| tonic Channel | {:.1} µs | {:.1} µs | {ra:.0} |",
        pa.as_secs_f64() * 1e6,
        pct(&a, 0.99).as_secs_f64() * 1e6
    );
    println!(
        "| DLB channel | {:.1} µs | {:.1} µs | {rb:.0} |",
        pb.as_secs_f64() * 1e6,
        pct(&b, 0.99).as_secs_f64() * 1e6
    );
    println!(
        "added p50: {:.1} µs; throughput ratio {:.3}",
        (pb.as_secs_f64() - pa.as_secs_f64()) * 1e6,
        rb / ra
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful: run small.
    let quick =
        std::env::args().any(|a| a == "--test") || !std::env::args().any(|a| a == "--bench");
    let calls = env("CALLS", if quick { 400 } else { 10_000 });
    let concurrency = env("CONCURRENCY", 32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // `PART=tail` or `PART=overhead` runs only that part (default: both).
    let part = std::env::var("PART").unwrap_or_default();
    rt.block_on(async {
        if part != "overhead" {
            let decay = Duration::from_millis(env("DECAY_MS", 10_000) as u64);
            let fast = Duration::from_millis(env("FAST_MS", 1) as u64);
            tail(calls, concurrency, decay, fast).await;
        }
        if part != "tail" {
            overhead(calls).await;
        }
    });
}
