//! Helpers shared by the integration tests: start a real server on 127.0.0.1:0, connect the
//! generated clients, and drive a Discovery session with timeouts so nothing hangs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use dlb::proto::{
    self, client_message, discovery_client::DiscoveryClient, registry_client::RegistryClient,
    server_message, ClientMessage, ServerMessage,
};
use dlb_server::{RunningServer, ServerConfig};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

/// How long anything that must happen may take (generous: this VM stalls for seconds).
pub const WAIT: Duration = Duration::from_secs(30);

pub async fn start() -> RunningServer {
    start_with(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        ..Default::default()
    })
    .await
}

pub async fn start_with(config: ServerConfig) -> RunningServer {
    tokio::time::timeout(WAIT, dlb_server::spawn(config))
        .await
        .expect("spawn timed out")
        .expect("spawn failed")
}

pub async fn channel(server: &RunningServer) -> Channel {
    tokio::time::timeout(
        WAIT,
        Channel::from_shared(format!("http://{}", server.grpc_addr()))
            .unwrap()
            .connect(),
    )
    .await
    .expect("connect timed out")
    .expect("connect failed")
}

pub async fn registry(server: &RunningServer) -> RegistryClient<Channel> {
    RegistryClient::new(channel(server).await)
}

/// Opens a state-of-the-world ADS stream whose first request is `first`: the sender of the
/// client's further requests and the server's responses.
pub async fn sotw(
    server: &RunningServer,
    first: DiscoveryRequest,
) -> (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>) {
    let mut client = AggregatedDiscoveryServiceClient::new(channel(server).await);
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let rx = tokio::time::timeout(
        WAIT,
        client.stream_aggregated_resources(ReceiverStream::new(rx)),
    )
    .await
    .expect("ADS stream timed out")
    .expect("ADS stream failed")
    .into_inner();
    (tx, rx)
}

pub fn add(service: &str, id: &str, address: &str, weight: u32) -> proto::AddServerRequest {
    proto::AddServerRequest {
        service: service.into(),
        server_id: id.into(),
        address: address.into(),
        weight,
        ..Default::default()
    }
}

pub fn hc(service: &str, id: &str) -> proto::HealthCheckRequest {
    proto::HealthCheckRequest {
        service: service.into(),
        server_id: id.into(),
    }
}

pub fn subscribe(services: &[(&str, Option<proto::Version>)]) -> ClientMessage {
    ClientMessage {
        kind: Some(client_message::Kind::Subscribe(proto::Subscribe {
            locality: None,
            client_id: "test".into(),
            services: services
                .iter()
                .map(|(s, known)| proto::ServiceSubscription {
                    service: (*s).into(),
                    known: *known,
                })
                .collect(),
        })),
    }
}

/// One open Discovery session.
pub struct Session {
    pub tx: mpsc::Sender<ClientMessage>,
    pub rx: Streaming<ServerMessage>,
}

impl Session {
    /// Opens a session whose first message is `first`.
    pub async fn open(server: &RunningServer, first: ClientMessage) -> Session {
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let mut client = DiscoveryClient::new(channel(server).await);
        let rx = tokio::time::timeout(WAIT, client.session(ReceiverStream::new(rx)))
            .await
            .expect("session timed out")
            .expect("session failed")
            .into_inner();
        Session { tx, rx }
    }

    pub async fn send(&self, msg: client_message::Kind) {
        self.tx
            .send(ClientMessage { kind: Some(msg) })
            .await
            .unwrap();
    }

    /// The next message other than a `Heartbeat` (panics after a timeout or when the stream
    /// ends or fails).
    pub async fn next(&mut self) -> server_message::Kind {
        loop {
            let msg = tokio::time::timeout(WAIT, self.rx.message())
                .await
                .expect("no message within the timeout")
                .expect("stream failed")
                .expect("stream ended");
            match msg.kind.expect("empty server message") {
                server_message::Kind::Heartbeat(_) => continue,
                other => return other,
            }
        }
    }

    /// The next message, which must be a ServiceUpdate.
    pub async fn update(&mut self) -> proto::ServiceUpdate {
        match self.next().await {
            server_message::Kind::Update(u) => u,
            other => panic!("expected an update, got {other:?}"),
        }
    }

    /// Asserts nothing arrives for `d`.
    pub async fn silent_for(&mut self, d: Duration) {
        if let Ok(m) = tokio::time::timeout(d, self.rx.message()).await {
            panic!("expected silence, got {m:?}");
        }
    }
}

pub fn v(u: &proto::ServiceUpdate) -> u64 {
    u.version.expect("version set").version
}
