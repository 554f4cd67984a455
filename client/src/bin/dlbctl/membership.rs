//! `dlbctl register` and `dlbctl dns …`: automatic discovery from the command line, and the
//! source / lease columns of `dlbctl list`.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use clap::Subcommand;
use dlb::proto;
use dlb_client::{AdminClient, Error, Lease};
use serde_json::{json, Value};

/// `dlbctl dns …`.
#[derive(Debug, Subcommand)]
pub enum DnsCommand {
    /// Make the service's DNS-owned backends follow a DNS name (resolved once now: a name
    /// that does not resolve is refused).
    Declare {
        /// `name:port`.
        target: String,
        /// Weight of every discovered backend.
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Locality and failover priority of every discovered backend.
        #[command(flatten)]
        locality: crate::locality::LocalityFlags,
    },
    /// Stop following the service's DNS name and remove its DNS-owned backends.
    Remove,
    /// The followed DNS names, with the last refresh's outcome (all services unless
    /// --service is given explicitly).
    List,
}

/// The name of a backend's source.
pub fn source_name(s: &proto::Server) -> &'static str {
    match proto::BackendSource::try_from(s.source) {
        Ok(proto::BackendSource::Lease) => "lease",
        Ok(proto::BackendSource::Dns) => "dns",
        _ => "api",
    }
}

/// Remaining lease time by backend id (empty when the server has no Membership service). A
/// listing truncated at 4 MiB lacks the last leases: their backends show `lease=?`.
pub async fn leases(admin: &AdminClient, service: &str) -> HashMap<String, proto::LeaseInfo> {
    match admin.list_leases(service).await {
        Ok(r) => r
            .leases
            .into_iter()
            .map(|l| (l.server_id.clone(), l))
            .collect(),
        Err(_) => HashMap::new(),
    }
}

/// What `dlbctl list` adds after a backend: its source (`api`, `lease` or `dns`), a lease's
/// remaining time and a DNS backend's name.
pub fn list_suffix(s: &proto::Server, leases: &HashMap<String, proto::LeaseInfo>) -> String {
    match (source_name(s), leases.get(&s.server_id)) {
        ("lease", Some(l)) => format!(
            " source=lease lease={:.1}s/{}s",
            l.remaining_ms as f64 / 1000.0,
            l.ttl_seconds
        ),
        ("lease", None) => format!(" source=lease lease=?/{}s", s.lease_ttl_seconds),
        ("dns", _) => format!(" source=dns dns={}", s.dns_name),
        (source, _) => format!(" source={source}"),
    }
}

/// The JSON fields `dlbctl list --json` adds to a backend.
pub fn list_json(s: &proto::Server, leases: &HashMap<String, proto::LeaseInfo>) -> Value {
    let lease = leases
        .get(&s.server_id)
        .map(|l| json!({"ttl_seconds": l.ttl_seconds, "remaining_ms": l.remaining_ms}));
    json!({"source": source_name(s), "lease": lease, "dns_name": s.dns_name})
}

/// SIGTERM and SIGINT (Ctrl-C), caught from the moment [`Interrupts::install`] runs: from then
/// on they no longer end the process but are kept for [`Interrupts::recv`], even one that
/// arrives before anyone waits. `dlbctl register` installs them before it connects, so a signal
/// during registration cannot kill it between "registered" and "deregistered".
pub struct Interrupts {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Interrupts {
    /// Installs the handlers; call inside the runtime's context (`Runtime::enter`).
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Resolves on the next SIGTERM or SIGINT (one already received counts).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        if s.recv().await.is_none() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            if self.term.is_none() && self.int.is_none() {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
            tokio::select! {
                () = next(&mut self.term) => {}
                () = next(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `dlbctl register`: registers with a lease, renews it until Ctrl-C or SIGTERM, then (with
/// `drain`) drains the backend and waits on the drain barrier — every client following the
/// service has stopped sending it new calls, and with `in_flight_zero` its calls have ended —
/// while the lease is still renewed, then deregisters. A backend's `preStop` hook is this one
/// process: it exits once the backend may. A second signal during the wait deregisters at once.
/// A signal during registration deregisters once the registration completes; a second one then
/// exits at once (the lease, if it was granted, expires on its own). After deregistering, a
/// barrier whose deadline passed exits 6.
pub async fn register(
    admin: &AdminClient,
    service: &str,
    lease: Lease,
    json_out: bool,
    mut interrupts: Interrupts,
    drain: Option<proto::BarrierWait>,
) -> Result<(), Error> {
    let ttl = lease.ttl;
    let registering = admin.register_and_keep(service, lease);
    tokio::pin!(registering);
    let mut interrupted = false;
    let reg = loop {
        tokio::select! {
            r = &mut registering => break r?,
            () = interrupts.recv() => {
                if interrupted {
                    return Err(Error::Rpc(tonic::Status::cancelled(
                        "interrupted twice during registration: exiting; a lease granted meanwhile expires with its TTL",
                    )));
                }
                interrupted = true;
                eprintln!("interrupted: deregistering once the registration completes (interrupt again to exit now)");
            }
        }
    };
    let r = reg.registered();
    let server = r.server.clone().unwrap_or_default();
    if json_out {
        println!(
            "{}",
            json!({"service": r.service, "registered": server.server_id, "address": server.address,
                   "ttl_seconds": ttl.as_secs(), "created": r.created})
        );
    } else {
        println!(
            "registered {} {} in {} with a {}s lease; renewing until interrupted",
            server.server_id,
            server.address,
            r.service,
            ttl.as_secs()
        );
    }
    let _ = std::io::stdout().flush();
    if !interrupted {
        interrupts.recv().await;
    }
    let mut outcome = Ok(());
    if let Some(wait) = drain {
        if !json_out {
            println!(
                "draining {}; waiting on the drain barrier",
                server.server_id
            );
            let _ = std::io::stdout().flush();
        }
        // The lease is still renewed meanwhile (`reg` lives); a second signal stops the wait.
        tokio::select! {
            r = crate::drain::drain(admin, service, &server.server_id, Some(wait), json_out) => {
                match r {
                    Err(e @ Error::BarrierDeadline(_)) => outcome = Err(e),
                    Err(e) => eprintln!("drain failed ({e}); deregistering anyway"),
                    Ok(()) => {}
                }
            }
            () = interrupts.recv() => {
                eprintln!("interrupted again: deregistering without waiting");
            }
        }
    }
    let d = reg.deregister().await?;
    if json_out {
        println!(
            "{}",
            json!({"service": d.service, "deregistered": server.server_id})
        );
    } else {
        println!("deregistered {} from {}", server.server_id, d.service);
    }
    outcome
}

fn dns_json(d: &proto::DnsStatus) -> Value {
    json!({"service": d.service, "target": d.target, "weight": d.weight, "backends": d.backends,
           "resolved": d.resolved, "truncated": d.truncated,
           "consecutive_failures": d.consecutive_failures, "last_error": d.last_error,
           "next_refresh_ms": d.next_refresh_ms,
           "locality": crate::locality::json(d.locality.as_ref()), "priority": d.priority})
}

fn dns_text(d: &proto::DnsStatus) -> String {
    let mut out = format!(
        "{} dns={} w={} backends={} resolved={}",
        d.service, d.target, d.weight, d.backends, d.resolved
    );
    out.push_str(&crate::locality::text(d.locality.as_ref(), d.priority));
    if d.truncated {
        out.push_str(" truncated");
    }
    if d.consecutive_failures > 0 {
        out.push_str(&format!(
            " FAILING failures={} last_error={:?}",
            d.consecutive_failures, d.last_error
        ));
    } else {
        out.push_str(" ok");
    }
    out.push_str(&format!(
        " next_refresh={:.1}s",
        Duration::from_millis(d.next_refresh_ms).as_secs_f64()
    ));
    out
}

/// `dlbctl dns …`. `only` is the service for `list` when one was given explicitly.
pub async fn dns(
    admin: &AdminClient,
    service: &str,
    only: &str,
    cmd: DnsCommand,
    json_out: bool,
) -> Result<(), Error> {
    match cmd {
        DnsCommand::Declare {
            target,
            weight,
            locality,
        } => {
            let mut declaration = dlb_client::DnsDeclaration::new(target)
                .weight(weight)
                .priority(locality.priority.unwrap_or(0));
            declaration.locality = locality.locality();
            let d = admin.declare_dns_with(service, &declaration).await?;
            if json_out {
                println!("{}", dns_json(&d));
            } else {
                println!("declared {}", dns_text(&d));
            }
        }
        DnsCommand::Remove => {
            let r = admin.remove_dns(service).await?;
            if json_out {
                println!("{}", json!({"service": r.service, "dns": "removed"}));
            } else {
                println!("{} follows no DNS name any more", r.service);
            }
        }
        DnsCommand::List => {
            let r = admin.list_dns(only).await?;
            if json_out {
                let names: Vec<_> = r.names.iter().map(dns_json).collect();
                println!(
                    "{}",
                    json!({ "names": names, "truncated": r.truncated, "total": r.total })
                );
            } else {
                for d in &r.names {
                    println!("{}", dns_text(d));
                }
                if r.truncated {
                    println!("{}", crate::print::more_not_shown(r.total, r.names.len()));
                }
            }
        }
    }
    Ok(())
}
