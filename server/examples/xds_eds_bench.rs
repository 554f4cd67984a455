//! Measures per-node EDS: the cost, per service change, of giving 1,000 xDS clients in 10 zones
//! each the ClusterLoadAssignment of its zone ([`Assignments`]: grouping the backends, one plan
//! and one encoded, hashed assignment per client zone, then 1,000 cache lookups).
//!
//! ```text
//! cargo run --release -p dlb-server --example xds_eds_bench -- [backends_per_zone] [changes] [clients] [fresh|inputs]
//! ```
//!
//! Defaults: 10 backends per zone (100 in all, priority 0, plus 10 at priority 1 without a
//! zone), 500 changes (each marks one backend unhealthy or healthy again), 1,000 clients in
//! 10 zones. Each version's assignments carry the unchanged backends' encodings over from the
//! previous version's, as `dlbd` does; a fourth argument `fresh` builds each from scratch.
//! `inputs` measures a change of the live inputs instead of the store: the clients' zones are
//! built once, then each change publishes a new zone demand (half of it from zone `c % 10`)
//! and times [`Assignments::refresh`] (every built zone re-planned, those that moved encoded).
//! Prints the time per change (p50, p99, max, mean) and the assignments built.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dlb::proto;
use dlb_server::api::xds::assignment::{Assignments, Zone};
use dlb_server::api::xds::inputs::Inputs;
use dlb_server::store::{Servers, ServiceSnapshot};

const ZONES: usize = 10;

fn server(id: String, i: usize, zone: Option<usize>, priority: u32) -> proto::Server {
    proto::Server {
        server_id: id,
        address: format!("10.0.{}.{}:8080", i / 250, i % 250),
        weight: 1 + (i % 3) as u32,
        priority,
        locality: zone.map(|z| proto::Locality {
            region: "eu".into(),
            zone: format!("eu-{z}"),
            sub_zone: String::new(),
        }),
        ..Default::default()
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let per_zone: usize = args.next().map_or(Ok(10), |a| a.parse())?;
    let changes: usize = args.next().map_or(Ok(500), |a| a.parse())?;
    let clients: usize = args.next().map_or(Ok(1000), |a| a.parse())?;
    let mode = args.next().unwrap_or_default();
    let fresh = mode == "fresh";
    let mut previous: Option<Arc<Assignments>> = None;

    let mut servers = Servers::new();
    let mut ids = Vec::new();
    for z in 0..ZONES {
        for k in 0..per_zone {
            let id = format!("z{z}-{k}");
            let i = ids.len();
            servers.insert(
                id.as_str().into(),
                Arc::new(server(id.clone(), i, Some(z), 0)),
            );
            ids.push(id);
        }
    }
    for k in 0..10 {
        let id = format!("backup-{k}");
        let i = ids.len() + k;
        servers.insert(id.as_str().into(), Arc::new(server(id, i, None, 1)));
    }
    let zones: Vec<_> = (0..ZONES)
        .map(|z| {
            Some(Zone {
                region: "eu".into(),
                zone: format!("eu-{z}"),
            })
        })
        .collect();
    let mut snap = ServiceSnapshot {
        name: "s".into(),
        version: proto::Version {
            epoch: 1,
            version: 1,
        },
        policy: dlb::model::default_policy(),
        servers,
    };
    let mut times = Vec::with_capacity(changes);
    let mut built = 0;
    let mut bytes = 0;
    if mode == "inputs" {
        return live_inputs(&snap, &zones, changes, clients);
    }
    for c in 0..changes {
        // The change: one backend (of zone c % 10) flips its health.
        let id = &ids[(c * 7919) % ids.len()];
        let mut s = (*snap.servers[id.as_str()]).clone();
        let health = if s.health() == proto::HealthStatus::Unhealthy {
            proto::HealthStatus::Healthy
        } else {
            proto::HealthStatus::Unhealthy
        };
        s.set_health(health);
        snap.servers.insert(id.as_str().into(), Arc::new(s));
        snap.version.version += 1;
        let shared = Arc::new(snap.clone());

        let t0 = Instant::now();
        let a = Arc::new(Assignments::new(shared, previous.take(), None));
        for k in 0..clients {
            let b = a.for_zone(zones[k % ZONES].as_ref());
            bytes = b.any.value.len();
        }
        times.push(t0.elapsed());
        built = a.computed();
        if !fresh {
            previous = Some(a);
        }
    }
    let mean = times.iter().sum::<Duration>() / u32::try_from(times.len()).unwrap_or(1);
    times.sort();
    println!(
        "per-node EDS: {} backends ({} per zone in {ZONES} zones + 10 at priority 1), {clients} clients in {ZONES} zones, {changes} changes",
        per_zone * ZONES + 10,
        per_zone
    );
    println!(
        "per change: p50 {:?} p99 {:?} max {:?} mean {:?}; {built} assignments built per change; {bytes} bytes each",
        pct(&times, 0.50),
        pct(&times, 0.99),
        pct(&times, 1.0),
        mean
    );
    Ok(())
}

/// The `inputs` mode (see the module docs).
fn live_inputs(
    snap: &ServiceSnapshot,
    zones: &[Option<Zone>],
    changes: usize,
    clients: usize,
) -> anyhow::Result<()> {
    let a = Assignments::new(Arc::new(snap.clone()), None, None);
    for k in 0..clients {
        a.for_zone(zones[k % ZONES].as_ref());
    }
    let mut times = Vec::with_capacity(changes);
    let mut replanned = 0;
    for c in 0..changes {
        let hot = c % ZONES;
        let demand: Vec<(Zone, f64)> = zones
            .iter()
            .enumerate()
            .filter_map(|(z, zone)| {
                let share = if z == hot {
                    0.5
                } else {
                    0.5 / (ZONES - 1) as f64
                };
                Some((zone.clone()?, share))
            })
            .collect();
        let inputs = Inputs {
            demand_generation: c as u64 + 1,
            demand: demand.into(),
            in_flight: Default::default(),
        };
        let t0 = Instant::now();
        replanned += a.refresh(inputs);
        for k in 0..clients {
            a.for_zone(zones[k % ZONES].as_ref());
        }
        times.push(t0.elapsed());
    }
    let mean = times.iter().sum::<Duration>() / u32::try_from(times.len()).unwrap_or(1);
    times.sort();
    println!(
        "per-node EDS, live inputs: {} backends, {clients} clients in {ZONES} zones, {changes} demand changes",
        snap.servers.len()
    );
    println!(
        "per change: p50 {:?} p99 {:?} max {:?} mean {:?}; {:.1} zone assignments replaced per change",
        pct(&times, 0.50),
        pct(&times, 0.99),
        pct(&times, 1.0),
        mean,
        replanned as f64 / changes as f64
    );
    Ok(())
}
