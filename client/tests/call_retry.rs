//! Issue 16: retries and hedging of the call path under the retry budget, against real tonic
//! servers and a real `dlbd` whose service policy turns them on.
#![allow(clippy::unwrap_used)]

mod call_support;
mod common;

use std::time::{Duration, Instant};

use call_support::*;
use common::*;
use dlb::proto;
use dlb_client::Client;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn sdk(server: &dlb_server::RunningServer) -> Client {
    Client::builder([endpoint(server)])
        .report_interval(Duration::from_millis(20))
        .ack_delay(Duration::ZERO)
        .connect()
        .await
        .unwrap()
}

async fn backends(n: usize) -> Vec<Backend> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(grpc_backend().await);
    }
    v
}

#[tokio::test]
async fn a_backend_failing_everything_cannot_multiply_load_beyond_the_budget() {
    let bs = backends(4).await;
    for b in &bs {
        b.set(Mode::Fail(Code::Unavailable));
    }
    let refs: Vec<&Backend> = bs.iter().collect();
    let mut svc = service_of("greeter", &refs, &[1, 1, 1, 1]);
    svc.policy.retry = Some(proto::RetryPolicy {
        max_attempts: 4,
        retry_on_grpc_codes: vec![Code::Unavailable as u32],
        backoff_base_ms: 1,
        backoff_max_ms: 2,
        ..Default::default()
    });
    // ratio 0.1, floor 1/s over 10 s: at most 0.1 × N + 10 retries in the window.
    svc.policy.retry_budget = Some(proto::RetryBudget {
        ratio: 0.1,
        min_per_second: 1,
        window_seconds: 10,
    });
    let server = dlb_server::spawn(config(vec![svc])).await.unwrap();
    let dlb = sdk(&server).await;
    let channel = dlb.channel("greeter").unwrap();
    let mut client = HealthClient::new(channel.clone());
    let n = 300u64;
    for _ in 0..n {
        let s = client
            .check(HealthCheckRequest::default())
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unavailable);
    }
    let attempts: u64 = bs.iter().map(Backend::calls).sum();
    let budget = n + n / 10 + 10;
    // Without a budget: 4 × 300 = 1,200 attempts.
    assert!(
        attempts <= budget,
        "{attempts} attempts at the servers > {budget}"
    );
    let counts = channel.counts();
    assert_eq!(attempts, n + counts.retries);
    assert!(counts.retries >= n / 10, "{counts:?}");
    assert!(counts.budget_exhausted > 0, "{counts:?}");
}

#[tokio::test]
async fn hedging_cuts_the_tail_of_one_slow_backend_within_the_budget() {
    let bs = backends(4).await;
    bs[3].set(Mode::Delay(Duration::from_millis(100)));
    let refs: Vec<&Backend> = bs.iter().collect();
    let mut svc = service_of("greeter", &refs, &[1, 1, 1, 1]);
    svc.policy.hedge = Some(proto::HedgePolicy {
        delay_ms: 10,
        max_hedges: 1,
        ..Default::default()
    });
    svc.policy.retry_budget = Some(proto::RetryBudget {
        ratio: 0.5,
        min_per_second: 1,
        window_seconds: 10,
    });
    let server = dlb_server::spawn(config(vec![svc])).await.unwrap();
    let dlb = sdk(&server).await;
    let channel = dlb.channel("greeter").unwrap();
    let mut client = HealthClient::new(channel.clone());
    let n = 200u64;
    let mut latencies = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        client.check(HealthCheckRequest::default()).await.unwrap();
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let p99 = quantile(&latencies, 0.99);
    // A quarter of the calls start on the slow backend; the hedge answers them.
    assert!(
        p99 < Duration::from_millis(100),
        "p99 {p99:?} not below the slow backend's 100 ms"
    );
    let counts = channel.counts();
    assert!(counts.hedges >= n / 5, "{counts:?}");
    // Extra load within the budget: hedges ≤ 0.5 × n + 10.
    assert!(counts.hedges <= n / 2 + 10, "{counts:?}");
    // At the servers: every request once, plus at most the hedges (a hedge cancelled before
    // its stream reached the handler is not counted there).
    let attempts: u64 = bs.iter().map(Backend::calls).sum();
    assert!(
        attempts >= n && attempts <= n + counts.hedges,
        "{attempts} attempts"
    );
}
