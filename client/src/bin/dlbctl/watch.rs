//! `dlbctl watch`: one `Discovery` session on a service, printing every update as it arrives.

use std::collections::HashSet;
use std::io::Write;

use dlb::model;
use dlb::proto;
use dlb::proto::client_message::Kind as ClientKind;
use dlb::proto::server_message::Kind as ServerKind;
use dlb_client::Error;
use serde_json::json;

use crate::print::{
    panic_json, panic_text, policy_json, server_json, server_text, version_json, version_text,
};

/// Opens a Discovery session on `service` and prints every update (acking each), until `count`
/// updates have been printed or the stream ends.
pub(crate) async fn watch(
    endpoint: &str,
    opts: &dlb_client::ChannelOptions,
    token: Option<&str>,
    service: &str,
    j: bool,
    count: Option<u64>,
) -> Result<(), Error> {
    use tokio_stream::wrappers::ReceiverStream;
    let interceptor = dlb_client::admin::TokenInterceptor::new(token)?;
    let channel = dlb_client::admin::make_endpoint(endpoint, opts)?
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("cannot connect to {endpoint}: {e}")))?;
    let mut client =
        proto::discovery_client::DiscoveryClient::with_interceptor(channel, interceptor)
            .max_decoding_message_size(model::MAX_MESSAGE_BYTES);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let subscribe = proto::ClientMessage {
        kind: Some(ClientKind::Subscribe(proto::Subscribe {
            locality: None,
            client_id: format!("dlbctl-{}", std::process::id()),
            services: vec![proto::ServiceSubscription {
                service: service.to_owned(),
                known: None,
            }],
        })),
    };
    tx.send(subscribe)
        .await
        .map_err(|_| Error::Unavailable("session closed".into()))?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let mut known: HashSet<String> = HashSet::new();
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    while count.is_none_or(|c| seen < c) {
        let Some(msg) = inbound.message().await? else {
            return Err(Error::Unavailable(
                "the control plane closed the session".into(),
            ));
        };
        let line = match msg.kind {
            Some(ServerKind::Update(u)) => {
                seen += 1;
                let line = if j {
                    let upserts: Vec<_> = u.upserts.iter().map(server_json).collect();
                    let mut o = json!({
                        "service": u.service, "version": version_json(u.version),
                        "full": u.full, "nonce": u.nonce,
                        "upserts": upserts, "removals": u.removals,
                        "removal_reasons": u.removal_reasons,
                    });
                    if let Some(p) = &u.policy {
                        o["policy"] = policy_json(p);
                    }
                    if let Some(b) = u.base {
                        o["base"] = version_json(Some(b));
                    }
                    if u.panic.is_some() {
                        o["panic"] = panic_json(u.panic);
                    }
                    o.to_string()
                } else {
                    let mut parts = vec![version_text(u.version)];
                    if u.full {
                        parts.push("full".into());
                    }
                    if let Some(p) = &u.policy {
                        parts.push(format!("policy={}", model::algorithm_name(p.algorithm)));
                    }
                    if u.full {
                        known.clear();
                    }
                    for s in &u.upserts {
                        let sign = if known.insert(s.server_id.clone()) {
                            '+'
                        } else {
                            '~'
                        };
                        parts.push(format!("{sign}{}", server_text(s)));
                    }
                    for id in &u.removals {
                        known.remove(id);
                        match u.removal_reasons.get(id) {
                            Some(r) => parts.push(format!("-{id} ({r})")),
                            None => parts.push(format!("-{id}")),
                        }
                    }
                    if u.panic.is_some_and(|p| p.active) {
                        parts.push(panic_text(u.panic));
                    }
                    parts.join(" ")
                };
                let ack = proto::ClientMessage {
                    kind: Some(ClientKind::Ack(proto::Ack {
                        service: u.service,
                        version: u.version,
                        nonce: u.nonce,
                    })),
                };
                if tx.send(ack).await.is_err() {
                    return Err(Error::Unavailable("session closed".into()));
                }
                line
            }
            Some(ServerKind::NotFound(nf)) => {
                if j {
                    json!({"service": nf.service, "not_found": true, "version": version_json(nf.version)})
                        .to_string()
                } else {
                    format!(
                        "service {} not found ({})",
                        nf.service,
                        version_text(nf.version)
                    )
                }
            }
            Some(ServerKind::GoingAway(g)) => {
                return Err(Error::Unavailable(format!(
                    "the control plane is going away: {}",
                    g.reason
                )));
            }
            // Global in-flight counts are routing input for SDKs, not updates to print.
            Some(ServerKind::GlobalLoad(_)) => continue,
            // Proof of life on a quiet stream.
            Some(ServerKind::Heartbeat(_)) => continue,
            None => continue,
        };
        let mut out = stdout.lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(()); // stdout closed (e.g. piped into `head`)
        }
    }
    Ok(())
}
