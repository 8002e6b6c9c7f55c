//! The Llama family (Llama 2/3, SmolLM2, TinyLlama): hyper-parameters, weights, KV cache and
//! the CPU forward pass.

mod config;
pub mod cpu;
mod weights;

pub use config::{LlamaConfig, RopeStyle};
pub use weights::{LlamaWeights, Matrix};
