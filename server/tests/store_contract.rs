//! The store contract (see `dlb_server::store`), one suite run against every implementation:
//! revisions and versions, no-ops, compare-and-set, atomic batches, watch order, resume,
//! compaction, validation and derived fields of stored records, declarative writes, removal
//! reasons, service removal. The
//! embedded store also keeps everything across a reopen. With the `etcd` feature the suite also
//! runs against the etcd store, each test on its own freshly started etcd (`etcd_support`), so
//! revisions are the test's own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use dlb::proto;
use dlb_server::store::{EmbeddedStore, MemoryStore, Mutation, ServerPatch, Store, WatchEvent};
use dlb_server::Error;
use futures::StreamExt;

#[cfg(feature = "etcd")]
mod etcd_support;

/// A store under test plus whatever must outlive it (a temporary directory, an etcd process),
/// dropped after the store.
struct Subject {
    store: Arc<dyn Store>,
    _guard: Option<Box<dyn std::any::Any + Send>>,
}

fn memory(history: usize) -> Subject {
    Subject {
        store: Arc::new(MemoryStore::new(history)),
        _guard: None,
    }
}

/// An etcd store on its own etcd, compacting so that `history` revisions stay.
#[cfg(feature = "etcd")]
async fn etcd(history: usize) -> Subject {
    let server = etcd_support::Etcd::start().await;
    let config = dlb_server::EtcdConfig {
        history: Some(history as u64),
        ..server.config(&format!("/contract-{:x}", fastrand::u64(..)))
    };
    let store = dlb_server::store::EtcdStore::connect(&config)
        .await
        .unwrap();
    Subject {
        store: Arc::new(store),
        _guard: Some(Box::new(server)),
    }
}

fn embedded(history: usize) -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_with_history(dir.path(), history).unwrap();
    Subject {
        store: Arc::new(store),
        _guard: Some(Box::new(dir)),
    }
}

fn server(id: &str, weight: u32) -> proto::Server {
    proto::Server {
        server_id: id.into(),
        address: format!("{id}.internal:80"),
        weight,
        ..Default::default()
    }
}

async fn add(store: &dyn Store, service: &str, id: &str) -> u64 {
    store
        .apply(service.into(), vec![Mutation::Add(server(id, 1))], None)
        .await
        .unwrap()
        .version
        .version
}

/// How long an event that must arrive may take (generous: this VM stalls for seconds).
const ARRIVE: Duration = Duration::from_secs(30);

/// How long a watch must stay quiet to show that nothing was published. Only a negative check
/// uses it: a slow machine can make it miss a late event, never fail a correct store.
const QUIET: Duration = Duration::from_millis(300);

/// The next watch event; panics when none arrives within [`ARRIVE`] or the watch ends.
async fn next_event(
    w: &mut futures::stream::BoxStream<'static, Result<WatchEvent, Error>>,
) -> WatchEvent {
    match tokio::time::timeout(ARRIVE, w.next()).await {
        Ok(Some(r)) => r.unwrap(),
        Ok(None) => panic!("the watch ended"),
        Err(_) => panic!("no watch event within {ARRIVE:?}"),
    }
}

/// Asserts that the watch publishes nothing for [`QUIET`].
async fn assert_quiet(
    w: &mut futures::stream::BoxStream<'static, Result<WatchEvent, Error>>,
    what: &str,
) {
    if let Ok(e) = tokio::time::timeout(QUIET, w.next()).await {
        panic!("{what}: {e:?}");
    }
}

/// Collects the revisions of `n` changes from a watch.
async fn revisions(
    w: &mut futures::stream::BoxStream<'static, Result<WatchEvent, Error>>,
    n: usize,
) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n {
        match next_event(w).await {
            WatchEvent::Changes(cs) => out.extend(cs.iter().map(|c| c.version)),
            other => panic!("expected changes, got {other:?}"),
        }
    }
    out
}

async fn versions_are_revisions(s: Subject) {
    let st = &*s.store;
    assert_ne!(st.epoch(), 0);
    let a1 = add(st, "a", "x").await;
    let b1 = add(st, "b", "x").await;
    let a2 = add(st, "a", "y").await;
    assert!(
        a1 < b1 && b1 < a2,
        "one increasing revision: {a1} {b1} {a2}"
    );
    assert_eq!(a2, b1 + 1, "each commit takes the next revision");
    let snap = st.snapshot().await.unwrap();
    assert_eq!(snap.revision, a2);
    assert_eq!(snap.epoch, st.epoch());
    let a = st.get_service("a".into()).await.unwrap().unwrap();
    assert_eq!(a.version.version, a2);
    assert_eq!(a.version.epoch, st.epoch());
    assert_eq!(a.servers.len(), 2);
    let b = st.get_service("b".into()).await.unwrap().unwrap();
    assert_eq!(
        b.version.version, b1,
        "a service's version is its own last change"
    );
    assert!(st.get_service("nope".into()).await.unwrap().is_none());
}

async fn no_ops_commit_nothing(s: Subject) {
    let st = &*s.store;
    let v = add(st, "s", "a").await;
    let mut w = st.watch(v + 1);
    // A new backend's admin source is already healthy: health_check_passed is a no-op.
    let passed = ServerPatch {
        admin: Some(proto::Verdict::Healthy),
        ..Default::default()
    };
    let r = st
        .apply("s".into(), vec![Mutation::Update("a".into(), passed)], None)
        .await
        .unwrap();
    assert!(!r.changed);
    assert_eq!(r.version.version, v);
    let policy = st.get_service("s".into()).await.unwrap().unwrap().policy;
    let r = st
        .apply("s".into(), vec![Mutation::SetPolicy(policy)], None)
        .await
        .unwrap();
    assert!(!r.changed);
    assert_eq!(r.version.version, v);
    // Declaring what is stored is a no-op too.
    let stored = st.get_service("s".into()).await.unwrap().unwrap();
    let declared = (**stored.servers.get("a").unwrap()).clone();
    let r = st
        .apply("s".into(), vec![Mutation::Declare(declared)], None)
        .await
        .unwrap();
    assert!(!r.changed);
    assert_quiet(&mut w, "a no-op was published").await;
    let v2 = add(st, "s", "b").await;
    assert_eq!(v2, v + 1, "no-ops took no revision");
    assert_eq!(revisions(&mut w, 1).await, vec![v2]);
}

async fn compare_and_set(s: Subject) {
    let st = &*s.store;
    // 0: "must not exist yet".
    let created = st
        .apply("s".into(), vec![Mutation::Add(server("a", 1))], Some(0))
        .await
        .unwrap();
    let v = created.version.version;
    let stale = st
        .apply("s".into(), vec![Mutation::Add(server("b", 1))], Some(0))
        .await
        .unwrap_err();
    match stale {
        Error::VersionMismatch {
            expected, current, ..
        } => assert_eq!((expected, current), (0, v)),
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
    let status = tonic::Status::from(
        st.apply("s".into(), vec![Mutation::Remove("a".into())], Some(v - 1))
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains(&v.to_string()),
        "{}",
        status.message()
    );
    let after = st.get_service("s".into()).await.unwrap().unwrap();
    assert_eq!(
        after.servers.len(),
        1,
        "a failed compare-and-set changed something"
    );
    assert_eq!(after.version.version, v);
    let ok = st
        .apply("s".into(), vec![Mutation::Add(server("b", 1))], Some(v))
        .await
        .unwrap();
    assert!(ok.version.version > v);
}

async fn batches_are_atomic(s: Subject) {
    let st = &*s.store;
    let v = add(st, "s", "a").await;
    let e = st
        .apply(
            "s".into(),
            vec![Mutation::Add(server("x", 1)), Mutation::Add(server("a", 1))],
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e:?}");
    let e = st
        .apply(
            "s".into(),
            vec![
                Mutation::Add(server("x", 1)),
                Mutation::Remove("missing".into()),
            ],
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ServerNotFound { .. }), "{e:?}");
    let snap = st.get_service("s".into()).await.unwrap().unwrap();
    assert_eq!(snap.version.version, v);
    assert_eq!(snap.servers.len(), 1, "part of a failed batch was applied");
    // A successful batch is one revision.
    let r = st
        .apply(
            "s".into(),
            vec![
                Mutation::Add(server("x", 2)),
                Mutation::Add(server("y", 3)),
                Mutation::Remove("a".into()),
            ],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.version.version, v + 1);
    assert_eq!(r.servers.len(), 2);
    // Operations on a service that does not exist.
    let e = st
        .apply("nope".into(), vec![Mutation::Remove("a".into())], None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ServiceNotFound(_)), "{e:?}");
    assert!(st.get_service("nope".into()).await.unwrap().is_none());
}

async fn watch_order_and_resume(s: Subject) {
    let st = &*s.store;
    let mut all = Vec::new();
    for i in 0..20 {
        let service = if i % 3 == 0 { "a" } else { "b" };
        all.push(add(st, service, &format!("x{i}")).await);
    }
    let mut w = st.watch(1);
    assert_eq!(revisions(&mut w, 20).await, all);
    // Resume from the middle.
    let mut w = st.watch(all[10]);
    assert_eq!(revisions(&mut w, 10).await, all[10..].to_vec());
    // A watch from the future waits, then sees new commits in order.
    let mut w = st.watch(all[19] + 1);
    assert_quiet(&mut w, "a watch from the future saw an event").await;
    let n1 = add(st, "a", "late1").await;
    let n2 = add(st, "b", "late2").await;
    assert_eq!(revisions(&mut w, 2).await, vec![n1, n2]);
    // Each change says what changed.
    let mut w = st.watch(n1);
    match next_event(&mut w).await {
        WatchEvent::Changes(cs) => {
            let c = &cs[0];
            assert_eq!(c.service, "a");
            assert_eq!(c.version, n1);
            assert_eq!(c.created, vec!["late1".to_string()]);
            assert_eq!(c.upserts.len(), 1);
            assert!(c.base < n1 && c.base > 0);
        }
        other => panic!("{other:?}"),
    }
}

async fn compaction_is_explicit(s: Subject) {
    let st = &*s.store;
    let mut last = 0;
    for i in 0..10 {
        last = add(st, "s", &format!("x{i}")).await;
    }
    // History of 4: revision 1 is long gone.
    let mut w = st.watch(1);
    match next_event(&mut w).await {
        WatchEvent::Compacted { compacted } => {
            assert!(compacted >= 1 && compacted < last, "{compacted}")
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(QUIET, w.next())
            .await
            .map_or(true, |e| e.is_none()),
        "the stream goes on after Compacted"
    );
    // The recovery: snapshot at R, watch from R + 1.
    let snap = st.snapshot().await.unwrap();
    assert_eq!(snap.revision, last);
    assert_eq!(snap.services[0].servers.len(), 10);
    let mut w = st.watch(snap.revision + 1);
    let n = add(st, "s", "after").await;
    assert_eq!(revisions(&mut w, 1).await, vec![n]);
    // What is still remembered can be resumed.
    let mut w = st.watch(last);
    assert_eq!(revisions(&mut w, 2).await, vec![last, n]);
}

async fn records_are_validated_and_stamped(s: Subject) {
    let st = &*s.store;
    let v = add(st, "s", "a").await;
    let bad_address = proto::Server {
        address: "10.0.0.1".into(),
        ..server("b", 1)
    };
    let invalid = [
        Mutation::Add(bad_address),
        Mutation::Add(server("bad id", 1)),
        Mutation::Add(server("w", 0)),
        Mutation::Update(
            "a".into(),
            ServerPatch {
                weight: Some(10_001),
                ..Default::default()
            },
        ),
        Mutation::Update(
            "a".into(),
            ServerPatch {
                probe: Some(proto::SourceState {
                    verdict: proto::Verdict::Unhealthy as i32,
                    detail: "x".repeat(1000),
                }),
                ..Default::default()
            },
        ),
        Mutation::SetPolicy(proto::Policy {
            algorithm: proto::Algorithm::RoundRobin as i32,
            bounded_load_factor: 1.5,
            ..Default::default()
        }),
    ];
    for m in invalid {
        let e = st
            .apply("s".into(), vec![m.clone()], None)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{m:?} gave {e:?}");
    }
    let e = st
        .apply("bad name".into(), vec![Mutation::Add(server("a", 1))], None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e:?}");
    assert_eq!(
        st.get_service("s".into())
            .await
            .unwrap()
            .unwrap()
            .version
            .version,
        v
    );
    // Derived fields are stamped from the sources on commit, whatever the request said.
    let forged = proto::Server {
        health: proto::HealthStatus::Unhealthy as i32,
        reason: "forged".into(),
        ..server("c", 1)
    };
    let r = st
        .apply("s".into(), vec![Mutation::Add(forged)], None)
        .await
        .unwrap();
    assert_eq!(r.servers[0].health, proto::HealthStatus::Healthy as i32);
    assert_eq!(r.servers[0].reason, "");
    let failed = ServerPatch {
        admin: Some(proto::Verdict::Unhealthy),
        ..Default::default()
    };
    let probe_ok = ServerPatch {
        probe: Some(proto::SourceState {
            verdict: proto::Verdict::Healthy as i32,
            detail: "HTTP 200".into(),
        }),
        ..Default::default()
    };
    let r = st
        .apply(
            "s".into(),
            vec![
                Mutation::Update("c".into(), probe_ok),
                Mutation::Update("c".into(), failed),
            ],
            None,
        )
        .await
        .unwrap();
    let c = r.servers.last().unwrap();
    assert_eq!(c.health, proto::HealthStatus::Unhealthy as i32);
    assert_eq!(c.reason, "admin: health_check_failed");
    let stored = st.get_service("s".into()).await.unwrap().unwrap();
    assert_eq!(**stored.servers.get("c").unwrap(), *c);
}

async fn declare_keeps_runtime_state(s: Subject) {
    let st = &*s.store;
    add(st, "s", "a").await;
    let drain_and_fail = ServerPatch {
        draining: Some(true),
        admin: Some(proto::Verdict::Unhealthy),
        ..Default::default()
    };
    st.apply(
        "s".into(),
        vec![Mutation::Update("a".into(), drain_and_fail)],
        None,
    )
    .await
    .unwrap();
    let declared = proto::Server {
        address: "moved.internal:81".into(),
        ..server("a", 7)
    };
    let r = st
        .apply(
            "s".into(),
            vec![
                Mutation::Declare(declared),
                Mutation::Declare(server("n", 2)),
            ],
            None,
        )
        .await
        .unwrap();
    assert!(r.changed);
    let a = &r.servers[0];
    assert_eq!((a.address.as_str(), a.weight), ("moved.internal:81", 7));
    assert!(a.draining, "declare reset the drain flag");
    assert_eq!(a.reason, "admin: health_check_failed; draining");
    assert_eq!(r.servers[1].health, proto::HealthStatus::Healthy as i32);
}

/// The next watched change (bounded wait: the change is already committed).
async fn next_change(
    w: &mut futures::stream::BoxStream<'static, Result<WatchEvent, Error>>,
) -> Arc<dlb_server::store::Change> {
    match tokio::time::timeout(ARRIVE, w.next()).await {
        Ok(Some(Ok(WatchEvent::Changes(cs)))) if cs.len() == 1 => cs[0].clone(),
        other => panic!("expected one change, got {other:?}"),
    }
}

async fn removals_carry_their_reason(s: Subject) {
    let st = &*s.store;
    add(st, "s", "a").await;
    add(st, "s", "b").await;
    let v = add(st, "s", "c").await;
    let mut w = st.watch(v + 1);
    st.apply(
        "s".into(),
        vec![
            Mutation::RemoveWithReason("a".into(), "lease expired".into()),
            Mutation::Remove("b".into()),
        ],
        None,
    )
    .await
    .unwrap();
    let c = next_change(&mut w).await;
    assert_eq!(c.removals, ["a", "b"]);
    assert_eq!(
        c.removal_reasons,
        [("a".to_string(), "lease expired".to_string())].into()
    );
    // Removed with a reason and re-added in the same batch: no removal, no reason.
    st.apply(
        "s".into(),
        vec![
            Mutation::RemoveWithReason("c".into(), "removed".into()),
            Mutation::Add(server("c", 2)),
        ],
        None,
    )
    .await
    .unwrap();
    let c = next_change(&mut w).await;
    assert!(
        c.removals.is_empty() && c.removal_reasons.is_empty(),
        "{c:?}"
    );
    // A removal without a reason has none; a missing id is NOT_FOUND like `Remove`.
    st.apply("s".into(), vec![Mutation::Remove("c".into())], None)
        .await
        .unwrap();
    let c = next_change(&mut w).await;
    assert_eq!(c.removals, ["c"]);
    assert!(c.removal_reasons.is_empty(), "{c:?}");
    let err = st
        .apply(
            "s".into(),
            vec![Mutation::RemoveWithReason("c".into(), "removed".into())],
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ServerNotFound { .. }), "{err:?}");
}

async fn services_can_be_removed(s: Subject) {
    let st = &*s.store;
    let remove = |force| vec![Mutation::RemoveService { force }];
    let err = st.apply("s".into(), remove(false), None).await.unwrap_err();
    assert!(matches!(err, Error::ServiceNotFound(_)), "{err:?}");
    add(st, "s", "a").await;
    let v = add(st, "s", "b").await;
    // Not empty: refused, naming the count, and nothing changes.
    let err = st.apply("s".into(), remove(false), None).await.unwrap_err();
    assert!(
        matches!(err, Error::ServiceNotEmpty { backends: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("2 backend"), "{err}");
    let err = st
        .apply(
            "s".into(),
            vec![
                Mutation::Remove("a".into()),
                Mutation::RemoveService { force: false },
            ],
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    let err = st
        .apply("s".into(), remove(true), Some(v - 1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::VersionMismatch { .. }), "{err:?}");
    assert_eq!(
        st.get_service("s".into())
            .await
            .unwrap()
            .unwrap()
            .servers
            .len(),
        2
    );
    add(st, "other", "x").await;
    let mut w = st.watch(st.snapshot().await.unwrap().revision + 1);
    // Forced: the service and its backends go, as one change watchers see.
    let r = st.apply("s".into(), remove(true), Some(v)).await.unwrap();
    assert!(r.changed);
    let c = next_change(&mut w).await;
    assert!(c.deleted, "{c:?}");
    assert_eq!(c.service, "s");
    assert_eq!(c.version, r.version.version);
    assert_eq!(c.removals, ["a", "b"]);
    assert!(st.get_service("s".into()).await.unwrap().is_none());
    let snap = st.snapshot().await.unwrap();
    let names: Vec<_> = snap.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["other"]);
    // An empty service goes without force; a removed one can be created again.
    let v = add(st, "s", "a").await;
    let c = next_change(&mut w).await;
    assert_eq!((c.base, c.version, c.deleted), (0, v, false));
    st.apply("s".into(), vec![Mutation::Remove("a".into())], None)
        .await
        .unwrap();
    next_change(&mut w).await;
    st.apply("s".into(), remove(false), None).await.unwrap();
    assert!(next_change(&mut w).await.deleted);
    assert!(st.get_service("s".into()).await.unwrap().is_none());
}

/// `test = history`: each test runs against each store, which remembers `history` changes.
macro_rules! contract {
    ($($name:ident = $history:expr),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::memory($history)).await;
                }
            )*
        }
        mod embedded_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::embedded($history)).await;
                }
            )*
        }
        #[cfg(feature = "etcd")]
        mod etcd_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::etcd($history).await).await;
                }
            )*
        }
    };
}

contract!(
    versions_are_revisions = 1024,
    no_ops_commit_nothing = 1024,
    compare_and_set = 1024,
    batches_are_atomic = 1024,
    watch_order_and_resume = 1024,
    compaction_is_explicit = 4,
    records_are_validated_and_stamped = 1024,
    declare_keeps_runtime_state = 1024,
    removals_carry_their_reason = 1024,
    services_can_be_removed = 1024,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_keeps_everything_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (epoch, before, revision) = {
        let st = EmbeddedStore::open(dir.path()).unwrap();
        add(&st, "a", "x").await;
        add(&st, "b", "y").await;
        st.apply(
            "a".into(),
            vec![
                Mutation::Update(
                    "x".into(),
                    ServerPatch {
                        admin: Some(proto::Verdict::Unhealthy),
                        weight: Some(9),
                        ..Default::default()
                    },
                ),
                Mutation::SetPolicy(proto::Policy {
                    algorithm: proto::Algorithm::Maglev as i32,
                    ..Default::default()
                }),
            ],
            None,
        )
        .await
        .unwrap();
        st.apply("b".into(), vec![Mutation::Remove("y".into())], None)
            .await
            .unwrap();
        // A removed service stays removed.
        add(&st, "c", "w").await;
        st.apply(
            "c".into(),
            vec![Mutation::RemoveService { force: true }],
            None,
        )
        .await
        .unwrap();
        let snap = st.snapshot().await.unwrap();
        assert!(snap.services.iter().all(|s| s.name != "c"));
        (st.epoch(), snap.services, snap.revision)
    };
    let st = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(st.epoch(), epoch);
    let snap = st.snapshot().await.unwrap();
    assert_eq!(snap.revision, revision);
    assert_eq!(snap.services, before);
    // History from before the reopen is gone, and says so.
    let mut w = st.watch(1);
    assert!(matches!(
        next_event(&mut w).await,
        WatchEvent::Compacted { .. }
    ));
    // New writes continue the revision sequence.
    assert_eq!(add(&st, "a", "z").await, revision + 1);
    // A second store on the same file is refused while this one is open.
    assert!(EmbeddedStore::open(dir.path()).is_err());
}
