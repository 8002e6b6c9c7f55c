//! [`CudaSession`]: one sequence on the GPU: its KV cache, its scratch buffers, and the CUDA
//! graph of its decode step.

use std::any::Any;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};

use tern_compute::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use tern_compute::cuda::cudarc::driver::{
    CudaEvent, CudaGraph, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice,
};

use super::batch::{AttnJob, QueryScratch};
use super::fused::{self, FusedSession};
use super::kernels::{DevMatrix, Fuse, Launcher, TOP_CHUNK};
use super::prefill::Prefill;
use super::staging::{Piece, Staging};
use super::{CudaLlama, MAX_CHUNK, driver};
use crate::ModelError;
use crate::engine::{LayerBytes, SourceUnits};
use crate::llama::cpu::{KvCache, KvType};
use crate::top::{Candidate, MAX_TOP};

/// The persistent decode kernel's name in a profile.
const LAYERS: &str = "layers (persistent kernel)";

/// Device buffers of one session. Every activation buffer holds `MAX_CHUNK` positions.
struct Buffers {
    k: CudaSlice<u8>,        // (n_layer, n_ctx, kv_dim) of the model's KvType
    v: CudaSlice<u8>,        // (n_layer, n_ctx, kv_dim) of the model's KvType
    step: CudaSlice<i32>,    // [first position, token ids (MAX_CHUNK)]
    act: ActBuffers,         // MAX_CHUNK rows
    part_o: CudaSlice<f32>,  // (MAX_CHUNK, n_head, n_split, head_dim)
    part_ml: CudaSlice<f32>, // (MAX_CHUNK, n_head, n_split, 2)
    tickets: CudaSlice<u32>, // (MAX_CHUNK, n_head) attention's merge tickets, zero between launches
    logits: CudaSlice<f32>,  // (n_vocab) for callers whose buffer the GPU cannot see
    cand: CudaSlice<u64>,    // (ceil(n_vocab / TOP_CHUNK), MAX_TOP) top-k scratch
    top: CudaSlice<u32>,     // (MAX_TOP, 2) top-k for callers whose buffer the GPU cannot see
    slots: Slots,            // greedy steps' selections, in page-locked memory
}

/// (token, logit bits) pairs in page-locked host memory that the GPU writes directly
/// (unified addressing: the host address is the device address): a session's two, a greedy
/// step's selection and the one of the step enqueued ahead of it; the model's, those of
/// batched greedy steps (see `batch.rs`'s `BatchAhead`).
pub(super) struct Slots {
    host: PinnedHostSlice<u32>,
    at: u64,
}

impl Slots {
    /// `n` slots.
    pub(super) fn new(model: &CudaLlama, n: usize) -> Result<Slots, ModelError> {
        // SAFETY: zeroed below before anything reads it.
        let mut host = unsafe { model.ctx.alloc_pinned_with_flags::<u32>(2 * n, 0) }
            .map_err(driver("allocating page-locked memory"))?;
        let at = host
            .as_mut_ptr()
            .map_err(driver("allocating page-locked memory"))? as u64;
        let mut slots = Slots { host, at };
        slots.clear()?;
        Ok(slots)
    }

    fn clear(&mut self) -> Result<(), ModelError> {
        self.host
            .as_mut_slice()
            .map_err(driver("clearing page-locked memory"))?
            .fill(0);
        Ok(())
    }

    /// Device address of slot `i`.
    pub(super) fn ptr(&self, i: usize) -> u64 {
        self.at + 8 * i as u64
    }

    /// Slot `i` (of those made) once the GPU has written it.
    pub(super) fn read(&self, i: usize) -> Candidate {
        // SAFETY: `at` addresses the words of `host`, alive with `self`, of which slot `i` is
        // one pair; the caller waited for the kernel that wrote them, so nothing writes them
        // while they are read.
        let (token, bits) = unsafe {
            let p = self.at as *const u32;
            (
                std::ptr::read_volatile(p.add(2 * i)),
                std::ptr::read_volatile(p.add(2 * i + 1)),
            )
        };
        Candidate {
            token,
            logit: f32::from_bits(bits),
        }
    }
}

/// A greedy decode step enqueued before its call (see [`CudaSession::greedy`]): it ran the
/// token `token` (the selection of the step before) at position `pos`, and its selection
/// lands in slot `slot` once `done` has passed.
struct Ahead {
    pos: usize,
    token: u32,
    slot: usize,
    done: CudaEvent,
}

/// One sequence's state on the GPU.
pub struct CudaSession {
    pub n_ctx: usize,
    /// How the KV cache stores keys and values.
    kv_type: KvType,
    /// Positions filled.
    pub len: usize,
    /// Freed only through `graveyard` (see [`Drop`]).
    buf: ManuallyDrop<Buffers>,
    /// Where this session's device memory goes when it is dropped: the model frees it
    /// when next held, so that nothing is enqueued on its stream while another thread may
    /// be capturing it.
    graveyard: Arc<Mutex<Vec<Box<dyn Any + Send>>>>,
    stream: Arc<CudaStream>,
    /// The decode step's graph, the logits address it writes, and the kernels it runs (bit 0:
    /// the layers in the persistent kernel; 1: early attention; 2: rows together).
    graph: Option<(Graph, u64, u8)>,
    /// The persistent decode kernel's share, when the model has that kernel.
    fused: Option<FusedSession>,
    /// The greedy step enqueued ahead, if any.
    ahead: Option<Ahead>,
    /// The batched greedy step enqueued ahead that this session is a row of, if any: its
    /// mark and the row (see `batch.rs`'s `BatchAhead`).
    pub(super) batch_ahead: Option<(u64, usize)>,
}

/// A session's decode graph.
struct Graph(CudaGraph);

// SAFETY: a CUDA graph's handles belong to its context, not to a thread: the driver takes
// them from any thread where the context is current. A session's graph is captured,
// launched and replaced only by a holder of its model's `busy`, which binds the context,
// one thread at a time; a dropped session's graph goes to the graveyard, which destroys it
// on the thread that next holds the model. So a session (and its graph) may move between
// threads.
unsafe impl Send for Graph {}

impl Drop for CudaSession {
    // Frees nothing here: the device memory goes to the model's graveyard, freed by the
    // model's next holder, when no other thread can be capturing its stream.
    fn drop(&mut self) {
        // A step run ahead writes the page-locked slots: it ends before they can be reused or
        // freed (an error here means the context is gone, and the work with it).
        if let Some(a) = self.ahead.take() {
            let _ = a.done.synchronize();
        }
        // SAFETY: `buf` is taken exactly once, here, and the session is gone after.
        let buf = unsafe { ManuallyDrop::take(&mut self.buf) };
        let mut dead: Vec<Box<dyn Any + Send>> = vec![Box::new(Spare {
            n_ctx: self.n_ctx,
            buf,
        })];
        if let Some((graph, _, _)) = self.graph.take() {
            dead.push(Box::new(graph));
        }
        if let Some(fused) = self.fused.take() {
            dead.push(Box::new(fused));
        }
        self.graveyard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(dead);
    }
}

/// A dropped session's device memory, on its way to the model's spares (see
/// [`CudaLlama::hold`]).
pub(super) struct Spare {
    pub n_ctx: usize,
    buf: Buffers,
}

impl CudaSession {
    /// A new session in `spare`'s device memory, zeroed first as a new allocation is. The
    /// caller holds the model.
    pub(super) fn reuse(model: &CudaLlama, spare: Spare) -> Result<CudaSession, ModelError> {
        let Spare { n_ctx, mut buf } = spare;
        let s = &model.stream;
        let zero = driver("clearing a session");
        s.memset_zeros(&mut buf.k).map_err(&zero)?;
        s.memset_zeros(&mut buf.v).map_err(&zero)?;
        s.memset_zeros(&mut buf.step).map_err(&zero)?;
        buf.act.zero(s, "clearing a session")?;
        for b in [&mut buf.part_o, &mut buf.part_ml, &mut buf.logits] {
            s.memset_zeros(b).map_err(&zero)?;
        }
        s.memset_zeros(&mut buf.tickets).map_err(&zero)?;
        s.memset_zeros(&mut buf.cand).map_err(&zero)?;
        s.memset_zeros(&mut buf.top).map_err(&zero)?;
        buf.slots.clear()?;
        Self::with_buffers(model, n_ctx, buf)
    }

    pub(super) fn new(model: &CudaLlama, n_ctx: usize) -> Result<CudaSession, ModelError> {
        let c = &model.config;
        let s = &model.stream;
        let kv_len = c.kv_cache_len(n_ctx)?;
        let n_split = CudaLlama::n_split(n_ctx);
        let alloc = |n: usize| {
            s.alloc_zeros::<f32>(n)
                .map_err(driver("allocating a session"))
        };
        let alloc_kv = || {
            s.alloc_zeros::<u8>(kv_len * model.kv_type().bytes())
                .map_err(driver("allocating a session"))
        };
        let buf = Buffers {
            k: alloc_kv()?,
            v: alloc_kv()?,
            step: s
                .alloc_zeros::<i32>(1 + MAX_CHUNK)
                .map_err(driver("allocating a session"))?,
            act: ActBuffers::new(s, c, MAX_CHUNK, "allocating a session")?,
            part_o: alloc(MAX_CHUNK * c.n_head * n_split * c.head_dim)?,
            part_ml: alloc(MAX_CHUNK * c.n_head * n_split * 2)?,
            tickets: s
                .alloc_zeros::<u32>(MAX_CHUNK * c.n_head)
                .map_err(driver("allocating a session"))?,
            logits: alloc(c.n_vocab)?,
            cand: s
                .alloc_zeros::<u64>(c.n_vocab.div_ceil(TOP_CHUNK) * MAX_TOP)
                .map_err(driver("allocating a session"))?,
            top: s
                .alloc_zeros::<u32>(2 * MAX_TOP)
                .map_err(driver("allocating a session"))?,
            slots: Slots::new(model, 2)?,
        };
        Self::with_buffers(model, n_ctx, buf)
    }

    /// A session in `buf`, sized for `n_ctx` positions.
    fn with_buffers(
        model: &CudaLlama,
        n_ctx: usize,
        buf: Buffers,
    ) -> Result<CudaSession, ModelError> {
        let c = &model.config;
        let s = &model.stream;
        let mut session = CudaSession {
            n_ctx,
            kv_type: model.kv_type(),
            len: 0,
            buf: ManuallyDrop::new(buf),
            graveyard: model.graveyard.clone(),
            stream: s.clone(),
            graph: None,
            fused: None,
            ahead: None,
            batch_ahead: None,
        };
        if model.fused.is_ok() {
            let caches = (0..c.n_layer).map(|l| session.cache(c, l)).collect();
            session.fused = Some(FusedSession::new(s, &model.weights, caches)?);
        }
        Ok(session)
    }

    /// Layer `l`'s key and value caches (`n_ctx` rows of `kv_dim` floats each).
    fn cache(&self, c: &crate::llama::LlamaConfig, l: usize) -> (u64, u64) {
        let layer_bytes = (l * self.n_ctx * c.kv_dim() * self.kv_type.bytes()) as u64;
        (
            self.ptr(&self.buf.k) + layer_bytes,
            self.ptr(&self.buf.v) + layer_bytes,
        )
    }

    fn ptr<T>(&self, slice: &CudaSlice<T>) -> u64 {
        slice.device_ptr(&self.stream).0
    }

    pub(super) fn logits_ptr(&self) -> u64 {
        self.ptr(&self.buf.logits)
    }

    /// Query `t` of this session's new positions in a batched step whose row `first` holds
    /// the session's first new position: what `attention_batch` needs of the session.
    pub(super) fn attn_job(
        &self,
        c: &crate::llama::LlamaConfig,
        t: usize,
        first: usize,
        before: usize,
    ) -> AttnJob {
        let (k_cache, v_cache) = self.cache(c, 0);
        let scratch = self.own_scratch();
        AttnJob {
            k_cache,
            v_cache,
            layer: (self.n_ctx * c.kv_dim()) as u64,
            part_o: scratch.part_o,
            part_ml: scratch.part_ml,
            tickets: scratch.tickets,
            step0: (self.len + before) as i32,
            t: t as u32,
            first: first as u32,
            n_split: scratch.n_split,
        }
    }

    /// This session's own attention scratch: [`MAX_CHUNK`] queries' slots.
    pub(super) fn own_scratch(&self) -> QueryScratch {
        QueryScratch {
            part_o: self.ptr(&self.buf.part_o),
            part_ml: self.ptr(&self.buf.part_ml),
            tickets: self.ptr(&self.buf.tickets),
            n_split: CudaLlama::n_split(self.n_ctx) as u32,
        }
    }

    /// Position `before` of this session's new positions (row `first` of a batched step) as
    /// a query of its own, `t` 0, which reads the positions before it from the cache (stored
    /// there by `append_kv`), with slot `slot` of `scratch` (this session's own, or a
    /// round's): so that several positions of one session share a launch, each in its slot.
    pub(super) fn attn_job_alone(
        &self,
        c: &crate::llama::LlamaConfig,
        scratch: QueryScratch,
        slot: usize,
        first: usize,
        before: usize,
    ) -> AttnJob {
        let job = self.attn_job(c, 0, first, before);
        let queries = (slot * c.n_head) as u64;
        let n_split = u64::from(scratch.n_split);
        debug_assert!(u64::from(job.n_split) >= n_split);
        AttnJob {
            part_o: scratch.part_o + queries * n_split * c.head_dim as u64 * 4,
            part_ml: scratch.part_ml + queries * n_split * 2 * 4,
            tickets: scratch.tickets + queries * 4,
            n_split: scratch.n_split,
            ..job
        }
    }

    /// Copies the session's own logits buffer to the host.
    pub(super) fn read_logits(
        &self,
        stream: &Arc<CudaStream>,
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        stream
            .memcpy_dtoh(&self.buf.logits, logits)
            .map_err(driver("copying logits"))
    }

    /// Enqueues the selection of the largest `k` of the `n_vocab` logits at `logits`
    /// (device-visible): into `out` when given (a buffer of the caller's that the GPU sees),
    /// else into this session's own, which [`CudaSession::read_top`] copies out once the
    /// stream has run it.
    pub(super) fn enqueue_top_k(
        &self,
        model: &CudaLlama,
        logits: u64,
        k: usize,
        out: Option<u64>,
    ) -> Result<(), ModelError> {
        let run = Launcher {
            kernels: &model.kernels,
            stream: &model.stream,
        };
        let n = model.config.n_vocab as u32;
        let out = out.unwrap_or_else(|| self.ptr(&self.buf.top));
        run.top_k(logits, n, k as u32, self.ptr(&self.buf.cand), out)
    }

    /// Copies the candidates [`CudaSession::enqueue_top_k`] left in this session's buffer
    /// into `top`.
    pub(super) fn read_top(&self, top: &mut [Candidate]) -> Result<(), ModelError> {
        let mut pairs = [0u32; 2 * MAX_TOP];
        self.stream
            .memcpy_dtoh(
                &self.buf.top.slice(..2 * top.len()),
                &mut pairs[..2 * top.len()],
            )
            .map_err(driver("copying the top logits"))?;
        from_pairs(top, &pairs);
        Ok(())
    }

    /// Writes the first position and the token ids the kernels of the next call read.
    fn set_step(&mut self, tokens: &[u32]) -> Result<(), ModelError> {
        self.drop_ahead();
        let mut step = [0i32; 1 + MAX_CHUNK];
        step[0] = self.len as i32;
        for (s, &t) in step[1..].iter_mut().zip(tokens) {
            *s = t as i32;
        }
        self.stream
            .memcpy_htod(&step[..1 + tokens.len()], &mut self.buf.step)
            .map_err(driver("setting the step"))
    }

    /// Runs up to `MAX_CHUNK` tokens through every layer (kernel by kernel); when `logits` is
    /// given, also the output head for the last of them.
    pub(super) fn run_chunk(
        &mut self,
        model: &CudaLlama,
        tokens: &[u32],
        logits: Option<u64>,
    ) -> Result<(), ModelError> {
        self.set_step(tokens)?;
        self.enqueue(model, tokens.len(), logits, 0, &mut |_| Ok(()))?;
        self.len += tokens.len();
        Ok(())
    }

    /// Runs `tokens` (at most `PREFILL_CHUNK`) through every layer with BF16 GEMMs for the
    /// matrix products (see `prefill.rs`); when `logits` is given, also the output head for
    /// the last of them.
    pub(super) fn prefill_chunk(
        &mut self,
        model: &CudaLlama,
        pre: &mut Prefill,
        tokens: &[u32],
        logits: Option<u64>,
        mark: &mut dyn FnMut(&'static str) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        let c = &model.config;
        let w = &model.weights;
        let n = tokens.len();
        self.set_step(&[])?;
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        self.stream
            .memcpy_htod(&ids, &mut pre.ids.slice_mut(..n))
            .map_err(driver("setting the prompt"))?;
        let run = Launcher {
            kernels: &model.kernels,
            stream: &model.stream,
        };
        let (x, act, qkv, gate_up) = (
            pre.ptr(&pre.x),
            pre.ptr(&pre.act),
            pre.ptr(&pre.qkv),
            pre.ptr(&pre.gate_up),
        );
        let step = self.ptr(&self.buf.step);
        let (e, q_dim, kv, ff) = (c.n_embd, c.n_head * c.head_dim, c.kv_dim(), c.n_ff);
        let n_u = n as u32;
        let stacked = |parts: &[DevMatrix], y: u64, stride: usize| -> Result<(), ModelError> {
            let mut at = 0u64;
            for m in parts {
                pre.gemm(&run, m, n, y + 4 * at, stride, false)?;
                at += u64::from(m.rows);
            }
            Ok(())
        };
        run.get_rows(&w.token_embd, pre.ptr(&pre.ids), x, n_u)?;
        mark("get_rows")?;
        for (l, lw) in w.layers.iter().enumerate() {
            let (k_cache, v_cache) = self.cache(c, l);
            run.rmsnorm(x, lw.attn_norm, act, n_u, e as u32, c.rms_eps, true)?;
            mark("rmsnorm")?;
            stacked(&lw.qkv, qkv, q_dim + 2 * kv)?;
            mark("gemm qkv")?;
            run.rope_append(c, n_u, qkv, (k_cache, v_cache), w.inv_freq, step)?;
            mark("rope_append")?;
            run.attention_prefill(c, n_u, qkv, (k_cache, v_cache), act, step)?;
            mark("attention")?;
            pre.gemm(&run, &lw.wo, n, x, e, true)?;
            mark("gemm o")?;
            run.rmsnorm(x, lw.ffn_norm, act, n_u, e as u32, c.rms_eps, true)?;
            mark("rmsnorm")?;
            stacked(&lw.gate_up, gate_up, 2 * ff)?;
            mark("gemm gate_up")?;
            run.swiglu_bf16(gate_up, act, n_u, ff as u32, lw.glu)?;
            mark("swiglu")?;
            pre.gemm(&run, &lw.w_down, n, x, e, true)?;
            mark("gemm down")?;
        }
        if let Some(out) = logits {
            let x_last = x + ((n - 1) * e * 4) as u64;
            let xb = self.ptr(&self.buf.act.xb);
            run.rmsnorm(x_last, w.output_norm, xb, 1, e as u32, c.rms_eps, false)?;
            run.matvec_out(&w.output, xb, out)?;
            mark("output head")?;
        }
        self.len += n;
        Ok(())
    }

    /// One decode step through the session's graph, captured on first use and again whenever
    /// the logits address changes.
    pub(super) fn decode(
        &mut self,
        model: &CudaLlama,
        token: u32,
        logits: u64,
    ) -> Result<(), ModelError> {
        self.set_step(&[token])?;
        self.launch_graph(model, logits)?;
        self.len += 1;
        Ok(())
    }

    /// Launches the decode graph (for one token at the position and of the id in `step`),
    /// captured first if there is none for `logits` yet.
    fn launch_graph(&mut self, model: &CudaLlama, logits: u64) -> Result<(), ModelError> {
        // The kernels the graph holds: the persistent one or not, early attention or not, rows
        // together or not.
        let kinds = u8::from(model.fused().is_some())
            | u8::from(model.early_attention()) << 1
            | u8::from(model.rows_together()) << 2;
        if self
            .graph
            .as_ref()
            .is_none_or(|&(_, at, k)| (at, k) != (logits, kinds))
        {
            self.graph = None;
            let stream = &model.stream;
            stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(driver("capturing the decode graph"))?;
            let enqueued = self.enqueue(model, 1, Some(logits), 0, &mut |_| Ok(()));
            let graph = stream
                .end_capture(CUgraphInstantiate_flags(0))
                .map_err(driver("capturing the decode graph"))?;
            enqueued?;
            let graph = graph.ok_or_else(|| {
                ModelError::device("cuda", "capturing the decode graph", "no graph was made")
            })?;
            self.graph = Some((Graph(graph), logits, kinds));
        }
        let (graph, _, _) = self.graph.as_ref().expect("captured above");
        graph
            .0
            .launch()
            .map_err(driver("launching the decode graph"))
    }

    /// One greedy decode step of `token` (a call that wants its top logit alone): taken from
    /// the step enqueued ahead when that one ran `token` at this position, else run now. Its
    /// selection goes into `top`, and the next step, of the token it selected, is enqueued
    /// ahead of its call, so that the GPU runs it while the caller looks at this one's. A
    /// call that is not that step's drops it (what it wrote is past the session's positions).
    pub(super) fn greedy(
        &mut self,
        model: &CudaLlama,
        token: u32,
        top: &mut Candidate,
    ) -> Result<(), ModelError> {
        let (slot, done) = match self.ahead.take() {
            Some(a) if a.pos == self.len && a.token == token => {
                self.len += 1;
                (a.slot, a.done)
            }
            _ => {
                let logits = self.logits_ptr();
                self.decode(model, token, logits)?;
                self.enqueue_top_k(model, logits, 1, Some(self.buf.slots.ptr(0)))?;
                let done = model
                    .stream
                    .record_event(None)
                    .map_err(driver("recording an event"))?;
                (0, done)
            }
        };
        if self.len < self.n_ctx {
            self.run_ahead(model, slot)?;
        }
        done.synchronize()
            .map_err(driver("running the forward pass"))?;
        *top = self.buf.slots.read(slot);
        if let Some(a) = &mut self.ahead {
            a.token = top.token;
        }
        Ok(())
    }

    /// Enqueues the next decode step of the token selected into slot `from`, its selection
    /// into the other slot.
    fn run_ahead(&mut self, model: &CudaLlama, from: usize) -> Result<(), ModelError> {
        let run = Launcher {
            kernels: &model.kernels,
            stream: &model.stream,
        };
        let slots = &self.buf.slots;
        run.next_step(slots.ptr(from), self.ptr(&self.buf.step), self.len as i32)?;
        let logits = self.logits_ptr();
        self.launch_graph(model, logits)?;
        let slot = 1 - from;
        self.enqueue_top_k(model, logits, 1, Some(self.buf.slots.ptr(slot)))?;
        let done = model
            .stream
            .record_event(None)
            .map_err(driver("recording an event"))?;
        self.ahead = Some(Ahead {
            pos: self.len,
            token: u32::MAX,
            slot,
            done,
        });
        Ok(())
    }

    /// Forgets the steps enqueued ahead, if any, this session's alone and the batched one it
    /// is a row of (what they write stays past the positions).
    pub(super) fn drop_ahead(&mut self) {
        self.ahead = None;
        self.batch_ahead = None;
    }

    /// Enqueues the forward pass of `n` tokens whose ids and first position are in `step`;
    /// `mark` is told the name of each kernel after it is enqueued. `timing`: 0, or where the
    /// persistent decode kernel, when it runs, writes its timestamps.
    fn enqueue(
        &self,
        model: &CudaLlama,
        n: usize,
        logits: Option<u64>,
        timing: u64,
        mark: &mut dyn FnMut(&'static str) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        let c = &model.config;
        let w = &model.weights;
        let run = Launcher {
            kernels: &model.kernels,
            stream: &model.stream,
        };
        let b = &self.buf;
        let p = |s: &CudaSlice<f32>| self.ptr(s);
        let acts = b.act.acts(&self.stream);
        let (x, xb, qkv, att, hb) = (acts.x, acts.xb, acts.qkv, acts.att, acts.hb);
        let step = self.ptr(&b.step);
        let ids = step + 4;
        let n_u = n as u32;
        let e = c.n_embd as u32;
        let n_split = CudaLlama::n_split(self.n_ctx) as u32;
        run.get_rows(&w.token_embd, ids, x, n_u)?;
        mark("get_rows")?;
        run.rmsnorm(x, w.layers[0].attn_norm, xb, n_u, e, c.rms_eps, false)?;
        mark("rmsnorm")?;
        // One decode token's layers run in the persistent kernel when the model has it.
        let persistent = model.fused().zip(self.fused.as_ref()).filter(|_| n == 1);
        if let Some((f, session)) = persistent {
            let buffers = [
                x,
                xb,
                qkv,
                att,
                hb,
                p(&b.part_o),
                p(&b.part_ml),
                self.ptr(&b.tickets),
            ];
            let args = session.args(&self.stream, c, w.inv_freq, step, n_split, buffers, timing);
            run.decode_layers(&f.f, f.grid, f.shared, &args)?;
            mark(LAYERS)?;
        } else {
            let scratch = (p(&b.part_o), p(&b.part_ml), self.ptr(&b.tickets));
            let mut attention = |l: usize| {
                let cache = self.cache(c, l);
                run.attention(c, n_u, n_split, qkv, cache, w.inv_freq, scratch, att, step)
            };
            enqueue_layers(model, &run, acts, n, &mut attention, mark)?;
        }
        if let Some(out) = logits {
            let x_last = x + ((n - 1) * c.n_embd * 4) as u64;
            run.rmsnorm(x_last, w.output_norm, xb, 1, e, c.rms_eps, false)?;
            mark("rmsnorm")?;
            run.matvec_out(&w.output, xb, out)?;
            mark("matvec output")?;
        }
        Ok(())
    }

    /// Times each kernel of one decode step (with an event after each, outside any graph),
    /// leaving the session as it was; returns each kernel name's total, in microseconds, in
    /// the order first seen. The persistent decode kernel's time is given stage by stage.
    pub fn profile_step(
        &mut self,
        model: &CudaLlama,
        token: u32,
    ) -> Result<Vec<(&'static str, f64)>, ModelError> {
        self.set_step(&[token])?;
        let logits = Some(self.logits_ptr());
        // Where the persistent kernel runs, a buffer for its timestamps.
        let stamps = match model.fused() {
            Some(_) => Some(
                self.stream
                    .alloc_zeros::<u64>(fused::timestamps(model.config.n_layer))
                    .map_err(driver("profiling"))?,
            ),
            None => None,
        };
        let timing = stamps.as_ref().map_or(0, |s| s.device_ptr(&self.stream).0);
        let times = timed(model, |mark| self.enqueue(model, 1, logits, timing, mark))?;
        let Some(stamps) = stamps else {
            return Ok(times);
        };
        let stamps = self
            .stream
            .clone_dtoh(&stamps)
            .map_err(driver("profiling"))?;
        Ok(times
            .into_iter()
            .flat_map(|(name, us)| match name {
                LAYERS => fused::stage_times(&stamps),
                _ => vec![(name, us)],
            })
            .collect())
    }

    /// As [`profile_step`](Self::profile_step), for one tensor-core prefill chunk of `tokens`
    /// after the session's positions (which it leaves as they were).
    pub(super) fn profile_prefill(
        &mut self,
        model: &CudaLlama,
        pre: &mut Prefill,
        tokens: &[u32],
    ) -> Result<Vec<(&'static str, f64)>, ModelError> {
        let len = self.len;
        let logits = Some(self.logits_ptr());
        let totals = timed(model, |mark| {
            self.prefill_chunk(model, pre, tokens, logits, mark)
        });
        self.len = len;
        totals
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.drop_ahead();
        self.len = self.len.min(len);
    }

    /// The keys and values of the filled positions from `from` (at most `len`) on, copied to
    /// the host in the cache's own type (compact: the cache's position 0 is `from`,
    /// `n_ctx == len - from`).
    pub fn download(
        &self,
        from: usize,
        n_layer: usize,
        kv_dim: usize,
    ) -> Result<KvCache, ModelError> {
        let from = from.min(self.len);
        let mut host = KvCache::empty_of(self.kv_type, n_layer, self.len - from, kv_dim);
        let size = self.kv_type.bytes();
        let per_layer = (self.len - from) * kv_dim * size;
        for l in 0..n_layer {
            let at = (l * self.n_ctx + from) * kv_dim * size;
            let (k, v) = host.layer_bytes_mut(l);
            let copy = driver("downloading the KV cache");
            self.stream
                .memcpy_dtoh(&self.buf.k.slice(at..at + per_layer), k)
                .map_err(&copy)?;
            self.stream
                .memcpy_dtoh(&self.buf.v.slice(at..at + per_layer), v)
                .map_err(&copy)?;
        }
        self.stream
            .synchronize()
            .map_err(driver("downloading the KV cache"))?;
        Ok(host)
    }

    /// Fills positions `from..from + len` of every layer from little-endian bytes of the
    /// cache's type, `layer(l)` giving layer `l`'s keys and values, uploaded through
    /// `staging` (reading the units of `units` that hold them whole through it).
    pub(super) fn upload_layers<'a>(
        &mut self,
        model: &CudaLlama,
        staging: &Staging,
        from: usize,
        len: usize,
        layer: &LayerBytes<'a, '_>,
        units: Option<&dyn SourceUnits>,
    ) -> Result<(), ModelError> {
        // The uploads run on other streams: whatever the model's stream still runs for this
        // session (a step enqueued ahead writes the cache past its positions) ends first.
        self.drop_ahead();
        self.stream
            .synchronize()
            .map_err(driver("running the forward pass"))?;
        let c = &model.config;
        let size = self.kv_type.bytes();
        let per_layer = len * c.kv_dim() * size;
        let mut pieces = Vec::with_capacity(2 * c.n_layer);
        for l in 0..c.n_layer {
            let (kb, vb) = layer(l)?;
            let at = ((l * self.n_ctx + from) * c.kv_dim() * size) as u64;
            for (bytes, base) in [(kb, self.ptr(&self.buf.k)), (vb, self.ptr(&self.buf.v))] {
                if bytes.len() != per_layer {
                    return Err(ModelError::Invalid(format!(
                        "{} bytes of keys or values where {per_layer} bytes of {} belong",
                        bytes.len(),
                        self.kv_type.name()
                    )));
                }
                pieces.push(Piece {
                    src: bytes,
                    dst: base + at,
                });
            }
        }
        staging.upload(&model.ctx, &self.stream, &pieces, units)?;
        self.len = from + len;
        Ok(())
    }
}

/// A forward pass's activation buffers, one row per position: a session's (for its chunks)
/// and a batched step's (for all its sessions' positions).
pub(super) struct ActBuffers {
    x: CudaSlice<f32>,       // (rows, n_embd) the residual stream
    xb: CudaSlice<f32>,      // (rows, n_embd) a sub-layer's normalized input
    qkv: CudaSlice<f32>,     // (rows, n_head * head_dim + 2 * kv_dim): q | k | v
    att: CudaSlice<f32>,     // (rows, n_head * head_dim)
    gate_up: CudaSlice<f32>, // (rows, 2 * n_ff): gate | up
    hb: CudaSlice<f32>,      // (rows, n_ff) silu(gate) * up
}

impl ActBuffers {
    /// Zeroed buffers for `rows` positions; `what` names the allocation in an error.
    pub(super) fn new(
        s: &Arc<CudaStream>,
        c: &crate::llama::LlamaConfig,
        rows: usize,
        what: &'static str,
    ) -> Result<ActBuffers, ModelError> {
        let alloc = |n: usize| s.alloc_zeros::<f32>(rows * n).map_err(driver(what));
        let q_dim = c.n_head * c.head_dim;
        Ok(ActBuffers {
            x: alloc(c.n_embd)?,
            xb: alloc(c.n_embd)?,
            qkv: alloc(q_dim + 2 * c.kv_dim())?,
            att: alloc(q_dim)?,
            gate_up: alloc(2 * c.n_ff)?,
            hb: alloc(c.n_ff)?,
        })
    }

    /// Zeroes every buffer, as a new allocation is.
    fn zero(&mut self, s: &Arc<CudaStream>, what: &'static str) -> Result<(), ModelError> {
        for b in [
            &mut self.x,
            &mut self.xb,
            &mut self.qkv,
            &mut self.att,
            &mut self.gate_up,
            &mut self.hb,
        ] {
            s.memset_zeros(b).map_err(driver(what))?;
        }
        Ok(())
    }

    /// Their device addresses.
    pub(super) fn acts(&self, s: &Arc<CudaStream>) -> Acts {
        let p = |b: &CudaSlice<f32>| b.device_ptr(s).0;
        Acts {
            x: p(&self.x),
            xb: p(&self.xb),
            qkv: p(&self.qkv),
            att: p(&self.att),
            gate_up: p(&self.gate_up),
            hb: p(&self.hb),
        }
    }
}

/// Device addresses of a forward pass's activation buffers, one row per position (see
/// [`ActBuffers`]).
#[derive(Clone, Copy)]
pub(super) struct Acts {
    pub x: u64,
    pub xb: u64,
    pub qkv: u64,
    pub att: u64,
    pub gate_up: u64,
    pub hb: u64,
}

/// Enqueues every layer, kernel by kernel, for `n` positions whose residual stream is in
/// `a.x` and whose first norm's output is in `a.xb`; `attention(l)` enqueues layer `l`'s
/// attention from `a.qkv` into `a.att`. `mark` is told each kernel's name after it is
/// enqueued. A session's chunk and a batched step over many sessions both run this.
pub(super) fn enqueue_layers(
    model: &CudaLlama,
    run: &Launcher<'_>,
    a: Acts,
    n: usize,
    attention: &mut dyn FnMut(usize) -> Result<(), ModelError>,
    mark: &mut dyn FnMut(&'static str) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let c = &model.config;
    let w = &model.weights;
    let n_u = n as u32;
    let (e, q_dim, kv, ff) = (
        c.n_embd as u32,
        (c.n_head * c.head_dim) as u32,
        c.kv_dim() as u32,
        c.n_ff as u32,
    );
    // Stacked matrices (or their parts one by one) write side by side in one row per
    // token; their input is `xb`, the norm's input times its weights (see `Fuse`).
    let stacked = |parts: &[DevMatrix], y: u64, stride: u32, fuse| -> Result<(), ModelError> {
        let mut at = 0u64;
        for m in parts {
            run.product(m, a.xb, y + 4 * at, n_u, e, stride, 0, fuse)?;
            at += u64::from(m.rows);
        }
        Ok(())
    };
    // Each RMSNorm is fused into the matrix product after it: the kernel that writes the
    // residual stream also writes it times the next norm's weights into `xb`, and the
    // product computes the norm's scale itself. Only the first layer's comes from its
    // own kernel, whose output the product then takes as it is.
    let norm = Fuse {
        norm: Some((a.x, c.rms_eps)),
        ..Fuse::default()
    };
    let then = |g: u64| Fuse {
        next: Some((g, a.xb)),
        ..Fuse::default()
    };
    // O's product of 9 to 16 tokens is a ring kernel on Hopper, which asks for nothing (and
    // l2_ahead is nothing before Hopper): only attention asks there.
    let [att_ahead, o_ahead] = match n {
        2..=8 => GATE_UP_AHEAD,
        9..=16 => [GATE_UP_AHEAD[0], 0],
        _ => [0, 0],
    };
    for (l, lw) in w.layers.iter().enumerate() {
        let fuse = if l == 0 { Fuse::default() } else { norm };
        stacked(&lw.qkv, a.qkv, q_dim + 2 * kv, fuse)?;
        mark("matvec qkv")?;
        run.ahead(&lw.gate_up[0], 0, att_ahead);
        attention(l)?;
        mark("attention")?;
        run.ahead(&lw.gate_up[0], att_ahead, o_ahead);
        run.product(&lw.wo, a.att, a.x, n_u, q_dim, e, a.x, then(lw.ffn_norm))?;
        mark("matvec o")?;
        if lw.glu {
            let fuse = Fuse { glu: true, ..norm };
            run.product(&lw.gate_up[0], a.xb, a.hb, n_u, e, ff, 0, fuse)?;
            mark("matvec gate_up")?;
        } else {
            stacked(&lw.gate_up, a.gate_up, 2 * ff, norm)?;
            mark("matvec gate_up")?;
            run.swiglu(
                a.gate_up,
                a.gate_up + 4 * u64::from(ff),
                a.hb,
                n_u,
                ff,
                2 * ff,
            )?;
            mark("swiglu")?;
        }
        let next = match w.layers.get(l + 1) {
            Some(next) => then(next.attn_norm),
            None => Fuse::default(),
        };
        run.product(&lw.w_down, a.hb, a.x, n_u, ff, e, a.x, next)?;
        mark("matvec down")?;
    }
    Ok(())
}

/// Bytes of a layer's gate/up tiles asked into L2 ahead of their product in steps of 2 to 16
/// tokens: the first by attention at its start, the next by O's product (of up to 8 tokens:
/// `mma_many`) once its own last weights are requested, so that HBM streams them while those
/// latency-bound kernels run (`Launcher::ahead`). On an H100 (docs/perf.md, "Weights asked into L2 ahead"): steps +3-4%
/// at 4, 8 and 16 sessions; -0.7% at 32, less still at 64 and for one session, where no
/// weights are asked ahead, nor for the other matrices, which gained nothing anywhere.
const GATE_UP_AHEAD: [u64; 2] = [16 << 20, 8 << 20];

/// Runs `enqueue` with an event recorded after each kernel it marks, and returns each
/// kernel name's total time in microseconds, in the order first seen.
pub(super) fn timed(
    model: &CudaLlama,
    enqueue: impl FnOnce(
        &mut dyn FnMut(&'static str) -> Result<(), ModelError>,
    ) -> Result<(), ModelError>,
) -> Result<Vec<(&'static str, f64)>, ModelError> {
    let ctx = model.ctx.clone();
    let timing = Some(tern_compute::cuda::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let first = model
        .stream
        .record_event(timing)
        .map_err(driver("recording an event"))?;
    let mut marks = Vec::new();
    enqueue(&mut |name| {
        let event = ctx
            .new_event(timing)
            .map_err(driver("recording an event"))?;
        event
            .record(&model.stream)
            .map_err(driver("recording an event"))?;
        marks.push((name, event));
        Ok(())
    })?;
    model.stream.synchronize().map_err(driver("profiling"))?;
    let mut times = Vec::new();
    let mut prev = &first;
    for (name, event) in &marks {
        let us = f64::from(prev.elapsed_ms(event).map_err(driver("reading an event"))?) * 1e3;
        times.push((*name, us));
        prev = event;
    }
    Ok(crate::llama::totals_by_name(times))
}

/// Fills `top` from the kernels' (token, logit bits) pairs.
pub(super) fn from_pairs(top: &mut [Candidate], pairs: &[u32]) {
    for (c, p) in top.iter_mut().zip(pairs.chunks_exact(2)) {
        *c = Candidate {
            token: p[0],
            logit: f32::from_bits(p[1]),
        };
    }
}
