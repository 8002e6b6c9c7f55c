//! Models: GGUF and safetensors files, quantized weight formats, and the Llama-family
//! forward pass on the CPU, the reference every other backend is checked against.

pub mod digest;
pub mod engine;
pub mod fastdot;
pub mod generate;
pub mod gguf;
pub mod gguf_write;
pub mod llama;
pub mod model;
pub mod numerics;
pub mod quant;
pub mod safetensors;
pub mod steps;
pub mod top;

pub use digest::ModelDigest;
pub use llama::cpu::{KvType, Precision};
pub use model::{Model, Session, Step};
pub use numerics::Numerics;
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
    /// Rendering a chat template failed (a bad message, or one of the render's bounds).
    #[error(transparent)]
    Template(tern_text::TextError),
    /// The GPU, its driver or a GPU library (cuBLAS, NVRTC, wgpu) failed at `what`: not the
    /// caller's input, so the same call may succeed later or on another device.
    #[error("{backend}: {what} failed: {reason}")]
    Device {
        /// `cuda` or `wgpu`.
        backend: &'static str,
        what: String,
        reason: String,
    },
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

    /// A [`ModelError::Device`] failure of `backend` at `what`.
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub(crate) fn device(
        backend: &'static str,
        what: impl Into<String>,
        reason: impl std::fmt::Display,
    ) -> ModelError {
        ModelError::Device {
            backend,
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    /// Whether a device failed ([`ModelError::Device`]), here or in the error an
    /// [`ModelError::InFile`] wraps.
    pub fn is_device(&self) -> bool {
        match self {
            ModelError::Device { .. } => true,
            ModelError::InFile { inner, .. } => inner.is_device(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_errors_are_told_apart() {
        let err = ModelError::device("cuda", "launching a kernel", "CUDA_ERROR_ILLEGAL_ADDRESS");
        assert!(
            matches!(&err, ModelError::Device { backend: "cuda", what, .. } if what == "launching a kernel")
        );
        assert_eq!(
            err.to_string(),
            "cuda: launching a kernel failed: CUDA_ERROR_ILLEGAL_ADDRESS"
        );
        assert!(err.is_device());
        let wrapped = err
            .in_file(Path::new("model.gguf"))
            .in_file(Path::new("dir"));
        assert!(wrapped.is_device());
        assert!(!ModelError::Invalid("a bad argument".into()).is_device());
        assert!(
            !ModelError::Format("x".into())
                .in_file(Path::new("m"))
                .is_device()
        );
    }
}
