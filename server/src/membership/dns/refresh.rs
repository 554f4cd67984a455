//! One followed name's life: the refresh loop (resolve, retry with backoff on failure, refresh
//! at the configured interval) and the reconcile that makes the service's DNS-owned backends
//! equal to what the name resolved to.

use dlb::backoff::Backoff;

use super::*;

/// Makes the service's DNS-owned backends equal to `resolved` (truncated to the quota).
pub(super) async fn reconcile(
    inner: &Inner,
    store: &dyn Store,
    service: &str,
    target: &Target,
    template: &Template,
    resolved: &Resolved,
) -> Result<Status, Error> {
    for (ip, why) in &resolved.skipped {
        tracing::warn!(service, target = %target.to_text(), %ip, reason = why, "DNS answer skipped: never a backend address");
        inner.metrics.dns_skipped(why);
    }
    let max = inner.config.max_backends;
    let truncated = resolved.ips.len() > max;
    if truncated {
        tracing::warn!(
            service,
            target = %target.to_text(),
            resolved = resolved.ips.len(),
            kept = max,
            "the DNS name resolves to more addresses than the per-name quota; keeping the lowest"
        );
    }
    let dns_name = target.to_text();
    let desired: BTreeMap<String, proto::Server> = resolved
        .ips
        .iter()
        .take(max)
        .map(|ip| {
            let address = SocketAddr::new(*ip, target.port).to_string();
            let id = backend_id(*ip, target.port);
            let server = proto::Server {
                server_id: id.clone(),
                address,
                weight: template.weight,
                locality: template.locality.clone(),
                priority: template.priority,
                source: proto::BackendSource::Dns as i32,
                dns_name: dns_name.clone(),
                ..Default::default()
            };
            (id, server)
        })
        .collect();
    for _ in 0..RECONCILE_ATTEMPTS {
        let snap = store.get_service(service.to_owned()).await?;
        let (version, servers) = match &snap {
            Some(s) => (s.version.version, Some(&s.servers)),
            None => (0, None),
        };
        let mut mutations = Vec::new();
        let mut backends = 0;
        if let Some(servers) = servers {
            for s in servers.values().filter(|s| is_dns(s)) {
                if !desired.contains_key(&s.server_id) {
                    mutations.push(Mutation::RemoveWithReason(
                        s.server_id.clone(),
                        "dns: no longer resolved".into(),
                    ));
                }
            }
        }
        for (id, want) in &desired {
            match servers.and_then(|m| m.get(id.as_str())) {
                Some(have) if !is_dns(have) => {
                    tracing::warn!(service, server_id = %id, "a DNS address's id is owned by an API or lease backend; skipped");
                }
                Some(have)
                    if have.address == want.address
                        && have.weight == want.weight
                        && have.locality == want.locality
                        && have.priority == want.priority
                        && have.dns_name == want.dns_name =>
                {
                    backends += 1;
                }
                _ => {
                    mutations.push(Mutation::Declare(want.clone()));
                    backends += 1;
                }
            }
        }
        let status = Status {
            backends,
            resolved: resolved.ips.len(),
            truncated,
            ..Status::default()
        };
        if mutations.is_empty() {
            return Ok(status);
        }
        match store
            .apply(service.to_owned(), mutations, Some(version))
            .await
        {
            Ok(applied) => {
                tracing::info!(service, target = %dns_name, backends, version = applied.version.version, "DNS backends updated");
                return Ok(status);
            }
            Err(Error::VersionMismatch { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::Task(format!(
        "service {service:?} kept changing during {RECONCILE_ATTEMPTS} DNS reconcile attempts"
    )))
}

pub(super) async fn refresh_loop(
    inner: Arc<Inner>,
    service: String,
    target: Target,
    template: Template,
    status: Arc<Mutex<Status>>,
    first: Duration,
) {
    let shutdown = inner.shutdown.clone();
    let mut leadership = inner.leadership.clone();
    let mut delay = first;
    let mut retry = Backoff::new(inner.config.retry_min, inner.config.retry_max);
    let resolver = match build_resolver(&inner.config) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(%service, error = %e, "cannot build the DNS resolver; the name is not followed");
            status.lock().last_error = e;
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.stopped() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        // Only the leader refreshes (see the module docs).
        let fence = tokio::select! {
            _ = shutdown.stopped() => return,
            f = crate::replicas::until_leader(&mut leadership) => f,
        };
        let Some(fence) = fence else { return };
        let mut lost = leadership.clone();
        let refresh = async {
            match resolve(&resolver, &target).await {
                Ok(resolved) => reconcile(
                    &inner,
                    &*inner.fenced,
                    &service,
                    &target,
                    &template,
                    &resolved,
                )
                .await
                .map(|s| (s, resolved.ttl))
                .map_err(|e| format!("store: {e}")),
                Err(e) => Err(e),
            }
        };
        // A shutdown does not wait for a slow name server (a store write already started
        // completes or not as a whole).
        let outcome = tokio::select! {
            _ = shutdown.stopped() => return,
            () = crate::replicas::until_not_leader(&mut lost, fence) => {
                tracing::info!(%service, "DNS refresh abandoned: this replica is no longer the leader");
                delay = Duration::ZERO;
                continue;
            }
            o = refresh => o,
        };
        let failures = status.lock().consecutive_failures;
        match outcome {
            Ok((new, ttl)) => {
                retry.reset();
                delay = ttl.clamp(inner.config.min_refresh, inner.config.max_refresh);
                *status.lock() = Status {
                    next_refresh: Some(Instant::now() + delay),
                    ..new
                };
                inner.metrics.dns_refresh(&service, true);
            }
            Err(e) => {
                let failures = failures.saturating_add(1);
                delay = retry.next_delay();
                tracing::warn!(%service, target = %target.to_text(), failures, error = %e, "DNS refresh failed; keeping the last good set");
                let mut st = status.lock();
                st.consecutive_failures = failures;
                st.last_error = model::prefix(&e, 256).to_owned();
                st.next_refresh = Some(Instant::now() + delay);
                drop(st);
                inner.metrics.dns_refresh(&service, false);
                inner.metrics.dns_failures(&service, i64::from(failures));
            }
        }
    }
}
