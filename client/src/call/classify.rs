//! Reading what gRPC puts in headers: the status of a response (`grpc-status`, in the headers of
//! a trailers-only response or in the trailers) and the caller's deadline (`grpc-timeout`).

use std::time::Duration;

use http::HeaderMap;
use tonic::Code;

/// The `grpc-status` of a header or trailer block, if present and numeric.
pub(crate) fn grpc_code(headers: &HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?;
    let n: i32 = v.trim().parse().ok()?;
    Some(Code::from_i32(n))
}

/// The deadline a gRPC caller set (`grpc-timeout`: at most 8 digits and a unit `H M S m u n`).
pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Whether an error chain holds an HTTP/2 `REFUSED_STREAM` (the server did not process the
/// stream: safe to retry anywhere).
pub(crate) fn refused_stream(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &'static str, v: &'static str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(name, http::HeaderValue::from_static(v));
        m
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(
            grpc_timeout(&h("grpc-timeout", "100m")),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            grpc_timeout(&h("grpc-timeout", "2S")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            grpc_timeout(&h("grpc-timeout", "1H")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(grpc_timeout(&h("grpc-timeout", "123456789m")), None);
        assert_eq!(grpc_timeout(&h("grpc-timeout", "10x")), None);
        assert_eq!(grpc_timeout(&h("grpc-timeout", "m")), None);
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn grpc_status_parsing() {
        assert_eq!(grpc_code(&h("grpc-status", "14")), Some(Code::Unavailable));
        assert_eq!(grpc_code(&h("grpc-status", "0")), Some(Code::Ok));
        assert_eq!(grpc_code(&h("grpc-status", "x")), None);
        assert_eq!(grpc_code(&HeaderMap::new()), None);
    }
}
