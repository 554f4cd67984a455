//! Helpers of the xDS tests: gRPC echo backends on loopback that answer with their id, the
//! bootstrap file stock clients read, and a driver for the interop scripts in `interop/`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use envoy_types::pb::google::protobuf::{Empty, StringValue};
use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The echo method every backend serves.
pub const ECHO_PATH: &str = "/dlb.interop.Echo/Who";

/// A gRPC service `dlb.interop.Echo` whose method `Who` answers with the backend's id.
#[derive(Clone)]
pub struct Echo(pub Arc<str>);

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "dlb.interop.Echo";
}

struct Who(Arc<str>);

impl tonic::server::UnaryService<Empty> for Who {
    type Response = StringValue;
    type Future = BoxFuture<'static, Result<tonic::Response<StringValue>, tonic::Status>>;
    fn call(&mut self, _: tonic::Request<Empty>) -> Self::Future {
        let id = self.0.to_string();
        Box::pin(async move { Ok(tonic::Response::new(StringValue { value: id })) })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let id = self.0.clone();
        Box::pin(async move {
            if req.uri().path() == ECHO_PATH {
                let codec = tonic_prost::ProstCodec::<StringValue, Empty>::default();
                let mut grpc = tonic::server::Grpc::new(codec);
                Ok(grpc.unary(Who(id), req).await)
            } else {
                Ok(tonic::Status::unimplemented("no such method").into_http())
            }
        })
    }
}

/// A running echo backend.
pub struct Backend {
    pub id: String,
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    /// Starts a backend on 127.0.0.1:0.
    pub async fn start(id: &str) -> Backend {
        Self::start_on(id, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts a backend on `addr` (a port a killed backend used: its restart).
    pub async fn start_on(id: &str, addr: SocketAddr) -> Backend {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let svc = Echo(id.into());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async move {
                        let _ = rx.await;
                    },
                )
                .await;
        });
        Backend {
            id: id.into(),
            addr,
            stop: Some(tx),
            task,
        }
    }

    /// Kills the backend's listener at once (no graceful shutdown): new connections, such as
    /// dlbd's health probes, are refused from now on.
    pub async fn kill(mut self) {
        self.stop.take();
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// Stops the backend and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

/// Writes a gRPC xDS bootstrap file naming `ads` as the management server.
pub fn write_bootstrap(path: &Path, ads: SocketAddr, node: &str) {
    write_bootstrap_in(path, ads, node, "", "");
}

/// Writes a bootstrap file like [`write_bootstrap`] whose node is in `region`/`zone`
/// (`node.locality`; empty strings: no locality).
pub fn write_bootstrap_in(path: &Path, ads: SocketAddr, node: &str, region: &str, zone: &str) {
    let mut locality = serde_json::Map::new();
    if !region.is_empty() {
        locality.insert("region".into(), region.into());
    }
    if !zone.is_empty() {
        locality.insert("zone".into(), zone.into());
    }
    let json = serde_json::json!({
        "xds_servers": [{
            "server_uri": ads.to_string(),
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        // grpc-js-xds 1.14 rejects a node without a locality.
        "node": {"id": node, "locality": locality},
    });
    std::fs::write(path, json.to_string()).unwrap();
}

/// What one `calls` command returned.
#[derive(Debug, Default, Clone)]
pub struct Calls {
    pub ok: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
}

impl Calls {
    pub fn total_ok(&self) -> u64 {
        self.ok.values().sum()
    }
    pub fn of(&self, id: &str) -> u64 {
        self.ok.get(id).copied().unwrap_or(0)
    }
}

/// A stock client process speaking the line protocol of `interop/*/xds_client.*`.
pub struct Driver {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    pub version: String,
}

impl Driver {
    /// Starts `program args…` with `GRPC_XDS_BOOTSTRAP=bootstrap` and waits for its "ready".
    pub async fn start(program: &Path, args: &[&str], bootstrap: &Path) -> Driver {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env("GRPC_XDS_BOOTSTRAP", bootstrap)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut d = Driver {
            child,
            stdin,
            lines,
            version: String::new(),
        };
        let ready = d.read().await;
        d.version = ready["ready"].as_str().unwrap_or("?").to_owned();
        d
    }

    async fn read(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(300), self.lines.next_line())
            .await
            .expect("client timed out")
            .expect("client stdout")
            .expect("client exited");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"))
    }

    /// Runs `n` calls (with the hash header `key`, if given).
    pub async fn calls(&mut self, n: u64, key: Option<&str>) -> Calls {
        let cmd = match key {
            Some(k) => format!("calls {n} {k}\n"),
            None => format!("calls {n}\n"),
        };
        self.stdin.write_all(cmd.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
        let v = self.read().await;
        let map = |v: &serde_json::Value| -> BTreeMap<String, u64> {
            v.as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        };
        Calls {
            ok: map(&v["ok"]),
            errors: map(&v["errors"]),
        }
    }

    /// Polls with batches of `batch` calls until `cond` holds (at most `limit`); returns the
    /// last batch.
    pub async fn until(
        &mut self,
        batch: u64,
        key: Option<&str>,
        limit: Duration,
        what: &str,
        mut cond: impl FnMut(&Calls) -> bool,
    ) -> Calls {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let c = self.calls(batch, key).await;
            if cond(&c) {
                return c;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not reached within {limit:?}; last batch {c:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ends the client.
    pub async fn quit(mut self) {
        let _ = self.stdin.write_all(b"quit\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Whether `observed` out of `n` is within 4 standard deviations of a binomial with `p`.
pub fn within_4_sigma(observed: u64, n: u64, p: f64) -> bool {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (observed as f64 - mean).abs() <= 4.0 * sd
}

/// Resolves a client from an environment variable, else from where `.ci/interop` installs it
/// (`default`, when `installed` exists), or says the test is skipped (a failure when `CI` is
/// set).
pub fn client(var: &str, default: PathBuf, installed: PathBuf) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => return Some(PathBuf::from(v)),
        _ => {}
    }
    if installed.exists() {
        return Some(default);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{var} is not set, {} does not exist, and CI is set: run .ci/interop first",
        installed.display()
    );
    eprintln!("SKIPPED: {var} is not set (run .ci/interop to install the stock clients)");
    None
}

/// The Python with grpcio the interop tests drive: `DLB_INTEROP_PYTHON`, else `.ci/interop`'s
/// `target/interop-venv`.
pub fn python() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/interop-venv/bin/python");
    client("DLB_INTEROP_PYTHON", venv.clone(), venv)
}

/// The stock grpcio client as a command: the Python of [`python`] running
/// `interop/python/xds_client.py`; `None`: skipped (see [`client`]).
pub fn grpcio_client() -> Option<(PathBuf, Vec<String>)> {
    Some((python()?, vec![grpcio_script()]))
}

/// The stock grpc-js client as a command: `node` running `xds_client.js` of
/// `DLB_INTEROP_NODE_DIR`, else of `interop/node` once `.ci/interop` installed its modules;
/// `None`: skipped (see [`client`]).
pub fn grpc_js_client() -> Option<(PathBuf, Vec<String>)> {
    let node = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../interop/node");
    let dir = client(
        "DLB_INTEROP_NODE_DIR",
        node.clone(),
        node.join("node_modules"),
    )?;
    let script = dir.join("xds_client.js").display().to_string();
    Some((PathBuf::from("node"), vec![script]))
}

/// The Python grpcio xDS client script (`interop/python/xds_client.py`).
pub fn grpcio_script() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../interop/python/xds_client.py")
        .display()
        .to_string()
}
