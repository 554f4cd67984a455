//! Pick-path benchmarks of the `dlb` core: pick latency per policy at 10, 1,000 and 10,000
//! backends (weights 1..=100 from a fixed seed), 1- vs 2-thread throughput on one shared picker,
//! build time at 10,000 backends, memory per backend (printed), the cost of one SDK update
//! (`rebuild` of a 10-backend picker), and the cost of locality (`locality/*`: 1,000 backends in
//! 3 zones, ungrouped against grouped with one group at 100 % and with shares 0.7/0.15/0.15).
//!
//! Run: `cargo bench -p dlb --bench pick`.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dlb::balance::{Algorithm, BackendSpec, Grouping, Picker, PolicyConfig};

const SIZES: [usize; 3] = [10, 1_000, 10_000];

fn specs(n: usize) -> Vec<BackendSpec> {
    let mut rng = fastrand::Rng::with_seed(42);
    (0..n)
        .map(|i| BackendSpec {
            id: format!("backend-{i}"),
            address: format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255),
            weight: rng.u32(1..=100),
            hash_key: None,
            eligible: true,
        })
        .collect()
}

fn policy(algorithm: Algorithm, track: bool, bounded: Option<f64>) -> PolicyConfig {
    PolicyConfig {
        algorithm,
        bounded_load_factor: bounded,
        track_in_flight: track,
        panic: None,
        peak_ewma: Default::default(),
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

/// The cases: name, policy, whether it takes a key.
fn cases() -> Vec<(&'static str, PolicyConfig, bool)> {
    vec![
        ("wrr", policy(Algorithm::RoundRobin, false, None), false),
        (
            "wrr_tracked",
            policy(Algorithm::RoundRobin, true, None),
            false,
        ),
        ("p2c", policy(Algorithm::LeastConnP2c, true, None), false),
        ("peak_ewma", policy(Algorithm::PeakEwma, true, None), false),
        (
            "lc_exact",
            policy(Algorithm::LeastConnExact, true, None),
            false,
        ),
        ("maglev", policy(Algorithm::Maglev, false, None), true),
        (
            "maglev_tracked",
            policy(Algorithm::Maglev, true, None),
            true,
        ),
        (
            "maglev_bounded",
            policy(Algorithm::Maglev, true, Some(1.25)),
            true,
        ),
        ("ring", policy(Algorithm::RingHash, false, None), true),
        (
            "ring_tracked",
            policy(Algorithm::RingHash, true, None),
            true,
        ),
    ]
}

/// Single-thread pick latency; the guard is dropped inside the measured loop.
fn pick_latency(c: &mut Criterion) {
    let keys = keys();
    // What bounds the keyed picks: hashing a 16-byte key alone, and the loop itself.
    let mut group = c.benchmark_group("baseline");
    group.bench_function("xxh3_16B_key", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(dlb::balance::hash::key_hash(black_box(&keys[i][..])))
        });
    });
    group.bench_function("atomic_fetch_add", |b| {
        let a = std::sync::atomic::AtomicU64::new(0);
        b.iter(|| black_box(a.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    });
    group.finish();
    for (name, pol, keyed) in cases() {
        let mut group = c.benchmark_group(format!("pick/{name}"));
        for n in SIZES {
            let picker = Picker::build(&pol, &specs(n)).unwrap();
            group.bench_with_input(BenchmarkId::from_parameter(n), &picker, |b, p| {
                let mut i = 0usize;
                b.iter(|| {
                    i = (i + 1) & 4095;
                    let key = keyed.then(|| &keys[i][..]);
                    let pick = p.pick(black_box(key)).unwrap();
                    black_box(pick.backend().weight())
                });
            });
        }
        group.finish();
    }
}

/// Runs `iters` picks split over `threads` threads on one shared picker; wall time.
fn run_threads(p: &Picker, keys: &[[u8; 16]], keyed: bool, threads: u64, iters: u64) -> Duration {
    let per = iters / threads;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut i = t as usize * 1024;
                for _ in 0..per {
                    i = (i + 1) & 4095;
                    let key = keyed.then(|| &keys[i][..]);
                    let pick = p.pick(black_box(key)).unwrap();
                    black_box(pick.backend().weight());
                }
            });
        }
    });
    start.elapsed()
}

/// Aggregate throughput, 1 vs 2 threads on one picker at 10,000 backends (time per pick =
/// wall time / total picks; lower is better, 2 threads ideally half of 1).
fn throughput(c: &mut Criterion) {
    let keys = keys();
    // Control: pure computation (hashing keys, no shared memory) shows how much of the second
    // core the machine actually gives at the time of the run.
    let mut group = c.benchmark_group("throughput/control_xxh3");
    for threads in [1u64, 2] {
        group.bench_function(BenchmarkId::new("threads", threads), |b| {
            b.iter_custom(|iters| {
                let per = iters.max(threads) / threads;
                let keys = &keys;
                let start = Instant::now();
                std::thread::scope(|s| {
                    for t in 0..threads {
                        s.spawn(move || {
                            let mut i = t as usize * 1024;
                            let mut acc = 0u64;
                            for _ in 0..per {
                                i = (i + 1) & 4095;
                                acc ^= dlb::balance::hash::key_hash(black_box(&keys[i][..]));
                                acc = acc.rotate_left(1)
                                    ^ dlb::balance::hash::key_hash(&acc.to_le_bytes());
                                acc = acc.rotate_left(1)
                                    ^ dlb::balance::hash::key_hash(&acc.to_le_bytes());
                                acc = acc.rotate_left(1)
                                    ^ dlb::balance::hash::key_hash(&acc.to_le_bytes());
                            }
                            black_box(acc);
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    group.finish();
    let specs = specs(10_000);
    for (name, pol, keyed) in cases() {
        if !matches!(
            name,
            "wrr" | "wrr_tracked" | "p2c" | "maglev" | "lc_exact" | "ring"
        ) {
            continue;
        }
        let picker = Arc::new(Picker::build(&pol, &specs).unwrap());
        let mut group = c.benchmark_group(format!("throughput/{name}/10000"));
        for threads in [1u64, 2] {
            group.bench_function(BenchmarkId::new("threads", threads), |b| {
                b.iter_custom(|iters| {
                    run_threads(&picker, &keys, keyed, threads, iters.max(threads))
                })
            });
        }
        group.finish();
    }
}

/// Build time at 10,000 backends, and memory per backend (printed).
fn build(c: &mut Criterion) {
    let specs = specs(10_000);
    let mut group = c.benchmark_group("build/10000");
    group.sample_size(10);
    for (name, pol, _) in cases() {
        if matches!(
            name,
            "wrr_tracked" | "maglev_tracked" | "ring_tracked" | "maglev_bounded"
        ) {
            continue;
        }
        let p = Picker::build(&pol, &specs).unwrap();
        println!(
            "memory/{name}/10000: {} bytes total, {:.0} bytes per backend",
            p.memory_bytes(),
            p.memory_bytes() as f64 / 10_000.0
        );
        group.bench_function(name, |b| {
            b.iter(|| Picker::build(&pol, black_box(&specs)).unwrap())
        });
    }
    group.finish();
}

/// What one SDK update costs: `Picker::rebuild` of a 10-backend service after one weight change
/// (the propagation benchmark's workload), including building the `BackendSpec`s.
fn rebuild(c: &mut Criterion) {
    let mut group = c.benchmark_group("rebuild/10");
    for (name, algorithm) in [
        ("wrr", Algorithm::RoundRobin),
        ("p2c", Algorithm::LeastConnP2c),
        ("maglev", Algorithm::Maglev),
    ] {
        let pol = policy(algorithm, true, None);
        let base = specs(10);
        let mut picker = Picker::build(&pol, &base).unwrap();
        let mut k = 0u32;
        group.bench_function(name, |b| {
            b.iter(|| {
                k = k.wrapping_add(1);
                let mut next = base.clone();
                next[(k % 10) as usize].weight = 1 + k % 100;
                picker = picker.rebuild(&pol, black_box(&next)).unwrap();
            })
        });
    }
    group.finish();
}

/// Locality: the same 1,000 backends ungrouped (`flat`), in 3 zone groups with the local one at
/// 100 % (`local`: the healthy in-zone case, no draw), and at 0.7/0.15/0.15 (`spill`).
fn locality(c: &mut Criterion) {
    let keys = keys();
    let specs = specs(1_000);
    let of: Vec<u16> = (0..1_000).map(|i| (i % 3) as u16).collect();
    let grouping = Grouping {
        of_backend: &of,
        panic: &[false; 3],
    };
    for (name, pol, keyed) in [
        ("wrr", policy(Algorithm::RoundRobin, false, None), false),
        ("p2c", policy(Algorithm::LeastConnP2c, true, None), false),
        ("maglev", policy(Algorithm::Maglev, false, None), true),
    ] {
        let mut group = c.benchmark_group(format!("locality/{name}"));
        let flat = Picker::build(&pol, &specs).unwrap();
        let local = Picker::build_grouped(&pol, &specs, &grouping).unwrap();
        local.set_shares(&[1.0, 0.0, 0.0]);
        let spill = Picker::build_grouped(&pol, &specs, &grouping).unwrap();
        spill.set_shares(&[0.7, 0.15, 0.15]);
        for (case, picker) in [("flat", &flat), ("local", &local), ("spill", &spill)] {
            group.bench_with_input(BenchmarkId::from_parameter(case), picker, |b, p| {
                let mut i = 0usize;
                b.iter(|| {
                    i = (i + 1) & 4095;
                    let key = keyed.then(|| &keys[i][..]);
                    let pick = p.pick(black_box(key)).unwrap();
                    black_box(pick.backend().weight())
                });
            });
        }
        group.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = pick_latency, throughput, build, rebuild, locality
}
criterion_main!(benches);
