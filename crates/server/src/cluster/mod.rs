//! Many `tern serve` hosts as one service, on NATS JetStream.
//!
//! - **Directory**: the KV bucket [`ACTORS_BUCKET`] maps each actor id to an
//!   [`ActorEntry`]: its record, the node that owns it (none while it is passivated), an
//!   epoch counting its claims, and the object holding its last durable snapshot. A node
//!   takes an actor with a compare-and-set on the entry's revision (`Cluster::claim`) and
//!   keeps the new revision as its fencing token: every later write of that actor (a save,
//!   a fault, the release, the delete) is an update on exactly that revision, so a node that
//!   lost the actor (another claimed it while this one was cut off) has every write refused
//!   ([`StoreError::Fenced`]) and answers its clients with an error, never a reply that is
//!   not durable. Two nodes therefore never both make progress on one actor.
//! - **Snapshots** live in the object store [`SNAPSHOTS_BUCKET`] as immutable objects named
//!   `{actor}/{sha256}`; the client checks each object's SHA-256 as it reads, and this module
//!   checks the name's. The entry moves to a new object only by the fenced update, and the
//!   old object is deleted after it. Uploaded modules live in [`MODULES_BUCKET`] by digest.
//! - **Liveness**: each node puts its [`NodeInfo`] in [`NODES_BUCKET`] every [`HEARTBEAT`];
//!   the bucket's entries expire after [`NODE_TTL`], so a node that stops beating is gone
//!   from it within that time. A node whose request subject has no responders is treated as
//!   gone at once (its connection, and so its subscriptions, closed).
//! - **Routing** ([`forward`]): a request for an actor owned by another live node is carried
//!   to it over NATS request/reply and its reply streamed back; an actor without a live
//!   owner is activated on the node that got the request (a draining node hands it to the
//!   least loaded other node). Passivation releases ownership, so an idle actor wakes on
//!   whichever node its next message reaches.
//! - **Administration** ([`admin`]): drain a node, move an actor, list nodes and actors.
//!
//! The [`Cluster`] is also the server's [`SnapshotStore`](crate::SnapshotStore): the keys the server's durable
//! layer writes (`actors/{id}.json`, `actors/{id}.tern`, `modules/{digest}.wasm`) map onto
//! the directory and the object stores as above.
//!
//! NATS I/O runs on a small Tokio runtime of the cluster's own, so that the store's blocking
//! calls, made from actor threads and handlers alike, never wait on the reactor they block.

pub mod admin;
pub mod forward;
pub mod host;
pub mod route;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::actors::lock;
use crate::durable::ActorRecord;
use crate::hot::HotSnapshots;
use crate::store::StoreError;

/// The directory: actor id → [`ActorEntry`].
pub const ACTORS_BUCKET: &str = "tern_actors";
/// OpenAI-compatible sessions: SHA-256 of (client, session) → the session's actor id.
pub const SESSIONS_BUCKET: &str = "tern_sessions";
/// Live nodes: node name → [`NodeInfo`], expiring after [`NODE_TTL`].
pub const NODES_BUCKET: &str = "tern_nodes";
/// Actor snapshots, `{actor}/{sha256}`.
pub const SNAPSHOTS_BUCKET: &str = "tern_snapshots";
/// Uploaded modules, by digest.
pub const MODULES_BUCKET: &str = "tern_modules";
/// How often a node says it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// How long a node's entry outlives its last heartbeat: a node lost is known within this.
pub const NODE_TTL: Duration = Duration::from_secs(2);
/// How long a node seen alive is taken as alive without asking again (a node found gone
/// by a forwarded request is known gone at once).
const ALIVE_FOR: Duration = Duration::from_millis(250);
/// How long an actor's owner, as read from the directory, is used for routing unread.
const OWNER_FOR: Duration = Duration::from_millis(500);
/// How often claims and updates retry a compare-and-set that lost a race.
const CAS_TRIES: usize = 8;

/// Where an actor lives and what brings it back.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ActorEntry {
    pub record: ActorRecord,
    /// The node running it; `None` while it is passivated.
    #[serde(default)]
    pub node: Option<String>,
    /// How many times it has been claimed.
    pub epoch: u64,
    /// The object holding the whole snapshot its chain starts with.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// The objects holding the links appended to that chain since, in order: the last one is
    /// its last durable state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<String>,
}

/// What a node says of itself at every heartbeat.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct NodeInfo {
    pub name: String,
    /// Its HTTP address.
    pub http: String,
    /// Its device kind (`cpu`, `cuda`, ...): an actor continues bit for bit on the same kind.
    pub device: String,
    /// Actors with a thread and memory.
    pub resident: usize,
    /// KV-cache bytes its sessions reserve.
    pub kv_bytes: u64,
    /// Device (GPU) memory in use; 0 where actors run on the CPU.
    #[serde(default)]
    pub device_bytes: u64,
    /// It hands its actors to other nodes and takes no new ones.
    pub draining: bool,
    pub started_ms: u64,
}

/// How to join a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The NATS server, `nats://HOST:PORT`.
    pub url: String,
    /// This node's name: unique in the cluster, `[A-Za-z0-9_-]`.
    pub node: String,
    /// JetStream replicas of each bucket (1 on one NATS server; 3 in production).
    pub replicas: usize,
    /// The most bytes of snapshot objects this node keeps in memory.
    pub cache_bytes: u64,
    /// A folder of snapshot objects shared with this machine's other nodes ([`host`]).
    pub host_objects: Option<std::path::PathBuf>,
}

/// Why joining or using the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid node name `{0}`: use letters, digits, `-` and `_`")]
    NodeName(String),
    #[error("cannot start the cluster's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot reach NATS at {url}: {error}")]
    Connect { url: String, error: String },
    #[error("NATS JetStream: {0}")]
    JetStream(String),
    #[error("node `{0}` is already in the cluster (another tern serve with that --node?)")]
    NodeTaken(String),
    #[error("the host objects' folder {path}: {error}")]
    HostObjects {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

/// The fencing token of an actor this node owns.
#[derive(Clone, Debug)]
struct Token {
    revision: u64,
    /// The actor instance that claimed it ([`crate::store::writer`]).
    writer: u64,
    /// The entry as of `revision` (this node wrote it): an update needs no read first.
    entry: ActorEntry,
}

/// What is known of one actor in the directory.
pub struct Found {
    pub entry: ActorEntry,
    pub revision: u64,
}

/// One node's membership: the NATS connection, the buckets, and the tokens it holds.
pub struct Cluster {
    node: String,
    url: String,
    rt: Option<tokio::runtime::Runtime>,
    client: async_nats::Client,
    replies: Arc<forward::Replies>,
    actors: kv::Store,
    sessions: kv::Store,
    nodes: kv::Store,
    snapshots: object_store::ObjectStore,
    modules: object_store::ObjectStore,
    tokens: Mutex<HashMap<String, Token>>,
    /// Nodes whose subject had no responders: gone, whatever their heartbeat says yet.
    gone: Mutex<HashMap<String, u64>>,
    /// Nodes seen alive, and when: trusted for [`ALIVE_FOR`].
    seen_alive: Mutex<HashMap<String, std::time::Instant>>,
    /// Actors seen owned by another node, and when: trusted for [`OWNER_FOR`] (a request
    /// sent to a node that no longer owns its actor is placed again there).
    seen_owner: Mutex<HashMap<String, (String, std::time::Instant)>>,
    draining: AtomicBool,
    /// Snapshot objects this node wrote or read, each kept under its name (see
    /// [`crate::hot`]): an object never changes under its name, so a kept one is never stale.
    objects: Mutex<HotSnapshots>,
    /// The folder of objects shared with this machine's other nodes, if any.
    host: Option<Arc<host::HostObjects>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn js_error(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::JetStream(e.to_string())
}

fn remote(e: impl std::fmt::Display) -> StoreError {
    StoreError::Remote(e.to_string())
}

/// Whether `name` may name a node (it is part of NATS subjects and keys).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Connects to NATS with reconnection that keeps trying, quickly.
pub(crate) async fn connect(url: &str, name: &str) -> Result<async_nats::Client, ClusterError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * attempts as u64).min(1000))
        })
        .event_callback(|event| async move {
            tracing::info!(%event, "NATS connection");
        })
        .connect(url)
        .await
        .map_err(|e| ClusterError::Connect {
            url: url.to_string(),
            error: e.to_string(),
        })
}

/// Bytes of one chunk of the objects the cluster puts, where the server takes messages of
/// twice that (its `max_payload`, 1 MiB unless configured otherwise).
const OBJECT_CHUNK: usize = 512 << 10;

/// The metadata an object named `name` is put with: chunks of [`OBJECT_CHUNK`] where the
/// server `client` is connected to takes them, else the client's own size (128 KiB). Each
/// chunk is one publish whose acknowledgement the put waits for, so larger chunks put
/// faster (`docs/perf.md`).
pub(crate) fn object_meta(client: &async_nats::Client, name: &str) -> object_store::ObjectMetadata {
    let fits = client.server_info().max_payload >= 2 * OBJECT_CHUNK;
    object_store::ObjectMetadata {
        name: name.to_string(),
        chunk_size: fits.then_some(OBJECT_CHUNK),
        ..Default::default()
    }
}

/// The cluster's buckets, created on first use.
pub(crate) struct Buckets {
    pub actors: kv::Store,
    pub sessions: kv::Store,
    pub nodes: kv::Store,
    pub snapshots: object_store::ObjectStore,
    pub modules: object_store::ObjectStore,
}

impl Buckets {
    pub(crate) async fn open(
        client: &async_nats::Client,
        replicas: usize,
    ) -> Result<Buckets, ClusterError> {
        let js = jetstream::new(client.clone());
        let kv_bucket = |bucket: &str, history: i64, max_age: Duration| kv::Config {
            bucket: bucket.to_string(),
            history,
            max_age,
            num_replicas: replicas,
            ..Default::default()
        };
        let actors = open_kv(&js, kv_bucket(ACTORS_BUCKET, 1, Duration::ZERO)).await?;
        let sessions = open_kv(&js, kv_bucket(SESSIONS_BUCKET, 1, Duration::ZERO)).await?;
        let nodes = open_kv(&js, kv_bucket(NODES_BUCKET, 1, NODE_TTL)).await?;
        let objects = |bucket: &str| object_store::Config {
            bucket: bucket.to_string(),
            num_replicas: replicas,
            ..Default::default()
        };
        let snapshots = open_objects(&js, objects(SNAPSHOTS_BUCKET)).await?;
        let modules = open_objects(&js, objects(MODULES_BUCKET)).await?;
        Ok(Buckets {
            actors,
            sessions,
            nodes,
            snapshots,
            modules,
        })
    }
}

async fn open_kv(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, ClusterError> {
    if let Ok(store) = js.get_key_value(&config.bucket).await {
        return Ok(store);
    }
    match js.create_key_value(config.clone()).await {
        Ok(store) => Ok(store),
        // Another node made it meanwhile.
        Err(e) => js
            .get_key_value(&config.bucket)
            .await
            .map_err(|_| js_error(e)),
    }
}

async fn open_objects(
    js: &jetstream::Context,
    config: object_store::Config,
) -> Result<object_store::ObjectStore, ClusterError> {
    if let Ok(store) = js.get_object_store(&config.bucket).await {
        return Ok(store);
    }
    match js.create_object_store(config.clone()).await {
        Ok(store) => Ok(store),
        Err(e) => js
            .get_object_store(&config.bucket)
            .await
            .map_err(|_| js_error(e)),
    }
}

/// The entry under `id`, if it exists and is not deleted.
pub(crate) async fn read_entry(actors: &kv::Store, id: &str) -> Result<Option<Found>, StoreError> {
    let Some(entry) = actors.entry(id).await.map_err(remote)? else {
        return Ok(None);
    };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    let parsed = serde_json::from_slice(&entry.value)
        .map_err(|e| StoreError::Remote(format!("actor `{id}`'s directory entry: {e}")))?;
    Ok(Some(Found {
        entry: parsed,
        revision: entry.revision,
    }))
}

/// Every key of `bucket` (deleted ones skipped).
pub(crate) async fn keys(bucket: &kv::Store) -> Result<Vec<String>, StoreError> {
    use futures_util::StreamExt;
    let mut stream = bucket.keys().await.map_err(remote)?;
    let mut keys = Vec::new();
    while let Some(key) = stream.next().await {
        keys.push(key.map_err(remote)?);
    }
    Ok(keys)
}

/// Every node now in the nodes bucket.
pub(crate) async fn live_nodes(nodes: &kv::Store) -> Result<Vec<NodeInfo>, StoreError> {
    let mut out = Vec::new();
    for name in keys(nodes).await? {
        if let Some(value) = nodes.get(&name).await.map_err(remote)?
            && let Ok(info) = serde_json::from_slice::<NodeInfo>(&value)
        {
            out.push(info);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// How old a host object's file must be before a sweep may remove it as unnamed: older than
/// any object put and not yet named by its actor's entry.
const HOST_OBJECT_GRACE: Duration = Duration::from_secs(60);

/// Sweeps `host` of the files no actor's entry names ([`host::HostObjects::sweep`]); a
/// directory that cannot be read leaves it as it is.
async fn sweep_host_objects(host: &host::HostObjects, actors: &kv::Store) {
    let named = match all_entries(actors).await {
        Ok(all) => all
            .into_iter()
            .flat_map(|(_, found)| found.entry.snapshot.into_iter().chain(found.entry.links))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "host objects not swept: the directory cannot be read");
            return;
        }
    };
    let removed = host.sweep(&named, HOST_OBJECT_GRACE);
    if removed > 0 {
        tracing::info!(removed, "host objects no actor names were removed");
    }
}

/// Every actor in the directory, by id.
pub(crate) async fn all_entries(actors: &kv::Store) -> Result<Vec<(String, Found)>, StoreError> {
    let mut out = Vec::new();
    for id in keys(actors).await? {
        if let Some(found) = read_entry(actors, &id).await? {
            out.push((id, found));
        }
    }
    Ok(out)
}

impl Cluster {
    /// Connects to NATS, opens (or makes) the buckets, and checks that no live node has
    /// this name. Call it outside any async runtime.
    pub fn join(options: &ClusterOptions) -> Result<Arc<Cluster>, ClusterError> {
        if !valid_node_name(&options.node) {
            return Err(ClusterError::NodeName(options.node.clone()));
        }
        let host = match &options.host_objects {
            Some(path) => Some(Arc::new(host::HostObjects::open(path).map_err(
                |error| ClusterError::HostObjects {
                    path: path.clone(),
                    error,
                },
            )?)),
            None => None,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tern-nats")
            .enable_all()
            .build()
            .map_err(ClusterError::Runtime)?;
        let handle = rt.handle().clone();
        let (client, buckets, replies) = rt.block_on(async {
            let client = connect(&options.url, &options.node).await?;
            let replies = forward::Replies::start(&client, &handle)
                .await
                .map_err(js_error)?;
            let buckets = Buckets::open(&client, options.replicas.max(1)).await?;
            // A node restarted under its name waits for its previous life's heartbeat to
            // lapse; one that keeps beating is another live node of that name.
            let deadline = tokio::time::Instant::now() + NODE_TTL * 2 + HEARTBEAT;
            while buckets
                .nodes
                .get(&options.node)
                .await
                .map_err(js_error)?
                .is_some()
            {
                if tokio::time::Instant::now() >= deadline {
                    return Err(ClusterError::NodeTaken(options.node.clone()));
                }
                tokio::time::sleep(HEARTBEAT / 4).await;
            }
            if let Some(host) = &host {
                sweep_host_objects(host, &buckets.actors).await;
            }
            Ok((client, buckets, replies))
        })?;
        Ok(Arc::new(Cluster {
            node: options.node.clone(),
            url: options.url.clone(),
            rt: Some(rt),
            client,
            replies,
            actors: buckets.actors,
            sessions: buckets.sessions,
            nodes: buckets.nodes,
            snapshots: buckets.snapshots,
            modules: buckets.modules,
            tokens: Mutex::default(),
            gone: Mutex::default(),
            seen_alive: Mutex::default(),
            seen_owner: Mutex::default(),
            draining: AtomicBool::new(false),
            objects: Mutex::new(HotSnapshots::new(options.cache_bytes)),
            host,
        }))
    }

    /// The snapshot objects this node keeps in memory.
    pub(crate) fn objects(&self) -> std::sync::MutexGuard<'_, HotSnapshots> {
        lock(&self.objects)
    }

    /// Forgets snapshot object `name`, deleted or about to be: from this node's memory and
    /// from the machine's shared folder.
    pub(crate) fn forget_object(&self, name: &str) {
        self.objects().forget(name);
        if let Some(host) = &self.host {
            host.remove(name);
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The NATS server's address.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub(crate) fn replies(&self) -> &Arc<forward::Replies> {
        &self.replies
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.rt.as_ref().expect("present until dropped").handle()
    }

    /// Runs `future` on the cluster's runtime and waits for it, from any thread (an async
    /// one included: the future never needs the caller's reactor).
    pub(crate) fn block<T: Send + 'static>(
        &self,
        future: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle().spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(StoreError::Remote("the cluster is shutting down".into())))
    }

    /// Whether this node holds actor `id`'s fencing token (it owns it).
    pub fn holds(&self, id: &str) -> bool {
        lock(&self.tokens).contains_key(id)
    }

    /// Forgets the token of actor `id` (it was released, deleted or fenced).
    fn drop_token(&self, id: &str) {
        lock(&self.tokens).remove(id);
    }

    /// Whether this node is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
    }

    /// Actor `id`'s directory entry.
    pub async fn entry(&self, id: &str) -> Result<Option<Found>, StoreError> {
        let valid = !id.is_empty()
            && id.len() <= 128
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid {
            read_entry(&self.actors, id).await
        } else {
            Ok(None)
        }
    }

    /// Whether node `name` is alive: in the nodes bucket, and not found gone since its
    /// last heartbeat.
    pub async fn alive(&self, name: &str) -> Result<bool, StoreError> {
        if lock(&self.seen_alive)
            .get(name)
            .is_some_and(|at| at.elapsed() < ALIVE_FOR)
        {
            return Ok(true);
        }
        let alive = self.ask_alive(name).await?;
        let mut seen = lock(&self.seen_alive);
        if alive {
            seen.insert(name.to_string(), std::time::Instant::now());
        } else {
            seen.remove(name);
        }
        Ok(alive)
    }

    async fn ask_alive(&self, name: &str) -> Result<bool, StoreError> {
        let beat = self.nodes.entry(name).await.map_err(remote)?;
        let Some(beat) = beat.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(false);
        };
        let mut gone = lock(&self.gone);
        match gone.get(name) {
            // A node that beat again since its subject was found empty came back.
            Some(&at) if beat.revision > at => {
                gone.remove(name);
                Ok(true)
            }
            Some(_) => Ok(false),
            None => Ok(true),
        }
    }

    /// Marks node `name` gone until it beats again: its request subject had no responders
    /// (its connection, and with it every subscription, is closed).
    pub async fn mark_gone(&self, name: &str) {
        lock(&self.seen_alive).remove(name);
        lock(&self.seen_owner).retain(|_, (owner, _)| owner != name);
        let revision = match self.nodes.entry(name).await {
            Ok(Some(e)) => e.revision,
            _ => 0,
        };
        lock(&self.gone).insert(name.to_string(), revision);
    }

    /// The live node other than this one that owned actor `id` when last read, if read
    /// within the last half second.
    pub fn recent_owner(&self, id: &str) -> Option<String> {
        let mut seen = lock(&self.seen_owner);
        match seen.get(id) {
            Some((owner, at)) if at.elapsed() < OWNER_FOR => Some(owner.clone()),
            Some(_) => {
                seen.remove(id);
                None
            }
            None => None,
        }
    }

    /// Remembers that another live node owns actor `id`; `None`: forgets it.
    pub fn saw_owner(&self, id: &str, owner: Option<&str>) {
        let mut seen = lock(&self.seen_owner);
        match owner {
            Some(owner) => {
                if seen.len() > 100_000 {
                    seen.clear();
                }
                seen.insert(
                    id.to_string(),
                    (owner.to_string(), std::time::Instant::now()),
                );
            }
            None => {
                seen.remove(id);
            }
        }
    }

    /// The actor of the session named by `scoped` (its client and name), if one was made.
    pub async fn session_actor(&self, scoped: &str) -> Result<Option<String>, StoreError> {
        let entry = self
            .sessions
            .entry(session_key(scoped))
            .await
            .map_err(remote)?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| String::from_utf8(e.value.to_vec()).ok()))
    }

    /// Records `actor` as the session's actor, unless one is recorded already (another node
    /// made it first): then that one's id. `replace`: the recorded actor is gone, so
    /// `actor` takes its place.
    pub async fn bind_session(
        &self,
        scoped: &str,
        actor: &str,
        replace: bool,
    ) -> Result<String, StoreError> {
        let key = session_key(scoped);
        let value = Bytes::from(actor.to_string());
        if replace {
            self.sessions.put(&key, value).await.map_err(remote)?;
            return Ok(actor.to_string());
        }
        match self.sessions.create(&key, value).await {
            Ok(_) => Ok(actor.to_string()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(self
                .session_actor(scoped)
                .await?
                .unwrap_or_else(|| actor.to_string())),
            Err(e) => Err(remote(e)),
        }
    }

    /// Every live node.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        live_nodes(&self.nodes).await
    }

    /// Every actor in the directory.
    pub async fn entries(&self) -> Result<Vec<(String, Found)>, StoreError> {
        all_entries(&self.actors).await
    }

    /// The first of [`others_by_load`](Self::others_by_load).
    pub async fn least_loaded_other(&self, device: &str) -> Option<String> {
        self.others_by_load(device).await.into_iter().next()
    }

    /// The live, not draining nodes other than this one, as [`by_load`] orders them.
    pub async fn others_by_load(&self, device: &str) -> Vec<String> {
        let Ok(nodes) = self.nodes().await else {
            return Vec::new();
        };
        let gone = lock(&self.gone).clone();
        let others = nodes
            .iter()
            .filter(|n| n.name != self.node && !n.draining && !gone.contains_key(&n.name));
        by_load(others, device)
    }

    /// Takes actor `id` for this node: an update of its entry on the revision read, with
    /// this node as owner and the epoch one higher. Refused (`Moved`) while another live
    /// node owns it. Returns the entry as claimed.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        id: &str,
        writer: u64,
    ) -> Result<ActorEntry, StoreError> {
        for _ in 0..CAS_TRIES {
            let Some(found) = self.entry(id).await? else {
                return Err(StoreError::Missing(id.to_string()));
            };
            let mut entry = found.entry;
            if let Some(owner) = &entry.node
                && owner != &self.node
                && self.alive(owner).await?
            {
                return Err(StoreError::Moved {
                    id: id.to_string(),
                    node: owner.clone(),
                });
            }
            entry.node = Some(self.node.clone());
            entry.epoch += 1;
            match self
                .actors
                .update(id, encode(&entry)?, found.revision)
                .await
            {
                Ok(revision) => {
                    let token = Token {
                        revision,
                        writer,
                        entry: entry.clone(),
                    };
                    lock(&self.tokens).insert(id.to_string(), token);
                    tracing::info!(%id, epoch = entry.epoch, "actor claimed");
                    return Ok(entry);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(remote(e)),
            }
        }
        Err(StoreError::Remote(format!(
            "actor `{id}`: too many concurrent claims"
        )))
    }

    /// Writes `change` into actor `id`'s entry, fenced by this node's token: refused
    /// (`Fenced`, and the token dropped) when another node has claimed it since.
    pub(crate) async fn update_owned(
        self: &Arc<Self>,
        id: &str,
        writer: u64,
        change: impl FnOnce(&mut ActorEntry),
    ) -> Result<(ActorEntry, ActorEntry), StoreError> {
        let token = lock(&self.tokens).get(id).cloned();
        let Some(token) = token.filter(|t| t.writer == writer) else {
            return Err(StoreError::Fenced(id.to_string()));
        };
        // The update succeeds only on the token's revision: any write by another node since
        // makes it fail, so the entry this node wrote last is the one it replaces.
        let before = token.entry.clone();
        let mut after = before.clone();
        change(&mut after);
        match self
            .actors
            .update(id, encode(&after)?, token.revision)
            .await
        {
            Ok(revision) => {
                let mut tokens = lock(&self.tokens);
                if after.node.as_deref() == Some(self.node.as_str()) {
                    let token = Token {
                        revision,
                        writer,
                        entry: after.clone(),
                    };
                    tokens.insert(id.to_string(), token);
                } else {
                    tokens.remove(id);
                }
                Ok((before, after))
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                self.drop_token(id);
                Err(StoreError::Fenced(id.to_string()))
            }
            Err(e) => Err(remote(e)),
        }
    }

    /// Gives up actor `id` (it was saved and passivated): its entry says no owner.
    pub(crate) fn release(self: &Arc<Self>, id: &str, writer: u64) -> Result<(), StoreError> {
        if !self.holds(id) {
            return Ok(());
        }
        let this = self.clone();
        let id = id.to_string();
        self.block(async move {
            this.update_owned(&id, writer, |e| e.node = None).await?;
            tracing::info!(%id, "actor released");
            Ok(())
        })
    }

    /// Puts this node's heartbeat now.
    pub(crate) async fn beat(&self, info: &NodeInfo) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(info).map_err(remote)?;
        self.nodes
            .put(&self.node, Bytes::from(bytes))
            .await
            .map_err(remote)?;
        Ok(())
    }

    /// Removes this node's heartbeat (it is leaving).
    pub fn leave(&self) {
        let nodes = self.nodes.clone();
        let node = self.node.clone();
        let _ = self.block(async move { nodes.purge(&node).await.map_err(remote) });
    }
}

/// The names of `nodes` in placement order: those of device kind `device` first (on which
/// an actor continues bit for bit), each kind's from the least device memory in use, then
/// the fewest KV-cache bytes, then the fewest resident actors.
fn by_load<'a>(nodes: impl Iterator<Item = &'a NodeInfo>, device: &str) -> Vec<String> {
    let mut nodes: Vec<&NodeInfo> = nodes.collect();
    nodes.sort_by_key(|n| {
        let kind = n.device != device;
        (kind, n.device_bytes, n.kv_bytes, n.resident, n.name.clone())
    });
    nodes.into_iter().map(|n| n.name.clone()).collect()
}

/// A session's key in [`SESSIONS_BUCKET`]: the SHA-256 of its scoped name, in hex.
fn session_key(scoped: &str) -> String {
    sha256_hex(scoped.as_bytes())
}

/// The SHA-256 of `bytes`, in lowercase hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn encode(entry: &ActorEntry) -> Result<Bytes, StoreError> {
    serde_json::to_vec(entry).map(Bytes::from).map_err(remote)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, device: &str, device_bytes: u64, kv_bytes: u64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            device: device.into(),
            device_bytes,
            kv_bytes,
            ..NodeInfo::default()
        }
    }

    #[test]
    fn placement_prefers_the_same_device_kind_then_the_least_memory_in_use() {
        let nodes = [
            node("cpu-idle", "cpu", 0, 0),
            node("gpu-full", "cuda", 60 << 30, 8 << 30),
            node("gpu-light", "cuda", 20 << 30, 9 << 30),
            node("gpu-light-fewer-kv", "cuda", 20 << 30, 1 << 30),
        ];
        assert_eq!(
            by_load(nodes.iter(), "cuda"),
            ["gpu-light-fewer-kv", "gpu-light", "gpu-full", "cpu-idle"]
        );
        assert_eq!(by_load(nodes.iter(), "cpu")[0], "cpu-idle");
    }

    #[test]
    fn a_heartbeat_without_device_memory_reads_as_none_in_use() {
        let older = r#"{"name":"a","http":"127.0.0.1:1","device":"cpu","resident":2,
            "kv_bytes":5,"draining":false,"started_ms":1}"#;
        let info: NodeInfo = serde_json::from_str(older).unwrap();
        assert_eq!((info.device_bytes, info.kv_bytes), (0, 5));
    }
}
