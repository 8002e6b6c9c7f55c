//! [`WgpuSession`]: one sequence on the GPU: its KV cache, its activation buffers, and the
//! recorded launches of its forward pass.

use tern_compute::wgpu::WgpuDevice;
use tern_compute::wgpu::wgpu;

use super::kernels::{Bind, Dispatch, Kernels};
use super::model::wgpu_error;
use super::shaders;
use super::weights::DevMatrix;
use super::{ATTN_SPLIT, MAX_CHUNK, WgpuLlama};
use crate::ModelError;
use crate::llama::RopeStyle;
use crate::llama::cpu::{KvCache, KvType};

/// Device buffers of one session. Every activation buffer holds `MAX_CHUNK` positions.
struct Buffers {
    k: wgpu::Buffer,       // (n_layer, n_ctx, kv_dim)
    v: wgpu::Buffer,       // (n_layer, n_ctx, kv_dim)
    step: wgpu::Buffer,    // [first position, token count, token ids (MAX_CHUNK)] u32
    rope: wgpu::Buffer,    // (n_ctx, n_rot / 2) (cos, sin)
    x: wgpu::Buffer,       // (MAX_CHUNK, n_embd) the residual stream
    xb: wgpu::Buffer,      // (MAX_CHUNK, n_embd) a sub-layer's normalized input
    qkv: wgpu::Buffer,     // (MAX_CHUNK, n_head * head_dim + 2 * kv_dim): q | k | v
    att: wgpu::Buffer,     // (MAX_CHUNK, n_head * head_dim)
    gate_up: wgpu::Buffer, // (MAX_CHUNK, 2 * n_ff): gate | up
    hb: wgpu::Buffer,      // (MAX_CHUNK, n_ff) silu(gate) * up
    part_o: wgpu::Buffer,  // (MAX_CHUNK, n_head, n_split, head_dim)
    part_ml: wgpu::Buffer, // (MAX_CHUNK, n_head, n_split, 2)
    logits: wgpu::Buffer,  // (n_vocab) for callers whose memory the GPU cannot see
}

/// One sequence's state on the GPU.
pub struct WgpuSession {
    pub n_ctx: usize,
    /// Positions filled.
    pub len: usize,
    buf: Buffers,
    /// Every layer's launches, then the final norm, for calls of one token (a decode step)
    /// and for calls of up to `MAX_CHUNK` (reading the step's token count).
    decode: Vec<Dispatch>,
    chunk: Vec<Dispatch>,
    /// The output head into the session's own logits buffer.
    head: Dispatch,
}

/// The output head: one token (the kernel built for one takes the first of the step's,
/// which the final norm wrote as row 0), written from element 0.
const HEAD: Out = Out {
    max_tok: 1,
    ..Out::at(0, 0)
};

/// A zeroed device buffer of `floats` f32.
fn floats(gpu: &WgpuDevice, label: &str, floats: usize) -> wgpu::Buffer {
    gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (4 * floats.max(1)) as u64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// The rotation factors of every (position, pair), computed as the CPU reference does.
pub(super) fn rope_table(inv_freq: &[f32], n_ctx: usize) -> Vec<f32> {
    let mut table = Vec::with_capacity(2 * n_ctx * inv_freq.len());
    for pos in 0..n_ctx {
        for &f in inv_freq {
            let (sin, cos) = (pos as f32 * f).sin_cos();
            table.extend([cos, sin]);
        }
    }
    table
}

impl WgpuSession {
    pub(super) fn new(model: &WgpuLlama, n_ctx: usize) -> Result<WgpuSession, ModelError> {
        let c = &model.config;
        let gpu = model.gpu();
        let kv_len = c.kv_cache_len(n_ctx)?;
        let kv_bytes = kv_len * model.kv_type.bytes();
        let limit = gpu.device().limits().max_storage_buffer_binding_size as usize;
        if kv_bytes > limit {
            return Err(ModelError::Unsupported(format!(
                "a KV cache of {n_ctx} positions on this adapter (storage bindings hold {limit} bytes)"
            )));
        }
        let n_split = n_ctx.div_ceil(ATTN_SPLIT);
        let q_dim = c.n_head * c.head_dim;
        let buf = Buffers {
            k: floats(gpu, "k cache", kv_bytes / 4),
            v: floats(gpu, "v cache", kv_bytes / 4),
            step: floats(gpu, "step", 2 + MAX_CHUNK),
            rope: gpu.upload_f32("rope", &rope_table(model.inv_freq(), n_ctx)),
            x: floats(gpu, "x", MAX_CHUNK * c.n_embd),
            xb: floats(gpu, "xb", MAX_CHUNK * c.n_embd),
            qkv: floats(gpu, "qkv", MAX_CHUNK * (q_dim + 2 * c.kv_dim())),
            att: floats(gpu, "att", MAX_CHUNK * q_dim),
            gate_up: floats(gpu, "gate_up", MAX_CHUNK * 2 * c.n_ff),
            hb: floats(gpu, "hb", MAX_CHUNK * c.n_ff),
            part_o: floats(gpu, "part_o", MAX_CHUNK * c.n_head * n_split * c.head_dim),
            part_ml: floats(gpu, "part_ml", MAX_CHUNK * c.n_head * n_split * 2),
            logits: floats(gpu, "logits", c.n_vocab),
        };
        let decode = record_layers(model, &buf, n_ctx, 1)?;
        let chunk = record_layers(model, &buf, n_ctx, MAX_CHUNK as u32)?;
        let head = matvec(
            gpu,
            &model.kernels,
            model.weights.output(),
            Bind::all(&buf.xb),
            Bind::all(&buf.logits),
            &buf.step,
            HEAD,
        )?
        .named("matvec output");
        Ok(WgpuSession {
            n_ctx,
            len: 0,
            buf,
            decode,
            chunk,
            head,
        })
    }

    /// Runs `tokens` (at most `MAX_CHUNK`) through every layer; when `logits` is given, also
    /// the output head for the last of them, into guest memory (a binding window and the
    /// logits' first element in it) or, for `Some(None)`, into the session's own buffer.
    pub(super) fn run_chunk(
        &mut self,
        model: &WgpuLlama,
        tokens: &[u32],
        logits: Option<Option<(Bind<'_>, u32)>>,
    ) -> Result<(), ModelError> {
        let gpu = model.gpu();
        self.set_step(gpu, tokens);
        let guest_head;
        let layers = if tokens.len() == 1 {
            &self.decode
        } else {
            &self.chunk
        };
        let mut list: Vec<&Dispatch> = layers.iter().collect();
        match logits {
            None => {
                list.pop(); // the final norm: no logits wanted
            }
            Some(None) => list.push(&self.head),
            Some(Some((window, first))) => {
                let to = Out { off: first, ..HEAD };
                let xb = Bind::all(&self.buf.xb);
                let head = model.weights.output();
                let k = &model.kernels;
                guest_head = matvec(gpu, k, head, xb, window, &self.buf.step, to)?;
                list.push(&guest_head);
            }
        }
        super::kernels::submit(gpu, &list);
        self.len += tokens.len();
        Ok(())
    }

    /// Writes the first position, the token count and the token ids the kernels of the next
    /// submission read.
    fn set_step(&self, gpu: &WgpuDevice, tokens: &[u32]) {
        let mut step = vec![self.len as u32, tokens.len() as u32];
        step.extend_from_slice(tokens);
        let bytes: Vec<u8> = step.iter().flat_map(|v| v.to_le_bytes()).collect();
        gpu.queue().write_buffer(&self.buf.step, 0, &bytes);
    }

    /// Times each kernel of one decode step of `token` (each launch in a pass of its own,
    /// with GPU timestamps at its start and end), leaving the session as it was; returns
    /// each kernel name's total, in microseconds, in the order first seen.
    pub(super) fn profile_step(
        &mut self,
        gpu: &WgpuDevice,
        token: u32,
    ) -> Result<Vec<(&'static str, f64)>, ModelError> {
        self.set_step(gpu, &[token]);
        let list: Vec<&Dispatch> = self.decode.iter().chain([&self.head]).collect();
        let times = gpu
            .time_passes(list.len(), |i, pass| list[i].record(pass))
            .map_err(wgpu_error)?;
        Ok(crate::llama::totals_by_name(
            list.iter().zip(times).map(|(d, us)| (d.name, us)),
        ))
    }

    /// Copies the session's own logits buffer to the host.
    pub(super) fn read_logits(
        &self,
        gpu: &WgpuDevice,
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        gpu.read_f32(&self.buf.logits, 0, logits)
            .map_err(wgpu_error)
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The keys and values of the filled positions from `from` (at most `len`) on, copied to
    /// the host as a cache of `kv_type` (compact: the cache's position 0 is `from`, `n_ctx ==
    /// len - from`).
    pub fn download(
        &self,
        gpu: &WgpuDevice,
        from: usize,
        n_layer: usize,
        kv_dim: usize,
        kv_type: KvType,
    ) -> Result<KvCache, ModelError> {
        let from = from.min(self.len);
        let mut host = KvCache::empty_of(kv_type, n_layer, self.len - from, kv_dim);
        for l in 0..n_layer {
            let at = (kv_type.bytes() * (l * self.n_ctx + from) * kv_dim) as u64;
            let (k, v) = host.layer_bytes_mut(l);
            gpu.read_bytes(&self.buf.k, at, k).map_err(wgpu_error)?;
            gpu.read_bytes(&self.buf.v, at, v).map_err(wgpu_error)?;
        }
        Ok(host)
    }

    /// Fills the first `len` positions of every layer from little-endian values of
    /// `kv_type`, copied from `layer`'s slices to device memory.
    #[allow(clippy::too_many_arguments)]
    pub fn upload_layers<'a>(
        &mut self,
        gpu: &WgpuDevice,
        from: usize,
        len: usize,
        n_layer: usize,
        kv_dim: usize,
        kv_type: KvType,
        layer: impl Fn(usize) -> Result<(&'a [u8], &'a [u8]), ModelError>,
    ) -> Result<(), ModelError> {
        let value = kv_type.bytes();
        for l in 0..n_layer {
            let (kb, vb) = layer(l)?;
            let at = (value * (l * self.n_ctx + from) * kv_dim) as u64;
            for (bytes, buf) in [(kb, &self.buf.k), (vb, &self.buf.v)] {
                if bytes.len() != value * len * kv_dim {
                    return Err(ModelError::Invalid(format!(
                        "{} bytes of keys or values where {} {} values belong",
                        bytes.len(),
                        len * kv_dim,
                        kv_type.name()
                    )));
                }
                if !bytes.is_empty() {
                    gpu.queue().write_buffer(buf, at, bytes);
                }
            }
        }
        gpu.wait().map_err(wgpu_error)?;
        self.len = from + len;
        Ok(())
    }
}

/// Where a matrix product writes: element offset, per-token stride, whether it adds to what
/// is there, and, for a stacked gate and up matrix,
/// its gate rows `n_ff` when the product writes `silu(gate) * up` instead (0: plainly;
/// `matvec_rows.wgsl`).
#[derive(Clone, Copy)]
pub(super) struct Out {
    pub off: u32,
    pub stride: u32,
    pub residual: bool,
    pub glu: u32,
    /// The most tokens the call may have (one of `shaders::MATVEC_TOKENS`).
    pub max_tok: u32,
}

impl Out {
    /// Plain stores from element `off`, rows `stride` apart, for the step's tokens (up to
    /// `MAX_CHUNK`).
    pub const fn at(off: u32, stride: u32) -> Out {
        Out {
            off,
            stride,
            residual: false,
            glu: 0,
            max_tok: MAX_CHUNK as u32,
        }
    }
}

/// Groups of 32 lanes `matvec` gives each row of `m` (`matvec_rows.wgsl`): split rows (1, 2,
/// 4 or 8 parts of at least four 32-unit steps each) while the matrix has too few rows to
/// keep 8,192 groups reading, which short matrices (Q/K/V, the attention output, the MLP's
/// down projection) otherwise leave the GPU well short of. A unit is a 16-byte word of 8
/// weights for 16-bit floats (`matvec_wide.wgsl`), else a chunk of 32 (`matvec.wgsl`).
fn matvec_parts(m: &DevMatrix) -> u32 {
    let per_unit = if shaders::is_wide(m.dtype) { 8 } else { 32 };
    let steps = (m.cols / per_unit).div_ceil(32);
    let mut parts = 1;
    while parts < 8 && m.rows * parts < 8192 && steps >= 8 * parts {
        parts *= 2;
    }
    parts
}

/// `y[t] (+)= W x[t]` for the step's tokens (at most `out.max_tok`), x rows `m.cols` apart from
/// element 0 of `x`.
#[allow(clippy::too_many_arguments)]
pub(super) fn matvec(
    gpu: &WgpuDevice,
    k: &Kernels,
    m: &DevMatrix,
    x: Bind<'_>,
    y: Bind<'_>,
    step: &wgpu::Buffer,
    out: Out,
) -> Result<Dispatch, ModelError> {
    let parts = if out.glu != 0 { 1 } else { matvec_parts(m) };
    let params = [
        m.rows,
        m.cols,
        m.row_bytes,
        0,
        m.cols,
        out.off,
        out.stride,
        u32::from(out.residual),
        out.glu,
        parts,
    ];
    let buffers = [Bind::all(&m.buffer), x, y, Bind::all(step)];
    let groups = if out.glu != 0 {
        out.glu.div_ceil(4)
    } else {
        (m.rows * parts).div_ceil(8)
    };
    let pipeline = k.matvec(m.dtype, out.max_tok)?;
    Ok(Dispatch::new(
        gpu,
        "matvec",
        pipeline,
        &buffers,
        &params,
        [groups, 1, 1],
    ))
}

/// The attention geometry of one layer's launches (see [`attention`]).
#[derive(Clone, Copy)]
pub(super) struct AttnDims {
    pub n_head: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    /// Dimensions rotated per head.
    pub n_rot: u32,
    /// Hugging Face's pairing (i, i + n_rot / 2) instead of adjacent pairs.
    pub halves: bool,
    pub n_split: u32,
    /// The layer's first float in each cache.
    pub cache_off: u32,
    /// The most tokens a call has (the launches' grids).
    pub tokens: u32,
}

/// What the attention reads and writes: the step's q | k | v rows, the caches, the rotation
/// table, the splits' partial results and the output.
pub(super) struct AttnBuffers<'a> {
    pub qkv: &'a wgpu::Buffer,
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    pub rope: &'a wgpu::Buffer,
    pub part_o: &'a wgpu::Buffer,
    pub part_ml: &'a wgpu::Buffer,
    pub att: &'a wgpu::Buffer,
    pub step: &'a wgpu::Buffer,
}

/// The step's attention over one layer's cache: the splits (with RoPE and the cache append,
/// `attn_split.wgsl`), then their merge (`attn_merge.wgsl`).
pub(super) fn attention(
    gpu: &WgpuDevice,
    k: &Kernels,
    d: AttnDims,
    b: AttnBuffers<'_>,
) -> [Dispatch; 2] {
    let all = Bind::all;
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    let tok = d.tokens;
    let split = Dispatch::new(
        gpu,
        "attention",
        &k.attn_split,
        &[
            all(b.qkv),
            all(b.k),
            all(b.v),
            all(b.rope),
            all(b.part_o),
            all(b.part_ml),
            all(b.step),
        ],
        &[
            d.n_head,
            d.n_head_kv,
            d.head_dim,
            d.n_split,
            scale.to_bits(),
            d.cache_off,
            d.n_rot,
            u32::from(d.halves),
        ],
        [d.n_split, d.n_head, tok],
    );
    let merge = Dispatch::new(
        gpu,
        "attn_merge",
        &k.attn_merge,
        &[all(b.part_o), all(b.part_ml), all(b.att), all(b.step)],
        &[d.n_head, d.head_dim, d.n_split],
        [d.n_head, tok, 1],
    );
    [split, merge]
}

/// Every layer's launches for a session's buffers, then the final norm of the last token,
/// for calls of up to `tok` tokens.
fn record_layers(
    model: &WgpuLlama,
    b: &Buffers,
    n_ctx: usize,
    tok: u32,
) -> Result<Vec<Dispatch>, ModelError> {
    let c = &model.config;
    let w = &model.weights;
    let gpu = model.gpu();
    let k = &model.kernels;
    let u = |v: usize| v as u32;
    let (e, q_dim, kv, ff) = (
        u(c.n_embd),
        u(c.n_head * c.head_dim),
        u(c.kv_dim()),
        u(c.n_ff),
    );
    let n_split = u(n_ctx.div_ceil(ATTN_SPLIT));
    let step = Bind::all(&b.step);
    let at = |off, stride| Out {
        max_tok: tok,
        ..Out::at(off, stride)
    };
    let mut out = Vec::new();
    let embd = &w.token_embd;
    out.push(Dispatch::new(
        gpu,
        "get_rows",
        k.get_rows(embd.dtype)?,
        &[Bind::all(&embd.buffer), step, Bind::all(&b.x)],
        &[embd.cols, embd.row_bytes],
        [embd.cols.div_ceil(32 * 64), tok, 1],
    ));
    let norm = |weight: &wgpu::Buffer, last_only: bool| {
        Dispatch::new(
            gpu,
            "rmsnorm",
            &k.rmsnorm,
            &[Bind::all(&b.x), Bind::all(weight), Bind::all(&b.xb), step],
            &[e, u32::from(last_only), c.rms_eps.to_bits()],
            [if last_only { 1 } else { tok }, 1, 1],
        )
    };
    // Stacked matrices (or their parts one by one) write side by side in one row per token.
    let stacked = |parts: &[DevMatrix],
                   y: &wgpu::Buffer,
                   stride: u32,
                   name: &'static str,
                   out: &mut Vec<Dispatch>| {
        let mut first = 0;
        for m in parts {
            let to = at(first, stride);
            let (xb, y) = (Bind::all(&b.xb), Bind::all(y));
            out.push(matvec(gpu, k, m, xb, y, &b.step, to)?.named(name));
            first += m.rows;
        }
        Ok::<(), ModelError>(())
    };
    let layer_floats = u(n_ctx * c.kv_dim());
    // The output and down products add to the residual stream.
    let residual = Out {
        residual: true,
        ..at(0, e)
    };
    for (l, lw) in w.layers.iter().enumerate() {
        let cache_off = u(l) * layer_floats;
        out.push(norm(&lw.attn_norm, false));
        stacked(&lw.qkv, &b.qkv, q_dim + 2 * kv, "matvec qkv", &mut out)?;
        let dims = AttnDims {
            n_head: u(c.n_head),
            n_head_kv: u(c.n_head_kv),
            head_dim: u(c.head_dim),
            n_rot: u(c.n_rot),
            halves: c.rope_style == RopeStyle::Halves,
            n_split,
            cache_off,
            tokens: tok,
        };
        let bufs = AttnBuffers {
            qkv: &b.qkv,
            k: &b.k,
            v: &b.v,
            rope: &b.rope,
            part_o: &b.part_o,
            part_ml: &b.part_ml,
            att: &b.att,
            step: &b.step,
        };
        out.extend(attention(gpu, k, dims, bufs));
        let att = Bind::all(&b.att);
        out.push(
            matvec(gpu, k, &lw.wo, att, Bind::all(&b.x), &b.step, residual)?.named("matvec o"),
        );
        out.push(norm(&lw.ffn_norm, false));
        match lw.gate_up.as_slice() {
            // One stacked matrix on `matvec`: SwiGLU fused into the product.
            [m] => {
                let to = Out {
                    glu: ff,
                    ..at(0, ff)
                };
                let (xb, hb) = (Bind::all(&b.xb), Bind::all(&b.hb));
                out.push(matvec(gpu, k, m, xb, hb, &b.step, to)?.named("matvec gate_up"));
            }
            parts => {
                stacked(parts, &b.gate_up, 2 * ff, "matvec gate_up", &mut out)?;
                out.push(Dispatch::new(
                    gpu,
                    "swiglu",
                    &k.swiglu,
                    &[Bind::all(&b.gate_up), Bind::all(&b.hb), step],
                    &[ff],
                    [ff.div_ceil(256), tok, 1],
                ));
            }
        }
        let hb = Bind::all(&b.hb);
        out.push(
            matvec(gpu, k, &lw.w_down, hb, Bind::all(&b.x), &b.step, residual)?
                .named("matvec down"),
        );
    }
    out.push(norm(&w.output_norm, true));
    Ok(out)
}
