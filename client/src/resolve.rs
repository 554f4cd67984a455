//! Control-plane endpoints given as a DNS name, and the resolver seam.
//!
//! An endpoint `dns:///host:port` (also `dns:host:port`; gRPC's naming syntax, scheme
//! case-insensitive) is a *name target*: the session resolves it to every address of `host` and
//! rotates over all of them, each with its own connection (see `session::targets`). The port is
//! required. `dns://authority/host:port` (a DNS server named in the URI) is refused: resolution
//! goes through a [`Resolve`] — by default [`SystemResolver`], the system's resolver
//! (`getaddrinfo`, which honours `/etc/hosts`), through `tokio::net::lookup_host`.
//!
//! [`DnsName::parse`] decides what a `dns:` endpoint means; it never panics, and every refusal
//! is an [`Error::InvalidEndpoint`] naming the endpoint and the reason. An endpoint that does
//! not start with `dns:` is not a name target (so a host literally called `dns` needs
//! `http://dns:port`).

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};

use futures::future::BoxFuture;

use crate::error::{Error, Result};

/// Resolves a host name to socket addresses: how the session turns a `dns:///host:port`
/// endpoint into the control-plane replicas to rotate over. Set one with
/// [`crate::ClientBuilder::resolver`]; the default is [`SystemResolver`].
///
/// Each returned address is used as is, port included (a resolver may ignore `port`, for
/// example one that answers from SRV records or a test fixture). The session bounds every call
/// by the connect timeout and treats an error, a timeout or an empty answer alike: it keeps the
/// addresses of the previous answer.
pub trait Resolve: Send + Sync + fmt::Debug {
    /// Every address of `host`, with `port` unless the resolver knows better.
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (`getaddrinfo` through `tokio::net::lookup_host`, on tokio's blocking
/// pool): honours `/etc/hosts` and the system's DNS configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let host = host.to_owned();
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    }
}

/// Longest host name accepted (DNS's limit on a name in text form).
const MAX_HOST_LEN: usize = 253;

/// A parsed `dns:` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DnsName {
    /// The name to resolve (an IPv6 literal without its brackets).
    pub(crate) host: String,
    /// The port, 1..=65535.
    pub(crate) port: u16,
}

impl DnsName {
    /// `None` when `raw` is not a `dns:` endpoint; otherwise the name, or why it is malformed.
    pub(crate) fn parse(raw: &str) -> Option<Result<Self>> {
        let rest = raw
            .get(..4)
            .filter(|scheme| scheme.eq_ignore_ascii_case("dns:"))
            .map(|_| &raw[4..])?;
        let invalid = |reason: &str| Error::InvalidEndpoint {
            endpoint: raw.to_owned(),
            reason: format!("{reason} (expected dns:///host:port)"),
        };
        let target = match rest.strip_prefix("//") {
            Some(after) => match after.split_once('/') {
                Some(("", target)) => target,
                Some(_) => {
                    return Some(Err(invalid(
                        "naming a DNS server in the endpoint is not supported",
                    )))
                }
                None => return Some(Err(invalid("missing the third slash"))),
            },
            None => rest,
        };
        Some(Self::parse_target(target).map_err(|reason| invalid(&reason)))
    }

    /// `host:port` or `[ipv6]:port`.
    fn parse_target(target: &str) -> std::result::Result<Self, String> {
        let (host, port) = if let Some(bracketed) = target.strip_prefix('[') {
            let (ip, after) = bracketed
                .split_once(']')
                .ok_or("an IPv6 address needs its closing bracket")?;
            ip.parse::<Ipv6Addr>()
                .map_err(|_| format!("{ip:?} is not an IPv6 address"))?;
            let port = after.strip_prefix(':').ok_or("a port is required")?;
            (ip, port)
        } else {
            let (host, port) = target.rsplit_once(':').ok_or("a port is required")?;
            if host.contains(':') {
                return Err("an IPv6 address must be in brackets, as [::1]:port".into());
            }
            validate_host(host)?;
            (host, port)
        };
        if port.is_empty() {
            return Err("a port is required".into());
        }
        let port = port
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| port.parse::<u16>().ok())
            .flatten()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("invalid port {:?}: expected 1..=65535", truncate(port)))?;
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// `host:port`, with brackets around an IPv6 literal: the authority of an `http(s)://` URI.
    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A host name: letters, digits, `-`, `_` and `.`, no empty label (one trailing dot allowed),
/// at most [`MAX_HOST_LEN`] characters.
fn validate_host(host: &str) -> std::result::Result<(), String> {
    if host.is_empty() {
        return Err("the host name is empty".into());
    }
    if host.len() > MAX_HOST_LEN {
        return Err(format!(
            "the host name is longer than {MAX_HOST_LEN} characters"
        ));
    }
    if let Some(c) = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("{c:?} is not allowed in a host name"));
    }
    let labels = host.strip_suffix('.').unwrap_or(host);
    if labels.split('.').any(str::is_empty) {
        return Err(format!("{:?} has an empty label", truncate(host)));
    }
    Ok(())
}

/// At most 64 characters of `s`, for error messages.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &str) -> DnsName {
        match DnsName::parse(raw) {
            Some(Ok(n)) => n,
            other => panic!("{raw}: {other:?}"),
        }
    }

    fn refused(raw: &str) -> String {
        match DnsName::parse(raw) {
            Some(Err(Error::InvalidEndpoint { endpoint, reason })) => {
                assert_eq!(endpoint, raw, "the error names the endpoint");
                reason
            }
            other => panic!("{raw} was not refused: {other:?}"),
        }
    }

    #[test]
    fn dns_endpoints_parse() {
        let name = |host: &str, port| DnsName {
            host: host.into(),
            port,
        };
        assert_eq!(parsed("dns:///dlb.test:50051"), name("dlb.test", 50051));
        assert_eq!(parsed("dns:dlb.test:50051"), name("dlb.test", 50051));
        assert_eq!(parsed("DNS:///Dlb.Test:1"), name("Dlb.Test", 1));
        assert_eq!(parsed("dns:///localhost.:65535"), name("localhost.", 65535));
        assert_eq!(parsed("dns:///127.0.0.1:80"), name("127.0.0.1", 80));
        assert_eq!(parsed("dns:///[::1]:80"), name("::1", 80));
        assert_eq!(parsed("dns:///_grpc-x.y_z:8"), name("_grpc-x.y_z", 8));
        assert_eq!(parsed("dns:///[::1]:80").authority(), "[::1]:80");
        assert_eq!(parsed("dns:h:80").authority(), "h:80");
    }

    #[test]
    fn other_endpoints_are_not_names() {
        for raw in [
            "http://dns:80",
            "dns",
            "dn",
            "",
            "127.0.0.1:80",
            "https://dlb.test:1",
            "dnsx:///h:1",
            "é",
        ] {
            assert!(DnsName::parse(raw).is_none(), "{raw}");
        }
    }

    #[test]
    fn malformed_dns_endpoints_are_refused_with_a_reason() {
        for (raw, why) in [
            ("dns:", "port"),
            ("dns:///", "port"),
            ("dns:///dlb.test", "port"),
            ("dns:dlb.test", "port"),
            ("dns:///dlb.test:", "port"),
            ("dns:///dlb.test:0", "port"),
            ("dns:///dlb.test:65536", "port"),
            ("dns:///dlb.test:-1", "port"),
            ("dns:///dlb.test:+80", "port"),
            ("dns:///dlb.test:80/path", "port"),
            ("dns:///dlb.test:80?q", "port"),
            ("dns:///:80", "empty"),
            ("dns:////dlb.test:80", "'/'"),
            ("dns://8.8.8.8/dlb.test:80", "DNS server"),
            ("dns://dlb.test:80", "third slash"),
            ("dns:/dlb.test:80", "'/'"),
            ("dns:///dlb test:80", "' '"),
            ("dns:///user@dlb.test:80", "'@'"),
            ("dns:///a..b:80", "empty label"),
            ("dns:///.:80", "empty label"),
            ("dns:///::1:80", "brackets"),
            ("dns:///[::1:80", "closing bracket"),
            ("dns:///[::1]", "port"),
            ("dns:///[::1]80", "port"),
            ("dns:///[nope]:80", "IPv6"),
            ("dns:///dlé.test:80", "'é'"),
        ] {
            let reason = refused(raw);
            assert!(
                reason.contains(why),
                "{raw}: {reason:?} does not mention {why:?}"
            );
        }
        let long = format!("dns:///{}:80", "a".repeat(254));
        assert!(refused(&long).contains("longer"));
    }

    /// Whatever the input, parsing answers (no panic on odd bytes, char boundaries, lengths).
    #[test]
    fn parsing_never_panics() {
        let alphabet: Vec<char> = "dnsDNS:/[]@.-_0123456789aé€ \u{0}?#%".chars().collect();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..24);
            let tail: String = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            for raw in [format!("dns:{tail}"), format!("dns:///{tail}"), tail] {
                if let Some(Ok(n)) = DnsName::parse(&raw) {
                    assert!(n.port != 0 && !n.host.is_empty(), "{raw}");
                }
            }
        }
    }
}
