//! Issue 16: connections of the call path — eager connects, and another HTTP/2 connection once
//! a connection carries `max_streams_per_connection` calls.
#![allow(clippy::unwrap_used)]

mod call_support;
mod common;

use std::sync::Arc;
use std::time::Duration;

use call_support::*;
use common::*;
use dlb_client::{Balance, Client};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn sdk(server: &dlb_server::RunningServer) -> Client {
    Client::builder([endpoint(server)])
        .report_interval(Duration::from_millis(20))
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn eager_connects_before_the_first_call_and_to_new_backends() {
    let (a, b) = (grpc_backend().await, grpc_backend().await);
    let server = dlb_server::spawn(config(vec![service_of("greeter", &[&a], &[1])]))
        .await
        .unwrap();
    let dlb = sdk(&server).await;
    let handle = dlb.service("greeter").await.unwrap();
    let channel = Balance::builder(handle.clone()).eager(true).build();
    eventually("a connected eagerly", || a.open_conns() == 1).await;
    let r = handle
        .add_server("b1", &b.addr.to_string(), 1)
        .await
        .unwrap();
    converge(&handle, r.version).await;
    eventually("b connected eagerly", || b.open_conns() == 1).await;
    assert_eq!(a.calls() + b.calls(), 0);
    assert_eq!(channel.open_connections().1, 2);
}

#[tokio::test]
async fn a_full_http2_connection_gets_a_sibling() {
    let a = grpc_backend().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    a.set(Mode::Gate(gate.clone()));
    let server = dlb_server::spawn(config(vec![service_of("greeter", &[&a], &[1])]))
        .await
        .unwrap();
    let dlb = sdk(&server).await;
    let handle = dlb.service("greeter").await.unwrap();
    let channel = Balance::builder(handle)
        .configure(|o| o.max_streams_per_connection = 2)
        .build();
    let client = HealthClient::new(channel.clone());
    let mut calls = Vec::new();
    for _ in 0..5 {
        let mut c = client.clone();
        calls.push(tokio::spawn(async move {
            c.check(HealthCheckRequest::default()).await
        }));
    }
    eventually("5 calls at the backend", || a.calls() == 5).await;
    // 2 + 2 + 1 streams.
    assert_eq!(a.open_conns(), 3);
    gate.add_permits(5);
    for c in calls {
        within("call", c).await.unwrap().unwrap();
    }
    assert_eq!(channel.open_connections().0, vec![("b0".to_owned(), 3)]);
}
