//! What a session does with each client message: Subscribe (with its bounds), Ack, Nack (and
//! its cool-down), Unsubscribe, LoadReport, circuit states.

use super::*;

impl Session {
    pub(super) async fn subscribe(&mut self, sub: proto::Subscribe) -> Result<(), End> {
        for s in sub.services {
            let service = model::resolve_service(&s.service)
                .map_err(|e| End::Status(Status::invalid_argument(e.to_string())))?
                .to_owned();
            let new = !self.subs.contains_key(&service);
            if new && self.subs.len() >= MAX_SUBSCRIPTIONS {
                return Err(End::Status(Status::resource_exhausted(format!(
                    "Subscribe.services: a session may follow at most {MAX_SUBSCRIPTIONS} services"
                ))));
            }
            if new && self.sub_bytes + service.len() > MAX_SUBSCRIPTION_BYTES {
                return Err(End::Status(Status::resource_exhausted(format!(
                    "Subscribe.services: a session may follow at most {MAX_SUBSCRIPTION_BYTES} bytes of service names"
                ))));
            }
            let known = match self.subs.get(&service) {
                // Already followed: once the client has read what this session sent (messages
                // are ordered), it holds what the session last sent, whatever this Subscribe
                // (written before it read them) says. A delta goes only on that base.
                Some(&Sub::At(v)) => Some(v),
                Some(Sub::NotFound | Sub::Resend) => None,
                // A version of another history means nothing here.
                None => s
                    .known
                    .filter(|k| k.epoch == self.epoch && k.version != 0)
                    .map(|k| k.version),
            };
            if new {
                self.shared.cache.follow_service(&service, &self.waker);
                // Recorded at once, so the follow is undone however the session ends.
                self.sub_bytes += service.len();
                self.subs.insert(service.clone(), Sub::NotFound);
                self.shared.demand.follow(self.id, &service);
            }
            self.catch_up(&service, known, true).await?;
        }
        Ok(())
    }

    pub(super) async fn on_client(&mut self, msg: ClientMessage) -> Result<(), End> {
        match msg.kind {
            Some(client_message::Kind::Subscribe(sub)) => self.subscribe(sub).await,
            Some(client_message::Kind::Ack(ack)) => {
                tracing::trace!(session = self.id, service = %model::printable(&ack.service, LOG_QUOTE), nonce = %model::printable(&ack.nonce, LOG_QUOTE), "ack");
                if let (Ok(service), Some(v)) = (model::resolve_service(&ack.service), ack.version)
                {
                    // A version of another history acknowledges nothing here.
                    if v.epoch == self.epoch {
                        self.acks.acked(service, v.version);
                    }
                }
                Ok(())
            }
            Some(client_message::Kind::Nack(nack)) => {
                let service = model::resolve_service(&nack.service)
                    .unwrap_or_default()
                    .to_owned();
                if let Some(suppressed) = self.log.check() {
                    tracing::warn!(
                        session = self.id,
                        service = %model::printable(&service, LOG_QUOTE),
                        nonce = %model::printable(&nack.nonce, LOG_QUOTE),
                        detail = %model::printable(&nack.error_detail, LOG_QUOTE),
                        suppressed,
                        "nack; sending a full snapshot"
                    );
                }
                if !self.subs.contains_key(&service) {
                    return Ok(());
                }
                let now = tokio::time::Instant::now();
                match self.nacked.get(&service) {
                    Some(&last) if now < last + NACK_COOLDOWN => {
                        // Owed a full snapshot when the cool-down ends; one timer per service.
                        if self.subs.insert(service.clone(), Sub::Resend) != Some(Sub::Resend) {
                            let waker = self.waker.clone();
                            let name: Arc<str> = service.as_str().into();
                            let shutdown = self.shared.shutdown.clone();
                            self.shared.shutdown.spawn(async move {
                                tokio::select! {
                                    () = tokio::time::sleep_until(last + NACK_COOLDOWN) => waker.wake(&name),
                                    () = shutdown.stopped() => {}
                                }
                            });
                        }
                    }
                    _ => {
                        self.nacked.insert(service.clone(), now);
                        self.catch_up(&service, None, true).await?;
                    }
                }
                Ok(())
            }
            Some(client_message::Kind::Unsubscribe(u)) => {
                if let Ok(service) = model::resolve_service(&u.service) {
                    if self.subs.remove(service).is_some() {
                        self.acks.forget(service);
                        self.sub_bytes -= service.len();
                        self.shared.cache.unfollow_service(service, &self.waker);
                        self.shared.demand.unfollow(self.id, service);
                    }
                    self.nacked.remove(service);
                    self.global.forget(service);
                    // Metrics only for a service the session reported on: a series per name
                    // a client merely unsubscribed from would grow without bound.
                    if self.shared.circuits.remove_service(self.id, service) {
                        self.shared
                            .metrics
                            .circuits
                            .update(service, &self.shared.circuits);
                    }
                    if let Some(totals) = self.shared.loads.remove_service(self.id, service) {
                        self.shared.pickers.set_baselines(service, &totals);
                        self.shared.metrics.in_flight(service, &totals);
                    }
                }
                Ok(())
            }
            Some(client_message::Kind::LoadReport(mut report)) => {
                let Ok(service) = model::resolve_service(&report.service) else {
                    return Ok(());
                };
                // Only reports on followed services, about backends that exist, are kept: what a
                // client sends must not grow the server's state beyond the routing state itself.
                if !self.subs.contains_key(service) {
                    tracing::debug!(
                        session = self.id,
                        service,
                        "load report for a service not followed; ignored"
                    );
                    return Ok(());
                }
                if let Some(snap) = self.shared.cache.get(service) {
                    report
                        .backends
                        .retain(|b| snap.servers.contains_key(b.server_id.as_str()));
                    self.shared.reports.submit(service, &report.backends);
                    self.shared
                        .demand
                        .report(self.id, service, &report.backends);
                    if self
                        .shared
                        .circuits
                        .report(self.id, service, &report.backends)
                    {
                        self.shared
                            .metrics
                            .circuits
                            .update(service, &self.shared.circuits);
                    }
                    let totals = self.shared.loads.report(self.id, service, &report.backends);
                    self.shared.pickers.set_baselines(service, &totals);
                    self.shared.metrics.in_flight(service, &totals);
                }
                Ok(())
            }
            None => {
                tracing::debug!(session = self.id, "empty client message ignored");
                Ok(())
            }
        }
    }
}
