//! [`LlamaConfig`]: the hyper-parameters of a Llama-family model.

use crate::ModelError;
use crate::gguf::GgufFile;

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: llama.cpp's layout, used by GGUF files (whose Q and K
    /// weights were permuted to match).
    Adjacent,
    /// Halves `(i, i + d/2)`: Hugging Face's `rotate_half`, used by safetensors checkpoints.
    Halves,
}

/// Hyper-parameters of a Llama-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Width of the feed-forward hidden layer.
    pub n_ff: usize,
    pub n_vocab: usize,
    /// The longest context the model was trained for, in tokens.
    pub n_ctx_train: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Rotated dimensions per head (usually `head_dim`).
    pub n_rot: usize,
    pub rope_base: f32,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
}

/// Hard limits, so a hostile file cannot ask for absurd allocations.
const MAX_DIM: usize = 1 << 18;
const MAX_LAYERS: usize = 1024;

impl LlamaConfig {
    /// Reads the `llama.*` keys of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<LlamaConfig, ModelError> {
        let arch = file.str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::Unsupported(format!(
                "architecture `{arch}` (this build runs `llama`)"
            )));
        }
        let get = |key: &str| -> Result<usize, ModelError> {
            let v = file.u64(&format!("llama.{key}"))?;
            usize::try_from(v)
                .map_err(|_| ModelError::Format(format!("llama.{key} = {v} is too large")))
        };
        let n_embd = get("embedding_length")?;
        let n_head = get("attention.head_count")?;
        let n_head_kv = get("attention.head_count_kv").unwrap_or(n_head);
        let head_dim = n_embd.checked_div(n_head).unwrap_or(0);
        let n_vocab = match get("vocab_size") {
            Ok(n) => n,
            Err(_) => file
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| ModelError::Format("no vocab size".into()))?,
        };
        let config = LlamaConfig {
            n_layer: get("block_count")?,
            n_embd,
            n_head,
            n_head_kv,
            n_ff: get("feed_forward_length")?,
            n_vocab,
            n_ctx_train: get("context_length")?,
            head_dim,
            n_rot: get("rope.dimension_count").unwrap_or(head_dim),
            rope_base: file.f32("llama.rope.freq_base").unwrap_or(10_000.0),
            rope_style: RopeStyle::Adjacent,
            rms_eps: file
                .f32("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the shape is self-consistent and within limits.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |why: String| Err(ModelError::Format(why));
        if self.n_layer == 0 || self.n_layer > MAX_LAYERS {
            return bad(format!("{} layers", self.n_layer));
        }
        for (name, v) in [
            ("n_embd", self.n_embd),
            ("n_ff", self.n_ff),
            ("n_vocab", self.n_vocab),
        ] {
            if v == 0 || v > MAX_DIM * 8 {
                return bad(format!("{name} = {v}"));
            }
        }
        if self.n_head == 0 || self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!(
                "{} heads with {} KV heads",
                self.n_head, self.n_head_kv
            ));
        }
        if self.head_dim * self.n_head != self.n_embd || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "n_embd {} is not {} heads of an even size",
                self.n_embd, self.n_head
            ));
        }
        if self.n_rot > self.head_dim || !self.n_rot.is_multiple_of(2) {
            return bad(format!(
                "{} rotated dimensions of {}",
                self.n_rot, self.head_dim
            ));
        }
        if !(self.rope_base > 0.0 && self.rms_eps > 0.0) {
            return bad("non-positive rope base or RMS epsilon".into());
        }
        Ok(())
    }

    /// Width of the K and V vectors of one position (all KV heads).
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Floats in each of the K and V caches of `n_ctx` positions (every layer), refused
    /// beyond 2^34.
    pub fn kv_cache_len(&self, n_ctx: usize) -> Result<usize, ModelError> {
        self.n_layer
            .checked_mul(n_ctx)
            .and_then(|n| n.checked_mul(self.kv_dim()))
            .filter(|&n| n <= 1 << 34)
            .ok_or_else(|| {
                ModelError::Invalid(format!("a cache of {n_ctx} positions is too large"))
            })
    }
}
