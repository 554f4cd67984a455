//! Who may see the status page: the same read-token rule as gRPC reads ([`AuthConfig`]).
//!
//! With no read token configured the page and the API are open (bind rules keep the listener
//! on loopback by default). Otherwise a request needs a read or admin token, either as
//! `Authorization: Bearer <token>` (scripts) or in the `dlb_status` cookie that the login form
//! (`GET`/`POST /login`) sets: `HttpOnly`, `SameSite=Strict`, percent-encoded. Without one,
//! `/api/…` answers `401` with a JSON error and a page answers with a redirect to the login
//! form. Tokens are compared in constant time and never echoed or logged.

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::api::auth::{bearer_token, AuthConfig};

/// The cookie the login form sets.
pub const COOKIE: &str = "dlb_status";

/// Largest login form body accepted, bytes (a token is at most 4096 characters, encoded ×3).
pub const MAX_LOGIN_BODY: usize = 16 * 1024;

/// The token a request presents: the bearer token, else the cookie's (decoded).
fn presented(headers: &HeaderMap) -> Option<Vec<u8>> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()))
    {
        return Some(t.to_vec());
    }
    for value in headers.get_all(header::COOKIE) {
        for pair in value.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            if let Some(v) = pair
                .strip_prefix(COOKIE.as_bytes())
                .and_then(|r| r.strip_prefix(b"="))
            {
                let decoded: Vec<u8> = percent_decode(v);
                return Some(decoded);
            }
        }
    }
    None
}

/// The cookie value as `form_urlencoded::byte_serialize` wrote it, decoded: `+` is a space,
/// `%XX` a byte (a malformed one is kept as is).
fn percent_decode(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if v[i] == b'%' && i + 2 < v.len() {
            if let (Some(h), Some(l)) = (hex(v[i + 1]), hex(v[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if v[i] == b'+' { b' ' } else { v[i] });
        i += 1;
    }
    out
}

/// Whether the request may read.
pub fn allowed(auth: &AuthConfig, headers: &HeaderMap) -> bool {
    auth.reads_open() || presented(headers).is_some_and(|t| auth.allows_read(&t))
}

/// The answer to an API request without an accepted token.
pub fn api_denied() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::WWW_AUTHENTICATE, "Bearer"),
        ],
        r#"{"error":"this page needs a read token (Authorization: Bearer <token>, or log in at /login)"}"#,
    )
        .into_response()
}

/// The answer to a page request without an accepted token: to the login form.
pub fn page_denied() -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response()
}

const LOGIN_FORM: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dlbd — log in</title>
<meta name="viewport" content="width=device-width">
<style>body{font:15px system-ui,sans-serif;margin:4em auto;max-width:24em}
input{font:inherit;width:100%;margin:.4em 0;padding:.3em}</style></head>
<body><h1>dlbd status</h1>
<form method="post" action="/login">
<label for="token">Read token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<button type="submit">Log in</button></form>
MESSAGE</body></html>
"#;

fn form(status: StatusCode, message: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        // `message` is one of the constants below: no user input reaches the page.
        LOGIN_FORM.replace("MESSAGE", message),
    )
        .into_response()
}

/// `GET /login`: the form.
pub async fn login_form() -> Response {
    form(StatusCode::OK, "")
}

/// `POST /login` (`application/x-www-form-urlencoded`, field `token`): sets the cookie and
/// goes to the overview when the token may read; the form again with `401` otherwise.
pub fn login(auth: &AuthConfig, body: &Bytes) -> Response {
    let token = form_urlencoded::parse(body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    match token {
        Some(t) if auth.allows_read(t.as_bytes()) => {
            let encoded: String = form_urlencoded::byte_serialize(t.as_bytes()).collect();
            let cookie = format!("{COOKIE}={encoded}; Path=/; HttpOnly; SameSite=Strict");
            let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
            match HeaderValue::from_str(&cookie) {
                Ok(v) => {
                    r.headers_mut().insert(header::SET_COOKIE, v);
                    r
                }
                Err(_) => form(StatusCode::BAD_REQUEST, "<p>token: cannot be stored</p>"),
            }
        }
        Some(_) => form(StatusCode::UNAUTHORIZED, "<p>token: not accepted</p>"),
        None => form(StatusCode::BAD_REQUEST, "<p>token: missing</p>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AuthConfig {
        AuthConfig {
            admin_tokens: vec!["admin-token-0123456789".into()],
            read_tokens: vec!["read;token=0123456789 x".into()],
        }
    }

    fn headers(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            name,
            HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("")),
        );
        h
    }

    #[test]
    fn bearer_cookie_and_nothing() {
        let auth = cfg();
        assert!(!allowed(&auth, &HeaderMap::new()));
        assert!(allowed(&AuthConfig::default(), &HeaderMap::new()));
        assert!(allowed(
            &auth,
            &headers(header::AUTHORIZATION, "Bearer admin-token-0123456789")
        ));
        assert!(!allowed(
            &auth,
            &headers(header::AUTHORIZATION, "Bearer nope-nope-nope-nope")
        ));
        let encoded: String = form_urlencoded::byte_serialize(b"read;token=0123456789 x").collect();
        assert!(allowed(
            &auth,
            &headers(header::COOKIE, &format!("a=b; {COOKIE}={encoded}"))
        ));
        assert!(!allowed(
            &auth,
            &headers(header::COOKIE, &format!("{COOKIE}=%zz"))
        ));
    }

    #[test]
    fn login_sets_a_cookie_only_for_an_accepted_token() {
        let auth = cfg();
        let body = Bytes::from("token=read%3Btoken%3D0123456789+x");
        let r = login(&auth, &body);
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let cookie = r.headers()[header::SET_COOKIE].to_str().unwrap_or_default();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        // The cookie it sets lets the next request in.
        let value = cookie.split(';').next().unwrap_or_default();
        assert!(allowed(&auth, &headers(header::COOKIE, value)));
        let r = login(&auth, &Bytes::from("token=wrong-wrong-wrong-wrong"));
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().get(header::SET_COOKIE).is_none());
        assert_eq!(
            login(&auth, &Bytes::new()).status(),
            StatusCode::BAD_REQUEST
        );
    }
}
