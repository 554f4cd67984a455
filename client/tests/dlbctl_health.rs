//! `dlbctl` and the health settings of issue 9: `policy set --outlier-* / --panic-*`, and the
//! panic state in `list`, `services` and their JSON; malformed values fail with exit code 2,
//! name the field, and change nothing.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::Value;

async fn dlbctl(endpoint: &str, args: &[&str]) -> (i32, String, String) {
    let out = run_dlbctl(endpoint, args).await;
    (out.code, out.stdout, out.stderr)
}

async fn ok(endpoint: &str, args: &[&str]) -> String {
    dlbctl_ok(endpoint, args).await
}

#[tokio::test]
async fn outlier_and_panic_settings_and_panic_state() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
        ok(&ep, &["add-server", id, &format!("127.0.0.1:{}", 8001 + i)]).await;
    }
    let out = ok(
        &ep,
        &[
            "policy",
            "set",
            "--outlier-consecutive",
            "3",
            "--outlier-max-percent",
            "50",
            "--panic-threshold",
            "50",
            "--panic-mode",
            "fail",
        ],
    )
    .await;
    assert!(out.contains("outlier=on(consecutive=3"), "{out}");
    assert!(out.contains("panic_threshold=50 panic_mode=fail"), "{out}");
    let p = ok(&ep, &["policy", "get"]).await;
    assert!(p.contains("max_percent=50"), "{p}");

    // Malformed: exit 2, the field named, nothing changed.
    for (args, field) in [
        (
            vec!["policy", "set", "--panic-mode", "sometimes"],
            "panic.mode",
        ),
        (
            vec!["policy", "set", "--outlier-max-percent", "150"],
            "max_ejection_percent",
        ),
        (
            vec!["policy", "set", "--panic-threshold", "101"],
            "threshold_percent",
        ),
    ] {
        let (code, _, stderr) = dlbctl(&ep, &args).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(field), "{args:?}: {stderr}");
    }
    assert_eq!(ok(&ep, &["policy", "get"]).await, p);

    // 1 of 4 eligible: in panic, shown by list and services.
    for id in ["a", "b", "c"] {
        ok(&ep, &["health-fail", id]).await;
    }
    let list = ok(&ep, &["list"]).await;
    assert!(
        list.contains("panic=ACTIVE (1/4 eligible, mode fail)"),
        "{list}"
    );
    let v: Value = serde_json::from_str(ok(&ep, &["list", "--json"]).await.trim()).unwrap();
    assert_eq!(v["panic"]["active"], true);
    assert_eq!(v["panic"]["mode"], "fail");
    let services = ok(&ep, &["services"]).await;
    assert!(services.contains("panic=ACTIVE"), "{services}");
    // Turning outlier detection off keeps the panic settings.
    let out = ok(&ep, &["policy", "set", "--outlier-off"]).await;
    assert!(out.contains("outlier=off panic_threshold=50"), "{out}");
    server.shutdown().await.unwrap();
}
