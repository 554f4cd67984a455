//! The status page's JSON API over real HTTP: the overview and a service's backends (effective
//! state and reason, rates from SDK load reports, metadata as given), 404 for an unknown
//! service, and the read-token rule (no data without a token; bearer header or the login
//! form's cookie).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::*;
use dlb::proto::{self, client_message};
use dlb_server::api::auth::AuthConfig;
use dlb_server::ServerConfig;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ADMIN: &str = "admin-secret-token-0001";
const READER: &str = "reader-secret-token-0001";

/// One HTTP/1.1 exchange: (status code, raw head, body).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &str,
    body: &str,
) -> (u16, String, String) {
    tokio::time::timeout(WAIT, async move {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).await.unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        let code = head[9..12].parse().unwrap();
        (code, head.to_owned(), body.to_owned())
    })
    .await
    .expect("request timed out")
}

async fn get_json(addr: SocketAddr, path: &str, extra: &str) -> (u16, Value) {
    let (code, head, body) = request(addr, "GET", path, extra, "").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    (
        code,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

async fn server(auth: AuthConfig) -> dlb_server::RunningServer {
    start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        auth,
        ..Default::default()
    })
    .await
}

fn backend<'a>(service: &'a Value, id: &str) -> &'a Value {
    service["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .unwrap_or_else(|| panic!("no backend {id} in {service}"))
}

#[tokio::test]
async fn overview_and_service_show_state_reasons_rates_and_metadata() {
    let server = server(AuthConfig::default()).await;
    let addr = server.metrics_addr().unwrap();
    let mut c = registry(&server).await;
    c.add_server(add("", "a", "10.0.0.1:80", 3)).await.unwrap();
    let hostile = "<script>alert(\"x\")</script> ' é 🚀";
    let mut b = add("", "b", "10.0.0.2:80", 1);
    b.metadata.insert("note".into(), hostile.into());
    b.locality = Some(proto::Locality {
        region: "eu-west-1".into(),
        zone: "eu-west-1a".into(),
        sub_zone: String::new(),
    });
    b.priority = 2;
    c.add_server(b).await.unwrap();
    // A backend that registered itself with a lease of 60 s.
    let mut m = dlb::proto::membership_client::MembershipClient::new(channel(&server).await);
    m.register(proto::RegisterRequest {
        service: String::new(),
        server_id: "l".into(),
        address: "10.0.0.3:80".into(),
        ttl_seconds: 60,
        ..Default::default()
    })
    .await
    .unwrap();
    c.health_check_failed(hc("", "b")).await.unwrap();
    c.add_server(add("other", "x", "10.0.1.1:80", 1))
        .await
        .unwrap();

    // An SDK reports traffic on `a`: it shows as a rate and in-flight.
    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    s.update().await;
    s.send(client_message::Kind::LoadReport(proto::LoadReport {
        service: String::new(),
        backends: vec![proto::BackendLoad {
            server_id: "a".into(),
            in_flight: 4,
            successes: 90,
            failures: 10,
            ..Default::default()
        }],
        interval_ms: 1000,
    }))
    .await;

    let mut service = Value::Null;
    for _ in 0..250 {
        let (code, v) = get_json(addr, "/api/services/default", "").await;
        assert_eq!(code, 200, "{v}");
        service = v;
        let a = backend(&service, "a");
        if a["in_flight"] == 4 && a["requests_per_s"].as_f64().unwrap() > 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let a = backend(&service, "a");
    assert_eq!(a["in_flight"], 4, "{service}");
    assert_eq!(a["eligible"], true);
    assert_eq!(a["weight"], 3);
    assert_eq!(a["effective_weight"], 3);
    assert_eq!(a["source"], "api");
    // 100 requests in the current second, averaged over 10 s.
    assert_eq!(a["requests_per_s"], 10.0, "{a}");
    assert_eq!(a["errors_per_s"], 1.0, "{a}");
    assert_eq!(a["requests_trend"].as_array().unwrap().len(), 120);
    let b = backend(&service, "b");
    assert_eq!(b["eligible"], false);
    assert_eq!(b["health"], "unhealthy");
    assert_eq!(b["reason"], "admin: health_check_failed");
    assert_eq!(b["zone"], "eu-west-1/eu-west-1a");
    assert_eq!(b["locality"]["region"], "eu-west-1");
    assert_eq!(b["locality"]["zone"], "eu-west-1a");
    assert!(b["locality"].get("sub_zone").is_none(), "{b}");
    assert_eq!(b["priority"], 2);
    assert!(
        a.get("zone").is_none() && a.get("locality").is_none(),
        "{a}"
    );
    assert_eq!(a["priority"], 0);
    assert!(a.get("lease_ttl_seconds").is_none() && a.get("lease_age_seconds").is_none());
    let l = backend(&service, "l");
    assert_eq!(l["source"], "lease");
    assert_eq!(l["lease_ttl_seconds"], 60);
    let age = l["lease_age_seconds"].as_u64().expect("a lease age");
    assert!(age < 60, "{l}");
    assert_eq!(
        b["metadata"]["note"], hostile,
        "JSON carries the string as given"
    );
    assert!(b.get("requests_trend").is_none(), "no reports, no trend");
    assert_eq!(service["name"], "default");
    assert_eq!(service["backends"]["total"], 3);
    assert_eq!(service["backends"]["unhealthy"], 1);
    assert_eq!(service["policy"]["algorithm"], service["algorithm"]);

    let (code, o) = get_json(addr, "/api/overview", "").await;
    assert_eq!(code, 200);
    let names: Vec<&str> = o["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "other"]);
    assert_eq!(o["services"][0]["backends"]["eligible"], 2);
    assert_eq!(o["services"][0]["in_flight"], 4);
    assert_eq!(o["services"][0]["panic"]["active"], false);
    assert_eq!(o["sessions"], 1);
    assert_eq!(o["xds_clients"], 0);
    assert_eq!(o["replica"]["leader"], true);
    assert_eq!(o["replica"]["readiness"], "ready");
    assert_eq!(o["replica"]["id"], server.replica_id());
    assert_eq!(o["store"]["kind"], "memory");
    assert_eq!(o["store"]["revision"], server.cache().revision());

    let (code, e) = get_json(addr, "/api/services/nope", "").await;
    assert_eq!(code, 404);
    assert!(e["error"].as_str().unwrap().contains("nope"), "{e}");
    // The event stream of a service that does not exist: the same 404, not a silent stream.
    let (code, e) = get_json(addr, "/api/events?service=nope&version=1", "").await;
    assert_eq!(code, 404);
    assert!(e["error"].as_str().unwrap().contains("nope"), "{e}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn with_read_tokens_no_data_without_one() {
    let server = server(AuthConfig {
        admin_tokens: vec![ADMIN.into()],
        read_tokens: vec![READER.into()],
    })
    .await;
    let addr = server.metrics_addr().unwrap();
    for path in ["/api/overview", "/api/services/default"] {
        let (code, v) = get_json(addr, path, "").await;
        assert_eq!(code, 401, "{path}: {v}");
        assert!(v.get("services").is_none() && v.get("servers").is_none());
        let (code, _) = get_json(
            addr,
            path,
            "Authorization: Bearer wrong-token-000000000\r\n",
        )
        .await;
        assert_eq!(code, 401, "{path}");
    }
    for token in [READER, ADMIN] {
        let (code, v) = get_json(
            addr,
            "/api/overview",
            &format!("Authorization: bearer {token}\r\n"),
        )
        .await;
        assert_eq!(code, 200, "{v}");
        assert!(v["services"].is_array());
    }

    // The login form: a wrong token sets nothing; the right one sets a cookie that reads.
    let (code, head, _) = request(addr, "GET", "/login", "", "").await;
    assert_eq!(code, 200, "{head}");
    let form = "Content-Type: application/x-www-form-urlencoded\r\n";
    let (code, head, body) =
        request(addr, "POST", "/login", form, "token=nope-nope-nope-nope").await;
    assert_eq!(code, 401);
    assert!(!head.to_ascii_lowercase().contains("set-cookie"), "{head}");
    assert!(!body.contains("nope-nope"), "the token is never echoed");
    let (code, head, _) = request(addr, "POST", "/login", form, &format!("token={READER}")).await;
    assert_eq!(code, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie:")
                .then(|| l[11..].trim().to_owned())
        })
        .expect("a cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    let (code, v) = get_json(addr, "/api/overview", &format!("Cookie: {pair}\r\n")).await;
    assert_eq!(code, 200, "{v}");
    // /metrics keeps its own rule (open, as before).
    let (code, _, _) = request(addr, "GET", "/metrics", "", "").await;
    assert_eq!(code, 200);
    server.shutdown().await.unwrap();
}

/// The follower of `service` on session `stream`.
fn follower(service: &Value, client_id: &str) -> Value {
    service["followers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["client_id"] == client_id)
        .cloned()
        .unwrap_or_else(|| panic!("no follower {client_id} in {service}"))
}

fn subscribe_as(client_id: &str) -> proto::ClientMessage {
    let mut m = subscribe(&[("svc", None)]);
    if let Some(client_message::Kind::Subscribe(s)) = &mut m.kind {
        s.client_id = client_id.into();
    }
    m
}

async fn ack(s: &Session, u: &proto::ServiceUpdate) {
    s.send(client_message::Kind::Ack(proto::Ack {
        service: "svc".into(),
        version: u.version,
        nonce: u.nonce.clone(),
    }))
    .await;
}

#[tokio::test]
async fn followers_show_acked_versions_and_only_real_laggards_lag() {
    let server = server(AuthConfig::default()).await;
    let addr = server.metrics_addr().unwrap();
    let mut c = registry(&server).await;
    c.add_server(add("svc", "a", "10.0.0.1:80", 1))
        .await
        .unwrap();
    // `prompt` acks every update; `stuck` acks the first one only.
    let mut prompt = Session::open(&server, subscribe_as("prompt")).await;
    let u = prompt.update().await;
    ack(&prompt, &u).await;
    let mut stuck = Session::open(&server, subscribe_as("stuck")).await;
    let u = stuck.update().await;
    ack(&stuck, &u).await;
    let first = v(&u);
    c.add_server(add("svc", "b", "10.0.0.2:80", 1))
        .await
        .unwrap();
    let u = prompt.update().await;
    ack(&prompt, &u).await;
    let current = v(&u);
    assert_eq!(v(&stuck.update().await), current);

    // The stuck one turns lagging once the grace has passed (polls, generous deadline).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let service = loop {
        let (code, service) = get_json(addr, "/api/services/svc", "").await;
        assert_eq!(code, 200, "{service}");
        let p = follower(&service, "prompt");
        let s = follower(&service, "stuck");
        if s["lagging"] == true && p["acked_version"] == current {
            break service;
        }
        // Never lagging before its grace: behind_ms says how long it has been behind.
        if s["lagging"] == true {
            assert!(s["behind_ms"].as_u64().unwrap() > 2000, "{s}");
        }
        assert!(tokio::time::Instant::now() < deadline, "{service}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(service["version"], current);
    let p = follower(&service, "prompt");
    assert_eq!(p["kind"], "sdk");
    assert_eq!(p["protocol"], "dlb");
    assert_eq!(p["lagging"], false, "acked the current version: {p}");
    assert!(p.get("behind_ms").is_none(), "{p}");
    let s = follower(&service, "stuck");
    assert_eq!(s["acked_version"], first);
    assert!(s["behind_ms"].as_u64().unwrap() > 2000, "{s}");

    // The page shows the same, the laggard highlighted.
    let (code, _, html) = request(addr, "GET", "/services/svc", "", "").await;
    assert_eq!(code, 200);
    assert!(html.contains("<tr class=\"bad\"><td>sdk</td>"), "{html}");
    assert!(html.contains("lagging"), "{html}");

    // Once it acks, it is in step again.
    ack(&stuck, &u).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, service) = get_json(addr, "/api/services/svc", "").await;
        let s = follower(&service, "stuck");
        if s["lagging"] == false {
            assert_eq!(s["acked_version"], current);
            assert!(s.get("behind_ms").is_none(), "{s}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{service}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop((prompt, stuck));
    server.shutdown().await.unwrap();
}

async fn next_response(
    responses: &mut tonic::Streaming<
        envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
    >,
) -> envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse {
    tokio::time::timeout(WAIT, responses.message())
        .await
        .expect("no xDS response in time")
        .unwrap()
        .expect("the stream ended")
}

#[tokio::test]
async fn an_xds_client_that_acked_is_in_step_and_one_that_stopped_lags() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

    let server = server(AuthConfig::default()).await;
    let addr = server.metrics_addr().unwrap();
    let mut c = registry(&server).await;
    c.add_server(add("svc", "a", "10.0.0.1:80", 1))
        .await
        .unwrap();
    let mut ads = AggregatedDiscoveryServiceClient::new(channel(&server).await);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut responses = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let request = |version: &str, nonce: &str| DiscoveryRequest {
        node: Some(Node {
            id: "node-1".into(),
            ..Default::default()
        }),
        type_url: EDS.into(),
        resource_names: vec!["svc".into()],
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    tx.send(request("", "")).await.unwrap();
    let r = next_response(&mut responses).await;
    tx.send(request(&r.version_info, &r.nonce)).await.unwrap();

    let xds_follower = |service: &Value| {
        service["followers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["kind"] == "xds")
            .cloned()
    };
    let version = server.cache().get("svc").unwrap().version.version;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, service) = get_json(addr, "/api/services/svc", "").await;
        if let Some(f) = xds_follower(&service).filter(|f| f["acked_version"] == version) {
            assert_eq!(f["protocol"], "xds-sotw");
            assert_eq!(f["client_id"], "node-1");
            assert_eq!(f["lagging"], false, "{f}");
            assert!(f.get("behind_ms").is_none(), "{f}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{service}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // A change it receives but never acknowledges: lagging once the grace has passed.
    c.add_server(add("svc", "b", "10.0.0.2:80", 1))
        .await
        .unwrap();
    next_response(&mut responses).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, service) = get_json(addr, "/api/services/svc", "").await;
        let f = xds_follower(&service).unwrap();
        if f["lagging"] == true {
            assert_eq!(f["acked_version"], version);
            assert!(f["behind_ms"].as_u64().unwrap() > 2000, "{f}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{service}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(tx);
    server.shutdown().await.unwrap();
}
