//! # dlb-server — the DLB control plane
//!
//! The library behind `dlbd`: it holds the routing state of every service, serves the
//! `dlb.v1.Registry` (admin) and `dlb.v1.Discovery` (SDK sessions) gRPC services, the standard
//! gRPC health and reflection services, and Prometheus metrics on a separate HTTP port.
//!
//! Parts:
//!
//! * [`config`] — [`ServerConfig`] and its YAML form;
//! * [`store`] — the versioned state ([`store::Store`] trait, in-memory implementation);
//! * [`registry`] — the Registry RPCs; [`discovery`] — the Discovery sessions;
//! * [`pickers`] — the server-side pickers `GetNextServer` answers from;
//! * [`loads`] — in-flight sums from SDK load reports; [`metrics`] — Prometheus metrics;
//! * [`spawn`] / [`RunningServer`] — start and gracefully stop everything.
//!
//! ```no_run
//! # async fn demo() -> Result<(), dlb_server::Error> {
//! use dlb_server::{spawn, ServerConfig};
//! let server = spawn(ServerConfig {
//!     listen: "127.0.0.1:0".parse().expect("literal"),
//!     metrics_listen: None,
//!     ..Default::default()
//! })
//! .await?;
//! println!("serving on {}", server.grpc_addr());
//! server.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod discovery;
mod error;
pub mod loads;
pub mod metrics;
pub mod pickers;
pub mod registry;
mod state;
pub mod store;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use dlb::proto::discovery_server::DiscoveryServer;
use dlb::proto::registry_server::RegistryServer;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

pub use config::{ConfigError, ServerConfig, ServiceConfig};
pub use error::Error;

use crate::discovery::DiscoveryService;
use crate::metrics::Metrics;
use crate::pickers::Pickers;
use crate::registry::RegistryService;
use crate::state::Shared;
use crate::store::{MemoryStore, Store};

/// gRPC service names reported SERVING by the health service (besides `""`).
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

/// Starts a control plane with a fresh in-memory store (new random epoch) holding the
/// configured services. Binds both listeners (port 0 picks a free port), starts serving and
/// returns.
pub async fn spawn(config: ServerConfig) -> Result<RunningServer, Error> {
    let store = Arc::new(MemoryStore::new(config.history_size, config.feed_capacity));
    spawn_with_store(config, store).await
}

/// Like [`spawn`], on a given store. Configured services that the store does not hold yet are
/// created; existing ones are left as they are.
pub async fn spawn_with_store(
    config: ServerConfig,
    store: Arc<dyn Store>,
) -> Result<RunningServer, Error> {
    for svc in &config.services {
        match store
            .create_service(svc.name.clone(), svc.policy, svc.backends.clone())
            .await
        {
            Ok(_) | Err(Error::ServiceExists(_)) => {}
            Err(e) => return Err(e),
        }
    }
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

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::with_per_backend(config.per_backend_metrics));
    let shared = Arc::new(Shared {
        store: store.clone(),
        pickers: Pickers::new(),
        loads: loads::LoadTracker::new(),
        metrics: metrics.clone(),
        shutdown: shutdown_rx.clone(),
        session_queue: config.session_queue,
        next_session: AtomicU64::new(0),
    });
    shared.refresh_all().await?;
    let follower = tokio::spawn(shared.clone().follow_store());

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in HEALTH_SERVICES {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dlb::proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(RegistryServer::new(RegistryService::new(shared.clone())))
        .add_service(DiscoveryServer::new(DiscoveryService::new(shared.clone())));
    let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let mut signal = shutdown_rx.clone();
    let grpc = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async move {
                crate::state::stopped(&mut signal).await;
            })
            .await
    });

    let metrics_task = metrics_listener.map(|listener| {
        let mut signal = shutdown_rx.clone();
        let app = metrics::router(metrics.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    crate::state::stopped(&mut signal).await;
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
    })
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

    /// The store's epoch (random per store instance).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The store (to read or write state in-process).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
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
        result
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}
