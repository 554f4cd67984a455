//! Property-based fuzzing of every decoder of outside input: the YAML config, the Registry
//! requests' validation through the store (a rejected batch changes nothing), client session
//! messages (bytes off the wire), random session message sequences against a real server, and
//! load reports. No panic, no hang, no unbounded allocation.
//!
//! The case count comes from `PROPTEST_CASES` (proptest's default 256 otherwise); `.ci/run`
//! runs 100,000 cases per target in release:
//! `PROPTEST_CASES=100000 cargo test -p dlb-server --release --test fuzz`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use dlb::proto;
use dlb_server::reports::loads::{LoadTracker, MAX_REPORTED_IN_FLIGHT};
use dlb_server::store::{MemoryStore, Mutation, ServerPatch, Store};
use dlb_server::ServerConfig;
use futures::executor::block_on;
use proptest::prelude::*;
use prost::Message;

/// Strings that exercise validation: ids, hosts, ports, control characters, long runs.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._:-]{0,12}",
        "[a-z0-9.-]{1,10}:[0-9]{1,6}",
        "\\[[0-9a-f:]{0,12}\\]:[0-9]{1,5}",
        ".{0,40}",
        Just(String::new()),
        (1usize..3000).prop_map(|n| "x".repeat(n)),
    ]
}

fn server() -> impl Strategy<Value = proto::Server> {
    (
        text(),
        text(),
        prop_oneof![Just(0u32), 1u32..=10_000, any::<u32>()],
        text(),
        proptest::collection::hash_map(text(), text(), 0..4),
        any::<i32>(),
        any::<bool>(),
        any::<u32>(),
        proptest::option::of(locality()),
        prop_oneof![0u32..=8, any::<u32>()],
    )
        .prop_map(
            |(
                server_id,
                address,
                weight,
                hash_key,
                metadata,
                health,
                draining,
                ew,
                locality,
                priority,
            )| {
                proto::Server {
                    locality,
                    priority,
                    server_id,
                    address,
                    weight,
                    hash_key,
                    metadata,
                    health,
                    draining,
                    effective_weight: ew,
                    reason: "client-supplied".into(),
                    sources: None,
                    // Client-supplied; the store stamps its own.
                    ready_since_ms: u64::from(ew),
                    ..Default::default()
                }
            },
        )
}

fn policy() -> impl Strategy<Value = proto::Policy> {
    (
        -1i32..8,
        prop_oneof![
            Just(0.0f64),
            0.5f64..120.0,
            Just(f64::NAN),
            Just(f64::INFINITY)
        ],
        -1i32..4,
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(algorithm, c, sticky, ttl, max)| proto::Policy {
            algorithm,
            bounded_load_factor: c,
            sticky_mode: sticky,
            sticky_ttl_seconds: ttl,
            sticky_max_entries: max,
            ..Default::default()
        })
}

fn locality() -> impl Strategy<Value = proto::Locality> {
    (text(), text(), text()).prop_map(|(region, zone, sub_zone)| proto::Locality {
        region,
        zone,
        sub_zone,
    })
}

fn source() -> impl Strategy<Value = proto::SourceState> {
    (-1i32..4, text()).prop_map(|(verdict, detail)| proto::SourceState { verdict, detail })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let patch = (
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(proptest::collection::hash_map(text(), text(), 0..3)),
        proptest::option::of(prop_oneof![
            Just(proto::Verdict::Unset),
            Just(proto::Verdict::Healthy),
            Just(proto::Verdict::Unhealthy)
        ]),
        proptest::option::of(source()),
        proptest::option::of(proptest::option::of(locality())),
        proptest::option::of(prop_oneof![0u32..=8, any::<u32>()]),
    )
        .prop_map(
            |(weight, draining, address, hash_key, metadata, admin, probe, locality, priority)| {
                ServerPatch {
                    weight,
                    draining,
                    address,
                    hash_key,
                    metadata,
                    admin,
                    probe,
                    outlier: None,
                    latency: None,
                    locality,
                    priority,
                }
            },
        );
    prop_oneof![
        server().prop_map(Mutation::Add),
        server().prop_map(Mutation::Declare),
        text().prop_map(Mutation::Remove),
        (text(), patch).prop_map(|(id, p)| Mutation::Update(id, p)),
        policy().prop_map(Mutation::SetPolicy),
    ]
}

proptest! {
    /// Arbitrary text and YAML-shaped documents never panic the loader.
    #[test]
    fn yaml_config_never_panics(
        doc in prop_oneof![
            ".{0,200}",
            (text(), text(), text(), any::<i64>()).prop_map(|(a, b, c, n)| format!(
                "listen: {a}\nkeepalive: {{ interval_seconds: {n} }}\nhistory_size: {n}\nservices:\n  - name: {b}\n    policy: {{ algorithm: {c}, sticky_ttl_seconds: {n} }}\n    backends:\n      - {{ id: {a}, address: \"{b}\", weight: {n} }}\n"
            )),
        ]
    ) {
        if let Ok(cfg) = ServerConfig::from_yaml_str(&doc) {
            // Whatever loads is within the stated ranges.
            prop_assert!(cfg.validate().is_ok());
        }
    }

    /// Any batch either applies or changes nothing; what is stored always validates.
    #[test]
    fn store_batches_are_all_or_nothing(
        setup in proptest::collection::vec(mutation(), 0..4),
        batch in proptest::collection::vec(mutation(), 1..5),
        expected in proptest::option::of(0u64..6),
    ) {
        let store = MemoryStore::default();
        let _ = block_on(store.apply("s".into(), setup, None));
        let before = block_on(store.snapshot()).unwrap();
        match block_on(store.apply("s".into(), batch, expected)) {
            Ok(applied) => {
                let after = block_on(store.snapshot()).unwrap();
                if !applied.changed {
                    prop_assert_eq!(&after, &before);
                }
                for svc in &after.services {
                    for s in svc.servers.values() {
                        prop_assert!(dlb::model::validate_server(s).is_ok());
                        prop_assert!(s.reason != "client-supplied");
                    }
                    prop_assert!(dlb::model::validate_policy(&svc.policy).is_ok());
                }
            }
            Err(e) => {
                let after = block_on(store.snapshot()).unwrap();
                prop_assert_eq!(&after, &before, "a rejected batch changed the store: {}", e);
                let status = tonic::Status::from(e);
                prop_assert!(status.message().len() <= 512, "{}", status.message());
            }
        }
    }

    /// Bytes off the wire: a session's client messages decode or fail cleanly.
    #[test]
    fn client_messages_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(m) = proto::ClientMessage::decode(bytes.as_slice()) {
            // Re-encoding what decoded never panics and decodes back the same.
            let again = proto::ClientMessage::decode(m.encode_to_vec().as_slice()).unwrap();
            prop_assert_eq!(again, m);
        }
    }

    /// Load reports: clamped, saturating, and a session's share is gone when it ends.
    #[test]
    fn load_reports_are_bounded(
        reports in proptest::collection::vec(
            (0u64..4, proptest::collection::vec(("[a-c]", any::<u64>()), 0..6)),
            1..12,
        ),
    ) {
        let t = LoadTracker::new();
        for (session, backends) in &reports {
            let loads: Vec<proto::BackendLoad> = backends
                .iter()
                .map(|(id, n)| proto::BackendLoad {
                    server_id: id.clone(),
                    in_flight: *n,
                    ..Default::default()
                })
                .collect();
            let sums: HashMap<String, u64> = t.report(*session, "s", &loads);
            for v in sums.values() {
                prop_assert!(*v <= 4 * MAX_REPORTED_IN_FLIGHT);
            }
        }
        for session in 0..4 {
            t.remove_session(session);
        }
        prop_assert_eq!(t.service_total("s"), 0);
    }
}

mod sessions {
    //! Random client message sequences against one real server (shared by every case): each
    //! case opens a session, sends a random sequence, half-closes and drains. The server never
    //! hangs, never panics, stays up, and no session message changes routing state. Cases:
    //! `DLB_FUZZ_SESSION_CASES` (default 64); `.ci/run` runs 100,000 in release (≈ 35 s).

    use std::sync::OnceLock;
    use std::time::Duration;

    use dlb::proto::{self, client_message, discovery_client::DiscoveryClient};
    use proptest::prelude::*;

    struct Shared {
        rt: tokio::runtime::Runtime,
        server: dlb_server::RunningServer,
        channel: tonic::transport::Channel,
    }

    fn shared() -> &'static Shared {
        static S: OnceLock<Shared> = OnceLock::new();
        S.get_or_init(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let (server, channel) = rt.block_on(async {
                let server = dlb_server::spawn(dlb_server::ServerConfig {
                    listen: "127.0.0.1:0".parse().unwrap(),
                    metrics_listen: None,
                    ..Default::default()
                })
                .await
                .unwrap();
                let mut c = proto::registry_client::RegistryClient::connect(format!(
                    "http://{}",
                    server.grpc_addr()
                ))
                .await
                .unwrap();
                for id in ["a", "b"] {
                    c.add_server(proto::AddServerRequest {
                        server_id: id.into(),
                        address: "10.0.0.1:80".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                }
                let channel = tonic::transport::Endpoint::from_shared(format!(
                    "http://{}",
                    server.grpc_addr()
                ))
                .unwrap()
                .connect()
                .await
                .unwrap();
                (server, channel)
            });
            Shared {
                rt,
                server,
                channel,
            }
        })
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just("default".to_owned()),
            "[a-z]{1,6}",
            ".{0,20}",
            (0usize..300).prop_map(|n| "s".repeat(n)),
        ]
    }

    fn version() -> impl Strategy<Value = Option<proto::Version>> {
        proptest::option::of(
            (prop_oneof![Just(0u64), any::<u64>()], any::<u64>())
                .prop_map(|(epoch, version)| proto::Version { epoch, version }),
        )
    }

    fn message() -> impl Strategy<Value = proto::ClientMessage> {
        let kind = prop_oneof![
            (name(), proptest::collection::vec((name(), version()), 0..4)).prop_map(
                |(client_id, subs)| client_message::Kind::Subscribe(proto::Subscribe {
                    locality: None,
                    client_id,
                    services: subs
                        .into_iter()
                        .map(|(service, known)| proto::ServiceSubscription { service, known })
                        .collect(),
                })
            ),
            (name(), version(), name()).prop_map(|(service, version, nonce)| {
                client_message::Kind::Ack(proto::Ack {
                    service,
                    version,
                    nonce,
                })
            }),
            (name(), version(), name(), name()).prop_map(|(service, version, nonce, d)| {
                client_message::Kind::Nack(proto::Nack {
                    service,
                    version,
                    nonce,
                    error_detail: d,
                })
            }),
            (
                name(),
                proptest::collection::vec((name(), any::<u64>(), any::<u64>()), 0..4),
                any::<u64>()
            )
                .prop_map(|(service, b, interval_ms)| {
                    client_message::Kind::LoadReport(proto::LoadReport {
                        service,
                        backends: b
                            .into_iter()
                            .map(|(server_id, in_flight, failures)| proto::BackendLoad {
                                server_id,
                                in_flight,
                                failures,
                                ..Default::default()
                            })
                            .collect(),
                        interval_ms,
                    })
                }),
            name().prop_map(
                |service| client_message::Kind::Unsubscribe(proto::Unsubscribe { service })
            ),
        ];
        proptest::option::of(kind).prop_map(|kind| proto::ClientMessage { kind })
    }

    fn cases() -> u32 {
        std::env::var("DLB_FUZZ_SESSION_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

        #[test]
        fn random_session_sequences(seq in proptest::collection::vec(message(), 0..8)) {
            let s = shared();
            let outcome: Result<(), String> = s.rt.block_on(async {
                let (tx, rx) = tokio::sync::mpsc::channel(16);
                for m in seq {
                    tx.send(m).await.map_err(|e| e.to_string())?;
                }
                drop(tx);
                let mut client = DiscoveryClient::new(s.channel.clone());
                let resp = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.session(tokio_stream::wrappers::ReceiverStream::new(rx)),
                )
                .await
                .map_err(|_| "session start hung".to_string())?;
                if let Ok(resp) = resp {
                    let mut stream = resp.into_inner();
                    loop {
                        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
                            Err(_) => return Err("session hung after the client half-closed".into()),
                            Ok(Ok(Some(_))) => {}
                            Ok(Ok(None)) | Ok(Err(_)) => break,
                        }
                    }
                }
                // The server is up and routing state is untouched.
                let mut c = proto::registry_client::RegistryClient::new(s.channel.clone());
                let list = c
                    .list_servers(proto::ListServersRequest::default())
                    .await
                    .map_err(|e| format!("server down: {e:?}"))?
                    .into_inner();
                if list.servers.len() != 2 {
                    return Err(format!("state changed: {list:?}"));
                }
                Ok(())
            });
            prop_assert!(outcome.is_ok(), "{:?}", outcome);
            let _ = &s.server;
        }
    }
}
