//! The SDK's call path with tonic: a generated client over `client.channel("…")` — DLB picks the
//! backend per call, keeps one HTTP/2 connection per backend, and reports outcome and latency
//! by itself. Runnable alone: it starts its own `dlbd` and three tonic backends (the standard
//! gRPC health service) on loopback.
//!
//! ```text
//! cargo run --example tonic_client
//! ```
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use dlb::proto;
use dlb_client::Client;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A tonic server with the health service on 127.0.0.1:0; its address.
async fn backend() -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (_reporter, service) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        let incoming = tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    Ok(addr)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A private control plane and three backends, weights 1, 2, 3.
    let server = dlb_server::spawn(dlb_server::ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        ..Default::default()
    })
    .await?;
    let dlb = Client::connect([format!("http://{}", server.grpc_addr())]).await?;
    for (i, weight) in [1u32, 2, 3].into_iter().enumerate() {
        let addr = backend().await?;
        dlb.admin()
            .add_server(
                "health",
                dlb_client::NewServer::new(format!("b{i}"), addr.to_string()).weight(weight),
            )
            .await?;
    }
    // Retries (to another backend, under the retry budget) are the service's policy, so every
    // SDK agrees: here, also retry UNAVAILABLE answers.
    let handle = dlb.service("health").await?;
    let mut policy = handle.get_policy().await?;
    policy.retry = Some(proto::RetryPolicy {
        retry_on_grpc_codes: vec![tonic::Code::Unavailable as u32],
        ..Default::default()
    });
    handle.set_policy(policy).await?;

    // The one line: a generated tonic client over the DLB transport.
    let mut health = HealthClient::new(dlb.channel("health")?);

    for _ in 0..600 {
        let mut req = tonic::Request::new(HealthCheckRequest::default());
        req.set_timeout(Duration::from_secs(1)); // grpc-timeout is honoured by the call path
        health.check(req).await?;
    }

    let counts = handle.call_counts();
    println!(
        "{} calls, {} retries, errors {:?}",
        counts.requests, counts.retries, counts.errors
    );
    // What the call path exports next to the rest of the SDK's series.
    let mut text = String::new();
    dlb.metrics().encode_text(&mut text)?;
    for line in text.lines().filter(|l| {
        l.starts_with("dlb_sdk_call_requests_total")
            || l.starts_with("dlb_sdk_call_latency_seconds_count")
            || l.starts_with("dlb_sdk_call_errors_total")
    }) {
        println!("{line}");
    }
    // Outcomes reached the control plane's load reports: the backends' in-flight counts are
    // back to zero and nobody was ejected.
    for b in handle.backends() {
        println!(
            "{} {} weight {} eligible {}",
            b.server_id, b.address, b.weight, b.eligible
        );
    }
    Ok(())
}
