//! HTTP/1.1 check over hyper's client connection: one request on a fresh connection, then the
//! status is compared with the expected ranges and, when configured, the first
//! [`MAX_BODY_READ`] bytes of the body are searched for a substring.
//!
//! Every way of not answering as expected — refused, reset, malformed, a status outside the
//! ranges, a body without the substring — is one [`Outcome::Fail`]; the state machine counts it
//! once like any other failure (no status bypasses `fall`).

use bytes::Bytes;
use dlb::health_check::{ProbeKind, MAX_BODY_READ};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{io_detail, Outcome};

/// Probes `address` once with the HTTP check `kind`.
pub async fn probe(address: &str, kind: &ProbeKind) -> Outcome {
    let ProbeKind::Http {
        method,
        path,
        host,
        expected,
        body_contains,
    } = kind
    else {
        return Outcome::Fail("not an HTTP check".to_owned());
    };
    let stream = match TcpStream::connect(address).await {
        Ok(s) => s,
        Err(e) => return Outcome::Fail(io_detail(&e)),
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(p) => p,
        Err(e) => return Outcome::Fail(format!("HTTP handshake: {e}")),
    };
    // The connection is driven beside the exchange, in the probe's own task (dropped with it on
    // timeout); once it ends, only the exchange is left to finish (it sees the closed channel).
    let conn = async move {
        let _ = conn.await;
        std::future::pending::<()>().await
    };
    let request = http::Request::builder()
        .method(method.as_str())
        .uri(path.as_str())
        .header(http::header::HOST, host.as_deref().unwrap_or(address))
        .header(http::header::USER_AGENT, "dlbd-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new());
    let request = match request {
        Ok(r) => r,
        Err(e) => return Outcome::Fail(format!("bad request: {e}")),
    };
    tokio::select! {
        outcome = exchange(&mut sender, request, expected, body_contains.as_deref()) => outcome,
        () = conn => unreachable!("the connection future never resolves"),
    }
}

async fn exchange(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    request: http::Request<Empty<Bytes>>,
    expected: &[(u16, u16)],
    body_contains: Option<&str>,
) -> Outcome {
    let response = match sender.send_request(request).await {
        Ok(r) => r,
        Err(e) => {
            let mut s = format!("HTTP: {e}");
            s.truncate(120);
            return Outcome::Fail(s);
        }
    };
    let status = response.status().as_u16();
    if !expected
        .iter()
        .any(|(lo, hi)| (*lo..=*hi).contains(&status))
    {
        return Outcome::Fail(format!("HTTP {status}"));
    }
    let Some(needle) = body_contains else {
        return Outcome::Pass(format!("HTTP {status}"));
    };
    let mut body = response.into_body();
    let mut got: Vec<u8> = Vec::new();
    while got.len() < MAX_BODY_READ {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let room = MAX_BODY_READ - got.len();
                    got.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Some(Err(e)) => {
                let mut s = format!("HTTP body: {e}");
                s.truncate(120);
                return Outcome::Fail(s);
            }
            None => break,
        }
    }
    let found = got
        .windows(needle.len().max(1))
        .any(|w| w == needle.as_bytes());
    if found {
        Outcome::Pass(format!("HTTP {status}"))
    } else {
        Outcome::Fail(format!("HTTP {status}, body lacks the expected text"))
    }
}
