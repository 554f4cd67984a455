//! # dlb-client — the DLB SDK
//!
//! Links into a microservice, follows routing state from `dlbd` over one long-lived
//! `Discovery.Session` stream and picks backends **locally** in O(1): no network hop on the
//! request path.
//!
//! The call path carries the calls too: a tonic client in one line —
//! `GreeterClient::new(client.channel("greeter")?)` — with connections per backend, outcomes and
//! latencies reported by themselves, retries, a retry budget and hedging (see [`call`] and
//! `docs/sdk.md`). Or pick by hand:
//!
//! ```no_run
//! # async fn demo() -> Result<(), dlb_client::Error> {
//! let client = dlb_client::Client::connect(["http://127.0.0.1:50051"]).await?;
//! let web = client.service("web").await?;          // waits for the first snapshot
//! let call = web.get_next_server(Some(b"user-42"))?; // local, O(1)
//! println!("calling {}", call.address());
//! call.success();                                   // outcome + latency go into load reports
//! # Ok(()) }
//! ```
//!
//! Parts:
//! * [`Client`] / [`ClientBuilder`] — endpoints (static, or a DNS name standing for every
//!   replica: `dns:///host:port`, resolved through a [`Resolve`]), options, the session task,
//!   and the seed API (`add_server`, `remove_server`, `health_check_passed`,
//!   `health_check_failed`, `get_next_server`) on the default service;
//! * [`ServiceHandle`] — one subscribed service: local picks ([`CallGuard`]), version watch,
//!   staleness, and the same admin calls on that service;
//! * [`call`] — [`Balance`], the tower `Service` (tonic transport, HTTP/1.1) over a service;
//! * [`clock`] — the clock that times calls (the TSC by default; tokio's for paused-time tests);
//! * [`admin`] — the `Registry` RPCs, validated locally with [`dlb::model`] first;
//! * `session` (private) — the task that owns routing state, applies snapshots and deltas,
//!   acks/nacks, reports load and reconnects with backoff;
//! * [`Error`] — one error enum, mapped from gRPC codes.
//!
//! While no control plane is reachable, handles keep routing on their last snapshot
//! ([`ServiceHandle::last_update_age`] grows, [`Client::is_connected`] is false). See the
//! `session` module docs for the rule that protects a service from being emptied by a control
//! plane that lost its state.

pub mod admin;
mod breaker;
pub mod call;
mod channel;
pub mod clock;
mod error;
mod global;
pub mod locality;
pub mod membership;
pub mod metrics;
mod resolve;
mod service;
mod session;
mod state;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dlb::model;
use dlb::proto;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

pub use admin::{AdminClient, ChannelOptions, NewServer, ServerUpdate, TokenInterceptor};
pub use call::{Balance, BalanceBuilder, BalanceLayer};
pub use clock::CallClock;
pub use error::{Error, Result};
pub use membership::{DnsDeclaration, Lease, Registration};
pub use metrics::ClientMetrics;
pub use resolve::{Resolve, SystemResolver};
pub use service::{BackendInfo, CallGuard, ServiceHandle};
pub use state::{ServiceStats, Version};

use resolve::DnsName;
use session::targets::{Target, Targets};
use session::{Command, Link, SessionConfig};
use state::ServiceState;

/// Options for a [`Client`]. Start with [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    client_id: Option<String>,
    report_interval: Duration,
    ack_delay: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    subscribe_timeout: Duration,
    update_deadline: Duration,
    wait_connected: bool,
    channel: ChannelOptions,
    snapshot_file: Option<std::path::PathBuf>,
    resolver: Arc<dyn Resolve>,
    call_clock: CallClock,
    locality: locality::LocalitySetting,
}

impl ClientBuilder {
    /// Options with defaults: report every 1 s, acks coalesced for up to 100 ms, backoff 50 ms..5 s, connect timeout 2 s,
    /// keepalive 10 s (5 s timeout), update deadline 15 s, first-snapshot timeout 5 s, wait for
    /// the first session, no snapshot file, the system resolver.
    ///
    /// Each endpoint is `http://host:port`, `https://host:port`, `host:port`, or a DNS name
    /// standing for every control-plane replica: `dns:///host:port` (also `dns:host:port`; the
    /// port is required). The session rotates over the endpoints in order, a name's addresses
    /// (shuffled) in its place, and resolves names again after each round; see
    /// [`ClientBuilder::resolver`]. A malformed endpoint fails [`ClientBuilder::connect`] with
    /// [`Error::InvalidEndpoint`].
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            client_id: None,
            report_interval: Duration::from_secs(1),
            ack_delay: Duration::from_millis(100),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            subscribe_timeout: Duration::from_secs(5),
            update_deadline: Duration::from_secs(15),
            wait_connected: true,
            channel: ChannelOptions::default(),
            snapshot_file: None,
            resolver: Arc::new(SystemResolver),
            call_clock: CallClock::Tsc,
            locality: locality::LocalitySetting::default(),
        }
    }

    /// How the session resolves `dns:///host:port` endpoints (default: [`SystemResolver`]).
    /// Each lookup is bounded by the connect timeout; one that fails, times out or answers
    /// nothing keeps the previous answer. Admin calls ([`Client::admin`]) on such an endpoint
    /// resolve the name with it too, at each connection.
    pub fn resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.resolver = resolver;
        self
    }

    /// The clock that times calls ([`CallGuard`] latency; default [`CallClock::Tsc`], the
    /// cheapest). [`CallClock::Tokio`] makes call latencies follow paused tokio time (tests
    /// that simulate slow backends with `tokio::time::sleep` on paused time). See [`clock`].
    pub fn call_clock(mut self, clock: CallClock) -> Self {
        self.call_clock = clock;
        self
    }

    /// Identity sent in `Subscribe` (default: `pid<pid>-<random>`).
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// How often load reports are sent (default 1 s).
    pub fn report_interval(mut self, interval: Duration) -> Self {
        self.report_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How long an Ack may wait to be coalesced with later ones (default 100 ms). Updates are
    /// applied at once either way; only the acknowledgement is deferred, and it always names the
    /// latest version applied, so a burst of N updates costs one Ack instead of N. A Nack is never
    /// deferred. `Duration::ZERO` acknowledges every update immediately.
    pub fn ack_delay(mut self, delay: Duration) -> Self {
        self.ack_delay = delay;
        self
    }

    /// Reconnect backoff bounds: full jitter over `[0, min(max, min × 2^attempt)]`.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// Timeout for establishing a connection and a session (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.channel.connect_timeout = timeout;
        self
    }

    /// HTTP/2 keepalive ping interval and ack timeout: how fast a dead stream is detected.
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.channel.keepalive_interval = interval;
        self.channel.keepalive_timeout = timeout;
        self
    }

    /// How long an established session may receive nothing at all before the client declares
    /// the control plane dead or stuck and fails over to the next endpoint (default 15 s, at
    /// least 100 ms). `dlbd` sends a `Heartbeat` after 5 s of silence (its
    /// `session_heartbeat`), so keep this a few heartbeats long. HTTP/2 keepalives
    /// ([`ClientBuilder::keepalive`]) catch a dead connection; this catches a replica that is
    /// connected but no longer follows its store.
    pub fn update_deadline(mut self, deadline: Duration) -> Self {
        self.update_deadline = deadline.max(Duration::from_millis(100));
        self
    }

    /// Keeps a copy of the last good routing state in `path` (written at most once a second
    /// while it changes, atomically: a temporary file renamed over the old one). A client that
    /// starts while no control plane can be reached routes on this copy, marked stale
    /// ([`ServiceHandle::is_stale`]; [`ServiceHandle::last_update_age`] counts from when the
    /// state was received), and resubscribes with its versions, so a control plane of the same
    /// store history answers with deltas. A missing, unreadable or corrupt file is ignored (and
    /// logged). The format is `dlb.v1.SdkSnapshotFile`.
    pub fn snapshot_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.snapshot_file = Some(path.into());
        self
    }

    /// Sends `token` as `authorization: Bearer <token>` on the session and every admin call
    /// (for a `dlbd` started with `--admin-token-file` / `--read-token-file`).
    pub fn token(mut self, token: &str) -> Result<Self> {
        self.channel.token = admin::TokenInterceptor::new(Some(token))?;
        Ok(self)
    }

    /// TLS towards the control plane (CA, and a client identity for mutual TLS); endpoints
    /// given as `host:port` or `dns:///host:port` then use `https://`. The server's certificate
    /// is verified against [`admin::ClientTls::domain`] when set, else the endpoint's host —
    /// for a `dns:` endpoint the name, not the address it resolved to.
    pub fn tls(mut self, tls: admin::ClientTls) -> Self {
        self.channel.tls = Some(tls);
        self
    }

    /// Deadline of each admin (`Registry`) call (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.channel.request_timeout = timeout;
        self
    }

    /// How long [`Client::service`] waits for a service's first snapshot (default 5 s).
    pub fn subscribe_timeout(mut self, timeout: Duration) -> Self {
        self.subscribe_timeout = timeout;
        self
    }

    /// Whether [`ClientBuilder::connect`] waits (up to the connect timeout) for the first
    /// session and fails with [`Error::Unavailable`] without one (default true). With false it
    /// returns at once and connects in the background.
    pub fn wait_connected(mut self, wait: bool) -> Self {
        self.wait_connected = wait;
        self
    }

    /// Builds the client and starts its session task. Must be called inside a tokio runtime.
    pub async fn connect(self) -> Result<Client> {
        let own_locality = self.locality.resolve(|var| std::env::var(var).ok())?;
        let mut channels = Vec::with_capacity(self.endpoints.len());
        let mut targets = Vec::with_capacity(self.endpoints.len());
        for raw in &self.endpoints {
            // Checks the endpoint (a `dns:` one too); the admin calls' channel.
            let channel = channel::admin_channel(raw, &self.channel, &self.resolver)?;
            targets.push(match DnsName::parse(raw) {
                Some(name) => Target::name(raw, name?),
                None => Target::fixed(raw, channel.clone()),
            });
            channels.push((raw.clone(), channel));
        }
        let admin = AdminClient::from_channels(channels, &self.channel)?;
        let targets = Targets::new(targets, self.resolver.clone(), self.channel.clone());
        let link = Arc::new(Link::new(self.endpoints.first().map_or("", String::as_str)));
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (closed_tx, closed_rx) = watch::channel(false);
        let config = SessionConfig {
            client_id: self
                .client_id
                .unwrap_or_else(|| format!("pid{}-{:08x}", std::process::id(), fastrand::u32(..))),
            report_interval: self.report_interval,
            ack_delay: self.ack_delay,
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max,
            connect_timeout: self.channel.connect_timeout,
            update_deadline: self.update_deadline,
            token: self.channel.token.clone(),
            locality: own_locality,
        };
        let restored = match &self.snapshot_file {
            Some(path) => session::restore(
                path,
                dlb::locality::ZoneKey::of(config.locality.as_ref()).as_ref(),
            ),
            None => session::Restored::empty(),
        };
        let tokio_clock = self.call_clock == CallClock::Tokio;
        let services: HashMap<String, Arc<ServiceState>> = restored
            .states
            .iter()
            .map(|s| {
                s.tokio_clock.store(tokio_clock, Ordering::Relaxed);
                (s.name.clone(), s.clone())
            })
            .collect();
        let mut connected = link.connected.subscribe();
        tokio::spawn(session::run(
            config,
            targets,
            link.clone(),
            cmd_rx,
            closed_rx,
            restored,
            self.snapshot_file.clone(),
        ));
        let routes_from_file = !services.is_empty();
        let client = Client {
            inner: Arc::new(Inner {
                admin,
                link,
                services: Mutex::new(services),
                calls: Mutex::default(),
                commands: cmd_tx,
                closed: closed_tx,
                subscribe_timeout: self.subscribe_timeout,
                call_clock: self.call_clock,
            }),
        };
        if self.wait_connected {
            let waited =
                tokio::time::timeout(self.channel.connect_timeout, connected.wait_for(|c| *c))
                    .await;
            if !matches!(waited, Ok(Ok(_))) && routes_from_file {
                tracing::warn!(endpoints = ?self.endpoints,
                    "no control plane reachable; routing on the snapshot file (stale) and retrying");
            } else if !matches!(waited, Ok(Ok(_))) {
                client.close();
                return Err(Error::Unavailable(format!(
                    "no control plane reachable at {:?} within {:?}",
                    self.endpoints, self.channel.connect_timeout
                )));
            }
        }
        Ok(client)
    }
}

#[derive(Debug)]
struct Inner {
    admin: AdminClient,
    link: Arc<Link>,
    /// Subscribed services by name. A `Mutex` because it is touched only when subscribing (never
    /// on the pick path) and never held across `.await`.
    services: Mutex<HashMap<String, Arc<ServiceState>>>,
    /// What the call path counted per service (shared by every `Balance` of it). A `Mutex`
    /// because it is touched when a `Balance` is built and when metrics are read, never per call.
    calls: Mutex<HashMap<String, Arc<call::CallStats>>>,
    commands: mpsc::UnboundedSender<Command>,
    closed: watch::Sender<bool>,
    subscribe_timeout: Duration,
    /// The clock that times calls on this client's services.
    call_clock: CallClock,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.send_replace(true);
    }
}

/// A connection to the DLB control plane: one session task multiplexing every subscribed
/// service, plus the admin calls. Cheap to clone; the session ends when the last clone (and the
/// last [`ServiceHandle`]) is dropped, or on [`Client::close`].
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects with default options (see [`ClientBuilder::new`]) to `endpoints`
    /// (`http://host:port`, `host:port` or `dns:///host:port`), tried in order, rotating on
    /// failure.
    pub async fn connect(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Result<Self> {
        ClientBuilder::new(endpoints).connect().await
    }

    /// Options for a client over `endpoints`.
    pub fn builder(endpoints: impl IntoIterator<Item = impl Into<String>>) -> ClientBuilder {
        ClientBuilder::new(endpoints)
    }

    /// Subscribes to `name` (empty = "default") — or returns the existing subscription — and
    /// waits up to the subscribe timeout for the control plane's first answer. A service the
    /// control plane does not know yields a handle whose picks fail with
    /// [`Error::ServiceNotFound`] until it is created.
    pub async fn service(&self, name: &str) -> Result<ServiceHandle> {
        let handle = self.subscribe(name)?;
        let state = handle.state.clone();
        let name = state.name.clone();
        if !state.answered.load(Ordering::Acquire) {
            let mut rx = state.version_tx.subscribe();
            let wait = rx.wait_for(|_| state.answered.load(Ordering::Acquire));
            let waited = tokio::time::timeout(self.inner.subscribe_timeout, wait).await;
            match waited {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Err(Error::Closed),
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "no snapshot of service {name:?} within {:?}",
                        self.inner.subscribe_timeout
                    )))
                }
            }
        }
        Ok(handle)
    }

    /// A gRPC transport over service `name` (subscribing without waiting; calls wait for the
    /// first snapshot): `GreeterClient::new(client.channel("greeter")?)`. Default options; see
    /// [`Client::balance`] and [`call`] for the others. Errors only on an invalid name.
    pub fn channel(&self, name: &str) -> Result<Balance> {
        Ok(Balance::builder(self.subscribe(name)?).build())
    }

    /// Options for a call-path service over `name` (see [`call`]): protocol, key, retries,
    /// hedging, budget.
    pub fn balance(&self, name: &str) -> Result<BalanceBuilder> {
        Ok(Balance::builder(self.subscribe(name)?))
    }

    /// The call-path counters of service `name` (created on first use).
    pub(crate) fn call_stats(&self, name: &str) -> Arc<call::CallStats> {
        self.inner
            .calls
            .lock()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Subscribes to `name` without waiting for the first answer.
    fn subscribe(&self, name: &str) -> Result<ServiceHandle> {
        let name = model::resolve_service(name)?.to_owned();
        let state = {
            let mut services = self.inner.services.lock();
            if let Some(s) = services.get(&name) {
                s.clone()
            } else {
                let s = Arc::new(ServiceState::new(name.clone()));
                s.tokio_clock
                    .store(self.inner.call_clock == CallClock::Tokio, Ordering::Relaxed);
                self.inner
                    .commands
                    .send(Command::Subscribe(s.clone()))
                    .map_err(|_| Error::Closed)?;
                services.insert(name.clone(), s.clone());
                s
            }
        };
        Ok(ServiceHandle {
            state,
            client: self.clone(),
        })
    }

    /// The handle of the default service (subscribing on first use).
    pub async fn default_service(&self) -> Result<ServiceHandle> {
        self.service(model::DEFAULT_SERVICE).await
    }

    /// Sessions abandoned because nothing (not even a heartbeat) arrived within the update
    /// deadline ([`ClientBuilder::update_deadline`]).
    pub fn update_deadline_expiries(&self) -> u64 {
        self.inner.link.deadline_expiries.load(Ordering::Relaxed)
    }

    /// Whether the session with the control plane is up.
    pub fn is_connected(&self) -> bool {
        *self.inner.link.connected.borrow()
    }

    /// Waits until the session is up (wrap in `tokio::time::timeout`).
    pub async fn wait_connected(&self) -> Result<()> {
        let mut rx = self.inner.link.connected.subscribe();
        rx.wait_for(|c| *c).await.map_err(|_| Error::Closed)?;
        Ok(())
    }

    /// Number of sessions established so far (1 + reconnects).
    pub fn sessions_established(&self) -> u64 {
        self.inner.link.sessions.load(Ordering::Relaxed)
    }

    /// The endpoint the session uses (or tried last; the first one configured before any
    /// was tried): a static endpoint as given, or for a `dns:///host:port` endpoint the
    /// resolved address, as `http(s)://ip:port`.
    pub fn current_endpoint(&self) -> String {
        self.inner.link.endpoint.lock().to_string()
    }

    /// Ends the session task now. Handles keep their last snapshot but get no more updates.
    pub fn close(&self) {
        self.inner.closed.send_replace(true);
    }

    /// Bench and test support, not a stable API: a handle on `update.service` that routes on
    /// `update` (a full snapshot, validated and applied exactly as the session applies one) but
    /// is detached from the session, so it never receives updates. Its admin calls go through
    /// this client as usual.
    #[doc(hidden)]
    pub fn detached_service(&self, update: &proto::ServiceUpdate) -> Result<ServiceHandle> {
        let name = model::resolve_service(&update.service)?.to_owned();
        let state = Arc::new(ServiceState::new(name));
        state
            .tokio_clock
            .store(self.inner.call_clock == CallClock::Tokio, Ordering::Relaxed);
        session::apply_detached(&state, update).map_err(Error::InvalidArgument)?;
        Ok(ServiceHandle {
            state,
            client: self.clone(),
        })
    }

    /// This client's Prometheus metrics (session up, per service the age of the last update,
    /// version, staleness, update counters, backends): register them in the application's
    /// registry with `registry.register_collector(Box::new(client.metrics()))`, or append
    /// [`ClientMetrics::encode_text`] to its `/metrics` answer. See [`metrics`].
    pub fn metrics(&self) -> ClientMetrics {
        ClientMetrics {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// The admin (`Registry`) client, for calls on any service.
    pub fn admin(&self) -> &AdminClient {
        &self.inner.admin
    }

    /// `get_next_server()` on the default service: a local O(1) pick (subscribes on first use).
    pub async fn get_next_server(&self, key: Option<&[u8]>) -> Result<CallGuard> {
        self.default_service().await?.get_next_server(key)
    }

    /// `GetNextServer` on the default service, answered by the control plane.
    pub async fn get_next_server_remote(
        &self,
        key: Option<&[u8]>,
    ) -> Result<proto::GetNextServerResponse> {
        self.admin().get_next_server("", key).await
    }

    /// `add_server(server_id, address, weight)` on the default service.
    pub async fn add_server(
        &self,
        server_id: &str,
        address: &str,
        weight: u32,
    ) -> Result<proto::ServerResponse> {
        self.admin()
            .add_server("", NewServer::new(server_id, address).weight(weight))
            .await
    }

    /// `remove_server(server_id)` on the default service.
    pub async fn remove_server(&self, server_id: &str) -> Result<proto::RemoveServerResponse> {
        self.admin().remove_server("", server_id).await
    }

    /// `remove_service(service, force)`: removes a service; see [`AdminClient::remove_service`].
    pub async fn remove_service(
        &self,
        service: &str,
        force: bool,
    ) -> Result<proto::RemoveServiceResponse> {
        self.admin().remove_service(service, force).await
    }

    /// `health_check_passed(server_id)` on the default service.
    pub async fn health_check_passed(&self, server_id: &str) -> Result<proto::ServerResponse> {
        self.admin().health_check_passed("", server_id).await
    }

    /// `health_check_failed(server_id)` on the default service.
    pub async fn health_check_failed(&self, server_id: &str) -> Result<proto::ServerResponse> {
        self.admin().health_check_failed("", server_id).await
    }

    /// `UpdateServer` on the default service.
    pub async fn update_server(&self, update: ServerUpdate) -> Result<proto::ServerResponse> {
        self.admin().update_server("", update).await
    }

    /// `ListServers` on the default service.
    pub async fn list_servers(&self) -> Result<proto::ListServersResponse> {
        self.admin().list_servers("").await
    }

    /// `GetPolicy` on the default service.
    pub async fn get_policy(&self) -> Result<proto::Policy> {
        Ok(self
            .admin()
            .get_policy("")
            .await?
            .policy
            .unwrap_or_default())
    }

    /// `SetPolicy` on the default service.
    pub async fn set_policy(&self, policy: proto::Policy) -> Result<proto::PolicyResponse> {
        self.admin().set_policy("", policy).await
    }
}
