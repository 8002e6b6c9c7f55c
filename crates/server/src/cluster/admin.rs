//! Running a cluster: drain a node, move an actor, see where everything lives.
//!
//! Each node answers requests on [`admin_subject`] (JSON in, JSON out): `drain` (stop taking
//! actors, then hand each resident one over to another node as a move does, the nodes taken
//! in turn from the least loaded; one that cannot be handed over is saved, passivated and
//! released, so it wakes on another node at its next message), `hand_over` (move one actor
//! of this node to another, as the drain does), `prefetch` (read an actor's durable chain
//! into this node's memory while its owner runs on) and `activate` (claim and restore one
//! actor here now). `tern cluster` calls these through [`ClusterClient::drain`],
//! [`ClusterClient::move_actor`] and [`ClusterClient::status`].
//!
//! A move copies ahead, as live migration of virtual machines does: the target reads the
//! actor's durable chain while the actor still answers on its owner, then the owner saves
//! what changed since (a link, often nothing), passivates and releases it, and the target
//! claims it and restores it from the chain it holds and the links written after. The actor
//! is unavailable only for that last part (the pause); the bulk of its bytes cross while it
//! runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::{Buckets, ClusterError, NodeInfo, connect};
use crate::ApiError;
use crate::actors::{ActorHandle, Job, State as ActorState};
use crate::routes::AppState;

/// The most a hand-over waits for its actor's queued jobs to finish.
const HANDOVER: Duration = Duration::from_secs(120);
/// Actors a drain hands over at once.
const HAND_OVERS: usize = 8;

/// The subject a node takes administrative requests on.
pub fn admin_subject(node: &str) -> String {
    format!("tern.node.{node}.admin")
}

/// One administrative request.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Admin {
    /// Answers at once: the round trip of a request over NATS.
    Ping,
    Drain,
    HandOver {
        actor: String,
        to: String,
    },
    Prefetch {
        actor: String,
    },
    Activate {
        actor: String,
    },
}

/// Answers administrative requests for `state`'s node until the subscription ends.
pub async fn serve(state: Arc<AppState>) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    let client = cluster.client().clone();
    let mut requests = match client.subscribe(admin_subject(cluster.node())).await {
        Ok(requests) => requests,
        Err(e) => {
            tracing::error!(error = %e, "cannot take administrative requests");
            return;
        }
    };
    while let Some(message) = requests.next().await {
        let (state, client) = (state.clone(), client.clone());
        tokio::spawn(async move {
            let Some(reply) = message.reply else {
                return;
            };
            let answer = match serde_json::from_slice::<Admin>(&message.payload) {
                Ok(request) => {
                    if !matches!(request, Admin::Ping) {
                        tracing::info!(?request, "administrative request");
                    }
                    state.admin(request).await
                }
                Err(e) => Err(ApiError::bad_request(format!("unknown request: {e}"))),
            };
            let body = match answer {
                Ok(value) => value,
                Err(e) => json!({"error": e.message}),
            };
            let _ = client.publish(reply, body.to_string().into()).await;
        });
    }
}

impl AppState {
    async fn admin(&self, request: Admin) -> Result<Value, ApiError> {
        let started = Instant::now();
        match request {
            Admin::Ping => Ok(json!({"pong": true})),
            Admin::Drain => {
                let cluster = self.cluster.clone().expect("admin runs in a cluster");
                cluster.set_draining(true);
                self.beat().await;
                let before = self.resident_durable();
                // Each resident actor handed over to another node, copying ahead, the nodes
                // taken in turn from the least loaded.
                let ids: Vec<String> = self
                    .actors
                    .list()
                    .iter()
                    .filter(|a| a.durable && a.is_resident())
                    .map(|a| a.id.clone())
                    .collect();
                let targets = cluster.others_by_load(&self.device_kind()).await;
                let moved = if targets.is_empty() {
                    0
                } else {
                    // Several at once: each waits for its actor to be idle.
                    let mut hand_overs = Vec::with_capacity(ids.len());
                    for (i, id) in ids.into_iter().enumerate() {
                        let (cluster, to) = (cluster.clone(), targets[i % targets.len()].clone());
                        hand_overs.push(async move {
                            let handed = self.hand_over(&cluster, &id, &to).await;
                            if let Err(e) = &handed {
                                tracing::info!(%id, %to, error = %e.message, "not handed over");
                            }
                            handed.is_ok()
                        });
                    }
                    let handed: Vec<bool> = futures_util::stream::iter(hand_overs)
                        .buffer_unordered(HAND_OVERS)
                        .collect()
                        .await;
                    handed.into_iter().filter(|&h| h).count()
                };
                // The rest (no other node, or a hand-over that failed) saved, passivated and
                // released as soon as each is idle: it wakes where its next message goes.
                let deadline = Instant::now() + HANDOVER;
                while self.resident_durable() > 0 && Instant::now() < deadline {
                    self.passivate_idle();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let left = self.resident_durable();
                Ok(json!({
                    "moved": moved,
                    "passivated": before.saturating_sub(moved + left),
                    "left": left,
                    "ms": started.elapsed().as_millis() as u64,
                }))
            }
            Admin::HandOver { actor, to } => {
                let cluster = self.cluster.clone().expect("admin runs in a cluster");
                if !cluster.holds(&actor) {
                    return Err(ApiError::moved(format!(
                        "actor `{actor}` does not run on node `{}`",
                        cluster.node()
                    )));
                }
                if !super::valid_node_name(&to) {
                    return Err(ApiError::bad_request(
                        ClusterError::NodeName(to).to_string(),
                    ));
                }
                if to == cluster.node() {
                    return Err(ApiError::bad_request(format!(
                        "actor `{actor}` runs on node `{to}` already"
                    )));
                }
                let live = cluster
                    .alive(&to)
                    .await
                    .map_err(crate::cluster::route::cluster_error)?;
                if !live {
                    return Err(ApiError::not_found(format!("no live node `{to}`")));
                }
                self.hand_over(&cluster, &actor, &to).await
            }
            Admin::Prefetch { actor } => {
                let cluster = self.cluster.clone().expect("admin runs in a cluster");
                let (read, chain) = cluster.prefetch(&actor).await.map_err(|e| match e {
                    crate::store::StoreError::Missing(_) => {
                        ApiError::not_found(format!("no actor `{actor}`"))
                    }
                    e => ApiError::internal(format!("prefetching `{actor}`: {e}")),
                })?;
                let chain_bytes: usize = chain.iter().map(|o| o.len()).sum();
                let read_ms = started.elapsed().as_millis() as u64;
                // The restore's memory made ready too, while the owner still runs it.
                let runtime = self.runtime.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    crate::durable::Persistence::prepare_restore(&runtime, &chain)
                })
                .await;
                Ok(json!({
                    "prefetched": actor,
                    "read_bytes": read,
                    "chain_bytes": chain_bytes,
                    "kept_bytes": cluster.objects().bytes(),
                    "read_ms": read_ms,
                    "ms": started.elapsed().as_millis() as u64,
                }))
            }
            Admin::Activate { actor } => {
                self.restore_here(&actor).await?;
                Ok(json!({"activated": actor, "ms": started.elapsed().as_millis() as u64}))
            }
        }
    }

    /// Saves, passivates and releases actor `id` here (waiting at most [`HANDOVER`]), so
    /// that another node may take it: the jobs queued before run first, and any posted
    /// from now on are answered "moved" (the router places them again once it is released).
    async fn release_here(&self, id: &str) -> Result<(), ApiError> {
        let cluster = self.cluster.clone().expect("admin runs in a cluster");
        let Ok(handle) = self.actors.get(id) else {
            return match cluster.holds(id) {
                true => Err(ApiError::internal(format!(
                    "actor `{id}` is held here without a handle"
                ))),
                false => Ok(()),
            };
        };
        handle.set_leaving(true);
        let released = Self::wait_released(&cluster, &handle).await;
        match &released {
            Ok(()) => self.actors.evict(id),
            Err(_) => handle.set_leaving(false),
        }
        released
    }

    /// Asks `handle`'s actor to passivate whenever its queue is empty, until its node no
    /// longer holds it.
    async fn wait_released(cluster: &super::Cluster, handle: &ActorHandle) -> Result<(), ApiError> {
        let id = &handle.id;
        let deadline = Instant::now() + HANDOVER;
        while cluster.holds(id) {
            if let ActorState::Failed(why) = handle.status().state {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "actor_failed",
                    format!("actor `{id}` failed and stays here: {why}"),
                ));
            }
            if Instant::now() >= deadline {
                return Err(ApiError::busy(format!("actor `{id}` stays busy"), 1));
            }
            if handle.queued() == 0 {
                // Passivated: `is_resident` waits for a passivation under way, release
                // included, so still held now means its release was refused. (Held at the
                // loop's test says nothing: the release may have ended since.)
                if !handle.is_resident() {
                    if !cluster.holds(id) {
                        break;
                    }
                    return Err(ApiError::internal(format!(
                        "actor `{id}` could not be released"
                    )));
                }
                let _ = handle.post(Job::Passivate);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Moves actor `id` from here to node `to`, copying ahead: `to` reads its chain while
    /// it still runs here, then it is released here and `to` restores it. Returns the
    /// nodes' answers and the phases' times: `ahead_ms` (the copy ahead) and `pause_ms`
    /// (from the release to the actor running on `to`).
    async fn hand_over(
        &self,
        cluster: &super::Cluster,
        id: &str,
        to: &str,
    ) -> Result<Value, ApiError> {
        let started = Instant::now();
        let actor = id.to_string();
        let prefetch = Admin::Prefetch {
            actor: actor.clone(),
        };
        // Copying ahead only saves time: without it, `to` reads the chain as it restores.
        let prefetched = ask(cluster.client(), to, &prefetch)
            .await
            .unwrap_or_else(|e| {
                tracing::info!(%id, %to, error = %e, "not copied ahead");
                json!({"error": e.to_string()})
            });
        let copied = Instant::now();
        self.release_here(id).await?;
        let released = copied.elapsed();
        // Requests that reach this node from now on go to `to`, which takes the actor.
        cluster.saw_owner(id, Some(to));
        let activated = ask(cluster.client(), to, &Admin::Activate { actor })
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Ok(json!({
            "prefetched": prefetched,
            "released": {"released": id, "ms": ms(released)},
            "activated": activated,
            "ahead_ms": ms(copied - started),
            "pause_ms": ms(copied.elapsed()),
        }))
    }

    /// Claims actor `id` for this node and restores it now; returns once it runs.
    async fn restore_here(&self, id: &str) -> Result<(), ApiError> {
        let handle = self.activate(id).await?;
        let (reply, done) = oneshot::channel();
        self.post(&handle, Job::Ping { reply })?;
        done.await
            .map_err(|_| ApiError::internal("the actor's thread stopped"))?
    }
}

/// Restores here, at once, the eager actors of nodes found gone (checked every heartbeat,
/// and for every node at this node's start): each live node tries, and the claim lets
/// one of them have each actor.
pub async fn reactivate_eager(state: Arc<AppState>) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    let mut known: Option<std::collections::HashSet<String>> = None;
    let mut every = tokio::time::interval(super::HEARTBEAT);
    loop {
        every.tick().await;
        let Ok(nodes) = cluster.nodes().await else {
            continue;
        };
        let live: std::collections::HashSet<String> = nodes.into_iter().map(|n| n.name).collect();
        let lost = known
            .as_ref()
            .is_none_or(|before| before.iter().any(|n| !live.contains(n)));
        known = Some(live.clone());
        if !lost || cluster.draining() {
            continue;
        }
        let Ok(entries) = cluster.entries().await else {
            continue;
        };
        for (id, found) in entries {
            let orphan = found
                .entry
                .node
                .as_ref()
                .is_some_and(|owner| owner != cluster.node() && !live.contains(owner));
            if !found.entry.record.eager || !orphan {
                continue;
            }
            if state.restore_here(&id).await.is_ok() {
                tracing::info!(%id, "eager actor restored after its node was lost");
            }
        }
    }
}

/// Sends `request` to `node`'s administrative subject and returns its answer (an answer
/// naming an error is one).
async fn ask(
    client: &async_nats::Client,
    node: &str,
    request: &Admin,
) -> Result<Value, ClusterError> {
    // A name with NATS wildcards or separators would address other subjects.
    if !super::valid_node_name(node) {
        return Err(ClusterError::NodeName(node.to_string()));
    }
    let body = serde_json::to_vec(request).map_err(super::js_error)?;
    // A drain or a hand-over may wait for busy actors for up to HANDOVER.
    let wait = HANDOVER + Duration::from_secs(10);
    let request = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(wait));
    let answer = client
        .send_request(admin_subject(node), request)
        .await
        .map_err(|e| ClusterError::JetStream(format!("node `{node}`: {e}")))?;
    let value: Value = serde_json::from_slice(&answer.payload).map_err(super::js_error)?;
    if let Some(error) = value.get("error").and_then(Value::as_str) {
        return Err(ClusterError::JetStream(format!("node `{node}`: {error}")));
    }
    Ok(value)
}

/// A client of the cluster's buckets and nodes, for `tern cluster`.
pub struct ClusterClient {
    rt: tokio::runtime::Runtime,
    client: async_nats::Client,
    buckets: Buckets,
}

/// What `tern cluster status` shows.
#[derive(Serialize, Debug)]
pub struct Status {
    pub nodes: Vec<NodeInfo>,
    /// (actor, owning node or `None` while passivated, epoch)
    pub actors: Vec<(String, Option<String>, u64)>,
}

impl ClusterClient {
    /// Connects to the cluster at `url`.
    pub fn connect(url: &str) -> Result<ClusterClient, ClusterError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClusterError::Runtime)?;
        let (client, buckets) = rt.block_on(async {
            let client = connect(url, "tern-cluster").await?;
            let buckets = Buckets::open(&client, 1).await?;
            Ok::<_, ClusterError>((client, buckets))
        })?;
        Ok(ClusterClient {
            rt,
            client,
            buckets,
        })
    }

    /// The live nodes and every actor's place.
    pub fn status(&self) -> Result<Status, ClusterError> {
        self.rt.block_on(async {
            let nodes = super::live_nodes(&self.buckets.nodes)
                .await
                .map_err(super::js_error)?;
            let mut actors: Vec<_> = super::all_entries(&self.buckets.actors)
                .await
                .map_err(super::js_error)?
                .into_iter()
                .map(|(id, found)| (id, found.entry.node, found.entry.epoch))
                .collect();
            actors.sort();
            Ok(Status { nodes, actors })
        })
    }

    /// Sends `request` to `node` and returns its answer.
    pub fn request(&self, node: &str, request: &Admin) -> Result<Value, ClusterError> {
        self.rt.block_on(ask(&self.client, node, request))
    }

    /// Whether node `name` is in the nodes bucket (its heartbeat has not lapsed).
    pub fn node_listed(&self, name: &str) -> Result<bool, ClusterError> {
        self.rt.block_on(async {
            Ok(matches!(
                self.buckets.nodes.entry(name).await.map_err(super::js_error)?,
                Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put
            ))
        })
    }

    /// The objects holding actor `actor`'s chain: its whole snapshot, then each link.
    pub fn chain(&self, actor: &str) -> Result<Vec<String>, ClusterError> {
        self.rt.block_on(async {
            let found = super::read_entry(&self.buckets.actors, actor)
                .await
                .map_err(super::js_error)?;
            Ok(found
                .map(|f| f.entry.snapshot.into_iter().chain(f.entry.links).collect())
                .unwrap_or_default())
        })
    }

    /// The size of actor `actor`'s last durable state, in bytes: its chain's whole snapshot
    /// and links.
    pub fn snapshot_bytes(&self, actor: &str) -> Result<Option<usize>, ClusterError> {
        self.rt.block_on(async {
            let found = super::read_entry(&self.buckets.actors, actor)
                .await
                .map_err(super::js_error)?;
            let Some(entry) = found.map(|f| f.entry) else {
                return Ok(None);
            };
            let Some(whole) = entry.snapshot else {
                return Ok(None);
            };
            let mut bytes = 0;
            for name in std::iter::once(&whole).chain(&entry.links) {
                let info = self.buckets.snapshots.info(name).await;
                bytes += info.map_err(super::js_error)?.size;
            }
            Ok(Some(bytes))
        })
    }

    /// Puts `bytes` bytes into the snapshots' object store and reads them back (checking
    /// their digest), then deletes them: the time of each.
    pub fn store_round_trip(&self, bytes: usize) -> Result<(Duration, Duration), ClusterError> {
        use tokio::io::AsyncReadExt;
        let data: Vec<u8> = (0..bytes).map(|i| (i * 7 + i / 4096) as u8).collect();
        let name = format!("bench/{}", std::process::id());
        self.rt.block_on(async {
            let store = &self.buckets.snapshots;
            let started = Instant::now();
            store
                .put(
                    super::object_meta(&self.client, &name),
                    &mut data.as_slice(),
                )
                .await
                .map_err(super::js_error)?;
            let put = started.elapsed();
            let started = Instant::now();
            let mut object = store.get(&name).await.map_err(super::js_error)?;
            let mut back = Vec::with_capacity(bytes);
            object
                .read_to_end(&mut back)
                .await
                .map_err(super::js_error)?;
            let get = started.elapsed();
            let _ = store.delete(&name).await;
            if back != data {
                return Err(ClusterError::JetStream(
                    "the object store gave back other bytes".into(),
                ));
            }
            Ok((put, get))
        })
    }

    /// Moves every actor off `node`.
    pub fn drain(&self, node: &str) -> Result<Value, ClusterError> {
        self.request(node, &Admin::Drain)
    }

    /// Moves `actor` to `node`, copying ahead: its owner hands it over as a drain does
    /// (`node` reads the actor's durable chain while the owner runs on, then the owner saves
    /// and releases it, and `node` claims and restores it); an actor with no live owner is
    /// restored on `node`. Returns the phases' times and the nodes' answers.
    pub fn move_actor(&self, actor: &str, node: &str) -> Result<(Move, Value), ClusterError> {
        if !super::valid_node_name(node) {
            return Err(ClusterError::NodeName(node.to_string()));
        }
        let owner = self.rt.block_on(async {
            super::read_entry(&self.buckets.actors, actor)
                .await
                .map_err(super::js_error)
        })?;
        let Some(found) = owner else {
            return Err(ClusterError::JetStream(format!("no actor `{actor}`")));
        };
        let actor = actor.to_string();
        let live_owner = match found.entry.node {
            Some(owner) if owner != node && self.node_listed(&owner)? => Some(owner),
            _ => None,
        };
        match live_owner {
            Some(owner) => {
                let answer = self.request(
                    &owner,
                    &Admin::HandOver {
                        actor,
                        to: node.to_string(),
                    },
                )?;
                let phase = |key: &str| {
                    Duration::from_secs_f64(answer[key].as_f64().unwrap_or(0.0).max(0.0) / 1e3)
                };
                let times = Move {
                    ahead: phase("ahead_ms"),
                    pause: phase("pause_ms"),
                };
                Ok((times, answer))
            }
            None => {
                let started = Instant::now();
                let prefetched = self.request(
                    node,
                    &Admin::Prefetch {
                        actor: actor.clone(),
                    },
                )?;
                let copied = Instant::now();
                let activated = self.request(node, &Admin::Activate { actor })?;
                let times = Move {
                    ahead: copied - started,
                    pause: copied.elapsed(),
                };
                let answer =
                    json!({"prefetched": prefetched, "released": null, "activated": activated});
                Ok((times, answer))
            }
        }
    }
}

/// The phases of a move.
#[derive(Clone, Copy, Debug)]
pub struct Move {
    /// Reading the actor's chain on the target while its owner runs on.
    pub ahead: Duration,
    /// From the owner's release to the actor restored on the target: while no node
    /// answers for it.
    pub pause: Duration,
}

impl Move {
    /// The whole move.
    pub fn total(&self) -> Duration {
        self.ahead + self.pause
    }
}
