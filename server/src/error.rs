//! The crate's error types — [`Error`], and [`ConfigError`] (a configuration that could not be
//! loaded; [`Error::Config`] wraps it, `config` re-exports it) — and the single conversion to a
//! gRPC status.
//!
//! Handlers return [`Error`]; the one `impl From<Error> for tonic::Status` at the edge decides
//! the code: malformed input ⇒ `INVALID_ARGUMENT` (the message is the `ValidationError`'s
//! Display, naming the field and value), unknown service/server ⇒ `NOT_FOUND`, duplicate id ⇒
//! `ALREADY_EXISTS`, no eligible backend ⇒ `UNAVAILABLE`, a stale compare-and-set ⇒
//! `FAILED_PRECONDITION`.

use std::net::SocketAddr;

use dlb::balance::{BuildError, PickError};
use dlb::model::ValidationError;

/// A client-supplied name as it appears in an error: quoted, escaped, at most
/// `dlb::model::MAX_QUOTED` bytes, with its length when cut.
fn quoted(s: &str) -> String {
    let p = dlb::model::prefix(s, dlb::model::MAX_QUOTED);
    if p.len() < s.len() {
        format!("{p:?}… ({} bytes)", s.len())
    } else {
        format!("{s:?}")
    }
}

/// Errors of the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed field.
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    /// The service does not exist.
    #[error("service {} not found", quoted(.0))]
    ServiceNotFound(String),
    /// The service still has backends (removing it needs `force`).
    #[error(
        "service {} has {backends} backend(s): remove them first, or force the removal",
        quoted(service)
    )]
    ServiceNotEmpty {
        /// The service.
        service: String,
        /// How many backends it has.
        backends: usize,
    },
    /// The backend does not exist in the service.
    #[error(
        "server_id {} not found in service {}",
        quoted(server_id),
        quoted(service)
    )]
    ServerNotFound {
        /// The service.
        service: String,
        /// The unknown backend id.
        server_id: String,
    },
    /// The backend id is taken in the service.
    #[error(
        "server_id {} already exists in service {}",
        quoted(server_id),
        quoted(service)
    )]
    AlreadyExists {
        /// The service.
        service: String,
        /// The duplicate backend id.
        server_id: String,
    },
    /// No backend could be picked.
    #[error("service {}: {source}", quoted(service))]
    Unavailable {
        /// The service.
        service: String,
        /// Why the pick failed.
        source: PickError,
    },
    /// The picker could not be built from stored state (a bug: stored state is validated).
    #[error("service {}: cannot build picker: {source}", quoted(service))]
    Picker {
        /// The service.
        service: String,
        /// The build error.
        source: BuildError,
    },
    /// A listener could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A compare-and-set write found another version than it expected.
    #[error(
        "service {} is at version {current}, not the expected {expected}; re-read and retry",
        quoted(service)
    )]
    VersionMismatch {
        /// The service.
        service: String,
        /// The version the write expected.
        expected: u64,
        /// The service's current version (0: it does not exist).
        current: u64,
    },
    /// A quota or size limit would be exceeded.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The store's storage failed (disk, database file).
    #[error("storage: {0}")]
    Storage(String),
    /// The store's backing service could not answer for now (etcd unreachable, a connection
    /// reset, a leader change, a deadline): transient, worth retrying with a backoff. A write
    /// that failed so may or may not have been applied (read before retrying a
    /// non-idempotent one).
    #[error("storage unavailable: {0}")]
    StorageUnavailable(String),
    /// A background task failed or panicked.
    #[error("task failed: {0}")]
    Task(String),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::Invalid(_) | Error::Config(_) => tonic::Status::invalid_argument(msg),
            Error::ServiceNotFound(_) | Error::ServerNotFound { .. } => {
                tonic::Status::not_found(msg)
            }
            Error::AlreadyExists { .. } => tonic::Status::already_exists(msg),
            Error::Unavailable { .. } | Error::StorageUnavailable(_) => {
                tonic::Status::unavailable(msg)
            }
            Error::VersionMismatch { .. } | Error::ServiceNotEmpty { .. } => {
                tonic::Status::failed_precondition(msg)
            }
            Error::ResourceExhausted(_) => tonic::Status::resource_exhausted(msg),
            Error::Picker { .. }
            | Error::Bind { .. }
            | Error::Transport(_)
            | Error::Reflection(_)
            | Error::Storage(_)
            | Error::Task(_) => tonic::Status::internal(msg),
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// YAML syntax, unknown field or wrong type (serde_yaml's message names the field and
    /// position).
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// serde_yaml's message.
        message: String,
        /// 1-based line, when known.
        line: Option<usize>,
    },
    /// A value that parses but is not valid.
    #[error("{file}: {path}: {error}{}", .line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid {
        /// The file.
        file: String,
        /// Path of the value, e.g. `services[0].backends[1].weight`.
        path: String,
        /// 1-based line, when found.
        line: Option<usize>,
        /// What is wrong (its Display is part of this error's).
        error: Box<ValidationError>,
    },
}

impl ConfigError {
    /// The 1-based line of the error, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Read { .. } => None,
            Self::Syntax { line, .. } | Self::Invalid { line, .. } => *line,
        }
    }
}
