//! `dlbctl`'s command line: the clap definitions of the global flags, the subcommands and the
//! `policy set` flags, and how the health and SDK-health flags apply to a policy.

use clap::{Args, Parser, Subcommand};
use dlb::model;
use dlb::proto;
use dlb_client::Error;

use crate::{adaptive, call, health, membership};

/// Command-line client of the DLB control plane.
#[derive(Debug, Parser)]
#[command(
    name = "dlbctl",
    version,
    about = "Command-line client of the DLB control plane",
    after_help = "Exit codes: 0 ok, 2 usage or invalid argument, 3 not found, 4 already exists, 5 changed concurrently, 1 other."
)]
pub(crate) struct Cli {
    /// Control-plane endpoint (`http://host:port`, `host:port`, or `dns:///host:port`: a name
    /// whose addresses are tried in turn).
    #[arg(
        long,
        global = true,
        env = "DLB_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub(crate) endpoint: String,
    /// Service to work on.
    #[arg(long, short = 's', global = true, default_value = model::DEFAULT_SERVICE)]
    pub(crate) service: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// CA certificate (PEM) to verify a TLS dlbd; turns TLS on. (`--tls-*`, as dlbd's flags:
    /// `--key` is `next`'s request key.)
    #[arg(
        long = "tls-ca",
        global = true,
        value_name = "FILE",
        env = "DLB_TLS_CA"
    )]
    pub(crate) ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for a dlbd that requires mutual TLS; needs --tls-key, --tls-ca.
    #[arg(
        long = "tls-cert",
        global = true,
        value_name = "FILE",
        requires = "cert_key",
        env = "DLB_TLS_CERT"
    )]
    pub(crate) cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(
        long = "tls-key",
        global = true,
        value_name = "FILE",
        requires = "cert",
        env = "DLB_TLS_KEY"
    )]
    pub(crate) cert_key: Option<std::path::PathBuf>,
    /// Bearer token for a dlbd that requires one (`--admin-token-file` / `--read-token-file`).
    #[arg(long, global = true, env = "DLB_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Register a backend.
    #[command(visible_alias = "add_server")]
    AddServer {
        /// Backend id, 1..=128 of [A-Za-z0-9._:-].
        id: String,
        /// `host:port`.
        address: String,
        /// Weight, 1..=10000.
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        weight: u32,
        /// Stable consistent-hashing key.
        #[arg(long)]
        hash_key: Option<String>,
        /// Label `key=value` (repeatable).
        #[arg(long = "meta")]
        meta: Vec<String>,
        /// Locality and failover priority.
        #[command(flatten)]
        locality: crate::locality::LocalityFlags,
    },
    /// Deregister a backend. With --wait, answer only once every client following the service
    /// has acknowledged a version without it (exit 6 if the --timeout passes first, naming the
    /// clients that had not; docs/drain.md).
    #[command(visible_alias = "remove_server")]
    RemoveServer {
        /// Backend id.
        id: String,
        /// Wait on the drain barrier.
        #[arg(long)]
        wait: bool,
        /// The barrier's deadline: 30s, 500ms, 2m (1ms..=1h).
        #[arg(long, value_parser = crate::drain::parse_timeout, default_value = "30s", requires = "wait")]
        timeout: u32,
    },
    /// Drain a backend: no new calls, calls in flight finish. With --wait, answer only once every
    /// client following the service has acknowledged the drain (with --in-flight-zero, also once
    /// the backend's global in-flight count is 0); exit 6 if the --timeout passes first, naming
    /// the clients that had not confirmed (docs/drain.md).
    Drain {
        /// Backend id.
        id: String,
        /// Wait on the drain barrier.
        #[arg(long)]
        wait: bool,
        /// Also wait until no call is in flight on the backend (from the SDKs' load reports).
        #[arg(long, requires = "wait")]
        in_flight_zero: bool,
        /// The barrier's deadline: 30s, 500ms, 2m (1ms..=1h).
        #[arg(long, value_parser = crate::drain::parse_timeout, default_value = "30s", requires = "wait")]
        timeout: u32,
    },
    /// Remove a service: its policy and health check. Refused (exit 5, naming the count) while
    /// it has backends unless --force, which removes them too; NOT_FOUND (exit 3) if missing.
    RemoveService {
        /// The service to remove.
        name: String,
        /// Remove it with its backends.
        #[arg(long)]
        force: bool,
    },
    /// Change a backend.
    #[command(visible_alias = "update_server")]
    UpdateServer {
        /// Backend id.
        id: String,
        /// New weight, 1..=10000.
        #[arg(long, allow_negative_numbers = true)]
        weight: Option<u32>,
        /// Stop sending new picks to it.
        #[arg(long, conflicts_with = "undrain")]
        drain: bool,
        /// Send new picks to it again.
        #[arg(long)]
        undrain: bool,
        /// New `host:port`.
        #[arg(long)]
        address: Option<String>,
        /// New hash key (empty resets it to the id).
        #[arg(long)]
        hash_key: Option<String>,
        /// Apply only if the service is at this version (exit 5 otherwise).
        #[arg(long, value_name = "VERSION")]
        expected_version: Option<u64>,
        /// New locality (replaces the whole locality) and failover priority.
        #[command(flatten)]
        locality: crate::locality::LocalityFlags,
    },
    /// List the service's backends.
    List,
    /// List the services.
    Services,
    /// List the stock gRPC clients connected over standard xDS (ADS) to this endpoint: node id,
    /// user agent, resource types with names and acked versions, last NACK.
    XdsClients,
    /// Mark a backend healthy.
    #[command(visible_alias = "health_check_passed")]
    HealthPass {
        /// Backend id.
        id: String,
    },
    /// Mark a backend unhealthy.
    #[command(visible_alias = "health_check_failed")]
    HealthFail {
        /// Backend id.
        id: String,
    },
    /// Ask the control plane to pick a backend (server-side GetNextServer).
    #[command(visible_alias = "get_next_server")]
    Next {
        /// Request / session key for hashing and affinity.
        #[arg(long)]
        key: Option<String>,
    },
    /// Read or change the service's balancing policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Read, set or remove the service's active health check.
    #[command(subcommand)]
    Health(health::HealthCommand),
    /// Stream live updates of the service through a Discovery session.
    Watch {
        /// Exit after this many updates.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Register a backend with a lease and keep it alive until interrupted (Ctrl-C, SIGTERM),
    /// then deregister it. Killed outright, the backend goes away when the lease expires.
    Register {
        /// Backend id.
        id: String,
        /// Address, host:port.
        address: String,
        /// Weight, 1..=10000.
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Lease time to live, seconds (1..=3600); renewed every third of it.
        #[arg(long, default_value_t = 10)]
        ttl: u64,
        /// Label, key=value (repeatable).
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
        /// On SIGTERM / Ctrl-C, before deregistering: drain the backend and wait on the drain
        /// barrier at most this long (30s, 500ms, 2m; 1ms..=1h). Exit 6 after deregistering
        /// if it passes first.
        #[arg(long, value_parser = crate::drain::parse_timeout, default_value = "30s")]
        drain_timeout: u32,
        /// On SIGTERM, also wait until no call is in flight on the backend.
        #[arg(long, conflicts_with = "no_drain")]
        in_flight_zero: bool,
        /// On SIGTERM, deregister at once (no drain, no barrier).
        #[arg(long)]
        no_drain: bool,
        /// Locality and failover priority.
        #[command(flatten)]
        locality: crate::locality::LocalityFlags,
    },
    /// DNS discovery: declare, remove or list the DNS names services follow.
    #[command(subcommand)]
    Dns(membership::DnsCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Print the policy.
    Get,
    /// Change the policy; fields not given keep their current value. Creates the service if it
    /// does not exist, like the SetPolicy RPC (the service is then operator-configured: it
    /// stays when its last backend goes).
    Set(Box<PolicySet>),
}

#[derive(Debug, Args)]
pub(crate) struct PolicySet {
    /// round_robin, least_conn_exact, least_conn_p2c, maglev, ring_hash or peak_ewma.
    #[arg(long)]
    pub(crate) algorithm: Option<String>,
    /// Bounded-load factor c (maglev, ring_hash), 0 = off, else 1.0..=100.0.
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) bounded_load: Option<f64>,
    /// Session affinity: none, strict or fallback.
    #[arg(long)]
    pub(crate) sticky: Option<String>,
    /// Idle TTL of a session binding, seconds (0 = default 3600).
    #[arg(long)]
    pub(crate) sticky_ttl: Option<u32>,
    /// Maximum number of session bindings (0 = default 100000).
    #[arg(long)]
    pub(crate) sticky_max: Option<u32>,
    /// Outlier detection and panic settings.
    #[command(flatten)]
    pub(crate) health: HealthFlags,
    /// Slow start and circuit breaker settings.
    #[command(flatten)]
    pub(crate) sdk_health: SdkHealthFlags,
    /// Adaptive weights settings.
    #[command(flatten)]
    pub(crate) adaptive: adaptive::AdaptiveFlags,
    /// Call-path settings: retries, retry budget, hedging, Peak-EWMA.
    #[command(flatten)]
    pub(crate) call: call::CallFlags,
    /// Locality settings: priority failover, zone-aware routing, cross-zone budget.
    #[command(flatten)]
    pub(crate) locality: crate::locality::LocalityPolicyFlags,
}

/// `dlbctl policy set` flags for slow start and the SDK's circuit breaker
/// (docs/sdk-health.md). Setting any `--breaker-*` flag turns the breaker on; 0 means "the
/// default" (or "off" where the proto says so).
#[derive(Debug, Args)]
pub(crate) struct SdkHealthFlags {
    /// Slow-start window, milliseconds (0 = off).
    #[arg(long)]
    pub(crate) slow_start_ms: Option<u32>,
    /// Slow-start weight at the start of the ramp, percent (0 = default 10).
    #[arg(long)]
    pub(crate) slow_start_min_percent: Option<u32>,
    /// Turn the circuit breaker off.
    #[arg(long)]
    pub(crate) breaker_off: bool,
    /// Open after this many failures in a row (0 = default 5).
    #[arg(long)]
    pub(crate) breaker_consecutive: Option<u32>,
    /// Open at this failure percent over a window (0 = off).
    #[arg(long)]
    pub(crate) breaker_failure_rate: Option<u32>,
    /// Minimum calls in a window for the failure-rate rule (0 = default 20).
    #[arg(long)]
    pub(crate) breaker_min_requests: Option<u32>,
    /// Failure-rate window, milliseconds (0 = default 10000).
    #[arg(long)]
    pub(crate) breaker_window_ms: Option<u32>,
    /// First cool-down, milliseconds (0 = default 1000).
    #[arg(long)]
    pub(crate) breaker_base_ms: Option<u32>,
    /// Cap on the cool-down, milliseconds (0 = default 60000).
    #[arg(long)]
    pub(crate) breaker_max_ms: Option<u32>,
    /// Concurrent trial calls while half-open (0 = default 1).
    #[arg(long)]
    pub(crate) breaker_trials: Option<u32>,
    /// At most this many calls in flight per SDK to the service (0 = no cap).
    #[arg(long)]
    pub(crate) max_concurrent_calls: Option<u32>,
}

impl SdkHealthFlags {
    /// Applies the flags that were given to `policy`.
    pub(crate) fn apply(&self, policy: &mut proto::Policy) {
        if self.slow_start_ms.is_some() || self.slow_start_min_percent.is_some() {
            let s = policy.slow_start.get_or_insert_with(Default::default);
            if let Some(v) = self.slow_start_ms {
                s.window_ms = v;
            }
            if let Some(v) = self.slow_start_min_percent {
                s.min_percent = v;
            }
        }
        let fields = [
            self.breaker_consecutive,
            self.breaker_failure_rate,
            self.breaker_min_requests,
            self.breaker_window_ms,
            self.breaker_base_ms,
            self.breaker_max_ms,
            self.breaker_trials,
            self.max_concurrent_calls,
        ];
        if self.breaker_off {
            policy.circuit_breaker = None;
        } else if fields.iter().any(Option::is_some) {
            let b = policy.circuit_breaker.get_or_insert_with(Default::default);
            let slots = [
                &mut b.consecutive_failures,
                &mut b.failure_rate_percent,
                &mut b.min_requests,
                &mut b.window_ms,
                &mut b.base_cooldown_ms,
                &mut b.max_cooldown_ms,
                &mut b.half_open_max_calls,
                &mut b.max_concurrent_calls,
            ];
            for (slot, value) in slots.into_iter().zip(fields) {
                if let Some(v) = value {
                    *slot = v;
                }
            }
        }
    }
}

/// `dlbctl policy set` flags for outlier detection and the panic threshold (docs/outlier.md).
/// Setting any `--outlier-*` flag turns outlier detection on; 0 means "the default".
#[derive(Debug, Args)]
pub(crate) struct HealthFlags {
    /// Turn outlier detection off.
    #[arg(long)]
    pub(crate) outlier_off: bool,
    /// Eject after this many failures in a row (0 = default 5).
    #[arg(long)]
    pub(crate) outlier_consecutive: Option<u32>,
    /// Eject at this failure percent over a window (0 = off).
    #[arg(long)]
    pub(crate) outlier_failure_rate: Option<u32>,
    /// Minimum requests in a window for the failure-rate rule (0 = default 20).
    #[arg(long)]
    pub(crate) outlier_min_requests: Option<u32>,
    /// Failure-rate window, milliseconds (0 = default 1000).
    #[arg(long)]
    pub(crate) outlier_interval_ms: Option<u32>,
    /// Base ejection time, milliseconds (0 = default 30000).
    #[arg(long)]
    pub(crate) outlier_base_ms: Option<u32>,
    /// Cap on the ejection time, milliseconds (0 = default 300000).
    #[arg(long)]
    pub(crate) outlier_max_ms: Option<u32>,
    /// At most this percent of backends ejected at once (0 = default 10).
    #[arg(long)]
    pub(crate) outlier_max_percent: Option<u32>,
    /// Panic threshold in percent of eligible backends (0 = off).
    #[arg(long)]
    pub(crate) panic_threshold: Option<u32>,
    /// What a panicking service does: route_all or fail.
    #[arg(long)]
    pub(crate) panic_mode: Option<String>,
}

impl HealthFlags {
    /// Applies the flags that were given to `policy`.
    pub(crate) fn apply(&self, policy: &mut proto::Policy) -> Result<(), Error> {
        let mode = self
            .panic_mode
            .as_deref()
            .map(|m| dlb::health_policy::parse_panic_mode("policy.panic.mode", m))
            .transpose()?;
        if self.panic_threshold.is_some() || mode.is_some() {
            let p = policy.panic.get_or_insert_with(Default::default);
            if let Some(t) = self.panic_threshold {
                p.threshold_percent = t;
            }
            if let Some(m) = mode {
                p.mode = m as i32;
            }
        }
        let fields = [
            self.outlier_consecutive,
            self.outlier_failure_rate,
            self.outlier_min_requests,
            self.outlier_interval_ms,
            self.outlier_base_ms,
            self.outlier_max_ms,
            self.outlier_max_percent,
        ];
        if self.outlier_off {
            policy.outlier_detection = None;
        } else if fields.iter().any(Option::is_some) {
            let o = policy
                .outlier_detection
                .get_or_insert_with(Default::default);
            let slots = [
                &mut o.consecutive_failures,
                &mut o.failure_rate_percent,
                &mut o.min_requests,
                &mut o.interval_ms,
                &mut o.base_ejection_ms,
                &mut o.max_ejection_ms,
                &mut o.max_ejection_percent,
            ];
            for (slot, value) in slots.into_iter().zip(fields) {
                if let Some(v) = value {
                    *slot = v;
                }
            }
        }
        Ok(())
    }
}
