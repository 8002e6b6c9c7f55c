//! [`Engine`]: the one seam between a [`crate::Model`] and the backends that run it.
//!
//! A backend (the CPU reference in `llama/cpu.rs`, CUDA in `llama/cuda/`, wgpu in
//! `llama/wgpu/`) implements six things: describe itself and its numerics, open a session's
//! state, run one step over several sessions, write a session's KV cache out and read one
//! back. Everything above (sessions, snapshots, actors, the server) speaks to this trait
//! only; which backends a build has is decided in one place (`llama::gpu_engine`).
//!
//! Batch invariance is part of the contract: what `step` gives a session is the same bits
//! whatever other sessions share the step. The CPU keeps it by construction (each output
//! element is one fixed-order reduction, and a prefill's bits equal one-token decode's).
//! CUDA runs a step's sessions together with the kernels a session alone runs, whose
//! results for one position never depend on the others (its tensor-core prefill of long
//! prompts, which rounds differently, a session at a time). The wgpu engine runs a step's
//! sessions one after another, each on its own.

use std::any::Any;
use std::borrow::Cow;
use std::ops::Range;

use crate::ModelError;
use crate::llama::cpu::KvCache;
use crate::numerics::Numerics;
use crate::steps::StepStats;
use crate::top::Candidate;

/// A session's state on one engine (its KV cache and whatever the backend keeps with it). It
/// may move between threads (a restore makes sessions beside the actor's instance).
pub trait SessionState: Any + Send {
    /// Positions filled.
    fn filled(&self) -> usize;
    /// Positions it can hold.
    fn n_ctx(&self) -> usize;
    /// Forgets every position from `len` on.
    fn truncate(&mut self, len: usize);
}

/// Implements [`SessionState`] for a backend's session type that has `len` and `n_ctx`
/// fields and a `truncate(len)` method (every backend's does).
macro_rules! session_state {
    ($session:ty) => {
        impl $crate::engine::SessionState for $session {
            fn filled(&self) -> usize {
                self.len
            }

            fn n_ctx(&self) -> usize {
                self.n_ctx
            }

            fn truncate(&mut self, len: usize) {
                <$session>::truncate(self, len);
            }
        }
    };
}
pub(crate) use session_state;

/// One session's part of a step.
pub struct StepItem<'a> {
    pub state: &'a mut dyn SessionState,
    /// Its new positions' tokens (one for a decode step, more for a prefill).
    pub tokens: &'a [u32],
    /// Where the last position's logits go (`n_vocab`), if wanted.
    pub logits: Option<&'a mut [f32]>,
    /// Where the last position's `top.len()` largest logits go, in [`crate::top`]'s order
    /// (empty: none wanted).
    pub top: &'a mut [Candidate],
}

/// Each layer's keys and values of some positions of a saved cache, `(positions, kv_dim)`
/// little-endian f32 bytes each, by layer index (the bytes live for `'a`, the function for
/// `'f`).
pub type LayerBytes<'a, 'f> = dyn Fn(usize) -> Result<(&'a [u8], &'a [u8]), ModelError> + 'f;

/// The bytes a KV write reads, seen in units something else needs whole (a snapshot's
/// checksum chunks): a backend that copies them through staging buffers takes each unit
/// that holds any of its bytes through [`read`](Self::read) once, copying what it needs of
/// each block while the block is still in the core's cache, so that whatever `read` does with
/// the bytes (hash them) costs no pass over memory of its own.
pub trait SourceUnits: Sync {
    /// The units' address ranges, ascending and disjoint.
    fn ranges(&self) -> &[Range<usize>];
    /// Hands every byte of unit `i` to `take`, in order, in blocks that are sub-slices of the
    /// unit's own memory.
    fn read(&self, i: usize, take: &mut dyn FnMut(&[u8]));
}

/// A backend that runs a model's forward pass. See the module docs.
pub trait Engine: Any + Send + Sync {
    /// Where and how it computes, for people ("cpu fast").
    fn label(&self) -> String;
    /// What decides its bits, field by field ([`crate::numerics`]).
    fn numerics(&self) -> Numerics;
    /// A new, empty session of `n_ctx` positions.
    fn open_session(&self, n_ctx: usize) -> Result<Box<dyn SessionState>, ModelError>;
    /// Makes the memory of a session of `n_ctx` positions ready for the next
    /// [`open_session`](Self::open_session) of that size, where the engine keeps such memory
    /// (a restore known to come soon); elsewhere nothing.
    fn keep_session_memory(&self, n_ctx: usize) -> Result<(), ModelError> {
        let _ = n_ctx;
        Ok(())
    }
    /// Appends each item's tokens to its session and writes the outputs it asks for. The
    /// items' arguments are checked before any runs; on an error no session has changed.
    fn step(&self, items: &mut [StepItem<'_>]) -> Result<(), ModelError>;
    /// The step scheduler's counters, where the engine gathers concurrent steps.
    fn step_stats(&self) -> StepStats {
        StepStats::default()
    }
    /// Whether a step's sessions share its passes over the weights (each weight read once a
    /// step); an engine without batched kernels runs them one after another.
    fn batches_steps(&self) -> bool {
        true
    }
    /// The session's KV cache on the host, at least its filled positions from `from` on, and
    /// the session position of the cache's first position: borrowed whole (first 0) where it
    /// already lives on the host, else copied from `from` on (first `from`). A snapshot's
    /// state writer; an incremental snapshot asks only for the positions it stores.
    fn read_kv<'s>(
        &self,
        state: &'s dyn SessionState,
        from: usize,
    ) -> Result<(Cow<'s, KvCache>, usize), ModelError>;
    /// Fills the session's positions `from..from + len` from saved layers and makes
    /// `from + len` its length: a snapshot's state reader, called for each piece of a cache
    /// in position order (`from + len` is checked against the session's size by the caller).
    /// A backend that [reads units](Self::reads_kv_units) takes the units of `units` that
    /// hold any of the layers' bytes through [`SourceUnits::read`]; the others ignore them.
    fn write_kv(
        &self,
        state: &mut dyn SessionState,
        from: usize,
        len: usize,
        layer: &LayerBytes<'_, '_>,
        units: Option<&dyn SourceUnits>,
    ) -> Result<(), ModelError>;
    /// Whether [`write_kv`](Self::write_kv) reads the units it is given.
    fn reads_kv_units(&self) -> bool {
        false
    }
}

/// `state` as the backend's own session type `T`, or an error (a session of another
/// engine).
pub(crate) fn own_mut<T: SessionState>(state: &mut dyn SessionState) -> Result<&mut T, ModelError> {
    let any: &mut dyn Any = state;
    any.downcast_mut::<T>()
        .ok_or_else(|| ModelError::Invalid("a session of another backend".into()))
}

/// [`own_mut`], shared.
pub(crate) fn own<T: SessionState>(state: &dyn SessionState) -> Result<&T, ModelError> {
    let any: &dyn Any = state;
    any.downcast_ref::<T>()
        .ok_or_else(|| ModelError::Invalid("a session of another backend".into()))
}

/// Little-endian f32 bytes into `dst`, which must be exactly as long.
pub(crate) fn copy_le(bytes: &[u8], dst: &mut [f32]) -> Result<(), ModelError> {
    copy_values(bytes, dst, f32::from_le_bytes)
}

/// Little-endian u16 bytes (half-precision values) into `dst`, which must be exactly as
/// long.
pub(crate) fn copy_le_u16(bytes: &[u8], dst: &mut [u16]) -> Result<(), ModelError> {
    copy_values(bytes, dst, u16::from_le_bytes)
}

/// `N`-byte values decoded by `decode` from `bytes` into `dst`, which must be exactly as long.
fn copy_values<T, const N: usize>(
    bytes: &[u8],
    dst: &mut [T],
    decode: fn([u8; N]) -> T,
) -> Result<(), ModelError> {
    let (values, rest) = bytes.as_chunks::<N>();
    if values.len() != dst.len() || !rest.is_empty() {
        return Err(ModelError::Invalid(format!(
            "{} bytes of keys or values where {} values of {N} bytes belong",
            bytes.len(),
            dst.len()
        )));
    }
    for (d, v) in dst.iter_mut().zip(values) {
        *d = decode(*v);
    }
    Ok(())
}
