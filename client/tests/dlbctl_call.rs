//! `dlbctl` and the call-path policy of issue 16: `policy set --algorithm peak_ewma --retry* /
//! --budget-* / --hedge* / --ewma-*`, `policy get` printing it, the SDK seeing it in its local
//! policy, and `GetNextServer` answering from a Peak-EWMA picker in dlbd. Malformed values fail
//! with exit code 2, name the field, and change nothing.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use dlb::proto;
use dlb_client::Client;
use serde_json::Value;

#[tokio::test]
async fn call_policy_flags_reach_the_sdk_and_bad_values_change_nothing() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        dlbctl_ok(&ep, &["add-server", id, &format!("127.0.0.1:{}", 8001 + i)]).await;
    }
    let out = dlbctl_ok(
        &ep,
        &[
            "policy",
            "set",
            "--algorithm",
            "peak_ewma",
            "--ewma-decay-ms",
            "2000",
            "--retry",
            "--retry-grpc-codes",
            "14,8",
            "--budget-ratio",
            "0.5",
            "--hedge-delay-ms",
            "40",
        ],
    )
    .await;
    assert!(out.contains("algorithm=peak_ewma"), "{out}");
    assert!(
        out.contains("retry=on(attempts=3 grpc_codes=8,14 http_statuses=- backoff_ms=25..250"),
        "{out}"
    );
    assert!(
        out.contains("budget(ratio=0.5 min_per_second=10 window_s=10)"),
        "{out}"
    );
    assert!(out.contains("hedge=on(delay_ms=40 max_hedges=1)"), "{out}");
    assert!(
        out.contains("peak_ewma(decay_ms=2000 default_rtt_us=30000)"),
        "{out}"
    );

    for (args, field) in [
        (
            vec!["policy", "set", "--retry-attempts", "11"],
            "policy.retry.max_attempts",
        ),
        (
            vec!["policy", "set", "--retry-http-statuses", "200"],
            "retry_on_http_statuses",
        ),
        (
            vec!["policy", "set", "--budget-ratio", "50"],
            "retry_budget.ratio",
        ),
        (
            vec!["policy", "set", "--hedge-max", "9"],
            "hedge.max_hedges",
        ),
        (
            vec!["policy", "set", "--ewma-decay-ms", "5"],
            "peak_ewma.decay_ms",
        ),
    ] {
        let out = run_dlbctl(&ep, &args).await;
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(field), "{args:?}: {}", out.stderr);
    }
    let json: Value =
        serde_json::from_str(dlbctl_ok(&ep, &["policy", "get", "--json"]).await.trim()).unwrap();
    let call = json["policy"]["call"].as_str().unwrap();
    assert!(call.contains("hedge=on(delay_ms=40"), "{call}");

    // The SDK routes with the same policy, and picks with Peak-EWMA.
    let client = Client::builder([ep.clone()]).connect().await.unwrap();
    let handle = client.service("default").await.unwrap();
    eventually("three backends", || handle.backends().len() == 3).await;
    let p = handle.local_policy().unwrap();
    assert_eq!(p.algorithm, proto::Algorithm::PeakEwma as i32);
    assert_eq!(p.retry.unwrap().retry_on_grpc_codes, vec![14, 8]);
    assert_eq!(p.hedge.unwrap().delay_ms, 40);
    let cfg = dlb::call::call_config(&handle.local_policy().unwrap());
    assert_eq!(cfg.budget.ratio, 0.5);

    // SetPolicy over gRPC refuses the same values (INVALID_ARGUMENT naming the field).
    let mut bad = handle.local_policy().unwrap();
    bad.retry_budget = Some(proto::RetryBudget {
        window_seconds: 61,
        ..Default::default()
    });
    match handle.set_policy(bad).await {
        Err(dlb_client::Error::InvalidArgument(m)) => {
            assert!(m.contains("policy.retry_budget.window_seconds"), "{m}")
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    assert_eq!(
        handle
            .get_policy()
            .await
            .unwrap()
            .retry_budget
            .unwrap()
            .ratio,
        0.5
    );

    // Server-side picks answer from the same Peak-EWMA picker code.
    let r = handle.get_next_server_remote(None).await.unwrap();
    assert!(["a", "b", "c"].contains(&r.server.unwrap().server_id.as_str()));

    // Turning things off.
    let out = dlbctl_ok(&ep, &["policy", "set", "--retry-off", "--hedge-off"]).await;
    assert!(out.contains("retry=off"), "{out}");
    assert!(out.contains("hedge=off"), "{out}");
}
