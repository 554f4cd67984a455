//! Server configuration: [`ServerConfig`] and its YAML form.
//!
//! The YAML file is parsed in two steps: `serde_yaml` into raw structs with
//! `deny_unknown_fields` (syntax, unknown fields and type errors carry serde_yaml's line and
//! column), then semantic validation with `dlb::model` (the same rules as the gRPC API). A
//! semantic error names its path (`services[0].backends[1].weight`) and, found by re-scanning the
//! text for that path ([`locate_line`]), its line. Before parsing, the input is bounded (size,
//! NUL bytes, UTF-8, YAML nodes once aliases expand, list quotas: `crate::config_input`). Values are stored as the wire types
//! (`dlb::proto::Policy`, `dlb::proto::Server`), so the store receives the same messages whatever
//! the entry point.
//!
//! ```yaml
//! listen: 127.0.0.1:50051
//! metrics_listen: 127.0.0.1:9464     # null disables the metrics endpoint
//! keepalive: { interval_seconds: 30, timeout_seconds: 10 }   # 1..=3600 and 1..=600
//! history_size: 1024                 # 1..=1,000,000
//! change_log_max_mib: 64             # bytes of the store's in-memory change log, 1..=65,536 MiB
//! max_session_age_seconds: 1800      # SDK sessions sent away (±10 %) to rebalance; 1..=2,592,000
//! heartbeat_ms: 5000                 # a silent session sends a Heartbeat; 100..=60,000 (docs/failover.md)
//! per_backend_metrics: false         # opt-in per-backend series
//! health_max_in_flight: 1024         # active health probes in flight, 1..=65,536 (docs/health.md)
//! services:
//!   - name: web
//!     policy: { algorithm: maglev, bounded_load_factor: 1.25, sticky: none }
//!     backends:
//!       - { id: web-1, address: "10.0.0.1:8080", weight: 2, metadata: { zone: a } }
//! ```
//!
//! A configuration loaded from YAML always has a `default` service (added, empty, with the
//! default policy, when the file does not list it).

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use dlb::model::{self, ValidationError};
use dlb::proto;
use serde::{Deserialize, Deserializer};

pub use crate::etcd::{EtcdConfig, EtcdTls};

/// Default gRPC listen address, 127.0.0.1:50051.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 50051));
/// Default metrics listen address, 127.0.0.1:9464.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464));

/// Allowed `keepalive.interval_seconds` (HTTP/2 ping interval).
pub const KEEPALIVE_INTERVAL_SECONDS: std::ops::RangeInclusive<u64> = 1..=3600;
/// Allowed `keepalive.timeout_seconds` (how long a ping may go unanswered).
pub const KEEPALIVE_TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 1..=600;
/// Allowed `health_max_in_flight` (active health probes in flight).
pub const HEALTH_MAX_IN_FLIGHT: std::ops::RangeInclusive<u64> = 1..=65_536;
/// Allowed `heartbeat_ms` (`dlbd --heartbeat-ms`): how long a session may be silent before it
/// sends a `Heartbeat`.
pub const HEARTBEAT_MS: std::ops::RangeInclusive<u64> = 100..=60_000;
/// Allowed `history_size` (changes kept per service for delta catch-up).
pub const HISTORY_SIZE: std::ops::RangeInclusive<u64> = 1..=1_000_000;
/// Allowed `change_log_max_mib` (MiB of changes the store's in-memory change log keeps).
pub const CHANGE_LOG_MAX_MIB: std::ops::RangeInclusive<u64> = 1..=65_536;

/// One service defined in the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Service name.
    pub name: String,
    /// Its policy (validated with `dlb::model::validate_policy`).
    pub policy: proto::Policy,
    /// Its backends (each validated with `dlb::model::validate_server`; new ones are healthy).
    pub backends: Vec<proto::Server>,
}

impl ServiceConfig {
    /// An empty service with the default policy.
    pub fn empty(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            policy: model::default_policy(),
            backends: Vec::new(),
        }
    }
}

/// Which [`Store`](crate::store::Store) a server runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// In memory: nothing survives the process, every start is a new epoch. The library's
    /// default (tests, benchmarks); `dlbd --store memory`.
    Memory,
    /// The embedded durable store in this data directory (`dlbd`'s default: `./dlbd-data`).
    Embedded(std::path::PathBuf),
    /// An etcd cluster, shared by every replica on the same prefix (`dlbd --store etcd`). Needs
    /// the crate's `etcd` feature: without it [`crate::spawn`] refuses this store.
    Etcd(EtcdConfig),
}

/// Everything `dlbd` needs to start.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// gRPC listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address; `None` disables the endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Services created at start.
    pub services: Vec<ServiceConfig>,
    /// HTTP/2 keepalive ping interval.
    pub keepalive_interval: Duration,
    /// How long to wait for a keepalive ping's acknowledgement before closing the connection.
    pub keepalive_timeout: Duration,
    /// Where the routing state lives.
    pub store: StoreConfig,
    /// Changes kept per service by the snapshot cache for delta catch-up.
    pub history_size: usize,
    /// Changes (across all services) the store remembers for watches; a watcher further behind
    /// re-reads a snapshot.
    pub store_history: usize,
    /// Most bytes of those changes kept in memory (YAML `change_log_max_mib`, flag
    /// `--change-log-max-mib`; default 64 MiB): whichever of the two bounds is reached first
    /// drops the oldest change.
    pub store_history_bytes: usize,
    /// Capacity of each session's outbound message channel. Sessions coalesce updates while
    /// the queue is full, so it needs no depth; it bounds what a client that stops reading pins.
    pub session_queue: usize,
    /// How long a session whose client does not read may wait for room in its queue before it
    /// is closed (1 s ..= 1 h).
    pub stall_deadline: Duration,
    /// How long a Discovery session may go without sending anything before it sends a
    /// `Heartbeat` (100 ms ..= 60 s, default 5 s; `dlbd --heartbeat-ms`, YAML `heartbeat_ms`),
    /// so an SDK can tell a live but quiet control plane from a dead or stuck one (its update
    /// deadline, 15 s by default, must exceed this: twice it and more, see docs/failover.md).
    pub session_heartbeat: Duration,
    /// Longest a Discovery session lives before it is sent `GoingAway` (each session's limit
    /// is drawn uniformly within ±10 % of this, so a fleet does not reconnect in lock-step); the
    /// SDK then resumes on its next endpoint with a delta. Rebalances sessions across replicas
    /// after a failover or a scale-out, like gRPC's `MAX_CONNECTION_AGE`. `None` (the default):
    /// sessions live until they break. 1 s ..= 30 days.
    pub max_session_age: Option<Duration>,
    /// Most Discovery sessions served at once (`RESOURCE_EXHAUSTED` beyond).
    pub max_sessions: usize,
    /// Bound on active health probes in flight; a probe due beyond it is *unknown* (not run,
    /// never a failure). Default [`crate::health::DEFAULT_MAX_IN_FLIGHT`].
    pub health_max_in_flight: usize,
    /// How long a graceful shutdown waits for connections to close before aborting them.
    pub shutdown_grace: Duration,
    /// Also export per-backend metric series (off by default: cardinality grows with backends).
    pub per_backend_metrics: bool,
    /// Who may write and read (bearer tokens); empty: everything is open.
    pub auth: crate::auth::AuthConfig,
    /// TLS on the gRPC port; `None`: plaintext.
    pub tls: Option<TlsConfig>,
    /// DNS discovery: name servers, refresh bounds, services that follow a DNS name.
    pub dns: crate::dns::DnsConfig,
    /// How long the cache may be out of step with the store (watch failed, re-reading) before
    /// this replica stops counting as ready (`docs/etcd.md`, "Replicas"; 0 ..= 60 s, default
    /// 1 s).
    pub ready_grace: Duration,
    /// How long after it stopped counting as ready a replica sends its open sessions
    /// `GoingAway` (0 ..= 1 h, default 1 s: a replica out of contact with etcd has its
    /// sessions sent away within 2.5 s, see [`crate::readiness`]).
    pub going_away_after: Duration,
    /// This replica's id among the replicas of one deployment (`[A-Za-z0-9._:-]`, at most 128
    /// characters); `None`: `<hostname>-<pid>-<random>` ([`crate::replicas::default_id`]).
    pub replica_id: Option<String>,
    /// TTL of the membership lease of a replica on etcd (whole seconds, 1 ..= 60, default 3):
    /// a replica that dies is out of the member set, and its share of the health checks taken
    /// over, within it.
    pub replica_ttl: Duration,
}

/// TLS for the gRPC port (rustls through tonic), with optional client-certificate verification.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// The server's private key, PEM.
    pub key_pem: Vec<u8>,
    /// When set, clients must present a certificate signed by one of these CAs (mTLS), PEM.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("TlsConfig")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            metrics_listen: Some(DEFAULT_METRICS_LISTEN),
            services: vec![ServiceConfig::empty(model::DEFAULT_SERVICE)],
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            store: StoreConfig::Memory,
            history_size: crate::cache::DEFAULT_HISTORY,
            store_history: crate::store::memory::DEFAULT_HISTORY,
            store_history_bytes: crate::store::memory::DEFAULT_HISTORY_BYTES,
            session_queue: 8,
            stall_deadline: Duration::from_secs(30),
            session_heartbeat: Duration::from_secs(5),
            max_session_age: None,
            max_sessions: 100_000,
            health_max_in_flight: crate::health::DEFAULT_MAX_IN_FLIGHT,
            shutdown_grace: Duration::from_secs(5),
            per_backend_metrics: false,
            auth: crate::auth::AuthConfig::default(),
            tls: None,
            dns: crate::dns::DnsConfig::default(),
            ready_grace: crate::readiness::DEFAULT_GRACE,
            going_away_after: crate::readiness::DEFAULT_GOING_AWAY_AFTER,
            replica_id: None,
            replica_ttl: Duration::from_secs(3),
        }
    }
}

impl ServerConfig {
    /// Checks the ranges of values set in code (the YAML loader checks the same ranges with
    /// file positions). [`crate::spawn`] calls it.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let secs = |field: &str, d: Duration, range: std::ops::RangeInclusive<u64>| {
            let v = d.as_secs();
            if d.subsec_nanos() == 0 && range.contains(&v) {
                Ok(())
            } else {
                Err(ValidationError::new(
                    field,
                    format!("{d:?}"),
                    format!(
                        "must be whole seconds between {} and {}",
                        range.start(),
                        range.end()
                    ),
                ))
            }
        };
        secs(
            "keepalive_interval",
            self.keepalive_interval,
            KEEPALIVE_INTERVAL_SECONDS,
        )?;
        secs(
            "keepalive_timeout",
            self.keepalive_timeout,
            KEEPALIVE_TIMEOUT_SECONDS,
        )?;
        if !HEALTH_MAX_IN_FLIGHT.contains(&(self.health_max_in_flight as u64)) {
            return Err(ValidationError::new(
                "health_max_in_flight",
                self.health_max_in_flight,
                "must be between 1 and 65536",
            ));
        }
        if !CHANGE_LOG_MAX_MIB.contains(&((self.store_history_bytes >> 20) as u64))
            || !self.store_history_bytes.is_multiple_of(1 << 20)
        {
            return Err(ValidationError::new(
                "change_log_max_mib",
                format!("{} bytes", self.store_history_bytes),
                "must be a whole number of MiB between 1 and 65536",
            ));
        }
        if !HISTORY_SIZE.contains(&(self.history_size as u64)) {
            return Err(ValidationError::new(
                "history_size",
                self.history_size,
                "must be between 1 and 1000000",
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.stall_deadline) {
            return Err(ValidationError::new(
                "stall_deadline",
                format!("{:?}", self.stall_deadline),
                "must be between 1 s and 1 hour",
            ));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&self.session_heartbeat)
        {
            return Err(ValidationError::new(
                "session_heartbeat",
                format!("{:?}", self.session_heartbeat),
                "must be between 100 ms and 60 s",
            ));
        }
        if let Some(age) = self.max_session_age {
            if !(Duration::from_secs(1)..=Duration::from_secs(30 * 86_400)).contains(&age) {
                return Err(ValidationError::new(
                    "max_session_age",
                    format!("{age:?}"),
                    "must be between 1 s and 30 days",
                ));
            }
        }
        if !(1..=1024).contains(&self.session_queue) {
            return Err(ValidationError::new(
                "session_queue",
                self.session_queue,
                "must be between 1 and 1024",
            ));
        }
        if self.shutdown_grace > Duration::from_secs(3600) {
            return Err(ValidationError::new(
                "shutdown_grace",
                format!("{:?}", self.shutdown_grace),
                "must be at most 1 hour",
            ));
        }
        if self.ready_grace > Duration::from_secs(60) {
            return Err(ValidationError::new(
                "ready_grace",
                format!("{:?}", self.ready_grace),
                "must be at most 60 s",
            ));
        }
        if self.going_away_after > Duration::from_secs(3600) {
            return Err(ValidationError::new(
                "going_away_after",
                format!("{:?}", self.going_away_after),
                "must be at most 1 hour",
            ));
        }
        if let Some(id) = &self.replica_id {
            crate::replicas::validate_id(id)?;
        }
        secs("replica_ttl", self.replica_ttl, 1..=60)?;
        self.dns.validate()?;
        Ok(())
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// YAML syntax, unknown field or wrong type (serde_yaml's message names the field and
    /// position).
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// serde_yaml's message.
        message: String,
        /// 1-based line, when known.
        line: Option<usize>,
    },
    /// A value that parses but is not valid.
    #[error("{file}: {path}: {error}{}", .line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid {
        /// The file.
        file: String,
        /// Path of the value, e.g. `services[0].backends[1].weight`.
        path: String,
        /// 1-based line, when found.
        line: Option<usize>,
        /// What is wrong (its Display is part of this error's).
        error: Box<ValidationError>,
    },
}

impl ConfigError {
    /// The 1-based line of the error, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Read { .. } => None,
            Self::Syntax { line, .. } | Self::Invalid { line, .. } => *line,
        }
    }
}

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
        deserialize_with = "crate::config_input::at_most::<_, _, { model::MAX_SERVICES }>"
    )]
    services: Vec<RawService>,
    dns: Option<RawDns>,
}

/// `dns:` — DNS discovery settings (see `crate::dns`).
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
    policy: Option<RawPolicy>,
    #[serde(
        default,
        deserialize_with = "crate::config_input::at_most::<_, _, { model::MAX_BACKENDS_PER_SERVICE }>"
    )]
    backends: Vec<RawBackend>,
    /// `name:port`: the service's DNS-owned backends follow this name.
    dns: Option<String>,
    /// Weight of the DNS-owned backends (default 1).
    dns_weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    algorithm: Option<String>,
    bounded_load_factor: Option<f64>,
    sticky: Option<String>,
    sticky_ttl_seconds: Option<u32>,
    sticky_max_entries: Option<u32>,
    outlier_detection: Option<crate::config_health::RawOutlier>,
    panic: Option<crate::config_health::RawPanic>,
    health_check: Option<crate::health::config::RawHealthCheck>,
    slow_start: Option<crate::config_sdk_health::RawSlowStart>,
    circuit_breaker: Option<crate::config_sdk_health::RawCircuitBreaker>,
    #[serde(alias = "adaptive_weights")]
    adaptive: Option<crate::config_adaptive::RawAdaptive>,
    retry: Option<crate::config_call::RawRetry>,
    retry_budget: Option<crate::config_call::RawBudget>,
    hedge: Option<crate::config_call::RawHedge>,
    peak_ewma: Option<crate::config_call::RawPeakEwma>,
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
        let text = crate::config_input::read_file(p, &file)?;
        Self::parse(&text, &file)
    }

    fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        if text.len() as u64 > crate::config_input::MAX_CONFIG_BYTES {
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
            crate::config_input::check_text(text, file)?;
            serde_yaml::from_str(text)
                .map_err(|e| crate::config_input::locate_top_level(text, file, &e))?
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
                let d = crate::dns::DnsDeclaration {
                    service: svc.name.clone(),
                    target: target.clone(),
                    weight: s.dns_weight.unwrap_or(1),
                };
                crate::dns::Target::parse(&d.target)
                    .map_err(|e| ctx.invalid(format!("services[{i}].dns"), e))?;
                model::validate_weight(d.weight)
                    .map_err(|e| ctx.invalid(format!("services[{i}].dns_weight"), e))?;
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
    let mut policy = model::default_policy();
    if let Some(p) = &s.policy {
        if let Some(a) = &p.algorithm {
            policy.algorithm = model::parse_algorithm("algorithm", a)
                .map_err(|e| ctx.invalid(at("policy.algorithm"), e))?
                as i32;
        }
        if let Some(c) = p.bounded_load_factor {
            policy.bounded_load_factor = c;
        }
        if let Some(m) = &p.sticky {
            policy.sticky_mode = model::parse_sticky_mode("sticky", m)
                .map_err(|e| ctx.invalid(at("policy.sticky"), e))?
                as i32;
        }
        policy.sticky_ttl_seconds = p.sticky_ttl_seconds.unwrap_or(0);
        policy.sticky_max_entries = p.sticky_max_entries.unwrap_or(0);
        if let Some(h) = &p.health_check {
            policy.health_check = Some(h.to_proto().map_err(|e| {
                let field = e
                    .field
                    .strip_prefix("policy.")
                    .unwrap_or(&e.field)
                    .to_owned();
                ctx.invalid(at(&format!("policy.{field}")), e)
            })?);
        }
        crate::config_health::apply(p.outlier_detection.as_ref(), p.panic.as_ref(), &mut policy)
            .map_err(|e| ctx.invalid(at(&e.field.clone()), e))?;
        crate::config_sdk_health::apply(
            p.slow_start.as_ref(),
            p.circuit_breaker.as_ref(),
            &mut policy,
        );
        crate::config_adaptive::apply(p.adaptive.as_ref(), &mut policy);
        crate::config_call::apply(
            crate::config_call::RawCall {
                retry: p.retry.as_ref(),
                retry_budget: p.retry_budget.as_ref(),
                hedge: p.hedge.as_ref(),
                peak_ewma: p.peak_ewma.as_ref(),
            },
            &mut policy,
        );
    }
    model::validate_policy(&policy).map_err(|e| {
        let field = e.field.strip_prefix("policy.").unwrap_or(&e.field);
        let field = if field == "sticky_mode" {
            "sticky".to_owned()
        } else {
            crate::config_adaptive::yaml_field(&crate::health::config::yaml_field(field))
        };
        ctx.invalid(at(&format!("policy.{field}")), e)
    })?;
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

/// One path segment: a mapping key or a sequence index.
#[derive(Debug, PartialEq)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn parse_path(path: &str) -> Vec<Seg<'_>> {
    let mut segs = Vec::new();
    for part in path.split('.') {
        let (key, rest) = part.split_once('[').unwrap_or((part, ""));
        if !key.is_empty() {
            segs.push(Seg::Key(key));
        }
        for idx in rest.split('[') {
            if let Ok(n) = idx.trim_end_matches(']').parse() {
                segs.push(Seg::Index(n));
            }
        }
    }
    segs
}

/// A non-blank, non-comment line: 0-based number, indentation, content.
struct Line<'a> {
    no: usize,
    indent: usize,
    text: &'a str,
}

/// Finds the 1-based line of `path` (e.g. `services[0].backends[1].weight`) in block-style YAML
/// by re-scanning the text. Flow-style collections resolve to the line they start on. Returns
/// `None` when the path cannot be followed.
pub fn locate_line(text: &str, path: &str) -> Option<usize> {
    let lines: Vec<Line<'_>> = text
        .lines()
        .enumerate()
        .filter_map(|(no, l)| {
            let trimmed = l.trim_start();
            (!trimmed.is_empty() && !trimmed.starts_with('#') && trimmed != "---").then(|| Line {
                no,
                indent: l.len() - trimmed.len(),
                text: l,
            })
        })
        .collect();
    // The current node: index into `lines` and the column its content starts at.
    let (mut li, mut col) = (0usize, lines.first()?.indent);
    let mut found = lines.first()?.no;
    for seg in parse_path(path) {
        let first = lines.get(li)?;
        if first.text.len() > col && first.text[col..].starts_with(['{', '[']) {
            // Flow style: stop at the collection's line.
            return Some(found + 1);
        }
        match seg {
            Seg::Key(key) => {
                let mut hit = None;
                for (k, l) in lines.iter().enumerate().skip(li) {
                    if k > li && l.indent < col {
                        break;
                    }
                    let at = if k == li { col } else { l.indent };
                    if at != col {
                        continue;
                    }
                    let content = l.text.get(at..)?;
                    let content = content.trim_start_matches('"');
                    if let Some(rest) = content.strip_prefix(key) {
                        let rest = rest.trim_start_matches('"');
                        if rest.starts_with(':') {
                            hit = Some((k, at + (content.len() - rest.len()) + 1));
                            break;
                        }
                    }
                }
                let (k, after) = hit?;
                found = lines[k].no;
                let inline = lines[k].text[after..].trim_start();
                if !inline.is_empty() && !inline.starts_with('#') {
                    // Value on the same line.
                    li = k;
                    col = lines[k].text.len() - inline.len();
                } else {
                    li = k + 1;
                    col = lines.get(li)?.indent;
                }
            }
            Seg::Index(n) => {
                let mut count = 0usize;
                let mut hit = None;
                for (k, l) in lines.iter().enumerate().skip(li) {
                    let at = if k == li { col } else { l.indent };
                    if k > li && l.indent < col {
                        break;
                    }
                    if at != col {
                        continue;
                    }
                    if !l.text.get(at..)?.starts_with('-') {
                        break;
                    }
                    if count == n {
                        hit = Some(k);
                        break;
                    }
                    count += 1;
                }
                let k = hit?;
                found = lines[k].no;
                let item = lines[k].text.get(col + 1..)?;
                let trimmed = item.trim_start();
                if trimmed.is_empty() {
                    li = k + 1;
                    col = lines.get(li)?.indent;
                } else {
                    li = k;
                    col = lines[k].text.len() - trimmed.len();
                }
            }
        }
    }
    Some(found + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "\
listen: 127.0.0.1:50051
# comment
services:
  - name: web
    policy:
      algorithm: maglev
    backends:
      - id: a
        address: 10.0.0.1:80
      -
        id: b
        weight: 0
- name: x
";

    #[test]
    fn locate() {
        assert_eq!(locate_line(YAML, "listen"), Some(1));
        assert_eq!(locate_line(YAML, "services[0].name"), Some(4));
        assert_eq!(locate_line(YAML, "services[0].policy.algorithm"), Some(6));
        assert_eq!(
            locate_line(YAML, "services[0].backends[0].address"),
            Some(9)
        );
        assert_eq!(
            locate_line(YAML, "services[0].backends[1].weight"),
            Some(12)
        );
        assert_eq!(locate_line(YAML, "services[0].backends[2].weight"), None);
        let flow = "services:\n- {name: a, backends: [{id: x}]}\n";
        assert_eq!(locate_line(flow, "services[0].backends[0].id"), Some(2));
    }

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
}
