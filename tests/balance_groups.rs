//! Grouped pickers (locality): picks spread over groups by shares, fall-through, per-group
//! panic, key stability of the hashing policies, in-flight carried across a regrouping, and
//! `set_shares` racing picks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;

use dlb::balance::{
    Algorithm, BackendSpec, BuildError, Grouping, PanicConfig, PanicMode, PickError, Picker,
    PolicyConfig,
};

fn spec(id: usize, eligible: bool) -> BackendSpec {
    BackendSpec {
        id: format!("b{id}"),
        address: format!("10.0.0.{id}:80"),
        weight: 1,
        hash_key: None,
        eligible,
    }
}

/// `per_group` backends in each of `groups` groups (ids `b0…`, group = id / per_group).
fn grouped(
    algorithm: Algorithm,
    groups: usize,
    per_group: usize,
    eligible: impl Fn(usize) -> bool,
    panic: &[bool],
    config: impl FnOnce(&mut PolicyConfig),
) -> Picker {
    let specs: Vec<BackendSpec> = (0..groups * per_group)
        .map(|i| spec(i, eligible(i)))
        .collect();
    let of: Vec<u16> = (0..groups * per_group)
        .map(|i| (i / per_group) as u16)
        .collect();
    let mut policy = PolicyConfig::new(algorithm);
    config(&mut policy);
    Picker::build_grouped(
        &policy,
        &specs,
        &Grouping {
            of_backend: &of,
            panic,
        },
    )
    .unwrap()
}

fn group_counts(p: &Picker, n: usize, key: impl Fn(usize) -> Option<Vec<u8>>) -> Vec<u64> {
    let mut counts = vec![0u64; p.group_count()];
    for i in 0..n {
        let k = key(i);
        let pick = p.pick(k.as_deref()).unwrap();
        counts[p.group_of(pick.index()) as usize] += 1;
    }
    counts
}

fn within_4_sigma(observed: u64, n: u64, p: f64) -> bool {
    let mean = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    (observed as f64 - mean).abs() <= 4.0 * sigma + 1.0
}

#[test]
fn picks_follow_the_shares() {
    fastrand::seed(7);
    for algorithm in [
        Algorithm::RoundRobin,
        Algorithm::LeastConnP2c,
        Algorithm::LeastConnExact,
        Algorithm::PeakEwma,
        Algorithm::Maglev,
        Algorithm::RingHash,
    ] {
        let p = grouped(algorithm, 3, 4, |_| true, &[false; 3], |_| {});
        // Before any share is set: the first group takes everything.
        assert_eq!(group_counts(&p, 1_000, |_| None), vec![1_000, 0, 0]);
        p.set_shares(&[0.7, 0.2, 0.1]);
        let n = 100_000u64;
        let c = group_counts(&p, n as usize, |i| Some(format!("key-{i}").into_bytes()));
        for (g, share) in [0.7, 0.2, 0.1].into_iter().enumerate() {
            assert!(
                within_4_sigma(c[g], n, share),
                "{algorithm:?}: group {g} got {} of {n}, share {share}",
                c[g]
            );
        }
        let s = p.shares();
        assert!(
            (s[0] - 0.7).abs() < 1e-6 && (s[2] - 0.1).abs() < 1e-6,
            "{s:?}"
        );
    }
}

#[test]
fn a_threads_keyless_picks_hit_the_shares_within_a_few_picks() {
    // Without a key the group draw is the thread's golden-ratio sequence: every window of
    // picks is spread by the shares (a random draw would be off by ≈ 15 of 1,000 here).
    for algorithm in [
        Algorithm::RoundRobin,
        Algorithm::LeastConnP2c,
        Algorithm::PeakEwma,
    ] {
        let p = grouped(algorithm, 3, 4, |_| true, &[false; 3], |_| {});
        p.set_shares(&[0.7, 0.2, 0.1]);
        for window in [100usize, 1_000, 10_000] {
            let c = group_counts(&p, window, |_| None);
            for (g, share) in [0.7, 0.2, 0.1].into_iter().enumerate() {
                let want = window as f64 * share;
                assert!(
                    (c[g] as f64 - want).abs() <= 3.0,
                    "{algorithm:?}: group {g} got {} of {window}, want {want}",
                    c[g]
                );
            }
        }
    }
}

#[test]
fn one_group_at_full_share_takes_every_pick() {
    let p = grouped(Algorithm::RoundRobin, 3, 4, |_| true, &[false; 3], |_| {});
    p.set_shares(&[0.0, 1.0, 0.0]);
    assert_eq!(group_counts(&p, 1_000, |_| None), vec![0, 1_000, 0]);
    // Shares are normalised; garbage counts as 0.
    p.set_shares(&[f64::NAN, -1.0, 2.0]);
    assert_eq!(group_counts(&p, 1_000, |_| None), vec![0, 0, 1_000]);
}

#[test]
fn a_group_with_nothing_eligible_falls_through() {
    // Group 0 has no eligible backend: its share goes to the next group that can pick.
    let p = grouped(Algorithm::RoundRobin, 3, 4, |i| i >= 4, &[false; 3], |_| {});
    p.set_shares(&[1.0, 0.0, 0.0]);
    assert_eq!(group_counts(&p, 1_000, |_| None), vec![0, 1_000, 0]);
    // Nothing eligible anywhere: the usual error.
    let p = grouped(Algorithm::RoundRobin, 2, 2, |_| false, &[false; 2], |_| {});
    p.set_shares(&[0.5, 0.5]);
    assert_eq!(p.pick(None).unwrap_err(), PickError::NoEligibleBackends);
}

#[test]
fn per_group_panic_routes_over_the_group_or_empties_it() {
    // Group 0: 1 of 4 eligible, in panic on its own.
    let panic = |mode| {
        move |p: &mut PolicyConfig| {
            p.panic = Some(PanicConfig {
                threshold_percent: 50,
                mode,
            })
        }
    };
    let eligible = |i: usize| i == 0 || i >= 4;
    let p = grouped(
        Algorithm::RoundRobin,
        2,
        4,
        eligible,
        &[true, false],
        panic(PanicMode::RouteAll),
    );
    p.set_shares(&[1.0, 0.0]);
    let mut seen = HashMap::new();
    for _ in 0..400 {
        *seen
            .entry(p.pick(None).unwrap().backend().id().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        4,
        "route_all spreads over the whole group: {seen:?}"
    );
    assert!(seen
        .keys()
        .all(|id| ["b0", "b1", "b2", "b3"].contains(&id.as_str())));
    let p = grouped(
        Algorithm::RoundRobin,
        2,
        4,
        eligible,
        &[true, false],
        panic(PanicMode::Fail),
    );
    p.set_shares(&[1.0, 0.0]);
    // The failing group picks nothing: its share falls through to group 1.
    assert_eq!(group_counts(&p, 400, |_| None), vec![0, 400]);
}

#[test]
fn a_key_keeps_its_backend_while_its_group_holds() {
    for algorithm in [Algorithm::Maglev, Algorithm::RingHash] {
        let p = grouped(algorithm, 2, 8, |_| true, &[false; 2], |_| {});
        p.set_shares(&[0.5, 0.5]);
        let keys: Vec<Vec<u8>> = (0..2_000).map(|i| format!("k{i}").into_bytes()).collect();
        let before: Vec<(u16, String)> = keys
            .iter()
            .map(|k| {
                let pick = p.pick(Some(k)).unwrap();
                (p.group_of(pick.index()), pick.backend().id().to_owned())
            })
            .collect();
        // Group 0 grows: every key that was in group 0 stays on its backend; only keys of
        // group 1 move (about 0.1 / 0.5 of them).
        p.set_shares(&[0.6, 0.4]);
        let mut moved = 0;
        for (k, (g, id)) in keys.iter().zip(&before) {
            let pick = p.pick(Some(k)).unwrap();
            if *g == 0 {
                assert_eq!(pick.backend().id(), id, "{algorithm:?}");
            } else if pick.backend().id() != id {
                moved += 1;
            }
        }
        assert!(
            (100..300).contains(&moved),
            "{algorithm:?}: {moved} of ~1000 group-1 keys moved"
        );
    }
}

#[test]
fn in_flight_carries_over_when_a_backend_changes_group() {
    let specs: Vec<BackendSpec> = (0..4).map(|i| spec(i, true)).collect();
    let policy = PolicyConfig::new(Algorithm::LeastConnExact);
    let old = Arc::new(Picker::build(&policy, &specs).unwrap());
    let held = old.pick_id("b2").unwrap().into_owned(&old);
    let new = old
        .rebuild_grouped(
            &policy,
            &specs,
            &Grouping {
                of_backend: &[0, 0, 1, 1],
                panic: &[false, false],
            },
        )
        .unwrap();
    assert_eq!(new.get("b2").unwrap().load().in_flight(), 1);
    drop(held);
    assert_eq!(new.get("b2").unwrap().load().in_flight(), 0);
    // A call counted on the grouped picker is released on its group's strategy.
    let new = Arc::new(new);
    new.set_shares(&[0.0, 1.0]);
    let picks: Vec<_> = (0..10).map(|_| new.pick_owned(None).unwrap()).collect();
    let total: u64 = ["b2", "b3"]
        .iter()
        .map(|id| new.get(id).unwrap().load().in_flight())
        .sum();
    assert_eq!(total, 10);
    drop(picks);
    assert!(new.backends().iter().all(|b| b.load().in_flight() == 0));
}

#[test]
fn bad_groupings_are_refused() {
    let specs: Vec<BackendSpec> = (0..3).map(|i| spec(i, true)).collect();
    let policy = PolicyConfig::new(Algorithm::RoundRobin);
    for (of, panic) in [
        (&[0u16, 0][..], &[false][..]),
        (&[0, 1, 2], &[false, false]),
        (&[0, 0, 0], &[]),
    ] {
        let e = Picker::build_grouped(
            &policy,
            &specs,
            &Grouping {
                of_backend: of,
                panic,
            },
        )
        .unwrap_err();
        assert!(matches!(e, BuildError::InvalidGrouping(_)), "{e:?}");
    }
}

#[test]
fn shares_can_change_while_threads_pick() {
    let p = Arc::new(grouped(
        Algorithm::LeastConnP2c,
        3,
        4,
        |i| i % 4 != 0,
        &[false; 3],
        |_| {},
    ));
    let pickers: Vec<_> = (0..2)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || {
                for _ in 0..200_000 {
                    drop(p.pick(None).unwrap());
                }
            })
        })
        .collect();
    for i in 0..20_000u32 {
        let a = f64::from(i % 7);
        p.set_shares(&[a, 1.0, f64::from(i % 3)]);
    }
    for t in pickers {
        t.join().unwrap();
    }
    assert!(p.backends().iter().all(|b| b.load().in_flight() == 0));
}
