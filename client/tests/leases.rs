//! Self-registration from the SDK and from `dlbctl register` against a real server: the
//! backend appears in an SDK's picks; dropping the SDK's handle deregisters; a `dlbctl register`
//! killed with SIGKILL stops renewing and its backend is gone within TTL + one check (counted
//! as an expiry); SIGTERM deregisters at once; `dlbctl list` shows the source and the lease's
//! remaining time; `dlbctl watch` shows an expiry with its reason; `dlbctl dns list` shows a
//! failing name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use dlb_client::{Client, Lease};
use dlb_server::ServerConfig;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Starts `dlbctl register` for `id` with a `ttl`-second lease and waits for its
/// "registered" line.
async fn dlbctl_register(endpoint: &str, id: &str, address: &str, ttl: u32) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dlbctl"))
        .args([
            "--endpoint",
            endpoint,
            "--service",
            "web",
            "register",
            id,
            address,
        ])
        .args(["--ttl", &ttl.to_string()])
        .env_remove("DLB_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = within("dlbctl register's first line", lines.next_line())
        .await
        .unwrap()
        .expect("dlbctl register exited");
    assert!(line.starts_with("registered "), "{line}");
    // Keep draining its stdout (it prints once more on exit).
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

async fn dlbctl(endpoint: &str, args: &[&str]) -> String {
    dlbctl_ok(endpoint, args).await
}

#[tokio::test]
async fn sdk_registration_is_picked_and_drop_deregisters() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    let sdk = Client::connect([ep.clone()]).await.unwrap();
    let backend = Client::connect([ep.clone()]).await.unwrap();
    let reg = backend
        .register(
            "web",
            Lease::new("self-1", "10.0.0.1:8080")
                .ttl(Duration::from_secs(3))
                .label("zone", "a"),
        )
        .await
        .unwrap();
    assert!(reg.registered().created);
    let web = sdk.service("web").await.unwrap();
    eventually("the registered backend in the SDK's picks", || {
        picked(&web, 4) == set(&["self-1"])
    })
    .await;
    let info = web.backends();
    assert_eq!(info.len(), 1);

    // Locally validated: a TTL out of bounds never reaches the wire.
    let err = backend
        .register("web", Lease::new("x", "10.0.0.2:80").ttl(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(
        matches!(err, dlb_client::Error::InvalidArgument(_)),
        "{err}"
    );

    drop(reg);
    eventually(
        "the dropped registration's backend to leave the picks",
        || picked(&web, 4).is_empty(),
    )
    .await;
    let leases = backend.admin().list_leases("web").await.unwrap().leases;
    assert!(leases.is_empty(), "{leases:?}");
}

#[tokio::test]
async fn a_killed_dlbctl_register_expires_and_sigterm_deregisters() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    let sdk = Client::connect([ep.clone()]).await.unwrap();
    let web = sdk.service("web").await.unwrap();

    let killed = dlbctl_register(&ep, "k1", "10.0.0.1:80", 3).await;
    let termed = dlbctl_register(&ep, "t1", "10.0.0.2:80", 3600).await;
    eventually("both registered backends in the picks", || {
        picked(&web, 8) == set(&["k1", "t1"])
    })
    .await;

    // dlbctl list: the source and the lease's remaining time.
    let list = dlbctl(&ep, &["--service", "web", "list"]).await;
    let k1 = list.lines().find(|l| l.contains("k1 ")).unwrap();
    assert!(k1.contains("source=lease lease="), "{list}");
    assert!(k1.contains("/3s"), "{list}");
    let json = dlbctl(&ep, &["--service", "web", "--json", "list"]).await;
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let t1 = v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["server_id"] == "t1")
        .unwrap();
    assert_eq!(t1["source"], "lease");
    assert_eq!(t1["lease"]["ttl_seconds"], 3600);

    // SIGKILL: no deregistration runs; the lease runs out (3 s) and the backend leaves.
    signal(&killed, "-KILL");
    eventually("the killed registration's backend to expire", || {
        picked(&web, 8) == set(&["t1"])
    })
    .await;
    let metrics = scrape(server.metrics_addr().unwrap()).await;
    assert_eq!(
        sample(&metrics, "dlb_lease_expiries_total"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "dlb_lease_registrations_total"), Some(2.0));

    // SIGTERM: dlbctl deregisters before exiting, long before its 1 h lease would run out.
    let mut termed = termed;
    signal(&termed, "-TERM");
    let status = within("dlbctl to exit on SIGTERM", termed.wait())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    // Its last lease gone, the lease-created service goes too.
    let left = server.store().get_service("web".into()).await.unwrap();
    assert!(left.is_none(), "{left:?}");
    let metrics = scrape(server.metrics_addr().unwrap()).await;
    assert_eq!(sample(&metrics, "dlb_lease_expiries_total"), Some(1.0));
}

#[tokio::test]
async fn dlbctl_watch_shows_a_lease_expiry_with_its_reason() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    // Configured first, so the service outlives its last lease and the watcher sees the
    // removal (a lease-created service goes with its last lease).
    dlbctl(
        &ep,
        &["--service", "web", "policy", "set", "--algorithm", "maglev"],
    )
    .await;
    let registered = dlbctl_register(&ep, "k1", "10.0.0.1:80", 3).await;
    let mut watch = Command::new(env!("CARGO_BIN_EXE_dlbctl"))
        .args([
            "--endpoint",
            &ep,
            "--service",
            "web",
            "watch",
            "--count",
            "2",
        ])
        .env_remove("DLB_ENDPOINT")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = within("the snapshot line", lines.next_line())
        .await
        .unwrap()
        .expect("dlbctl watch exited");
    assert!(
        first.contains(" full ") && first.contains("+k1 "),
        "{first}"
    );

    // SIGKILL: nobody renews; the expiry reaches the watcher as a removal with its reason.
    signal(&registered, "-KILL");
    let second = within("the expiry line", lines.next_line())
        .await
        .unwrap()
        .expect("dlbctl watch exited");
    assert!(second.ends_with(" -k1 (lease expired)"), "{second}");
    let status = within("dlbctl watch to exit", watch.wait()).await.unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn dlbctl_dns_list_shows_a_failing_name() {
    let mut cfg = config(ServerConfig::default().services);
    // A name server nobody answers on: every refresh fails.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    cfg.dns.nameservers = vec![silent.local_addr().unwrap()];
    cfg.dns.timeout = Duration::from_millis(100);
    cfg.dns.attempts = 1;
    cfg.dns.retry_min = Duration::from_millis(100);
    cfg.dns.retry_max = Duration::from_millis(200);
    cfg.dns.services = vec![dlb_server::membership::dns::DnsDeclaration {
        service: "web".into(),
        target: "web.invalid:80".into(),
        weight: 1,
        locality: None,
        priority: 0,
    }];
    let server = dlb_server::spawn(cfg).await.unwrap();
    let ep = endpoint(&server);
    let admin = dlb_client::AdminClient::new([ep.clone()]).unwrap();
    within("the DNS failure to be reported", async {
        loop {
            let r = admin.list_dns("").await.unwrap();
            if r.names.first().is_some_and(|d| d.consecutive_failures > 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let out = dlbctl(&ep, &["dns", "list"]).await;
    assert!(out.contains("web dns=web.invalid:80"), "{out}");
    assert!(out.contains("FAILING failures="), "{out}");
    let metrics = scrape(server.metrics_addr().unwrap()).await;
    assert!(
        sample(
            &metrics,
            "dlb_dns_refreshes_total{service=\"web\",result=\"error\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );

    // An IP literal resolves without DNS: declared through dlbctl, it shows up in `list`.
    let out = dlbctl(&ep, &["--service", "lit", "dns", "declare", "127.0.0.7:81"]).await;
    assert!(out.contains("backends=1"), "{out}");
    let list = dlbctl(&ep, &["--service", "lit", "list"]).await;
    assert!(
        list.contains("127.0.0.7-81 127.0.0.7:81 w=1 healthy source=dns dns=127.0.0.7:81"),
        "{list}"
    );
}
