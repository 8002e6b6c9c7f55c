//! The HTTP routes: health, modules, actors, messages (JSON or server-sent events) and
//! snapshots. Each handler checks its input, hands guest work to the actor's thread
//! ([`crate::actors`]) and maps every failure to an [`ApiError`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{Value, json};
use tern_actor::{ActorModule, Runtime};
use tokio::sync::{mpsc, oneshot};

use crate::actors::{ActorHandle, Birth, Directory, Job, State as ActorState};
use crate::auth::Client;
use crate::cluster::Cluster;
use crate::cluster::store::ClusterStore;
use crate::durable::Persistence;
use crate::metrics::Metrics;
use crate::modules::Modules;
use crate::openai::{self, OpenAi};
use crate::sse::ReplyEvents;
use crate::{ApiError, Config, ServerError};

/// What every handler shares.
pub struct AppState {
    pub runtime: Arc<Runtime>,
    pub config: Config,
    pub(crate) modules: Modules,
    pub(crate) actors: Directory,
    persist: Option<Arc<Persistence>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) openai: OpenAi,
    /// The cluster this server is a node of.
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// The address it serves HTTP on, once bound.
    pub(crate) addr: std::sync::OnceLock<std::net::SocketAddr>,
    started_ms: u64,
}

impl AppState {
    /// The shared state; with a store, the stored uploads are compiled and the stored
    /// actors listed, passivated (each is restored by its first job).
    pub fn new(runtime: Arc<Runtime>, mut config: Config) -> Result<AppState, ServerError> {
        let metrics = Arc::new(Metrics::default());
        if let Some(cluster) = &config.cluster {
            config.store = Some(Arc::new(ClusterStore(cluster.clone())));
        }
        let persist = config.store.clone().map(|store| {
            // A cluster's store is shared: another node may move an actor on, so nothing of
            // it is kept here.
            let hot = if store.shared() {
                0
            } else {
                config.hot_snapshot_bytes
            };
            Arc::new(Persistence {
                store,
                durability: config.durability,
                idle: config.idle,
                metrics: metrics.clone(),
                hot: std::sync::Mutex::new(crate::hot::HotSnapshots::new(hot)),
            })
        });
        let max_queued = config.max_queued;
        let config_cluster = config.cluster.clone();
        let state = AppState {
            runtime,
            modules: Modules::new(config.bundled.clone()),
            openai: OpenAi::new(config.prefix_reuse, config.prefix_cache),
            config,
            actors: Directory::new(persist.clone(), max_queued),
            persist,
            metrics,
            cluster: config_cluster,
            addr: std::sync::OnceLock::new(),
            started_ms: crate::actors::now_ms(),
        };
        if let Some(persist) = &state.persist {
            state.recover(persist)?;
        }
        Ok(state)
    }

    /// Every actor, oldest first.
    pub(crate) fn actor_list(&self) -> Vec<Arc<ActorHandle>> {
        self.actors.list()
    }

    /// Brings back the stored uploads and actors; one that fails is logged and skipped.
    fn recover(&self, persist: &Persistence) -> Result<(), ServerError> {
        for (digest, wasm) in persist.modules()? {
            if let Err(e) = self.modules.add_stored(&self.runtime, &wasm) {
                tracing::error!(%digest, error = %e.message, "skipping a stored module");
            }
        }
        if self.cluster.is_some() {
            // Actors are found in the cluster's directory as requests name them.
            return Ok(());
        }
        let actors = persist.actors()?;
        for (id, record) in &actors {
            match self.modules.load(&self.runtime, &record.module) {
                Ok(module) => {
                    self.actors
                        .recover(self.runtime.clone(), module, record, id.clone());
                    if let Some(session) = &record.session {
                        let owner = record.owner.as_deref();
                        self.openai.recover_session(owner, session, id.clone());
                    }
                }
                Err(e) => tracing::error!(%id, error = %e.message, "skipping a stored actor"),
            }
        }
        tracing::info!(actors = actors.len(), "recovered stored actors");
        Ok(())
    }

    /// Asks every resident durable actor to save (if it must) and passivate; returns how
    /// many were asked.
    pub(crate) fn passivate_all(&self) -> usize {
        self.actors
            .list()
            .iter()
            .filter(|a| a.durable && a.is_resident())
            .filter(|a| a.post(Job::Passivate).is_ok())
            .count()
    }

    /// Asks every resident durable actor with nothing queued to save and passivate (a busy
    /// one is asked again later, so that asks never fill its queue).
    pub(crate) fn passivate_idle(&self) {
        for actor in self.actors.list() {
            if actor.durable && actor.is_resident() && actor.queued() == 0 {
                let _ = actor.post(Job::Passivate);
            }
        }
    }

    /// Resident durable actors that have not failed: what a shutdown still has to save.
    pub(crate) fn resident_durable(&self) -> usize {
        self.actors
            .list()
            .iter()
            .filter(|a| a.durable && a.is_resident())
            .filter(|a| !matches!(a.status().state, ActorState::Failed(_)))
            .count()
    }

    /// Actor `id`, if `client` may reach it: another client's actor is as unknown as a
    /// missing one (404).
    pub(crate) fn actor(&self, id: &str, client: &Client) -> Result<Arc<ActorHandle>> {
        self.actors
            .get(id)
            .ok()
            .filter(|a| client.owns(a.owner.as_deref()))
            .ok_or_else(|| ApiError::not_found(format!("no actor `{id}`")))
    }

    /// The module named `name` (a bundled guest or a digest); in a cluster, an upload made
    /// on another node is fetched from the cluster's store and compiled here.
    pub(crate) async fn module_named(&self, name: &str) -> Result<(String, Arc<ActorModule>)> {
        let missing = match self.modules.find(&self.runtime, name).await {
            Ok(found) => return Ok(found),
            Err(e) => e,
        };
        let (Some(persist), Some(_)) = (self.persist.clone(), &self.cluster) else {
            return Err(missing);
        };
        let digest = name.strip_prefix("sha256:").unwrap_or(name);
        if !digest.bytes().all(|b| b.is_ascii_hexdigit()) || digest.len() != 64 {
            return Err(missing);
        }
        let (runtime, key) = (self.runtime.clone(), digest.to_string());
        let stored = tokio::task::spawn_blocking(move || persist.load_module(&key))
            .await
            .map_err(|e| ApiError::internal(format!("fetching the module failed: {e}")))??;
        let Some(wasm) = stored else {
            return Err(missing);
        };
        self.modules.upload(&runtime, wasm).await?;
        self.modules.find(&self.runtime, name).await
    }

    /// The device kind actors run on here (`cpu`, `cuda`, ...).
    pub(crate) fn device_kind(&self) -> String {
        format!("{:?}", self.runtime.device().kind()).to_lowercase()
    }

    /// This node's heartbeat, put now.
    pub(crate) async fn beat(&self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let info = crate::cluster::NodeInfo {
            name: cluster.node().to_string(),
            http: self.addr.get().map(|a| a.to_string()).unwrap_or_default(),
            device: self.device_kind(),
            resident: self.actors.resident(),
            kv_bytes: self.runtime.kv_ledger().reserved(),
            device_bytes: self.runtime.device().device_memory_used().unwrap_or(0),
            draining: cluster.draining(),
            started_ms: self.started_ms,
        };
        if let Err(e) = cluster.beat(&info).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }

    /// A local handle for actor `id`, which this node may run: in a cluster, made from the
    /// directory when it is not here yet; refused (moved) while another live node owns it.
    pub(crate) async fn activate(&self, id: &str) -> Result<Arc<ActorHandle>> {
        if let Ok(handle) = self.actors.get(id) {
            return Ok(handle);
        }
        let Some(cluster) = &self.cluster else {
            return Err(ApiError::not_found(format!("no actor `{id}`")));
        };
        let found = cluster
            .entry(id)
            .await
            .map_err(crate::cluster::route::cluster_error)?
            .ok_or_else(|| ApiError::not_found(format!("no actor `{id}`")))?;
        if let Some(owner) = &found.entry.node
            && owner != cluster.node()
            && cluster
                .alive(owner)
                .await
                .map_err(crate::cluster::route::cluster_error)?
        {
            return Err(ApiError::moved(format!(
                "actor `{id}` is on node `{owner}`"
            )));
        }
        self.adopt(id, &found.entry.record).await?;
        self.actors.get(id)
    }

    /// Lists actor `id`, found in the cluster's directory with `record`, here, passivated:
    /// its first job restores (and so claims) it.
    pub(crate) async fn adopt(&self, id: &str, record: &crate::durable::ActorRecord) -> Result<()> {
        let (_, module) = self.module_named(&record.module).await?;
        self.actors
            .recover(self.runtime.clone(), module, record, id.to_string());
        Ok(())
    }

    /// Starts an actor (fresh, or from the snapshot in `birth`) once there is room.
    pub(crate) async fn start_actor(
        &self,
        module: Arc<ActorModule>,
        birth: Birth,
    ) -> Result<Arc<ActorHandle>> {
        self.admit(None)?;
        self.actors.start(self.runtime.clone(), module, birth).await
    }

    /// `count` new actors in `actor`'s current state, all from one snapshot of it, owned by
    /// its owner; `ephemeral` ones are never saved. All or none: on a failure the forks
    /// made so far are deleted.
    pub(crate) async fn fork(
        &self,
        actor: &ActorHandle,
        count: usize,
        ephemeral: bool,
    ) -> Result<Vec<Arc<ActorHandle>>> {
        let bytes = self.snapshot_of(actor).await?;
        let mut forks = Vec::with_capacity(count);
        for _ in 0..count {
            let birth = Birth {
                snapshot: Some(bytes.clone()),
                owner: actor.owner.clone(),
                ephemeral,
                ..Birth::fresh(actor.module.clone())
            };
            match self.start_actor(actor.module_handle(), birth).await {
                Ok(fork) => forks.push(fork),
                Err(e) => {
                    for fork in &forks {
                        let _ = self.actors.remove(&fork.id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(forks)
    }

    /// The actor's current state as snapshot bytes, taken between its messages.
    pub(crate) async fn snapshot_of(&self, actor: &ActorHandle) -> Result<Vec<u8>> {
        let (reply_tx, reply) = oneshot::channel();
        self.post(actor, Job::Snapshot { reply: reply_tx })?;
        await_reply(actor, reply).await
    }

    /// Queues `job` for `actor`, making room first if it must be restored.
    pub(crate) fn post(&self, actor: &ActorHandle, job: Job) -> Result<()> {
        if !actor.is_resident() {
            self.admit(Some(&actor.id))?;
        }
        actor.post(job)
    }

    /// Makes room for one more resident actor (`incoming`, when it exists already): below
    /// the cap, or with the KV-cache budget under 90%, nothing to do; else a cached actor
    /// is deleted or the least recently used idle actor passivated; when all are busy, 429.
    fn admit(&self, incoming: Option<&str>) -> Result<()> {
        let kv = self.runtime.kv_ledger();
        let kv_full = kv.reserved() >= kv.cap() / 10 * 9;
        if self.actors.resident() < self.config.max_resident && !kv_full {
            return Ok(());
        }
        if let Some(cached) = self.openai.evict_one() {
            let _ = self.actors.remove(&cached.id);
            return Ok(());
        }
        if self.actors.passivate_lru(incoming) {
            return Ok(());
        }
        if kv_full && self.actors.resident() < self.config.max_resident {
            // The KV budget itself answers the session that does not fit (code -9).
            return Ok(());
        }
        self.metrics
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(ApiError::busy(
            format!(
                "all {} resident actors are busy; retry shortly",
                self.actors.resident()
            ),
            1,
        ))
    }
}

/// Every route, behind the key check ([`crate::auth`]), which lets `/health` through.
pub fn router(state: Arc<AppState>) -> Router {
    let message_limit = DefaultBodyLimit::max(state.config.message_bytes);
    let module_limit = DefaultBodyLimit::max(state.config.module_bytes);
    Router::new()
        .route("/health", get(health))
        .route(
            "/v1/modules",
            get(list_modules).post(upload_module).layer(module_limit),
        )
        .route(
            "/v1/actors",
            get(list_actors)
                .post(start_actor)
                .layer(DefaultBodyLimit::max(state.config.snapshot_bytes)),
        )
        .route("/v1/actors/{id}/fork", post(fork_actor))
        .route("/v1/models", get(openai::models))
        .route(
            "/v1/chat/completions",
            post(openai::chat_completions).layer(message_limit),
        )
        .route(
            "/v1/completions",
            post(openai::completions).layer(message_limit),
        )
        .route("/v1/actors/{id}", get(get_actor).delete(delete_actor))
        .route(
            "/v1/actors/{id}/messages",
            post(send_message).layer(message_limit),
        )
        .route("/v1/actors/{id}/snapshot", post(snapshot))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::cluster::route::route,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("this route does not take {method}"),
            )
        })
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_key,
        ))
        .layer(axum::middleware::from_fn(crate::request_id::request_id))
        .with_state(state)
}

type Result<T, E = ApiError> = std::result::Result<T, E>;

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&s),
    )
        .into_response()
}

/// The OpenAPI document of every route.
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn list_modules(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "modules": s.modules.list() }))
}

/// `POST /v1/modules`: the body is a module (binary, or text format).
async fn upload_module(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let body = body_bytes(body)?;
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the body is empty: send the module's bytes",
        ));
    }
    let (digest, fresh) = s.modules.upload(&s.runtime, body.to_vec()).await?;
    if let Some(persist) = s.persist.clone() {
        let key = digest.clone();
        tokio::task::spawn_blocking(move || persist.save_module(&key, &body))
            .await
            .map_err(|e| ApiError::internal(format!("saving the module failed: {e}")))??;
    }
    tracing::info!(%digest, "module uploaded");
    let status = if fresh {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({ "digest": digest }))).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StartActor {
    module: String,
    /// In a cluster: restore it on another node as soon as its node is lost.
    #[serde(default)]
    eager: bool,
}

/// `POST /v1/actors` with `{"module": NAME_OR_DIGEST}`, or with a snapshot file's bytes
/// (`Content-Type: application/octet-stream`) to restore: its module, named in the
/// snapshot, must be bundled or uploaded.
async fn start_actor(
    State(s): State<Arc<AppState>>,
    Extension(client): Extension<Client>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let body = body_bytes(body)?;
    let is_snapshot = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/octet-stream"));
    let actor = if is_snapshot {
        let manifest = tern_snapshot::parse(&body)
            .map_err(|e| ApiError::bad_request(format!("the snapshot is unreadable: {e}")))?
            .manifest;
        let (name, module) = match s.module_named(&manifest.module.digest).await {
            Ok(found) => found,
            Err(_) => s.module_named(&manifest.module.name).await?,
        };
        let birth = Birth {
            snapshot: Some(body.to_vec()),
            owner: client.name(),
            ..Birth::fresh(name)
        };
        s.start_actor(module, birth).await?
    } else {
        let request: StartActor = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "expected {{\"module\": NAME}} or a snapshot file: {e}"
            ))
        })?;
        let (name, module) = s.module_named(&request.module).await?;
        let birth = Birth {
            owner: client.name(),
            eager: request.eager,
            ..Birth::fresh(name)
        };
        s.start_actor(module, birth).await?
    };
    tracing::info!(id = %actor.id, module = %actor.module, "actor started");
    Ok((StatusCode::CREATED, Json(describe(&actor))).into_response())
}

/// `POST /v1/actors/{id}/fork`: a new, independent actor in this one's current state.
async fn fork_actor(
    State(s): State<Arc<AppState>>,
    Extension(client): Extension<Client>,
    Path(id): Path<String>,
) -> Result<Response> {
    let actor = s.actor(&id, &client)?;
    let fork = s.fork(&actor, 1, false).await?.remove(0);
    tracing::info!(id = %fork.id, from = %id, "actor forked");
    Ok((StatusCode::CREATED, Json(describe(&fork))).into_response())
}

async fn list_actors(
    State(s): State<Arc<AppState>>,
    Extension(client): Extension<Client>,
) -> Result<Json<Value>> {
    if let Some(cluster) = &s.cluster {
        let entries = cluster
            .entries()
            .await
            .map_err(crate::cluster::route::cluster_error)?;
        let mut actors: Vec<Value> = entries
            .into_iter()
            .filter(|(_, found)| client.owns(found.entry.record.owner.as_deref()))
            .map(|(id, found)| {
                let record = &found.entry.record;
                let state = match (&record.failed, &found.entry.node) {
                    (Some(_), _) => "failed",
                    (None, Some(_)) => "active",
                    (None, None) => "passivated",
                };
                json!({
                    "id": id,
                    "module": record.module,
                    "session": record.session,
                    "durable": true,
                    "state": state,
                    "fault": record.failed,
                    "node": found.entry.node,
                    "epoch": found.entry.epoch,
                    "created_ms": record.created_ms,
                })
            })
            .collect();
        actors.sort_by(|a, b| {
            (a["created_ms"].as_u64(), a["id"].as_str())
                .cmp(&(b["created_ms"].as_u64(), b["id"].as_str()))
        });
        return Ok(Json(json!({ "actors": actors })));
    }
    let actors: Vec<Value> = s
        .actors
        .list()
        .iter()
        .filter(|a| client.owns(a.owner.as_deref()))
        .map(|a| describe(a))
        .collect();
    Ok(Json(json!({ "actors": actors })))
}

async fn get_actor(
    State(s): State<Arc<AppState>>,
    Extension(client): Extension<Client>,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let actor = s.actor(&id, &client)?;
    Ok(Json(describe(&actor)))
}

async fn delete_actor(
    State(s): State<Arc<AppState>>,
    Extension(client): Extension<Client>,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    s.actor(&id, &client)?;
    s.actors.remove(&id)?;
    tracing::info!(%id, "actor deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/actors/{id}/messages`: the body is one message. Answers
/// `{"code", "output"}`, or server-sent events when the client accepts
/// `text/event-stream`.
async fn send_message(
    State(s): State<Arc<AppState>>,
    Extension(client): Extension<Client>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let actor = s.actor(&id, &client)?;
    let body = body_bytes(body)?.to_vec();
    if let ActorState::Failed(fault) = actor.status().state {
        return Err(ApiError::from(tern_actor::ActorError::Poisoned(fault)));
    }
    let (reply_tx, reply) = oneshot::channel();
    if wants_events(&headers) {
        let (stream, output) = mpsc::unbounded_channel();
        s.post(
            &actor,
            Job::Message {
                body,
                stream: Some(stream),
                reply: reply_tx,
            },
        )?;
        let events = ReplyEvents::new(output, reply);
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    s.post(
        &actor,
        Job::Message {
            body,
            stream: None,
            reply: reply_tx,
        },
    )?;
    let delivered = await_reply(&actor, reply).await?;
    let output = delivered.output_json.unwrap_or_else(|| "\"\"".into());
    let body = format!(
        r#"{{"code":{},"durable":{},"output":{output}}}"#,
        delivered.reply.code, delivered.durable
    );
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `POST /v1/actors/{id}/snapshot`: the actor's whole state as snapshot bytes.
async fn snapshot(
    State(s): State<Arc<AppState>>,
    Extension(client): Extension<Client>,
    Path(id): Path<String>,
) -> Result<Response> {
    let actor = s.actor(&id, &client)?;
    let bytes = s.snapshot_of(&actor).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn await_reply<T>(actor: &ActorHandle, reply: oneshot::Receiver<Result<T>>) -> Result<T> {
    reply.await.map_err(|_| {
        ApiError::internal(format!(
            "actor `{}`'s thread stopped unexpectedly",
            actor.id
        ))
    })?
}

/// What `GET /v1/actors/{id}` reports.
fn describe(actor: &ActorHandle) -> Value {
    let status = actor.status();
    let (state, fault) = match status.state {
        ActorState::Idle => ("idle", None),
        ActorState::Busy => ("busy", None),
        ActorState::Passivated => ("passivated", None),
        ActorState::Failed(fault) => ("failed", Some(fault)),
    };
    json!({
        "id": actor.id,
        "module": actor.module,
        "session": actor.session,
        "durable": actor.durable,
        "state": state,
        "fault": fault,
        "memory_bytes": status.memory_bytes,
        "queued": actor.queued(),
        "created_ms": actor.created_ms,
        "last_activity_ms": status.last_activity_ms,
    })
}

/// The body, or 413 past the route's limit, or 400.
pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_request"
        };
        ApiError::new(status, kind, rejection.body_text())
    })
}

/// Whether the client asked for server-sent events.
fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().starts_with("text/event-stream"))
        })
}
