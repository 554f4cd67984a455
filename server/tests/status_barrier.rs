//! The status page's drain barriers over real HTTP: a `DrainServer` waiting on a session that
//! has not acknowledged the drain is listed by `/api/services/{name}` (with the backend and
//! what is pending), counted on the overview, shown in the service page's table and carried
//! by the live events; it leaves the list when the session acks, when the deadline passes, and
//! when the caller goes away (the RPC cancelled).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use dlb::proto::{self, client_message};
use dlb_server::ServerConfig;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SERVICE: &str = "svc";

/// `GET path`: (status code, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    tokio::time::timeout(WAIT, async move {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).await.unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        (head[9..12].parse().unwrap(), body.to_owned())
    })
    .await
    .expect("request timed out")
}

async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (code, body) = get(addr, path).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Polls the service's `barriers` until `done` holds (30 s at most).
async fn barriers_until(addr: SocketAddr, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let service = get_json(addr, &format!("/api/services/{SERVICE}")).await;
        let list = service["barriers"].as_array().expect("barriers").clone();
        if done(&list) {
            return list;
        }
        assert!(tokio::time::Instant::now() < deadline, "{service}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn server() -> dlb_server::RunningServer {
    let server = start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    })
    .await;
    let mut r = registry(&server).await;
    for (id, addr) in [("a", "10.0.0.1:80"), ("b", "10.0.0.2:80")] {
        r.add_server(add(SERVICE, id, addr, 1)).await.unwrap();
    }
    server
}

/// A session that acknowledged the service's current version; it acks nothing more unless
/// told to.
async fn follower(server: &dlb_server::RunningServer) -> (Session, u64) {
    let mut m = subscribe(&[(SERVICE, None)]);
    if let Some(client_message::Kind::Subscribe(s)) = &mut m.kind {
        s.client_id = "stuck".into();
    }
    let mut s = Session::open(server, m).await;
    let u = s.update().await;
    ack(&s, &u).await;
    (s, v(&u))
}

async fn ack(s: &Session, u: &proto::ServiceUpdate) {
    s.send(client_message::Kind::Ack(proto::Ack {
        service: SERVICE.into(),
        version: u.version,
        nonce: u.nonce.clone(),
    }))
    .await;
}

/// `DrainServer` with a wait, in a task (the answer's barrier).
fn drain(
    server: &dlb_server::RunningServer,
    id: &str,
    timeout_ms: u32,
) -> tokio::task::JoinHandle<proto::DrainBarrier> {
    let (server_addr, id) = (server.grpc_addr(), id.to_owned());
    tokio::spawn(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{server_addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut r = proto::registry_client::RegistryClient::new(channel);
        let req = proto::DrainServerRequest {
            service: SERVICE.into(),
            server_id: id,
            wait: Some(proto::BarrierWait {
                in_flight_zero: false,
                timeout_ms,
            }),
            ..Default::default()
        };
        let resp = r.drain_server(req).await.unwrap().into_inner();
        resp.barrier.expect("a barrier answer")
    })
}

/// The next live event (`service` or `rates`) that carries `barriers`.
async fn barriers_event(events: &mut TcpStream, buf: &mut String) -> Vec<Value> {
    loop {
        while let Some(at) = buf.find("event: ") {
            let rest = &buf[at + 7..];
            let Some(end) = rest.find("\n\n") else { break };
            let block = rest[..end].to_owned();
            *buf = rest[end + 2..].to_owned();
            let data: String = block
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            let e: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
            if let Some(list) = e.get("barriers").and_then(Value::as_array) {
                return list.clone();
            }
        }
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout(WAIT, events.read(&mut chunk))
            .await
            .expect("no event in time")
            .unwrap();
        assert!(n > 0, "stream ended: {buf}");
        buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
}

#[tokio::test]
async fn a_waiting_drain_is_listed_shown_live_and_leaves_once_confirmed() {
    let server = server().await;
    let addr = server.metrics_addr().unwrap();
    let (mut stuck, acked) = follower(&server).await;
    let mut events = TcpStream::connect(addr).await.unwrap();
    let version = get_json(addr, &format!("/api/services/{SERVICE}")).await["version"].clone();
    let req = format!(
        "GET /api/events?service={SERVICE}&version={version} HTTP/1.1\r\nHost: test\r\n\r\n"
    );
    events.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();

    let call = drain(&server, "a", 10_000);
    let list = barriers_until(addr, |l| {
        l.first()
            .is_some_and(|b| b["checks"].as_u64() >= Some(1) && b["pending_total"] == 1)
    })
    .await;
    assert_eq!(list.len(), 1, "{list:?}");
    let b = &list[0];
    assert_eq!(b["server_id"], "a");
    assert_eq!(b["kind"], "drain");
    assert_eq!(b["in_flight_zero"], false);
    assert_eq!(b["timeout_ms"], 10_000);
    assert_eq!(
        (b["confirmed"].as_u64(), b["stalled"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(b["deadline_in_ms"].as_u64().unwrap() <= 10_000, "{b}");
    let drained = b["version"].as_u64().unwrap();
    assert!(drained > acked, "{b}");
    assert_eq!(get_json(addr, "/api/overview").await["barriers"], 1);

    // The page's table, and a live event carrying it.
    let (_, html) = get(addr, &format!("/services/{SERVICE}")).await;
    assert!(html.contains("<table id=\"barriers\">"), "{html}");
    let row = format!("<td>a</td><td>drain v{drained} acked</td><td>0 / 1 / 0</td>");
    assert!(html.contains(&row), "{row} not in {html}");
    let live = loop {
        let l = barriers_event(&mut events, &mut buf).await;
        if !l.is_empty() {
            break l;
        }
    };
    assert_eq!(live[0]["server_id"], "a", "{live:?}");

    // The session acks the drain: the wait ends and leaves the list (and the page).
    let u = stuck.update().await;
    assert_eq!(v(&u), drained);
    ack(&stuck, &u).await;
    let answer = tokio::time::timeout(WAIT, call).await.unwrap().unwrap();
    assert_eq!(answer.ended(), proto::BarrierEnd::Confirmed, "{answer:?}");
    barriers_until(addr, <[Value]>::is_empty).await;
    assert_eq!(get_json(addr, "/api/overview").await["barriers"], 0);
    assert!(barriers_event(&mut events, &mut buf).await.is_empty());
    drop(stuck);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_wait_leaves_the_list_at_its_deadline_and_when_its_caller_goes_away() {
    let server = server().await;
    let addr = server.metrics_addr().unwrap();
    let (stuck, _) = follower(&server).await;

    // A short deadline passes (the session never acks).
    let call = drain(&server, "a", 1_500);
    barriers_until(addr, |l| l.iter().any(|b| b["server_id"] == "a")).await;
    let answer = tokio::time::timeout(WAIT, call).await.unwrap().unwrap();
    assert_eq!(answer.ended(), proto::BarrierEnd::Deadline, "{answer:?}");
    barriers_until(addr, <[Value]>::is_empty).await;

    // The caller goes away mid-wait (the RPC is cancelled): the entry goes with it.
    let call = drain(&server, "b", 30_000);
    let list = barriers_until(addr, |l| l.iter().any(|b| b["server_id"] == "b")).await;
    assert_eq!(list.len(), 1, "{list:?}");
    call.abort();
    let _ = call.await;
    barriers_until(addr, <[Value]>::is_empty).await;
    assert_eq!(get_json(addr, "/api/overview").await["barriers"], 0);
    drop(stuck);
    server.shutdown().await.unwrap();
}
