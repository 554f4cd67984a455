//! The transport to `dlbd`: how an endpoint string becomes a tonic channel, shared by the admin
//! calls ([`AdminClient`](crate::AdminClient)), the session task and `dlbctl`.
//!
//! * [`ChannelOptions`] / [`ClientTls`]: timeouts, keepalive, TLS;
//! * [`TokenInterceptor`]: the bearer token added to every call;
//! * [`make_endpoint`]: one endpoint (`http(s)://host:port`, `host:port`, `dns:///host:port`)
//!   as a tonic `Endpoint`;
//! * [`admin_channel`]: the lazily connected channel of one endpoint, resolving a `dns:` name
//!   at each connection with the client's [`Resolve`](crate::Resolve);
//! * [`resolved_endpoint`]: one resolved address of a name, for the session's rotation.
//!
//! The public items are re-exported from the `admin` module (their public path:
//! `dlb_client::admin::ChannelOptions`, …), which builds on this one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};
use crate::resolve::DnsName;

/// Adds `authorization: Bearer <token>` to every call when a token is set (see
/// [`AdminClient::with_token`](crate::AdminClient::with_token)); the token is never logged or printed by `Debug`.
#[derive(Clone, Default)]
pub struct TokenInterceptor(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for TokenInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "TokenInterceptor(<token>)"
        } else {
            "TokenInterceptor(none)"
        })
    }
}

impl TokenInterceptor {
    /// An interceptor sending `token` as a bearer token (`None`: sends nothing).
    pub fn new(token: Option<&str>) -> Result<Self> {
        let Some(token) = token else {
            return Ok(Self(None));
        };
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidArgument(
                "invalid token: it must be visible ASCII characters".into(),
            ));
        }
        let value = format!("Bearer {token}")
            .parse::<MetadataValue<Ascii>>()
            .map_err(|_| Error::InvalidArgument("invalid token".into()))?;
        Ok(Self(Some(value)))
    }
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Transport settings shared by the session and the admin calls.
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    /// Timeout for establishing a TCP + HTTP/2 connection.
    pub connect_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings (dead-stream detection).
    pub keepalive_interval: Duration,
    /// How long to wait for a keepalive ack before the connection is declared dead.
    pub keepalive_timeout: Duration,
    /// Deadline of each unary admin call.
    pub request_timeout: Duration,
    /// TLS towards the control plane; `None`: plaintext unless the endpoint says `https://`
    /// (then the system has no roots here: set `tls`).
    pub tls: Option<ClientTls>,
    /// Bearer token sent with every call and session ([`TokenInterceptor::new`]).
    pub token: TokenInterceptor,
}

/// TLS settings of a client (rustls through tonic).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificates (PEM) that the control plane's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// This client's certificate chain and key (PEM), for a control plane that requires mutual
    /// TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to verify the server's certificate against (default: the endpoint's host).
    pub domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("ClientTls")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("identity", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            tls: None,
            token: TokenInterceptor::default(),
        }
    }
}

/// Normalizes an endpoint and builds a tonic endpoint from it with the transport options:
/// `host:port` gets `http://`, or `https://` with TLS options; `dns:///host:port` (see
/// [`crate::Resolve`]) becomes `http(s)://host:port` (what admin calls use, through
/// `admin_channel`'s resolving connector; the session instead resolves such a name itself and
/// rotates over every address). A malformed endpoint is an [`Error::InvalidEndpoint`] naming
/// it.
pub fn make_endpoint(raw: &str, opts: &ChannelOptions) -> Result<Endpoint> {
    let uri = if let Some(name) = DnsName::parse(raw) {
        format!("{}://{}", scheme(opts), name?.authority())
    } else if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("{}://{raw}", scheme(opts))
    };
    build_endpoint(raw, uri, opts, None)
}

/// The admin calls' channel to `raw`, connected lazily. A `dns:` endpoint's channel resolves the
/// name with `resolver` at each connection and tries the addresses, shuffled, until one accepts
/// (the whole connection bounded by the connect timeout); TLS is verified against the name.
pub(crate) fn admin_channel(
    raw: &str,
    opts: &ChannelOptions,
    resolver: &Arc<dyn crate::Resolve>,
) -> Result<Channel> {
    let endpoint = make_endpoint(raw, opts)?;
    Ok(match DnsName::parse(raw) {
        Some(name) => endpoint.connect_with_connector_lazy(ResolvingConnector {
            resolver: resolver.clone(),
            name: Arc::new(name?),
        }),
        None => endpoint.connect_lazy(),
    })
}

/// Connects to a name's addresses, resolved at each connection (see [`admin_channel`]).
#[derive(Debug, Clone)]
struct ResolvingConnector {
    resolver: Arc<dyn crate::Resolve>,
    name: Arc<DnsName>,
}

impl tower::Service<http::Uri> for ResolvingConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = futures::future::BoxFuture<'static, std::io::Result<Self::Response>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let lookup = self.resolver.resolve(&self.name.host, self.name.port);
        let host = self.name.host.clone();
        Box::pin(async move {
            let mut addrs = lookup.await?;
            fastrand::shuffle(&mut addrs);
            let mut last = std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host} has no address"),
            );
            for addr in addrs {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(stream) => {
                        stream.set_nodelay(true)?;
                        return Ok(hyper_util::rt::TokioIo::new(stream));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
    }
}

/// The endpoint of one resolved address of the name `name` (the `dns:` endpoint `raw`):
/// `http(s)://ip:port`. With TLS, the server's certificate is verified against the name (unless
/// [`ClientTls::domain`] says otherwise), not against the address.
pub(crate) fn resolved_endpoint(
    raw: &str,
    name: &DnsName,
    addr: SocketAddr,
    opts: &ChannelOptions,
) -> Result<Endpoint> {
    let uri = format!("{}://{addr}", scheme(opts));
    build_endpoint(raw, uri, opts, Some(&name.host))
}

/// `https` with TLS options, `http` without.
fn scheme(opts: &ChannelOptions) -> &'static str {
    if opts.tls.is_some() {
        "https"
    } else {
        "http"
    }
}

/// A tonic endpoint for `uri` (given as `raw`, for errors) with the transport options. The TLS
/// name is [`ClientTls::domain`], else `tls_name`, else the URI's host (tonic's default).
fn build_endpoint(
    raw: &str,
    uri: String,
    opts: &ChannelOptions,
    tls_name: Option<&str>,
) -> Result<Endpoint> {
    let invalid = |reason: String| Error::InvalidEndpoint {
        endpoint: raw.to_owned(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(uri).map_err(|e| invalid(e.to_string()))?;
    if let Some(tls) = &opts.tls {
        let mut cfg = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            cfg = cfg.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        if let Some(d) = tls.domain.as_deref().or(tls_name) {
            cfg = cfg.domain_name(d.to_owned());
        }
        endpoint = endpoint
            .tls_config(cfg)
            .map_err(|e| invalid(format!("TLS: {e}")))?;
    }
    Ok(endpoint
        .connect_timeout(opts.connect_timeout)
        .http2_keep_alive_interval(opts.keepalive_interval)
        .keep_alive_timeout(opts.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_a_scheme() {
        let opts = ChannelOptions::default();
        let e = make_endpoint("127.0.0.1:1", &opts).unwrap();
        assert_eq!(e.uri().to_string(), "http://127.0.0.1:1/");
        assert!(make_endpoint("http://[bad", &opts).is_err());
    }

    /// Admin calls and `dlbctl` reach a `dns:` endpoint through the transport's own resolver.
    #[test]
    fn dns_endpoints_become_host_uris_for_admin_calls() {
        let opts = ChannelOptions::default();
        let e = make_endpoint("dns:///dlb.test:50051", &opts).unwrap();
        assert_eq!(e.uri().to_string(), "http://dlb.test:50051/");
        let e = make_endpoint("dns:[::1]:7", &opts).unwrap();
        assert_eq!(e.uri().to_string(), "http://[::1]:7/");
        let tls = ChannelOptions {
            tls: Some(ClientTls::default()),
            ..ChannelOptions::default()
        };
        let e = make_endpoint("dns:///dlb.test:1", &tls).unwrap();
        assert_eq!(e.uri().to_string(), "https://dlb.test:1/");
        match make_endpoint("dns:///dlb.test", &opts) {
            Err(Error::InvalidEndpoint { endpoint, reason }) => {
                assert_eq!(endpoint, "dns:///dlb.test");
                assert!(reason.contains("port"), "{reason}");
            }
            other => panic!("accepted: {other:?}"),
        }
        let name = DnsName {
            host: "dlb.test".into(),
            port: 1,
        };
        let addr: SocketAddr = "[::1]:4000".parse().unwrap();
        let e = resolved_endpoint("dns:///dlb.test:1", &name, addr, &tls).unwrap();
        assert_eq!(e.uri().to_string(), "https://[::1]:4000/");
    }
}
