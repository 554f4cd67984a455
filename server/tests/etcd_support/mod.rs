//! Real `etcd` processes for tests (feature `etcd`), on free loopback ports with temporary data
//! directories and fast elections, awaited until they serve a linearizable read, killed on drop:
//!
//! * [`Etcd`]: a single-member cluster; `restart` brings it back on the same ports and data,
//!   like an operator restarting a member;
//! * [`EtcdCluster`]: a three-member cluster; one member can be killed (`kill -9`) and restarted
//!   by index, and [`EtcdCluster::leader`] says which member leads.
//!
//! * [`Etcd::start_tls`]: a single member that serves clients over TLS only and requires a client
//!   certificate ([`TestTls`]: a CA, the member's certificate for 127.0.0.1, a client's).
//!
//! Both are made of [`Member`]s, one launcher for every etcd process. The binary is
//! `$ETCD_BIN`, else `etcd` on the `PATH`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use dlb_server::{EtcdConfig, EtcdTls};

/// A CA, a server certificate for 127.0.0.1 / localhost and a client certificate, as files (for
/// etcd) and PEM (for clients).
pub struct TestTls {
    dir: tempfile::TempDir,
    /// The CA certificate.
    pub ca_pem: String,
    /// A client certificate and key signed by the CA.
    pub client: (String, String),
}

impl TestTls {
    /// Fresh certificates.
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let signed = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let server = signed(vec!["127.0.0.1".into(), "localhost".into()]);
        let client = signed(vec!["dlbd".into()]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        std::fs::write(dir.path().join("server.pem"), &server.0).unwrap();
        std::fs::write(dir.path().join("server-key.pem"), &server.1).unwrap();
        Self {
            dir,
            ca_pem,
            client,
        }
    }

    /// A file of the directory (`ca.pem`, `server.pem`, `server-key.pem`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The etcd TLS settings of a client: the CA and, with `client_cert`, the client
    /// certificate.
    pub fn config(&self, client_cert: bool) -> EtcdTls {
        EtcdTls {
            ca_pem: self.ca_pem.clone().into_bytes(),
            identity: client_cert.then(|| {
                (
                    self.client.0.clone().into_bytes(),
                    self.client.1.clone().into_bytes(),
                )
            }),
        }
    }
}

impl Default for TestTls {
    fn default() -> Self {
        Self::new()
    }
}

/// How long etcd gets to answer after a start.
const READY: Duration = Duration::from_secs(30);

/// How many times a start picks new ports when etcd exits at once (a port taken between
/// picking and binding).
const PORT_TRIES: usize = 3;

/// `n` distinct free loopback ports (all bound at once, then released for etcd to take).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// One etcd process of a cluster: its name, ports, data directory, and how it is launched.
/// Killed on drop.
struct Member {
    name: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// `--initial-cluster`: every member's `name=peer URL`.
    cluster: String,
    /// `--initial-cluster-token`, shared by the members of one cluster.
    token: String,
    /// `--heartbeat-interval` and `--election-timeout`, in milliseconds.
    timing: (u32, u32),
    /// Serve clients over TLS only, requiring a client certificate.
    tls: Option<Arc<TestTls>>,
}

impl Member {
    /// Member `name` on these ports (not started; `launch_all` fills in the cluster).
    fn new(
        name: &str,
        (client_port, peer_port): (u16, u16),
        token: &str,
        timing: (u32, u32),
    ) -> Self {
        Self {
            name: name.to_owned(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            client_port,
            peer_port,
            cluster: String::new(),
            token: token.to_owned(),
            timing,
            tls: None,
        }
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the process (same ports and data directory every time; `--initial-cluster-state
    /// new` is ignored once the data directory holds a member). Does not wait.
    fn spawn(&mut self) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = self.peer_url();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let (heartbeat, election) = (self.timing.0.to_string(), self.timing.1.to_string());
        let mut command = Command::new(&bin);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(tls.path("server.pem"))
                .arg("--key-file")
                .arg(tls.path("server-key.pem"))
                .arg("--trusted-ca-file")
                .arg(tls.path("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", &heartbeat])
            .args(["--election-timeout", &election])
            // One DLB batch is one txn: let big batches through, as docs/etcd.md advises.
            .args(["--max-txn-ops", "20000", "--max-request-bytes", "33554432"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin:?} (install etcd or set ETCD_BIN): {e}"));
        self.child = Some(child);
    }

    /// Waits until the member serves a linearizable read (it is in a cluster with a leader).
    /// `Err(log)` when it exits or does not answer by `deadline` (then it is killed).
    async fn wait_ready(&mut self, deadline: Instant) -> Result<(), String> {
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "{} exited with {status}\n{}",
                        self.name,
                        self.log()
                    ));
                }
            }
            if self.answers().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        Err(format!(
            "{} gave no answer within {READY:?}\n{}",
            self.name,
            self.log()
        ))
    }

    /// A client of this member alone.
    async fn client(&self) -> Option<etcd_client::Client> {
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(1));
        if let Some(tls) = &self.tls {
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem))
                    .identity(etcd_client::Identity::from_pem(
                        &tls.client.0,
                        &tls.client.1,
                    )),
            );
        }
        etcd_client::Client::connect([self.endpoint()], Some(options))
            .await
            .ok()
    }

    /// Whether the member serves a linearizable read (it has a leader).
    async fn answers(&self) -> bool {
        match self.client().await {
            Some(mut c) => c.get("ready-check", None).await.is_ok(),
            None => false,
        }
    }

    /// `(this member's id, the leader's id as it sees it)`, if it answers.
    async fn status(&self) -> Option<(u64, u64)> {
        let status = self.client().await?.status().await.ok()?;
        Some((status.header()?.member_id(), status.leader()))
    }

    /// Sends the process a signal (`kill SIGNAL pid`), if it runs.
    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `members` (a fresh cluster) and waits until each answers; on a failure kills them
/// all and returns the failing member's log.
async fn launch_all(members: &mut [Member]) -> Result<(), String> {
    let cluster = members
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url()))
        .collect::<Vec<_>>()
        .join(",");
    for m in members.iter_mut() {
        m.cluster = cluster.clone();
        m.spawn();
    }
    // Each member needs the others to elect a leader: start them all, then wait.
    let deadline = Instant::now() + READY;
    for i in 0..members.len() {
        if let Err(log) = members[i].wait_ready(deadline).await {
            members.iter_mut().for_each(Member::kill);
            return Err(log);
        }
    }
    Ok(())
}

/// A running single-member etcd; killed on drop.
pub struct Etcd {
    member: Member,
}

impl Etcd {
    /// Starts a fresh single-member cluster and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A single member serving clients over TLS only, with `tls`'s certificates, requiring a
    /// client certificate. `config` then includes the CA and the client certificate.
    pub async fn start_tls(tls: Arc<TestTls>) -> Self {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<Arc<TestTls>>) -> Self {
        let mut last = String::new();
        for _ in 0..PORT_TRIES {
            let ports = free_ports(2);
            let mut member = Member::new("dlb-test", (ports[0], ports[1]), "dlb-test", (10, 50));
            member.tls = tls.clone();
            let mut members = [member];
            match launch_all(&mut members).await {
                Ok(()) => {
                    let [member] = members;
                    return Self { member };
                }
                // A port taken between picking and binding: try others.
                Err(log) => last = log,
            }
        }
        panic!("etcd did not start; its log:\n{last}");
    }

    /// The client endpoint, `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.member.endpoint()
    }

    /// A store configuration for this member under `prefix`.
    pub fn config(&self, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            prefix: prefix.to_owned(),
            timeout: Duration::from_secs(5),
            tls: self.member.tls.as_ref().map(|t| t.config(true)),
            ..EtcdConfig::new(vec![self.endpoint()])
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        self.member.kill();
    }

    /// Starts the member again on the same ports and data directory.
    pub async fn restart(&mut self) {
        self.member.kill();
        self.member.spawn();
        if let Err(log) = self.member.wait_ready(Instant::now() + READY).await {
            panic!("etcd did not restart; its log:\n{log}");
        }
    }
}

/// A running three-member etcd cluster (members `m0`, `m1`, `m2`); killed on drop.
///
/// Elections are fast, but not as fast as the single member's (which never holds one): a
/// heartbeat every 10 ms and an election timeout of 100 ms, so a leader lost is replaced in
/// ≈ 0.1–0.3 s while a busy test machine does not start elections of its own.
pub struct EtcdCluster {
    members: Vec<Member>,
}

impl EtcdCluster {
    /// How many members.
    pub const SIZE: usize = 3;

    /// Starts a fresh cluster and waits until every member answers a linearizable read.
    pub async fn start() -> Self {
        let mut last = String::new();
        for attempt in 0..PORT_TRIES {
            let token = format!("dlb-test-{}-{attempt}", std::process::id());
            let ports = free_ports(2 * Self::SIZE);
            let mut members: Vec<Member> = (0..Self::SIZE)
                .map(|i| {
                    let ports = (ports[2 * i], ports[2 * i + 1]);
                    Member::new(&format!("m{i}"), ports, &token, (10, 100))
                })
                .collect();
            match launch_all(&mut members).await {
                Ok(()) => return Self { members },
                Err(log) => last = log,
            }
        }
        panic!("the etcd cluster did not start; a member's log:\n{last}");
    }

    /// Every member's client endpoint, `127.0.0.1:PORT`, member 0 first.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// A store configuration for the whole cluster under `prefix`.
    pub fn config(&self, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            prefix: prefix.to_owned(),
            timeout: Duration::from_secs(5),
            ..EtcdConfig::new(self.endpoints())
        }
    }

    /// `kill -9` of member `i` (its data directory stays).
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Stalls member `i` (`SIGSTOP`): its connections stay open but nothing is answered, as
    /// with a hung host or a partition without resets. [`EtcdCluster::resume`] undoes it.
    pub fn stall(&self, i: usize) {
        self.members[i].signal("-STOP");
    }

    /// Resumes a member stalled with [`EtcdCluster::stall`] (`SIGCONT`).
    pub fn resume(&self, i: usize) {
        self.members[i].signal("-CONT");
    }

    /// Whether member `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].is_running()
    }

    /// Starts member `i` again on its ports and data directory, and waits until it answers a
    /// linearizable read (it rejoined and knows the leader).
    pub async fn restart(&mut self, i: usize) {
        self.members[i].kill();
        self.members[i].spawn();
        if let Err(log) = self.members[i].wait_ready(Instant::now() + READY).await {
            panic!("etcd member {i} did not restart; its log:\n{log}");
        }
    }

    /// The index of the member that leads, as the running members agree (waits up to
    /// `within` for an election to end and for every running member to name it).
    pub async fn leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.agreed_leader().await {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "the etcd members did not agree on a leader within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn agreed_leader(&self) -> Option<usize> {
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for m in self.members.iter().filter(|m| m.is_running()) {
            let (id, leader) = m.status().await?;
            ids.push(id);
            leaders.push(leader);
        }
        let leader = *leaders.first()?;
        if leader == 0 || leaders.iter().any(|&l| l != leader) {
            return None;
        }
        let at = ids.iter().position(|&id| id == leader)?;
        // `ids` follows the running members; map back to the member index.
        self.members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_running())
            .nth(at)
            .map(|(i, _)| i)
    }

    /// Makes member `i` the leader (etcd's `MoveLeader`, asked of the current leader) and
    /// waits until every running member agrees.
    pub async fn make_leader(&self, i: usize) {
        let deadline = Instant::now() + READY;
        loop {
            let now = self.leader(READY).await;
            if now == i {
                return;
            }
            let (target, _) = self.members[i].status().await.expect("target answers");
            if let Some(mut c) = self.members[now].client().await {
                let _ = c.move_leader(target).await;
            }
            assert!(
                Instant::now() < deadline,
                "member {i} did not become the leader"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
