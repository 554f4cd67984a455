//! `dlbctl` end to end: the real binary against a real `dlbd` — each seed command, `watch`, and a
//! table of malformed requests that must fail with the right exit code, name the field on
//! stderr, and change nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn dlbctl(endpoint: &str, args: &[&str]) -> Out {
    let out = within(
        &format!("dlbctl {args:?}"),
        Command::new(env!("CARGO_BIN_EXE_dlbctl"))
            .arg("--endpoint")
            .arg(endpoint)
            .args(args)
            .env_remove("DLB_ENDPOINT")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ok(endpoint: &str, args: &[&str]) -> String {
    let out = dlbctl(endpoint, args).await;
    assert_eq!(out.code, 0, "dlbctl {args:?} failed: {}", out.stderr);
    out.stdout
}

fn json(s: &str) -> Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[tokio::test]
async fn seed_commands() {
    let server = spawn_server().await;
    let ep = endpoint(&server);

    let out = ok(&ep, &["add-server", "web-1", "127.0.0.1:8080"]).await;
    assert!(
        out.starts_with("added web-1 127.0.0.1:8080 w=1 healthy in default"),
        "{out}"
    );
    // The seed's names work as aliases.
    let out = ok(
        &ep,
        &[
            "--json",
            "add_server",
            "web-2",
            "127.0.0.1:8081",
            "--weight",
            "5",
        ],
    )
    .await;
    let v = json(&out);
    assert_eq!(v["server"]["server_id"], "web-2");
    assert_eq!(v["server"]["weight"], 5);
    assert_eq!(v["service"], "default");
    ok(
        &ep,
        &[
            "add-server",
            "web-3",
            "db.internal:5432",
            "--hash-key",
            "k3",
            "--meta",
            "zone=a",
        ],
    )
    .await;

    let list = json(&ok(&ep, &["list", "--json"]).await);
    let ids: Vec<_> = list["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["server_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["web-1", "web-2", "web-3"]);
    assert_eq!(list["servers"][2]["metadata"]["zone"], "a");
    assert_eq!(list["servers"][2]["hash_key"], "k3");
    let text = ok(&ep, &["list"]).await;
    assert!(
        text.contains("web-3 db.internal:5432 w=1 healthy hash_key=k3 zone=a"),
        "{text}"
    );

    let out = ok(&ep, &["health_check_failed", "web-1"]).await;
    assert!(out.contains("web-1") && out.contains("unhealthy"), "{out}");
    let v = json(&ok(&ep, &["--json", "health-fail", "web-2"]).await);
    assert_eq!(v["server"]["health"], "unhealthy");
    // Only web-3 is eligible: the server-side pick must say so.
    for _ in 0..5 {
        let out = ok(&ep, &["get_next_server"]).await;
        assert_eq!(out.trim(), "web-3 db.internal:5432");
    }
    let v = json(&ok(&ep, &["health_check_passed", "web-1", "--json"]).await);
    assert_eq!(v["server"]["health"], "healthy");
    ok(&ep, &["health-pass", "web-2"]).await;
    let v = json(&ok(&ep, &["next", "--key", "k", "--json"]).await);
    assert!(v["server"]["server_id"]
        .as_str()
        .unwrap()
        .starts_with("web-"));

    let v = json(
        &ok(
            &ep,
            &[
                "update-server",
                "web-1",
                "--weight",
                "7",
                "--drain",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(v["server"]["weight"], 7);
    assert_eq!(v["server"]["draining"], true);

    let out = ok(&ep, &["remove_server", "web-1"]).await;
    assert!(out.starts_with("removed web-1 from default"), "{out}");
    ok(&ep, &["remove-server", "web-2"]).await;
    let list = json(&ok(&ep, &["list", "--json"]).await);
    assert_eq!(list["servers"].as_array().unwrap().len(), 1);

    let out = ok(
        &ep,
        &[
            "policy",
            "set",
            "--algorithm",
            "maglev",
            "--bounded-load",
            "1.25",
        ],
    )
    .await;
    assert!(out.contains("algorithm=maglev bounded_load=1.25"), "{out}");
    let v = json(
        &ok(
            &ep,
            &[
                "policy",
                "set",
                "--sticky",
                "fallback",
                "--sticky-ttl",
                "60",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(v["policy"]["algorithm"], "maglev", "other fields are kept");
    assert_eq!(v["policy"]["sticky_mode"], "fallback");
    assert_eq!(v["policy"]["sticky_ttl_seconds"], 60);
    let out = ok(&ep, &["policy", "get"]).await;
    assert!(out.contains("sticky=fallback"), "{out}");

    let out = ok(&ep, &["-s", "api", "add-server", "api-1", "[::1]:9000"]).await;
    assert!(out.contains("in api"), "{out}");
    let v = json(&ok(&ep, &["services", "--json"]).await);
    let names: Vec<_> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["api", "default"]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn watch_streams_adds_in_order() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    ok(&ep, &["add-server", "s0", "127.0.0.1:7000"]).await;

    let mut child = Command::new(env!("CARGO_BIN_EXE_dlbctl"))
        .args(["--endpoint", &ep, "watch", "--json", "--count", "4"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The first line is the full snapshot; only then is the session certainly subscribed.
    let first = within("the snapshot line", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    let first = json(&first);
    assert_eq!(first["full"], true);
    assert_eq!(first["upserts"][0]["server_id"], "s0");

    for i in 1..=3 {
        ok(
            &ep,
            &["add-server", &format!("s{i}"), &format!("127.0.0.1:700{i}")],
        )
        .await;
    }
    let mut last = first["version"]["version"].as_u64().unwrap();
    for i in 1..=3 {
        let line = within("a delta line", lines.next_line())
            .await
            .unwrap()
            .unwrap();
        let v = json(&line);
        assert_eq!(v["full"], false, "{line}");
        assert_eq!(v["upserts"][0]["server_id"], format!("s{i}"), "{line}");
        let version = v["version"]["version"].as_u64().unwrap();
        assert!(version > last, "{line}");
        assert_eq!(v["base"]["version"].as_u64().unwrap(), last, "{line}");
        last = version;
    }
    let status = within("watch to exit", child.wait()).await.unwrap();
    assert!(status.success());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn watch_prints_human_lines() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    ok(&ep, &["add-server", "web-1", "127.0.0.1:8080"]).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_dlbctl"))
        .args(["--endpoint", &ep, "watch", "--count", "2"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within("snapshot", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(
        first.contains(" full policy=round_robin +web-1 127.0.0.1:8080 w=1 healthy"),
        "{first}"
    );
    ok(&ep, &["health-fail", "web-1"]).await;
    let second = within("delta", lines.next_line()).await.unwrap().unwrap();
    assert!(second.starts_with('v'), "{second}");
    assert!(
        second.contains("~web-1 127.0.0.1:8080 w=1 unhealthy (admin: health_check_failed)"),
        "watch does not show the reason: {second}"
    );
    assert!(within("exit", child.wait()).await.unwrap().success());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn list_shows_why_a_backend_takes_no_traffic() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    ok(&ep, &["add-server", "a", "127.0.0.1:8081"]).await;
    ok(&ep, &["add-server", "b", "127.0.0.1:8082"]).await;
    ok(&ep, &["add-server", "c", "127.0.0.1:8083"]).await;
    ok(&ep, &["health-fail", "a"]).await;
    ok(&ep, &["update-server", "b", "--drain"]).await;
    ok(&ep, &["health-fail", "b"]).await;
    let out = ok(&ep, &["list"]).await;
    let line = |id: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("no line for {id}: {out}"))
            .trim()
            .to_owned()
    };
    assert_eq!(
        line("a"),
        "a 127.0.0.1:8081 w=1 unhealthy (admin: health_check_failed) source=api"
    );
    assert_eq!(
        line("b"),
        "b 127.0.0.1:8082 w=1 unhealthy (admin: health_check_failed; draining) source=api"
    );
    assert_eq!(line("c"), "c 127.0.0.1:8083 w=1 healthy source=api");
    let j = json(&ok(&ep, &["--json", "list"]).await);
    assert_eq!(j["servers"][0]["reason"], "admin: health_check_failed");
    assert_eq!(j["servers"][2]["reason"], "");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn policy_set_and_update_server_refuse_a_stale_version() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    let r = json(&ok(&ep, &["--json", "add-server", "a", "127.0.0.1:8081"]).await);
    let v = r["version"]["version"].as_u64().unwrap();
    ok(&ep, &["add-server", "b", "127.0.0.1:8082"]).await;
    // Another admin wrote since `v` was read: the compare-and-set fails with exit 5.
    let out = dlbctl(
        &ep,
        &[
            "update-server",
            "a",
            "--weight",
            "7",
            "--expected-version",
            &v.to_string(),
        ],
    )
    .await;
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(out.stderr.contains("not the expected"), "{}", out.stderr);
    let list = json(&ok(&ep, &["--json", "list"]).await);
    assert_eq!(
        list["servers"][0]["weight"], 1,
        "a stale write changed something"
    );
    let now = list["version"]["version"].as_u64().unwrap();
    ok(
        &ep,
        &[
            "update-server",
            "a",
            "--weight",
            "7",
            "--expected-version",
            &now.to_string(),
        ],
    )
    .await;
    // `policy set` reads and writes with the version it read: it succeeds when nobody races it.
    let out = ok(&ep, &["policy", "set", "--algorithm", "maglev"]).await;
    assert!(out.contains("algorithm=maglev"), "{out}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_requests_fail_cleanly_and_change_nothing() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    ok(&ep, &["add-server", "existing", "127.0.0.1:8080"]).await;
    let before = ok(&ep, &["list", "--json"]).await;
    let services_before = ok(&ep, &["services", "--json"]).await;
    let long = "a".repeat(129);
    let huge = "h".repeat(9_000);
    let huge_address = format!("{}:80", "h".repeat(9_000));

    // (args, exit code, text stderr must contain)
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["add-server", "a b", "127.0.0.1:1"], 2, "server_id"),
        (vec!["add-server", "", "127.0.0.1:1"], 2, "server_id"),
        (vec!["add-server", &long, "127.0.0.1:1"], 2, "server_id"),
        (vec!["add-server", "é", "127.0.0.1:1"], 2, "server_id"),
        (vec!["add-server", "x", "127.0.0.1"], 2, "address"),
        (vec!["add-server", "x", "127.0.0.1:0"], 2, "address"),
        (vec!["add-server", "x", "127.0.0.1:65536"], 2, "address"),
        (vec!["add-server", "x", "300.1.1.1:80"], 2, "address"),
        (vec!["add-server", "x", "[::1:80"], 2, "address"),
        (vec!["add-server", "x", "bad_host:80"], 2, "address"),
        (vec!["add-server", "x", "::1:80"], 2, "address"),
        (
            vec!["add-server", "x", "127.0.0.1:80", "--weight", "0"],
            2,
            "weight",
        ),
        (
            vec!["add-server", "x", "127.0.0.1:80", "--weight", "10001"],
            2,
            "weight",
        ),
        (
            vec!["add-server", "x", "127.0.0.1:80", "--weight", "-1"],
            2,
            "--weight",
        ),
        (
            vec!["add-server", "x", "127.0.0.1:80", "--weight", "abc"],
            2,
            "--weight",
        ),
        (
            vec!["add-server", "x", "127.0.0.1:80", "--hash-key", "bad key"],
            2,
            "hash_key",
        ),
        (
            vec!["add-server", "x", "127.0.0.1:80", "--meta", "novalue"],
            2,
            "metadata",
        ),
        (
            vec!["add-server", "existing", "127.0.0.1:80"],
            4,
            "existing",
        ),
        (vec!["--service", "bad/svc", "list"], 2, "service"),
        (
            vec!["--service", "bad svc", "add-server", "x", "127.0.0.1:80"],
            2,
            "service",
        ),
        (vec!["--service", "nosuch-svc", "list"], 3, "nosuch-svc"),
        (vec!["remove-server", "ghost"], 3, "ghost"),
        (vec!["remove-server", "bad id!"], 2, "server_id"),
        (vec!["health-pass", "ghost"], 3, "ghost"),
        (vec!["health-fail", "ghost"], 3, "ghost"),
        (vec!["health_check_failed", ""], 2, "server_id"),
        (vec!["update-server", "ghost", "--weight", "2"], 3, "ghost"),
        (
            vec!["update-server", "existing", "--weight", "0"],
            2,
            "weight",
        ),
        (
            vec!["update-server", "existing", "--address", "nope"],
            2,
            "address",
        ),
        (
            vec!["update-server", "existing", "--drain", "--undrain"],
            2,
            "--undrain",
        ),
        (
            vec!["policy", "set", "--algorithm", "bogus"],
            2,
            "algorithm",
        ),
        (
            vec!["policy", "set", "--sticky", "sometimes"],
            2,
            "sticky_mode",
        ),
        (
            vec![
                "policy",
                "set",
                "--algorithm",
                "maglev",
                "--bounded-load",
                "0.5",
            ],
            2,
            "bounded_load",
        ),
        (
            vec![
                "policy",
                "set",
                "--algorithm",
                "round_robin",
                "--bounded-load",
                "1.25",
            ],
            2,
            "bounded_load",
        ),
        (
            vec!["policy", "set", "--bounded-load", "NaN"],
            2,
            "bounded_load",
        ),
        (
            vec![
                "policy",
                "set",
                "--algorithm",
                "maglev",
                "--bounded-load",
                "-2",
            ],
            2,
            "bounded_load",
        ),
        (vec!["frobnicate"], 2, "frobnicate"),
        // Hostile sizes: the message quotes a short prefix and stays small.
        (vec!["add-server", &huge, "127.0.0.1:1"], 2, "server_id"),
        (vec!["add-server", "x", &huge_address], 2, "address"),
        (vec!["next", "--key", &huge], 2, "key"),
        (
            vec![
                "policy",
                "set",
                "--sticky",
                "strict",
                "--sticky-ttl",
                "604801",
            ],
            2,
            "sticky_ttl_seconds",
        ),
        (
            vec![
                "update-server",
                "existing",
                "--weight",
                "2",
                "--expected-version",
                "1",
            ],
            5,
            "expected",
        ),
        (
            vec!["--tls-ca", "/nonexistent/ca.pem", "list"],
            2,
            "/nonexistent/ca.pem",
        ),
    ];
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for (args, code, needle) in &cases {
        let out = dlbctl(&ep, args).await;
        assert_eq!(
            out.code, *code,
            "dlbctl {args:?}: exit {} (stdout {:?}, stderr {:?})",
            out.code, out.stdout, out.stderr
        );
        assert!(
            out.stderr.contains(needle),
            "dlbctl {args:?}: stderr does not name {needle:?}: {}",
            out.stderr
        );
        assert!(
            out.stderr.len() <= 600,
            "dlbctl {:?}: a {}-byte message",
            args.iter()
                .map(|a| a.chars().take(20).collect::<String>())
                .collect::<Vec<_>>(),
            out.stderr.len()
        );
        assert!(
            out.stdout.is_empty(),
            "dlbctl {args:?} printed {:?}",
            out.stdout
        );
    }
    assert_eq!(
        ok(&ep, &["list", "--json"]).await,
        before,
        "a failed call changed state"
    );
    assert_eq!(ok(&ep, &["services", "--json"]).await, services_before);

    // An unreachable endpoint is "other" (1), with a clear message.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let out = dlbctl(&dead, &["list"]).await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.starts_with("error: "), "{}", out.stderr);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn token_from_flag_or_environment() {
    const TOKEN: &str = "dlbctl-admin-token-0001";
    let mut cfg = config(vec![]);
    cfg.auth.admin_tokens = vec![TOKEN.into()];
    let server = dlb_server::spawn(cfg).await.unwrap();
    let ep = endpoint(&server);
    let out = dlbctl(&ep, &["add-server", "a", "127.0.0.1:8081"]).await;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("bearer token"), "{}", out.stderr);
    let out = dlbctl(
        &ep,
        &[
            "--token",
            "not-the-token-0001",
            "add-server",
            "a",
            "127.0.0.1:8081",
        ],
    )
    .await;
    assert_ne!(out.code, 0);
    assert!(!out.stderr.contains("not-the-token"), "{}", out.stderr);
    ok(
        &ep,
        &["--token", TOKEN, "add-server", "a", "127.0.0.1:8081"],
    )
    .await;
    let with_env = within(
        "dlbctl with DLB_TOKEN",
        Command::new(env!("CARGO_BIN_EXE_dlbctl"))
            .args(["--endpoint", &ep, "add-server", "b", "127.0.0.1:8082"])
            .env("DLB_TOKEN", TOKEN)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(
        with_env.status.success(),
        "{}",
        String::from_utf8_lossy(&with_env.stderr)
    );
    // Reads stay open without read tokens; `--help` never shows the token's value.
    let out = ok(&ep, &["list"]).await;
    assert!(
        out.contains("a 127.0.0.1:8081") && out.contains("b 127.0.0.1:8082"),
        "{out}"
    );
    server.shutdown().await.unwrap();
}
