//! Status-code normalisation at the edge: an oversized request gets `RESOURCE_EXHAUSTED`.
//!
//! tonic answers a request message larger than the server's limit with `OUT_OF_RANGE`
//! ("decoded message length too large"); gRPC's own guidance and DLB's API use
//! `RESOURCE_EXHAUSTED` for a limit. tonic sends that answer trailers-only (the status is in the
//! response headers), so this tower layer rewrites `grpc-status: 11` to `8` in response headers.
//! Statuses in trailers (after a streamed body) are left alone: DLB's own handlers never return
//! `OUT_OF_RANGE`.

use std::task::{Context, Poll};

use futures::future::BoxFuture;

/// The layer. See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct OversizeLayer;

impl<S> tower::Layer<S> for OversizeLayer {
    type Service = OversizeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OversizeService { inner }
    }
}

/// The service [`OversizeLayer`] wraps around the router.
#[derive(Debug, Clone)]
pub struct OversizeService<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for OversizeService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            let headers = resp.headers_mut();
            if headers.get("grpc-status").map(|v| v.as_bytes()) == Some(b"11") {
                let message = headers
                    .get("grpc-message")
                    .and_then(|m| m.to_str().ok())
                    .unwrap_or_default();
                if message.contains("too%20large") || message.contains("too large") {
                    headers.insert("grpc-status", http::HeaderValue::from_static("8"));
                }
            }
            Ok(resp)
        })
    }
}
