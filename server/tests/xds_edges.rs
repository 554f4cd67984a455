//! xDS streams against hostile clients: an undecodable request ends the stream with
//! INVALID_ARGUMENT (SotW and delta), and a client NACKing in a loop gets a few log lines, then
//! one line counting the rest.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dlb_server::api::xds::resources::CLUSTER;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio_stream::wrappers::ReceiverStream;

const WAIT: Duration = Duration::from_secs(10);

/// A message whose field `tag` holds bytes: invalid UTF-8 there is undecodable as the string
/// field the real request has at that tag.
#[derive(Clone, PartialEq, prost::Message)]
struct Sotw1 {
    #[prost(bytes = "vec", tag = "1")]
    raw: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Delta2 {
    #[prost(bytes = "vec", tag = "2")]
    raw: Vec<u8>,
}

async fn end_status<M, R>(
    server: &dlb_server::RunningServer,
    method: &'static str,
    m: M,
) -> tonic::Status
where
    M: prost::Message + Send + Sync + Clone + 'static,
    R: prost::Message + Default + Send + Sync + std::fmt::Debug + 'static,
{
    let mut grpc = tonic::client::Grpc::new(common::channel(server).await);
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(m).await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    let codec = tonic_prost::ProstCodec::<M, R>::default();
    let mut stream = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, codec)
        .await
        .unwrap()
        .into_inner();
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the stream did not end");
    drop(tx);
    end.expect_err("an undecodable request ended the stream with OK")
}

#[tokio::test]
async fn an_undecodable_request_ends_with_invalid_argument() {
    let server = common::start().await;
    let garbage = vec![0xff, 0xfe, 0xfd];
    let status = end_status::<_, DiscoveryResponse>(
        &server,
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        Sotw1 {
            raw: garbage.clone(),
        },
    )
    .await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("undecodable DiscoveryRequest"),
        "{status:?}"
    );
    let status = end_status::<_, DeltaDiscoveryResponse>(
        &server,
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
        Delta2 { raw: garbage },
    )
    .await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("undecodable DeltaDiscoveryRequest"),
        "{status:?}"
    );
    server.shutdown().await.unwrap();
}

/// Collects what the server logs on this thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self, needle: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

/// The test runtime is single-threaded, so the server's tasks log through this thread's
/// subscriber.
#[tokio::test(flavor = "current_thread")]
async fn nack_logs_are_rate_limited_per_stream() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = common::start().await;
    common::registry(&server)
        .await
        .add_server(common::add("s", "a", "127.0.0.1:1001", 1))
        .await
        .unwrap();
    let mut client = AggregatedDiscoveryServiceClient::new(common::channel(&server).await);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let req = |nonce: &str, error: Option<&str>| DiscoveryRequest {
        node: Some(envoy_types::pb::envoy::config::core::v3::Node {
            id: "nacker".into(),
            ..Default::default()
        }),
        type_url: CLUSTER.into(),
        resource_names: vec!["s".into()],
        response_nonce: nonce.into(),
        error_detail: error.map(|m| RpcStatus {
            code: 3,
            message: m.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    tx.send(req("", None)).await.unwrap();
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    const NACKS: u64 = 500;
    for _ in 0..NACKS {
        tx.send(req(&first.nonce, Some("rejected"))).await.unwrap();
    }
    // Every NACK is counted...
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let nacks = server
            .xds_clients()
            .list()
            .iter()
            .find(|c| c.node_id == "nacker")
            .and_then(|c| c.types.get(CLUSTER).map(|t| t.nacks));
        if nacks == Some(NACKS) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "NACKs counted: {nacks:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... but only the first few are logged.
    let logged = captured.lines("client rejected a response (NACK)");
    let burst = dlb_server::log_limit::LogLimiter::BURST as usize;
    assert_eq!(logged.len(), burst, "{logged:#?}");
    // The stream's end accounts for the rest in one line.
    drop(tx);
    drop(stream);
    let deadline = tokio::time::Instant::now() + WAIT;
    let expected = format!("{} similar messages suppressed", NACKS - burst as u64);
    while captured.lines(&expected).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no suppressed-count line: {:#?}",
            captured.lines("xds")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await.unwrap();
}
