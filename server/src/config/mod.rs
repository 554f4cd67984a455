//! Server configuration: [`ServerConfig`] and its YAML form.
//!
//! The YAML file is parsed in two steps: `serde_yaml` into raw structs with
//! `deny_unknown_fields` (syntax, unknown fields and type errors carry serde_yaml's line and
//! column), then semantic validation with `dlb::model` (the same rules as the gRPC API). A
//! semantic error names its path (`services[0].backends[1].weight`) and, found by re-scanning the
//! text for that path ([`locate_line`]), its line. Before parsing, the input is bounded (size,
//! NUL bytes, UTF-8, YAML nodes once aliases expand, list quotas). Values are stored as the wire
//! types (`dlb::proto::Policy`, `dlb::proto::Server`), so the store receives the same messages
//! whatever the entry point.
//!
//! Files: this one ([`ServerConfig`], its defaults and [`ServerConfig::validate`] for values set
//! in code), `yaml.rs` (parse and convert the YAML), `policy.rs` (every `policy:` form),
//! `locate.rs` ([`locate_line`]), `input.rs` (the bounds checked before parsing). The etcd
//! settings are [`crate::etcd`]'s ([`EtcdConfig`]), the error [`ConfigError`] is beside the
//! crate's [`Error`](crate::Error); both are re-exported here.
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

mod input;
mod locate;
mod policy;
mod yaml;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use dlb::model::{self, ValidationError};
use dlb::proto;

pub use crate::error::ConfigError;
pub use crate::etcd::{EtcdConfig, EtcdTls};
pub use locate::locate_line;

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
    pub auth: crate::api::auth::AuthConfig,
    /// TLS on the gRPC port; `None`: plaintext.
    pub tls: Option<TlsConfig>,
    /// DNS discovery: name servers, refresh bounds, services that follow a DNS name.
    pub dns: crate::membership::dns::DnsConfig,
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
            auth: crate::api::auth::AuthConfig::default(),
            tls: None,
            dns: crate::membership::dns::DnsConfig::default(),
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
