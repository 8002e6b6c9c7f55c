//! Snapshots of an actor's whole state, and restores of them into fresh actors.
//!
//! A snapshot holds the linear memory, every global the module defines (reached through the
//! exports [`crate::instrument`] adds at load), the host side of the `tern` ABI (open models
//! by name, SHA-256 and numerics, each session's tokens and KV cache, the last error message)
//! and the identity of the module. The byte layout is [`tern_snapshot`]'s.
//!
//! Guarantees:
//! - Snapshots are taken only between messages: [`Actor::save`] takes `&mut self`, so no
//!   guest call is in flight, and each actor has its own store, so other actors run on.
//! - A restore either yields an actor whose memory, globals, sessions and KV caches equal the
//!   snapshot's bit for bit, or refuses with a message naming what differs (the module, a
//!   missing model, a model of another architecture or KV shape or other contents: its
//!   SHA-256, or in a version-1 snapshot its sampled digest; the ABI version).
//! - [`Actor::continuation`] says how a restored actor continues: bit for bit where every
//!   model's [`tern_model::Numerics`] equal those in the snapshot, field by field; otherwise
//!   (CUDA to CPU, say) validly but not bitwise, naming the fields that differ, as later tokens
//!   may differ from an uninterrupted run. A version-1 snapshot records no numerics: there
//!   its device label is compared with [`Actor::compute_label`].

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_model::engine::SourceUnits;
use tern_model::{Model, Session};
use tern_snapshot::{
    self as format, Chain, ChunkHashes, Global, HostInfo, KvLayers, KvPiece, KvWrite, Manifest,
    ModelRef, ModuleRef, SessionInfo, SnapshotView, SnapshotWrite, ValType,
};
use wasmtime::{V128, Val};

use crate::abi::ABI_VERSION;
use crate::actor::{Actor, ActorModule};
use crate::budget::KvReservation;
use crate::incremental::{Lineage, LinkParts};
use crate::models::{SessionSlot, session_kv_bytes};
use crate::registry::OpenError;
use crate::{ActorError, Runtime};

/// A restored session: its model's index, the session, its share of the budget.
type RestoredSession = (usize, Session, KvReservation);

fn refuse(what: String) -> ActorError {
    ActorError::Incompatible(what)
}

impl Actor {
    /// Writes this actor's state to `path`, crash-safely (a temporary file, fsync, rename):
    /// an interrupted save leaves any earlier snapshot at `path` intact. Returns the bytes
    /// written.
    pub fn save(&mut self, path: &Path) -> Result<u64, ActorError> {
        self.capture(|snapshot| format::save(path, snapshot).map(|w| w.bytes))
    }

    /// This actor's state as snapshot bytes.
    pub fn snapshot(&mut self) -> Result<Vec<u8>, ActorError> {
        self.capture(format::to_bytes)
    }

    /// Gathers the state, as a whole snapshot, and lends it to `write`.
    fn capture<R>(
        &mut self,
        write: impl FnOnce(&SnapshotWrite<'_>) -> Result<R, format::SnapshotError>,
    ) -> Result<R, ActorError> {
        self.capture_as(None, write)
    }

    /// Gathers the state and lends it to `write`: a whole snapshot, or with `link` a link
    /// holding the pages it lists and each session's positions from its `kept` mark on.
    pub(crate) fn capture_as<R>(
        &mut self,
        link: LinkParts,
        write: impl FnOnce(&SnapshotWrite<'_>) -> Result<R, format::SnapshotError>,
    ) -> Result<R, ActorError> {
        if let Some(fault) = &self.poisoned {
            return Err(ActorError::Poisoned(fault.clone()));
        }
        if let Some(why) = &self.module.info.mutable_tables {
            return Err(ActorError::Snapshot(format!(
                "the module's tables can change at run time ({why}), and tables are not part of a snapshot"
            )));
        }
        let globals = self.globals()?;
        let state = self.store.data();
        let open = state.models.open_models();
        let models = open.iter().map(model_ref).collect();
        let mut sessions = Vec::new();
        let mut caches = Vec::new();
        for (slot, entry) in state.models.session_slots().iter().enumerate() {
            let Some(SessionSlot {
                model,
                session,
                kept,
                ..
            }) = entry
            else {
                continue;
            };
            let kv_from = match link {
                Some(_) => (*kept).min(session.tokens.len()),
                None => 0,
            };
            sessions.push(SessionInfo {
                slot: slot as u32,
                model: *model as u32,
                n_ctx: session.n_ctx() as u32,
                tokens: session.tokens.clone(),
                kv_from: kv_from as u32,
                kv_type: kv_type(open[*model].kv_type()),
            });
            let (cache, first) = session
                .host_kv_from(&open[*model], kv_from)
                .map_err(|e| ActorError::Snapshot(format!("reading a KV cache: {e}")))?;
            caches.push((cache, kv_from - first));
        }
        let kv = caches
            .iter()
            .map(|(cache, from)| {
                let skip = from * cache.kv_dim();
                let n_layer = cache.n_layer();
                let (k, v) = match cache.kv_type() {
                    tern_model::KvType::F32 => {
                        let (k, v) = layers(n_layer, skip, |l| cache.layer(l));
                        (KvLayers::F32(k), KvLayers::F32(v))
                    }
                    tern_model::KvType::F16 => {
                        let (k, v) = layers(n_layer, skip, |l| cache.layer_half(l));
                        (KvLayers::F16(k), KvLayers::F16(v))
                    }
                };
                KvWrite {
                    kv_dim: cache.kv_dim(),
                    n_tokens: cache.len - from,
                    k,
                    v,
                }
            })
            .collect();
        let manifest = Manifest {
            abi_version: ABI_VERSION,
            module: ModuleRef {
                name: self.module.name().to_string(),
                digest: self.module.digest().to_string(),
            },
            memory_bytes: self.memory.data_size(&self.store) as u64,
            globals,
            models,
            sessions,
            host: HostInfo {
                device: compute_label(state.models.open_models()),
                last_error: state.last_error.clone(),
                session_slots: state.models.session_slots().len() as u32,
                clock_unix_ms: state.clock.reading(),
            },
            link: link.as_ref().map(|(link, _)| link.clone()),
        };
        let memory = self.memory.data(&self.store);
        let changed = link
            .as_ref()
            .map(|(_, pages)| pages.below(memory.len() / format::PAGE_BYTES));
        write(&SnapshotWrite {
            manifest: &manifest,
            memory,
            kv,
            changed_pages: changed.as_deref(),
        })
        .map_err(ActorError::from)
    }

    /// Every global the module defines, with its value's bits.
    fn globals(&mut self) -> Result<Vec<Global>, ActorError> {
        let mut out = Vec::new();
        for slot in &self.module.info.globals {
            let global = self
                .instance
                .get_global(&mut self.store, &slot.export)
                .ok_or_else(|| ActorError::Snapshot(format!("global `{}` is gone", slot.export)))?;
            let (ty, bits) = match global.get(&mut self.store) {
                Val::I32(x) => (ValType::I32, u128::from(x as u32)),
                Val::I64(x) => (ValType::I64, u128::from(x as u64)),
                Val::F32(bits) => (ValType::F32, u128::from(bits)),
                Val::F64(bits) => (ValType::F64, u128::from(bits)),
                Val::V128(v) => (ValType::V128, v.as_u128()),
                _ if !slot.mutable => continue,
                _ => {
                    return Err(ActorError::Snapshot(format!(
                        "global `{}` is a mutable reference, which a snapshot cannot hold",
                        slot.export
                    )));
                }
            };
            out.push(Global {
                name: slot.export.clone(),
                ty,
                mutable: slot.mutable,
                bits,
            });
        }
        Ok(out)
    }

    /// A new actor of `module` in exactly the state `snapshot`, a whole snapshot, holds. Its
    /// `tern_init` does not run: the restored memory already holds what it set up. Its next
    /// [link](Actor::capture_link) continues `snapshot`.
    pub fn restore(
        runtime: &Runtime,
        module: &Arc<ActorModule>,
        snapshot: &SnapshotView<'_>,
    ) -> Result<Actor, ActorError> {
        if snapshot.manifest.link.is_some() {
            return Err(refuse(
                "the snapshot is a link of a chain, which restores only with the snapshots before it (its chain file)".into(),
            ));
        }
        let pieces = (0..snapshot.manifest.sessions.len())
            .map(|i| Ok(vec![KvPiece::whole(snapshot.kv(i)?)]))
            .collect::<Result<Vec<_>, format::SnapshotError>>()?;
        let mut actor = Self::restore_parts(
            runtime,
            module,
            &snapshot.manifest,
            |dst, dirty| snapshot.restore_pages(dst, dirty),
            &pieces,
            None,
        )?;
        actor.lineage = Some(Lineage::whole(snapshot));
        Ok(actor)
    }

    /// Gets this host ready for a restore of `chain` known to come soon (a move's copy
    /// ahead, while the actor still runs elsewhere): each session's model makes the memory
    /// of its KV cache ready now ([`Model::keep_session_memory`]), so that the restore only
    /// copies. Sessions whose model is missing or differs, or which the actor's KV budget
    /// would refuse, are left to the restore to refuse.
    pub fn prepare_restore(runtime: &Runtime, chain: &Chain<'_>) {
        let m = chain.manifest();
        for info in &m.sessions {
            let Some(Ok(model)) = m
                .models
                .get(info.model as usize)
                .map(|r| find_model(runtime, r))
            else {
                continue;
            };
            let n_ctx = info.n_ctx as usize;
            if info.kv_type == kv_type(model.kv_type())
                && session_kv_bytes(&model, n_ctx) <= runtime.limits.kv_bytes
            {
                // A size the model refuses is the restore's to report.
                let _ = model.keep_session_memory(n_ctx);
            }
        }
    }

    /// A new actor of `module` in exactly the state `chain`'s newest snapshot holds; see
    /// [`restore`](Self::restore). Its next link continues the chain.
    ///
    /// A chain read by [`format::parse_chain_unverified`] has its checksums compared while the
    /// actor is restored: the restore does not wait for the whole file to be hashed first, and
    /// a mismatch discards the restored actor and is the error returned. Where the sessions'
    /// models copy KV caches through staging buffers (a GPU), the copy hashes the checksum
    /// chunks that hold them as it reads them ([`Model::reads_kv_units`]), so those bytes
    /// cross the host's memory once for both; other threads hash the rest.
    pub fn restore_chain(
        runtime: &Runtime,
        module: &Arc<ActorModule>,
        chain: &Chain<'_>,
    ) -> Result<Actor, ActorError> {
        let pieces = (0..chain.manifest().sessions.len())
            .map(|i| chain.kv(i).map(<[KvPiece<'_>]>::to_vec))
            .collect::<Result<Vec<_>, format::SnapshotError>>()?;
        let restore = |units: Option<&dyn SourceUnits>| {
            Self::restore_parts(
                runtime,
                module,
                chain.manifest(),
                |dst, dirty| chain.restore_pages(dst, dirty),
                &pieces,
                units,
            )
        };
        let (restored, verified, check) = if chain.is_verified() {
            (restore(None), chain.verify(), Duration::ZERO)
        } else {
            // Where the sessions' models copy the KV bytes through staging buffers, the copy
            // hashes the checksum chunks holding them as it reads them; another thread hashes
            // the rest, and the check hashes whatever neither did.
            let hashes = chain.chunk_hashes();
            let units = ChainUnits(&hashes);
            let copy_hashes = sessions_read_units(runtime, chain.manifest());
            let kv = kv_ranges(&pieces);
            let by_copy = |r: &Range<usize>| {
                copy_hashes && kv.iter().any(|k| k.start < r.end && r.start < k.end)
            };
            std::thread::scope(|scope| {
                let hash = scope.spawn(|| {
                    let started = Instant::now();
                    hashes.hash_rest(|r| !by_copy(r));
                    started.elapsed()
                });
                let restored = restore(copy_hashes.then_some(&units as &dyn SourceUnits));
                let check = hash.join();
                let started = Instant::now();
                let verified = chain.verify_hashed(&hashes);
                match check {
                    Ok(check) => (restored, verified, check + started.elapsed()),
                    Err(_) => (
                        restored,
                        Err(format::SnapshotError::Corrupt(
                            "the thread comparing its checksums panicked".into(),
                        )),
                        Duration::ZERO,
                    ),
                }
            })
        };
        // A damaged chain explains whatever else went wrong.
        let verified = verified?;
        let mut actor = restored?;
        actor.lineage = Some(Lineage::of(chain, verified.head()));
        if let Some(phases) = &mut actor.restored {
            phases.check = check;
        }
        Ok(actor)
    }

    /// A restore from a manifest, a memory writer (`restore_pages`) and each session's KV
    /// pieces, read through `units` where the models can; its lineage is for the caller to
    /// set.
    fn restore_parts(
        runtime: &Runtime,
        module: &Arc<ActorModule>,
        m: &Manifest,
        restore_pages: impl FnOnce(
            &mut [u8],
            &mut dyn FnMut(usize) -> bool,
        ) -> Result<(), format::SnapshotError>,
        pieces: &[Vec<KvPiece<'_>>],
        units: Option<&dyn SourceUnits>,
    ) -> Result<Actor, ActorError> {
        if m.abi_version != ABI_VERSION {
            return Err(refuse(format!(
                "the snapshot uses guest ABI version {}, this host implements {ABI_VERSION}",
                m.abi_version
            )));
        }
        if m.module.digest != module.digest() {
            return Err(refuse(format!(
                "the snapshot was taken with module `{}` (sha256 {}), not with `{}` (sha256 {})",
                m.module.name,
                m.module.digest,
                module.name(),
                module.digest()
            )));
        }
        // The sessions and their KV caches are restored on a thread of their own, beside the
        // instance and its memory: neither needs the other until the actor is assembled.
        let (sessions, instance) = std::thread::scope(|scope| {
            let sessions = scope.spawn(|| {
                let started = Instant::now();
                let open = m
                    .models
                    .iter()
                    .map(|r| find_model(runtime, r))
                    .collect::<Result<Vec<_>, _>>()?;
                let (sessions, made) = restore_sessions(runtime, m, pieces, &open, units)?;
                Ok::<_, ActorError>((open, sessions, made, started.elapsed() - made))
            });
            let instance = (|| {
                let started = Instant::now();
                let expected = usize::try_from(m.memory_bytes).unwrap_or(usize::MAX);
                let mut actor =
                    tern_memory::expecting(expected, || Actor::instantiate(runtime, module))?;
                let instantiated = started.elapsed();
                let grow = actor.restore_memory(m, restore_pages)?;
                actor.restore_globals(&m.globals)?;
                actor.clear_written()?;
                let memory = started.elapsed() - instantiated - grow;
                Ok::<_, ActorError>((actor, instantiated, grow, memory))
            })();
            let sessions = sessions.join().unwrap_or_else(|_| {
                Err(ActorError::Snapshot(
                    "the thread restoring the KV caches panicked".into(),
                ))
            });
            (sessions, instance)
        });
        let (open, sessions, made, kv) = sessions?;
        let (mut actor, instantiate, grow, memory) = instance?;
        actor.restored = Some(RestorePhases {
            check: Duration::ZERO,
            sessions: made,
            kv,
            instantiate,
            grow,
            memory,
        });
        let state = actor.store.data_mut();
        state.models.restore(open, sessions);
        state.last_error = m.host.last_error.clone();
        state.clock.restore(m.host.clock_unix_ms);
        Ok(actor)
    }

    fn restore_memory(
        &mut self,
        m: &Manifest,
        restore_pages: impl FnOnce(
            &mut [u8],
            &mut dyn FnMut(usize) -> bool,
        ) -> Result<(), format::SnapshotError>,
    ) -> Result<Duration, ActorError> {
        let page = format::PAGE_BYTES as u64;
        let want = m.memory_bytes / page;
        let started = Instant::now();
        let now = self.memory.size(&self.store);
        if want < now {
            return Err(refuse(format!(
                "the snapshot's memory ({want} pages) is smaller than the module's initial memory ({now} pages)"
            )));
        }
        if want > now {
            self.memory.grow(&mut self.store, want - now).map_err(|e| {
                refuse(format!(
                    "cannot grow the actor's memory to {} bytes: {e}",
                    want * page
                ))
            })?;
        }
        let grow = started.elapsed();
        let dirty = self.module.info.initialized_pages.clone();
        let memory = self.memory.data_mut(&mut self.store);
        match dirty {
            Some(pages) => restore_pages(memory, &mut |p| pages.contains(&(p as u64)))?,
            None => restore_pages(memory, &mut |_| true)?,
        }
        Ok(grow)
    }

    fn restore_globals(&mut self, globals: &[Global]) -> Result<(), ActorError> {
        let slots = &self.module.info.globals;
        for slot in slots {
            let saved = globals.iter().find(|g| g.name == slot.export);
            if saved.is_none() && slot.mutable && is_number(slot.ty) {
                return Err(refuse(format!(
                    "the snapshot has no value for global `{}`",
                    slot.export
                )));
            }
        }
        for saved in globals {
            let slot = slots
                .iter()
                .find(|s| s.export == saved.name)
                .ok_or_else(|| refuse(format!("the module has no global `{}`", saved.name)))?;
            let global = self
                .instance
                .get_global(&mut self.store, &slot.export)
                .ok_or_else(|| refuse(format!("the module has no global `{}`", saved.name)))?;
            let value = match saved.ty {
                ValType::I32 => Val::I32(saved.bits as u32 as i32),
                ValType::I64 => Val::I64(saved.bits as u64 as i64),
                ValType::F32 => Val::F32(saved.bits as u32),
                ValType::F64 => Val::F64(saved.bits as u64),
                ValType::V128 => Val::V128(V128::from(saved.bits)),
            };
            if saved.mutable != slot.mutable || !same_type(&value, slot.ty) {
                return Err(refuse(format!(
                    "global `{}` differs in type from the module's",
                    saved.name
                )));
            }
            if slot.mutable {
                global.set(&mut self.store, value).map_err(|e| {
                    ActorError::Snapshot(format!("cannot set global `{}`: {e:#}", saved.name))
                })?;
            } else if !same_bits(&global.get(&mut self.store), &value) {
                return Err(refuse(format!(
                    "constant global `{}` differs from the module's",
                    saved.name
                )));
            }
        }
        Ok(())
    }
}

fn is_number(ty: wasmparser::ValType) -> bool {
    !matches!(ty, wasmparser::ValType::Ref(_))
}

fn same_type(value: &Val, ty: wasmparser::ValType) -> bool {
    use wasmparser::ValType as W;
    matches!(
        (value, ty),
        (Val::I32(_), W::I32)
            | (Val::I64(_), W::I64)
            | (Val::F32(_), W::F32)
            | (Val::F64(_), W::F64)
            | (Val::V128(_), W::V128)
    )
}

fn same_bits(a: &Val, b: &Val) -> bool {
    match (a, b) {
        (Val::I32(x), Val::I32(y)) => x == y,
        (Val::I64(x), Val::I64(y)) => x == y,
        (Val::F32(x), Val::F32(y)) => x == y,
        (Val::F64(x), Val::F64(y)) => x == y,
        (Val::V128(x), Val::V128(y)) => x.as_u128() == y.as_u128(),
        _ => false,
    }
}

fn model_ref(model: &Arc<Model>) -> ModelRef {
    let c = model.config();
    let n = model.numerics();
    ModelRef {
        name: model.name.clone(),
        sha256: Some(model.digest.to_string()),
        legacy_digest: model.legacy_digest,
        numerics: Some(format::Numerics {
            backend: n.backend,
            precision: n.precision,
            kernels: n.kernels,
            architecture: n.architecture,
        }),
        arch: "llama".into(),
        n_layer: c.n_layer as u32,
        n_head_kv: c.n_head_kv as u32,
        head_dim: c.head_dim as u32,
        n_vocab: c.n_vocab as u32,
    }
}

/// The runtime's model that `wanted` names, if it is the same model.
fn find_model(runtime: &Runtime, wanted: &ModelRef) -> Result<Arc<Model>, ActorError> {
    let model = runtime.models.open(&wanted.name).map_err(|e| match e {
        OpenError::Unknown { .. } => refuse(format!(
            "the snapshot needs model `{}`, and this host offers {}",
            wanted.name,
            runtime.models.offered()
        )),
        other => refuse(format!("the snapshot needs {other}")),
    })?;
    let model = &model;
    let have = model_ref(model);
    let fields = [
        ("architecture", wanted.arch.clone(), have.arch.clone()),
        (
            "layers",
            wanted.n_layer.to_string(),
            have.n_layer.to_string(),
        ),
        (
            "KV heads",
            wanted.n_head_kv.to_string(),
            have.n_head_kv.to_string(),
        ),
        (
            "head size",
            wanted.head_dim.to_string(),
            have.head_dim.to_string(),
        ),
        (
            "vocabulary",
            wanted.n_vocab.to_string(),
            have.n_vocab.to_string(),
        ),
        match &wanted.sha256 {
            Some(sha256) => ("sha256", sha256.clone(), model.digest.to_string()),
            // A version-1 snapshot identifies models by a sampled FNV-1a only.
            None => (
                "sampled digest",
                format!("{:016x}", wanted.legacy_digest),
                format!("{:016x}", model.legacy_digest),
            ),
        },
    ];
    for (what, want, got) in fields {
        if want != got {
            return Err(refuse(format!(
                "model `{}` differs from the snapshot's: {what} {got}, the snapshot has {want}",
                wanted.name
            )));
        }
    }
    Ok(model.clone())
}

/// The snapshot's sessions, KV caches filled, in their slots, each with its share of the
/// KV-cache budget (reserved before the cache is made); and the time making the empty
/// sessions took.
fn restore_sessions(
    runtime: &Runtime,
    m: &Manifest,
    pieces: &[Vec<KvPiece<'_>>],
    open: &[Arc<Model>],
    units: Option<&dyn SourceUnits>,
) -> Result<(Vec<Option<RestoredSession>>, Duration), ActorError> {
    let mut made = Duration::ZERO;
    let mut slots: Vec<Option<RestoredSession>> = (0..m.host.session_slots).map(|_| None).collect();
    let mut reserved = 0;
    for (i, info) in m.sessions.iter().enumerate() {
        let model = open.get(info.model as usize).ok_or_else(|| {
            ActorError::Snapshot(format!("session {i} names model {}", info.model))
        })?;
        let (want, have) = (info.kv_type, kv_type(model.kv_type()));
        if want != have {
            return Err(refuse(format!(
                "session {} keeps an {} KV cache, and model `{}` here keeps {} caches",
                info.slot,
                want.name(),
                model.name,
                have.name()
            )));
        }
        let reservation = KvReservation::take(
            &runtime.kv,
            session_kv_bytes(model, info.n_ctx as usize),
            reserved,
            runtime.limits.kv_bytes,
        )
        .map_err(|e| refuse(format!("session {}: {e}", info.slot)))?;
        reserved += reservation.bytes();
        let t = Instant::now();
        let mut session = model
            .new_session(info.n_ctx as usize)
            .map_err(|e| refuse(format!("session {}: {e}", info.slot)))?;
        made += t.elapsed();
        let bad_kv = |e: format::SnapshotError| tern_model::ModelError::Format(e.to_string());
        let session_pieces = pieces.get(i).map_or(&[][..], Vec::as_slice);
        for piece in session_pieces {
            let layer = |layer| {
                Ok((
                    piece.k_layer_bytes(layer).map_err(bad_kv)?,
                    piece.v_layer_bytes(layer).map_err(bad_kv)?,
                ))
            };
            session
                .refill(model, piece.from, piece.count, layer, units)
                .map_err(|e| ActorError::Snapshot(format!("restoring a KV cache: {e}")))?;
        }
        session.tokens = info.tokens.clone();
        let slot = slots.get_mut(info.slot as usize).ok_or_else(|| {
            ActorError::Snapshot(format!("session slot {} out of range", info.slot))
        })?;
        *slot = Some((info.model as usize, session, reservation));
    }
    Ok((slots, made))
}

/// A chain's checksum chunks as the units a model's KV copy reads.
struct ChainUnits<'h, 'a>(&'h ChunkHashes<'a>);

impl SourceUnits for ChainUnits<'_, '_> {
    fn ranges(&self) -> &[Range<usize>] {
        self.0.ranges()
    }

    fn read(&self, i: usize, take: &mut dyn FnMut(&[u8])) {
        self.0.read(i, take);
    }
}

/// Whether every session of `m` restores into a model that reads its KV bytes through
/// source units ([`Model::reads_kv_units`]).
fn sessions_read_units(runtime: &Runtime, m: &Manifest) -> bool {
    m.sessions.iter().all(|s| {
        m.models
            .get(s.model as usize)
            .and_then(|r| find_model(runtime, r).ok())
            .is_some_and(|model| model.reads_kv_units())
    })
}

/// The address ranges of every layer's keys and values in `pieces`.
fn kv_ranges(pieces: &[Vec<KvPiece<'_>>]) -> Vec<Range<usize>> {
    let span = |b: &[u8]| b.as_ptr() as usize..b.as_ptr() as usize + b.len();
    let mut ranges = Vec::new();
    for piece in pieces.iter().flatten() {
        for layer in 0..piece.n_layer() {
            for bytes in [piece.k_layer_bytes(layer), piece.v_layer_bytes(layer)] {
                ranges.extend(bytes.ok().map(span));
            }
        }
    }
    ranges
}

/// Keys and values, layer by layer.
type Layers<'a, T> = (Vec<&'a [T]>, Vec<&'a [T]>);

/// Each of `n_layer` layers' keys and values as `layer` lends them, from value `skip` on.
fn layers<'a, T>(
    n_layer: usize,
    skip: usize,
    layer: impl Fn(usize) -> (&'a [T], &'a [T]),
) -> Layers<'a, T> {
    (0..n_layer)
        .map(|l| {
            let (k, v) = layer(l);
            (&k[skip..], &v[skip..])
        })
        .unzip()
}

/// Where a restore's time went, after the snapshot was read: the sessions and their KV
/// caches are restored beside the instance and its memory (and, for a chain read unverified,
/// the checksums compared beside both), so the phases overlap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestorePhases {
    /// The snapshots' checksums compared, beside everything below (zero when the chain was
    /// verified before the restore: see [`Actor::restore_chain`]).
    pub check: Duration,
    /// Models found and empty sessions made (their KV caches allocated).
    pub sessions: Duration,
    /// The sessions' KV caches written back (to the device, on a GPU).
    pub kv: Duration,
    /// The module instantiated (its memory and dirty-page map made).
    pub instantiate: Duration,
    /// Linear memory grown to the snapshot's size (committed, and on a GPU registered with
    /// the device, which pins its pages).
    pub grow: Duration,
    /// Linear memory and globals written back.
    pub memory: Duration,
}

impl Actor {
    /// Where this actor's restore spent its time, if it was restored.
    pub fn restore_phases(&self) -> Option<RestorePhases> {
        self.restored
    }
}

/// The snapshot format's name for a model's KV cache type.
fn kv_type(t: tern_model::KvType) -> format::KvType {
    match t {
        tern_model::KvType::F32 => format::KvType::F32,
        tern_model::KvType::F16 => format::KvType::F16,
    }
}

/// Where the forward passes of `models` compute, or where the actor's memory lives when it
/// opened no model.
pub fn compute_label(models: &[Arc<Model>]) -> String {
    let labels: Vec<String> = models.iter().map(|m| m.compute_label()).collect();
    if labels.is_empty() {
        "no model".into()
    } else {
        labels.join(", ")
    }
}

impl Actor {
    /// Where this actor's forward passes compute, as its snapshots record it.
    pub fn compute_label(&self) -> String {
        compute_label(self.store.data().models.open_models())
    }

    /// How this actor, restored from a snapshot whose manifest is `snapshot`, continues: see
    /// [`Continuation`].
    pub fn continuation(&self, snapshot: &Manifest) -> Continuation {
        continuation(snapshot, self.store.data().models.open_models())
    }
}

/// How a restored actor continues from its snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Continuation {
    /// Every model computes with the numerics it was snapshotted with: later tokens equal an
    /// uninterrupted run's, bit for bit.
    Bitwise,
    /// Some numerics differ: the continuation is valid, but later tokens may differ from an
    /// uninterrupted run. `differs` names each difference, `"backend cpu → cuda"` (after the
    /// model's name when the snapshot has several models); for a version-1 snapshot, the
    /// device labels, `"device cpu fast → cuda …"`.
    Valid { differs: Vec<String> },
}

/// Compares each of the snapshot's models' numerics with those of `open`, the restored
/// actor's models in the same order; a version-1 snapshot by its device label.
fn continuation(snapshot: &Manifest, open: &[Arc<Model>]) -> Continuation {
    let mut differs = Vec::new();
    if snapshot.models.iter().any(|m| m.numerics.is_none()) {
        let (was, now) = (&snapshot.host.device, compute_label(open));
        if *was != now {
            differs.push(format!("device {was} → {now}"));
        }
    } else {
        let several = snapshot.models.len() > 1;
        for (i, wanted) in snapshot.models.iter().enumerate() {
            let (Some(was), Some(model)) = (&wanted.numerics, open.get(i)) else {
                differs.push(format!("model `{}` is not open", wanted.name));
                continue;
            };
            let was = tern_model::Numerics {
                backend: was.backend.clone(),
                precision: was.precision.clone(),
                kernels: was.kernels.clone(),
                architecture: was.architecture.clone(),
            };
            for difference in was.differences(&model.numerics()) {
                differs.push(if several {
                    format!("`{}` {difference}", wanted.name)
                } else {
                    difference
                });
            }
        }
    }
    if differs.is_empty() {
        Continuation::Bitwise
    } else {
        Continuation::Valid { differs }
    }
}
