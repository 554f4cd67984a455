//! A control plane given to the SDK as a DNS name (`dns:///host:port`) standing for every
//! replica:
//!
//! * a test resolver answers two replicas: the client connects to one, and when that one shuts
//!   down it fails over to the other while picks go on;
//! * the answer changes while the client is connected (A, then only B): the client looks the
//!   name up again at once when A shuts down or crashes, and ends on B; a round over dead
//!   addresses looks it up again too;
//! * a resolver that fails or answers nothing: no panic, bounded retries, and the client
//!   connects once it answers;
//! * the system resolver: `dns:///localhost:<port>` reaches a server on 127.0.0.1, for the SDK
//!   (session and admin calls) and for `dlbctl`;
//! * TLS: the certificate is verified against the name, not the resolved address.
//!
//! Replicas share one in-memory store (as replicas share etcd), so a client that moves resumes
//! with a delta and a write on any replica reaches it.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use dlb_client::admin::ClientTls;
use dlb_client::{AdminClient, Client, Error, NewServer, Resolve};
use dlb_server::store::MemoryStore;
use dlb_server::RunningServer;
use futures::future::BoxFuture;
use parking_lot::Mutex;

/// A resolver answering what the test says (`None`: an error), recording what it was asked.
#[derive(Debug, Default)]
struct FakeResolver {
    answer: Mutex<Option<Vec<SocketAddr>>>,
    asked: Mutex<Vec<(String, u16)>>,
    lookups: AtomicUsize,
}

impl FakeResolver {
    fn new(answer: Option<Vec<SocketAddr>>) -> Arc<Self> {
        let r = Arc::new(Self::default());
        r.set(answer);
        r
    }

    fn set(&self, answer: Option<Vec<SocketAddr>>) {
        *self.answer.lock() = answer;
    }

    fn lookups(&self) -> usize {
        self.lookups.load(Ordering::Relaxed)
    }
}

impl Resolve for FakeResolver {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        self.asked.lock().push((host.to_owned(), port));
        let answer = self.answer.lock().clone();
        Box::pin(async move {
            answer.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such name"))
        })
    }
}

/// Two replicas on one in-memory store.
async fn replicas() -> (RunningServer, RunningServer) {
    let store = Arc::new(MemoryStore::new(1024));
    let a = dlb_server::spawn_with_store(config(vec![]), store.clone())
        .await
        .unwrap();
    let b = dlb_server::spawn_with_store(config(vec![]), store)
        .await
        .unwrap();
    (a, b)
}

/// Registers `id` in "web" through `server` alone (a static endpoint, not the name).
async fn add(server: &RunningServer, id: &str, port: u16) -> Option<dlb::proto::Version> {
    let admin = AdminClient::new([endpoint(server)]).unwrap();
    admin
        .add_server("web", NewServer::new(id, format!("127.0.0.1:{port}")))
        .await
        .unwrap()
        .version
}

/// Picks on `handle` every millisecond until stopped; counts picks and failures.
struct Picker {
    stop: Arc<AtomicBool>,
    picks: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Picker {
    fn start(handle: dlb_client::ServiceHandle) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let picks = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let (s, p, f) = (stop.clone(), picks.clone(), failures.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                match handle.get_next_server(None) {
                    Ok(call) => {
                        call.success();
                        p.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        f.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        Self {
            stop,
            picks,
            failures,
            task,
        }
    }

    /// Stops and returns (picks, failures).
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        within("the picker to stop", self.task).await.unwrap();
        (
            self.picks.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test]
async fn a_name_fails_over_between_the_replicas_it_resolves_to() {
    let (a, b) = replicas().await;
    let resolver = FakeResolver::new(Some(vec![a.grpc_addr(), b.grpc_addr()]));
    let client = Client::builder(["dns:///dlb.test:1"])
        .resolver(resolver.clone())
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    assert_eq!(resolver.asked.lock()[0], ("dlb.test".to_owned(), 1));
    let web = within("web", client.service("web")).await.unwrap();
    let r = add(&a, "s1", 9001).await;
    converge(&web, r).await;

    // The client uses one of the two resolved addresses; that one goes away.
    let first = client.current_endpoint();
    let (used, other) = if first == endpoint(&a) {
        (a, b)
    } else {
        assert_eq!(first, endpoint(&b), "not a resolved address");
        (b, a)
    };
    let picker = Picker::start(web.clone());
    within("shutdown", used.shutdown()).await.unwrap();
    let r = add(&other, "s2", 9002).await;
    converge(&web, r).await;
    assert_eq!(client.current_endpoint(), endpoint(&other));
    assert!(client.is_connected());
    assert_eq!(picked(&web, 20), set(&["s1", "s2"]));
    // Admin calls resolve the name with the same resolver (the system cannot resolve
    // dlb.test): they reach the replica left, the dead one's address failing over.
    let before = resolver.lookups();
    let r = web.add_server("s3", "127.0.0.1:9003", 1).await.unwrap();
    assert!(
        resolver.lookups() > before,
        "admin calls did not use the resolver"
    );
    converge(&web, r.version).await;
    let (picks, failures) = picker.finish().await;
    assert!(picks > 0);
    assert_eq!(failures, 0, "picks failed during the failover");
    other.shutdown().await.unwrap();
}

/// How the replica a client uses goes away.
enum Gone {
    /// Graceful shutdown: the server says `GoingAway`.
    Shutdown,
    /// Its connections are cut (a crash, from the client's side).
    Crash,
}

/// The name points at A (behind a proxy, so it can also be cut), then at B only, and A goes
/// away: the client must look the name up again at once and end on B. The next entry of its
/// old round is a black hole (a listener that never accepts) which would hold it for the
/// connect timeout (30 s, past the test's deadline) if it kept going through the old round.
async fn moves_to_the_new_answer_when_its_replica_goes(gone: Gone) {
    let (a, b) = replicas().await;
    let proxy = Proxy::start(a.grpc_addr()).await;
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let resolver = FakeResolver::new(Some(vec![proxy.addr]));
    let client = Client::builder([
        "dns:///dlb.test:1".to_owned(),
        format!("http://{}", hole.local_addr().unwrap()),
    ])
    .resolver(resolver.clone())
    .connect_timeout(Duration::from_secs(30))
    .backoff(Duration::from_millis(20), Duration::from_millis(200))
    .connect()
    .await
    .unwrap();
    let web = within("web", client.service("web")).await.unwrap();
    let r = add(&a, "s1", 9001).await;
    converge(&web, r).await;
    assert_eq!(client.current_endpoint(), format!("http://{}", proxy.addr));
    let before = resolver.lookups();

    resolver.set(Some(vec![b.grpc_addr()]));
    match gone {
        Gone::Shutdown => within("shutdown", a.shutdown()).await.unwrap(),
        Gone::Crash => proxy.pause(),
    }
    let r = add(&b, "s2", 9002).await;
    converge(&web, r).await;
    eventually("the client to be on B", || {
        client.is_connected() && client.current_endpoint() == endpoint(&b)
    })
    .await;
    assert!(
        resolver.lookups() > before,
        "the name was not looked up again"
    );
    assert_eq!(picked(&web, 20), set(&["s1", "s2"]));
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_name_is_looked_up_again_when_its_replica_goes_away() {
    moves_to_the_new_answer_when_its_replica_goes(Gone::Shutdown).await;
}

#[tokio::test]
async fn the_name_is_looked_up_again_when_its_replica_crashes() {
    moves_to_the_new_answer_when_its_replica_goes(Gone::Crash).await;
}

/// A free port nobody listens on.
fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn a_round_over_dead_addresses_looks_the_name_up_again() {
    let server = spawn_server().await;
    let resolver = FakeResolver::new(Some(vec![dead_addr(), dead_addr()]));
    let client = Client::builder(["dns:///dlb.test:1"])
        .resolver(resolver.clone())
        .backoff(Duration::from_millis(5), Duration::from_millis(20))
        .wait_connected(false)
        .connect()
        .await
        .unwrap();
    // Each round tries both dead addresses, then looks the name up again.
    eventually("three lookups", || resolver.lookups() >= 3).await;
    assert!(!client.is_connected());
    resolver.set(Some(vec![server.grpc_addr()]));
    within("connected", client.wait_connected()).await.unwrap();
    assert_eq!(client.current_endpoint(), endpoint(&server));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failing_or_empty_resolver_is_retried_without_spinning_until_it_answers() {
    let server = spawn_server().await;
    let resolver = FakeResolver::new(None);
    // Waiting for the first session fails cleanly when the name cannot be resolved.
    let refused = Client::builder(["dns:///dlb.test:1"])
        .resolver(resolver.clone())
        .connect_timeout(Duration::from_millis(300))
        .connect()
        .await;
    assert!(matches!(refused, Err(Error::Unavailable(_))), "{refused:?}");

    let resolver = FakeResolver::new(None);
    let client = Client::builder(["dns:///dlb.test:1"])
        .resolver(resolver.clone())
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .wait_connected(false)
        .connect()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let failed = resolver.lookups();
    assert!(failed >= 2, "not retried: {failed} lookups");
    // Full-jitter backoff of 20..100 ms: about a dozen lookups in 600 ms; a spin makes
    // thousands.
    assert!(failed <= 200, "{failed} lookups in 600 ms: spinning");
    assert!(!client.is_connected());

    resolver.set(Some(Vec::new()));
    eventually("lookups answered with nothing", || {
        resolver.lookups() >= failed + 2
    })
    .await;
    assert!(!client.is_connected());

    resolver.set(Some(vec![server.grpc_addr()]));
    within("connected", client.wait_connected()).await.unwrap();
    let default = within("default", client.default_service()).await.unwrap();
    let r = AdminClient::new([endpoint(&server)])
        .unwrap()
        .add_server("", NewServer::new("a", "127.0.0.1:9001"))
        .await
        .unwrap();
    converge(&default, r.version).await;
    assert_eq!(picked(&default, 5), set(&["a"]));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_dns_endpoints_are_refused() {
    for raw in [
        "dns:///dlb.test",
        "dns:///dlb.test:0",
        "dns://8.8.8.8/dlb.test:1",
        "dns:///:1",
    ] {
        match Client::connect([raw]).await {
            Err(Error::InvalidEndpoint { endpoint, .. }) => assert_eq!(endpoint, raw),
            other => panic!("{raw}: {other:?}"),
        }
        match AdminClient::new([raw]) {
            Err(Error::InvalidEndpoint { endpoint, .. }) => assert_eq!(endpoint, raw),
            other => panic!("{raw}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_system_resolver_reaches_localhost() {
    let server = spawn_server().await;
    let port = server.grpc_addr().port();
    let name = format!("dns:///localhost:{port}");
    // localhost may resolve to ::1 as well: nothing listens there, and the rotation moves on.
    let client = Client::connect([name.clone()]).await.unwrap();
    assert_eq!(
        client.current_endpoint(),
        format!("http://127.0.0.1:{port}")
    );
    // Admin calls go to http://localhost:<port>.
    let r = client.add_server("a", "127.0.0.1:9001", 1).await.unwrap();
    let default = within("default", client.default_service()).await.unwrap();
    converge(&default, r.version).await;
    assert_eq!(picked(&default, 5), set(&["a"]));

    // dlbctl takes the same endpoint.
    let out = dlbctl_ok(&name, &["list"]).await;
    assert!(out.contains("a 127.0.0.1:9001"), "{out}");
    let out = dlbctl_ok(&name, &["watch", "--count", "1"]).await;
    assert!(out.contains("a 127.0.0.1:9001"), "{out}");
    let bad = run_dlbctl("dns:///localhost", &["list"]).await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("dns:///localhost") && bad.stderr.contains("port"),
        "{}",
        bad.stderr
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn with_tls_the_certificate_is_verified_against_the_name() {
    // The certificate names dlb.test only: not 127.0.0.1.
    let (ca_pem, tls) = tls_server(&["dlb.test"]);
    let mut cfg = config(vec![service_with("web", &["a"])]);
    cfg.tls = Some(tls);
    let server = dlb_server::spawn(cfg).await.unwrap();
    let tls = |domain: Option<&str>| ClientTls {
        ca_pem: ca_pem.clone().into_bytes(),
        identity: None,
        domain: domain.map(str::to_owned),
    };
    let resolver = FakeResolver::new(Some(vec![server.grpc_addr()]));
    let client = Client::builder(["dns:///dlb.test:1"])
        .resolver(resolver.clone())
        .tls(tls(None))
        .connect()
        .await
        .unwrap();
    assert_eq!(
        client.current_endpoint(),
        format!("https://{}", server.grpc_addr())
    );
    let web = within("web", client.service("web")).await.unwrap();
    assert_eq!(picked(&web, 5), set(&["a"]));

    // Controls: verified against the address, or against another name, the handshake fails.
    let by_address = Client::builder([format!("https://{}", server.grpc_addr())])
        .tls(tls(None))
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await;
    assert!(
        by_address.is_err(),
        "the certificate does not name 127.0.0.1"
    );
    let other_name = Client::builder(["dns:///dlb.test:1"])
        .resolver(resolver)
        .tls(tls(Some("other.test")))
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await;
    assert!(
        other_name.is_err(),
        "an explicit domain must win over the name"
    );
    server.shutdown().await.unwrap();
}
