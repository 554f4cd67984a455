//! Issue 16: the call path over HTTP/1.1 ([`dlb_client::Balance`] with `Protocol::Http1`) against
//! real hyper servers and a real `dlbd`: weights, removal with calls in flight (keep-alive
//! connections closed after the last call), 5xx classification and retries of listed statuses.
#![allow(clippy::unwrap_used)]

mod call_support;
mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use call_support::*;
use common::*;
use dlb_client::call::{retry_defaults, Protocol};
use dlb_client::{Balance, Client};
use http_body_util::{BodyExt, Empty};
use tonic::Code;
use tower::ServiceExt;

async fn sdk(server: &dlb_server::RunningServer) -> Client {
    Client::builder([endpoint(server)])
        .report_interval(Duration::from_millis(20))
        .ack_delay(Duration::ZERO)
        .connect()
        .await
        .unwrap()
}

/// GET / through the balance; the status, after reading the whole body.
async fn get(b: &Balance) -> Result<u16, String> {
    let req = http::Request::get("/hello")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = b.clone().oneshot(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    if status == 200 {
        assert_eq!(&body[..], b"ok");
    }
    Ok(status)
}

async fn backends(n: usize) -> Vec<Backend> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(http_backend().await);
    }
    v
}

fn errors(b: &Balance, class: &str) -> u64 {
    b.counts()
        .errors
        .iter()
        .find(|(c, _)| *c == class)
        .unwrap()
        .1
}

#[tokio::test]
async fn weights_are_honoured_over_keep_alive_connections() {
    let bs = backends(3).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let weights = [1u32, 2, 5];
    let server = dlb_server::spawn(config(vec![service_of("web", &refs, &weights)]))
        .await
        .unwrap();
    let dlb = sdk(&server).await;
    let web = dlb.service("web").await.unwrap().http();
    let n = 4_000u64;
    for _ in 0..n {
        assert_eq!(get(&web).await.unwrap(), 200);
    }
    for (b, w) in bs.iter().zip(weights) {
        let p = f64::from(w) / 8.0;
        let (expected, sigma) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
        let got = b.calls() as f64;
        assert!((got - expected).abs() <= 4.0 * sigma, "weight {w}: {got}");
        // Sequential calls reuse one keep-alive connection per backend.
        assert_eq!(b.seen.conns.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
    assert_eq!(web.counts().requests, n);
}

#[tokio::test]
async fn a_removed_backend_finishes_its_calls_then_its_connections_close() {
    let bs = backends(2).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    bs[0].set(Mode::Gate(gate.clone()));
    let server = dlb_server::spawn(config(vec![service_of("web", &[&bs[0]], &[1])]))
        .await
        .unwrap();
    let dlb = sdk(&server).await;
    let handle = dlb.service("web").await.unwrap();
    let web = Balance::builder(handle.clone())
        .protocol(Protocol::Http1)
        .build();
    let mut in_flight = Vec::new();
    for _ in 0..3 {
        let w = web.clone();
        in_flight.push(tokio::spawn(async move { get(&w).await }));
    }
    eventually("3 calls at b0", || bs[0].calls() == 3).await;
    // HTTP/1.1: one connection per call in flight.
    assert_eq!(bs[0].open_conns(), 3);
    let r = handle
        .add_server("b1", &bs[1].addr.to_string(), 1)
        .await
        .unwrap();
    converge(&handle, r.version).await;
    let r = handle.remove_server("b0").await.unwrap();
    converge(&handle, r.version).await;
    for _ in 0..10 {
        assert_eq!(get(&web).await.unwrap(), 200);
    }
    assert_eq!(bs[1].calls(), 10);
    assert_eq!(bs[0].calls(), 3);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(bs[0].open_conns(), 3, "closed under running calls");
    gate.add_permits(3);
    for t in in_flight {
        assert_eq!(within("in-flight call", t).await.unwrap().unwrap(), 200);
    }
    // Not given back to a pool: closed once each call ended.
    eventually("b0's connections closed", || bs[0].open_conns() == 0).await;
}

#[tokio::test]
async fn status_5xx_is_a_failure_4xx_is_not_and_listed_statuses_are_retried_elsewhere() {
    let bs = backends(2).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let server = dlb_server::spawn(config(vec![service_of("web", &refs, &[1, 1])]))
        .await
        .unwrap();
    let dlb = sdk(&server).await;
    let handle = dlb.service("web").await.unwrap();
    let plain = handle.http();
    bs[0].set(Mode::Fail(Code::Internal)); // 500
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(get(&plain).await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 500).count(), 5);
    assert_eq!(errors(&plain, "status"), 5);
    bs[0].set(Mode::Fail(Code::NotFound)); // 404: the backend answered
    for _ in 0..10 {
        get(&plain).await.unwrap();
    }
    assert_eq!(errors(&plain, "status"), 5);

    // 503 listed by a local retry override: it goes to b1 instead.
    bs[0].set(Mode::Fail(Code::Unavailable)); // 503
    let mut retry = retry_defaults();
    retry.retry_on_http_statuses = vec![503];
    let retrying = Balance::builder(handle.clone())
        .protocol(Protocol::Http1)
        .retry(retry)
        .build();
    let (before, at_b0) = (plain.counts().retries, bs[0].calls());
    for _ in 0..10 {
        assert_eq!(get(&retrying).await.unwrap(), 200);
    }
    // Every 503 was retried once, on b1 (never on b0 again).
    let refused = bs[0].calls() - at_b0;
    assert!(refused > 0);
    assert_eq!(retrying.counts().retries - before, refused);

    // A connection error is a failure of the backend too.
    bs[1].kill();
    bs[0].set(Mode::Ok);
    let mut ok = 0;
    for _ in 0..10 {
        if get(&plain).await == Ok(200) {
            ok += 1;
        }
    }
    // Connect errors go to the other backend: every call succeeds.
    assert_eq!(ok, 10);
    assert!(errors(&plain, "connect") > 0);
}
