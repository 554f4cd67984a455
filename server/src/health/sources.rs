//! The one place each health source is written: how a verdict becomes a store mutation.
//!
//! A backend's record keeps one slot per health source (`dlb::sources` has the list, the
//! precedence and the one function that derives the effective state and its reason). Four
//! parties write those slots, each through one function here, so the rules of what a write
//! holds sit in one file:
//!
//! | source  | written by                                             | function            |
//! |---------|--------------------------------------------------------|---------------------|
//! | admin   | the seed calls on an unchecked service (`api::registry`) | [`admin`]         |
//! | probe   | the active checker's writer (`active::writer`)         | [`probe`]           |
//! | outlier | the passive task's ejections and returns               | [`ejected`], [`returned`] |
//! | latency | the passive task's adaptive-weight decisions           | [`latency`]         |
//!
//! A new backend starts with admin `HEALTHY` and the other slots unset: the store's plan sets
//! that when it creates the record (the store does not depend on this module).
//!
//! The rules: every `detail` is cut to `dlb::sources::MAX_DETAIL_LEN` bytes (at a character
//! boundary) before it is written, so no source's write is refused for its length; a probe that
//! has no verdict (unknown, or its check was removed) writes an empty state; a returned backend's
//! outlier slot says `HEALTHY` with detail `returned`; a latency share of 100 (or 0) clears the
//! slot in the store's plan (nothing limits the backend). Each function is pure and O(detail).

use dlb::{model, proto, sources::MAX_DETAIL_LEN};

use crate::store::{Mutation, ServerPatch};

/// Detail of an outlier slot whose backend returned.
pub(crate) const RETURNED: &str = "returned";

fn update(id: &str, patch: ServerPatch) -> Mutation {
    Mutation::Update(id.to_owned(), patch)
}

/// At most [`MAX_DETAIL_LEN`] bytes of `detail`, cut at a character boundary.
fn bounded(detail: &str) -> String {
    model::prefix(detail, MAX_DETAIL_LEN).to_owned()
}

/// The operator's verdict (`health_check_passed` → `HEALTHY`, `health_check_failed` →
/// `UNHEALTHY`) in the admin slot of backend `id`.
pub(crate) fn admin(id: &str, verdict: proto::Verdict) -> Mutation {
    update(
        id,
        ServerPatch {
            admin: Some(verdict),
            ..Default::default()
        },
    )
}

/// The probe slot as the checker publishes it: `verdict` with `detail` (cut to
/// [`MAX_DETAIL_LEN`]).
pub(crate) fn probe_state(verdict: proto::Verdict, detail: &str) -> proto::SourceState {
    proto::SourceState {
        verdict: verdict as i32,
        detail: bounded(detail),
    }
}

/// The probe slot of backend `id` set to `state` (from [`probe_state`]; `UNSET` with no detail
/// clears a verdict whose check is gone).
pub(crate) fn probe(id: &str, state: &proto::SourceState) -> Mutation {
    update(
        id,
        ServerPatch {
            probe: Some(state.clone()),
            ..Default::default()
        },
    )
}

/// Outlier detection ejected backend `id`: its outlier slot says `UNHEALTHY` with `detail`
/// (the backend's reason, cut to [`MAX_DETAIL_LEN`]).
pub(crate) fn ejected(id: &str, detail: &str) -> Mutation {
    outlier(id, proto::Verdict::Unhealthy, detail)
}

/// Outlier detection returned backend `id`: its outlier slot says `HEALTHY`, detail
/// [`RETURNED`].
pub(crate) fn returned(id: &str) -> Mutation {
    outlier(id, proto::Verdict::Healthy, RETURNED)
}

fn outlier(id: &str, verdict: proto::Verdict, detail: &str) -> Mutation {
    update(
        id,
        ServerPatch {
            outlier: Some(proto::SourceState {
                verdict: verdict as i32,
                detail: bounded(detail),
            }),
            ..Default::default()
        },
    )
}

/// An adaptive-weight decision in the latency slot of its backend: the share `percent` of the
/// configured weight, with `detail` (cut to [`MAX_DETAIL_LEN`]). 100 clears the slot.
pub(crate) fn latency(decision: &dlb::adaptive::Decision) -> Mutation {
    update(
        &decision.id,
        ServerPatch {
            latency: Some(proto::LatencyState {
                weight_percent: decision.percent,
                detail: bounded(&decision.detail),
            }),
            ..Default::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(m: Mutation) -> (String, ServerPatch) {
        match m {
            Mutation::Update(id, p) => (id, p),
            other => panic!("not an update: {other:?}"),
        }
    }

    #[test]
    fn each_source_writes_only_its_own_slot() {
        let (id, p) = patch(admin("a", proto::Verdict::Unhealthy));
        assert_eq!(id, "a");
        assert_eq!(
            p,
            ServerPatch {
                admin: Some(proto::Verdict::Unhealthy),
                ..Default::default()
            }
        );
        let state = probe_state(proto::Verdict::Unhealthy, "HTTP 503");
        let (_, p) = patch(probe("a", &state));
        assert_eq!(
            p.probe.as_ref().map(|s| s.detail.as_str()),
            Some("HTTP 503")
        );
        assert_eq!((p.admin, &p.outlier, &p.latency), (None, &None, &None));
        let (_, p) = patch(ejected("a", "5 consecutive errors"));
        let o = p.outlier.expect("outlier slot");
        assert_eq!(o.verdict, proto::Verdict::Unhealthy as i32);
        assert_eq!(o.detail, "5 consecutive errors");
        assert!(p.probe.is_none() && p.admin.is_none());
        let (_, p) = patch(returned("a"));
        let o = p.outlier.expect("outlier slot");
        assert_eq!(o.verdict, proto::Verdict::Healthy as i32);
        assert_eq!(o.detail, RETURNED);
        let (id, p) = patch(latency(&dlb::adaptive::Decision {
            id: "b".into(),
            percent: 25,
            detail: "slow".into(),
        }));
        assert_eq!(id, "b");
        let l = p.latency.expect("latency slot");
        assert_eq!((l.weight_percent, l.detail.as_str()), (25, "slow"));
    }

    #[test]
    fn details_are_cut_to_the_limit_at_a_character_boundary() {
        // 'é' is two bytes: an odd limit would fall inside one.
        let long = "é".repeat(MAX_DETAIL_LEN);
        let s = probe_state(proto::Verdict::Unhealthy, &long);
        assert!(s.detail.len() <= MAX_DETAIL_LEN);
        assert!(s.detail.len() >= MAX_DETAIL_LEN - 1);
        let (_, p) = patch(ejected("a", &long));
        assert!(p.outlier.expect("slot").detail.len() <= MAX_DETAIL_LEN);
        let (_, p) = patch(latency(&dlb::adaptive::Decision {
            id: "a".into(),
            percent: 10,
            detail: long,
        }));
        assert!(p.latency.expect("slot").detail.len() <= MAX_DETAIL_LEN);
    }
}
