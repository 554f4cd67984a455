//! Active health check configuration: validation and defaults of [`proto::HealthCheck`].
//!
//! The wire message leaves every number optional (0 = default); [`resolve`] turns a validated
//! message into [`CheckSpec`], the plain values `dlbd`'s checker runs on. [`validate`] is called
//! by `model::validate_policy`, so the YAML config, `SetPolicy` and `dlbctl` reject the
//! same mistakes with the same field names. Both are O(size of the message).

use std::time::Duration;

use crate::proto;
use crate::validation::ValidationError;

/// Default time between probes of a stable healthy backend.
pub const DEFAULT_INTERVAL_MS: u32 = 5_000;
/// Default probe timeout.
pub const DEFAULT_TIMEOUT_MS: u32 = 1_000;
/// Default rise (consecutive passes to become healthy).
pub const DEFAULT_RISE: u32 = 2;
/// Default fall (consecutive failures to become unhealthy).
pub const DEFAULT_FALL: u32 = 3;
/// Default flap counting window.
pub const DEFAULT_FLAP_WINDOW_MS: u32 = 60_000;
/// Default first hold-down of a flapping backend.
pub const DEFAULT_FLAP_HOLD_DOWN_MS: u32 = 30_000;
/// Default longest hold-down.
pub const DEFAULT_FLAP_MAX_HOLD_DOWN_MS: u32 = 600_000;
/// Bounds of an interval, milliseconds.
pub const INTERVAL_RANGE_MS: std::ops::RangeInclusive<u32> = 10..=3_600_000;
/// Longest flap window, hold-down and max hold-down, milliseconds (one hour).
pub const MAX_FLAP_MS: u32 = 3_600_000;
/// Longest `send` / `expect_prefix` / `body_contains`, bytes.
pub const MAX_PAYLOAD: usize = 1_024;
/// How much of an HTTP body is searched for `body_contains`.
pub const MAX_BODY_READ: usize = 64 * 1024;

/// What a probe does, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// An HTTP/1.1 request over a fresh connection.
    Http {
        /// Request method.
        method: String,
        /// Path and query.
        path: String,
        /// Host header; `None` means the backend's address.
        host: Option<String>,
        /// Passing statuses, inclusive ranges.
        expected: Vec<(u16, u16)>,
        /// A string the body must contain.
        body_contains: Option<String>,
    },
    /// A TCP connect, optionally a send and a reply prefix.
    Tcp {
        /// Bytes to send after connecting.
        send: Vec<u8>,
        /// The reply's expected first bytes.
        expect_prefix: Vec<u8>,
    },
    /// `grpc.health.v1.Health/Check`.
    Grpc {
        /// The service name asked about.
        service: String,
    },
}

/// A validated health check with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    /// What a probe does.
    pub kind: ProbeKind,
    /// Interval of a stable healthy backend.
    pub interval: Duration,
    /// Probe timeout.
    pub timeout: Duration,
    /// Interval while between states.
    pub fast_interval: Duration,
    /// Interval while unhealthy.
    pub down_interval: Duration,
    /// ± percent of jitter on every delay.
    pub jitter_percent: u32,
    /// Consecutive passes to become healthy.
    pub rise: u32,
    /// Consecutive failures to become unhealthy.
    pub fall: u32,
    /// Flap damping: transitions within `flap_window` beyond which a backend is held out; 0 = off.
    pub flap_threshold: u32,
    /// Flap counting window.
    pub flap_window: Duration,
    /// First hold-down.
    pub flap_hold_down: Duration,
    /// Longest hold-down.
    pub flap_max_hold_down: Duration,
    /// Port override (0: the backend's port).
    pub port: u16,
}

fn or(v: u32, default: u32) -> u32 {
    if v == 0 {
        default
    } else {
        v
    }
}

fn ms(v: u32) -> Duration {
    Duration::from_millis(u64::from(v))
}

fn err(field: &str, value: impl std::fmt::Display, rule: &str) -> ValidationError {
    ValidationError::new(format!("policy.health_check.{field}"), value, rule)
}

/// A byte allowed in a probe's path and Host header: printable ASCII, no space.
fn visible_ascii(b: u8) -> bool {
    b.is_ascii_graphic()
}

/// The shortest of the interval, fast interval and down interval (each defaulting to the
/// interval): a probe's timeout must fit in it.
fn shortest_interval(hc: &proto::HealthCheck) -> u32 {
    let interval = or(hc.interval_ms, DEFAULT_INTERVAL_MS);
    interval
        .min(or(hc.fast_interval_ms, interval))
        .min(or(hc.down_interval_ms, interval))
}

/// Checks a health check as it would be stored; errors name the field
/// (`policy.health_check.interval_ms`, …).
pub fn validate(hc: &proto::HealthCheck) -> Result<(), ValidationError> {
    use proto::health_check::Kind;
    for (field, v) in [
        ("interval_ms", hc.interval_ms),
        ("fast_interval_ms", hc.fast_interval_ms),
        ("down_interval_ms", hc.down_interval_ms),
    ] {
        if v != 0 && !INTERVAL_RANGE_MS.contains(&v) {
            return Err(err(
                field,
                v,
                "must be 0 (default) or between 10 and 3600000",
            ));
        }
    }
    let shortest = shortest_interval(hc);
    let timeout = or(hc.timeout_ms, DEFAULT_TIMEOUT_MS.min(shortest));
    if timeout > shortest {
        return Err(err(
            "timeout_ms",
            timeout,
            "must be at most the interval, fast_interval_ms and down_interval_ms",
        ));
    }
    for (field, v) in [
        ("flap_window_ms", hc.flap_window_ms),
        ("flap_hold_down_ms", hc.flap_hold_down_ms),
        ("flap_max_hold_down_ms", hc.flap_max_hold_down_ms),
    ] {
        if v > MAX_FLAP_MS {
            return Err(err(field, v, "must be at most 3600000 (one hour)"));
        }
    }
    for (field, v) in [
        ("healthy_threshold", hc.healthy_threshold),
        ("unhealthy_threshold", hc.unhealthy_threshold),
        ("flap_threshold", hc.flap_threshold),
    ] {
        if v > 100 {
            return Err(err(field, v, "must be at most 100"));
        }
    }
    if hc.jitter_percent > 50 {
        return Err(err(
            "jitter_percent",
            hc.jitter_percent,
            "must be at most 50",
        ));
    }
    let hold = or(hc.flap_hold_down_ms, DEFAULT_FLAP_HOLD_DOWN_MS);
    let max_hold = or(
        hc.flap_max_hold_down_ms,
        DEFAULT_FLAP_MAX_HOLD_DOWN_MS.max(hold),
    );
    if max_hold < hold {
        return Err(err(
            "flap_max_hold_down_ms",
            max_hold,
            "must be at least flap_hold_down_ms",
        ));
    }
    if hc.port > u32::from(u16::MAX) {
        return Err(err(
            "port",
            hc.port,
            "must be 0 (the backend's) or 1..=65535",
        ));
    }
    match &hc.kind {
        None => return Err(err("kind", "<unset>", "one of http, tcp, grpc must be set")),
        Some(Kind::Http(h)) => {
            if !h.method.is_empty()
                && (h.method.len() > 16 || !h.method.bytes().all(|b| b.is_ascii_uppercase()))
            {
                return Err(err(
                    "http.method",
                    &h.method,
                    "must be an upper-case HTTP method",
                ));
            }
            if !h.path.is_empty()
                && (!h.path.starts_with('/')
                    || h.path.len() > MAX_PAYLOAD
                    || !h.path.bytes().all(visible_ascii))
            {
                return Err(err(
                    "http.path",
                    h.path.escape_default(),
                    "must start with '/' and be visible ASCII: no spaces, control characters or \
                     non-ASCII bytes (percent-encode them; at most 1024 bytes)",
                ));
            }
            if h.host.len() > 255 || !h.host.bytes().all(visible_ascii) {
                return Err(err(
                    "http.host",
                    h.host.escape_default(),
                    "must be a host name in visible ASCII, without spaces (IDNA-encode it; at \
                     most 255 bytes)",
                ));
            }
            for r in &h.expected_statuses {
                if !(100..=599).contains(&r.start) || r.end < r.start || r.end > 599 {
                    return Err(err(
                        "http.expected_statuses",
                        format!("{}-{}", r.start, r.end),
                        "each range must be start..=end within 100..=599",
                    ));
                }
            }
            if h.body_contains.len() > MAX_PAYLOAD {
                return Err(err(
                    "http.body_contains",
                    format!("{} bytes", h.body_contains.len()),
                    "must be at most 1024 bytes",
                ));
            }
        }
        Some(Kind::Tcp(t)) => {
            if t.send.len() > MAX_PAYLOAD || t.expect_prefix.len() > MAX_PAYLOAD {
                return Err(err(
                    "tcp",
                    format!("{} / {} bytes", t.send.len(), t.expect_prefix.len()),
                    "send and expect_prefix must be at most 1024 bytes each",
                ));
            }
        }
        Some(Kind::Grpc(g)) => {
            if g.service.len() > 256 {
                return Err(err(
                    "grpc.service",
                    format!("{} bytes", g.service.len()),
                    "must be at most 256 bytes",
                ));
            }
        }
    }
    Ok(())
}

/// Validates `hc` and fills in every default.
pub fn resolve(hc: &proto::HealthCheck) -> Result<CheckSpec, ValidationError> {
    use proto::health_check::Kind;
    validate(hc)?;
    let interval = or(hc.interval_ms, DEFAULT_INTERVAL_MS);
    let hold = or(hc.flap_hold_down_ms, DEFAULT_FLAP_HOLD_DOWN_MS);
    let kind = match &hc.kind {
        Some(Kind::Http(h)) => ProbeKind::Http {
            method: if h.method.is_empty() {
                "GET".to_owned()
            } else {
                h.method.clone()
            },
            path: if h.path.is_empty() {
                "/".to_owned()
            } else {
                h.path.clone()
            },
            host: (!h.host.is_empty()).then(|| h.host.clone()),
            expected: if h.expected_statuses.is_empty() {
                vec![(200, 299)]
            } else {
                // Validated to 100..=599 above.
                h.expected_statuses
                    .iter()
                    .map(|r| (r.start as u16, r.end as u16))
                    .collect()
            },
            body_contains: (!h.body_contains.is_empty()).then(|| h.body_contains.clone()),
        },
        Some(Kind::Tcp(t)) => ProbeKind::Tcp {
            send: t.send.to_vec(),
            expect_prefix: t.expect_prefix.to_vec(),
        },
        Some(Kind::Grpc(g)) => ProbeKind::Grpc {
            service: g.service.clone(),
        },
        None => return Err(err("kind", "<unset>", "one of http, tcp, grpc must be set")),
    };
    Ok(CheckSpec {
        kind,
        interval: ms(interval),
        timeout: ms(or(
            hc.timeout_ms,
            DEFAULT_TIMEOUT_MS.min(shortest_interval(hc)),
        )),
        fast_interval: ms(or(hc.fast_interval_ms, interval)),
        down_interval: ms(or(hc.down_interval_ms, interval)),
        jitter_percent: hc.jitter_percent,
        rise: or(hc.healthy_threshold, DEFAULT_RISE),
        fall: or(hc.unhealthy_threshold, DEFAULT_FALL),
        flap_threshold: hc.flap_threshold,
        flap_window: ms(or(hc.flap_window_ms, DEFAULT_FLAP_WINDOW_MS)),
        flap_hold_down: ms(hold),
        flap_max_hold_down: ms(or(
            hc.flap_max_hold_down_ms,
            DEFAULT_FLAP_MAX_HOLD_DOWN_MS.max(hold),
        )),
        port: u16::try_from(hc.port).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http() -> proto::HealthCheck {
        proto::HealthCheck {
            kind: Some(proto::health_check::Kind::Http(
                proto::HttpHealthCheck::default(),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let s = resolve(&http()).expect("valid");
        assert_eq!(s.interval, Duration::from_secs(5));
        assert_eq!(s.timeout, Duration::from_secs(1));
        assert_eq!((s.rise, s.fall), (2, 3));
        assert_eq!(s.fast_interval, s.interval);
        assert_eq!(
            s.kind,
            ProbeKind::Http {
                method: "GET".into(),
                path: "/".into(),
                host: None,
                expected: vec![(200, 299)],
                body_contains: None
            }
        );
    }

    #[test]
    fn mistakes_name_the_field() {
        let mut hc = http();
        hc.interval_ms = 100;
        hc.timeout_ms = 200;
        let e = validate(&hc).expect_err("timeout > interval");
        assert_eq!(e.field, "policy.health_check.timeout_ms");
        let e = validate(&proto::HealthCheck::default()).expect_err("no kind");
        assert_eq!(e.field, "policy.health_check.kind");
        let mut hc = http();
        if let Some(proto::health_check::Kind::Http(h)) = &mut hc.kind {
            h.expected_statuses.push(proto::StatusRange {
                start: 300,
                end: 200,
            });
        }
        assert_eq!(
            validate(&hc).expect_err("bad range").field,
            "policy.health_check.http.expected_statuses"
        );
        // The timeout fits the fast and down intervals too, by default and when given.
        let mut hc = http();
        hc.fast_interval_ms = 300;
        assert_eq!(
            resolve(&hc).expect("ok").timeout,
            Duration::from_millis(300)
        );
        hc.timeout_ms = 500;
        assert_eq!(
            validate(&hc).expect_err("timeout > fast").field,
            "policy.health_check.timeout_ms"
        );
        hc.fast_interval_ms = 0;
        hc.down_interval_ms = 400;
        assert!(validate(&hc).is_err());
        hc.down_interval_ms = 500;
        assert!(validate(&hc).is_ok());
        // Hold-downs are bounded (u32::MAX ms is 49.7 days).
        let mut hc = http();
        hc.flap_hold_down_ms = u32::MAX;
        hc.flap_max_hold_down_ms = u32::MAX;
        assert_eq!(
            validate(&hc).expect_err("49.7 days").field,
            "policy.health_check.flap_hold_down_ms"
        );
        hc.flap_hold_down_ms = 3_600_000;
        assert_eq!(
            validate(&hc).expect_err("max too").field,
            "policy.health_check.flap_max_hold_down_ms"
        );
        hc.flap_max_hold_down_ms = 3_600_000;
        assert!(validate(&hc).is_ok());
        // Path and Host are visible ASCII: a non-ASCII byte would go out raw.
        for (path, host) in [
            ("/h\u{e9}alth", ""),
            ("/ok", "w\u{e9}b.internal"),
            ("/a b", ""),
        ] {
            let mut hc = http();
            if let Some(proto::health_check::Kind::Http(h)) = &mut hc.kind {
                h.path = path.into();
                h.host = host.into();
            }
            let e = validate(&hc).expect_err("non-ASCII");
            assert!(
                e.field.ends_with(if host.is_empty() {
                    "http.path"
                } else {
                    "http.host"
                }),
                "{e}"
            );
        }
        // A short interval gets a timeout that fits it by default.
        let mut hc = http();
        hc.interval_ms = 100;
        assert_eq!(
            resolve(&hc).expect("ok").timeout,
            Duration::from_millis(100)
        );
    }
}
