//! What a [`super::Balance`] is told: the protocol, where the request key comes from, connection
//! limits, how outcomes are classified, and the retry, hedging and budget rules.
//!
//! Everything has a default that suits a gRPC client ([`CallOptions::default`]). Retries,
//! hedging and their budget come from the service's policy (`Policy.retry`, `retry_budget`,
//! `hedge`: every SDK agrees); a local override here wins over the policy (see `docs/sdk.md`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dlb::call::{BudgetConfig, HedgeConfig, RetryConfig};
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

/// A function computing a request's key from its head.
pub type KeyFn = Arc<dyn Fn(&http::request::Parts) -> Option<Vec<u8>> + Send + Sync>;

/// Where a request's key (for consistent hashing, Maglev, sticky sessions) comes from.
#[derive(Clone)]
pub enum KeyFrom {
    /// The value of this request header (no key when absent).
    Header(http::HeaderName),
    /// A function of the request head.
    Fn(KeyFn),
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

/// Retry settings with every default of `Policy.retry` (3 attempts, 25..250 ms backoff, no
/// listed code or status, 64 KiB replay bound): a starting point for a local override.
pub fn retry_defaults() -> RetryConfig {
    let policy = dlb::proto::Policy {
        retry: Some(Default::default()),
        ..Default::default()
    };
    dlb::call::retry_config(&policy).unwrap_or(RetryConfig {
        max_attempts: dlb::call::defaults::MAX_ATTEMPTS,
        retry_on_grpc_codes: Vec::new(),
        retry_on_http_statuses: Vec::new(),
        backoff_base: Duration::from_millis(u64::from(dlb::call::defaults::BACKOFF_BASE_MS)),
        backoff_max: Duration::from_millis(u64::from(dlb::call::defaults::BACKOFF_MAX_MS)),
        max_replay_body_bytes: dlb::call::defaults::MAX_REPLAY_BODY_BYTES as usize,
    })
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
    /// Request bodies up to this size are buffered so they can be retried or hedged (default:
    /// the policy's `retry.max_replay_body_bytes`, 64 KiB); larger or still-streaming bodies
    /// are sent as they come and not replayed.
    pub buffer_limit: Option<usize>,
    /// gRPC codes counted as failures of the backend (default UNAVAILABLE, RESOURCE_EXHAUSTED,
    /// INTERNAL, UNKNOWN, DEADLINE_EXCEEDED, DATA_LOSS); every other code is a success of the
    /// backend (it answered).
    pub grpc_failure_codes: Vec<Code>,
    /// HTTP statuses counted as failures (default 500..=599).
    pub http_failure_statuses: std::ops::RangeInclusive<u16>,
    /// Retries, overriding the policy's `retry` (default: none, the policy decides).
    pub retry: Option<RetryConfig>,
    /// Hedging, overriding the policy's `hedge` (default: none, the policy decides).
    pub hedge: Option<HedgeConfig>,
    /// The budget of retries and hedges, overriding the policy's `retry_budget`.
    pub budget: Option<BudgetConfig>,
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
            buffer_limit: None,
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
            budget: None,
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
}
