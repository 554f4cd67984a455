//! The embedded durable store's write cost: AddServer latency (p50/p99) and writes per second,
//! one backend per write vs batches, both directly on the store and through gRPC `AddServer`.
//! Every write is one redb transaction with an fsync.
//!
//! ```text
//! cargo run --release -p dlb-server --example store_bench -- [writes] [batch]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use dlb::proto::{self, registry_client::RegistryClient};
use dlb_server::store::{EmbeddedStore, MemoryStore, Mutation, Store};
use dlb_server::{ServerConfig, StoreConfig};

fn server(i: usize) -> proto::Server {
    proto::Server {
        server_id: format!("b{i}"),
        address: format!("10.{}.{}.{}:80", i / 65_536, (i / 256) % 256, i % 256),
        weight: 1,
        ..Default::default()
    }
}

fn report(what: &str, mut lat: Vec<Duration>, total: Duration, records: usize) {
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize];
    println!(
        "{what:<42} p50 {:>9.3?} p99 {:>9.3?}  {:>8.0} writes/s {:>9.0} records/s",
        pct(0.5),
        pct(0.99),
        lat.len() as f64 / total.as_secs_f64(),
        records as f64 / total.as_secs_f64()
    );
}

async fn direct(what: &str, store: Arc<dyn Store>, writes: usize, batch: usize) {
    let mut lat = Vec::with_capacity(writes);
    let t0 = Instant::now();
    for w in 0..writes {
        let muts = (0..batch)
            .map(|k| Mutation::Add(server(w * batch + k)))
            .collect();
        let s = Instant::now();
        store.apply("s".into(), muts, None).await.expect("apply");
        lat.push(s.elapsed());
    }
    report(what, lat, t0.elapsed(), writes * batch);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let writes: usize = args.next().map_or(Ok(500), |a| a.parse())?;
    let batch: usize = args.next().map_or(Ok(100), |a| a.parse())?;

    let dir = tempfile::tempdir()?;
    let embedded: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path().join("a"))?);
    direct("embedded store.apply, 1 backend/write", embedded, writes, 1).await;
    let embedded: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path().join("b"))?);
    direct(
        &format!("embedded store.apply, {batch} backends/write"),
        embedded,
        writes,
        batch,
    )
    .await;
    let memory: Arc<dyn Store> = Arc::new(MemoryStore::default());
    direct("memory store.apply, 1 backend/write", memory, writes, 1).await;

    for (name, store) in [
        ("embedded", StoreConfig::Embedded(dir.path().join("grpc"))),
        ("memory", StoreConfig::Memory),
    ] {
        let s = dlb_server::spawn(ServerConfig {
            listen: "127.0.0.1:0".parse()?,
            metrics_listen: None,
            store,
            ..Default::default()
        })
        .await?;
        let mut c = RegistryClient::connect(format!("http://{}", s.grpc_addr())).await?;
        let mut lat = Vec::with_capacity(writes);
        let t0 = Instant::now();
        for i in 0..writes {
            let b = server(i);
            let st = Instant::now();
            c.add_server(proto::AddServerRequest {
                service: "s".into(),
                server_id: b.server_id,
                address: b.address,
                weight: 1,
                ..Default::default()
            })
            .await?;
            lat.push(st.elapsed());
        }
        report(
            &format!("gRPC AddServer, {name} store"),
            lat,
            t0.elapsed(),
            writes,
        );
        s.shutdown().await?;
    }
    Ok(())
}
