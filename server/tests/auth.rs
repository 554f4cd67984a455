//! Who may write: bearer tokens over real gRPC (missing → UNAUTHENTICATED, wrong →
//! PERMISSION_DENIED, right → OK; reads and sessions open unless read tokens are set; health
//! open), and the real `dlbd` binary never logs a token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use dlb::proto;
use dlb_server::api::auth::AuthConfig;
use dlb_server::ServerConfig;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};

const ADMIN: &str = "admin-secret-token-0001";
const READER: &str = "reader-secret-token-0001";

fn with_token<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        let v: MetadataValue<_> = format!("Bearer {t}").parse().unwrap();
        r.metadata_mut().insert("authorization", v);
    }
    r
}

async fn server(read: bool) -> dlb_server::RunningServer {
    start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        auth: AuthConfig {
            admin_tokens: vec![ADMIN.into()],
            read_tokens: if read {
                vec![READER.into()]
            } else {
                Vec::new()
            },
        },
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn writes_need_an_admin_token() {
    let server = server(false).await;
    let mut c = registry(&server).await;
    let add_req = |id: &str| add("", id, "10.0.0.1:80", 1);
    let e = c
        .add_server(with_token(add_req("a"), None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c
        .add_server(with_token(add_req("a"), Some("admin-secret-token-0002")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        !e.message().contains("secret"),
        "the error echoes a token: {e:?}"
    );
    // Refused writes changed nothing.
    let list = c
        .list_servers(proto::ListServersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.servers.is_empty());
    c.add_server(with_token(add_req("a"), Some(ADMIN)))
        .await
        .unwrap();
    for (name, r) in [
        (
            "health_check_failed",
            c.health_check_failed(with_token(hc("", "a"), None))
                .await
                .map(|_| ()),
        ),
        (
            "set_policy",
            c.set_policy(with_token(
                proto::SetPolicyRequest {
                    policy: Some(dlb::model::default_policy()),
                    ..Default::default()
                },
                None,
            ))
            .await
            .map(|_| ()),
        ),
    ] {
        assert_eq!(r.unwrap_err().code(), Code::Unauthenticated, "{name}");
    }
    // Reads and sessions are open without read tokens.
    c.get_next_server(proto::GetNextServerRequest::default())
        .await
        .unwrap();
    let mut s = Session::open(&server, subscribe(&[("", None)])).await;
    assert_eq!(s.update().await.upserts.len(), 1);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn read_tokens_close_reads_and_sessions_but_not_health() {
    let server = server(true).await;
    let mut c = registry(&server).await;
    let e = c
        .list_services(with_token(proto::ListServicesRequest {}, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    c.list_services(with_token(proto::ListServicesRequest {}, Some(READER)))
        .await
        .unwrap();
    c.list_services(with_token(proto::ListServicesRequest {}, Some(ADMIN)))
        .await
        .unwrap();
    // A read token cannot write.
    let e = c
        .add_server(with_token(add("", "a", "10.0.0.1:80", 1), Some(READER)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Sessions.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(subscribe(&[("", None)])).await.unwrap();
    let e = proto::discovery_client::DiscoveryClient::new(channel(&server).await)
        .session(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(subscribe(&[("", None)])).await.unwrap();
    let mut stream = proto::discovery_client::DiscoveryClient::new(channel(&server).await)
        .session(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some(READER),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    // Health stays open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&server).await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    drop(tx);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn dlbd_never_logs_a_token() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin-tokens");
    std::fs::write(&file, format!("# admins\n{ADMIN}\n")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dlbd"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-metrics",
            "--store",
            "memory",
        ])
        .arg("--admin-token-file")
        .arg(&file)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // Read the ready line byte by byte to learn the port.
    let mut log = Vec::new();
    let mut byte = [0u8; 1];
    let grpc = loop {
        assert_eq!(stderr.read(&mut byte).unwrap(), 1, "dlbd exited");
        log.push(byte[0]);
        if byte[0] == b'\n' {
            let text = String::from_utf8_lossy(&log).into_owned();
            if let Some(line) = text.lines().last().filter(|l| l.contains("dlbd listening")) {
                break line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("grpc="))
                    .unwrap()
                    .to_owned();
            }
        }
    };
    let mut c = proto::registry_client::RegistryClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let req = || add("", "a", "10.0.0.1:80", 1);
    c.add_server(with_token(req(), Some("wrong-secret-token-0009")))
        .await
        .unwrap_err();
    c.add_server(with_token(req(), Some(ADMIN))).await.unwrap();
    drop(c);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    child.wait().unwrap();
    let all = format!("{}{rest}", String::from_utf8_lossy(&log));
    assert!(
        all.contains("server added"),
        "the log is not the one expected: {all}"
    );
    assert!(!all.contains("secret-token"), "dlbd logged a token:\n{all}");
}
