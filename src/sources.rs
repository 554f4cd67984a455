//! Backend state from separate sources, and the one function that derives the effective state.
//!
//! A backend's eligibility is decided by several parties that must not overwrite each other:
//!
//! * **admin** — the operator: `health_check_failed` / `health_check_passed` (the seed API), plus
//!   the `draining` flag and the configured `weight`;
//! * **probe** — active health checks run by `dlbd`;
//! * **outlier** — passive ejection decided from the SDKs' call outcomes;
//! * **latency** — adaptive weights: a share of the configured weight for a backend much slower
//!   than its service's median ([`crate::adaptive`]). It never makes a backend ineligible.
//!
//! Each source's verdict is kept in its own slot of [`proto::HealthSources`]; [`effective`] is the
//! only place that combines them. **Precedence** (first match is the primary reason; every cause
//! that applies is listed in the reason, in this order, joined by `"; "`):
//!
//! 1. admin `UNHEALTHY` → unhealthy, reason `admin: health_check_failed`;
//! 2. outlier `UNHEALTHY` → unhealthy, reason `outlier: <detail>`;
//! 3. probe `UNHEALTHY` → unhealthy, reason `probe: <detail>`;
//! 4. `draining` → ineligible but healthy, reason `draining`;
//! 5. latency `weight_percent` p in 1..=99 → still eligible, effective weight
//!    `max(1, ⌈weight × p / 100⌉)` (never 0), reason `latency: <detail>`.
//!
//! A `HEALTHY` verdict never overrides another source's `UNHEALTHY`: the operator can take a
//! backend out, not force it in against a failing probe. With no unhealthy source, no drain and
//! no latency share the backend is eligible at its configured weight and the reason is empty. The function is pure
//! and O(length of the details). [`is_eligible`] reads the stored result back: whether a stamped
//! backend may receive new picks (the policy modules and the model all ask it here).

use crate::proto;

/// Whether a stored backend may receive new picks: its effective health (derived from its
/// sources by [`stamp`]) is not unhealthy and it is not draining.
pub fn is_eligible(server: &proto::Server) -> bool {
    server.health != proto::HealthStatus::Unhealthy as i32 && !server.draining
}

/// Longest `detail` a source may store, in bytes.
pub const MAX_DETAIL_LEN: usize = 256;

/// The state a backend's sources add up to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    /// Whether the backend may receive new picks.
    pub eligible: bool,
    /// `UNHEALTHY` when any source says so (a draining backend stays `HEALTHY`).
    pub health: proto::HealthStatus,
    /// The weight pickers use.
    pub weight: u32,
    /// Why the backend is not eligible (or what limits it); empty when nothing does.
    pub reason: String,
}

fn unhealthy(state: Option<&proto::SourceState>) -> Option<&proto::SourceState> {
    state.filter(|s| s.verdict == proto::Verdict::Unhealthy as i32)
}

fn cause(source: &str, state: &proto::SourceState) -> String {
    if state.detail.is_empty() {
        format!("{source}: unhealthy")
    } else {
        format!("{source}: {}", state.detail)
    }
}

/// Derives the effective state of a backend from its sources. See the module docs for the
/// precedence.
pub fn effective(server: &proto::Server) -> Effective {
    let sources = server.sources.clone().unwrap_or_default();
    let mut causes: Vec<String> = Vec::new();
    if sources.admin == proto::Verdict::Unhealthy as i32 {
        causes.push("admin: health_check_failed".to_owned());
    }
    if let Some(s) = unhealthy(sources.outlier.as_ref()) {
        causes.push(cause("outlier", s));
    }
    if let Some(s) = unhealthy(sources.probe.as_ref()) {
        causes.push(cause("probe", s));
    }
    let health = if causes.is_empty() {
        proto::HealthStatus::Healthy
    } else {
        proto::HealthStatus::Unhealthy
    };
    if server.draining {
        causes.push("draining".to_owned());
    }
    let eligible = causes.is_empty();
    let percent = crate::adaptive::weight_percent(server);
    let mut weight = server.weight;
    if percent < 100 {
        weight = crate::adaptive::scaled(server.weight, percent);
        let detail = sources.latency.as_ref().map_or("", |l| l.detail.as_str());
        causes.push(if detail.is_empty() {
            format!("latency: weight {percent} %")
        } else {
            format!("latency: {detail}")
        });
    }
    Effective {
        eligible,
        health,
        weight,
        reason: causes.join("; "),
    }
}

/// Writes the effective state into the record's derived fields (`health`, `reason`,
/// `effective_weight`; 0 when equal to `weight`). The store calls it on every record it commits,
/// so what is stored and pushed always agrees with the sources.
pub fn stamp(server: &mut proto::Server) {
    let e = effective(server);
    server.health = e.health as i32;
    server.reason = e.reason;
    server.effective_weight = if e.weight == server.weight {
        0
    } else {
        e.weight
    };
}

/// The weight a picker should use for a stored record.
pub fn picker_weight(server: &proto::Server) -> u32 {
    if server.effective_weight == 0 {
        server.weight
    } else {
        server.effective_weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(admin: proto::Verdict, probe: proto::Verdict, draining: bool) -> proto::Server {
        proto::Server {
            server_id: "a".into(),
            address: "10.0.0.1:80".into(),
            weight: 3,
            draining,
            sources: Some(proto::HealthSources {
                admin: admin as i32,
                probe: Some(proto::SourceState {
                    verdict: probe as i32,
                    detail: "HTTP 503".into(),
                }),
                outlier: None,
                latency: None,
            }),
            ..Default::default()
        }
    }

    use proto::Verdict::{Healthy as H, Unhealthy as U, Unset as N};

    #[test]
    fn nothing_said_is_eligible_with_no_reason() {
        let e = effective(&backend(N, N, false));
        assert!(e.eligible);
        assert_eq!(e.health, proto::HealthStatus::Healthy);
        assert_eq!(e.reason, "");
        assert_eq!(e.weight, 3);
        // No sources at all (an old record) behaves the same.
        let bare = proto::Server {
            weight: 1,
            ..Default::default()
        };
        assert!(effective(&bare).eligible);
    }

    #[test]
    fn admin_failed_beats_probe_healthy() {
        let e = effective(&backend(U, H, false));
        assert!(!e.eligible);
        assert_eq!(e.health, proto::HealthStatus::Unhealthy);
        assert_eq!(e.reason, "admin: health_check_failed");
    }

    #[test]
    fn admin_passed_does_not_override_probe_unhealthy() {
        let e = effective(&backend(H, U, false));
        assert!(!e.eligible);
        assert_eq!(e.reason, "probe: HTTP 503");
    }

    #[test]
    fn draining_is_ineligible_but_healthy() {
        let e = effective(&backend(N, H, true));
        assert!(!e.eligible);
        assert_eq!(e.health, proto::HealthStatus::Healthy);
        assert_eq!(e.reason, "draining");
    }

    #[test]
    fn every_cause_is_listed_in_precedence_order() {
        let mut b = backend(U, U, true);
        b.sources.as_mut().expect("set").outlier = Some(proto::SourceState {
            verdict: U as i32,
            detail: String::new(),
        });
        let e = effective(&b);
        assert_eq!(
            e.reason,
            "admin: health_check_failed; outlier: unhealthy; probe: HTTP 503; draining"
        );
        assert_eq!(e.health, proto::HealthStatus::Unhealthy);
    }

    #[test]
    fn a_latency_share_lowers_the_weight_not_eligibility() {
        let mut b = backend(N, N, false);
        b.weight = 8;
        b.sources.as_mut().expect("set").latency = Some(proto::LatencyState {
            weight_percent: 25,
            detail: "mean 84 ms vs service median 9.0 ms (weight 25 %)".into(),
        });
        let e = effective(&b);
        assert!(e.eligible);
        assert_eq!(e.health, proto::HealthStatus::Healthy);
        assert_eq!(e.weight, 2);
        assert_eq!(
            e.reason,
            "latency: mean 84 ms vs service median 9.0 ms (weight 25 %)"
        );
        stamp(&mut b);
        assert_eq!(b.effective_weight, 2);
        // Never 0: 1 % of weight 1 is 1. And after the other causes, still listed.
        b.weight = 1;
        b.sources.as_mut().expect("set").latency = Some(proto::LatencyState {
            weight_percent: 1,
            detail: String::new(),
        });
        b.draining = true;
        let e = effective(&b);
        assert_eq!(e.weight, 1);
        assert!(!e.eligible);
        assert_eq!(e.reason, "draining; latency: weight 1 %");
        // 100 (or 0) is full weight, no reason.
        b.draining = false;
        b.sources.as_mut().expect("set").latency = Some(proto::LatencyState {
            weight_percent: 100,
            detail: "x".into(),
        });
        assert_eq!(effective(&b).reason, "");
    }

    #[test]
    fn stamp_writes_derived_fields() {
        let mut b = backend(U, N, false);
        b.health = proto::HealthStatus::Healthy as i32;
        stamp(&mut b);
        assert_eq!(b.health, proto::HealthStatus::Unhealthy as i32);
        assert_eq!(b.reason, "admin: health_check_failed");
        assert_eq!(b.effective_weight, 0);
        assert_eq!(picker_weight(&b), 3);
    }
}
