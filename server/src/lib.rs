//! # dlb-server — the DLB control plane
//!
//! The library behind `dlbd`: it holds the routing state of every service, serves the
//! `dlb.v1.Registry` (admin) and `dlb.v1.Discovery` (SDK sessions) gRPC services, the standard
//! gRPC health and reflection services, and Prometheus metrics on a separate HTTP port.
//!
//! Parts:
//!
//! * [`config`] — [`ServerConfig`] and its YAML form;
//! * [`store`] — the versioned state: the [`store::Store`] contract (revisions, atomic batches
//!   with compare-and-set, resumable watches) and its memory and embedded (redb) implementations;
//! * [`cache`] — the protocol-neutral snapshot cache that follows the store: per-service
//!   snapshots, bounded delta history and per-service watchers;
//! * [`registry`] — the Registry RPCs; [`discovery`] — the DLB sessions, a thin front-end over
//!   the cache;
//! * [`membership`] — the Membership RPCs (automatic discovery): [`leases`] (self-registration
//!   with a TTL, one task owning the deadlines) and [`dns`] (services that follow a DNS name);
//! * [`auth`] — bearer tokens: who may write and who may read;
//! * [`health`] — active health checks: probes, one state machine per backend, flap damping,
//!   verdicts written to the probe source on transitions;
//! * [`pickers`] — the server-side pickers `GetNextServer` answers from, one builder task per
//!   service;
//! * [`loads`] — in-flight sums from SDK load reports; [`metrics`] — Prometheus metrics;
//! * [`readiness`] — whether this replica serves: its cache in step with the store;
//! * [`replicas`] — the live replicas of a deployment ([`replicas::Coordination`]: alone, or
//!   leased keys in etcd) and how per-backend work is split among them;
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

pub mod api;
mod app;
pub mod cache;
pub mod config;
mod error;
pub mod etcd;
pub mod health;
mod listing;
pub mod log_limit;
pub mod membership;
pub mod metrics;
pub mod pickers;
pub mod readiness;
pub mod replicas;
pub mod reports;
mod shutdown;
pub mod store;

pub use app::{spawn, spawn_with_store, RunningServer, ETCD_SUPPORTED, HEALTH_SERVICES};
pub use config::{
    ConfigError, EtcdConfig, EtcdTls, ServerConfig, ServiceConfig, StoreConfig, TlsConfig,
};
pub use error::Error;
