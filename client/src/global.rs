//! Global least connections and panic events in the SDK.
//!
//! * `GlobalLoad` pushes carry the in-flight counts of every *other* SDK session per backend;
//!   [`apply_baselines`] stores them as each backend's baseline, so least connections (and
//!   bounded load) compare `this process's live count + the others'` (`BackendLoad::load`).
//!   Baselines live in the backends' shared `BackendLoad`s, which survive picker rebuilds by
//!   id; backends new to a picker get them when it is built.
//! * Panic: the picker decides panic from the records it is built from, exactly as `dlbd` does
//!   (see `dlb::balance::panic`); [`panic_event`] logs entering and leaving it and counts the
//!   transitions (`ServiceStats::panic_transitions`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use dlb::balance::{PanicState, Picker};

use crate::state::ServiceState;

/// Largest pushed count accepted for one backend (the control plane clamps each session's
/// report to 1,000,000; this bounds what a faulty control plane can make a pick believe).
pub(crate) const MAX_OTHERS_IN_FLIGHT: u64 = 1 << 40;

/// Sets every backend's baseline to the others' count (0 when absent) and refreshes the exact
/// least-connections tree. O(n log n) at worst.
pub(crate) fn apply_baselines(picker: &Picker, others: &HashMap<String, u64>) {
    for b in picker.backends() {
        b.load()
            .set_baseline(others.get(b.id()).copied().unwrap_or(0));
    }
    picker.refresh_loads();
}

/// Logs and counts a change of panic state between the previous picker (`None`: none) and the
/// new one.
pub(crate) fn panic_event(state: &ServiceState, before: Option<PanicState>, after: PanicState) {
    let was = before.is_some_and(|p| p.active);
    if was == after.active {
        return;
    }
    state
        .stats
        .panic_transitions
        .fetch_add(1, Ordering::Relaxed);
    if after.active {
        tracing::warn!(service = %state.name, eligible = after.eligible, total = after.total,
            mode = ?after.mode, "service entered panic");
    } else {
        tracing::info!(service = %state.name, eligible = after.eligible, total = after.total,
            "service left panic");
    }
}
