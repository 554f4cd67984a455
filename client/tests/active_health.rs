//! Active health checks end to end: real backends on loopback (a switchable HTTP server, a TCP
//! listener closed and reopened, a tonic-health gRPC server, a killed child process), a real
//! `dlbd` probing them, and the real SDK whose picks stop and resume.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{config, eventually, picked, set, within};
use dlb::proto;
use dlb_client::Client;
use dlb_server::{RunningServer, ServiceConfig};
use tokio::net::{TcpListener, TcpSocket};

/// An HTTP backend answering every request with the status in `status`.
async fn http_backend() -> (SocketAddr, Arc<AtomicU16>) {
    let status = Arc::new(AtomicU16::new(200));
    let s = status.clone();
    let app = axum::Router::new().fallback(move || {
        let s = s.clone();
        async move {
            let code = axum::http::StatusCode::from_u16(s.load(Ordering::Relaxed)).unwrap();
            (code, "ok")
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, status)
}

fn backend(id: &str, addr: SocketAddr) -> proto::Server {
    proto::Server {
        server_id: id.into(),
        address: addr.to_string(),
        weight: 1,
        ..Default::default()
    }
}

fn check(kind: proto::health_check::Kind) -> proto::HealthCheck {
    proto::HealthCheck {
        kind: Some(kind),
        // Generous for a loaded 2-core machine: a spurious timeout must not fail a test.
        interval_ms: 200,
        timeout_ms: 200,
        healthy_threshold: 2,
        unhealthy_threshold: 2,
        ..Default::default()
    }
}

fn http_check() -> proto::HealthCheck {
    check(proto::health_check::Kind::Http(
        proto::HttpHealthCheck::default(),
    ))
}

async fn serve(name: &str, hc: proto::HealthCheck, backends: Vec<proto::Server>) -> RunningServer {
    let mut svc = ServiceConfig::empty(name);
    svc.policy.health_check = Some(hc);
    svc.backends = backends;
    dlb_server::spawn(config(vec![svc])).await.unwrap()
}

/// The stored reason of one backend.
async fn reason(client: &Client, service: &str, id: &str) -> String {
    let r = client.admin().list_servers(service).await.unwrap();
    r.servers
        .into_iter()
        .find(|s| s.server_id == id)
        .map(|s| s.reason)
        .unwrap()
}

async fn until_reason(client: &Client, service: &str, id: &str, want: impl Fn(&str) -> bool) {
    within(&format!("the reason of {id}"), async {
        loop {
            if want(&reason(client, service, id).await) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn http_backend_switched_to_503_leaves_picks_and_comes_back() {
    let (a, a_status) = http_backend().await;
    let (b, _) = http_backend().await;
    let server = serve("web", http_check(), vec![backend("a", a), backend("b", b)]).await;
    let client = Client::connect([common::endpoint(&server)]).await.unwrap();
    let web = client.service("web").await.unwrap();
    eventually("both picked", || picked(&web, 20) == set(&["a", "b"])).await;
    // Probes pass: the probe source turns healthy (RTT in its detail), nothing else changes.
    within("a probed healthy", async {
        loop {
            let v = server.health().inspect("web", "a").await;
            if v.is_some_and(|v| v.published == proto::Verdict::Healthy && v.last_rtt.is_some()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    a_status.store(503, Ordering::Relaxed);
    eventually("a out of the SDK's picks", || {
        picked(&web, 20) == set(&["b"])
    })
    .await;
    assert_eq!(reason(&client, "web", "a").await, "probe: HTTP 503");

    a_status.store(200, Ordering::Relaxed);
    eventually("a back in the SDK's picks", || {
        picked(&web, 20) == set(&["a", "b"])
    })
    .await;
    assert_eq!(reason(&client, "web", "a").await, "");

    let m = common::scrape(server.metrics_addr().unwrap()).await;
    assert!(
        common::sample(&m, "dlb_health_probes_total{kind=\"http\",result=\"fail\"}")
            .is_some_and(|v| v >= 2.0),
        "{m}"
    );
    assert!(m.contains("dlb_health_probe_rtt_seconds_count"));
    // One write per transition, not one per failed probe.
    let fails = common::sample(&m, "dlb_health_probes_total{kind=\"http\",result=\"fail\"}");
    let downs = common::sample(&m, "dlb_health_transitions_total{to=\"unhealthy\"}");
    assert!(
        downs.is_some_and(|d| d >= 1.0 && d * 2.0 <= fails.unwrap_or(0.0)),
        "{m}"
    );
}

/// Binds `addr` (port 0 for a new one) with SO_REUSEADDR so it can be bound again at once.
fn listen(addr: SocketAddr) -> TcpListener {
    let s = TcpSocket::new_v4().unwrap();
    s.set_reuseaddr(true).unwrap();
    s.bind(addr).unwrap();
    s.listen(64).unwrap()
}

/// Accepts and answers "PONG" to anything, until the task is aborted.
fn tcp_backend(listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 16];
                if s.read(&mut buf).await.unwrap_or(0) > 0 {
                    let _ = s.write_all(b"PONG\r\n").await;
                }
            });
        }
    })
}

#[tokio::test]
async fn tcp_listener_closed_and_reopened() {
    let listener = listen("127.0.0.1:0".parse().unwrap());
    let addr = listener.local_addr().unwrap();
    let task = tcp_backend(listener);
    let other_listener = listen("127.0.0.1:0".parse().unwrap());
    let other = other_listener.local_addr().unwrap();
    let _other = tcp_backend(other_listener);
    let hc = check(proto::health_check::Kind::Tcp(proto::TcpHealthCheck {
        send: b"PING\r\n".to_vec(),
        expect_prefix: b"PONG".to_vec(),
    }));
    let server = serve("db", hc, vec![backend("t", addr), backend("o", other)]).await;
    let client = Client::connect([common::endpoint(&server)]).await.unwrap();
    let db = client.service("db").await.unwrap();
    eventually("both picked", || picked(&db, 20) == set(&["o", "t"])).await;

    task.abort();
    let _ = task.await;
    eventually("t out of picks", || picked(&db, 20) == set(&["o"])).await;
    assert_eq!(
        reason(&client, "db", "t").await,
        "probe: connection refused"
    );

    let task = tcp_backend(listen(addr));
    eventually("t back", || picked(&db, 20) == set(&["o", "t"])).await;
    task.abort();
}

#[tokio::test]
async fn grpc_health_status_not_serving_and_back() {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Cart", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let (other, _) = http_backend().await;
    let hc = check(proto::health_check::Kind::Grpc(proto::GrpcHealthCheck {
        service: "shop.Cart".into(),
    }));
    let server = serve("cart", hc, vec![backend("g", addr), backend("o", other)]).await;
    let client = Client::connect([common::endpoint(&server)]).await.unwrap();
    let cart = client.service("cart").await.unwrap();
    // "o" is an HTTP server: a gRPC check fails on it, so it leaves the picks.
    eventually("only g picked", || picked(&cart, 20) == set(&["g"])).await;

    reporter
        .set_service_status("shop.Cart", tonic_health::ServingStatus::NotServing)
        .await;
    until_reason(&client, "cart", "g", |r| r == "probe: NOT_SERVING").await;
    assert!(cart.get_next_server(None).is_err() || picked(&cart, 20).is_empty());

    reporter
        .set_service_status("shop.Cart", tonic_health::ServingStatus::Serving)
        .await;
    eventually("g back", || picked(&cart, 20) == set(&["g"])).await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_process(port: u16, dir: &std::path::Path) -> std::process::Child {
    std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 runs a small HTTP server as the backend process")
}

#[tokio::test]
async fn killed_backend_process_is_removed_and_comes_back_when_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = http_process(port, dir.path());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (other, _) = http_backend().await;
    let server = serve(
        "api",
        http_check(),
        vec![backend("p", addr), backend("o", other)],
    )
    .await;
    let client = Client::connect([common::endpoint(&server)]).await.unwrap();
    let api = client.service("api").await.unwrap();
    until_reason(&client, "api", "p", |r| r.is_empty()).await;
    within("p probed healthy", async {
        while server
            .health()
            .inspect("api", "p")
            .await
            .is_none_or(|v| v.published != proto::Verdict::Healthy)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    eventually("both picked", || picked(&api, 20) == set(&["o", "p"])).await;

    child.kill().unwrap();
    child.wait().unwrap();
    eventually("p out of picks", || picked(&api, 20) == set(&["o"])).await;

    let mut child = http_process(port, dir.path());
    eventually("p back", || picked(&api, 20) == set(&["o", "p"])).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn seed_calls_on_a_checked_service_count_as_one_result_each() {
    let (a, _) = http_backend().await;
    // Probes pass but need 100 in a row to make the backend healthy, one per hour: within the
    // test only the seed calls count.
    let mut hc = http_check();
    hc.interval_ms = 3_600_000;
    hc.timeout_ms = 1_000;
    hc.healthy_threshold = 100;
    hc.unhealthy_threshold = 2;
    let server = serve("seed", hc, vec![backend("a", a)]).await;
    let client = Client::connect([common::endpoint(&server)]).await.unwrap();
    let r = client
        .admin()
        .health_check_failed("seed", "a")
        .await
        .unwrap();
    let s = r.server.unwrap();
    assert_eq!(s.reason, "", "one failure is below fall = 2");
    let r = client
        .admin()
        .health_check_failed("seed", "a")
        .await
        .unwrap();
    let s = r.server.unwrap();
    assert_eq!(s.reason, "probe: health_check_failed");
    assert_ne!(
        s.sources.unwrap().admin,
        proto::Verdict::Unhealthy as i32,
        "the admin source is left alone"
    );
    // A service without checks keeps the admin semantics.
    client
        .admin()
        .add_server("plain", dlb_client::NewServer::new("x", a.to_string()))
        .await
        .unwrap();
    let r = client
        .admin()
        .health_check_failed("plain", "x")
        .await
        .unwrap();
    assert_eq!(r.server.unwrap().reason, "admin: health_check_failed");
}

async fn dlbctl(endpoint: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_dlbctl"))
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn dlbctl_sets_shows_and_removes_a_health_check() {
    let server = dlb_server::spawn(config(vec![])).await.unwrap();
    let ep = common::endpoint(&server);
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (live, _) = http_backend().await;
    let client = Client::connect([ep.clone()]).await.unwrap();
    for (id, addr) in [("dead", dead), ("live", live)] {
        client
            .admin()
            .add_server("svc", dlb_client::NewServer::new(id, addr.to_string()))
            .await
            .unwrap();
    }
    // A mistake names the field and changes nothing.
    let out = dlbctl(
        &ep,
        &[
            "-s",
            "svc",
            "health",
            "set",
            "--http",
            "/",
            "--interval-ms",
            "5",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy.health_check.interval_ms"));

    let out = dlbctl(
        &ep,
        &[
            "-s",
            "svc",
            "health",
            "set",
            "--http",
            "/",
            "--interval-ms",
            "200",
            "--timeout-ms",
            "200",
            "--rise",
            "1",
            "--fall",
            "1",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let shown = String::from_utf8_lossy(&dlbctl(&ep, &["-s", "svc", "health", "get"]).await.stdout)
        .to_string();
    assert!(shown.contains("interval_ms=200"), "{shown}");
    within("dlbctl list shows the probe verdicts", async {
        loop {
            let out = dlbctl(&ep, &["-s", "svc", "list"]).await;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if text.contains("(probe: connection refused)")
                && text.contains("probe=healthy (HTTP 200, rtt ")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // The live view: state, counts and the last probe's RTT of each backend.
    let out = dlbctl(&ep, &["-s", "svc", "health", "show"]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("dead unhealthy"), "{text}");
    assert!(text.contains("live healthy"), "{text}");
    assert!(
        text.contains("rtt=")
            && !text.contains("live healthy passes=0 failures=0 published=healthy rtt=-"),
        "{text}"
    );
    let r = client.admin().get_health("svc").await.unwrap();
    assert_eq!(r.backends.len(), 2);
    assert!(r.backends.iter().all(|b| b.last_rtt_us > 0));

    assert!(dlbctl(&ep, &["-s", "svc", "health", "off"])
        .await
        .status
        .success());
    until_reason(&client, "svc", "dead", |r| r.is_empty()).await;
}
