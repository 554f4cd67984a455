//! Backends of the call-path tests: real tonic servers (the generated gRPC health service,
//! answering as each test tells it) and hyper HTTP/1.1 servers, on `127.0.0.1:0`, that count
//! the calls and connections they see and can be killed (listener closed, connections cut).
#![allow(clippy::unwrap_used, dead_code)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// How a backend answers.
#[derive(Clone, Debug)]
pub enum Mode {
    /// SERVING at once.
    Ok,
    /// SERVING after a delay.
    Delay(Duration),
    /// This status (trailers-only).
    Fail(Code),
    /// Waits for a permit of the semaphore, then SERVING.
    Gate(Arc<Semaphore>),
}

/// What a backend saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub calls: AtomicU64,
    pub open_conns: AtomicI64,
    pub conns: AtomicU64,
}

/// A stream that counts itself open in `seen` and ends when the backend is killed.
struct Counted {
    inner: TcpStream,
    seen: Arc<Seen>,
    killed: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl Counted {
    fn new(inner: TcpStream, seen: Arc<Seen>, kill: &watch::Receiver<bool>) -> Self {
        seen.open_conns.fetch_add(1, Ordering::SeqCst);
        seen.conns.fetch_add(1, Ordering::SeqCst);
        let mut rx = kill.clone();
        Self {
            inner,
            seen,
            killed: async move {
                let _ = rx.wait_for(|k| *k).await;
            }
            .boxed(),
        }
    }

    fn dead(&mut self, cx: &mut Context<'_>) -> bool {
        self.killed.as_mut().poll(cx).is_ready()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.seen.open_conns.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.dead(cx) {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.dead(cx) {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A running backend.
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    pub mode: Arc<Mutex<Mode>>,
    kill: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Backend {
    pub fn calls(&self) -> u64 {
        self.seen.calls.load(Ordering::SeqCst)
    }
    pub fn open_conns(&self) -> i64 {
        self.seen.open_conns.load(Ordering::SeqCst)
    }
    pub fn set(&self, mode: Mode) {
        *self.mode.lock() = mode;
    }
    /// Closes the listener (new connects are refused) and cuts every open connection.
    pub fn kill(&self) {
        self.accept.abort();
        self.kill.send_replace(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Svc {
    seen: Arc<Seen>,
    mode: Arc<Mutex<Mode>>,
}

#[tonic::async_trait]
impl Health for Svc {
    async fn check(
        &self,
        _req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.seen.calls.fetch_add(1, Ordering::SeqCst);
        let mode = self.mode.lock().clone();
        match mode {
            Mode::Ok => {}
            Mode::Delay(d) => tokio::time::sleep(d).await,
            Mode::Fail(code) => return Err(Status::new(code, "told to fail")),
            Mode::Gate(s) => {
                let _p = s.acquire().await.unwrap();
            }
        }
        Ok(Response::new(HealthCheckResponse { status: 1 }))
    }

    type WatchStream = futures::stream::BoxStream<'static, Result<HealthCheckResponse, Status>>;

    /// One SERVING message, then the mode's status in the trailers (OK unless `Fail`).
    async fn watch(
        &self,
        _req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.seen.calls.fetch_add(1, Ordering::SeqCst);
        let end = match self.mode.lock().clone() {
            Mode::Fail(code) => Some(Status::new(code, "told to fail")),
            _ => None,
        };
        let first = futures::stream::once(async { Ok(HealthCheckResponse { status: 1 }) });
        let rest = futures::stream::iter(end.map(Err));
        Ok(Response::new(Box::pin(first.chain(rest))))
    }
}

use futures::StreamExt;

/// Starts a tonic backend.
pub async fn grpc_backend() -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let mode = Arc::new(Mutex::new(Mode::Ok));
    let (kill, kill_rx) = watch::channel(false);
    let svc = Svc {
        seen: seen.clone(),
        mode: mode.clone(),
    };
    let s = seen.clone();
    let incoming = async_stream(listener, s, kill_rx);
    let accept = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(HealthServer::new(svc))
            .serve_with_incoming(incoming)
            .await;
    });
    Backend {
        addr,
        seen,
        mode,
        kill,
        accept,
    }
}

fn async_stream(
    listener: TcpListener,
    seen: Arc<Seen>,
    kill: watch::Receiver<bool>,
) -> impl futures::Stream<Item = std::io::Result<Counted>> + Send + 'static {
    futures::stream::unfold((listener, seen, kill), |(l, seen, kill)| async move {
        let r = l
            .accept()
            .await
            .map(|(s, _)| Counted::new(s, seen.clone(), &kill));
        Some((r, (l, seen, kill)))
    })
}

/// Starts a hyper HTTP/1.1 backend answering `200 ok` (or the mode's status: `Fail(code)` →
/// 503 for UNAVAILABLE, 404 for NOT_FOUND, 500 otherwise; `Delay` and `Gate` as for gRPC).
pub async fn http_backend() -> Backend {
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let mode = Arc::new(Mutex::new(Mode::Ok));
    let (kill, kill_rx) = watch::channel(false);
    let (s, m) = (seen.clone(), mode.clone());
    let accept = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let io = Counted::new(tcp, s.clone(), &kill_rx);
            let (s, m) = (s.clone(), m.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    let (s, m) = (s.clone(), m.clone());
                    async move {
                        s.calls.fetch_add(1, Ordering::SeqCst);
                        let mode = m.lock().clone();
                        let status = match mode {
                            Mode::Ok => 200,
                            Mode::Delay(d) => {
                                tokio::time::sleep(d).await;
                                200
                            }
                            Mode::Fail(Code::Unavailable) => 503,
                            Mode::Fail(Code::NotFound) => 404,
                            Mode::Fail(_) => 500,
                            Mode::Gate(g) => {
                                let _p = g.acquire().await.unwrap();
                                200
                            }
                        };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    Backend {
        addr,
        seen,
        mode,
        kill,
        accept,
    }
}

/// A dlbd service config over `backends` (ids b0, b1, … with `weights`), round robin.
pub fn service_of(name: &str, backends: &[&Backend], weights: &[u32]) -> dlb_server::ServiceConfig {
    let mut s = dlb_server::ServiceConfig::empty(name);
    s.backends = backends
        .iter()
        .enumerate()
        .map(|(i, b)| dlb::proto::Server {
            server_id: format!("b{i}"),
            address: b.addr.to_string(),
            weight: weights.get(i).copied().unwrap_or(1),
            health: dlb::proto::HealthStatus::Healthy as i32,
            ..Default::default()
        })
        .collect();
    s.policy.algorithm = dlb::proto::Algorithm::RoundRobin as i32;
    s
}

/// Percentile `q` (0..1) of sorted durations.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}
