//! Issue 16: a generated tonic client over the DLB transport ([`dlb_client::Balance`]) against
//! real tonic servers on loopback and a real `dlbd`: weights, a killed backend, outlier
//! detection fed only by the call path, removal with calls in flight, deadlines, classification.
#![allow(clippy::unwrap_used)]

mod call_support;
mod common;

use std::sync::Arc;
use std::time::Duration;

use call_support::*;
use common::*;
use dlb::proto;
use dlb_client::{Client, ServiceHandle};
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

async fn check(
    c: &mut HealthClient<dlb_client::Balance>,
) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
    c.check(HealthCheckRequest::default()).await
}

async fn backends(n: usize) -> Vec<Backend> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(grpc_backend().await);
    }
    v
}

#[tokio::test]
async fn weights_are_honoured_within_4_sigma_over_6000_calls() {
    let bs = backends(4).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let weights = [1u32, 2, 3, 4];
    let server = dlb_server::spawn(config(vec![service_of("greeter", &refs, &weights)]))
        .await
        .unwrap();
    let dlb = sdk(&server).await;
    // The one line a tonic user writes.
    let mut client = HealthClient::new(dlb.channel("greeter").unwrap());
    let n = 6_000u64;
    for _ in 0..n {
        check(&mut client).await.unwrap();
    }
    let total: u32 = weights.iter().sum();
    for (b, w) in bs.iter().zip(weights) {
        let p = f64::from(w) / f64::from(total);
        let expected = n as f64 * p;
        let sigma = (n as f64 * p * (1.0 - p)).sqrt();
        let got = b.calls() as f64;
        assert!(
            (got - expected).abs() <= 4.0 * sigma,
            "weight {w}: {got} calls, expected {expected} ± {}",
            4.0 * sigma
        );
        // One multiplexed HTTP/2 connection per backend.
        assert_eq!(b.seen.conns.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
    // The call path counted every request, no error, and its latency histogram is exported.
    let handle = dlb.service("greeter").await.unwrap();
    let counts = handle.call_counts();
    assert_eq!(counts.requests, n);
    assert_eq!(counts.timed, n);
    assert!(counts.errors.iter().all(|(_, e)| *e == 0), "{counts:?}");
    let mut text = String::new();
    dlb.metrics().encode_text(&mut text).unwrap();
    assert!(
        text.contains("dlb_sdk_call_requests_total{service=\"greeter\"} 6000"),
        "{text}"
    );
    assert!(text.contains("dlb_sdk_call_latency_seconds_count{service=\"greeter\"} 6000"));
}

#[tokio::test]
async fn a_killed_backend_stops_receiving_calls_and_no_call_fails_with_retries_on() {
    let bs = backends(4).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    // Retries on in the service's policy (every SDK agrees), UNAVAILABLE listed: calls cut
    // mid-flight by the kill are retried too.
    let mut svc = service_of("greeter", &refs, &[1, 1, 1, 1]);
    svc.policy.retry = Some(proto::RetryPolicy {
        retry_on_grpc_codes: vec![Code::Unavailable as u32],
        ..Default::default()
    });
    let server = dlb_server::spawn(config(vec![svc])).await.unwrap();
    let dlb = sdk(&server).await;
    let channel = dlb.channel("greeter").unwrap();
    let mut client = HealthClient::new(channel.clone());
    for _ in 0..200 {
        check(&mut client).await.unwrap();
    }
    assert!(bs[2].calls() > 0);
    bs[2].kill();
    let at_kill = bs[2].calls();
    // Concurrent callers while and after it dies: none fails.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                check(&mut c).await.unwrap();
            }
        }));
    }
    // No tight bound: this VM stalls; a hang still fails the test (after a minute).
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("callers stuck")
            .unwrap();
    }
    assert_eq!(bs[2].calls(), at_kill, "the killed backend got calls");
    let counts = channel.counts();
    assert!(counts.retries > 0, "{counts:?}");
    let connect = counts
        .errors
        .iter()
        .find(|(c, _)| *c == "connect")
        .unwrap()
        .1;
    assert!(connect > 0, "{counts:?}");
}

#[tokio::test]
async fn a_backend_answering_unavailable_is_ejected_by_outlier_detection_fed_by_the_call_path() {
    let bs = backends(4).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let mut svc = service_of("greeter", &refs, &[1, 1, 1, 1]);
    svc.policy.outlier_detection = Some(proto::OutlierDetection {
        consecutive_failures: 5,
        max_ejection_percent: 50,
        base_ejection_ms: 3_600_000,
        max_ejection_ms: 3_600_000,
        ..Default::default()
    });
    let server = dlb_server::spawn(config(vec![svc])).await.unwrap();
    let dlb = sdk(&server).await;
    let handle = dlb.service("greeter").await.unwrap();
    let mut client = HealthClient::new(handle.channel());
    bs[1].set(Mode::Fail(Code::Unavailable));
    let mut unavailable = 0;
    within("b1 ejected", async {
        loop {
            for _ in 0..20 {
                if let Err(s) = check(&mut client).await {
                    assert_eq!(s.code(), Code::Unavailable);
                    unavailable += 1;
                }
            }
            if handle
                .backends()
                .iter()
                .any(|b| b.server_id == "b1" && !b.eligible)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(unavailable >= 5);
    // No call reaches it any more.
    let before = bs[1].calls();
    for _ in 0..100 {
        check(&mut client).await.unwrap();
    }
    assert_eq!(bs[1].calls(), before);
    // The others stay in.
    assert_eq!(handle.backends().iter().filter(|b| b.eligible).count(), 3);
}

async fn converge_removal(handle: &ServiceHandle, id: &str) {
    let r = handle.remove_server(id).await.unwrap();
    converge(handle, r.version).await;
}

#[tokio::test]
async fn a_removed_backend_finishes_its_calls_then_its_connection_closes() {
    let bs = backends(2).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    bs[0].set(Mode::Gate(gate.clone()));
    // Only b0 at first.
    let server = dlb_server::spawn(config(vec![service_of("greeter", &[&bs[0]], &[1])]))
        .await
        .unwrap();
    let dlb = sdk(&server).await;
    let handle = dlb.service("greeter").await.unwrap();
    let client = HealthClient::new(handle.channel());
    let mut in_flight = Vec::new();
    for _ in 0..4 {
        let mut c = client.clone();
        in_flight.push(tokio::spawn(async move { check(&mut c).await }));
    }
    eventually("4 calls at b0", || bs[0].calls() == 4).await;
    assert_eq!(bs[0].open_conns(), 1);
    // b1 joins, b0 leaves.
    let r = handle
        .add_server("b1", &bs[1].addr.to_string(), 1)
        .await
        .unwrap();
    converge(&handle, r.version).await;
    converge_removal(&handle, "b0").await;
    // New calls go to b1.
    let mut c = client.clone();
    for _ in 0..20 {
        check(&mut c).await.unwrap();
    }
    assert_eq!(bs[1].calls(), 20);
    assert_eq!(bs[0].calls(), 4);
    // b0's connection stays open while its calls run…
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(bs[0].open_conns(), 1, "closed under running calls");
    // …they finish fine…
    gate.add_permits(4);
    for t in in_flight {
        within("in-flight call", t).await.unwrap().unwrap();
    }
    // …and then it closes.
    eventually("b0's connection closed", || bs[0].open_conns() == 0).await;
    assert_eq!(bs[1].open_conns(), 1);
}

#[tokio::test]
async fn grpc_timeout_is_honoured_and_statuses_are_classified() {
    let bs = backends(1).await;
    let server = dlb_server::spawn(config(vec![service_of("greeter", &[&bs[0]], &[1])]))
        .await
        .unwrap();
    let dlb = sdk(&server).await;
    let handle = dlb.service("greeter").await.unwrap();
    let mut client = HealthClient::new(handle.channel());
    let errors = |class: &str| {
        handle
            .call_counts()
            .errors
            .iter()
            .find(|(c, _)| *c == class)
            .unwrap()
            .1
    };

    // A deadline: the call ends with DEADLINE_EXCEEDED while the backend still holds it.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    bs[0].set(Mode::Gate(gate.clone()));
    let mut req = tonic::Request::new(HealthCheckRequest::default());
    req.set_timeout(Duration::from_millis(50));
    let s = within("deadline", client.check(req)).await.unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    assert_eq!(errors("deadline"), 1);
    gate.add_permits(100);

    // NOT_FOUND, INVALID_ARGUMENT: the backend answered — not failures.
    for code in [Code::NotFound, Code::InvalidArgument] {
        bs[0].set(Mode::Fail(code));
        assert_eq!(check(&mut client).await.unwrap_err().code(), code);
    }
    assert_eq!(errors("status"), 0);
    // UNAVAILABLE, INTERNAL (trailers-only): failures.
    for code in [Code::Unavailable, Code::Internal] {
        bs[0].set(Mode::Fail(code));
        assert_eq!(check(&mut client).await.unwrap_err().code(), code);
    }
    assert_eq!(errors("status"), 2);
    // A status in the trailers after a message (server streaming): read from the trailers.
    bs[0].set(Mode::Fail(Code::ResourceExhausted));
    let mut stream = client
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    assert_eq!(
        stream.message().await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    drop(stream);
    eventually("trailer status counted", || errors("status") == 3).await;
    bs[0].set(Mode::Ok);
    let mut stream = client
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    while stream.message().await.unwrap().is_some() {}
    assert_eq!(errors("status"), 3);
}

#[tokio::test]
async fn a_backend_that_never_answers_is_ejected_when_its_calls_pass_their_deadline() {
    let bs = backends(4).await;
    // b2 accepts every call and never answers.
    bs[2].set(Mode::Gate(Arc::new(tokio::sync::Semaphore::new(0))));
    let refs: Vec<&Backend> = bs.iter().collect();
    let mut svc = service_of("greeter", &refs, &[1, 1, 1, 1]);
    svc.policy.outlier_detection = Some(proto::OutlierDetection {
        consecutive_failures: 3,
        max_ejection_percent: 50,
        base_ejection_ms: 3_600_000,
        max_ejection_ms: 3_600_000,
        ..Default::default()
    });
    let server = dlb_server::spawn(config(vec![svc])).await.unwrap();
    let dlb = sdk(&server).await;
    let handle = dlb.service("greeter").await.unwrap();
    let mut client = HealthClient::new(handle.channel());
    within("b2 ejected", async {
        loop {
            for _ in 0..8 {
                let mut req = tonic::Request::new(HealthCheckRequest::default());
                req.set_timeout(Duration::from_millis(30));
                if let Err(s) = client.check(req).await {
                    assert_eq!(s.code(), Code::DeadlineExceeded);
                }
            }
            if handle
                .backends()
                .iter()
                .any(|b| b.server_id == "b2" && !b.eligible)
            {
                break;
            }
        }
    })
    .await;
    let deadline = handle
        .call_counts()
        .errors
        .iter()
        .find(|(c, _)| *c == "deadline")
        .unwrap()
        .1;
    assert!(deadline >= 3);
}
