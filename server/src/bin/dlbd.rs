//! `dlbd` — the DLB control plane daemon.
//!
//! `dlbd` with no arguments serves gRPC on 127.0.0.1:50051 and metrics on 127.0.0.1:9464 with an
//! empty `default` service, on the embedded durable store in `./dlbd-data` (created if missing;
//! a restart serves the same epoch, versions and backends). `--data-dir DIR` moves it; `--store
//! memory` keeps nothing across restarts; `--store etcd --etcd-endpoints H:P,... [--etcd-prefix
//! /dlb]` keeps the state in etcd, shared by replicas (a build without the `etcd` feature refuses
//! it with an error saying so); `--etcd-ca` (and `--etcd-cert` / `--etcd-key` for client
//! certificates) speaks TLS to it. `--config FILE` loads a YAML configuration; `--listen`,
//! `--metrics-listen` and `--no-metrics` override it. `--admin-token-file` makes every Registry
//! write need a bearer token from that file; `--read-token-file` does the same for reads and
//! SDK sessions (see `dlb_server::api::auth`). `--tls-cert` / `--tls-key` serve gRPC over TLS;
//! `--tls-client-ca` also requires client certificates (mTLS). The metrics port binds loopback
//! unless told otherwise. Logs go to stderr (`RUST_LOG`, default
//! `info`); once both listeners are bound it logs
//! `dlbd listening grpc=ADDR metrics=ADDR|off`. SIGINT or SIGTERM start a graceful shutdown.
//! A damaged embedded store (or a data dir that is not empty but has no store file) is an error
//! naming the file, with nothing written; `--reset-store` moves the file aside and starts empty.
//! With `--store etcd`, an etcd that cannot be reached at start is retried (500 ms doubling to
//! 10 s, logged) until it answers or a signal arrives; the ports are bound only once the state
//! is loaded, so until then health checks and SDKs see a replica that is not up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use dlb_server::{ServerConfig, StoreConfig};
use tracing_subscriber::EnvFilter;

/// First wait before `dlbd --store etcd` tries an unreachable etcd again (doubling).
const STORE_RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest wait between two attempts to reach etcd at start.
const STORE_RETRY_MAX: Duration = Duration::from_secs(10);

/// The DLB control plane.
#[derive(Debug, Parser)]
#[command(name = "dlbd", version, about)]
struct Args {
    /// YAML configuration file.
    #[arg(long, value_name = "FILE", env = "DLBD_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address (overrides the file).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Prometheus metrics listen address (overrides the file).
    #[arg(long, value_name = "ADDR", conflicts_with = "no_metrics")]
    metrics_listen: Option<SocketAddr>,
    /// Disable the metrics endpoint.
    #[arg(long)]
    no_metrics: bool,
    /// Where routing state lives: `embedded` (durable, in --data-dir), `memory` (lost on exit)
    /// or `etcd` (shared by replicas, at --etcd-endpoints; needs a build with `--features etcd`).
    #[arg(long, value_enum, default_value = "embedded", env = "DLBD_STORE")]
    store: StoreKind,
    /// etcd client endpoints, comma-separated `host:port` (with `--store etcd`).
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379",
        env = "DLBD_ETCD_ENDPOINTS"
    )]
    etcd_endpoints: Vec<String>,
    /// Key prefix of this deployment's state in etcd (with `--store etcd`).
    #[arg(long, value_name = "PREFIX", default_value = dlb_server::EtcdConfig::DEFAULT_PREFIX, env = "DLBD_ETCD_PREFIX")]
    etcd_prefix: String,
    /// TLS to etcd: the CA (PEM) the members' certificates must chain to (with `--store etcd`;
    /// endpoints are then reached over https).
    #[arg(long, value_name = "FILE", env = "DLBD_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an etcd that requires one (`--client-cert-auth`); needs
    /// --etcd-key and --etcd-ca.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_key", "etcd_ca"], env = "DLBD_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// The private key of --etcd-cert (PEM).
    #[arg(
        long,
        value_name = "FILE",
        requires = "etcd_cert",
        env = "DLBD_ETCD_KEY"
    )]
    etcd_key: Option<PathBuf>,
    /// This replica's id among the replicas of one deployment ([A-Za-z0-9._:-], at most 128;
    /// default: <hostname>-<pid>-<random>). With `--store etcd` it names the replica's
    /// membership key `<prefix>/replicas/<id>` and splits health checks among replicas.
    #[arg(long, value_name = "ID", env = "DLBD_REPLICA_ID")]
    replica_id: Option<String>,
    /// File of admin bearer tokens (one per line): every Registry write then needs one.
    #[arg(long, value_name = "FILE", env = "DLBD_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// File of read tokens: Registry reads and SDK sessions then need one (or an admin token).
    #[arg(long, value_name = "FILE", env = "DLBD_READ_TOKEN_FILE")]
    read_token_file: Option<PathBuf>,
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Send each SDK session `GoingAway` after about this many seconds (±10 %), so SDKs
    /// rebalance over the replicas after a failover (overrides the file; 1..=2592000).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=2_592_000), env = "DLBD_MAX_SESSION_AGE_SECONDS")]
    max_session_age_seconds: Option<u64>,
    /// A Discovery session silent this long sends a `Heartbeat` (overrides the file; 100..=60000,
    /// default 5000). Pair with the SDK's `update_deadline` (more than twice this): see
    /// docs/failover.md.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(100..=60_000), env = "DLBD_HEARTBEAT_MS")]
    heartbeat_ms: Option<u64>,
    /// Most MiB of recent changes the store keeps in memory for watches (default 64; overrides
    /// the file's `change_log_max_mib`; 1..=65536). A watcher further behind re-reads a snapshot.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=65_536), env = "DLBD_CHANGE_LOG_MAX_MIB")]
    change_log_max_mib: Option<u64>,
    /// Data directory of the embedded store.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "dlbd-data",
        env = "DLBD_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// Move the embedded store's file aside (to `dlbd.redb.reset-<UTC time>` in --data-dir;
    /// nothing is deleted) and start with an empty store: the recovery from a damaged store
    /// when no backup is at hand.
    #[arg(long)]
    reset_store: bool,
}

/// `--store` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// The embedded durable store (redb file in --data-dir).
    Embedded,
    /// In memory: a new epoch on every start.
    Memory,
    /// etcd (--etcd-endpoints, --etcd-prefix): the state replicas share.
    Etcd,
}

/// The stop signals, installed before the server starts serving: a SIGTERM sent as soon as the
/// server answers must reach the handler, not kill the process.
struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

fn stop_signals() -> anyhow::Result<StopSignals> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        })
    }
    #[cfg(not(unix))]
    {
        Ok(StopSignals {})
    }
}

async fn terminated(signals: &mut StopSignals) -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        tokio::select! {
            _ = signals.int.recv() => Ok("SIGINT"),
            _ = signals.term.recv() => Ok("SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = signals;
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        Ok("Ctrl-C")
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dlbd: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let embedded = args.store == StoreKind::Embedded;
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            eprintln!("dlbd: error: {e:#}");
            let store_file = e.chain().any(|c| {
                matches!(c.downcast_ref(), Some(dlb_server::Error::Storage(m)) if m.contains("store file is damaged") || m.contains("not empty") || m.contains("0 bytes"))
            });
            if embedded && store_file {
                eprintln!(
                    "dlbd: nothing was written. To recover: restore a backup of dlbd.redb into \
                     the data dir, or start once with --reset-store to move the file aside and \
                     begin with an empty store (README: \"A damaged data dir\")"
                );
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let mut config = match &args.config {
        Some(path) => ServerConfig::from_yaml_file(path)?,
        None => ServerConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(m) = args.metrics_listen {
        config.metrics_listen = Some(m);
    }
    if args.no_metrics {
        config.metrics_listen = None;
    }
    if let Some(s) = args.max_session_age_seconds {
        config.max_session_age = Some(Duration::from_secs(s));
    }
    if let Some(ms) = args.heartbeat_ms {
        config.session_heartbeat = Duration::from_millis(ms);
    }
    if let Some(m) = args.change_log_max_mib {
        config.store_history_bytes = usize::try_from(m << 20).unwrap_or(usize::MAX);
    }
    if let Some(f) = &args.admin_token_file {
        config.auth.admin_tokens =
            dlb_server::api::auth::read_token_file(f).map_err(anyhow::Error::msg)?;
    }
    if let Some(f) = &args.read_token_file {
        config.auth.read_tokens =
            dlb_server::api::auth::read_token_file(f).map_err(anyhow::Error::msg)?;
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        config.tls = Some(dlb_server::TlsConfig {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: args.tls_client_ca.as_ref().map(read).transpose()?,
        });
    }
    if let Some(id) = &args.replica_id {
        config.replica_id = Some(id.clone());
    }
    if args.reset_store {
        anyhow::ensure!(
            args.store == StoreKind::Embedded,
            "--reset-store applies to the embedded store only"
        );
        match dlb_server::store::embedded_open::reset(&args.data_dir)? {
            Some(moved) => tracing::warn!(
                moved_to = %moved.display(),
                "--reset-store: moved the old store file aside; starting with an empty store"
            ),
            None => tracing::info!("--reset-store: no store file to move; starting empty"),
        }
    }
    config.store = match args.store {
        StoreKind::Embedded => StoreConfig::Embedded(args.data_dir.clone()),
        StoreKind::Memory => StoreConfig::Memory,
        StoreKind::Etcd => {
            let read =
                |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            let tls = match &args.etcd_ca {
                Some(ca) => Some(dlb_server::EtcdTls {
                    ca_pem: read(ca)?,
                    identity: match (&args.etcd_cert, &args.etcd_key) {
                        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                        _ => None,
                    },
                }),
                None => None,
            };
            StoreConfig::Etcd(dlb_server::EtcdConfig {
                prefix: args.etcd_prefix.clone(),
                tls,
                ..dlb_server::EtcdConfig::new(args.etcd_endpoints.clone())
            })
        }
    };

    let mut signals = stop_signals()?;
    let etcd = matches!(args.store, StoreKind::Etcd);
    // With etcd, an unreachable store is waited for (the replica is simply not up yet; SDKs
    // use the other replicas); anything else wrong at start is an error.
    let mut backoff = dlb::backoff::Backoff::new(STORE_RETRY_MIN, STORE_RETRY_MAX);
    let server = loop {
        match dlb_server::spawn(config.clone()).await {
            Ok(server) => break server,
            Err(e @ (dlb_server::Error::Storage(_) | dlb_server::Error::StorageUnavailable(_)))
                if etcd =>
            {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "the store is unreachable; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    why = terminated(&mut signals) => {
                        tracing::info!(signal = why?, "stopped before the store was reachable");
                        return Ok(());
                    }
                }
            }
            Err(e) => return Err(e).context("starting dlbd"),
        }
    };
    let metrics = server
        .metrics_addr()
        .map_or_else(|| "off".to_owned(), |a| a.to_string());
    let store = match args.store {
        StoreKind::Embedded => format!("embedded:{}", args.data_dir.display()),
        StoreKind::Memory => "memory".to_owned(),
        StoreKind::Etcd => format!("etcd:{}{}", args.etcd_endpoints.join(","), args.etcd_prefix),
    };
    tracing::info!(
        epoch = %format_args!("{:x}", server.epoch()),
        store,
        "dlbd listening grpc={} metrics={}",
        server.grpc_addr(),
        metrics
    );

    let why = terminated(&mut signals).await?;
    tracing::info!(signal = why, "shutting down");
    server.shutdown().await.context("shutting down")?;
    tracing::info!("dlbd stopped");
    Ok(())
}
