//! [`LlamaWeights`]: the tensors of a Llama-family model, checked against its config, named as
//! llama.cpp names them (`blk.{i}.attn_q.weight`, ...), and left in the mapped file.

use crate::ModelError;
use crate::gguf::{GgufFile, TensorInfo};
use crate::llama::LlamaConfig;
use crate::quant::{DType, dequantize_row};
use crate::safetensors::SafetensorsFile;

/// A weight matrix in the mapped file: `rows` rows of `cols` elements each, row-major, in
/// `dtype` blocks. `y = W x` takes `x` of length `cols` and gives `y` of length `rows`.
#[derive(Clone, Copy, Debug)]
pub struct Matrix {
    /// Which file of the [`Storage`] holds it.
    pub file: usize,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    /// Byte offset in the file, and bytes per row.
    pub start: usize,
    pub row_bytes: usize,
}

/// The weights of one transformer block.
pub struct LayerWeights {
    pub attn_norm: Vec<f32>, // (n_embd)
    pub wq: Matrix,          // (n_head * head_dim, n_embd)
    pub wk: Matrix,          // (n_head_kv * head_dim, n_embd)
    pub wv: Matrix,          // (n_head_kv * head_dim, n_embd)
    pub wo: Matrix,          // (n_embd, n_head * head_dim)
    pub ffn_norm: Vec<f32>,  // (n_embd)
    pub w_gate: Matrix,      // (n_ff, n_embd)
    pub w_up: Matrix,        // (n_ff, n_embd)
    pub w_down: Matrix,      // (n_embd, n_ff)
}

/// The mapped files that hold a model's weights.
pub enum Storage {
    Gguf(GgufFile),
    /// A Hugging Face checkpoint: one or more shards.
    Safetensors(Vec<SafetensorsFile>),
}

impl Storage {
    /// The bytes of file `file`.
    pub fn bytes(&self, file: usize) -> &[u8] {
        match self {
            Storage::Gguf(f) => f.bytes(),
            Storage::Safetensors(shards) => shards[file].bytes(),
        }
    }
}

/// Every weight of a model, over the files that hold them.
pub struct LlamaWeights {
    pub storage: Storage,
    pub token_embd: Matrix, // (n_vocab, n_embd): row t is token t's embedding
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>, // (n_embd)
    pub output: Matrix,        // (n_vocab, n_embd); the embedding matrix when tied
    /// Llama-3 frequency factors (n_rot / 2), if the file has them.
    pub rope_freqs: Option<Vec<f32>>,
}

impl LlamaWeights {
    /// Finds and checks every tensor `config` needs.
    pub fn from_gguf(file: GgufFile, config: &LlamaConfig) -> Result<LlamaWeights, ModelError> {
        let (e, q, kv, ff) = (
            config.n_embd,
            config.n_head * config.head_dim,
            config.kv_dim(),
            config.n_ff,
        );
        let matrix = |name: &str, rows: usize, cols: usize| find_matrix(&file, name, rows, cols);
        let vector = |name: &str, len: usize| find_vector(&file, name, len);
        let token_embd = matrix("token_embd.weight", config.n_vocab, e)?;
        let output = match file.tensor("output.weight") {
            Some(_) => matrix("output.weight", config.n_vocab, e)?,
            None => token_embd,
        };
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            layers.push(LayerWeights {
                attn_norm: vector(&name("attn_norm"), e)?,
                wq: matrix(&name("attn_q"), q, e)?,
                wk: matrix(&name("attn_k"), kv, e)?,
                wv: matrix(&name("attn_v"), kv, e)?,
                wo: matrix(&name("attn_output"), e, q)?,
                ffn_norm: vector(&name("ffn_norm"), e)?,
                w_gate: matrix(&name("ffn_gate"), ff, e)?,
                w_up: matrix(&name("ffn_up"), ff, e)?,
                w_down: matrix(&name("ffn_down"), e, ff)?,
            });
        }
        let rope_freqs = match file.tensor("rope_freqs.weight") {
            Some(_) => Some(vector("rope_freqs.weight", config.n_rot / 2)?),
            None => None,
        };
        let output_norm = vector("output_norm.weight", e)?;
        Ok(LlamaWeights {
            storage: Storage::Gguf(file),
            token_embd,
            layers,
            output_norm,
            output,
            rope_freqs,
        })
    }

    /// Finds and checks every tensor `config` needs in a Hugging Face checkpoint
    /// (`model.layers.{i}.self_attn.q_proj.weight`, ...); `lm_head.weight` may be absent when
    /// the embeddings are tied. `rope_freqs` are Llama-3 frequency factors, if any.
    pub fn from_safetensors(
        shards: Vec<SafetensorsFile>,
        config: &LlamaConfig,
        rope_freqs: Option<Vec<f32>>,
    ) -> Result<LlamaWeights, ModelError> {
        let (e, q, kv, ff) = (
            config.n_embd,
            config.n_head * config.head_dim,
            config.kv_dim(),
            config.n_ff,
        );
        let find = |name: &str| -> Result<(usize, &crate::safetensors::StTensor), ModelError> {
            shards
                .iter()
                .enumerate()
                .find_map(|(i, s)| s.tensors.get(name).map(|t| (i, t)))
                .ok_or_else(|| ModelError::Format(format!("tensor `{name}` is missing")))
        };
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Matrix, ModelError> {
            let (file, t) = find(name)?;
            if t.shape != [rows, cols] {
                return Err(ModelError::Format(format!(
                    "tensor `{name}` has shape {:?}; the config needs [{rows}, {cols}]",
                    t.shape
                )));
            }
            let row_bytes = t.dtype.row_bytes(cols).expect("float types fit any row");
            Ok(Matrix {
                file,
                dtype: t.dtype,
                rows,
                cols,
                start: t.start,
                row_bytes,
            })
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>, ModelError> {
            let (file, t) = find(name)?;
            if t.shape != [len] {
                return Err(ModelError::Format(format!(
                    "tensor `{name}` has shape {:?}; expected [{len}]",
                    t.shape
                )));
            }
            let mut out = vec![0.0; len];
            dequantize_row(
                t.dtype,
                &shards[file].bytes()[t.start..t.start + t.bytes],
                &mut out,
            );
            Ok(out)
        };
        let token_embd = matrix("model.embed_tokens.weight", config.n_vocab, e)?;
        let output = match find("lm_head.weight") {
            Ok(_) => matrix("lm_head.weight", config.n_vocab, e)?,
            Err(_) => token_embd,
        };
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let name = |t: &str| format!("model.layers.{i}.{t}.weight");
            layers.push(LayerWeights {
                attn_norm: vector(&name("input_layernorm"), e)?,
                wq: matrix(&name("self_attn.q_proj"), q, e)?,
                wk: matrix(&name("self_attn.k_proj"), kv, e)?,
                wv: matrix(&name("self_attn.v_proj"), kv, e)?,
                wo: matrix(&name("self_attn.o_proj"), e, q)?,
                ffn_norm: vector(&name("post_attention_layernorm"), e)?,
                w_gate: matrix(&name("mlp.gate_proj"), ff, e)?,
                w_up: matrix(&name("mlp.up_proj"), ff, e)?,
                w_down: matrix(&name("mlp.down_proj"), e, ff)?,
            });
        }
        let output_norm = vector("model.norm.weight", e)?;
        let storage = Storage::Safetensors(shards);
        Ok(LlamaWeights {
            storage,
            token_embd,
            layers,
            output_norm,
            output,
            rope_freqs,
        })
    }

    /// Row `r` of `m`, as encoded bytes.
    pub fn row(&self, m: &Matrix, r: usize) -> &[u8] {
        let start = m.start + r * m.row_bytes;
        &self.storage.bytes(m.file)[start..start + m.row_bytes]
    }

    /// All rows of `m`, as encoded bytes.
    pub fn rows(&self, m: &Matrix) -> &[u8] {
        &self.storage.bytes(m.file)[m.start..m.start + m.rows * m.row_bytes]
    }

    /// Total bytes of weights read per token: every matrix once, plus one embedding row.
    pub fn bytes_per_token(&self) -> usize {
        let layer = |l: &LayerWeights| {
            [l.wq, l.wk, l.wv, l.wo, l.w_gate, l.w_up, l.w_down]
                .iter()
                .map(|m| m.rows * m.row_bytes)
                .sum::<usize>()
        };
        self.layers.iter().map(layer).sum::<usize>()
            + self.output.rows * self.output.row_bytes
            + self.token_embd.row_bytes
    }
}

fn find<'f>(file: &'f GgufFile, name: &str) -> Result<&'f TensorInfo, ModelError> {
    file.tensor(name)
        .ok_or_else(|| ModelError::Format(format!("tensor `{name}` is missing")))
}

fn find_matrix(
    file: &GgufFile,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Matrix, ModelError> {
    let t = find(file, name)?;
    if t.dims != [cols as u64, rows as u64] {
        return Err(ModelError::Format(format!(
            "tensor `{name}` has dims {:?}; the config needs [{cols}, {rows}]",
            t.dims
        )));
    }
    let row_bytes = t
        .dtype
        .row_bytes(cols)
        .expect("checked when the file was opened");
    Ok(Matrix {
        file: 0,
        dtype: t.dtype,
        rows,
        cols,
        start: t.start,
        row_bytes,
    })
}

fn find_vector(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let t = find(file, name)?;
    if t.dims != [len as u64] {
        return Err(ModelError::Format(format!(
            "tensor `{name}` has dims {:?}; expected [{len}]",
            t.dims
        )));
    }
    let mut out = vec![0.0; len];
    dequantize_row(t.dtype, file.data(t), &mut out);
    Ok(out)
}

/// How a GPU backend puts the model's matrices in device memory, in their file's block
/// format: it uploads `rows` rows of one matrix's type and width; matrices that read the same
/// input are stacked into one where their types and widths agree.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) trait UploadMatrices<'a> {
    /// A matrix in device memory.
    type Dev;

    /// The weights being uploaded.
    fn weights(&self) -> &'a LlamaWeights;

    /// `rows` rows of `m`'s type and width, from `bytes`.
    fn upload(&mut self, m: &Matrix, bytes: &[u8], rows: usize) -> Result<Self::Dev, ModelError>;

    fn matrix(&mut self, m: &Matrix) -> Result<Self::Dev, ModelError> {
        let rows = self.weights().rows(m);
        self.upload(m, rows, m.rows)
    }

    /// `parts` stacked into one matrix when they share a type and width, else each on its
    /// own.
    fn stacked(&mut self, parts: &[&Matrix]) -> Result<Vec<Self::Dev>, ModelError> {
        let first = parts[0];
        if parts
            .iter()
            .any(|m| m.dtype != first.dtype || m.cols != first.cols)
        {
            return parts.iter().map(|m| self.matrix(m)).collect();
        }
        let w = self.weights();
        let bytes: Vec<u8> = parts
            .iter()
            .flat_map(|m| w.rows(m).iter().copied())
            .collect();
        let rows = parts.iter().map(|m| m.rows).sum();
        Ok(vec![self.upload(first, &bytes, rows)?])
    }
}

/// A matrix dimension as the kernels take it.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) fn dim_u32(v: usize) -> Result<u32, ModelError> {
    u32::try_from(v).map_err(|_| ModelError::Unsupported(format!("a {v}-wide matrix")))
}
