//! Bodies of the call path: the request body as sent (buffered so it can be replayed, or
//! streamed), and [`CallBody`], the response body that ends the call — it reads the gRPC status
//! in the trailers, reports outcome and latency through the [`CallGuard`], releases the
//! connection's stream slot and returns an HTTP/1.1 connection to its pool.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;

use super::conn::Lease;
use super::stats::{CallStats, ErrorClass};
use super::BoxError;
use crate::CallGuard;

/// A request body that was read to its end within the buffer limit: can be sent any number of
/// times.
#[derive(Debug, Clone)]
pub(crate) struct Replay {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Replay {
    pub(crate) fn body(&self) -> ReqBody {
        ReqBody::Buffered {
            data: (!self.data.is_empty()).then(|| self.data.clone()),
            trailers: self.trailers.clone().map(Box::new),
        }
    }
}

/// The request body as handed to hyper.
pub(crate) enum ReqBody {
    /// Fully buffered (one data frame, then the trailers if any).
    Buffered {
        data: Option<Bytes>,
        /// Boxed: hyper moves the body through its dispatch channel and into the task it spawns
        /// per request, so the enum is kept small (56 bytes; 128 with the map inline).
        trailers: Option<Box<HeaderMap>>,
    },
    /// What was buffered before the limit (or a frame that was not ready), then the rest.
    Streaming {
        prefix: VecDeque<Bytes>,
        rest: UnsyncBoxBody<Bytes, BoxError>,
    },
}

impl std::fmt::Debug for ReqBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReqBody::Buffered { data, .. } => f
                .debug_struct("Buffered")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            ReqBody::Streaming { .. } => f.write_str("Streaming"),
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Buffered { data, trailers } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
            }
            ReqBody::Streaming { prefix, rest } => {
                if let Some(d) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Pin::new(rest).poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
            ReqBody::Streaming { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ReqBody::Streaming { prefix, rest } => {
                let p: u64 = prefix.iter().map(|b| b.len() as u64).sum();
                let mut h = rest.size_hint();
                h.set_lower(h.lower().saturating_add(p));
                if let Some(u) = h.upper() {
                    h.set_upper(u.saturating_add(p));
                }
                h
            }
        }
    }
}

/// Reads what the body has ready, up to `limit` bytes: the whole body (replayable) when it ends
/// within that, else a streaming body that starts with what was read. Never waits for a frame
/// that is not ready (a client-streaming call may wait for the response before sending more).
pub(crate) async fn prepare<B>(body: B, limit: usize) -> Result<(ReqBody, Option<Replay>), BoxError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut rest: UnsyncBoxBody<Bytes, BoxError> = body.map_err(Into::into).boxed_unsync();
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut size = 0usize;
    let mut trailers = None;
    let ended = loop {
        if rest.is_end_stream() {
            break true;
        }
        let next = std::future::poll_fn(|cx| match Pin::new(&mut rest).poll_frame(cx) {
            Poll::Pending => Poll::Ready(None),
            Poll::Ready(f) => Poll::Ready(Some(f)),
        })
        .await;
        match next {
            None => break false,
            Some(None) => break true,
            Some(Some(Err(e))) => return Err(e),
            Some(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => {
                    size = size.saturating_add(d.len());
                    chunks.push_back(d);
                    if size > limit {
                        break false;
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                    break true;
                }
            },
        }
    };
    if !ended {
        return Ok((
            ReqBody::Streaming {
                prefix: chunks,
                rest,
            },
            None,
        ));
    }
    let data = if chunks.len() == 1 {
        chunks.pop_front().unwrap_or_default()
    } else {
        let mut buf = BytesMut::with_capacity(size);
        for c in chunks {
            buf.extend_from_slice(&c);
        }
        buf.freeze()
    };
    let replay = Replay { data, trailers };
    Ok((replay.body(), Some(replay)))
}

/// How the outcome of a call is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Known from the response head (HTTP status, or a trailers-only gRPC response).
    Decided { ok: bool },
    /// gRPC: read `grpc-status` from the trailers.
    FromTrailers,
}

/// What ends a call when its response body ends or is dropped.
#[derive(Debug)]
pub(crate) struct Finish {
    pub(crate) guard: CallGuard,
    pub(crate) verdict: Verdict,
    pub(crate) stats: Arc<CallStats>,
    /// The connection the call holds (stream slot, or an HTTP/1.1 connection to give back).
    pub(crate) lease: Lease,
    /// gRPC failure codes (to classify the trailers).
    pub(crate) failure_codes: Arc<[tonic::Code]>,
}

impl Finish {
    fn end(mut self, ok: bool, class: Option<ErrorClass>, clean: bool) {
        let latency = self.guard.elapsed();
        self.stats.record(
            self.guard.server_id(),
            latency,
            class.or((!ok).then_some(ErrorClass::Status)),
        );
        if clean {
            self.lease.give_back();
        }
        if ok {
            self.guard.success();
        } else {
            self.guard.failure();
        }
    }
}

/// The response body of a call through a [`super::Balance`]. Forwards the backend's frames;
/// when the body ends (or fails, or is dropped) the call ends: outcome and latency are reported.
/// A body dropped before its outcome is known (a cancelled call) reports no outcome.
#[derive(Debug, Default)]
pub struct CallBody {
    inner: Option<hyper::body::Incoming>,
    finish: Option<Finish>,
}

impl CallBody {
    pub(crate) fn new(inner: hyper::body::Incoming, finish: Finish) -> Self {
        Self {
            inner: Some(inner),
            finish: Some(finish),
        }
    }

    fn end(&mut self, ok: bool, class: Option<ErrorClass>, clean: bool) {
        if let Some(f) = self.finish.take() {
            f.end(ok, class, clean);
        }
    }
}

impl Drop for CallBody {
    fn drop(&mut self) {
        let clean = self.inner.as_ref().is_some_and(|b| b.is_end_stream());
        if let Some(f) = self.finish.take() {
            match f.verdict {
                // The outcome is known: the caller just did not read the rest.
                Verdict::Decided { ok } => f.end(ok, None, clean),
                Verdict::FromTrailers => f.stats.cancelled(),
            }
        }
    }
}

impl Body for CallBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                let ok = match this.finish.as_ref().map(|f| f.verdict) {
                    Some(Verdict::Decided { ok }) => ok,
                    // A gRPC response without a status in its trailers is malformed.
                    _ => false,
                };
                this.end(ok, None, true);
            }
            Poll::Ready(Some(Err(_))) => this.end(false, Some(ErrorClass::Transport), false),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    if let Some(f) = this.finish.as_mut() {
                        if f.verdict == Verdict::FromTrailers {
                            let code = super::classify::grpc_code(t);
                            let ok = code.is_some_and(|c| !f.failure_codes.contains(&c));
                            f.verdict = Verdict::Decided { ok };
                        }
                    }
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    /// hyper moves the request body through its dispatch channel and into the task it spawns
    /// per request: a fat body costs a copy per move on every call (callgrind: 1,500
    /// instructions per call when the trailers' `HeaderMap` was inline, 128 bytes).
    #[test]
    fn the_request_body_stays_small() {
        assert!(std::mem::size_of::<super::ReqBody>() <= 64);
    }
}
