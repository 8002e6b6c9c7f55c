//! The Llama forward pass on a CUDA GPU, checked against the CPU reference ([`super::cpu`]).
//!
//! Weights are uploaded once, in their file's block format, and shared by every session of
//! the model; each session owns its KV cache and scratch buffers in device memory. Kernels are
//! the real files in `kernels/` (`matvec.cu`: quantized matrix-vector products with the
//! RMSNorm before and SwiGLU after them fused in; `llama.cu`: attention with the rotary
//! embeddings and KV append fused in, the prefill path's element-wise kernels and flash
//! attention, top-logit selection), compiled by NVRTC for the GPU's architecture and cached on
//! disk. Prompts of 64 positions or more run their matrix products as
//! BF16 GEMMs on tensor cores (`prefill.rs`). A decode step can also run its layers in one
//! persistent kernel (`decode.cu`, `fused.rs`, for models whose layer matrices share one type),
//! with the same arithmetic, so the same bits; it is off unless asked for
//! ([`CudaLlama::set_fused_decode`]), as on an H100 it is slower than the graph of
//! kernels launched with programmatic dependent launch (see docs/perf.md).
//!
//! A session's KV cache keeps keys and values in the model's [`KvType`]: f32, or IEEE half
//! precision (the kernels that touch the cache are built for it: `common.cuh`'s `kv_t`),
//! rounded to nearest as they are appended and widened exactly for attention, as the CPU
//! reference's f16 cache does. A snapshot's KV bytes are uploaded through page-locked staging
//! buffers that several host threads fill while the GPU copies (`staging.rs`).
//!
//! Guarantees:
//! - Decode steps and short prompts keep activations in f32 and dequantize weights inside
//!   each dot product, as the CPU reference does; every reduction runs in a fixed order, so
//!   results are bitwise reproducible run to run and independent of other work on the GPU.
//! - When the logits buffer lies in host memory registered with the GPU (an actor's memory),
//!   the last kernel writes the logits there directly: no staging buffer, no copy.
//! - A decode step is one CUDA graph launch (captured per session and logits address): one or
//!   more kernels per stage of every layer, or five with the persistent kernel.
//! - Several sessions' steps run together, each weight matrix read once for all of them
//!   (`batch.rs`), with the kernels a session alone runs: a session's bits do not depend on
//!   what shares its step. Concurrent callers' forward passes are gathered into such steps
//!   by the model's step scheduler.
//! - All device work of a call finishes before the call returns.

mod batch;
mod constants;
mod fifo;
mod fused;
mod kernels;
mod prefill;
mod session;
mod staging;
pub mod testing;
mod weights;

pub use kernels::mma_wanted as tensor_cores_wanted;
pub use session::CudaSession;

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tern_compute::Device;
use tern_compute::cuda::cudarc::driver::{CudaContext, CudaStream, DevicePtr};

use crate::ModelError;
use crate::engine::{Engine, LayerBytes, SessionState, SourceUnits, StepItem, own, own_mut};
use crate::llama::cpu::{CpuLlama, KvCache, KvType};
use crate::llama::{LlamaConfig, RopeStyle};
use crate::numerics::{Numerics, kernel_hash};
use crate::steps::{StepBatcher, StepStats};
use crate::top::Candidate;
use batch::{BatchAhead, BatchBuffers, CudaJob, Item, TopBuffers};
use fifo::{FifoGuard, FifoMutex};
use kernels::{Kernels, Launcher};
use prefill::{PREFILL_CHUNK, PREFILL_MIN, Prefill};
use staging::Staging;
use weights::DeviceWeights;

/// Positions run through the layers together in one call of each kernel (a prefill is cut
/// into chunks of this many tokens).
pub const MAX_CHUNK: usize = 8;

/// Dropped sessions whose device memory a model keeps for new sessions of the same size.
const SPARE_SESSIONS: usize = 2;

/// Positions one attention split covers, and threads per attention block: the kernels'
/// `ATTN_SPLIT` and `ATTN_THREADS`, written into `constants.cuh` by [`constants`].
const ATTN_SPLIT: usize = 64;
const ATTN_THREADS: u32 = 128;
/// The most query heads a KV group may have for a block of the one-new-position attention
/// to take them together (`ATTN_GROUP_MAX`; larger groups take a head a block).
const ATTN_GROUP_MAX: usize = 8;

/// What a holder of the model's stream keeps between calls.
#[derive(Default)]
pub(crate) struct Held {
    /// The prefill path's buffers once a long prompt has needed them (or why that path
    /// cannot run).
    prefill: Option<Result<Prefill, ModelError>>,
    /// Batched steps' buffers, once a step over several sessions has needed them.
    batch: Option<BatchBuffers>,
    /// Selections of several sessions' top logits, once a step has made them together.
    tops: Option<TopBuffers>,
    /// The batched greedy step enqueued ahead of its calls, if any, and the last one's mark.
    ahead: Option<BatchAhead>,
    marks: u64,
    /// Batched greedy steps' selections, once a step has gone ahead (declared after `ahead`,
    /// so dropped after it: a step ahead ends before its slots go).
    slots: Option<session::Slots>,
}

/// What opening the model on the GPU cost.
#[derive(Clone, Copy, Debug)]
pub struct Startup {
    /// Compiling (or loading cached) kernels, milliseconds.
    pub kernels_ms: f64,
    /// Whether the compiled kernels came from the on-disk cache.
    pub kernels_cached: bool,
    /// Uploading the weights, milliseconds.
    pub upload_ms: f64,
    /// Bytes of weights in device memory.
    pub weight_bytes: usize,
}

/// A Llama model with its weights on one GPU.
pub struct CudaLlama {
    pub config: LlamaConfig,
    /// The device the model was opened on: the one actors' memories are registered with.
    device: Arc<dyn Device>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    weights: DeviceWeights,
    /// The decode step's layers as one persistent kernel, or why they cannot be.
    fused: Result<fused::Fused, String>,
    /// Whether decode steps take `fused` (when there is one): only when asked for.
    fused_on: AtomicBool,
    pub startup: Startup,
    /// The model's stream, held by whoever enqueues work on it: a step (over one session
    /// or many), a session's allocation, a KV cache's download or upload. Another thread's
    /// decode step may be capturing the stream into a graph, and work enqueued meanwhile
    /// would fail or be captured with it. Concurrent forward passes do not queue here one
    /// by one: `steps` gathers them into batched steps, each led by one of their threads.
    busy: FifoMutex<Held>,
    /// Gathers concurrent forward passes (from different actors' threads) into batched
    /// steps.
    steps: StepBatcher<CudaJob>,
    /// Device memory of dropped sessions, freed by the next holder of `busy` (a session can
    /// be dropped on any thread, at any time, even while `busy` is held).
    graveyard: Arc<Mutex<Vec<Box<dyn Any + Send>>>>,
    /// Device memory of dropped sessions kept for new ones of the same size (at most
    /// [`SPARE_SESSIONS`], the oldest freed first; all freed when an allocation fails): a
    /// restore or a new conversation then skips the driver's allocation. Used only by a
    /// holder of `busy`.
    spare: Mutex<Vec<session::Spare>>,
    /// How sessions' KV caches store keys and values (the kernels are built for it).
    kv_type: KvType,
    /// Page-locked buffers KV caches are uploaded through, made on the first upload; used
    /// only by a holder of `busy`.
    staging: Mutex<Option<Staging>>,
}

/// The tensor-core kernels with every BF16 matrix they take stored again as their tiles, or
/// none where no matrix fits them.
fn tile_weights(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    arch: u32,
    weights: &mut DeviceWeights,
) -> Result<Option<kernels::Mma>, ModelError> {
    let fitting: Vec<kernels::DevMatrix> = weights
        .matrices_mut()
        .into_iter()
        .filter(|m| kernels::mma_fits(m))
        .map(|m| *m)
        .collect();
    let Some(mma) = kernels::Mma::new(ctx, stream, arch, &fitting)? else {
        return Ok(None);
    };
    let run = Launcher { kernels, stream };
    weights.tile(stream, kernels::mma_fits, |m, tiles| {
        run.mma_tile(&mma, m, tiles)
    })?;
    stream.synchronize().map_err(driver("tiling weights"))?;
    Ok(Some(mma))
}

impl CudaLlama {
    /// Uploads the weights of `cpu` (the reference, whose config and rotary frequencies it
    /// shares) to the GPU `device` is (it must be a CUDA device).
    pub fn new(cpu: &CpuLlama, device: Arc<dyn Device>) -> Result<CudaLlama, ModelError> {
        let config = &cpu.config;
        let gpu = device.as_cuda().ok_or_else(|| {
            ModelError::Invalid(format!("{} is not a CUDA GPU", device.describe()))
        })?;
        let hd = config.head_dim;
        if !kernels::HEAD_DIMS.contains(&hd) {
            return Err(ModelError::Unsupported(format!(
                "head size {hd} on the GPU (attention takes {:?})",
                kernels::HEAD_DIMS
            )));
        }
        let ctx = gpu.context().clone();
        untracked(&ctx);
        let stream = ctx.new_stream().map_err(driver("creating a stream"))?;
        let t = Instant::now();
        let mut weights = DeviceWeights::upload(&stream, &cpu.weights, cpu.inv_freq())?;
        stream.synchronize().map_err(driver("uploading weights"))?;
        let upload_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let layer_type = fused::layer_type(&weights);
        let decode = layer_type.as_ref().ok().map(|&dtype| (dtype, hd));
        let (mut kernels, kernels_cached) = Kernels::load(&ctx, gpu.arch(), decode, cpu.kv_type)?;
        if kernels::mma_wanted(gpu.arch(), cpu.precision) {
            kernels.mma = tile_weights(&ctx, &stream, &kernels, gpu.arch(), &mut weights)?;
        }
        let kernels_ms = t.elapsed().as_secs_f64() * 1e3;
        let fused = layer_type.and_then(|_| {
            let built = std::mem::replace(&mut kernels.decode_layers, Err(String::new()));
            if kernels.mma.is_some() {
                return Err(
                    "the BF16 matrices are multiplied on tensor cores, which the \
                            persistent kernel does not do"
                        .into(),
                );
            }
            fused::Fused::new(&ctx, built?, hd, fused::max_cols(&weights))
        });
        let startup = Startup {
            kernels_ms,
            kernels_cached,
            upload_ms,
            weight_bytes: weights.bytes,
        };
        Ok(CudaLlama {
            config: config.clone(),
            device,
            ctx,
            stream,
            kernels,
            weights,
            fused,
            fused_on: AtomicBool::new(false),
            startup,
            busy: FifoMutex::new(Held::default()),
            steps: StepBatcher::new(batch::STEP_BUDGET).waking_early(),
            graveyard: Arc::default(),
            spare: Mutex::new(Vec::new()),
            kv_type: cpu.kv_type,
            staging: Mutex::new(None),
        })
    }

    /// Whether the BF16 matrices are multiplied on tensor cores (`kernels/mma.cuh`).
    pub fn tensor_cores(&self) -> bool {
        self.kernels.mma.is_some()
    }

    /// Where the forward pass computes, for snapshots and messages.
    pub fn label(&self) -> String {
        format!("{} {}", self.device.describe(), self.precision())
    }

    /// The arithmetic, as `label` and `numerics` name it.
    fn precision(&self) -> String {
        let mut precision = match prefill::unavailable() {
            None => "f32, bf16 prefill GEMMs".to_string(),
            Some(_) => "f32".to_string(),
        };
        if self.tensor_cores() {
            precision.push_str(", bf16 hi/lo tensor-core products");
        }
        precision.push_str(self.kv_type.precision_note());
        precision
    }

    /// How sessions' KV caches store keys and values.
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// What decides the bits this forward pass computes ([`crate::numerics`]): the precision
    /// path `label` names, the SHA-256 of the kernel sources and the compute capability.
    pub fn numerics(&self) -> Numerics {
        let architecture = match self.device.as_cuda() {
            Some(gpu) => format!("sm_{}", gpu.arch()),
            None => String::new(), // checked to be a CUDA device at open
        };
        Numerics {
            backend: "cuda".into(),
            precision: self.precision(),
            kernels: kernel_hash(kernels::sources()),
            architecture,
        }
    }

    /// How a decode step runs: its layers as one persistent kernel, or kernel by kernel
    /// (and why).
    pub fn decode_path(&self) -> String {
        match (&self.fused, self.fused_on.load(Ordering::Relaxed)) {
            (Ok(f), true) => format!(
                "the layers in one persistent kernel (cooperative launch, {} blocks of {} \
                 threads, grid barriers between stages), then the output head",
                f.grid,
                fused::DECODE_THREADS
            ),
            (Ok(_), false) => {
                "kernel by kernel (a persistent kernel for the layers is available)".into()
            }
            (Err(why), _) => format!("kernel by kernel ({why})"),
        }
    }

    /// Whether the model has the persistent decode kernel (on or off).
    pub fn has_fused_decode(&self) -> bool {
        self.fused.is_ok()
    }

    /// Turns the persistent decode kernel on or off (where the model has one), so that the
    /// two ways can be compared; sessions capture their decode graph again on their next
    /// step.
    pub fn set_fused_decode(&self, on: bool) {
        self.fused_on.store(on, Ordering::Relaxed);
    }

    /// Runs `f` with one-token products taking several rows a warp where they can, and
    /// one-token attention asking for its cached rows before its wait, each as given (both on
    /// by default, the same bits either way), then sets both back as they were; so that the
    /// ways can be compared. Sessions capture their decode graph again on their next step.
    pub fn with_one_token_kernels<T>(
        &self,
        rows_together: bool,
        early_attention: bool,
        f: impl FnOnce() -> T,
    ) -> T {
        let before = (self.rows_together(), self.early_attention());
        self.kernels.set_rows_together(rows_together);
        self.kernels.set_early_attention(early_attention);
        let out = f();
        self.kernels.set_rows_together(before.0);
        self.kernels.set_early_attention(before.1);
        out
    }

    /// Whether one-token attention asks for its cached rows before its wait.
    fn early_attention(&self) -> bool {
        self.kernels.early_attention()
    }

    /// Whether one-token products take several rows a warp where they can.
    fn rows_together(&self) -> bool {
        self.kernels.rows_together()
    }

    /// The persistent decode kernel, when decode steps take it.
    fn fused(&self) -> Option<&fused::Fused> {
        self.fused
            .as_ref()
            .ok()
            .filter(|_| self.fused_on.load(Ordering::Relaxed))
    }

    /// An empty session of up to `n_ctx` positions.
    pub fn new_session(&self, n_ctx: usize) -> Result<CudaSession, ModelError> {
        let _busy = self.hold()?;
        if let Some(spare) = self.take_spare(n_ctx) {
            return CudaSession::reuse(self, spare);
        }
        CudaSession::new(self, n_ctx).or_else(|_| {
            // Out of device memory, perhaps because of what is kept: free it and try again.
            self.free_spares();
            CudaSession::new(self, n_ctx)
        })
    }

    /// Appends `tokens` to `session` and writes the last position's logits into `logits`
    /// (directly, when `logits` is registered with the GPU).
    pub fn forward(
        &self,
        session: &mut CudaSession,
        tokens: &[u32],
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        self.forward_top(session, tokens, Some(logits), &mut [])
    }

    /// [`forward`](Self::forward), and the `top.len()` largest logits into `top` in
    /// [`crate::top`]'s order, selected on the GPU (`top` is written by the GPU directly when
    /// it is registered with it). With `logits` `None`, the logits stay on the GPU.
    pub fn forward_top(
        &self,
        session: &mut CudaSession,
        tokens: &[u32],
        logits: Option<&mut [f32]>,
        top: &mut [Candidate],
    ) -> Result<(), ModelError> {
        self.step_items(&mut [Item {
            session,
            tokens,
            logits,
            top,
            out: true,
        }])
    }

    /// The step scheduler's counters for this model.
    pub fn step_stats(&self) -> StepStats {
        self.steps.stats()
    }

    /// The prefill path's buffers, made on first use, or why it cannot run here.
    fn prefill<'a>(
        &self,
        state: &'a mut Option<Result<Prefill, ModelError>>,
    ) -> Result<&'a mut Prefill, &'a ModelError> {
        state
            .get_or_insert_with(|| Prefill::new(self))
            .as_mut()
            .map_err(|e| &*e)
    }

    /// The model, held for this caller (one at a time, in arrival order), its context bound to this thread,
    /// and the memory of sessions dropped since the last holder freed.
    pub(crate) fn hold(&self) -> Result<FifoGuard<'_, Held>, ModelError> {
        let busy = self.busy.lock();
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the context"))?;
        let dead = std::mem::take(&mut *self.graveyard.lock().unwrap_or_else(|e| e.into_inner()));
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        for body in dead {
            match body.downcast::<session::Spare>() {
                Ok(buffers) => {
                    spare.push(*buffers);
                    if spare.len() > SPARE_SESSIONS {
                        spare.remove(0);
                    }
                }
                Err(other) => drop(other),
            }
        }
        Ok(busy)
    }

    /// A dropped session's device memory for `n_ctx` positions, if one is kept; the caller
    /// holds `busy`.
    fn take_spare(&self, n_ctx: usize) -> Option<session::Spare> {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        let at = spare.iter().position(|s| s.n_ctx == n_ctx)?;
        Some(spare.remove(at))
    }

    /// Frees every kept session's device memory; the caller holds `busy`.
    fn free_spares(&self) {
        self.spare.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// `f` on the tensor-core prefill, the model held as [`CudaLlama::hold`] holds it; an
    /// error where the prefill cannot run (no cuBLAS, or the device failed setting it up).
    fn with_prefill<R>(
        &self,
        f: impl FnOnce(&mut Prefill) -> Result<R, ModelError>,
    ) -> Result<R, ModelError> {
        let mut busy = self.hold()?;
        let prefill = self.prefill(&mut busy.prefill).map_err(|e| match e {
            ModelError::Device { what, reason, .. } => {
                ModelError::device("cuda", format!("setting up the prefill: {what}"), reason)
            }
            _ => ModelError::Unsupported(prefill::unavailable().unwrap_or("no cuBLAS").into()),
        })?;
        f(prefill)
    }

    /// How prompts of at least `PREFILL_MIN` (64) positions run: through the tensor-core
    /// products of every step (at `Precision::Tensor`), through cuBLAS GEMMs, or why not.
    pub fn prefill_path(&self) -> String {
        if self.tensor_cores() {
            return format!(
                "prompts of {PREFILL_MIN}+ positions {} a chunk through the tensor-core products \
                 of every step, keys and values stored first, then every position's query on the \
                 decode attention kernel: the bits of one token at a time",
                batch::EXACT_CHUNK
            );
        }
        match prefill::unavailable() {
            None => format!(
                "prompts of {PREFILL_MIN}+ positions through BF16 tensor-core GEMMs (cuBLAS), \
                 f32 accumulation"
            ),
            Some(why) => format!("matrix-vector kernels only: {why}"),
        }
    }

    /// What cuBLAS reaches on one layer's matrix products with `n` positions of BF16
    /// operands (floating-point operations per second), and what those products take per
    /// position: the prefill path's yardstick.
    pub fn gemm_rate(&self, n: usize, repeats: usize) -> Result<f64, ModelError> {
        self.with_prefill(|prefill| prefill.gemm_rate(self, n, repeats))
    }

    /// Floating-point operations of the layers' matrix products for `n` positions.
    pub fn layer_flops(&self, n: usize) -> f64 {
        prefill::layer_flops(&self.config, n)
    }

    /// Times each kernel of one decode step of `session` (see [`CudaSession::profile_step`]).
    pub fn profile_step(
        &self,
        session: &mut CudaSession,
        token: u32,
    ) -> Result<Vec<(&'static str, f64)>, ModelError> {
        let _busy = self.hold()?;
        session.profile_step(self, token)
    }

    /// Times each kernel of one tensor-core prefill chunk of `tokens` (at most
    /// `PREFILL_CHUNK`) after `session`'s positions, leaving the session as it was.
    pub fn profile_prefill(
        &self,
        session: &mut CudaSession,
        tokens: &[u32],
    ) -> Result<Vec<(&'static str, f64)>, ModelError> {
        if tokens.is_empty()
            || tokens.len() > PREFILL_CHUNK
            || session.len + tokens.len() > session.n_ctx
        {
            return Err(ModelError::Invalid(format!(
                "a prefill chunk of {} positions after {} in a session of {}",
                tokens.len(),
                session.len,
                session.n_ctx
            )));
        }
        self.with_prefill(|prefill| session.profile_prefill(self, prefill, tokens))
    }

    /// Microseconds one decode step of `session` takes on the GPU as the engine runs it
    /// (setting the step, and its graph: events around both; the median of `repeats`, after
    /// one untimed step that captures the graph), leaving the session as it was. What the
    /// engine's whole step takes beyond this is the host's.
    pub fn graph_step_us(
        &self,
        session: &mut CudaSession,
        token: u32,
        repeats: usize,
    ) -> Result<f64, ModelError> {
        let _busy = self.hold()?;
        let (len, logits) = (session.len, session.logits_ptr());
        session.decode(self, token, logits)?;
        session.truncate(len);
        let per_second = median_rate(&self.stream, repeats, 1.0, || {
            session.decode(self, token, logits)?;
            session.truncate(len);
            Ok(())
        })?;
        Ok(1e6 / per_second)
    }

    /// The GPU's memory bandwidth as a device-to-device copy of `bytes` sees it: bytes read
    /// plus bytes written per second (the median of `repeats` copies), the roofline a
    /// memory-bound decode step is measured against.
    pub fn copy_bandwidth(&self, bytes: usize, repeats: usize) -> Result<f64, ModelError> {
        let _busy = self.busy.lock();
        let s = &self.stream;
        let src = s.alloc_zeros::<u8>(bytes).map_err(driver("allocating"))?;
        let mut dst = s.alloc_zeros::<u8>(bytes).map_err(driver("allocating"))?;
        s.memcpy_dtod(&src, &mut dst).map_err(driver("copying"))?;
        median_rate(s, repeats, 2.0 * bytes as f64, || {
            s.memcpy_dtod(&src, &mut dst).map_err(driver("copying"))
        })
    }

    /// The GPU's memory bandwidth as a kernel that only reads sees it: bytes read per second
    /// of `bytes` (the median of `repeats` reads), eight blocks an SM; the upper roofline
    /// beside [`CudaLlama::copy_bandwidth`]'s (a decode step only reads its weights).
    pub fn read_bandwidth(&self, bytes: usize, repeats: usize) -> Result<f64, ModelError> {
        use tern_compute::cuda::cudarc::driver::sys::CUdevice_attribute;
        let _busy = self.busy.lock();
        let s = &self.stream;
        let sms = self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("reading the SM count"))?;
        let grid = 8 * u32::try_from(sms).unwrap_or(1).max(1);
        let src = s.alloc_zeros::<u8>(bytes).map_err(driver("allocating"))?;
        let out = s.alloc_zeros::<u32>(1).map_err(driver("allocating"))?;
        let (p, _) = src.device_ptr(s);
        let (o, _) = out.device_ptr(s);
        let run = Launcher {
            kernels: &self.kernels,
            stream: s,
        };
        let words = (bytes / 16) as u64;
        run.read_all(p, words, o, grid)?;
        median_rate(s, repeats, (words * 16) as f64, || {
            run.read_all(p, words, o, grid)
        })
    }

    /// Host-to-device bandwidth from page-locked host memory: bytes per second of a copy of
    /// `bytes` (the median of `repeats` copies), the bus bound of restoring a snapshot.
    pub fn upload_bandwidth(&self, bytes: usize, repeats: usize) -> Result<f64, ModelError> {
        let _busy = self.busy.lock();
        let s = &self.stream;
        // SAFETY: the buffer is zeroed below before anything reads it.
        let mut host = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(bytes, 0) }
            .map_err(driver("allocating page-locked memory"))?;
        host.as_mut_slice()
            .map_err(driver("allocating page-locked memory"))?
            .fill(0);
        let mut dst = s.alloc_zeros::<u8>(bytes).map_err(driver("allocating"))?;
        s.memcpy_htod(&host, &mut dst).map_err(driver("copying"))?;
        median_rate(s, repeats, bytes as f64, || {
            s.memcpy_htod(&host, &mut dst).map_err(driver("copying"))
        })
    }

    /// Kernel launches of one decode step (the nodes of its graph).
    pub fn kernels_per_step(&self) -> usize {
        if self.fused().is_some() {
            // get_rows, rmsnorm, the layers, rmsnorm, the output head.
            return 5;
        }
        let per_layer: usize = self
            .weights
            .layers
            .iter()
            .map(|l| 3 + usize::from(!l.glu) + l.qkv.len() + l.gate_up.len())
            .sum();
        per_layer + 4
    }

    /// The number of attention splits a session of `n_ctx` positions uses.
    fn n_split(n_ctx: usize) -> usize {
        n_ctx.div_ceil(ATTN_SPLIT)
    }
}

/// `amount` (bytes, operations) per second that `run` achieves on `stream`, timed with events:
/// the median of `repeats` runs.
fn median_rate(
    stream: &Arc<CudaStream>,
    repeats: usize,
    amount: f64,
    mut run: impl FnMut() -> Result<(), ModelError>,
) -> Result<f64, ModelError> {
    use tern_compute::cuda::cudarc::driver::sys::CUevent_flags;
    let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let mut rates = Vec::new();
    for _ in 0..repeats.max(1) {
        let start = stream
            .record_event(timing)
            .map_err(driver("recording an event"))?;
        run()?;
        let end = stream
            .record_event(timing)
            .map_err(driver("recording an event"))?;
        end.synchronize().map_err(driver("timing"))?;
        let ms = start.elapsed_ms(&end).map_err(driver("reading an event"))?;
        rates.push(amount / (f64::from(ms) / 1e3));
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}

/// Refuses a request for `k` of `vocab` logits that the top-k kernels cannot serve.
fn check_top(vocab: usize, k: usize) -> Result<(), ModelError> {
    crate::top::check_k(k, vocab)?;
    if vocab.div_ceil(kernels::TOP_CHUNK) > kernels::TOP_MAX_LISTS {
        return Err(ModelError::Unsupported(format!(
            "selecting top logits on the GPU from a vocabulary of {vocab}"
        )));
    }
    Ok(())
}

fn halves(c: &LlamaConfig) -> i32 {
    i32::from(c.rope_style == RopeStyle::Halves)
}

/// Turns off cudarc's per-buffer event tracking for buffers made from now on: a captured
/// graph must not wait on or record events from outside the capture, and the forward pass
/// orders its work itself.
fn untracked(ctx: &CudaContext) {
    // SAFETY: every buffer of the forward pass is allocated, used and freed on one stream
    // (the model's, or a test harness's own), and that stream is synchronized before a call
    // returns, so no buffer is used by two streams or freed while a kernel may use it.
    unsafe { ctx.disable_event_tracking() };
}

/// Maps a driver error to a [`ModelError::Device`] that says what was being done.
fn driver<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> ModelError {
    move |e| ModelError::device("cuda", what, format!("{e:?}"))
}

crate::engine::session_state!(CudaSession);

/// The CUDA engine: a single step goes through the step scheduler (so that concurrent
/// callers share batched steps); several at once run as one batched step (`batch.rs`).
impl Engine for CudaLlama {
    fn label(&self) -> String {
        CudaLlama::label(self)
    }

    fn numerics(&self) -> Numerics {
        CudaLlama::numerics(self)
    }

    fn open_session(&self, n_ctx: usize) -> Result<Box<dyn SessionState>, ModelError> {
        Ok(Box::new(self.new_session(n_ctx)?))
    }

    fn step(&self, items: &mut [StepItem<'_>]) -> Result<(), ModelError> {
        if let [item] = items {
            let session = own_mut::<CudaSession>(&mut *item.state)?;
            // Checked here, so that a caller's mistake is its own error, not a step's.
            self.check_item(session, item.tokens, item.logits.as_deref(), item.top)?;
            let job = CudaJob {
                session,
                tokens: item.tokens,
                logits: item.logits.as_deref_mut().map(std::ptr::from_mut),
                top: std::ptr::from_mut(item.top),
                at: 0,
                failed: None,
            };
            let job = self.steps.run(job, |jobs| self.step_jobs(jobs));
            return match job.failed {
                Some(why) => Err(ModelError::device("cuda", "a batched step", why)),
                None => Ok(()),
            };
        }
        let mut cuda = Vec::with_capacity(items.len());
        for item in items.iter_mut() {
            cuda.push(Item {
                session: own_mut::<CudaSession>(&mut *item.state)?,
                tokens: item.tokens,
                logits: item.logits.as_deref_mut(),
                top: &mut *item.top,
                out: true,
            });
        }
        self.step_items(&mut cuda)
    }

    fn step_stats(&self) -> StepStats {
        self.steps.stats()
    }

    fn read_kv<'s>(
        &self,
        state: &'s dyn SessionState,
        from: usize,
    ) -> Result<(std::borrow::Cow<'s, KvCache>, usize), ModelError> {
        let s = own::<CudaSession>(state)?;
        let c = &self.config;
        let _busy = self.hold()?;
        let from = from.min(s.len);
        let cache = s.download(from, c.n_layer, c.kv_dim())?;
        Ok((std::borrow::Cow::Owned(cache), from))
    }

    fn write_kv(
        &self,
        state: &mut dyn SessionState,
        from: usize,
        len: usize,
        layer: &LayerBytes<'_, '_>,
        units: Option<&dyn SourceUnits>,
    ) -> Result<(), ModelError> {
        let s = own_mut::<CudaSession>(state)?;
        let _busy = self.hold()?;
        let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if staging.is_none() {
            *staging = Some(Staging::new(&self.ctx)?);
        }
        let staging = staging.as_ref().expect("made above");
        s.upload_layers(self, staging, from, len, layer, units)
    }

    fn reads_kv_units(&self) -> bool {
        true
    }
}
