//! `dlbctl health …`: read, set and remove a service's active health check (the policy's
//! `health_check`), with the same read-modify-write and compare-and-set as `policy set`.

use clap::{Args, Subcommand};
use dlb::model;
use dlb::proto;
use dlb_client::{AdminClient, Error};
use serde_json::{json, Value};

/// `dlbctl health` subcommands.
#[derive(Debug, Subcommand)]
pub enum HealthCommand {
    /// Print the service's health check.
    Get,
    /// Set the service's health check (replaces it; flags not given take their defaults).
    /// Creates the service if it does not exist, like `policy set` (the service is then
    /// operator-configured: it stays when its last backend goes).
    Set(Box<HealthSet>),
    /// Remove the health check: probes stop and their verdicts are cleared. NOT_FOUND if the
    /// service does not exist.
    Off,
    /// Show the checker's live view of each backend: state, counts, last result and RTT.
    Show,
}

/// `dlbctl health set` flags.
#[derive(Debug, Args)]
pub struct HealthSet {
    /// HTTP/1.1 check of this path (e.g. /healthz).
    #[arg(long, group = "kind")]
    http: Option<String>,
    /// TCP connect check.
    #[arg(long, group = "kind")]
    tcp: bool,
    /// gRPC grpc.health.v1 check of this service name ("" for the whole server).
    #[arg(long, group = "kind")]
    grpc: Option<String>,
    /// HTTP method (default GET).
    #[arg(long)]
    method: Option<String>,
    /// HTTP Host header (default: the backend's address).
    #[arg(long)]
    host: Option<String>,
    /// Passing HTTP statuses, e.g. 200-299,301 (default 200-299).
    #[arg(long, value_delimiter = ',')]
    expect_status: Vec<String>,
    /// Text the HTTP body must contain.
    #[arg(long)]
    body_contains: Option<String>,
    /// TCP: bytes to send after connecting.
    #[arg(long)]
    send: Option<String>,
    /// TCP: the reply must start with this.
    #[arg(long)]
    expect: Option<String>,
    /// Interval, ms (default 5000).
    #[arg(long)]
    interval_ms: Option<u32>,
    /// Timeout, ms (default 1000, or the interval when it is shorter).
    #[arg(long)]
    timeout_ms: Option<u32>,
    /// Consecutive passes to become healthy (default 2).
    #[arg(long)]
    rise: Option<u32>,
    /// Consecutive failures to become unhealthy (default 3).
    #[arg(long)]
    fall: Option<u32>,
    /// Interval while changing state, ms (default: interval).
    #[arg(long)]
    fast_interval_ms: Option<u32>,
    /// Interval while unhealthy, ms (default: interval).
    #[arg(long)]
    down_interval_ms: Option<u32>,
    /// ± jitter on each interval, percent (0..=50, default 0).
    #[arg(long)]
    jitter_percent: Option<u32>,
    /// Flap damping: transitions within the window beyond which a backend is held down (0 off).
    #[arg(long)]
    flap_threshold: Option<u32>,
    /// Flap window, ms (default 60000).
    #[arg(long)]
    flap_window_ms: Option<u32>,
    /// First hold-down, ms (default 30000); doubles on repeat.
    #[arg(long)]
    flap_hold_down_ms: Option<u32>,
    /// Longest hold-down, ms (default 600000).
    #[arg(long)]
    flap_max_hold_down_ms: Option<u32>,
    /// Probe this port instead of the backend's.
    #[arg(long)]
    port: Option<u32>,
}

fn status_range(s: &str) -> Result<proto::StatusRange, model::ValidationError> {
    let bad = || {
        model::ValidationError::new(
            "policy.health_check.http.expected_statuses",
            s,
            "each entry must be a status (204) or a range (200-299)",
        )
    };
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    Ok(proto::StatusRange {
        start: a.trim().parse().map_err(|_| bad())?,
        end: b.trim().parse().map_err(|_| bad())?,
    })
}

impl HealthSet {
    fn to_proto(&self) -> Result<proto::HealthCheck, model::ValidationError> {
        use proto::health_check::Kind;
        let kind = if let Some(path) = &self.http {
            Some(Kind::Http(proto::HttpHealthCheck {
                method: self.method.clone().unwrap_or_default(),
                path: path.clone(),
                host: self.host.clone().unwrap_or_default(),
                expected_statuses: self
                    .expect_status
                    .iter()
                    .map(|s| status_range(s))
                    .collect::<Result<_, _>>()?,
                body_contains: self.body_contains.clone().unwrap_or_default(),
            }))
        } else if self.tcp {
            Some(Kind::Tcp(proto::TcpHealthCheck {
                send: self.send.clone().unwrap_or_default().into_bytes(),
                expect_prefix: self.expect.clone().unwrap_or_default().into_bytes(),
            }))
        } else {
            self.grpc
                .as_ref()
                .map(|s| Kind::Grpc(proto::GrpcHealthCheck { service: s.clone() }))
        };
        let hc = proto::HealthCheck {
            kind,
            interval_ms: self.interval_ms.unwrap_or(0),
            timeout_ms: self.timeout_ms.unwrap_or(0),
            healthy_threshold: self.rise.unwrap_or(0),
            unhealthy_threshold: self.fall.unwrap_or(0),
            fast_interval_ms: self.fast_interval_ms.unwrap_or(0),
            down_interval_ms: self.down_interval_ms.unwrap_or(0),
            jitter_percent: self.jitter_percent.unwrap_or(0),
            flap_threshold: self.flap_threshold.unwrap_or(0),
            flap_window_ms: self.flap_window_ms.unwrap_or(0),
            flap_hold_down_ms: self.flap_hold_down_ms.unwrap_or(0),
            flap_max_hold_down_ms: self.flap_max_hold_down_ms.unwrap_or(0),
            port: self.port.unwrap_or(0),
        };
        dlb::health_check::validate(&hc)?;
        Ok(hc)
    }
}

/// The health check as JSON (`null` when none).
pub fn check_json(hc: Option<&proto::HealthCheck>) -> Value {
    let Some(hc) = hc else {
        return Value::Null;
    };
    match dlb::health_check::resolve(hc) {
        Ok(s) => json!({
            "kind": format!("{:?}", s.kind),
            "interval_ms": s.interval.as_millis() as u64,
            "timeout_ms": s.timeout.as_millis() as u64,
            "rise": s.rise,
            "fall": s.fall,
            "fast_interval_ms": s.fast_interval.as_millis() as u64,
            "down_interval_ms": s.down_interval.as_millis() as u64,
            "jitter_percent": s.jitter_percent,
            "flap_threshold": s.flap_threshold,
            "flap_window_ms": s.flap_window.as_millis() as u64,
            "flap_hold_down_ms": s.flap_hold_down.as_millis() as u64,
            "flap_max_hold_down_ms": s.flap_max_hold_down.as_millis() as u64,
            "port": s.port,
        }),
        Err(e) => json!({"invalid": e.to_string()}),
    }
}

fn check_text(hc: Option<&proto::HealthCheck>) -> String {
    match check_json(hc) {
        Value::Null => "no health check".to_owned(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().map_or(v.to_string(), str::to_owned)))
            .collect::<Vec<_>>()
            .join(" "),
        v => v.to_string(),
    }
}

/// Runs a `dlbctl health` subcommand.
pub async fn run(
    admin: &AdminClient,
    service: &str,
    cmd: HealthCommand,
    json_out: bool,
) -> Result<(), Error> {
    let new = match &cmd {
        HealthCommand::Show => return show(admin, service, json_out).await,
        HealthCommand::Get => None,
        HealthCommand::Set(set) => Some(Some(set.to_proto()?)),
        HealthCommand::Off => Some(None),
    };
    let (policy, version) = match new {
        None => {
            let r = admin.get_policy(service).await?;
            (r.policy.unwrap_or_default(), r.version)
        }
        Some(hc) => {
            let (mut policy, read_version) = match admin.get_policy(service).await {
                Ok(r) => (
                    r.policy.unwrap_or_else(model::default_policy),
                    r.version.map_or(0, |v| v.version),
                ),
                // `set` creates the service (its help says so); `off` has nothing to turn off.
                Err(Error::NotFound(_)) if hc.is_some() => (model::default_policy(), 0),
                Err(e) => return Err(e),
            };
            policy.health_check = hc;
            model::validate_policy(&policy)?;
            let r = admin
                .set_policy_if(service, policy, Some(read_version))
                .await?;
            (r.policy.unwrap_or_default(), r.version)
        }
    };
    let v = version.unwrap_or_default();
    if json_out {
        println!(
            "{}",
            json!({"service": service, "health_check": check_json(policy.health_check.as_ref()),
                   "version": {"epoch": v.epoch, "version": v.version}})
        );
    } else {
        println!(
            "{} ({})",
            check_text(policy.health_check.as_ref()),
            dlb_client::Version::from(v)
        );
    }
    Ok(())
}

async fn show(admin: &AdminClient, service: &str, json_out: bool) -> Result<(), Error> {
    let r = admin.get_health(service).await?;
    for b in &r.backends {
        let published = proto::Verdict::try_from(b.published).map_or("?", |v| match v {
            proto::Verdict::Unset => "unset",
            proto::Verdict::Healthy => "healthy",
            proto::Verdict::Unhealthy => "unhealthy",
        });
        let rtt_ms = (b.last_rtt_us > 0).then(|| b.last_rtt_us as f64 / 1e3);
        if json_out {
            println!(
                "{}",
                json!({"service": r.service, "server_id": b.server_id, "state": b.state,
                       "passes": b.consecutive_passes, "failures": b.consecutive_failures,
                       "published": published, "last": b.last_detail, "rtt_ms": rtt_ms,
                       "held_down": b.held_down, "hold_downs": b.hold_downs,
                       "prober": b.prober, "probed_here": b.probed_here})
            );
        } else {
            let rtt = rtt_ms.map_or("-".to_owned(), |ms| format!("{ms:.2}ms"));
            println!(
                "{} {} passes={} failures={} published={} rtt={} held_down={} hold_downs={} prober={} last=\"{}\"",
                b.server_id,
                b.state,
                b.consecutive_passes,
                b.consecutive_failures,
                published,
                rtt,
                b.held_down,
                b.hold_downs,
                b.prober,
                b.last_detail
            );
        }
    }
    if r.truncated && !json_out {
        println!(
            "{}",
            crate::print::more_not_shown(r.total, r.backends.len())
        );
    }
    Ok(())
}
