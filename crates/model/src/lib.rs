//! Models: GGUF and safetensors files, quantized weight formats, and the Llama-family
//! forward pass on the CPU, the reference every other backend is checked against.

pub mod fastdot;
pub mod generate;
pub mod gguf;
pub mod gguf_write;
pub mod llama;
pub mod model;
pub mod quant;
pub mod safetensors;
pub mod top;

pub use llama::cpu::Precision;
pub use model::{Model, Session};
pub use top::{Candidate, MAX_TOP};

use std::path::Path;

/// Errors from opening or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("malformed model file: {0}")]
    Format(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("{path}: {inner}")]
    InFile {
        path: String,
        inner: Box<ModelError>,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ModelError {
        ModelError::Io {
            path: path.display().to_string(),
            error: source,
        }
    }

    pub(crate) fn in_file(self, path: &Path) -> ModelError {
        ModelError::InFile {
            path: path.display().to_string(),
            inner: Box::new(self),
        }
    }
}
