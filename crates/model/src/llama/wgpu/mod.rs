//! The Llama forward pass on a GPU through wgpu (Vulkan; Metal on macOS), checked against
//! the CPU reference ([`super::cpu`]).
//!
//! Weights are uploaded once, in their file's block format, into storage buffers shared by
//! every session; each session owns its KV cache and activation buffers in device memory.
//! Kernels are the real WGSL files in `kernels/` ([`shaders`] composes them), validated by
//! naga and translated to Metal's language in the tests.
//!
//! Guarantees:
//! - Activations stay in f32 and weights are dequantized inside each dot product, as the CPU
//!   reference does; every reduction runs in a fixed order, so results are reproducible run
//!   to run and independent of other work on the GPU. Rotary factors are computed on the
//!   host exactly as the reference computes them.
//! - When the logits buffer lies in guest memory the device imported (an actor's memory),
//!   the last kernel writes the logits there directly: no staging buffer, no copy.
//! - A call's launches are recorded once per session and replayed: one submission per chunk
//!   of up to [`MAX_CHUNK`] tokens.
//! - All device work of a call finishes before the call returns.

pub mod shaders;

#[cfg(feature = "wgpu")]
mod kernels;
#[cfg(feature = "wgpu")]
mod session;
#[cfg(feature = "wgpu")]
pub mod testing;
#[cfg(feature = "wgpu")]
mod weights;

#[cfg(feature = "wgpu")]
pub use model::{Startup, WgpuLlama};
#[cfg(feature = "wgpu")]
pub use session::WgpuSession;

/// Positions run through the layers together in one submission (a prefill is cut into
/// chunks of this many tokens). The kernels' `MAX_TOK`: [`shaders`] writes it into them.
pub const MAX_CHUNK: usize = 8;

/// Positions one attention split covers. The attention kernels' `SPLIT`: [`shaders`] writes
/// it into them.
const ATTN_SPLIT: usize = 64;

#[cfg(feature = "wgpu")]
mod model;
