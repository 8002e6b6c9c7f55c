//! The forward pass's kernels: compiled from `kernels/*.cu` for the GPU's architecture (or
//! loaded from the on-disk cache of earlier compilations), and launched with typed wrappers
//! that state each kernel's geometry in one place.

use std::path::PathBuf;
use std::sync::Arc;

use tern_compute::cuda::compile_cubin;
use tern_compute::cuda::cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg,
};
use tern_compute::cuda::cudarc::nvrtc::Ptx;

use super::driver;
use crate::ModelError;
use crate::quant::DType;

const SOURCES: [(&str, &str); 2] = [
    ("matvec.cu", include_str!("kernels/matvec.cu")),
    ("llama.cu", include_str!("kernels/llama.cu")),
];

/// Rows one `matvec` block computes (8 warps of one row each).
const MATVEC_ROWS_PER_BLOCK: usize = 8;

/// Every kernel of the forward pass.
pub struct Kernels {
    matvec: Vec<(DType, CudaFunction)>,
    matvec_out: Vec<(DType, CudaFunction)>,
    get_rows: Vec<(DType, CudaFunction)>,
    rmsnorm: CudaFunction,
    rope_append: CudaFunction,
    swiglu: CudaFunction,
    attn_split: CudaFunction,
    attn_merge: CudaFunction,
}

/// Where compiled kernels are kept: `$TERN_MODELS/../kernels` or `~/.cache/tern/kernels`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(models) = std::env::var_os("TERN_MODELS") {
        return Some(PathBuf::from(models).join("../kernels"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("tern/kernels"))
}

/// The CUBIN of `src` for `sm_{arch}`, from the cache when an identical source was compiled
/// before; returns whether it was cached.
fn cubin(file: &'static str, src: &str, arch: u32) -> Result<(Vec<u8>, bool), ModelError> {
    // FNV-1a over the whole source: a changed kernel never loads a stale binary.
    let key = src.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let path = cache_dir().map(|d| d.join(format!("{file}-sm{arch}-{key:016x}.cubin")));
    if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok((bytes, true));
    }
    let bytes = compile_cubin(file, src, arch)
        .map_err(|e| ModelError::Invalid(format!("CUDA kernels: {e}")))?;
    if let Some(path) = path {
        // A cache that cannot be written only costs the next start a compilation.
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(&path))
            .and_then(|()| std::fs::write(&tmp, &bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
    }
    Ok((bytes, false))
}

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>, arch: u32) -> Result<(Kernels, bool), ModelError> {
        let mut functions = Vec::new();
        let mut all_cached = true;
        for (file, src) in SOURCES {
            let (bytes, cached) = cubin(file, src, arch)?;
            all_cached &= cached;
            let module = ctx
                .load_module(Ptx::from_binary(bytes))
                .map_err(driver("loading kernels"))?;
            functions.push(module);
        }
        let get = |m: usize, name: &str| {
            functions[m]
                .load_function(name)
                .map_err(|e| ModelError::Invalid(format!("CUDA kernel `{name}`: {e:?}")))
        };
        let per_type = |prefix: &str| {
            DType::ALL
                .iter()
                .map(|&t| Ok((t, get(0, &format!("{prefix}_{}", t.name().to_lowercase()))?)))
                .collect::<Result<Vec<_>, ModelError>>()
        };
        Ok((
            Kernels {
                matvec: per_type("matvec")?,
                matvec_out: per_type("matvec_out")?,
                get_rows: per_type("get_rows")?,
                rmsnorm: get(1, "rmsnorm")?,
                rope_append: get(1, "rope_append")?,
                swiglu: get(1, "swiglu")?,
                attn_split: get(1, "attn_split")?,
                attn_merge: get(1, "attn_merge")?,
            },
            all_cached,
        ))
    }
}

/// A weight matrix in device memory: `rows` rows of `row_bytes` bytes in `dtype` blocks.
#[derive(Clone, Copy, Debug)]
pub struct DevMatrix {
    pub ptr: u64,
    pub dtype: DType,
    pub rows: u32,
    pub cols: u32,
    pub row_bytes: u32,
}

fn config(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn find(list: &[(DType, CudaFunction)], t: DType) -> &CudaFunction {
    &list
        .iter()
        .find(|(d, _)| *d == t)
        .expect("one kernel per type")
        .1
}

/// Typed launches on one stream. Every pointer argument is a device address (device memory,
/// or host memory registered with the GPU) of at least the extent each kernel's comment in
/// `kernels/*.cu` states; the callers size their buffers from the same config.
pub struct Launcher<'a> {
    pub kernels: &'a Kernels,
    pub stream: &'a Arc<CudaStream>,
}

macro_rules! launch {
    ($self:ident, $f:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let mut builder = $self.stream.launch_builder($f);
        $(builder.arg($arg);)+
        // SAFETY: the argument list matches the kernel's signature in kernels/*.cu, and every
        // pointer addresses a live buffer of the extent the kernel reads or writes (see
        // `Launcher`); the stream is synchronized before those buffers are freed.
        unsafe { builder.launch($cfg) }.map(|_| ()).map_err(driver("launching a kernel"))
    }};
}

impl Launcher<'_> {
    /// `y[t] = (residual ? residual[t] : 0) + W x[t]` for `n` tokens (n <= 8).
    #[allow(clippy::too_many_arguments)]
    pub fn matvec(
        &self,
        w: &DevMatrix,
        x: u64,
        y: u64,
        n: u32,
        x_stride: u32,
        y_stride: u32,
        residual: u64,
    ) -> Result<(), ModelError> {
        let blocks = (w.rows as usize).div_ceil(MATVEC_ROWS_PER_BLOCK) as u32;
        launch!(
            self,
            find(&self.kernels.matvec, w.dtype),
            config((blocks, 1, 1), 256),
            &w.ptr,
            &x,
            &y,
            &w.rows,
            &w.cols,
            &w.row_bytes,
            &n,
            &x_stride,
            &y_stride,
            &residual
        )
    }

    /// `y = W x` for one token, stored 8 rows at a time: the output head, whose `y` is often
    /// host memory registered with the GPU.
    pub fn matvec_out(&self, w: &DevMatrix, x: u64, y: u64) -> Result<(), ModelError> {
        let blocks = (w.rows as usize).div_ceil(MATVEC_ROWS_PER_BLOCK) as u32;
        launch!(
            self,
            find(&self.kernels.matvec_out, w.dtype),
            config((blocks, 1, 1), 256),
            &w.ptr,
            &x,
            &y,
            &w.rows,
            &w.cols,
            &w.row_bytes
        )
    }

    /// `out[i] = W[ids[i]]` dequantized, for `n` ids.
    pub fn get_rows(&self, w: &DevMatrix, ids: u64, out: u64, n: u32) -> Result<(), ModelError> {
        launch!(
            self,
            find(&self.kernels.get_rows, w.dtype),
            config((n, 1, 1), 256),
            &w.ptr,
            &ids,
            &out,
            &w.cols,
            &w.row_bytes,
            &n,
            &w.cols
        )
    }

    pub fn rmsnorm(
        &self,
        x: u64,
        w: u64,
        out: u64,
        n_tok: u32,
        width: u32,
        eps: f32,
    ) -> Result<(), ModelError> {
        launch!(
            self,
            &self.kernels.rmsnorm,
            config((n_tok, 1, 1), 256),
            &x,
            &w,
            &out,
            &width,
            &eps
        )
    }

    /// Rotates the queries of `qkv` (fused `q|k|v` rows) in place and appends rotated keys
    /// and values to one layer's cache.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_append(
        &self,
        c: &crate::llama::LlamaConfig,
        n_tok: u32,
        qkv: u64,
        k_cache: u64,
        v_cache: u64,
        inv_freq: u64,
        step: u64,
    ) -> Result<(), ModelError> {
        let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.kv_dim());
        let stride = (q_dim + 2 * kv_dim) as u32;
        let (q, k_new) = (qkv, qkv + 4 * q_dim as u64);
        let v_new = k_new + 4 * kv_dim as u64;
        let (n_head, n_head_kv) = (c.n_head as u32, c.n_head_kv as u32);
        let (head_dim, n_rot, halves) = (c.head_dim as u32, c.n_rot as u32, super::halves(c));
        launch!(
            self,
            &self.kernels.rope_append,
            config((n_tok, n_head + n_head_kv, 1), 64),
            &q,
            &k_new,
            &v_new,
            &k_cache,
            &v_cache,
            &inv_freq,
            &step,
            &n_head,
            &n_head_kv,
            &head_dim,
            &n_rot,
            &halves,
            &stride
        )
    }

    /// Causal attention of `n_tok` queries (the `q` part of fused `q|k|v` rows) over one
    /// layer's cache, in two fixed-order passes.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        c: &crate::llama::LlamaConfig,
        n_tok: u32,
        n_split: u32,
        q: u64,
        k_cache: u64,
        v_cache: u64,
        part_o: u64,
        part_ml: u64,
        out: u64,
        step: u64,
    ) -> Result<(), ModelError> {
        let (n_head, n_head_kv, head_dim) =
            (c.n_head as u32, c.n_head_kv as u32, c.head_dim as u32);
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let q_stride = (c.n_head * c.head_dim + 2 * c.kv_dim()) as u32;
        launch!(
            self,
            &self.kernels.attn_split,
            config((n_split, n_head, n_tok), super::ATTN_SPLIT as u32),
            &q,
            &k_cache,
            &v_cache,
            &part_o,
            &part_ml,
            &step,
            &n_head,
            &n_head_kv,
            &head_dim,
            &n_split,
            &scale,
            &q_stride
        )?;
        launch!(
            self,
            &self.kernels.attn_merge,
            config((n_head, n_tok, 1), head_dim),
            &part_o,
            &part_ml,
            &out,
            &step,
            &n_head,
            &head_dim,
            &n_split
        )
    }

    /// `out[t] = silu(gate[t]) * up[t]` for `n_tok` rows of `n_ff`, whose gate and up rows
    /// start `stride` floats apart per token.
    pub fn swiglu(
        &self,
        gate: u64,
        up: u64,
        out: u64,
        n_tok: u32,
        n_ff: u32,
        stride: u32,
    ) -> Result<(), ModelError> {
        launch!(
            self,
            &self.kernels.swiglu,
            config((n_ff.div_ceil(256), n_tok, 1), 256),
            &gate,
            &up,
            &out,
            &n_ff,
            &stride
        )
    }
}
