//! Sticky sessions (affinity across rebuilds, strict vs fallback, TTL, LRU) and the typed
//! build and pick errors.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use dlb::balance::{
    Algorithm, BackendSpec, BuildError, PickError, Picker, PolicyConfig, StickyConfig, StickyMode,
    StickyTable,
};

fn spec(id: usize, weight: u32, eligible: bool) -> BackendSpec {
    BackendSpec {
        id: format!("b{id}"),
        address: format!("10.0.0.{id}:80"),
        weight,
        hash_key: None,
        eligible,
    }
}

fn specs(ids: impl IntoIterator<Item = usize>) -> Vec<BackendSpec> {
    ids.into_iter().map(|i| spec(i, 1, true)).collect()
}

fn table(mode: StickyMode, ttl_secs: u64, max_entries: usize) -> StickyTable {
    StickyTable::new(StickyConfig {
        mode,
        ttl: Duration::from_secs(ttl_secs),
        max_entries,
    })
}

const ALL: [Algorithm; 5] = [
    Algorithm::RoundRobin,
    Algorithm::LeastConnExact,
    Algorithm::LeastConnP2c,
    Algorithm::Maglev,
    Algorithm::RingHash,
];

#[test]
fn binding_survives_unrelated_backend_changes() {
    for algo in ALL {
        let policy = PolicyConfig::new(algo);
        let t = table(StickyMode::Strict, 60, 1000);
        let now = Instant::now();
        let p1 = Picker::build(&policy, &specs(0..10)).unwrap();
        let bound: Vec<String> = (0..50u32)
            .map(|s| {
                t.pick(&p1, &s.to_le_bytes(), now)
                    .unwrap()
                    .backend()
                    .id()
                    .to_owned()
            })
            .collect();
        // Rebuild: add five backends, remove every backend nobody is bound to, reweigh.
        let keep: std::collections::BTreeSet<usize> =
            bound.iter().map(|id| id[1..].parse().unwrap()).collect();
        let mut s2: Vec<_> = keep.iter().map(|&i| spec(i, 3, true)).collect();
        s2.extend((10..15).map(|i| spec(i, 1, true)));
        let p2 = p1.rebuild(&policy, &s2).unwrap();
        for (s, id) in (0..50u32).zip(&bound) {
            let later = now + Duration::from_secs(30);
            let g = t.pick(&p2, &s.to_le_bytes(), later).unwrap();
            assert_eq!(g.backend().id(), id, "{algo:?}");
        }
        assert_eq!(t.len(), 50);
    }
}

#[test]
fn strict_fails_and_fallback_rebinds_when_the_backend_is_gone() {
    let policy = PolicyConfig::new(Algorithm::Maglev);
    let now = Instant::now();
    let p1 = Picker::build(&policy, &specs(0..5)).unwrap();
    for mode in [StickyMode::Strict, StickyMode::Fallback] {
        let t = table(mode, 60, 100);
        let first = t
            .pick(&p1, b"session", now)
            .unwrap()
            .backend()
            .id()
            .to_owned();
        let idx: usize = first[1..].parse().unwrap();
        // Gone: removed. Then: ineligible.
        let removed = p1
            .rebuild(&policy, &specs((0..5).filter(|&i| i != idx)))
            .unwrap();
        let mut s = specs(0..5);
        s[idx].eligible = false;
        let ineligible = p1.rebuild(&policy, &s).unwrap();
        for p in [&removed, &ineligible] {
            match mode {
                StickyMode::Strict => {
                    let e = t.pick(p, b"session", now).unwrap_err();
                    assert_eq!(e, PickError::StickyBackendUnavailable(first.clone()));
                }
                StickyMode::Fallback => {
                    let g = t.pick(p, b"session", now).unwrap();
                    // Rebound to the consistent-hash choice for the session key.
                    let expect = p.pick(Some(b"session")).unwrap().backend().id().to_owned();
                    assert_eq!(g.backend().id(), expect);
                    assert_ne!(g.backend().id(), first);
                    drop(g);
                    // The new binding sticks, even when the old backend comes back.
                    let back = t.pick(&p1, b"session", now).unwrap();
                    assert_eq!(back.backend().id(), expect);
                    drop(back);
                    // Rebind the session to its original backend for the next round.
                    t.remove(b"session");
                    assert_eq!(t.pick(&p1, b"session", now).unwrap().backend().id(), first);
                }
            }
        }
        // Strict: the backend returns and the binding works again.
        assert_eq!(t.pick(&p1, b"session", now).unwrap().backend().id(), first);
    }
}

#[test]
fn ttl_expires_idle_bindings() {
    let policy = PolicyConfig::new(Algorithm::RoundRobin);
    let t = table(StickyMode::Strict, 10, 100);
    let t0 = Instant::now();
    let p1 = Picker::build(&policy, &specs(0..4)).unwrap();
    let first = t.pick(&p1, b"s", t0).unwrap().backend().id().to_owned();
    let p2 = Picker::build(
        &policy,
        &specs(0..4)
            .into_iter()
            .filter(|b| b.id != first)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    // Used at t0 + 9 s: still bound (strict error), and the use does not refresh a failing
    // binding.
    assert!(t.pick(&p2, b"s", t0 + Duration::from_secs(9)).is_err());
    // Still alive at 9 s via a successful pick on p1, which refreshes it.
    assert_eq!(
        t.pick(&p1, b"s", t0 + Duration::from_secs(9))
            .unwrap()
            .backend()
            .id(),
        first
    );
    assert!(t.binding(b"s", t0 + Duration::from_secs(18)).is_some());
    // Idle for 10 s: expired; the session binds afresh.
    assert!(t.binding(b"s", t0 + Duration::from_secs(19)).is_none());
    let g = t.pick(&p2, b"s", t0 + Duration::from_secs(19)).unwrap();
    assert_ne!(g.backend().id(), first);
    assert_eq!(t.len(), 1);
}

#[test]
fn lru_eviction_at_max_entries() {
    let policy = PolicyConfig::new(Algorithm::RingHash);
    let t = table(StickyMode::Strict, 3600, 3);
    let now = Instant::now();
    let p = Picker::build(&policy, &specs(0..4)).unwrap();
    for s in [b"a", b"b", b"c"] {
        drop(t.pick(&p, s, now).unwrap());
    }
    assert_eq!(t.len(), 3);
    // Touch "a": "b" is now the least recently used.
    drop(t.pick(&p, b"a", now).unwrap());
    drop(t.pick(&p, b"d", now).unwrap());
    assert_eq!(t.len(), 3);
    assert!(t.binding(b"a", now).is_some());
    assert!(t.binding(b"b", now).is_none());
    assert!(t.binding(b"c", now).is_some());
    assert!(t.binding(b"d", now).is_some());
}

#[test]
fn large_tables_stay_bounded() {
    let policy = PolicyConfig::new(Algorithm::Maglev);
    let t = table(StickyMode::Fallback, 3600, 10_000);
    let now = Instant::now();
    let p = Picker::build(&policy, &specs(0..8)).unwrap();
    for s in 0..30_000u32 {
        drop(t.pick(&p, &s.to_le_bytes(), now).unwrap());
    }
    assert_eq!(t.len(), 10_000);
    assert!(!t.is_empty());
}

#[test]
fn sticky_picks_are_counted_and_released() {
    let policy = PolicyConfig::new(Algorithm::LeastConnExact);
    let t = table(StickyMode::Strict, 60, 10);
    let now = Instant::now();
    let p = Picker::build(&policy, &specs(0..3)).unwrap();
    let g1 = t.pick(&p, b"x", now).unwrap();
    let g2 = t.pick(&p, b"x", now).unwrap();
    assert_eq!(g1.backend().id(), g2.backend().id());
    assert_eq!(g1.backend().load().in_flight(), 2);
    // Least connections avoids the sticky backend for other work.
    let other = p.pick(None).unwrap();
    assert_ne!(other.backend().id(), g1.backend().id());
    drop((g1, g2, other));
    assert!(p.backends().iter().all(|b| b.load().in_flight() == 0));
}

#[test]
fn build_errors() {
    for algo in ALL {
        let policy = PolicyConfig::new(algo);
        let e = Picker::build(&policy, &[spec(0, 0, true)]).unwrap_err();
        assert_eq!(
            e,
            BuildError::InvalidWeight {
                id: "b0".into(),
                weight: 0
            }
        );
        let e = Picker::build(&policy, &[spec(0, 10_001, true)]).unwrap_err();
        assert!(matches!(
            e,
            BuildError::InvalidWeight { weight: 10_001, .. }
        ));
        let e = Picker::build(&policy, &[spec(0, 1, true), spec(0, 2, true)]).unwrap_err();
        assert_eq!(e, BuildError::DuplicateId("b0".into()));
        let mut s = spec(0, 1, true);
        s.id.clear();
        assert_eq!(
            Picker::build(&policy, &[s]).unwrap_err(),
            BuildError::EmptyId
        );
        for c in [0.5, f64::NAN, f64::INFINITY, -1.0] {
            let mut bad = policy;
            bad.bounded_load_factor = Some(c);
            assert!(matches!(
                Picker::build(&bad, &specs(0..2)).unwrap_err(),
                BuildError::InvalidLoadFactor(_)
            ));
        }
    }
    let many: Vec<_> = (0..(1 << 16)).map(|i| spec(i, 1, true)).collect();
    assert!(matches!(
        Picker::build(&PolicyConfig::new(Algorithm::RoundRobin), &many).unwrap_err(),
        BuildError::TooLarge(_)
    ));
}

#[test]
fn pick_errors() {
    let now = Instant::now();
    for algo in ALL {
        for bounded in [None, Some(1.25)] {
            let mut policy = PolicyConfig::new(algo);
            policy.bounded_load_factor = bounded;
            let empty = Picker::build(&policy, &[]).unwrap();
            assert_eq!(empty.pick(None).unwrap_err(), PickError::NoBackends);
            assert_eq!(empty.pick(Some(b"k")).unwrap_err(), PickError::NoBackends);
            let none = Picker::build(&policy, &[spec(0, 1, false), spec(1, 5, false)]).unwrap();
            assert_eq!(none.pick(None).unwrap_err(), PickError::NoEligibleBackends);
            assert_eq!(
                none.pick(Some(b"k")).unwrap_err(),
                PickError::NoEligibleBackends
            );
            assert!(none.pick_id("b0").is_none());
            assert_eq!(none.eligible_count(), 0);
            let t = table(StickyMode::Fallback, 60, 10);
            assert_eq!(
                t.pick(&none, b"s", now).unwrap_err(),
                PickError::NoEligibleBackends
            );
            assert!(t.is_empty());
        }
    }
}

#[test]
fn owned_picks_outlive_the_picker_handle() {
    let p = std::sync::Arc::new(
        Picker::build(&PolicyConfig::new(Algorithm::LeastConnExact), &specs(0..2)).unwrap(),
    );
    let owned = p.pick_owned(None).unwrap();
    let load = owned.backend().load().clone();
    assert_eq!(load.in_flight(), 1);
    drop(p);
    let handle = std::thread::spawn(move || drop(owned));
    handle.join().unwrap();
    assert_eq!(load.in_flight(), 0);
}
