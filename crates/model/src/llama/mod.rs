//! The Llama family (Llama 2/3, SmolLM2, TinyLlama): hyper-parameters, weights, KV cache and
//! the CPU forward pass.

mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod hf;
mod weights;
pub mod wgpu;

pub use config::{LlamaConfig, RopeStyle};
pub use hf::{HfConfig, llama3_rope_factors, read_hf_config};
pub use weights::{LayerWeights, LlamaWeights, Matrix, Storage};

/// Checks one forward call's arguments against the model and the session (`len` positions
/// filled of `n_ctx`), the same way on every backend.
pub(crate) fn check_forward(
    c: &LlamaConfig,
    len: usize,
    n_ctx: usize,
    tokens: &[u32],
    logits: Option<&[f32]>,
) -> Result<(), crate::ModelError> {
    use crate::ModelError;
    if let Some(logits) = logits
        && logits.len() != c.n_vocab
    {
        return Err(ModelError::Invalid(format!(
            "logits buffer holds {}, vocab is {}",
            logits.len(),
            c.n_vocab
        )));
    }
    if tokens.is_empty() {
        return Err(ModelError::Invalid("no tokens to run".into()));
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
        return Err(ModelError::Invalid(format!(
            "token id {bad} is outside the vocabulary of {}",
            c.n_vocab
        )));
    }
    if len + tokens.len() > n_ctx {
        return Err(ModelError::Invalid(format!(
            "context full: {len} + {} tokens exceed the session's {n_ctx} positions",
            tokens.len()
        )));
    }
    Ok(())
}
