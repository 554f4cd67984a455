//! What a [`super::Balance`] is told: the protocol, where the request key comes from, connection
//! limits, how outcomes are classified, and the retry, hedging and budget rules.
//!
//! Everything has a default that suits a gRPC client ([`CallOptions::default`]); the retry and
//! hedging rules are off unless set here (see `docs/sdk.md`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tonic::Code;

/// The wire protocol spoken to the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC over HTTP/2: one multiplexed connection per backend (another when
    /// [`CallOptions::max_streams_per_connection`] streams are open on each), outcomes from
    /// `grpc-status`.
    Grpc,
    /// HTTP/1.1: a small keep-alive pool per backend, outcomes from the status code.
    Http1,
}

/// Where a request's key (for consistent hashing, Maglev, sticky sessions) comes from.
#[derive(Clone)]
pub enum KeyFrom {
    /// The value of this request header (no key when absent).
    Header(http::HeaderName),
    /// A function of the request head.
    Fn(Arc<dyn Fn(&http::request::Parts) -> Option<Vec<u8>> + Send + Sync>),
}

impl fmt::Debug for KeyFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyFrom::Header(h) => f.debug_tuple("Header").field(h).finish(),
            KeyFrom::Fn(_) => f.write_str("Fn(..)"),
        }
    }
}

impl KeyFrom {
    pub(crate) fn key(&self, parts: &http::request::Parts) -> Option<Vec<u8>> {
        match self {
            KeyFrom::Header(h) => parts.headers.get(h).map(|v| v.as_bytes().to_vec()),
            KeyFrom::Fn(f) => f(parts),
        }
    }
}

/// Retries of one service (opt-in). A retry never goes to a backend the request already tried,
/// waits a jittered backoff, and takes a token from the [`BudgetConfig`] budget.
///
/// Always retried (the request provably did not reach the application): connect errors, a
/// connection found closed before the request was written, HTTP/2 `REFUSED_STREAM`. Retried when
/// listed here: gRPC codes of a trailers-only response (status in the headers, before any
/// message) and HTTP statuses; and transport errors after the request was sent when
/// `UNAVAILABLE` is listed. A request whose body could not be buffered
/// ([`CallOptions::buffer_limit`]) is retried only when it was not sent.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 3; at least 1).
    pub max_attempts: u32,
    /// gRPC codes that are retried (default: `UNAVAILABLE`).
    pub grpc_codes: Vec<Code>,
    /// HTTP statuses that are retried (default: 502, 503, 504).
    pub http_statuses: Vec<u16>,
    /// First backoff (default 10 ms); doubles per retry up to `backoff_max`; full jitter.
    pub backoff_base: Duration,
    /// Longest backoff (default 200 ms).
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            grpc_codes: vec![Code::Unavailable],
            http_statuses: vec![502, 503, 504],
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(200),
        }
    }
}

impl RetryPolicy {
    /// The jittered backoff before retry number `n` (1 = the first retry): uniform in
    /// `[0, min(base × 2^(n-1), max)]`.
    pub(crate) fn backoff(&self, n: u32) -> Duration {
        let cap = self
            .backoff_base
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(self.backoff_max);
        cap.mul_f64(fastrand::f64())
    }
}

/// When a hedge (a copy of the request to another backend) is sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeDelay {
    /// After this long without a response.
    Fixed(Duration),
    /// After the service's observed latency quantile (e.g. `0.95`), measured by this client's
    /// call path; no hedge until enough calls were measured.
    Quantile(f64),
}

/// Hedging of one service (opt-in): after [`HedgeDelay`] without a response, a copy of the
/// request goes to another backend; the first response wins and the others are cancelled. Each
/// hedge takes a token from the same budget as retries. Only requests whose body is buffered.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgePolicy {
    /// When to hedge.
    pub delay: HedgeDelay,
    /// Copies beyond the first request (default 1).
    pub max_hedges: u32,
}

/// The retry budget (Finagle/Linkerd): over a sliding `window`, retries and hedges may not
/// exceed `ratio` × requests + `min_per_second` × window seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// Extra attempts allowed per request (default 0.2).
    pub ratio: f64,
    /// Floor of extra attempts per second, for low traffic (default 10).
    pub min_per_second: u32,
    /// The sliding window (default 10 s).
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Options of a [`super::Balance`]. Build with the methods of [`super::BalanceBuilder`].
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// The protocol (default gRPC).
    pub protocol: Protocol,
    /// Where the request key comes from (default none).
    pub key: Option<KeyFrom>,
    /// Open connections to every backend as soon as it appears (default false: at first use).
    pub eager: bool,
    /// TCP connect + handshake timeout (default 1 s).
    pub connect_timeout: Duration,
    /// Streams per HTTP/2 connection before another connection is opened (default 100).
    pub max_streams_per_connection: usize,
    /// Idle HTTP/1.1 connections kept per backend (default 4).
    pub max_idle_per_backend: usize,
    /// Request bodies up to this size are buffered so they can be retried or hedged (default
    /// 64 KiB); larger or still-streaming bodies are sent as they come and not replayed.
    pub buffer_limit: usize,
    /// gRPC codes counted as failures of the backend (default UNAVAILABLE, RESOURCE_EXHAUSTED,
    /// INTERNAL, UNKNOWN, DEADLINE_EXCEEDED, DATA_LOSS); every other code is a success of the
    /// backend (it answered).
    pub grpc_failure_codes: Vec<Code>,
    /// HTTP statuses counted as failures (default 500..=599).
    pub http_failure_statuses: std::ops::RangeInclusive<u16>,
    /// Retries (default none).
    pub retry: Option<RetryPolicy>,
    /// Hedging (default none).
    pub hedge: Option<HedgePolicy>,
    /// The budget of retries and hedges.
    pub budget: BudgetConfig,
    /// Also export a latency histogram per backend (default false: aggregate only).
    pub per_backend_latency: bool,
    /// How long a call waits for the service's first snapshot (default 5 s).
    pub wait_for_snapshot: Duration,
}

impl Default for CallOptions {
    fn default() -> Self {
        Self {
            protocol: Protocol::Grpc,
            key: None,
            eager: false,
            connect_timeout: Duration::from_secs(1),
            max_streams_per_connection: 100,
            max_idle_per_backend: 4,
            buffer_limit: 64 * 1024,
            grpc_failure_codes: vec![
                Code::Unavailable,
                Code::ResourceExhausted,
                Code::Internal,
                Code::Unknown,
                Code::DeadlineExceeded,
                Code::DataLoss,
            ],
            http_failure_statuses: 500..=599,
            retry: None,
            hedge: None,
            budget: BudgetConfig::default(),
            per_backend_latency: false,
            wait_for_snapshot: Duration::from_secs(5),
        }
    }
}

impl CallOptions {
    /// Whether a gRPC code is a failure of the backend.
    pub(crate) fn grpc_failure(&self, code: Code) -> bool {
        self.grpc_failure_codes.contains(&code)
    }

    /// Whether request bodies should be buffered for replay.
    pub(crate) fn replays(&self) -> bool {
        self.retry.as_ref().is_some_and(|r| r.max_attempts > 1) || self.hedge.is_some()
    }
}
