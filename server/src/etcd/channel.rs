//! The channel under every etcd connection of `dlbd` (feature `etcd`): one HTTP/2 connection
//! per endpoint, and each request on a connection that is up.
//!
//! **Why not etcd-client's own.** etcd-client balances over its endpoints with tower's
//! power-of-two-choices balancer over tonic connections that connect lazily. A connection that
//! cannot connect counts as *ready* and fails the request it is given (tonic's `Reconnect`
//! hands the connect error to the next call; etcd-client issue #39). So with one member of a
//! three-member cluster down, about a third of all requests (writes, reads, watches, lease
//! keep-alives) fail at once with `tcp connect error`, for as long as the member stays down.
//!
//! **What this does instead** (what gRPC's round-robin balancer does), given to etcd-client as
//! its [`BalancedChannelBuilder`]:
//!
//! * **One link per endpoint**, driven by its own task: connect (tonic, with the [`Endpoint`]
//!   exactly as etcd-client configured it: connect timeout, request timeout, HTTP/2
//!   keepalives); once up, wait until that connection ends (its socket is dropped: the peer
//!   closed or reset it, or a keepalive went unanswered); then connect again at once. A failed
//!   attempt is retried after a backoff (50 ms doubling to 1 s, ±20 % jitter), or sooner when
//!   a request finds every link failing (a *nudge*; never sooner than 50 ms after the last
//!   attempt); a connection that ends within a second of opening counts as a failed attempt.
//! * **States**: `Connecting` (an attempt is under way), `Up`, `Failing` (the last attempt
//!   failed; until the next one).
//! * **Picking**, per request, O(endpoints): round robin over the links that are up. None up but
//!   one connecting (or none known yet: etcd-client hands the endpoints over through a queue):
//!   wait for it (at most [`WAIT_CONNECTING`]). All failing: nudge them and wait for those
//!   attempts; if they fail too, fail with `UNAVAILABLE` and each endpoint's last error (etcd
//!   down: the callers retry, as before). So a request never goes to a dead member while
//!   another is up, and the first request after etcd comes back connects at once instead of
//!   waiting out a backoff (the callers' own backoff would compound it).
//!
//! What remains: a request sent on a connection at the instant its peer dies fails (it may have
//! reached etcd, so it is not retried here); a request picked in the microseconds between a
//! connection's end and its socket being dropped goes to tonic, which tries to reconnect once
//! and fails it if it cannot.
//!
//! Sync: the links' states are one `tokio::sync::watch` (written by the link tasks, read by
//! every request, waited on while no link is up); the round-robin position is an atomic.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use dlb::backoff::{Backoff, Jitter};
use etcd_client::BalancedChannelBuilder;
use futures::future::BoxFuture;
use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tonic::body::Body;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceExt};

/// First wait after a failed connection attempt.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between two attempts on a dead endpoint.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// A connection that lasted less than this does not reset the backoff.
const STABLE: Duration = Duration::from_secs(1);
/// Longest a request waits for a link that is connecting when none is up (each attempt is
/// bounded by the endpoint's connect timeout anyway).
const WAIT_CONNECTING: Duration = Duration::from_secs(10);

/// The [`BalancedChannelBuilder`] for [`etcd_client::Client::connect_with_balanced_channel`].
pub(crate) struct UpLinks;

impl BalancedChannelBuilder for UpLinks {
    type Error = etcd_client::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> Result<(etcd_client::Channel, mpsc::Sender<Change<Uri, Endpoint>>), Self::Error> {
        let (links, tx) = Links::new(buffer_size);
        let service = BoxCloneSyncService::new(links);
        Ok((etcd_client::Channel::Custom(service), tx))
    }
}

/// One endpoint's state.
#[derive(Clone)]
enum State {
    Connecting,
    Up(Channel),
    /// The last attempt's error.
    Failing(Arc<str>),
}

#[derive(Clone)]
struct Link {
    /// Tells a re-inserted endpoint's link from the task of the one it replaced.
    id: u64,
    uri: Uri,
    state: State,
    /// Wakes the link's task from its backoff (see [`Shared::pick`]).
    nudge: Arc<Notify>,
}

struct Shared {
    links: watch::Sender<Vec<Link>>,
    /// Round-robin position.
    next: AtomicUsize,
    /// Link ids.
    ids: AtomicU64,
    /// [`MAX_BACKOFF`] (tests widen it to tell a nudge from a backoff however slow the VM).
    max_backoff: Duration,
    /// [`WAIT_CONNECTING`] (likewise).
    wait_connecting: Duration,
}

impl Shared {
    /// Sets link `id`'s state; `false` when the link was removed (its task should end).
    fn set(&self, id: u64, state: State) -> bool {
        let mut found = false;
        self.links.send_modify(|links| {
            if let Some(l) = links.iter_mut().find(|l| l.id == id) {
                l.state = state;
                found = true;
            }
        });
        found
    }

    /// A link that is up (round robin), waiting while none is but one is connecting; when all
    /// are failing, nudges them once and waits for those attempts.
    async fn pick(&self) -> Result<Channel, BoxError> {
        let mut rx = self.links.subscribe();
        let deadline = tokio::time::sleep(self.wait_connecting);
        tokio::pin!(deadline);
        let mut nudged = false;
        loop {
            {
                let links = rx.borrow_and_update();
                let up = || {
                    links.iter().filter_map(|l| match &l.state {
                        State::Up(c) => Some(c),
                        _ => None,
                    })
                };
                let n = up().count();
                if n > 0 {
                    let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
                    if let Some(c) = up().nth(i) {
                        return Ok(c.clone());
                    }
                }
                // No link yet: etcd-client's inserts are still on their way to `discover`.
                let waiting =
                    links.is_empty() || links.iter().any(|l| matches!(l.state, State::Connecting));
                if !waiting {
                    if nudged {
                        return Err(unreachable(&links));
                    }
                    links.iter().for_each(|l| l.nudge.notify_one());
                    nudged = true;
                }
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Err(Box::new(tonic::Status::unavailable("etcd: channel closed")));
                    }
                }
                () = &mut deadline => {
                    return Err(Box::new(tonic::Status::unavailable(format!(
                        "etcd: no endpoint connected within {:?}",
                        self.wait_connecting
                    ))));
                }
            }
        }
    }
}

/// `UNAVAILABLE` naming each endpoint's last error.
fn unreachable(links: &[Link]) -> BoxError {
    let each: Vec<String> = links
        .iter()
        .map(|l| match &l.state {
            State::Failing(e) => format!("{}: {e}", l.uri),
            _ => l.uri.to_string(),
        })
        .collect();
    Box::new(tonic::Status::unavailable(format!(
        "etcd: no endpoint reachable ({})",
        each.join("; ")
    )))
}

/// The service etcd-client sends every request through.
#[derive(Clone)]
struct Links {
    shared: Arc<Shared>,
}

impl Links {
    /// No links yet; the sender inserts and removes endpoints (a task applies the changes).
    fn new(buffer_size: usize) -> (Self, mpsc::Sender<Change<Uri, Endpoint>>) {
        Self::with_waits(buffer_size, MAX_BACKOFF, WAIT_CONNECTING)
    }

    /// [`Links::new`] with another longest backoff and wait for a connecting link.
    fn with_waits(
        buffer_size: usize,
        max_backoff: Duration,
        wait_connecting: Duration,
    ) -> (Self, mpsc::Sender<Change<Uri, Endpoint>>) {
        let (tx, rx) = mpsc::channel(buffer_size.max(1));
        let shared = Arc::new(Shared {
            links: watch::Sender::new(Vec::new()),
            next: AtomicUsize::new(0),
            ids: AtomicU64::new(0),
            max_backoff,
            wait_connecting,
        });
        tokio::spawn(discover(rx, Arc::downgrade(&shared)));
        (Self { shared }, tx)
    }
}

impl tower::Service<http::Request<Body>> for Links {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is decided per request, in `pick`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let channel = shared.pick().await?;
            channel.oneshot(request).await.map_err(BoxError::from)
        })
    }
}

/// Adds and removes links as etcd-client inserts and removes endpoints; ends with the client.
async fn discover(mut changes: mpsc::Receiver<Change<Uri, Endpoint>>, shared: Weak<Shared>) {
    while let Some(change) = changes.recv().await {
        let Some(s) = shared.upgrade() else { return };
        match change {
            Change::Insert(uri, endpoint) => {
                let id = s.ids.fetch_add(1, Ordering::Relaxed);
                let nudge = Arc::new(Notify::new());
                s.links.send_modify(|links| {
                    links.retain(|l| l.uri != uri);
                    links.push(Link {
                        id,
                        uri,
                        state: State::Connecting,
                        nudge: nudge.clone(),
                    });
                });
                let max_backoff = s.max_backoff;
                tokio::spawn(run_link(id, endpoint, nudge, max_backoff, shared.clone()));
            }
            Change::Remove(uri) => s.links.send_modify(|links| links.retain(|l| l.uri != uri)),
        }
    }
}

/// Keeps link `id` connected to `endpoint` (see the module docs) until it is removed or the
/// client is dropped.
async fn run_link(
    id: u64,
    endpoint: Endpoint,
    nudge: Arc<Notify>,
    max_backoff: Duration,
    shared: Weak<Shared>,
) {
    let uri = endpoint.uri().clone();
    let mut backoff = Backoff::new(MIN_BACKOFF, max_backoff).with_jitter(Jitter::Relative(0.2));
    let mut failing = false;
    loop {
        let (ended, mut end) = watch::channel(false);
        let attempt = endpoint
            .connect_with_connector(Connector {
                ended: Arc::new(ended),
            })
            .await;
        let Some(s) = shared.upgrade() else { return };
        let failure = match attempt {
            Ok(channel) => {
                if failing {
                    tracing::info!(endpoint = %uri, "etcd: endpoint reachable again");
                    failing = false;
                }
                if !s.set(id, State::Up(channel)) {
                    return;
                }
                drop(s);
                let opened = Instant::now();
                // Ends when the connection's socket is dropped, or (error) when the channel
                // and every socket it made are gone.
                let _ = end.wait_for(|ended| *ended).await;
                if opened.elapsed() >= STABLE {
                    let Some(s) = shared.upgrade() else { return };
                    tracing::debug!(endpoint = %uri, "etcd: connection ended; reconnecting");
                    backoff.reset();
                    if !s.set(id, State::Connecting) {
                        return;
                    }
                    continue;
                }
                "the connection ended right after it opened".to_owned()
            }
            Err(e) => {
                drop(s);
                let why = error_chain(&e);
                if !failing {
                    tracing::warn!(endpoint = %uri, error = %why, "etcd: endpoint unreachable; retrying");
                    failing = true;
                }
                why
            }
        };
        let Some(s) = shared.upgrade() else { return };
        if !s.set(id, State::Failing(failure.into())) {
            return;
        }
        drop(s);
        let failed = Instant::now();
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = nudge.notified() => tokio::time::sleep_until(failed + MIN_BACKOFF).await,
        }
        let Some(s) = shared.upgrade() else { return };
        if !s.set(id, State::Connecting) {
            return;
        }
    }
}

/// An error and its sources, `: `-separated.
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Some errors already print their source.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Plain TCP to the endpoint's host and port; every socket it makes flips `ended` when
/// dropped, which is how a link learns that its connection is over.
#[derive(Clone)]
struct Connector {
    ended: Arc<watch::Sender<bool>>,
}

impl tower::Service<Uri> for Connector {
    type Response = Tracked;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Tracked, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let ended = self.ended.clone();
        Box::pin(async move {
            let host = uri.host().ok_or("etcd endpoint without a host")?;
            // `[::1]` in a URI, `::1` for the resolver.
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(2379);
            let stream = TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            Ok(Tracked {
                io: TokioIo::new(stream),
                ended,
            })
        })
    }
}

/// A TCP stream that says when it is dropped.
struct Tracked {
    io: TokioIo<TcpStream>,
    ended: Arc<watch::Sender<bool>>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.ended.send_replace(true);
    }
}

impl hyper::rt::Read for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    //! Real HTTP/2 servers on loopback (the standard health service, each answering the
    //! service `who` with its own status so a test sees which one answered) and ports nobody
    //! listens on.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    /// A health server on `port` that answers `who` with `status`; stops when dropped.
    struct Server {
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Server {
        async fn start(port: u16, status: ServingStatus) -> Self {
            let (reporter, service) = tonic_health::server::health_reporter();
            let status = match status {
                ServingStatus::Serving => tonic_health::ServingStatus::Serving,
                _ => tonic_health::ServingStatus::NotServing,
            };
            reporter.set_service_status("who", status).await;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let task = tokio::spawn(async move {
                let _keep = reporter;
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
            Self {
                stop: Some(stop),
                task,
            }
        }

        /// Graceful shutdown: its connections are closed.
        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            let _ = (&mut self.task).await;
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn endpoint(port: u16) -> (Uri, Endpoint) {
        let e = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2));
        (e.uri().clone(), e)
    }

    /// Links over `ports`, in this order.
    async fn links(ports: &[u16]) -> Links {
        with_links(Links::new(8), ports).await
    }

    /// The longest backoff of [`slow_links`]: far beyond any stall of this VM, so "did not
    /// wait out the backoff" is told apart by a generous bound ([`PROMPT`]).
    const LONG_BACKOFF: Duration = Duration::from_secs(20);
    /// An answer that does not wait out [`LONG_BACKOFF`] (at least 16 s with its jitter) nor
    /// [`LONG_WAIT`] comes within this.
    const PROMPT: Duration = Duration::from_secs(8);
    /// The wait for a connecting link in [`slow_links`].
    const LONG_WAIT: Duration = Duration::from_secs(60);

    /// [`links`] whose backoff grows to [`LONG_BACKOFF`] and that wait [`LONG_WAIT`] for a
    /// connecting link.
    async fn slow_links(ports: &[u16]) -> Links {
        with_links(Links::with_waits(8, LONG_BACKOFF, LONG_WAIT), ports).await
    }

    async fn with_links(
        (links, tx): (Links, mpsc::Sender<Change<Uri, Endpoint>>),
        ports: &[u16],
    ) -> Links {
        for &p in ports {
            let (uri, e) = endpoint(p);
            tx.send(Change::Insert(uri, e)).await.unwrap();
        }
        links
    }

    /// Which server answered a health check of `who` (its status).
    async fn who(links: &Links) -> Result<ServingStatus, tonic::Status> {
        let r = HealthClient::new(links.clone())
            .check(HealthCheckRequest {
                service: "who".into(),
            })
            .await?
            .into_inner();
        Ok(ServingStatus::try_from(r.status).unwrap())
    }

    /// Waits until the link on `port` is up (`true`) or is not (`false`) (generous: this VM
    /// stalls).
    async fn wait_up(links: &Links, port: u16, up: bool) {
        let mut rx = links.shared.links.subscribe();
        let is = move |ls: &Vec<Link>| {
            ls.iter()
                .any(|l| l.uri.port_u16() == Some(port) && matches!(l.state, State::Up(_)) == up)
        };
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(is))
            .await
            .expect("link state")
            .unwrap();
    }

    #[tokio::test]
    async fn requests_skip_an_endpoint_nobody_listens_on() {
        let live = free_port();
        let _server = Server::start(live, ServingStatus::Serving).await;
        // The dead endpoint first, as a cluster's first member may be the one that is down.
        let links = links(&[free_port(), live]).await;
        for i in 0..100 {
            let answer = who(&links).await;
            assert_eq!(answer.ok(), Some(ServingStatus::Serving), "request {i}");
        }
    }

    /// Fails requests until every link's backoff has grown to its maximum.
    async fn grow_backoff(links: &Links) {
        for _ in 0..12 {
            assert!(who(links).await.is_err());
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }

    #[tokio::test]
    async fn with_every_endpoint_down_a_request_fails_fast_naming_them() {
        let (a, b) = (free_port(), free_port());
        let links = slow_links(&[a, b]).await;
        // Fails once each link's attempt failed, not after the wait for a connecting one.
        let started = Instant::now();
        let err = who(&links).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        for port in [a, b] {
            assert!(err.message().contains(&port.to_string()), "{err:?}");
        }
        assert!(started.elapsed() < PROMPT, "{:?}", started.elapsed());
        // And again with the backoff at its longest: one more attempt (nudged), no waiting
        // out the backoff. (One link: with two, the other's backoff, in another phase, could
        // end sooner.)
        let links = slow_links(&[a]).await;
        grow_backoff(&links).await;
        let started = Instant::now();
        assert!(who(&links).await.is_err());
        assert!(started.elapsed() < PROMPT, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn the_first_request_after_the_endpoint_comes_back_connects_at_once() {
        let port = free_port();
        let links = slow_links(&[port]).await;
        // Failed attempts grow the backoff to its maximum.
        grow_backoff(&links).await;
        // Right after a failed attempt the link waits the backoff before the next; a request
        // does not (without the nudge it would fail at once: every link failing).
        let _server = Server::start(port, ServingStatus::Serving).await;
        let started = Instant::now();
        assert_eq!(who(&links).await.unwrap(), ServingStatus::Serving);
        assert!(started.elapsed() < PROMPT, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn an_endpoint_that_comes_back_gets_requests_again() {
        let (first, second) = (free_port(), free_port());
        let _a = Server::start(first, ServingStatus::Serving).await;
        let links = links(&[first, second]).await;
        assert_eq!(who(&links).await.unwrap(), ServingStatus::Serving);
        let _b = Server::start(second, ServingStatus::NotServing).await;
        // Retried within the backoff (at most 1 s + jitter), then round robin reaches it.
        wait_up(&links, second, true).await;
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(who(&links).await.unwrap());
        }
        assert!(answers.contains(&ServingStatus::NotServing), "{answers:?}");
        assert!(answers.contains(&ServingStatus::Serving), "{answers:?}");
    }

    #[tokio::test]
    async fn an_endpoint_whose_connection_ends_is_left() {
        let (first, second) = (free_port(), free_port());
        let _a = Server::start(first, ServingStatus::Serving).await;
        let b = Server::start(second, ServingStatus::NotServing).await;
        let links = links(&[first, second]).await;
        wait_up(&links, first, true).await;
        wait_up(&links, second, true).await;
        b.stop().await;
        wait_up(&links, second, false).await;
        for i in 0..50 {
            let answer = who(&links).await;
            assert_eq!(answer.ok(), Some(ServingStatus::Serving), "request {i}");
        }
    }

    #[test]
    fn an_error_chain_names_each_cause_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl StdError for E {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "transport error: refused",
            Some(Box::new(E(
                "refused",
                Some(Box::new(E("os error 111", None))),
            ))),
        );
        assert_eq!(error_chain(&e), "transport error: refused: os error 111");
    }
}
