//! The Prometheus `/metrics` endpoint: expected metric names after some RPCs, and the
//! per-service in-flight sum from SDK load reports (removed when the session closes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::*;
use dlb::proto::{self, client_message};
use dlb_server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(addr: SocketAddr) -> String {
    tokio::time::timeout(WAIT, async move {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    })
    .await
    .expect("scrape timed out")
}

/// Scrapes until `ready` holds (the per-service gauges are set by the picker builder and the
/// load-report handler, both after the write or report has been acknowledged), or gives up
/// after about five seconds and returns the last body for the assertions to explain.
async fn scrape_until(addr: SocketAddr, ready: impl Fn(&str) -> bool) -> String {
    let mut body = scrape(addr).await;
    for _ in 0..250 {
        if ready(&body) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        body = scrape(addr).await;
    }
    body
}

fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test]
async fn metrics_endpoint_exposes_the_expected_series() {
    let server = start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    })
    .await;
    let maddr = server.metrics_addr().expect("metrics enabled");
    let mut c = registry(&server).await;
    c.add_server(add("", "a", "10.0.0.1:80", 1)).await.unwrap();
    c.add_server(add("", "b", "10.0.0.2:80", 1)).await.unwrap();
    c.health_check_failed(hc("", "b")).await.unwrap();
    c.add_server(add("", "a", "10.0.0.1:80", 1))
        .await
        .unwrap_err();
    c.get_next_server(proto::GetNextServerRequest::default())
        .await
        .unwrap();

    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    s.update().await;
    s.send(client_message::Kind::LoadReport(proto::LoadReport {
        service: String::new(),
        backends: vec![
            proto::BackendLoad {
                server_id: "a".into(),
                in_flight: 5,
                ..Default::default()
            },
            proto::BackendLoad {
                server_id: "b".into(),
                in_flight: 2,
                ..Default::default()
            },
            // Not a backend of the service: ignored, so clients cannot grow server state.
            proto::BackendLoad {
                server_id: "ghost".into(),
                in_flight: 100,
                ..Default::default()
            },
        ],
        interval_ms: 1000,
    }))
    .await;
    // A service this session does not follow: ignored too.
    s.send(client_message::Kind::LoadReport(proto::LoadReport {
        service: "other".into(),
        backends: vec![proto::BackendLoad {
            server_id: "a".into(),
            in_flight: 9,
            ..Default::default()
        }],
        interval_ms: 1000,
    }))
    .await;
    // A write after the session is open: its push is measured.
    c.add_server(add("", "c", "10.0.0.3:80", 1)).await.unwrap();
    s.update().await;

    let body = scrape_until(maddr, |b| {
        value(b, "dlb_service_version{service=\"default\"} ") == Some(5.0)
            && value(b, "dlb_in_flight{service=\"default\"} ") == Some(7.0)
    })
    .await;
    for name in [
        "dlb_sessions_connected",
        "dlb_rpcs_total",
        "dlb_backends",
        "dlb_push_latency_seconds",
        "dlb_service_version",
        "dlb_in_flight",
        "dlb_sessions_lagging",
        "dlb_sessions_stalled_total",
    ] {
        assert!(body.contains(name), "missing {name} in:\n{body}");
    }
    assert_eq!(value(&body, "dlb_sessions_connected "), Some(1.0), "{body}");
    assert_eq!(
        value(
            &body,
            "dlb_rpcs_total{method=\"AddServer\",code=\"AlreadyExists\"} "
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(
            &body,
            "dlb_backends{service=\"default\",health=\"unhealthy\"} "
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(
            &body,
            "dlb_backends{service=\"default\",health=\"healthy\"} "
        ),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "dlb_service_version{service=\"default\"} "),
        Some(5.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "dlb_in_flight{service=\"default\"} "),
        Some(7.0),
        "{body}"
    );
    assert!(
        !body.contains("dlb_in_flight{service=\"other\"}"),
        "a report on a service not followed must be ignored:\n{body}"
    );
    assert!(
        value(&body, "dlb_push_latency_seconds_count ").unwrap_or(0.0) >= 1.0,
        "{body}"
    );
    assert!(
        !body.contains("server_id"),
        "no per-backend series by default"
    );
    // One replica alone: it leads and sees itself.
    assert_eq!(value(&body, "dlb_replica_leader "), Some(1.0), "{body}");
    assert_eq!(value(&body, "dlb_replica_members "), Some(1.0), "{body}");

    // Closing the session removes its contribution.
    drop(s);
    let mut gone = false;
    for _ in 0..50 {
        let body = scrape(maddr).await;
        if value(&body, "dlb_in_flight{service=\"default\"} ") == Some(0.0)
            && value(&body, "dlb_sessions_connected ") == Some(0.0)
        {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(gone, "session contribution not removed");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn per_backend_series_are_opt_in() {
    let server = start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        per_backend_metrics: true,
        ..Default::default()
    })
    .await;
    let maddr = server.metrics_addr().unwrap();
    let mut c = registry(&server).await;
    c.add_server(add("", "a", "10.0.0.1:80", 1)).await.unwrap();
    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    s.update().await;
    let report = |a: u64| {
        client_message::Kind::LoadReport(proto::LoadReport {
            service: String::new(),
            backends: vec![proto::BackendLoad {
                server_id: "a".into(),
                in_flight: a,
                ..Default::default()
            }],
            interval_ms: 1000,
        })
    };
    s.send(report(4)).await;
    let series = "dlb_backend_in_flight{service=\"default\",server_id=\"a\"} ";
    let mut seen = None;
    for _ in 0..50 {
        seen = value(&scrape(maddr).await, series);
        if seen == Some(4.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(seen, Some(4.0));
    // A report without the backend removes its series.
    s.send(report(0)).await;
    let mut removed = false;
    for _ in 0..50 {
        if value(&scrape(maddr).await, series).is_none() {
            removed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(removed, "stale per-backend series kept");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn hostile_load_reports_are_clamped_and_removed_on_every_exit() {
    let server = start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    })
    .await;
    let maddr = server.metrics_addr().unwrap();
    let mut c = registry(&server).await;
    c.add_server(add("", "a", "10.0.0.1:80", 1)).await.unwrap();
    let report = client_message::Kind::LoadReport(proto::LoadReport {
        service: String::new(),
        backends: vec![
            proto::BackendLoad {
                server_id: "a".into(),
                in_flight: u64::MAX,
                successes: u64::MAX,
                failures: u64::MAX,
                ..Default::default()
            },
            proto::BackendLoad {
                server_id: "a".into(),
                in_flight: u64::MAX,
                ..Default::default()
            },
        ],
        interval_ms: u64::MAX,
    });
    let mut s1 = Session::open(&server, subscribe(&[("", None)])).await;
    s1.update().await;
    let mut s2 = Session::open(&server, subscribe(&[("", None)])).await;
    s2.update().await;
    for _ in 0..3 {
        s1.send(report.clone()).await;
        s2.send(report.clone()).await;
    }
    let series = "dlb_in_flight{service=\"default\"} ";
    let until = |want: f64| async move {
        let mut seen = None;
        for _ in 0..100 {
            seen = value(&scrape(maddr).await, series);
            if seen == Some(want) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("{series} is {seen:?}, expected {want}");
    };
    // Two sessions, each clamped to 1,000,000 (a debug build would have panicked on the sum).
    until(2_000_000.0).await;
    // Unsubscribe removes that session's share; the session itself keeps working.
    s1.send(client_message::Kind::Unsubscribe(proto::Unsubscribe {
        service: String::new(),
    }))
    .await;
    until(1_000_000.0).await;
    // Ending the other session removes the rest.
    drop(s2);
    until(0.0).await;
    // The server still answers.
    c.list_servers(proto::ListServersRequest::default())
        .await
        .unwrap();
    drop(s1);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_is_shown_then_cut() {
    let server = start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        session_queue: 2,
        stall_deadline: std::time::Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let maddr = server.metrics_addr().unwrap();
    let mut c = registry(&server).await;
    // A session that reads its first update, then never again.
    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    s.update().await;
    // Writes go through while it does not read; ~7.5 KiB records fill the HTTP/2 windows.
    let mut lagging_seen = false;
    for i in 0..600 {
        c.add_server(proto::AddServerRequest {
            metadata: (0..30)
                .map(|k| (format!("k{k}"), "v".repeat(250)))
                .collect(),
            ..add("", &format!("s{i}"), "10.0.0.1:80", 1)
        })
        .await
        .unwrap();
        if i % 100 == 99 {
            let m = scrape(maddr).await;
            lagging_seen |= value(&m, "dlb_sessions_lagging ") == Some(1.0);
        }
    }
    for _ in 0..50 {
        if lagging_seen {
            break;
        }
        let m = scrape(maddr).await;
        lagging_seen |= value(&m, "dlb_sessions_lagging ") == Some(1.0);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        lagging_seen,
        "the stalled session was never shown as lagging"
    );
    // Past the deadline it is cut.
    let mut cut = false;
    for _ in 0..200 {
        let m = scrape(maddr).await;
        if value(&m, "dlb_sessions_stalled_total ") == Some(1.0)
            && value(&m, "dlb_sessions_connected ") == Some(0.0)
            && value(&m, "dlb_sessions_lagging ") == Some(0.0)
        {
            cut = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        cut,
        "the stalled session was not cut: {}",
        scrape(maddr).await
    );
    drop(s);
    server.shutdown().await.unwrap();
}
