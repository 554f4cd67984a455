//! TCP check: connect; when `send` is set, write it and read until the reply holds as many
//! bytes as `expect_prefix` (or the peer closes), then compare the prefix.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{io_detail, Outcome};

/// Probes `address` once.
pub async fn probe(address: &str, send: &[u8], expect_prefix: &[u8]) -> Outcome {
    let mut stream = match TcpStream::connect(address).await {
        Ok(s) => s,
        Err(e) => return Outcome::Fail(io_detail(&e)),
    };
    if !send.is_empty() {
        if let Err(e) = stream.write_all(send).await {
            return Outcome::Fail(io_detail(&e));
        }
    }
    if expect_prefix.is_empty() {
        return Outcome::Pass("connected".to_owned());
    }
    let mut got = Vec::with_capacity(expect_prefix.len());
    let mut buf = [0u8; 512];
    while got.len() < expect_prefix.len() {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Outcome::Fail(io_detail(&e)),
        }
    }
    if got.starts_with(expect_prefix) {
        Outcome::Pass("reply matched".to_owned())
    } else {
        let shown: String = String::from_utf8_lossy(&got[..got.len().min(32)])
            .escape_debug()
            .collect();
        Outcome::Fail(format!("unexpected reply \"{shown}\""))
    }
}
