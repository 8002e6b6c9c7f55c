//! The Llama forward pass on the CPU: the readable reference every other backend is checked
//! against.
//!
//! Activations stay in f32; each quantized weight row is dequantized to f32 once per batch of
//! positions and dotted with each of them. Work is split over a fixed pool by output rows and by heads, and
//! every sum runs in a fixed order, so results are bitwise reproducible run to run and do not
//! depend on the thread count.

use rayon::prelude::*;

use crate::steps::{Budget, StepBatcher, StepJob, StepStats};

use std::borrow::Cow;
use std::sync::Arc;

use crate::ModelError;
use crate::engine::{
    Engine, LayerBytes, SessionState, SourceUnits, StepItem, copy_le, copy_le_u16, own, own_mut,
};
use crate::fastdot::{self, QuantizedActs, QuantizedTokens};
use crate::llama::kept::{Buffers, KeptCaches};
use crate::llama::{LlamaConfig, LlamaWeights, Matrix, RopeStyle};
use crate::numerics::Numerics;
use crate::quant::{self, dequantize_row, dot_f32 as dot, dot_rows};
use crate::top::top_k;

/// Output rows a matrix-product task computes.
const ROWS_PER_TASK: usize = 32;
/// Output rows a task of a product over several positions computes: more than one
/// position's, so that each task streams a longer run of the weights.
const ROWS_PER_TOKENS_TASK: usize = 128;

/// How a KV cache stores its keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// 32-bit floats: the values exactly as the forward pass computed them.
    #[default]
    F32,
    /// IEEE half precision, rounded to nearest: half the memory, the bandwidth of attention
    /// and the snapshot bytes; attention widens them back exactly.
    F16,
}

impl KvType {
    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }

    /// `(f32 values, f16 values)` holding `n` values of this type.
    fn values(self, n: usize) -> (usize, usize) {
        match self {
            KvType::F32 => (n, 0),
            KvType::F16 => (0, n),
        }
    }

    /// Its name: `f32`, `f16`.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
        }
    }

    /// What a backend's precision (its label and numerics) adds for it: nothing for the
    /// f32 cache, `, f16 KV cache` for the other.
    pub(crate) fn precision_note(self) -> &'static str {
        match self {
            KvType::F32 => "",
            KvType::F16 => ", f16 KV cache",
        }
    }
}

/// One sequence's keys and values for every layer: `[layer][position][kv_dim]`, in `k` and
/// `v` for an f32 cache, in `k16` and `v16` (half-precision bits) for an f16 one.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub k16: Vec<u16>,
    pub v16: Vec<u16>,
    /// Positions filled.
    pub len: usize,
    /// Positions the cache can hold.
    pub n_ctx: usize,
    kv_dim: usize,
    n_layer: usize,
    kv_type: KvType,
    /// Where its memory goes when it is dropped, if anywhere.
    keep: Option<Arc<KeptCaches>>,
}

impl Drop for KvCache {
    fn drop(&mut self) {
        if let Some(keep) = self.keep.take() {
            keep.give(Buffers {
                k: std::mem::take(&mut self.k),
                v: std::mem::take(&mut self.v),
                k16: std::mem::take(&mut self.k16),
                v16: std::mem::take(&mut self.v16),
            });
        }
    }
}

impl KvCache {
    /// Offset of `(layer, pos)` in `k` and `v`.
    fn at(&self, layer: usize, pos: usize) -> usize {
        (layer * self.n_ctx + pos) * self.kv_dim
    }

    /// An empty stand-in, holding no memory, for a cache lent to the step scheduler.
    fn lent(&self) -> KvCache {
        KvCache {
            k: Vec::new(),
            v: Vec::new(),
            k16: Vec::new(),
            v16: Vec::new(),
            kv_type: self.kv_type,
            len: 0,
            n_ctx: 0,
            kv_dim: self.kv_dim,
            n_layer: self.n_layer,
            keep: None,
        }
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// A zeroed f32 cache of `n_layer` layers for `n_ctx` positions, all of them filled.
    pub fn empty(n_layer: usize, n_ctx: usize, kv_dim: usize) -> KvCache {
        KvCache::empty_of(KvType::F32, n_layer, n_ctx, kv_dim)
    }

    /// A zeroed cache of `kv_type` of `n_layer` layers for `n_ctx` positions, all of them
    /// filled.
    pub fn empty_of(kv_type: KvType, n_layer: usize, n_ctx: usize, kv_dim: usize) -> KvCache {
        let (wide, half) = kv_type.values(n_layer * n_ctx * kv_dim);
        KvCache::of(
            Buffers::zeroed(wide, half),
            kv_type,
            n_layer,
            n_ctx,
            kv_dim,
            None,
        )
    }

    fn of(
        buffers: Buffers,
        kv_type: KvType,
        n_layer: usize,
        n_ctx: usize,
        kv_dim: usize,
        keep: Option<Arc<KeptCaches>>,
    ) -> KvCache {
        let Buffers { k, v, k16, v16 } = buffers;
        KvCache {
            k,
            v,
            k16,
            v16,
            len: n_ctx,
            n_ctx,
            kv_dim,
            n_layer,
            kv_type,
            keep,
        }
    }

    /// Layer `layer`'s keys and values of the filled positions as the bytes of the cache's
    /// type (native byte order), for a device to copy into.
    pub fn layer_bytes_mut(&mut self, layer: usize) -> (&mut [u8], &mut [u8]) {
        let range = self.at(layer, 0)..self.at(layer, self.len);
        fn bytes<T>(values: &mut [T]) -> &mut [u8] {
            // SAFETY: `T` is f32 or u16 (below): plain values with no padding, for which
            // every byte pattern is valid; the byte slice covers exactly `values`' memory and
            // borrows it mutably for as long.
            unsafe {
                std::slice::from_raw_parts_mut(
                    values.as_mut_ptr().cast::<u8>(),
                    std::mem::size_of_val(values),
                )
            }
        }
        match self.kv_type {
            KvType::F32 => (bytes(&mut self.k[range.clone()]), bytes(&mut self.v[range])),
            KvType::F16 => (
                bytes(&mut self.k16[range.clone()]),
                bytes(&mut self.v16[range]),
            ),
        }
    }

    /// How it stores its keys and values.
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Layer `layer`'s keys and values of the filled positions of an f16 cache, as
    /// half-precision bits, `(len, kv_dim)` each (empty for an f32 cache: see [`layer`]).
    ///
    /// [`layer`]: Self::layer
    pub fn layer_half(&self, layer: usize) -> (&[u16], &[u16]) {
        if self.kv_type != KvType::F16 {
            return (&[], &[]);
        }
        let range = self.at(layer, 0)..self.at(layer, self.len);
        (&self.k16[range.clone()], &self.v16[range])
    }

    /// Layer `layer`'s keys and values of the filled positions, writable.
    pub fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        let range = self.at(layer, 0)..self.at(layer, self.len);
        (&mut self.k[range.clone()], &mut self.v[range])
    }

    /// Floats per position in one layer's keys (or values): `n_head_kv * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Layers this cache holds.
    pub fn n_layer(&self) -> usize {
        self.n_layer
    }

    /// Layer `layer`'s keys and values of the filled positions, `(len, kv_dim)` each.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let range = self.at(layer, 0)..self.at(layer, self.len);
        (&self.k[range.clone()], &self.v[range])
    }

    /// Marks the first `from + len` positions filled and copies each layer's keys and values
    /// of positions `from..from + len` from `bytes[layer]` (little-endian values of the
    /// cache's type, `(len, kv_dim)` each), the layers side by side on the current thread
    /// pool: how a restored cache is written back, piece by piece (the copies and the page
    /// faults of a fresh cache spread over the cores).
    pub fn refill(
        &mut self,
        from: usize,
        len: usize,
        bytes: &[(&[u8], &[u8])],
    ) -> Result<(), ModelError> {
        let end = (from + len).min(self.n_ctx);
        let from = from.min(end);
        self.len = end;
        let (stride, kv_dim) = (self.n_ctx * self.kv_dim, self.kv_dim);
        if stride == 0 {
            return Ok(());
        }
        let range = from * kv_dim..end * kv_dim;
        match self.kv_type {
            KvType::F32 => fill_layers(&mut self.k, &mut self.v, stride, range, bytes, copy_le),
            KvType::F16 => fill_layers(
                &mut self.k16,
                &mut self.v16,
                stride,
                range,
                bytes,
                copy_le_u16,
            ),
        }
    }
}

/// Copies layer `l`'s `bytes` into `range` of each layer (`stride` values) of `k` and `v`, by
/// `copy`, the layers side by side on the current thread pool.
fn fill_layers<T: Send>(
    k: &mut [T],
    v: &mut [T],
    stride: usize,
    range: std::ops::Range<usize>,
    bytes: &[(&[u8], &[u8])],
    copy: fn(&[u8], &mut [T]) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    k.par_chunks_mut(stride)
        .zip(v.par_chunks_mut(stride))
        .enumerate()
        .try_for_each(|(l, (k, v))| {
            let (kb, vb) = bytes
                .get(l)
                .copied()
                .ok_or_else(|| ModelError::Invalid(format!("no keys and values for layer {l}")))?;
            copy(kb, &mut k[range.clone()])?;
            copy(vb, &mut v[range.clone()])
        })
}

crate::engine::session_state!(KvCache);

/// The CPU engine: a single step goes through the step scheduler (so that concurrent
/// callers share batched steps); several at once run as one batched step.
impl Engine for CpuLlama {
    fn label(&self) -> String {
        let precision = self.precision.cpu_name();
        format!("cpu {precision}{}", self.kv_type.precision_note())
    }

    fn numerics(&self) -> Numerics {
        let mut numerics = Numerics::cpu(self.precision);
        numerics.precision.push_str(self.kv_type.precision_note());
        numerics
    }

    fn open_session(&self, n_ctx: usize) -> Result<Box<dyn SessionState>, ModelError> {
        Ok(Box::new(self.new_cache(n_ctx)?))
    }

    fn keep_session_memory(&self, n_ctx: usize) -> Result<(), ModelError> {
        self.keep_cache_memory(n_ctx)
    }

    fn step(&self, items: &mut [StepItem<'_>]) -> Result<(), ModelError> {
        let vocab = self.config.n_vocab;
        // Logits for every item that wants them or its top: the caller's buffer, or ours.
        let mut own: Vec<Vec<f32>> = items
            .iter()
            .map(|i| match i.logits {
                Some(_) => Vec::new(),
                None => vec![0.0; if i.top.is_empty() { 0 } else { vocab }],
            })
            .collect();
        if let [item] = items {
            let cache = own_mut::<KvCache>(&mut *item.state)?;
            let logits = match item.logits.as_deref_mut() {
                Some(l) => l,
                None if !own[0].is_empty() => &mut own[0][..],
                // Neither logits nor top: the scheduler's job still computes the logits.
                None => {
                    own[0] = vec![0.0; vocab];
                    &mut own[0][..]
                }
            };
            self.forward(cache, item.tokens, logits)?;
        } else {
            let mut seqs = Vec::with_capacity(items.len());
            for (item, own) in items.iter_mut().zip(own.iter_mut()) {
                let logits = match item.logits.as_deref_mut() {
                    Some(l) => Some(l),
                    None if !own.is_empty() => Some(&mut own[..]),
                    None => None,
                };
                seqs.push(Seq {
                    cache: own_mut::<KvCache>(&mut *item.state)?,
                    tokens: item.tokens,
                    logits,
                });
            }
            self.forward_batch(&mut seqs)?;
        }
        for (item, own) in items.iter_mut().zip(&own) {
            if !item.top.is_empty() {
                let logits = item.logits.as_deref().unwrap_or(own);
                top_k(logits, item.top);
            }
        }
        Ok(())
    }

    fn step_stats(&self) -> StepStats {
        self.steps.stats()
    }

    fn read_kv<'s>(
        &self,
        state: &'s dyn SessionState,
        _from: usize,
    ) -> Result<(Cow<'s, KvCache>, usize), ModelError> {
        Ok((Cow::Borrowed(own::<KvCache>(state)?), 0))
    }

    fn write_kv(
        &self,
        state: &mut dyn SessionState,
        from: usize,
        len: usize,
        layer: &LayerBytes<'_, '_>,
        _units: Option<&dyn SourceUnits>,
    ) -> Result<(), ModelError> {
        let cache = own_mut::<KvCache>(state)?;
        // The layers' bytes first (`layer` need not be shared across threads), then copied
        // side by side.
        let bytes = (0..cache.n_layer())
            .map(layer)
            .collect::<Result<Vec<_>, _>>()?;
        self.pool.install(|| cache.refill(from, len, &bytes))
    }
}

/// How matrix products treat activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f32 activations against weights dequantized block by block: the reference, matched
    /// against `transformers` in the golden tests.
    Reference,
    /// Activations quantized to int8 blocks for integer dot products with quantized weights
    /// ([`crate::fastdot`]), as llama.cpp does; float weights take the reference path. Checked
    /// against the reference with a stated tolerance. Still deterministic and batch-invariant.
    Fast,
    /// As `Fast`, and on a CUDA GPU with tensor cores (sm_80 and later) the BF16 matrices
    /// multiply activations split into bf16 hi + lo on tensor cores, every product exact and
    /// summed in f32 in one order for every number of tokens (`cuda/kernels/mma.cuh`): several
    /// times the matrix-vector kernels' throughput from 4 sessions a step on, a few percent
    /// slower for one. Also deterministic and batch-invariant; the CPU computes as `Fast`.
    Tensor,
}

impl Precision {
    /// The CPU's arithmetic at this precision, as its label and numerics name it: `Tensor`
    /// computes as `Fast` there, and goes by its name.
    pub fn cpu_name(self) -> &'static str {
        match self {
            Precision::Reference => "reference",
            Precision::Fast | Precision::Tensor => "fast",
        }
    }
}

/// A Llama model ready to run on the CPU.
pub struct CpuLlama {
    pub config: LlamaConfig,
    pub weights: LlamaWeights,
    pub precision: Precision,
    /// How new sessions' KV caches store keys and values.
    pub kv_type: KvType,
    /// Inverse rotary frequencies, one per rotated pair (Llama-3 factors applied).
    inv_freq: Vec<f32>,
    pool: rayon::ThreadPool,
    /// Gathers concurrent forward passes into batched steps on `pool`.
    steps: StepBatcher<CpuJob>,
    /// Dropped caches' memory, kept for the next cache of its size.
    kept: Arc<KeptCaches>,
}

/// One forward pass waiting for (or in) batched steps: its session's cache (lent to the
/// step scheduler for the while), its tokens, and where its logits go.
struct CpuJob {
    cache: KvCache,
    tokens: Vec<u32>,
    /// Tokens already run.
    at: usize,
    /// The last position's logits (`n_vocab`), written by the last chunk's step.
    logits: Vec<f32>,
    failed: Option<String>,
}

impl StepJob for CpuJob {
    fn next_tokens(&self) -> usize {
        match self.failed {
            Some(_) => 0,
            // Chunks at fixed offsets from the call's first token: never cut by load.
            None => (self.tokens.len() - self.at).min(MAX_BATCH),
        }
    }

    fn fail(&mut self, why: String) {
        self.failed = Some(why);
    }
}

/// One sequence's part of a batched step: its cache, the positions it appends, and where
/// the last one's logits go (if wanted).
pub struct Seq<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub logits: Option<&'a mut [f32]>,
}

/// Activations of a batch of `n` positions, row-major `[position][width]`.
struct Scratch {
    x: Vec<f32>,   // (n, n_embd) the residual stream
    xb: Vec<f32>,  // (n, n_embd) normalized input of a sub-layer
    q: Vec<f32>,   // (n, n_head * head_dim)
    att: Vec<f32>, // (n, n_head * head_dim) attention output, before wo
    xb2: Vec<f32>, // (n, n_embd) a sub-layer's output
    hb: Vec<f32>,  // (n, n_ff) gate, then silu(gate) * up
    hb2: Vec<f32>, // (n, n_ff) up
    neg: Vec<f32>, // (n, n_ff) -gate, then exp(-gate)
}

impl Scratch {
    fn new(c: &LlamaConfig, n: usize) -> Scratch {
        Scratch {
            x: vec![0.0; n * c.n_embd],
            xb: vec![0.0; n * c.n_embd],
            q: vec![0.0; n * c.n_head * c.head_dim],
            att: vec![0.0; n * c.n_head * c.head_dim],
            xb2: vec![0.0; n * c.n_embd],
            hb: vec![0.0; n * c.n_ff],
            hb2: vec![0.0; n * c.n_ff],
            neg: vec![0.0; n * c.n_ff],
        }
    }
}

/// Positions of one sequence in one step: a longer forward pass is cut into chunks of
/// this many (from its first token), one per step.
const MAX_BATCH: usize = 64;

/// What one batched step takes: positions across its sequences, and sequences.
const STEP_BUDGET: Budget = Budget {
    tokens: 2 * MAX_BATCH,
    jobs: 64,
};

impl CpuLlama {
    /// Wraps checked weights; `threads` workers do the matrix products.
    pub fn new(
        config: LlamaConfig,
        weights: LlamaWeights,
        threads: usize,
    ) -> Result<CpuLlama, ModelError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("tern-model-{i}"))
            .build()
            .map_err(|e| ModelError::Invalid(format!("cannot start worker threads: {e}")))?;
        let inv_freq = (0..config.n_rot / 2)
            .map(|i| {
                let f = 1.0 / config.rope_base.powf((2 * i) as f32 / config.n_rot as f32);
                weights
                    .rope_freqs
                    .as_ref()
                    .map_or(f, |factors| f / factors[i])
            })
            .collect();
        Ok(CpuLlama {
            precision: Precision::Reference,
            kv_type: KvType::F32,
            config,
            weights,
            inv_freq,
            pool,
            steps: StepBatcher::new(STEP_BUDGET),
            kept: Arc::default(),
        })
    }

    /// Inverse rotary frequencies, one per rotated pair (Llama-3 factors applied): what
    /// every backend rotates by.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// An empty cache of `n_ctx` positions, in memory a dropped cache of its size left (or
    /// made ahead by [`CpuLlama::keep_cache_memory`]) where some is kept.
    pub fn new_cache(&self, n_ctx: usize) -> Result<KvCache, ModelError> {
        let c = &self.config;
        let (wide, half) = self.cache_values(n_ctx)?;
        let buffers = self
            .kept
            .take(wide, half)
            .unwrap_or_else(|| Buffers::zeroed(wide, half));
        let keep = Some(self.kept.clone());
        let mut cache = KvCache::of(buffers, self.kv_type, c.n_layer, n_ctx, c.kv_dim(), keep);
        cache.len = 0;
        Ok(cache)
    }

    /// Makes the memory of a cache of `n_ctx` positions ready (its pages brought in and
    /// zeroed) for the next [`CpuLlama::new_cache`] of that size, ahead of a restore.
    pub fn keep_cache_memory(&self, n_ctx: usize) -> Result<(), ModelError> {
        let (wide, half) = self.cache_values(n_ctx)?;
        self.kept.make(wide, half);
        Ok(())
    }

    /// The f32 and f16 values in each of a cache's keys and values for `n_ctx` positions;
    /// an error for a cache too large.
    fn cache_values(&self, n_ctx: usize) -> Result<(usize, usize), ModelError> {
        let c = &self.config;
        c.kv_cache_len(n_ctx)?;
        Ok(self.kv_type.values(c.n_layer * n_ctx * c.kv_dim()))
    }

    /// Appends `tokens` to `cache` and writes the last position's logits (`n_vocab`) into
    /// `logits`. Concurrent calls (from other actors' threads) run together in batched steps
    /// ([`crate::steps`]); the results are the same bits as alone.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        let c = &self.config;
        super::check_forward(c, cache.len, cache.n_ctx, tokens, Some(logits))?;
        let job = CpuJob {
            cache: std::mem::replace(cache, cache.lent()),
            tokens: tokens.to_vec(),
            at: 0,
            logits: vec![0.0; c.n_vocab],
            failed: None,
        };
        let job = self.steps.run(job, |jobs| self.step_jobs(jobs));
        *cache = job.cache;
        if let Some(why) = job.failed {
            return Err(ModelError::Invalid(why));
        }
        logits.copy_from_slice(&job.logits);
        Ok(())
    }

    /// One batched step over `seqs`, run at once (the scheduler's steps are these). Checks
    /// every sequence before running any.
    pub fn forward_batch(&self, seqs: &mut [Seq<'_>]) -> Result<(), ModelError> {
        for seq in seqs.iter() {
            let (len, n_ctx) = (seq.cache.len, seq.cache.n_ctx);
            super::check_forward(&self.config, len, n_ctx, seq.tokens, seq.logits.as_deref())?;
        }
        if !seqs.is_empty() {
            self.pool.install(|| self.step(seqs));
        }
        Ok(())
    }

    /// The step scheduler's counters for this model.
    pub fn step_stats(&self) -> StepStats {
        self.steps.stats()
    }

    /// One step of the scheduler: each job's next chunk, together.
    fn step_jobs(&self, jobs: &mut [CpuJob]) {
        let mut seqs: Vec<Seq<'_>> = Vec::with_capacity(jobs.len());
        let mut chunks = Vec::with_capacity(jobs.len());
        for job in jobs.iter_mut() {
            let n = job.next_tokens();
            let (at, last) = (job.at, job.at + n == job.tokens.len());
            chunks.push(n);
            seqs.push(Seq {
                cache: &mut job.cache,
                tokens: &job.tokens[at..at + n],
                logits: last.then_some(&mut job.logits[..]),
            });
        }
        self.pool.install(|| self.step(&mut seqs));
        for (job, n) in jobs.iter_mut().zip(chunks) {
            job.at += n;
        }
    }

    /// One batched step: every sequence's positions through every layer together (each
    /// weight read once for all of them), appending their K and V to each sequence's own
    /// cache, and the logits of each sequence's last position where asked. Runs on the
    /// pool. Every position's arithmetic is the same whatever else is in the step: each
    /// output element is one fixed-order dot product, each query attends over its own cache
    /// alone. So a sequence alone, beside others, prefilled in one call or many, or decoded
    /// one token at a time gives bitwise the same results.
    fn step(&self, seqs: &mut [Seq<'_>]) {
        let c = &self.config;
        let w = &self.weights;
        let (e, kv, qd) = (c.n_embd, c.kv_dim(), c.n_head * c.head_dim);
        let n: usize = seqs.iter().map(|q| q.tokens.len()).sum();
        let mut s = Scratch::new(c, n);
        let (mut k, mut v) = (vec![0.0f32; n * kv], vec![0.0f32; n * kv]); // (n, kv_dim)
        let tokens = seqs.iter().flat_map(|q| q.tokens.iter());
        for (x, &token) in s.x.chunks_mut(e).zip(tokens) {
            dequantize_row(w.token_embd.dtype, w.row(&w.token_embd, token as usize), x);
        }
        // Each position's rotation, made once for every layer and head.
        let pairs = self.inv_freq.len();
        let rotations: Vec<(f32, f32)> = seqs
            .iter()
            .flat_map(|q| q.cache.len..q.cache.len + q.tokens.len())
            .flat_map(|pos| self.rotation(pos))
            .collect();
        for (l, lw) in w.layers.iter().enumerate() {
            // Attention.
            rmsnorm_rows(&mut s.xb, &s.x, &lw.attn_norm, c.rms_eps, e);
            self.matmuls(
                [(&mut s.q, &lw.wq), (&mut k, &lw.wk), (&mut v, &lw.wv)],
                &s.xb,
                n,
            );
            // Each sequence's new keys and values into its cache, then its queries over the
            // cache, the sequences side by side.
            let mut tasks = Vec::with_capacity(seqs.len());
            let (mut q, mut att) = (&mut s.q[..], &mut s.att[..]);
            let (mut new_k, mut new_v, mut rot) = (&mut k[..], &v[..], &rotations[..]);
            for seq in seqs.iter_mut() {
                let m = seq.tokens.len();
                let (q_seq, q_rest) = q.split_at_mut(m * qd);
                let (att_seq, att_rest) = att.split_at_mut(m * qd);
                let (k_seq, k_rest) = new_k.split_at_mut(m * kv);
                let (v_seq, v_rest) = new_v.split_at(m * kv);
                let (rot_seq, rot_rest) = rot.split_at(m * pairs);
                tasks.push((&mut *seq.cache, q_seq, att_seq, k_seq, v_seq, rot_seq));
                (q, att, new_k, new_v, rot) = (q_rest, att_rest, k_rest, v_rest, rot_rest);
            }
            tasks
                .into_par_iter()
                .for_each(|(cache, q, out, new_k, new_v, rot)| {
                    let (pos0, m) = (cache.len, q.len() / qd);
                    let rotation = |t: usize| &rot[t * pairs..][..pairs];
                    for t in 0..m {
                        self.rope(&mut q[t * qd..][..qd], rotation(t));
                    }
                    let at = cache.at(l, pos0);
                    match cache.kv_type {
                        KvType::F32 => {
                            cache.k[at..at + m * kv].copy_from_slice(new_k);
                            cache.v[at..at + m * kv].copy_from_slice(new_v);
                            for t in 0..m {
                                self.rope(&mut cache.k[at + t * kv..][..kv], rotation(t));
                            }
                        }
                        KvType::F16 => {
                            // Rotated in f32, then rounded once into the cache.
                            for t in 0..m {
                                self.rope(&mut new_k[t * kv..][..kv], rotation(t));
                            }
                            narrow(new_k, &mut cache.k16[at..at + m * kv]);
                            narrow(new_v, &mut cache.v16[at..at + m * kv]);
                        }
                    }
                    self.attention(out, q, cache, l, pos0, m);
                });
            self.matmul(&mut s.xb2, &lw.wo, &s.att, n);
            add(&mut s.x, &s.xb2);
            // Feed-forward: w_down(silu(w_gate x) * w_up x).
            rmsnorm_rows(&mut s.xb, &s.x, &lw.ffn_norm, c.rms_eps, e);
            if n > 1 && self.fast(&lw.w_gate) && self.fast(&lw.w_up) {
                let xq = QuantizedTokens::new(&s.xb, lw.w_gate.cols);
                self.gate_up_fast(&mut s.hb, &lw.w_gate, &lw.w_up, &xq, n);
            } else {
                self.matmuls([(&mut s.hb, &lw.w_gate), (&mut s.hb2, &lw.w_up)], &s.xb, n);
                swiglu(&mut s.hb, &s.hb2, &mut s.neg);
            }
            self.matmul(&mut s.xb2, &lw.w_down, &s.hb, n);
            add(&mut s.x, &s.xb2);
        }
        // The logits of the sequences that asked, their last positions in one product.
        let mut last = Vec::new();
        let mut first = 0;
        for seq in seqs.iter_mut() {
            first += seq.tokens.len();
            seq.cache.len += seq.tokens.len();
            if seq.logits.is_some() {
                last.push(first - 1);
            }
        }
        if last.is_empty() {
            return;
        }
        let mut xb = vec![0.0; last.len() * e];
        for (row, &t) in xb.chunks_mut(e).zip(&last) {
            rmsnorm(row, &s.x[t * e..][..e], &w.output_norm, c.rms_eps);
        }
        let mut logits = vec![0.0; last.len() * c.n_vocab];
        self.matmul(&mut logits, &w.output, &xb, last.len());
        let wanted = seqs.iter_mut().filter_map(|q| q.logits.as_deref_mut());
        for (out, row) in wanted.zip(logits.chunks(c.n_vocab)) {
            out.copy_from_slice(row);
        }
    }

    /// Whether products with `m` take the fast path (int8 activations).
    fn fast(&self, m: &Matrix) -> bool {
        self.precision != Precision::Reference && fastdot::supports(m.dtype)
    }

    /// `out_j = m_j · x_t` for `n` positions and each of `K` matrices as wide as a position:
    /// for one position in one pass over the pool ([`Self::matmuls_one`]), for more one
    /// [`Self::matmul`] each. Either way each output is the bits `matmul` gives it alone.
    fn matmuls<const K: usize>(&self, jobs: [(&mut [f32], &Matrix); K], x: &[f32], n: usize) {
        if n == 1 {
            self.matmuls_one(jobs, x);
        } else {
            // The positions quantized once for every matrix that takes them so.
            let xq = jobs
                .iter()
                .find(|(_, m)| self.fast(m))
                .map(|(_, m)| QuantizedTokens::new(x, m.cols));
            match xq {
                Some(xq) if jobs.iter().all(|(_, m)| self.fast(m)) => {
                    self.matmuls_fast(jobs, &xq, n);
                }
                xq => {
                    for (out, m) in jobs {
                        self.matmul_quantized(out, m, x, xq.as_ref(), n);
                    }
                }
            }
        }
    }

    /// The fast path of [`Self::matmul_quantized`] for `n > 1` positions, quantized as `xq`, and each
    /// of `K` matrices as wide as a position, in one pass over the pool: per chunk of
    /// [`ROWS_PER_TOKENS_TASK`] weight rows, every position against the rows while they are
    /// in cache, each task writing its outputs where they go.
    fn matmuls_fast<const K: usize>(
        &self,
        jobs: [(&mut [f32], &Matrix); K],
        xq: &QuantizedTokens,
        n: usize,
    ) {
        let mut tasks = Vec::new();
        for (out, m) in jobs {
            tasks.extend(
                row_runs(out, m.rows, n)
                    .into_iter()
                    .enumerate()
                    .map(|run| (m, run)),
            );
        }
        tasks.into_par_iter().for_each(|(m, (run, mut outs))| {
            PRODUCTS.with_borrow_mut(|[y, _, _]| {
                self.run_products(y, m, run, outs[0].len(), xq);
                place(&mut outs, y);
            });
        });
    }

    /// `hb[t] = swiglu(gate · x[t], up · x[t])` for `n > 1` positions quantized as `xq`, on
    /// the fast path, in one pass over the pool: per chunk of [`ROWS_PER_TOKENS_TASK`] rows,
    /// the gate's and the up matrix's rows against every position, then [`swiglu`] of those
    /// outputs (each element its own, so the bits of the products, then `swiglu`, apart).
    fn gate_up_fast(
        &self,
        hb: &mut [f32],
        gate: &Matrix,
        up: &Matrix,
        xq: &QuantizedTokens,
        n: usize,
    ) {
        let tasks: Vec<_> = row_runs(hb, gate.rows, n).into_iter().enumerate().collect();
        tasks.into_par_iter().for_each(|(run, mut outs)| {
            PRODUCTS.with_borrow_mut(|[g, u, neg]| {
                let count = outs[0].len();
                self.run_products(g, gate, run, count, xq);
                self.run_products(u, up, run, count, xq);
                neg.resize(g.len(), 0.0);
                swiglu(g, u, neg);
                place(&mut outs, g);
            });
        });
    }

    /// Rows `run * ROWS_PER_TOKENS_TASK ..` (`count` of them) of `m` against every position
    /// of `xq`, into `y` (position-major, resized to fit).
    fn run_products(
        &self,
        y: &mut Vec<f32>,
        m: &Matrix,
        run: usize,
        count: usize,
        xq: &QuantizedTokens,
    ) {
        let first = run * ROWS_PER_TOKENS_TASK;
        let w = &self.weights.rows(m)[first * m.row_bytes..(first + count) * m.row_bytes];
        y.resize(xq.len() * count, 0.0);
        fastdot::dot_q8_rows_tokens(m.dtype, w, m.row_bytes, xq, y);
    }

    /// `out_j = m_j · x` for one position and each of `K` matrices as wide as `x`, in one
    /// pass over the pool (each pass ends in a wait for every thread, and a small model's
    /// decode step makes hundreds of them): each matrix's rows in chunks of
    /// [`ROWS_PER_TASK`], every chunk a task. The fast path
    /// quantizes `x` once for all of them, the reference path dequantizes inside the dot
    /// product (bitwise the same as dequantizing the row first). Each output is the same
    /// bits as [`Self::matmul`] of its matrix alone.
    fn matmuls_one<const K: usize>(&self, jobs: [(&mut [f32], &Matrix); K], x: &[f32]) {
        let xq = jobs
            .iter()
            .any(|(_, m)| self.fast(m))
            .then(|| QuantizedActs::new(x));
        let mut tasks = Vec::new();
        for (out, m) in jobs {
            let rows = self.weights.rows(m);
            for (chunk, y) in out.chunks_mut(ROWS_PER_TASK).enumerate() {
                let first = chunk * ROWS_PER_TASK * m.row_bytes;
                let w = &rows[first..first + y.len() * m.row_bytes];
                tasks.push((y, m, w));
            }
        }
        tasks.into_par_iter().for_each(|(y, m, rows)| match &xq {
            Some(xq) if self.fast(m) => fastdot::dot_q8_rows(m.dtype, rows, m.row_bytes, xq, y),
            _ => dot_rows(m.dtype, rows, x, y),
        });
    }

    /// `out[t] = m · x[t]` for `n` rows of `x`: [`Self::matmuls`] of one matrix.
    fn matmul(&self, out: &mut [f32], m: &Matrix, x: &[f32], n: usize) {
        self.matmuls([(out, m)], x, n);
    }

    /// `out[t] = m · x[t]` for `n > 1` positions, given `x` quantized as `xq` when `m` takes
    /// the fast path; on the reference path each weight row is dequantized once per batch
    /// and dotted with every position. Rows are split over the pool in fixed chunks; each
    /// output element is one fixed-order dot product.
    fn matmul_quantized(
        &self,
        out: &mut [f32],
        m: &Matrix,
        x: &[f32],
        xq: Option<&QuantizedTokens>,
        n: usize,
    ) {
        if let Some(xq) = xq.filter(|_| self.fast(m)) {
            self.matmuls_fast([(out, m)], xq, n);
            return;
        }
        let rows = self.weights.rows(m);
        let chunks: Vec<Vec<f32>> = (0..m.rows.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .map(|chunk| {
                let first = chunk * ROWS_PER_TASK;
                let count = ROWS_PER_TASK.min(m.rows - first);
                let mut w = vec![0.0f32; m.cols];
                let mut y = vec![0.0f32; count * n]; // (count, n)
                for i in 0..count {
                    let r = first + i;
                    dequantize_row(
                        m.dtype,
                        &rows[r * m.row_bytes..(r + 1) * m.row_bytes],
                        &mut w,
                    );
                    for t in 0..n {
                        y[i * n + t] = dot(&w, &x[t * m.cols..(t + 1) * m.cols]);
                    }
                }
                y
            })
            .collect();
        for (chunk, y) in chunks.iter().enumerate() {
            let first = chunk * ROWS_PER_TASK;
            for (i, row) in y.chunks(n).enumerate() {
                for (t, &v) in row.iter().enumerate() {
                    out[t * m.rows + first + i] = v;
                }
            }
        }
    }

    /// The sine and cosine of each rotated pair's angle at position `pos`.
    fn rotation(&self, pos: usize) -> impl Iterator<Item = (f32, f32)> + '_ {
        self.inv_freq
            .iter()
            .map(move |&inv_freq| (pos as f32 * inv_freq).sin_cos())
    }

    /// Rotates every head of `x` (a multiple of `head_dim` long) by `rotation`, its position's
    /// [`Self::rotation`].
    fn rope(&self, x: &mut [f32], rotation: &[(f32, f32)]) {
        let c = &self.config;
        for head in x.chunks_mut(c.head_dim) {
            for (i, &(sin, cos)) in rotation.iter().enumerate() {
                let (a, b) = match c.rope_style {
                    RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                    RopeStyle::Halves => (i, i + c.n_rot / 2),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }

    /// Causal attention for `n` queries at positions `pos0..pos0 + n`, each over positions
    /// `0..=` its own ([`quant::attend`]); tokens and heads in parallel.
    fn attention(
        &self,
        out: &mut [f32],
        q: &[f32],
        cache: &KvCache,
        layer: usize,
        pos0: usize,
        n: usize,
    ) {
        let c = &self.config;
        let (hd, group) = (c.head_dim, c.n_head / c.n_head_kv);
        let threads = self.pool.current_num_threads();
        // Token t's keys and values for the KV head of query head h: an f32 cache's in the
        // `Attend`, an f16 cache's beside it (`half`).
        let first = |h: usize| cache.at(layer, 0) + (h / group) * hd;
        let over = |t: usize, h: usize| quant::Attend {
            k: cache.k.get(first(h)..).unwrap_or_default(),
            v: cache.v.get(first(h)..).unwrap_or_default(),
            stride: cache.kv_dim,
            n_pos: pos0 + t + 1,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let half = |h: usize| {
            (cache.kv_type == KvType::F16).then(|| quant::Half {
                k: &cache.k16[first(h)..],
                v: &cache.v16[first(h)..],
            })
        };
        // A task takes the `group` query heads of a KV head together (each key and value read
        // once for them), or one query head where that leaves the pool too few tasks. Each
        // query's result is the same bits either way, and whether its blocks of positions
        // are taken one after another or side by side (`quant::attend`).
        let per_task = |tasks_if_grouped: usize| {
            if tasks_if_grouped >= 2 * threads {
                group
            } else {
                1
            }
        };
        if n == 1 {
            // Decode: the blocks of positions side by side, then each head's merged.
            let nb = over(0, 0).blocks();
            let per_task = per_task(c.n_head_kv * nb);
            let plen = quant::partial_len(hd);
            let mut partials = vec![0.0f32; c.n_head * nb * plen]; // [task][block][query]
            partials
                .par_chunks_mut(per_task * plen)
                .enumerate()
                .for_each(|(i, part)| {
                    let h0 = i / nb * per_task;
                    let q = &q[h0 * hd..][..per_task * hd];
                    match half(h0) {
                        None => quant::attend_block(&over(0, h0), i % nb, q, part),
                        Some(kv) => quant::attend_block_half(&over(0, h0), kv, i % nb, q, part),
                    }
                });
            for (h, out) in out[..c.n_head * hd].chunks_exact_mut(hd).enumerate() {
                let first = (h / per_task * nb * per_task + h % per_task) * plen;
                quant::attend_merge(&partials[first..], per_task * plen, nb, out);
            }
            return;
        }
        // Prefill: a task takes up to TILE tokens' queries of its heads, so that each key and
        // value of the blocks they all see whole is read once for all of them.
        const TILE: usize = 4;
        let per_task = per_task(n * c.n_head_kv);
        let (groups, width) = (c.n_head / per_task, per_task * hd);
        let task = |i: usize| (i / groups * TILE, i % groups * per_task); // first token, head
        let results: Vec<Vec<f32>> = (0..n.div_ceil(TILE) * groups)
            .into_par_iter()
            .map(|i| {
                let (t0, h0) = task(i);
                let tokens = TILE.min(n - t0);
                let qs: Vec<f32> = (t0..t0 + tokens)
                    .flat_map(|t| &q[(t * c.n_head + h0) * hd..][..width])
                    .copied()
                    .collect();
                let mut outs = vec![0.0f32; qs.len()];
                match half(h0) {
                    None => quant::attend(&over(t0, h0), tokens, &qs, &mut outs),
                    Some(kv) => quant::attend_half(&over(t0, h0), kv, tokens, &qs, &mut outs),
                }
                outs
            })
            .collect();
        for (i, outs) in results.iter().enumerate() {
            let (t0, h0) = task(i);
            for (k, o) in outs.chunks_exact(width).enumerate() {
                out[((t0 + k) * c.n_head + h0) * hd..][..width].copy_from_slice(o);
            }
        }
    }
}

/// Each of `values` rounded to half precision (nearest, ties to even) into `out`.
fn narrow(values: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(values) {
        *o = quant::f32_to_f16(v);
    }
}

/// `rmsnorm` applied to each `width`-long row.
fn rmsnorm_rows(out: &mut [f32], x: &[f32], w: &[f32], eps: f32, width: usize) {
    for (o, xr) in out.chunks_mut(width).zip(x.chunks(width)) {
        rmsnorm(o, xr, w, eps);
    }
}

/// `out = x / rms(x) * w`.
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let mean_sq = dot(x, x) / x.len() as f32;
    let scale = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * scale * wi;
    }
}

/// The index of the largest value; the lowest index among equals.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

thread_local! {
    /// A product task's outputs, position-major, before they go where they belong (and, for
    /// [`CpuLlama::gate_up_fast`], the up outputs and the negated gate's `exp`): reused task
    /// to task.
    static PRODUCTS: std::cell::RefCell<[Vec<f32>; 3]> = const {
        std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()])
    };
}

/// `out` (`n` positions' outputs of a matrix of `rows` rows, position-major) cut into the
/// runs of [`ROWS_PER_TOKENS_TASK`] rows a product task writes: for each run, its slice of
/// every position's outputs.
fn row_runs(out: &mut [f32], rows: usize, n: usize) -> Vec<Vec<&mut [f32]>> {
    let mut runs: Vec<Vec<&mut [f32]>> = (0..rows.div_ceil(ROWS_PER_TOKENS_TASK))
        .map(|_| Vec::with_capacity(n))
        .collect();
    for position in out.chunks_mut(rows.max(1)) {
        for (run, slice) in runs
            .iter_mut()
            .zip(position.chunks_mut(ROWS_PER_TOKENS_TASK))
        {
            run.push(slice);
        }
    }
    runs
}

/// `y` (one run of rows, position-major, as [`CpuLlama::run_products`] writes it) into each
/// position's slice of the run (`outs`, from [`row_runs`]).
fn place(outs: &mut [&mut [f32]], y: &[f32]) {
    let count = outs[0].len();
    for (out, y) in outs.iter_mut().zip(y.chunks_exact(count)) {
        out.copy_from_slice(y);
    }
}

/// `gate = silu(gate) * up`, `silu(g) = g / (1 + exp(-g))`, with the exps a slice at a time
/// (in `neg`, as long as `gate`).
fn swiglu(gate: &mut [f32], up: &[f32], neg: &mut [f32]) {
    for (n, &g) in neg.iter_mut().zip(gate.iter()) {
        *n = -g;
    }
    quant::exp_in_place(neg);
    for ((g, &u), &e) in gate.iter_mut().zip(up).zip(neg.iter()) {
        *g = *g / (1.0 + e) * u;
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
