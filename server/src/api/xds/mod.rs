//! The standard xDS front-end: the Aggregated Discovery Service (ADS) on `dlbd`'s gRPC port, so
//! stock gRPC clients (grpcio, grpc-js, grpc-go, grpc-java) balance through DLB with a bootstrap
//! file and an `xds:///S` target. Every DLB service `S` (the default service is named
//! `default`: `xds:///default`) is served as Listener, Cluster and ClusterLoadAssignment `S`.
//!
//! Parts:
//!
//! * [`resources`] — the DLB → xDS mapping (pure functions); [`assignment`] — the
//!   ClusterLoadAssignment per client zone (per-node EDS), built with the locality plan
//!   (`dlb::locality::plan`) once per (service version, client zone) and re-planned when its
//!   live inputs — zone demand, global in-flight counts — move ([`inputs`]);
//! * [`sotw`] — state-of-the-world `StreamAggregatedResources`;
//! * [`delta`] — incremental `DeltaAggregatedResources`;
//! * `stream` — the stream core both share: per-stream state (subscriptions, nonces, followed
//!   services, bounds) and the one select loop; [`sotw`] and [`delta`] say only how a request
//!   is read and how a response is built;
//! * [`clients`] — per-stream bookkeeping (subscriptions, versions and nonces sent and acked,
//!   NACKs); [`status`] — the `dlb.v1.XdsStatus` RPC that lists it for `dlbctl xds-clients`.
//!
//! Like the DLB session (`api::discovery`) this is a thin front-end of the snapshot cache
//! ([`crate::cache`]): a stream follows the services it subscribed to with one cache
//! [`Waker`](crate::cache::Waker); when woken it reads the newest snapshots and pushes what
//! changed. A burst of writes costs a slow stream one coalesced update. Resource versions are
//! `HASH.EPOCH.REVISION` ([`tag`]): the hash of the encoded resources decides whether a client
//! holds them already, so a stream that reconnects with the version it holds (to this or another
//! replica serving the same state) is not sent the same resources again; the epoch and revision
//! say how new that state is, so a replica whose cache is behind the client's revision (same
//! epoch) waits for it a bounded time and otherwise ends the stream with `UNAVAILABLE`
//! ([`stream::not_behind`]) — a client is never sent resources older than those it holds.
//!
//! **Resource names and bounds.** A resource name is a DLB service name, so a name is followed
//! in the cache only when it is one ([`dlb::model::validate_id`]: 1..=128 bytes of
//! `[A-Za-z0-9._:-]`, exactly as everywhere else). Any other name (too long, other characters,
//! an `xdstp://` name) is answered as a resource that does not exist — left out of SotW
//! responses, in `removed_resources` on a delta stream — and never reaches the cache. The stream
//! is *not* ended for it: a stock gRPC client multiplexes every channel of a process over one ADS
//! stream, so ending it would take the client's other resources down too. What a stream can
//! make `dlbd` keep is bounded: at most [`MAX_NAMES_PER_TYPE`] names per type,
//! [`MAX_NAMES_PER_STREAM`] names and [`MAX_NAME_BYTES_PER_STREAM`] bytes of names (plus, on a
//! delta stream, the versions the client says it holds) over all its types, and [`MAX_TYPES`]
//! types; a request past a bound ends the stream with `RESOURCE_EXHAUSTED` naming the field and
//! the limit. With every bound reached one stream holds about 25 MB (the names in its
//! subscriptions, the `dlbctl xds-clients` bookkeeping and the cache entries of the names it
//! follows); all of it is released when the stream ends.
//!
//! Auth and TLS are those of the whole port: the ADS path needs a read token when read tokens are
//! configured (`api::auth`).

pub mod assignment;
pub mod clients;
pub mod delta;
pub mod inputs;
pub mod resources;
pub mod sotw;
pub mod status;
mod stream;

use std::pin::Pin;
use std::sync::Arc;

use crate::shutdown::Shutdown;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_stream::wrappers::ReceiverStream;

use crate::cache::Cache;
pub use clients::XdsClients;

/// Capacity of a stream's outbound queue (responses are full states: a few suffice).
const QUEUE: usize = 16;

/// Largest xDS message accepted or sent (bytes): DLB's limit for every message.
pub const MAX_MESSAGE_BYTES: usize = dlb::model::MAX_MESSAGE_BYTES;

/// Most resource names one stream may subscribe to per type (a quota where state is created).
pub const MAX_NAMES_PER_TYPE: usize = 10_000;

/// Most resource names one stream may subscribe to, all types together (every service under
/// the three types DLB serves).
pub const MAX_NAMES_PER_STREAM: usize = 3 * dlb::model::MAX_SERVICES;

/// Most bytes of resource names one stream may keep, all types together (on a delta stream
/// with the versions of `initial_resource_versions`).
pub const MAX_NAME_BYTES_PER_STREAM: usize = 1 << 20;

/// Longest resource version kept from a client (`initial_resource_versions`): DLB's versions
/// are 16 hex digits, so a longer one can never match and is kept as empty.
pub const MAX_CLIENT_VERSION: usize = 64;

/// Whether `name` can name a DLB service (and so be followed in the cache).
pub(crate) fn valid_name(name: &str) -> bool {
    dlb::model::validate_id("resource_names", name).is_ok()
}

/// Checks a stream's subscriptions over all its types: `names` names holding `bytes` bytes.
pub(crate) fn check_stream(field: &str, names: usize, bytes: usize) -> Result<(), tonic::Status> {
    if names > MAX_NAMES_PER_STREAM {
        return Err(tonic::Status::resource_exhausted(format!(
            "{field}: {names} names on this stream; at most {MAX_NAMES_PER_STREAM} over all resource types"
        )));
    }
    if bytes > MAX_NAME_BYTES_PER_STREAM {
        return Err(tonic::Status::resource_exhausted(format!(
            "{field}: {bytes} bytes of resource names on this stream; at most {MAX_NAME_BYTES_PER_STREAM} over all resource types"
        )));
    }
    Ok(())
}

/// The label set of a per-type metric: the type's short name.
fn by_type(type_url: &str) -> Vec<(String, String)> {
    vec![(
        "type".to_owned(),
        resources::short_name(type_url).to_owned(),
    )]
}

/// The xDS metrics (registered in the control plane's one registry at start).
#[derive(Debug, Clone, Default)]
pub struct XdsMetrics {
    streams: Gauge,
    nacks: Family<Vec<(String, String)>, Counter>,
    responses: Family<Vec<(String, String)>, Counter>,
    replans: Counter,
}

impl XdsMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dlb_xds_streams",
            "ADS streams (state-of-the-world and delta) currently open",
            m.streams.clone(),
        );
        registry.register(
            "dlb_xds_nacks",
            "xDS responses rejected by clients (NACKs), by resource type",
            m.nacks.clone(),
        );
        registry.register(
            "dlb_xds_responses",
            "xDS responses sent, by resource type",
            m.responses.clone(),
        );
        registry.register(
            "dlb_xds_eds_replans",
            "Per-node EDS assignments (one service, one client zone) replaced because the zone demand or the global in-flight counts moved the plan (no store change)",
            m.replans.clone(),
        );
        m
    }

    /// Counts `n` per-node EDS assignments re-planned from live inputs.
    pub fn replanned(&self, n: u64) {
        self.replans.inc_by(n);
    }

    /// Counts one NACK of a resource type.
    pub fn nack(&self, type_url: &str) {
        self.nacks.get_or_create(&by_type(type_url)).inc();
    }

    /// Counts one response of a resource type.
    pub fn response(&self, type_url: &str) {
        self.responses.get_or_create(&by_type(type_url)).inc();
    }

    /// A stream opened (+1) or closed (-1).
    pub fn streams(&self, delta: i64) {
        self.streams.inc_by(delta);
    }
}

/// One resource built from one service version (for EDS: and one client zone): packed, with its
/// content hash. Shared by every stream that sends it.
#[derive(Debug)]
pub struct Built {
    /// The packed resource.
    pub any: envoy_types::pb::google::protobuf::Any,
    /// Its content hash.
    pub hash: String,
    /// The service version (store revision) it was built from.
    pub version: u64,
}

impl Built {
    /// What a client holding this resource holds, for the drain barrier.
    pub fn held(&self) -> clients::Held {
        clients::Held {
            hash: self.hash.clone(),
            version: self.version,
        }
    }

    /// The resource's xDS version: `HASH.EPOCH.REVISION` (see [`tag`]).
    pub fn tagged(&self, epoch: u64) -> String {
        tag(&self.hash, epoch, self.version)
    }
}

/// An xDS version string: `HASH.EPOCH.REVISION` — the content hash (what decides whether a
/// client already holds a resource: [`content`]), the store epoch in hex, and the store
/// revision the content is as new as. A reconnecting client's versions thus say how new a
/// state it holds, and a replica whose cache is behind that never answers with older resources
/// ([`stream::not_behind`]).
pub(crate) fn tag(hash: &str, epoch: u64, revision: u64) -> String {
    format!("{hash}.{epoch:x}.{revision}")
}

/// The content part of a version string (all of it for a version without a tag).
pub(crate) fn content(version: &str) -> &str {
    version.split('.').next().unwrap_or(version)
}

/// The revision a version string of `epoch` claims; `None` for another epoch or an untagged
/// or malformed version (a claim that cannot be read is no claim: answered as today).
pub(crate) fn claim(version: &str, epoch: u64) -> Option<u64> {
    let mut parts = version.split('.');
    let (_, e, r) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || u64::from_str_radix(e, 16).ok()? != epoch {
        return None;
    }
    r.parse().ok()
}

/// What every ADS stream shares.
#[derive(Debug)]
pub(crate) struct Context {
    pub cache: Arc<Cache>,
    pub metrics: XdsMetrics,
    pub clients: Arc<XdsClients>,
    /// Given when a graceful shutdown starts; every stream task is spawned through it.
    pub shutdown: Shutdown,
    /// Most ADS streams open at once (`ServerConfig::max_sessions`).
    pub max_streams: usize,
    /// The replica's readiness: no new stream while not ready; open streams end with
    /// `UNAVAILABLE` when it says go away ([`crate::readiness`]).
    pub readiness: crate::readiness::Readiness,
    /// The live inputs of per-node EDS plans (none: equal demand, no load, until [`inputs::run`]
    /// refreshes them).
    pub plan_sources: Option<inputs::PlanSources>,
}

impl Context {
    /// The resource of `type_url` for the newest snapshot of `service`, as a client in `zone`
    /// receives it; `None` when the service does not exist or DLB does not serve the type.
    /// Built once per snapshot (EDS: per snapshot and client zone, [`assignment`]) and shared
    /// by every stream: kept with the snapshot in the cache ([`crate::cache::Derived`]).
    pub fn built(
        &self,
        type_url: &str,
        service: &str,
        zone: Option<&assignment::Zone>,
    ) -> Option<Arc<Built>> {
        built(
            &self.cache,
            type_url,
            service,
            zone,
            self.plan_sources.as_ref(),
        )
    }
}

/// The resource of `type_url` for the newest snapshot of `service` in `cache`, for a client in
/// `zone` (see [`Context::built`]). `sources`: where a service's first per-node assignments
/// read their live inputs (else they start from the previous version's).
pub(crate) fn built(
    cache: &Cache,
    type_url: &str,
    service: &str,
    zone: Option<&assignment::Zone>,
    sources: Option<&inputs::PlanSources>,
) -> Option<Arc<Built>> {
    {
        let index = SERVED.iter().position(|t| *t == type_url)?;
        let (snap, derived) = cache.get_derived(service)?;
        if type_url == resources::ENDPOINTS {
            let per_zone = derived.get_or_init(index, || {
                let previous = derived.previous::<assignment::Assignments>(index);
                let inputs = sources.map(|s| s.inputs(&snap));
                Some(assignment::Assignments::new(snap.clone(), previous, inputs))
            })?;
            let built = per_zone.for_zone(zone);
            // Carried over (or not) by now: the previous version's values can go.
            derived.drop_previous();
            return Some(built);
        }
        derived.get_or_init(index, || {
            let any = resources::resource(type_url, &snap)?;
            let mut h = ContentHash::default();
            h.write(&any.value);
            Some(Built {
                hash: h.hex(),
                any,
                version: snap.version.version,
            })
        })
    }
}

/// The types DLB serves, by their index in a snapshot's [`crate::cache::Derived`] values.
const SERVED: [&str; 3] = [
    resources::LISTENER,
    resources::CLUSTER,
    resources::ENDPOINTS,
];
const _: () = assert!(SERVED.len() <= crate::cache::DERIVED);
/// The index of EDS in [`SERVED`] (per-node assignments, refreshed by [`inputs`]).
pub(crate) const ENDPOINTS_INDEX: usize = 2;

/// The ADS gRPC service.
#[derive(Debug, Clone)]
pub struct XdsService {
    ctx: Arc<Context>,
}

impl XdsService {
    /// A service over `cache`, counting in `metrics`, listing its streams in `clients`, ending
    /// every stream when the shutdown starts (each stream's task spawned through `shutdown`); at most `max_streams` streams at once.
    pub fn new(
        cache: Arc<Cache>,
        metrics: XdsMetrics,
        clients: Arc<XdsClients>,
        shutdown: Shutdown,
        max_streams: usize,
    ) -> Self {
        Self {
            ctx: Arc::new(Context {
                cache,
                metrics,
                clients,
                shutdown,
                max_streams,
                readiness: crate::readiness::Readiness::always(),
                plan_sources: None,
            }),
        }
    }

    /// Plans per-node EDS with the live inputs of `sources` (zone demand, global in-flight
    /// counts; refreshed by [`inputs::run`], which the caller runs). Call before
    /// [`XdsService::into_server`], while this is the only handle.
    pub fn with_plan_sources(mut self, sources: inputs::PlanSources) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.plan_sources = Some(sources);
        }
        self
    }

    /// Gates the service on `readiness` (by default it is always ready). Call before
    /// [`XdsService::into_server`], while this is the only handle.
    pub fn with_readiness(mut self, readiness: crate::readiness::Readiness) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.readiness = readiness;
        }
        self
    }

    /// The tonic server for this service, with DLB's message size bounds.
    pub fn into_server(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

fn peer_of<T>(req: &tonic::Request<T>) -> String {
    req.remote_addr().map(|a| a.to_string()).unwrap_or_default()
}

impl Context {
    /// Refuses a new stream past the limit.
    fn admit(&self) -> Result<(), tonic::Status> {
        self.readiness.admit()?;
        if self.clients.len() >= self.max_streams {
            return Err(tonic::Status::resource_exhausted(format!(
                "too many xDS streams open (max_sessions = {})",
                self.max_streams
            )));
        }
        Ok(())
    }
}

/// Most resource types one stream may use (xDS has a handful).
pub const MAX_TYPES: usize = 16;

/// Checks the type URL of a `request` (message name): present, at most 256 bytes, and (for a
/// type the stream has not used yet, `new`) within [`MAX_TYPES`] of the `used` ones.
pub(crate) fn check_type(
    request: &str,
    type_url: &str,
    new: bool,
    used: usize,
) -> Result<(), tonic::Status> {
    if type_url.is_empty() {
        return Err(tonic::Status::invalid_argument(format!(
            "{request}.type_url: required on an ADS stream"
        )));
    }
    if type_url.len() > 256 {
        return Err(tonic::Status::invalid_argument(format!(
            "{request}.type_url: {} bytes; at most 256",
            type_url.len()
        )));
    }
    if new && used >= MAX_TYPES {
        return Err(tonic::Status::resource_exhausted(format!(
            "{request}.type_url: at most {MAX_TYPES} resource types per stream"
        )));
    }
    Ok(())
}

/// Checks a request's subscription size.
pub(crate) fn check_names(field: &str, count: usize) -> Result<(), tonic::Status> {
    if count > MAX_NAMES_PER_TYPE {
        return Err(tonic::Status::resource_exhausted(format!(
            "{field}: {count} names; at most {MAX_NAMES_PER_TYPE} per resource type"
        )));
    }
    Ok(())
}

impl XdsService {
    /// Admits a new stream of variant `V` and serves it on its own task.
    fn open<V: stream::Variant>(
        &self,
        request: tonic::Request<tonic::Streaming<V::Request>>,
    ) -> Result<tonic::Response<Out<V::Response>>, tonic::Status> {
        self.ctx.admit()?;
        let peer = peer_of(&request);
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        self.ctx.shutdown.spawn(stream::run::<V>(
            self.ctx.clone(),
            peer,
            request.into_inner(),
            tx,
        ));
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        self.open::<sotw::Sotw>(request)
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        self.open::<delta::Delta>(request)
    }
}

/// The content hash behind resource versions: XXH3-64 (unseeded, default secret) over
/// length-prefixed fields, as 16 hex digits. A pure function of the bytes written — the same on
/// every replica, in every run, on every machine — because it is compared across replicas and
/// kept by clients across reconnects: a reconnecting client's version is recognised by any
/// replica holding the same state.
#[derive(Clone, Default)]
pub(crate) struct ContentHash(xxhash_rust::xxh3::Xxh3Default);

impl ContentHash {
    /// Mixes `bytes` in, after their length (so ("ab","c") ≠ ("a","bc")).
    pub fn write(&mut self, bytes: &[u8]) {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        self.0.update(&len.to_le_bytes());
        self.0.update(bytes);
    }

    /// The hash as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0.digest())
    }
}
