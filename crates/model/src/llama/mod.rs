//! The Llama family (Llama 2/3, SmolLM2, TinyLlama): hyper-parameters, weights, KV cache and
//! the CPU forward pass.

mod config;
pub mod cpu;
mod hf;
mod weights;

pub use config::{LlamaConfig, RopeStyle};
pub use hf::{HfConfig, llama3_rope_factors, read_hf_config};
pub use weights::{LayerWeights, LlamaWeights, Matrix, Storage};
