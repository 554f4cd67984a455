//! `dlbctl` and slow start / the SDK circuit breaker (issue 9 items 6 and 8): `policy set
//! --slow-start-* / --breaker-* / --max-concurrent-calls`, and `list` showing the circuits SDK
//! sessions report open; malformed values fail with exit code 2, name the field, and change
//! nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use dlb_client::Client;
use serde_json::Value;

async fn dlbctl(endpoint: &str, args: &[&str]) -> (i32, String, String) {
    let out = run_dlbctl(endpoint, args).await;
    (out.code, out.stdout, out.stderr)
}

async fn ok(endpoint: &str, args: &[&str]) -> String {
    dlbctl_ok(endpoint, args).await
}

#[tokio::test]
async fn slow_start_and_breaker_flags_and_open_circuits_in_list() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    for (i, id) in ["a", "b"].iter().enumerate() {
        ok(&ep, &["add-server", id, &format!("127.0.0.1:{}", 8001 + i)]).await;
    }
    let out = ok(
        &ep,
        &[
            "policy",
            "set",
            "--slow-start-ms",
            "5000",
            "--breaker-consecutive",
            "2",
            "--breaker-base-ms",
            "60000",
            "--max-concurrent-calls",
            "10",
        ],
    )
    .await;
    assert!(out.contains("slow_start=on(window_ms=5000"), "{out}");
    assert!(out.contains("breaker=on(consecutive=2"), "{out}");
    assert!(out.contains("max_concurrent=10"), "{out}");

    // Malformed: exit 2, the field named, nothing changed.
    for (args, field) in [
        (
            vec!["policy", "set", "--slow-start-ms", "5"],
            "slow_start.window_ms",
        ),
        (
            vec!["policy", "set", "--breaker-failure-rate", "101"],
            "failure_rate_percent",
        ),
    ] {
        let (code, _, stderr) = dlbctl(&ep, &args).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(field), "{args:?}: {stderr}");
    }
    let p = ok(&ep, &["policy", "get"]).await;
    assert!(p.contains("slow_start=on(window_ms=5000"), "{p}");

    // An SDK opens "a"'s circuit (2 failures); dlbctl list shows it.
    let client = Client::builder([ep.clone()])
        .report_interval(Duration::from_millis(20))
        .connect()
        .await
        .unwrap();
    let handle = client.service("default").await.unwrap();
    eventually("two backends", || handle.backends().len() == 2).await;
    let mut failures = 0;
    while failures < 2 {
        let g = handle.get_next_server(None).unwrap();
        if g.server_id() == "a" {
            g.failure();
            failures += 1;
        } else {
            g.success();
        }
    }
    within("dlbctl list to show the open circuit", async {
        loop {
            let out = ok(&ep, &["list"]).await;
            if out.contains("circuit a: open in 1 SDK session(s)") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let json: Value = serde_json::from_str(ok(&ep, &["list", "--json"]).await.trim()).unwrap();
    assert_eq!(json["circuits"][0]["server_id"], "a");
    assert_eq!(json["circuits"][0]["open_sessions"], 1);
    assert!(json["servers"][0]["ready_since_ms"].as_u64().unwrap() > 0);

    let out = ok(
        &ep,
        &["policy", "set", "--breaker-off", "--slow-start-ms", "0"],
    )
    .await;
    assert!(out.contains("slow_start=off breaker=off"), "{out}");
}
