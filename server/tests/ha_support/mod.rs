//! A replicated DLB deployment made of real processes, for the HA tests (`tests/ha_etcd.rs`)
//! and the failover benchmark (`examples/failover_bench.rs`), feature `etcd`:
//!
//! * [`Replica`]: one `dlbd --store etcd` process (the binary this package builds), started on
//!   loopback, `kill -9`-able and restartable on the same address;
//! * [`Fleet`]: SDK clients (`dlb-client`) that each follow a service through every replica
//!   (in a rotated order, so sessions spread over the replicas) and pick from it continuously,
//!   counting every failed pick;
//! * [`Writer`]: an admin that adds and removes backends at a steady pace through any replica,
//!   so there is always an update in flight to measure failover with; it logs when each write
//!   succeeded or failed.
//! * [`health`]: a replica's standard gRPC health status.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dlb_client::{AdminClient, Client, NewServer, ServiceHandle};

/// How long a replica gets to print its ready line.
const READY: Duration = Duration::from_secs(30);

/// The `dlbd` binary: `$DLBD_BIN`; else the one Cargo built for this package's tests; else (an
/// example) `dlbd` in the profile directory above the running executable.
fn dlbd_bin() -> String {
    if let Ok(bin) = std::env::var("DLBD_BIN") {
        return bin;
    }
    if let Some(bin) = option_env!("CARGO_BIN_EXE_dlbd") {
        return bin.to_owned();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("dlbd")))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "dlbd".into())
}

/// One `dlbd` replica process on an etcd store; killed on drop.
pub struct Replica {
    child: Option<Child>,
    /// `--etcd-endpoints`: `host:port`, or several comma-separated.
    etcd: String,
    /// `127.0.0.1:PORT`, kept across restarts.
    pub grpc: String,
    /// More `dlbd` arguments, on every start.
    extra: Vec<String>,
    /// The last [`LOG_LINES`] lines of its log (`warn,dlbd=info`), across restarts.
    log: Arc<Mutex<std::collections::VecDeque<String>>>,
}

/// How many log lines a [`Replica`] keeps.
const LOG_LINES: usize = 10_000;

impl Replica {
    /// Starts a replica on `etcd` (an endpoint `host:port`, or several comma-separated, as
    /// `--etcd-endpoints` takes them) listening on `listen`
    /// (`127.0.0.1:0` for a free port) and waits for its ready line.
    pub fn start(etcd: &str, listen: &str) -> Self {
        Self::start_with(etcd, listen, &[])
    }

    /// As [`Replica::start`], with more `dlbd` arguments (kept for restarts).
    pub fn start_with(etcd: &str, listen: &str, extra: &[&str]) -> Self {
        let mut r = Self {
            child: None,
            etcd: etcd.to_owned(),
            grpc: listen.to_owned(),
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            log: Arc::default(),
        };
        r.launch();
        r
    }

    /// The lines of its log kept so far that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// The endpoint URL SDKs use.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    fn launch(&mut self) {
        let mut child = Command::new(dlbd_bin())
            .args(["--store", "etcd", "--etcd-endpoints", &self.etcd])
            .args(["--listen", &self.grpc, "--no-metrics"])
            .args(&self.extra)
            .env("RUST_LOG", "warn,dlbd=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run dlbd");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        // Drain its log for its whole life (a closed pipe would fail its logging), keeping the
        // last lines.
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                {
                    let mut log = log.lock().unwrap();
                    if log.len() == LOG_LINES {
                        log.pop_front();
                    }
                    log.push_back(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + READY;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("dlbd on {} printed no ready line", self.grpc));
            if line.contains("dlbd listening") {
                if let Some(addr) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("grpc="))
                {
                    self.grpc = addr.to_owned();
                }
                return;
            }
        }
    }

    /// `kill -9`: no shutdown path runs, sessions are cut by the kernel.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            let _ = child.wait();
        }
    }

    /// Starts the replica again on the same address.
    pub fn restart(&mut self) {
        self.kill9();
        self.launch();
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// SDK clients picking continuously from one service.
pub struct Fleet {
    /// Each client and its handle on the service.
    pub clients: Vec<(Client, ServiceHandle)>,
    /// Picks that failed (no backend could be picked).
    pub failed: Arc<AtomicU64>,
    /// Picks made.
    pub picks: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// `n` clients of `service`, client `i` trying the endpoints from `i mod len` on, each
    /// picking every `pace` until stopped, from its first successful pick on. Failure
    /// detection: a killed replica's connections are reset by the kernel (seen at once);
    /// HTTP/2 keepalive 500 ms for a vanished host;
    /// update deadline 12 s (dlbd heartbeats quiet sessions every 5 s); reconnect backoff
    /// 10–200 ms.
    pub async fn start(n: usize, endpoints: &[String], service: &str, pace: Duration) -> Self {
        let failed = Arc::new(AtomicU64::new(0));
        let picks = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let mut order = endpoints.to_vec();
            order.rotate_left(i % endpoints.len());
            let client = Client::builder(order)
                .client_id(format!("fleet-{i}"))
                .update_deadline(Duration::from_secs(12))
                .keepalive(Duration::from_millis(500), Duration::from_millis(500))
                .backoff(Duration::from_millis(10), Duration::from_millis(200))
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await
                .expect("fleet client connects");
            let handle = client.service(service).await.expect("fleet subscribes");
            // A replica whose store watch has not yet delivered the seeding writes answers
            // "not found" first (eventual consistency between replicas, not a failover): count
            // failures only once this client has routed on the service.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while handle.get_next_server(None).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "fleet client {i} never saw {service}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let (h, f, p, s) = (handle.clone(), failed.clone(), picks.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !s.load(Ordering::Relaxed) {
                    match h.get_next_server(None) {
                        Ok(call) => {
                            call.success();
                            p.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            f.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(pace).await;
                }
            }));
            clients.push((client, handle));
        }
        Self {
            clients,
            failed,
            picks,
            stop,
            tasks,
        }
    }

    /// Indexes of the clients whose session uses `url` now.
    pub fn on(&self, url: &str) -> Vec<usize> {
        self.clients
            .iter()
            .enumerate()
            .filter(|(_, (c, _))| c.is_connected() && c.current_endpoint() == url)
            .map(|(i, _)| i)
            .collect()
    }

    /// Waits until every client routes on `version` (panics after `within`).
    pub async fn converge(&self, version: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let behind: Vec<usize> = self
                .clients
                .iter()
                .enumerate()
                .filter(|(_, (_, h))| h.version().version != version)
                .map(|(i, _)| i)
                .collect();
            if behind.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "clients {behind:?} did not reach version {version} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every client routes on `version` or a later one (panics after `within`);
    /// returns when that was seen (checked every millisecond).
    pub async fn reach(&self, version: u64, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            let behind: Vec<usize> = self
                .clients
                .iter()
                .enumerate()
                .filter(|(_, (_, h))| h.version().version < version)
                .map(|(i, _)| i)
                .collect();
            if behind.is_empty() {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "clients {behind:?} did not reach version {version} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Stops the picking loops.
    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

/// `kill -9`s `victim` and returns, for each client that used it, how long after the kill it was
/// back (see [`failover_times`]; panics unless all are back `within`). The client count is the
/// length of the answer.
pub async fn kill_and_measure(
    fleet: &Fleet,
    victim: &mut Replica,
    within: Duration,
) -> Vec<Duration> {
    let watched = fleet.on(&victim.url());
    let versions: Vec<u64> = fleet
        .clients
        .iter()
        .map(|(_, h)| h.version().version)
        .collect();
    let killed = Instant::now();
    victim.kill9();
    failover_times(fleet, &watched, &versions, killed, within).await
}

/// For each client among `watched`, how long after `since` it was back: connected to another
/// session than the one it had, with an update applied on it (its version moved past
/// `version_at_kill`, which the writer guarantees happens within one write period).
async fn failover_times(
    fleet: &Fleet,
    watched: &[usize],
    version_at_kill: &[u64],
    since: Instant,
    within: Duration,
) -> Vec<Duration> {
    let mut out = vec![None; watched.len()];
    let deadline = since + within;
    while out.iter().any(Option::is_none) {
        for (k, &i) in watched.iter().enumerate() {
            if out[k].is_some() {
                continue;
            }
            let (c, h) = &fleet.clients[i];
            if c.is_connected() && h.version().version > version_at_kill[i] {
                out[k] = Some(since.elapsed());
            }
        }
        assert!(
            Instant::now() < deadline,
            "clients did not fail over within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    out.into_iter().map(Option::unwrap_or_default).collect()
}

/// Adds a backend every `pace` and removes the one added `keep` steps before, through any
/// replica (the admin client rotates on `UNAVAILABLE`); errors are retried on the next step.
pub struct Writer {
    stop: Arc<AtomicBool>,
    /// Writes that succeeded.
    pub writes: Arc<AtomicU64>,
    /// Writes that failed.
    pub failed: Arc<AtomicU64>,
    log: Arc<Mutex<WriteLog>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// What the writer saw, in order.
#[derive(Default)]
struct WriteLog {
    /// Each successful write: when it was sent, when it returned, and the service's version
    /// after it.
    done: Vec<(Instant, Instant, u64)>,
    /// Each failed write: when it was sent, and the error.
    failed: Vec<(Instant, String)>,
}

impl Writer {
    /// Starts writing to `service` through `endpoints`.
    pub fn start(endpoints: &[String], service: &str, pace: Duration, keep: u64) -> Self {
        let admin = AdminClient::new(endpoints.to_vec()).expect("admin client");
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let log = Arc::new(Mutex::new(WriteLog::default()));
        let (s, w, f, l) = (stop.clone(), writes.clone(), failed.clone(), log.clone());
        let service = service.to_owned();
        let task = tokio::spawn(async move {
            let record =
                |sent: Instant, what: String, r: Result<Option<u64>, dlb_client::Error>| {
                    let mut log = l.lock().unwrap();
                    match r {
                        Ok(version) => {
                            w.fetch_add(1, Ordering::Relaxed);
                            if let Some(v) = version {
                                log.done.push((sent, Instant::now(), v));
                            }
                            true
                        }
                        Err(e) => {
                            eprintln!("writer: {what}: {e}");
                            f.fetch_add(1, Ordering::Relaxed);
                            log.failed.push((sent, format!("{what}: {e}")));
                            false
                        }
                    }
                };
            let mut next: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                tokio::time::sleep(pace).await;
                let id = format!("churn-{next}");
                let port = 20_000 + (next % 10_000) as u16;
                let sent = Instant::now();
                let added = match admin
                    .add_server(&service, NewServer::new(&id, format!("127.0.0.1:{port}")))
                    .await
                {
                    Ok(r) => Ok(r.version.map(|v| v.version)),
                    Err(dlb_client::Error::AlreadyExists(_)) => Ok(None),
                    Err(e) => Err(e),
                };
                if !record(sent, format!("add {id}"), added) {
                    continue;
                }
                if next >= keep {
                    let old = format!("churn-{}", next - keep);
                    let sent = Instant::now();
                    let removed = match admin.remove_server(&service, &old).await {
                        Ok(r) => Ok(r.version.map(|v| v.version)),
                        Err(dlb_client::Error::NotFound(_)) => Ok(None),
                        Err(e) => Err(e),
                    };
                    record(sent, format!("remove {old}"), removed);
                }
                next += 1;
            }
        });
        Self {
            stop,
            writes,
            failed,
            log,
            task: Some(task),
        }
    }

    /// The first write sent after `since` that succeeded: when it was sent, when it returned,
    /// and the version it made. (The writer sends one write at a time, so every write sent
    /// later was sent after this one returned.)
    pub fn first_write_since(&self, since: Instant) -> Option<(Instant, Instant, u64)> {
        let log = self.log.lock().unwrap();
        log.done.iter().find(|(sent, _, _)| *sent > since).copied()
    }

    /// Waits for [`Writer::first_write_since`] (panics after `within`).
    pub async fn wait_write_since(
        &self,
        since: Instant,
        within: Duration,
    ) -> (Instant, Instant, u64) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(w) = self.first_write_since(since) {
                return w;
            }
            assert!(
                Instant::now() < deadline,
                "no write succeeded within {within:?}; failures: {:?}",
                self.failures_between(since, Instant::now())
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The writes sent in `[from, to)` that failed, with their errors.
    pub fn failures_between(&self, from: Instant, to: Instant) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.failed
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Stops writing and waits for the last write to finish.
    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// The standard gRPC health status a replica gives for `service` (`""`: the server as a
/// whole), `None` when it does not answer within a second.
pub async fn health(
    url: &str,
    service: &str,
) -> Option<tonic_health::pb::health_check_response::ServingStatus> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let ask = async {
        let channel = tonic::transport::Channel::from_shared(url.to_owned())
            .ok()?
            .connect()
            .await
            .ok()?;
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .ok()?
            .into_inner();
        ServingStatus::try_from(r.status).ok()
    };
    tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .ok()
        .flatten()
}

/// Asks every replica for its health (`""`) every 50 ms and counts the answers that were not
/// `SERVING` (no answer counts too), until dropped.
pub struct HealthSampler {
    /// Per replica: samples taken, samples not `SERVING`.
    counts: Arc<Mutex<Vec<(u64, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HealthSampler {
    /// Starts sampling the replicas at `urls`.
    pub fn start(urls: &[String]) -> Self {
        use tonic_health::pb::health_check_response::ServingStatus;
        let counts = Arc::new(Mutex::new(vec![(0, 0); urls.len()]));
        let (c, urls) = (counts.clone(), urls.to_vec());
        let task = tokio::spawn(async move {
            loop {
                for (i, url) in urls.iter().enumerate() {
                    let serving = health(url, "").await == Some(ServingStatus::Serving);
                    let mut c = c.lock().unwrap();
                    c[i].0 += 1;
                    c[i].1 += u64::from(!serving);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self { counts, task }
    }

    /// Per replica: samples taken, samples not `SERVING`.
    pub fn counts(&self) -> Vec<(u64, u64)> {
        self.counts.lock().unwrap().clone()
    }
}

impl Drop for HealthSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The service's version as a replica reports it.
pub async fn store_version(url: &str, service: &str) -> u64 {
    let admin = AdminClient::new([url.to_owned()]).expect("admin client");
    admin
        .list_servers(service)
        .await
        .expect("list servers")
        .version
        .map_or(0, |v| v.version)
}

/// Registers `n` permanent backends `base-0..` in `service` (so picks never run out).
pub async fn seed(url: &str, service: &str, n: usize) {
    let admin = AdminClient::new([url.to_owned()]).expect("admin client");
    for i in 0..n {
        admin
            .add_server(
                service,
                NewServer::new(format!("base-{i}"), format!("127.0.0.1:{}", 19_000 + i)),
            )
            .await
            .expect("seed backend");
    }
}

/// p-quantile (nearest rank) of `xs`, which need not be sorted.
pub fn quantile(xs: &[Duration], p: f64) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    let mut v = xs.to_vec();
    v.sort();
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Stops `writer`, waits until every client of `fleet` routes on `service`'s last version (as
/// the replica at `url` lists it), stops the fleet, and asserts that the fleet picked, that no
/// pick failed and that every client holds exactly the store's backends. Returns the picks.
pub async fn settle_and_check(
    fleet: &mut Fleet,
    writer: &mut Writer,
    url: &str,
    service: &str,
) -> u64 {
    writer.stop().await;
    let listed = AdminClient::new([url.to_owned()])
        .unwrap()
        .list_servers(service)
        .await
        .unwrap();
    let last = listed.version.map_or(0, |v| v.version);
    fleet.converge(last, Duration::from_secs(10)).await;
    fleet.stop().await;
    let picks = fleet.picks.load(Ordering::Relaxed);
    let failed = fleet.failed.load(Ordering::Relaxed);
    assert!(picks > 1_000, "the fleet barely picked: {picks}");
    assert_eq!(failed, 0, "picks failed");
    let want: Vec<String> = listed.servers.iter().map(|s| s.server_id.clone()).collect();
    for (_, h) in &fleet.clients {
        let mut have: Vec<String> = h.backends().into_iter().map(|b| b.server_id).collect();
        have.sort();
        assert_eq!(have, want);
    }
    picks
}
