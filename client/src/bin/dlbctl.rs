//! `dlbctl` — command-line client of the DLB control plane.
//!
//! Every subcommand validates its input locally with `dlb::model` (the same rules `dlbd`
//! applies), then makes one `Registry` call — except `watch`, which opens a `Discovery` session
//! and prints every update as it arrives. Output is human-readable by default and JSON with
//! `--json` (one object per line for `watch`).
//!
//! Exit codes: 0 ok, 2 usage or invalid argument, 3 not found, 4 already exists, 5 changed
//! concurrently (a compare-and-set lost: re-read and retry), 1 anything else.

#[path = "dlbctl/membership.rs"]
mod membership;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use dlb::model;
use dlb::proto;
use dlb::proto::client_message::Kind as ClientKind;
use dlb::proto::server_message::Kind as ServerKind;
use dlb_client::{AdminClient, Error, NewServer, ServerUpdate};
use serde_json::{json, Value};

#[path = "dlbctl/adaptive.rs"]
mod adaptive;
#[path = "dlbctl/call.rs"]
mod call;
#[path = "dlbctl/health.rs"]
mod health;

/// Command-line client of the DLB control plane.
#[derive(Debug, Parser)]
#[command(
    name = "dlbctl",
    version,
    about = "Command-line client of the DLB control plane",
    after_help = "Exit codes: 0 ok, 2 usage or invalid argument, 3 not found, 4 already exists, 5 changed concurrently, 1 other."
)]
struct Cli {
    /// Control-plane endpoint (`http://host:port`, `host:port`, or `dns:///host:port`: a name
    /// whose addresses are tried in turn).
    #[arg(
        long,
        global = true,
        env = "DLB_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
    /// Service to work on.
    #[arg(long, short = 's', global = true, default_value = model::DEFAULT_SERVICE)]
    service: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// CA certificate (PEM) to verify a TLS dlbd; turns TLS on. (`--tls-*`, as dlbd's flags:
    /// `--key` is `next`'s request key.)
    #[arg(
        long = "tls-ca",
        global = true,
        value_name = "FILE",
        env = "DLB_TLS_CA"
    )]
    ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for a dlbd that requires mutual TLS; needs --tls-key, --tls-ca.
    #[arg(
        long = "tls-cert",
        global = true,
        value_name = "FILE",
        requires = "cert_key",
        env = "DLB_TLS_CERT"
    )]
    cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(
        long = "tls-key",
        global = true,
        value_name = "FILE",
        requires = "cert",
        env = "DLB_TLS_KEY"
    )]
    cert_key: Option<std::path::PathBuf>,
    /// Bearer token for a dlbd that requires one (`--admin-token-file` / `--read-token-file`).
    #[arg(long, global = true, env = "DLB_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    },
    /// Deregister a backend.
    #[command(visible_alias = "remove_server")]
    RemoveServer {
        /// Backend id.
        id: String,
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
    },
    /// DNS discovery: declare, remove or list the DNS names services follow.
    #[command(subcommand)]
    Dns(membership::DnsCommand),
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Print the policy.
    Get,
    /// Change the policy; fields not given keep their current value. Creates the service if it
    /// does not exist, like the SetPolicy RPC (the service is then operator-configured: it
    /// stays when its last backend goes).
    Set(Box<PolicySet>),
}

#[derive(Debug, Args)]
struct PolicySet {
    /// round_robin, least_conn_exact, least_conn_p2c, maglev, ring_hash or peak_ewma.
    #[arg(long)]
    algorithm: Option<String>,
    /// Bounded-load factor c (maglev, ring_hash), 0 = off, else 1.0..=100.0.
    #[arg(long, allow_negative_numbers = true)]
    bounded_load: Option<f64>,
    /// Session affinity: none, strict or fallback.
    #[arg(long)]
    sticky: Option<String>,
    /// Idle TTL of a session binding, seconds (0 = default 3600).
    #[arg(long)]
    sticky_ttl: Option<u32>,
    /// Maximum number of session bindings (0 = default 100000).
    #[arg(long)]
    sticky_max: Option<u32>,
    /// Outlier detection and panic settings.
    #[command(flatten)]
    health: HealthFlags,
    /// Slow start and circuit breaker settings.
    #[command(flatten)]
    sdk_health: SdkHealthFlags,
    /// Adaptive weights settings.
    #[command(flatten)]
    adaptive: adaptive::AdaptiveFlags,
    /// Call-path settings: retries, retry budget, hedging, Peak-EWMA.
    #[command(flatten)]
    call: call::CallFlags,
}

/// `dlbctl policy set` flags for slow start and the SDK's circuit breaker
/// (docs/sdk-health.md). Setting any `--breaker-*` flag turns the breaker on; 0 means "the
/// default" (or "off" where the proto says so).
#[derive(Debug, Args)]
struct SdkHealthFlags {
    /// Slow-start window, milliseconds (0 = off).
    #[arg(long)]
    slow_start_ms: Option<u32>,
    /// Slow-start weight at the start of the ramp, percent (0 = default 10).
    #[arg(long)]
    slow_start_min_percent: Option<u32>,
    /// Turn the circuit breaker off.
    #[arg(long)]
    breaker_off: bool,
    /// Open after this many failures in a row (0 = default 5).
    #[arg(long)]
    breaker_consecutive: Option<u32>,
    /// Open at this failure percent over a window (0 = off).
    #[arg(long)]
    breaker_failure_rate: Option<u32>,
    /// Minimum calls in a window for the failure-rate rule (0 = default 20).
    #[arg(long)]
    breaker_min_requests: Option<u32>,
    /// Failure-rate window, milliseconds (0 = default 10000).
    #[arg(long)]
    breaker_window_ms: Option<u32>,
    /// First cool-down, milliseconds (0 = default 1000).
    #[arg(long)]
    breaker_base_ms: Option<u32>,
    /// Cap on the cool-down, milliseconds (0 = default 60000).
    #[arg(long)]
    breaker_max_ms: Option<u32>,
    /// Concurrent trial calls while half-open (0 = default 1).
    #[arg(long)]
    breaker_trials: Option<u32>,
    /// At most this many calls in flight per SDK to the service (0 = no cap).
    #[arg(long)]
    max_concurrent_calls: Option<u32>,
}

/// A policy's slow start and circuit breaker, as text (0 = the default, see dlb.proto).
fn sdk_health_text(p: &proto::Policy) -> String {
    let slow = match p.slow_start {
        Some(s) if s.window_ms > 0 => {
            format!(
                "slow_start=on(window_ms={} min_percent={})",
                s.window_ms, s.min_percent
            )
        }
        _ => "slow_start=off".to_owned(),
    };
    let breaker = match p.circuit_breaker {
        None => "breaker=off".to_owned(),
        Some(b) => format!(
            "breaker=on(consecutive={} failure_rate={} min_requests={} window_ms={} base_ms={} max_ms={} trials={} max_concurrent={})",
            b.consecutive_failures, b.failure_rate_percent, b.min_requests, b.window_ms,
            b.base_cooldown_ms, b.max_cooldown_ms, b.half_open_max_calls, b.max_concurrent_calls
        ),
    };
    format!("{slow} {breaker}")
}

impl SdkHealthFlags {
    /// Applies the flags that were given to `policy`.
    fn apply(&self, policy: &mut proto::Policy) {
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
struct HealthFlags {
    /// Turn outlier detection off.
    #[arg(long)]
    outlier_off: bool,
    /// Eject after this many failures in a row (0 = default 5).
    #[arg(long)]
    outlier_consecutive: Option<u32>,
    /// Eject at this failure percent over a window (0 = off).
    #[arg(long)]
    outlier_failure_rate: Option<u32>,
    /// Minimum requests in a window for the failure-rate rule (0 = default 20).
    #[arg(long)]
    outlier_min_requests: Option<u32>,
    /// Failure-rate window, milliseconds (0 = default 1000).
    #[arg(long)]
    outlier_interval_ms: Option<u32>,
    /// Base ejection time, milliseconds (0 = default 30000).
    #[arg(long)]
    outlier_base_ms: Option<u32>,
    /// Cap on the ejection time, milliseconds (0 = default 300000).
    #[arg(long)]
    outlier_max_ms: Option<u32>,
    /// At most this percent of backends ejected at once (0 = default 10).
    #[arg(long)]
    outlier_max_percent: Option<u32>,
    /// Panic threshold in percent of eligible backends (0 = off).
    #[arg(long)]
    panic_threshold: Option<u32>,
    /// What a panicking service does: route_all or fail.
    #[arg(long)]
    panic_mode: Option<String>,
}

impl HealthFlags {
    /// Applies the flags that were given to `policy`.
    fn apply(&self, policy: &mut proto::Policy) -> Result<(), Error> {
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

/// The outlier and panic parts of a policy, as text.
fn health_text(p: &proto::Policy) -> String {
    let outlier = match &p.outlier_detection {
        None => "outlier=off".to_owned(),
        Some(o) => format!(
            "outlier=on(consecutive={} failure_rate={} min_requests={} interval_ms={} base_ms={} max_ms={} max_percent={})",
            o.consecutive_failures, o.failure_rate_percent, o.min_requests, o.interval_ms,
            o.base_ejection_ms, o.max_ejection_ms, o.max_ejection_percent
        ),
    };
    let panic = p.panic.unwrap_or_default();
    format!(
        "{outlier} panic_threshold={} panic_mode={}",
        panic.threshold_percent,
        dlb::health_policy::panic_mode_name(panic.mode)
    )
}

/// A panic state, as text.
fn panic_text(p: Option<proto::PanicState>) -> String {
    let p = p.unwrap_or_default();
    format!(
        "panic={} ({}/{} eligible, mode {})",
        if p.active { "ACTIVE" } else { "no" },
        p.eligible,
        p.total,
        dlb::health_policy::panic_mode_name(p.mode)
    )
}

/// A panic state, as JSON.
fn panic_json(p: Option<proto::PanicState>) -> Value {
    let p = p.unwrap_or_default();
    json!({"active": p.active, "eligible": p.eligible, "total": p.total,
           "mode": dlb::health_policy::panic_mode_name(p.mode)})
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // `register` catches SIGTERM/SIGINT before anything else happens (before it connects), so
    // a signal during registration deregisters instead of killing it with a lease granted.
    let interrupts = matches!(cli.command, Command::Register { .. }).then(|| {
        let _guard = runtime.enter();
        membership::Interrupts::install()
    });
    match runtime.block_on(run(cli, interrupts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

fn health_name(h: i32) -> &'static str {
    if h == proto::HealthStatus::Unhealthy as i32 {
        "unhealthy"
    } else {
        "healthy"
    }
}

fn version_json(v: Option<proto::Version>) -> Value {
    let v = v.unwrap_or_default();
    json!({"epoch": v.epoch, "version": v.version})
}

fn version_text(v: Option<proto::Version>) -> String {
    dlb_client::Version::from(v.unwrap_or_default()).to_string()
}

fn server_json(s: &proto::Server) -> Value {
    let metadata: BTreeMap<_, _> = s.metadata.iter().collect();
    json!({
        "server_id": s.server_id,
        "address": s.address,
        "weight": s.weight,
        "effective_weight": dlb::sources::picker_weight(s),
        "hash_key": s.hash_key,
        "metadata": metadata,
        "health": health_name(s.health),
        "draining": s.draining,
        "reason": s.reason,
        "probe": s.sources.as_ref().and_then(|x| x.probe.as_ref()).map(|p| json!({
            "verdict": proto::Verdict::try_from(p.verdict).map_or("unknown", |v| v.as_str_name()),
            "detail": p.detail,
        })),
        "ready_since_ms": s.ready_since_ms,
    })
}

fn server_text(s: &proto::Server) -> String {
    let mut out = format!("{} {} w={}", s.server_id, s.address, s.weight);
    if s.effective_weight != 0 && s.effective_weight != s.weight {
        out.push_str(&format!(" (effective {})", s.effective_weight));
    }
    out.push_str(&format!(" {}", health_name(s.health)));
    if !s.reason.is_empty() {
        // The reason already says "draining" when the backend drains.
        out.push_str(&format!(" ({})", s.reason));
    } else if s.draining {
        out.push_str(" draining");
    }
    if let Some(p) = s.sources.as_ref().and_then(|x| x.probe.as_ref()) {
        if p.verdict == proto::Verdict::Healthy as i32 {
            out.push_str(&format!(" probe=healthy ({})", p.detail));
        }
    }
    if !s.hash_key.is_empty() {
        out.push_str(&format!(" hash_key={}", s.hash_key));
    }
    let metadata: BTreeMap<_, _> = s.metadata.iter().collect();
    for (k, v) in metadata {
        out.push_str(&format!(" {k}={v}"));
    }
    out
}

fn policy_json(p: &proto::Policy) -> Value {
    json!({
        "algorithm": model::algorithm_name(p.algorithm),
        "bounded_load_factor": p.bounded_load_factor,
        "sticky_mode": model::sticky_mode_name(p.sticky_mode),
        "sticky_ttl_seconds": p.sticky_ttl_seconds,
        "sticky_max_entries": p.sticky_max_entries,
        "health": health_text(p),
        "sdk_health": sdk_health_text(p),
        "adaptive": adaptive::text(p),
        "call": call::text(p),
    })
}

fn policy_text(p: &proto::Policy) -> String {
    format!(
        "algorithm={} bounded_load={} sticky={} sticky_ttl={} sticky_max={} {} {} {} {}",
        model::algorithm_name(p.algorithm),
        p.bounded_load_factor,
        model::sticky_mode_name(p.sticky_mode),
        p.sticky_ttl_seconds,
        p.sticky_max_entries,
        health_text(p),
        sdk_health_text(p),
        adaptive::text(p),
        call::text(p)
    )
}

fn print_server_response(json_out: bool, verb: &str, r: &proto::ServerResponse) {
    let server = r.server.clone().unwrap_or_default();
    if json_out {
        println!(
            "{}",
            json!({"service": r.service, "server": server_json(&server), "version": version_json(r.version)})
        );
    } else {
        println!(
            "{verb} {} in {} ({})",
            server_text(&server),
            r.service,
            version_text(r.version)
        );
    }
}

fn parse_meta(entries: &[String]) -> Result<HashMap<String, String>, Error> {
    let mut out = HashMap::new();
    for e in entries {
        let Some((k, v)) = e.split_once('=') else {
            return Err(model::ValidationError::new("metadata", e, "expected key=value").into());
        };
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

async fn run(cli: Cli, interrupts: Option<membership::Interrupts>) -> Result<(), Error> {
    let service = model::resolve_service(&cli.service)?.to_owned();
    let opts = channel_options(&cli)?;
    let mut admin = AdminClient::with_options([cli.endpoint.clone()], &opts)?;
    if let Some(t) = &cli.token {
        admin = admin.with_token(t)?;
    }
    let j = cli.json;
    match cli.command {
        Command::AddServer {
            id,
            address,
            weight,
            hash_key,
            meta,
        } => {
            let server = NewServer {
                server_id: id,
                address,
                weight,
                hash_key: hash_key.unwrap_or_default(),
                metadata: parse_meta(&meta)?,
            };
            let r = admin.add_server(&service, server).await?;
            print_server_response(j, "added", &r);
        }
        Command::RemoveService { name, force } => {
            let r = admin.remove_service(&name, force).await?;
            if j {
                println!(
                    "{}",
                    json!({"removed_service": r.service, "removed_servers": r.removed_servers,
                           "version": version_json(r.version)})
                );
            } else {
                println!(
                    "removed service {} ({} backend(s) with it; {})",
                    r.service,
                    r.removed_servers,
                    version_text(r.version)
                );
            }
        }
        Command::RemoveServer { id } => {
            let r = admin.remove_server(&service, &id).await?;
            if j {
                println!(
                    "{}",
                    json!({"service": r.service, "removed": id, "version": version_json(r.version)})
                );
            } else {
                println!(
                    "removed {id} from {} ({})",
                    r.service,
                    version_text(r.version)
                );
            }
        }
        Command::UpdateServer {
            id,
            weight,
            drain,
            undrain,
            address,
            hash_key,
            expected_version,
        } => {
            let update = ServerUpdate {
                server_id: id,
                weight,
                draining: (drain || undrain).then_some(drain),
                address,
                hash_key,
                metadata: None,
                expected_version,
            };
            let r = admin.update_server(&service, update).await?;
            print_server_response(j, "updated", &r);
        }
        Command::List => {
            let r = admin.list_servers(&service).await?;
            let leases = membership::leases(&admin, &service).await;
            let policy = r.policy.unwrap_or_default();
            if j {
                let servers: Vec<_> = r
                    .servers
                    .iter()
                    .map(|s| {
                        let mut v = server_json(s);
                        if let (Some(o), Value::Object(m)) =
                            (v.as_object_mut(), membership::list_json(s, &leases))
                        {
                            o.extend(m);
                        }
                        v
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"service": r.service, "version": version_json(r.version),
                           "policy": policy_json(&policy), "servers": servers,
                           "panic": panic_json(r.panic),
                           "circuits": r.circuits.iter().map(|c| json!({
                               "server_id": c.server_id, "open_sessions": c.open_sessions,
                               "half_open_sessions": c.half_open_sessions})).collect::<Vec<_>>(),
                           "circuits_total": r.circuits_total})
                );
            } else {
                println!(
                    "service {} {} {} {}",
                    r.service,
                    version_text(r.version),
                    policy_text(&policy),
                    panic_text(r.panic)
                );
                for s in &r.servers {
                    println!(
                        "  {}{}",
                        server_text(s),
                        membership::list_suffix(s, &leases)
                    );
                }
                for c in &r.circuits {
                    println!(
                        "  circuit {}: open in {} SDK session(s), half-open in {}",
                        c.server_id, c.open_sessions, c.half_open_sessions
                    );
                }
                if (r.circuits_total as usize) > r.circuits.len() {
                    println!("  {}", more_not_shown(r.circuits_total, r.circuits.len()));
                }
            }
        }
        Command::XdsClients => print_xds_clients(j, &admin.list_xds_clients().await?),
        Command::Services => {
            let r = admin.list_services().await?;
            if j {
                let services: Vec<_> = r
                    .services
                    .iter()
                    .map(|s| {
                        json!({"service": s.service, "version": version_json(s.version),
                               "policy": policy_json(&s.policy.clone().unwrap_or_default()),
                               "servers": s.servers, "eligible": s.eligible,
                               "panic": panic_json(s.panic)})
                    })
                    .collect();
                println!(
                    "{}",
                    json!({ "services": services, "truncated": r.truncated, "total": r.total })
                );
            } else {
                for s in &r.services {
                    println!(
                        "{} {} servers={} eligible={} algorithm={} {}",
                        s.service,
                        version_text(s.version),
                        s.servers,
                        s.eligible,
                        model::algorithm_name(s.policy.clone().unwrap_or_default().algorithm),
                        panic_text(s.panic)
                    );
                }
                if r.truncated {
                    println!("{}", more_not_shown(r.total, r.services.len()));
                }
            }
        }
        Command::HealthPass { id } => {
            let r = admin.health_check_passed(&service, &id).await?;
            print_server_response(j, "health passed:", &r);
        }
        Command::HealthFail { id } => {
            let r = admin.health_check_failed(&service, &id).await?;
            print_server_response(j, "health failed:", &r);
        }
        Command::Next { key } => {
            let r = admin
                .get_next_server(&service, key.as_deref().map(str::as_bytes))
                .await?;
            let server = r.server.unwrap_or_default();
            if j {
                println!(
                    "{}",
                    json!({"service": r.service, "server": server_json(&server), "version": version_json(r.version)})
                );
            } else {
                println!("{} {}", server.server_id, server.address);
            }
        }
        Command::Register {
            id,
            address,
            weight,
            ttl,
            meta,
        } => {
            let mut lease = dlb_client::Lease::new(id, address)
                .weight(weight)
                .ttl(std::time::Duration::from_secs(ttl));
            lease.metadata = parse_meta(&meta)?;
            let interrupts = interrupts.unwrap_or_else(membership::Interrupts::install);
            membership::register(&admin, &service, lease, j, interrupts).await?;
        }
        Command::Dns(cmd) => membership::dns(&admin, &service, "", cmd, j).await?,
        Command::Policy(PolicyCommand::Get) => {
            let r = admin.get_policy(&service).await?;
            let p = r.policy.unwrap_or_default();
            if j {
                println!(
                    "{}",
                    json!({"service": r.service, "policy": policy_json(&p), "version": version_json(r.version)})
                );
            } else {
                println!("{}", policy_text(&p));
            }
        }
        Command::Policy(PolicyCommand::Set(set)) => {
            // Parse flags first, so a malformed flag fails without any RPC.
            let algorithm = set
                .algorithm
                .as_deref()
                .map(|a| model::parse_algorithm("policy.algorithm", a))
                .transpose()?;
            let sticky = set
                .sticky
                .as_deref()
                .map(|s| model::parse_sticky_mode("policy.sticky_mode", s))
                .transpose()?;
            if let Some(c) = set.bounded_load {
                if c != 0.0 && !(c.is_finite() && model::LOAD_FACTOR_RANGE.contains(&c)) {
                    return Err(model::ValidationError::new(
                        "policy.bounded_load_factor",
                        c,
                        "must be 0 (off) or between 1.0 and 100.0",
                    )
                    .into());
                }
            }
            // Read, change the given fields, write back with the version read: a concurrent
            // edit makes the write fail (exit 5) instead of being silently overwritten.
            let (mut policy, read_version) = match admin.get_policy(&service).await {
                Ok(r) => (
                    r.policy.unwrap_or_else(model::default_policy),
                    r.version.map_or(0, |v| v.version),
                ),
                Err(Error::NotFound(_)) => (model::default_policy(), 0),
                Err(e) => return Err(e),
            };
            if let Some(a) = algorithm {
                policy.algorithm = a as i32;
            }
            if let Some(c) = set.bounded_load {
                policy.bounded_load_factor = c;
            }
            if let Some(s) = sticky {
                policy.sticky_mode = s as i32;
            }
            if let Some(t) = set.sticky_ttl {
                policy.sticky_ttl_seconds = t;
            }
            if let Some(m) = set.sticky_max {
                policy.sticky_max_entries = m;
            }
            set.health.apply(&mut policy)?;
            set.sdk_health.apply(&mut policy);
            set.adaptive.apply(&mut policy);
            set.call.apply(&mut policy)?;
            model::validate_policy(&policy)?;
            let r = admin
                .set_policy_if(&service, policy, Some(read_version))
                .await?;
            let p = r.policy.unwrap_or_default();
            if j {
                println!(
                    "{}",
                    json!({"service": r.service, "policy": policy_json(&p), "version": version_json(r.version)})
                );
            } else {
                println!("{} ({})", policy_text(&p), version_text(r.version));
            }
        }
        Command::Health(cmd) => health::run(&admin, &service, cmd, j).await?,
        Command::Watch { count } => {
            watch(
                &cli.endpoint,
                &opts,
                cli.token.as_deref(),
                &service,
                j,
                count,
            )
            .await?
        }
    }
    Ok(())
}

/// Opens a Discovery session on `service` and prints every update (acking each), until `count`
/// updates have been printed or the stream ends.
/// Transport options from the command line (TLS files read here; errors name the file).
fn channel_options(cli: &Cli) -> Result<dlb_client::ChannelOptions, Error> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| Error::InvalidArgument(format!("{}: {e}", p.display())))
    };
    let mut opts = dlb_client::ChannelOptions::default();
    if cli.cert.is_some() && cli.ca.is_none() {
        return Err(Error::InvalidArgument("--tls-cert needs --tls-ca".into()));
    }
    if let Some(ca) = &cli.ca {
        let identity = match (&cli.cert, &cli.cert_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        opts.tls = Some(dlb_client::admin::ClientTls {
            ca_pem: read(ca)?,
            identity,
            domain: None,
        });
    }
    Ok(opts)
}

async fn watch(
    endpoint: &str,
    opts: &dlb_client::ChannelOptions,
    token: Option<&str>,
    service: &str,
    j: bool,
    count: Option<u64>,
) -> Result<(), Error> {
    use tokio_stream::wrappers::ReceiverStream;
    let interceptor = dlb_client::admin::TokenInterceptor::new(token)?;
    let channel = dlb_client::admin::make_endpoint(endpoint, opts)?
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("cannot connect to {endpoint}: {e}")))?;
    let mut client =
        proto::discovery_client::DiscoveryClient::with_interceptor(channel, interceptor)
            .max_decoding_message_size(model::MAX_MESSAGE_BYTES);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let subscribe = proto::ClientMessage {
        kind: Some(ClientKind::Subscribe(proto::Subscribe {
            client_id: format!("dlbctl-{}", std::process::id()),
            services: vec![proto::ServiceSubscription {
                service: service.to_owned(),
                known: None,
            }],
        })),
    };
    tx.send(subscribe)
        .await
        .map_err(|_| Error::Unavailable("session closed".into()))?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let mut known: HashSet<String> = HashSet::new();
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    while count.is_none_or(|c| seen < c) {
        let Some(msg) = inbound.message().await? else {
            return Err(Error::Unavailable(
                "the control plane closed the session".into(),
            ));
        };
        let line = match msg.kind {
            Some(ServerKind::Update(u)) => {
                seen += 1;
                let line = if j {
                    let upserts: Vec<_> = u.upserts.iter().map(server_json).collect();
                    let mut o = json!({
                        "service": u.service, "version": version_json(u.version),
                        "full": u.full, "nonce": u.nonce,
                        "upserts": upserts, "removals": u.removals,
                        "removal_reasons": u.removal_reasons,
                    });
                    if let Some(p) = &u.policy {
                        o["policy"] = policy_json(p);
                    }
                    if let Some(b) = u.base {
                        o["base"] = version_json(Some(b));
                    }
                    if u.panic.is_some() {
                        o["panic"] = panic_json(u.panic);
                    }
                    o.to_string()
                } else {
                    let mut parts = vec![version_text(u.version)];
                    if u.full {
                        parts.push("full".into());
                    }
                    if let Some(p) = &u.policy {
                        parts.push(format!("policy={}", model::algorithm_name(p.algorithm)));
                    }
                    if u.full {
                        known.clear();
                    }
                    for s in &u.upserts {
                        let sign = if known.insert(s.server_id.clone()) {
                            '+'
                        } else {
                            '~'
                        };
                        parts.push(format!("{sign}{}", server_text(s)));
                    }
                    for id in &u.removals {
                        known.remove(id);
                        match u.removal_reasons.get(id) {
                            Some(r) => parts.push(format!("-{id} ({r})")),
                            None => parts.push(format!("-{id}")),
                        }
                    }
                    if u.panic.is_some_and(|p| p.active) {
                        parts.push(panic_text(u.panic));
                    }
                    parts.join(" ")
                };
                let ack = proto::ClientMessage {
                    kind: Some(ClientKind::Ack(proto::Ack {
                        service: u.service,
                        version: u.version,
                        nonce: u.nonce,
                    })),
                };
                if tx.send(ack).await.is_err() {
                    return Err(Error::Unavailable("session closed".into()));
                }
                line
            }
            Some(ServerKind::NotFound(nf)) => {
                if j {
                    json!({"service": nf.service, "not_found": true, "version": version_json(nf.version)})
                        .to_string()
                } else {
                    format!(
                        "service {} not found ({})",
                        nf.service,
                        version_text(nf.version)
                    )
                }
            }
            Some(ServerKind::GoingAway(g)) => {
                return Err(Error::Unavailable(format!(
                    "the control plane is going away: {}",
                    g.reason
                )));
            }
            // Global in-flight counts are routing input for SDKs, not updates to print.
            Some(ServerKind::GlobalLoad(_)) => continue,
            // Proof of life on a quiet stream.
            Some(ServerKind::Heartbeat(_)) => continue,
            None => continue,
        };
        let mut out = stdout.lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(()); // stdout closed (e.g. piped into `head`)
        }
    }
    Ok(())
}

/// Prints `dlbctl xds-clients`.
fn print_xds_clients(j: bool, r: &dlb::proto::ListXdsClientsResponse) {
    let short = |t: &str| t.rsplit('.').next().unwrap_or(t).to_owned();
    if j {
        let clients: Vec<_> = r
            .clients
            .iter()
            .map(|c| {
                let types: Vec<_> = c
                    .types
                    .iter()
                    .map(|t| {
                        json!({"type_url": t.type_url, "names": t.names,
                               "names_total": t.names_total, "wildcard": t.wildcard,
                               "sent_version": t.sent_version, "acked_version": t.acked_version,
                               "acked_nonce": t.acked_nonce, "responses": t.responses,
                               "nacks": t.nacks,
                               "last_nack": t.last_nack.as_ref().map(|n| json!({
                                   "version": n.version, "nonce": n.nonce,
                                   "message": n.message, "at_unix_ms": n.at_unix_ms}))})
                    })
                    .collect();
                json!({"stream": c.stream, "protocol": c.protocol, "peer": c.peer,
                       "node_id": c.node_id, "user_agent": c.user_agent, "types": types})
            })
            .collect();
        println!(
            "{}",
            json!({"clients": clients, "truncated": r.truncated, "total": r.total})
        );
        return;
    }
    if r.clients.is_empty() {
        println!("no xDS clients connected");
    }
    for c in &r.clients {
        println!(
            "stream {} {} node={:?} agent={:?} peer={}",
            c.stream, c.protocol, c.node_id, c.user_agent, c.peer
        );
        for t in &c.types {
            let mut names = if t.wildcard {
                "*".to_owned()
            } else {
                t.names.join(",")
            };
            let listed = u32::try_from(t.names.len()).unwrap_or(u32::MAX);
            if t.names_total > listed {
                names.push_str(&format!(",… ({} more not shown)", t.names_total - listed));
            }
            println!(
                "  {} [{}] acked={} sent={} responses={} nacks={}",
                short(&t.type_url),
                names,
                if t.acked_version.is_empty() {
                    "-"
                } else {
                    &t.acked_version
                },
                t.sent_version,
                t.responses,
                t.nacks
            );
            if let Some(n) = &t.last_nack {
                println!("    last NACK (nonce {}): {}", n.nonce, n.message);
            }
        }
    }
    if r.truncated {
        println!("{}", more_not_shown(r.total, r.clients.len()));
    }
}

/// The line under a truncated listing: how many entries were left out (when the server says).
pub(crate) fn more_not_shown(total: u32, listed: usize) -> String {
    let listed = u32::try_from(listed).unwrap_or(u32::MAX);
    if total > listed {
        format!("({} more not shown)", total - listed)
    } else {
        "(more exist than listed)".to_owned()
    }
}
