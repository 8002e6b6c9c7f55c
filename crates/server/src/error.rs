//! [`ApiError`]: every error the API returns, as `{"error": {"message", "type"}}` with a
//! status code that says whose fault it was.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tern_actor::ActorError;

/// An error answer: its status, a short machine-readable type and a message for people.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// Seconds after which a retry may succeed (429 and 503), sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// The same error, naming the request field at fault.
    pub fn param(mut self, field: impl Into<String>) -> ApiError {
        self.param = Some(field.into());
        self
    }

    /// 429: the host is full for now; retry after `seconds`.
    pub fn busy(message: impl Into<String>, seconds: u64) -> ApiError {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "server_busy", message);
        e.retry_after = Some(seconds);
        e
    }

    /// 400: the request itself is wrong.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404: no such actor, module or route.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 401: a missing or wrong API key.
    pub fn unauthorized() -> ApiError {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "a valid `Authorization: Bearer KEY` header is required",
        )
    }

    /// 503: the actor is owned by another node, or was taken over by one, as this node
    /// came to run it; the cluster's router sends the request on to where it is now.
    pub fn moved(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, MOVED, message)
        }
    }

    /// 500: the host failed, not the request.
    pub fn internal(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The JSON body, shaped as OpenAI's clients expect: `{"error": {"message", "type",
    /// "param", "code"}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.kind,
        }})
    }
}

/// Marks an [`ApiError::moved`] answer, for the cluster's router.
pub const MOVED_HEADER: &str = "x-tern-moved";

/// The error type of a store that is out of reach for now (503).
pub const STORE_UNAVAILABLE: &str = "store_unavailable";

/// The error type of [`ApiError::moved`].
pub const MOVED: &str = "actor_moved";

impl From<ActorError> for ApiError {
    fn from(e: ActorError) -> ApiError {
        let message = e.to_string();
        match e {
            ActorError::Module(_) | ActorError::Instantiate(_) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_module", message)
            }
            ActorError::Trap { .. }
            | ActorError::TimeLimit { .. }
            | ActorError::Stopped { .. }
            | ActorError::Abi { .. }
            | ActorError::HostFault { .. }
            | ActorError::Poisoned(_)
            | ActorError::Snapshot(_) => Self::new(StatusCode::CONFLICT, "actor_failed", message),
            // Engine, configuration and snapshot-format errors, and any kind added later.
            _ => Self::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, message = %self.message, "request refused");
        }
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.kind == MOVED {
            response
                .headers_mut()
                .insert(MOVED_HEADER, HeaderValue::from_static("1"));
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
