//! The call path: a tower [`Service`] that carries each request to a backend DLB picks, and
//! reports the outcome by itself.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let dlb = dlb_client::Client::connect(["http://127.0.0.1:50051"]).await?;
//! let channel = dlb.channel("greeter"); // a tonic transport: GreeterClient::new(channel)
//! # Ok(()) }
//! ```
//!
//! Per request, [`Balance`]: picks a backend from the service's snapshot (the key from a header
//! or a closure, see [`KeyFrom`]), sends the request on that backend's connection (see `conn`),
//! and when the response body ends reports success or failure and the latency through the
//! [`crate::CallGuard`] — which feeds load reports, outlier detection and the circuit breakers.
//!
//! Parts, one concern per file:
//! * `config` — [`CallOptions`]; `policy` — the retry, hedging and budget settings in force
//!   (the service's policy, or a local override), and the retry budget;
//! * `conn` — connections per backend (HTTP/2 multiplexed, HTTP/1.1 keep-alive pool), closed
//!   after their last call once the backend leaves the snapshot;
//! * `dispatch` — pick, send, classify, retries and hedges;
//! * `body` — request bodies (buffered for replay up to a bound) and [`CallBody`], the response
//!   body that ends the call (gRPC status read from the trailers);
//! * `classify` — `grpc-status`, `grpc-timeout`, refused streams;
//! * `stats` — what [`crate::Client::metrics`] exports; `handle` — `ServiceHandle::channel`,
//!   `http`, `call_counts`, and the pick that skips backends a request already tried.
//!
//! Classification: gRPC codes in [`CallOptions::grpc_failure_codes`] (UNAVAILABLE,
//! RESOURCE_EXHAUSTED, INTERNAL, UNKNOWN, DEADLINE_EXCEEDED, DATA_LOSS by default) are failures
//! of the backend; every other code is a success (the backend answered: INVALID_ARGUMENT,
//! NOT_FOUND, … are the caller's business). HTTP: 5xx and connection errors are failures by
//! default. A response dropped before its outcome is known reports nothing (a cancelled call).

mod body;
mod classify;
mod config;
mod conn;
mod dispatch;
mod handle;
mod policy;
mod stats;

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http_body::Body;
use tower::Service;

pub use body::CallBody;
pub use config::{retry_defaults, CallOptions, KeyFn, KeyFrom, Protocol};
pub use dlb::call::{BudgetConfig, HedgeConfig, HedgeDelay, RetryConfig};
pub(crate) use stats::encode as encode_stats;
pub use stats::{CallCounts, CallStats, ErrorClass};

use crate::ServiceHandle;

/// The error type of [`Balance`]: a `tonic::Status` for gRPC, a [`crate::Error`] for HTTP.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every clone of a [`Balance`] shares.
#[derive(Debug)]
pub(crate) struct Shared {
    handle: ServiceHandle,
    opts: CallOptions,
    failure_codes: Arc<[tonic::Code]>,
    pool: conn::Pool,
    stats: Arc<CallStats>,
    policies: policy::Policies,
    /// Dropped with the last clone: stops the task that follows the snapshot.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A tower `Service<http::Request<B>>` over one DLB service (see the module docs). Cheap to
/// clone; clones share connections, budget and counters. Implements tonic's `GrpcService`, so a
/// generated client takes it as its transport: `GreeterClient::new(client.channel("greeter"))`.
#[derive(Debug, Clone)]
pub struct Balance {
    shared: Arc<Shared>,
}

/// Builds a [`Balance`]; from [`Balance::builder`].
#[derive(Debug, Clone)]
pub struct BalanceBuilder {
    handle: ServiceHandle,
    opts: CallOptions,
}

impl BalanceBuilder {
    /// The wire protocol (default gRPC).
    pub fn protocol(mut self, p: Protocol) -> Self {
        self.opts.protocol = p;
        self
    }

    /// The request key for consistent hashing / sticky sessions: a header's value.
    pub fn key_header(mut self, name: http::HeaderName) -> Self {
        self.opts.key = Some(KeyFrom::Header(name));
        self
    }

    /// The request key, computed from the request head.
    pub fn key_fn(
        mut self,
        f: impl Fn(&http::request::Parts) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> Self {
        self.opts.key = Some(KeyFrom::Fn(Arc::new(f)));
        self
    }

    /// Opens connections to every backend as it appears, instead of at first use.
    pub fn eager(mut self, eager: bool) -> Self {
        self.opts.eager = eager;
        self
    }

    /// Retries with these settings, whatever the service's policy says (see
    /// [`retry_defaults`]). Without it the policy's `retry` applies.
    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.opts.retry = Some(retry);
        self
    }

    /// Hedging with these settings, whatever the service's policy says.
    pub fn hedge(mut self, hedge: HedgeConfig) -> Self {
        self.opts.hedge = Some(hedge);
        self
    }

    /// This retry budget, whatever the service's policy says.
    pub fn budget(mut self, budget: BudgetConfig) -> Self {
        self.opts.budget = Some(budget);
        self
    }

    /// Every option at once.
    pub fn options(mut self, opts: CallOptions) -> Self {
        self.opts = opts;
        self
    }

    /// Edits the options in place.
    pub fn configure(mut self, f: impl FnOnce(&mut CallOptions)) -> Self {
        f(&mut self.opts);
        self
    }

    /// The service. Needs a tokio runtime (it starts a task that follows the snapshot, to close
    /// connections of removed backends and, when eager, open new ones).
    pub fn build(self) -> Balance {
        let opts = self.opts;
        let stats = self.handle.client.call_stats(self.handle.name());
        if opts.per_backend_latency {
            stats
                .per_backend
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = Arc::new(Shared {
            pool: conn::Pool::new(conn::ConnOpts {
                protocol: opts.protocol,
                connect_timeout: opts.connect_timeout,
                max_streams: opts.max_streams_per_connection.max(1),
                max_idle: opts.max_idle_per_backend,
            }),
            failure_codes: opts.grpc_failure_codes.clone().into(),
            policies: policy::Policies::new(&self.handle.state, &opts),
            handle: self.handle,
            opts,
            stats,
            _stop: stop,
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(follow(Arc::downgrade(&shared), stopped));
        }
        Balance { shared }
    }
}

/// Follows the service's snapshot: drops the endpoints of removed backends (their connections
/// close after their last call) and, when eager, connects to new ones. Ends with the last clone
/// of the [`Balance`] or the client.
async fn follow(shared: std::sync::Weak<Shared>, mut stopped: tokio::sync::oneshot::Receiver<()>) {
    let Some(mut rx) = shared.upgrade().map(|s| s.handle.changed()) else {
        return;
    };
    loop {
        {
            let Some(s) = shared.upgrade() else { return };
            let present: Vec<(String, String)> = s
                .handle
                .state
                .snapshot
                .load()
                .picker
                .as_ref()
                .map(|p| {
                    p.backends()
                        .iter()
                        .map(|b| (b.id().to_owned(), b.address().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let new = s.pool.retain(&present);
            if s.opts.eager {
                for e in new {
                    tokio::spawn(async move {
                        let _ = e.lease().await;
                    });
                }
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = &mut stopped => return,
        }
    }
}

impl Balance {
    /// Options for a `Balance` over `handle`'s service (default: gRPC, no retries, no hedging).
    pub fn builder(handle: ServiceHandle) -> BalanceBuilder {
        BalanceBuilder {
            handle,
            opts: CallOptions::default(),
        }
    }

    /// The service this balances over.
    pub fn service(&self) -> &ServiceHandle {
        &self.shared.handle
    }

    /// The call-path counters of the service (shared by every `Balance` of it).
    pub fn counts(&self) -> CallCounts {
        self.shared.stats.counts()
    }

    /// Connections open per backend still in the snapshot, and in all (the total includes
    /// connections of removed backends whose last calls are still running).
    pub fn open_connections(&self) -> (Vec<(String, u64)>, u64) {
        self.shared.pool.open_connections()
    }
}

impl<B> Service<http::Request<B>> for Balance
where
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<CallBody>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<CallBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Connections are per backend and picked per request: always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        Box::pin(self.shared.clone().call(req))
    }
}

/// A tower `Layer` that turns a [`ServiceHandle`] into a [`Balance`] with fixed options (for
/// `tower::ServiceBuilder` stacks).
#[derive(Debug, Clone, Default)]
pub struct BalanceLayer {
    opts: CallOptions,
}

impl BalanceLayer {
    /// A layer building balances with `opts`.
    pub fn new(opts: CallOptions) -> Self {
        Self { opts }
    }
}

impl tower::Layer<ServiceHandle> for BalanceLayer {
    type Service = Balance;

    fn layer(&self, handle: ServiceHandle) -> Balance {
        Balance::builder(handle).options(self.opts.clone()).build()
    }
}
