//! The YAML form of a service's health check (`services[].policy.health_check`), converted to
//! the wire message; validation is `dlb::health_check::validate`, shared with the API.
//!
//! ```yaml
//! policy:
//!   health_check:
//!     http: { path: /healthz, host: web.internal, expected_statuses: ["200-299", "301"], body_contains: ok }
//!     # or: tcp: { send: "PING\r\n", expect: "+PONG" }
//!     # or: grpc: { service: my.Service }
//!     interval_ms: 1000
//!     timeout_ms: 200
//!     healthy_threshold: 2
//!     unhealthy_threshold: 3
//!     fast_interval_ms: 250
//!     down_interval_ms: 2000
//!     jitter_percent: 10
//!     flap: { threshold: 4, window_ms: 60000, hold_down_ms: 30000, max_hold_down_ms: 600000 }
//! ```

use dlb::model::ValidationError;
use dlb::proto;
use serde::Deserialize;

/// The YAML path of a validator field under `policy.`: the `flap_*` fields of the wire message
/// are written `flap: { threshold, window_ms, hold_down_ms, max_hold_down_ms }` in YAML.
pub(crate) fn yaml_field(field: &str) -> String {
    match field.strip_prefix("health_check.flap_") {
        Some(rest) => format!("health_check.flap.{rest}"),
        None => field.to_owned(),
    }
}

/// `policy.health_check` as written in YAML.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    http: Option<RawHttp>,
    tcp: Option<RawTcp>,
    grpc: Option<RawGrpc>,
    interval_ms: Option<u32>,
    timeout_ms: Option<u32>,
    healthy_threshold: Option<u32>,
    unhealthy_threshold: Option<u32>,
    fast_interval_ms: Option<u32>,
    down_interval_ms: Option<u32>,
    jitter_percent: Option<u32>,
    flap: Option<RawFlap>,
    port: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    method: Option<String>,
    path: Option<String>,
    host: Option<String>,
    #[serde(default)]
    expected_statuses: Vec<String>,
    body_contains: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    send: Option<String>,
    expect: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpc {
    service: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlap {
    threshold: Option<u32>,
    window_ms: Option<u32>,
    hold_down_ms: Option<u32>,
    max_hold_down_ms: Option<u32>,
}

/// Parses a status range: `"200-299"` or `"204"`.
pub fn parse_status_range(s: &str) -> Result<proto::StatusRange, ValidationError> {
    let bad = || {
        ValidationError::new(
            "policy.health_check.http.expected_statuses",
            s,
            "each entry must be a status (\"204\") or a range (\"200-299\")",
        )
    };
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (s.trim(), s.trim()),
    };
    Ok(proto::StatusRange {
        start: a.parse().map_err(|_| bad())?,
        end: b.parse().map_err(|_| bad())?,
    })
}

impl RawHealthCheck {
    /// The wire message (not yet validated: `validate_policy` does that).
    pub fn to_proto(&self) -> Result<proto::HealthCheck, ValidationError> {
        use proto::health_check::Kind;
        let kinds = [self.http.is_some(), self.tcp.is_some(), self.grpc.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(ValidationError::new(
                "policy.health_check.kind",
                "<several or none>",
                "exactly one of http, tcp, grpc must be set",
            ));
        }
        let kind = if let Some(h) = &self.http {
            Kind::Http(proto::HttpHealthCheck {
                method: h.method.clone().unwrap_or_default(),
                path: h.path.clone().unwrap_or_default(),
                host: h.host.clone().unwrap_or_default(),
                expected_statuses: h
                    .expected_statuses
                    .iter()
                    .map(|s| parse_status_range(s))
                    .collect::<Result<_, _>>()?,
                body_contains: h.body_contains.clone().unwrap_or_default(),
            })
        } else if let Some(t) = &self.tcp {
            Kind::Tcp(proto::TcpHealthCheck {
                send: t.send.clone().unwrap_or_default().into_bytes(),
                expect_prefix: t.expect.clone().unwrap_or_default().into_bytes(),
            })
        } else {
            Kind::Grpc(proto::GrpcHealthCheck {
                service: self
                    .grpc
                    .as_ref()
                    .and_then(|g| g.service.clone())
                    .unwrap_or_default(),
            })
        };
        let flap = self.flap.as_ref();
        Ok(proto::HealthCheck {
            kind: Some(kind),
            interval_ms: self.interval_ms.unwrap_or(0),
            timeout_ms: self.timeout_ms.unwrap_or(0),
            healthy_threshold: self.healthy_threshold.unwrap_or(0),
            unhealthy_threshold: self.unhealthy_threshold.unwrap_or(0),
            fast_interval_ms: self.fast_interval_ms.unwrap_or(0),
            down_interval_ms: self.down_interval_ms.unwrap_or(0),
            jitter_percent: self.jitter_percent.unwrap_or(0),
            flap_threshold: flap.and_then(|f| f.threshold).unwrap_or(0),
            flap_window_ms: flap.and_then(|f| f.window_ms).unwrap_or(0),
            flap_hold_down_ms: flap.and_then(|f| f.hold_down_ms).unwrap_or(0),
            flap_max_hold_down_ms: flap.and_then(|f| f.max_hold_down_ms).unwrap_or(0),
            port: self.port.unwrap_or(0),
        })
    }
}
