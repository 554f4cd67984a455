//! Connections per backend: for gRPC one multiplexed HTTP/2 connection (another when every open
//! one carries `max_streams_per_connection` streams), for HTTP/1.1 a small keep-alive pool. Built
//! on hyper's connection-level clients (`hyper::client::conn::{http1, http2}`).
//!
//! Lifetimes: an [`Endpoint`] lives in the [`Pool`] while its backend is in the service's
//! snapshot. When it leaves, the endpoint is dropped from the pool: idle HTTP/1.1 connections
//! close at once, and every other connection when its last call ends (a call's [`Lease`] is what
//! holds the connection's sender; hyper closes a connection whose senders are all gone).
//!
//! Concurrency: the maps and lists are behind short `parking_lot` locks, never held across
//! `.await`; concurrent first calls to a backend share one HTTP/2 connect (a shared future).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::net::TcpStream;

use super::body::ReqBody;
use super::config::Protocol;

/// Connection settings of a pool.
#[derive(Debug, Clone)]
pub(crate) struct ConnOpts {
    pub(crate) protocol: Protocol,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_streams: usize,
    pub(crate) max_idle: usize,
}

/// One HTTP/2 connection and the streams this client has open on it.
#[derive(Debug)]
pub(crate) struct H2Conn {
    send: http2::SendRequest<ReqBody>,
    streams: AtomicUsize,
}

type Connecting = Shared<BoxFuture<'static, Result<Arc<H2Conn>, Arc<str>>>>;

/// The connections to one backend.
#[derive(Debug)]
pub(crate) struct Endpoint {
    address: String,
    /// `address` parsed once, for the request URIs (HTTP/2).
    pub(crate) authority: Option<http::uri::Authority>,
    opts: ConnOpts,
    /// Set when the backend left the snapshot: HTTP/1.1 connections are not given back.
    removed: AtomicBool,
    h2: Mutex<Vec<Arc<H2Conn>>>,
    connecting: Mutex<Option<Connecting>>,
    idle: Mutex<Vec<http1::SendRequest<ReqBody>>>,
    /// Open connections of this endpoint, and of the whole pool.
    open: Arc<AtomicU64>,
    pool_open: Arc<AtomicU64>,
}

/// What a call holds of its connection until its response ends.
#[derive(Debug, Default)]
pub(crate) enum Lease {
    /// Nothing (a response that is not a backend's).
    #[default]
    None,
    /// A stream slot on an HTTP/2 connection (released on drop).
    H2(Arc<H2Conn>),
    /// An HTTP/1.1 connection, given back to the endpoint's idle list when the response ended
    /// cleanly.
    H1 {
        send: Option<http1::SendRequest<ReqBody>>,
        endpoint: Arc<Endpoint>,
    },
}

impl Lease {
    /// The response ended cleanly: an HTTP/1.1 connection can carry the next request.
    pub(crate) fn give_back(&mut self) {
        if let Lease::H1 { send, endpoint } = self {
            if let Some(s) = send.take() {
                if !endpoint.removed.load(Ordering::Acquire) && !s.is_closed() {
                    let mut idle = endpoint.idle.lock();
                    if idle.len() < endpoint.opts.max_idle {
                        idle.push(s);
                    }
                }
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Lease::H2(c) = self {
            c.streams.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A connection ready to carry one request.
pub(crate) enum Sender {
    H2(http2::SendRequest<ReqBody>),
    H1(http1::SendRequest<ReqBody>),
}

/// Why no connection could be had.
#[derive(Debug, Clone, thiserror::Error)]
#[error("connect to {address}: {reason}")]
pub(crate) struct ConnectError {
    pub(crate) address: String,
    pub(crate) reason: Arc<str>,
}

impl Endpoint {
    fn new(address: String, opts: ConnOpts, pool_open: Arc<AtomicU64>) -> Self {
        Self {
            authority: address.parse().ok(),
            address,
            opts,
            removed: AtomicBool::new(false),
            h2: Mutex::new(Vec::new()),
            connecting: Mutex::new(None),
            idle: Mutex::new(Vec::new()),
            open: Arc::new(AtomicU64::new(0)),
            pool_open,
        }
    }

    fn error(&self, reason: impl std::fmt::Display) -> ConnectError {
        ConnectError {
            address: self.address.clone(),
            reason: reason.to_string().into(),
        }
    }

    /// A connection for one request, opening one when needed.
    pub(crate) async fn lease(self: &Arc<Self>) -> Result<(Lease, Sender), ConnectError> {
        match self.opts.protocol {
            Protocol::Grpc => self.lease_h2().await,
            Protocol::Http1 => self.lease_h1().await,
        }
    }

    fn free_h2(&self) -> Option<Arc<H2Conn>> {
        let mut conns = self.h2.lock();
        conns.retain(|c| !c.send.is_closed());
        let c = conns
            .iter()
            .find(|c| c.streams.load(Ordering::Relaxed) < self.opts.max_streams)?;
        c.streams.fetch_add(1, Ordering::Relaxed);
        Some(c.clone())
    }

    async fn lease_h2(self: &Arc<Self>) -> Result<(Lease, Sender), ConnectError> {
        loop {
            if let Some(c) = self.free_h2() {
                let send = c.send.clone();
                return Ok((Lease::H2(c), Sender::H2(send)));
            }
            let connecting = {
                let mut slot = self.connecting.lock();
                match &*slot {
                    Some(f) => f.clone(),
                    None => {
                        let me = self.clone();
                        let f = async move {
                            let r = me.connect_h2().await.map_err(|e| e.reason);
                            *me.connecting.lock() = None;
                            r
                        }
                        .boxed()
                        .shared();
                        *slot = Some(f.clone());
                        f
                    }
                }
            };
            let conn = connecting.await.map_err(|reason| ConnectError {
                address: self.address.clone(),
                reason,
            })?;
            if conn.streams.load(Ordering::Relaxed) < self.opts.max_streams {
                conn.streams.fetch_add(1, Ordering::Relaxed);
                let send = conn.send.clone();
                return Ok((Lease::H2(conn), Sender::H2(send)));
            }
            // Others took the new connection's streams first: look again.
        }
    }

    async fn tcp(&self) -> Result<TcpStream, ConnectError> {
        let tcp = tokio::time::timeout(
            self.opts.connect_timeout,
            TcpStream::connect(self.address.as_str()),
        )
        .await
        .map_err(|_| self.error(format!("timed out after {:?}", self.opts.connect_timeout)))?
        .map_err(|e| self.error(e))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// Counts a new connection open until `conn` (its driver) ends.
    fn drive<F>(&self, conn: F)
    where
        F: std::future::Future + Send + 'static,
    {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.pool_open.fetch_add(1, Ordering::Relaxed);
        let (mine, pool) = (self.open.clone(), self.pool_open.clone());
        // The driver ends by itself when the connection closes (every sender dropped, or the
        // peer closed it); it owns nothing else.
        tokio::spawn(async move {
            let _ = conn.await;
            mine.fetch_sub(1, Ordering::Relaxed);
            pool.fetch_sub(1, Ordering::Relaxed);
        });
    }

    async fn connect_h2(&self) -> Result<Arc<H2Conn>, ConnectError> {
        let tcp = self.tcp().await?;
        let handshake =
            http2::Builder::new(TokioExecutor::new()).handshake::<_, ReqBody>(TokioIo::new(tcp));
        let (send, conn) = tokio::time::timeout(self.opts.connect_timeout, handshake)
            .await
            .map_err(|_| self.error("HTTP/2 handshake timed out"))?
            .map_err(|e| self.error(e))?;
        self.drive(conn);
        let c = Arc::new(H2Conn {
            send,
            streams: AtomicUsize::new(0),
        });
        self.h2.lock().push(c.clone());
        Ok(c)
    }

    async fn lease_h1(self: &Arc<Self>) -> Result<(Lease, Sender), ConnectError> {
        loop {
            let Some(mut s) = self.idle.lock().pop() else {
                break;
            };
            if s.is_closed() {
                continue;
            }
            if s.ready().await.is_ok() {
                return Ok(self.h1_lease(s));
            }
        }
        let tcp = self.tcp().await?;
        let handshake = http1::Builder::new().handshake::<_, ReqBody>(TokioIo::new(tcp));
        let (mut send, conn) = tokio::time::timeout(self.opts.connect_timeout, handshake)
            .await
            .map_err(|_| self.error("HTTP/1.1 handshake timed out"))?
            .map_err(|e| self.error(e))?;
        self.drive(conn);
        send.ready().await.map_err(|e| self.error(e))?;
        Ok(self.h1_lease(send))
    }

    fn h1_lease(self: &Arc<Self>, s: http1::SendRequest<ReqBody>) -> (Lease, Sender) {
        // The lease gets the sender back after the request is written (see `Sender::send`).
        (
            Lease::H1 {
                send: None,
                endpoint: self.clone(),
            },
            Sender::H1(s),
        )
    }

    /// Connections open to this backend.
    pub(crate) fn open_connections(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }
}

/// The endpoints of one service, by backend id.
#[derive(Debug)]
pub(crate) struct Pool {
    opts: ConnOpts,
    /// A `Mutex` because it is touched once per call for a short lookup (and by the pruner).
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    open: Arc<AtomicU64>,
}

impl Pool {
    pub(crate) fn new(opts: ConnOpts) -> Self {
        Self {
            opts,
            endpoints: Mutex::new(HashMap::new()),
            open: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The endpoint of backend `id` at `address` (a new one if the address changed).
    pub(crate) fn endpoint(&self, id: &str, address: &str) -> Arc<Endpoint> {
        let mut map = self.endpoints.lock();
        if let Some(e) = map.get(id) {
            if e.address == address {
                return e.clone();
            }
            e.removed.store(true, Ordering::Release);
        }
        let e = Arc::new(Endpoint::new(
            address.to_owned(),
            self.opts.clone(),
            self.open.clone(),
        ));
        map.insert(id.to_owned(), e.clone());
        e
    }

    /// Drops the endpoints of backends not in `present` (id, address); returns the new ones'
    /// ids and addresses (for eager connects).
    pub(crate) fn retain(&self, present: &[(String, String)]) -> Vec<Arc<Endpoint>> {
        let mut map = self.endpoints.lock();
        map.retain(|id, e| {
            let keep = present.iter().any(|(i, a)| i == id && *a == e.address);
            if !keep {
                e.removed.store(true, Ordering::Release);
                e.idle.lock().clear();
            }
            keep
        });
        let mut new = Vec::new();
        for (id, addr) in present {
            if !map.contains_key(id) {
                let e = Arc::new(Endpoint::new(
                    addr.clone(),
                    self.opts.clone(),
                    self.open.clone(),
                ));
                map.insert(id.clone(), e.clone());
                new.push(e);
            }
        }
        new
    }

    /// Connections open, per backend id (only backends still in the pool) and in all (including
    /// connections of removed backends whose last calls are still running).
    pub(crate) fn open_connections(&self) -> (Vec<(String, u64)>, u64) {
        let mut per: Vec<(String, u64)> = self
            .endpoints
            .lock()
            .iter()
            .map(|(id, e)| (id.clone(), e.open_connections()))
            .collect();
        per.sort();
        (per, self.open.load(Ordering::Relaxed))
    }
}

impl Sender {
    /// Sends `req`; on an error before the request was written, gives the request back.
    pub(crate) async fn send(
        self,
        lease: &mut Lease,
        req: http::Request<ReqBody>,
    ) -> Result<
        http::Response<hyper::body::Incoming>,
        hyper::client::conn::TrySendError<http::Request<ReqBody>>,
    > {
        match self {
            Sender::H2(mut s) => s.try_send_request(req).await,
            Sender::H1(mut s) => {
                let fut = s.try_send_request(req);
                if let Lease::H1 { send, .. } = lease {
                    *send = Some(s);
                }
                fut.await
            }
        }
    }
}
