//! Where a request for one actor runs: here, or on the node that owns it.
//!
//! [`route`] wraps every `/v1/actors/{id}...` route, and the OpenAI-compatible routes of a
//! request naming a session (its actor is looked up in the cluster's sessions bucket). An actor this node owns (or an
//! ephemeral one of its own) runs here at once. Otherwise the directory decides: an actor
//! owned by another live node is forwarded there ([`super::forward`]); one without a live
//! owner is activated here (its restore claims it), unless this node is draining, which
//! hands it to the least loaded other node. A request that finds its actor moved while it
//! ran here (another node claimed it first) is placed again, a few times.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::forward::{self, ForwardError, HOP_HEADER};
use crate::ApiError;
use crate::error::MOVED_HEADER;
use crate::routes::AppState;
use crate::store::StoreError;

/// The most a request spends being placed again after finding its actor moved.
const PLACE_FOR: Duration = Duration::from_secs(10);
/// The most times a request is forwarded (a draining owner hands it on once more).
const MAX_HOPS: u32 = 3;

/// Where one request runs.
enum Place {
    Here,
    On(String),
    Missing,
}

/// The actor id of an actor route's path (`/v1/actors/{id}` and below).
fn actor_id(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/actors/")?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

pub(crate) fn cluster_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Moved { .. } | StoreError::Fenced(_) => ApiError::moved(e.to_string()),
        e => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster_unavailable",
            format!("the cluster's directory is unreachable: {e}"),
        ),
    }
}

/// The middleware: runs the request here or forwards it to the actor's owner.
pub async fn route(State(s): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(cluster) = s.cluster.clone() else {
        return next.run(request).await;
    };
    let (id, session) = match actor_id(request.uri().path()) {
        Some(id) => (id.to_string(), false),
        None => match session_actor(&s, &cluster, request_session(&request)).await {
            Ok(Some(id)) => (id, true),
            Ok(None) => return next.run(request).await,
            Err(e) => return e.into_response(),
        },
    };
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, s.config.message_bytes).await {
        Ok(body) => body,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "the body is larger than this server's limit of {} bytes",
                    s.config.message_bytes
                ),
            )
            .into_response();
        }
    };
    let hops = parts
        .headers
        .get(HOP_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    let started = Instant::now();
    let mut last_moved = None;
    while started.elapsed() < PLACE_FOR {
        let place = match place(&s, &cluster, &id, hops).await {
            Ok(place) => place,
            Err(e) => return e.into_response(),
        };
        match place {
            // A session whose actor is gone gets a new one here.
            Place::Missing if session => {
                let request = Request::from_parts(parts, Body::from(body));
                return next.run(request).await;
            }
            Place::Missing => {
                return ApiError::not_found(format!("no actor `{id}`")).into_response();
            }
            Place::Here => {
                let request = Request::from_parts(parts.clone(), Body::from(body.clone()));
                let response = next.clone().run(request).await;
                if !response.headers().contains_key(MOVED_HEADER) {
                    return response;
                }
                // Another node took it while it was being restored or saved here; one being
                // handed over stays until its release ends.
                if !s.actors.get(&id).is_ok_and(|h| h.leaving()) {
                    s.actors.evict(&id);
                }
                last_moved = Some(response);
            }
            Place::On(node) if hops >= MAX_HOPS => {
                return ApiError::moved(format!(
                    "actor `{id}` is moving (now on node `{node}`); send the request again"
                ))
                .into_response();
            }
            Place::On(node) => {
                let replies = cluster.replies();
                let forwarded = forward::forward(
                    cluster.client(),
                    replies,
                    &node,
                    &parts,
                    body.clone(),
                    hops + 1,
                );
                match forwarded.await {
                    Ok(response) => return response,
                    Err(ForwardError::NoResponders) => {
                        tracing::warn!(%node, "node gone (no responders)");
                        cluster.mark_gone(&node).await;
                        continue;
                    }
                    Err(e) => return forward_error(&id, &node, e).into_response(),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last_moved.unwrap_or_else(|| {
        ApiError::moved(format!("actor `{id}` is moving; send the request again")).into_response()
    })
}

/// The scoped session name of an OpenAI-compatible request, if it names a session.
fn request_session(request: &Request) -> Option<String> {
    let path = request.uri().path();
    if path != "/v1/chat/completions" && path != "/v1/completions" {
        return None;
    }
    let client = request
        .extensions()
        .get::<crate::auth::Client>()
        .and_then(|c| c.0.as_deref());
    crate::openai::request_session(request.headers(), client)
}

/// The actor of session `scoped` when it has one in the cluster and this node does not
/// run it already.
async fn session_actor(
    s: &AppState,
    cluster: &super::Cluster,
    scoped: Option<String>,
) -> Result<Option<String>, ApiError> {
    let Some(scoped) = scoped else {
        return Ok(None);
    };
    if let Some(id) = s.openai.local_session(&scoped)
        && cluster.holds(&id)
    {
        return Ok(None);
    }
    cluster.session_actor(&scoped).await.map_err(cluster_error)
}

fn forward_error(id: &str, node: &str, e: ForwardError) -> ApiError {
    match e {
        ForwardError::Lost(why) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "node_lost",
            format!(
                "actor `{id}`'s node `{node}` was lost while it ran this request ({why}): the \
                 request did not complete, or its result was not made durable; send it again"
            ),
        ),
        ForwardError::TooLarge { bytes, max } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "a {bytes}-byte body cannot be forwarded to node `{node}` (NATS carries at most \
                 {max}); send it to that node directly"
            ),
        ),
        ForwardError::Nats(why) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster_unavailable",
            format!("cannot forward to node `{node}`: {why}"),
        ),
        ForwardError::NoResponders => ApiError::moved(format!("node `{node}` is gone")),
    }
}

/// Decides where the request for actor `id` runs, making a local handle for it when here.
async fn place(
    s: &AppState,
    cluster: &Arc<super::Cluster>,
    id: &str,
    hops: u32,
) -> Result<Place, ApiError> {
    let local = s.actors.get(id).ok();
    if let Some(handle) = &local
        && (!handle.durable || cluster.holds(id))
    {
        return Ok(Place::Here);
    }
    // A request forwarded here always reads the directory: a recent owner may be the node
    // that sent it on.
    if local.is_none()
        && hops == 0
        && let Some(owner) = cluster.recent_owner(id)
    {
        return Ok(Place::On(owner));
    }
    let Some(found) = cluster.entry(id).await.map_err(cluster_error)? else {
        s.actors.evict(id);
        return Ok(Place::Missing);
    };
    if let Some(owner) = &found.entry.node
        && owner != cluster.node()
        && cluster.alive(owner).await.map_err(cluster_error)?
    {
        s.actors.evict(id);
        cluster.saw_owner(id, Some(owner));
        return Ok(Place::On(owner.clone()));
    }
    cluster.saw_owner(id, None);
    if cluster.draining()
        && let Some(other) = cluster.least_loaded_other(&s.device_kind()).await
    {
        s.actors.evict(id);
        return Ok(Place::On(other));
    }
    if local.is_none() {
        s.adopt(id, &found.entry.record).await?;
    }
    Ok(Place::Here)
}
