//! Quickstart: an in-process `dlbd`, three backends, local picks, a health failure.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Starts a control plane on `127.0.0.1:0`, connects the SDK, registers three backends with the
//! seed API (`add_server`), picks locally with `get_next_server`, marks one backend unhealthy
//! (`health_check_failed`) and shows that picks converge away from it, then shuts down.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use dlb_client::{Client, ServiceHandle, Version};
use dlb_server::ServerConfig;

fn show_picks(handle: &ServiceHandle, n: usize) -> anyhow::Result<()> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let call = handle.get_next_server(None)?;
        *counts.entry(call.server_id().to_owned()).or_insert(0) += 1;
        call.success();
    }
    println!("  {n} local picks: {counts:?}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = dlb_server::spawn(ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        ..ServerConfig::default()
    })
    .await?;
    let endpoint = format!("http://{}", server.grpc_addr());
    println!("dlbd listening on {endpoint}");

    let client = Client::connect([endpoint.as_str()]).await?;
    let default = client.default_service().await?;

    for (id, port, weight) in [("web-1", 8081, 1), ("web-2", 8082, 2), ("web-3", 8083, 3)] {
        let r = client
            .add_server(id, &format!("127.0.0.1:{port}"), weight)
            .await?;
        let version = Version::from(r.version.unwrap_or_default());
        println!("add_server({id}, 127.0.0.1:{port}, weight={weight}) -> {version}");
        default.wait_for_version(version).await?;
    }
    println!("routing on {} (weights 1:2:3)", default.version());
    show_picks(&default, 60)?;

    let r = client.health_check_failed("web-3").await?;
    default
        .wait_for_version(r.version.unwrap_or_default().into())
        .await?;
    println!(
        "health_check_failed(web-3) -> routing on {}",
        default.version()
    );
    show_picks(&default, 30)?;

    let remote = client.get_next_server_remote(None).await?;
    println!(
        "server-side get_next_server -> {}",
        remote.server.map(|s| s.server_id).unwrap_or_default()
    );

    let r = client.health_check_passed("web-3").await?;
    default
        .wait_for_version(r.version.unwrap_or_default().into())
        .await?;
    println!(
        "health_check_passed(web-3) -> routing on {}",
        default.version()
    );
    show_picks(&default, 60)?;

    client.close();
    server.shutdown().await?;
    println!("done");
    Ok(())
}
