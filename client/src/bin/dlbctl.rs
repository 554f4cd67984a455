//! `dlbctl` — command-line client of the DLB control plane.
//!
//! Every subcommand validates its input locally with `dlb::model` (the same rules `dlbd`
//! applies), then makes one `Registry` call — except `watch`, which opens a `Discovery` session
//! and prints every update as it arrives. Output is human-readable by default and JSON with
//! `--json` (one object per line for `watch`).
//!
//! Exit codes: 0 ok, 2 usage or invalid argument, 3 not found, 4 already exists, 5 changed
//! concurrently (a compare-and-set lost: re-read and retry), 6 a drain barrier's deadline
//! passed before every client confirmed (`drain --wait`, `remove-server --wait`), 1 anything
//! else.
//!
//! This file runs the subcommands (`run`); the command line is in `cli`, the text and JSON
//! forms of what is printed in `print`, `watch` in `watch`, and the larger subcommand groups
//! each in their own module (`health`, `membership`, with the policy flags of `adaptive` and
//! `call`).

#[path = "dlbctl/membership.rs"]
mod membership;

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Parser;
use dlb::model;
use dlb_client::{AdminClient, Error, NewServer, ServerUpdate};
use serde_json::{json, Value};

#[path = "dlbctl/adaptive.rs"]
mod adaptive;
#[path = "dlbctl/call.rs"]
mod call;
#[path = "dlbctl/cli.rs"]
mod cli;
#[path = "dlbctl/drain.rs"]
mod drain;
#[path = "dlbctl/health.rs"]
mod health;
#[path = "dlbctl/locality.rs"]
mod locality;
#[path = "dlbctl/print.rs"]
mod print;
#[path = "dlbctl/watch.rs"]
mod watch;

use cli::{Cli, Command, PolicyCommand};
use print::{
    more_not_shown, panic_json, panic_text, policy_json, policy_text, print_server_response,
    print_xds_clients, server_json, server_text, version_json, version_text,
};
use watch::watch;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // `register` catches SIGTERM/SIGINT before anything else happens (before it connects), so
    // a signal during registration deregisters instead of killing it with a lease granted.
    let interrupts = matches!(cli.command, Command::Register { .. }).then(|| {
        let _guard = runtime.enter();
        membership::Interrupts::install()
    });
    match runtime.block_on(run(cli, interrupts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

/// The wait option of `remove-server --wait` (no in-flight wait: a removed backend's calls are
/// no longer reported).
fn proto_wait(timeout_ms: u32) -> dlb::proto::BarrierWait {
    dlb::proto::BarrierWait {
        in_flight_zero: false,
        timeout_ms,
    }
}

fn parse_meta(entries: &[String]) -> Result<HashMap<String, String>, Error> {
    let mut out = HashMap::new();
    for e in entries {
        let Some((k, v)) = e.split_once('=') else {
            return Err(model::ValidationError::new("metadata", e, "expected key=value").into());
        };
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

async fn run(cli: Cli, interrupts: Option<membership::Interrupts>) -> Result<(), Error> {
    let service = model::resolve_service(&cli.service)?.to_owned();
    let opts = channel_options(&cli)?;
    let mut admin = AdminClient::with_options([cli.endpoint.clone()], &opts)?;
    if let Some(t) = &cli.token {
        admin = admin.with_token(t)?;
    }
    let j = cli.json;
    match cli.command {
        Command::AddServer {
            id,
            address,
            weight,
            hash_key,
            meta,
            locality,
        } => {
            let server = NewServer {
                server_id: id,
                address,
                weight,
                hash_key: hash_key.unwrap_or_default(),
                metadata: parse_meta(&meta)?,
                locality: locality.locality(),
                priority: locality.priority.unwrap_or(0),
            };
            let r = admin.add_server(&service, server).await?;
            print_server_response(j, "added", &r);
        }
        Command::RemoveService { name, force } => {
            let r = admin.remove_service(&name, force).await?;
            if j {
                println!(
                    "{}",
                    json!({"removed_service": r.service, "removed_servers": r.removed_servers,
                           "version": version_json(r.version)})
                );
            } else {
                println!(
                    "removed service {} ({} backend(s) with it; {})",
                    r.service,
                    r.removed_servers,
                    version_text(r.version)
                );
            }
        }
        Command::Drain {
            id,
            wait,
            in_flight_zero,
            timeout,
        } => {
            let wait = drain::wait(wait, in_flight_zero, timeout);
            drain::drain(&admin, &service, &id, wait, j).await?;
        }
        Command::RemoveServer {
            id,
            wait: true,
            timeout,
        } => {
            let wait = proto_wait(timeout);
            drain::remove_waiting(&admin, &service, &id, wait, j).await?;
        }
        Command::RemoveServer { id, .. } => {
            let r = admin.remove_server(&service, &id).await?;
            if j {
                println!(
                    "{}",
                    json!({"service": r.service, "removed": id, "version": version_json(r.version)})
                );
            } else {
                println!(
                    "removed {id} from {} ({})",
                    r.service,
                    version_text(r.version)
                );
            }
        }
        Command::UpdateServer {
            id,
            weight,
            drain,
            undrain,
            address,
            hash_key,
            expected_version,
            locality,
        } => {
            let update = ServerUpdate {
                server_id: id,
                weight,
                draining: (drain || undrain).then_some(drain),
                address,
                hash_key,
                metadata: None,
                locality: locality.locality(),
                priority: locality.priority,
                expected_version,
            };
            let r = admin.update_server(&service, update).await?;
            print_server_response(j, "updated", &r);
        }
        Command::List => {
            let r = admin.list_servers(&service).await?;
            let leases = membership::leases(&admin, &service).await;
            let policy = r.policy.unwrap_or_default();
            if j {
                let servers: Vec<_> = r
                    .servers
                    .iter()
                    .map(|s| {
                        let mut v = server_json(s);
                        if let (Some(o), Value::Object(m)) =
                            (v.as_object_mut(), membership::list_json(s, &leases))
                        {
                            o.extend(m);
                        }
                        v
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"service": r.service, "version": version_json(r.version),
                           "policy": policy_json(&policy), "servers": servers,
                           "panic": panic_json(r.panic),
                           "circuits": r.circuits.iter().map(|c| json!({
                               "server_id": c.server_id, "open_sessions": c.open_sessions,
                               "half_open_sessions": c.half_open_sessions})).collect::<Vec<_>>(),
                           "circuits_total": r.circuits_total})
                );
            } else {
                println!(
                    "service {} {} {} {}",
                    r.service,
                    version_text(r.version),
                    policy_text(&policy),
                    panic_text(r.panic)
                );
                for s in &r.servers {
                    println!(
                        "  {}{}",
                        server_text(s),
                        membership::list_suffix(s, &leases)
                    );
                }
                for c in &r.circuits {
                    println!(
                        "  circuit {}: open in {} SDK session(s), half-open in {}",
                        c.server_id, c.open_sessions, c.half_open_sessions
                    );
                }
                if (r.circuits_total as usize) > r.circuits.len() {
                    println!("  {}", more_not_shown(r.circuits_total, r.circuits.len()));
                }
            }
        }
        Command::XdsClients => print_xds_clients(j, &admin.list_xds_clients().await?),
        Command::Services => {
            let r = admin.list_services().await?;
            if j {
                let services: Vec<_> = r
                    .services
                    .iter()
                    .map(|s| {
                        json!({"service": s.service, "version": version_json(s.version),
                               "policy": policy_json(&s.policy.clone().unwrap_or_default()),
                               "servers": s.servers, "eligible": s.eligible,
                               "panic": panic_json(s.panic)})
                    })
                    .collect();
                println!(
                    "{}",
                    json!({ "services": services, "truncated": r.truncated, "total": r.total })
                );
            } else {
                for s in &r.services {
                    println!(
                        "{} {} servers={} eligible={} algorithm={} {}",
                        s.service,
                        version_text(s.version),
                        s.servers,
                        s.eligible,
                        model::algorithm_name(s.policy.clone().unwrap_or_default().algorithm),
                        panic_text(s.panic)
                    );
                }
                if r.truncated {
                    println!("{}", more_not_shown(r.total, r.services.len()));
                }
            }
        }
        Command::HealthPass { id } => {
            let r = admin.health_check_passed(&service, &id).await?;
            print_server_response(j, "health passed:", &r);
        }
        Command::HealthFail { id } => {
            let r = admin.health_check_failed(&service, &id).await?;
            print_server_response(j, "health failed:", &r);
        }
        Command::Next { key } => {
            let r = admin
                .get_next_server(&service, key.as_deref().map(str::as_bytes))
                .await?;
            let server = r.server.unwrap_or_default();
            if j {
                println!(
                    "{}",
                    json!({"service": r.service, "server": server_json(&server), "version": version_json(r.version)})
                );
            } else {
                println!("{} {}", server.server_id, server.address);
            }
        }
        Command::Register {
            id,
            address,
            weight,
            ttl,
            meta,
            drain_timeout,
            in_flight_zero,
            no_drain,
            locality,
        } => {
            let drain = drain::wait(!no_drain, in_flight_zero, drain_timeout);
            let mut lease = dlb_client::Lease::new(id, address)
                .weight(weight)
                .ttl(std::time::Duration::from_secs(ttl))
                .priority(locality.priority.unwrap_or(0));
            lease.locality = locality.locality();
            lease.metadata = parse_meta(&meta)?;
            let interrupts = interrupts.unwrap_or_else(membership::Interrupts::install);
            membership::register(&admin, &service, lease, j, interrupts, drain).await?;
        }
        Command::Dns(cmd) => membership::dns(&admin, &service, "", cmd, j).await?,
        Command::Policy(PolicyCommand::Get) => {
            let r = admin.get_policy(&service).await?;
            let p = r.policy.unwrap_or_default();
            if j {
                println!(
                    "{}",
                    json!({"service": r.service, "policy": policy_json(&p), "version": version_json(r.version)})
                );
            } else {
                println!("{}", policy_text(&p));
            }
        }
        Command::Policy(PolicyCommand::Set(set)) => {
            // Parse flags first, so a malformed flag fails without any RPC.
            let algorithm = set
                .algorithm
                .as_deref()
                .map(|a| model::parse_algorithm("policy.algorithm", a))
                .transpose()?;
            let sticky = set
                .sticky
                .as_deref()
                .map(|s| model::parse_sticky_mode("policy.sticky_mode", s))
                .transpose()?;
            if let Some(c) = set.bounded_load {
                if c != 0.0 && !(c.is_finite() && model::LOAD_FACTOR_RANGE.contains(&c)) {
                    return Err(model::ValidationError::new(
                        "policy.bounded_load_factor",
                        c,
                        "must be 0 (off) or between 1.0 and 100.0",
                    )
                    .into());
                }
            }
            // Read, change the given fields, write back with the version read: a concurrent
            // edit makes the write fail (exit 5) instead of being silently overwritten.
            let (mut policy, read_version) = match admin.get_policy(&service).await {
                Ok(r) => (
                    r.policy.unwrap_or_else(model::default_policy),
                    r.version.map_or(0, |v| v.version),
                ),
                Err(Error::NotFound(_)) => (model::default_policy(), 0),
                Err(e) => return Err(e),
            };
            if let Some(a) = algorithm {
                policy.algorithm = a as i32;
            }
            if let Some(c) = set.bounded_load {
                policy.bounded_load_factor = c;
            }
            if let Some(s) = sticky {
                policy.sticky_mode = s as i32;
            }
            if let Some(t) = set.sticky_ttl {
                policy.sticky_ttl_seconds = t;
            }
            if let Some(m) = set.sticky_max {
                policy.sticky_max_entries = m;
            }
            set.health.apply(&mut policy)?;
            set.sdk_health.apply(&mut policy);
            set.adaptive.apply(&mut policy);
            set.call.apply(&mut policy)?;
            set.locality.apply(&mut policy);
            model::validate_policy(&policy)?;
            let r = admin
                .set_policy_if(&service, policy, Some(read_version))
                .await?;
            let p = r.policy.unwrap_or_default();
            if j {
                println!(
                    "{}",
                    json!({"service": r.service, "policy": policy_json(&p), "version": version_json(r.version)})
                );
            } else {
                println!("{} ({})", policy_text(&p), version_text(r.version));
            }
        }
        Command::Health(cmd) => health::run(&admin, &service, cmd, j).await?,
        Command::Watch { count } => {
            watch(
                &cli.endpoint,
                &opts,
                cli.token.as_deref(),
                &service,
                j,
                count,
            )
            .await?
        }
    }
    Ok(())
}

/// Transport options from the command line (TLS files read here; errors name the file).
fn channel_options(cli: &Cli) -> Result<dlb_client::ChannelOptions, Error> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| Error::InvalidArgument(format!("{}: {e}", p.display())))
    };
    let mut opts = dlb_client::ChannelOptions::default();
    if cli.cert.is_some() && cli.ca.is_none() {
        return Err(Error::InvalidArgument("--tls-cert needs --tls-ca".into()));
    }
    if let Some(ca) = &cli.ca {
        let identity = match (&cli.cert, &cli.cert_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        opts.tls = Some(dlb_client::admin::ClientTls {
            ca_pem: read(ca)?,
            identity,
            domain: None,
        });
    }
    Ok(opts)
}
