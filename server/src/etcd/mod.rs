//! The etcd connection that the etcd store (`store::EtcdStore`), the replica membership
//! (`replicas::etcd`) and the self-registration leases (`leases::etcd`) share: where etcd is
//! ([`EtcdConfig`], plain data, present with or without the `etcd` feature), and with the
//! feature, the one function that opens a connection (`connect`: TLS, timeouts, keepalives,
//! `require_leader`), the balanced channel under it (`channel.rs`: requests only on connected
//! members) and how an etcd error becomes a dlbd [`Error`](crate::Error) (`error.rs`).
//!
//! This module depends on nothing of the server but its error type; the subsystems that talk to
//! etcd depend on it.

#[cfg(feature = "etcd")]
mod channel;
mod config;
#[cfg(feature = "etcd")]
mod error;

pub use config::{EtcdConfig, EtcdTls};
#[cfg(feature = "etcd")]
pub(crate) use error::etcd_error;

#[cfg(feature = "etcd")]
use std::time::Duration;

/// The keepalive of the store's and the leases' connections: a ping every 10 s, answered
/// within 5 s.
#[cfg(feature = "etcd")]
pub(crate) const KEEP_ALIVE: (Duration, Duration) =
    (Duration::from_secs(10), Duration::from_secs(5));

/// Opens one of `dlbd`'s etcd connections (the store, the replica membership and the leases
/// each have their own): `config`'s endpoints and TLS, a 5 s connect timeout, `timeout` per
/// request, HTTP/2 keepalive pings every `keep_alive.0` (answer within `keep_alive.1`) even
/// while idle, and `require_leader`, so a member cut off from its leader answers with an error
/// instead of stale reads and silent watches. Requests go only to endpoints that are connected
/// (`channel.rs`), so a dead member of a cluster fails none.
#[cfg(feature = "etcd")]
pub(crate) async fn connect(
    config: &EtcdConfig,
    timeout: Duration,
    keep_alive: (Duration, Duration),
) -> Result<etcd_client::Client, etcd_client::Error> {
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(timeout)
        .with_keep_alive(keep_alive.0, keep_alive.1)
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let Some(tls) = &config.tls {
        let mut t = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(etcd_client::Identity::from_pem(cert, key));
        }
        options = options.with_tls(t);
    }
    etcd_client::Client::connect_with_balanced_channel(
        &config.endpoints,
        Some(options),
        channel::UpLinks,
    )
    .await
}
