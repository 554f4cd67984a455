//! Parsing the YAML configuration and converting it into a [`ServerConfig`]. Two steps:
//! `serde_yaml` into raw structs with `deny_unknown_fields` (syntax, unknown fields and type
//! errors carry serde_yaml's line and column), after the input is bounded ([`super::input`]);
//! then semantic validation with `dlb::model` (the same rules as the gRPC API), each error
//! naming its path and, found by [`locate_line`], its line. The `policy:` forms are
//! [`super::policy`]'s.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use dlb::model::{self, ValidationError};
use dlb::proto;
use serde::{Deserialize, Deserializer};

use super::locate::locate_line;
use super::{
    ConfigError, ServerConfig, ServiceConfig, CHANGE_LOG_MAX_MIB, HEALTH_MAX_IN_FLIGHT,
    HEARTBEAT_MS, HISTORY_SIZE, KEEPALIVE_INTERVAL_SECONDS, KEEPALIVE_TIMEOUT_SECONDS,
};

fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    #[serde(default, deserialize_with = "some")]
    metrics_listen: Option<Option<String>>,
    keepalive: Option<RawKeepalive>,
    history_size: Option<usize>,
    change_log_max_mib: Option<u64>,
    max_session_age_seconds: Option<u64>,
    heartbeat_ms: Option<u64>,
    per_backend_metrics: Option<bool>,
    health_max_in_flight: Option<u64>,
    #[serde(
        default,
        deserialize_with = "crate::config::input::at_most::<_, _, { model::MAX_SERVICES }>"
    )]
    services: Vec<RawService>,
    dns: Option<RawDns>,
}

/// `dns:` — DNS discovery settings (see `crate::membership::dns`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    nameservers: Vec<String>,
    min_refresh_seconds: Option<u64>,
    max_refresh_seconds: Option<u64>,
    max_backends: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeepalive {
    interval_seconds: Option<u64>,
    timeout_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    policy: Option<super::policy::RawPolicy>,
    #[serde(
        default,
        deserialize_with = "crate::config::input::at_most::<_, _, { model::MAX_BACKENDS_PER_SERVICE }>"
    )]
    backends: Vec<RawBackend>,
    /// `name:port`: the service's DNS-owned backends follow this name.
    dns: Option<String>,
    /// Weight of the DNS-owned backends (default 1).
    dns_weight: Option<u32>,
    /// Locality of the DNS-owned backends (default none).
    dns_locality: Option<RawLocality>,
    /// Failover priority of the DNS-owned backends (default 0).
    dns_priority: Option<u32>,
}

/// `locality: { region, zone, sub_zone }` of a backend or a DNS declaration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocality {
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    sub_zone: String,
}

impl RawLocality {
    fn to_proto(&self) -> proto::Locality {
        proto::Locality {
            region: self.region.clone(),
            zone: self.zone.clone(),
            sub_zone: self.sub_zone.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    id: String,
    address: String,
    weight: Option<u32>,
    hash_key: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    draining: bool,
    locality: Option<RawLocality>,
    priority: Option<u32>,
}

/// Collects a path and turns a `ValidationError` into a located `ConfigError`.
struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn invalid(&self, path: String, source: ValidationError) -> ConfigError {
        let line = locate_line(self.text, &path);
        ConfigError::Invalid {
            file: self.file.to_owned(),
            path,
            line,
            error: Box::new(source),
        }
    }

    fn addr(&self, field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.invalid(
                field.to_owned(),
                ValidationError::new(
                    field,
                    value,
                    "expected an IP socket address, e.g. 127.0.0.1:50051",
                ),
            )
        })
    }
}

impl ServerConfig {
    /// Parses a YAML configuration. Errors name the field and, where possible, the line.
    pub fn from_yaml_str(s: &str) -> Result<Self, ConfigError> {
        Self::parse(s, "config")
    }

    /// Reads and parses a YAML configuration file.
    pub fn from_yaml_file(p: &Path) -> Result<Self, ConfigError> {
        let file = p.display().to_string();
        let text = super::input::read_file(p, &file)?;
        Self::parse(&text, &file)
    }

    fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        if text.len() as u64 > super::input::MAX_CONFIG_BYTES {
            return Err(ConfigError::Syntax {
                file: file.to_owned(),
                message: "the configuration is larger than 16 MiB".into(),
                line: None,
            });
        }
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig {
                listen: None,
                metrics_listen: None,
                keepalive: None,
                history_size: None,
                change_log_max_mib: None,
                max_session_age_seconds: None,
                heartbeat_ms: None,
                per_backend_metrics: None,
                health_max_in_flight: None,
                services: Vec::new(),
                dns: None,
            }
        } else {
            // Bounded before anything is built: size, NUL bytes, nodes once aliases expand.
            super::input::check_text(text, file)?;
            serde_yaml::from_str(text)
                .map_err(|e| super::input::locate_top_level(text, file, &e))?
        };
        let ctx = Ctx { file, text };
        let mut cfg = ServerConfig::default();
        if let Some(l) = &raw.listen {
            cfg.listen = ctx.addr("listen", l)?;
        }
        match &raw.metrics_listen {
            None => {}
            Some(None) => cfg.metrics_listen = None,
            Some(Some(s)) if matches!(s.as_str(), "" | "off" | "none" | "disabled") => {
                cfg.metrics_listen = None;
            }
            Some(Some(s)) => cfg.metrics_listen = Some(ctx.addr("metrics_listen", s)?),
        }
        let ranged = |path: &str, v: u64, range: std::ops::RangeInclusive<u64>| {
            if range.contains(&v) {
                Ok(v)
            } else {
                let field = path.rsplit('.').next().unwrap_or(path);
                Err(ctx.invalid(
                    path.into(),
                    ValidationError::new(
                        field,
                        v,
                        format!("must be between {} and {}", range.start(), range.end()),
                    ),
                ))
            }
        };
        if let Some(k) = &raw.keepalive {
            if let Some(i) = k.interval_seconds {
                let i = ranged("keepalive.interval_seconds", i, KEEPALIVE_INTERVAL_SECONDS)?;
                cfg.keepalive_interval = Duration::from_secs(i);
            }
            if let Some(t) = k.timeout_seconds {
                let t = ranged("keepalive.timeout_seconds", t, KEEPALIVE_TIMEOUT_SECONDS)?;
                cfg.keepalive_timeout = Duration::from_secs(t);
            }
        }
        if let Some(h) = raw.history_size {
            let h = ranged("history_size", h as u64, HISTORY_SIZE)?;
            cfg.history_size = usize::try_from(h).unwrap_or(usize::MAX);
        }
        if let Some(m) = raw.change_log_max_mib {
            let m = ranged("change_log_max_mib", m, CHANGE_LOG_MAX_MIB)?;
            cfg.store_history_bytes = usize::try_from(m << 20).unwrap_or(usize::MAX);
        }
        if let Some(s) = raw.max_session_age_seconds {
            let s = ranged("max_session_age_seconds", s, 1..=30 * 86_400)?;
            cfg.max_session_age = Some(Duration::from_secs(s));
        }
        if let Some(ms) = raw.heartbeat_ms {
            let ms = ranged("heartbeat_ms", ms, HEARTBEAT_MS)?;
            cfg.session_heartbeat = Duration::from_millis(ms);
        }
        cfg.per_backend_metrics = raw.per_backend_metrics.unwrap_or(false);
        if let Some(n) = raw.health_max_in_flight {
            let n = ranged("health_max_in_flight", n, HEALTH_MAX_IN_FLIGHT)?;
            cfg.health_max_in_flight = usize::try_from(n).unwrap_or(usize::MAX);
        }
        cfg.services.clear();
        let mut names = HashSet::new();
        for (i, s) in raw.services.iter().enumerate() {
            let svc = convert_service(&ctx, i, s)?;
            if !names.insert(svc.name.clone()) {
                return Err(ctx.invalid(
                    format!("services[{i}].name"),
                    ValidationError::new("service", &svc.name, "duplicate service name"),
                ));
            }
            if let Some(target) = &s.dns {
                let d = crate::membership::dns::DnsDeclaration {
                    service: svc.name.clone(),
                    target: target.clone(),
                    weight: s.dns_weight.unwrap_or(1),
                    locality: s.dns_locality.as_ref().map(RawLocality::to_proto),
                    priority: s.dns_priority.unwrap_or(0),
                };
                crate::membership::dns::Target::parse(&d.target)
                    .map_err(|e| ctx.invalid(format!("services[{i}].dns"), e))?;
                model::validate_weight(d.weight)
                    .map_err(|e| ctx.invalid(format!("services[{i}].dns_weight"), e))?;
                if let Some(l) = &d.locality {
                    dlb::locality::validate_locality("dns_locality", l)
                        .map_err(|e| ctx.invalid(format!("services[{i}].{}", e.field), e))?;
                }
                dlb::locality::validate_priority("dns_priority", d.priority)
                    .map_err(|e| ctx.invalid(format!("services[{i}].dns_priority"), e))?;
                cfg.dns.services.push(d);
            }
            cfg.services.push(svc);
        }
        if let Some(d) = &raw.dns {
            for (j, ns) in d.nameservers.iter().enumerate() {
                let addr = ctx.addr(&format!("dns.nameservers[{j}]"), ns)?;
                cfg.dns.nameservers.push(addr);
            }
            if let Some(s) = d.min_refresh_seconds {
                let s = ranged("dns.min_refresh_seconds", s, 1..=86_400)?;
                cfg.dns.min_refresh = Duration::from_secs(s);
            }
            if let Some(s) = d.max_refresh_seconds {
                let s = ranged("dns.max_refresh_seconds", s, 1..=86_400)?;
                cfg.dns.max_refresh = Duration::from_secs(s);
            }
            if let Some(n) = d.max_backends {
                let n = ranged(
                    "dns.max_backends",
                    n as u64,
                    1..=model::MAX_BACKENDS_PER_SERVICE as u64,
                )?;
                cfg.dns.max_backends = usize::try_from(n).unwrap_or(1);
            }
        }
        if !names.contains(model::DEFAULT_SERVICE) {
            cfg.services
                .insert(0, ServiceConfig::empty(model::DEFAULT_SERVICE));
        }
        Ok(cfg)
    }
}

fn convert_service(ctx: &Ctx<'_>, i: usize, s: &RawService) -> Result<ServiceConfig, ConfigError> {
    let at = |field: &str| format!("services[{i}].{field}");
    model::validate_id("service", &s.name).map_err(|e| ctx.invalid(at("name"), e))?;
    let policy = super::policy::to_policy(s.policy.as_ref())
        .map_err(|(path, e)| ctx.invalid(at(&path), e))?;
    let mut ids = HashSet::new();
    let mut backends = Vec::with_capacity(s.backends.len());
    for (j, b) in s.backends.iter().enumerate() {
        let bat = |field: &str| format!("services[{i}].backends[{j}].{field}");
        let server = proto::Server {
            server_id: b.id.clone(),
            address: b.address.clone(),
            weight: b.weight.unwrap_or(1),
            hash_key: b.hash_key.clone().unwrap_or_default(),
            metadata: b.metadata.clone().into_iter().collect(),
            draining: b.draining,
            locality: dlb::locality::normalize(b.locality.as_ref().map(RawLocality::to_proto)),
            priority: b.priority.unwrap_or(0),
            ..Default::default()
        };
        model::validate_server(&server).map_err(|e| {
            let field = match e.field.as_str() {
                "server_id" => "id",
                f if f.starts_with("metadata") => "metadata",
                f => f,
            }
            .to_owned();
            ctx.invalid(bat(&field), e)
        })?;
        if !ids.insert(b.id.clone()) {
            return Err(ctx.invalid(
                bat("id"),
                ValidationError::new("server_id", &b.id, "duplicate backend id in this service"),
            ));
        }
        backends.push(server);
    }
    Ok(ServiceConfig {
        name: s.name.clone(),
        policy,
        backends,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = ServerConfig::from_yaml_str("").unwrap();
        assert_eq!(c, ServerConfig::default());
        let c = ServerConfig::from_yaml_str("metrics_listen: null\n").unwrap();
        assert_eq!(c.metrics_listen, None);
        let e = ServerConfig::from_yaml_str(
            "services:\n  - name: s\n    backends:\n      - id: a\n        address: 1.2.3.4:80\n        weight: 0\n",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("services[0].backends[0].weight"), "{msg}");
        assert!(msg.contains("(line 6)"), "{msg}");
    }

    #[test]
    fn locality_priority_and_locality_policy() {
        let c = ServerConfig::from_yaml_str(
            "services:
  - name: web
    policy:
      locality: { overprovisioning_percent: 150, zone_aware: false, min_cluster_size: 3,
                  cross_zone_budget_percent: 10, budget_healthy_threshold_percent: 60,
                  saturation_in_flight: 8 }
    backends:
      - id: a
        address: 1.2.3.4:80
        locality: { region: eu, zone: eu-a, sub_zone: r1 }
        priority: 1
      - id: b
        address: 1.2.3.5:80
        locality: {}
    dns: backend.local:80
    dns_locality: { region: eu, zone: eu-b }
    dns_priority: 2
",
        )
        .unwrap();
        let web = c.services.iter().find(|s| s.name == "web").unwrap();
        let l = web.policy.locality.unwrap();
        assert_eq!(
            (
                l.overprovisioning_percent,
                l.zone_aware,
                l.min_cluster_size,
                l.cross_zone_budget_percent,
                l.budget_healthy_threshold_percent,
                l.saturation_in_flight
            ),
            (150, Some(false), 3, 10, 60, 8)
        );
        let a = &web.backends[0];
        let want = proto::Locality {
            region: "eu".into(),
            zone: "eu-a".into(),
            sub_zone: "r1".into(),
        };
        assert_eq!((a.locality.as_ref(), a.priority), (Some(&want), 1));
        assert_eq!(web.backends[1].locality, None, "an empty locality is none");
        let d = &c.dns.services[0];
        assert_eq!(d.locality.as_ref().unwrap().zone, "eu-b");
        assert_eq!(d.priority, 2);

        let bad = |yaml: &str, want: &str| {
            let text = format!("services:\n  - name: web\n{yaml}");
            let msg = ServerConfig::from_yaml_str(&text).unwrap_err().to_string();
            assert!(msg.contains(want), "{yaml}: {msg}");
        };
        let backend = "    backends:\n      - id: a\n        address: 1.2.3.4:80\n";
        bad(
            &format!("{backend}        locality: {{ region: eu, zone: \"a b\" }}\n"),
            "services[0].backends[0].locality.zone",
        );
        bad(
            &format!("{backend}        locality: {{ zone: a }}\n"),
            "services[0].backends[0].locality.region",
        );
        bad(
            &format!("{backend}        priority: 8\n"),
            "services[0].backends[0].priority",
        );
        bad(
            &format!("{backend}        locality: {{ region: eu, rack: r1 }}\n"),
            "rack",
        );
        bad(
            "    dns: backend.local:80\n    dns_priority: 9\n",
            "services[0].dns_priority",
        );
        bad(
            "    dns: backend.local:80\n    dns_locality: { zone: z }\n",
            "services[0].dns_locality.region",
        );
        bad("    policy:\n      locality: { spill: 1 }\n", "spill");
        bad(
            "    policy:\n      locality: { overprovisioning_percent: 50 }\n",
            "services[0].policy.locality.overprovisioning_percent",
        );
    }
}
