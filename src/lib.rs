//! # dlb — the core of DLB
//!
//! Shared by the control plane (`dlb-server`, binary `dlbd`) and the SDK (`dlb-client`, binary
//! `dlbctl`). It owns three things and no runtime:
//!
//! * [`proto`] — the generated wire types and gRPC stubs for `proto/dlb/v1/dlb.proto`;
//! * [`model`] — the domain rules every entry point applies the same way: identifier, address,
//!   weight and policy validation, and conversions between wire and domain types;
//! * [`routing`] — the one build of a service's picker from its stored records and policy
//!   (eligibility, latency shares, slow start, sticky tables), shared by `dlbd` and the SDK;
//! * [`validation`] — the error every check returns ([`validation::ValidationError`]) and the
//!   quoting of client text in it: a leaf module, so that the policy modules below report errors
//!   without importing [`model`] (which imports them to validate a whole policy);
//! * [`health_check`] — validation and defaults of a service's active health check;
//! * [`sources`] — backend state from separate sources (admin, probe, outlier, latency) and the one pure
//!   function that derives a backend's effective state and the reason for it;
//! * [`wire`] — server-side wire types: an outbound session message encoded once and shared by
//!   every session that receives it;
//! * [`health_policy`] — outlier detection and panic settings of a policy, and the exact
//!   max-ejection rule;
//! * [`balance`] — the balancing algorithms: immutable pickers (smooth weighted round robin,
//!   least connections exact and P2C, Maglev, ring hash, bounded load) and sticky sessions. They are
//!   plain data plus atomics, testable without tokio;
//! * [`circuit`] — the SDK's per-backend circuit breaker (configuration and pure state machine);
//! * [`slow_start`] — the weight ramp of newly eligible backends, applied by every picker builder;
//! * [`adaptive`] — adaptive weights: the pure decision that lowers a slow backend's share, and
//!   its application to picker inputs;
//! * [`call`] — the SDK call path's policy (retries, retry budget, hedging, Peak-EWMA tuning)
//!   and its runtime-free pieces: the retry budget and the latency percentile tracker;
//! * [`locality`] — where backends and clients run, backend failover priorities, and the
//!   routing plan over them (priority failover, zone-aware routing);
//! * [`backoff`] — capped exponential backoff (optionally jittered), the one schedule every
//!   retry loop of the server and the SDK waits by.

pub mod adaptive;
pub mod backoff;
pub mod balance;
pub mod call;
pub mod circuit;
pub mod health_check;
pub mod health_policy;
pub mod locality;
pub mod model;
pub mod routing;
pub mod slow_start;
pub mod sources;
pub mod validation;
pub mod wire;

/// Generated protobuf types and gRPC client/server stubs for `dlb.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod proto {
    tonic::include_proto!("dlb.v1");

    /// Encoded `FileDescriptorSet` of the wire API, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/dlb_descriptor.bin"));
}
