//! SDK usage: what a microservice author copies.
//!
//! ```text
//! DLB_ENDPOINT=http://127.0.0.1:50051 cargo run --example sdk_usage   # against a running dlbd
//! cargo run --example sdk_usage                                        # spawns its own dlbd
//! ```
//!
//! 1. connect once at startup (one session for every service this process calls);
//! 2. get a `ServiceHandle` per upstream service (waits for its first snapshot);
//! 3. per request: pick locally with the request's key, call the backend, report the outcome.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use dlb_client::{Client, Error};

/// Stands in for the real network call to the picked backend.
async fn call_backend(address: &str, request: u32) -> Result<(), String> {
    tokio::time::sleep(Duration::from_millis(1)).await;
    if request.is_multiple_of(7) {
        Err(format!("{address}: simulated 503"))
    } else {
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Use DLB_ENDPOINT when given; otherwise run a private control plane for the demo.
    let (endpoint, own_server) = match std::env::var("DLB_ENDPOINT") {
        Ok(e) => (e, None),
        Err(_) => {
            let server = dlb_server::spawn(dlb_server::ServerConfig {
                listen: "127.0.0.1:0".parse()?,
                metrics_listen: None,
                ..Default::default()
            })
            .await?;
            (format!("http://{}", server.grpc_addr()), Some(server))
        }
    };

    // 1. Connect once. The builder exposes every option; these are the defaults but one.
    let client = Client::builder([endpoint.as_str()])
        .client_id("sdk-usage-example")
        .report_interval(Duration::from_secs(1))
        .backoff(Duration::from_millis(50), Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;

    // 2. A handle on the upstream service. Backends normally register themselves (or through
    //    dlbctl); the demo registers two so that there is something to call.
    let users = client.service("users").await?;
    if users.backends().is_empty() {
        // Consistent hashing, so that the request key below decides the backend.
        let mut policy = dlb::model::default_policy();
        policy.algorithm = dlb::proto::Algorithm::Maglev as i32;
        users.set_policy(policy).await?;
        users.add_server("users-1", "127.0.0.1:7001", 1).await?;
        let r = users.add_server("users-2", "127.0.0.1:7002", 1).await?;
        users
            .wait_for_version(r.version.unwrap_or_default().into())
            .await?;
    }

    // 3. The request path: pick locally (no network hop), call, report.
    for request in 1..=20u32 {
        let session_key = format!("user-{}", request % 5);
        let call = match users.get_next_server(Some(session_key.as_bytes())) {
            Ok(call) => call,
            Err(Error::NoBackend { reason, .. }) => {
                eprintln!("request {request}: no backend ({reason}); failing fast");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let address = call.address().to_owned();
        match call_backend(&address, request).await {
            Ok(()) => call.success(),
            Err(e) => {
                eprintln!("request {request}: {e}");
                call.failure();
            }
        }
        println!("request {request} ({session_key}) -> {address}");
    }
    println!(
        "routing on {}, connected: {}, last update {:?} ago",
        users.version(),
        users.is_connected(),
        users.last_update_age().unwrap_or_default()
    );

    client.close();
    if let Some(server) = own_server {
        server.shutdown().await?;
    }
    Ok(())
}
