//! Shared helpers of the integration tests: spawning a real `dlbd` on `127.0.0.1:0`, waiting with
//! deadlines, a TCP proxy that can cut connections, and a `/metrics` scraper.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dlb_client::{ServiceHandle, Version};
use dlb_server::{RunningServer, ServerConfig, ServiceConfig};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Upper bound for anything a test waits on.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Awaits `f` or panics after [`DEADLINE`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Starts a server with `cfg` on a port another server just left, retrying until the port is
/// free again.
pub async fn respawn(cfg: &ServerConfig) -> RunningServer {
    within("respawn", async {
        loop {
            match dlb_server::spawn(cfg.clone()).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
}

/// A server config listening on a free port, metrics on a free port, with `services`.
pub fn config(services: Vec<ServiceConfig>) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        services,
        ..ServerConfig::default()
    }
}

/// Spawns a dlbd with the default config (the "default" service exists, empty).
pub async fn spawn_server() -> RunningServer {
    dlb_server::spawn(config(ServerConfig::default().services))
        .await
        .unwrap()
}

/// A service config with backends `ids` (addresses 127.0.0.1:9001…).
pub fn service_with(name: &str, ids: &[&str]) -> ServiceConfig {
    let mut s = ServiceConfig::empty(name);
    s.backends = ids
        .iter()
        .enumerate()
        .map(|(i, id)| dlb::proto::Server {
            server_id: (*id).to_owned(),
            address: format!("127.0.0.1:{}", 9001 + i),
            weight: 1,
            health: dlb::proto::HealthStatus::Healthy as i32,
            ..Default::default()
        })
        .collect();
    s
}

/// The gRPC endpoint URI of a running server.
pub fn endpoint(server: &RunningServer) -> String {
    format!("http://{}", server.grpc_addr())
}

/// Backend ids the handle picks over `n` local picks (round robin covers every eligible one).
pub fn picked(handle: &ServiceHandle, n: usize) -> BTreeSet<String> {
    (0..n)
        .filter_map(|_| handle.get_next_server(None).ok())
        .map(|g| g.server_id().to_owned())
        .collect()
}

/// A set of ids.
pub fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

/// Waits until the handle routes on `version` (or later).
pub async fn converge(handle: &ServiceHandle, version: Option<dlb::proto::Version>) {
    let v = Version::from(version.unwrap());
    within(
        &format!("{} to reach {v}", handle.name()),
        handle.wait_for_version(v),
    )
    .await
    .unwrap();
}

/// Polls `cond` every 10 ms until it holds (or panics after [`DEADLINE`]).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Scrapes `/metrics` from `addr` with a plain HTTP/1.1 request.
pub async fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

/// The value of the first sample whose line starts with `prefix`.
pub fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A TCP proxy in front of a server whose connections can be cut, and which can refuse new ones
/// for a while: makes an SDK lose its session while the server stays up.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    paused: bool,
    conns: Vec<JoinHandle<()>>,
    /// While set, open connections stay open but nothing is forwarded either way (a peer
    /// that is connected but stuck).
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

/// Copies `from` to `to`, holding data back while `frozen` is set.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    /// Starts a proxy on a free port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if st.lock().paused {
                    drop(inbound);
                    continue;
                }
                let frozen = st.lock().frozen.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(upstream).await {
                        let (ir, iw) = inbound.into_split();
                        let (or, ow) = outbound.into_split();
                        tokio::join!(pump(ir, ow, frozen.clone()), pump(or, iw, frozen));
                    }
                });
                st.lock().conns.push(conn);
            }
        });
        Self {
            addr,
            state,
            accept,
        }
    }

    /// Cuts every open connection and refuses new ones until [`Proxy::resume`].
    pub fn pause(&self) {
        let mut st = self.state.lock();
        st.paused = true;
        for c in st.conns.drain(..) {
            c.abort();
        }
    }

    /// Keeps every connection open but stops forwarding anything (a stuck peer).
    pub fn freeze(&self) {
        self.state
            .lock()
            .frozen
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Accepts connections again.
    pub fn resume(&self) {
        self.state.lock().paused = false;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.state.lock().conns.drain(..) {
            c.abort();
        }
    }
}

/// What a `dlbctl` run printed and its exit code (-1 when killed by a signal).
pub struct DlbctlOut {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs the real `dlbctl` binary against `endpoint` with `args` (bounded by `within`).
pub async fn run_dlbctl(endpoint: &str, args: &[&str]) -> DlbctlOut {
    let out = within(
        &format!("dlbctl {args:?}"),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_dlbctl"))
            .arg("--endpoint")
            .arg(endpoint)
            .args(args)
            .env_remove("DLB_ENDPOINT")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    DlbctlOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `dlbctl` and returns its standard output, failing the test unless it exits 0.
pub async fn dlbctl_ok(endpoint: &str, args: &[&str]) -> String {
    let out = run_dlbctl(endpoint, args).await;
    assert_eq!(out.code, 0, "dlbctl {args:?} failed: {}", out.stderr);
    out.stdout
}

/// A fresh CA (its certificate, PEM) and a server TLS configuration whose certificate, signed by
/// that CA, names `names` only.
pub fn tls_server(names: &[&str]) -> (String, dlb_server::TlsConfig) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let tls = dlb_server::TlsConfig {
        cert_pem: cert.pem().into_bytes(),
        key_pem: key.serialize_pem().into_bytes(),
        client_ca_pem: None,
    };
    (ca_pem, tls)
}
