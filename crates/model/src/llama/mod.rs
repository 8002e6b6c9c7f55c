//! The Llama family (Llama 2/3, SmolLM2, TinyLlama): hyper-parameters, weights, KV cache and
//! the CPU forward pass.

mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod hf;
pub(crate) mod kept;
mod weights;
pub mod wgpu;

pub use config::{LlamaConfig, RopeStyle};

/// The engine of `device` when it is a GPU this build supports (`None` on the CPU): the one
/// place that knows which GPU backends are compiled in.
pub(crate) fn gpu_engine(
    cpu: &cpu::CpuLlama,
    device: &std::sync::Arc<dyn tern_compute::Device>,
) -> Result<Option<Box<dyn crate::engine::Engine>>, crate::ModelError> {
    #[cfg(feature = "cuda")]
    if device.as_cuda().is_some() {
        return Ok(Some(Box::new(cuda::CudaLlama::new(cpu, device.clone())?)));
    }
    #[cfg(feature = "wgpu")]
    if device.as_wgpu().is_some() {
        return Ok(Some(Box::new(wgpu::WgpuLlama::new(cpu, device.clone())?)));
    }
    let _ = (cpu, device);
    Ok(None)
}
/// Whether a model on `device` at `precision` gives a prompt the bits of its tokens decoded
/// one by one, whatever the prompt's length and however it is cut: on the CPU, and on a
/// CUDA GPU whose tensor-core products run at `Precision::Tensor` (sm_80 and later, where
/// no prompt takes cuBLAS GEMMs). A server may then continue a conversation from a kept
/// prefix without changing the bytes of a reply.
pub fn prefill_is_exact(device: &dyn tern_compute::Device, precision: cpu::Precision) -> bool {
    #[cfg(feature = "cuda")]
    if let Some(gpu) = device.as_cuda() {
        return cuda::tensor_cores_wanted(gpu.arch(), precision);
    }
    let _ = precision;
    device.kind() == tern_compute::DeviceChoice::Cpu
}

pub use hf::{HfConfig, llama3_rope_factors, read_hf_config};
pub use weights::{LayerWeights, LlamaWeights, Matrix, Storage};

/// Each name's total of `times` (kernel name, microseconds), in the order first seen: a
/// per-kernel breakdown of a step.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) fn totals_by_name(
    times: impl IntoIterator<Item = (&'static str, f64)>,
) -> Vec<(&'static str, f64)> {
    let mut totals: Vec<(&'static str, f64)> = Vec::new();
    for (name, us) in times {
        match totals.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += us,
            None => totals.push((name, us)),
        }
    }
    totals
}

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
