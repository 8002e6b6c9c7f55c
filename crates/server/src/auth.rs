//! The bearer-key check: every route but `GET /health` needs `Authorization: Bearer KEY`
//! when a key is configured. The comparison takes the same time whatever the presented key
//! holds, so timing reveals neither the key's bytes nor how many of them matched.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::ApiError;
use crate::routes::AppState;

/// Whether `presented` equals `key`, in time that depends only on `key`'s length.
pub fn constant_time_eq(presented: &[u8], key: &[u8]) -> bool {
    let mut diff = u8::from(presented.len() != key.len());
    for (i, k) in key.iter().enumerate() {
        diff |= presented.get(i).copied().unwrap_or(0) ^ k;
    }
    std::hint::black_box(diff) == 0
}

/// Whether an `Authorization` header value carries `key` as a bearer token.
pub fn authorized(header: Option<&[u8]>, key: &str) -> bool {
    let Some(value) = header else {
        return false;
    };
    let token = match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => &value[7..],
        _ => return false,
    };
    constant_time_eq(token, key.as_bytes())
}

/// Middleware: passes the request on when it may go through, else answers 401.
pub async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = state.config.api_key.as_deref() else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if authorized(header, key) {
        next.run(req).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_whole_keys_only() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"secret!", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }

    #[test]
    fn needs_the_bearer_scheme() {
        assert!(authorized(Some(b"Bearer k1"), "k1"));
        assert!(authorized(Some(b"bearer k1"), "k1"));
        assert!(!authorized(Some(b"Basic k1"), "k1"));
        assert!(!authorized(Some(b"k1"), "k1"));
        assert!(!authorized(Some(b"Bearer k2"), "k1"));
        assert!(!authorized(None, "k1"));
    }
}
