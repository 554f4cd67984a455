//! Drain-barrier benchmark: how much does waiting for every client's acknowledgement add to the
//! time the drain takes to reach every SDK?
//!
//! ```text
//! cargo run --release --example drain_barrier -- --sessions 1000 --rounds 10
//! ```
//!
//! One in-process `dlbd`, N SDK clients (each with its own connection and session, default ack
//! delay of 100 ms), all following one service of 10 backends. Each round drains one backend
//! with `DrainServer` and a wait (docs/drain.md), then undrains it (and waits until every SDK
//! holds that). Per round, from the moment the call is made: **propagation** — when the last of
//! the N SDKs has applied the drain (a task walks every handle's version watch) — and
//! **barrier** — when the call returned. The barrier should add at most about one ack delay to
//! propagation. Bounded: exits by itself.
#![allow(clippy::unwrap_used)]

#[path = "support/sessions.rs"]
mod sessions;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dlb::proto;
use dlb_client::{AdminClient, NewServer, ServerUpdate, Version};

const SERVICE: &str = "bench";
const BACKENDS: usize = 10;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (mut sessions, mut rounds) = (1000usize, 10usize);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sessions" => sessions = value.parse()?,
            "--rounds" => rounds = value.parse()?,
            other => anyhow::bail!("unknown argument {other:?}; usage: --sessions N --rounds R"),
        }
    }
    anyhow::ensure!(sessions > 0 && rounds > 0, "N and R must be > 0");
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
    let started = Instant::now();
    let (clients, handles) = sessions::connect(&endpoint, SERVICE, sessions).await?;
    println!(
        "{} sessions connected and subscribed in {:.2?}",
        handles.len(),
        started.elapsed()
    );
    let handles = Arc::new(handles);
    let (mut props, mut barriers, mut extra) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let id = format!("b{}", round % BACKENDS);
        let base = handles[0].version();
        let target = Version {
            epoch: base.epoch,
            version: base.version + 1,
        };
        let t0 = Instant::now();
        let watcher = {
            let handles = handles.clone();
            tokio::spawn(async move {
                for h in handles.iter() {
                    h.wait_for_version(target).await?;
                }
                Ok::<_, dlb_client::Error>(t0.elapsed())
            })
        };
        let r = admin
            .drain_server(
                SERVICE,
                &id,
                Some(proto::BarrierWait {
                    in_flight_zero: false,
                    timeout_ms: 30_000,
                }),
            )
            .await?;
        let barrier = t0.elapsed();
        let prop = tokio::time::timeout(Duration::from_secs(60), watcher).await???;
        let b = r.barrier.unwrap_or_default();
        anyhow::ensure!(
            b.ended() == proto::BarrierEnd::Confirmed && b.confirmed as usize == sessions,
            "round {round}: {b:?}"
        );
        anyhow::ensure!(
            r.version.map(|v| v.version) == Some(target.version),
            "round {round}: unexpected version {:?}",
            r.version
        );
        println!(
            "round {round}: propagation {prop:.2?}, barrier {barrier:.2?} (server-side wait {} ms)",
            b.waited_ms
        );
        props.push(prop);
        barriers.push(barrier);
        extra.push(barrier.saturating_sub(prop));
        let mut undrain = ServerUpdate::new(id);
        undrain.draining = Some(false);
        let r = admin.update_server(SERVICE, undrain).await?;
        let v: Version = r.version.unwrap_or_default().into();
        for h in handles.iter() {
            h.wait_for_version(v).await?;
        }
    }
    for v in [&mut props, &mut barriers, &mut extra] {
        v.sort();
    }
    println!(
        "{sessions} sessions, {rounds} rounds: propagation p50 {:.2?} max {:.2?}; barrier p50 {:.2?} max {:.2?}; barrier − propagation p50 {:.2?} max {:.2?}",
        percentile(&props, 50.0),
        percentile(&props, 100.0),
        percentile(&barriers, 50.0),
        percentile(&barriers, 100.0),
        percentile(&extra, 50.0),
        percentile(&extra, 100.0),
    );
    for c in &clients {
        c.close();
    }
    server.shutdown().await?;
    Ok(())
}
