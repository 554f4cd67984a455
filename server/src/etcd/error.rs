//! How an etcd error becomes a dlbd [`Error`] (feature `etcd`): transient failures are
//! [`Error::StorageUnavailable`] (answered UNAVAILABLE), the rest [`Error::Storage`]. One
//! function for every part of dlbd that talks to etcd (the store, leases, replicas).

use crate::error::Error;

/// An etcd error as an [`Error`]: [`Error::StorageUnavailable`] when it is transient (etcd
/// says UNAVAILABLE or DEADLINE_EXCEEDED — no leader, leader changed, timed out — or the
/// request failed in transport), else [`Error::Storage`]. `what` names the part of dlbd (e.g.
/// "etcd (leases)"); `hint` is appended to the message.
pub(crate) fn etcd_error(what: &str, e: &etcd_client::Error, hint: &str) -> Error {
    let msg = format!("{what}: {e}{hint}");
    if etcd_transient(e) {
        Error::StorageUnavailable(msg)
    } else {
        Error::Storage(msg)
    }
}

/// Whether an etcd error is transient (see [`etcd_error`]).
fn etcd_transient(e: &etcd_client::Error) -> bool {
    use std::error::Error as _;
    match e {
        etcd_client::Error::IoError(_) | etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => true,
            // tonic reports a failed HTTP/2 exchange (connection reset, broken pipe) as
            // UNKNOWN with the transport error as its source.
            tonic::Code::Unknown => {
                let mut source = s.source();
                while let Some(err) = source {
                    if err.is::<tonic::transport::Error>()
                        || err.is::<hyper::Error>()
                        || err.is::<std::io::Error>()
                    {
                        return true;
                    }
                    source = err.source();
                }
                false
            }
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod etcd_tests {
    use super::*;

    #[test]
    fn transient_etcd_errors_are_unavailable_and_others_internal() {
        let leader = etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
            "etcdserver: leader changed",
        ));
        let e = etcd_error("etcd", &leader, "");
        assert!(matches!(e, Error::StorageUnavailable(_)), "{e:?}");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
        let deadline = etcd_client::Error::GRpcStatus(tonic::Status::deadline_exceeded("t"));
        assert!(matches!(
            etcd_error("etcd", &deadline, ""),
            Error::StorageUnavailable(_)
        ));
        let reset = etcd_client::Error::GRpcStatus(tonic::Status::from_error(Box::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        )));
        assert!(matches!(
            etcd_error("etcd", &reset, ""),
            Error::StorageUnavailable(_)
        ));
        let big = etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument(
            "etcdserver: request is too large",
        ));
        let e = etcd_error("etcd", &big, " (raise it)");
        assert!(
            matches!(&e, Error::Storage(m) if m.ends_with("(raise it)")),
            "{e:?}"
        );
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Internal);
    }
}
