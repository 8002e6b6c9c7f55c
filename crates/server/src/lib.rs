//! `tern serve`: many Tern actors behind an HTTP API.
//!
//! A [`Server`] shares one [`tern_actor::Runtime`] among every actor it starts. Each actor
//! lives on its own worker thread with one mailbox ([`actors`]): the messages sent to one
//! actor run one at a time in arrival order, different actors run in parallel, and no guest
//! code ever runs on the async reactor. The routes ([`routes`]) start, list, message, fork,
//! snapshot, restore and delete actors, and upload modules addressed by their SHA-256
//! digest; [`openai`] speaks OpenAI's protocol on actors of the bundled chat guest, with
//! durable sessions, prefix reuse and `n` choices by forking.
//!
//! Guarantees:
//! - A bad request, a bad module or a failing actor is a JSON error with a fitting status
//!   code, never a panic; an actor that traps answers 409 from then on (across restarts
//!   too), and the others carry on.
//! - When an API key is configured every route but `GET /health` needs
//!   `Authorization: Bearer KEY`, compared in constant time ([`auth`]); the key is never
//!   logged.
//! - A client that disconnects from a streamed reply cancels its message at the guest's
//!   next emit or forward pass; the actor is unharmed.
//! - With a store ([`Config::store`], [`durable`]), each actor's state is saved crash-safely
//!   after every message (or on passivation only), uploads are kept, and a server started
//!   on the same store lists the same actors and continues each from its last save. An
//!   actor idle past [`Config::idle`] is passivated (saved, thread and memory freed) and
//!   restored by its next message.
//! - Admission: past [`Config::max_resident`] resident actors, the least recently used idle
//!   one is passivated to make room; a busy actor is never evicted; when all are busy the
//!   request gets 429 with `Retry-After`.
//!
//! - Clients: each API key names a client that reaches only the actors and sessions it
//!   made ([`auth::Client`]).
//!
//! Actors' forward passes reach their model's step scheduler (`tern_model::steps`), which
//! on the CPU gathers concurrent ones into batched steps; on the GPU each still runs alone.

pub mod actors;
pub mod auth;
pub mod cluster;
pub mod durable;
pub(crate) mod error;
mod hot;
pub mod metrics;
mod modules;
pub mod openai;
mod request_id;
pub mod routes;
mod sse;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tern_actor::Runtime;

pub use durable::Durability;
pub use error::ApiError;
pub use store::{LocalStore, SnapshotStore, StoreError};

/// How a [`Server`] listens and what it accepts.
#[derive(Clone)]
pub struct Config {
    /// Where to listen (port 0: any free port; [`Server::local_addr`] says which).
    pub listen: SocketAddr,
    /// The keys every route but `/health` requires as `Authorization: Bearer KEY`, each
    /// naming a client that reaches only its own actors and sessions; none leaves the API
    /// open (one client).
    pub api_keys: Vec<ApiKey>,
    /// The largest message body, in bytes.
    pub message_bytes: usize,
    /// The largest module upload, in bytes.
    pub module_bytes: usize,
    /// Modules offered by name (the bundled guests), compiled on first use.
    pub bundled: Vec<(String, PathBuf)>,
    /// Where actors and uploads are kept across restarts; `None`: in memory only (no
    /// durability, no passivation).
    pub store: Option<Arc<dyn SnapshotStore>>,
    /// When actors are saved to `store`.
    pub durability: Durability,
    /// How long an actor may stay idle before it is saved and its thread and memory freed;
    /// `None`: never. Needs a `store`.
    pub idle: Option<Duration>,
    /// The largest snapshot upload (`POST /v1/actors` with a snapshot), in bytes.
    pub snapshot_bytes: usize,
    /// Bytes of actors' snapshot chains kept in host memory beside a state folder, so that
    /// an actor passivated a little while ago comes back without reading it (0: none).
    pub hot_snapshot_bytes: u64,
    /// Whether stateless OpenAI-compatible requests continue in a fork of a cached actor
    /// whose conversation they extend ([`openai`]). Exact on the CPU; on CUDA, prefill and
    /// decode round differently until the batched step lands, so the CLI turns it off there.
    pub prefix_reuse: bool,
    /// How many actors the prefix cache keeps.
    pub prefix_cache: usize,
    /// The most actors resident (with a thread and memory) at once: past it, the least
    /// recently used idle actor is passivated (a cached one deleted) to make room, and
    /// when every resident actor is busy the request gets 429 with `Retry-After`.
    pub max_resident: usize,
    /// The most requests that may wait for one actor (429 past it).
    pub max_queued: usize,
    /// The cluster this server is a node of ([`cluster`]); its directory and object
    /// stores then replace `store`.
    pub cluster: Option<Arc<cluster::Cluster>>,
}

impl Config {
    /// Listens on `listen` with no key, 16 MiB messages, 64 MiB modules, no bundled guests.
    pub fn new(listen: SocketAddr) -> Config {
        Config {
            listen,
            api_keys: Vec::new(),
            message_bytes: 16 << 20,
            module_bytes: 64 << 20,
            bundled: Vec::new(),
            store: None,
            durability: Durability::Message,
            idle: None,
            snapshot_bytes: 1 << 30,
            hot_snapshot_bytes: 1 << 30,
            prefix_reuse: true,
            prefix_cache: 4,
            max_resident: 256,
            max_queued: 64,
            cluster: None,
        }
    }
}

impl std::fmt::Debug for Config {
    // By hand, so that the key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field(
                "api_keys",
                &self.api_keys.iter().map(|k| &k.client).collect::<Vec<_>>(),
            )
            .field("message_bytes", &self.message_bytes)
            .field("module_bytes", &self.module_bytes)
            .field("bundled", &self.bundled)
            .field("store", &self.store.as_ref().map(|_| "<store>"))
            .field("durability", &self.durability)
            .field("idle", &self.idle)
            .field("snapshot_bytes", &self.snapshot_bytes)
            .field("hot_snapshot_bytes", &self.hot_snapshot_bytes)
            .field("prefix_reuse", &self.prefix_reuse)
            .field("prefix_cache", &self.prefix_cache)
            .field("max_resident", &self.max_resident)
            .field("max_queued", &self.max_queued)
            .field(
                "cluster",
                &self.cluster.as_ref().map(|c| c.node().to_string()),
            )
            .finish()
    }
}

/// One API key and the client it names.
#[derive(Clone)]
pub struct ApiKey {
    pub client: String,
    pub key: String,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("the API key is empty")]
    EmptyKey,
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot read the stored actors: {0}")]
    Recover(#[from] StoreError),
}

/// The most time a shutdown spends saving actors.
pub const SHUTDOWN_SAVE: Duration = Duration::from_secs(30);

/// A bound, not yet serving, HTTP front for actors of one runtime.
pub struct Server {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    state: Arc<routes::AppState>,
}

impl Server {
    /// Binds `config.listen` now, so that a port in use is an error here.
    pub fn bind(runtime: Arc<Runtime>, config: Config) -> Result<Server, ServerError> {
        if config.api_keys.iter().any(|k| k.key.is_empty()) {
            return Err(ServerError::EmptyKey);
        }
        let bind_err = |error| ServerError::Bind {
            addr: config.listen,
            error,
        };
        let listener = std::net::TcpListener::bind(config.listen).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let state = Arc::new(routes::AppState::new(runtime, config)?);
        let _ = state.addr.set(addr);
        Ok(Server {
            listener,
            addr,
            state,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` completes, then stops taking connections, waits for the
    /// open ones, and saves every durable actor whose state is not saved yet (it is
    /// passivated; at most [`SHUTDOWN_SAVE`] is spent). Must run inside a multi-threaded
    /// Tokio runtime.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let listener =
            tokio::net::TcpListener::from_std(self.listener).map_err(ServerError::Serve)?;
        tracing::info!(addr = %self.addr, "serving");
        let state = self.state.clone();
        let router = routes::router(self.state);
        let mut cluster_tasks = Vec::new();
        if let Some(cluster) = state.cluster.clone() {
            cluster_tasks.push(tokio::spawn(cluster::forward::serve(
                cluster.client().clone(),
                cluster.node().to_string(),
                router.clone(),
            )));
            cluster_tasks.push(tokio::spawn(cluster::admin::serve(state.clone())));
            cluster_tasks.push(tokio::spawn(cluster::admin::reactivate_eager(
                state.clone(),
            )));
            let beating = state.clone();
            cluster_tasks.push(tokio::spawn(async move {
                let mut every = tokio::time::interval(cluster::HEARTBEAT);
                loop {
                    every.tick().await;
                    beating.beat().await;
                }
            }));
            // Any node may have to restore any actor at once (a failover, a move): the
            // bundled guests are compiled now rather than by the first such restore.
            let compiling = state.clone();
            tokio::task::spawn_blocking(move || {
                for (name, _) in &compiling.config.bundled {
                    if let Err(e) = compiling.modules.load(&compiling.runtime, name) {
                        tracing::warn!(%name, error = %e.message, "cannot compile a bundled guest");
                    }
                }
            });
            tracing::info!(node = %cluster.node(), nats = %cluster.url(), "joined the cluster");
        }
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(ServerError::Serve);
        let saving = state.passivate_all();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_SAVE;
        while state.resident_durable() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(
            actors = saving,
            left = state.resident_durable(),
            "saved and passivated at shutdown"
        );
        for task in cluster_tasks {
            task.abort();
        }
        if let Some(cluster) = &state.cluster {
            cluster.leave();
        }
        served
    }

    /// Serves on a Tokio runtime of its own until Ctrl-C.
    pub fn run_until_ctrl_c(self) -> Result<(), ServerError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("tern-http")
            .build()
            .map_err(ServerError::Runtime)?;
        rt.block_on(self.run(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C: shutting down");
        }))
    }
}
