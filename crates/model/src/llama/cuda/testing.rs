//! Single kernels on host data, for op-by-op parity tests against the CPU reference.

use std::sync::Arc;

use tern_compute::Device;
use tern_compute::cuda::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use super::driver;
use super::kernels::{DevMatrix, Fuse, Kernels, Launcher, TOP_CHUNK, TopJob, top_k_many_scratch};
use super::weights::device_rows;
use crate::ModelError;
use crate::quant::DType;
use crate::top::{Candidate, MAX_TOP};

/// The forward pass's kernels with a stream of their own.
pub struct OpHarness {
    stream: Arc<CudaStream>,
    kernels: Kernels,
}

impl OpHarness {
    pub fn new(device: &Arc<dyn Device>) -> Result<OpHarness, ModelError> {
        let gpu = device
            .as_cuda()
            .ok_or_else(|| ModelError::Invalid("not a CUDA device".into()))?;
        let ctx = gpu.context().clone();
        super::untracked(&ctx);
        let stream = ctx.new_stream().map_err(driver("creating a stream"))?;
        let (kernels, _) = Kernels::load(&ctx, gpu.arch(), None, crate::llama::cpu::KvType::F32)?;
        Ok(OpHarness { stream, kernels })
    }

    /// Whether one-token products take several rows a warp where they can (see
    /// `Kernels::set_rows_together`).
    pub fn set_rows_together(&self, on: bool) {
        self.kernels.set_rows_together(on);
    }

    fn up<T: DeviceRepr>(&self, v: &[T]) -> Result<(CudaSlice<T>, u64), ModelError> {
        let buf = self.stream.clone_htod(v).map_err(driver("uploading"))?;
        let ptr = buf.device_ptr(&self.stream).0;
        Ok((buf, ptr))
    }

    fn down(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>, ModelError> {
        self.stream.synchronize().map_err(driver("running"))?;
        self.stream.clone_dtoh(buf).map_err(driver("downloading"))
    }

    fn run(&self) -> Launcher<'_> {
        Launcher {
            kernels: &self.kernels,
            stream: &self.stream,
        }
    }

    /// `w`, the `rows` rows of a `dtype` matrix `cols` wide in the file's blocks, uploaded
    /// as the model uploads its weights ([`device_rows`]).
    fn matrix(
        &self,
        dtype: DType,
        rows: usize,
        cols: usize,
        w: &[u8],
    ) -> Result<(CudaSlice<u8>, DevMatrix), ModelError> {
        let row_bytes = dtype
            .row_bytes(cols)
            .ok_or_else(|| ModelError::Invalid(format!("{cols} columns of {dtype}")))?;
        let (bytes, dev_row_bytes) = device_rows(dtype, cols, row_bytes, w);
        let (buf, ptr) = self.up(&bytes[..])?;
        let m = DevMatrix {
            ptr,
            dtype,
            rows: rows as u32,
            cols: cols as u32,
            row_bytes: dev_row_bytes as u32,
            tiles: 0,
        };
        Ok((buf, m))
    }

    /// `y[t] = residual[t] + W x[t]` for `n_tok` rows of `x` (`residual` zero when absent).
    pub fn matvec(
        &self,
        dtype: DType,
        rows: usize,
        cols: usize,
        w: &[u8],
        x: &[f32],
        residual: Option<&[f32]>,
    ) -> Result<Vec<f32>, ModelError> {
        let n_tok = x.len() / cols;
        let (_w, m) = self.matrix(dtype, rows, cols, w)?;
        let (_x, x_ptr) = self.up(x)?;
        let init = residual.map_or_else(|| vec![f32::NAN; n_tok * rows], <[f32]>::to_vec);
        let (y, y_ptr) = self.up(&init)?;
        let res = if residual.is_some() { y_ptr } else { 0 };
        self.run().matvec(
            &m,
            x_ptr,
            y_ptr,
            n_tok as u32,
            cols as u32,
            rows as u32,
            res,
            Fuse::default(),
        )?;
        self.down(&y)
    }

    /// The RMSNorm fused into a product: `y[t] = W rmsnorm(x[t], g, eps)` computed from
    /// `x * g` and `x` as the forward pass does, with `y * g_next` written beside it.
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_norm(
        &self,
        dtype: DType,
        rows: usize,
        cols: usize,
        w: &[u8],
        x: &[f32],
        g: &[f32],
        eps: f32,
        g_next: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
        let n_tok = x.len() / cols;
        let xg: Vec<f32> = x
            .chunks(cols)
            .flat_map(|r| r.iter().zip(g).map(|(a, b)| a * b))
            .collect();
        let (_w, m) = self.matrix(dtype, rows, cols, w)?;
        let (_x, x_ptr) = self.up(x)?;
        let (_xg, xg_ptr) = self.up(&xg)?;
        let (_g, g_ptr) = self.up(g_next)?;
        let (y, y_ptr) = self.up(&vec![f32::NAN; n_tok * rows])?;
        let (yg, yg_ptr) = self.up(&vec![f32::NAN; n_tok * rows])?;
        let fuse = Fuse {
            norm: Some((x_ptr, eps)),
            next: Some((g_ptr, yg_ptr)),
            ..Fuse::default()
        };
        self.run().matvec(
            &m,
            xg_ptr,
            y_ptr,
            n_tok as u32,
            cols as u32,
            rows as u32,
            0,
            fuse,
        )?;
        Ok((self.down(&y)?, self.down(&yg)?))
    }

    /// `silu(gate) * up` for one token of `x`, `w` holding gate and up interleaved four rows
    /// at a time (the MLP's fused matrix, `rows` of them): `rows / 2` outputs.
    pub fn matvec_glu(
        &self,
        dtype: DType,
        rows: usize,
        cols: usize,
        w: &[u8],
        x: &[f32],
    ) -> Result<Vec<f32>, ModelError> {
        let fuse = Fuse {
            glu: true,
            ..Fuse::default()
        };
        self.one_token(dtype, (rows, cols), w, x, rows / 2, |run, m, x, y| {
            run.matvec(m, x, y, 1, cols as u32, rows as u32, 0, fuse)
        })
    }

    /// `W x` for one token through the output head's kernel (`matvec_out`).
    pub fn matvec_out(
        &self,
        dtype: DType,
        rows: usize,
        cols: usize,
        w: &[u8],
        x: &[f32],
    ) -> Result<Vec<f32>, ModelError> {
        self.one_token(dtype, (rows, cols), w, x, rows, |run, m, x, y| {
            run.matvec_out(m, x, y)
        })
    }

    /// `launch(matrix, x, y)` over `w` (a `dtype` matrix of `shape`) and `x` uploaded, and
    /// `outputs` floats of y (NaN before), downloaded after.
    fn one_token(
        &self,
        dtype: DType,
        (rows, cols): (usize, usize),
        w: &[u8],
        x: &[f32],
        outputs: usize,
        launch: impl FnOnce(&Launcher<'_>, &DevMatrix, u64, u64) -> Result<(), ModelError>,
    ) -> Result<Vec<f32>, ModelError> {
        let (_w, m) = self.matrix(dtype, rows, cols, w)?;
        let (_x, x_ptr) = self.up(x)?;
        let (y, y_ptr) = self.up(&vec![f32::NAN; outputs])?;
        launch(&self.run(), &m, x_ptr, y_ptr)?;
        self.down(&y)
    }

    /// The `k` largest of `logits` as the GPU selects them (see [`crate::top`]).
    pub fn top_k(&self, logits: &[f32], k: usize) -> Result<Vec<Candidate>, ModelError> {
        let n = logits.len();
        let (_l, l_ptr) = self.up(logits)?;
        let (_cand, cand_ptr) = self.up(&vec![0u64; n.div_ceil(TOP_CHUNK) * k])?;
        let (out, out_ptr) = self.up(&vec![u32::MAX; 2 * k])?;
        self.run()
            .top_k(l_ptr, n as u32, k as u32, cand_ptr, out_ptr)?;
        self.stream.synchronize().map_err(driver("running"))?;
        let pairs = self
            .stream
            .clone_dtoh(&out)
            .map_err(driver("downloading"))?;
        Ok(pairs
            .chunks_exact(2)
            .map(|p| Candidate {
                token: p[0],
                logit: f32::from_bits(p[1]),
            })
            .collect())
    }

    /// Row i's `ks[i]` largest of the rows of `n` logits in `logits`, selected together as a
    /// batched step selects several sessions' (one launch of each kernel).
    pub fn top_k_many(
        &self,
        logits: &[f32],
        n: usize,
        ks: &[usize],
    ) -> Result<Vec<Vec<Candidate>>, ModelError> {
        let (_l, l_ptr) = self.up(logits)?;
        let (_cand, cand_ptr) = self.up(&vec![0u64; top_k_many_scratch(n, ks.len())])?;
        let (out, out_ptr) = self.up(&vec![u32::MAX; ks.len() * 2 * MAX_TOP])?;
        let jobs: Vec<TopJob> = ks
            .iter()
            .enumerate()
            .map(|(i, &k)| TopJob {
                logits: l_ptr + (i * n * 4) as u64,
                out: out_ptr + (i * 2 * MAX_TOP * 4) as u64,
                k: k as u32,
                pad: 0,
            })
            .collect();
        let (_jobs, jobs_ptr) = self.up(TopJob::bytes(&jobs))?;
        self.run()
            .top_k_many(jobs_ptr, ks.len() as u32, n as u32, cand_ptr)?;
        self.stream.synchronize().map_err(driver("running"))?;
        let pairs = self
            .stream
            .clone_dtoh(&out)
            .map_err(driver("downloading"))?;
        Ok(ks
            .iter()
            .zip(pairs.chunks_exact(2 * MAX_TOP))
            .map(|(&k, row)| {
                let mut top = vec![Candidate::default(); k];
                super::session::from_pairs(&mut top, row);
                top
            })
            .collect())
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
        let (_w, m) = self.matrix(dtype, rows, cols, w)?;
        // The kernel reads the ids as i32: the same bits for every id a vocabulary holds.
        let (_ids, ids_ptr) = self.up(ids)?;
        let (out, out_ptr) = self.up(&vec![f32::NAN; ids.len() * cols])?;
        self.run()
            .get_rows(&m, ids_ptr, out_ptr, ids.len() as u32)?;
        self.down(&out)
    }

    /// `x[t] / rms(x[t]) * w` for each `w.len()`-wide row of `x`.
    pub fn rmsnorm(&self, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>, ModelError> {
        let (_x, x_ptr) = self.up(x)?;
        let (_w, w_ptr) = self.up(w)?;
        let (out, out_ptr) = self.up(&vec![f32::NAN; x.len()])?;
        let n_tok = (x.len() / w.len()) as u32;
        self.run()
            .rmsnorm(x_ptr, w_ptr, out_ptr, n_tok, w.len() as u32, eps, false)?;
        self.down(&out)
    }

    /// `silu(gate) * up`.
    pub fn swiglu(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>, ModelError> {
        let (_g, g_ptr) = self.up(gate)?;
        let (_u, u_ptr) = self.up(up)?;
        let (out, out_ptr) = self.up(&vec![f32::NAN; gate.len()])?;
        let n = gate.len() as u32;
        self.run().swiglu(g_ptr, u_ptr, out_ptr, 1, n, n)?;
        self.down(&out)
    }
}
