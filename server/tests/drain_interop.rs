//! The drain barrier with a stock xDS client: 50 SDK sessions (dlb-client) and one Python
//! `grpcio` client (through `dlbd`'s ADS, bootstrap file, target `xds:///s`) follow a service
//! with real gRPC backends on loopback. `DrainServer` with a wait returns only once each has
//! acknowledged the drain, and after it no SDK pick and no grpcio call reaches the backend.
//!
//! The client is found as in `xds_interop.rs`: `DLB_INTEROP_PYTHON`, else `.ci/interop`'s
//! `target/interop-venv`; neither: skipped (a failure when `CI` is set).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
mod xds_support;

use std::time::Duration;

use dlb::proto;
use dlb_client::Client;
use dlb_server::api::xds::resources::ENDPOINTS;
use xds_support::{Backend, Driver};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sdks_and_grpcio_confirm_before_drain_wait_returns() {
    let Some(python) = xds_support::python() else {
        return;
    };
    let server = common::start().await;
    let mut reg = common::registry(&server).await;
    let mut backends = Vec::new();
    for id in ["b1", "b2"] {
        let b = Backend::start(id).await;
        reg.add_server(common::add("s", id, &b.addr.to_string(), 1))
            .await
            .unwrap();
        backends.push(b);
    }
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("bootstrap.json");
    xds_support::write_bootstrap(&bootstrap, server.grpc_addr(), "interop-node");
    let script = xds_support::grpcio_script();
    let mut grpcio = Driver::start(&python, &[script.as_str(), "xds:///s"], &bootstrap).await;
    grpcio
        .until(40, None, Duration::from_secs(60), "both backends", |r| {
            r.errors.is_empty() && r.ok.len() == 2
        })
        .await;

    let endpoint = format!("http://{}", server.grpc_addr());
    let mut sdks = Vec::new();
    for i in 0..50 {
        let client = Client::builder([endpoint.clone()])
            .client_id(format!("sdk-{i}"))
            .connect()
            .await
            .unwrap();
        let h = client.service("s").await.unwrap();
        sdks.push((client, h));
    }

    let resp = reg
        .drain_server(proto::DrainServerRequest {
            service: "s".into(),
            server_id: "b1".into(),
            wait: Some(proto::BarrierWait {
                in_flight_zero: false,
                timeout_ms: 30_000,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // At the moment the call returns: every SDK holds the drain, and dlbd has grpcio's
    // acknowledgement of endpoints built from it.
    let sdk_versions: Vec<u64> = sdks.iter().map(|(_, h)| h.version().version).collect();
    let grpcio_acked = server
        .xds_clients()
        .list()
        .into_iter()
        .find(|c| c.node_id == "interop-node")
        .and_then(|c| c.endpoints_acked.get("s").map(|h| h.version))
        .unwrap_or(0);
    let v = resp.version.unwrap().version;
    let b = resp.barrier.unwrap();
    assert_eq!(b.ended(), proto::BarrierEnd::Confirmed, "{b:?}");
    assert_eq!((b.version, b.confirmed, b.pending_total), (v, 51, 0));
    assert!(
        sdk_versions.iter().all(|&x| x >= v),
        "{sdk_versions:?} < {v}"
    );
    assert!(grpcio_acked >= v, "grpcio acked {grpcio_acked} < {v}");
    let eds = server
        .xds_clients()
        .list()
        .into_iter()
        .find(|c| c.node_id == "interop-node")
        .and_then(|c| c.types.get(ENDPOINTS).cloned())
        .unwrap();
    assert!(eds.names.contains("s") || eds.wildcard);

    // From now on no SDK pick and no grpcio call reaches b1.
    for (_, h) in &sdks {
        for _ in 0..20 {
            assert_eq!(h.get_next_server(None).unwrap().server_id(), "b2");
        }
    }
    let calls = grpcio.calls(300, None).await;
    assert!(calls.errors.is_empty(), "{calls:?}");
    assert_eq!(calls.of("b1"), 0, "{calls:?}");
    assert_eq!(calls.of("b2"), 300, "{calls:?}");
    grpcio.quit().await;
}
