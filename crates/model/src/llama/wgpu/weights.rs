//! The model's weights in device buffers, uploaded once in their file's block format.

use tern_compute::wgpu::WgpuDevice;
use tern_compute::wgpu::wgpu::{self, util::DeviceExt};

use crate::ModelError;
use crate::llama::weights::{UploadMatrices, dim_u32};
use crate::llama::{LlamaWeights, Matrix};
use crate::quant::DType;

/// A weight matrix in a device buffer: `rows` rows of `row_bytes` bytes in `dtype` blocks.
pub struct DevMatrix {
    pub buffer: wgpu::Buffer,
    pub dtype: DType,
    pub rows: u32,
    pub cols: u32,
    pub row_bytes: u32,
}

/// One transformer block's weights. Matrices that read the same input are stacked into one
/// when their types agree, so one launch computes them all: `qkv` is `[wq; wk; wv]` (or the
/// three apart), `gate_up` is `[w_gate; w_up]` (or the two apart); their outputs land side by
/// side either way.
pub struct DevLayer {
    pub attn_norm: wgpu::Buffer, // (n_embd) f32
    pub qkv: Vec<DevMatrix>,     // (n_head * head_dim + 2 * n_head_kv * head_dim, n_embd)
    pub wo: DevMatrix,           // (n_embd, n_head * head_dim)
    pub ffn_norm: wgpu::Buffer,  // (n_embd) f32
    pub gate_up: Vec<DevMatrix>, // (2 * n_ff, n_embd)
    pub w_down: DevMatrix,       // (n_embd, n_ff)
}

/// Every weight of the model on the GPU.
pub struct DeviceWeights {
    pub token_embd: DevMatrix, // (n_vocab, n_embd)
    pub layers: Vec<DevLayer>,
    pub output_norm: wgpu::Buffer, // (n_embd) f32
    /// (n_vocab, n_embd); `None` when tied to the embedding matrix.
    output: Option<DevMatrix>,
    /// Bytes of device memory the weights take.
    pub bytes: usize,
}

impl DeviceWeights {
    /// The output head's matrix.
    pub fn output(&self) -> &DevMatrix {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }

    pub fn upload(gpu: &WgpuDevice, w: &LlamaWeights) -> Result<DeviceWeights, ModelError> {
        let mut up = Uploader {
            gpu,
            weights: w,
            total: 0,
        };
        let token_embd = up.matrix(&w.token_embd)?;
        let tied = (w.output.file, w.output.start) == (w.token_embd.file, w.token_embd.start);
        let output = if tied {
            None
        } else {
            Some(up.matrix(&w.output)?)
        };
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            layers.push(DevLayer {
                attn_norm: up.vector(&l.attn_norm),
                qkv: up.stacked(&[&l.wq, &l.wk, &l.wv])?,
                wo: up.matrix(&l.wo)?,
                ffn_norm: up.vector(&l.ffn_norm),
                gate_up: up.stacked(&[&l.w_gate, &l.w_up])?,
                w_down: up.matrix(&l.w_down)?,
            });
        }
        let output_norm = up.vector(&w.output_norm);
        Ok(DeviceWeights {
            token_embd,
            layers,
            output_norm,
            output,
            bytes: up.total,
        })
    }

    /// The types of the matrices multiplied (for the matvec kernels to build).
    pub fn matrix_types(&self) -> Vec<DType> {
        let mut types = vec![self.output().dtype];
        for l in &self.layers {
            let all = l.qkv.iter().chain(&l.gate_up).chain([&l.wo, &l.w_down]);
            types.extend(all.map(|m| m.dtype));
        }
        types.sort_by_key(|t| t.ggml_id());
        types.dedup();
        types
    }
}

struct Uploader<'a> {
    gpu: &'a WgpuDevice,
    weights: &'a LlamaWeights,
    total: usize,
}

impl<'a> UploadMatrices<'a> for Uploader<'a> {
    type Dev = DevMatrix;

    fn weights(&self) -> &'a LlamaWeights {
        self.weights
    }

    fn upload(&mut self, m: &Matrix, bytes: &[u8], rows: usize) -> Result<DevMatrix, ModelError> {
        if !m.cols.is_multiple_of(32) {
            return Err(ModelError::Unsupported(format!(
                "a matrix of {} columns on wgpu (kernels take multiples of 32)",
                m.cols
            )));
        }
        DevMatrix::new(self.gpu, m.dtype, dim_u32(rows)?, dim_u32(m.cols)?, bytes).inspect(|d| {
            self.total += d.buffer.size() as usize;
        })
    }
}

impl Uploader<'_> {
    fn vector(&mut self, v: &[f32]) -> wgpu::Buffer {
        self.total += size_of_val(v);
        self.gpu.upload_f32("norm", v)
    }
}

impl DevMatrix {
    /// Uploads `rows` rows of `dtype` blocks, plus at least one spare word (kernels read whole
    /// words and may touch the word after a row's last byte), padded to 16 bytes (some read
    /// 16-byte words).
    pub fn new(
        gpu: &WgpuDevice,
        dtype: DType,
        rows: u32,
        cols: u32,
        bytes: &[u8],
    ) -> Result<DevMatrix, ModelError> {
        let row_bytes = dtype
            .row_bytes(cols as usize)
            .ok_or_else(|| ModelError::Invalid(format!("{cols} columns of {dtype}")))?;
        if bytes.len() != row_bytes * rows as usize {
            return Err(ModelError::Invalid(format!(
                "{} bytes where {rows} rows of {row_bytes} belong",
                bytes.len()
            )));
        }
        let padded = (bytes.len() + 4).next_multiple_of(16);
        let limit = gpu.device().limits().max_storage_buffer_binding_size as usize;
        if padded > limit {
            return Err(ModelError::Unsupported(format!(
                "a {padded}-byte matrix on this adapter (storage bindings hold {limit} bytes)"
            )));
        }
        let mut contents = bytes.to_vec();
        contents.resize(padded, 0);
        let buffer = gpu
            .device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("weights"),
                contents: &contents,
                usage: wgpu::BufferUsages::STORAGE,
            });
        Ok(DevMatrix {
            buffer,
            dtype,
            rows,
            cols,
            row_bytes: row_bytes as u32,
        })
    }
}
