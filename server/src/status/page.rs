//! The HTML pages, rendered on the server with [`maud`] (every interpolated string is escaped
//! by the template library; nothing here escapes by hand): the overview (`GET /`) and a
//! service (`GET /services/{name}`). The pages load `assets/status.css` and
//! `assets/status.js` (compiled into the binary) which follow [`super::live`]'s events and
//! update the rows in place (the script only ever sets `textContent`, never HTML).
//!
//! Rows are compact on purpose: a service of 1,000 backends stays well under 200 KB.

use maud::{html, Markup, DOCTYPE};

use super::model::{BackendView, BarrierView, Follower, Overview, ServiceSummary, ServiceView};

/// The stylesheet, compiled in.
pub const CSS: &str = include_str!("assets/status.css");
/// The script, compiled in.
pub const JS: &str = include_str!("assets/status.js");

fn layout(title: &str, kind: &str, service: Option<(&str, u64)>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width";
                title { (title) " — dlbd" }
                link rel="stylesheet" href="/assets/status.css";
            }
            body data-page=(kind)
                data-service=[service.map(|s| s.0)]
                data-version=[service.map(|s| s.1)] {
                header {
                    a href="/" { "dlbd" }
                    " "
                    span #live .off title="live updates" { "●" }
                    " "
                    h1 { (title) }
                }
                (body)
                script src="/assets/status.js" {}
            }
        }
    }
}

fn rate(v: f64) -> String {
    if v == 0.0 {
        "0".to_owned()
    } else if v < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn summary_cells(s: &ServiceSummary) -> Markup {
    html! {
        td { (s.backends.total) }
        td { (s.backends.eligible) }
        td .bad[s.backends.unhealthy > 0] { (s.backends.unhealthy) }
        td { (s.backends.draining) }
        td { (rate(s.requests_per_s)) }
        td { (error_rate(s)) }
        td { (s.in_flight) }
        td .bad[s.panic.active] { @if s.panic.active { "PANIC " } (s.panic.mode) }
    }
}

/// Errors as a share of requests, in percent.
fn error_rate(s: &ServiceSummary) -> String {
    if s.requests_per_s > 0.0 {
        format!("{:.1} %", 100.0 * s.errors_per_s / s.requests_per_s)
    } else {
        "–".to_owned()
    }
}

/// `GET /`.
pub fn overview(o: &Overview) -> Markup {
    let body = html! {
        section #replica {
            dl {
                dt { "replica" } dd #r-id { (o.replica.id) }
                dt { "role" } dd #r-role { @if o.replica.leader { "leader" } @else { "follower" } }
                dt { "readiness" } dd #r-ready { (o.replica.readiness) }
                dt { "replicas" } dd #r-members { (o.replica.members.join(", ")) }
                dt { "store" } dd #r-store { (o.store.kind) " · epoch " (o.store.epoch) " · revision " (o.store.revision) }
                dt { "sessions" } dd #r-sessions { (o.sessions) }
                dt { "xDS clients" } dd #r-xds { (o.xds_clients) }
                dt { "drain barriers" } dd #r-barriers { (o.barriers) }
            }
        }
        p .note { "Requests and errors: the load reports this replica received (with several replicas, each shows its own share). Sessions and xDS clients: those connected to this replica." }
        table #services {
            thead { tr {
                th { "service" } th { "backends" } th { "eligible" } th { "unhealthy" }
                th { "draining" } th { "req/s" } th { "errors" } th { "in flight" } th { "panic" }
            } }
            tbody {
                @for s in &o.services {
                    tr data-id=(s.name) {
                        td { a href={ "/services/" (s.name) } { (s.name) } }
                        (summary_cells(s))
                    }
                }
            }
        }
    };
    layout("overview", "overview", None, body)
}

/// The state cell's class and text.
pub fn state(b: &BackendView) -> (&'static str, &'static str) {
    if b.eligible {
        ("ok", "eligible")
    } else if b.health == "unhealthy" {
        ("bad", "unhealthy")
    } else {
        ("warn", "draining")
    }
}

fn row(b: &BackendView) -> Markup {
    let (class, text) = state(b);
    html! {
        // No `data-id`: the first cell is the id (the script finds rows by it); every byte of a
        // row counts 1,000 times on a big service.
        tr {
            td { (b.id) }
            td { (b.address) }
            td { @if let Some(z) = &b.zone { (z) " " } "p" (b.priority) }
            td { (b.weight) @if b.effective_weight != b.weight { "→" (b.effective_weight) } }
            td class=(class) { (text) }
            td { (b.reason) }
            td { @if let Some(p) = b.probe { (p) } @if let Some(us) = b.probe_rtt_us { " " (us / 1000) "ms" } }
            td { (b.in_flight) }
            td { (rate(b.requests_per_s)) @if b.errors_per_s > 0.0 { " / " (rate(b.errors_per_s)) } }
            td {}
            td { @if b.circuit_open + b.circuit_half_open > 0 { (b.circuit_open) "/" (b.circuit_half_open) } }
            td data-age=[b.lease_age_seconds] { (source(b)) }
            td { @for (k, v) in &b.metadata { (k) "=" (v) " " } }
        }
    }
}

/// The source cell: `api`, `lease AGEs/TTLs` (`lease TTLs` when the age is not known) or
/// `dns NAME`. The script builds the same text (`status.js`, `sourceText`).
fn source(b: &BackendView) -> String {
    let mut s = b.source.to_owned();
    if let Some(ttl) = b.lease_ttl_seconds {
        match b.lease_age_seconds {
            Some(age) => s.push_str(&format!(" {age}s/{ttl}s")),
            None => s.push_str(&format!(" {ttl}s")),
        }
    }
    if let Some(d) = &b.dns_name {
        s.push(' ');
        s.push_str(d);
    }
    s
}

/// The follower's state cell: `in step`, `behind` (within the grace) or `lagging`.
pub fn follower_state(f: &Follower) -> &'static str {
    match (f.lagging, f.behind_ms.is_some()) {
        (true, _) => "lagging",
        (false, true) => "behind",
        (false, false) => "in step",
    }
}

fn follower(f: &Follower) -> Markup {
    html! {
        tr .bad[f.lagging] {
            td { (f.kind) } td { (f.protocol) } td { (f.stream) } td { (f.client_id) } td { (f.peer) }
            td { (f.acked_version) }
            td { @if let Some(ms) = f.behind_ms { (ms) " ms" } }
            td { (follower_state(f)) }
        }
    }
}

/// What a barrier waits for: `drain vV acked` (or `removal …`), `+ in-flight 0` when asked.
/// The script builds the same text (`status.js`, `barriers`).
pub fn barrier_waits_for(b: &BarrierView) -> String {
    let mut s = format!("{} v{} acked", b.kind, b.version);
    if b.in_flight_zero {
        s.push_str(" + in-flight 0");
    }
    s
}

/// Milliseconds as seconds with one decimal (`2.5 s`).
fn seconds(ms: u64) -> String {
    format!("{}.{} s", ms / 1000, ms % 1000 / 100)
}

fn barrier(b: &BarrierView) -> Markup {
    html! {
        tr .warn[b.pending_total > 0] {
            td { (b.server_id) }
            td { (barrier_waits_for(b)) }
            td { (b.confirmed) " / " (b.pending_total) " / " (b.stalled) }
            td { (b.in_flight) }
            td { (seconds(b.deadline_in_ms)) }
        }
    }
}

/// `GET /services/{name}`.
pub fn service(v: &ServiceView) -> Markup {
    let s = &v.summary;
    let body = html! {
        p .note { "Rates: requests this replica's SDKs reported (with several replicas, each shows its own share). Clients: those connected to this replica; lagging = behind the service's version for more than "
            (super::followers::LAG_GRACE.as_secs()) " s." }
        table #summary {
            thead { tr {
                th { "version" } th { "policy" } th { "backends" } th { "eligible" }
                th { "unhealthy" } th { "draining" } th { "req/s" } th { "errors" }
                th { "in flight" } th { "panic" }
            } }
            tbody { tr {
                td { (s.version) }
                td { (v.policy.algorithm) @if v.policy.health_check { " · checks" } @if v.policy.outlier_detection { " · outliers" } }
                (summary_cells(s))
            } }
        }
        table #backends {
            thead { tr {
                th { "backend" } th { "address" } th title="region/zone/sub_zone, priority" { "zone" }
                th { "weight" } th { "state" } th { "reason" }
                th { "probe" } th { "in flight" } th title="requests/s / errors/s" { "req/s" }
                th { "trend (1 min)" } th title="SDK circuit breakers open/half-open" { "circuits" }
                th title="lease: age (at page load or last change) / TTL" { "source" }
                th { "metadata" }
            } }
            tbody {
                @for b in &v.servers { (row(b)) }
            }
        }
        h2 { "Clients following it on this replica" }
        table #followers {
            thead { tr {
                th { "kind" } th { "protocol" } th { "stream" } th { "client" } th { "peer" }
                th { "acked version" } th { "behind" } th { "" }
            } }
            tbody { @for f in &v.followers { (follower(f)) } }
        }
        h2 { "Drain barriers in progress on this replica" }
        table #barriers {
            thead { tr {
                th { "backend" } th { "waiting for" }
                th title="clients confirmed / pending / stalled (no longer counted)" { "confirmed / pending / stalled" }
                th { "in flight" } th { "deadline in" }
            } }
            tbody { @for b in &v.barriers { (barrier(b)) } }
        }
    };
    layout(&s.name, "service", Some((&s.name, s.version)), body)
}
