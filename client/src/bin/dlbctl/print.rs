//! What `dlbctl` prints: the text and JSON forms of servers, versions, policies, panic states
//! and xDS clients, shared by the subcommands and `watch`.

use std::collections::BTreeMap;

use dlb::model;
use dlb::proto;
use serde_json::{json, Value};

use crate::{adaptive, call};

/// A policy's slow start and circuit breaker, as text (0 = the default, see dlb.proto).
pub(crate) fn sdk_health_text(p: &proto::Policy) -> String {
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

/// The outlier and panic parts of a policy, as text.
pub(crate) fn health_text(p: &proto::Policy) -> String {
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
pub(crate) fn panic_text(p: Option<proto::PanicState>) -> String {
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
pub(crate) fn panic_json(p: Option<proto::PanicState>) -> Value {
    let p = p.unwrap_or_default();
    json!({"active": p.active, "eligible": p.eligible, "total": p.total,
           "mode": dlb::health_policy::panic_mode_name(p.mode)})
}

pub(crate) fn health_name(h: i32) -> &'static str {
    if h == proto::HealthStatus::Unhealthy as i32 {
        "unhealthy"
    } else {
        "healthy"
    }
}

pub(crate) fn version_json(v: Option<proto::Version>) -> Value {
    let v = v.unwrap_or_default();
    json!({"epoch": v.epoch, "version": v.version})
}

pub(crate) fn version_text(v: Option<proto::Version>) -> String {
    dlb_client::Version::from(v.unwrap_or_default()).to_string()
}

pub(crate) fn server_json(s: &proto::Server) -> Value {
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
        "locality": crate::locality::json(s.locality.as_ref()),
        "priority": s.priority,
    })
}

pub(crate) fn server_text(s: &proto::Server) -> String {
    let mut out = format!("{} {} w={}", s.server_id, s.address, s.weight);
    if s.effective_weight != 0 && s.effective_weight != s.weight {
        out.push_str(&format!(" (effective {})", s.effective_weight));
    }
    out.push_str(&crate::locality::text(s.locality.as_ref(), s.priority));
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

pub(crate) fn policy_json(p: &proto::Policy) -> Value {
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
        "locality": crate::locality::policy_json(p),
    })
}

pub(crate) fn policy_text(p: &proto::Policy) -> String {
    format!(
        "algorithm={} bounded_load={} sticky={} sticky_ttl={} sticky_max={} {} {} {} {}{}",
        model::algorithm_name(p.algorithm),
        p.bounded_load_factor,
        model::sticky_mode_name(p.sticky_mode),
        p.sticky_ttl_seconds,
        p.sticky_max_entries,
        health_text(p),
        sdk_health_text(p),
        adaptive::text(p),
        call::text(p),
        crate::locality::policy_text(p)
    )
}

pub(crate) fn print_server_response(json_out: bool, verb: &str, r: &proto::ServerResponse) {
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

/// Prints `dlbctl xds-clients`.
pub(crate) fn print_xds_clients(j: bool, r: &dlb::proto::ListXdsClientsResponse) {
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
