//! Who may write: bearer tokens on the gRPC port.
//!
//! With admin tokens configured (`dlbd --admin-token-file`), every Registry call that changes
//! routing (`AddServer`, `RemoveServer`, `DrainServer`, `UpdateServer`, `HealthCheckPassed`,
//! `HealthCheckFailed`, `SetPolicy`, `RemoveService`) needs `authorization: Bearer <admin token>`. Reads (the
//! other Registry calls), Discovery sessions and xDS (ADS) streams are open unless read tokens are configured
//! (`--read-token-file`); an admin token is also a read token. The standard health and reflection
//! services stay open (load balancers and tools probe them).
//!
//! The scheme is case-insensitive (`bearer`, `BEARER`: RFC 7235 §2.1); the token is not.
//! A request without a token gets `UNAUTHENTICATED`; one with a token that is not allowed for the
//! call gets `PERMISSION_DENIED`. Tokens are compared in constant time (`subtle`) against every
//! configured token, and never logged. The check is a tower layer in front of every service
//! ([`AuthLayer`]), decided by the request path alone, so no handler can forget it.

use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use subtle::ConstantTimeEq;

/// Registry methods that change routing state.
pub const WRITE_METHODS: [&str; 12] = [
    "/dlb.v1.Registry/AddServer",
    "/dlb.v1.Registry/RemoveServer",
    "/dlb.v1.Registry/DrainServer",
    "/dlb.v1.Registry/UpdateServer",
    "/dlb.v1.Registry/HealthCheckPassed",
    "/dlb.v1.Registry/HealthCheckFailed",
    "/dlb.v1.Registry/SetPolicy",
    "/dlb.v1.Registry/RemoveService",
    "/dlb.v1.Membership/Register",
    "/dlb.v1.Membership/Deregister",
    "/dlb.v1.Membership/DeclareDns",
    "/dlb.v1.Membership/RemoveDns",
];

/// The tokens a server accepts.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// Tokens allowed to write (and read). Empty: writes are open.
    pub admin_tokens: Vec<String>,
    /// Tokens allowed to read (Registry reads, Discovery sessions). Empty: reads are open.
    pub read_tokens: Vec<String>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a token.
        f.debug_struct("AuthConfig")
            .field("admin_tokens", &self.admin_tokens.len())
            .field("read_tokens", &self.read_tokens.len())
            .finish()
    }
}

/// Reads tokens from a file: one per line; blank lines and `#` comments are ignored. A token is
/// 16..=4096 visible ASCII characters. Errors name the file and line, never the token.
pub fn read_token_file(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if !(16..=4096).contains(&t.len()) || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{}: line {}: a token is 16 to 4096 visible ASCII characters",
                path.display(),
                i + 1
            ));
        }
        tokens.push(t.to_owned());
    }
    if tokens.is_empty() {
        return Err(format!("{}: no token in the file", path.display()));
    }
    Ok(tokens)
}

/// What a request path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    Read,
    Write,
}

fn need(path: &str) -> Need {
    if WRITE_METHODS.contains(&path) {
        Need::Write
    } else if path.starts_with("/dlb.v1.") || path.starts_with("/envoy.service.discovery.v3.") {
        Need::Read
    } else {
        Need::Nothing
    }
}

/// The token of an `authorization: Bearer <token>` header value. The scheme is
/// case-insensitive (RFC 7235 §2.1: `bearer`, `BEARER` are the same scheme) and one or more
/// spaces separate it from the token; anything else is no bearer token.
pub(crate) fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let scheme = value.get(..6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let rest = value.get(6..)?;
    let token = rest.trim_ascii_start();
    (token.len() < rest.len() && !token.is_empty()).then_some(token)
}

/// Whether `presented` equals one of `tokens`, in time independent of where they differ.
fn matches(presented: &[u8], tokens: &[String]) -> bool {
    let mut found = subtle::Choice::from(0);
    for t in tokens {
        found |= presented.ct_eq(t.as_bytes());
    }
    found.into()
}

impl AuthConfig {
    /// Whether any check is configured.
    pub fn is_enabled(&self) -> bool {
        !self.admin_tokens.is_empty() || !self.read_tokens.is_empty()
    }

    /// Whether reads need no token (no read token is configured; the status page follows the
    /// same rule as gRPC reads).
    pub fn reads_open(&self) -> bool {
        self.read_tokens.is_empty()
    }

    /// Whether `token` may read: a read token or an admin token (constant time).
    pub fn allows_read(&self, token: &[u8]) -> bool {
        matches(token, &self.admin_tokens) | matches(token, &self.read_tokens)
    }

    /// Decides a request by its path and `authorization` header.
    fn check(&self, path: &str, authorization: Option<&[u8]>) -> Result<(), tonic::Status> {
        let need = need(path);
        let open = match need {
            Need::Nothing => true,
            Need::Read => self.read_tokens.is_empty(),
            Need::Write => self.admin_tokens.is_empty(),
        };
        if open {
            return Ok(());
        }
        let Some(token) = authorization.and_then(bearer_token) else {
            return Err(tonic::Status::unauthenticated(
                "this call needs a bearer token (authorization: Bearer <token>; dlbctl --token)",
            ));
        };
        let allowed = match need {
            Need::Write => matches(token, &self.admin_tokens),
            _ => matches(token, &self.admin_tokens) || matches(token, &self.read_tokens),
        };
        if allowed {
            Ok(())
        } else if need == Need::Write {
            Err(tonic::Status::permission_denied(
                "the token is not an admin token: this call changes routing",
            ))
        } else {
            Err(tonic::Status::permission_denied(
                "the token is not accepted",
            ))
        }
    }
}

/// The tower layer that checks every request. See the module docs.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<AuthConfig>,
}

impl AuthLayer {
    /// A layer enforcing `auth`.
    pub fn new(auth: AuthConfig) -> Self {
        Self {
            auth: Arc::new(auth),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the gRPC router.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<AuthConfig>,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match self.auth.check(req.uri().path(), header) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => {
                tracing::debug!(path = req.uri().path(), code = ?status.code(), "request refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(read: bool) -> AuthConfig {
        AuthConfig {
            admin_tokens: vec!["admin-token-0123456789".into()],
            read_tokens: if read {
                vec!["read-token-0123456789".into()]
            } else {
                Vec::new()
            },
        }
    }

    #[test]
    fn decisions() {
        use tonic::Code;
        let add = "/dlb.v1.Registry/AddServer";
        let list = "/dlb.v1.Registry/ListServers";
        let session = "/dlb.v1.Discovery/Session";
        let health = "/grpc.health.v1.Health/Check";
        let admin = Some(&b"Bearer admin-token-0123456789"[..]);
        let read = Some(&b"Bearer read-token-0123456789"[..]);
        let wrong = Some(&b"Bearer admin-token-0123456780"[..]);
        let code =
            |c: &AuthConfig, p: &str, h: Option<&[u8]>| c.check(p, h).err().map(|s| s.code());

        let open_reads = cfg(false);
        assert_eq!(code(&open_reads, add, None), Some(Code::Unauthenticated));
        assert_eq!(code(&open_reads, add, wrong), Some(Code::PermissionDenied));
        assert_eq!(
            code(&open_reads, add, Some(b"admin-token-0123456789")),
            Some(Code::Unauthenticated)
        );
        assert_eq!(code(&open_reads, add, admin), None);
        // The scheme is case-insensitive (RFC 7235); the token is not.
        for h in [
            &b"bearer admin-token-0123456789"[..],
            b"BEARER admin-token-0123456789",
            b"bEaReR  admin-token-0123456789",
        ] {
            assert_eq!(code(&open_reads, add, Some(h)), None, "{h:?}");
        }
        assert_eq!(
            code(&open_reads, add, Some(b"bearer ADMIN-TOKEN-0123456789")),
            Some(Code::PermissionDenied)
        );
        for h in [
            &b"Bearer"[..],
            b"Bearer ",
            b"Bearerx admin-token-0123456789",
            b"Basic abc",
        ] {
            assert_eq!(
                code(&open_reads, add, Some(h)),
                Some(Code::Unauthenticated),
                "{h:?}"
            );
        }
        assert_eq!(code(&open_reads, list, None), None);
        assert_eq!(code(&open_reads, session, None), None);

        let closed = cfg(true);
        assert_eq!(code(&closed, list, None), Some(Code::Unauthenticated));
        assert_eq!(code(&closed, session, wrong), Some(Code::PermissionDenied));
        assert_eq!(code(&closed, session, read), None);
        assert_eq!(code(&closed, list, admin), None, "an admin token reads too");
        assert_eq!(
            code(&closed, add, read),
            Some(Code::PermissionDenied),
            "a read token cannot write"
        );
        assert_eq!(code(&closed, health, None), None);
        assert!(
            !format!("{closed:?}").contains("token-0123"),
            "Debug prints a token"
        );
        assert!(!AuthConfig::default().is_enabled());
    }

    #[test]
    fn token_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("tokens");
        std::fs::write(
            &p,
            "# admins\n\nfirst-token-0123456789\n  second-token-0123456789  \n",
        )
        .expect("write");
        assert_eq!(
            read_token_file(&p).expect("valid"),
            vec!["first-token-0123456789", "second-token-0123456789"]
        );
        std::fs::write(&p, "short\n").expect("write");
        let e = read_token_file(&p).unwrap_err();
        assert!(e.contains("line 1") && !e.contains("short"), "{e}");
        std::fs::write(&p, "# nothing\n").expect("write");
        assert!(read_token_file(&p).unwrap_err().contains("no token"));
    }
}
