//! The status page: what the control plane is doing, read-only, on the metrics listener
//! (`--metrics-listen`, loopback by default) next to `/metrics`.
//!
//! * `model` — the data ([`model::Overview`], [`model::ServiceView`]) built from the snapshot
//!   cache, the checker, the load reports, circuits, leases, replicas and readiness;
//! * `barriers` — the drain barriers waiting on this replica;
//! * `followers` — the SDK sessions and xDS clients following a service, and which lag;
//! * `access` — the read-token rule (bearer header or the login form's cookie);
//! * `page` — the HTML (maud templates) and the compiled-in assets (`assets/`);
//! * `live` — the server-sent events an open page follows (`GET /api/events`);
//! * this file — the routes: `GET /` and `GET /services/{name}` (the pages),
//!   `GET /api/overview`, `GET /api/services/{name}` (JSON, the same fields the page shows;
//!   documented in `docs/status.md`), `GET /api/events`, `GET`/`POST /login`, the assets.
//!
//! Every handler only reads; none holds a lock across `.await` (the checker's view is asked
//! over its command channel, everything else is copied out under short locks).

pub mod access;
pub mod barriers;
pub mod followers;
pub mod live;
pub mod model;
pub mod page;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::api::auth::AuthConfig;
use crate::api::xds::XdsClients;
use crate::api::Shared;
use crate::replicas::Coordination;

/// What the page reads: the front-ends' shared handles (cache, checker, loads, reports,
/// circuits, sessions and their acks, readiness), the xDS clients, the replica set, the lease
/// keeper (lease ages), the tokens and the store's kind.
pub struct Status {
    pub(crate) shared: Arc<Shared>,
    pub(crate) xds_clients: Arc<XdsClients>,
    pub(crate) coordination: Arc<dyn Coordination>,
    pub(crate) leases: Arc<dyn crate::membership::leases::Leases>,
    pub(crate) auth: AuthConfig,
    pub(crate) store_kind: &'static str,
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Status")
            .field("store_kind", &self.store_kind)
            .finish_non_exhaustive()
    }
}

/// The page's routes, to merge with the metrics router.
pub fn router(status: Arc<Status>) -> axum::Router {
    axum::Router::new()
        .route("/", get(overview_page))
        .route("/services/{name}", get(service_page))
        .route(
            "/assets/status.css",
            get(|| async { asset("text/css", page::CSS) }),
        )
        .route(
            "/assets/status.js",
            get(|| async { asset("text/javascript", page::JS) }),
        )
        .route("/api/events", get(events))
        .route("/api/overview", get(api_overview))
        .route("/api/services/{name}", get(api_service))
        .route(
            "/login",
            get(access::login_form)
                .post(login)
                .layer(DefaultBodyLimit::max(access::MAX_LOGIN_BODY)),
        )
        .with_state(status)
}

/// A JSON answer that is never cached.
fn json(status: StatusCode, value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn html(status: StatusCode, markup: maud::Markup) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        markup.into_string(),
    )
        .into_response()
}

async fn overview_page(State(status): State<Arc<Status>>, headers: HeaderMap) -> Response {
    if !access::allowed(&status.auth, &headers) {
        return access::page_denied();
    }
    html(StatusCode::OK, page::overview(&model::overview(&status)))
}

async fn service_page(
    State(status): State<Arc<Status>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !access::allowed(&status.auth, &headers) {
        return access::page_denied();
    }
    match model::service(&status, &name).await {
        Some(view) => html(StatusCode::OK, page::service(&view)),
        None => html(
            StatusCode::NOT_FOUND,
            maud::html! { p { "service " code { (name) } " does not exist. " a href="/" { "overview" } } },
        ),
    }
}

/// `GET /api/events[?service=NAME&version=V]`: the live updates of one open page.
async fn events(
    State(status): State<Arc<Status>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if !access::allowed(&status.auth, &headers) {
        return access::api_denied();
    }
    let (mut service, mut version) = (None, None);
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "service" => service = Some(v.into_owned()),
            "version" => version = v.parse().ok(),
            _ => {}
        }
    }
    if let Some(name) = &service {
        if status.shared.cache.get(name).is_none() {
            return not_found(name);
        }
    }
    live::stream(status, service, version).into_response()
}

/// `404` with `{"error": "service: \"NAME\" does not exist"}` (the name escaped, truncated).
fn not_found(name: &str) -> Response {
    json(
        StatusCode::NOT_FOUND,
        &ApiError {
            error: format!(
                "service: {:?} does not exist",
                crate::api::xds::clients::escaped(name, 256)
            ),
        },
    )
}

#[derive(serde::Serialize)]
struct ApiError {
    error: String,
}

async fn api_overview(State(status): State<Arc<Status>>, headers: HeaderMap) -> Response {
    if !access::allowed(&status.auth, &headers) {
        return access::api_denied();
    }
    json(StatusCode::OK, &model::overview(&status))
}

async fn api_service(
    State(status): State<Arc<Status>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !access::allowed(&status.auth, &headers) {
        return access::api_denied();
    }
    match model::service(&status, &name).await {
        Some(view) => json(StatusCode::OK, &view),
        None => not_found(&name),
    }
}

async fn login(State(status): State<Arc<Status>>, body: Bytes) -> Response {
    access::login(&status.auth, &body)
}
