//! Locality and priority from the client side against a real `dlbd`: `dlbctl add-server`,
//! `update-server`, `register` and `dns declare` with `--region --zone --sub-zone --priority`,
//! shown by `list`, `watch`, `dns list` and their `--json`; `policy set`'s locality flags; bad
//! values refused with exit 2 naming the field, changing nothing. And the SDK's own locality in
//! its first `Subscribe` (a fake Discovery server records it), a bad one refused at build.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../server/tests/fake_dns/mod.rs"]
mod fake_dns;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use dlb::proto::{self, client_message::Kind, discovery_server};
use dlb_client::Client;
use dlb_server::membership::dns::DnsConfig;
use fake_dns::FakeDns;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

fn json(s: &str) -> Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn line<'a>(list: &'a str, id: &str) -> &'a str {
    list.lines()
        .find(|l| l.trim_start().starts_with(&format!("{id} ")))
        .unwrap_or_else(|| panic!("no {id} in {list}"))
}

fn server<'a>(list: &'a Value, id: &str) -> &'a Value {
    list["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["server_id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {list}"))
}

#[tokio::test]
async fn dlbctl_sets_and_shows_locality_and_priority() {
    let dns = FakeDns::start().await;
    dns.set("web.test", &["127.0.0.5"]);
    let mut cfg = config(dlb_server::ServerConfig::default().services);
    cfg.dns = DnsConfig {
        nameservers: vec![dns.addr],
        timeout: Duration::from_millis(300),
        attempts: 1,
        ..DnsConfig::default()
    };
    let srv = dlb_server::spawn(cfg).await.unwrap();
    let ep = endpoint(&srv);
    let web = ["--service", "web"];
    let args = |rest: &[&'static str]| -> Vec<&'static str> {
        web.iter().chain(rest.iter()).copied().collect()
    };

    let out = dlbctl_ok(
        &ep,
        &args(&[
            "add-server",
            "a",
            "127.0.0.1:81",
            "--region",
            "eu",
            "--zone",
            "eu-a",
            "--sub-zone",
            "r1",
            "--priority",
            "1",
        ]),
    )
    .await;
    assert!(
        out.contains("a 127.0.0.1:81 w=1 locality=eu/eu-a/r1 prio=1 healthy"),
        "{out}"
    );
    dlbctl_ok(&ep, &args(&["add-server", "b", "127.0.0.1:82"])).await;

    // Bad values: exit 2 naming the field, nothing changed.
    for (cmd, field) in [
        (
            vec!["add-server", "c", "127.0.0.1:83", "--zone", "eu-a"],
            "locality.region",
        ),
        (
            vec!["add-server", "c", "127.0.0.1:83", "--region", "e u"],
            "locality.region",
        ),
        (
            vec!["add-server", "c", "127.0.0.1:83", "--priority", "8"],
            "priority",
        ),
        (vec!["update-server", "a", "--priority", "9"], "priority"),
        (
            vec!["update-server", "a", "--region", "eu", "--sub-zone", "r2"],
            "locality.zone",
        ),
    ] {
        let out = run_dlbctl(&ep, &args(&cmd)).await;
        assert_eq!(out.code, 2, "{cmd:?}: {} {}", out.stdout, out.stderr);
        assert!(out.stderr.contains(field), "{cmd:?}: {}", out.stderr);
    }

    let list = dlbctl_ok(&ep, &args(&["list"])).await;
    assert!(
        line(&list, "a").contains("locality=eu/eu-a/r1 prio=1"),
        "{list}"
    );
    assert!(!line(&list, "b").contains("locality="), "{list}");
    assert!(!list.contains("\n  c "), "{list}");
    let j = json(&dlbctl_ok(&ep, &args(&["--json", "list"])).await);
    let a = server(&j, "a");
    assert_eq!(a["locality"]["zone"], "eu-a");
    assert_eq!(a["locality"]["sub_zone"], "r1");
    assert_eq!(a["priority"], 1);
    assert_eq!(server(&j, "b")["locality"], Value::Null);

    // update-server replaces the whole locality and sets the priority.
    dlbctl_ok(
        &ep,
        &args(&[
            "update-server",
            "a",
            "--region",
            "eu",
            "--zone",
            "eu-b",
            "--priority",
            "0",
        ]),
    )
    .await;
    let list = dlbctl_ok(&ep, &args(&["list"])).await;
    assert!(
        line(&list, "a").contains(" w=1 locality=eu/eu-b healthy"),
        "{list}"
    );

    // watch shows them too.
    let w = dlbctl_ok(&ep, &args(&["watch", "--count", "1"])).await;
    assert!(
        w.contains("+a 127.0.0.1:81 w=1 locality=eu/eu-b healthy"),
        "{w}"
    );
    let w = json(&dlbctl_ok(&ep, &args(&["--json", "watch", "--count", "1"])).await);
    let ups = w["upserts"].as_array().expect("upserts");
    let a = ups.iter().find(|s| s["server_id"] == "a").unwrap();
    assert_eq!(a["locality"]["zone"], "eu-b");

    // policy set: every LocalityPolicy field.
    let p = json(
        &dlbctl_ok(
            &ep,
            &args(&[
                "--json",
                "policy",
                "set",
                "--overprovisioning-percent",
                "150",
                "--zone-aware",
                "false",
                "--min-cluster-size",
                "3",
                "--cross-zone-budget-percent",
                "10",
                "--budget-healthy-threshold-percent",
                "60",
                "--saturation-in-flight",
                "8",
            ]),
        )
        .await,
    );
    let l = &p["policy"]["locality"];
    assert_eq!(l["overprovisioning_percent"], 150);
    assert_eq!(l["zone_aware"], false);
    assert_eq!(l["min_cluster_size"], 3);
    assert_eq!(l["cross_zone_budget_percent"], 10);
    assert_eq!(l["budget_healthy_threshold_percent"], 60);
    assert_eq!(l["saturation_in_flight"], 8);
    let out = run_dlbctl(
        &ep,
        &args(&["policy", "set", "--cross-zone-budget-percent", "101"]),
    )
    .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("policy.locality.cross_zone_budget_percent"),
        "{}",
        out.stderr
    );
    let got = srv
        .store()
        .get_service("web".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.policy.locality.unwrap().cross_zone_budget_percent, 10);

    // dns declare / dns list.
    let out = dlbctl_ok(
        &ep,
        &[
            "--service",
            "dnsweb",
            "dns",
            "declare",
            "web.test:80",
            "--region",
            "eu",
            "--zone",
            "eu-c",
            "--priority",
            "2",
        ],
    )
    .await;
    assert!(out.contains("locality=eu/eu-c prio=2"), "{out}");
    let j = json(&dlbctl_ok(&ep, &["--service", "dnsweb", "--json", "dns", "list"]).await);
    assert_eq!(j["names"][0]["locality"]["zone"], "eu-c");
    assert_eq!(j["names"][0]["priority"], 2);
    let list = dlbctl_ok(&ep, &["--service", "dnsweb", "list"]).await;
    assert!(
        line(&list, "127.0.0.5-80").contains("locality=eu/eu-c prio=2"),
        "{list}"
    );
    let out = run_dlbctl(
        &ep,
        &[
            "--service",
            "dnsweb",
            "dns",
            "declare",
            "web.test:80",
            "--priority",
            "8",
        ],
    )
    .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("priority"), "{}", out.stderr);

    // register: the lease-owned backend carries them.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dlbctl"))
        .args([
            "--endpoint",
            &ep,
            "--service",
            "web",
            "register",
            "r",
            "127.0.0.1:84",
        ])
        .args(["--region", "us", "--zone", "us-1", "--priority", "3"])
        .env_remove("DLB_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within("dlbctl register's first line", lines.next_line())
        .await
        .unwrap()
        .expect("dlbctl register exited");
    assert!(first.starts_with("registered "), "{first}");
    let list = dlbctl_ok(&ep, &args(&["list"])).await;
    assert!(
        line(&list, "r").contains("locality=us/us-1 prio=3"),
        "{list}"
    );
    child.kill().await.unwrap();
}

/// A Discovery server that records every `Subscribe` it receives and never answers.
struct Recorder(mpsc::UnboundedSender<proto::Subscribe>);

#[tonic::async_trait]
impl discovery_server::Discovery for Recorder {
    type SessionStream =
        tokio_stream::wrappers::ReceiverStream<Result<proto::ServerMessage, tonic::Status>>;

    async fn session(
        &self,
        request: tonic::Request<tonic::Streaming<proto::ClientMessage>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let mut stream = request.into_inner();
        let seen = self.0.clone();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let _open = tx;
            while let Ok(Some(m)) = stream.message().await {
                if let Some(Kind::Subscribe(s)) = m.kind {
                    let _ = seen.send(s);
                }
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }
}

#[tokio::test]
async fn the_sdk_sends_its_locality_in_the_first_subscribe() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(discovery_server::DiscoveryServer::new(Recorder(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let ep = format!("http://{addr}");

    let client = Client::builder([ep.clone()])
        .locality("eu", "eu-a")
        .sub_zone("r1")
        .wait_connected(false)
        .connect()
        .await
        .unwrap();
    let sub = within("the first Subscribe", rx.recv()).await.unwrap();
    assert_eq!(
        sub.locality,
        Some(proto::Locality {
            region: "eu".into(),
            zone: "eu-a".into(),
            sub_zone: "r1".into(),
        })
    );
    client.close();

    // A bad locality is a build error naming the field.
    let err = Client::builder([ep])
        .locality("eu", "a b")
        .wait_connected(false)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, dlb_client::Error::InvalidArgument(_)),
        "{err:?}"
    );
    assert!(err.to_string().contains("locality.zone"), "{err}");
}
