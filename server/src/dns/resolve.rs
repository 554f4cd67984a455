//! One lookup: the `hickory-resolver` built from [`DnsConfig`] and the A/AAAA resolution of a
//! [`Target`] into sorted, distinct addresses with the answer's smallest TTL.

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use super::{DnsConfig, Target};

/// The outcome of one resolution.
pub(super) struct Resolved {
    /// Distinct addresses, sorted.
    pub ips: Vec<IpAddr>,
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

/// Resolves `target` (A and AAAA). An answer without addresses is a failure.
pub(super) async fn resolve(resolver: &TokioResolver, target: &Target) -> Result<Resolved, String> {
    resolver.clear_cache();
    let lookup = resolver
        .lookup_ip(target.name.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let mut ips: Vec<IpAddr> = lookup.iter().collect();
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        return Err("no A/AAAA records".into());
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
        ttl: Duration::from_secs(u64::from(ttl)),
    })
}
