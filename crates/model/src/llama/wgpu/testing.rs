//! Single kernels on host data, for op-by-op parity tests against the CPU reference.

use std::sync::Arc;

use tern_compute::Device;
use tern_compute::wgpu::WgpuDevice;
use tern_compute::wgpu::wgpu;

use super::kernels::{Bind, Dispatch, Kernels, submit};
use super::model::wgpu_error;
use super::session::{AttnBuffers, AttnDims, Out, attention, matvec, rope_table};
use super::shaders::Reduce;
use super::weights::DevMatrix;
use super::{ATTN_SPLIT, MAX_CHUNK};
use crate::ModelError;
use crate::quant::DType;

/// The attention geometry of [`OpHarness::rope_attention`].
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Dimensions rotated per head.
    pub n_rot: usize,
    /// Hugging Face's pairing (i, i + n_rot / 2) instead of adjacent pairs.
    pub halves: bool,
    /// Positions the cache holds.
    pub n_ctx: usize,
}

/// What [`OpHarness::rope_attention`] computed.
pub struct AttnOut {
    /// `(n_tok, n_head * head_dim)`.
    pub att: Vec<f32>,
    /// The caches after the append, `(n_ctx, n_head_kv * head_dim)` each.
    pub k_cache: Vec<f32>,
    pub v_cache: Vec<f32>,
}

/// The forward pass's kernels, built for every matrix type.
pub struct OpHarness {
    device: Arc<dyn Device>,
    kernels: Kernels,
}

impl OpHarness {
    /// The kernels with rows summed as `reduce` says (`None`: as suits the adapter, as the
    /// forward pass does).
    pub fn new(device: &Arc<dyn Device>, reduce: Option<Reduce>) -> Result<OpHarness, ModelError> {
        let gpu = device
            .as_wgpu()
            .ok_or_else(|| ModelError::Invalid("not a wgpu device".into()))?;
        let kernels = Kernels::build(gpu, &DType::ALL, &DType::ALL, reduce, false);
        Ok(OpHarness {
            device: device.clone(),
            kernels,
        })
    }

    /// How these kernels sum matrix rows.
    pub fn reduce(&self) -> Reduce {
        self.kernels.reduce
    }

    /// How the forward pass on `device` sums matrix rows.
    pub fn adapter_reduce(device: &Arc<dyn Device>) -> Option<Reduce> {
        device.as_wgpu().map(Kernels::reduce_for)
    }

    fn gpu(&self) -> &WgpuDevice {
        self.device.as_wgpu().expect("checked at construction")
    }

    /// A step buffer for `n_tok` tokens with ids `ids` from position `pos0`.
    fn step(&self, pos0: usize, n_tok: usize, ids: &[u32]) -> wgpu::Buffer {
        let mut words = vec![pos0 as u32, n_tok as u32];
        words.extend_from_slice(ids);
        words.resize(2 + MAX_CHUNK, 0);
        let floats: Vec<f32> = words.iter().map(|&w| f32::from_bits(w)).collect();
        self.gpu().upload_f32("step", &floats)
    }

    fn run(
        &self,
        dispatch: &Dispatch,
        out: &wgpu::Buffer,
        len: usize,
    ) -> Result<Vec<f32>, ModelError> {
        submit(self.gpu(), &[dispatch]);
        let mut host = vec![0.0; len];
        self.gpu().read_f32(out, 0, &mut host).map_err(wgpu_error)?;
        Ok(host)
    }

    /// `y[t] = residual[t] + W x[t]` for the `n_tok <= 8` rows of `x` (`residual` zero when
    /// absent).
    #[allow(clippy::too_many_arguments)]
    pub fn matvec(
        &self,
        dtype: DType,
        rows: usize,
        cols: usize,
        w: &[u8],
        x: &[f32],
        residual: Option<&[f32]>,
    ) -> Result<Vec<f32>, ModelError> {
        let gpu = self.gpu();
        let n_tok = x.len() / cols;
        if n_tok > MAX_CHUNK {
            return Err(ModelError::Invalid(format!("{n_tok} tokens in one call")));
        }
        let m = DevMatrix::new(gpu, dtype, rows as u32, cols as u32, w)?;
        let xs = gpu.upload_f32("x", x);
        let init = residual.map_or_else(|| vec![f32::NAN; n_tok * rows], <[f32]>::to_vec);
        let y = gpu.upload_f32("y", &init);
        let step = self.step(0, n_tok, &[]);
        // A single token takes the decode step's kernel, as in the forward pass.
        let out = Out {
            residual: residual.is_some(),
            max_tok: if n_tok == 1 { 1 } else { MAX_CHUNK as u32 },
            ..Out::at(0, rows as u32)
        };
        let (xb, yb) = (Bind::all(&xs), Bind::all(&y));
        let d = matvec(gpu, &self.kernels, &m, xb, yb, &step, out)?;
        self.run(&d, &y, n_tok * rows)
    }

    /// Rows `ids` of W, dequantized.
    pub fn get_rows(
        &self,
        dtype: DType,
        rows: usize,
        cols: usize,
        w: &[u8],
        ids: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        let gpu = self.gpu();
        let m = DevMatrix::new(gpu, dtype, rows as u32, cols as u32, w)?;
        let step = self.step(0, ids.len(), ids);
        let out = gpu.upload_f32("out", &vec![f32::NAN; ids.len() * cols]);
        let d = Dispatch::new(
            gpu,
            "get_rows",
            self.kernels.get_rows(dtype)?,
            &[Bind::all(&m.buffer), Bind::all(&step), Bind::all(&out)],
            &[m.cols, m.row_bytes],
            [m.cols.div_ceil(32 * 64), MAX_CHUNK as u32, 1],
        );
        self.run(&d, &out, ids.len() * cols)
    }

    /// `x[t] / rms(x[t]) * w` for each `w.len()`-wide row of `x` (at most 8 rows).
    pub fn rmsnorm(&self, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>, ModelError> {
        let gpu = self.gpu();
        let n_tok = x.len() / w.len();
        let (xs, ws) = (gpu.upload_f32("x", x), gpu.upload_f32("w", w));
        let out = gpu.upload_f32("out", &vec![f32::NAN; x.len()]);
        let step = self.step(0, n_tok, &[]);
        let d = Dispatch::new(
            gpu,
            "rmsnorm",
            &self.kernels.rmsnorm,
            &[
                Bind::all(&xs),
                Bind::all(&ws),
                Bind::all(&out),
                Bind::all(&step),
            ],
            &[w.len() as u32, 0, eps.to_bits()],
            [MAX_CHUNK as u32, 1, 1],
        );
        self.run(&d, &out, x.len())
    }

    /// The f16 KV cache's conversions (`kv_f16.wgsl`) on the GPU: for each f32 of bits
    /// `bits[i]`, its f16 bits; and for the f16 of bits `bits[i] & 0xffff`, its f32 bits.
    pub fn f16_conversions(&self, bits: &[u32]) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
        // The results go out through the cache's own bindings (1 and 2), two per word.
        const ENTRY: &str = "
@group(0) @binding(0) var<storage, read> xs: array<u32>;
@group(0) @binding(3) var<uniform> n: vec4<u32>;

@compute @workgroup_size(64)
fn f16_conversions(@builtin(global_invocation_id) id: vec3<u32>) {
    let w = id.y * 65535u * 64u + id.x;
    if 2u * w < n.x {
        let a = xs[2u * w];
        let b = xs[2u * w + 1u];
        k_cache[w] = vec2<u32>(f16_bits_of(a), f16_bits_of(b));
        v_cache[w] = vec2<u32>(
            bitcast<u32>(f16_value(a & 0xffffu)),
            bitcast<u32>(f16_value(b & 0xffffu)),
        );
    }
}
";
        let gpu = self.gpu();
        let src = [super::shaders::KV_F16, ENTRY].join("\n");
        let pipeline = tern_compute::wgpu::compute_pipeline(gpu.device(), "f16_conversions", &src);
        let mut as_f32: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        as_f32.resize(bits.len().next_multiple_of(2), 0.0);
        let xs = gpu.upload_f32("xs", &as_f32);
        let halves = gpu.upload_f32("halves", &vec![0.0; as_f32.len()]);
        let widened = gpu.upload_f32("widened", &vec![0.0; as_f32.len()]);
        let groups = (as_f32.len() / 2).div_ceil(64) as u32;
        let d = Dispatch::new(
            gpu,
            "f16_conversions",
            &pipeline,
            &[Bind::all(&xs), Bind::all(&halves), Bind::all(&widened)],
            &[bits.len() as u32],
            [groups.min(65535), groups.div_ceil(65535), 1],
        );
        let to_bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect();
        let h = self.run(&d, &halves, bits.len())?;
        let mut w = vec![0.0; bits.len()];
        gpu.read_f32(&widened, 0, &mut w).map_err(wgpu_error)?;
        Ok((to_bits(h), to_bits(w)))
    }

    /// `silu(gate) * up` for one token.
    pub fn swiglu(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>, ModelError> {
        let gpu = self.gpu();
        let n_ff = gate.len();
        let joined: Vec<f32> = gate.iter().chain(up).copied().collect();
        let gate_up = gpu.upload_f32("gate_up", &joined);
        let out = gpu.upload_f32("out", &vec![f32::NAN; n_ff]);
        let step = self.step(0, 1, &[]);
        let d = Dispatch::new(
            gpu,
            "swiglu",
            &self.kernels.swiglu,
            &[Bind::all(&gate_up), Bind::all(&out), Bind::all(&step)],
            &[n_ff as u32],
            [(n_ff as u32).div_ceil(256), MAX_CHUNK as u32, 1],
        );
        self.run(&d, &out, n_ff)
    }

    /// One layer's attention for the `n_tok` rows of `qkv` (q | k | v per token) at positions
    /// `pos0..`: rotary embeddings, the KV append into `k_cache` and `v_cache` (`n_ctx`
    /// positions, the first `pos0` already filled), then causal attention.
    pub fn rope_attention(
        &self,
        s: &AttnShape,
        inv_freq: &[f32],
        pos0: usize,
        qkv: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
    ) -> Result<AttnOut, ModelError> {
        let gpu = self.gpu();
        let (q_dim, kv) = (s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
        let n_tok = qkv.len() / (q_dim + 2 * kv);
        if n_tok > MAX_CHUNK || pos0 + n_tok > s.n_ctx || k_cache.len() != s.n_ctx * kv {
            return Err(ModelError::Invalid(
                "inconsistent attention operands".into(),
            ));
        }
        let n_split = s.n_ctx.div_ceil(ATTN_SPLIT);
        let u = |v: usize| v as u32;
        let qkv_buf = gpu.upload_f32("qkv", qkv);
        let k = gpu.upload_f32("k", k_cache);
        let v = gpu.upload_f32("v", v_cache);
        let rope = gpu.upload_f32("rope", &rope_table(inv_freq, s.n_ctx));
        let step = self.step(pos0, n_tok, &[]);
        let part_o = gpu.upload_f32("part_o", &vec![0.0; MAX_CHUNK * q_dim * n_split]);
        let part_ml = gpu.upload_f32("part_ml", &vec![0.0; MAX_CHUNK * s.n_head * n_split * 2]);
        let att = gpu.upload_f32("att", &vec![f32::NAN; n_tok * q_dim]);
        let dims = AttnDims {
            n_head: u(s.n_head),
            n_head_kv: u(s.n_head_kv),
            head_dim: u(s.head_dim),
            n_rot: u(s.n_rot),
            halves: s.halves,
            n_split: u(n_split),
            cache_off: 0,
            tokens: u(MAX_CHUNK),
        };
        let bufs = AttnBuffers {
            qkv: &qkv_buf,
            k: &k,
            v: &v,
            rope: &rope,
            part_o: &part_o,
            part_ml: &part_ml,
            att: &att,
            step: &step,
        };
        let [split, merge] = attention(gpu, &self.kernels, dims, bufs);
        submit(gpu, &[&split, &merge]);
        let read = |buf: &wgpu::Buffer, len: usize| {
            let mut host = vec![0.0; len];
            gpu.read_f32(buf, 0, &mut host)
                .map(|()| host)
                .map_err(wgpu_error)
        };
        Ok(AttnOut {
            att: read(&att, n_tok * q_dim)?,
            k_cache: read(&k, k_cache.len())?,
            v_cache: read(&v, v_cache.len())?,
        })
    }
}
