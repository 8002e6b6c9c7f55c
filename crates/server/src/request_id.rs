//! Request ids: every request gets one (the client's `X-Request-Id` when it is short and
//! plain, else a fresh random one), every log line written while it is handled carries it,
//! one line records its outcome, and the response returns it as `X-Request-Id`. Headers
//! are never logged, so neither is the API key.

use std::time::Instant;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::actors::random_hex;

const HEADER: &str = "x-request-id";

/// Middleware: see the module's documentation.
pub async fn request_id(req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        })
        .map(str::to_string);
    let id = match given {
        Some(id) => id,
        None => random_hex(8).unwrap_or_else(|_| "-".into()),
    };
    let span = tracing::info_span!(
        "request",
        id = %id,
        method = %req.method(),
        path = %req.uri().path()
    );
    let started = Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "answered"
        );
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}
