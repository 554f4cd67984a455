//! Health: every way `dlbd` decides whether a backend should take traffic.
//!
//! * [`active`] — probes `dlbd` runs itself (HTTP, TCP, gRPC): one checker task, one state
//!   machine per backend, flap damping, verdicts written to the probe source;
//! * [`passive`] — outlier detection and adaptive weights from the SDKs' load reports (the
//!   leader's decisions, written to the outlier and latency sources);
//! * the seed calls `health_check_passed` / `health_check_failed` (the admin source, or one
//!   result in the checker's state machine), answered by the Registry front-end.
//!
//! Each source is one field of a backend's record, written only through [`sources`] (one
//! function per source); the core (`dlb::sources`) derives the effective state and its reason
//! from them.

pub mod active;
pub mod passive;
pub(crate) mod sources;

pub(crate) use active::{is_checked, start};
pub use active::{HealthHandle, TargetView, DEFAULT_MAX_IN_FLIGHT};
