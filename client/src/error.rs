//! The SDK's error type.
//!
//! One [`Error`] enum for every fallible SDK call: local validation failures (raised before
//! anything goes on the wire, with the same messages `dlbd` would produce), picks that find no
//! backend, and gRPC failures mapped from their status code. [`Error::exit_code`] gives the
//! `dlbctl` exit code of each variant.

use dlb::balance::PickError;
use dlb::model::ValidationError;

/// Everything that can go wrong in the SDK.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed. Raised locally (before any RPC) or by the server
    /// (`INVALID_ARGUMENT`); the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named server (or service, for admin calls) does not exist (`NOT_FOUND`).
    #[error("not found: {0}")]
    NotFound(String),
    /// The server id is already taken in that service (`ALREADY_EXISTS`).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The call contradicts the service's policy (`FAILED_PRECONDITION`).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The control plane says the subscribed service does not exist: the handle does not route.
    #[error("service {0:?} does not exist")]
    ServiceNotFound(String),
    /// The local picker has no backend to offer (none at all, none eligible, or the session's
    /// strict sticky backend is gone).
    #[error("no backend for service {service:?}: {reason}")]
    NoBackend {
        /// The service.
        service: String,
        /// Why the picker found nothing.
        reason: PickError,
    },
    /// No control plane could be reached, or the service's first snapshot did not arrive in time.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The client has been shut down.
    #[error("client is closed")]
    Closed,
    /// An endpoint URI could not be parsed.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The service's concurrent-call cap (policy `circuit_breaker.max_concurrent_calls`) is
    /// reached in this SDK: the call was not started (like `RESOURCE_EXHAUSTED`).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// A call through the call path (`call::Balance`) failed without a response.
    #[error("call failed ({class}): {message}")]
    Call {
        /// The error class (`connect`, `transport`, `no_backend`, `deadline`).
        class: &'static str,
        /// What happened.
        message: String,
    },
    /// Any other gRPC failure, with its status.
    #[error("rpc failed: {0}")]
    Rpc(tonic::Status),
    /// A drain barrier's deadline passed before every client confirmed (the message says how
    /// many had not).
    #[error("drain barrier: {0}")]
    BarrierDeadline(String),
}

impl Error {
    /// The `dlbctl` exit code for this error: 2 invalid argument, 3 not found, 4 already exists,
    /// 5 failed precondition, 6 a drain barrier's deadline passed, 1 anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::InvalidArgument(_) | Error::InvalidEndpoint { .. } => 2,
            Error::NotFound(_) | Error::ServiceNotFound(_) => 3,
            Error::AlreadyExists(_) => 4,
            Error::FailedPrecondition(_) => 5,
            Error::BarrierDeadline(_) => 6,
            _ => 1,
        }
    }
}

impl From<ValidationError> for Error {
    fn from(e: ValidationError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let msg = status.message().to_owned();
        match status.code() {
            Code::InvalidArgument => Error::InvalidArgument(msg),
            Code::NotFound => Error::NotFound(msg),
            Code::AlreadyExists => Error::AlreadyExists(msg),
            Code::FailedPrecondition => Error::FailedPrecondition(msg),
            Code::Unavailable => Error::Unavailable(msg),
            _ => Error::Rpc(status),
        }
    }
}

/// Shorthand for `Result<T, dlb_client::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_status_codes_and_exit_codes() {
        let e: Error = tonic::Status::invalid_argument("invalid weight 0").into();
        assert!(matches!(e, Error::InvalidArgument(_)));
        assert_eq!(e.exit_code(), 2);
        let e: Error = tonic::Status::not_found("server x").into();
        assert_eq!(e.exit_code(), 3);
        let e: Error = tonic::Status::already_exists("server x").into();
        assert_eq!(e.exit_code(), 4);
        let e: Error = tonic::Status::unavailable("down").into();
        assert!(matches!(e, Error::Unavailable(_)));
        assert_eq!(e.exit_code(), 1);
        let e: Error = tonic::Status::internal("boom").into();
        assert!(matches!(e, Error::Rpc(_)));
        let e: Error = dlb::model::validate_weight(0).unwrap_err().into();
        assert!(e.to_string().contains("weight"));
    }
}
