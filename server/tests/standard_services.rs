//! The standard gRPC services next to the DLB ones: health (SERVING for "", dlb.v1.Registry and
//! dlb.v1.Discovery, NOT_SERVING once shutdown starts) and server reflection, v1 and v1alpha,
//! listing the health service too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

#[tokio::test]
async fn health_and_reflection() {
    let server = start().await;
    let ch = channel(&server).await;
    let mut health = HealthClient::new(ch.clone());
    for service in ["", "dlb.v1.Registry", "dlb.v1.Discovery"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer {resp:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"dlb.v1.Registry"), "{names:?}");
    assert!(names.contains(&"dlb.v1.Discovery"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn reflection_v1alpha_for_older_tools() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;

    let server = start().await;
    let mut refl = ServerReflectionClient::new(channel(&server).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer {resp:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "dlb.v1.Registry",
        "dlb.v1.Discovery",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&expected), "{expected} missing: {names:?}");
    }
    server.shutdown().await.unwrap();
}

/// An unknown symbol or file is an in-stream `error_response` (NOT_FOUND) and the stream keeps
/// answering: tools send several lookups on one stream.
#[tokio::test]
async fn reflection_answers_unknown_symbols_in_stream() {
    let server = start().await;
    let mut refl = ServerReflectionClient::new(channel(&server).await);
    let lookup = |m: MessageRequest| ServerReflectionRequest {
        host: "h".into(),
        message_request: Some(m),
    };
    let requests = [
        lookup(MessageRequest::FileContainingSymbol(
            "no.such.Symbol".into(),
        )),
        lookup(MessageRequest::FileByFilename("no/such.proto".into())),
        lookup(MessageRequest::FileContainingSymbol(
            "dlb.v1.Registry".into(),
        )),
    ];
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("no answer in time")
            .expect("the stream ended with an error instead of an error_response")
            .expect("the stream ended early")
    };
    for what in ["no.such.Symbol", "no/such.proto"] {
        let resp = next().await;
        let Some(MessageResponse::ErrorResponse(e)) = &resp.message_response else {
            panic!("expected an error_response for {what}: {resp:?}");
        };
        assert_eq!(e.error_code, tonic::Code::NotFound as i32, "{e:?}");
        assert!(e.error_message.contains(what), "{e:?}");
        assert_eq!(resp.valid_host, "h");
        assert!(resp.original_request.is_some());
    }
    let resp = next().await;
    assert!(
        matches!(
            resp.message_response,
            Some(MessageResponse::FileDescriptorResponse(_))
        ),
        "{resp:?}"
    );
    assert!(stream.message().await.unwrap().is_none(), "ends with OK");

    // v1alpha (grpcurl, grpcio) likewise.
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as Alpha;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaReq;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResp;
    let mut alpha = Alpha::new(channel(&server).await);
    let req = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaReq::FileContainingSymbol("no.such.Symbol".into())),
    };
    let mut stream = alpha
        .server_reflection_info(tokio_stream::iter([req.clone(), req]))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let resp = tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap()
            .expect("v1alpha ended the stream with an error")
            .unwrap();
        let Some(AlphaResp::ErrorResponse(e)) = &resp.message_response else {
            panic!("expected an error_response: {resp:?}");
        };
        assert_eq!(e.error_code, tonic::Code::NotFound as i32, "{e:?}");
    }
    server.shutdown().await.unwrap();
}
