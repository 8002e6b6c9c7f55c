//! Durable actors: what is saved to the [`SnapshotStore`], under which keys, and how a
//! server brings it back.
//!
//! Layout (keys of the store; a [`crate::store::LocalStore`] makes them files under the
//! state folder):
//! - `actors/{id}.json`: the actor's record (its module, by bundled name or digest, and its
//!   creation time), written once when it starts;
//! - `actors/{id}.tern`: its last durable snapshot (the format `tern restore` reads): where
//!   the store appends (a [`crate::store::LocalStore`]), a chain file, a link appended after
//!   each message or on passivation and now and then a whole snapshot replacing it
//!   crash-safely; elsewhere a whole snapshot, replaced crash-safely;
//! - `modules/{digest}.wasm`: each uploaded module's bytes, so uploads survive a restart.
//!
//! Guarantees: a save replaces the previous snapshot whole or not at all, or appends a link
//! that a restore reads only when complete; an actor whose
//! record or snapshot is missing or unreadable is skipped at recovery with an error in the
//! log, never a crash; a deleted actor's keys are removed (snapshot first, then record).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_actor::{Actor, ActorModule, ChainWrite, Runtime};
use tern_snapshot::Written;

use crate::ApiError;
pub use crate::hot::HotSnapshots;
use crate::metrics::Metrics;
use crate::store::{SnapshotStore, StoreError};

/// When an actor's state is saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// After every message, before its answer (which says `"durable": true`).
    Message,
    /// After a message when the last save is this old, and when unsaved state reaches this
    /// age: a crash loses at most this much.
    Interval(Duration),
    /// Only when the actor passivates: a crash loses the messages since.
    Passivate,
}

/// The store and the policy, shared by every actor of a server.
pub struct Persistence {
    pub store: Arc<dyn SnapshotStore>,
    pub durability: Durability,
    /// How long an actor may stay idle before it is passivated; `None`: never.
    pub idle: Option<Duration>,
    /// Where saves and restores are counted.
    pub metrics: Arc<Metrics>,
    /// Actors' chains kept in host memory ([`HotSnapshots`]).
    pub hot: Mutex<HotSnapshots>,
}

/// What is needed, beside its snapshot, to bring an actor back.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ActorRecord {
    /// A bundled guest's name or an uploaded module's digest.
    pub module: String,
    pub created_ms: u64,
    /// The OpenAI-compatible session the actor serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The client that made it (when the server has keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Why the actor failed, once it has: a restart keeps it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// In a cluster: when its node is lost, another node restores it at once rather than
    /// at its next message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub eager: bool,
}

fn snapshot_key(id: &str) -> String {
    format!("actors/{id}.tern")
}

fn record_key(id: &str) -> String {
    format!("actors/{id}.json")
}

fn module_key(digest: &str) -> String {
    format!("modules/{digest}.wasm")
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Moved { .. } | StoreError::Fenced(_) => ApiError::moved(e.to_string()),
        e @ StoreError::Remote(_) => ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                crate::error::STORE_UNAVAILABLE,
                format!("the state store is out of reach: {e}"),
            )
        },
        e => ApiError::internal(format!("the state store failed: {e}")),
    }
}

impl Persistence {
    /// Writes the actor's record.
    pub fn record(&self, id: &str, record: &ActorRecord) -> Result<(), ApiError> {
        let bytes = serde_json::to_vec(record).map_err(|e| ApiError::internal(e.to_string()))?;
        self.store.put(&record_key(id), &bytes).map_err(store_error)
    }

    /// Saves the actor's state as its last durable snapshot: where the store appends, a
    /// link of the actor's chain (what changed since its last save) or now and then a whole
    /// snapshot that starts the chain over ([`Actor::save_link`]); elsewhere a whole one.
    pub fn save(&self, id: &str, actor: &mut Actor) -> Result<(), ApiError> {
        let started = Instant::now();
        let key = snapshot_key(id);
        if self.store.appends() {
            let mut failed = None;
            let saved = actor.save_link(false, |s, how| {
                let mut bytes = Vec::new();
                let written = tern_snapshot::encode(s, &mut bytes)?;
                let stored = match how {
                    ChainWrite::Whole => self.store.put(&key, &bytes).map(|()| {
                        self.hot().replace(id, Bytes::from(bytes));
                        written.bytes
                    }),
                    ChainWrite::Append { end } => {
                        self.store.append(&key, end, &bytes).inspect(|&new_end| {
                            self.hot().append(id, end, new_end, bytes);
                        })
                    }
                };
                let file_len = stored.map_err(|e| {
                    let error = std::io::Error::other(e.to_string());
                    failed = Some(e);
                    tern_snapshot::SnapshotError::Write { error }
                })?;
                Ok(Written {
                    file_len,
                    ..written
                })
            });
            if let Some(e) = failed {
                return Err(store_error(e));
            }
            saved?;
        } else {
            let bytes = actor.snapshot()?;
            self.store.put_owned(&key, bytes).map_err(store_error)?;
        }
        Metrics::observe(
            &self.metrics.snapshots_saved,
            started.elapsed().as_secs_f64(),
        );
        Ok(())
    }

    /// A new actor in the state of its last durable snapshot.
    pub fn restore(
        &self,
        id: &str,
        runtime: &Runtime,
        module: &Arc<ActorModule>,
    ) -> Result<Actor, ApiError> {
        let started = Instant::now();
        let unreadable = |e: tern_snapshot::SnapshotError| {
            ApiError::internal(format!("actor `{id}`'s stored snapshot is unreadable: {e}"))
        };
        let kept = self.hot().get(id);
        let segments = match &kept {
            Some(segments) => segments.clone(),
            None => self
                .store
                .get_chain(&snapshot_key(id))
                .map_err(store_error)?
                .filter(|segments| !segments.is_empty())
                .ok_or_else(|| {
                    ApiError::internal(format!("actor `{id}` has no stored snapshot"))
                })?,
        };
        let links = chain_links(&segments).map_err(unreadable)?;
        // Checksums compared beside the restore (see Actor::restore_chain).
        let chain = tern_snapshot::parse_chain_unverified(&links).map_err(unreadable)?;
        let mut actor = Actor::restore_chain(runtime, module, &chain)?;
        if !self.store.appends() {
            actor.restart_chain();
        }
        drop(chain);
        match kept {
            Some(_) => {
                self.metrics.hot_restores.fetch_add(1, Ordering::Relaxed);
            }
            None if segments.len() == 1 => self.hot().replace(id, segments[0].clone()),
            None => {}
        }
        Metrics::observe(
            &self.metrics.snapshots_restored,
            started.elapsed().as_secs_f64(),
        );
        Ok(actor)
    }

    /// Gets this host ready to restore, soon, the chain `segments` holds (see
    /// [`Actor::prepare_restore`]); a chain that cannot be read is left to the restore.
    pub fn prepare_restore(runtime: &Runtime, segments: &[Bytes]) {
        if let Ok(links) = chain_links(segments)
            && let Ok(chain) = tern_snapshot::parse_chain_unverified(&links)
        {
            Actor::prepare_restore(runtime, &chain);
        }
    }

    /// The chains kept in host memory.
    fn hot(&self) -> std::sync::MutexGuard<'_, HotSnapshots> {
        self.hot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes the actor's keys; a failure is logged (the actor is gone from the API).
    pub fn forget(&self, id: &str) {
        self.hot().forget(id);
        for key in [snapshot_key(id), record_key(id)] {
            if let Err(e) = self.store.delete(&key) {
                tracing::error!(%id, error = %e, "cannot delete the actor's stored state");
            }
        }
    }

    /// Gives up the passivated actor `id` to other servers sharing the store.
    pub fn release(&self, id: &str) -> Result<(), ApiError> {
        self.store.release(id).map_err(store_error)
    }

    /// Keeps an uploaded module's bytes under its digest.
    pub fn save_module(&self, digest: &str, wasm: &[u8]) -> Result<(), ApiError> {
        self.store
            .put(&module_key(digest), wasm)
            .map_err(store_error)
    }

    /// An uploaded module's bytes, if stored.
    pub fn load_module(&self, digest: &str) -> Result<Option<Vec<u8>>, ApiError> {
        self.store.get(&module_key(digest)).map_err(store_error)
    }

    /// The stored uploads, as (digest, bytes).
    pub fn modules(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for key in self.store.list()? {
            let Some(digest) = key
                .strip_prefix("modules/")
                .and_then(|k| k.strip_suffix(".wasm"))
            else {
                continue;
            };
            if let Some(bytes) = self.store.get(&key)? {
                out.push((digest.to_string(), bytes));
            }
        }
        Ok(out)
    }

    /// The stored actors that have both a record and a snapshot, as (id, record).
    pub fn actors(&self) -> Result<Vec<(String, ActorRecord)>, StoreError> {
        let keys = self.store.list()?;
        let mut out = Vec::new();
        for key in &keys {
            let Some(id) = key
                .strip_prefix("actors/")
                .and_then(|k| k.strip_suffix(".json"))
            else {
                continue;
            };
            if !keys.contains(&snapshot_key(id)) {
                tracing::error!(%id, "skipping a stored actor without a snapshot");
                continue;
            }
            let Some(bytes) = self.store.get(key)? else {
                continue;
            };
            match serde_json::from_slice::<ActorRecord>(&bytes) {
                Ok(record) => out.push((id.to_string(), record)),
                Err(e) => tracing::error!(%id, error = %e, "skipping an unreadable actor record"),
            }
        }
        Ok(out)
    }
}

/// A chain's links from its pieces as a store gives them ([`SnapshotStore::get_chain`]): a
/// chain file, then each link without padding.
fn chain_links(segments: &[Bytes]) -> Result<Vec<&[u8]>, tern_snapshot::SnapshotError> {
    let Some((first, appended)) = segments.split_first() else {
        return Ok(Vec::new());
    };
    let mut links = tern_snapshot::split_links(first)?.links;
    links.extend(appended.iter().map(|link| link.as_ref()));
    Ok(links)
}
