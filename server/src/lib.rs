//! # dlb-server — the DLB control plane
//!
//! The library behind `dlbd`: it holds the routing state of every service, serves the
//! `dlb.v1.Registry` (admin) and `dlb.v1.Discovery` (SDK sessions) gRPC services, the standard
//! gRPC health and reflection services, and Prometheus metrics on a separate HTTP port.
//!
//! The tree, in dependency order (a module uses only those above it; `modgraph.py` checks it):
//!
//! * [`error`](Error) — [`Error`] and [`ConfigError`], and the one conversion to a gRPC status;
//!   [`shutdown`] — the one shutdown signal and the set of tasks a server owns ([`Shutdown`]);
//!   `listing` and [`log_limit`] — bounds on listing answers and on client-triggered log lines;
//! * [`etcd`] — the etcd connection shared by the store, the replicas and the leases;
//! * [`store`] — the versioned state: the [`store::Store`] contract (revisions, atomic batches
//!   with compare-and-set, resumable watches) and its memory, embedded (redb) and etcd
//!   implementations;
//! * [`cache`] — the protocol-neutral snapshot cache that follows the store: per-service
//!   snapshots, bounded delta history, per-service watchers;
//! * [`replicas`] — the live replicas of a deployment ([`replicas::Coordination`]: alone, or
//!   leased keys in etcd), leader election, how per-backend work is split among them;
//! * [`reports`] — the SDKs' load reports coming in: in-flight sums, global least connections,
//!   circuit states, the sums forwarded to the leader;
//! * [`health`] — [`health::active`] probes and [`health::passive`] outlier detection and
//!   adaptive weights, each written to its own health source;
//! * [`locality`] — the locality plan of each client zone of a service, as an SDK there plans
//!   it (`GetLocalityPlan`) and the locality metrics computed from it at scrape time;
//! * [`membership`] — automatic discovery: [`membership::leases`] (self-registration) and
//!   [`membership::dns`] (services that follow a DNS name);
//! * [`readiness`] — whether this replica serves: its cache in step with the store;
//! * [`metrics`] — the Prometheus registry and `/metrics`; [`pickers`] — the server-side
//!   pickers `GetNextServer` answers from, one builder task per service;
//! * [`api`] — the gRPC front-ends: Registry, Discovery sessions, Membership, health RPCs,
//!   standard xDS, auth;
//! * [`config`] — [`ServerConfig`] and its YAML form;
//! * [`status`] — the read-only status page and its JSON API, on the metrics listener;
//! * `app` — [`serve`] (on bound [`Listeners`]) / [`spawn`] / [`RunningServer`]: start and
//!   gracefully stop everything.
//!
//! `docs/architecture.md` walks a write from `dlbctl` to an SDK through these files.
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
pub mod locality;
pub mod log_limit;
pub mod membership;
pub mod metrics;
pub mod pickers;
pub mod readiness;
pub mod replicas;
pub mod reports;
pub mod shutdown;
pub mod status;
pub mod store;

pub use app::{
    serve, spawn, spawn_with_store, Listeners, RunningServer, ETCD_SUPPORTED, HEALTH_SERVICES,
};
pub use config::{
    ConfigError, EtcdConfig, EtcdTls, ServerConfig, ServiceConfig, StoreConfig, TlsConfig,
};
pub use error::Error;
pub use shutdown::Shutdown;
