//! Starting and stopping a control plane: opens the store and the replica set, loads the
//! snapshot cache, starts every task, serves the gRPC port and the metrics port, and stops it
//! all gracefully ([`RunningServer::shutdown`]).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use dlb::proto::registry_server::RegistryServer;
use dlb::wire::discovery_server::DiscoveryServer;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::api::{auth, membership::MembershipService, reflection, status_layer, xds};
use crate::config::{EtcdConfig, ServerConfig, StoreConfig};
use crate::membership::{self, dns, leases};
use crate::Error;
use crate::{health, metrics, pickers, readiness, replicas, reports, store};

use crate::api::discovery::DiscoveryService;
use crate::api::registry::RegistryService;
use crate::api::Shared;
use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::pickers::Pickers;
use crate::store::{EmbeddedStore, MemoryStore, Mutation, Store};

/// gRPC service names the health service reports (besides `""`). `dlb.v1.Registry` is
/// SERVING while the server runs; `""` and `dlb.v1.Discovery` follow the replica's
/// [`readiness`].
pub const HEALTH_SERVICES: [&str; 2] = ["dlb.v1.Registry", "dlb.v1.Discovery"];

/// Binds a TCP listener with `SO_REUSEADDR`, so a restarted server can take the same port at
/// once.
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
/// Binds both listeners (port 0 picks a free port), starts serving and returns.
pub async fn spawn(config: ServerConfig) -> Result<RunningServer, Error> {
    config.validate()?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let id = config
        .replica_id
        .clone()
        .unwrap_or_else(replicas::default_id);
    let opened: Opened = match &config.store {
        StoreConfig::Memory => {
            let store = MemoryStore::new(config.store_history)
                .with_history_bytes(config.store_history_bytes);
            Opened::single(Arc::new(store), &id)
        }
        StoreConfig::Embedded(dir) => {
            let dir = dir.clone();
            let history = config.store_history;
            let store =
                tokio::task::spawn_blocking(move || EmbeddedStore::open_with_history(dir, history))
                    .await
                    .map_err(|e| Error::Task(e.to_string()))??;
            let store = store.with_history_bytes(config.store_history_bytes);
            Opened::single(Arc::new(store), &id)
        }
        StoreConfig::Etcd(etcd) => {
            open_etcd(etcd, &id, config.replica_ttl, shutdown_rx.clone()).await?
        }
    };
    start(config, opened, shutdown_tx, shutdown_rx).await
}

/// Whether this build has the etcd store (cargo feature `etcd`); without it `StoreConfig::Etcd`
/// fails at start with an error naming the feature.
pub const ETCD_SUPPORTED: bool = cfg!(feature = "etcd");

/// The store and the replica set of a deployment.
struct Opened {
    store: Arc<dyn Store>,
    coordination: Arc<dyn replicas::Coordination>,
    /// What the leader's singleton jobs write through (fenced on etcd, `store` on one node).
    leader_store: Arc<dyn Store>,
    /// Self-registration leases kept in etcd (`None`: the in-process [`leases::LeaseManager`]).
    #[cfg(feature = "etcd")]
    etcd_leases: Option<leases::etcd::EtcdLeases>,
}

impl Opened {
    /// A replica alone on `store`.
    fn single(store: Arc<dyn Store>, id: &str) -> Self {
        Self {
            leader_store: store.clone(),
            store,
            coordination: Arc::new(replicas::Single::new(id)),
            #[cfg(feature = "etcd")]
            etcd_leases: None,
        }
    }
}

#[cfg(feature = "etcd")]
async fn open_etcd(
    config: &EtcdConfig,
    id: &str,
    ttl: Duration,
    shutdown: watch::Receiver<bool>,
) -> Result<Opened, Error> {
    let store = store::EtcdStore::connect(config).await?;
    let members = replicas::etcd::EtcdCoordination::start(config, id, ttl, shutdown).await?;
    let leases = leases::etcd::EtcdLeases::connect(config).await?;
    let leader_store = Arc::new(store.fenced(replicas::Coordination::leadership(&*members)));
    Ok(Opened {
        store: Arc::new(store),
        coordination: members,
        leader_store,
        etcd_leases: Some(leases),
    })
}

#[cfg(not(feature = "etcd"))]
async fn open_etcd(
    _: &EtcdConfig,
    _: &str,
    _: Duration,
    _: watch::Receiver<bool>,
) -> Result<Opened, Error> {
    // A configuration error, not a storage one: no retry can make this build talk to etcd, and
    // callers (dlbd among them) retry storage errors of an etcd store.
    Err(Error::Invalid(dlb::model::ValidationError::new(
        "store",
        "etcd",
        "this build has no etcd store: rebuild dlb-server (dlbd) with `--features etcd`",
    )))
}

/// Applies the configured services to the store as declarative writes. A service that lists a
/// policy or backends gets the file's policy and each listed backend's configuration (address,
/// weight, hash key, metadata) — a no-op when the store already matches; backends registered
/// through the API and runtime state (drain, health sources) are kept. A service listed with
/// nothing to declare (like the implicit `default`) is only created when missing.
async fn apply_config(config: &ServerConfig, store: &dyn Store) -> Result<(), Error> {
    for svc in &config.services {
        let declares = !svc.backends.is_empty() || svc.policy != dlb::model::default_policy();
        if !declares {
            let create = vec![Mutation::SetPolicy(svc.policy.clone())];
            match store.apply(svc.name.clone(), create, Some(0)).await {
                Ok(_) | Err(Error::VersionMismatch { .. }) => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        let mut mutations = vec![Mutation::SetPolicy(svc.policy.clone())];
        mutations.extend(svc.backends.iter().cloned().map(Mutation::Declare));
        let applied = store.apply(svc.name.clone(), mutations, None).await?;
        if applied.changed {
            tracing::info!(service = %svc.name, version = applied.version.version, "configuration applied");
        }
    }
    Ok(())
}

/// Like [`spawn`], on a given store. See [`apply_config`] for how the configured services meet
/// the stored state.
/// The replica is alone ([`replicas::Single`]).
pub async fn spawn_with_store(
    config: ServerConfig,
    store: Arc<dyn Store>,
) -> Result<RunningServer, Error> {
    config.validate()?;
    let id = config
        .replica_id
        .clone()
        .unwrap_or_else(replicas::default_id);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    start(config, Opened::single(store, &id), shutdown_tx, shutdown_rx).await
}

/// Starts everything on an open store and replica set.
async fn start(
    config: ServerConfig,
    opened: Opened,
    shutdown_tx: watch::Sender<bool>,
    shutdown_rx: watch::Receiver<bool>,
) -> Result<RunningServer, Error> {
    let store = opened.store.clone();
    let coordination = opened.coordination.clone();
    let leader_store = opened.leader_store.clone();
    let leadership = coordination.leadership();
    apply_config(&config, &*store).await?;
    let grpc_listener = bind(config.listen)?;
    let grpc_addr = grpc_listener.local_addr().map_err(|source| Error::Bind {
        addr: config.listen,
        source,
    })?;
    let metrics_listener = config.metrics_listen.map(bind).transpose()?;
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
    let (leases, lease_task) = start_leases(&opened, &metrics.membership, &initial, &shutdown_rx);
    let dns = dns::DnsManager::start(
        store.clone(),
        leader_store.clone(),
        leadership.clone(),
        metrics.membership.clone(),
        config.dns.clone(),
        &initial,
        shutdown_rx.clone(),
    );
    #[cfg(feature = "etcd")]
    if opened.etcd_leases.is_some() {
        // Several replicas: names declared or removed through another one reach the leader.
        dns.rescan_while_leading(cache.clone());
    }
    let discovery = tokio::spawn(membership::run_until_stopped(
        lease_task,
        dns.clone(),
        shutdown_rx.clone(),
    ));
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
    let (health, _health_task) = health::start(
        cache.clone(),
        store.clone(),
        Arc::new(health::active::probe::NetProber),
        config.health_max_in_flight,
        metrics.health.clone(),
        replicas::Share::of(&*coordination),
        shutdown_rx.clone(),
    );
    let shared = Arc::new(Shared {
        reports: reports.clone(),
        store: store.clone(),
        leader_store: leader_store.clone(),
        cache: cache.clone(),
        pickers: built.clone(),
        loads: loads.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown_rx.clone(),
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
    });
    let mut signal = shutdown_rx.clone();
    let follower = tokio::spawn(
        cache
            .clone()
            .follow(store.clone(), Some(loaded), async move {
                crate::shutdown::stopped(&mut signal).await;
            }),
    );
    let builders = tokio::spawn(pickers::run_builders(Arc::new(pickers::Builders {
        cache: cache.clone(),
        pickers: built,
        loads,
        metrics: metrics.clone(),
        shutdown: shutdown_rx.clone(),
    })));
    tokio::spawn({
        let (gauges, coordination) = (metrics.replicas.clone(), coordination.clone());
        let stop = shutdown_rx.clone();
        async move { gauges.follow(&*coordination, stop).await }
    });
    let outlier_task = tokio::spawn(health::passive::run(
        Arc::new(health::passive::Context {
            cache: cache.clone(),
            leader_store: shared.leader_store.clone(),
            health: shared.health.clone(),
            metrics: metrics.passive.clone(),
            reports,
            shutdown: shutdown_rx.clone(),
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
    let ready_task = tokio::spawn(readiness::run(
        cache.clone(),
        coordination.contact(),
        readiness::Timing {
            grace: config.ready_grace,
            going_away_after: config.going_away_after,
        },
        ready_tx,
        health.clone(),
        metrics.readiness.clone(),
        shutdown_rx.clone(),
    ));
    // Reflection in both versions tools speak (grpcurl and grpcio's reflection client still
    // use v1alpha), listing the health service too; an unknown symbol is an in-stream
    // `error_response` ([`reflection`]).
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(dlb::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection::v1::wrap(reflection_builder().build_v1()?);
    let reflection_v1alpha = reflection::v1alpha::wrap(reflection_builder().build_v1alpha()?);

    let xds_clients = Arc::new(xds::XdsClients::default());
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
                shutdown_rx.clone(),
                config.max_sessions,
            )
            .with_readiness(readiness.clone())
            .into_server(),
        )
        .add_service(xds::status::XdsStatusService::new(xds_clients.clone()).into_server())
        .add_service(
            dlb::proto::membership_server::MembershipServer::new(MembershipService::new(
                shared.clone(),
                leases,
                dns,
            ))
            .max_decoding_message_size(dlb::model::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(dlb::model::MAX_MESSAGE_BYTES),
        );
    let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let mut signal = shutdown_rx.clone();
    let grpc = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async move {
                crate::shutdown::stopped(&mut signal).await;
            })
            .await
    });

    let metrics_task = metrics_listener.map(|listener| {
        let mut signal = shutdown_rx.clone();
        let app = metrics::router(metrics.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    crate::shutdown::stopped(&mut signal).await;
                })
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
        shutdown: shutdown_tx,
        grace: config.shutdown_grace,
        grpc: Some(grpc),
        metrics: metrics_task,
        follower: Some(follower),
        builders: Some(builders),
        outlier: Some(outlier_task),
        discovery: Some(discovery),
        ready_task: Some(ready_task),
        coordination,
        shared,
        xds_clients,
    })
}

/// Starts the lease keeper: leases in etcd with expiry on the leader, or the in-process
/// [`leases::LeaseManager`].
fn start_leases(
    opened: &Opened,
    metrics: &membership::MembershipMetrics,
    initial: &store::StoreSnapshot,
    shutdown: &watch::Receiver<bool>,
) -> (Arc<dyn leases::Leases>, JoinHandle<()>) {
    #[cfg(feature = "etcd")]
    if let Some(etcd) = &opened.etcd_leases {
        let task = leases::etcd::start_expiry(
            etcd.clone(),
            opened.leader_store.clone(),
            metrics.clone(),
            opened.coordination.leadership(),
            shutdown.clone(),
        );
        return (Arc::new(etcd.clone()), task);
    }
    let (manager, task) = leases::LeaseManager::start(
        opened.store.clone(),
        metrics.clone(),
        initial,
        shutdown.clone(),
    );
    (Arc::new(manager), task)
}

/// A running control plane. Dropping it starts a graceful shutdown in the background;
/// [`RunningServer::shutdown`] does the same and waits for it.
pub struct RunningServer {
    grpc_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    epoch: u64,
    store: Arc<dyn Store>,
    health: tonic_health::server::HealthReporter,
    /// Set to `true` once to start the graceful shutdown; every session and server awaits it.
    shutdown: watch::Sender<bool>,
    grace: Duration,
    grpc: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    metrics: Option<JoinHandle<std::io::Result<()>>>,
    follower: Option<JoinHandle<()>>,
    builders: Option<JoinHandle<()>>,
    /// The outlier task holds the store too: awaited so a restart in the same process finds
    /// the embedded store unlocked.
    outlier: Option<JoinHandle<()>>,
    /// Leases and DNS tasks (see [`membership::run_until_stopped`]).
    discovery: Option<JoinHandle<()>>,
    /// The readiness decision ([`readiness::run`]).
    ready_task: Option<JoinHandle<()>>,
    /// The replica set this replica is a member of.
    coordination: Arc<dyn replicas::Coordination>,
    shared: Arc<Shared>,
    xds_clients: Arc<xds::XdsClients>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("grpc_addr", &self.grpc_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl RunningServer {
    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound metrics address, if metrics are enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The store's epoch (names its history: random per in-memory store, kept on disk by the
    /// embedded store).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The store (to read or write state in-process).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The snapshot cache every session reads from.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.shared.cache
    }

    /// The xDS clients connected now (ADS streams and their bookkeeping).
    pub fn xds_clients(&self) -> &Arc<xds::XdsClients> {
        &self.xds_clients
    }

    /// This replica's id among the replicas of its deployment.
    pub fn replica_id(&self) -> &str {
        self.coordination.replica_id()
    }

    /// Whether this replica is the leader now (runs lease expiry, DNS refreshes and outlier
    /// decisions). Always `true` on a single-node store.
    pub fn is_leader(&self) -> bool {
        self.coordination.is_leader()
    }

    /// This replica's leadership as it changes: `Some(fence)` while it leads (see
    /// [`replicas::Coordination::leadership`]).
    pub fn leadership(&self) -> watch::Receiver<Option<i64>> {
        self.coordination.leadership()
    }

    /// Backends this replica removed because their lease expired (`dlb_lease_expiries_total`;
    /// only the leader expires leases).
    pub fn lease_expiries(&self) -> u64 {
        self.shared.metrics.membership.expiries.get()
    }

    /// The live replicas as this one sees them.
    pub fn members(&self) -> replicas::Members {
        self.coordination.members().borrow().clone()
    }

    /// This replica's readiness (see [`readiness`]).
    pub fn readiness(&self) -> &readiness::Readiness {
        &self.shared.readiness
    }

    /// The active health checker (its view of each checked backend).
    pub fn health(&self) -> &health::HealthHandle {
        &self.shared.health
    }

    /// Server-side pickers built since start, all services together (builds are coalesced:
    /// a burst of writes costs a few builds, not one per write).
    pub fn picker_builds(&self) -> u64 {
        self.shared.pickers.builds()
    }

    /// Graceful shutdown: health turns NOT_SERVING, every session gets `GoingAway` and its
    /// stream ends, the listeners close, and open connections get up to the configured grace
    /// period to finish before they are aborted.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        for name in HEALTH_SERVICES.into_iter().chain([""]) {
            self.health
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        let _ = self.shutdown.send(true);
        // Out of the replica set at once: the others take over its health checks now.
        self.coordination.leave().await;
        // The readiness task stops at the flag; it never turns health back to SERVING after.
        if let Some(r) = self.ready_task.take() {
            let _ = r.await;
        }
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut result = Ok(());
        if let Some(mut grpc) = self.grpc.take() {
            match tokio::time::timeout_at(deadline, &mut grpc).await {
                Ok(Ok(r)) => result = r.map_err(Error::from),
                Ok(Err(e)) => result = Err(Error::Task(e.to_string())),
                Err(_) => {
                    tracing::warn!("grace period over; aborting open connections");
                    grpc.abort();
                    let _ = grpc.await;
                }
            }
        }
        if let Some(mut m) = self.metrics.take() {
            match tokio::time::timeout_at(deadline, &mut m).await {
                Ok(Ok(Err(e))) if result.is_ok() => result = Err(Error::Task(e.to_string())),
                Ok(_) => {}
                Err(_) => {
                    m.abort();
                    let _ = m.await;
                }
            }
        }
        if let Some(f) = self.follower.take() {
            let _ = f.await;
        }
        if let Some(o) = self.outlier.take() {
            let _ = o.await;
        }
        if let Some(b) = self.builders.take() {
            let _ = b.await;
        }
        if let Some(d) = self.discovery.take() {
            let _ = d.await;
        }
        result
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}
