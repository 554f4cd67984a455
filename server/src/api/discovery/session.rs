//! A session's life: its loop over the client's messages, its waker, heartbeats, maximum age,
//! readiness and the shutdown, and the bounded hand-over of each message to the stream.

use super::*;

impl Session {
    pub(super) async fn run(mut self, mut inbound: Streaming<ClientMessage>) {
        let metrics = self.shared.metrics.clone();
        let end = self.main(&mut inbound).await;
        for service in self.subs.keys() {
            self.shared.cache.unfollow_service(service, &self.waker);
        }
        let code = match end {
            End::Done | End::Gone => tonic::Code::Ok,
            End::Status(status) => {
                let code = status.code();
                let _ = tokio::time::timeout(GOING_AWAY_TIMEOUT, self.tx.send(Err(status))).await;
                code
            }
        };
        metrics.rpc("Session", code);
        let suppressed = self.log.finish();
        if suppressed > 0 {
            tracing::warn!(
                session = self.id,
                suppressed,
                "session: {suppressed} similar messages suppressed"
            );
        }
        tracing::debug!(session = self.id, "session closed");
    }

    pub(super) fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        format!("{:x}-{:x}-{}", self.epoch, self.id, self.nonce)
    }

    /// Hands a message to the stream; `Err(End::Gone)` when the client is gone, `Err(End::Done)`
    /// when a shutdown started while the queue was full.
    ///
    /// A client that stops reading fills the bounded queue: the session then counts as lagging
    /// (`dlb_sessions_lagging`) and waits at most the stall deadline for room, after which it is
    /// cut (`dlb_sessions_stalled_total`). What it can pin meanwhile is bounded by the queue
    /// (`session_queue` messages, shared encodings included) plus the HTTP/2 stream's buffers.
    pub(super) async fn send(&mut self, msg: Outbound) -> Result<(), End> {
        self.last_sent = tokio::time::Instant::now();
        let msg = match self.tx.try_send(Ok(msg)) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::Gone),
            Err(mpsc::error::TrySendError::Full(msg)) => msg,
        };
        let metrics = self.shared.metrics.clone();
        metrics.lagging(1);
        let shutdown = self.shared.shutdown.clone();
        let deadline = self.shared.stall_deadline;
        let r = tokio::select! {
            r = tokio::time::timeout(deadline, self.tx.send(msg)) => match r {
                Ok(r) => r.map_err(|_| End::Gone),
                Err(_) => {
                    metrics.stalled();
                    tracing::warn!(session = self.id, deadline = ?deadline, "session stalled: not read within the deadline; closing it");
                    Err(End::Status(Status::resource_exhausted(format!(
                        "session closed: it did not read for {deadline:?}"
                    ))))
                }
            },
            _ = shutdown.stopped() => Err(End::Done),
        };
        metrics.lagging(-1);
        r
    }

    pub(super) async fn going_away(&mut self) {
        self.going_away_because("dlbd is shutting down").await;
    }

    pub(super) async fn going_away_because(&mut self, reason: &str) {
        let msg = ServerMessage {
            kind: Some(server_message::Kind::GoingAway(proto::GoingAway {
                reason: reason.into(),
            })),
        };
        // Best effort: a client that does not read for a while does not get it.
        let _ = tokio::time::timeout(GOING_AWAY_TIMEOUT, self.tx.send(Ok(Outbound::Message(msg))))
            .await;
    }

    pub(super) async fn main(&mut self, inbound: &mut Streaming<ClientMessage>) -> End {
        let shutdown = self.shared.shutdown.clone();
        let first = tokio::select! {
            m = inbound.message() => m,
            _ = shutdown.stopped() => {
                self.going_away().await;
                return End::Done;
            }
        };
        match first {
            Ok(Some(ClientMessage {
                kind: Some(client_message::Kind::Subscribe(sub)),
            })) => {
                tracing::info!(session = self.id, client_id = %model::printable(&sub.client_id, LOG_QUOTE), services = sub.services.len(), "session subscribed");
                self.acks
                    .client_id(model::printable(&sub.client_id, LOG_QUOTE).to_string());
                if let Some(l) = &sub.locality {
                    if let Err(e) = dlb::locality::validate_locality("locality", l) {
                        return End::Status(Status::invalid_argument(e.to_string()));
                    }
                }
                let locality = dlb::locality::normalize(sub.locality.clone());
                if let Some(zone) = crate::reports::demand::ZoneKey::of(locality.as_ref()) {
                    self.shared.demand.join(self.id, zone);
                }
                if let Err(end) = self.subscribe(sub).await {
                    return end;
                }
            }
            Ok(Some(_)) => {
                return End::Status(Status::invalid_argument(
                    "the first message of a session must be a Subscribe",
                ))
            }
            Ok(None) => return End::Done,
            Err(e) => return inbound_error(e),
        }
        let mut readiness = self.shared.readiness.clone();
        let age_limit = self.shared.max_session_age.map(jittered);
        let aged = async move {
            match age_limit {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(aged);
        let heartbeat = tokio::time::sleep_until(self.last_sent + self.shared.session_heartbeat);
        tokio::pin!(heartbeat);
        loop {
            let due = self.last_sent + self.shared.session_heartbeat;
            if heartbeat.deadline() != due {
                heartbeat.as_mut().reset(due);
            }
            tokio::select! {
                biased;
                _ = shutdown.stopped() => {
                    self.going_away().await;
                    return End::Done;
                }
                () = readiness.going_away() => {
                    tracing::info!(session = self.id, "session sent away: {}", crate::readiness::NOT_SYNCED);
                    self.going_away_because(crate::readiness::NOT_SYNCED).await;
                    return End::Done;
                }
                () = &mut aged => {
                    tracing::debug!(session = self.id, "session sent away: {MAX_AGE_REASON}");
                    self.going_away_because(MAX_AGE_REASON).await;
                    return End::Done;
                }
                () = &mut heartbeat => {
                    let beat = proto::Heartbeat { revision: self.shared.cache.revision() };
                    if let Err(end) = self.send(Self::message(server_message::Kind::Heartbeat(beat))).await {
                        return end;
                    }
                }
                // Updates before client messages: a woken session does not poll its inbound
                // stream (cheaper per update); client messages wait at most one catch-up.
                _ = self.waker.notified() => {
                    if let Err(end) = self.on_wake().await {
                        return end;
                    }
                }
                () = self.global.due() => {
                    let msgs = self.global.collect(&self.shared.loads, &self.shared.demand, self.id, self.subs.keys());
                    for g in msgs {
                        if let Err(end) = self.send(Self::message(server_message::Kind::GlobalLoad(g))).await {
                            return end;
                        }
                    }
                }
                m = inbound.message() => {
                    let r = match m {
                        Ok(Some(msg)) => self.on_client(msg).await,
                        Ok(None) => return End::Done,
                        Err(e) => return inbound_error(e),
                    };
                    if let Err(end) = r {
                        return end;
                    }
                }
            }
        }
    }

    /// Brings every followed service that changed up to date.
    pub(super) async fn on_wake(&mut self) -> Result<(), End> {
        for service in self.waker.take_dirty() {
            let Some(&sub) = self.subs.get(&*service) else {
                continue;
            };
            match sub {
                Sub::At(v) => self.catch_up(&service, Some(v), false).await?,
                Sub::NotFound => self.catch_up(&service, None, false).await?,
                Sub::Resend => {
                    let now = tokio::time::Instant::now();
                    let cooling = self
                        .nacked
                        .get(&*service)
                        .is_some_and(|&last| now < last + NACK_COOLDOWN);
                    // A change during the cool-down waits for the timer, which wakes us.
                    if !cooling {
                        self.nacked.insert(service.to_string(), now);
                        self.catch_up(&service, None, true).await?;
                    }
                }
            }
        }
        Ok(())
    }
}
