//! The SDK's own pick path: [`ServiceHandle::get_next_server`] and the drop of its
//! [`dlb_client::CallGuard`], for round robin and Maglev at 1,000 and 10,000 backends (weights
//! 1..=100 from a fixed seed, all eligible; Maglev keyed with 4,096 random 16-byte keys), on one
//! thread and as the aggregate throughput of two threads picking from one shared handle.
//!
//! The handle is built without a control plane (`Client::detached_service` applies a full
//! snapshot exactly as the session does), so nothing else runs during the measurement. The
//! SDK counts in-flight calls for every policy, so every pick here is counted.
//!
//! Throughput rows (`sdk_throughput/…/threads/T`): each criterion iteration is one pick; a sample
//! of `iters` picks is split over `T` threads that start together at a barrier, and the sample's
//! time is the slowest thread's, so criterion's figure is the aggregate time per pick (wall time
//! / total picks). 1 thread ÷ 2 threads is the speed-up. `control_xxh3` hashes without touching
//! shared memory: it shows how much of the second core the machine gives during the run.
//! `baseline/clock_now` is a `tokio::time::Instant::now()` (what every pick paid to time its call
//! before issue 16); `baseline/tsc_raw` the TSC read it pays now (see `dlb_client::clock`).
//! `core_tracked/…` is the core's tracked pick on the same snapshot (`Picker::pick`, counted
//! in the backend's shared load, and the drop of the `Pick`), `core_throughput/…` the same on 1
//! and 2 threads: the SDK's path is compared with it in the same run (issue 16: ≤ 2×).
//! `sdk_pick_tokio_clock/…` is `sdk_pick/…` on a client built with `CallClock::Tokio`.
//! `sdk_pick_breaker/…` repeats `sdk_pick/…` with the SDK circuit breaker on (every breaker
//! closed): the cost of the breaker check and of recording into it on the pick path.
//!
//! Run: `cargo bench -p dlb-client --bench get_next_server`; for the paired 1- vs 2-thread
//! rounds (see `paired`): `DLB_PAIRED_ROUNDS=30 cargo bench -p dlb-client --bench
//! get_next_server`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion};
use dlb::proto;
use dlb_client::{Client, ServiceHandle};

const SIZES: [usize; 2] = [1_000, 10_000];

/// [`snapshot`] with the SDK circuit breaker on (defaults, no concurrency cap): every pick
/// also checks its backend's breaker and the guard records into it (docs/sdk-health.md).
fn snapshot_with_breaker(algorithm: proto::Algorithm, n: usize) -> proto::ServiceUpdate {
    let mut s = snapshot(algorithm, n);
    if let Some(p) = s.policy.as_mut() {
        p.circuit_breaker = Some(proto::CircuitBreaker::default());
    }
    s
}

/// A full snapshot of `n` backends with weights 1..=100 drawn from seed 42.
fn snapshot(algorithm: proto::Algorithm, n: usize) -> proto::ServiceUpdate {
    let mut rng = fastrand::Rng::with_seed(42);
    proto::ServiceUpdate {
        service: "bench".into(),
        version: Some(proto::Version {
            epoch: 1,
            version: 1,
        }),
        full: true,
        policy: Some(proto::Policy {
            algorithm: algorithm as i32,
            ..Default::default()
        }),
        upserts: (0..n)
            .map(|i| proto::Server {
                server_id: format!("backend-{i}"),
                address: format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255),
                weight: rng.u32(1..=100),
                health: proto::HealthStatus::Healthy as i32,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// 4096 random 16-byte request keys.
fn keys() -> Vec<[u8; 16]> {
    let mut rng = fastrand::Rng::with_seed(7);
    (0..4096)
        .map(|_| {
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(&rng.u64(..).to_le_bytes());
            k[8..].copy_from_slice(&rng.u64(..).to_le_bytes());
            k
        })
        .collect()
}

/// A client with no control plane behind it (its session task is closed at once).
fn offline_client(rt: &tokio::runtime::Runtime) -> Client {
    offline_client_with(rt, dlb_client::CallClock::Tsc)
}

/// [`offline_client`] timing calls with `clock`.
fn offline_client_with(rt: &tokio::runtime::Runtime, clock: dlb_client::CallClock) -> Client {
    let client = rt
        .block_on(
            Client::builder(["http://127.0.0.1:9"])
                .wait_connected(false)
                .call_clock(clock)
                .connect(),
        )
        .unwrap();
    client.close();
    client
}

/// The cases: name, algorithm, whether picks take a key.
const CASES: [(&str, proto::Algorithm, bool); 2] = [
    ("round_robin", proto::Algorithm::RoundRobin, false),
    ("maglev", proto::Algorithm::Maglev, true),
];

/// One pick and the drop of its guard.
#[inline(always)]
fn pick_once(h: &ServiceHandle, key: Option<&[u8]>) {
    let call = h.get_next_server(black_box(key)).unwrap();
    black_box(call.backend().weight());
}

/// Runs `iters` picks split over `threads` threads that start together; the slowest thread's
/// time.
fn run_threads(
    h: &ServiceHandle,
    keys: &[[u8; 16]],
    keyed: bool,
    threads: u64,
    iters: u64,
) -> Duration {
    let per = iters.max(threads) / threads;
    let barrier = Barrier::new(threads as usize);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut i = t as usize * 1024;
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..per {
                        i = (i + 1) & 4095;
                        pick_once(h, keyed.then(|| &keys[i][..]));
                    }
                    start.elapsed()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .max()
            .unwrap_or_default()
    })
}

/// Runs `iters` core tracked picks split over `threads` threads that start together; the
/// slowest thread's time.
fn run_core_threads(
    p: &dlb::balance::Picker,
    keys: &[[u8; 16]],
    keyed: bool,
    threads: u64,
    iters: u64,
) -> Duration {
    let per = iters.max(threads) / threads;
    let barrier = Barrier::new(threads as usize);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut i = t as usize * 1024;
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..per {
                        i = (i + 1) & 4095;
                        let pick = p.pick(black_box(keyed.then(|| &keys[i][..]))).unwrap();
                        black_box(pick.backend().weight());
                    }
                    start.elapsed()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .max()
            .unwrap_or_default()
    })
}

/// The control: `iters` rounds of hashing (no shared memory) split over `threads` threads that
/// start together; the slowest thread's time.
fn run_control(keys: &[[u8; 16]], threads: u64, iters: u64) -> Duration {
    let per = iters.max(threads) / threads;
    let barrier = Barrier::new(threads as usize);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut i = t as usize * 1024;
                    let mut acc = 0u64;
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..per {
                        i = (i + 1) & 4095;
                        acc ^= dlb::balance::hash::key_hash(black_box(&keys[i][..]));
                        acc = acc.rotate_left(1) ^ dlb::balance::hash::key_hash(&acc.to_le_bytes());
                    }
                    black_box(acc);
                    start.elapsed()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .max()
            .unwrap_or_default()
    })
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = offline_client(&rt);
    let tokio_client = offline_client_with(&rt, dlb_client::CallClock::Tokio);
    let keys = keys();

    // What every pick pays for timing its call: one clock read (the guard's start time).
    c.bench_function("baseline/clock_now", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()))
    });
    let tsc = quanta::Clock::new();
    c.bench_function("baseline/tsc_raw", |b| b.iter(|| black_box(tsc.raw())));

    let mut group = c.benchmark_group("control_xxh3");
    for threads in [1u64, 2] {
        group.bench_function(BenchmarkId::new("threads", threads), |b| {
            b.iter_custom(|iters| run_control(&keys, threads, iters))
        });
    }
    group.finish();

    for (name, algorithm, keyed) in CASES {
        for n in SIZES {
            let snap = snapshot(algorithm, n);
            let picker =
                dlb::routing::build_picker(None, snap.policy.as_ref().unwrap(), &snap.upserts)
                    .unwrap();
            let mut group = c.benchmark_group(format!("core_tracked/{name}"));
            group.bench_with_input(BenchmarkId::from_parameter(n), &picker, |b, p| {
                let mut i = 0usize;
                b.iter(|| {
                    i = (i + 1) & 4095;
                    let pick = p.pick(black_box(keyed.then(|| &keys[i][..]))).unwrap();
                    black_box(pick.backend().weight());
                });
            });
            group.finish();
            let mut group = c.benchmark_group(format!("core_throughput/{name}/{n}"));
            for threads in [1u64, 2] {
                group.bench_function(BenchmarkId::new("threads", threads), |b| {
                    b.iter_custom(|iters| run_core_threads(&picker, &keys, keyed, threads, iters))
                });
            }
            group.finish();
            let handle = client.detached_service(&snap).unwrap();
            let mut group = c.benchmark_group(format!("sdk_pick/{name}"));
            group.bench_with_input(BenchmarkId::from_parameter(n), &handle, |b, h| {
                let mut i = 0usize;
                b.iter(|| {
                    i = (i + 1) & 4095;
                    pick_once(h, keyed.then(|| &keys[i][..]));
                });
            });
            group.finish();
            // The same pick timed with tokio's clock (what every pick paid before issue 16).
            let tokio_handle = tokio_client.detached_service(&snap).unwrap();
            let mut group = c.benchmark_group(format!("sdk_pick_tokio_clock/{name}"));
            group.bench_with_input(BenchmarkId::from_parameter(n), &tokio_handle, |b, h| {
                let mut i = 0usize;
                b.iter(|| {
                    i = (i + 1) & 4095;
                    pick_once(h, keyed.then(|| &keys[i][..]));
                });
            });
            group.finish();
            let mut group = c.benchmark_group(format!("sdk_throughput/{name}/{n}"));
            for threads in [1u64, 2] {
                group.bench_function(BenchmarkId::new("threads", threads), |b| {
                    b.iter_custom(|iters| run_threads(&handle, &keys, keyed, threads, iters))
                });
            }
            group.finish();
            assert!(
                handle.backends().iter().all(|b| b.in_flight == 0),
                "every guard was dropped"
            );
        }
    }

    // The same picks with the circuit breaker on (all closed): the breaker's pick-path cost.
    for (name, algorithm, keyed) in CASES {
        for n in SIZES {
            let handle = client
                .detached_service(&snapshot_with_breaker(algorithm, n))
                .unwrap();
            let mut group = c.benchmark_group(format!("sdk_pick_breaker/{name}"));
            group.bench_with_input(BenchmarkId::from_parameter(n), &handle, |b, h| {
                let mut i = 0usize;
                b.iter(|| {
                    i = (i + 1) & 4095;
                    pick_once(h, keyed.then(|| &keys[i][..]));
                });
            });
            group.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = bench
}

/// One paired measurement of one case: the control's speed-up, and the case's time per pick on
/// 1 and 2 threads.
struct Pair {
    control: f64,
    t1: f64,
    t2: f64,
}

/// Paired 1- vs 2-thread rounds (`DLB_PAIRED_ROUNDS=R`): on a shared VM the second core comes
/// and goes for seconds at a time, so criterion's 1-thread and 2-thread rows, measured seconds
/// apart, can see different machines. Here each round measures, for each case, back to back
/// (≈ 0.5 s in all): the control on 1 and 2 threads (20,000,000 rounds of hashing), then the
/// case on 1 and 2 threads (2,000,000 picks each). Printed per case: the median time per pick on
/// 1 and 2 threads and the median, min and max of the per-round speed-up, over all rounds and
/// over the rounds whose control, measured just before, scaled ≥ 1.8× (the second core was
/// there).
fn paired(rounds: usize) {
    const PICKS: u64 = 2_000_000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = offline_client(&rt);
    let keys = keys();
    let handles: Vec<_> = CASES
        .iter()
        .flat_map(|&(name, algorithm, keyed)| {
            SIZES.map(|n| {
                let h = client.detached_service(&snapshot(algorithm, n)).unwrap();
                (format!("{name}/{n}"), h, keyed)
            })
        })
        .collect();
    let ns = |d: Duration, n: u64| d.as_nanos() as f64 / n as f64;
    let mut pairs: Vec<Vec<Pair>> = handles.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (c, (_, h, keyed)) in handles.iter().enumerate() {
            let c1 = ns(run_control(&keys, 1, 10 * PICKS), PICKS);
            let c2 = ns(run_control(&keys, 2, 10 * PICKS), PICKS);
            let t1 = ns(run_threads(h, &keys, *keyed, 1, PICKS), PICKS);
            let t2 = ns(run_threads(h, &keys, *keyed, 2, PICKS), PICKS);
            pairs[c].push(Pair {
                control: c1 / c2,
                t1,
                t2,
            });
        }
    }
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let spread = |v: &[f64]| -> (f64, f64) {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    };
    println!("paired rounds: {rounds}");
    println!(
        "{:<18} {:>8} {:>7} {:>7} {:>21}   {:>6} {:>7} {:>7} {:>21}",
        "case",
        "control",
        "1t ns",
        "2t ns",
        "speed-up med [range]",
        "rounds",
        "1t ns*",
        "2t ns*",
        "speed-up* med [range]"
    );
    for ((name, _, _), pairs) in handles.iter().zip(&pairs) {
        let stats = |ps: &[&Pair]| {
            let ratio: Vec<f64> = ps.iter().map(|p| p.t1 / p.t2).collect();
            let (min, max) = spread(&ratio);
            (
                median(ps.iter().map(|p| p.t1).collect()),
                median(ps.iter().map(|p| p.t2).collect()),
                median(ratio),
                min,
                max,
            )
        };
        let all: Vec<&Pair> = pairs.iter().collect();
        let available: Vec<&Pair> = pairs.iter().filter(|p| p.control >= 1.8).collect();
        let control = median(pairs.iter().map(|p| p.control).collect());
        let (a1, a2, ar, amin, amax) = stats(&all);
        let (b1, b2, br, bmin, bmax) = stats(&available);
        println!(
            "{name:<18} {control:>8.2} {a1:>7.1} {a2:>7.1} {ar:>6.2} [{amin:.2}, {amax:.2}]   \
             {:>6} {b1:>7.1} {b2:>7.1} {br:>6.2} [{bmin:.2}, {bmax:.2}]",
            available.len()
        );
    }
    println!("(control: the median speed-up of the no-shared-memory control; * = only the rounds whose control scaled >= 1.8x)");
}

fn main() {
    if let Ok(rounds) = std::env::var("DLB_PAIRED_ROUNDS") {
        paired(
            rounds
                .parse()
                .expect("DLB_PAIRED_ROUNDS: a number of rounds"),
        );
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
