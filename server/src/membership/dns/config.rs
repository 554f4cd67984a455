//! DNS discovery settings ([`DnsConfig`], from the YAML file or code) and the `name:port`
//! target of a declaration ([`Target`]), with the backend id an address gets.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use dlb::{model, proto};

/// Longest DNS name accepted (RFC 1035).
const MAX_NAME_LEN: usize = 253;

/// DNS discovery settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsConfig {
    /// Name servers to ask (UDP, then TCP); empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Services declared with a DNS name in the config file.
    pub services: Vec<DnsDeclaration>,
    /// Shortest time between refreshes, whatever the TTL says.
    pub min_refresh: Duration,
    /// Longest time between refreshes, whatever the TTL says.
    pub max_refresh: Duration,
    /// First retry delay after a failure (doubles per consecutive failure).
    pub retry_min: Duration,
    /// Longest retry delay after failures.
    pub retry_max: Duration,
    /// Timeout of one query to one name server.
    pub timeout: Duration,
    /// Queries per lookup before it fails.
    pub attempts: usize,
    /// Most DNS-owned backends one name yields (see the module docs).
    pub max_backends: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            services: Vec::new(),
            min_refresh: Duration::from_secs(5),
            max_refresh: Duration::from_secs(300),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            attempts: 2,
            max_backends: 256,
        }
    }
}

impl DnsConfig {
    /// Checks the ranges (`ServerConfig::validate` calls it).
    pub fn validate(&self) -> Result<(), model::ValidationError> {
        let bad = |field: &str, v: String, why: &str| {
            Err(model::ValidationError::new(field, v, why.to_owned()))
        };
        if self.min_refresh < Duration::from_millis(100) || self.min_refresh > self.max_refresh {
            return bad(
                "dns.min_refresh",
                format!("{:?}", self.min_refresh),
                "must be at least 100 ms and at most dns.max_refresh",
            );
        }
        if self.retry_min < Duration::from_millis(100) || self.retry_min > self.retry_max {
            return bad(
                "dns.retry_min",
                format!("{:?}", self.retry_min),
                "must be at least 100 ms and at most dns.retry_max",
            );
        }
        if self.timeout < Duration::from_millis(10) || self.attempts == 0 {
            return bad(
                "dns.timeout",
                format!("{:?}", self.timeout),
                "must be at least 10 ms, with at least one attempt",
            );
        }
        if self.max_backends == 0 || self.max_backends > model::MAX_BACKENDS_PER_SERVICE {
            return bad(
                "dns.max_backends",
                self.max_backends.to_string(),
                "must be between 1 and the per-service backend quota",
            );
        }
        for d in &self.services {
            model::validate_id("service", &d.service)?;
            Target::parse(&d.target)?;
            model::validate_weight(d.weight)?;
            if let Some(l) = &d.locality {
                dlb::locality::validate_locality("locality", l)?;
            }
            dlb::locality::validate_priority("priority", d.priority)?;
        }
        Ok(())
    }
}

/// A service that follows a DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDeclaration {
    /// The service.
    pub service: String,
    /// `name:port`.
    pub target: String,
    /// Weight of every discovered backend (1..=10000).
    pub weight: u32,
    /// Locality of every discovered backend (`None`: no locality).
    pub locality: Option<proto::Locality>,
    /// Failover priority of every discovered backend (0..=7).
    pub priority: u32,
}

impl DnsDeclaration {
    /// What every backend discovered for this declaration gets.
    pub fn template(&self) -> Template {
        Template {
            weight: self.weight,
            locality: dlb::locality::normalize(self.locality.clone()),
            priority: self.priority,
        }
    }
}

/// What every backend a followed name discovers gets: the declaration's weight, locality and
/// priority. A re-declaration with another template rewrites the backends in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Weight (1..=10000).
    pub weight: u32,
    /// Locality, in its stored form (`None`: no locality).
    pub locality: Option<proto::Locality>,
    /// Failover priority (0..=7).
    pub priority: u32,
}

impl Template {
    /// The template a stored DNS-owned record was written with.
    pub fn of(server: &proto::Server) -> Self {
        Self {
            weight: server.weight,
            locality: server.locality.clone(),
            priority: server.priority,
        }
    }
}

/// A parsed `name:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The DNS name (or an IP literal).
    pub name: String,
    /// The port every backend gets.
    pub port: u16,
}

impl Target {
    /// Parses and validates `name:port` (INVALID_ARGUMENT naming `target` otherwise).
    pub fn parse(s: &str) -> Result<Self, model::ValidationError> {
        let bad = |why: &str| {
            model::ValidationError::new(
                "target",
                model::prefix(s, model::MAX_QUOTED),
                why.to_owned(),
            )
        };
        let (name, port) = s.rsplit_once(':').ok_or_else(|| bad("must be name:port"))?;
        // Digits only: Rust's integer parser would also take "+80".
        let port: u16 = Some(port)
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse().ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("the port must be 1..=65535"))?;
        let name = name.trim_end_matches('.');
        let ok_chars = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars || name.contains("..") {
            return Err(bad(
                "the name must be 1..=253 bytes of letters, digits, '-', '_' and '.'",
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            port,
        })
    }

    /// `name:port` as given (normalised: no trailing dot).
    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, self.port)
    }
}

/// The backend id of an address (`10.0.0.7-8080`, `2001:db8::7-8080`).
pub fn backend_id(ip: IpAddr, port: u16) -> String {
    format!("{ip}-{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_reject() {
        assert_eq!(
            Target::parse("backend.svc.local.:8080").ok(),
            Some(Target {
                name: "backend.svc.local".into(),
                port: 8080
            })
        );
        for bad in [
            "",
            "name",
            "name:0",
            "name:99999",
            ":80",
            "a b:80",
            "a..b:80",
            "name:+80",
            "name:-80",
            "name: 80",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_are_valid_backend_ids() {
        for ip in ["10.0.0.7", "2001:db8::7", "::1"] {
            let id = backend_id(ip.parse().expect("literal"), 8080);
            assert!(model::validate_server_id(&id).is_ok(), "{id}");
        }
    }
}
