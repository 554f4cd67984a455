//! One request through the call path: pick, send, classify; retries and hedges.
//!
//! The loop keeps the attempts in flight in a `FuturesUnordered`. The first attempt goes out at
//! once; a hedge timer (when hedging is on and the body is replayable) adds a copy to another
//! backend; a failed attempt is retried when it is safe, after a jittered backoff (policy
//! retries only). When no hedge can be sent (no hedging, or a body not replayable) at most one
//! attempt is in flight: the fast path awaits each in turn, with the same retry decision
//! (`next_attempt`) and no `FuturesUnordered`, `select!` or timer.
//!
//! Safe to retry: a request provably not processed — a connect error, a connection found closed
//! before the request was written (hyper gives the request back), an HTTP/2 `REFUSED_STREAM` —
//! always goes to another backend (up to `max_attempts`, 3 without a retry policy); with a
//! retry policy, also a trailers-only gRPC response whose code the policy lists, an HTTP status
//! it lists, and a transport error after sending when it lists UNAVAILABLE (14). Everything but
//! an unsent request needs the body buffered (replayable).
//!
//! The first final response wins: returning drops the other attempts, which cancels their
//! streams (`RST_STREAM(CANCEL)`). Every retry and hedge takes a budget token first. No backend
//! is tried twice within one request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dlb::call::HedgeDelay;

use futures::stream::{FuturesUnordered, StreamExt};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::body::{prepare, CallBody, Finish, Replay, ReqBody, Verdict};
use super::classify::{grpc_code, refused_stream};
use super::config::Protocol;
use super::policy::Resolved;
use super::stats::ErrorClass;
use super::{BoxError, Shared};
use crate::{CallGuard, Error};

/// Attempts when no retry policy is set: requests that provably did not reach a backend
/// (connect errors, refused streams) still go to another one, this many times in all.
const TRANSPARENT_ATTEMPTS: u32 = 3;

/// The head of the request, to build each attempt.
struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

/// How one attempt ended: a response for the caller, or a failure.
type Outcome = Result<Response<CallBody>, Box<Failure>>;

/// What the caller gets.
type Ended = Result<Response<CallBody>, BoxError>;

/// A failed attempt.
struct Failure {
    class: ErrorClass,
    error: BoxError,
    /// Whether it may be retried by the policy (a listed status, or a transport error when
    /// UNAVAILABLE is listed).
    by_policy: bool,
    /// The request, when it was never written (always safe to send elsewhere).
    unsent: Option<Request<ReqBody>>,
    /// Whether the server refused the stream (safe to retry with a replayable body).
    refused: bool,
    /// What the caller gets if no retry follows.
    response: Option<Response<CallBody>>,
}

/// What deciding on a retry needs from the request.
struct RetryCtx<'a> {
    cfg: &'a Resolved,
    replay: Option<&'a Replay>,
    head: Option<&'a Head>,
    key: Option<&'a [u8]>,
    max_attempts: u32,
}

/// An attempt's guard until its response arrives. Dropped before that — the request was
/// cancelled (a hedge lost, the caller went away) and nothing is reported — unless the caller's
/// deadline passed: then the backend did not answer in time, a failure (so a backend that
/// accepts calls and never answers is ejected like one that fails them).
struct Pending {
    guard: Option<CallGuard>,
    expired: Arc<AtomicBool>,
}

impl Pending {
    fn guard(&self) -> &CallGuard {
        self.guard
            .as_ref()
            .expect("the guard is taken only when the attempt ends")
    }

    /// The attempt got an answer (or a failure of its own): the caller of this decides.
    fn into_guard(mut self) -> CallGuard {
        self.guard
            .take()
            .expect("the guard is taken only when the attempt ends")
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(g) = self.guard.take() {
            if self.expired.load(Ordering::Acquire) {
                g.failure();
            }
        }
    }
}

impl Shared {
    /// The whole call, under the caller's deadline.
    pub(crate) async fn call<B>(
        self: Arc<Self>,
        req: Request<B>,
    ) -> Result<Response<CallBody>, BoxError>
    where
        B: Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let cfg = self.policies.get(&self.handle.state, &self.opts);
        cfg.budget.deposit();
        let deadline = match self.opts.protocol {
            Protocol::Grpc => super::classify::grpc_timeout(req.headers()),
            Protocol::Http1 => None,
        };
        let expired = Arc::new(AtomicBool::new(false));
        let run = self.clone().dispatch(req, cfg, expired.clone());
        let Some(d) = deadline else {
            return run.await;
        };
        // Boxed so it can be dropped right after `expired` is set (its attempts report then).
        let mut run = Box::pin(run);
        match tokio::time::timeout(d, run.as_mut()).await {
            Ok(r) => r,
            Err(_) => {
                // The attempts still waiting for an answer report a failure as they drop.
                expired.store(true, Ordering::Release);
                drop(run);
                self.stats.error(ErrorClass::Deadline);
                Err(self.error(ErrorClass::Deadline, format!("deadline of {d:?} exceeded")))
            }
        }
    }

    /// The error a caller gets: a `tonic::Status` for gRPC (so a generated client reports the
    /// right code), an [`Error`] for HTTP.
    pub(crate) fn error(&self, class: ErrorClass, message: String) -> BoxError {
        match self.opts.protocol {
            Protocol::Grpc => {
                let code = match class {
                    ErrorClass::Deadline => tonic::Code::DeadlineExceeded,
                    _ => tonic::Code::Unavailable,
                };
                Box::new(tonic::Status::new(code, message))
            }
            Protocol::Http1 => Box::new(Error::Call {
                class: class.label(),
                message,
            }),
        }
    }

    async fn dispatch<B>(
        self: Arc<Self>,
        req: Request<B>,
        cfg: Arc<Resolved>,
        expired: Arc<AtomicBool>,
    ) -> Result<Response<CallBody>, BoxError>
    where
        B: Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        let key = self.opts.key.as_ref().and_then(|k| k.key(&parts));
        let (first, replay) = if cfg.replays() {
            prepare(body, cfg.replay_limit).await?
        } else {
            let rest = body.map_err(Into::into).boxed_unsync();
            (
                ReqBody::Streaming {
                    prefix: Default::default(),
                    rest,
                },
                None,
            )
        };
        // The head is kept (cloned) only when the body can be replayed: an unsent request comes
        // back whole.
        let head = replay.as_ref().map(|_| Head {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        });
        let first = Request::from_parts(parts, first);
        self.wait_for_snapshot().await;

        let retry = cfg.retry.as_ref();
        let max_attempts = retry.map_or(TRANSPARENT_ATTEMPTS, |r| r.max_attempts.max(1));
        // What every retry decision reads (one for the fast path and the hedge loop).
        let ctx = RetryCtx {
            cfg: &cfg,
            replay: replay.as_ref(),
            head: head.as_ref(),
            key: key.as_deref(),
            max_attempts,
        };
        let hedge = cfg.hedge.as_ref().filter(|_| replay.is_some());
        let mut tried: Vec<String> = Vec::new();
        let mut attempts = 1u32;
        let mut retries = 0u32;

        let guard = self.pick(key.as_deref(), &tried).map_err(|e| {
            self.stats.error(ErrorClass::NoBackend);
            self.error(ErrorClass::NoBackend, e.to_string())
        })?;
        tried.push(guard.server_id().to_owned());

        let Some(hedge) = hedge else {
            // The fast path: no hedge can be sent, so at most one attempt is in flight — await
            // each in turn (no `FuturesUnordered`, no `select!`, no timer).
            let mut guard = guard;
            let mut req = first;
            loop {
                let pending = Pending {
                    guard: Some(guard),
                    expired: expired.clone(),
                };
                let f = match self.clone().attempt(cfg.clone(), pending, req).await {
                    Ok(r) => return Ok(r),
                    Err(f) => *f,
                };
                let (g, next, backoff) =
                    match self.next_attempt(f, &ctx, &tried, &mut attempts, &mut retries) {
                        Ok(x) => x,
                        Err(end) => return end,
                    };
                if let Some(d) = backoff {
                    tokio::time::sleep(d).await;
                }
                tried.push(g.server_id().to_owned());
                (guard, req) = (g, next);
            }
        };

        let mut inflight = FuturesUnordered::new();
        let mut hedges = 0u32;
        inflight.push(self.clone().attempt(
            cfg.clone(),
            Pending {
                guard: Some(guard),
                expired: expired.clone(),
            },
            first,
        ));

        let hedge_delay = |s: &Self| match hedge.delay {
            HedgeDelay::Fixed(d) => Some(d),
            HedgeDelay::Percentile(p) => s
                .stats
                .recent
                .percentile(f64::from(p), dlb::call::defaults::HEDGE_MIN_SAMPLES),
        };
        let mut hedge_at = hedge_delay(&self).map(|d| Instant::now() + d);

        loop {
            let timer = async {
                match hedge_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let outcome = tokio::select! {
                Some(o) = inflight.next() => o,
                () = timer => {
                    hedge_at = None;
                    let (Some(replay), Some(head)) = (&replay, &head) else { continue };
                    if hedges >= hedge.max_hedges {
                        continue;
                    }
                    if !cfg.budget.try_withdraw() {
                        self.stats.budget_exhausted.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let Ok(guard) = self.pick(key.as_deref(), &tried) else { continue };
                    tried.push(guard.server_id().to_owned());
                    hedges += 1;
                    self.stats.hedges.fetch_add(1, Ordering::Relaxed);
                    inflight.push(self.clone().attempt(cfg.clone(), Pending { guard: Some(guard), expired: expired.clone() }, self.request(head, replay.body())));
                    if hedges < hedge.max_hedges {
                        hedge_at = hedge_delay(&self).map(|d| Instant::now() + d);
                    }
                    continue;
                }
            };
            let f = match outcome {
                Ok(r) => return Ok(r),
                Err(f) => *f,
            };
            if !inflight.is_empty() {
                // A hedge is still running: its answer may yet win.
                continue;
            }
            let (guard, next, backoff) =
                match self.next_attempt(f, &ctx, &tried, &mut attempts, &mut retries) {
                    Ok(x) => x,
                    Err(end) => return end,
                };
            if let Some(d) = backoff {
                tokio::time::sleep(d).await;
            }
            tried.push(guard.server_id().to_owned());
            inflight.push(self.clone().attempt(
                cfg.clone(),
                Pending {
                    guard: Some(guard),
                    expired: expired.clone(),
                },
                next,
            ));
        }
    }

    /// After a failed attempt with nothing else in flight: the next attempt (its backend, its
    /// request and the backoff before it), or — in the error slot — what the caller gets: the
    /// failed attempt's response when it had one, else an error.
    #[allow(clippy::type_complexity, clippy::result_large_err)] // returned at once, not propagated
    fn next_attempt(
        &self,
        f: Failure,
        ctx: &RetryCtx<'_>,
        tried: &[String],
        attempts: &mut u32,
        retries: &mut u32,
    ) -> Result<(CallGuard, Request<ReqBody>, Option<std::time::Duration>), Ended> {
        let Failure {
            class,
            error,
            by_policy,
            unsent,
            refused,
            response,
        } = f;
        let retry = ctx.cfg.retry.as_ref();
        let give_up = |response: Option<Response<CallBody>>, error: BoxError| match response {
            Some(r) => Ok(r),
            None => Err(self.error(class, error.to_string())),
        };
        let next = match (unsent, ctx.replay, ctx.head) {
            (Some(req), _, _) => Some(req),
            (None, Some(r), Some(head)) if refused || (by_policy && retry.is_some()) => {
                Some(self.request(head, r.body()))
            }
            _ => None,
        };
        let Some(next) = next else {
            return Err(give_up(response, error));
        };
        if *attempts >= ctx.max_attempts {
            return Err(give_up(response, error));
        }
        if !ctx.cfg.budget.try_withdraw() {
            self.stats.budget_exhausted.fetch_add(1, Ordering::Relaxed);
            return Err(give_up(response, error));
        }
        let Ok(guard) = self.pick(ctx.key, tried) else {
            return Err(give_up(response, error));
        };
        drop(response);
        *attempts += 1;
        *retries += 1;
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        let backoff = match (retry, by_policy) {
            (Some(r), true) => Some(r.backoff(*retries, fastrand::f64())),
            _ => None,
        };
        Ok((guard, next, backoff))
    }

    /// Waits (bounded) for the service's first answer from the control plane.
    async fn wait_for_snapshot(&self) {
        let state = &self.handle.state;
        if state.answered.load(Ordering::Acquire) {
            return;
        }
        let mut rx = state.version_tx.subscribe();
        let wait = rx.wait_for(|_| state.answered.load(Ordering::Acquire));
        let _ = tokio::time::timeout(self.opts.wait_for_snapshot, wait).await;
    }

    fn pick(&self, key: Option<&[u8]>, tried: &[String]) -> crate::Result<CallGuard> {
        self.handle.pick_excluding(key, tried)
    }

    fn request(&self, head: &Head, body: ReqBody) -> Request<ReqBody> {
        let mut req = Request::new(body);
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = head.uri.clone();
        *req.headers_mut() = head.headers.clone();
        req
    }

    /// One attempt on the backend `guard` picked.
    async fn attempt(
        self: Arc<Self>,
        cfg: Arc<Resolved>,
        pending: Pending,
        mut req: Request<ReqBody>,
    ) -> Outcome {
        let g = pending.guard();
        let endpoint = self.pool.endpoint(g.server_id(), g.address());
        let (mut lease, sender) = match endpoint.lease().await {
            Ok(x) => x,
            Err(e) => {
                self.stats.error(ErrorClass::Connect);
                pending.into_guard().failure();
                return Err(Box::new(Failure {
                    class: ErrorClass::Connect,
                    error: Box::new(e),
                    by_policy: false,
                    unsent: Some(req),
                    refused: false,
                    response: None,
                }));
            }
        };
        target(
            self.opts.protocol,
            &mut req,
            pending.guard().address(),
            endpoint.authority.as_ref(),
        );
        let sent = sender.send(&mut lease, req).await;
        let guard = pending.into_guard();
        match sent {
            Ok(resp) => self.classify(&cfg, guard, lease, resp),
            Err(mut e) => {
                let unsent = e.take_message();
                let error = e.into_error();
                let refused = refused_stream(&error);
                self.stats.error(ErrorClass::Transport);
                if unsent.is_none() && !refused {
                    guard.failure();
                }
                // A request never written (the connection was found closed) or refused says
                // nothing about the backend's health: the guard ends without an outcome.
                let by_policy = cfg.retry.as_ref().is_some_and(|r| {
                    r.retries_grpc_code(tonic::Code::Unavailable as u32)
                        && self.opts.protocol == Protocol::Grpc
                });
                Err(Box::new(Failure {
                    class: ErrorClass::Transport,
                    error: Box::new(error),
                    by_policy,
                    unsent,
                    refused,
                    response: None,
                }))
            }
        }
    }

    /// Decides what a response head says, and wraps the body that will end the call.
    fn classify(
        &self,
        cfg: &Resolved,
        guard: CallGuard,
        lease: super::conn::Lease,
        resp: Response<hyper::body::Incoming>,
    ) -> Outcome {
        let retry = cfg.retry.as_ref();
        let (verdict, retryable, what) = match self.opts.protocol {
            Protocol::Grpc => {
                if resp.status() != http::StatusCode::OK {
                    let s = resp.status();
                    (Verdict::Decided { ok: false }, false, format!("HTTP {s}"))
                } else if let Some(code) = grpc_code(resp.headers()) {
                    // Trailers-only: the status is known before any message.
                    let ok = !self.opts.grpc_failure(code);
                    let retryable = retry.is_some_and(|r| r.retries_grpc_code(code as u32));
                    (Verdict::Decided { ok }, retryable, format!("{code:?}"))
                } else {
                    (Verdict::FromTrailers, false, String::new())
                }
            }
            Protocol::Http1 => {
                let s = resp.status().as_u16();
                let ok = !self.opts.http_failure_statuses.contains(&s);
                let retryable = retry.is_some_and(|r| r.retries_http_status(s));
                (Verdict::Decided { ok }, retryable, format!("HTTP {s}"))
            }
        };
        let finish = Finish {
            guard,
            verdict,
            stats: self.stats.clone(),
            lease,
            failure_codes: self.failure_codes.clone(),
        };
        let resp = resp.map(|b| CallBody::new(b, finish));
        if retryable {
            Err(Box::new(Failure {
                class: ErrorClass::Status,
                error: what.into(),
                by_policy: true,
                unsent: None,
                refused: false,
                response: Some(resp),
            }))
        } else {
            Ok(resp)
        }
    }
}

/// Marks a request whose `Host` header the call path set from a backend's address (HTTP/1.1,
/// no `Host` and no authority from the caller): a request that comes back unsent goes to the
/// next backend with that backend's address, not the first one's.
#[derive(Debug, Clone, Copy)]
struct HostFromBackend;

/// Points the request at `address`: absolute URI for HTTP/2, origin form and `Host` for
/// HTTP/1.1 (the caller's `Host`, else the URI's authority, else the backend's address).
fn target(
    protocol: Protocol,
    req: &mut Request<ReqBody>,
    address: &str,
    authority: Option<&http::uri::Authority>,
) {
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    match protocol {
        Protocol::Grpc => {
            *req.version_mut() = http::Version::HTTP_2;
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = authority.cloned();
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        Protocol::Http1 => {
            *req.version_mut() = http::Version::HTTP_11;
            let ours = req.extensions().get::<HostFromBackend>().is_some();
            if ours || !req.headers().contains_key(http::header::HOST) {
                let (host, from_backend) = match req.uri().authority() {
                    Some(a) => (a.as_str().to_owned(), false),
                    None => (address.to_owned(), true),
                };
                if let Ok(v) = http::HeaderValue::from_str(&host) {
                    req.headers_mut().insert(http::header::HOST, v);
                    if from_backend {
                        req.extensions_mut().insert(HostFromBackend);
                    }
                }
            }
            *req.uri_mut() = Uri::from(pq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(req: &Request<ReqBody>) -> &str {
        req.headers()[http::header::HOST].to_str().unwrap()
    }

    fn empty() -> ReqBody {
        ReqBody::Buffered {
            data: None,
            trailers: None,
        }
    }

    #[test]
    fn an_unsent_http1_request_takes_the_next_backends_address_as_host() {
        let mut req = Request::get("/a?b=1").body(empty()).unwrap();
        target(Protocol::Http1, &mut req, "10.0.0.1:80", None);
        assert_eq!(host(&req), "10.0.0.1:80");
        assert_eq!(req.uri(), "/a?b=1");
        // The request came back unsent and goes to another backend.
        target(Protocol::Http1, &mut req, "10.0.0.2:81", None);
        assert_eq!(host(&req), "10.0.0.2:81");
        assert_eq!(req.uri(), "/a?b=1");
    }

    #[test]
    fn the_callers_host_or_authority_is_kept_on_every_backend() {
        let mut req = Request::get("/")
            .header("host", "api.example")
            .body(empty())
            .unwrap();
        target(Protocol::Http1, &mut req, "10.0.0.1:80", None);
        target(Protocol::Http1, &mut req, "10.0.0.2:80", None);
        assert_eq!(host(&req), "api.example");
        let mut req = Request::get("http://svc.example:8080/x")
            .body(empty())
            .unwrap();
        target(Protocol::Http1, &mut req, "10.0.0.1:80", None);
        assert_eq!(host(&req), "svc.example:8080");
        target(Protocol::Http1, &mut req, "10.0.0.2:80", None);
        assert_eq!(host(&req), "svc.example:8080");
        assert_eq!(req.uri(), "/x");
    }
}
