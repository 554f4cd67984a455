//! `dlbctl` at its edges: a SIGTERM that arrives while `dlbctl register` is still registering
//! (a real process, its registration held at a gate) deregisters once registered, then exits
//! 0; every help text states the real default; `health off` on a missing service is NOT_FOUND
//! while `health set` / `policy set` say in their help that they create it; `remove-service`
//! refuses a non-empty service unless `--force`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP gate in front of `upstream`: accepts a connection and reads what the client sends,
/// forwarding nothing until [`Gate::open`].
struct Gate {
    addr: SocketAddr,
    received: watch::Receiver<usize>,
    open: watch::Sender<bool>,
}

impl Gate {
    async fn start(upstream: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (received_tx, received) = watch::channel(0usize);
        let (open, open_rx) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let received_tx = received_tx.clone();
                let mut open_rx = open_rx.clone();
                tokio::spawn(async move {
                    let mut held = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    // Hold what the client sends until the gate opens.
                    loop {
                        tokio::select! {
                            n = tokio::io::AsyncReadExt::read(&mut inbound, &mut buf) => match n {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    held.extend_from_slice(&buf[..n]);
                                    received_tx.send_modify(|r| *r += n);
                                }
                            },
                            r = open_rx.wait_for(|o| *o) => {
                                if r.is_err() { return; }
                                break;
                            }
                        }
                    }
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    if outbound.write_all(&held).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Gate {
            addr,
            received,
            open,
        }
    }
}

#[tokio::test]
async fn a_sigterm_during_registration_deregisters_once_registered() {
    let server = spawn_server().await;
    let mut gate = Gate::start(server.grpc_addr()).await;
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dlbctl"))
        .args(["--endpoint", &format!("http://{}", gate.addr)])
        .args(["--service", "web", "register", "s1", "10.0.0.3:80"])
        .args(["--ttl", "3600"])
        .env_remove("DLB_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // dlbctl has connected and sent its request: it is registering, and cannot finish before
    // the gate opens.
    within(
        "dlbctl to send its registration",
        gate.received.wait_for(|n| *n > 0),
    )
    .await
    .unwrap();
    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    gate.open.send(true).unwrap();
    let out = within("dlbctl to exit", child.wait_with_output())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a SIGTERM during registration: {} (stdout {stdout:?}, stderr {stderr:?})",
        out.status
    );
    assert!(stdout.contains("registered s1"), "{stdout}");
    assert!(stdout.contains("deregistered s1 from web"), "{stdout}");
    let left = server.store().get_service("web".into()).await.unwrap();
    assert!(
        left.as_ref().is_none_or(|s| s.servers.is_empty()),
        "the backend stayed registered: {left:?}"
    );
}

/// Every help text of every command: no line states a default in its text and another in
/// clap's `[default: …]`; the ones the issue found state the real default.
#[tokio::test]
async fn help_texts_state_the_real_defaults() {
    let help = |args: Vec<String>| async move {
        let mut args = args;
        args.push("--help".into());
        let out = within(
            "dlbctl --help",
            tokio::process::Command::new(env!("CARGO_BIN_EXE_dlbctl"))
                .args(&args)
                .output(),
        )
        .await
        .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let commands = |text: &str| -> Vec<String> {
        text.lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .filter(|c| c != "help")
            .collect()
    };
    let mut texts = Vec::new();
    let top = help(Vec::new()).await;
    for c in commands(&top) {
        let text = help(vec![c.clone()]).await;
        for sub in commands(&text) {
            texts.push((
                format!("{c} {sub}"),
                help(vec![c.clone(), sub.clone()]).await,
            ));
        }
        texts.push((c, text));
    }
    assert!(texts.len() > 20, "{texts:?}");
    for (cmd, text) in &texts {
        for line in text.lines() {
            let stated = line.contains("(default") || line.contains("= default");
            assert!(
                !(stated && line.contains("[default:")),
                "dlbctl {cmd} --help states two defaults: {line}"
            );
        }
    }
    let get = |name: &str| &texts.iter().find(|(c, _)| c == name).unwrap().1;
    let weight = get("register")
        .lines()
        .find(|l| l.contains("--weight"))
        .unwrap();
    assert!(weight.contains("[default: 1]"), "{weight}");
    let timeout = get("health set");
    assert!(
        timeout.contains("default 1000, or the interval when it is shorter"),
        "{timeout}"
    );
    for cmd in ["health set", "policy set"] {
        assert!(
            get(cmd).contains("Creates the service if it does not exist"),
            "{cmd}: {}",
            get(cmd)
        );
    }
}

#[tokio::test]
async fn health_off_on_a_missing_service_is_not_found() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    let out = run_dlbctl(&ep, &["-s", "nosuch", "health", "off"]).await;
    assert_eq!(out.code, 3, "{} {}", out.stdout, out.stderr);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);
    assert!(
        server
            .store()
            .get_service("nosuch".into())
            .await
            .unwrap()
            .is_none(),
        "health off created the service"
    );
    // `health set` creates it, as its help says.
    dlbctl_ok(&ep, &["-s", "made", "health", "set", "--tcp"]).await;
    assert!(server
        .store()
        .get_service("made".into())
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn remove_service_refuses_a_non_empty_service_unless_forced() {
    let server = spawn_server().await;
    let ep = endpoint(&server);
    let out = run_dlbctl(&ep, &["remove-service", "nosuch"]).await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    dlbctl_ok(&ep, &["-s", "web", "add-server", "a", "127.0.0.1:1001"]).await;
    dlbctl_ok(&ep, &["-s", "web", "add-server", "b", "127.0.0.1:1002"]).await;
    let out = run_dlbctl(&ep, &["remove-service", "web"]).await;
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(out.stderr.contains("2 backend"), "{}", out.stderr);
    let out = dlbctl_ok(&ep, &["remove-service", "web", "--force"]).await;
    assert!(
        out.starts_with("removed service web (2 backend(s)"),
        "{out}"
    );
    assert!(server
        .store()
        .get_service("web".into())
        .await
        .unwrap()
        .is_none());
    let services = dlbctl_ok(&ep, &["services"]).await;
    assert!(!services.contains("web"), "{services}");
    // The SDK's call.
    dlbctl_ok(
        &ep,
        &["-s", "empty", "policy", "set", "--algorithm", "maglev"],
    )
    .await;
    let client = dlb_client::Client::connect([ep.clone()]).await.unwrap();
    let r = client.remove_service("empty", false).await.unwrap();
    assert_eq!((r.service.as_str(), r.removed_servers), ("empty", 0));
    let err = client.remove_service("empty", false).await.unwrap_err();
    assert!(matches!(err, dlb_client::Error::NotFound(_)), "{err}");
}
