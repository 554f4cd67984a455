//! gRPC server reflection (v1 and v1alpha) that answers a failed lookup in the stream.
//!
//! The reflection protocol answers an unknown symbol or file with an `error_response` message
//! and keeps the stream open for the next request (grpcurl, `grpc_cli` and grpcio's client send
//! several lookups on one stream). tonic-reflection 0.14 instead ends the whole stream with the
//! lookup's status. [`InStreamErrors`] wraps its server: each request of the client's stream is
//! asked of the wrapped server in process (a one-request stream, no socket) and a status it ends
//! with becomes an `error_response` carrying the status's code and message. Cost: one in-process
//! call per request; a stream holds one request at a time.

use std::convert::Infallible;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Implements one reflection version (`v1`, `v1alpha`): the protocol is the same, the
/// generated types differ only by package.
macro_rules! in_stream_errors {
    ($version:ident) => {
        /// The reflection service of this version with in-stream errors (see the module docs).
        pub mod $version {
            use super::*;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::server_reflection_server::{
                ServerReflection, ServerReflectionServer,
            };
            use tonic_reflection::pb::$version::{
                ErrorResponse, ServerReflectionRequest, ServerReflectionResponse,
            };

            /// Wraps tonic-reflection's server `S` (see the module docs).
            #[derive(Debug, Clone)]
            pub struct InStreamErrors<S> {
                inner: S,
                shutdown: crate::shutdown::Shutdown,
            }

            /// `inner` (e.g. `Builder::build_v1()`'s server), answering lookups in-stream;
            /// each stream's task is spawned through `shutdown` and ends when it starts.
            pub fn wrap<S>(
                inner: S,
                shutdown: crate::shutdown::Shutdown,
            ) -> ServerReflectionServer<InStreamErrors<S>>
            where
                InStreamErrors<S>: ServerReflection,
            {
                ServerReflectionServer::new(InStreamErrors { inner, shutdown })
            }

            /// One request asked of the wrapped server: its answer, or its status as an
            /// `error_response`.
            async fn ask<S>(inner: S, req: ServerReflectionRequest) -> ServerReflectionResponse
            where
                S: tonic::client::GrpcService<tonic::body::Body, Error = Infallible>,
                S::ResponseBody:
                    tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
                <S::ResponseBody as tonic::codegen::Body>::Error:
                    Into<tonic::codegen::StdError> + Send,
            {
                let mut client = ServerReflectionClient::new(inner);
                let answer = match client
                    .server_reflection_info(tokio_stream::iter([req.clone()]))
                    .await
                {
                    Ok(r) => r.into_inner().message().await,
                    Err(status) => Err(status),
                };
                let message_response = match answer {
                    Ok(Some(r)) => return r,
                    Ok(None) => MessageResponse::ErrorResponse(ErrorResponse {
                        error_code: tonic::Code::Internal as i32,
                        error_message: "no answer".into(),
                    }),
                    Err(status) => MessageResponse::ErrorResponse(ErrorResponse {
                        error_code: status.code() as i32,
                        error_message: status.message().to_owned(),
                    }),
                };
                ServerReflectionResponse {
                    valid_host: req.host.clone(),
                    original_request: Some(req),
                    message_response: Some(message_response),
                }
            }

            #[tonic::async_trait]
            impl<S> ServerReflection for InStreamErrors<S>
            where
                S: tonic::client::GrpcService<tonic::body::Body, Error = Infallible>
                    + Clone
                    + Send
                    + Sync
                    + 'static,
                S::Future: Send,
                S::ResponseBody:
                    tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
                <S::ResponseBody as tonic::codegen::Body>::Error:
                    Into<tonic::codegen::StdError> + Send,
            {
                type ServerReflectionInfoStream =
                    ReceiverStream<Result<ServerReflectionResponse, tonic::Status>>;

                async fn server_reflection_info(
                    &self,
                    req: tonic::Request<tonic::Streaming<ServerReflectionRequest>>,
                ) -> Result<tonic::Response<Self::ServerReflectionInfoStream>, tonic::Status>
                {
                    let mut requests = req.into_inner();
                    let (tx, rx) = mpsc::channel(1);
                    let inner = self.inner.clone();
                    // Ends when the client ends its stream or stops reading, or at shutdown.
                    let shutdown = self.shutdown.clone();
                    self.shutdown.spawn(async move {
                        let answers = async move {
                            while let Some(req) = requests.next().await {
                                let Ok(req) = req else {
                                    return;
                                };
                                let answer = ask(inner.clone(), req).await;
                                if tx.send(Ok(answer)).await.is_err() {
                                    return;
                                }
                            }
                        };
                        tokio::select! {
                            () = answers => {}
                            () = shutdown.stopped() => {}
                        }
                    });
                    Ok(tonic::Response::new(ReceiverStream::new(rx)))
                }
            }
        }
    };
}

in_stream_errors!(v1);
in_stream_errors!(v1alpha);
