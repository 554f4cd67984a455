//! The status page's HTML and live events over real HTTP: hostile strings are escaped by the
//! templates, the assets are served from the binary, an open page gets one small `service`
//! event per change (a failed backend with its reason, an added backend), and an open page
//! does not hold up a graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use dlb_server::ServerConfig;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    tokio::time::timeout(WAIT, async move {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).await.unwrap();
        (out[9..12].parse().unwrap(), out)
    })
    .await
    .expect("request timed out")
}

async fn server() -> dlb_server::RunningServer {
    start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        // Long: a stream that held up the shutdown would show as a wait this long.
        shutdown_grace: Duration::from_secs(300),
        ..Default::default()
    })
    .await
}

/// An open event stream: reads events (name, JSON data) as they come.
struct Events {
    conn: TcpStream,
    buf: String,
}

impl Events {
    async fn open(addr: SocketAddr, query: &str) -> Self {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET /api/events{query} HTTP/1.1\r\nHost: test\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        Self {
            conn,
            buf: String::new(),
        }
    }

    /// The next event other than `rates`/`trends` (those follow traffic, not changes).
    async fn next(&mut self) -> (String, Value) {
        self.next_of(&|name| name != "rates" && name != "trends")
            .await
    }

    /// The next event whose name passes `keep`.
    async fn next_of(&mut self, keep: &dyn Fn(&str) -> bool) -> (String, Value) {
        loop {
            while let Some(at) = self.buf.find("event: ") {
                let rest = &self.buf[at + 7..];
                let Some(end) = rest.find("\n\n") else { break };
                let block = rest[..end].to_owned();
                self.buf = rest[end + 2..].to_owned();
                let mut lines = block.lines();
                let name = lines.next().unwrap().trim().to_owned();
                let data: String = lines
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect::<Vec<_>>()
                    .join("\n");
                if keep(&name) {
                    return (name, serde_json::from_str(&data).unwrap_or(Value::Null));
                }
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout(WAIT, self.conn.read(&mut chunk))
                .await
                .expect("no event in time")
                .unwrap();
            assert!(n > 0, "stream ended: {}", self.buf);
            self.buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    }
}

#[tokio::test]
async fn pages_escape_hostile_strings_and_serve_their_assets() {
    let server = server().await;
    let addr = server.metrics_addr().unwrap();
    let mut c = registry(&server).await;
    let mut b = add("", "b-1", "10.0.0.2:80", 1);
    b.metadata
        .insert("note".into(), "<script>alert(\"x\")</script>'é".into());
    c.add_server(b).await.unwrap();

    let (code, page) = get(addr, "/services/default").await;
    assert_eq!(code, 200, "{page}");
    assert!(!page.contains("<script>alert"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;'é"),
        "{page}"
    );
    assert!(page.contains("<td>b-1</td>"));
    let (code, page) = get(addr, "/").await;
    assert_eq!(code, 200);
    assert!(page.contains(r#"href="/services/default""#), "{page}");
    let (code, js) = get(addr, "/assets/status.js").await;
    assert_eq!(code, 200);
    assert!(js.contains("EventSource"));
    assert!(
        !js.contains("innerHTML"),
        "the script never sets HTML from data"
    );
    let (code, _) = get(addr, "/assets/status.css").await;
    assert_eq!(code, 200);
    let (code, page) = get(addr, "/services/%3Cb%3E").await;
    assert_eq!(code, 404);
    assert!(
        page.contains("&lt;b&gt;") && !page.contains("<b>"),
        "{page}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_open_page_gets_one_small_event_per_change() {
    let server = server().await;
    let addr = server.metrics_addr().unwrap();
    let mut c = registry(&server).await;
    for i in 0..50 {
        c.add_server(add("", &format!("b-{i:02}"), "10.0.0.1:80", 1))
            .await
            .unwrap();
    }
    let version = server.cache().get("default").unwrap().version.version;
    let mut events = Events::open(addr, &format!("?service=default&version={version}")).await;
    let mut overview = Events::open(addr, "").await;

    c.health_check_failed(hc("", "b-07")).await.unwrap();
    let (name, e) = events.next().await;
    assert_eq!(name, "service", "{e}");
    let upsert = e["upsert"].as_array().unwrap();
    assert_eq!(upsert.len(), 1, "only the changed row: {e}");
    assert_eq!(upsert[0]["id"], "b-07");
    assert_eq!(upsert[0]["reason"], "admin: health_check_failed");
    assert_eq!(e["summary"]["backends"]["unhealthy"], 1);
    assert!(e.to_string().len() < 2048, "small: {e}");

    c.add_server(add("", "new-1", "10.0.0.9:80", 2))
        .await
        .unwrap();
    let (name, e) = events.next().await;
    assert_eq!(name, "service");
    assert_eq!(e["upsert"][0]["id"], "new-1", "{e}");
    assert_eq!(e["upsert"].as_array().unwrap().len(), 1);
    assert_eq!(e["summary"]["backends"]["total"], 51);

    // A removal: its id, no row.
    c.remove_server(dlb::proto::RemoveServerRequest {
        service: String::new(),
        server_id: "b-03".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (name, e) = events.next().await;
    assert_eq!(name, "service");
    assert_eq!(e["remove"], serde_json::json!(["b-03"]), "{e}");
    assert!(e["upsert"].as_array().unwrap().is_empty(), "{e}");
    assert_eq!(e["summary"]["backends"]["total"], 50);

    // In-flight moves without a version change: the tick sends that row alone.
    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    s.update().await;
    s.send(dlb::proto::client_message::Kind::LoadReport(
        dlb::proto::LoadReport {
            service: String::new(),
            backends: vec![dlb::proto::BackendLoad {
                server_id: "b-10".into(),
                in_flight: 5,
                successes: 1,
                ..Default::default()
            }],
            interval_ms: 1000,
        },
    ))
    .await;
    loop {
        let (_, e) = events.next_of(&|name| name == "rates").await;
        let Some(upsert) = e.get("upsert") else {
            continue;
        };
        let upsert = upsert.as_array().unwrap();
        assert_eq!(upsert.len(), 1, "only the row that moved: {e}");
        assert_eq!(upsert[0]["id"], "b-10");
        assert_eq!(upsert[0]["in_flight"], 5);
        break;
    }

    // The overview page hears of it too.
    let (name, o) = overview.next().await;
    assert_eq!(name, "overview");
    assert!(o["services"][0]["backends"]["total"].as_u64().unwrap() >= 50);

    // Open pages do not hold up a graceful shutdown (the streams end on the signal).
    tokio::time::timeout(Duration::from_secs(120), server.shutdown())
        .await
        .expect("shutdown waited for open pages")
        .unwrap();
}
