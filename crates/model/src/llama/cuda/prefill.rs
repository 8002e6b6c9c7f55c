//! Long prompts on tensor cores: a chunk of up to [`PREFILL_CHUNK`] positions goes through
//! each layer's matrices as BF16 GEMMs (cuBLAS, f32 accumulation and f32 outputs), with the
//! norms, rotary embeddings, attention and SwiGLU on the forward pass's own kernels.
//!
//! Only the GEMM operands are rounded to BF16 (the normalized activations, the attention
//! output and SwiGLU's output; weights of other types are widened to BF16 first); the
//! residual stream, the KV cache and every other step stay f32. Prompts shorter than
//! [`PREFILL_MIN`] positions, and decode steps, keep the matrix-vector kernels, whose
//! arithmetic is the CPU reference's; at `Precision::Tensor` no prompt comes here (see
//! `batch.rs`'s `EXACT_CHUNK`). Results are bitwise reproducible run to run: cuBLAS
//! computes a given GEMM the same way on the same GPU and stream.

use std::sync::{Arc, OnceLock};

use tern_compute::cuda::cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use tern_compute::cuda::cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::kernels::{DevMatrix, Launcher};
use super::{CudaLlama, driver};
use crate::ModelError;
use crate::llama::LlamaConfig;
use crate::quant::DType;

/// Positions a prefill chunk takes at most.
pub const PREFILL_CHUNK: usize = 512;

/// Calls with fewer positions than this go through the matrix-vector kernels.
pub const PREFILL_MIN: usize = 64;

/// The prefill path's cuBLAS handle and buffers, shared by the model's sessions (one
/// forward pass at a time).
pub struct Prefill {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    pub ids: CudaSlice<i32>,     // (PREFILL_CHUNK)
    pub x: CudaSlice<f32>,       // (PREFILL_CHUNK, n_embd) the residual stream
    pub act: CudaSlice<u16>,     // (PREFILL_CHUNK, max(n_embd, q_dim, n_ff)) bf16 GEMM input
    pub qkv: CudaSlice<f32>,     // (PREFILL_CHUNK, q_dim + 2 * kv_dim)
    pub gate_up: CudaSlice<f32>, // (PREFILL_CHUNK, 2 * n_ff)
    /// The largest non-BF16 layer matrix, widened to BF16 before its GEMM.
    widened: Option<CudaSlice<u16>>,
}

/// Why the prefill path cannot run on this machine, if it cannot. Probed once per process:
/// the probe loads the library (tens of milliseconds), which then stays loaded for the GEMMs.
pub fn unavailable() -> Option<&'static str> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    let present = *PRESENT.get_or_init(|| {
        // SAFETY: `is_culib_present` only tries to load the library; `culib` loads it for
        // good (cudarc keeps it for the process) and is reached only when that succeeded, so
        // it cannot fail.
        unsafe {
            blas_sys::is_culib_present() && {
                let _ = blas_sys::culib();
                true
            }
        }
    });
    (!present).then_some("the cuBLAS library (libcublas) is not installed")
}

impl Prefill {
    pub fn new(model: &CudaLlama) -> Result<Prefill, ModelError> {
        if let Some(why) = unavailable() {
            return Err(ModelError::Unsupported(why.into()));
        }
        let c = &model.config;
        let s = &model.stream;
        let blas = CudaBlas::new(s.clone()).map_err(|e| {
            ModelError::device("cuda", "creating a cuBLAS handle", format!("{e:?}"))
        })?;
        let q_dim = c.n_head * c.head_dim;
        let widest = c.n_embd.max(q_dim).max(c.n_ff);
        let widened = model
            .weights
            .layers
            .iter()
            .flat_map(|l| l.qkv.iter().chain(&l.gate_up).chain([&l.wo, &l.w_down]))
            .filter(|m| m.dtype != DType::BF16)
            .map(|m| m.rows as usize * m.cols as usize)
            .max();
        let alloc = |n: usize| s.alloc_zeros::<f32>(n).map_err(driver("allocating"));
        let half = |n: usize| s.alloc_zeros::<u16>(n).map_err(driver("allocating"));
        Ok(Prefill {
            blas,
            stream: s.clone(),
            ids: s
                .alloc_zeros::<i32>(PREFILL_CHUNK)
                .map_err(driver("allocating"))?,
            x: alloc(PREFILL_CHUNK * c.n_embd)?,
            act: half(PREFILL_CHUNK * widest)?,
            qkv: alloc(PREFILL_CHUNK * (q_dim + 2 * c.kv_dim()))?,
            gate_up: alloc(PREFILL_CHUNK * 2 * c.n_ff)?,
            widened: widened.map(half).transpose()?,
        })
    }

    pub fn ptr<T>(&self, slice: &CudaSlice<T>) -> u64 {
        slice.device_ptr(&self.stream).0
    }

    /// `y[t] = (accumulate ? y[t] : 0) + W a[t]` for `n` rows of the BF16 activations in
    /// `act` (row stride `w.cols`), `y` f32 with row stride `y_stride`.
    pub fn gemm(
        &self,
        run: &Launcher,
        w: &DevMatrix,
        n: usize,
        y: u64,
        y_stride: usize,
        accumulate: bool,
    ) -> Result<(), ModelError> {
        let a = if w.dtype == DType::BF16 && w.row_bytes == 2 * w.cols {
            w.ptr
        } else {
            let widened = self.widened.as_ref().ok_or_else(|| {
                ModelError::Invalid("CUDA prefill: no buffer for widened weights".into())
            })?;
            let out = self.ptr(widened);
            run.dequant_bf16(w, out)?;
            out
        };
        self.gemm_raw(
            a,
            w.rows as usize,
            w.cols as usize,
            self.ptr(&self.act),
            n,
            y,
            y_stride,
            accumulate,
        )
    }

    /// The GEMM itself on BF16 `a` (rows x cols, row-major) and BF16 `b` (n x cols).
    #[allow(clippy::too_many_arguments)]
    fn gemm_raw(
        &self,
        a: u64,
        rows: usize,
        cols: usize,
        b: u64,
        n: usize,
        y: u64,
        y_stride: usize,
        accumulate: bool,
    ) -> Result<(), ModelError> {
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| ModelError::Invalid(format!("GEMM size {v} too large")))
        };
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        use blas_sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
        // Column-major view: Y^T (rows x n, ld y_stride) = A^T^T ... i.e. op(A) = A^T where A
        // is the row-major matrix seen column-major (cols x rows, ld cols), times B^T
        // (cols x n, ld cols).
        // SAFETY: a, b and y address live device buffers of at least rows x cols and n x cols
        // BF16 values and n rows of y_stride floats (the callers size them from the config),
        // alpha and beta are host floats that outlive the call, and the handle's stream is
        // the model's, synchronized before any of these buffers is freed.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                int(rows)?,
                int(n)?,
                int(cols)?,
                (&raw const alpha).cast(),
                a as *const _,
                CUDA_R_16BF,
                int(cols)?,
                b as *const _,
                CUDA_R_16BF,
                int(cols)?,
                (&raw const beta).cast(),
                y as *mut _,
                CUDA_R_32F,
                int(y_stride)?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| ModelError::device("cuda", "a cuBLAS GEMM", format!("{e:?}")))
    }

    /// The rate cuBLAS reaches on one layer's GEMMs with `n` rows of activations, BF16
    /// operands and f32 results (what the prefill path's matrix products are measured
    /// against): floating-point operations per second, the median of `repeats`.
    pub fn gemm_rate(
        &self,
        model: &CudaLlama,
        n: usize,
        repeats: usize,
    ) -> Result<f64, ModelError> {
        let n = n.min(PREFILL_CHUNK);
        let s = &self.stream;
        let l = &model.weights.layers[0];
        let shapes: Vec<(usize, usize)> = l
            .qkv
            .iter()
            .chain(&l.gate_up)
            .chain([&l.wo, &l.w_down])
            .map(|m| (m.rows as usize, m.cols as usize))
            .collect();
        let biggest = shapes.iter().map(|(r, c)| r * c).max().unwrap_or(1);
        // Random bits would do as well as weights for timing, but real BF16 values keep
        // the GEMM on its ordinary path: a ramp of small numbers.
        let a: Vec<u16> = (0..biggest)
            .map(|i| half::bf16::from_f32((i % 251) as f32 / 251.0 - 0.5).to_bits())
            .collect();
        let a = s.clone_htod(&a).map_err(driver("uploading"))?;
        let y = s
            .alloc_zeros::<f32>(n * shapes.iter().map(|s| s.0).max().unwrap_or(1))
            .map_err(driver("allocating"))?;
        let (a_ptr, y_ptr) = (self.ptr(&a), self.ptr(&y));
        let b = self.ptr(&self.act);
        let flops: f64 = shapes.iter().map(|(r, c)| 2.0 * (r * c * n) as f64).sum();
        let once = || -> Result<(), ModelError> {
            for &(rows, cols) in &shapes {
                self.gemm_raw(a_ptr, rows, cols, b, n, y_ptr, rows, false)?;
            }
            Ok(())
        };
        once()?;
        super::median_rate(s, repeats, 10.0 * flops, || {
            for _ in 0..10 {
                once()?;
            }
            Ok(())
        })
    }
}

/// Floating-point operations of the layers' matrix products for `n` positions.
pub fn layer_flops(c: &LlamaConfig, n: usize) -> f64 {
    let q_dim = c.n_head * c.head_dim;
    let per_layer = c.n_embd * (q_dim + 2 * c.kv_dim()) + q_dim * c.n_embd + 3 * c.n_embd * c.n_ff;
    2.0 * (per_layer * c.n_layer * n) as f64
}
