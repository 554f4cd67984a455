//! Starting and stopping a control plane: opens the store and the replica set ([`open`]),
//! loads the snapshot cache, starts every task through one [`Shutdown`], serves the gRPC port
//! and the metrics port on listeners bound by the caller ([`serve`]; [`spawn`] binds them), and
//! stops it all gracefully ([`RunningServer::shutdown`], in [`running`]).

mod open;
mod running;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use dlb::proto::registry_server::RegistryServer;
use dlb::wire::discovery_server::DiscoveryServer;
use tokio::net::{TcpListener, TcpSocket};
use tonic::transport::server::TcpIncoming;

use crate::api::{auth, membership::MembershipService, reflection, status_layer, xds};
use crate::config::ServerConfig;
use crate::membership::dns;
use crate::shutdown::Shutdown;
use crate::Error;
use crate::{health, metrics, pickers, readiness, replicas, reports, status};

use crate::api::discovery::DiscoveryService;
use crate::api::registry::RegistryService;
use crate::api::Shared;
use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::pickers::Pickers;
use crate::store::Store;
use open::Opened;
pub use running::RunningServer;

/// gRPC service names the health service reports (besides `""`). `dlb.v1.Registry` is
/// SERVING while the server runs; `""` and `dlb.v1.Discovery` follow the replica's
/// [`readiness`].
pub const HEALTH_SERVICES: [&str; 2] = ["dlb.v1.Registry", "dlb.v1.Discovery"];

/// The bound listeners a server serves on: gRPC, and metrics when enabled.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC port (every gRPC service, xDS included).
    pub grpc: TcpListener,
    /// The Prometheus metrics port (`None`: no metrics endpoint).
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds [`ServerConfig::listen`] and [`ServerConfig::metrics_listen`] (port 0 picks a free
    /// port) with `SO_REUSEADDR`, so a restarted server can take the same port at once.
    pub fn bind(config: &ServerConfig) -> Result<Self, Error> {
        Ok(Self {
            grpc: bind(config.listen)?,
            metrics: config.metrics_listen.map(bind).transpose()?,
        })
    }
}

/// Binds a TCP listener with `SO_REUSEADDR`.
fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    let err = |source| Error::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// Starts a control plane on the configured store ([`ServerConfig::store`]: in memory, a new
/// random epoch, or the embedded store in a data directory) holding the configured services.
/// Binds both listeners ([`Listeners::bind`]), starts serving and returns.
pub async fn spawn(config: ServerConfig) -> Result<RunningServer, Error> {
    config.validate()?;
    let listeners = Listeners::bind(&config)?;
    serve(config, listeners).await
}

/// Like [`spawn`], on listeners the caller has bound ([`ServerConfig::listen`] and
/// [`ServerConfig::metrics_listen`] are not read: `listeners` replace them).
pub async fn serve(config: ServerConfig, listeners: Listeners) -> Result<RunningServer, Error> {
    config.validate()?;
    let id = replica_id(&config);
    let shutdown = Shutdown::new();
    let started = match Opened::open(&config, &id, &shutdown).await {
        Ok(opened) => start(config, opened, listeners, shutdown.clone()).await,
        Err(e) => Err(e),
    };
    stop_on_error(started, &shutdown).await
}

/// Like [`spawn`], on a given store. The configured services meet the stored state as
/// declarative writes (a no-op when the store already matches; backends registered through the
/// API and runtime state are kept). The replica is alone ([`replicas::Single`]).
pub async fn spawn_with_store(
    config: ServerConfig,
    store: Arc<dyn Store>,
) -> Result<RunningServer, Error> {
    config.validate()?;
    let listeners = Listeners::bind(&config)?;
    let shutdown = Shutdown::new();
    let opened = Opened::single(store, &replica_id(&config));
    let started = start(config, opened, listeners, shutdown.clone()).await;
    stop_on_error(started, &shutdown).await
}

fn replica_id(config: &ServerConfig) -> String {
    config
        .replica_id
        .clone()
        .unwrap_or_else(replicas::default_id)
}

/// A start that failed half-way stops what it had started (the replica set's tasks, the
/// leases, ...) before its error is returned.
async fn stop_on_error(
    started: Result<RunningServer, Error>,
    shutdown: &Shutdown,
) -> Result<RunningServer, Error> {
    if started.is_err() {
        shutdown.start();
        shutdown.wait().await;
    }
    started
}

/// Whether this build has the etcd store (cargo feature `etcd`); without it `StoreConfig::Etcd`
/// fails at start with an error naming the feature.
pub const ETCD_SUPPORTED: bool = cfg!(feature = "etcd");

/// Starts everything on an open store and replica set.
async fn start(
    config: ServerConfig,
    opened: Opened,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<RunningServer, Error> {
    let store = opened.store.clone();
    let coordination = opened.coordination.clone();
    let leader_store = opened.leader_store.clone();
    let leadership = coordination.leadership();
    open::apply_config(&config, &*store).await?;
    let Listeners {
        grpc: grpc_listener,
        metrics: metrics_listener,
    } = listeners;
    let grpc_addr = grpc_listener.local_addr().map_err(|source| Error::Bind {
        addr: config.listen,
        source,
    })?;
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr().map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?),
        None => None,
    };

    let mut metrics = Metrics::with_per_backend(config.per_backend_metrics);
    let xds_metrics = metrics.register_part(xds::XdsMetrics::register);
    let metrics = Arc::new(metrics);
    let cache = Arc::new(Cache::new(store.epoch(), config.history_size));
    // The cache is loaded before anything is served: a session's first catch-up sees the state.
    let initial = store.snapshot().await?;
    let loaded = initial.revision;
    // Automatic discovery: lease deadlines restart from now (or live in etcd, expired by the
    // leader); DNS names are followed (refreshed by the leader).
    let leases = open::start_leases(&opened, &metrics.membership, &initial, &shutdown);
    let dns = dns::DnsManager::start(
        store.clone(),
        leader_store.clone(),
        leadership.clone(),
        metrics.membership.clone(),
        config.dns.clone(),
        &initial,
        shutdown.clone(),
    );
    #[cfg(feature = "etcd")]
    if opened.etcd_leases.is_some() {
        // Several replicas: names declared or removed through another one reach the leader.
        dns.rescan_while_leading(cache.clone());
    }
    cache.load(initial);
    // Loaded before anything is served: ready from the start (the readiness task follows).
    cache.set_synced(true);
    let (ready_tx, readiness) = readiness::channel(readiness::State::Ready);
    let (reports, reports_rx) = reports::Reports::new();
    let reports = Arc::new(reports);
    let (built, loads) = (
        Arc::new(Pickers::new()),
        Arc::new(reports::loads::LoadTracker::new()),
    );
    let demand = Arc::new(reports::demand::DemandTracker::new(metrics.demand.clone()));
    metrics.locality.set(crate::locality::Sources {
        cache: cache.clone(),
        loads: loads.clone(),
        demand: demand.clone(),
    });
    shutdown.spawn(reports::demand::run(
        demand.clone(),
        shutdown.stopped_owned(),
    ));
    // Per-node EDS plans with the same live inputs as the SDKs (`xds::inputs`).
    let plan_sources = xds::inputs::PlanSources {
        demand: demand.clone(),
        loads: loads.clone(),
    };
    let health = health::start(
        cache.clone(),
        store.clone(),
        Arc::new(health::active::probe::NetProber),
        config.health_max_in_flight,
        metrics.health.clone(),
        replicas::Share::of(&*coordination),
        &shutdown,
    );
    let xds_clients = Arc::new(xds::XdsClients::default());
    shutdown.spawn(xds::inputs::run(
        cache.clone(),
        plan_sources.clone(),
        xds_metrics.clone(),
        shutdown.stopped_owned(),
    ));
    let shared = Arc::new(Shared {
        reports: reports.clone(),
        store: store.clone(),
        leader_store: leader_store.clone(),
        cache: cache.clone(),
        pickers: built.clone(),
        loads: loads.clone(),
        demand: demand.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        session_queue: config.session_queue,
        stall_deadline: config.stall_deadline,
        session_heartbeat: config.session_heartbeat,
        max_session_age: config.max_session_age,
        next_session: AtomicU64::new(0),
        sessions: std::sync::atomic::AtomicUsize::new(0),
        max_sessions: config.max_sessions,
        health,
        circuits: reports::circuits::CircuitTracker::new(),
        readiness: readiness.clone(),
        acks: Default::default(),
        xds_clients: xds_clients.clone(),
        replica_id: coordination.replica_id().clone(),
        board: coordination.board(),
        members: coordination.members(),
        barriers: Default::default(),
    });
    if let Some(board) = shared.board.clone() {
        // Several replicas: zone demand is summed over them (`reports::demand::replicas`).
        shutdown.spawn(reports::demand::replicas::share(
            demand.clone(),
            board.clone(),
            shared.replica_id.clone(),
            shared.members.clone(),
            shutdown.stopped_owned(),
        ));
        let (shared, stop) = (shared.clone(), shutdown.clone());
        shutdown.spawn(async move {
            tokio::select! {
                () = crate::api::barrier::answer_requests(shared, board) => {}
                () = stop.stopped() => {}
            }
        });
    }
    shutdown.spawn(
        cache
            .clone()
            .follow(store.clone(), Some(loaded), shutdown.stopped_owned()),
    );
    shutdown.spawn(pickers::run_builders(Arc::new(pickers::Builders {
        cache: cache.clone(),
        pickers: built,
        loads,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    })));
    shutdown.spawn({
        let (gauges, coordination) = (metrics.replicas.clone(), coordination.clone());
        let stop = shutdown.clone();
        async move { gauges.follow(&*coordination, stop).await }
    });
    shutdown.spawn(health::passive::run(
        Arc::new(health::passive::Context {
            cache: cache.clone(),
            leader_store: shared.leader_store.clone(),
            health: shared.health.clone(),
            metrics: metrics.passive.clone(),
            reports,
            shutdown: shutdown.clone(),
        }),
        reports_rx,
        coordination.clone(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in HEALTH_SERVICES {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let ready_task = shutdown.spawn(readiness::run(
        cache.clone(),
        coordination.contact(),
        readiness::Timing {
            grace: config.ready_grace,
            going_away_after: config.going_away_after,
        },
        ready_tx,
        health.clone(),
        metrics.readiness.clone(),
        shutdown.clone(),
    ));
    // Reflection in both versions tools speak (grpcurl and grpcio's reflection client still
    // use v1alpha), listing the health service too; an unknown symbol is an in-stream
    // `error_response` ([`reflection`]).
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(dlb::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection::v1::wrap(reflection_builder().build_v1()?, shutdown.clone());
    let reflection_v1alpha =
        reflection::v1alpha::wrap(reflection_builder().build_v1alpha()?, shutdown.clone());

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        let mut server_tls = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
        );
        if let Some(ca) = &tls.client_ca_pem {
            server_tls = server_tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder.tls_config(server_tls)?;
    }
    let router = builder
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .layer(status_layer::OversizeLayer)
        .layer(auth::AuthLayer::new(config.auth.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            RegistryServer::new(RegistryService::new(shared.clone()))
                .max_decoding_message_size(dlb::model::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(dlb::model::MAX_MESSAGE_BYTES),
        )
        .add_service(
            DiscoveryServer::new(DiscoveryService::new(shared.clone()))
                .max_decoding_message_size(dlb::model::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(dlb::model::MAX_MESSAGE_BYTES),
        )
        // Standard xDS (ADS) for stock gRPC clients, on the same port (see `xds`).
        .add_service(
            xds::XdsService::new(
                cache.clone(),
                xds_metrics,
                xds_clients.clone(),
                shutdown.clone(),
                config.max_sessions,
            )
            .with_readiness(readiness.clone())
            .with_plan_sources(plan_sources)
            .into_server(),
        )
        .add_service(xds::status::XdsStatusService::new(xds_clients.clone()).into_server())
        .add_service(
            dlb::proto::membership_server::MembershipServer::new(MembershipService::new(
                shared.clone(),
                leases.clone(),
                dns,
            ))
            .max_decoding_message_size(dlb::model::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(dlb::model::MAX_MESSAGE_BYTES),
        );
    let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let grpc =
        shutdown.spawn(router.serve_with_incoming_shutdown(incoming, shutdown.stopped_owned()));

    let metrics_task = metrics_listener.map(|listener| {
        let page = status::Status {
            shared: shared.clone(),
            xds_clients: xds_clients.clone(),
            coordination: coordination.clone(),
            leases: leases.clone(),
            auth: config.auth.clone(),
            store_kind: match &config.store {
                crate::config::StoreConfig::Memory => "memory",
                crate::config::StoreConfig::Embedded(_) => "embedded",
                crate::config::StoreConfig::Etcd(_) => "etcd",
            },
        };
        let app = metrics::router(metrics.clone()).merge(status::router(Arc::new(page)));
        let stopped = shutdown.stopped_owned();
        shutdown.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
        })
    });
    tracing::debug!(%grpc_addr, ?metrics_addr, epoch = store.epoch(), "dlb-server started");
    Ok(RunningServer {
        grpc_addr,
        metrics_addr,
        epoch: store.epoch(),
        store,
        health,
        shutdown,
        grace: config.shutdown_grace,
        grpc: Some(grpc),
        metrics: metrics_task,
        ready_task: Some(ready_task),
        coordination,
        shared,
        xds_clients,
    })
}
