//! Bringing one followed service up to date from the cache: a delta, a full snapshot or
//! `ServiceNotFound`, never older than what the client says it holds.

use super::*;

impl Session {
    pub(super) fn message(kind: server_message::Kind) -> Outbound {
        Outbound::Message(ServerMessage { kind: Some(kind) })
    }

    pub(super) fn version(&self, version: u64) -> proto::Version {
        proto::Version {
            epoch: self.epoch,
            version,
        }
    }

    /// The cache's answer for a client holding `known`, never older than `known`: when the
    /// cache is behind the client ([`Catchup::Ahead`]: the client saw a newer state on another
    /// replica), waits up to [`AHEAD_WAIT`] for the cache to reach it, else ends the session
    /// with `UNAVAILABLE` so the client tries another replica.
    pub(super) async fn catch_up_not_older(
        &mut self,
        service: &str,
        known: Option<u64>,
    ) -> Result<Catchup, End> {
        let cache = self.shared.cache.clone();
        let (known, current) = match cache.catch_up(service, known) {
            Catchup::Ahead { known, current } => (known, current),
            other => return Ok(other),
        };
        tracing::debug!(
            session = self.id,
            service,
            known,
            current,
            "client holds a newer version than this replica; waiting for the cache"
        );
        if cache.wait_for_revision(known, AHEAD_WAIT).await {
            match cache.catch_up(service, Some(known)) {
                Catchup::Ahead { current, .. } => Err(self.behind(service, known, current)),
                other => Ok(other),
            }
        } else {
            let current = cache.get(service).map_or(0, |s| s.version.version);
            Err(self.behind(service, known, current))
        }
    }

    /// The end of a session whose client holds a newer version than this replica can serve.
    pub(super) fn behind(&mut self, service: &str, known: u64, current: u64) -> End {
        if let Some(suppressed) = self.log.check() {
            tracing::warn!(
                session = self.id,
                service = %model::printable(service, LOG_QUOTE),
                known,
                current,
                suppressed,
                "client holds a newer version than this replica reached; refusing (UNAVAILABLE)"
            );
        }
        End::Status(Status::unavailable(format!(
            "this replica is behind: service {} is at version {current} here, the client holds {known}; try another replica",
            model::printable(service, LOG_QUOTE)
        )))
    }

    /// Sends whatever brings a client holding `known` up to date, and records it. `answer`:
    /// the client asked (Subscribe, Nack), so it gets a reply even when nothing changed.
    pub(super) async fn catch_up(
        &mut self,
        service: &str,
        known: Option<u64>,
        answer: bool,
    ) -> Result<(), End> {
        let catchup = self.catch_up_not_older(service, known).await?;
        let epoch = self.epoch;
        // Updates carry a nonce derived from what they contain, so their encoding can be
        // shared by every session; `Current` and `NotFound` answers are per session.
        let encoded = |update: proto::ServiceUpdate| {
            Outbound::encode_shared(&ServerMessage {
                kind: Some(server_message::Kind::Update(update)),
            })
        };
        let mut at = None;
        let (out, sub) = match catchup {
            Catchup::Full {
                snapshot,
                encoded: memo,
            } => {
                let bytes = memo
                    .get_or_init(|| {
                        encoded(proto::ServiceUpdate {
                            service: service.to_owned(),
                            version: Some(snapshot.version),
                            base: None,
                            nonce: format!("{epoch:x}-f{}", snapshot.version.version),
                            full: true,
                            panic: Some(dlb::health_policy::panic_state(
                                &snapshot.policy,
                                snapshot.servers.values().map(|s| &**s),
                            )),
                            policy: Some(snapshot.policy.clone()),
                            upserts: snapshot.server_list(),
                            removals: Vec::new(),
                            removal_reasons: Default::default(),
                        })
                    })
                    .clone();
                (Outbound::Encoded(bytes), Sub::At(snapshot.version.version))
            }
            Catchup::Delta {
                base,
                version,
                changes,
                at: when,
                encoded: memo,
            } => {
                at = Some(when);
                let build = || {
                    // The panic state at `version`, when the cache's snapshot is still at it (the
                    // common case; otherwise the next delta carries it).
                    let panic = self
                        .shared
                        .cache
                        .get(service)
                        .filter(|s| s.version.version == version)
                        .map(|s| {
                            dlb::health_policy::panic_state(
                                &s.policy,
                                s.servers.values().map(|s| &**s),
                            )
                        });
                    let d = Delta::coalesce(base, changes.iter().map(|c| &**c));
                    encoded(proto::ServiceUpdate {
                        service: service.to_owned(),
                        version: Some(self.version(d.version)),
                        base: Some(self.version(d.base)),
                        nonce: format!("{epoch:x}-d{base}-{version}"),
                        full: false,
                        policy: d.policy,
                        upserts: d.upserts,
                        removals: d.removals,
                        removal_reasons: d.removal_reasons.into_iter().collect(),
                        panic,
                    })
                };
                let bytes = match memo {
                    Some(m) => m.get_or_init(build).clone(),
                    None => build(),
                };
                if bytes.len() > model::MAX_SNAPSHOT_BYTES {
                    // A coalesced delta (upserts plus removals) can outgrow the snapshot,
                    // which always fits: send that instead.
                    return Box::pin(self.catch_up(service, None, answer)).await;
                }
                (Outbound::Encoded(bytes), Sub::At(version))
            }
            // Not returned by `catch_up_not_older`; refused the same way if it were.
            Catchup::Ahead { known, current } => return Err(self.behind(service, known, current)),
            Catchup::Current => {
                let Some(v) = known.filter(|_| answer) else {
                    return Ok(());
                };
                // An empty delta confirms the client's version.
                (
                    Self::message(server_message::Kind::Update(proto::ServiceUpdate {
                        service: service.to_owned(),
                        version: Some(self.version(v)),
                        base: Some(self.version(v)),
                        nonce: self.next_nonce(),
                        full: false,
                        policy: None,
                        upserts: Vec::new(),
                        removals: Vec::new(),
                        removal_reasons: Default::default(),
                        panic: None,
                    })),
                    Sub::At(v),
                )
            }
            Catchup::NotFound => {
                if !answer && self.subs.get(service) == Some(&Sub::NotFound) {
                    return Ok(());
                }
                (
                    Self::message(server_message::Kind::NotFound(proto::ServiceNotFound {
                        service: service.to_owned(),
                        version: Some(proto::Version {
                            epoch: self.epoch,
                            version: 0,
                        }),
                        nonce: self.next_nonce(),
                    })),
                    Sub::NotFound,
                )
            }
        };
        // Recorded before the hand-over: an update stuck behind a full queue waits for its Ack.
        match sub {
            Sub::At(v) => self.acks.sent(service, v),
            Sub::NotFound => self.acks.forget(service),
            Sub::Resend => {}
        }
        self.send(out).await?;
        if let Some(at) = at {
            self.shared.metrics.push_latency(at.elapsed().as_secs_f64());
        }
        self.subs.insert(service.to_owned(), sub);
        Ok(())
    }
}
