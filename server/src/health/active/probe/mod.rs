//! The probes: one function per kind of check, and the [`Prober`] seam the checker calls.
//!
//! A probe opens a fresh connection to the backend every time (a dead process is seen at the
//! next probe, not after a pooled connection times out), does its exchange and returns an
//! [`Outcome`]. The checker wraps each probe in the configured timeout; a probe never retries.
//! Kinds: [`http`] (hyper's HTTP/1.1 client connection), [`tcp`] (connect, optional send and
//! reply prefix), [`grpc`] (tonic's `grpc.health.v1` client).

pub mod grpc;
pub mod http;
pub mod tcp;

use std::sync::Arc;

use dlb::health_check::{CheckSpec, ProbeKind};
use futures::future::BoxFuture;

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered as expected; the detail says how ("HTTP 200").
    Pass(String),
    /// The backend failed the check; the detail says why ("HTTP 503", "connection refused").
    Fail(String),
}

/// What a probe is pointed at.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// The backend's address, `host:port` (the port already replaced by the check's `port`).
    pub address: String,
    /// The check.
    pub spec: Arc<CheckSpec>,
}

/// Runs one probe. The checker applies the timeout around it.
pub trait Prober: Send + Sync + 'static {
    /// Probes `target` once.
    fn probe(&self, target: ProbeTarget) -> BoxFuture<'static, Outcome>;
}

/// The real prober: HTTP, TCP or gRPC over the network.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetProber;

impl Prober for NetProber {
    fn probe(&self, target: ProbeTarget) -> BoxFuture<'static, Outcome> {
        Box::pin(async move {
            match &target.spec.kind {
                ProbeKind::Http { .. } => http::probe(&target.address, &target.spec.kind).await,
                ProbeKind::Tcp {
                    send,
                    expect_prefix,
                } => tcp::probe(&target.address, send, expect_prefix).await,
                ProbeKind::Grpc { service } => grpc::probe(&target.address, service).await,
            }
        })
    }
}

/// Shortens an I/O error for a detail ("connection refused").
pub(crate) fn io_detail(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        std::io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        std::io::ErrorKind::UnexpectedEof => "connection closed".to_owned(),
        _ => {
            let mut s = e.to_string();
            s.truncate(120);
            s
        }
    }
}

/// Replaces the port of `host:port` (IPv6 literals bracketed) when `port` is not 0.
pub fn with_port(address: &str, port: u16) -> String {
    if port == 0 {
        return address.to_owned();
    }
    match address.rfind(':') {
        Some(i) => format!("{}:{port}", &address[..i]),
        None => format!("{address}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn with_port_replaces_the_port() {
        assert_eq!(super::with_port("10.0.0.1:80", 0), "10.0.0.1:80");
        assert_eq!(super::with_port("10.0.0.1:80", 9000), "10.0.0.1:9000");
        assert_eq!(super::with_port("[::1]:80", 81), "[::1]:81");
    }
}
