//! The page's live updates: one server-sent-event stream per open page
//! (`GET /api/events?service=NAME`, or without `service` for the overview).
//!
//! The stream follows the snapshot cache's revision (`Cache::revisions`): when it moves, the
//! page's service is looked up (O(1)); if its version changed, the backends the changes touched
//! (their ids from the cache's history, [`Cache::catch_up`](crate::cache::Cache::catch_up);
//! every backend when it does not reach back) are rebuilt and only the rows that differ from
//! what this stream last sent go out, in one `service` event (`{"summary", "upsert": [rows],
//! "remove": [ids]}`). A change thus costs one small event per open page and O(changed) rows,
//! and a change to another service costs that page nothing but the lookup. Every [`TICK`] a
//! `rates` event carries the last second's requests and errors of the backends that have
//! traffic (the sparklines), the followers and summary when they changed, and the rows whose
//! in-flight, probe or circuit columns moved without a version change (O(backends) once a
//! second), and the drain barriers waiting for the service when they changed (a barrier's
//! start, progress and end show within a tick; while one waits, every tick: its time left
//! moves). The
//! overview page gets an `overview` event (the whole [`Overview`], O(services)) when it changed.
//!
//! No task: the stream is a `futures::stream::unfold` polled by the connection. It ends when
//! the client goes away (the connection drops it) or the server shuts down (it watches the
//! [`Shutdown`](crate::Shutdown) signal), so a graceful shutdown never waits for an open page.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Serialize;
use tokio::sync::watch;

use super::model::{self, BackendView, BarrierView, Follower, Overview, ServiceSummary};
use super::Status;
use crate::cache::Catchup;

/// How often the rates (sparklines), followers and overview are refreshed.
pub const TICK: Duration = Duration::from_secs(1);

/// Seconds of history the `trends` event carries per backend (the sparkline's width).
pub const TREND: usize = 60;

/// A `service` event: what changed since the last one.
#[derive(Debug, Serialize)]
struct Change<'a> {
    summary: &'a ServiceSummary,
    upsert: Vec<&'a BackendView>,
    remove: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    followers: Option<&'a [Follower]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    barriers: Option<&'a [BarrierView]>,
}

/// A `rates` event: per backend with traffic, `[requests, errors]` in the last complete second
/// and the 10 s rates.
#[derive(Debug, Serialize)]
struct Rates<'a> {
    summary: &'a ServiceSummary,
    backends: HashMap<&'a str, [f64; 4]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    followers: Option<&'a [Follower]>,
    /// The drain barriers in progress, when they changed (while any waits: every tick, its
    /// time left moves).
    #[serde(skip_serializing_if = "Option::is_none")]
    barriers: Option<&'a [BarrierView]>,
    /// Rows whose in-flight, probe or circuit columns moved since they were last sent.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    upsert: Vec<&'a BackendView>,
}

/// What one stream last sent.
struct Page {
    status: Arc<Status>,
    service: Option<String>,
    revisions: watch::Receiver<u64>,
    tick: tokio::time::Interval,
    stop: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    /// Service pages: the version and rows last sent (rates left out: they go by tick).
    version: Option<u64>,
    rows: HashMap<String, BackendView>,
    followers: Vec<Follower>,
    barriers: Vec<BarrierView>,
    /// Overview page: the overview last sent.
    overview: Option<String>,
    /// Whether the last `rates` event had any backend with traffic (then one more, with
    /// none, zeroes the page's rates).
    had_traffic: bool,
    /// The version the page was rendered at (service pages), until the first poll.
    rendered: Option<Option<u64>>,
    ended: bool,
}

/// A row without the parts the tick sends (rates and trends), for comparison.
fn steady(b: &BackendView) -> BackendView {
    BackendView {
        requests_per_s: 0.0,
        errors_per_s: 0.0,
        requests_trend: Vec::new(),
        errors_trend: Vec::new(),
        ..b.clone()
    }
}

fn event(name: &str, data: &impl Serialize) -> Option<Event> {
    let text = serde_json::to_string(data).ok()?;
    Some(Event::default().event(name).data(text))
}

impl Page {
    /// The next event: `None` ends the stream.
    async fn next(&mut self) -> Option<Event> {
        if let Some(rendered) = self.rendered.take() {
            if let Some(e) = self.start(rendered).await {
                return Some(e);
            }
        }
        loop {
            if self.ended {
                return None;
            }
            let (changed, ticked) = tokio::select! {
                () = &mut self.stop => return None,
                r = self.revisions.changed() => {
                    if r.is_err() {
                        return None;
                    }
                    (true, false)
                }
                _ = self.tick.tick() => (false, true),
            };
            let out = match self.service.clone() {
                None => self.overview(),
                Some(name) => self.service(&name, changed, ticked).await,
            };
            if out.is_some() {
                return out;
            }
        }
    }

    /// What the page holds: the state now when it is the one it was rendered at (nothing to
    /// send), else every row at once.
    async fn start(&mut self, rendered: Option<u64>) -> Option<Event> {
        let Some(name) = self.service.clone() else {
            self.overview = serde_json::to_string(&model::overview(&self.status)).ok();
            return None;
        };
        let view = model::service_with(&self.status, &name, false, None).await?;
        self.followers = view.followers.clone();
        self.barriers = view.barriers.clone();
        if rendered == Some(view.summary.version) {
            self.version = rendered;
            self.rows = view
                .servers
                .iter()
                .map(|b| (b.id.clone(), steady(b)))
                .collect();
            // The sparklines' history (the page renders none: it would weigh on every load).
            let trends: HashMap<&str, &[u64]> = view
                .servers
                .iter()
                .filter(|b| !b.requests_trend.is_empty())
                .map(|b| {
                    let t = &b.requests_trend;
                    (
                        b.id.as_str(),
                        &t[t.len().saturating_sub(TREND + 1)..t.len() - 1],
                    )
                })
                .collect();
            return (!trends.is_empty())
                .then(|| event("trends", &trends))
                .flatten();
        }
        self.service(&name, true, false).await
    }

    fn overview(&mut self) -> Option<Event> {
        let o: Overview = model::overview(&self.status);
        let text = serde_json::to_string(&o).ok()?;
        if self.overview.as_deref() == Some(text.as_str()) {
            return None;
        }
        self.overview = Some(text.clone());
        Some(Event::default().event("overview").data(text))
    }

    async fn service(&mut self, name: &str, changed: bool, ticked: bool) -> Option<Event> {
        let version = self
            .status
            .shared
            .cache
            .get(name)
            .map(|s| s.version.version);
        if version.is_none() {
            if changed || self.version.is_some() {
                self.version = None;
                self.rows.clear();
                self.ended = true;
                return event("gone", &name);
            }
            return None;
        }
        if !(ticked || version != self.version) {
            return None;
        }
        if version != self.version {
            return self.changed(name).await;
        }
        // The tick: the rates, and the rows whose other live columns (in-flight, probe,
        // circuits) moved without a version change. O(backends), once a second.
        let view = model::service_with(&self.status, name, false, None).await?;
        let followers = (view.followers != self.followers).then_some(view.followers.as_slice());
        let barriers = (view.barriers != self.barriers).then_some(view.barriers.as_slice());
        let mut upsert = Vec::new();
        for b in &view.servers {
            let s = steady(b);
            if self.rows.get(&b.id).is_some_and(|r| *r != s) {
                upsert.push(b);
                self.rows.insert(b.id.clone(), s);
            }
        }
        let backends = view
            .servers
            .iter()
            .filter(|b| !b.requests_trend.is_empty())
            .map(|b| {
                let last = b.requests_trend.len().saturating_sub(2);
                (
                    b.id.as_str(),
                    [
                        b.requests_trend.get(last).copied().unwrap_or(0) as f64,
                        b.errors_trend.get(last).copied().unwrap_or(0) as f64,
                        b.requests_per_s,
                        b.errors_per_s,
                    ],
                )
            })
            .collect::<HashMap<_, _>>();
        let traffic = !backends.is_empty();
        if !traffic
            && !self.had_traffic
            && followers.is_none()
            && barriers.is_none()
            && upsert.is_empty()
        {
            return None;
        }
        self.had_traffic = traffic;
        let e = event(
            "rates",
            &Rates {
                summary: &view.summary,
                backends,
                followers,
                barriers,
                upsert,
            },
        );
        self.followers = view.followers.clone();
        self.barriers = view.barriers.clone();
        e
    }

    /// The `service` event after the service's version moved: the rows of the backends the
    /// changes touched (from the cache's history; every row when it does not reach back to the
    /// version this page holds).
    async fn changed(&mut self, name: &str) -> Option<Event> {
        let touched = self.version.and_then(|held| {
            match self.status.shared.cache.catch_up(name, Some(held)) {
                Catchup::Delta {
                    version, changes, ..
                } => {
                    let mut ids = BTreeSet::new();
                    for c in &changes {
                        ids.extend(c.upserts.iter().map(|s| s.server_id.clone()));
                        ids.extend(c.removals.iter().cloned());
                    }
                    Some((ids, version))
                }
                _ => None,
            }
        });
        let only = touched.as_ref().map(|(ids, _)| ids);
        let view = model::service_with(&self.status, name, false, only).await?;
        let followers = (view.followers != self.followers).then_some(view.followers.as_slice());
        let barriers = (view.barriers != self.barriers).then_some(view.barriers.as_slice());
        // A change newer than the delta's end is handled on the next pass (the revision
        // watch has fired for it).
        self.version = Some(touched.as_ref().map_or(view.summary.version, |t| t.1));
        let mut upsert = Vec::new();
        let seen: HashSet<&str> = view.servers.iter().map(|b| b.id.as_str()).collect();
        for b in &view.servers {
            let s = steady(b);
            if self.rows.get(&b.id) != Some(&s) {
                upsert.push(b);
                self.rows.insert(b.id.clone(), s);
            }
        }
        let remove: Vec<String> = match only {
            Some(ids) => ids
                .iter()
                .filter(|id| !seen.contains(id.as_str()) && self.rows.contains_key(*id))
                .cloned()
                .collect(),
            None => self
                .rows
                .keys()
                .filter(|id| !seen.contains(id.as_str()))
                .cloned()
                .collect(),
        };
        for id in &remove {
            self.rows.remove(id);
        }
        let e = event(
            "service",
            &Change {
                summary: &view.summary,
                upsert,
                remove: remove.iter().map(String::as_str).collect(),
                followers,
                barriers,
            },
        );
        self.followers = view.followers.clone();
        self.barriers = view.barriers.clone();
        e
    }
}

/// The event stream of one open page (`service`: a service page, rendered at version
/// `rendered`; `None`: the overview).
pub fn stream(
    status: Arc<Status>,
    service: Option<String>,
    rendered: Option<u64>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut revisions = status.shared.cache.revisions();
    revisions.mark_unchanged();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The page was rendered just now: its first event is the first change or tick after.
    tick.reset();
    let stop = Box::pin(status.shared.shutdown.stopped_owned());
    let page = Page {
        service,
        revisions,
        tick,
        stop,
        version: None,
        rows: HashMap::new(),
        followers: Vec::new(),
        barriers: Vec::new(),
        overview: None,
        had_traffic: true,
        rendered: Some(rendered),
        ended: false,
        status,
    };
    let s = futures::stream::unfold(page, |mut page| async move {
        let e = page.next().await?;
        Some((Ok(e), page))
    });
    Sse::new(s).keep_alive(KeepAlive::default())
}
