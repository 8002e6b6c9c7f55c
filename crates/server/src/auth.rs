//! The bearer-key check: every route but `GET /health` needs `Authorization: Bearer KEY`
//! when keys are configured. The comparison takes the same time whatever the presented key
//! holds, so timing reveals neither a key's bytes nor how many of them matched. Each key
//! names a client ([`Client`]): a client sees and reaches only the actors and sessions it
//! made.

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

/// Who is calling: the client a key names, or `None` when the API is open (no keys).
#[derive(Clone, Debug, Default)]
pub struct Client(pub Option<Arc<str>>);

impl Client {
    /// Whether this client may reach something `owner` made (an open API reaches all).
    pub fn owns(&self, owner: Option<&str>) -> bool {
        match &self.0 {
            None => true,
            Some(me) => owner == Some(&**me),
        }
    }

    pub fn name(&self) -> Option<String> {
        self.0.as_deref().map(String::from)
    }
}

/// Middleware: passes the request on, with its [`Client`], when it may go through, else
/// answers 401.
pub async fn require_key(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let keys = &state.config.api_keys;
    if keys.is_empty() {
        req.extensions_mut().insert(Client(None));
        return next.run(req).await;
    }
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    // Every key is compared, whichever matches, so the time says nothing of which did.
    let mut client = None;
    for key in keys {
        if authorized(header, &key.key) {
            client = Some(key.client.clone());
        }
    }
    match client {
        Some(name) => {
            req.extensions_mut().insert(Client(Some(name.into())));
            next.run(req).await
        }
        None => ApiError::unauthorized().into_response(),
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
