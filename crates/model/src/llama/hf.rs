//! A Hugging Face Llama checkpoint's `config.json`, read into a [`LlamaConfig`].

use serde_json::Value;

use crate::ModelError;
use crate::llama::{LlamaConfig, RopeStyle};

/// What `config.json` says beyond the shape.
pub struct HfConfig {
    pub config: LlamaConfig,
    /// Llama-3 rotary frequency factors, when `rope_scaling` asks for them.
    pub rope_freqs: Option<Vec<f32>>,
}

/// Reads `config.json` of a `LlamaForCausalLM` checkpoint.
pub fn read_hf_config(json: &str) -> Result<HfConfig, ModelError> {
    let v: Value =
        serde_json::from_str(json).map_err(|e| ModelError::Format(format!("config.json: {e}")))?;
    let arch = v["architectures"][0].as_str().unwrap_or("");
    let model_type = v["model_type"].as_str().unwrap_or("");
    if arch != "LlamaForCausalLM" && model_type != "llama" {
        return Err(ModelError::Unsupported(format!(
            "architecture `{arch}` / model_type `{model_type}` (this build runs Llama)"
        )));
    }
    let get = |key: &str| -> Result<usize, ModelError> {
        v[key]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                ModelError::Format(format!("config.json: `{key}` is missing or not a count"))
            })
    };
    let n_embd = get("hidden_size")?;
    let n_head = get("num_attention_heads")?;
    let head_dim = v["head_dim"]
        .as_u64()
        .map_or_else(|| n_embd.checked_div(n_head).unwrap_or(0), |d| d as usize);
    let config = LlamaConfig {
        n_layer: get("num_hidden_layers")?,
        n_embd,
        n_head,
        n_head_kv: get("num_key_value_heads").unwrap_or(n_head),
        n_ff: get("intermediate_size")?,
        n_vocab: get("vocab_size")?,
        n_ctx_train: get("max_position_embeddings")?,
        head_dim,
        n_rot: head_dim,
        rope_base: v["rope_theta"].as_f64().unwrap_or(10_000.0) as f32,
        rope_style: RopeStyle::Halves,
        rms_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
    };
    config.validate()?;
    let scaling = &v["rope_scaling"];
    let rope_freqs = match scaling["rope_type"]
        .as_str()
        .or_else(|| scaling["type"].as_str())
    {
        None | Some("default") => None,
        Some("llama3") => {
            let f = |key: &str, default: f64| scaling[key].as_f64().unwrap_or(default) as f32;
            Some(llama3_rope_factors(
                &config,
                f("factor", 8.0),
                f("low_freq_factor", 1.0),
                f("high_freq_factor", 4.0),
                f("original_max_position_embeddings", 8192.0),
            ))
        }
        Some(other) => {
            return Err(ModelError::Unsupported(format!(
                "rope_scaling type `{other}`"
            )));
        }
    };
    Ok(HfConfig { config, rope_freqs })
}

/// Llama 3's per-frequency divisors (what llama.cpp stores as `rope_freqs.weight`): long
/// wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
pub fn llama3_rope_factors(
    c: &LlamaConfig,
    factor: f32,
    low: f32,
    high: f32,
    old_ctx: f32,
) -> Vec<f32> {
    let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
    (0..c.n_rot / 2)
        .map(|i| {
            let freq = 1.0 / c.rope_base.powf((2 * i) as f32 / c.n_rot as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}
