//! The model's weights in device memory, uploaded once in their file's block format (Q8_0
//! re-dealt by lane for the kernels' loads: [`device_rows`]).

use std::borrow::Cow;
use std::sync::Arc;

use tern_compute::cuda::cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::driver;
use super::kernels::DevMatrix;
use crate::ModelError;
use crate::llama::weights::{UploadMatrices, dim_u32};
use crate::llama::{LlamaWeights, Matrix};
use crate::quant::DType;

/// One transformer block's weights on the GPU. Matrices that read the same input are
/// stacked into one when their types agree, so one launch computes them all: `qkv` is
/// `[wq; wk; wv]` (or the three apart), `gate_up` is `[w_gate; w_up]` (or the two apart);
/// their outputs land side by side either way.
pub struct DevLayer {
    pub attn_norm: u64,          // (n_embd) f32
    pub qkv: Vec<DevMatrix>,     // (n_head * head_dim + 2 * n_head_kv * head_dim, n_embd)
    pub wo: DevMatrix,           // (n_embd, n_head * head_dim)
    pub ffn_norm: u64,           // (n_embd) f32
    pub gate_up: Vec<DevMatrix>, // (2 * n_ff, n_embd)
    pub w_down: DevMatrix,       // (n_embd, n_ff)
    /// `gate_up` is one matrix of gate and up rows interleaved four at a time (gate rows
    /// 4b..4b+3, then up rows 4b..4b+3), so that one block of the product holds both
    /// halves of four SwiGLU outputs; otherwise `[w_gate; w_up]` or the two apart.
    pub glu: bool,
}

/// Every weight of the model on the GPU; the buffers live as long as this.
pub struct DeviceWeights {
    pub token_embd: DevMatrix, // (n_vocab, n_embd)
    pub layers: Vec<DevLayer>,
    pub output_norm: u64,  // (n_embd) f32
    pub output: DevMatrix, // (n_vocab, n_embd); the embedding matrix when tied
    pub inv_freq: u64,     // (n_rot / 2) f32
    /// Bytes of device memory the weights take.
    pub bytes: usize,
    _bytes: Vec<CudaSlice<u8>>,
    /// The tiled copies of [`DeviceWeights::tile`].
    _tiles: Vec<CudaSlice<u8>>,
    _floats: Vec<CudaSlice<f32>>,
}

struct Uploader<'a> {
    stream: &'a Arc<CudaStream>,
    weights: &'a LlamaWeights,
    bytes: Vec<CudaSlice<u8>>,
    floats: Vec<CudaSlice<f32>>,
    total: usize,
}

impl<'a> UploadMatrices<'a> for Uploader<'a> {
    type Dev = DevMatrix;

    fn weights(&self) -> &'a LlamaWeights {
        self.weights
    }

    fn upload(&mut self, m: &Matrix, bytes: &[u8], rows: usize) -> Result<DevMatrix, ModelError> {
        let (bytes, row_bytes) = device_rows(m.dtype, m.cols, m.row_bytes, bytes);
        let buf = self
            .stream
            .clone_htod(&bytes[..])
            .map_err(driver("uploading weights"))?;
        let (ptr, _) = buf.device_ptr(self.stream);
        self.total += bytes.len();
        self.bytes.push(buf);
        Ok(DevMatrix {
            ptr,
            dtype: m.dtype,
            rows: dim_u32(rows)?,
            cols: dim_u32(m.cols)?,
            row_bytes: dim_u32(row_bytes)?,
            tiles: 0,
        })
    }
}

/// Rows of a `dtype` matrix `cols` wide (`row_bytes` each in the file's blocks) as the
/// kernels read them, and the length of a row there: Q8_0 re-dealt by [`q8_0_lanes`], every
/// other type as the file holds it.
pub fn device_rows(
    dtype: DType,
    cols: usize,
    row_bytes: usize,
    bytes: &[u8],
) -> (Cow<'_, [u8]>, usize) {
    if dtype != DType::Q8_0 || row_bytes == 0 {
        return (Cow::Borrowed(bytes), row_bytes);
    }
    let steps = cols.div_ceil(256);
    let mut out = vec![0u8; bytes.len() / row_bytes * steps * Q8_0_STEP];
    for (row, dst) in bytes
        .chunks_exact(row_bytes)
        .zip(out.chunks_exact_mut(steps * Q8_0_STEP))
    {
        q8_0_lanes(row, dst);
    }
    (Cow::Owned(out), steps * Q8_0_STEP)
}

/// Bytes of 8 Q8_0 blocks: one 256-column step.
const Q8_0_STEP: usize = 8 * 34;

/// One row of GGML Q8_0 blocks (`{f16 d; i8 q[32]}`, 34 bytes) into `dst`, whole 256-column
/// steps of 272 bytes (matvec.cuh's `Q8_0`): in each step, lane l = 8b + p's quants 4p..4p+3
/// of block b then of block 4 + b at 8l, and the blocks' scales at 256 in the order
/// d0 d4 d1 d5 d2 d6 d3 d7. Blocks past the row's end stay zero.
fn q8_0_lanes(row: &[u8], dst: &mut [u8]) {
    for (blocks, step) in row.chunks(Q8_0_STEP).zip(dst.chunks_exact_mut(Q8_0_STEP)) {
        for (j, block) in blocks.chunks_exact(34).enumerate() {
            let (b, half) = (j % 4, j / 4);
            let scale = 256 + 4 * b + 2 * half;
            step[scale..scale + 2].copy_from_slice(&block[..2]);
            for (p, quad) in block[2..].chunks_exact(4).enumerate() {
                let at = 8 * (8 * b + p) + 4 * half;
                step[at..at + 4].copy_from_slice(quad);
            }
        }
    }
}

impl Uploader<'_> {
    /// Gate and up interleaved four rows at a time (see [`DevLayer::glu`]) when they share a
    /// type and a row count that four divides; else as [`Uploader::stacked`].
    fn interleaved(
        &mut self,
        gate: &Matrix,
        up: &Matrix,
    ) -> Result<(Vec<DevMatrix>, bool), ModelError> {
        let same = gate.dtype == up.dtype && gate.cols == up.cols && gate.rows == up.rows;
        if !same || !gate.rows.is_multiple_of(4) {
            return Ok((self.stacked(&[gate, up])?, false));
        }
        let (g, u) = (self.weights.rows(gate), self.weights.rows(up));
        let four = 4 * gate.row_bytes;
        let bytes: Vec<u8> = g
            .chunks(four)
            .zip(u.chunks(four))
            .flat_map(|(g, u)| g.iter().chain(u).copied())
            .collect();
        Ok((vec![self.upload(gate, &bytes, 2 * gate.rows)?], true))
    }

    fn vector(&mut self, v: &[f32]) -> Result<u64, ModelError> {
        let buf = self
            .stream
            .clone_htod(v)
            .map_err(driver("uploading weights"))?;
        let (ptr, _) = buf.device_ptr(self.stream);
        self.total += size_of_val(v);
        self.floats.push(buf);
        Ok(ptr)
    }
}

impl DeviceWeights {
    /// The matrices the forward pass multiplies by: the output head, then each layer's.
    pub fn matrices_mut(&mut self) -> Vec<&mut DevMatrix> {
        let mut all = vec![&mut self.output];
        for l in &mut self.layers {
            all.extend(l.qkv.iter_mut());
            all.push(&mut l.wo);
            all.extend(l.gate_up.iter_mut());
            all.push(&mut l.w_down);
        }
        all
    }

    /// Stores every matrix that `fits` again, as `tile(matrix, copy)` writes it into a
    /// buffer of its size (the tensor-core kernels' tiles), and points the matrix at the
    /// copy. The output head is tiled apart from the token embedding it may share bytes
    /// with: the embedding lookup keeps reading rows.
    pub fn tile(
        &mut self,
        stream: &Arc<CudaStream>,
        fits: impl Fn(&DevMatrix) -> bool,
        mut tile: impl FnMut(&DevMatrix, u64) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        let (mut tiles, mut bytes) = (Vec::new(), 0);
        for m in self.matrices_mut() {
            if !fits(m) {
                continue;
            }
            let size = m.rows as usize * m.row_bytes as usize;
            let buf = stream
                .alloc_zeros::<u8>(size)
                .map_err(driver("tiling weights"))?;
            let (ptr, _) = buf.device_ptr(stream);
            tile(m, ptr)?;
            m.tiles = ptr;
            bytes += size;
            tiles.push(buf);
        }
        self.bytes += bytes;
        self._tiles.extend(tiles);
        Ok(())
    }

    pub fn upload(
        stream: &Arc<CudaStream>,
        w: &LlamaWeights,
        inv_freq: &[f32],
    ) -> Result<DeviceWeights, ModelError> {
        let mut up = Uploader {
            stream,
            weights: w,
            bytes: Vec::new(),
            floats: Vec::new(),
            total: 0,
        };
        let token_embd = up.matrix(&w.token_embd)?;
        let tied = (w.output.file, w.output.start) == (w.token_embd.file, w.token_embd.start);
        let output = if tied {
            token_embd
        } else {
            up.matrix(&w.output)?
        };
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            let (gate_up, glu) = up.interleaved(&l.w_gate, &l.w_up)?;
            layers.push(DevLayer {
                attn_norm: up.vector(&l.attn_norm)?,
                qkv: up.stacked(&[&l.wq, &l.wk, &l.wv])?,
                wo: up.matrix(&l.wo)?,
                ffn_norm: up.vector(&l.ffn_norm)?,
                gate_up,
                w_down: up.matrix(&l.w_down)?,
                glu,
            });
        }
        let output_norm = up.vector(&w.output_norm)?;
        let inv_freq = up.vector(inv_freq)?;
        Ok(DeviceWeights {
            token_embd,
            layers,
            output_norm,
            output,
            inv_freq,
            bytes: up.total,
            _bytes: up.bytes,
            _tiles: Vec::new(),
            _floats: up.floats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every quant and scale of a row lands where matvec.cuh's `Q8_0` has lane 8b + p read
    /// it, a partial last step included, and the padding is zeros.
    #[test]
    fn q8_0_rows_are_dealt_to_the_lanes_that_read_them() {
        let (cols, blocks) = (576, 18); // two steps and a quarter
        let row: Vec<u8> = (0..blocks * 34).map(|i| (i * 7 + 3) as u8).collect();
        let two_rows = [row.clone(), row.iter().map(|b| b ^ 0x55).collect()].concat();
        let (out, row_bytes) = device_rows(DType::Q8_0, cols, blocks * 34, &two_rows);
        assert_eq!(row_bytes, 3 * 272);
        assert_eq!(out.len(), 2 * row_bytes);
        for (src, dst) in two_rows.chunks(blocks * 34).zip(out.chunks(row_bytes)) {
            let mut expected = vec![0u8; row_bytes];
            for k in 0..3 {
                for lane in 0..32 {
                    let (b, p) = (lane / 8, lane % 8);
                    for half in 0..2 {
                        let j = 8 * k + 4 * half + b;
                        if j >= blocks {
                            continue;
                        }
                        let block = &src[34 * j..34 * j + 34];
                        let q = 272 * k + 8 * lane + 4 * half;
                        expected[q..q + 4].copy_from_slice(&block[2 + 4 * p..6 + 4 * p]);
                        let d = 272 * k + 256 + 4 * b + 2 * half;
                        expected[d..d + 2].copy_from_slice(&block[..2]);
                    }
                }
            }
            assert_eq!(dst, &expected[..]);
        }
        // Other types go up as the file holds them.
        let bf16 = [1u8, 2, 3, 4];
        let (same, row_bytes) = device_rows(DType::BF16, 2, 4, &bf16);
        assert_eq!((&same[..], row_bytes), (&bf16[..], 4));
    }
}
