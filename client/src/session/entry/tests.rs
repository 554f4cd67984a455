//! Staging, holds, not-found and pushed global loads of one service's entry.

use super::*;

fn server(id: &str) -> proto::Server {
    proto::Server {
        server_id: id.into(),
        address: "127.0.0.1:80".into(),
        weight: 1,
        health: proto::HealthStatus::Healthy as i32,
        ..Default::default()
    }
}

fn full(epoch: u64, version: u64, ids: &[&str]) -> proto::ServiceUpdate {
    proto::ServiceUpdate {
        service: "s".into(),
        version: Some(proto::Version { epoch, version }),
        full: true,
        policy: Some(model::default_policy()),
        upserts: ids.iter().map(|i| server(i)).collect(),
        ..Default::default()
    }
}

#[test]
fn deltas_need_the_right_base_and_emptying_is_guarded() {
    let mut e = Entry::new(Arc::new(ServiceState::new("s".into())), None);
    e.apply(&full(7, 1, &["a", "b"])).unwrap();
    assert_eq!(
        e.version,
        Version {
            epoch: 7,
            version: 1
        }
    );
    let mut d = proto::ServiceUpdate {
        service: "s".into(),
        version: Some(proto::Version {
            epoch: 7,
            version: 3,
        }),
        base: Some(proto::Version {
            epoch: 7,
            version: 2,
        }),
        removals: vec!["a".into()],
        ..Default::default()
    };
    assert!(e.apply(&d).is_err(), "wrong base must be nacked");
    d.base = Some(proto::Version {
        epoch: 7,
        version: 1,
    });
    e.apply(&d).unwrap();
    assert_eq!(e.records.len(), 1);
    // A full empty snapshot from another epoch is held back.
    e.apply(&full(8, 1, &[])).unwrap();
    let snap = e.state.snapshot.load();
    assert!(snap.stale);
    assert_eq!(snap.picker.as_ref().unwrap().backends().len(), 1);
    assert_eq!(
        e.version,
        Version {
            epoch: 8,
            version: 1
        }
    );
    // Backends that do not cover the routed one: still held (restart-flooding rule).
    e.apply(&full(8, 2, &["c"])).unwrap();
    assert!(e.state.snapshot.load().stale);
    // The routed backend is back: published.
    e.apply(&full(8, 2, &["b", "c"])).unwrap();
    let snap = e.state.snapshot.load();
    assert!(!snap.stale);
    assert_eq!(snap.picker.as_ref().unwrap().backends().len(), 2);
    // Same epoch removal to empty is applied.
    let d = proto::ServiceUpdate {
        service: "s".into(),
        version: Some(proto::Version {
            epoch: 8,
            version: 3,
        }),
        base: Some(proto::Version {
            epoch: 8,
            version: 2,
        }),
        removals: vec!["b".into(), "c".into()],
        ..Default::default()
    };
    e.apply(&d).unwrap();
    assert!(e
        .state
        .snapshot
        .load()
        .picker
        .as_ref()
        .unwrap()
        .backends()
        .is_empty());
    // Invalid record: nacked, nothing changes.
    let mut bad = full(8, 4, &["x"]);
    bad.upserts[0].weight = 0;
    assert!(e.apply(&bad).is_err());
    assert_eq!(e.version.version, 3);
}

fn routed(e: &Entry) -> Vec<String> {
    let snap = e.state.snapshot.load();
    let mut ids: Vec<String> = snap
        .picker
        .as_ref()
        .map(|p| p.backends().iter().map(|b| b.id().to_owned()).collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

fn add(epoch: u64, base: u64, id: &str) -> proto::ServiceUpdate {
    proto::ServiceUpdate {
        service: "s".into(),
        version: Some(proto::Version {
            epoch,
            version: base + 1,
        }),
        base: Some(proto::Version {
            epoch,
            version: base,
        }),
        upserts: vec![server(id)],
        ..Default::default()
    }
}

/// A restarted control plane whose first re-registered backend would take all the traffic:
/// held back until half of the routed backends are back, then published.
#[test]
fn restart_flooding_is_held_back_until_half_are_back() {
    let ten: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    let ids: Vec<&str> = ten.iter().map(String::as_str).collect();
    let mut e = Entry::new(Arc::new(ServiceState::new("s".into())), None);
    e.apply(&full(7, 5, &ids)).unwrap();
    // New epoch, one backend re-registered: held.
    e.apply(&full(8, 1, &["b0"])).unwrap();
    assert!(e.state.snapshot.load().stale);
    assert_eq!(routed(&e).len(), 10, "the first backend would take 100 %");
    // Backends come back one by one; still fewer than half: held.
    for (v, id) in (1..4).zip(["b1", "b2", "b3"]) {
        e.apply(&add(8, v, id)).unwrap();
        assert!(
            e.state.snapshot.load().stale,
            "published with {} of 10",
            v + 1
        );
    }
    // The fifth covers half: published.
    e.apply(&add(8, 4, "b4")).unwrap();
    let snap = e.state.snapshot.load();
    assert!(!snap.stale);
    assert_eq!(routed(&e), vec!["b0", "b1", "b2", "b3", "b4"]);
    assert_eq!(e.state.stats.held_back.load(Ordering::Relaxed), 4);
    // A new epoch that keeps most of them is applied at once.
    e.apply(&full(9, 1, &["b0", "b1", "b2", "b9"])).unwrap();
    assert!(!e.state.snapshot.load().stale);
}

#[tokio::test(start_paused = true)]
async fn a_hold_ends_after_the_grace_period() {
    let mut e = Entry::new(Arc::new(ServiceState::new("s".into())), None);
    e.apply(&full(7, 1, &["a", "b", "c"])).unwrap();
    e.apply(&full(8, 1, &["z"])).unwrap();
    assert!(e.state.snapshot.load().stale);
    assert!(
        !e.release_expired_hold(),
        "released before the grace period"
    );
    tokio::time::advance(HOLD_GRACE).await;
    assert!(e.release_expired_hold());
    let snap = e.state.snapshot.load();
    assert!(!snap.stale);
    assert_eq!(routed(&e), vec!["z"]);
}

fn not_found(epoch: u64) -> proto::ServiceNotFound {
    proto::ServiceNotFound {
        service: "s".into(),
        version: Some(proto::Version { epoch, version: 0 }),
        nonce: "n".into(),
    }
}

#[test]
fn not_found_is_applied_unless_it_comes_from_another_epoch() {
    let mut e = Entry::new(Arc::new(ServiceState::new("s".into())), None);
    // Nothing held: applied.
    e.not_found(&not_found(7));
    assert!(e.state.snapshot.load().not_found);
    // A service that existed in the same epoch and was deleted: applied.
    e.apply(&full(7, 1, &["a"])).unwrap();
    e.not_found(&not_found(7));
    let snap = e.state.snapshot.load();
    assert!(snap.not_found && snap.picker.is_none());
    // From another epoch while routing on a non-empty snapshot: held back.
    e.apply(&full(7, 2, &["a"])).unwrap();
    e.not_found(&not_found(9));
    let snap = e.state.snapshot.load();
    assert!(!snap.not_found && snap.stale);
    assert_eq!(snap.picker.as_ref().unwrap().backends().len(), 1);
    assert_eq!(
        e.version,
        Version::default(),
        "resubscribes without a known version"
    );
    assert_eq!(e.state.stats.held_back.load(Ordering::Relaxed), 1);
}

#[test]
fn global_loads_keep_the_zone_demand_and_the_others_counts() {
    let mut e = Entry::new(Arc::new(ServiceState::new("s".into())), None);
    e.apply(&full(7, 1, &["a", "b"])).unwrap();
    assert!(e.zone_demand().is_empty(), "not known before a push");
    let zone = |z: &str, share| proto::ZoneDemand {
        locality: Some(proto::Locality {
            region: "eu".into(),
            zone: z.into(),
            sub_zone: String::new(),
        }),
        share,
    };
    e.global_load(&proto::GlobalLoad {
        service: "s".into(),
        backends: vec![proto::BackendInFlight {
            server_id: "a".into(),
            in_flight: 4,
        }],
        zone_demand: vec![zone("a", 0.4), zone("b", 0.6), zone("c", f64::NAN)],
    });
    assert_eq!(e.zone_demand(), &[zone("a", 0.4), zone("b", 0.6)]);
    assert_eq!(e.others_in_flight().get("a"), Some(&4));
    // Kept across a rebuild; the next push replaces it (a new session clears it).
    e.apply(&full(7, 2, &["a", "b", "c"])).unwrap();
    assert_eq!(e.zone_demand().len(), 2);
    e.global_load(&proto::GlobalLoad::default());
    assert!(e.zone_demand().is_empty());
    assert!(e.others_in_flight().is_empty());
}
