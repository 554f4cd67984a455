//! A real `etcd` process for tests (feature `etcd`): started on free loopback ports with a
//! temporary data directory and fast elections, awaited until it serves a linearizable read,
//! killed on drop. `restart` brings it back on the same ports and data, like an operator
//! restarting a member. The binary is `$ETCD_BIN`, else `etcd` on the `PATH`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dlb_server::EtcdConfig;

/// How long etcd gets to answer after a start.
const READY: Duration = Duration::from_secs(30);

/// A running etcd member; killed on drop.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

impl Etcd {
    /// Starts a fresh single-member cluster and waits until it answers.
    pub async fn start() -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            let (client_port, peer_port) = free_ports();
            let mut etcd = Self {
                child: None,
                dir: tempfile::tempdir().unwrap(),
                client_port,
                peer_port,
            };
            match etcd.launch().await {
                Ok(()) => return etcd,
                // A port taken between picking and binding: try others.
                Err(log) => last = log,
            }
        }
        panic!("etcd did not start; its log:\n{last}");
    }

    /// The client endpoint, `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// A store configuration for this member under `prefix`.
    pub fn config(&self, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            prefix: prefix.to_owned(),
            timeout: Duration::from_secs(5),
            ..EtcdConfig::new(vec![self.endpoint()])
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again on the same ports and data directory.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(log) = self.launch().await {
            panic!("etcd did not restart; its log:\n{log}");
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn launch(&mut self) -> Result<(), String> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let child = Command::new(&bin)
            .args(["--name", "dlb-test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("dlb-test={peer}")])
            .args(["--heartbeat-interval", "10", "--election-timeout", "50"])
            // One DLB batch is one txn: let big batches through, as docs/etcd.md advises.
            .args(["--max-txn-ops", "20000", "--max-request-bytes", "33554432"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin:?} (install etcd or set ETCD_BIN): {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + READY;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("exited with {status}\n{}", self.log()));
                }
            }
            if self.answers().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        Err(format!("no answer within {READY:?}\n{}", self.log()))
    }

    /// Whether the member serves a linearizable read (it has a leader).
    async fn answers(&self) -> bool {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(1));
        let Ok(mut client) = etcd_client::Client::connect([self.endpoint()], Some(options)).await
        else {
            return false;
        };
        client.get("ready-check", None).await.is_ok()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
