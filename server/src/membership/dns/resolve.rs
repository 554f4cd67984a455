//! One lookup: the `hickory-resolver` built from [`DnsConfig`] and the A/AAAA resolution of a
//! [`Target`] into sorted, distinct addresses with the answer's smallest TTL. Addresses that can
//! never be a backend (unspecified, broadcast, multicast) are set aside with their reason, never
//! turned into backends.

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use super::{DnsConfig, Target};

/// The outcome of one resolution.
pub(super) struct Resolved {
    /// Distinct usable addresses, sorted.
    pub ips: Vec<IpAddr>,
    /// Addresses in the answer that can never be a backend, with the reason (see [`unusable`]).
    pub skipped: Vec<(IpAddr, &'static str)>,
    /// Smallest TTL in the answer.
    pub ttl: Duration,
}

/// A resolver over the configured name servers (or the system's), with its cache effectively
/// bypassed (cleared before each lookup) and the hosts file off.
pub(super) fn build_resolver(config: &DnsConfig) -> Result<TokioResolver, String> {
    let mut builder = if config.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| format!("system DNS configuration: {e}"))?
    } else {
        let servers = config
            .nameservers
            .iter()
            .map(|addr| {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut ns.connections {
                    c.port = addr.port();
                }
                ns
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    let opts = builder.options_mut();
    opts.timeout = config.timeout;
    opts.attempts = config.attempts;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.use_hosts_file = ResolveHosts::Never;
    builder.build().map_err(|e| format!("DNS resolver: {e}"))
}

/// Why `ip` can never be a backend's address, if it cannot: the unspecified address
/// (`0.0.0.0`, `::`), the IPv4 broadcast address and multicast addresses.
pub(super) fn unusable(ip: IpAddr) -> Option<&'static str> {
    match ip {
        _ if ip.is_unspecified() => Some("unspecified"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
        _ if ip.is_multicast() => Some("multicast"),
        _ => None,
    }
}

/// Resolves `target` (A and AAAA). Unusable addresses are set aside ([`Resolved::skipped`]);
/// an answer without a usable address is a failure.
pub(super) async fn resolve(resolver: &TokioResolver, target: &Target) -> Result<Resolved, String> {
    resolver.clear_cache();
    let lookup = resolver
        .lookup_ip(target.name.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let mut all: Vec<IpAddr> = lookup.iter().collect();
    all.sort();
    all.dedup();
    let (mut ips, mut skipped) = (Vec::with_capacity(all.len()), Vec::new());
    for ip in all {
        match unusable(ip) {
            Some(why) => skipped.push((ip, why)),
            None => ips.push(ip),
        }
    }
    if ips.is_empty() {
        return Err(if skipped.is_empty() {
            "no A/AAAA records".into()
        } else {
            let list: Vec<String> = skipped
                .iter()
                .map(|(ip, why)| format!("{ip} ({why})"))
                .collect();
            format!("no usable A/AAAA records (skipped: {})", list.join(", "))
        });
    }
    let ttl = lookup
        .as_lookup()
        .answers()
        .iter()
        .map(|r| r.ttl)
        .min()
        .unwrap_or(0);
    Ok(Resolved {
        ips,
        skipped,
        ttl: Duration::from_secs(u64::from(ttl)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_broadcast_and_multicast_are_unusable() {
        for (ip, why) in [
            ("0.0.0.0", Some("unspecified")),
            ("::", Some("unspecified")),
            ("255.255.255.255", Some("broadcast")),
            ("224.0.0.1", Some("multicast")),
            ("ff02::1", Some("multicast")),
            ("10.0.0.1", None),
            ("127.0.0.1", None),
            ("2001:db8::1", None),
        ] {
            assert_eq!(unusable(ip.parse().expect("literal")), why, "{ip}");
        }
    }
}
