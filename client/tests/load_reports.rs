//! Load reports reach the control plane: in-flight calls held by the SDK show up in dlbd's
//! `dlb_in_flight` gauge, and go back to zero when the calls end.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use dlb_client::Client;

async fn in_flight(addr: std::net::SocketAddr) -> Option<f64> {
    sample(&scrape(addr).await, "dlb_in_flight{service=\"default\"}")
}

#[tokio::test]
async fn in_flight_counts_are_reported() {
    let server = spawn_server().await;
    let metrics = server.metrics_addr().unwrap();
    let client = Client::builder([endpoint(&server)])
        .report_interval(Duration::from_millis(20))
        .connect()
        .await
        .unwrap();
    let default = client.default_service().await.unwrap();
    client.add_server("a", "127.0.0.1:8001", 1).await.unwrap();
    let r = client.add_server("b", "127.0.0.1:8002", 1).await.unwrap();
    converge(&default, r.version).await;

    let guards: Vec<_> = (0..3)
        .map(|_| default.get_next_server(None).unwrap())
        .collect();
    within("in-flight 3 at the server", async {
        while in_flight(metrics).await != Some(3.0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for (i, g) in guards.into_iter().enumerate() {
        if i == 0 {
            g.success();
        } else {
            g.failure();
        }
    }
    within("in-flight back to 0", async {
        while in_flight(metrics).await.unwrap_or(0.0) != 0.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    server.shutdown().await.unwrap();
}
